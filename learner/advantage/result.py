"""What an advantage estimator returns for one tree: advantages per leaf or per segment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from protocol.tree import Tree

AdvantageLevel = Literal["leaf", "segment"]


@dataclass(frozen=True)
class TreeAdvantages:
    """Advantages of one tree.

    level "leaf": `values` maps a leaf's node id to one scalar for every response token of that
    leaf's trajectory (TreePO, GRPO). level "segment": `values` maps a segment's node id to one
    scalar for that segment's own tokens only (TreeRPO); segments absent from `values` are not
    trained (their sibling group was dropped).
    """

    tree: Tree
    level: AdvantageLevel
    values: dict[int, float]

    def token_count(self, node_id: int) -> int:
        """Tokens the advantage of `node_id` covers: the whole path (leaf) or the segment itself."""
        if self.level == "leaf":
            return sum(int(self.tree.seg_lens[self.tree.index[n]]) for n in self.tree.path_ids(node_id))
        return int(self.tree.seg_lens[self.tree.index[node_id]])
