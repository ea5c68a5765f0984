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
trained-token count of the whole mini-batch, so that the sum of its micro-batch losses is the
mini-batch's token-mean. The proximal policy is the weights at the start of the batch: with several
updates per batch (`learner.mini_batches_per_batch`, `learner.ppo_epochs`) the learner computes its
log-probs in one no-grad pass before the first update and every update's ratio is taken against
them, so r = 1 in the first update only; with one update per batch the proximal log-probs are the
detached current ones (the same numbers, without the extra pass). Metrics are sums over trained
tokens (`LossStats`).

Where this deliberately differs from ALGORITHMS.md §1.6 (the DAPO recipe in verl):
- The actors' log-probs are used: verl recomputes the old log-probs with the trainer and ignores the
  engine's, which is right when rollout and training weights are the same. Here actors run up to
  `buffer.max_staleness` versions behind, so the proximal policy (recomputed by the learner, as in
  verl) gives the ratio and the behaviour log-probs give a capped importance weight (decoupled PPO,
  Hilton et al.; AReaL). `off_policy: on_policy` is plain PPO against the behaviour log-probs.
- The log-probs are those of the sampling distribution, temperature and top-k / top-p included
  (`protocol.sampling`, `learner.forward`); verl divides by the temperature only.
- token-mean is over the whole mini-batch across ranks (trained tokens / world per micro-batch),
  not verl's per-micro-batch mean rescaled by sequence counts: equal when micro-batches hold equal
  token counts, and exact here when they do not.
- Mini-batches are consecutive groups of the batch's trees (verl: of its prompts), so a tree's
  leaves, and their shared prefix, stay in one update.
- Prompt filtering (dynamic sampling) fills the batch from the stream with a bounded number of
  draws (`learner.fill_max_draws`) rather than generating 3x the prompts and cutting the extras;
  uniformity is tested on `acc` with a tolerance (`learner.advantage.filter`).
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
    ratio: float = 0.0  # r = pi / pi_prox (decoupled) or pi / pi_behaviour (on_policy)
    proximal_kl: float = 0.0  # k3 of KL(the policy r is taken against || current): (r - 1) - log r
    approx_kl: float = 0.0  # k3 of KL(behaviour || current)
    ref_kl: float = 0.0  # k3 of KL(current || reference)
    entropy: float = 0.0
    importance_weight_max: float = field(default=float("-inf"))
    importance_weight_min: float = field(default=float("inf"))
    ratio_max: float = field(default=float("-inf"))
    ratio_min: float = field(default=float("inf"))

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
        out["ratio_mean"] = out.pop("ratio")
        out["trained_tokens"] = self.tokens
        if self.tokens:
            out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name.endswith(("_max", "_min"))})
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
        r_on = r_det[on]
        log_r = torch.log(r_on)
        stats = LossStats(
            tokens=n, loss=float(total.detach()),
            clipped_low=float(((a < 0) & (r_det < 1 - settings.clip_low))[on].sum()),
            clipped_high=float(((a > 0) & (r_det > 1 + settings.clip_high))[on].sum()),
            dual_clipped=float(((a < 0) & (r_det > settings.dual_clip))[on].sum()),
            importance_weight=float(w_on.sum()),
            importance_capped=float((w_on > settings.importance_cap).sum()),
            ratio=float(r_on.sum()), proximal_kl=float((r_on - 1 - log_r).sum()),
            approx_kl=float((torch.exp(log_rb) - 1 - log_rb).sum()),
            ref_kl=float(ref_kl.detach()[on].sum()),
            importance_weight_max=float(w_on.max()) if n else float("-inf"),
            importance_weight_min=float(w_on.min()) if n else float("inf"),
            ratio_max=float(r_on.max()) if n else float("-inf"),
            ratio_min=float(r_on.min()) if n else float("inf"))
    return loss, stats
