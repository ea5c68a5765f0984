"""Independent sampling, the baseline: w i.i.d. completions per prompt, each up to d * l tokens.

The same engine and the same step machinery as the tree samplers: all prompts' w requests go in one
engine call, and each completion is a depth-1 "tree" (w children of the root). A completion ends
"finished" (EOS with a \\boxed{} answer), "eos", or "max_tokens".
"""

from __future__ import annotations

from collections.abc import Iterator

from actors.boxed import last_boxed
from actors.prompts import PromptItem
from actors.sampler_base import SamplerBase
from actors.tree_state import Path, TreePiece


class IndependentSampler(SamplerBase):
    mode = "independent"

    def max_new_tokens(self, path: Path) -> int:
        return self.cfg.max_depth * self.cfg.segment_tokens

    def grow(self, items: list[PromptItem]) -> Iterator[TreePiece]:
        trees = [self.new_tree(item) for item in items]
        for t in trees:
            t.queue = [Path()] * self.cfg.width
        for t, path, result in self.step(trees):
            text = self.text(path)
            reason = ("max_tokens" if result.finish == "length" else
                      "finished" if last_boxed(text) is not None else "eos")
            t.finish(path, reason, text, self.scorer)
        for t in trees:
            yield from t.pieces(final=True)
