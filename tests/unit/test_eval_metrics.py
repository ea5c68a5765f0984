"""Held-out metrics on hand-worked cases: pass@k (unbiased), maj@k (exact at k = n, ties to the first
sampled, unparsed answers do not vote), and the per-dataset summary."""

import pytest

from actors.eval_metrics import PromptSamples, maj_at_k, pass_at_k, summarise


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
