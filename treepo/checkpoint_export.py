"""A learner checkpoint (DeepSpeed, any ZeRO stage) as a Hugging Face model directory, so that any saved step
can be evaluated (`treepo eval --model <run>/checkpoints[/stepN]`) and served, not only the run's final export.

A checkpoint directory is `<run>/checkpoints/stepN` (DeepSpeed's tag directory: rank 0's model states file
holds the module weights under ZeRO 0-2, and the learner's client state: step, policy version); the
`checkpoints` directory itself stands for the tag its `latest` file names. Under ZeRO-3 the weights are
gathered from the partitioned optimizer files by DeepSpeed's `zero_to_fp32`. The model's config and
tokenizer come from the run's base model; `policy.json` records the step and policy version, as the
learner's own export does.
"""

from __future__ import annotations

import json
from pathlib import Path

# rank 0's model states (and the client state): ZeRO 0-2 name it the first way, ZeRO-3 the second
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _model_states(step_dir: Path) -> Path | None:
    return next((step_dir / name for name in MODEL_STATES if (step_dir / name).exists()), None)


def checkpoint_step_dir(path: Path) -> Path | None:
    """`path` when it is one checkpoint, the checkpoint its `latest` file names when it is a checkpoints
    directory, else None (e.g. a Hugging Face model directory)."""
    if _model_states(path):
        return path
    if (path / "latest").exists():
        step = path / (path / "latest").read_text().strip()
        return step if _model_states(step) else None
    return None


def export_checkpoint(step_dir: Path, base_model: Path, out: Path) -> Path:
    """Write the weights of checkpoint `step_dir` as a HF model directory `out` (config and tokenizer from
    `base_model`, plus `policy.json`); returns `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # the learner's own file, on local disk: DeepSpeed pickles its client state beside the weights
    states = torch.load(_model_states(step_dir), map_location="cpu", weights_only=False)
    if states["ds_config"].get("zero_optimization", {}).get("stage", 0) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    else:
        weights = states["module"]
    config = AutoConfig.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(weights.values())).dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{step_dir} does not match {base_model}: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out)
    write_policy(out, int(states["step"]), int(states["policy_version"]))
    return out


def write_policy(model_dir: Path, step: int, version: int) -> None:
    """`policy.json`: the training step and policy version of the weights in a model directory."""
    (model_dir / "policy.json").write_text(json.dumps({"step": step, "policy_version": version}))


def policy_version(model_dir: Path) -> int:
    """The policy version a model directory holds (its `policy.json`), 0 for a base model."""
    path = model_dir / "policy.json"
    return int(json.loads(path.read_text())["policy_version"]) if path.exists() else 0
