"""Evaluation accuracy of k samples per prompt (ALGORITHMS.md §1.8), from the leaves of evaluation trees, with
95% intervals over problems.

Per prompt with n samples, c of them correct (a leaf is correct when its reward details say `acc` = 1;
for rewards without correctness, when its reward is at least 1), sequential sampling (n independent samples):
- mean@k: c / n (accuracy of one sample);
- pass@k: the unbiased estimator 1 - C(n - c, k) / C(n, k), k <= n (the chance that k of the n
  samples, drawn without replacement, hold a correct one);
- maj@k: the correctness of the majority answer. Answers are the parsed final answers of the
  completions (`\\boxed{}` content, whitespace-stripped); a completion without one does not vote, and a
  prompt where none votes counts as wrong. Ties go to the answer sampled first. At k = n the vote is
  over all n answers; for k < n it is the reference's bootstrap: the mean over 1000 resamples of k
  answers drawn with replacement (seed 42).
Tree sampling: the leaves of one tree share prefixes, so they are not k independent samples and the
metrics carry their own names: leaf_accuracy (c / n), any_correct (a leaf is correct), leaf_majority (the
vote above over all n leaves).
Reported per dataset: the means over its prompts, each with `_ci_low` / `_ci_high`, the percentile bootstrap
95% interval of the mean over problems (`bootstrap_ci`); the mean response length (tokens), the mean reward
and the number of prompts. `paired_gain` compares two evaluations of the same problems (per-problem
accuracy): mean gain and its paired bootstrap 95% interval.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import comb

import numpy as np

from protocol.config.evaluation import EvalConfig

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


def bootstrap_ci(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per problem): `samples` resamples of
    len(values) values drawn with replacement (`np.random.default_rng(seed).integers(0, n, (samples, n))`),
    and the (1 - level) / 2 and (1 + level) / 2 quantiles (numpy's linear interpolation) of their means."""
    x = np.asarray(values, dtype=np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_gain(before: Mapping[str, float], after: Mapping[str, float], samples: int = BOOTSTRAP_SAMPLES,
                seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """Over the problems in both (sorted by key): mean(after - before) and its 95% interval (`bootstrap_ci` of
    the per-problem differences: problems resampled, each keeping its pair)."""
    keys = sorted(before.keys() & after.keys())
    if not keys:
        raise ValueError("paired_gain: no problem evaluated in both")
    diff = [after[key] - before[key] for key in keys]
    return (float(np.mean(diff)), *bootstrap_ci(diff, samples, seed))


def metric_names(sampling: str, k: int) -> tuple[str, str, str]:
    """The names of (accuracy, any sample correct, majority vote) for `eval.sampling` at k samples."""
    if sampling == "sequential":
        return f"mean@{k}", f"pass@{k}", f"maj@{k}"
    return "leaf_accuracy", "any_correct", "leaf_majority"


def accuracy_key(eval_cfg: EvalConfig) -> str:
    """The overall accuracy's key of an evaluation with these settings: `all/mean@k` or `all/leaf_accuracy`."""
    return f"all/{metric_names(eval_cfg.sampling, eval_cfg.k)[0]}"


def figures_text(metrics: Mapping[str, float], eval_cfg: EvalConfig) -> str:
    """The three overall figures with their intervals, e.g. `mean@4 0.262 [0.220, 0.300]  pass@4 ...`."""
    return "  ".join(f"{name} {metrics[f'all/{name}']:.3f} [{metrics[f'all/{name}_ci_low']:.3f}, "
                     f"{metrics[f'all/{name}_ci_high']:.3f}]"
                     for name in metric_names(eval_cfg.sampling, eval_cfg.k))


def eval_label(metrics: Mapping[str, float]) -> str:
    """What to call an evaluation's figures: "held-out" when none of its problems is a training problem (see
    `actors.evaluate.held_out`), else how many of them are; "eval" for a row written before problems were keyed
    (a run resumed from an older version), whose overlap nobody measured."""
    if "eval_overlap" not in metrics:
        return "eval"
    overlap = int(metrics["eval_overlap"])
    if overlap == 0:
        return "held-out"
    return f"eval ({overlap} of {int(metrics['eval_problems'])} problems also in training)"


def summarise(samples: list[PromptSamples], k: int, sampling: str = "sequential") -> dict[str, float]:
    """Flat metrics `{dataset}/{name}` (and `all/{name}` over every prompt): the three of `metric_names`, each
    with `_ci_low` / `_ci_high`, response_tokens, reward, prompts."""
    out: dict[str, float] = {}
    groups: dict[str, list[PromptSamples]] = {"all": samples}
    for s in samples:
        groups.setdefault(s.dataset, []).append(s)
    accuracy, any_correct, majority = metric_names(sampling, k)
    for name, group in groups.items():
        per_problem = {accuracy: [float(np.mean(s.correct)) for s in group]}
        if sampling == "sequential":
            per_problem[any_correct] = [pass_at_k(len(s.correct), sum(s.correct), k) for s in group]
            per_problem[majority] = [maj_at_k(s.answers, s.correct, k) for s in group]
        else:
            per_problem[any_correct] = [float(any(s.correct)) for s in group]
            per_problem[majority] = [float(_vote(s.answers, s.correct)) for s in group]
        for metric, values in per_problem.items():
            out[f"{name}/{metric}"] = float(np.mean(values))
            out[f"{name}/{metric}_ci_low"], out[f"{name}/{metric}_ci_high"] = bootstrap_ci(values)
        out[f"{name}/response_tokens"] = float(np.mean([np.mean(s.lengths) for s in group]))
        out[f"{name}/reward"] = float(np.mean([np.mean(s.rewards) for s in group]))
        out[f"{name}/prompts"] = float(len(group))
    return out
