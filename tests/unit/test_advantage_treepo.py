"""TreePO subgroup advantages and token whitening on hand-worked trees (ALGORITHMS.md §1.5.2)."""

import math

import pytest

from learner.advantage import TreeAdvantages, treepo_advantages, whiten
from tests.fixtures.learner import tree_from_edges, worked_example_tree


def test_worked_example_average():
    assert treepo_advantages(worked_example_tree()) == pytest.approx({3: 1.25, 4: -0.75, 5: -0.25, 6: -0.25})


def test_worked_example_group_size_weighting():
    adv = treepo_advantages(worked_example_tree(), weighting="group_size")
    # A1 = (4*1.5 + 2*1)/6; A2 = (4*-0.5 + 2*-1)/6; B1 = B2 = (4*-0.5 + 2*0)/6
    assert adv == pytest.approx({3: 4 / 3, 4: -2 / 3, 5: -1 / 3, 6: -1 / 3})
    assert round(adv[3], 2) == 1.33


def test_subtree_std_filter_skips_uniform_subgroups():
    adv = treepo_advantages(worked_example_tree(), subtree_std_filter=True)
    # B's subgroup is {-1, -1}: skipped, so B1/B2 keep only the root term -1 - (-0.5)
    assert adv == pytest.approx({3: 1.25, 4: -0.75, 5: -0.5, 6: -0.5})


def test_chain_above_a_fork_counts_once_per_depth():
    # q->{A=1, B=2}; A->A'=3 (single child); A'->{A1=4, A2=5}; B is a leaf
    tree = tree_from_edges({1: 0, 2: 0, 3: 1, 4: 3, 5: 3}, {4: 1.0, 5: -1.0, 2: -1.0})
    adv = treepo_advantages(tree)
    # root mean -1/3; A and A' both hold {A1, A2} (mean 0); leaves are singletons (skipped)
    assert adv[4] == pytest.approx((4 / 3 + 1 + 1) / 3)
    assert adv[5] == pytest.approx((-2 / 3 - 1 - 1) / 3)
    assert adv[2] == pytest.approx(-2 / 3)


def test_single_leaf_root_group_uses_mean_zero():
    tree = tree_from_edges({1: 0}, {1: 0.5})
    assert treepo_advantages(tree) == {1: 0.5}


def test_whitening_equal_lengths():
    tree = worked_example_tree()  # every leaf path has 2 + 2 tokens
    out = whiten([TreeAdvantages(tree, "leaf", treepo_advantages(tree))])[0].values
    # token mean 0; unbiased var = 4 * (1.25^2 + 0.75^2 + 0.25^2 + 0.25^2) / (16 - 1) = 0.6
    std = math.sqrt(0.6 + 1e-8)
    assert out == pytest.approx({3: 1.25 / std, 4: -0.75 / std, 5: -0.25 / std, 6: -0.25 / std}, rel=1e-12)


def test_whitening_is_token_weighted():
    tree = worked_example_tree(seg_lens={3: 6})  # A1's path has 8 tokens, the others 4
    out = whiten([TreeAdvantages(tree, "leaf", treepo_advantages(tree))])[0].values
    mu = (8 * 1.25 + 4 * (-0.75 - 0.25 - 0.25)) / 20  # 0.25
    var = (8 * 1.0**2 + 4 * (1.0**2 + 0.5**2 + 0.5**2)) / 19  # 14/19
    std = math.sqrt(var + 1e-8)
    assert mu == 0.25
    assert out == pytest.approx({3: 1 / std, 4: -1 / std, 5: -0.5 / std, 6: -0.5 / std}, rel=1e-12)


def test_whitening_spans_the_batch():
    a, b = worked_example_tree(tree_id="a"), tree_from_edges({1: 0, 2: 0}, {1: 1.0, 2: -1.0}, tree_id="b")
    out = whiten([TreeAdvantages(a, "leaf", treepo_advantages(a)), TreeAdvantages(b, "leaf", treepo_advantages(b))])
    # tree b: advantages +-1 over 2 tokens each; batch tokens 16 + 4, mean 0
    var = (4 * (1.25**2 + 0.75**2 + 0.25**2 + 0.25**2) + 2 * 2 * 1.0) / 19
    assert out[1].values[1] == pytest.approx(1 / math.sqrt(var + 1e-8), rel=1e-12)
