"""`treepo up`'s children: optional CPU pinning per role (what bench/pipeline.py uses)."""

import os
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from protocol.config.pipeline import PipelineConfig
from treepo.up import Child, start_children, with_gpus

PRINT_PINS = "import os; print(sorted(os.sched_getaffinity(0)), os.environ.get('OMP_NUM_THREADS'))"


def run_child(tmp_path: Path, cpus: list[int] | None) -> str:
    child = Child("probe", [sys.executable, "-c", PRINT_PINS], tmp_path, dict(os.environ, OMP_NUM_THREADS="7"), cpus)
    assert child.proc.wait(timeout=60) == 0
    assert child.stop(timeout_s=5) == 0
    return (tmp_path / "probe.log").read_text().strip()


def test_a_pinned_child_runs_on_its_cores_with_that_many_threads(tmp_path):
    last = max(os.sched_getaffinity(0))
    assert run_child(tmp_path, [last]) == f"[{last}] 1"


def test_an_unpinned_child_keeps_the_parents_cores_and_environment(tmp_path):
    assert run_child(tmp_path, None) == f"{sorted(os.sched_getaffinity(0))} 7"


def test_start_children_pins_each_role_as_asked(tmp_path):
    cfg = PipelineConfig.model_validate({"run": {"actors": 2}})
    # a missing config file: every role exits at once; only how each was started matters here
    children = start_children(cfg, tmp_path / "missing.yaml", tmp_path, {"actor": [0], "learner": [1]})
    try:
        assert sorted(children) == ["actor-0", "actor-1", "buffer", "learner"]
        assert children["actor-0"].proc.args[:3] == ["taskset", "-c", "0"]
        assert children["actor-1"].proc.args[:3] == ["taskset", "-c", "0"]
        assert children["learner"].proc.args[:3] == ["taskset", "-c", "1"]
        assert children["buffer"].proc.args[:4] == [sys.executable, "-m", "treepo.cli", "buffer"]
    finally:
        for child in children.values():
            child.stop(timeout_s=30)


def test_run_cpus_and_gpus_place_each_role(tmp_path):
    cfg = PipelineConfig.model_validate({"run": {"actors": 3, "learner_ranks": 2, "cpus": {"actor": [0]},
                                                 "gpus": {"actor": [0, 1], "learner": [2, 3], "evaluator": [1]}},
                                         "eval": {"every_versions": 5}})
    children = start_children(cfg, tmp_path / "missing.yaml", tmp_path)  # run.cpus when not given
    try:
        shown = {name: child.env.get("CUDA_VISIBLE_DEVICES") for name, child in children.items()}
        assert shown == {"buffer": None, "actor-0": "0", "actor-1": "1", "actor-2": "0", "learner": "2,3",
                         "evaluator": "1"}
        assert children["actor-2"].proc.args[:3] == ["taskset", "-c", "0"]
        assert children["learner"].proc.args[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    finally:
        for child in children.values():
            child.stop(timeout_s=30)


def test_gpu_lists_are_checked_at_start_up():
    with pytest.raises(ValidationError, match="run.gpus.learner lists 1 GPU"):
        PipelineConfig.model_validate({"run": {"learner_ranks": 2, "gpus": {"learner": [0]}}})
    with pytest.raises(ValidationError, match="no GPU id"):
        PipelineConfig.model_validate({"run": {"gpus": {"actor": []}}})


def test_tensor_parallel_actors_take_groups_of_gpus():
    cfg = PipelineConfig.model_validate({"run": {"gpus": {"actor": [0, 1, 2, 3]}}, "engine": {"tensor_parallel_size": 2}})
    assert [with_gpus({}, cfg, "actor", i)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0,1", "2,3", "0,1"]
    with pytest.raises(ValidationError, match="not a multiple of engine.tensor_parallel_size=2"):
        PipelineConfig.model_validate({"run": {"gpus": {"actor": [0, 1, 2]}}, "engine": {"tensor_parallel_size": 2}})
