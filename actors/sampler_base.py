"""What every sampler shares: one batched engine call per step over all prompts' queued paths, and the
loop that grows a pool of trees (`grow`), each sampler deciding a new tree's first requests and what a
step's grown paths become (`first_requests`, `advance`).

A step sends every queued path of every prompt in ONE `Engine.generate` call, ordered by prompt and,
within a prompt, by queue order (siblings are queued next to each other, so requests that share a
prefix are adjacent: what the prefix cache wants). Each request's input is prompt + the path's
response so far; each gets its own seed from the sampler's generator, so a run is reproducible on
engines that honour per-request seeds. A request may run on past its segment (up to `max_tokens`, the
path's cap), and the first child queued of a path whose request still runs continues it
(`actors.engine`, continuations): the engine computes nothing of that path again. Subclasses decide
how many tokens a path may add and what happens to the grown paths (`grow`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import numpy as np

from actors.engine import Engine, SamplingParams, SegmentRequest, SegmentResult
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
        self.steps = 0

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
    @abstractmethod
    def max_tokens(self) -> int:
        """The response cap of a path."""

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
             slots: int | None = None) -> Iterator[TreePiece]:
        """Grow one tree per prompt; yield pieces as they complete (each tree's final piece last).

        With `refill`, the trees are a pool of `slots` (default len(items)): after every step the free
        slots are offered to `refill(free)`, whose prompts' trees join the next engine call, so a tree
        that needs many steps (deep paths, fallbacks) holds back no other (continuous batching). It ends
        when no tree is open and `refill` hands in nothing."""
        slots = slots or len(items)
        open_trees = [self.start(item) for item in items]
        try:
            yield from self._grow(open_trees, slots, refill)
        finally:
            self.engine.drop_continuations()

    def _grow(self, open_trees: list[PromptTree], slots: int,
              refill: Callable[[int], list[PromptItem]] | None) -> Iterator[TreePiece]:
        while open_trees:
            grown: dict[int, list[tuple[Path, SegmentResult]]] = {id(t): [] for t in open_trees}
            for t, path, result in self.step(open_trees):
                grown[id(t)].append((path, result))
            still_open = []
            for t in open_trees:
                self.advance(t, grown[id(t)])
                if t.queue:
                    still_open.append(t)
                yield from t.pieces(final=not t.queue)
            open_trees = still_open
            if refill is not None and len(open_trees) < slots:
                open_trees += [self.start(item) for item in refill(slots - len(open_trees))]

    def sample(self, items: list[PromptItem]) -> list[Tree]:
        """The whole trees, in prompt order (no streaming)."""
        whole = {p.tree.prompt_id: p.whole for p in self.grow(items) if p.final}
        return [whole[item.prompt_id] for item in items]  # type: ignore[misc]

    def step(self, trees: list[PromptTree]) -> list[tuple[PromptTree, Path, SegmentResult]]:
        """Run every queued path of every tree through the engine once; (tree, grown path, result) each."""
        jobs = [(t, p) for t in trees for p in t.queue]
        requests = []
        for t, p in jobs:
            budget = self.max_new_tokens(p)
            requests.append(SegmentRequest(token_ids=t.item.token_ids.tolist() + list(p.tokens), max_new_tokens=budget,
                                           sampling=self.params, seed=int(self.rng.integers(2**31 - 1)),
                                           continuation_tokens=self.max_tokens - len(p.tokens) - budget,
                                           continues=t.running.pop(p.parent, None)))
        if self.before_step is not None:
            self.before_step()
        results = self.engine.generate(requests)
        for t in trees:
            t.queue, t.running = [], {}
        self.steps += 1
        grown = [(t, t.extend(p, r), r) for (t, p), r in zip(jobs, results, strict=True)]
        for t, path, r in grown:
            if r.handle is not None:
                t.running[path.parent] = r.handle
        return grown

    def text(self, path: Path) -> str:
        return self.engine.decode(path.tokens)

    def segment_text(self, path: Path) -> str:
        return self.engine.decode(path.tokens[len(path.tokens) - path.seg_lens[-1]:])
