"""The sending half of the weight protocol: a ROUTER that streams policy versions to receivers, newest only,
with per-receiver credits. The learner runs one (`learner/weight_push.py`), and so does every actor that
relays versions to others (`actors/weight_relay.py`): the protocol is the same at every hop.

Wire protocol (one DEALER per receiver; every message is one `protocol.codec` frame, except a WeightChunk,
which is [encoded WeightChunk, its raw payload bytes]):

    receiver -> server  Hello(sender, policy_version=have)     join, or abandon a transfer and ask again
                        Heartbeat(sender, policy_version=have) alive, holds version `have` (unknown: join)
                        Ack(key="<version>/<index>")           chunk received: one credit back
                        Shutdown(sender)                       leaving
    server -> receiver  WeightHeader, then WeightChunk 0..n_chunks-1 (+ payload frame) of one version;
                        Shutdown (forgotten, version withdrawn, or closing); ErrorMsg (refused)

Latest only: the server streams the newest `VersionSource` it was offered. A receiver that is idle and
holds an older version gets a transfer of it; the transfer runs to its end with at most `window` chunks
unacknowledged, and the receiver next gets the newest version offered meanwhile: a slow receiver skips
versions, nothing queues up for it. A chunk goes out once the source has it (`is_ready`): the learner's
source fills while it is being sent, a relay's as chunks arrive from its own parent.

Timeouts (a server never hangs on a receiver): a send that cannot proceed for `send_timeout_s`, or a
receiver that owes credits for `send_timeout_s`, is a `WeightSendTimeout`; the receiver is dropped (it
rejoins) and the error kept in `failures`. Idle receivers silent for `peer_timeout_s` are forgotten. A
Heartbeat from an unknown receiver is a join; a credit from one is answered with Shutdown, on which a
receiver drops any partial version and heartbeats (it does not say Hello: a Hello abandons the transfer the
server may have started meanwhile, whose header can already be on its way); any other unexpected message is
refused with ErrorMsg and its peer dropped.

The server owns no thread: its owner polls `socket` and calls `on_readable()` and `service()` (at least
every `tick_s()`), and guards the peer table with `cond`, which it may share with other threads.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import zmq

from protocol.codec import Limits, decode, encode
from protocol.config.transport import SecurityConfig
from protocol.config.weights import WeightsConfig
from protocol.errors import ProtocolError
from protocol.messages import Ack, ErrorMsg, Heartbeat, Hello, Shutdown
from protocol.security import secure_server

log = logging.getLogger(__name__)


class WeightSendTimeout(TimeoutError):
    """Weights could not be sent to (or were not acknowledged by) a receiver in time."""


class VersionSource(ABC):
    """One policy version as a server streams it: its encoded WeightHeader, then `n_chunks` chunks."""

    version: int
    header: bytes
    n_chunks: int

    @abstractmethod
    def is_ready(self, index: int) -> bool:
        """Chunk `index` can be sent now."""

    @abstractmethod
    def chunk(self, index: int) -> tuple[bytes, memoryview | zmq.Frame]:
        """The two frames of ready chunk `index`: its encoded WeightChunk and its payload."""

    @property
    @abstractmethod
    def withdrawn(self) -> bool:
        """The version will never be complete: receivers streaming it drop it and rejoin."""

    @abstractmethod
    def sent(self, tracker: zmq.MessageTracker) -> None:
        """A payload frame of this source went out zero-copy; `tracker` tells when ZeroMQ lets go of it."""


def send_or_timeout(sock: zmq.Socket, frames: list, what: str, track: bool = False) -> zmq.MessageTracker | None:
    """Send a multipart message (zero-copy), raising WeightSendTimeout when it cannot proceed within the
    socket's SNDTIMEO; with `track`, the tracker tells when ZeroMQ no longer reads the last frame's memory."""
    try:
        return sock.send_multipart(frames, copy=False, track=track)
    except zmq.Again:
        raise WeightSendTimeout(f"{what}: send blocked for {sock.sndtimeo} ms") from None


@dataclass(eq=False)
class Peer:
    """A receiver the server knows. `streams`: the server sends it versions (False: it is fed elsewhere and
    only reports what it holds)."""

    identity: bytes
    name: str
    have: int
    last_seen: float
    streams: bool = True
    transfer: VersionSource | None = None
    sent: int = 0  # chunks of the transfer sent
    acked: int = 0  # chunks of the transfer acknowledged
    last_progress: float = 0.0


class WeightStreamServer:
    """A bound ROUTER with per-receiver credit flow (see the module docstring). Subclasses decide who is
    streamed to (`admit`) and learn who left (`forgotten`)."""

    def __init__(self, ctx: zmq.Context, address: str, cfg: WeightsConfig, security: SecurityConfig | None = None,
                 limits: Limits | None = None, cond: threading.Condition | None = None, name: str = "learner"):
        self.cfg, self.limits, self.name = cfg, limits or Limits(), name
        self.cond = cond or threading.Condition()
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.router_mandatory = True
        self.socket.sndtimeo = int(cfg.send_timeout_s * 1000)
        secure_server(self.socket, security or SecurityConfig(), ctx)
        self.socket.bind(address)
        self.address: str = self.socket.last_endpoint.decode()
        self.latest: VersionSource | None = None
        self.peers: dict[bytes, Peer] = {}
        self.failures: collections.deque[Exception] = collections.deque(maxlen=100)  # the latest
        self.failure_count = 0  # all of them: refused frames, failed handling, timeouts
        self.bytes_sent = 0
        self.transfers_done = 0

    def tick_s(self) -> float:
        return min(self.cfg.send_timeout_s, self.cfg.peer_timeout_s, 1.0) / 4

    def offer(self, source: VersionSource | None) -> None:
        """Make `source` the newest version (None: none); call `service()` after."""
        with self.cond:
            self.latest = source

    def busy_sources(self) -> set[int]:
        """ids of the sources some transfer streams (caller holds `cond`)."""
        return {id(p.transfer) for p in self.peers.values() if p.transfer is not None}

    # --- hooks ---------------------------------------------------------------------------------------
    def admit(self, peer: Peer, hello: Hello) -> None:
        """A receiver said Hello (new, or rejoining): a subclass may set `peer.streams` or answer it (caller holds
        `cond`)."""

    def forgotten(self, peer: Peer) -> None:
        """A receiver was dropped or left (caller holds `cond`)."""

    # --- the owner's loop ----------------------------------------------------------------------------
    def on_readable(self) -> None:
        """Read and handle every message waiting on the socket."""
        while self.socket.poll(0):
            identity, *frames = self.socket.recv_multipart(copy=False)
            if len(frames) == 1:
                self._on_message(identity.bytes, frames[0].buffer)
            else:  # receivers send single-frame messages only
                error = ProtocolError("malformed", f"a message of {len(frames)} frames from a receiver")
                self.fail(identity.bytes, error, reply=ErrorMsg(code=error.reason, message=str(error)))

    def service(self) -> None:
        """Start transfers of the newest version, pump credits, drop receivers that timed out."""
        now = time.monotonic()
        starting = set()
        with self.cond:  # a transfer is bound under the lock, so its source is known busy from then on
            latest = self.latest
            for peer in self.peers.values():
                if (peer.streams and peer.transfer is None and latest is not None and latest.version > peer.have
                        and not latest.withdrawn and now - peer.last_seen <= self.cfg.peer_timeout_s):
                    peer.transfer, peer.sent, peer.acked, peer.last_progress = latest, 0, 0, now
                    starting.add(id(peer))
        for peer in list(self.peers.values()):
            if peer.transfer is not None and peer.transfer.withdrawn:  # the receiver drops it and rejoins
                self.send_nowait(peer.identity, encode(Shutdown(sender=self.name, reason="version withdrawn")))
                self.forget(peer.identity)
            elif id(peer) in starting:
                self._start(peer)
            elif peer.transfer is None:
                if now - peer.last_seen > self.cfg.peer_timeout_s:
                    self.forget(peer.identity)
            elif peer.sent > peer.acked and now - peer.last_progress > self.cfg.send_timeout_s:
                self.fail(peer.identity, WeightSendTimeout(
                    f"{peer.name}: no credit for {self.cfg.send_timeout_s} s during v{peer.transfer.version} "
                    f"(chunk {peer.acked}/{peer.transfer.n_chunks})"))
            else:
                self._pump(peer)

    def close(self) -> None:
        """Tell every receiver goodbye and close the socket."""
        bye = encode(Shutdown(sender=self.name, reason="closed"))
        for peer in list(self.peers.values()):
            self.send_nowait(peer.identity, bye)
        self.socket.close()

    # --- internals -----------------------------------------------------------------------------------
    def _on_message(self, identity: bytes, data: memoryview) -> None:
        try:
            msg = decode(data, self.limits)
        except ProtocolError as e:
            self.fail(identity, e, reply=ErrorMsg(code=e.reason, message=str(e)))
            return
        try:
            self._dispatch(identity, msg)
        except Exception as e:  # a valid frame whose handling failed: that peer is dropped, the server goes on
            log.warning("weight server %s: %s from %r failed: %r; the peer is dropped", self.name,
                        type(msg).__name__, identity, e)
            self.fail(identity, e, reply=ErrorMsg(code="unhandled", message=f"{type(e).__name__}: {e}"[:200]))

    def _dispatch(self, identity: bytes, msg: object) -> None:
        now = time.monotonic()
        peer = self.peers.get(identity)
        if isinstance(msg, Hello):
            peer = Peer(identity, msg.sender, msg.policy_version, now)
            with self.cond:  # known and admitted at once, for whoever reads the peers
                previous = self.peers.get(identity)
                self.peers[identity] = peer
                if previous is not None:
                    peer.streams = previous.streams
                self.admit(peer, msg)
                self.cond.notify_all()
        elif isinstance(msg, Heartbeat) and peer is None:  # dropped, or this server restarted: a join
            self._dispatch(identity, Hello(sender=msg.sender, role="actor", policy_version=msg.policy_version,
                                           relay_address=msg.relay_address, relay_key=msg.relay_key))
        elif isinstance(msg, Ack) and peer is None:  # a credit of a transfer this server dropped: rejoin
            self.send_nowait(identity, encode(Shutdown(sender=self.name, reason="unknown receiver: rejoin")))
        elif isinstance(msg, Heartbeat):
            peer.last_seen = now
            if peer.transfer is None and peer.have != msg.policy_version:
                with self.cond:
                    peer.have = msg.policy_version
                    self.cond.notify_all()
        elif isinstance(msg, Shutdown):
            self.forget(identity)
        elif isinstance(msg, Ack):
            self._on_ack(peer, msg, now)
        else:
            self.fail(identity, ProtocolError("type", f"unexpected {type(msg).__name__} from a receiver"),
                      reply=ErrorMsg(code="type", message=f"unexpected {type(msg).__name__}"))

    def _on_ack(self, peer: Peer, ack: Ack, now: float) -> None:
        peer.last_seen = now
        if not peer.streams:  # a late credit of a transfer the peer was routed away from: moot
            return
        snap = peer.transfer
        if snap is not None and not ack.ok:
            self.fail(peer.identity, ProtocolError("refused", f"{peer.name} refused v{snap.version}: {ack.reason}"))
            return
        if snap is None or ack.key != f"{snap.version}/{peer.acked}" or peer.acked >= peer.sent:
            expected = f"{snap.version}/{peer.acked}" if snap is not None else "none"
            self.fail(peer.identity, ProtocolError("malformed", f"{peer.name}: ack {ack.key!r}, expected {expected}"),
                      reply=ErrorMsg(code="malformed", message=f"unexpected ack {ack.key!r}"))
            return
        peer.acked += 1
        peer.last_progress = now
        if peer.acked == snap.n_chunks:
            self._complete(peer)
        else:
            self._pump(peer)

    def _start(self, peer: Peer) -> None:
        snap = peer.transfer
        if self._send(peer, [snap.header]):
            if snap.n_chunks:
                self._pump(peer)
            else:
                self._complete(peer)

    def _pump(self, peer: Peer) -> None:
        snap = peer.transfer
        while (snap is not None and peer.sent < snap.n_chunks and peer.sent - peer.acked < self.cfg.window
               and snap.is_ready(peer.sent)):
            header, payload = snap.chunk(peer.sent)
            if not self._send(peer, [header, payload], snap):
                return
            peer.sent += 1
            peer.last_progress = time.monotonic()
            self.bytes_sent += len(header) + len(payload)

    def _complete(self, peer: Peer) -> None:
        with self.cond:
            peer.have = peer.transfer.version
            peer.transfer = None
            self.transfers_done += 1
            self.cond.notify_all()

    def _send(self, peer: Peer, frames: list, source: VersionSource | None = None) -> bool:
        """Send one message to a peer; a timeout or a vanished peer drops it (and returns False). With
        `source`, the last frame is its payload, sent zero-copy and tracked."""
        try:
            tracker = send_or_timeout(self.socket, [peer.identity, *frames], f"weights to {peer.name}",
                                      track=source is not None)
            if source is not None:
                source.sent(tracker)
        except WeightSendTimeout as e:
            self.fail(peer.identity, e)
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.fail(peer.identity, ConnectionError(f"{peer.name} disconnected"))
            return False
        return True

    def fail(self, identity: bytes, error: Exception, reply: ErrorMsg | None = None) -> None:
        """Count and keep `error`, answer `reply` if given, and drop the peer."""
        self.failures.append(error)
        self.failure_count += 1
        self.forget(identity)
        if reply is not None:
            self.send_nowait(identity, encode(reply))

    def send_nowait(self, identity: bytes, frame: bytes) -> None:
        """A courtesy message (ErrorMsg, Shutdown, a route): not sent when the peer is gone or its pipe is full."""
        try:
            self.socket.send_multipart([identity, frame], flags=zmq.NOBLOCK)
        except zmq.Again:
            return  # the peer reads nothing: it will time out on its side
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise

    def forget(self, identity: bytes) -> None:
        with self.cond:
            peer = self.peers.pop(identity, None)
            if peer is not None:
                self.forgotten(peer)
            self.cond.notify_all()
