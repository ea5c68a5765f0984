"""What every sampler shares: growth driven by the engine's events, over a pool of trees (`grow`), each
sampler deciding a new tree's first requests and what a returned group of paths becomes (`first_requests`,
`advance`).

The loop: submit every queued path of every open tree (by tree, then queue order: siblings are queued next to
each other, so requests that share a prefix are adjacent, what the prefix cache wants), then `Engine.step`,
which returns the requests that have their segment now (`actors.engine`); each tree's returned paths are one
group, handed to `advance`, whose new requests are submitted before the engine's next step; a tree is complete
when it has nothing queued and nothing in flight, and its slot is refilled at once. So trees complete
independently and, on an engine with fine steps (vLLM), a path that ends early is acted on while its siblings
still run. On a `BatchEngine` every step returns every request in flight, so each group is all of a tree's
paths of one round: the growth of the round-based sampler, step for step.

Each request's input is prompt + the path's response so far; each gets its own seed from the sampler's
generator, drawn at submission in the loop's fixed order (trees in pool order, paths in queue order), so a run is
reproducible on an engine that honours per-request seeds and returns the same events for the same requests
(vLLM does, for one scheduler configuration and no weight swap mid-tree; a swap restarts the requests in flight
under new weights). A request may run on past its segment (up to `max_tokens`, the path's cap), and the first
child queued of a path whose request still runs continues it (`actors.engine`, continuations): the engine
computes nothing of that path again.

The pool: `slots` trees at least; with `target_running` > 0, as many as hold about that many sequences in the
engine, by the measured sequences per open tree (`actors.pool`), whatever the learner's batch
(`rollout.target_running`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import numpy as np

from actors.engine import Engine, SamplingParams, SegmentRequest, SegmentResult
from actors.pool import PoolSize
from actors.tree_state import Path, PromptTree, Scorer, TreePiece
from protocol.config.rollout import RolloutConfig
from protocol.tree import SamplingSettings, Tree, TreeMode
from treepo.prompts import PromptItem


class SamplerBase(ABC):
    mode: TreeMode

    def __init__(self, engine: Engine, cfg: RolloutConfig, scorer: Scorer | None = None, run_id: str = "run",
                 seed: int = 0, tree_prefix: str = "tree", before_step: Callable[[], None] | None = None):
        self.engine, self.cfg, self.scorer, self.run_id, self.seed = engine, cfg, scorer, run_id, seed
        self.before_step = before_step  # runs before every engine call (an actor applies new weights there)
        self.tree_prefix = tree_prefix
        self.rng = np.random.default_rng(seed)
        self.params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        self.trees_grown = 0

    def settings(self) -> SamplingSettings:
        c = self.cfg
        return SamplingSettings(mode=self.mode, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                segment_tokens=c.segment_tokens, max_depth=c.max_depth, width=c.width,
                                branching=c.branching, seed=self.seed)

    def new_tree(self, item: PromptItem) -> PromptTree:
        tree_id = item.tree_id or f"{self.tree_prefix}-{self.seed}-{self.trees_grown}"
        tree = PromptTree(item, tree_id, self.run_id, self.settings())
        self.trees_grown += 1
        return tree

    @abstractmethod
    def max_new_tokens(self, path: Path) -> int:
        """Token budget of the next segment of `path`."""

    @property
    def max_tokens(self) -> int:
        """The response cap of a path (`RolloutConfig.response_cap` of this sampler's mode)."""
        return self.cfg.response_cap(self.mode)

    @abstractmethod
    def first_requests(self) -> int:
        """How many copies of the root a new tree queues."""

    @abstractmethod
    def advance(self, tree: PromptTree, grown: list[tuple[Path, SegmentResult]]) -> None:
        """Take one tree's grown paths of a step: finish leaves, queue its next requests (none: it is complete)."""

    def start(self, item: PromptItem) -> PromptTree:
        tree = self.new_tree(item)
        tree.queue = [Path()] * self.first_requests()
        return tree

    def grow(self, items: list[PromptItem], refill: Callable[[int], list[PromptItem]] | None = None,
             slots: int | None = None, target_running: int = 0) -> Iterator[TreePiece]:
        """Grow one tree per prompt; yield pieces as they complete (each tree's final piece last).

        With `refill`, the trees are a pool: after every step, new prompts are asked of `refill(n)` for the
        places free (at least `slots` trees, default len(items); with `target_running` > 0, as many as hold
        about that many sequences: `actors.pool`), and their trees join before the engine's next step. It ends
        when no tree is open and `refill` hands in nothing."""
        slots = slots or len(items)
        open_trees = [self.start(item) for item in items]
        try:
            yield from self._grow(open_trees, slots, target_running, refill)
        finally:
            self.engine.cancel()

    def _grow(self, open_trees: list[PromptTree], slots: int, target_running: int,
              refill: Callable[[int], list[PromptItem]] | None) -> Iterator[TreePiece]:
        jobs: dict[int, tuple[PromptTree, Path]] = {}  # ticket -> the tree and path it grows
        pool = PoolSize(slots, target_running, self.settings().width)
        open_trees += self._refill(open_trees, pool, refill)
        self._submit(open_trees, jobs)
        while open_trees:
            if self.before_step is not None:
                self.before_step()
            running, engine_steps = self.engine.in_flight, self.engine.counters.engine_steps
            grown: dict[int, list[tuple[Path, SegmentResult]]] = {}
            for ticket, result in self.engine.step():
                t, path = jobs.pop(ticket)
                del t.flying[ticket]
                path = t.extend(path, result)
                grown.setdefault(id(t), []).append((path, result))
                if result.handle is not None:
                    t.running[path.parent] = result.handle  # the path's new node: its first child continues it
            pool.observe(running, len(open_trees), self.engine.counters.engine_steps - engine_steps)
            still_open = []
            for t in open_trees:
                if id(t) in grown:
                    self.advance(t, grown.pop(id(t)))
                    yield from t.pieces(final=not t.queue and not t.flying)
                if t.queue or t.flying:
                    still_open.append(t)
            open_trees = still_open + self._refill(still_open, pool, refill)
            self._submit(open_trees, jobs)

    def _refill(self, open_trees: list[PromptTree], pool: PoolSize,
                refill: Callable[[int], list[PromptItem]] | None) -> list[PromptTree]:
        """New trees for the pool's free places (`actors.pool`), from `refill`."""
        if refill is None:
            return []
        more = pool.wanted(len(open_trees), sum(pool.width - len(t.leaves) for t in open_trees))
        return [self.start(item) for item in refill(more)] if more > 0 else []

    def _submit(self, trees: list[PromptTree], jobs: dict[int, tuple[PromptTree, Path]]) -> None:
        """Send every queued path of `trees` to the engine, then let it abort the running requests nobody
        continued."""
        for t in trees:
            for p in t.queue:
                budget = self.max_new_tokens(p)
                ticket = self.engine.submit(SegmentRequest(
                    token_ids=t.item.token_ids.tolist() + list(p.tokens), max_new_tokens=budget,
                    sampling=self.params, seed=int(self.rng.integers(2**31 - 1)),
                    continuation_tokens=self.max_tokens - len(p.tokens) - budget,
                    continues=t.running.pop(p.parent, None)))
                jobs[ticket] = (t, p)
                t.flying[ticket] = p
            t.queue, t.running = [], {}
        self.engine.release_unclaimed()

    def sample(self, items: list[PromptItem], slots: int | None = None, target_running: int = 0) -> list[Tree]:
        """The whole trees, in prompt order (no streaming): all at once, or (`slots`) through a pool of `slots`
        trees at least, topped up to `target_running` sequences, from the items not started yet."""
        slots = slots or len(items)
        rest = list(items[slots:])

        def refill(n: int) -> list[PromptItem]:
            got, rest[:] = rest[:n], rest[n:]
            return got
        whole = {p.tree.prompt_id: p.whole for p in self.grow(items[:slots], refill=refill, slots=slots,
                                                                 target_running=target_running) if p.final}
        return [whole[item.prompt_id] for item in items]  # type: ignore[misc]

    def text(self, path: Path) -> str:
        return self.engine.decode(path.tokens)

    def segment_text(self, path: Path) -> str:
        return self.engine.decode(path.tokens[len(path.tokens) - path.seg_lens[-1]:])
