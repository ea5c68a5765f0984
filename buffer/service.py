"""The buffer service: a ZeroMQ ROUTER that takes tree pieces from actors and stores them in Redis.

Per loop it reads up to `buffer.max_batch_messages` messages, decodes and validates each with the
protocol codec (the configured `limits`), and runs the Redis scripts of all of them in one pipelined
round trip; only then does it send the `Ack`s, so an acknowledged piece is in Redis (and in its AOF
within a second with appendfsync everysec). A piece that completes its tree (all `n_pieces` held)
is merged with the others (`Tree.merge`) and stored whole before that piece is acknowledged; if the
service dies in between, the piece is re-sent, found held, and the assembly runs again.

Messages: `SubtreeMsg` -> `Ack` (ok; or ok=False with reason `backpressure`: keep it and re-send
later, `lease_expired`: the tree's lease was taken away, `wrong_run`); `PromptRequest` ->
`PromptGrant` (leases, at most `buffer.admission.permits`); `Heartbeat` renews the sender's leases.
A malformed, oversize or unexpected message, or a valid one whose handling fails (`unhandled`), is
counted in Redis (`malformed:{reason}`), logged with the sender's ZeroMQ identity (rate-limited),
answered with `ErrorMsg`, and dropped: no message ends the service. A piece whose Redis script
fails is answered `Ack(ok=False, reason="store_error")` and counted (`malformed:store_error`).
Expired leases are reaped a few times per lease period.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass

import redis
import zmq

from buffer.admission import permits
from buffer.prompt_feed import PromptFeed
from buffer.redis_server import connect
from buffer.store import TreeStore, min_version
from protocol.codec import decode, encode
from protocol.config.pipeline import PipelineConfig
from protocol.errors import ProtocolError
from protocol.messages import (
    Ack,
    ErrorMsg,
    Heartbeat,
    Hello,
    PromptGrant,
    PromptLease,
    PromptRequest,
    SubtreeMsg,
)
from protocol.role_process import add_config_argument, start_role
from protocol.security import secure_server, stop_authenticator

log = logging.getLogger("treepo.buffer")


class _DropLog:
    """Logs dropped messages, at most `per_second` lines a second; the rest are summed into the next line."""

    def __init__(self, per_second: int = 10):
        self.per_second = per_second
        self.window = 0.0
        self.lines = 0
        self.suppressed = 0

    def __call__(self, sender: bytes, reason: str, detail: str) -> None:
        now = time.monotonic()
        if now - self.window >= 1.0:
            self.window, self.lines = now, 0
        if self.lines >= self.per_second:
            self.suppressed += 1
            return
        self.lines += 1
        more = f" ({self.suppressed} more dropped since the last line)" if self.suppressed else ""
        self.suppressed = 0
        log.warning("dropped %s message from %r: %s%s", reason, sender, detail[:200], more)


@dataclass
class _Pending:
    """A piece whose Redis script is queued in the batch pipeline."""

    sender: bytes
    msg: SubtreeMsg
    whole: bool
    index: int  # position of its script's result in the pipeline


class BufferService:
    """Binds `buffer.ingest_address` and serves until `stop` is set (see the module docstring)."""

    def __init__(self, cfg: PipelineConfig, client: redis.Redis, context: zmq.Context | None = None):
        self.cfg = cfg
        self.store = TreeStore.from_config(client, cfg)
        self.limits = cfg.limits.limits()
        self.context = context or zmq.Context()
        self._own_context = context is None
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_server(self.sock, cfg.security, self.context)
        self.sock.bind(cfg.buffer.ingest_address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.drop_log = _DropLog()
        self._next_reap = 0.0
        # keep enough prompts queued for every permit the admission bound can grant
        self.feed = (PromptFeed(self.store, cfg.prompts, low_water=cfg.learner.prompts_per_step * (cfg.buffer.max_staleness + 2))
                     if cfg.buffer.prompt_feed else None)

    # ------------------------------------------------------------------------------------ loop
    def serve(self, stop: threading.Event) -> None:
        log.info("buffer for run %r listening on %s", self.store.run_id, self.address)
        while not stop.is_set():
            self.step(timeout_ms=100)

    def step(self, timeout_ms: int = 100) -> int:
        """Handle one batch of messages (waiting up to `timeout_ms` for the first); returns how many."""
        batch: list[list[zmq.Frame]] = []
        if self.sock.poll(timeout_ms):
            while len(batch) < self.cfg.buffer.max_batch_messages:
                try:  # frames, not bytes: a tree is decoded and sent on to Redis from ZeroMQ's buffer, uncopied
                    batch.append(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
        if batch:
            self._handle(batch)
        now = time.time()
        if now >= self._next_reap:
            self._reap(now)
            if self.feed:
                self.feed.top_up()
            self._next_reap = now + min(1.0, self.cfg.buffer.lease_seconds / 4)
        return len(batch)

    def _handle(self, batch: list[list[zmq.Frame]]) -> None:
        pending: list[_Pending] = []
        requests: list[tuple[bytes, PromptRequest]] = []
        replies: list[tuple[bytes, object]] = []
        with self.store.r.pipeline(transaction=False) as pipe:
            for frames in batch:
                sender = frames[0].bytes
                if len(frames) != 2:
                    self._drop(pipe, replies, sender, "frames", f"{len(frames) - 1} payload frames, expected 1")
                    continue
                raw = frames[1].buffer
                try:
                    msg = decode(raw, self.limits)
                except ProtocolError as e:
                    self._drop(pipe, replies, sender, e.reason, str(e))
                    continue
                try:
                    self._dispatch(pipe, replies, pending, requests, sender, msg, raw)
                except Exception as e:  # a valid frame whose handling failed: counted, logged, answered; serve on
                    self._drop(pipe, replies, sender, "unhandled", f"{type(msg).__name__}: {type(e).__name__}: {e}")
            results = pipe.execute(raise_on_error=False)  # a failed script fails its own piece, not the batch
        for p in pending:
            replies.append((p.sender, self._piece_ack(p, results[p.index])))
        for sender, req in requests:
            replies.append((sender, self._grant(req)))
        for sender, reply in replies:
            self.sock.send_multipart([sender, encode(reply)])

    def _dispatch(self, pipe, replies, pending: list[_Pending], requests: list[tuple[bytes, PromptRequest]],
                  sender: bytes, msg: object, raw: memoryview) -> None:
        if isinstance(msg, SubtreeMsg):
            self._queue_piece(pipe, replies, pending, sender, msg, raw)
        elif isinstance(msg, PromptRequest):
            requests.append((sender, msg))
        elif isinstance(msg, Heartbeat):
            self.store.heartbeat(msg.sender, time.time() + self.cfg.buffer.lease_seconds, pipe=pipe)
        elif isinstance(msg, Hello):
            log.info("hello from %s (%s, pid %d) via %r", msg.sender, msg.role, msg.pid, sender)
        else:
            self._drop(pipe, replies, sender, "unexpected", f"{type(msg).__name__} is not for the buffer")

    def _queue_piece(self, pipe, replies, pending: list[_Pending], sender: bytes, msg: SubtreeMsg,
                     raw: memoryview) -> None:
        tree = msg.tree
        if tree.run_id != self.store.run_id:
            self.store.count(pipe, "refused_wrong_run")
            replies.append((sender, Ack(key=msg.key, ok=False, reason="wrong_run")))
            return
        if msg.final and msg.n_pieces < 1:
            self._drop(pipe, replies, sender, "n_pieces", f"final piece {msg.key!r} says n_pieces={msg.n_pieces}")
            return
        whole = msg.final and msg.n_pieces == 1
        if whole and len(tree.leaf_ids) == 0:
            self._drop(pipe, replies, sender, "empty_tree", f"complete tree {tree.tree_id!r} has no leaf")
            return
        if whole:
            index = self.store.queue_whole(pipe, tree.tree_id, raw, min_version(tree))
        else:
            index = self.store.queue_piece(pipe, tree.tree_id, msg.key, raw, msg.n_pieces if msg.final else 0)
        pending.append(_Pending(sender, msg, whole, index))

    def _piece_ack(self, p: _Pending, result) -> Ack:
        if isinstance(result, Exception):  # the store's script refused the piece (e.g. a Redis-side error)
            self.store.count(self.store.r, "malformed:store_error")
            self.drop_log(p.sender, "store_error", f"piece {p.msg.key!r}: {result}")
            return Ack(key=p.msg.key, ok=False, reason="store_error")
        if p.whole:
            status = result.decode()
        else:
            status, held, total = result[0].decode(), int(result[1]), int(result[2])
            if status in ("stored", "duplicate") and total and held >= total:
                status = self.store.assemble(p.msg.tree.tree_id)
        if status == "stored" or status == "duplicate":
            return Ack(key=p.msg.key)
        return Ack(key=p.msg.key, ok=False, reason="lease_expired" if status == "expired" else status)

    def _grant(self, req: PromptRequest) -> PromptGrant:
        b = self.cfg.buffer
        unconsumed, leased, version = self.store.admission_state()
        k = permits(unconsumed=unconsumed, leased=leased, learner_version=version, actor_version=req.policy_version,
                    trees_per_step=self.cfg.learner.prompts_per_step, max_staleness=b.max_staleness,
                    cap=b.max_unconsumed_trees)
        granted = self.store.lease(req.actor_id, max(0, min(req.n, k)), time.time() + b.lease_seconds) if k > 0 else []
        leases = [PromptLease(tree_id=tid, prompt_id=p.prompt_id, prompt=p.prompt, answer=p.answer,
                              lease_seconds=b.lease_seconds) for tid, p in granted]
        reason = "" if len(leases) >= req.n else ("no_permit" if k < req.n else "queue_empty")
        return PromptGrant(leases=leases, learner_version=version, reason=reason,
                           retry_after_s=b.backpressure_wait_s if reason else 0.0)

    def _drop(self, pipe, replies, sender: bytes, reason: str, detail: str) -> None:
        self.store.count(pipe, f"malformed:{reason}")
        self.drop_log(sender, reason, detail)
        replies.append((sender, ErrorMsg(code=reason, message=detail[:200])))

    def _reap(self, now: float) -> None:
        for e in self.store.expire_leases(now):
            log.warning("lease %s of actor %s expired: prompt re-queued, %d piece(s) discarded",
                        e.tree_id, e.actor_id, e.discarded_pieces)

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._own_context:
            stop_authenticator(self.context)
            self.context.term()


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)


def run(args: argparse.Namespace) -> int:
    """`treepo buffer`: serve until SIGTERM/SIGINT; an embedded Redis (if any) is shut down on the way out."""
    cfg, stop = start_role(args)
    with connect(cfg, stop=stop) as handle:
        service = BufferService(cfg, handle.client)
        try:
            service.serve(stop)
        finally:
            service.close()
    return 0
