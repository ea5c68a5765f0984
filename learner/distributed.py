"""Process-group set-up for the DeepSpeed learner, on CPU (gloo) or GPU (nccl).

A process started without launcher variables becomes rank 0 of a world of 1 on a free loopback
port. A learner across machines is one torchrun per node (`node_command`, `treepo learner --nnodes`).
On a machine without CUDA, `DS_ACCELERATOR=cpu` is set before DeepSpeed is imported. The CPU
communication op DeepSpeed JIT-builds on first use (1-3 min on 2 cores) is cached under
`TORCH_EXTENSIONS_DIR`, by default `<venv>/torch_extensions`: `make setup` builds it there, so no run pays for it.
"""

from __future__ import annotations

import os
import socket
import sys

import torch

from protocol.config import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> tuple[int, int]:
    """Initialise the default process group once; return (rank, world size)."""
    import torch.distributed as dist

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def node_command(config: str | None, learner_ranks: int, nnodes: int, node_rank: int, master_addr: str,
                 master_port: int) -> list[str]:
    """The torchrun command that starts this node's share of a learner spanning `nnodes` machines (rendezvous at
    node 0's `master_addr:master_port`); each node runs learner_ranks / nnodes ranks. One node: `--standalone`."""
    learner = ["-m", "treepo.cli", "learner", *(["--config", config] if config else [])]
    if nnodes == 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(learner_ranks),
                *learner]
    if not master_addr:
        raise ConfigError("treepo learner --nnodes > 1 needs --master-addr (the address of node rank 0)")
    if learner_ranks % nnodes:
        raise ConfigError(f"run.learner_ranks={learner_ranks} does not split evenly over --nnodes {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} is not in [0, {nnodes})")
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--nproc-per-node", str(learner_ranks // nnodes), "--master-addr", master_addr,
            "--master-port", str(master_port), *learner]


def device_for_backend(backend: str) -> torch.device:
    """Where a collective's tensors must live for a process-group backend: nccl takes only CUDA tensors (this
    rank's GPU, `LOCAL_RANK`); gloo takes CPU tensors."""
    if backend == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def collective_device() -> torch.device:
    """`device_for_backend` of the default process group (CPU when there is none)."""
    import torch.distributed as dist

    return device_for_backend(dist.get_backend() if dist.is_initialized() else "gloo")


def exit_cleanly(code: int = 0) -> None:
    """End a multi-process run without the abort some ranks hit at interpreter exit (STACK.md)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
