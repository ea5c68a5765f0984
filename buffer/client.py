"""Both ends of the buffer: the actor's `BufferClient` (pieces in, prompts out) and the learner's `BatchSource`.

`BufferClient` (ZeroMQ DEALER, identity = its session "{actor id}#{random}", new per process): `send` a
`SubtreeMsg` piece; it is kept until
the buffer acknowledges it and re-sent every `buffer.resend_timeout_s` until then (at-least-once;
the buffer's storage is idempotent). At most `buffer.max_unacked_pieces` pieces are out at once;
when the buffer answers `backpressure` (too many unconsumed trees) the piece is re-sent after
`buffer.backpressure_wait_s` and `send` waits meanwhile: pieces wait, they are never dropped. A
piece refused with `lease_expired` is dropped (its prompt was dealt again). `request_prompts`
asks for prompt leases (admission permits), `heartbeat` keeps them alive; both in the session's name,
so the leases of a process that died expire on schedule even when its successor has the same actor id.
A reply that does not decode is counted (`bad_replies`), logged and dropped.

`BatchSource` reads complete trees from the run's stream through the consumer group: first the
entries this consumer read before a restart and never acknowledged, then entries another consumer
left unacknowledged for `claim_idle_s` (XAUTOCLAIM), then new ones. A tree whose oldest segment is
more than `max_staleness` versions behind the learner (in the surviving lineage, `buffer.lineage`)
is acknowledged at once and counted as a stale drop, never handed out; so is a tree with a segment
from weights a learner restart discarded (`lost_weights`). `trained(batch)` marks a batch trained
(consumed: out of the admission count) and `acknowledge(entries)` acknowledges it once a checkpoint
holds its update: acknowledged trees never come again; unacknowledged ones come again after a crash.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from buffer.lineage import from_lost_weights, lineage_distance
from buffer.store import GROUP, TreeStore
from protocol.codec import decode, encode
from protocol.config.buffer import BufferConfig
from protocol.config.transport import SecurityConfig
from protocol.errors import ProtocolError
from protocol.messages import Ack, ErrorMsg, Heartbeat, PromptGrant, PromptRequest, SubtreeMsg
from protocol.security import secure_client
from protocol.tree import Tree

log = logging.getLogger("treepo.buffer.client")


@dataclass
class _Outgoing:
    data: bytes
    first_sent: float
    due: float  # re-send at this time unless acknowledged


class BufferClient:
    """The actor side of the buffer (see the module docstring)."""

    def __init__(self, address: str, actor_id: str, cfg: BufferConfig, security: SecurityConfig | None = None,
                 context: zmq.Context | None = None, on_ack: Callable[[str, float], None] | None = None):
        self.actor_id = actor_id
        # what leases and heartbeats are held by: this process, not the name, so an actor restarted under the same
        # id does not keep renewing the dead one's leases (they expire on schedule and their prompts are dealt again)
        self.session = f"{actor_id}#{secrets.token_hex(4)}"
        self.cfg = cfg
        self.context = context or zmq.Context.instance()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, self.session.encode())
        secure_client(self.sock, security or SecurityConfig())
        self.sock.connect(address)
        self.on_ack = on_ack  # (key, seconds from first send to ack)
        self.unacked: dict[str, _Outgoing] = {}
        self.acked = 0
        self.resends = 0
        self.bad_replies = 0  # replies that did not decode, dropped
        self.last_reply = time.monotonic()  # when the buffer last answered (connected counts as an answer)
        self.backpressure = 0
        self.refused: list[Ack] = []
        self.errors: list[ErrorMsg] = []
        self._paused_until = 0.0
        self._grants: list[PromptGrant] = []

    # ------------------------------------------------------------------------------------ pieces
    def send(self, msg: SubtreeMsg, timeout_s: float | None = None) -> None:
        """Send a piece once there is room (window not full, no back-pressure); keep it until acknowledged."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(self.unacked) >= self.cfg.max_unacked_pieces or time.monotonic() < self._paused_until:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"buffer did not take piece {msg.key!r} within {timeout_s} s")
            self.poll(0.05)
        data = encode(msg)
        now = time.monotonic()
        self.unacked[msg.key] = _Outgoing(data, now, now + self.cfg.resend_timeout_s)
        self.sock.send(data)

    def poll(self, timeout_s: float) -> None:
        """Handle the buffer's replies for up to `timeout_s`, then re-send what is due."""
        if self.sock.poll(int(timeout_s * 1000)):
            while True:
                try:
                    raw = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    reply = decode(raw)
                except ProtocolError as e:  # counted and dropped: what it answered is re-sent when due
                    self.bad_replies += 1
                    log.warning("actor %s: dropped an undecodable reply from the buffer: %s", self.actor_id, e)
                    continue
                self._on_reply(reply)
        now = time.monotonic()
        for out in self.unacked.values():
            if out.due <= now:
                self.sock.send(out.data)
                out.due = now + self.cfg.resend_timeout_s
                self.resends += 1

    def _on_reply(self, msg) -> None:
        self.last_reply = time.monotonic()
        if isinstance(msg, Ack):
            out = self.unacked.get(msg.key)
            if out is None:
                return  # the ack of a re-sent duplicate
            if msg.ok:
                del self.unacked[msg.key]
                self.acked += 1
                if self.on_ack is not None:
                    self.on_ack(msg.key, time.monotonic() - out.first_sent)
            elif msg.reason == "backpressure":
                self.backpressure += 1
                self._paused_until = time.monotonic() + self.cfg.backpressure_wait_s
                out.due = self._paused_until
            else:
                log.warning("buffer refused piece %s: %s", msg.key, msg.reason)
                del self.unacked[msg.key]
                self.refused.append(msg)
        elif isinstance(msg, PromptGrant):
            self._grants.append(msg)
        elif isinstance(msg, ErrorMsg):
            log.warning("buffer error: %s: %s", msg.code, msg.message)
            self.errors.append(msg)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every piece sent is acknowledged (or refused)."""
        deadline = time.monotonic() + timeout_s
        while self.unacked:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.unacked)} pieces still unacknowledged after {timeout_s} s")
            self.poll(0.05)

    # ------------------------------------------------------------------------------------ prompts
    def request_prompts(self, n: int = 1, policy_version: int = -1, timeout_s: float = 30.0) -> PromptGrant:
        """Ask for up to `n` prompt leases; the grant may hold fewer (see its `reason`, `retry_after_s`)."""
        deadline = time.monotonic() + timeout_s
        request = encode(PromptRequest(actor_id=self.session, n=n, policy_version=policy_version))
        while not self._grants:
            self.sock.send(request)  # again after resend_timeout_s: the buffer may have restarted
            until = min(deadline, time.monotonic() + self.cfg.resend_timeout_s)
            while not self._grants and time.monotonic() < until:
                self.poll(0.05)
            if not self._grants and time.monotonic() >= deadline:
                raise TimeoutError(f"no prompt grant within {timeout_s} s")
        return self._grants.pop(0)

    def heartbeat(self, policy_version: int = -1) -> None:
        """Renew this actor session's prompt leases."""
        self.sock.send(encode(Heartbeat(sender=self.session, policy_version=policy_version, unix_time=time.time())))

    def close(self) -> None:
        self.sock.close(linger=0)


