"""Config of held-out evaluation: during training (`treepo up` starts an evaluator when `every_versions` > 0)
and standalone (`treepo eval`)."""

from typing import Literal

from pydantic import Field

from protocol.config.base import Section
from protocol.config.prompts import PromptsConfig


class EvalConfig(Section):
    every_versions: int = Field(0, ge=0, description="During training: evaluate policy version 0 and then every "
                                "this many versions the learner publishes (the evaluator takes the newest one due; "
                                "it is a process of its own, so neither the learner nor the actors wait). 0 = off.")
    prompts: PromptsConfig = Field(
        PromptsConfig(seed=1_000_000, size=32), description="Held-out prompts, the same fields as the training "
        "`prompts` section (own seed and size). reasoning-gym derives item i from seed + i, so a held-out seed must "
        "lie at least the training size away from the training seed. Items are keyed by problem "
        "(treepo/problem_keys.py: every wording of one problem shares a key); an item whose problem is a training "
        "problem is left out (see exclude_training) and of several items of one problem the first is kept (both "
        "counted: overlap_dropped, duplicates_dropped).")
    exclude_training: bool = Field(
        True, description="Leave out the eval items whose problem is also a training problem, so that the metrics "
        "are held-out. False keeps them (to measure memorisation): the metrics are then not held-out, and the "
        "reports say how many of the evaluated problems are training problems (eval_overlap).")
    k: int = Field(8, ge=1, description="Samples per prompt (sequential: mean@k, pass@k, maj@k; tree: k leaves).")
    temperature: float = Field(0.6, gt=0, description="Sampling temperature (the reference evaluates at 0.6).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    sampling: Literal["sequential", "tree"] = Field(
        "sequential", description="sequential: k independent samples per prompt, reported as mean@k, pass@k, "
        "maj@k; tree: TreePO segment sampling with k leaves and the rollout section's tree settings (segment length, "
        "depth, branching), whose leaves share prefixes and so are not independent samples: reported as "
        "leaf_accuracy (fraction of leaves correct), any_correct (a leaf is correct) and leaf_majority (majority "
        "vote over the leaves).")
