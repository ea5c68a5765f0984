"""DeepSpeed ZeRO-2 with two CPU processes (gloo): the learner trains, and a fresh engine resumed from the
checkpoint reproduces the same losses, gradient norms, learning rates and weights as the run that went on.
The first step's loss and gradient norm equal those of one process on the same batch (the data-parallel
split and its normaliser give the same token-mean)."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration


def _batches(model) -> list[list]:
    from tests.fixtures.learner import tree_from_edges, with_policy_logprobs, worked_example_tree

    a = with_policy_logprobs(worked_example_tree(tree_id="a", seg_lens={n: 3 for n in range(1, 7)}), model)
    b = with_policy_logprobs(tree_from_edges({1: 0, 2: 0, 3: 1, 4: 1}, {2: 1.0, 3: -1.0, 4: 1.0}, tree_id="b",
                                             first_token=300), model)
    c = with_policy_logprobs(tree_from_edges({1: 0, 2: 0, 3: 0}, {1: -1.0, 2: 1.0, 3: -1.0}, tree_id="c",
                                             first_token=600, seg_lens={1: 5, 2: 1, 3: 4}), model)
    return [[a, b], [a, b], [b, c], [a, c]]


def _checksum(learner) -> float:
    return float(sum(v.double().abs().sum() for v in learner.cpu_state_dict().values()))


def _worker(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from learner.distributed import exit_cleanly
    from learner.engine import Learner
    from protocol.config.learner import LearnerConfig

    batches = _batches(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    cfg = LearnerConfig(zero_stage=2, lr=1e-3, warmup_steps=4, micro_batch_tokens=24)
    first = Learner(cfg, model_dir)
    before = [first.step(b) for b in batches[:2]]
    first.save_checkpoint(Path(out) / "ckpt")
    went_on = [first.step(b) for b in batches[2:]]
    resumed = Learner(cfg, model_dir)
    fresh_checksum = _checksum(resumed)
    resumed.load_checkpoint(Path(out) / "ckpt")
    restored = (resumed.step_count, resumed.policy_version)
    again = [resumed.step(b) for b in batches[2:]]
    # the learner loop's broadcast of rank 0's batch, an empty one included (all its trees set aside)
    from learner.distributed import collective_device
    from learner.loop import broadcast_trees

    sent = [batches[0], [], batches[2]]
    received = [[t.tree_id for t in broadcast_trees(b if rank == 0 else None, rank, 2)] for b in sent]
    steps = resumed.step_count
    empty = resumed.step([])
    result = {"before": before, "went_on": went_on, "again": again, "restored": restored,
              "received": received, "collective_device": str(collective_device()),
              "empty_step": [steps, resumed.step_count, empty["skipped"]],
              "fresh": fresh_checksum, "first_final": _checksum(first), "resumed_final": _checksum(resumed)}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    exit_cleanly(0)


def test_zero2_two_processes_train_and_resume(tiny_model_dir, tmp_path):
    from learner.distributed import free_port

    mp.start_processes(_worker, args=(free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["restored"] == [2, 2]
    assert r0["received"] == r1["received"] == [["a", "b"], [], ["b", "c"]]
    assert r0["collective_device"] == r1["collective_device"] == "cpu"  # gloo: the collectives ran on CPU tensors
    assert r0["empty_step"] == r1["empty_step"] == [4, 4, 1.0]  # an empty batch makes no step on any rank
    keys = ("loss", "grad_norm", "lr", "importance_weight", "trained_tokens", "policy_version")
    for went_on, again in zip(r0["went_on"], r0["again"], strict=True):
        for k in keys:
            assert again[k] == pytest.approx(went_on[k], rel=1e-6, abs=1e-9), k
    assert [m["lr"] for m in r0["before"] + r0["went_on"]] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert r0["resumed_final"] == pytest.approx(r0["first_final"], rel=1e-9)
    assert r0["first_final"] != pytest.approx(r0["fresh"], rel=1e-9)  # the weights did train
    # both ranks report the metrics of the whole batch and hold the same weights
    assert r0["went_on"][0]["loss"] == r1["went_on"][0]["loss"]
    assert r0["first_final"] == r1["first_final"]
    assert r0["before"][0]["trained_tokens"] == 4 * 6 + (2 + 4 + 4)  # tree a: 4 paths of 6; tree b: 2, 4, 4

    from transformers import AutoModelForCausalLM

    from learner.engine import Learner
    from protocol.config.learner import LearnerConfig

    single = Learner(LearnerConfig(lr=1e-3, warmup_steps=4, micro_batch_tokens=24), tiny_model_dir)
    one = single.step(_batches(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))[0])
    assert one["loss"] == pytest.approx(r0["before"][0]["loss"], abs=1e-6)  # ~0: whitened advantages, ratio 1
    assert one["grad_norm"] == pytest.approx(r0["before"][0]["grad_norm"], rel=1e-5)
