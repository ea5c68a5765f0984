"""bench/learning.py: the statistics of TreePO against GRPO over seeds, on hand-worked numbers."""

import json
import math
from pathlib import Path

import pytest

from bench.learning import (
    Run,
    collect,
    crossing,
    geometric_interval,
    halfway,
    mean_by_key,
    mean_up_to,
    paired_ratios,
    report,
    run_order,
    variant_config,
)
from protocol.config.pipeline import load_config

T_2 = 4.303  # t_{0.975} with 2 degrees of freedom


def run(variant: str, seed: int, wall: list[float], accuracy: list[float], tokens: list[float] | None = None,
        initial: dict[str, float] | None = None, final: dict[str, float] | None = None) -> Run:
    points = [{"version": 2 * i, "wall_s": w, "generated_tokens": t, "accuracy": a}
              for i, (w, t, a) in enumerate(zip(wall, tokens or wall, accuracy, strict=True))]
    return Run(variant, seed, points, initial or {"p": accuracy[0]}, final or {"p": accuracy[-1]}, 0.0)


def test_crossing_interpolates_between_the_straddling_evaluations():
    assert crossing([0, 60, 120], [0.1, 0.2, 0.4], 0.3) == pytest.approx(90.0)
    assert crossing([0, 60, 120], [0.1, 0.2, 0.4], 0.4) == pytest.approx(120.0)
    # the first crossing counts, not a later one after a dip
    assert crossing([0, 10, 20, 30], [0.1, 0.5, 0.1, 0.5], 0.3) == pytest.approx(5.0)


def test_crossing_at_start_and_never():
    assert crossing([7, 60], [0.3, 0.4], 0.3) == 7
    assert crossing([0, 60, 120], [0.1, 0.2, 0.25], 0.3) is None


def test_geometric_interval_of_three_ratios():
    # ln ratios -ln2, 0, ln2: mean 0, sample std ln2, half width t * ln2 / sqrt(3)
    centre, low, high = geometric_interval([0.5, 1.0, 2.0])
    assert centre == pytest.approx(1.0)
    assert low == pytest.approx(2 ** (-T_2 / math.sqrt(3)))
    assert high == pytest.approx(2 ** (T_2 / math.sqrt(3)))
    assert high == pytest.approx(5.596, abs=1e-3)


def test_geometric_interval_with_one_ratio_or_none():
    assert geometric_interval([0.8]) == (pytest.approx(0.8), None, None)
    assert geometric_interval([]) == (None, None, None)


def test_mean_up_to_is_linear_between_points():
    # [0, 60]: 0.2 flat (area 12); [60, 90]: 0.2 -> 0.3 (area 7.5)
    assert mean_up_to([0, 60, 120], [0.2, 0.2, 0.4], 90) == pytest.approx(19.5 / 90)
    assert mean_up_to([0, 60, 120], [0.2, 0.2, 0.4], 120) == pytest.approx(30 / 120)
    with pytest.raises(ValueError):
        mean_up_to([0, 60], [0.2, 0.4], 61)


def test_paired_ratios_skip_seeds_with_a_missing_side():
    assert paired_ratios({0: 2.0, 1: None, 2: 3.0}, {0: 4.0, 1: 1.0, 2: None}) == [0.5]


def test_mean_by_key_over_the_keys_every_mapping_holds():
    assert mean_by_key([{"a": 0.5, "b": 1.0}, {"a": 0.25}]) == {"a": 0.375}


def test_run_order_interleaves_seeds_then_treerpo():
    assert run_order([0, 1], [0]) == [("treepo", 0), ("grpo", 0), ("treepo", 1), ("grpo", 1), ("treerpo", 0)]
    assert run_order([3], []) == [("treepo", 3), ("grpo", 3)]


def test_variant_config_pairs_seeds_and_keeps_the_prompts(tmp_path):
    base = load_config("configs/cpu-smollm2.yaml")
    cfgs = {v: variant_config(base, v, 1, tmp_path, 5.0, 2) for v in ("treepo", "grpo", "treerpo")}
    for name, cfg in cfgs.items():
        assert cfg.run.seed == 1 and cfg.run.output_dir == str(tmp_path / f"{name}-s1")
        assert cfg.prompts == base.prompts and cfg.eval.prompts == base.eval.prompts
        assert (cfg.eval.every_versions, cfg.eval.sampling, cfg.learner.max_minutes) == (2, "sequential", 5.0)
        assert cfg.buffer.ingest_address == cfg.weights.address == "tcp://127.0.0.1:0"
    assert (cfgs["grpo"].rollout.mode, cfgs["grpo"].learner.estimator) == ("independent", "grpo")
    assert (cfgs["treerpo"].rollout.treerpo_depth, cfgs["treerpo"].rollout.treerpo_max_tokens) == (3, 48)


