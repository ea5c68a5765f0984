"""GRPO advantage of each leaf: per prompt, A_i = (R_i - mean(R)) / (std(R) + eps) over its leaves.

std is the unbiased (Bessel) standard deviation, as verl's GRPO estimator uses. A prompt whose
leaves all share one reward (or that has a single leaf) gets advantage 0 for every leaf; the
prompt-level filter normally drops such prompts before this runs.
"""

from __future__ import annotations

from protocol.tree import Tree


def grpo_advantages(tree: Tree, eps: float = 1e-6) -> dict[int, float]:
    """leaf node id -> group-normalised advantage."""
    rewards = tree.rewards
    if len(rewards) < 2 or rewards.min() == rewards.max():
        return {int(leaf): 0.0 for leaf in tree.leaf_ids}
    adv = (rewards - rewards.mean()) / (rewards.std(ddof=1) + eps)
    return {int(leaf): float(a) for leaf, a in zip(tree.leaf_ids, adv, strict=True)}
