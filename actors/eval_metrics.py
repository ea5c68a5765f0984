"""Held-out accuracy of k samples per prompt (ALGORITHMS.md §1.8), from the leaves of evaluation trees.

Per prompt with n samples, c of them correct (a leaf is correct when its reward details say `acc` = 1;
for rewards without correctness, when its reward is at least 1):
- mean@n: c / n (accuracy of one sample);
- pass@k: the unbiased estimator 1 - C(n - c, k) / C(n, k), k <= n (the chance that k of the n
  samples, drawn without replacement, hold a correct one);
- maj@k: the correctness of the majority answer. Answers are the parsed final answers of the
  completions (`\\boxed{}` content, whitespace-stripped); a completion without one does not vote, and a
  prompt where none votes counts as wrong. Ties go to the answer sampled first. At k = n the vote is
  over all n answers; for k < n it is the reference's bootstrap: the mean over 1000 resamples of k
  answers drawn with replacement (seed 42).
Reported per dataset: the means over its prompts, the mean response length (tokens), the mean
reward and the number of prompts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import comb

import numpy as np

BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED = 1000, 42


@dataclass(frozen=True)
class PromptSamples:
    """The n samples of one prompt: correctness, parsed answer (None: none found), response tokens, reward."""

    dataset: str
    correct: list[bool]
    answers: list[str | None]
    lengths: list[int]
    rewards: list[float]


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n (k={k}, n={n})")
    return 1.0 - comb(n - c, k) / comb(n, k)


def _vote(answers: list[str | None], correct: list[bool]) -> bool:
    """Correctness of the most frequent answer (ties: the one sampled first); False when none parsed."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return False
    top = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == top)
    return correct[answers.index(winner)]


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> float:
    n = len(answers)
    if not 0 < k <= n:
        raise ValueError(f"maj@k needs 0 < k <= n (k={k}, n={n})")
    if k == n:
        return float(_vote(answers, correct))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, k))
    return float(np.mean([_vote([answers[i] for i in row], [correct[i] for i in row]) for row in picks]))


def summarise(samples: list[PromptSamples], k: int) -> dict[str, float]:
    """Flat metrics `{dataset}/{name}` (and `all/{name}` over every prompt): mean@k, pass@k, maj@k,
    response_tokens, reward, prompts."""
    out: dict[str, float] = {}
    groups: dict[str, list[PromptSamples]] = {"all": samples}
    for s in samples:
        groups.setdefault(s.dataset, []).append(s)
    for name, group in groups.items():
        out[f"{name}/mean@{k}"] = float(np.mean([np.mean(s.correct) for s in group]))
        out[f"{name}/pass@{k}"] = float(np.mean([pass_at_k(len(s.correct), sum(s.correct), k) for s in group]))
        out[f"{name}/maj@{k}"] = float(np.mean([maj_at_k(s.answers, s.correct, k) for s in group]))
        out[f"{name}/response_tokens"] = float(np.mean([np.mean(s.lengths) for s in group]))
        out[f"{name}/reward"] = float(np.mean([np.mean(s.rewards) for s in group]))
        out[f"{name}/prompts"] = float(len(group))
    return out
