"""The inference-engine interface the tree samplers run on, and the counters every engine keeps.

One `generate` call takes a batch of segment requests (token ids of prompt + path so far, a token
budget, sampling settings, a seed) and returns, per request and in the same order, the sampled
continuation, the behaviour log-prob of each sampled token (of the distribution it was sampled from:
after temperature, top-k and top-p, `protocol.sampling`), why it stopped, and how many of its
input tokens the engine served from a cache instead of computing them.

Continuations. A request may allow the engine to keep sampling past its segment
(`continuation_tokens`): an engine that can keep a request running (vLLM) then returns a `handle` with
the segment, and the next call's request for the same path passes it as `continues`. The path's next
segment then comes from the running request, whose KV cache already holds the whole path: nothing is
re-prefilled (a new request recomputes at least the path's partial last KV block). The continuation is
a sample of the same distribution as a new request from the same input, so a sampler lets the FIRST
child of a path continue and starts its other children as new requests. A handle is valid for the
next call only: a running request that call does not continue is aborted, and so is every one when
the weights change (its segments would mix versions). Engines without running requests return no
handle and treat every request as new.

`EngineCounters` is accumulated the same way by every engine, so benchmarks compare like with like:
processed tokens = prompt tokens not served from cache + generated tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Finish = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off


@dataclass
class SegmentRequest:
    token_ids: list[int]  # prompt + path so far
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    continuation_tokens: int = 0  # tokens the engine may sample past this segment for a continuation (0: none)
    continues: str | None = None  # the handle of the running request whose next segment this is


@dataclass
class SegmentResult:
    token_ids: list[int]  # the continuation; ends with the EOS token when finish == "stop"
    logprobs: list[float]  # behaviour log-prob of each sampled token
    finish: Finish
    prompt_tokens: int  # len(request.token_ids)
    cached_tokens: int  # of those, served from a cache: the prefix cache, or (a continuation) the request's own KV
    policy_version: int  # the weights that produced this continuation
    handle: str | None = None  # set while the request keeps running: pass it as the next request's `continues`


@dataclass
class EngineCounters:
    calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    continued: int = 0  # requests served by a running request (no prefill)
    # sampled past a segment by a running request nobody continued (those received: vLLM's engine process may
    # have sampled a few more before the abort reached it)
    discarded_tokens: int = 0

    def add(self, results: Sequence[SegmentResult]) -> None:
        self.calls += 1
        self.requests += len(results)
        for r in results:
            self.prompt_tokens += r.prompt_tokens
            self.cached_tokens += r.cached_tokens
            self.generated_tokens += len(r.token_ids)

    @property
    def processed_tokens(self) -> int:
        """Tokens the engine actually ran through the model: uncached prompt tokens + generated ones (+ the
        ones a running request sampled for a continuation that never came)."""
        return self.prompt_tokens - self.cached_tokens + self.generated_tokens + self.discarded_tokens

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "generated_tokens": self.generated_tokens,
                "continued": self.continued, "discarded_tokens": self.discarded_tokens,
                "processed_tokens": self.processed_tokens}


class Engine(ABC):
    """A generator of segments. `policy_version` is the version of the weights it currently holds."""

    policy_version: int
    counters: EngineCounters
    eos_token_ids: frozenset[int]

    @abstractmethod
    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentResult]:
        """One batched call: a result per request, in request order. Implementations add to `counters`."""

    @abstractmethod
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the weights (HF checkpoint names) without restarting; later segments carry `version`."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids (special tokens skipped), for the stop rules and the reward."""

    @abstractmethod
    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks start each side cold)."""

    @abstractmethod
    def drop_continuations(self) -> None:
        """Abort the requests kept running for a continuation (a sampler calls it when it stops growing)."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's processes and memory."""
