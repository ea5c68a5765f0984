"""Held-out metrics on hand-worked cases: pass@k (unbiased), maj@k (exact at k = n, ties to the first
sampled, unparsed answers do not vote), the percentile bootstrap interval and the paired gain, and the
per-dataset summary of sequential and of tree sampling (its own names)."""

import numpy as np
import pytest

from actors.eval_metrics import (
    PromptSamples,
    accuracy_key,
    bootstrap_ci,
    eval_label,
    maj_at_k,
    paired_gain,
    pass_at_k,
    summarise,
)
from protocol.config.evaluation import EvalConfig


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2) pairs hold no correct sample
    assert pass_at_k(5, 2, 5) == 1.0  # k = n: any correct sample
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_maj_at_k_votes_over_parsed_answers():
    # k = n: "7" twice beats "8" once; an unparsed answer does not vote
    assert maj_at_k(["7", None, "8", "7"], [True, False, False, True], 4) == 1.0
    assert maj_at_k(["8", "7", "8", None], [False, True, False, False], 4) == 0.0
    # a tie goes to the answer sampled first
    assert maj_at_k(["8", "7", "7", "8"], [False, True, True, False], 4) == 0.0
    assert maj_at_k(["7", "8"], [True, False], 2) == 1.0
    # nothing parsed: wrong, even if a sample was marked correct
    assert maj_at_k([None, None], [True, False], 2) == 0.0
    # k < n: the bootstrap; with one answer everywhere it is that answer's correctness
    assert maj_at_k(["3"] * 5, [True] * 5, 3) == 1.0
    assert 0.0 < maj_at_k(["3", "4", "3", "4", "3"], [True, False, True, False, True], 3) < 1.0


def test_summary_per_dataset_and_overall():
    a = PromptSamples("arith", [True, False, False, True], ["1", "2", None, "1"], [4, 6, 8, 2], [1.0, -1.0, -1.0, 1.0])
    b = PromptSamples("arith", [False] * 4, [None] * 4, [10] * 4, [-1.0] * 4)
    c = PromptSamples("logic", [True] * 4, ["x"] * 4, [3] * 4, [1.0] * 4)
    m = summarise([a, b, c], 4)
    assert m["arith/mean@4"] == pytest.approx((0.5 + 0.0) / 2) and m["logic/mean@4"] == 1.0
    assert m["arith/pass@4"] == 0.5 and m["arith/maj@4"] == 0.5 and m["arith/prompts"] == 2.0
    assert m["all/mean@4"] == pytest.approx(0.5) and m["all/maj@4"] == pytest.approx(2 / 3)
    assert m["arith/response_tokens"] == pytest.approx((5 + 10) / 2) and m["all/reward"] == pytest.approx(0.0)
    # intervals of the per-problem values: mean@4 of the prompts is 0.5, 0.0, 1.0
    assert (m["all/mean@4_ci_low"], m["all/mean@4_ci_high"]) == bootstrap_ci([0.5, 0.0, 1.0])
    assert (m["all/maj@4_ci_low"], m["all/maj@4_ci_high"]) == bootstrap_ci([1.0, 0.0, 1.0])
    assert m["logic/pass@4_ci_low"] == m["logic/pass@4_ci_high"] == 1.0  # one problem: no spread
    assert not any(key.startswith("all/leaf_") for key in m)
    assert accuracy_key(EvalConfig(k=4)) == "all/mean@4"


def test_bootstrap_interval_by_hand():
    # the documented procedure: rows of item indices drawn with replacement, then the quantiles of the row means
    draws = np.random.default_rng(0).integers(0, 4, size=(5, 4))
    assert draws.tolist() == [[3, 2, 2, 1], [1, 0, 0, 0], [0, 3, 2, 3], [2, 2, 3, 2], [2, 2, 2, 3]]
    # values 0, 0.25, 0.5, 1: row means 0.5625, 0.0625, 0.625, 0.625, 0.625; sorted 0.0625 0.5625 0.625 0.625 0.625
    # 2.5% lies at position 0.025 * 4 = 0.1: 0.0625 + 0.1 * (0.5625 - 0.0625) = 0.1125; 97.5% at 3.9: 0.625
    assert bootstrap_ci([0.0, 0.25, 0.5, 1.0], samples=5, seed=0) == pytest.approx((0.1125, 0.625))
    assert bootstrap_ci([0.0, 0.25, 0.5, 1.0], samples=5, seed=0, level=0.5) == pytest.approx((0.5625, 0.625))
    assert bootstrap_ci([0.3] * 7) == (0.3, 0.3)  # all equal: no spread
    low, high = bootstrap_ci([0.0] * 50 + [1.0] * 50)  # defaults: 1000 resamples, seed 42
    assert 0.38 < low < 0.5 < high < 0.62


def test_paired_gain_over_the_problems_in_both():
    before = {"a": 0.0, "b": 0.5, "c": 0.75, "only-before": 1.0}
    after = {"a": 0.25, "b": 0.75, "c": 1.0, "only-after": 0.0}
    assert paired_gain(before, after) == (0.25, 0.25, 0.25)  # every problem gained 0.25: an exact gain
    # per-problem gains (by key a, b, c, d) 0, 0.25, 0.5, 1: the bootstrap case above, resampled in pairs
    before = {"a": 0.5, "b": 0.25, "c": 0.0, "d": 0.0}
    after = {"a": 0.5, "b": 0.5, "c": 0.5, "d": 1.0}
    assert paired_gain(before, after, samples=5, seed=0) == pytest.approx((0.4375, 0.1125, 0.625))
    with pytest.raises(ValueError, match="no problem evaluated in both"):
        paired_gain({"a": 1.0}, {"b": 1.0})


def test_tree_sampling_reports_leaf_metrics_not_independent_sample_ones():
    a = PromptSamples("arith", [True, False, False, False], ["1", "2", "2", None], [4] * 4, [1.0, 0, 0, 0])
    b = PromptSamples("arith", [True, True, True, False], ["3", "3", "3", "4"], [4] * 4, [1.0, 1.0, 1.0, 0])
    m = summarise([a, b], 4, "tree")
    assert m["all/leaf_accuracy"] == pytest.approx((0.25 + 0.75) / 2)
    assert m["all/any_correct"] == 1.0 and m["all/leaf_majority"] == 0.5  # a's leaves vote "2" (wrong), b's "3"
    assert (m["all/leaf_majority_ci_low"], m["all/leaf_majority_ci_high"]) == bootstrap_ci([0.0, 1.0])
    assert m["all/any_correct_ci_low"] == m["all/any_correct_ci_high"] == 1.0
    assert not any("@" in key for key in m)
    assert accuracy_key(EvalConfig(k=4, sampling="tree")) == "all/leaf_accuracy"


def test_eval_label_says_held_out_only_without_training_problems():
    assert eval_label({"eval_overlap": 0.0, "eval_problems": 33.0}) == "held-out"
    assert eval_label({"eval_overlap": 5.0, "eval_problems": 33.0}) == "eval (5 of 33 problems also in training)"
    assert eval_label({"all/mean@4": 0.2}) == "eval"  # a row from before problem keys: overlap unmeasured
