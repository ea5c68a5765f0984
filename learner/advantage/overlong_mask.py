"""Overlong masking (DAPO's overlong filtering, `learner.mask_truncated`): responses cut by the length
cap are left out of the loss, because their end says nothing about the answer they did not reach.

A leaf is truncated when its stop reason is "max_tokens" (the response cap) or "max_depth" (the
last segment of the deepest path ended without EOS: the cap of d x l tokens). Masking happens after
the estimator: the truncated leaves' rewards still count in every group mean and in the whitening,
only their tokens are not trained.

- level "leaf" (TreePO, GRPO): the truncated leaves' rows are dropped.
- level "segment" (TreeRPO): a segment is dropped when every leaf under it is truncated (its tokens
  belong to truncated responses only); a segment on the way to a complete leaf stays.
"""

from __future__ import annotations

import numpy as np

from learner.advantage.result import TreeAdvantages
from protocol.tree import STOP_REASONS

TRUNCATED = tuple(STOP_REASONS.index(r) for r in ("max_tokens", "max_depth"))


def mask_truncated(batch: list[TreeAdvantages]) -> tuple[list[TreeAdvantages], int]:
    """The batch without the advantages of truncated responses, and how many leaves were truncated."""
    out, masked = [], 0
    for ta in batch:
        tree = ta.tree
        truncated = np.isin(tree.stop_reasons, TRUNCATED)
        masked += int(truncated.sum())
        if not truncated.any():
            out.append(ta)
            continue
        complete = tree.leaf_ids[~truncated].tolist()
        if ta.level == "leaf":
            keep = set(complete)
        else:
            keep = {n for leaf in complete for n in tree.path_ids(leaf)}
        out.append(TreeAdvantages(tree, ta.level, {n: a for n, a in ta.values.items() if n in keep}))
    return out, masked
