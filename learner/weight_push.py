"""Learner side of the weight push: publish each policy version to the actors over ZeroMQ, newest only,
through a relay tree.

The learner binds a `protocol.weight_stream.WeightStreamServer` (the wire protocol, credits, latest-only and
timeouts are described there) and every actor connects to it, says Hello and heartbeats what it holds. The
learner streams each version itself to at most `weights.fanout` actors; it routes every other actor
(`WeightRoute`) to a relay: an actor that serves versions to others as their chunks arrive
(`actors/weight_relay.py`), `fanout` children each. `learner/relay_tree.py` decides the tree: a joining actor
takes the free slot nearest the learner; when an actor leaves or falls silent its children are routed again;
an actor whose relay sent a corrupt chunk rejoins with `Hello(avoid=<relay>)` and is routed elsewhere. So the
learner's egress per version is at most `fanout` model copies, whatever the number of actors, and it still
knows which version every actor holds (`wait_delivered`, `peers`).

Cost: `publish` only copies the state dict into one flat buffer (numpy copies, without the GIL)
and returns; the thread sends each chunk as a small encoded WeightChunk (with its digest, computed once) and,
zero-copy, a view of its bytes in that buffer: the learner copies no weight byte after the flat buffer.
Streaming overlaps that copy: a chunk goes out as soon as its bytes are in the buffer, while `publish`
still copies the next tensors. Chunks are cut at tensor boundaries (`plan_chunks`), so an actor
views most tensors in the frames it received instead of copying them. A later
version refills a snapshot's memory once no transfer streams it and ZeroMQ has released its
frames (message trackers), so steady-state publishing touches warm memory instead of
page-faulting fresh buffers. A version whose copy fails is withdrawn: actors streaming it drop it.

Usage (rank 0 of the learner):

    pub = ZmqWeightPublisher(WeightsConfig(address="tcp://*:5556"), security_cfg, run_id="run")
    pub.publish(step, model.state_dict())   # returns once the version is copied (flat buffer)
"""

from __future__ import annotations

import logging
import threading
import time

import torch
import zmq

from learner.relay_tree import LEARNER, RelayTree
from learner.weight_publisher import WeightPublisher, WeightPublisherError, WeightSendTimeout
from learner.weight_snapshot import Snapshot
from protocol.codec import Limits, encode
from protocol.config.transport import SecurityConfig
from protocol.config.weights import WeightsConfig
from protocol.messages import Hello, WeightHeader, WeightRoute
from protocol.security import stop_authenticator
from protocol.weight_layout import flatten_into, plan_chunks, plan_layout
from protocol.weight_stream import Peer, WeightStreamServer

log = logging.getLogger(__name__)


_SPARE_SNAPSHOTS = 2  # retired snapshots whose memory the next `publish` may refill


