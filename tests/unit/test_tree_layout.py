"""Tree-packed layout: hand-worked arrays, the mask against a brute-force ancestor check, every leaf's row
rebuilt from the layout, padding, cutting an oversized tree, and which models may be packed."""

import numpy as np
import pytest
import torch

from learner.advantage import TreeAdvantages
from learner.batch import build_sequences, trained_rows
from learner.engine import choose_packing
from learner.tree_attention import dense_tree_mask, tree_packing_refusal
from learner.tree_layout import collate_units, empty_packed_micro_batch, lay_out, pack_units, tree_units
from tests.fixtures.learner import LEAF_VALUES, irregular_batch, worked_example_tree

# worked example: prompt 1,2,3; A=1 {100,101}, B=2 {102,103}, A1=3 {104,105}, A2=4, B1=5, B2=6 (2 tokens each)


def test_worked_example_layout_by_hand():
    u = lay_out(TreeAdvantages(worked_example_tree(), "leaf", LEAF_VALUES),
                trained_rows(TreeAdvantages(worked_example_tree(), "leaf", LEAF_VALUES)))
    # DFS pre-order: prompt, A, A1, A2, B, B1, B2
    assert u.tokens.tolist() == [1, 2, 3, 100, 101, 104, 105, 106, 107, 102, 103, 108, 109, 110, 111]
    assert u.positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 5, 6, 3, 4, 5, 6, 5, 6]
    assert u.subtree_end.tolist() == [15] * 3 + [9] * 2 + [7] * 2 + [9] * 2 + [15] * 2 + [13] * 2 + [15] * 2
    # the last token of A (index 4) predicts the first token of both A1 and A2; B's first token is
    # predicted by the prompt's last token (index 2), not by A2's last token (index 8)
    assert u.predictor.tolist() == [-1, 0, 1, 2, 3, 4, 5, 4, 7, 2, 9, 10, 11, 10, 13]
    assert [r.tolist() for r in u.row_index] == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 7, 8],
                                                 [0, 1, 2, 9, 10, 11, 12], [0, 1, 2, 9, 10, 13, 14]]
    assert u.entry_token.tolist() == [3, 4, 5, 6, 3, 4, 7, 8, 9, 10, 11, 12, 9, 10, 13, 14]
    assert u.entry_advantage.tolist() == [1.5] * 4 + [-0.5] * 4 + [-0.25] * 8
    np.testing.assert_allclose(u.entry_logprob, -u.tokens[u.entry_token] / 1000, rtol=1e-6)
    assert len(u) == 15 and u.row_tokens == 28


def _ancestors_or_self(tree, unit_rows):
    """Brute force: the set of (query, key) unit indices where key lies on query's root path, up to query."""
    u = lay_out(tree, unit_rows)
    allowed = set()
    for row in u.row_index:  # every row is a root-to-leaf path; a token's ancestors are the earlier ones
        for j, q in enumerate(row.tolist()):
            allowed.update((q, int(k)) for k in row[:j + 1])
    return u, allowed


@pytest.mark.parametrize("case", range(4))
def test_mask_is_the_ancestor_relation_and_rows_rebuild(case):
    ta = irregular_batch()[case]
    rows = trained_rows(ta)
    u, allowed = _ancestors_or_self(ta, rows)
    mask = dense_tree_mask(torch.from_numpy(u.subtree_end)[None])[0, 0]
    got = {(int(q), int(k)) for q, k in mask.nonzero().tolist()}
    assert got == allowed
    assert len(u) == ta.tree.unique_token_count()  # every node is on some trained path here
    for row, seq in zip(u.row_index, build_sequences([ta]), strict=True):
        assert u.tokens[row].tolist() == seq.tokens.tolist()
        assert u.positions[row].tolist() == list(range(len(seq)))
        assert u.predictor[row[1:]].tolist() == row[:-1].tolist()  # labels: each token predicted by its path predecessor


