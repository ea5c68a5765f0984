"""The sampling distribution: what a behaviour log-prob is the log-prob of.

An actor samples each token from softmax(filtered logits), where the filtered logits are the model's
logits divided by the temperature, with top-k and then top-p (nucleus) applied: tokens outside them
get -inf. The log-prob it reports for a sampled token is the log-softmax of those filtered logits
(vLLM's `logprobs_mode="processed_logprobs"`), and the learner computes its log-probs the same way
(`learner.forward`), so that on-policy the behaviour weight pi / mu is 1.

Semantics, as vLLM's: top-k keeps every token whose scaled logit is >= the k-th largest (ties kept);
top-p keeps, in order of decreasing probability, each token whose preceding mass is < p (so at least
one token), computed on the top-k-filtered distribution.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def removed_by_filters(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Bool mask (the logits' shape, [..., V]) of the tokens top-k (k <= 0: off) and top-p (p >= 1: off)
    remove from temperature-scaled logits."""
    removed = torch.zeros_like(scaled_logits, dtype=torch.bool)
    x = scaled_logits
    if top_k > 0:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[..., -1:]
        removed |= x < kth
        x = x.masked_fill(removed, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        p = torch.softmax(sorted_x.float(), dim=-1)
        drop_sorted = p.cumsum(-1) - p >= top_p
        removed |= torch.zeros_like(removed).scatter(-1, order, drop_sorted)
    return removed


def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The logits a token is sampled from: logits / temperature, -inf where top-k / top-p remove a token."""
    x = logits / temperature if temperature != 1.0 else logits
    if top_k > 0 or top_p < 1.0:
        x = x.masked_fill(removed_by_filters(x, top_k, top_p), float("-inf"))
    return x
