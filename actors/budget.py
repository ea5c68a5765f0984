"""TreePO branching budget and its spreading over active paths (ALGORITHMS.md §1.3.4).

Per prompt and step: T = max(a, min(max(U - F, 0), b*f + b*a)) with U = w leaves, F leaves so far
(this step's included), f leaves finished this step, a active paths: every active path asks for b
children, finished paths hand their b over to the survivors, capped by the leaves still missing.

Spreading T over the a paths (each gets >= 1):
- fixed_avg: floor(T/a) each, the last path gets the remainder on top (as the reference does);
- probability-driven: weights softmax(sigma * (s_j - min s) / tau) of a log-prob score s_j
  (sum over the whole response, mean over it, or mean over the last segment), sigma = -1 gives
  low-probability paths more children, +1 ("inverse") high-probability ones; every path gets 1
  and the T - a others go by the largest-remainder method (ties to the earlier path).
tau may follow a sinusoid schedule over learner steps, from tau_max down to tau (descending) or up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from protocol.config.rollout import RolloutConfig


def step_budget(width: int, finished_total: int, finished_now: int, active: int, branching: int) -> int:
    """T: how many requests a prompt's `active` paths turn into at the next step."""
    return max(active, min(max(width - finished_total, 0), branching * finished_now + branching * active))


def spread_fixed_avg(total: int, n: int) -> list[int]:
    base = total // n
    return [base] * (n - 1) + [base + total % n]


def largest_remainder(weights: Sequence[float], extra: int) -> list[int]:
    """Integer shares of `extra` proportional to `weights` (which sum to 1), largest remainders first."""
    quotas = np.asarray(weights, dtype=np.float64) * extra
    shares = np.floor(quotas).astype(int)
    left = extra - int(shares.sum())
    order = sorted(range(len(quotas)), key=lambda j: (-(quotas[j] - shares[j]), j))
    for j in order[:left]:
        shares[j] += 1
    return shares.tolist()


# spread name -> (score kind, sigma)
SCORED_SPREADS: dict[str, tuple[str, float]] = {
    "logprob": ("sum", -1.0), "inverse_logprob": ("sum", 1.0),
    "norm_logprob": ("mean", -1.0), "norm_inverse_logprob": ("mean", 1.0),
    "node_logprob": ("node", -1.0), "node_inverse_logprob": ("node", 1.0),
}


def path_score(kind: str, response_logprobs: Sequence[float], last_segment_logprobs: Sequence[float]) -> float:
    if kind == "sum":
        return float(np.sum(response_logprobs))
    if kind == "mean":
        return float(np.mean(response_logprobs))
    return float(np.mean(last_segment_logprobs))


def spread_weights(scores: Sequence[float], sigma: float, tau: float) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    z = sigma * (s - s.min()) / tau
    e = np.exp(z - z.max())
    return e / e.sum()


def spread_by_scores(total: int, scores: Sequence[float], sigma: float, tau: float) -> list[int]:
    return [1 + k for k in largest_remainder(spread_weights(scores, sigma, tau), total - len(scores))]


def spread_temperature(cfg: RolloutConfig, step: int) -> float:
    """tau at learner step `step` (constant, or a half-sinusoid over `spread_temperature_steps`)."""
    lo, hi = cfg.spread_temperature, cfg.spread_temperature_max
    if cfg.spread_temperature_schedule == "constant":
        return lo
    t = min(max(step, 0), cfg.spread_temperature_steps) / cfg.spread_temperature_steps
    wave = (hi - lo) / 2 * math.sin(math.pi * t + math.pi / 2)
    return (lo + hi) / 2 + (wave if cfg.spread_temperature_schedule == "sinusoid_descending" else -wave)


def spread(cfg: RolloutConfig, total: int, responses: Sequence[Sequence[float]],
           last_segments: Sequence[Sequence[float]], step: int) -> list[int]:
    """Children per active path (each >= 1, summing to `total`), by `cfg.spread`."""
    if cfg.spread == "fixed_avg":
        return spread_fixed_avg(total, len(responses))
    kind, sigma = SCORED_SPREADS[cfg.spread]
    scores = [path_score(kind, r, s) for r, s in zip(responses, last_segments, strict=True)]
    return spread_by_scores(total, scores, sigma, spread_temperature(cfg, step))
