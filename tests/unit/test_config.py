import pytest

from protocol.config import ConfigError, PipelineConfig, load_config
from treepo.cli import main


def test_defaults_are_valid_and_documented():
    cfg = load_config()
    assert cfg.rollout.width == 16 and cfg.learner.clip_high == 0.28
    for section in PipelineConfig.model_fields.values():
        for name, field in section.annotation.model_fields.items():
            assert field.description, f"{section.annotation.__name__}.{name} has no description"


def test_yaml_then_env_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learner:\n  lr: 1.0e-5\nrollout:\n  width: 8\n")
    cfg = load_config(f, environ={"TREEPO_ROLLOUT__WIDTH": "4", "TREEPO_PROMPTS__DATASETS": "[chain_sum, countdown]"})
    assert cfg.learner.lr == 1e-5
    assert cfg.rollout.width == 4
    assert cfg.prompts.datasets == ["chain_sum", "countdown"]


@pytest.mark.parametrize("text,field", [
    ("learner:\n  lr: -1\n", "learner.lr"),
    ("rollout:\n  widht: 4\n", "rollout.widht"),
    ("engine:\n  kind: tensorrt\n", "engine.kind"),
    ("rollout:\n  width: 2\n  init_branching: 4\n", "rollout"),
    ("nonsense: {}\n", "nonsense"),
])
def test_errors_name_the_field(tmp_path, text, field):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, environ={})
    assert field in str(e.value)


def test_env_errors_name_the_field():
    with pytest.raises(ConfigError, match="buffer.max_staleness"):
        load_config(environ={"TREEPO_BUFFER__MAX_STALENESS": "many"})


def test_cli_dry_run_prints_resolved_config(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  run_id: demo\n")
    assert main(["config", "--dry-run", str(f)]) == 0
    out = capsys.readouterr().out
    assert "run_id: demo" in out and "clip_high: 0.28" in out


def test_cli_bad_config_exits_2_naming_field(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("learner:\n  zero_stage: 7\n")
    assert main(["config", str(f)]) == 2
    assert "learner.zero_stage" in capsys.readouterr().err


@pytest.mark.parametrize("block,gpu,want", [(0, False, 32), (0, True, 16), (64, False, 64), (128, True, 128)])
def test_vllm_block_size_defaults_to_the_platforms_smallest(block, gpu, want):
    from protocol.config.engine import EngineConfig, vllm_block_size

    assert vllm_block_size(EngineConfig(block_size=block), gpu) == want


def test_a_block_that_cannot_hit_is_reported_naming_the_fields(tmp_path, capsys):
    from protocol.config import config_warnings

    short = {"prompts": {"max_prompt_tokens": 64}, "rollout": {"segment_tokens": 8}}
    f = tmp_path / "c.yaml"
    f.write_text("engine:\n  block_size: 128\nprompts:\n  max_prompt_tokens: 64\nrollout:\n  segment_tokens: 8\n")
    (warning,) = config_warnings(load_config(f, environ={}), gpu=False)
    assert "engine.block_size=128" in warning and "prompts.max_prompt_tokens (64)" in warning
    assert "rollout.segment_tokens (8) = 72" in warning
    assert main(["config", str(f)]) == 0 and "engine.block_size=128" in capsys.readouterr().err
    assert config_warnings(PipelineConfig.model_validate(short), gpu=False) == []  # the default block: 32 <= 72
    transformers = PipelineConfig.model_validate({**short, "engine": {"kind": "transformers", "block_size": 128}})
    assert config_warnings(transformers, gpu=False) == []  # its cache is token-granular


def test_eager_mode_defaults_to_the_platform():
    from protocol.config.engine import EngineConfig, eager

    assert eager(EngineConfig(), gpu=False) and not eager(EngineConfig(), gpu=True)
    assert eager(EngineConfig(enforce_eager=True), gpu=True) and not eager(EngineConfig(enforce_eager=False), gpu=False)


def test_the_learner_trains_in_bf16_on_gpu_and_fp32_on_cpu_unless_told():
    import torch

    from learner.engine import training_dtype
    from protocol.config.learner import LearnerConfig

    assert training_dtype(LearnerConfig(), gpu=True) == torch.bfloat16
    assert training_dtype(LearnerConfig(), gpu=False) == torch.float32
    assert training_dtype(LearnerConfig(dtype="float32"), gpu=True) == torch.float32
