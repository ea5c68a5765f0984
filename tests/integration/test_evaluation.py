"""Held-out evaluation on the tiny model: `treepo eval` with sequential and tree sampling reports accuracy,
maj@k, pass@k (tree: leaf_accuracy, any_correct, leaf_majority) with 95% intervals and the engine's work;
eval prompts whose problem is a training problem are left out."""

import json

import pytest
import yaml

from actors.evaluate import held_out
from protocol.config.pipeline import load_config
from treepo.cli import main
from treepo.prompts import raw_rows

pytestmark = pytest.mark.integration


def _config(tmp_path, tiny_model_dir, **eval_prompts) -> str:
    prompts = {"source": "reasoning_gym", "datasets": ["basic_arithmetic"], "system_prompt": "", "max_prompt_tokens": 64}
    cfg = {"run": {"output_dir": str(tmp_path / "run")}, "model": {"source": "path", "path": str(tiny_model_dir)},
           "engine": {"kind": "transformers", "max_model_len": 512},
           "rollout": {"segment_tokens": 8, "max_depth": 3, "width": 4, "prompts_per_step": 4,
                       "fallback_candidates": "random_all"},
           "reward": {"kind": "callable", "function": "actors.toy_tasks:lowercase_fraction"},
           "prompts": {**prompts, "size": 20, "seed": 0},
           "eval": {"prompts": {**prompts, **eval_prompts}, "k": 4}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("sampling", ["sequential", "tree"])
def test_treepo_eval_reports_accuracy_and_sampling_cost(tiny_model_dir, tmp_path, capsys, sampling):
    path = _config(tmp_path, tiny_model_dir, size=6, seed=1_000_000)
    assert main(["eval", "--config", path, "--model", str(tiny_model_dir), "--sampling", sampling, "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["all/prompts"] == m["basic_arithmetic/prompts"] == m["eval_problems"] == 6.0
    assert m["overlap_dropped"] == m["eval_overlap"] == m["duplicates_dropped"] == 0.0
    accuracy, any_correct = ("all/mean@4", "all/pass@4") if sampling == "sequential" else ("all/leaf_accuracy",
                                                                                        "all/any_correct")
    assert m["policy_version"] == 0.0 and 0.0 <= m[accuracy] <= m[any_correct] <= 1.0
    assert m[f"{accuracy}_ci_low"] <= m[accuracy] <= m[f"{accuracy}_ci_high"]
    assert 0.0 < m["all/response_tokens"] <= 24 and m["wall_s"] > 0
    # every sample's tokens were generated, and the engine's work is counted
    assert m["engine/generated_tokens"] >= 6 * 4 * m["all/response_tokens"] * (0.99 if sampling == "sequential" else 0.5)
    assert m["engine/continued_tokens"] == m["engine/discarded_tokens"] == 0  # transformers: nothing outlives a call
    assert main(["eval", "--config", path, "--model", str(tiny_model_dir), "--sampling", sampling, "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "held-out: 6 problems" in out
    assert f"2 {sampling} samples each: {'mean@2' if sampling == 'sequential' else 'leaf_accuracy'} " in out


def test_eval_prompts_that_are_training_prompts_are_left_out(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # reasoning-gym's item i of seed s is item s + i of seed 0: seed 15 repeats training items 15..19
    cfg = load_config(_config(tmp_path, tiny_model_dir, size=8, seed=15))
    training = raw_rows(cfg.prompts)
    kept, counts = held_out(cfg, training, tokenizer)
    assert len(kept) == 3 and counts == {"eval_problems": 3, "eval_overlap": 0, "overlap_dropped": 5,
                                         "duplicates_dropped": 0}
    assert not {r["key"] for r in training} & {item.problem_key for item in kept}
    # kept when asked (memorisation): the overlap is counted instead
    keep = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"exclude_training": False})})
    kept, counts = held_out(keep, training, tokenizer)
    assert len(kept) == 8 and counts["eval_overlap"] == 5 and counts["overlap_dropped"] == 0
    # nothing held out at all: a clear error naming the section, exit 2
    assert main(["eval", "--config", _config(tmp_path, tiny_model_dir, size=5, seed=2), "--model",
                 str(tiny_model_dir)]) == 2
    assert "eval.prompts: no held-out prompt left" in capsys.readouterr().err


def test_treepo_eval_takes_a_learner_checkpoint_with_its_policy_version(tiny_model_dir, tmp_path, capsys):
    """A checkpoint (the checkpoints directory: its latest; or one step) is evaluated as the weights it holds: its
    export equals the learner's weights, and the metrics carry its policy version (a run's export, too)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from learner.engine import Learner
    from protocol.config.learner import LearnerConfig
    from tests.fixtures.learner import with_policy_logprobs, worked_example_tree
    from treepo.checkpoint_export import checkpoint_step_dir, export_checkpoint

    learner = Learner(LearnerConfig(lr=1e-2, warmup_steps=0, micro_batch_tokens=64), tiny_model_dir)
    learner.step([with_policy_logprobs(worked_example_tree(), AutoModelForCausalLM.from_pretrained(tiny_model_dir))])
    learner.save_checkpoint(tmp_path / "checkpoints")
    learner.export(tmp_path / "export")
    step_dir = checkpoint_step_dir(tmp_path / "checkpoints")
    assert step_dir == tmp_path / "checkpoints" / "step1" and checkpoint_step_dir(tiny_model_dir) is None
    exported = load_file(export_checkpoint(step_dir, tiny_model_dir, tmp_path / "hf") / "model.safetensors")
    trained = learner.cpu_state_dict()
    assert not torch.equal(trained["model.norm.weight"], load_file(tiny_model_dir / "model.safetensors")["model.norm.weight"])
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert json.loads((tmp_path / "hf" / "policy.json").read_text()) == {"step": 1, "policy_version": 1}

    path = _config(tmp_path, tiny_model_dir, size=4, seed=1_000_000)
    for model in (tmp_path / "checkpoints", step_dir, tmp_path / "export"):
        assert main(["eval", "--config", path, "--model", str(model), "-k", "2", "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["policy_version"] == 1.0
    assert main(["eval", "--config", path, "--model", str(tmp_path)]) == 2
    assert "neither a Hugging Face model directory" in capsys.readouterr().err
