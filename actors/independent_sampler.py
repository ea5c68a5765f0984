"""Independent sampling, the baseline: w i.i.d. completions per prompt, each up to d * l tokens.

The same engine and the same step machinery as the tree samplers: all prompts' w requests go in one
engine call, and each completion is a depth-1 "tree" (w children of the root). A completion ends
"finished" (EOS with a \\boxed{} answer), "eos", or "max_tokens".
"""

from __future__ import annotations

from actors.boxed import last_boxed
from actors.engine import SegmentResult
from actors.sampler_base import SamplerBase
from actors.tree_state import Path, PromptTree


class IndependentSampler(SamplerBase):
    mode = "independent"

    def max_new_tokens(self, path: Path) -> int:
        return self.max_tokens

    def first_requests(self) -> int:
        return self.cfg.width

    def advance(self, t: PromptTree, grown: list[tuple[Path, SegmentResult]]) -> None:
        for path, result in grown:
            text = self.text(path)
            reason = ("max_tokens" if result.finish == "length" else
                      "finished" if last_boxed(text) is not None else "eos")
            t.finish(path, reason, text, self.scorer)
