"""TreePO fallback (ALGORITHMS.md §1.3.5): re-branch a prompt whose paths all ended short of w leaves.

Triggered by the sampler when a group of a prompt's paths comes back with no active path and F < w. With
r = w - F (nothing else in flight) or the ended paths' share (`actors.tree_sampler`):
- candidates (leaves to re-branch from), by policy:
  soft_boxed_and_eos: leaves that ended "finished" or "eos", shuffled;
  finished_first: all leaves, ordered by log(priority) + Gumbel noise (sampling without replacement
  in proportion to the priority: finished 7, eos 5, max_depth 4, max_tokens 3, repetition 2; the
  reference's "unclosed" reason does not exist here); finished_first_strict: by priority, ties in
  leaf order; random_all: all, shuffled; longer_first: log(length) + Gumbel.
- cut point, on a segment boundary (l_f = l): random draws k ~ U{1..n_blk}, n_blk = ceil(L / l),
  and keeps c = (n_blk - k) * l tokens = the first n_blk - k segments (0 = restart from the prompt);
  from_start keeps nothing and uses the first candidate only. Depth cap: at most d - 1 segments kept.
- spawn: for each candidate in order, min(b, r) copies of the kept prefix, r -= copies, until r = 0;
  the new branch hangs off the EXISTING node at the cut depth and its engine input is prompt + kept
  prefix (the reference's training path kept the old input: a bug, fixed here). No candidate at all:
  min(b, r) fresh requests from the prompt.
"""

from __future__ import annotations

import math

import numpy as np

from actors.tree_state import LeafRecord, Path
from protocol.config.rollout import RolloutConfig

PRIORITY = {"finished": 7.0, "eos": 5.0, "max_depth": 4.0, "max_tokens": 3.0, "repetition": 2.0}


def candidates(policy: str, leaves: list[LeafRecord], rng: np.random.Generator) -> list[LeafRecord]:
    if policy == "soft_boxed_and_eos":
        pool = [leaf for leaf in leaves if leaf.stop_reason in ("finished", "eos")]
        return [pool[i] for i in rng.permutation(len(pool))]
    if policy == "random_all":
        return [leaves[i] for i in rng.permutation(len(leaves))]
    if policy == "finished_first_strict":
        return sorted(leaves, key=lambda leaf: -PRIORITY[leaf.stop_reason])
    weights = ([PRIORITY[leaf.stop_reason] for leaf in leaves] if policy == "finished_first"
               else [max(len(leaf.path.tokens), 1) for leaf in leaves])  # longer_first
    keys = np.log(np.asarray(weights, dtype=np.float64)) + rng.gumbel(size=len(leaves))
    return [leaves[i] for i in np.argsort(-keys, kind="stable")]


def kept_segments(cfg: RolloutConfig, path: Path, rng: np.random.Generator) -> int:
    """How many leading segments of `path` the new branch keeps (the cut is after them)."""
    if cfg.fallback_point == "from_start":
        return 0
    n_blk = math.ceil(len(path.tokens) / cfg.segment_tokens)
    k = int(rng.integers(1, n_blk + 1))
    return min(n_blk - k, cfg.max_depth - 1)


def fallback_paths(cfg: RolloutConfig, leaves: list[LeafRecord], rng: np.random.Generator,
                   r: int | None = None) -> list[Path]:
    """The requests a prompt with F = len(leaves) < w re-branches with: r of them at most (default w - F)."""
    r = cfg.width - len(leaves) if r is None else r
    out: list[Path] = []
    pool = candidates(cfg.fallback_candidates, leaves, rng)
    if cfg.fallback_point == "from_start":
        pool = pool[:1]
    for leaf in pool:
        if r == 0:
            break
        n = min(cfg.branching, r)
        out += [leaf.path.prefix(kept_segments(cfg, leaf.path, rng))] * n
        r -= n
    if not pool:
        out = [Path()] * min(cfg.branching, r)
    return out
