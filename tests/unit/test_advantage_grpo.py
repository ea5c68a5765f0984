"""GRPO advantages, prompt-level filtering, and the config-driven pipeline `compute_advantages`."""

import math

import pytest

from learner.advantage import compute_advantages, drop_uniform_prompts, grpo_advantages
from protocol.config.learner import LearnerConfig
from tests.fixtures.learner import tree_from_edges, worked_example_tree


def test_grpo_worked_example():
    adv = grpo_advantages(worked_example_tree(), eps=1e-6)
    # mean -0.5; unbiased std sqrt((1.5^2 + 3 * 0.5^2) / 3) = 1
    assert adv == pytest.approx({3: 1.5 / (1 + 1e-6), 4: -0.5 / (1 + 1e-6), 5: -0.5 / (1 + 1e-6),
                                 6: -0.5 / (1 + 1e-6)}, rel=1e-12)


def test_grpo_uniform_prompt_is_zero():
    assert grpo_advantages(tree_from_edges({1: 0, 2: 0}, {1: 1.0, 2: 1.0})) == {1: 0.0, 2: 0.0}


def test_drop_uniform_prompts_counts():
    trees = [worked_example_tree(tree_id="a"), tree_from_edges({1: 0, 2: 0}, {1: -1.0, 2: -1.0}, tree_id="b"),
             tree_from_edges({1: 0}, {1: 1.0}, tree_id="c")]
    kept, dropped = drop_uniform_prompts(trees)
    assert [t.tree_id for t in kept] == ["a"] and dropped == 2


def test_compute_treepo_filters_and_whitens():
    trees = [worked_example_tree(tree_id="a"), tree_from_edges({1: 0, 2: 0}, {1: 1.0, 2: 1.0}, tree_id="u")]
    batch, stats = compute_advantages(trees, LearnerConfig())
    assert [ta.tree.tree_id for ta in batch] == ["a"]
    assert stats["prompts"] == 2 and stats["prompts_dropped_uniform"] == 1
    assert batch[0].values[3] == pytest.approx(1.25 / math.sqrt(0.6 + 1e-8))


def test_compute_without_filter_keeps_uniform_prompts():
    trees = [tree_from_edges({1: 0, 2: 0}, {1: 1.0, 2: 1.0})]
    batch, stats = compute_advantages(trees, LearnerConfig(estimator="grpo", filter_uniform_prompts=False))
    assert len(batch) == 1 and batch[0].values == {1: 0.0, 2: 0.0} and stats["prompts_dropped_uniform"] == 0


def test_compute_treerpo_reports_group_counts():
    batch, stats = compute_advantages([worked_example_tree()], LearnerConfig(estimator="treerpo", treerpo_norm="none"))
    assert batch[0].level == "segment"
    # values: A = 0, B = -1 (root mean -0.5); A's group +-1; B's group {-1, -1} dropped
    assert batch[0].values == pytest.approx({1: 0.5, 2: -0.5, 3: 1.0, 4: -1.0})
    assert (stats["groups_kept"], stats["groups_dropped_zero_spread"]) == (2, 1)
