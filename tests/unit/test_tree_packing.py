"""Tree packing against the per-leaf rows it replaces, in float64 on tiny random Llama and Qwen2 models with
grouped-query attention: log-probs, the loss with clip / dual clip / KL active, every gradient, one AdamW
step; the eager backend's additive mask; and the chunked LM head."""

import copy
import types

import numpy as np
import pytest
import torch

from learner.advantage import TreeAdvantages, compute_advantages
from learner.batch import build_sequences, collate
from learner.forward import PickedLogprob, head_logprobs, packed_token_logprobs, token_logprobs
from learner.loss import LossSettings, policy_loss
from learner.tree_attention import FLEX_BLOCK, pad_multiple
from learner.tree_layout import collate_units, tree_units
from protocol.config.learner import LearnerConfig
from tests.fixtures.learner import irregular_batch, tree_from_edges, worked_example_tree

VOCAB = 1000


def _model(kind: str, attn: str = "sdpa", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[kind]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attn_implementation=attn)
    torch.manual_seed(seed)
    model = cls(cfg).double()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_float64_rms_norm, module)
    return model


def _float64_rms_norm(norm, x):
    """HF's RMSNorm casts to float32 inside, so its backward rounds gradients to float32 and the two layouts'
    different summation orders then differ at 1e-10; this computes the same norm in the input's dtype."""
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rows_logprobs(model, batch, **kw):
    """The reference: every trained (row, token) of the padded per-leaf rows, row-major, and its values."""
    rows = build_sequences(batch)
    mb = collate(rows, pad_id=0)
    lp, ent = token_logprobs(model, mb, with_entropy=True, **kw)
    on = mb.loss_mask[:, 1:] > 0
    return lp[on], ent[on], mb.behaviour_logprobs[:, 1:][on], mb.advantages[:, 1:][on]


def _packed(batch, pad_multiple=1):
    return collate_units(tree_units(batch, 4096), pad_id=0, pad_multiple=pad_multiple)


def _treerpo_batch() -> list[TreeAdvantages]:
    a = worked_example_tree(tree_id="a", seg_lens={1: 3, 2: 1, 3: 5, 4: 2, 5: 1, 6: 4})
    b = tree_from_edges({1: 0, 2: 1, 3: 1, 4: 0}, {2: 1.0, 3: -1.0, 4: 0.0}, tree_id="b", first_token=300)
    return [TreeAdvantages(a, "segment", {1: 0.5, 2: -0.5, 3: 1.0, 4: -1.0, 5: 0.2, 6: -0.2}),
            TreeAdvantages(b, "segment", {1: 0.3, 4: -0.3, 2: 0.9, 3: -0.9})]


CASES = {"forest": lambda: irregular_batch(), "treerpo": _treerpo_batch,
         "chain": lambda: irregular_batch()[2:3], "duplicates": lambda: irregular_batch()[3:]}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pad_multiple", [1, 16])
def test_packed_logprobs_equal_the_rows(kind, case, pad_multiple):
    model = _model(kind)
    batch = CASES[case]()
    ref_lp, ref_ent, beh, adv = _rows_logprobs(model, batch)
    mb = _packed(batch, pad_multiple)
    lp, ent = packed_token_logprobs(model, mb, with_entropy=True)
    assert lp.dtype == torch.float64 and len(lp) == len(ref_lp) > 0
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-10)
    assert torch.equal(mb.behaviour_logprobs, beh) and torch.equal(mb.advantages, adv)
    assert mb.real_tokens < mb.row_tokens or case == "chain"


def test_eager_attention_takes_an_additive_mask():
    """Eager attention adds the mask to the scores (a boolean mask would add 0/1): packed eager == rows eager,
    to float32 rounding (HF's eager attention takes its softmax in float32 even for a float64 model)."""
    model = _model("qwen2", attn="eager")
    batch = irregular_batch()
    ref_lp, *_ = _rows_logprobs(model, batch)
    lp, _ = packed_token_logprobs(model, _packed(batch, 8))
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-6)


def test_flex_attention_block_mask_gives_the_rows_logprobs():
    """The GPU backend's BlockMask (same predicate, T padded to 128) on CPU: forward only, as FlexAttention has
    no CPU backward; float32, as its CPU kernel computes in float32 (the GPU run checks the backward)."""
    model = _model("llama").float()
    batch = irregular_batch()
    ref_lp, *_ = _rows_logprobs(model, batch)
    model.config._attn_implementation = "flex_attention"
    with torch.no_grad():
        lp, _ = packed_token_logprobs(model, _packed(batch, pad_multiple(model.config)))
    assert pad_multiple(model.config) == FLEX_BLOCK
    torch.testing.assert_close(lp, ref_lp.detach(), rtol=0, atol=1e-5)


def _proximal(logprobs: torch.Tensor, behaviour: torch.Tensor) -> torch.Tensor:
    """Proximal log-probs that differ from the current ones, chosen per token (by its behaviour log-prob,
    which both layouts hold alike) so that the clip below, above and the dual clip all fire."""
    shift = torch.tensor([-0.5, 0.5, -3.0, 0.05], dtype=logprobs.dtype)[(behaviour * -1000).round().long() % 4]
    return logprobs.detach() + shift


