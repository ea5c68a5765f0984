"""From a batch of finished trees to advantages, as the learner config says:

1. prompt-level filter (optional): drop trees whose leaves carry no signal (`filter.is_uniform`:
   equal correctness, or equal rewards where there is no correctness; counted);
2. the estimator: TreePO (per leaf), TreeRPO (per segment) or GRPO (per leaf);
3. TreePO only, when `whiten`: token-level whitening over the whole batch (§1.5.2 step 5);
4. when `mask_truncated`: responses cut by the length cap leave the loss (`overlong_mask`; counted).
"""

from __future__ import annotations

import numpy as np

from learner.advantage.filter import drop_uniform_prompts
from learner.advantage.grpo import grpo_advantages
from learner.advantage.overlong_mask import mask_truncated
from learner.advantage.result import TreeAdvantages
from learner.advantage.treepo import treepo_advantages
from learner.advantage.treerpo import treerpo_advantages
from learner.advantage.whiten import whiten
from protocol.config.learner import LearnerConfig
from protocol.tree import Tree


def compute_advantages(trees: list[Tree], cfg: LearnerConfig) -> tuple[list[TreeAdvantages], dict[str, float]]:
    """Advantages of the kept trees, and counts: prompts in / dropped, TreeRPO groups, value stats."""
    kept, dropped = drop_uniform_prompts(trees) if cfg.filter_uniform_prompts else (trees, 0)
    stats: dict[str, float] = {"prompts": float(len(trees)), "prompts_dropped_uniform": float(dropped)}
    if cfg.estimator == "treepo":
        batch = [TreeAdvantages(t, "leaf", treepo_advantages(t, cfg.treepo_weighting, cfg.treepo_subtree_std_filter))
                 for t in kept]
        if cfg.whiten:
            batch = whiten(batch)
    elif cfg.estimator == "grpo":
        batch = [TreeAdvantages(t, "leaf", grpo_advantages(t, cfg.adv_eps)) for t in kept]
    else:
        per_tree, counts = treerpo_advantages(kept, cfg.treerpo_node_value, cfg.treerpo_norm, cfg.adv_eps)
        batch = [TreeAdvantages(t, "segment", adv) for t, adv in zip(kept, per_tree, strict=True)]
        stats.update(groups_kept=float(counts.kept), groups_dropped_singleton=float(counts.singleton),
                     groups_dropped_zero_spread=float(counts.zero_spread))
    if cfg.mask_truncated:
        batch, masked = mask_truncated(batch)
        stats["leaves_masked_truncated"] = float(masked)
    values = np.array([v for ta in batch for v in ta.values.values()])
    if len(values):
        stats.update(adv_mean=float(values.mean()), adv_std=float(values.std()), adv_min=float(values.min()),
                     adv_max=float(values.max()))
    return batch, stats
