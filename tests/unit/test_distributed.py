"""The learner's process group: collectives put their tensors where the backend takes them (nccl only CUDA
tensors, the rank's own GPU; gloo CPU tensors: a multi-GPU learner's first broadcast would fail otherwise),
and a learner across machines is one torchrun rendezvous per node."""

import sys

import pytest
import torch

from learner.distributed import collective_device, device_for_backend, node_command
from protocol.config import ConfigError


def test_nccl_uses_the_ranks_gpu_and_gloo_the_cpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device_for_backend("nccl") == torch.device("cuda", 3)
    assert device_for_backend("gloo") == torch.device("cpu")


def test_without_a_process_group_collectives_stay_on_cpu():
    assert collective_device() == torch.device("cpu")


def test_each_node_starts_its_share_of_the_ranks_at_the_master():
    assert node_command("c.yaml", 16, 2, 1, "10.0.0.7", 29600) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8",
        "--master-addr", "10.0.0.7", "--master-port", "29600", "-m", "treepo.cli", "learner", "--config", "c.yaml"]


@pytest.mark.parametrize(("ranks", "nnodes", "node_rank", "addr", "match"), [
    (16, 2, 0, "", "--master-addr"), (6, 4, 0, "h", "does not split evenly"), (4, 2, 2, "h", "--node-rank 2")])
def test_a_bad_multi_node_launch_is_refused(ranks, nnodes, node_rank, addr, match):
    with pytest.raises(ConfigError, match=match):
        node_command(None, ranks, nnodes, node_rank, addr, 29500)


def test_one_node_with_several_ranks_is_a_standalone_torchrun():
    assert node_command(None, 8, 1, 0, "", 29500) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8", "-m", "treepo.cli",
        "learner"]
