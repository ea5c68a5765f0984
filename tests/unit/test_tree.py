import numpy as np

from protocol import ROOT_ID, Tree
from tests.factories import example_tree, same


def test_path_and_path_tokens_follow_parents():
    tree = example_tree(n_leaves=4, seg_tokens=3)
    # ids: 1 -> {2, 3}, 4 -> {5, 6}
    assert [s.node_id for s in tree.path(6)] == [4, 6]
    assert tree.path(ROOT_ID) == []
    assert np.array_equal(tree.path_tokens(3), np.concatenate([tree.segment(1).token_ids, tree.segment(3).token_ids]))
    assert np.array_equal(tree.path_logprobs(3), np.concatenate([tree.segment(1).logprobs, tree.segment(3).logprobs]))
    assert tree.path_tokens(ROOT_ID).dtype == np.int32 and len(tree.path_tokens(ROOT_ID)) == 0


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


def _with(tree, segments, leaves):
    return Tree.build(tree_id=tree.tree_id, prompt_id=tree.prompt_id, run_id=tree.run_id,
                      prompt_token_ids=tree.prompt_token_ids, sampling=tree.sampling, segments=segments, leaves=leaves,
                      prompt_text=tree.prompt_text, answer=tree.answer)


def test_build_and_views_round_trip():
    tree = example_tree(n_leaves=4)
    again = _with(tree, tree.segments, tree.leaves)
    assert same(again, tree)
    assert tree.segment(5).depth == 2 and tree.segment(5).finish == "stop" and tree.segment(4).finish == "length"
    assert tree.leaves[0].reward_details == {"acc": 1.0}
    assert tree.min_policy_version() == 3


def test_merge_is_idempotent():
    tree = example_tree(n_leaves=4)
    piece = _with(tree, tree.segments[:3], tree.leaves[:2])
    partial = _with(tree, [], [])
    partial.merge(piece)
    partial.merge(piece)
    partial.merge(tree)
    assert same(partial, tree)
    assert partial.segment(6).parent_id == 4
