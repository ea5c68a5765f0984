"""TreeRPO node values, sibling groups and normalisations on a hand-worked unbalanced tree."""

import math

import pytest

from learner.advantage import node_values, treerpo_advantages
from tests.fixtures.learner import tree_from_edges

# q -> {A=1, B=2}; A -> {A1=3, A2=4}; A1 -> {5, 6, 7} (leaves 1, 0, 0); A2 -> {10} (leaf 1, a single child);
# B -> {8, 9} (leaves 0, 0: a zero-spread group)
PARENTS = {1: 0, 2: 0, 3: 1, 4: 1, 5: 3, 6: 3, 7: 3, 8: 2, 9: 2, 10: 4}
REWARDS = {5: 1.0, 6: 0.0, 7: 0.0, 10: 1.0, 8: 0.0, 9: 0.0}


def unbalanced():
    return tree_from_edges(PARENTS, REWARDS)


def test_node_values_mean_children_vs_mean_leaves():
    children = node_values(unbalanced(), "mean_children")
    leaves = node_values(unbalanced(), "mean_leaves")
    assert children[3] == leaves[3] == pytest.approx(1 / 3)
    assert children[4] == leaves[4] == 1.0
    assert children[1] == pytest.approx((1 / 3 + 1) / 2)  # 2/3
    assert leaves[1] == pytest.approx(2 / 4)  # leaves 1, 0, 0, 1
    assert children[0] == pytest.approx((2 / 3 + 0) / 2)
    assert leaves[0] == pytest.approx(2 / 6)


def test_groups_no_normalisation_and_counts():
    (adv,), counts = treerpo_advantages([unbalanced()], "mean_children", "none")
    assert adv == pytest.approx({1: 1 / 3, 2: -1 / 3, 3: -1 / 3, 4: 1 / 3, 5: 2 / 3, 6: -1 / 3, 7: -1 / 3})
    # {8, 9} zero spread and {10} singleton: dropped, their segments untrained
    assert (counts.kept, counts.zero_spread, counts.singleton) == (3, 1, 1)


def test_mean_leaves_changes_the_root_group():
    (adv,), _ = treerpo_advantages([unbalanced()], "mean_leaves", "none")
    assert adv[1] == pytest.approx(0.25) and adv[2] == pytest.approx(-0.25)


def test_group_normalisation():
    (adv,), _ = treerpo_advantages([unbalanced()], "mean_children", "group", eps=1e-6)
    pair_std = math.sqrt(2) / 3  # unbiased std of two values 2/3 apart: (2/3, 0) and (1/3, 1)
    triple_std = math.sqrt(1 / 3)  # of (1, 0, 0)
    assert adv[1] == pytest.approx((1 / 3) / (pair_std + 1e-6), rel=1e-12)
    assert adv[4] == pytest.approx((1 / 3) / (pair_std + 1e-6), rel=1e-12)
    assert adv[5] == pytest.approx((2 / 3) / (triple_std + 1e-6), rel=1e-12)
    assert adv[7] == pytest.approx((-1 / 3) / (triple_std + 1e-6), rel=1e-12)


def test_batch_normalisation():
    (adv,), _ = treerpo_advantages([unbalanced()], "mean_children", "batch", eps=1e-6)
    # centred values 1/3, -1/3, -1/3, 1/3, 2/3, -1/3, -1/3: mean 0, unbiased var (10/9)/6
    std = math.sqrt(10 / 54)
    assert adv[5] == pytest.approx((2 / 3) / (std + 1e-6), rel=1e-12)
    assert adv[2] == pytest.approx((-1 / 3) / (std + 1e-6), rel=1e-12)


def test_uniform_tree_has_no_groups():
    (adv,), counts = treerpo_advantages([tree_from_edges({1: 0, 2: 0}, {1: 1.0, 2: 1.0})])
    assert adv == {} and counts.zero_spread == 1
