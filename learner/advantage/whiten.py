"""Token-level whitening of advantages over a batch (REINFORCE++ style; verl `masked_whiten`).

Each advantage value v_u covers n_u tokens (a leaf's whole path, or a segment). Over all tokens
of the batch:

    mu    = sum_u n_u v_u / N,     N = sum_u n_u
    var   = sum_u n_u (v_u - mu)^2 / (N - 1)          (token-weighted, unbiased)
    v_u  <- (v_u - mu) / sqrt(var + 1e-8)

Longer trajectories therefore weigh more in the statistics. A batch of fewer than two tokens is
returned unchanged.
"""

from __future__ import annotations

import numpy as np

from learner.advantage.result import TreeAdvantages

WHITEN_EPS = 1e-8


def whiten(batch: list[TreeAdvantages]) -> list[TreeAdvantages]:
    """The batch with every advantage whitened over all tokens it covers."""
    values = np.array([v for ta in batch for v in ta.values.values()], dtype=np.float64)
    counts = np.array([ta.token_count(n) for ta in batch for n in ta.values], dtype=np.float64)
    total = counts.sum()
    if total < 2:
        return batch
    mu = float((counts * values).sum() / total)
    var = float((counts * (values - mu) ** 2).sum() / (total - 1))
    scale = 1.0 / np.sqrt(var + WHITEN_EPS)
    return [TreeAdvantages(ta.tree, ta.level, {n: (v - mu) * scale for n, v in ta.values.items()}) for ta in batch]
