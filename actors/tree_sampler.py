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

from actors.budget import spread, step_budget
from actors.engine import SegmentResult
from actors.fallback import fallback_paths
from actors.sampler_base import SamplerBase
from actors.stop_rules import classify
from actors.tree_state import Path, PromptTree


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

    def first_requests(self) -> int:
        return self.initial_branching()

    def advance(self, t: PromptTree, grown: list[tuple[Path, SegmentResult]]) -> None:
        active, finished_now = [], 0
        for path, result in grown:
            reason = classify(self.cfg, self.segment_text(path), result.finish, len(path.tokens), self.max_tokens,
                              path.depth)
            if reason is None:
                active.append(path)
            else:
                t.finish(path, reason, self.text(path), self.scorer)
                finished_now += 1
        self._requeue(t, active, finished_now)
        if not t.queue and len(t.leaves) != self.cfg.width:
            raise AssertionError(f"tree {t.tree_id} ended with {len(t.leaves)} leaves, not {self.cfg.width}")

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
