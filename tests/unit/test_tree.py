import numpy as np

from protocol import ROOT_ID
from tests.factories import example_tree


def test_path_and_path_tokens_follow_parents():
    tree = example_tree(n_leaves=4, seg_tokens=3)
    # ids: 1 -> {2, 3}, 4 -> {5, 6}
    assert [s.node_id for s in tree.path(6)] == [4, 6]
    assert tree.path(ROOT_ID) == []
    nodes = tree.by_id()
    assert np.array_equal(tree.path_tokens(3), np.concatenate([nodes[1].token_ids, nodes[3].token_ids]))


def test_leaves_under_and_children():
    tree = example_tree(n_leaves=4)
    assert [leaf.node_id for leaf in tree.leaves_under(1)] == [2, 3]
    assert [leaf.node_id for leaf in tree.leaves_under(6)] == [6]
    assert len(tree.leaves_under(ROOT_ID)) == 4
    assert tree.children() == {0: [1, 4], 1: [2, 3], 4: [5, 6]}


def test_unique_token_count_counts_shared_prefix_once():
    tree = example_tree(n_leaves=4, seg_tokens=8)
    # prompt 5 + 6 segments x 8; the 4 trajectories would be 4 x (5 + 16) = 84 tokens
    assert tree.unique_token_count() == 5 + 6 * 8


def test_merge_is_idempotent():
    tree = example_tree(n_leaves=4)
    piece = example_tree(n_leaves=4)
    piece.segments, piece.leaves = piece.segments[:3], piece.leaves[:2]
    partial = example_tree(n_leaves=4)
    partial.segments, partial.leaves = [], []
    partial.merge(piece)
    partial.merge(piece)
    partial.merge(tree)
    assert [s.node_id for s in partial.segments] == [1, 2, 3, 4, 5, 6]
    assert [leaf.node_id for leaf in partial.leaves] == [2, 3, 5, 6]
