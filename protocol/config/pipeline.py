"""The one typed config of the whole pipeline, composed of sections; YAML file + environment overrides.

Precedence: defaults < YAML file < environment. An environment override names a field as
TREEPO_<SECTION>__<FIELD> (e.g. TREEPO_LEARNER__LR=1e-5); its value is parsed as YAML, so
numbers, booleans and lists keep their types. Every error names the field (e.g. `learner.lr`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, NonNegativeInt, ValidationError, model_validator

from protocol.config.base import Section
from protocol.config.buffer import BufferConfig
from protocol.config.engine import EngineConfig, vllm_block_size
from protocol.config.evaluation import EvalConfig
from protocol.config.learner import LearnerConfig
from protocol.config.model import ModelConfig
from protocol.config.prompts import PromptsConfig
from protocol.config.replay import ReplayConfig
from protocol.config.reward import RewardConfig
from protocol.config.rollout import RolloutConfig
from protocol.config.transport import LimitsConfig, SecurityConfig
from protocol.config.weights import WeightsConfig

ENV_PREFIX = "TREEPO_"


class WandbConfig(Section):
    project: str = Field("", description="Weights & Biases project the learner and the evaluator log to ('' = off). "
                         "Each process is a run of its own, grouped by `run.run_id`; needs `pip install wandb`.")
    entity: str = Field("", description="W&B entity (team or user; '' = the default of the logged-in account).")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: written under `<output_dir>/metrics/wandb` with no network (`wandb sync` "
        "uploads it later); online: streamed to the W&B server.")


class RunConfig(Section):
    run_id: str = Field("run", min_length=1, description="Name of the run (Redis keys, logs, checkpoints).")
    output_dir: str = Field("runs/run", description="Checkpoints, TensorBoard logs, embedded Redis data, plots.")
    seed: int = Field(0, description="Global seed.")
    schedule: Literal["async", "sync"] = Field(
        "async", description="async: generation and training overlap; sync: generate a batch, then train on it.")
    actors: int = Field(1, ge=0, description="Actor processes `treepo up` starts.")
    learner_ranks: int = Field(1, ge=1, description="DeepSpeed ranks `treepo up` starts for the learner (torchrun "
                               "when > 1); each rank trains on its share of every batch.")
    gpus: dict[Literal["actor", "learner", "evaluator"], list[NonNegativeInt]] = Field(
        default_factory=dict, description="GPU ids `treepo up` shows each role (CUDA_VISIBLE_DEVICES): `actor`: "
        "actor i gets the i-th group of engine.tensor_parallel_size ids (round-robin); `learner`: the ids its "
        "ranks use, rank r the r-th (at least `learner_ranks` of them); `evaluator`: its engine's. A role not listed sees every GPU (all default to "
        "GPU 0); a machine without GPUs runs the same config unchanged.")
    metrics_port: int = Field(0, ge=0, description="Prometheus /metrics port (0 = off).")
    metrics_host: str = Field("127.0.0.1", description="Address the Prometheus endpoints bind (0.0.0.0 in a "
                              "container, so that its published port reaches them).")
    wandb: WandbConfig = Field(WandbConfig(), description="Optional Weights & Biases sink of the learner's and the "
                               "evaluator's metrics (beside JSONL, TensorBoard and Prometheus).")
    cpus: dict[Literal["actor", "learner", "buffer", "evaluator"], list[NonNegativeInt]] = Field(
        default_factory=dict, description="CPU cores `treepo up` pins a role to (taskset; its OpenMP/torch threads "
        "sized to them): `actor` for every actor, `learner` for all its ranks, `evaluator` (default: the actors' "
        "cores). Empty = no pinning. On a small box it keeps an inference engine's and the learner's thread pools from preempting "
        "each other (e.g. {actor: [0], learner: [1]} on 2 cores).")
    max_restarts: int = Field(5, ge=0, description="`treepo up` restarts a role that dies (the learner from its "
                              "checkpoint) at most this many times within `restart_window_s`; one more failure in "
                              "the window ends the run. 0 = never restart.")
    restart_window_s: float = Field(600.0, gt=0, description="The window `max_restarts` counts restarts in.")
    restart_backoff_s: float = Field(2.0, gt=0, description="Wait before a role's k-th restart in the window: "
                                     "restart_backoff_s * 2^(k-1), at most 60 s.")


class PipelineConfig(Section):
    """Every section of the pipeline. `run.schedule: sync` implies `buffer.max_staleness: 0`: the buffer
    then admits new prompts only for actors holding the learner's current weights."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    prompts: PromptsConfig = PromptsConfig()
    buffer: BufferConfig = BufferConfig()
    learner: LearnerConfig = LearnerConfig()
    weights: WeightsConfig = WeightsConfig()
    security: SecurityConfig = SecurityConfig()
    limits: LimitsConfig = LimitsConfig()
    replay: ReplayConfig = ReplayConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _sync_means_no_staleness(self):
        if self.run.schedule == "sync":
            self.buffer.max_staleness = 0
        return self

    @model_validator(mode="after")
    def _a_gpu_per_learner_rank(self):
        listed = self.run.gpus.get("learner", [])
        if listed and len(listed) < self.run.learner_ranks:
            raise ValueError(f"run.gpus.learner lists {len(listed)} GPU(s) for run.learner_ranks="
                             f"{self.run.learner_ranks}: each rank needs its own")
        actor_ids, tp = self.run.gpus.get("actor", []), self.engine.tensor_parallel_size
        if len(actor_ids) % tp:
            raise ValueError(f"run.gpus.actor lists {len(actor_ids)} GPU(s), not a multiple of "
                             f"engine.tensor_parallel_size={tp}")
        if any(not ids for ids in self.run.gpus.values()):
            raise ValueError("run.gpus: a role listed with no GPU id; leave the role out to show it every GPU")
        return self

    @model_validator(mode="after")
    def _replay_elsewhere(self):
        if self.replay.output_dir and Path(self.replay.output_dir).resolve() == Path(self.run.output_dir).resolve():
            raise ValueError("replay.output_dir is run.output_dir: offline training writes its own directory and "
                             "never into the run it reads")
        return self

    @model_validator(mode="after")
    def _sampled_rollouts(self):
        if self.rollout.temperature == 0:
            raise ValueError("rollout.temperature=0 is greedy decoding: every path of a prompt would be the same and "
                             "the learner has no sampling distribution to take log-probs under; use a temperature > 0")
        return self


