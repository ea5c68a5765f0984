"""One micro-batch through a causal LM: per-token log-probs and entropy, then the policy loss.

Logits at position t-1 predict token t, so every output here has one column fewer than the
micro-batch (`[:, 1:]` of its per-token arrays). The entropy is that of the full next-token
distribution, computed without grad, for metrics only.
"""

from __future__ import annotations

import torch

from learner.batch import MicroBatch
from learner.loss import LossSettings, LossStats, policy_loss


def token_logprobs(model: torch.nn.Module, mb: MicroBatch,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_t | tokens_<t) for t >= 1, [B, T-1] float32; and the entropy there if asked."""
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                use_cache=False)
    logits = out.logits[:, :-1].float()
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, mb.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


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
