"""One micro-batch through a causal LM: per-token log-probs and entropy, then the policy loss.

Logits at position t-1 predict token t, so every output here has one column fewer than the
micro-batch (`[:, 1:]` of its per-token arrays). Only the positions t-1 whose token t is trained
(`loss_mask[:, t] > 0`) go through the LM head: the model is called for its final hidden states
(`output_hidden_states`, with `logits_to_keep` empty so that it computes no logits itself), the
output embedding is applied to the selected hidden rows, and a float32 log-softmax over the
vocabulary gives log pi(token_t | tokens_<t) there. Every other position (prompt, padding,
untrained context) is 0 in the outputs. The entropy is that of the full next-token distribution
at the same positions, computed without grad, for metrics only.

The shortcut assumes the model's logits are its output embedding of the final hidden state, with
nothing after it (no soft-cap or scaling, as in Gemma, Cohere or Granite), so it accepts only the
model types in `PLAIN_HEAD_MODELS` and raises for any other.
"""

from __future__ import annotations

import torch

from learner.batch import MicroBatch
from learner.loss import LossSettings, LossStats, policy_loss

PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def token_logprobs(model: torch.nn.Module, mb: MicroBatch,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_t | tokens_<t) for t >= 1 where token t is trained, else 0: [B, T-1] float32;
    and the entropy there if asked. `model` is a HF causal LM or a DeepSpeed engine around one."""
    hf_model = getattr(model, "module", model)  # under DeepSpeed, `model.config` is the engine's
    model_type = hf_model.config.model_type
    if model_type not in PLAIN_HEAD_MODELS:
        raise NotImplementedError(f"token_logprobs applies the bare output embedding; model type {model_type!r} "
                                  f"is not among those known to have no logit soft-cap or scaling: "
                                  f"{sorted(PLAIN_HEAD_MODELS)}")
    no_logits = torch.empty(0, dtype=torch.long, device=mb.input_ids.device)
    # through `model` itself, not `hf_model`: a DeepSpeed engine hooks the outputs for its backward
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                use_cache=False, output_hidden_states=True, logits_to_keep=no_logits)
    trained = mb.loss_mask[:, 1:] > 0
    logits = hf_model.get_output_embeddings()(out.hidden_states[-1][:, :-1][trained]).float()  # [N, V]
    vocab_logprobs = torch.log_softmax(logits, dim=-1)
    picked = vocab_logprobs.gather(-1, mb.input_ids[:, 1:][trained].unsqueeze(-1)).squeeze(-1)
    logprobs = picked.new_zeros(trained.shape).masked_scatter(trained, picked)
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():
        entropy = -(vocab_logprobs.exp() * vocab_logprobs).sum(-1)
    return logprobs, picked.new_zeros(trained.shape).masked_scatter(trained, entropy)


def micro_batch_loss(model: torch.nn.Module, mb: MicroBatch, settings: LossSettings, normaliser: float,
                     ref_model: torch.nn.Module | None = None) -> tuple[torch.Tensor, LossStats]:
    """The micro-batch's share of the step loss (its token sum / `normaliser`) and its statistics."""
    logprobs, entropy = token_logprobs(model, mb, with_entropy=True)
    ref = None
    if ref_model is not None:
        with torch.no_grad():
            ref, _ = token_logprobs(ref_model, mb)
    mask = mb.loss_mask[:, 1:]
    loss, stats = policy_loss(logprobs, mb.behaviour_logprobs[:, 1:], mb.advantages[:, 1:], mask, settings,
                              ref_logprobs=ref, normaliser=normaliser)
    stats.entropy = float((entropy * mask).sum())
    return loss, stats