def config_warnings(cfg: PipelineConfig, gpu: bool) -> list[str]:
    """Settings that run but defeat their purpose, each naming the fields (start-up and `--dry-run` print them)."""
    out = []
    if cfg.engine.kind == "vllm":
        block = vllm_block_size(cfg.engine, gpu)
        reach = cfg.prompts.max_prompt_tokens + cfg.rollout.segment_tokens
        if block > reach:
            out.append(f"engine.block_size={cfg.engine.block_size} runs {block}-token KV blocks, longer than "
                       f"prompts.max_prompt_tokens ({cfg.prompts.max_prompt_tokens}) + rollout.segment_tokens "
                       f"({cfg.rollout.segment_tokens}) = {reach}: prefix-cache hits come in whole blocks, so the "
                       f"prompt and first segment a tree's paths share are recomputed by every path")
    return out


class ConfigError(ValueError):
    """A config that cannot start the pipeline; the message names each bad field."""


def _env_overrides(environ: dict[str, str]) -> dict:
    out: dict = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        parts = key[len(ENV_PREFIX):].lower().split("__")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> PipelineConfig:
    """Defaults, then the YAML file (if any), then TREEPO_* environment variables; validated."""
    data: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    data = _deep_merge(data, _env_overrides(dict(os.environ if environ is None else environ)))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid config{f' {path}' if path else ''}:\n" + "\n".join(lines)) from None


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
