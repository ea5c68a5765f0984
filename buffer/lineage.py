"""Policy versions across learner restarts.

Versions only grow for the life of a run: a learner that resumes from a checkpoint at version `after`
while versions up to `high` were already published (by the steps after that checkpoint, now lost)
republishes its weights as `resume = high + 1` and records the gap `(after, resume)` (Redis
`lineage_gaps`). So actors never see a version twice, and:

- a tree with a segment generated at a version strictly between `after` and `resume` came from weights
  no lineage continues: it is dropped (counted `lost_weights`), never trained;
- the staleness of a tree is its distance in the surviving lineage: versions `after` and `resume` are
  the same weights, so a gap the distance spans counts `resume - after` less.
"""

from __future__ import annotations

import numpy as np

Gap = tuple[int, int]  # (after, resume)


def lineage_distance(learner_version: int, tree_version: int, gaps: list[Gap]) -> int:
    """Updates between the weights of `tree_version` and those of `learner_version`."""
    d = learner_version - tree_version
    for after, resume in gaps:
        if tree_version <= after and learner_version >= resume:
            d -= resume - after
    return d


def from_lost_weights(versions: np.ndarray, gaps: list[Gap]) -> bool:
    """True if any segment was generated at a version whose weights were lost (strictly inside a gap)."""
    return any(bool(((versions > after) & (versions < resume)).any()) for after, resume in gaps)