def test_collated_forest_entries_follow_the_rows_path():
    batch = irregular_batch()
    units = tree_units(batch, 64)
    mb = collate_units(units, pad_id=0, pad_multiple=16)
    rows = build_sequences(batch)
    width = mb.input_ids.shape[1]
    assert mb.input_ids.shape == (4, 32) and width % 16 == 0
    assert mb.real_tokens == sum(t.tree.unique_token_count() for t in batch)
    assert mb.row_tokens == sum(len(r) for r in rows)
    # entries, in order, are the rows path's trained tokens (row-major) with the same values
    flat = mb.targets[mb.entry_slots]
    assert mb.input_ids.flatten()[flat].tolist() == [int(t) for r in rows for t in r.tokens[r.loss_mask > 0]]
    assert mb.advantages.tolist() == pytest.approx([float(a) for r in rows for a in r.advantages[r.loss_mask > 0]])
    assert mb.behaviour_logprobs.tolist() == [float(x) for r in rows for x in r.behaviour_logprobs[r.loss_mask > 0]]
    assert mb.targets.tolist() == sorted(set(flat.tolist()))  # each unique token once
    # padding attends to itself only; a predictor never points into padding or into another unit
    mask = dense_tree_mask(mb.subtree_end)[:, 0]
    for b, u in enumerate(units):
        pad = torch.arange(len(u), width)
        assert (mask[b, pad][:, pad] == torch.eye(len(pad), dtype=torch.bool)).all()
        assert not mask[b, pad, :len(u)].any() and not mask[b, :len(u), len(u):].any()
    assert ((mb.predictors // width) == (mb.targets // width)).all()
    assert ((mb.predictors % width) < (mb.targets % width)).all()


def test_treerpo_trains_each_segment_once():
    tree = worked_example_tree()
    ta = TreeAdvantages(tree, "segment", {1: 0.5, 2: -0.5, 3: 1.0, 4: -1.0})  # B's children dropped
    mb = collate_units(tree_units([ta], 64), pad_id=0)
    trained = mb.input_ids.flatten()[mb.targets[mb.entry_slots]].tolist()
    assert trained == [100, 101, 104, 105, 106, 107, 102, 103]  # A, A1, A2, B: once each
    assert mb.advantages.tolist() == [0.5, 0.5, 1.0, 1.0, -1.0, -1.0, -0.5, -0.5]
    assert mb.real_tokens == 3 + 8 + 2  # B1 and B2 are needed by no row: not laid out


def test_an_oversized_tree_is_cut_into_row_groups_that_each_hold_their_prefix():
    ta = TreeAdvantages(worked_example_tree(), "leaf", LEAF_VALUES)
    units = tree_units([ta], 9)  # the whole tree is 15 tokens; A's subtree 9, B's subtree 9
    assert [u.tokens.tolist() for u in units] == [[1, 2, 3, 100, 101, 104, 105, 106, 107],
                                                  [1, 2, 3, 102, 103, 108, 109, 110, 111]]
    assert sum(len(u.entry_token) for u in units) == 16
    assert len(pack_units(units, 18, pad_id=0)) == 1 and len(pack_units(units, 17, pad_id=0)) == 2
    with pytest.raises(ValueError, match="micro_batch_tokens=6"):
        pack_units(tree_units([ta], 6), 6, pad_id=0)  # a single row (7 tokens) does not fit


def test_empty_micro_batch_trains_nothing():
    mb = empty_packed_micro_batch(pad_id=0)
    assert mb.trained_tokens == 0 and mb.real_tokens == 0 and mb.input_ids.shape == (1, 2)
    assert len(mb.targets) == 0 and mb.row_tokens == 0


def _config(kind: str, **kw):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind]
    cfg = cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, **kw)
    cfg._attn_implementation = kw.get("attn_implementation", "sdpa")
    return cfg


def test_models_that_cannot_be_tree_packed_are_refused_or_fall_back():
    assert tree_packing_refusal(_config("llama")) is None
    assert tree_packing_refusal(_config("qwen2")) is None
    assert tree_packing_refusal(_config("mistral", sliding_window=None)) is None
    flash = _config("llama", attn_implementation="flash_attention_2")
    assert "flash_attention_2" in tree_packing_refusal(flash)
    window = _config("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0)
    assert "sliding" in tree_packing_refusal(window)
    assert "4096-token sliding window" in tree_packing_refusal(_config("mistral", sliding_window=4096))
    with pytest.raises(ValueError, match="learner.packing=tree: attention implementation 'flash_attention_2'"):
        choose_packing("tree", flash)
    assert choose_packing("auto", flash) == "rows" and choose_packing("auto", window) == "rows"
    assert choose_packing("auto", _config("llama")) == "tree" and choose_packing("rows", _config("llama")) == "rows"