@dataclass
class Batch:
    """Trees handed to the learner, and the stream entries to acknowledge once its step commits."""

    trees: list[Tree] = field(default_factory=list)
    entries: list[tuple[str, str]] = field(default_factory=list)  # (stream entry id, tree id)


class BatchSource:
    """The learner side of the buffer (see the module docstring)."""

    def __init__(self, store: TreeStore, consumer: str = "learner-0", max_staleness: int = 4,
                 claim_idle_s: float = 30.0):
        self.store = store
        self.consumer = consumer
        self.max_staleness = max_staleness
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.stale_drops = 0
        self.lost_weights = 0  # trees with a segment from weights a learner restart discarded (`buffer.lineage`)
        self.gaps = store.lineage_gaps()
        self._phase = "own"  # own pending -> claim idle -> new
        self._cursor = "0-0"

    @classmethod
    def from_config(cls, store: TreeStore, cfg, consumer: str = "learner-0") -> BatchSource:
        return cls(store, consumer, cfg.buffer.max_staleness, cfg.buffer.claim_idle_s)

    def _read(self, n: int, block_ms: int) -> list[tuple[str, str, int]]:
        stream = self.store.key("stream")
        r = self.store.r
        if self._phase == "own":
            resp = r.xreadgroup(GROUP, self.consumer, {stream: self._cursor}, count=n)
            entries = resp[0][1] if resp else []
            if entries:
                self._cursor = entries[-1][0]
                return [_entry(e) for e in entries]
            self._phase, self._cursor = "claim", "0-0"
        if self._phase == "claim":
            cursor, entries, *_ = r.xautoclaim(stream, GROUP, self.consumer, self.claim_idle_ms,
                                               start_id=self._cursor, count=n)
            self._cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
            if self._cursor == "0-0":
                self._phase = "new"
            if entries:
                return [_entry(e) for e in entries]
            if self._phase == "claim":
                return []
        resp = r.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=n, block=block_ms)
        return [_entry(e) for e in resp[0][1]] if resp else []

    def next_batch(self, n: int, learner_version: int, timeout_s: float = 1.0) -> Batch:
        """Up to `n` trees within the staleness bound of `learner_version` (fewer when `timeout_s` runs out)."""
        batch = Batch()
        deadline = time.monotonic() + timeout_s
        while len(batch.entries) < n:
            left = deadline - time.monotonic()
            entries = self._read(n - len(batch.entries), max(1, int(left * 1000)))
            behind = [lineage_distance(learner_version, v, self.gaps) for _, _, v in entries]
            stale = [(eid, tid) for (eid, tid, _), d in zip(entries, behind, strict=True) if d > self.max_staleness]
            fresh = [(eid, tid) for (eid, tid, _), d in zip(entries, behind, strict=True) if d <= self.max_staleness]
            if stale:
                self.stale_drops += self.store.ack(stale, kind="stale_drops")
            trees = self.store.load_many([tid for _, tid in fresh])
            missing = [tid for (_, tid), t in zip(fresh, trees, strict=True) if t is None]
            if missing:
                raise RuntimeError(f"stream entries without a stored tree: {missing[:5]}")
            keep = [not from_lost_weights(t.versions, self.gaps) for t in trees]
            lost = [e for e, k in zip(fresh, keep, strict=True) if not k]
            if lost:
                self.lost_weights += self.store.ack(lost, kind="lost_weights")
            batch.trees += [t for t, k in zip(trees, keep, strict=True) if k]
            batch.entries += [e for e, k in zip(fresh, keep, strict=True) if k]
            if time.monotonic() >= deadline:
                break
        return batch

    def trained(self, batch: Batch, learner_version: int) -> int:
        """A batch the learner trained (and its new version): consumed, still pending until `acknowledge`;
        returns how many were new."""
        return self.store.consume(batch.entries, learner_version)

    def acknowledge(self, entries: list[tuple[str, str]]) -> int:
        """Entries whose update a saved checkpoint holds: acknowledged, never offered again."""
        return self.store.ack(entries, kind="consumed")

    def commit(self, batch: Batch, learner_version: int | None = None) -> int:
        """Acknowledge a trained batch at once (and record the learner's new version); returns how many were new.
        (The learner loop acknowledges at checkpoints instead: `trained`, then `acknowledge`.)"""
        return self.store.ack(batch.entries, kind="consumed", learner_version=learner_version)

    def set_aside(self, batch: Batch) -> int:
        """Acknowledge trees the learner leaves untrained because they carry no signal (counter
        `uniform_skips`; kept in the store like consumed ones); returns how many were new."""
        return self.store.ack(batch.entries, kind="uniform_skips")


def _entry(e) -> tuple[str, str, int]:
    entry_id, fields = e
    return entry_id.decode(), fields[b"tree"].decode(), int(fields[b"v"])
