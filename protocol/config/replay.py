"""Config of offline training on stored trees (`treepo replay --train`): which trees, in what order, how
often, from which weights, into which directory. The learner section of the same config sets the estimator
and the loss (its `importance_cap` bounds the weight of trees grown by older policies)."""

from typing import Literal

from pydantic import Field

from protocol.config.base import Section


class ReplayConfig(Section):
    runs: list[str] = Field(default_factory=list, description="Run ids whose stored trees are trained (read only); "
                            "empty = run.run_id. Every run must be in the config's Redis (buffer.redis_url, or the "
                            "embedded one of buffer.data_dir / run.output_dir).")
    output_dir: str = Field("", description="Directory of the offline run: its config, checkpoints, metrics, "
                            "export and its own Redis (the trees it trained and their advantages); default "
                            "<run.output_dir>-replay. Never the source run's directory.")
    run_id: str = Field("", description="Run id of the offline run (its Redis keys); default <run.run_id>-replay.")
    min_version: int | None = Field(None, description="Oldest policy version of a tree (its oldest segment) kept.")
    max_version: int | None = Field(None, description="Newest policy version of a tree (its oldest segment) kept.")
    min_reward: float | None = Field(None, description="Keep trees whose mean leaf reward is at least this.")
    max_reward: float | None = Field(None, description="Keep trees whose mean leaf reward is at most this.")
    order: Literal["stored", "shuffled"] = Field(
        "stored", description="stored: oldest policy version first, as the runs stored them; shuffled: a new "
        "permutation every epoch (seeded by run.seed and the epoch).")
    epochs: int = Field(1, ge=1, description="Passes over the selected trees.")
    init: str = Field("", description="Starting weights: '' = the source run's initial model (model section); a "
                      "DeepSpeed checkpoint directory of the source run (holding `latest`: weights, optimizer and "
                      "policy version, training goes on from it); or any Hugging Face model directory (e.g. a "
                      "run's `export`).")
    max_version_distance: int | None = Field(
        None, ge=0, description="Leave out (counted) trees whose policy version is more than this many versions "
        "from the starting weights' version in the source lineage: 0 for the initial model, the checkpoint's "
        "version for a checkpoint, the newest selected tree's version for a model directory. None = keep every "
        "tree; older ones are trained with the capped importance weight (learner.importance_cap).")
