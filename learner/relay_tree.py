"""Who feeds whom with weights: the learner streams each version to at most `fanout` actors, and every actor
that relays streams it to at most `fanout` others, so the learner's egress per version is at most `fanout`
model copies however many actors there are, and a version reaches N actors in about log_fanout(N) hops.

Placement (`place`): a joining actor goes to the free slot nearest the learner: the learner's own, while it
feeds fewer than `fanout` actors, else that of the relay of least depth (then fewest children, then
earliest joined) outside the actor's own subtree and not among the relays it must `avoid` (remembered). An actor that does not relay is always
a leaf. When no slot is free (every actor refuses to relay) the learner feeds the actor itself, beyond
`fanout`, and `overflow` counts it; `rebalance` moves such actors under relays once slots free up. When an
actor leaves (`remove`) its children are placed again, each with its subtree. This is pure bookkeeping: `learner/weight_push.py` sends the routes it decides.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

LEARNER = None  # the parent of the actors the learner feeds itself
_UNPLACED = object()  # the parent of an orphan until it is placed again


@dataclass(eq=False)
class _Node:
    relays: bool
    joined: int
    parent: Hashable | None = LEARNER
    children: set[Hashable] = field(default_factory=set)
    avoid: set[Hashable] = field(default_factory=set)  # relays that must not feed it (they sent a corrupt chunk)


class RelayTree:
    def __init__(self, fanout: int):
        self.fanout = fanout
        self.nodes: dict[Hashable, _Node] = {}
        self.direct: set[Hashable] = set()  # fed by the learner
        self.overflow = 0  # placements beyond the learner's `fanout`, for want of a free relay slot
        self._joined = 0

    def parent(self, key: Hashable) -> Hashable | None:
        return self.nodes[key].parent

    def depth(self, key: Hashable) -> int | None:
        """Hops from the learner: 1 for an actor it feeds; None while `key` hangs under an orphan."""
        d = 1
        while (key := self.nodes[key].parent) is not LEARNER:
            if key is _UNPLACED:
                return None
            d += 1
        return d

    def subtree(self, key: Hashable) -> set[Hashable]:
        """`key` and every actor fed through it."""
        out, todo = set(), [key]
        while todo:
            k = todo.pop()
            out.add(k)
            todo.extend(self.nodes[k].children)
        return out

    def place(self, key: Hashable, relays: bool, avoid: Iterable[Hashable] = ()) -> Hashable | None:
        """Attach `key` (new, or moved with its subtree) to a parent and return it (LEARNER = None)."""
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = _Node(relays, self._joined)
            self._joined += 1
        else:
            self._detach(key)
            node.relays = relays
        node.avoid |= set(avoid)
        parent = self._free_slot(self.subtree(key) | node.avoid)
        if parent is LEARNER and len(self.direct) >= self.fanout:
            self.overflow += 1
        node.parent = parent
        if parent is LEARNER:
            self.direct.add(key)
        else:
            self.nodes[parent].children.add(key)
        return parent

    def remove(self, key: Hashable) -> list[Hashable]:
        """Forget `key`; its children are left for the caller to `place` again (returned, oldest first)."""
        node = self.nodes.get(key)
        if node is None:
            return []
        self._detach(key)
        del self.nodes[key]
        orphans = sorted(node.children, key=lambda k: self.nodes[k].joined)
        for child in orphans:
            self.nodes[child].parent = _UNPLACED
        return orphans

    def rebalance(self) -> list[tuple[Hashable, Hashable]]:
        """Move actors the learner feeds beyond `fanout` (placed when no relay slot was free) under relays that
        have a free slot now; returns the moves as (actor, new parent), newest overflow first."""
        moves = []
        for key in sorted(self.direct, key=lambda k: -self.nodes[k].joined):
            if len(self.direct) <= self.fanout:
                break
            parent = self._free_slot(self.subtree(key) | self.nodes[key].avoid, learner=False)
            if parent is not LEARNER:
                self.direct.discard(key)
                self.nodes[key].parent = parent
                self.nodes[parent].children.add(key)
                moves.append((key, parent))
        return moves

    def _detach(self, key: Hashable) -> None:
        parent = self.nodes[key].parent
        if parent is LEARNER:
            self.direct.discard(key)
        elif parent is not _UNPLACED:
            self.nodes[parent].children.discard(key)

    def _free_slot(self, excluded: set[Hashable], learner: bool = True) -> Hashable | None:
        """The learner (if `learner` and it has a slot) or the best relay with a free slot; LEARNER if none."""
        if learner and len(self.direct) < self.fanout:
            return LEARNER
        candidates = [(depth, len(n.children), n.joined, k) for k, n in self.nodes.items()
                      if n.relays and k not in excluded and len(n.children) < self.fanout
                      and (depth := self.depth(k)) is not None]
        return min(candidates, key=lambda c: c[:3])[3] if candidates else LEARNER
