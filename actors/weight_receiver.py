"""Actor side of the weight push: receive policy versions off the hot path, hand over only the newest, and
relay them to the actors the learner routes here.

A background thread owns a DEALER connected to the learner's weight server (protocol in
`protocol/weight_stream.py`, routing in `learner/weight_push.py`): it says Hello (with the address of its
relay, `actors/weight_relay.py`, unless `weights.relay` is off), and the learner either streams versions to
it or sends a `WeightRoute` naming the relay to take them from; the thread then connects a second DEALER
there and speaks the same protocol with it, while it keeps telling the learner what it holds (Heartbeat
every `heartbeat_s`, and once per version received). A route with no address switches back to the learner.

It builds each version's state dict as its chunks arrive, acknowledging each chunk (the sender's credit to
send the next). Each chunk's payload frame is validated against its WeightChunk and the WeightHeader, and
its digest checked (`protocol.weight_layout.chunk_digest`): a mismatch is counted (`bad_digests`), logged,
and the partial version dropped and fetched again, from the learner or, when a relay sent it, from wherever
the learner routes this actor instead (`Hello(avoid=<relay>)`). A checked chunk is forwarded to this actor's
own relay at once. A tensor that lies inside one chunk is a view of that chunk's received ZeroMQ frame (no
copy; chunks are cut at tensor boundaries, `protocol.weight_layout.plan_chunks`); a tensor spread over
several chunks is copied piece by piece into a buffer of its own. The tree sampler calls `poll_latest()`
between two tree steps: it returns the newest complete version not yet taken, or None, and never blocks. A
version that arrives before the previous one was taken replaces it (an actor applies only the newest).

While idle the thread heartbeats its source. A transfer that brings no chunk for `stall_timeout_s` is dropped
and the actor asks again (Hello); a Shutdown from the source (it left, or forgot this actor) drops any partial
version and the actor rejoins at once by Heartbeat (see `protocol/weight_stream.py` on why not Hello). A malformed or foreign
message, or a refusal from the learner, stops the thread; `poll_latest()` then raises `WeightReceiveError`
with the cause chained.

Memory: the handed-over tensors view the received frames and the spread tensors' buffers; a frame
is freed when no tensor views it any more (and the relay no longer serves it), and a spread tensor's buffer
is refilled by a later version only once nothing references it (its storage's use count says so). So the
caller may keep or apply the tensors as it likes; dropping them after applying lets the next versions reuse
warm memory instead of page-faulting fresh buffers.

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

from actors.weight_relay import WeightRelay
from protocol.codec import Limits, decode, encode
from protocol.config.transport import SecurityConfig
from protocol.config.weights import WeightsConfig
from protocol.errors import ProtocolError
from protocol.messages import (
    Ack,
    ErrorMsg,
    Heartbeat,
    Hello,
    Shutdown,
    WeightChunk,
    WeightHeader,
    WeightRoute,
)
from protocol.security import is_enabled, secure_client, stop_authenticator
from protocol.weight_layout import TORCH_DTYPES, check_chunk, check_header, chunk_digest, storage_users

log = logging.getLogger(__name__)


_SPARE_VERSIONS = 3  # versions whose spread-tensor buffers are kept for reuse: applied, newest, one spare


class WeightReceiveError(RuntimeError):
    """The receiving thread stopped on an error (cause chained): bad message, refusal, or a bug."""


class WeightSubscriber(ABC):
    """Receives policy versions in the background; the actor takes the newest between two tree steps.

    A subclass's receiving thread calls `_hand_over` with each complete version and `_stopped` with the error
    that ended it; the base keeps only the newest version not yet taken."""

    def __init__(self, actor_id: str):
        self.actor_id = actor_id
        self._lock = threading.Lock()
        self._latest: tuple[int, dict[str, torch.Tensor]] | None = None
        self._fresh = threading.Event()  # set while `_latest` holds a version, or the thread stopped on an error
        self._error: BaseException | None = None

    def poll_latest(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The newest complete version not yet taken, as (version, state_dict), or None; never blocks. Raises
        WeightReceiveError (cause chained) once the receiving thread stopped on an error."""
        with self._lock:
            if self._error is not None:
                raise WeightReceiveError(f"{self.actor_id}: weight receiver stopped") from self._error
            got, self._latest = self._latest, None
            self._fresh.clear()
        return got

    def wait_new(self, timeout_s: float) -> bool:
        """Block until a version not yet taken is complete (True) or `timeout_s` passed (False)."""
        return self._fresh.wait(timeout_s)

    @abstractmethod
    def close(self) -> None:
        """Stop receiving and release the transport."""

    def _hand_over(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        with self._lock:
            self._latest = (version, state_dict)
            self._fresh.set()

    def _stopped(self, error: BaseException) -> None:
        with self._lock:
            self._error = error
            self._fresh.set()  # wakes a waiter, whose next poll_latest() raises
        log.error("%s stopped: %r (raised again to the caller)", threading.current_thread().name, error)

    def metrics(self) -> dict[str, float]:
        """Figures of the transport for the actor's metrics (none by default)."""
        return {}

    def __enter__(self) -> WeightSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZmqWeightSubscriber(WeightSubscriber):
    """DEALER-based receiver of the learner's weight server or of a relay it routes this actor to."""

    def __init__(self, cfg: WeightsConfig, actor_id: str, security: SecurityConfig | None = None,
                 have_version: int = -1, run_id: str = "", limits: Limits | None = None, relay: bool | None = None):
        """`relay`: serve received versions to other actors (default `cfg.relay`)."""
        super().__init__(actor_id)
        self.cfg, self.run_id = cfg, run_id
        self.security = security or SecurityConfig()
        self.limits = limits or Limits()
        self.have = have_version
        self.versions_received: list[int] = []  # every version assembled, in order
        self.stale_chunks = 0  # chunks of an abandoned transfer, or from a source this actor left, ignored
        self.bad_frames = 0  # frames that did not decode, dropped
        self.bad_digests = 0  # chunks whose payload did not match their digest: the version was fetched again
        self.assemble_s = 0.0  # time to build the last version's state dict once its last chunk arrived
        self.parent = ""  # the relay feeding this actor ('' = the learner)
        self._stop = threading.Event()
        self._ctx = zmq.Context(io_threads=1)
        self._learner = self._dealer(cfg.address, self.security)
        self._source = self._learner  # where versions come from: the learner, or a relay
        use_relay = cfg.relay if relay is None else relay
        if use_relay and is_enabled(self.security) and not self.security.authorized_keys:
            log.warning("weight receiver %s: CURVE is on but security.authorized_keys is empty, so no actor could "
                        "connect to a relay here: this actor does not relay (list the actors' keys to let it)", actor_id)
            use_relay = False
        self.relay = WeightRelay(self._ctx, cfg, actor_id, self.security, self.limits) if use_relay else None
        self._header: WeightHeader | None = None
        self._assembly: _Assembly | None = None
        self._filled = 0
        self._next_index = 0
        self._last_sent = 0.0  # to the source
        self._last_told = 0.0  # to the learner, while a relay is the source
        self._spare: list[torch.Tensor] = []  # spread-tensor buffers of completed versions, newest first
        self._lone_users = storage_users(torch.empty(1, dtype=torch.uint8))
        self._thread = threading.Thread(target=self._run, name=f"weight-receiver-{actor_id}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        stop_authenticator(self._ctx)  # the relay's CURVE server started one
        self._ctx.term()

    def metrics(self) -> dict[str, float]:
        return {"weight_bad_digests": float(self.bad_digests), "weight_via_relay": float(bool(self.parent))}

    # --- background thread (sole user of the sockets) ----------------------------------------------
    def _dealer(self, address: str, security: SecurityConfig) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        secure_client(sock, security)
        sock.connect(address)
        return sock

    def _run(self) -> None:
        try:
            self._receive()
        except BaseException as e:
            self._stopped(e)
        finally:
            if self.relay is not None:
                self.relay.close()
            if self._source is not self._learner:
                self._source.close()
            self._learner.close()

    def _hello(self, sock: zmq.Socket, avoid: str = "") -> None:
        self._send(sock, Hello(sender=self.actor_id, role="actor", pid=os.getpid(), host=socket.gethostname(),
                               policy_version=self.have, relay_address=self.relay.address if self.relay else "",
                               relay_key=self.relay.key if self.relay else "", avoid=avoid))

    def _receive(self) -> None:
        self._hello(self._learner)
        last_recv = time.monotonic()
        tick_ms = int(min(self.cfg.heartbeat_s, self.cfg.stall_timeout_s) * 500)
        poller = zmq.Poller()
        poller.register(self._learner, zmq.POLLIN)
        if self.relay is not None:
            poller.register(self.relay.socket, zmq.POLLIN)
            tick_ms = min(tick_ms, int(self.relay.server.tick_s() * 1000))
        while not self._stop.is_set():
            source = self._source
            for sock in dict(poller.sockets):  # a relay this actor was routed away from
                if sock is not self._learner and sock is not source and (self.relay is None
                                                                          or sock is not self.relay.socket):
                    poller.unregister(sock)
                    sock.close()
            if source not in dict(poller.sockets):
                poller.register(source, zmq.POLLIN)
            events = dict(poller.poll(tick_ms))
            if self.relay is not None and self.relay.socket in events:
                self.relay.on_readable()
            for sock in dict.fromkeys((self._learner, source)):
                if sock in events:
                    while sock.poll(0) and self._source is source:
                        self._on_frames(sock, sock.recv_multipart(copy=False))
                    if sock is source:
                        last_recv = time.monotonic()
            if self.relay is not None:
                self.relay.service()
            now = time.monotonic()
            if self._header is not None and now - last_recv > self.cfg.stall_timeout_s:
                self._reset(abandon=True)  # the source went quiet mid-transfer: ask again
                self._hello(self._source)
                last_recv = now
            elif self._header is None and now - self._last_sent > self.cfg.heartbeat_s:
                self._heartbeat(self._source)
            if self._source is not self._learner and now - self._last_told > self.cfg.heartbeat_s:
                self._tell_learner()
        self._send(self._learner, Shutdown(sender=self.actor_id, reason="closed"))
        if self._source is not self._learner:
            self._send(self._source, Shutdown(sender=self.actor_id, reason="closed"))

    def _heartbeat(self, sock: zmq.Socket, counts: bool = True) -> None:
        self._send(sock, Heartbeat(sender=self.actor_id, policy_version=self.have, unix_time=time.time(),
                                   relay_address=self.relay.address if self.relay else "",
                                   relay_key=self.relay.key if self.relay else ""), counts=counts)

    def _tell_learner(self) -> None:
        """While a relay feeds this actor, the learner still learns what it holds."""
        self._last_told = time.monotonic()
        self._heartbeat(self._learner, counts=False)

    def _on_frames(self, sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        """One multipart message: a WeightChunk and its payload frame, or any other message alone. A frame that
        does not decode is counted, logged and dropped with any partial version (the stall timeout asks again)."""
        try:
            msg = decode(frames[0].buffer, self.limits)
        except ProtocolError as e:
            self.bad_frames += 1
            log.warning("weight receiver %s: dropped an undecodable frame (%s); partial version discarded",
                        self.actor_id, e)
            self._reset(abandon=True)
            return
        if isinstance(msg, WeightChunk):
            if len(frames) != 2:
                raise ProtocolError("malformed", f"a WeightChunk in {len(frames)} frame(s), not [chunk, payload]")
            if sock is self._source:
                self._on_chunk(msg, frames)
            else:
                self.stale_chunks += 1  # the learner's stream, after a route to a relay
        elif len(frames) != 1:
            raise ProtocolError("malformed", f"a {type(msg).__name__} with {len(frames) - 1} extra frame(s)")
        elif isinstance(msg, WeightRoute) and sock is self._learner:
            self._on_route(msg)
        elif isinstance(msg, ErrorMsg) and sock is self._learner:
            raise ProtocolError(msg.code, f"the learner refused this actor: {msg.message}")
        elif isinstance(msg, ErrorMsg):
            log.warning("weight receiver %s: relay %s refused this actor (%s: %s); asking the learner for another "
                        "route", self.actor_id, self.parent, msg.code, msg.message)
            self._reset(abandon=True)
            self._hello(self._learner, avoid=self.parent)
        elif isinstance(msg, Shutdown):  # the sender left, or forgot us: drop a partial version from it, rejoin
            if sock is self._source:  # (by Heartbeat, at once: see protocol/weight_stream.py on Hello)
                self._reset(abandon=True)
                self._last_sent = 0.0
            if sock is self._learner:
                self._last_told = 0.0
        elif isinstance(msg, WeightHeader) and sock is self._source:
            self._on_header(msg, frames[0])
        elif isinstance(msg, WeightHeader):
            self.stale_chunks += 1  # the learner's stream, after a route to a relay
        else:
            raise ProtocolError("type", f"unexpected {type(msg).__name__} on the weight socket")

    def _on_route(self, msg: WeightRoute) -> None:
        if msg.parent == self.parent and (msg.address == "") == (self._source is self._learner):
            return  # already there
        self._reset(abandon=True)
        self.parent = msg.parent
        if msg.address:
            self._source = self._dealer(msg.address, self.security.model_copy(update={"server_public_key": msg.server_key}))
            self._hello(self._source)
        else:  # the learner streams to this actor from now on: it knows what the actor holds
            self._source = self._learner
        log.info("weight receiver %s: weights now from %s", self.actor_id, msg.parent or "the learner")

    def _on_header(self, msg: WeightHeader, frame: zmq.Frame) -> None:
        check_header(msg)
        if self.run_id and msg.run_id != self.run_id:
            raise ProtocolError("run_id", f"weights of run {msg.run_id!r}, this actor is in run {self.run_id!r}")
        if msg.version <= self.have:
            raise ProtocolError("version", f"offered v{msg.version}, this actor already holds v{self.have}")
        self._header, self._filled, self._next_index = msg, 0, 0
        self._assembly = _Assembly(msg, self._buffer)
        if self.relay is not None:
            self.relay.begin(msg.version, frame.bytes, msg.n_chunks)
        if msg.n_chunks == 0:
            self._finish()

    def _on_chunk(self, chunk: WeightChunk, frames: list[zmq.Frame]) -> None:
        header, payload = self._header, frames[1]
        if header is None or chunk.version != header.version:
            self.stale_chunks += 1  # still in flight from a transfer this actor abandoned
            return
        check_chunk(header, chunk, len(payload), self._next_index, self._filled)
        if chunk_digest(payload.buffer) != chunk.digest:
            self.bad_digests += 1
            relay = self.parent
            log.warning("weight receiver %s: v%d chunk %d does not match its digest (from %s); the version is "
                        "dropped and fetched again", self.actor_id, chunk.version, chunk.index, relay or "the learner")
            self._reset(abandon=True)
            self._hello(self._learner, avoid=relay)
            return
        end = chunk.offset + chunk.nbytes
        last = chunk.index == header.n_chunks - 1
        if not last:  # the credit goes back before the chunk is used, so the next one is already on its way
            self._send(self._source, Ack(key=f"{chunk.version}/{chunk.index}"))
        if self.relay is not None:
            self.relay.add(frames[0].bytes, payload.buffer)
        self._assembly.add(chunk.offset, payload)
        self._filled, self._next_index = end, self._next_index + 1
        if last:
            self._finish()  # the last credit says "assembled": the sender counts this actor as holding the version
            self._send(self._source, Ack(key=f"{chunk.version}/{chunk.index}"))

    def _finish(self) -> None:
        header, assembly, t0 = self._header, self._assembly, time.perf_counter()
        state_dict = assembly.state_dict()
        self.assemble_s = time.perf_counter() - t0
        self._hand_over(header.version, state_dict)
        self.have = header.version
        self.versions_received.append(header.version)
        kept = _SPARE_VERSIONS * max(1, len(assembly.buffers))
        self._spare = (assembly.buffers + self._spare)[:kept]
        self._reset()
        if self._source is not self._learner:
            self._tell_learner()

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A spread tensor's buffer of a version assembled earlier that nobody references any more (it was
        applied and dropped), else a new one: refilling warm memory avoids first-touch page faults, which
        cost as much as the copy itself (about 0.3 s per 270 MB on a small VM)."""
        for i, buf in enumerate(self._spare):
            if buf.numel() == nbytes and storage_users(buf) == self._lone_users:
                return self._spare.pop(i)
        return torch.empty(nbytes, dtype=torch.uint8)

    def _reset(self, abandon: bool = False) -> None:
        """Forget the version being assembled (what was handed over stays alive in its state dict); `abandon`:
        it will not complete, so this actor's relay withdraws it too."""
        self._header = None
        self._assembly = None
        if abandon and self.relay is not None:
            self.relay.abandon()

    def _send(self, sock: zmq.Socket, msg: object, counts: bool = True) -> None:
        """Send without blocking; when the peer is unreachable so long that the queue is full, skip it: every
        message here is either repeated (Heartbeat, Hello) or moot once the peer is gone (Ack)."""
        if counts:
            self._last_sent = time.monotonic()
        try:
            sock.send(encode(msg), flags=zmq.NOBLOCK)
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