def _loss_and_grads(model, ref_model, batch, packed: bool, settings: LossSettings, normaliser: float):
    if packed:
        mb = _packed(batch)
        lp, _ = packed_token_logprobs(model, mb)
        with torch.no_grad():
            ref, _ = packed_token_logprobs(ref_model, mb)
        beh, adv = mb.behaviour_logprobs, mb.advantages
        mask = torch.ones_like(adv)
    else:
        mb = collate(build_sequences(batch), pad_id=0)
        lp, _ = token_logprobs(model, mb)
        with torch.no_grad():
            ref, _ = token_logprobs(ref_model, mb)
        beh, adv, mask = mb.behaviour_logprobs[:, 1:], mb.advantages[:, 1:], mb.loss_mask[:, 1:]
    loss, stats = policy_loss(lp, beh, adv, mask, settings, proximal_logprobs=_proximal(lp, beh), ref_logprobs=ref,
                              normaliser=normaliser)
    model.zero_grad()
    loss.backward()
    return loss.detach(), stats, [p.grad.clone() for p in model.parameters()]


def _batch_for(estimator: str) -> list[TreeAdvantages]:
    """Trees with rewards through the real estimator (whitening on for TreePO)."""
    if estimator == "grpo":  # independent sampling: every leaf its own chain under the prompt
        trees = [tree_from_edges({n: 0 for n in range(1, 6)}, {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 0.5},
                                 seg_lens={1: 4, 2: 6, 3: 1, 4: 3, 5: 5}, tree_id="g", prompt_len=7)]
    else:
        trees = [t.tree for t in irregular_batch()]
    batch, _ = compute_advantages(trees, LearnerConfig(estimator=estimator, filter_uniform_prompts=False))
    values = np.array([v for ta in batch for v in ta.values.values()])
    assert (values > 0).any() and (values < 0).any()
    return batch


@pytest.mark.parametrize("estimator", ["treepo", "treerpo", "grpo"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_loss_gradients_and_an_adamw_step_equal_the_rows(estimator, kind):
    batch = _batch_for(estimator)
    settings = LossSettings(kl_coef=0.05)
    model, ref_model = _model(kind, seed=0), _model(kind, seed=1)
    normaliser = float(sum(r.loss_mask.sum() for r in build_sequences(batch)))
    rows_model, tree_model = model, copy.deepcopy(model)
    loss_r, stats_r, grads_r = _loss_and_grads(rows_model, ref_model, batch, False, settings, normaliser)
    loss_t, stats_t, grads_t = _loss_and_grads(tree_model, ref_model, batch, True, settings, normaliser)
    assert stats_t.tokens == stats_r.tokens == normaliser
    assert stats_r.clipped_low > 0 and stats_r.clipped_high > 0 and stats_r.dual_clipped > 0 and stats_r.ref_kl > 0
    for name in ("clipped_low", "clipped_high", "dual_clipped", "importance_capped"):
        assert getattr(stats_t, name) == getattr(stats_r, name), name
    assert stats_t.ref_kl == pytest.approx(stats_r.ref_kl, rel=1e-10)
    torch.testing.assert_close(loss_t, loss_r, rtol=0, atol=1e-8)
    assert any(g.abs().max() > 1e-3 for g in grads_r)
    for g_t, g_r in zip(grads_t, grads_r, strict=True):
        torch.testing.assert_close(g_t, g_r, rtol=0, atol=1e-8)
    for m in (rows_model, tree_model):
        torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1).step()
    for p_t, p_r in zip(tree_model.parameters(), rows_model.parameters(), strict=True):
        torch.testing.assert_close(p_t, p_r, rtol=0, atol=1e-8)


def test_the_fused_head_passes_gradcheck():
    logits = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 5, 7])
    assert torch.autograd.gradcheck(lambda x: PickedLogprob.apply(x, targets)[0], (logits,))


def test_the_chunked_head_equals_log_softmax_and_one_pass():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).double()
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    out = {}
    for chunk in (64, 5):
        lp, ent = head_logprobs(head, hidden, targets, chunk, with_entropy=True)
        grads = torch.autograd.grad((lp * torch.linspace(-1, 1, 23, dtype=torch.float64)).sum(),
                                    [hidden, head.weight])
        out[chunk] = (lp.detach(), ent, grads)
    reference = torch.log_softmax(head(hidden), -1)
    ref_grads = torch.autograd.grad((reference.gather(-1, targets[:, None])[:, 0]
                                     * torch.linspace(-1, 1, 23, dtype=torch.float64)).sum(), [hidden, head.weight])
    torch.testing.assert_close(out[64][0], reference.gather(-1, targets[:, None])[:, 0].detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[64][1], -(reference.exp() * reference).sum(-1).detach(), rtol=0, atol=1e-12)
    for a, b in zip(out[64][2], ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[5][0], out[64][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[5][1], out[64][1], rtol=0, atol=1e-12)
    for a, b in zip(out[5][2], out[64][2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():  # the proximal pass's path: picked log-probs only, same numbers
        for chunk in (64, 5):
            lp, ent = head_logprobs(head, hidden, targets, chunk)
            assert ent is None
            torch.testing.assert_close(lp, out[64][0], rtol=0, atol=1e-12)
