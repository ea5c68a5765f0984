"""`metrics/trained_trees.jsonl`: which trees each learner step trained, and where the learner resumed.

One line per batch: {"step", "policy_version", "stepped", "published" (that version went out to the
actors), "trees": [tree ids]}; on a resume from a
checkpoint: {"resumed_at_step", "policy_version" (what its weights are published as), "checkpoint_version"
(the version they had: the same when no later version was ever published)}. The steps after that checkpoint which the crashed
learner had logged are gone from the model's lineage; `final_lineage` replays the file the same way.
"""

from __future__ import annotations

import json
from pathlib import Path


class TrainedLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)

    def batch(self, step: int, policy_version: int, stepped: bool, published: bool, tree_ids: list[str]) -> None:
        self.file.write(json.dumps({"step": step, "policy_version": policy_version, "stepped": stepped,
                                    "published": published, "trees": tree_ids}) + "\n")

    def resumed(self, step: int, policy_version: int, checkpoint_version: int) -> None:
        self.file.write(json.dumps({"resumed_at_step": step, "policy_version": policy_version,
                                    "checkpoint_version": checkpoint_version}) + "\n")

    def close(self) -> None:
        self.file.close()


def final_lineage(path: Path) -> list[tuple[int, list[str]]]:
    """(step, tree ids) of every step that trained something in the final model's lineage, in order."""
    steps: list[tuple[int, list[str]]] = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "resumed_at_step" in row:
            steps = [s for s in steps if s[0] <= row["resumed_at_step"]]
        elif row["stepped"]:
            steps.append((row["step"], row["trees"]))
    return steps