class _RoutingServer(WeightStreamServer):
    """The learner's server: streams to the actors the relay tree gives it, routes the others to relays."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tree = RelayTree(self.cfg.fanout)
        self.relay_of: dict[bytes, tuple[str, str]] = {}  # actor -> (its relay address, its CURVE key)

    def admit(self, peer: Peer, hello: Hello) -> None:
        if hello.relay_address:
            self.relay_of[peer.identity] = (hello.relay_address, hello.relay_key)
        else:
            self.relay_of.pop(peer.identity, None)
        avoid = [k for k, p in self.peers.items() if hello.avoid and p.name == hello.avoid]
        self._route(peer.identity, self.tree.place(peer.identity, bool(hello.relay_address), avoid))
        self._rebalance()

    def forgotten(self, peer: Peer) -> None:
        self.relay_of.pop(peer.identity, None)
        for orphan in self.tree.remove(peer.identity):
            self._route(orphan, self.tree.place(orphan, orphan in self.relay_of))
        self._rebalance()

    def _rebalance(self) -> None:
        for key, parent in self.tree.rebalance():
            self._route(key, parent)

    def _route(self, identity: bytes, parent: bytes | None) -> None:
        """Tell an actor where its weights come from now, if that changed (caller holds `cond`)."""
        peer = self.peers[identity]
        was_streamed, peer.streams = peer.streams, parent is LEARNER
        if parent is LEARNER:
            if not was_streamed:  # from a relay back to the learner
                self.send_nowait(identity, encode(WeightRoute()))
        else:
            address, key = self.relay_of[parent]
            peer.transfer = None
            self.send_nowait(identity, encode(WeightRoute(address=address, parent=self.peers[parent].name,
                                                          server_key=key)))

    def routes(self) -> dict[str, str | None]:
        """Live actors: name -> the name of the relay feeding it (None: the learner)."""
        with self.cond:
            return {p.name: None if (parent := self.tree.parent(k)) is LEARNER else self.peers[parent].name
                    for k, p in self.peers.items()}


class ZmqWeightPublisher(WeightPublisher):
    """The learner's publisher: flat snapshots streamed by a routing `WeightStreamServer` on a thread of its own."""

    def __init__(self, cfg: WeightsConfig, security: SecurityConfig | None = None, run_id: str = "",
                 limits: Limits | None = None):
        self.cfg, self.run_id = cfg, run_id
        self._ctx = zmq.Context(io_threads=1)
        self._cond = threading.Condition()
        self.server = _RoutingServer(self._ctx, cfg.address, cfg, security, limits, self._cond)
        self.address = self.server.address
        wake = f"inproc://weight-push-wake-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake)
        self._publish_lock = threading.Lock()
        self._latest: Snapshot | None = None
        self._retired: list[Snapshot] = []  # earlier versions, newest first, for their memory
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weight-publisher", daemon=True)
        self._thread.start()

    @property
    def failures(self):
        """The latest failures (refused frames, failed handling, timeouts), newest last."""
        return self.server.failures

    @property
    def failure_count(self) -> int:
        return self.server.failure_count

    @property
    def bytes_sent(self) -> int:
        """Weight bytes (chunk frames and payloads) the learner itself sent: its egress."""
        return self.server.bytes_sent

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
            self.server.offer(snap)
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
                self.server.offer(previous)
                self._wake_tx.send(b"")
            raise

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A flat buffer for a snapshot: that of a retired version no transfer streams and ZeroMQ no longer
        reads, else new. Refilling warm memory avoids first-touch page faults, which cost as much as the copy."""
        with self._cond:
            busy = self.server.busy_sources()
            for i, old in enumerate(self._retired):
                if old.flat.numel() == nbytes and id(old) not in busy and all(t.done for t in old.trackers):
                    del self._retired[i]
                    return old.flat
        return torch.empty(nbytes, dtype=torch.uint8)

    def wait_delivered(self, version: int, timeout_s: float, min_peers: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        peers = self.server.peers
        with self._cond:
            while True:
                self._raise_if_dead()
                behind = sorted(p.name for p in peers.values() if p.have < version)
                if not behind and len(peers) >= min_peers:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WeightSendTimeout(f"version {version} not delivered within {timeout_s} s: "
                                            f"{len(peers)} actor(s) live (need {min_peers}), behind: {behind}")
                self._cond.wait(left)

    def peers(self) -> dict[str, int]:
        """Live actors: name -> version they hold."""
        with self._cond:
            return {p.name: p.have for p in self.server.peers.values()}

    def routes(self) -> dict[str, str | None]:
        """Live actors: name -> the relay that feeds it (None: the learner)."""
        return self.server.routes()

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

    # --- background thread (sole user of the server's socket) --------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()
            log.error("%s stopped: %r (raised again to the caller)", threading.current_thread().name, e)
        finally:
            self._wake_rx.close()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.server.socket, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        tick_ms = int(self.server.tick_s() * 1000)
        try:
            while True:
                events = dict(poller.poll(tick_ms))
                if self._wake_rx in events:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                with self._cond:
                    if self._stop:
                        break
                if self.server.socket in events:
                    self.server.on_readable()
                self.server.service()
        finally:
            self.server.close()
