"""Process-group set-up for the DeepSpeed learner, on CPU (gloo) or GPU (nccl).

A process started without launcher variables becomes rank 0 of a world of 1 on a free loopback
port. On a machine without CUDA, `DS_ACCELERATOR=cpu` is set before DeepSpeed is imported. The
CPU communication op DeepSpeed JIT-builds on first use (45-60 s) is cached under
`TORCH_EXTENSIONS_DIR`, by default `<venv>/torch_extensions`, so it is built once per venv.
"""

from __future__ import annotations

import os
import socket
import sys

import torch


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


def exit_cleanly(code: int = 0) -> None:
    """End a multi-process run without the abort some ranks hit at interpreter exit (STACK.md)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
