"""How many trees an actor's pool keeps open so that its engine runs about `target_running` sequences.

A tree's sequences vary over its life (TreePO opens with b0 paths, branches up to w and ends on its stragglers;
independent sampling opens with w and ends on its stragglers), so a fixed number of trees cannot hold an engine's
batch. The pool measures how many sequences an open tree holds, averaged over engine steps (an exponential average
whose weight halves every ~35 engine steps, so it follows the policy as its answers change length), and keeps
round(target_running / that) trees open: at least `slots`, and never so many that their remaining demand (leaves
still to grow, summed) exceeds 4 x target_running, the bound on how far the batch can overshoot when every open
tree branches at once. Before its first measurement a tree counts as `width` / 2 sequences.
"""

from __future__ import annotations

DECAY = 0.98  # per engine step
MAX_DEMAND = 4  # x target_running


class PoolSize:
    def __init__(self, slots: int, target_running: int, width: int):
        self.slots, self.target, self.width = slots, target_running, width
        self.per_tree = width / 2

    def observe(self, sequences: int, trees: int, engine_steps: int) -> None:
        """`trees` open trees held `sequences` sequences in the engine for `engine_steps` steps."""
        if trees:
            keep = DECAY ** max(engine_steps, 1)
            self.per_tree = keep * self.per_tree + (1 - keep) * sequences / trees

    def wanted(self, open_trees: int, demand: int) -> int:
        """New trees to start now, given the open trees and their remaining demand (leaves still to grow)."""
        n = self.slots - open_trees
        if self.target > 0:
            by_size = round(self.target / max(self.per_tree, 1.0)) - open_trees
            by_demand = (MAX_DEMAND * self.target - demand) // self.width
            n = max(n, min(by_size, by_demand))
        return n
