"""TreePO tree sampling (ALGORITHMS.md §1.3.2): a budgeted segment tree with fallback, exactly w leaves.

Per prompt: b0 copies of the root (fixed, or b0 ~ U{b0..min(b0_max, w)} per prompt: the reference's
"More Init Divergence", dead code there (§1.10.1), implemented here). Then, until no prompt has a
queued path: one engine call for all queued paths (<= l new tokens each, never past the d*l cap);
each grown path is classified by the stop rules (`actors.stop_rules`) and becomes a leaf (scored)
or stays active; each prompt's active paths are cloned by the step budget and its spreading
(`actors.budget`); a prompt left with no active path and fewer than w leaves falls back
(`actors.fallback`). Since F + queued <= w holds throughout and a prompt short of w always gets new
requests, every prompt ends with exactly w leaves (§1.3.6; checked, not assumed).
Each segment records its behaviour log-probs and the policy version of the engine that produced it.
Simplifications: `traj_filter_min_len`, the token-budget modes (`by_infer_step_token_budget`,
`by_response_token`) and the block/min-log-prob fallback points are not implemented.
"""

from __future__ import annotations

from collections.abc import Iterator

from actors.budget import spread, step_budget
from actors.fallback import fallback_paths
from actors.prompts import PromptItem
from actors.sampler_base import SamplerBase
from actors.stop_rules import classify
from actors.tree_state import Path, PromptTree, TreePiece


class TreePOSampler(SamplerBase):
    mode = "treepo"

    fallbacks = 0  # fallback rounds, over all trees grown

    @property
    def max_tokens(self) -> int:
        return self.cfg.max_depth * self.cfg.segment_tokens

    def max_new_tokens(self, path: Path) -> int:
        return min(self.cfg.segment_tokens, self.max_tokens - len(path.tokens))

    def initial_branching(self) -> int:
        c = self.cfg
        hi = min(c.init_branching_max, c.width)
        return int(self.rng.integers(c.init_branching, hi + 1)) if hi > c.init_branching else c.init_branching

    def grow(self, items: list[PromptItem]) -> Iterator[TreePiece]:
        trees = [self.new_tree(item) for item in items]
        for t in trees:
            t.queue = [Path()] * self.initial_branching()
        open_trees = list(trees)
        while open_trees:
            grown = self.step(open_trees)
            active: dict[int, list[Path]] = {id(t): [] for t in open_trees}
            finished_now = dict.fromkeys(active, 0)
            for t, path, result in grown:
                seg_text = self.segment_text(path)
                reason = classify(self.cfg, seg_text, result.finish, len(path.tokens), self.max_tokens, path.depth)
                if reason is None:
                    active[id(t)].append(path)
                else:
                    t.finish(path, reason, self.text(path), self.scorer)
                    finished_now[id(t)] += 1
            for t in open_trees:
                self._requeue(t, active[id(t)], finished_now[id(t)])
            still_open = []
            for t in open_trees:
                if t.queue:
                    still_open.append(t)
                    yield from t.pieces(final=False)
                else:
                    if len(t.leaves) != self.cfg.width:
                        raise AssertionError(f"tree {t.tree_id} ended with {len(t.leaves)} leaves, not {self.cfg.width}")
                    yield from t.pieces(final=True)
            open_trees = still_open

    def _requeue(self, t: PromptTree, active: list[Path], finished_now: int) -> None:
        c = self.cfg
        if active:
            total = step_budget(c.width, len(t.leaves), finished_now, len(active), c.branching)
            counts = spread(c, total, [p.logprobs for p in active], [p.last_segment_logprobs() for p in active],
                            self.engine.policy_version)
            t.queue = [p for p, n in zip(active, counts, strict=True) for _ in range(n)]
        elif len(t.leaves) < c.width:
            t.queue = fallback_paths(c, t.leaves, self.rng)
            self.fallbacks += 1
        if len(t.leaves) + len(t.queue) > c.width:
            raise AssertionError(f"tree {t.tree_id}: {len(t.leaves)} leaves + {len(t.queue)} queued > w={c.width}")
