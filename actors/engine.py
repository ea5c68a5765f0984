"""The inference-engine interface the tree samplers run on, and the counters every engine keeps.

Two faces. Event-driven (what the samplers use): `submit` queues one segment request (token ids of prompt +
path so far, a token budget, sampling settings, a seed) and returns its ticket; `step` runs the engine until at
least one submitted request has its segment and returns those, each as (ticket, result): the sampled
continuation, the behaviour log-prob of each sampled token (of the distribution it was sampled from: after
temperature, top-k and top-p, `protocol.sampling`), why it stopped, and how many of its input tokens the engine
did not compute: served from its prefix cache, or held by the running request it continues. A sampler reacts to
each step's results at once (children join the running batch before the engine's next step). Batched:
`generate` submits a list and steps until every one has its segment (evaluation, benches).

How fine a step is depends on the engine: vLLM's `step` returns after the engine iteration (one decode step of
every running request) in which some request reached its budget or EOS, so paths that end early free their
place at once; a `BatchEngine` (transformers, test engines) runs every submitted request to its segment in one
batched call, so every step returns all of them, which is growth in rounds.

Continuations. A request may allow the engine to keep sampling past its segment (`continuation_tokens`): an
engine that can keep a request running (vLLM) then returns a `handle` with the segment, and a request submitted
for the same path with `continues=handle` takes its next segment from the running request, whose KV cache already
holds the whole path: nothing is re-prefilled (a new request recomputes at least the path's partial last KV
block). The continuation is a sample of the same distribution as a new request from the same input, so a sampler
lets the FIRST child of a path continue and starts its other children as new requests. A handle is valid until
`release_unclaimed`, which a sampler calls once it has submitted a step's children (`generate` calls it after
submitting its list): a running request nobody continued is then aborted. When the weights change, every
running request is aborted, and a submitted request whose segment was not done yet is restarted as a new
request under the new weights (its partial segment discarded and counted): a segment comes from one version.
Engines without running requests return no handle and treat every request as new.

`EngineCounters` is accumulated the same way by every engine, so benchmarks compare like with like; each
figure is defined there.
"""

from __future__ import annotations

import itertools
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
    cached_tokens: int  # of those, served from the engine's prefix cache when its request was prefilled (0: continued)
    policy_version: int  # the weights that produced this continuation
    handle: str | None = None  # set while the request keeps running: pass it as the next request's `continues`
    continued_tokens: int = 0  # a segment of a running request (`continues`): all its input, held in that KV


@dataclass
class EngineCounters:
    """What an engine did, summed since it was built (benchmarks and metrics take differences).

    Per returned segment (`add`): `requests` segments, `prompt_tokens` their inputs, of which `cached_tokens`
    were served from the engine's prefix cache when a new request was prefilled (vLLM: its `num_cached_tokens`;
    transformers: its kept KV, or a sibling's prefill), `continued` segments taken from a running request and
    `continued_tokens` their inputs (held in that request's KV: none of it computed again), and
    `generated_tokens` the tokens returned. The rest are the engine's own accounting of its work:
    `discarded_tokens` it sampled and never returned (held by a running request nobody continued when it was
    aborted, or the partial segment of a request restarted under new weights), and `processed_tokens` it ran
    through the model: the input tokens it computed (a new request's input less its prefix-cache hits) + every
    token it sampled, returned or discarded (vLLM: those it reported, `actors.vllm_engine`). Once nothing runs
    and no request was restarted, processed_tokens = prompt_tokens - cached_tokens - continued_tokens +
    generated_tokens + discarded_tokens; a restarted request adds the input it had computed before the restart.
    """

    calls: int = 0  # `step` calls that ran the model
    engine_steps: int = 0  # model iterations inside them (decode steps; one per generated token of a batch)
    running_sum: int = 0  # over engine steps, the sequences the step carried (mean batch = running_sum / engine_steps)
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    continued: int = 0
    continued_tokens: int = 0
    generated_tokens: int = 0
    discarded_tokens: int = 0
    processed_tokens: int = 0
    restarted: int = 0  # submitted requests restarted under new weights before their segment was done

    def add(self, results: Sequence[SegmentResult]) -> None:
        self.requests += len(results)
        for r in results:
            self.prompt_tokens += r.prompt_tokens
            self.cached_tokens += r.cached_tokens
            self.continued += r.continued_tokens > 0
            self.continued_tokens += r.continued_tokens
            self.generated_tokens += len(r.token_ids)

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "engine_steps": self.engine_steps, "running_sum": self.running_sum,
                "restarted": self.restarted, "requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "generated_tokens": self.generated_tokens,
                "continued": self.continued, "continued_tokens": self.continued_tokens,
                "discarded_tokens": self.discarded_tokens, "processed_tokens": self.processed_tokens}


class Engine(ABC):
    """A generator of segments. `policy_version` is the version of the weights it currently holds."""

    policy_version: int
    counters: EngineCounters
    eos_token_ids: frozenset[int]

    @abstractmethod
    def submit(self, request: SegmentRequest) -> int:
        """Queue one request; its ticket. A request that `continues` a valid handle claims it now."""

    @abstractmethod
    def step(self) -> list[tuple[int, SegmentResult]]:
        """Run until at least one submitted request has its segment; those, as (ticket, result) in ticket order
        (empty when nothing is in flight). Implementations add to `counters`."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Submitted requests whose segment has not been returned yet."""

    @abstractmethod
    def release_unclaimed(self) -> None:
        """Abort the running requests whose handles were returned and not continued since."""

    @abstractmethod
    def cancel(self) -> None:
        """Abort every submitted request and every running one (a sampler calls it when it stops growing)."""

    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentResult]:
        """One batch to completion: a result per request, in request order (nothing else may be in flight)."""
        if self.in_flight:
            raise RuntimeError(f"generate with {self.in_flight} requests already in flight")
        tickets = [self.submit(r) for r in requests]
        self.release_unclaimed()
        got: dict[int, SegmentResult] = {}
        while len(got) < len(tickets):
            got.update(self.step())
        return [got[t] for t in tickets]

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
    def close(self) -> None:
        """Release the engine's processes and memory."""


class BatchEngine(Engine):
    """An engine that runs a batch to its segments in one call (`generate_batch`): `step` sends every submitted
    request, so each step's events are all of them (growth in rounds). It keeps no request running past its
    call, so a call's work is its results': the input not served from its cache, and the tokens returned
    (processed tokens). Subclasses call `super().__init__()`."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, SegmentRequest]] = []
        self._tickets = itertools.count()

    @abstractmethod
    def generate_batch(self, requests: Sequence[SegmentRequest]) -> list[SegmentResult]:
        """One batched call: a result per request, in request order."""

    def submit(self, request: SegmentRequest) -> int:
        ticket = next(self._tickets)
        self._pending.append((ticket, request))
        return ticket

    def step(self) -> list[tuple[int, SegmentResult]]:
        if not self._pending:
            return []
        batch, self._pending = self._pending, []
        results = self.generate_batch([r for _, r in batch])
        self.counters.calls += 1
        self.counters.add(results)
        self.counters.processed_tokens += sum(r.prompt_tokens - r.cached_tokens + len(r.token_ids) for r in results)
        return [(t, r) for (t, _), r in zip(batch, results, strict=True)]

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def release_unclaimed(self) -> None:
        """It keeps no request running between calls."""

    def cancel(self) -> None:
        self._pending = []
