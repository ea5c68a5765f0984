"""From trees with advantages to rows and micro-batches: token positions, masks, shared segments, packing."""

import numpy as np
import pytest
import torch

from learner.advantage import TreeAdvantages
from learner.batch import Sequence, build_sequences, pack, split_for_ranks
from tests.fixtures.learner import worked_example_tree

# worked example tokens: prompt 1,2,3; segment n (1..6) holds tokens 100+2(n-1), 101+2(n-1)


def test_leaf_rows_align_tokens_advantages_and_logprobs():
    tree = worked_example_tree()
    rows = build_sequences([TreeAdvantages(tree, "leaf", {3: 1.5, 4: -0.5, 5: -0.25, 6: -0.25})])
    assert len(rows) == 4
    a1 = rows[0]
    assert a1.tokens.tolist() == [1, 2, 3, 100, 101, 104, 105]
    assert a1.advantages.tolist() == [0, 0, 0, 1.5, 1.5, 1.5, 1.5]
    assert a1.loss_mask.tolist() == [0, 0, 0, 1, 1, 1, 1]
    np.testing.assert_allclose(a1.behaviour_logprobs, [0, 0, 0, -0.100, -0.101, -0.104, -0.105], rtol=1e-6)
    assert rows[3].tokens.tolist() == [1, 2, 3, 102, 103, 110, 111]
    assert rows[3].advantages[3:].tolist() == [-0.25] * 4


def test_shared_segments_are_trained_once():
    tree = worked_example_tree()
    values = {1: 0.5, 2: -0.5, 3: 1.0, 4: -1.0, 5: 0.25, 6: -0.25}
    rows = build_sequences([TreeAdvantages(tree, "segment", values)])
    assert len(rows) == 4
    # leaf A1 trains A (its first leaf) and A1; leaf A2 trains only A2 with A as context
    assert rows[0].advantages.tolist() == [0, 0, 0, 0.5, 0.5, 1.0, 1.0]
    assert rows[1].tokens.tolist() == [1, 2, 3, 100, 101, 106, 107]
    assert rows[1].loss_mask.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert rows[1].advantages.tolist() == [0, 0, 0, 0, 0, -1.0, -1.0]
    assert rows[2].advantages.tolist() == [0, 0, 0, -0.5, -0.5, 0.25, 0.25]
    trained = [int(t) for r in rows for t, m in zip(r.tokens, r.loss_mask, strict=True) if m]
    assert sorted(trained) == list(range(100, 112))  # every segment token exactly once


def test_untrained_leaves_are_not_built():
    tree = worked_example_tree()
    rows = build_sequences([TreeAdvantages(tree, "segment", {1: 0.5, 2: -0.5, 3: 1.0, 4: -1.0})])  # B group dropped
    assert [r.tokens[-1] for r in rows] == [105, 107, 109]  # leaf B2 has nothing of its own to train
    assert rows[2].loss_mask.tolist() == [0, 0, 0, 1, 1, 0, 0]


def _row(n: int, start: int = 10) -> Sequence:
    toks = np.arange(start, start + n, dtype=np.int32)
    ones = np.ones(n, np.float32)
    return Sequence(toks, ones * 0.5, -ones, np.concatenate([[0.0], ones[1:]]).astype(np.float32))


def test_pack_respects_the_budget_and_pads():
    rows = [_row(5), _row(10), _row(3), _row(7)]
    mbs = pack(rows, token_budget=20, pad_id=0)
    assert [tuple(mb.input_ids.shape) for mb in mbs] == [(2, 10), (2, 5)]
    assert all(mb.input_ids.numel() <= 20 for mb in mbs)
    second = mbs[1]
    assert second.input_ids[1].tolist() == [10, 11, 12, 0, 0]
    assert second.attention_mask[1].tolist() == [1, 1, 1, 0, 0]
    assert second.loss_mask[1].tolist() == [0, 1, 1, 0, 0]
    assert second.position_ids[1].tolist() == [0, 1, 2, 3, 4]
    assert second.advantages[1].tolist() == [0.5, 0.5, 0.5, 0, 0]
    assert sum(mb.real_tokens for mb in mbs) == 25 and sum(mb.trained_tokens for mb in mbs) == 21


def test_pack_rejects_a_row_over_the_budget():
    with pytest.raises(ValueError, match="micro_batch_tokens=8"):
        pack([_row(9)], token_budget=8, pad_id=0)


def test_split_for_ranks_balances_tokens():
    shards = split_for_ranks([_row(n) for n in (9, 8, 5, 4, 3)], 2)
    # 9 -> r0, 8 -> r1, 5 -> r1 (13), 4 -> r0 (13), 3 -> r0 (the first of the least loaded)
    assert [[len(r) for r in s] for s in shards] == [[9, 4, 3], [8, 5]]
    assert pack(shards[0], 32, 0)[0].input_ids.dtype == torch.long
