"""The eval set keyed by problem: from a tiny problem space drawn over the training seeds, exclusion drops
exactly the items whose problem is a training problem (more than text equality would), and without it the
overlap is reported; an Evaluation on a scripted engine carries the counts, the metric names of its sampling
and the per-problem accuracy."""

import logging

import numpy as np
import pytest

from actors.evaluate import Evaluation, select_problems
from protocol.config import PipelineConfig
from protocol.config.prompts import PromptsConfig
from tests.fixtures.engines import ScriptedEngine
from treepo.prompts import problem_space_warning, raw_rows

ONE_DIGIT_SUMS = {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+"],
                                       "allow_parentheses": False, "allow_negation": False}}


def pair(row: dict) -> tuple[int, ...]:
    """The problem "a + b" of a row, independently of its key: the sorted operands."""
    return tuple(sorted(map(int, row["entry"]["metadata"]["expression"].split(" + "))))


def test_eval_items_of_training_problems_are_dropped_or_counted():
    # reasoning-gym's item i of seed s is item s + i of seed 0: seed 20 repeats training items 20..29, and the
    # space of one-digit sums is small enough for more of its problems to be training problems in other words
    training = raw_rows(PromptsConfig(dataset_args=ONE_DIGIT_SUMS, size=30, seed=0))
    evals = raw_rows(PromptsConfig(dataset_args=ONE_DIGIT_SUMS, size=30, seed=20))
    seen = {pair(r) for r in training}
    overlapping = [i for i, r in enumerate(evals) if pair(r) in seen]
    distinct = {pair(r) for r in evals}
    assert (len(overlapping), len(distinct), len(distinct & seen)) == (21, 22, 13)
    assert sum(r["prompt"] in {t["prompt"] for t in training} for r in evals) == 17  # what text equality dropped
    keys, training_keys = [r["key"] for r in evals], {r["key"] for r in training}

    kept, counts = select_problems(keys, training_keys, exclude=False)
    assert counts == {"eval_problems": 22, "eval_overlap": 13, "overlap_dropped": 0, "duplicates_dropped": 8}
    assert [pair(evals[i]) for i in kept] == list(dict.fromkeys(pair(r) for r in evals))  # the first of each

    kept, counts = select_problems(keys, training_keys, exclude=True)
    assert counts == {"eval_problems": 9, "eval_overlap": 0, "overlap_dropped": 21, "duplicates_dropped": 0}
    assert set(kept) == set(range(30)) - set(overlapping)


def boxed(completion: str, answer: str) -> float:
    """The reward of the scripted leaves: 1 when the leaf ended with the scripted engine's boxed token."""
    return float("\\boxed" in completion)


class CharTokenizer:
    """Enough of a tokenizer for `treepo.prompts.render`: the question's characters as token ids."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return messages[-1]["content"]

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) for c in text]}


@pytest.mark.parametrize("sampling", ["sequential", "tree"])
def test_evaluation_reports_counts_names_and_per_problem_accuracy(tmp_path, caplog, sampling):
    prompts = {"dataset_args": ONE_DIGIT_SUMS, "size": 30, "system_prompt": ""}
    cfg = PipelineConfig.model_validate({
        "run": {"output_dir": str(tmp_path)},
        "rollout": {"segment_tokens": 4, "max_depth": 2, "width": 4, "prompts_per_step": 4},
        "reward": {"kind": "callable", "function": "tests.unit.test_held_out:boxed"},
        "prompts": {**prompts, "seed": 0},
        "eval": {"prompts": {**prompts, "seed": 20}, "k": 4, "sampling": sampling, "exclude_training": False}})
    engine = ScriptedEngine(stops=lambda r, g: g.random() < 0.5, seed=1, boxed=True)
    engine.tokenizer = CharTokenizer()
    with caplog.at_level(logging.INFO, logger="treepo.evaluate"):
        evaluation = Evaluation(cfg, engine)
    try:
        metrics = evaluation.run()
    finally:
        evaluation.close()
    assert ("eval set: eval_problems 22, eval_overlap 13, overlap_dropped 0, duplicates_dropped 8"
            in caplog.text and "30 generated basic_arithmetic items hold 24 distinct problems" in caplog.text)
    assert (metrics["eval_problems"], metrics["eval_overlap"], metrics["all/prompts"]) == (22.0, 13.0, 22.0)
    sequential, tree = ("mean@4", "pass@4", "maj@4"), ("leaf_accuracy", "any_correct", "leaf_majority")
    names, others = (sequential, tree) if sampling == "sequential" else (tree, sequential)
    assert {f"all/{name}{end}" for name in names for end in ("", "_ci_low", "_ci_high")} <= metrics.keys()
    assert not any(key.startswith(f"all/{name}") for name in others for key in metrics)
    assert evaluation.accuracy.keys() == {item.problem_key for item in evaluation.items}
    accuracy = list(evaluation.accuracy.values())
    assert len(set(accuracy)) > 1 and np.mean(accuracy) == pytest.approx(metrics[f"all/{names[0]}"])


def test_the_main_job_evaluates_200_problems_it_never_trains_on():
    from protocol.config import load_config

    cfg = load_config("configs/cpu-smollm2.yaml")
    training, evals = raw_rows(cfg.prompts), raw_rows(cfg.eval.prompts)
    _, counts = select_problems([r["key"] for r in evals], {r["key"] for r in training}, cfg.eval.exclude_training)
    assert counts["eval_overlap"] == 0 and counts["eval_problems"] >= 200
    assert problem_space_warning(cfg.prompts, training) is None  # the training set is a corner of the space
