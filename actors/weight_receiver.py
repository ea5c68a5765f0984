"""Actor side of the weight push: receive policy versions off the hot path, hand over only the newest.

A background thread owns a DEALER connected to the learner's weight ROUTER (protocol in
`learner/weight_push.py`): it says Hello, then builds each version's state dict as its chunks
arrive (acknowledging each chunk, which is the learner's credit to send the next; a chunk's payload
frame is validated against its WeightChunk and the WeightHeader first). A tensor that lies inside
one chunk is a view of that chunk's received ZeroMQ frame (no copy; the learner cuts chunks at
tensor boundaries, `protocol.weight_layout.plan_chunks`); a tensor spread over several chunks is
copied piece by piece into a buffer of its own. The tree sampler calls `poll_latest()` between two
tree steps: it returns the newest complete version not yet taken, or None, and never blocks. A version that arrives before the previous one was
taken replaces it (an actor applies only the newest). While idle the thread sends a Heartbeat with
the version it holds every `heartbeat_s` (this also rejoins a restarted learner); a transfer that
brings no chunk for `stall_timeout_s`, or a Shutdown from the learner, drops the partial version
and the actor asks again. A malformed or foreign message, or a refusal from the learner,
stops the thread; `poll_latest()` then raises `WeightReceiveError` with the cause chained.

Memory: the handed-over tensors view the received frames and the spread tensors' buffers; a frame
is freed when no tensor views it any more, and a spread tensor's buffer is refilled by a later
version only once nothing references it (its storage's use count says so). So the caller may keep
or apply the tensors as it likes; dropping them after applying lets the next versions reuse warm
memory instead of page-faulting fresh buffers.

Usage (in the actor loop):

    sub = ZmqWeightSubscriber(WeightsConfig(address="tcp://learner:5556"), actor_id="actor-0", security=sec)
    ...
    got = sub.poll_latest()
    if got is not None:
        version, state_dict = got   # apply (engine reload), then tag new segments with `version`
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import zmq

from protocol.codec import Limits, decode, encode
from protocol.config.transport import SecurityConfig
from protocol.config.weights import WeightsConfig
from protocol.errors import ProtocolError
from protocol.messages import Ack, ErrorMsg, Heartbeat, Hello, Shutdown, WeightChunk, WeightHeader
from protocol.security import secure_client
from protocol.weight_layout import TORCH_DTYPES, check_chunk, check_header, storage_users

log = logging.getLogger(__name__)


_SPARE_VERSIONS = 3  # versions whose spread-tensor buffers are kept for reuse: applied, newest, one spare


class WeightReceiveError(RuntimeError):
    """The receiving thread stopped on an error (cause chained): bad message, refusal, or a bug."""


class WeightSubscriber(ABC):
    """Receives policy versions in the background; the actor takes the newest between two tree steps."""

    @abstractmethod
    def poll_latest(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The newest complete version not yet taken, as (version, state_dict), or None; never blocks."""

    @abstractmethod
    def wait_new(self, timeout_s: float) -> bool:
        """Block until a version not yet taken is complete (True) or `timeout_s` passed (False)."""

    @abstractmethod
    def close(self) -> None:
        """Stop receiving and release the socket."""

    def __enter__(self) -> WeightSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZmqWeightSubscriber(WeightSubscriber):
    """DEALER-based receiver of `learner.weight_push.ZmqWeightPublisher`."""

    def __init__(self, cfg: WeightsConfig, actor_id: str, security: SecurityConfig | None = None,
                 have_version: int = -1, run_id: str = "", limits: Limits | None = None):
        self.cfg, self.actor_id, self.run_id = cfg, actor_id, run_id
        self.limits = limits or Limits()
        self.have = have_version
        self.versions_received: list[int] = []  # every version assembled, in order
        self.stale_chunks = 0  # chunks of an abandoned transfer, ignored
        self.bad_frames = 0  # frames that did not decode, dropped
        self.assemble_s = 0.0  # time to build the last version's state dict once its last chunk arrived
        self._lock = threading.Lock()
        self._latest: tuple[int, dict[str, torch.Tensor]] | None = None
        self._fresh = threading.Event()  # set while `_latest` holds a version, or the thread stopped on an error
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        secure_client(self._sock, security or SecurityConfig())
        self._sock.connect(cfg.address)
        self._header: WeightHeader | None = None
        self._assembly: _Assembly | None = None
        self._filled = 0
        self._next_index = 0
        self._last_sent = 0.0
        self._spare: list[torch.Tensor] = []  # spread-tensor buffers of completed versions, newest first
        self._lone_users = storage_users(torch.empty(1, dtype=torch.uint8))
        self._thread = threading.Thread(target=self._run, name=f"weight-receiver-{actor_id}", daemon=True)
        self._thread.start()

    def poll_latest(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        with self._lock:
            if self._error is not None:
                raise WeightReceiveError(f"{self.actor_id}: weight receiver stopped") from self._error
            got, self._latest = self._latest, None
            self._fresh.clear()
        return got

    def wait_new(self, timeout_s: float) -> bool:
        return self._fresh.wait(timeout_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._ctx.term()

    # --- background thread (sole user of the DEALER socket) ----------------------------------------
    def _run(self) -> None:
        try:
            self._receive()
        except BaseException as e:
            with self._lock:
                self._error = e
                self._fresh.set()  # wakes a waiter, whose next poll_latest() raises
            log.error("%s stopped: %r (raised again to the caller)", threading.current_thread().name, e)
        finally:
            self._sock.close()

    def _receive(self) -> None:
        self._send(Hello(sender=self.actor_id, role="actor", pid=os.getpid(), host=socket.gethostname(),
                         policy_version=self.have))
        last_recv = time.monotonic()
        tick_ms = int(min(self.cfg.heartbeat_s, self.cfg.stall_timeout_s) * 500)
        while not self._stop.is_set():
            if self._sock.poll(tick_ms):
                while self._sock.poll(0):
                    self._on_frames(self._sock.recv_multipart(copy=False))
                last_recv = time.monotonic()
            now = time.monotonic()
            if self._header is not None and now - last_recv > self.cfg.stall_timeout_s:
                self._reset()  # the learner went quiet mid-transfer: ask again
                self._send(Hello(sender=self.actor_id, role="actor", policy_version=self.have))
                last_recv = now
            elif self._header is None and now - self._last_sent > self.cfg.heartbeat_s:
                self._send(Heartbeat(sender=self.actor_id, policy_version=self.have, unix_time=time.time()))
        self._send(Shutdown(sender=self.actor_id, reason="closed"))

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        """One multipart message: a WeightChunk and its payload frame, or any other message alone. A frame that
        does not decode is counted, logged and dropped with any partial version (the stall timeout asks again)."""
        try:
            msg = decode(frames[0].buffer, self.limits)
        except ProtocolError as e:
            self.bad_frames += 1
            log.warning("weight receiver %s: dropped an undecodable frame (%s); partial version discarded",
                        self.actor_id, e)
            self._reset()
            return
        if isinstance(msg, WeightChunk):
            if len(frames) != 2:
                raise ProtocolError("malformed", f"a WeightChunk in {len(frames)} frame(s), not [chunk, payload]")
            self._on_chunk(msg, frames[1])
        elif len(frames) != 1:
            raise ProtocolError("malformed", f"a {type(msg).__name__} with {len(frames) - 1} extra frame(s)")
        else:
            self._on_message(msg)

    def _on_message(self, msg: object) -> None:
        if isinstance(msg, WeightHeader):
            check_header(msg)
            if self.run_id and msg.run_id != self.run_id:
                raise ProtocolError("run_id", f"weights of run {msg.run_id!r}, this actor is in run {self.run_id!r}")
            if msg.version <= self.have:
                raise ProtocolError("version", f"offered v{msg.version}, this actor already holds v{self.have}")
            self._header, self._filled, self._next_index = msg, 0, 0
            self._assembly = _Assembly(msg, self._buffer)
            if msg.n_chunks == 0:
                self._finish()
        elif isinstance(msg, Shutdown):  # the learner left, or forgot us: drop any partial version, rejoin
            self._reset()
            self._last_sent = 0.0
        elif isinstance(msg, ErrorMsg):
            raise ProtocolError(msg.code, f"the learner refused this actor: {msg.message}")
        else:
            raise ProtocolError("type", f"unexpected {type(msg).__name__} on the weight socket")

    def _on_chunk(self, chunk: WeightChunk, payload: zmq.Frame) -> None:
        header = self._header
        if header is None or chunk.version != header.version:
            self.stale_chunks += 1  # still in flight from a transfer this actor abandoned
            return
        check_chunk(header, chunk, len(payload), self._next_index, self._filled)
        end = chunk.offset + chunk.nbytes
        last = chunk.index == header.n_chunks - 1
        if not last:  # the credit goes back before the chunk is used, so the next one is already on its way
            self._send(Ack(key=f"{chunk.version}/{chunk.index}"))
        self._assembly.add(chunk.offset, payload)
        self._filled, self._next_index = end, self._next_index + 1
        if last:
            self._finish()  # the last credit says "assembled": the learner counts this actor as holding the version
            self._send(Ack(key=f"{chunk.version}/{chunk.index}"))

    def _finish(self) -> None:
        header, assembly, t0 = self._header, self._assembly, time.perf_counter()
        state_dict = assembly.state_dict()
        self.assemble_s = time.perf_counter() - t0
        with self._lock:
            self._latest = (header.version, state_dict)
            self._fresh.set()
        self.have = header.version
        self.versions_received.append(header.version)
        kept = _SPARE_VERSIONS * max(1, len(assembly.buffers))
        self._spare = (assembly.buffers + self._spare)[:kept]
        self._reset()

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A spread tensor's buffer of a version assembled earlier that nobody references any more (it was
        applied and dropped), else a new one: refilling warm memory avoids first-touch page faults, which
        cost as much as the copy itself (about 0.3 s per 270 MB on a small VM)."""
        for i, buf in enumerate(self._spare):
            if buf.numel() == nbytes and storage_users(buf) == self._lone_users:
                return self._spare.pop(i)
        return torch.empty(nbytes, dtype=torch.uint8)

    def _reset(self) -> None:
        """Forget the version being assembled (what was handed over stays alive in its state dict)."""
        self._header = None
        self._assembly = None

    def _send(self, msg: object) -> None:
        """Send without blocking; when the learner is unreachable so long that the queue is full, skip it:
        every message here is either repeated (Heartbeat, Hello) or moot once the learner is gone (Ack)."""
        self._last_sent = time.monotonic()
        try:
            self._sock.send(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            return


class _Assembly:
    """The tensors of one version, built from its chunks in order: views of a chunk's frame for the tensors
    inside it, a buffer of its own (from `buffer(nbytes)`) filled piece by piece for a tensor spread over
    several chunks."""

    def __init__(self, header: WeightHeader, buffer: Callable[[int], torch.Tensor]):
        self.header, self.buffer = header, buffer
        self.order = sorted((m for m in header.tensors if m.nbytes), key=lambda m: m.offset)
        self.tensors = {m.name: torch.empty(m.shape, dtype=TORCH_DTYPES[m.dtype]) for m in header.tensors
                        if not m.nbytes}
        self.buffers: list[torch.Tensor] = []  # the spread tensors' buffers
        self.next = 0  # index in `order` of the first tensor not complete
        self.spread: torch.Tensor | None = None  # buffer of that tensor, when it is spread and begun

    def add(self, offset: int, frame: zmq.Frame) -> None:
        """The chunk starting at byte `offset` (validated: the one due, its length inside the buffer)."""
        end = offset + len(frame)
        data = torch.frombuffer(frame.buffer, dtype=torch.uint8)  # views ZeroMQ's frame (keeps it alive)
        while self.next < len(self.order) and self.order[self.next].offset < end:
            m = self.order[self.next]
            stop = m.offset + m.nbytes
            if m.offset >= offset and stop <= end:  # inside this chunk: a view, no copy
                part = data[m.offset - offset:stop - offset]
            else:  # spread over chunks: copy this chunk's share into the tensor's own buffer
                if self.spread is None:
                    self.spread = self.buffer(m.nbytes)
                lo, hi = max(m.offset, offset), min(stop, end)
                self.spread.numpy()[lo - m.offset:hi - m.offset] = data.numpy()[lo - offset:hi - offset]
                if stop > end:
                    return  # continues in the next chunk
                part, self.spread = self.spread, None
                self.buffers.append(part)
            self.tensors[m.name] = part.view(TORCH_DTYPES[m.dtype]).view(m.shape)
            self.next += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, in the header's order (once the last chunk was added)."""
        if self.next != len(self.order):
            raise ProtocolError("malformed", f"weights v{self.header.version}: chunks ended inside the tensors")
        return {m.name: self.tensors[m.name] for m in self.header.tensors}
