"""TreePO advantage of each leaf (ALGORITHMS.md §1.5.2, `tree_reinforce_plus_plus_baseline`).

For leaf i with reward R_i and ancestors a_0 = root, a_1 .. a_D (a_D = the leaf's own segment),
G_j(i) is the set of leaves under a_j (G_0 = every leaf of the prompt). Then

    A_ij = R_i - mean_{k in G_j(i)} R_k          (a group of one leaf uses mean 0, as the reference)
    S_i  = {0} u {j >= 1 : |G_j(i)| > 1 [and R_{G_j(i)} not all equal (`no_spread`) when subtree_std_filter]}
    average:    A_i = (1/|S_i|) sum_{j in S_i} A_ij                          (default)
    group_size: A_i = sum_{j in S_i} |G_j(i)| A_ij / sum_{j in S_i} |G_j(i)|  (paper Eq. 6)

Every ancestor counts once per depth, as in the reference, where a group is a key prefix: a chain
of single-child segments above a fork contributes the same subgroup once per segment. No per-group
std division here; the batch-level token whitening (`whiten.py`) follows in `compute.py`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from learner.advantage.filter import no_spread
from protocol.tree import Tree

Weighting = Literal["average", "group_size"]


def treepo_advantages(tree: Tree, weighting: Weighting = "average",
                      subtree_std_filter: bool = False) -> dict[int, float]:
    """leaf node id -> aggregated subgroup-relative advantage (before whitening)."""
    leaf_ids = tree.leaf_ids.tolist()
    rewards = tree.rewards
    paths = [tree.path_ids(leaf) for leaf in leaf_ids]
    under: dict[int, list[int]] = {}
    for i, path in enumerate(paths):
        for node in path:
            under.setdefault(node, []).append(i)

    def group_mean(members: np.ndarray) -> float:
        return 0.0 if len(members) == 1 else float(members.mean())

    out: dict[int, float] = {}
    for i, leaf in enumerate(leaf_ids):
        terms = [(rewards[i] - group_mean(rewards), len(rewards))]  # the root group is always included
        for node in paths[i]:
            members = rewards[under[node]]
            if len(members) > 1 and not (subtree_std_filter and no_spread(members)):
                terms.append((rewards[i] - group_mean(members), len(members)))
        adv = np.array([a for a, _ in terms])
        if weighting == "average":
            out[leaf] = float(adv.mean())
        else:
            sizes = np.array([n for _, n in terms], dtype=np.float64)
            out[leaf] = float((sizes * adv).sum() / sizes.sum())
    return out
