"""The learner's end of the co-located weight path: broadcast each policy version to the actors on its node over
a group of their own (`protocol/weight_broadcast.py`: NCCL between GPUs, gloo on CPU).

`publish` copies the state dict into a flat buffer on the group's device (GPU to GPU for NCCL: no host copy)
and returns; a background thread broadcasts the newest version published (a version published while the
previous broadcast runs replaces any still waiting: latest only, as the ZeroMQ push). Every member receives
each broadcast, so when one ends every co-located actor holds that version (`wait_delivered`). `close`
broadcasts the closing message, which ends the actors' receiving threads. The group forms when every actor
has joined: the constructor returns at once, and the thread waits for them (`weights.broadcast_actors`).
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from learner.weight_publisher import WeightPublisher, WeightPublisherError, WeightSendTimeout
from protocol.codec import encode
from protocol.config.weights import WeightsConfig
from protocol.messages import WeightHeader
from protocol.weight_broadcast import CLOSE, BroadcastGroup
from protocol.weight_layout import flatten_into, plan_layout

log = logging.getLogger(__name__)


class BroadcastWeightPublisher(WeightPublisher):
    def __init__(self, cfg: WeightsConfig, run_id: str = ""):
        self.cfg, self.run_id = cfg, run_id
        self.size = cfg.broadcast_actors + 1
        self._cond = threading.Condition()
        self._pending: tuple[int, bytes, torch.Tensor] | None = None
        self._published = -1
        self._delivered = -1
        self._closing = False
        self._error: BaseException | None = None
        self.group: BroadcastGroup | None = None
        self.bytes_sent = 0
        self._thread = threading.Thread(target=self._run, name="weight-broadcast", daemon=True)
        self._thread.start()

    def publish(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        self._raise_if_dead()
        with self._cond:
            while self.group is None and self._error is None:  # the device is the group's
                self._cond.wait()
        self._raise_if_dead()
        with self._cond:
            if version <= self._published:
                raise ValueError(f"version {version} is not newer than the published {self._published}")
            self._published = version
        metas, total = plan_layout(state_dict)
        header = encode(WeightHeader(run_id=self.run_id, version=version, tensors=metas, total_bytes=total,
                                     n_chunks=1 if total else 0))
        flat = torch.empty(total, dtype=torch.uint8, device=self.group.device)
        flatten_into(state_dict, metas, flat)
        with self._cond:
            self._pending = (version, header, flat)
            self._cond.notify_all()

    def wait_delivered(self, version: int, timeout_s: float, min_peers: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._delivered < version:
                self._raise_if_dead()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WeightSendTimeout(f"version {version} not broadcast within {timeout_s} s "
                                            f"(delivered: {self._delivered})")
                self._cond.wait(left)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._raise_if_dead()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise WeightPublisherError("the weight broadcast thread died") from self._error

    def _run(self) -> None:
        try:
            group = BroadcastGroup(self.cfg.broadcast_address, 0, self.size, self.cfg.broadcast_backend)
            with self._cond:
                self.group = group
                self._cond.notify_all()
            while True:
                with self._cond:
                    while self._pending is None and not self._closing:
                        self._cond.wait()
                    job, self._pending = self._pending, None
                if job is None:  # closing, nothing left to send
                    group.send_meta(CLOSE, 0, 0)
                    return
                version, header, flat = job
                group.send_meta(version, flat.numel(), len(header))
                group.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(group.device))
                if flat.numel():
                    group.broadcast(flat)
                with self._cond:
                    self._delivered = version
                    self.bytes_sent += flat.numel() * (self.size - 1)
                    self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()
            log.error("weight broadcast stopped: %r (raised again to the caller)", e)