def test_collect_reads_wall_time_tokens_and_problems(tmp_path: Path):
    def write(name: str, rows: list[dict]) -> None:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    # the learner waits from 90 s, the actor generates from 95 s (both up: 95 s); versions 1, 2 at 110 s, 130 s
    write("learner.jsonl", [{"step": 1, "time": 110.0, "iteration_s": 20.0, "policy_version": 1, "skipped": False},
                            {"step": 2, "time": 130.0, "iteration_s": 20.0, "policy_version": 2, "skipped": False}])
    write("actor-0.jsonl", [{"step": 1, "time": 105.0, "generate_s": 10.0, "generated_tokens": 40.0},
                            {"step": 2, "time": 120.0, "generate_s": 15.0, "generated_tokens": 60.0},
                            {"step": 3, "time": 140.0, "generate_s": 20.0, "generated_tokens": 80.0}])
    write("eval.jsonl", [{"step": 0, "time": 101.0, "all/mean@4": 0.25, "eval_overlap": 0},
                         {"step": 2, "time": 135.0, "all/mean@4": 0.5, "eval_overlap": 0}])
    write("eval_problems.jsonl", [{"step": 2, "time": 135.0, "k": 4, "sampling": "sequential",
                                   "accuracy": {"a": 0.5, "b": 0.5}},
                                  {"step": 0, "time": 101.0, "k": 4, "sampling": "sequential",
                                   "accuracy": {"a": 0.0, "b": 0.5}}])
    got = collect("treepo", 0, tmp_path, 4)
    assert got.points == [{"version": 0, "wall_s": 0.0, "generated_tokens": 0.0, "accuracy": 0.25},
                          {"version": 2, "wall_s": 35.0, "generated_tokens": 100.0, "accuracy": 0.5}]
    assert (got.initial_problems, got.final_problems) == ({"a": 0.0, "b": 0.5}, {"a": 0.5, "b": 0.5})


def test_halfway_between_initial_and_grpo_final():
    runs = [run("treepo", 0, [0, 60], [0.1, 0.6]), run("grpo", 0, [0, 60], [0.2, 0.5])]
    assert halfway(runs) == pytest.approx((0.15 + 0.5) / 2)


def test_report_of_one_paired_seed():
    problems = {"initial": {"a": 0.0, "b": 0.5}, "final": {"a": 0.5, "b": 0.5}}
    runs = [run("treepo", 0, [0, 60, 120], [0.1, 0.2, 0.4], tokens=[0, 600, 1200], **problems),
            run("grpo", 0, [0, 60, 180], [0.1, 0.2, 0.4], tokens=[0, 1000, 3000], **problems)]
    got = report(runs, [0], 0.3)
    # time to 0.3: treepo 90 s, grpo 120 s; tokens: treepo 900, grpo 2000
    assert got["treepo_over_grpo_time_to_threshold"] == pytest.approx(0.75)
    assert got["treepo_over_grpo_tokens_to_threshold"] == pytest.approx(0.45)
    assert got["treepo_over_grpo_time_to_threshold_ci_low"] is None
    # equal time 120 s: treepo (9 + 18) / 120, grpo (9 + 15) / 120
    assert got["equal_time_s"] == 120.0
    assert got["treepo_over_grpo_auc_at_equal_time"] == pytest.approx(27 / 24, abs=1e-4)
    assert got["treepo_heldout_gain"] == pytest.approx(0.25)
    assert (got["treepo_seeds_not_reaching"], got["grpo_seeds_not_reaching"]) == (0, 0)
    assert got["treerpo_final_accuracy"] is None and got["eval_problems"] == 2


def test_report_leaves_out_a_seed_that_never_reaches():
    runs = [run("treepo", 0, [0, 60], [0.1, 0.4]), run("grpo", 0, [0, 60], [0.1, 0.4]),
            run("treepo", 1, [0, 60], [0.1, 0.4]), run("grpo", 1, [0, 60], [0.1, 0.2])]
    got = report(runs, [0, 1], 0.3)
    assert (got["treepo_seeds_not_reaching"], got["grpo_seeds_not_reaching"]) == (0, 1)
    assert got["treepo_over_grpo_time_to_threshold"] == pytest.approx(1.0)
    assert got["treepo_over_grpo_time_to_threshold_ci_low"] is None
