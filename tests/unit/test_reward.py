"""Rewards: boxed parsing, math-verify equivalence, ±1 / 1-0, DAPO overlong numbers, a timeout,
the reasoning-gym scorer and a named callable."""

from __future__ import annotations

import time

import numpy as np
import pytest

from actors.boxed import last_boxed
from actors.independent_sampler import IndependentSampler
from actors.reward import RewardScorer, overlong_penalty, unboxed_answer
from actors.tree_sampler import TreePOSampler
from actors.treerpo_sampler import TreeRPOSampler
from protocol.config.reward import RewardConfig
from protocol.config.rollout import RolloutConfig
from tests.fixtures.engines import ScriptedEngine
from treepo.prompts import PromptItem


def item(answer: str, entry: dict | None = None) -> PromptItem:
    return PromptItem(prompt_id="p", text="q", answer=answer, token_ids=np.zeros(1, np.int32), entry=entry or {})


def slow_reward(text: str, answer: str) -> float:
    time.sleep(30)
    return 1.0


def length_reward(text: str, answer: str) -> float:
    return float(len(text)) / 10


@pytest.fixture(scope="module")
def math_reward():
    r = RewardScorer(RewardConfig(kind="math", timeout_s=30), max_tokens=100)
    yield r
    r.close()


def test_last_boxed():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{{a}{b{c}}}") == "{a}{b{c}}"
    assert last_boxed("\\boxed{open \\boxed{2}") == "2"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("so \\boxed 42.") == "42"
    assert last_boxed("no answer") is None


def test_math_verify_equivalence(math_reward):
    assert math_reward(item("0.5"), "so \\boxed{\\frac{1}{2}}", 10) == (1.0, {"acc": 1.0, "score": 1.0,
                                                                            "overlong": 0.0, "timeout": 0.0})
    assert math_reward(item("\\frac{1}{2}"), "\\boxed{0.5}", 10)[0] == 1.0
    assert math_reward(item("3"), "\\boxed{4}", 10)[0] == -1.0
    assert math_reward(item("3"), "the answer is 3", 10) == (-1.0, {"acc": 0.0, "score": -1.0, "overlong": 0.0,
                                                                   "timeout": 0.0})


def test_zero_one_and_overlong():
    assert overlong_penalty(80, 100, 20, 1.0) == 0.0
    assert overlong_penalty(90, 100, 20, 1.0) == -0.5
    assert overlong_penalty(100, 100, 20, 1.0) == -1.0
    assert overlong_penalty(95, 100, 20, 0.5) == -0.375
    assert overlong_penalty(100, 100, 0, 1.0) == 0.0
    r = RewardScorer(RewardConfig(kind="math", correct=1.0, incorrect=0.0, overlong_buffer=20, timeout_s=30),
                     max_tokens=100)
    try:
        assert r(item("2"), "\\boxed{2}", 90) == (0.5, {"acc": 1.0, "score": 1.0, "overlong": -0.5, "timeout": 0.0})
        assert r(item("2"), "\\boxed{3}", 50)[0] == 0.0
    finally:
        r.close()


def test_the_overlong_penalty_counts_from_the_mode_s_response_cap():
    """TreeRPO's cap is treerpo_max_tokens (or D * L_step), not TreePO's d * l: a 20-token TreeRPO leaf under a
    24-token cap and an 8-token window is 4 tokens into it (-0.5); the same leaf under d * l = 48 is not."""
    rollout = RolloutConfig(mode="treerpo", segment_tokens=16, max_depth=3, treerpo_depth=3, treerpo_step_tokens=8)
    assert rollout.response_cap() == 24 and rollout.response_cap("treepo") == 48
    assert rollout.model_copy(update={"treerpo_max_tokens": 40}).response_cap() == 40
    assert TreeRPOSampler(ScriptedEngine(), rollout).max_tokens == 24
    assert TreePOSampler(ScriptedEngine(), rollout).max_tokens == IndependentSampler(ScriptedEngine(), rollout).max_tokens == 48
    reward = RewardConfig(kind="math", correct=1.0, incorrect=0.0, overlong_buffer=8, timeout_s=30)
    for mode, penalty in [("treerpo", -0.5), ("treepo", 0.0)]:
        r = RewardScorer.for_rollout(reward, rollout.model_copy(update={"mode": mode}))
        try:
            assert r(item("2"), "\\boxed{2}", 20)[1]["overlong"] == penalty
        finally:
            r.close()


def test_timeout_scores_incorrect_and_worker_recovers():
    r = RewardScorer(RewardConfig(kind="callable", function="tests.unit.test_reward:slow_reward", timeout_s=3.0),
                     max_tokens=100)
    try:
        t = time.monotonic()
        assert r(item("1"), "x", 5) == (-1.0, {"score": -1.0, "overlong": 0.0, "timeout": 1.0})
        assert time.monotonic() - t >= 3.0  # bounded by timeout_s (plus the worker start-up)
        r.cfg.function = "tests.unit.test_reward:length_reward"
        assert r(item("1"), "abcd", 5) == (0.4, {"score": 0.4, "overlong": 0.0, "timeout": 0.0})
    finally:
        r.close()


def test_reasoning_gym_scorer():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=1)[0]
    r = RewardScorer(RewardConfig(kind="reasoning_gym", incorrect=0.0, timeout_s=30), max_tokens=100)
    try:
        assert r(item(entry["answer"], entry), f"so \\boxed{{{entry['answer']}}}", 5)[0] == 1.0
        assert r(item(entry["answer"], entry), f"work\n{entry['answer']}", 5)[0] == 1.0  # last line, no box
        assert r(item(entry["answer"], entry), "\\boxed{123456}", 5)[0] == 0.0
    finally:
        r.close()


def test_unboxed_answer_is_the_last_line_or_the_last_number():
    text = "3 + 4 = 7, so the sum is 7.\nI hope that helps with 1,234 things"
    assert unboxed_answer(text, "last_line") == "I hope that helps with 1,234 things"
    assert unboxed_answer(text, "last_number") == "1234"
    assert unboxed_answer("-2.5 then -3 -> -11.", "last_number") == "-11"
    assert unboxed_answer("no digits here", "last_number") == ""
    assert unboxed_answer("", "last_line") == ""


def test_reasoning_gym_last_number_fallback_grades_an_unboxed_sentence():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=1)[0]
    sentence = f"The answer is {entry['answer']}."
    lines = RewardScorer(RewardConfig(kind="reasoning_gym", incorrect=0.0, timeout_s=30), max_tokens=100)
    numbers = RewardScorer(RewardConfig(kind="reasoning_gym", incorrect=0.0, timeout_s=30, fallback="last_number"),
                           max_tokens=100)
    try:
        assert lines(item(entry["answer"], entry), sentence, 5)[0] == 0.0  # the last line is not the bare answer
        assert numbers(item(entry["answer"], entry), sentence, 5)[0] == 1.0
        assert numbers(item(entry["answer"], entry), f"{sentence} Or 123456", 5)[0] == 0.0  # the last number counts
        assert numbers(item(entry["answer"], entry), f"\\boxed{{123456}} {entry['answer']}", 5)[0] == 0.0  # box first
    finally:
        lines.close()
        numbers.close()
