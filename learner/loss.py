"""Policy loss: PPO clip-higher with dual clip, decoupled off-policy correction, optional k3 KL.

Per trained token t with advantage A, current log-prob lp, proximal log-prob lp_prox and behaviour
log-prob lp_beh (what the actor sampled with):

    decoupled (default):  r = exp(lp - lp_prox),  w = min(exp(lp_prox - lp_beh), cap)   (w: no grad)
    on_policy:            r = exp(lp - lp_beh),   w = 1                                   (plain PPO)
    l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    l = min(l, -A c)               where A < 0 (dual clip, c = 10)
    l = w l + beta k3,             k3 = exp(lp_ref - lp) - (lp_ref - lp) - 1   (when beta > 0)
    loss = sum_t l_t mask_t / normaliser

`normaliser` defaults to the micro-batch's trained-token count (token-mean); the learner passes the
trained-token count of the whole step so that the sum of micro-batch losses is the step's token-mean.
The proximal policy is the weights at the start of the optimizer step (decoupled PPO, Hilton et
al.); with one update per step it equals the detached current log-probs, and the importance weight
w then carries the whole off-policy correction. Metrics are sums over trained tokens (`LossStats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import torch

from protocol.config.learner import LearnerConfig


@dataclass(frozen=True)
class LossSettings:
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 10.0
    importance_cap: float = 2.0
    off_policy: Literal["decoupled", "on_policy"] = "decoupled"
    kl_coef: float = 0.0

    @classmethod
    def from_config(cls, cfg: LearnerConfig) -> LossSettings:
        return cls(clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                   importance_cap=cfg.importance_cap, off_policy=cfg.off_policy, kl_coef=cfg.kl_coef)


@dataclass
class LossStats:
    """Sums over trained tokens (and extremes) of one or more micro-batches."""

    tokens: float = 0.0
    loss: float = 0.0  # sum of per-token losses (before the normaliser)
    clipped_low: float = 0.0  # A < 0 and r < 1 - eps_low
    clipped_high: float = 0.0  # A > 0 and r > 1 + eps_high
    dual_clipped: float = 0.0  # A < 0 and r > c
    importance_weight: float = 0.0  # uncapped pi_prox / pi_beh
    importance_capped: float = 0.0  # tokens whose weight hit the cap
    approx_kl: float = 0.0  # k3 of KL(behaviour || current)
    ref_kl: float = 0.0  # k3 of KL(current || reference)
    entropy: float = 0.0
    importance_weight_max: float = field(default=float("-inf"))
    importance_weight_min: float = field(default=float("inf"))

    def merge(self, other: LossStats) -> None:
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            value = max(a, b) if f.name.endswith("_max") else min(a, b) if f.name.endswith("_min") else a + b
            setattr(self, f.name, value)

    def summary(self) -> dict[str, float]:
        """Token means (fractions for the clip counters) and extremes."""
        n = max(self.tokens, 1.0)
        out = {f.name: getattr(self, f.name) / n for f in fields(self)
               if f.name != "tokens" and not f.name.endswith(("_max", "_min"))}
        out["clip_frac_low"] = out.pop("clipped_low")
        out["clip_frac_high"] = out.pop("clipped_high")
        out["dual_clip_frac"] = out.pop("dual_clipped")
        out["importance_capped_frac"] = out.pop("importance_capped")
        out["trained_tokens"] = self.tokens
        if self.tokens:
            out["importance_weight_max"] = self.importance_weight_max
            out["importance_weight_min"] = self.importance_weight_min
        return out


def policy_loss(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, settings: LossSettings, *, proximal_logprobs: torch.Tensor | None = None,
                ref_logprobs: torch.Tensor | None = None,
                normaliser: float | None = None) -> tuple[torch.Tensor, LossStats]:
    """The loss of one micro-batch (all tensors of one shape) and its statistics.

    `proximal_logprobs` defaults to `logprobs.detach()` (decoupled mode); `ref_logprobs` is needed
    when `settings.kl_coef > 0`.
    """
    on = mask > 0
    if settings.off_policy == "decoupled":
        prox = logprobs.detach() if proximal_logprobs is None else proximal_logprobs
        ratio = torch.exp(logprobs - prox)
        raw_weight = torch.exp(prox - behaviour_logprobs)
        weight = torch.clamp(raw_weight, max=settings.importance_cap)
    else:
        ratio = torch.exp(logprobs - behaviour_logprobs)
        raw_weight = torch.ones_like(ratio)
        weight = raw_weight
    a = advantages
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1 - settings.clip_low, 1 + settings.clip_high)
    per_token = torch.maximum(unclipped, clipped)
    per_token = torch.where(a < 0, torch.minimum(per_token, -a * settings.dual_clip), per_token)
    per_token = weight * per_token
    ref_kl = torch.zeros_like(per_token)
    if settings.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs the reference model's log-probs")
        d = ref_logprobs - logprobs
        ref_kl = torch.exp(d) - d - 1
        per_token = per_token + settings.kl_coef * ref_kl
    total = (per_token * mask).sum()
    n = float(mask.sum().item())
    loss = total / (max(n, 1.0) if normaliser is None else normaliser)

    with torch.no_grad():
        log_rb = (logprobs - behaviour_logprobs)[on]
        r_det = ratio.detach()
        w_on = raw_weight.detach()[on]
        stats = LossStats(
            tokens=n, loss=float(total.detach()),
            clipped_low=float(((a < 0) & (r_det < 1 - settings.clip_low))[on].sum()),
            clipped_high=float(((a > 0) & (r_det > 1 + settings.clip_high))[on].sum()),
            dual_clipped=float(((a < 0) & (r_det > settings.dual_clip))[on].sum()),
            importance_weight=float(w_on.sum()),
            importance_capped=float((w_on > settings.importance_cap).sum()),
            approx_kl=float((torch.exp(log_rb) - 1 - log_rb).sum()),
            ref_kl=float(ref_kl.detach()[on].sum()),
            importance_weight_max=float(w_on.max()) if n else float("-inf"),
            importance_weight_min=float(w_on.min()) if n else float("inf"))
    return loss, stats
