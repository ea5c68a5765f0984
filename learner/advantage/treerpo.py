"""TreeRPO step-level advantages (ALGORITHMS.md §2.2-2.3, §2.7; every default is an assumption).

Node values, bottom-up: a leaf's value is its reward; an internal node's value is
  - "mean_children" (default, as the summaries state): the mean of its children's values, or
  - "mean_leaves" (the Sapir & Erlihson variant): the mean reward of all leaves under it.
The two differ on unbalanced trees. A segment with no leaf under it has no value and is not trained.

Groups: the children (with a value) of one node, the root included. A group with fewer than two
members, or whose members all share one value (up to `filter.no_spread`), carries no comparison: it is dropped and counted.
For a kept group with member values r_1..r_n (mean m, unbiased std s):

    "none":  A(c) = r(c) - m                       (Dr.GRPO style)
    "group": A(c) = (r(c) - m) / (s + eps)         (default; GRPO form)
    "batch": A(c) = (r(c) - m) / (S + eps), S = unbiased std of all centred values r - m of every
             kept group of the batch (one value per segment, not token-weighted)

A(c) applies to the tokens of segment c only (`TreeAdvantages` level "segment"); a leaf's final
segment belongs to its parent's group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from learner.advantage.filter import no_spread
from protocol.tree import ROOT_ID, Tree

NodeValue = Literal["mean_children", "mean_leaves"]
Normalisation = Literal["none", "group", "batch"]


@dataclass
class GroupCounts:
    """How many sibling groups were kept, and why the others were dropped."""

    kept: int = 0
    singleton: int = 0
    zero_spread: int = 0


def node_values(tree: Tree, node_value: NodeValue = "mean_children") -> dict[int, float]:
    """node id (root included) -> value; nodes with no leaf under them are absent."""
    leaf_reward = {int(n): float(r) for n, r in zip(tree.leaf_ids, tree.rewards, strict=True)}
    kids = tree.children()
    values: dict[int, float] = {}
    leaves_below: dict[int, list[float]] = {}

    def visit(node: int) -> None:
        for child in kids.get(node, []):
            visit(child)
        if node in leaf_reward:
            values[node] = leaf_reward[node]
            leaves_below[node] = [leaf_reward[node]]
            return
        child_vals = [values[c] for c in kids.get(node, []) if c in values]
        below = [r for c in kids.get(node, []) for r in leaves_below.get(c, [])]
        leaves_below[node] = below
        if child_vals:
            values[node] = float(np.mean(child_vals if node_value == "mean_children" else below))

    visit(ROOT_ID)
    return values


def centred_groups(tree: Tree, node_value: NodeValue, counts: GroupCounts) -> list[dict[int, tuple[float, float]]]:
    """Kept sibling groups of one tree: each a map child id -> (r - mean, group std)."""
    values = node_values(tree, node_value)
    groups = []
    for parent, children in tree.children().items():
        if parent not in values:
            continue
        members = [c for c in children if c in values]
        r = np.array([values[c] for c in members])
        if len(r) < 2:
            counts.singleton += 1
        elif no_spread(r):
            counts.zero_spread += 1
        else:
            counts.kept += 1
            s = float(r.std(ddof=1))
            groups.append({c: (float(v - r.mean()), s) for c, v in zip(members, r, strict=True)})
    return groups


def treerpo_advantages(trees: list[Tree], node_value: NodeValue = "mean_children", norm: Normalisation = "group",
                       eps: float = 1e-6) -> tuple[list[dict[int, float]], GroupCounts]:
    """Per tree: segment node id -> advantage; plus the group counts of the batch."""
    counts = GroupCounts()
    per_tree = [centred_groups(t, node_value, counts) for t in trees]
    centred = [d for groups in per_tree for g in groups for d, _ in g.values()]
    batch_std = float(np.std(centred, ddof=1)) if len(centred) > 1 else 0.0
    out = []
    for groups in per_tree:
        adv: dict[int, float] = {}
        for g in groups:
            for c, (d, s) in g.items():
                adv[c] = d if norm == "none" else d / ((s if norm == "group" else batch_std) + eps)
        out.append(adv)
    return out, counts
