"""What counts as "no signal" (prompt filter, TreePO's subtree std filter, TreeRPO's zero-spread groups),
with float tolerance and on correctness; and overlong masking of truncated responses."""

import numpy as np
import pytest

from learner.advantage import compute_advantages
from learner.advantage.filter import is_uniform, no_spread
from learner.advantage.overlong_mask import mask_truncated
from learner.advantage.result import TreeAdvantages
from learner.advantage.treepo import treepo_advantages
from learner.advantage.treerpo import GroupCounts, centred_groups
from learner.batch import build_sequences
from protocol.config.learner import LearnerConfig
from tests.fixtures.learner import tree_from_edges


def test_rounding_differences_are_no_spread():
    assert np.std([0.1, 0.1, 0.1]) > 0  # 1.4e-17: an exact std test calls this a group with signal
    assert no_spread([0.1, 0.1, 0.1]) and no_spread([-0.30000000000000004, -0.3]) and no_spread([5.0]) and no_spread([])
    assert not no_spread([0.1, 0.1 + 1e-6]) and not no_spread([1e6, 1e6 + 1.0])


def test_treepo_subtree_std_filter_skips_a_subgroup_equal_up_to_rounding():
    # root -> 1 -> {3, 4, 5} with rewards 0.1 each (a sum of 0.1s: std 1.4e-17), root -> 2 (reward 1.0)
    tree = tree_from_edges({1: 0, 2: 0, 3: 1, 4: 1, 5: 1}, {3: 0.1, 4: 0.1, 5: 0.1, 2: 1.0})
    filtered = treepo_advantages(tree, subtree_std_filter=True)
    mean = (0.3 + 1.0) / 4
    # leaves 3..5: the root group only (group 1 and its own single-leaf group are skipped / of one leaf)
    # leaf 3's terms without the filter: root, group 1 (0.1 - 0.1 = 0), its own (0.1 - 0 = 0.1, a group of one)
    assert filtered[3] == pytest.approx(np.mean([0.1 - mean]), abs=1e-15)
    assert treepo_advantages(tree)[3] == pytest.approx(np.mean([0.1 - mean, 0.0]), abs=1e-15)


def test_treerpo_node_values_equal_up_to_rounding_are_a_zero_spread_group():
    # node 1's value mean(-0.2, -0.4) = -0.30000000000000004; node 2's mean(-0.3, -0.3) = -0.3
    tree = tree_from_edges({1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}, {3: -0.2, 4: -0.4, 5: -0.3, 6: -0.3})
    counts = GroupCounts()
    groups = centred_groups(tree, "mean_children", counts)
    assert (counts.kept, counts.zero_spread) == (1, 2)  # only {3, 4} compares anything
    assert set(groups[0]) == {3, 4}


def test_prompt_filter_uses_correctness_not_shaped_reward():
    # all wrong; the overlong penalty makes the rewards differ by length
    wrong = tree_from_edges({1: 0, 2: 0}, {1: -1.0, 2: -1.25}, acc={1: 0.0, 2: 0.0}, tree_id="wrong")
    mixed = tree_from_edges({1: 0, 2: 0}, {1: 1.0, 2: -1.0}, acc={1: 1.0, 2: 0.0}, tree_id="mixed")
    no_acc = tree_from_edges({1: 0, 2: 0}, {1: 0.5, 2: 0.25}, tree_id="callable")  # no correctness: the rewards
    assert is_uniform(wrong) and not is_uniform(mixed) and not is_uniform(no_acc)
    batch, stats = compute_advantages([wrong, mixed, no_acc], LearnerConfig(estimator="grpo"))
    assert [ta.tree.tree_id for ta in batch] == ["mixed", "callable"] and stats["prompts_dropped_uniform"] == 1


def test_overlong_masking_drops_truncated_rows_and_keeps_shared_segments():
    # root -> 1 -> {2 (eos), 3 (max_tokens)}; root -> 4 (max_depth)
    tree = tree_from_edges({1: 0, 2: 1, 3: 1, 4: 0}, {2: 1.0, 3: -1.0, 4: -1.0},
                           stop_reasons={3: "max_tokens", 4: "max_depth"})
    leaf = TreeAdvantages(tree, "leaf", {2: 1.0, 3: -0.5, 4: -0.5})
    segment = TreeAdvantages(tree, "segment", {1: 0.3, 2: 0.7, 3: -0.7, 4: -0.3})
    (leaf_m, seg_m), masked = mask_truncated([leaf, segment])
    assert masked == 4  # two truncated leaves in each of the two copies
    assert leaf_m.values == {2: 1.0}
    assert seg_m.values == {1: 0.3, 2: 0.7}  # 1 leads to the complete leaf 2; 3 and 4 only to truncated ones
    batch, stats = compute_advantages([tree], LearnerConfig(estimator="grpo", mask_truncated=True))
    assert stats["leaves_masked_truncated"] == 2 and list(batch[0].values) == [2]
    assert [int(s.loss_mask.sum()) for s in build_sequences(batch)] == [4]  # leaf 2's row: segments 1 and 2
    unmasked, _ = compute_advantages([tree], LearnerConfig(estimator="grpo"))
    assert len(build_sequences(unmasked)) == 3
