"""TreeRPO tree sampling (ALGORITHMS.md §2.1): a full N-ary tree to depth D, steps of L_step tokens.

Every node gets N children; a step (node) adds at most L_step tokens, except the D-th (last) step,
which may run up to the response cap (`treerpo_max_tokens`, default D * L_step) so leaves are
complete solutions. A path ends at EOS ("finished" if its last step holds a \\boxed{} answer, else
"eos"), at depth D ("max_depth"), or at the cap ("max_tokens"); an early stop is a leaf at a
shallower depth, so a tree has at most N^D leaves (fewer when paths stop early: no fallback, no
budget transfer, as in the paper). The TreePO repetition detector is not applied.
"""

from __future__ import annotations

from actors.boxed import last_boxed
from actors.engine import SegmentResult
from actors.sampler_base import SamplerBase
from actors.tree_state import Path, PromptTree
from protocol.tree import SamplingSettings, StopReason


class TreeRPOSampler(SamplerBase):
    mode = "treerpo"

    def settings(self) -> SamplingSettings:
        s = super().settings()
        s.segment_tokens, s.max_depth = self.cfg.treerpo_step_tokens, self.cfg.treerpo_depth
        s.branching, s.width = self.cfg.treerpo_children, self.cfg.treerpo_children ** self.cfg.treerpo_depth
        return s

    def max_new_tokens(self, path: Path) -> int:
        left = self.max_tokens - len(path.tokens)
        return left if path.depth == self.cfg.treerpo_depth - 1 else min(self.cfg.treerpo_step_tokens, left)

    def stop_reason(self, path: Path, finish: str) -> StopReason | None:
        if finish == "stop":
            return "finished" if last_boxed(self.segment_text(path)) is not None else "eos"
        if len(path.tokens) >= self.max_tokens:
            return "max_tokens"
        if path.depth >= self.cfg.treerpo_depth:
            return "max_depth"
        return None

    def first_requests(self) -> int:
        return self.cfg.treerpo_children

    def advance(self, t: PromptTree, grown: list[tuple[Path, SegmentResult]]) -> None:
        for path, result in grown:
            reason = self.stop_reason(path, result.finish)
            if reason is None:
                t.queue += [path] * self.cfg.treerpo_children
            else:
                t.finish(path, reason, self.text(path), self.scorer)
