"""Advantage estimators over rollout trees: TreePO, TreeRPO, GRPO, and the batch-level steps around them."""

from learner.advantage.compute import compute_advantages
from learner.advantage.filter import drop_uniform_prompts
from learner.advantage.grpo import grpo_advantages
from learner.advantage.result import TreeAdvantages
from learner.advantage.treepo import treepo_advantages
from learner.advantage.treerpo import GroupCounts, node_values, treerpo_advantages
from learner.advantage.whiten import whiten

__all__ = ["GroupCounts", "TreeAdvantages", "compute_advantages", "drop_uniform_prompts", "grpo_advantages",
           "node_values", "treepo_advantages", "treerpo_advantages", "whiten"]
