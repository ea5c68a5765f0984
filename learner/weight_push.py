"""Learner side of the weight push: publish each policy version to every actor over ZeroMQ, newest only.

Wire protocol (a ROUTER bound by the learner, one DEALER per actor; every message is one
`protocol.codec` frame, except a WeightChunk, which is [encoded WeightChunk, its raw payload bytes]):

    actor -> learner   Hello(sender, role="actor", policy_version=have)  join, or abandon a transfer and ask again
                       Heartbeat(sender, policy_version=have)            alive, idle, holds version `have`
                       Ack(key="<version>/<index>")                     chunk received: one credit back
                       Shutdown(sender)                                 leaving
    learner -> actor   WeightHeader, then WeightChunk 0..n_chunks-1 (+ payload frame) of one version;
                       Shutdown on close

Latest only: `publish` keeps one snapshot, the newest version, as a flat buffer. An actor that is
idle and holds an older version gets a transfer of that snapshot; the transfer runs to its end with
at most `window` chunks unacknowledged (credits), and if newer versions were published meanwhile
the actor next gets the newest of them. So each actor has at most one version in flight, a slow
actor skips every version published while it was busy, and nothing queues up for it. A snapshot
that is no longer the newest lives only while a transfer still streams it.

Cost: `publish` only copies the state dict into one flat buffer (numpy copies, without the GIL)
and returns; the thread sends each chunk as a small encoded WeightChunk and, zero-copy, a view of
its bytes in that buffer: the learner copies no weight byte after the flat buffer. Streaming
overlaps that copy: a chunk goes out as soon as its bytes are in the buffer, while `publish`
still copies the next tensors. Chunks are cut at tensor boundaries (`plan_chunks`), so an actor
views most tensors in the frames it received instead of copying them. A later
version refills a snapshot's memory once no transfer streams it and ZeroMQ has released its
frames (message trackers), so steady-state publishing touches warm memory instead of
page-faulting fresh buffers.

Timeouts (the learner never hangs on an actor): a send that cannot proceed for `send_timeout_s`,
or an actor that returns no credit for `send_timeout_s` mid-transfer, is a `WeightSendTimeout`:
the actor is dropped (it rejoins with its next Heartbeat) and the error is kept in `failures`.
`wait_delivered(version, timeout_s)` raises `WeightSendTimeout` unless every live actor (at least
`min_peers`) holds `version` in time. Idle actors silent for `peer_timeout_s` are forgotten. A
credit from an actor the learner no longer knows is answered with Shutdown, which makes the actor
drop its partial version and rejoin. Messages from one actor arrive in order, so once the learner
has read an actor's Hello no credit of its abandoned transfer can follow: any unexpected Ack is a
protocol error, answered with ErrorMsg, and the actor is dropped.

Usage (rank 0 of the learner):

    pub = ZmqWeightPublisher(WeightsConfig(address="tcp://*:5556"), security_cfg, run_id="run")
    pub.publish(step, model.state_dict())   # returns once the version is copied (flat buffer)
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import torch
import zmq

from learner.weight_publisher import WeightPublisher, WeightPublisherError, WeightSendTimeout
from learner.weight_snapshot import Snapshot
from protocol.codec import Limits, decode, encode
from protocol.config.transport import SecurityConfig
from protocol.config.weights import WeightsConfig
from protocol.errors import ProtocolError
from protocol.messages import Ack, ErrorMsg, Heartbeat, Hello, Shutdown, WeightHeader
from protocol.security import secure_server, stop_authenticator
from protocol.weight_layout import flatten_into, plan_chunks, plan_layout

log = logging.getLogger(__name__)


def send_or_timeout(sock: zmq.Socket, frames: list[bytes | memoryview], what: str,
                    track: bool = False) -> zmq.MessageTracker | None:
    """Send a multipart message (zero-copy), raising WeightSendTimeout when it cannot proceed within the
    socket's SNDTIMEO; with `track`, the tracker tells when ZeroMQ no longer reads the last frame's memory."""
    try:
        return sock.send_multipart(frames, copy=False, track=track)
    except zmq.Again:
        raise WeightSendTimeout(f"{what}: send blocked for {sock.sndtimeo} ms") from None


_SPARE_SNAPSHOTS = 2  # retired snapshots whose memory the next `publish` may refill


@dataclass(eq=False)
class _Peer:
    identity: bytes
    name: str
    have: int
    last_seen: float
    transfer: Snapshot | None = None
    sent: int = 0  # chunks of the transfer sent
    acked: int = 0  # chunks of the transfer acknowledged
    last_progress: float = 0.0


class ZmqWeightPublisher(WeightPublisher):
    """ROUTER-based publisher with per-actor credit flow (see the module docstring for the protocol)."""

    def __init__(self, cfg: WeightsConfig, security: SecurityConfig | None = None, run_id: str = "",
                 limits: Limits | None = None):
        self.cfg, self.run_id, self.limits = cfg, run_id, limits or Limits()
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.router_mandatory = True
        self._sock.sndtimeo = int(cfg.send_timeout_s * 1000)
        secure_server(self._sock, security or SecurityConfig(), self._ctx)
        self._sock.bind(cfg.address)
        self.address: str = self._sock.last_endpoint.decode()
        wake = f"inproc://weight-push-wake-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake)
        self._cond = threading.Condition()
        self._publish_lock = threading.Lock()
        self._latest: Snapshot | None = None
        self._retired: list[Snapshot] = []  # earlier versions, newest first, for their memory
        self._peers: dict[bytes, _Peer] = {}
        self._stop = False
        self._error: BaseException | None = None
        self.failures: collections.deque[Exception] = collections.deque(maxlen=100)  # the latest
        self.failure_count = 0  # all of them: refused frames, failed handling, timeouts
        self.bytes_sent = 0
        self.transfers_done = 0
        self._thread = threading.Thread(target=self._run, name="weight-publisher", daemon=True)
        self._thread.start()

    # --- caller side -------------------------------------------------------------------------------
    def publish(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        with self._publish_lock:
            self._publish(version, state_dict)

    def _publish(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        self._raise_if_dead()
        with self._cond:
            if self._latest is not None and version <= self._latest.version:
                raise ValueError(f"version {version} is not newer than the published {self._latest.version}")
        metas, total = plan_layout(state_dict)
        chunks = plan_chunks(metas, self.cfg.chunk_bytes)
        header = encode(WeightHeader(run_id=self.run_id, version=version, tensors=metas, total_bytes=total,
                                     n_chunks=len(chunks)))
        snap = Snapshot(version, header, chunks, self._buffer(total))
        with self._cond:
            previous, self._latest = self._latest, snap
            retired = self._retired
            if previous is not None:
                self._retired = [previous, *retired[:_SPARE_SNAPSHOTS - 1]]
            self._wake_tx.send(b"")
        due = 0  # the first chunk not yet ready: the thread streams each chunk once its bytes are written

        def written(nbytes: int) -> None:
            nonlocal due
            snap.ready, first = nbytes, due
            while due < len(chunks) and snap.is_ready(due):
                due += 1
            if due > first:  # a chunk became ready: wake the sending thread
                with self._cond:
                    self._wake_tx.send(b"")

        try:
            flatten_into(state_dict, metas, snap.flat, progress=written)
        except BaseException:  # the copy failed half-way: withdraw the version, actors streaming it start over
            with self._cond:
                self._latest, self._retired, snap.ready = previous, retired, -1
                self._wake_tx.send(b"")
            raise

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A flat buffer for a snapshot: that of a retired version no transfer streams and ZeroMQ no longer
        reads, else new. Refilling warm memory avoids first-touch page faults, which cost as much as the copy."""
        with self._cond:
            busy = {id(p.transfer) for p in self._peers.values()}
            for i, old in enumerate(self._retired):
                if old.flat.numel() == nbytes and id(old) not in busy and all(t.done for t in old.trackers):
                    del self._retired[i]
                    return old.flat
        return torch.empty(nbytes, dtype=torch.uint8)

    def wait_delivered(self, version: int, timeout_s: float, min_peers: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._raise_if_dead()
                behind = sorted(p.name for p in self._peers.values() if p.have < version)
                if not behind and len(self._peers) >= min_peers:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WeightSendTimeout(f"version {version} not delivered within {timeout_s} s: "
                                            f"{len(self._peers)} actor(s) live (need {min_peers}), behind: {behind}")
                self._cond.wait(left)

    def peers(self) -> dict[str, int]:
        """Live actors: name -> version they hold."""
        with self._cond:
            return {p.name: p.have for p in self._peers.values()}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._wake_tx.send(b"")
        self._thread.join()
        self._wake_tx.close()
        stop_authenticator(self._ctx)
        self._ctx.term()
        self._raise_if_dead()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise WeightPublisherError("the weight publisher thread died") from self._error

    # --- background thread (sole user of the ROUTER socket) ----------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()
            log.error("%s stopped: %r (raised again to the caller)", threading.current_thread().name, e)
        finally:
            self._sock.close()
            self._wake_rx.close()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        tick_ms = int(min(self.cfg.send_timeout_s, self.cfg.peer_timeout_s, 1.0) * 250)
        while True:
            events = dict(poller.poll(tick_ms))
            if self._wake_rx in events:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            with self._cond:
                if self._stop:
                    break
            if self._sock in events:
                while self._sock.poll(0):
                    identity, *frames = self._sock.recv_multipart(copy=False)
                    if len(frames) == 1:
                        self._on_message(identity.bytes, frames[0].buffer)
                    else:  # actors send single-frame messages only
                        error = ProtocolError("malformed", f"a message of {len(frames)} frames from an actor")
                        self._fail(identity.bytes, error, reply=ErrorMsg(code=error.reason, message=str(error)))
            self._service_peers()
        bye = encode(Shutdown(sender="learner", reason="publisher closed"))
        for peer in list(self._peers.values()):
            self._send_nowait(peer.identity, bye)

    def _on_message(self, identity: bytes, data: memoryview) -> None:
        try:
            msg = decode(data, self.limits)
        except ProtocolError as e:
            self._fail(identity, e, reply=ErrorMsg(code=e.reason, message=str(e)))
            return
        try:
            self._dispatch(identity, msg)
        except Exception as e:  # a valid frame whose handling failed: that peer is dropped, the thread serves on
            log.warning("weight publisher: %s from %r failed: %r; the peer is dropped", type(msg).__name__, identity, e)
            self._fail(identity, e, reply=ErrorMsg(code="unhandled", message=f"{type(e).__name__}: {e}"[:200]))

    def _dispatch(self, identity: bytes, msg: object) -> None:
        now = time.monotonic()
        peer = self._peers.get(identity)
        if isinstance(msg, Hello | Heartbeat):
            if peer is None or isinstance(msg, Hello):
                peer = _Peer(identity, msg.sender, msg.policy_version, now)
                with self._cond:
                    self._peers[identity] = peer
                    self._cond.notify_all()
            peer.last_seen = now
            if peer.transfer is None and peer.have != msg.policy_version:
                with self._cond:
                    peer.have = msg.policy_version
                    self._cond.notify_all()
        elif isinstance(msg, Shutdown):
            self._forget(identity)
        elif isinstance(msg, Ack) and peer is None:  # a credit from an actor dropped since: tell it to rejoin
            self._send_nowait(identity, encode(Shutdown(sender="learner", reason="unknown actor: rejoin")))
        elif isinstance(msg, Ack):
            self._on_ack(peer, msg, now)
        else:
            self._fail(identity, ProtocolError("type", f"unexpected {type(msg).__name__} from an actor"),
                       reply=ErrorMsg(code="type", message=f"unexpected {type(msg).__name__}"))

    def _on_ack(self, peer: _Peer, ack: Ack, now: float) -> None:
        peer.last_seen = now
        snap = peer.transfer
        if snap is not None and not ack.ok:
            self._fail(peer.identity, ProtocolError("refused", f"{peer.name} refused v{snap.version}: {ack.reason}"))
            return
        if snap is None or ack.key != f"{snap.version}/{peer.acked}" or peer.acked >= peer.sent:
            expected = f"{snap.version}/{peer.acked}" if snap is not None else "none"
            self._fail(peer.identity, ProtocolError("malformed", f"{peer.name}: ack {ack.key!r}, expected {expected}"),
                       reply=ErrorMsg(code="malformed", message=f"unexpected ack {ack.key!r}"))
            return
        peer.acked += 1
        peer.last_progress = now
        if peer.acked == snap.n_chunks:
            self._complete(peer)
        else:
            self._pump(peer)

    def _service_peers(self) -> None:
        now = time.monotonic()
        starting = set()
        with self._cond:  # a transfer is bound under the lock, so `_buffers` never refills a snapshot being started
            latest = self._latest
            for peer in self._peers.values():
                if (peer.transfer is None and latest is not None and latest.version > peer.have
                        and now - peer.last_seen <= self.cfg.peer_timeout_s):
                    peer.transfer, peer.sent, peer.acked, peer.last_progress = latest, 0, 0, now
                    starting.add(id(peer))
        for peer in list(self._peers.values()):
            if peer.transfer is not None and peer.transfer.ready < 0:  # withdrawn: the actor drops it and rejoins
                self._send_nowait(peer.identity, encode(Shutdown(sender="learner", reason="version withdrawn")))
                self._forget(peer.identity)
            elif id(peer) in starting:
                self._start(peer)
            elif peer.transfer is None:
                if now - peer.last_seen > self.cfg.peer_timeout_s:
                    self._forget(peer.identity)
            elif now - peer.last_progress > self.cfg.send_timeout_s:
                self._fail(peer.identity, WeightSendTimeout(
                    f"{peer.name}: no credit for {self.cfg.send_timeout_s} s during v{peer.transfer.version} "
                    f"(chunk {peer.acked}/{peer.transfer.n_chunks})"))
            else:
                self._pump(peer)

    def _start(self, peer: _Peer) -> None:
        snap = peer.transfer
        if self._send(peer, [snap.header]):
            if snap.n_chunks:
                self._pump(peer)
            else:
                self._complete(peer)

    def _pump(self, peer: _Peer) -> None:
        snap = peer.transfer
        while (snap is not None and peer.sent < snap.n_chunks and peer.sent - peer.acked < self.cfg.window
               and snap.is_ready(peer.sent)):
            header, payload = snap.chunk(peer.sent)
            if not self._send(peer, [header, payload], snap.trackers):
                return
            peer.sent += 1
            peer.last_progress = time.monotonic()
            self.bytes_sent += len(header) + len(payload)

    def _complete(self, peer: _Peer) -> None:
        with self._cond:
            peer.have = peer.transfer.version
            peer.transfer = None
            self.transfers_done += 1
            self._cond.notify_all()

    def _send(self, peer: _Peer, frames: list[bytes | memoryview], trackers: list | None = None) -> bool:
        """Send one message (its frames) to a peer; a timeout or a vanished peer drops it (and returns False).
        With `trackers`, the tracker of the last frame (a payload, sent zero-copy) is added to them."""
        try:
            tracker = send_or_timeout(self._sock, [peer.identity, *frames], f"weights to {peer.name}",
                                      track=trackers is not None)
            if trackers is not None:
                trackers.append(tracker)
        except WeightSendTimeout as e:
            self._fail(peer.identity, e)
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self._fail(peer.identity, ConnectionError(f"{peer.name} disconnected"))
            return False
        return True

    def _fail(self, identity: bytes, error: Exception, reply: ErrorMsg | None = None) -> None:
        self.failures.append(error)
        self.failure_count += 1
        if reply is not None:
            self._send_nowait(identity, encode(reply))
        self._forget(identity)

    def _send_nowait(self, identity: bytes, frame: bytes) -> None:
        """A courtesy message (ErrorMsg, Shutdown): not sent when the peer is gone or its pipe is full."""
        try:
            self._sock.send_multipart([identity, frame], flags=zmq.NOBLOCK)
        except zmq.Again:
            return  # the peer reads nothing: it will time out on its side
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise

    def _forget(self, identity: bytes) -> None:
        with self._cond:
            self._peers.pop(identity, None)
            self._cond.notify_all()
