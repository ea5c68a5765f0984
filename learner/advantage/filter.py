"""Which groups carry no signal: prompt-level filtering (DAPO dynamic sampling, ALGORITHMS.md §1.6)
and the zero-spread tests of the estimators.

- `no_spread(values)`: all values equal up to `SPREAD_TOL` (relative to their magnitude, at least
  absolute). Exact float equality would call a group of means "spread" when it differs only by
  rounding: TreeRPO's node values -0.30000000000000004 and -0.3, or a std of 1.4e-17 for three
  leaves of reward 0.1.
- `leaf_scores(tree)`: what a prompt is filtered on: the leaves' correctness (`acc` in the reward
  details, as DAPO filters on `acc`), else, where a reward has no correctness (a callable reward),
  the rewards. So with the overlong penalty on, an all-wrong prompt whose leaves differ only in
  length is uniform: its spread is shaping, not signal.
- a prompt with no leaf or a single leaf is uniform too.
"""

from __future__ import annotations

import numpy as np

from protocol.tree import Tree

SPREAD_TOL = 1e-9


def no_spread(values) -> bool:
    """True if fewer than two values, or max - min <= SPREAD_TOL * max(1, max |value|)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return True
    return bool(v.max() - v.min() <= SPREAD_TOL * max(1.0, float(np.abs(v).max())))


def leaf_scores(tree: Tree) -> np.ndarray:
    """Per leaf: correctness (`acc`) when every leaf has one, else the reward."""
    acc = tree.reward_details.get("acc")
    if acc is not None and len(acc) == len(tree.rewards) and not np.isnan(acc).any():
        return acc
    return tree.rewards


def is_uniform(tree: Tree) -> bool:
    """True if the tree's leaves carry no signal: their scores (`leaf_scores`) have no spread."""
    return no_spread(leaf_scores(tree))


def drop_uniform_prompts(trees: list[Tree]) -> tuple[list[Tree], int]:
    """The trees with signal, and how many were dropped."""
    kept = [t for t in trees if not is_uniform(t)]
    return kept, len(trees) - len(kept)
