"""Log-probs and entropy from the LM head at trained positions only, against the model's full logits."""

import numpy as np
import pytest
import torch

from learner.batch import Sequence, collate
from learner.forward import token_logprobs
from learner.loss import LossSettings, policy_loss


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _micro_batch(pad_id: int):
    """Three right-padded rows: prompts of 5, 3 and 6 tokens, then responses; row 1 has an untrained
    context segment in the middle of its response (as TreeRPO builds them)."""
    rng = np.random.default_rng(0)
    rows = []
    for prompt, mask in ((5, [1] * 7), (3, [0] * 4 + [1] * 5), (6, [1] * 3)):
        n = prompt + len(mask)
        loss_mask = np.array([0] * prompt + mask, np.float32)
        rows.append(Sequence(rng.integers(100, 40_000, n).astype(np.int32),
                             (rng.normal(size=n) * loss_mask).astype(np.float32),
                             (rng.normal(-10.8, 0.1, n) * loss_mask).astype(np.float32), loss_mask))
    return collate(rows, pad_id)


def _reference(model, mb):
    """log pi(token_t | tokens_<t) and the entropy from the model's full logits, [B, T-1]."""
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, mb.input_ids[:, 1:, None])[..., 0], entropy


def _grads(model, logprobs, mb) -> tuple[torch.Tensor, ...]:
    """Gradient of the policy loss w.r.t. every parameter."""
    loss, _ = policy_loss(logprobs, mb.behaviour_logprobs[:, 1:], mb.advantages[:, 1:], mb.loss_mask[:, 1:],
                          LossSettings())
    return torch.autograd.grad(loss, list(model.parameters()))


def test_trained_positions_match_the_full_logits(model):
    mb = _micro_batch(model.config.pad_token_id)
    trained = mb.loss_mask[:, 1:] > 0
    assert mb.input_ids.shape == (3, 12) and int(trained.sum()) == 15 and not trained.all()
    logprobs, entropy = token_logprobs(model, mb, with_entropy=True)
    ref_logprobs, ref_entropy = _reference(model, mb)
    assert logprobs.shape == entropy.shape == trained.shape
    torch.testing.assert_close(logprobs[trained], ref_logprobs[trained], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[trained], ref_entropy[trained], rtol=0, atol=1e-5)
    assert not logprobs[~trained].any() and not entropy[~trained].any()

    grads = _grads(model, logprobs, mb)
    ref_grads = _grads(model, ref_logprobs, mb)
    assert len(grads) == len(ref_grads) and any(g.abs().max() > 0 for g in grads)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_a_model_whose_head_does_more_than_the_output_embedding_runs_its_full_forward():
    """Gemma 2 soft-caps its logits: the head-only shortcut would be wrong, its own logits are used instead."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=40_000, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                           head_dim=16, final_logit_softcapping=2.0)).float()
    with torch.no_grad():
        gemma.lm_head.weight.mul_(100)  # logits well past the cap
    mb = _micro_batch(0)
    trained = mb.loss_mask[:, 1:] > 0
    logprobs, entropy = token_logprobs(gemma, mb, with_entropy=True)
    ref_logprobs, ref_entropy = _reference(gemma, mb)
    torch.testing.assert_close(logprobs[trained], ref_logprobs[trained], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[trained], ref_entropy[trained], rtol=1e-5, atol=1e-5)
    hidden = gemma.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                         position_ids=mb.position_ids).last_hidden_state
    uncapped = torch.log_softmax(gemma.lm_head(hidden)[:, :-1], -1).gather(-1, mb.input_ids[:, 1:, None])[..., 0]
    assert (uncapped[trained] - logprobs[trained]).abs().max() > 0.1  # the shortcut would have missed the cap
