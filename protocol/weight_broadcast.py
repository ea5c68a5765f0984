"""The co-located weight path: the learner (rank 0) broadcasts each policy version to the actors on its own node
over a process group of their own, NCCL between GPUs (gloo on CPU), instead of streaming it over TCP.

The group is not torch.distributed's default one (the learner's DeepSpeed ranks own that): rank 0 hosts a
`TCPStore` at `weights.broadcast_address` (loopback by default: the path is for one node), and each co-located
actor joins with its `weights.broadcast_rank` (1..`weights.broadcast_actors`). One version on the wire, all
collectives rooted at rank 0:

    1. an int64 tensor [version, total_bytes, header_bytes]  (version -1: the learner closes the group)
    2. the encoded `WeightHeader` (protocol.codec) as header_bytes uint8   (the layout: protocol.weight_layout)
    3. the flat buffer, total_bytes uint8, on the group's device           (received straight into GPU memory)

A broadcast is collective, so every member receives every version, in order; the receiver hands over only the
newest. There is no CURVE on this path: it is meant for processes of one node (bind loopback). `BroadcastGroup`
is the only place that builds the group, so both ends agree on devices and the order of collectives.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

CLOSE = -1  # the version of the last message: the learner leaves the group


def parse_address(address: str) -> tuple[str, int]:
    """host:port of the group's TCPStore."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"weights.broadcast_address: expected host:port, got {address!r}")
    return host, int(port)


class BroadcastGroup:
    """Rank `rank` of a group of `size` processes rooted at rank 0 (the learner); `backend` nccl or gloo."""

    def __init__(self, address: str, rank: int, size: int, backend: str, timeout_s: float = 300.0):
        host, port = parse_address(address)
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=timeout)
        self.rank, self.size, self.backend = rank, size, backend
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.group = dist.ProcessGroupNCCL(self.store, rank, size)
        elif backend == "gloo":
            self.device = torch.device("cpu")
            self.group = dist.ProcessGroupGloo(self.store, rank, size, timeout)
        else:
            raise ValueError(f"weights.broadcast_backend: nccl or gloo, got {backend!r}")

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` into every member's `tensor` (same shape and dtype on every rank)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([tensor], opts).wait()

    def send_meta(self, version: int, total_bytes: int, header_bytes: int) -> None:
        self.broadcast(torch.tensor([version, total_bytes, header_bytes], dtype=torch.int64, device=self.device))

    def recv_meta(self) -> tuple[int, int, int]:
        meta = torch.zeros(3, dtype=torch.int64, device=self.device)
        self.broadcast(meta)
        version, total, header = meta.tolist()
        return version, total, header
