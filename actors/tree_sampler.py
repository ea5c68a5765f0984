"""TreePO tree sampling (ALGORITHMS.md §1.3.2): a budgeted segment tree with fallback, exactly w leaves.

Per prompt: b0 copies of the root (fixed, or b0 ~ U{b0..min(b0_max, w)} per prompt: the reference's
"More Init Divergence", dead code there (§1.10.1), implemented here). Each path grows <= l new tokens per
segment, never past the d*l cap. Growth is driven by the engine's events (`actors.sampler_base`): the paths of a
tree that come back together (one group) are classified by the stop rules (`actors.stop_rules`) and become
leaves (scored) or stay active; the group's active paths are cloned by the step budget and its spreading
(`actors.budget`), where the room left is w minus the tree's leaves minus its paths still in flight; a tree
with no active path in the group and fewer than w leaves falls back (`actors.fallback`).

Where the order of events changes the law of the tree (vLLM returns a path that hits EOS before its siblings
reach the segment boundary; a `BatchEngine` returns a tree's paths of a round together, which is exactly the
round-based algorithm):
- a group of only ended paths while the tree still has paths in flight re-branches at once with the ended
  paths' budget share, min(b * f, room) requests (in rounds, that share would have gone to the surviving
  siblings: the fallback happens earlier, the surviving siblings branch less); with nothing in flight the
  fallback takes the whole room, w - F, as in rounds;
- the fallback's candidates are the leaves ended so far, not those the round would have ended.
`short_answer_fallback` (on by default): while every leaf of a tree ended in its first segment and no path got
past it, a fallback spawns all of the room at once from the prompt (where the cut of a one-segment leaf always
is), instead of min(b, r) copies per candidate: a prompt the policy answers in one segment then needs two
waves of requests, not one per b candidates.
Since F + queued + in flight <= w holds throughout and a tree short of w with nothing in flight always gets new
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
        if not t.queue and not t.flying and len(t.leaves) != self.cfg.width:
            raise AssertionError(f"tree {t.tree_id} ended with {len(t.leaves)} leaves, not {self.cfg.width}")

    def _requeue(self, t: PromptTree, active: list[Path], finished_now: int) -> None:
        c = self.cfg
        flying = len(t.flying)
        room = c.width - len(t.leaves) - flying
        if active:
            total = step_budget(c.width - flying, len(t.leaves), finished_now, len(active), c.branching)
            counts = spread(c, total, [p.logprobs for p in active], [p.last_segment_logprobs() for p in active],
                            self.engine.policy_version)
            t.queue = [p for p, n in zip(active, counts, strict=True) for _ in range(n)]
        elif room > 0:
            if c.short_answer_fallback and self._answers_in_one_segment(t):
                t.queue = [Path()] * room
            else:
                t.queue = fallback_paths(c, t.leaves, self.rng, room if flying == 0 else min(c.branching * finished_now, room))
            self.fallbacks += 1
        if len(t.leaves) + len(t.queue) + flying > c.width:
            raise AssertionError(f"tree {t.tree_id}: {len(t.leaves)} leaves + {len(t.queue)} queued + {flying} in "
                                 f"flight > w={c.width}")

    @staticmethod
    def _answers_in_one_segment(t: PromptTree) -> bool:
        """Every leaf so far ended by EOS in its first segment, and no path got past it."""
        return (all(s.depth == 1 for s in t.segments.values())
                and all(leaf.stop_reason in ("finished", "eos") for leaf in t.leaves))
