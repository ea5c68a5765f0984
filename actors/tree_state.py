"""The growing tree of one prompt: its paths, segments and leaves, and the pieces it streams.

Shared by the TreePO, TreeRPO and independent samplers. A `Path` is an immutable record of one
trajectory prefix (the node it hangs off, its node chain, its response tokens and log-probs); a
queued path is one engine request. Node ids are unique per tree (1, 2, ... in creation order).

Streaming: `pieces()` returns the segments and leaves not yet sent under every root child whose
subtree has no queued or in-flight path left (every leaf under it is finished), and at the end (`final=True`)
everything not yet sent. Nothing is sent twice, so `Tree.merge` of all pieces is the whole tree.
A fallback may later hang a new branch under an already-sent node; it goes in a later piece.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from actors.engine import SegmentResult
from protocol.messages import SubtreeMsg
from protocol.tree import ROOT_ID, Leaf, SamplingSettings, Segment, StopReason, Tree
from treepo.prompts import PromptItem

# (prompt, completion text, response tokens) -> (reward, details)
Scorer = Callable[[PromptItem, str, int], tuple[float, dict[str, float]]]


@dataclass(frozen=True)
class Path:
    parent: int = ROOT_ID  # the node the next segment hangs off
    chain: tuple[int, ...] = ()  # node ids from the root's child down to `parent`
    tokens: tuple[int, ...] = ()  # response so far
    logprobs: tuple[float, ...] = ()
    seg_lens: tuple[int, ...] = ()  # length of each segment on the chain

    @property
    def depth(self) -> int:
        return len(self.chain)

    def last_segment_logprobs(self) -> tuple[float, ...]:
        return self.logprobs[len(self.logprobs) - self.seg_lens[-1]:] if self.seg_lens else ()

    def prefix(self, n_segments: int) -> Path:
        """The path cut after its first `n_segments` segments (a segment boundary)."""
        n_tok = sum(self.seg_lens[:n_segments])
        return Path(parent=self.chain[n_segments - 1] if n_segments else ROOT_ID, chain=self.chain[:n_segments],
                    tokens=self.tokens[:n_tok], logprobs=self.logprobs[:n_tok], seg_lens=self.seg_lens[:n_segments])


@dataclass
class LeafRecord:
    path: Path  # ends at the leaf's node
    stop_reason: StopReason


@dataclass
class TreePiece:
    """A streamed piece of one tree; `whole` is the complete tree, on the final piece only."""

    tree: Tree
    seq: int
    final: bool
    n_pieces: int = 0
    whole: Tree | None = None

    def message(self, actor_id: str) -> SubtreeMsg:
        return SubtreeMsg(key=f"{self.tree.tree_id}/{self.seq}", actor_id=actor_id, seq=self.seq, tree=self.tree,
                          final=self.final, n_pieces=self.n_pieces)


class PromptTree:
    def __init__(self, item: PromptItem, tree_id: str, run_id: str, sampling: SamplingSettings):
        self.item, self.tree_id, self.run_id, self.sampling = item, tree_id, run_id, sampling
        self.segments: dict[int, Segment] = {}
        self.leaves: list[LeafRecord] = []
        self.leaf_views: list[Leaf] = []
        self.queue: list[Path] = []  # paths to submit at the next step
        self.flying: dict[int, Path] = {}  # engine ticket -> a submitted path whose segment has not come back
        self.running: dict[int, str] = {}  # node id -> handle of the engine request still sampling after it
        self._next_id = 1
        self._sent_nodes: set[int] = set()
        self._sent_leaves: set[int] = set()
        self._seq = 0

    def extend(self, path: Path, result: SegmentResult) -> Path:
        """Record the engine's segment for `path` as a new node; the extended path."""
        node = self._next_id
        self._next_id += 1
        self.segments[node] = Segment(node_id=node, parent_id=path.parent, depth=path.depth + 1,
                                      token_ids=np.asarray(result.token_ids, np.int32),
                                      logprobs=np.asarray(result.logprobs, np.float32),
                                      policy_version=result.policy_version, finish=result.finish)
        return Path(parent=node, chain=path.chain + (node,), tokens=path.tokens + tuple(result.token_ids),
                    logprobs=path.logprobs + tuple(result.logprobs), seg_lens=path.seg_lens + (len(result.token_ids),))

    def finish(self, path: Path, reason: StopReason, text: str, scorer: Scorer | None) -> None:
        reward, details = scorer(self.item, text, len(path.tokens)) if scorer else (0.0, {})
        self.leaves.append(LeafRecord(path=path, stop_reason=reason))
        self.leaf_views.append(Leaf(node_id=path.parent, reward=reward, stop_reason=reason, reward_details=details))

    # ------------------------------------------------------------------ streaming
    def _build(self, node_ids: list[int], leaves: list[Leaf]) -> Tree:
        return Tree.build(tree_id=self.tree_id, prompt_id=self.item.prompt_id, run_id=self.run_id,
                          prompt_token_ids=self.item.token_ids, sampling=self.sampling,
                          segments=[self.segments[n] for n in node_ids], leaves=leaves,
                          prompt_text=self.item.text, answer=self.item.answer)

    def whole(self) -> Tree:
        return self._build(sorted(self.segments), self.leaf_views)

    def pieces(self, final: bool) -> list[TreePiece]:
        """The piece to send now (none if nothing is complete and unsent); on `final`, the last one."""
        if final:
            done = None
        else:
            # a fresh root request belongs to no subtree yet
            live = {p.chain[0] for p in [*self.queue, *self.flying.values()] if p.chain}
            done = {n for n, s in self.segments.items() if s.parent_id == ROOT_ID and n not in live}
        nodes = [n for n in sorted(self.segments) if n not in self._sent_nodes
                 and (done is None or self._root_child(n) in done)]
        leaves = [v for v in self.leaf_views if v.node_id not in self._sent_leaves
                  and (done is None or self._root_child(v.node_id) in done)]
        if not final and not nodes and not leaves:
            return []
        self._sent_nodes.update(nodes)
        self._sent_leaves.update(v.node_id for v in leaves)
        piece = TreePiece(tree=self._build(nodes, leaves), seq=self._seq, final=final)
        self._seq += 1
        if final:
            piece.n_pieces = self._seq
            piece.whole = self.whole()
        return [piece]

    def _root_child(self, node: int) -> int:
        while self.segments[node].parent_id != ROOT_ID:
            node = self.segments[node].parent_id
        return node
