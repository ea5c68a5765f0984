"""The durable tree store of one run in Redis: pieces, complete trees, the learner's stream, leases.

Redis layout (standalone Redis; every key of run R starts with `treepo:R:`, written P below):

    P tree:{tree_id}        STRING  a complete tree: the protocol codec's msgpack of a SubtreeMsg that
                                    holds the whole columnar Tree (final=True, n_pieces=1). A tree that
                                    arrived in one piece is stored as the bytes the actor sent.
    P pieces:{tree_id}      HASH    pieces of a tree still being assembled: piece key -> '1';
                                    field `#n` = n_pieces once the final piece came.
    P piece:{tree_id}:{key} STRING  the codec bytes of one held piece.
    P in:{token}:{n}        STRING  a blob staged for the script that stores it (TTL STAGED_TTL_S).
    P gone:{tree_id}        STRING  tombstone (TTL buffer.tombstone_seconds): `trimmed` (deleted by the
                                    retention policy: re-sent pieces are duplicates) or `expired`
                                    (lease expired: its pieces are refused).
    P stream                STREAM  one entry per complete tree, {tree: id, v: oldest segment version};
                                    consumer group `learner`. An entry is XDEL'd once acknowledged: when a
                                    checkpoint holds its update (trained), or at once (stale, uniform, lost).
    P by_version            ZSET    tree id, scored by its oldest segment's policy version (replay index).
    P consumed              LIST    ids of consumed trees, oldest first (retention=keep_last).
    P advantages            HASH    tree id -> msgpack {level, node_ids, values, trained_version}: the advantages
                                    the learner trained the tree with (`AdvantageRecord`; export, inspect).
    P counters              HASH    unconsumed, trees_stored, pieces_stored, duplicate_pieces,
                                    backpressure, consumed, stale_drops, uniform_skips (acknowledged
                                    untrained: no signal), leases_granted, expired_leases,
                                    discarded_partial_trees, discarded_pieces, refused_expired,
                                    malformed:{reason}, ...
    P learner_version       STRING  the version of the learner's last committed step.
    P trained               SET     stream entry ids the learner trained whose update no checkpoint holds yet
                                    (consumed, still pending: acknowledged at the next checkpoint).
    P version_high          STRING  the highest policy version ever published in the run.
    P lineage_gaps          LIST    "after:resume": a learner resumed from its checkpoint at version `after`
                                    republished it as `resume`; versions in between came from lost weights.
    P prompts               LIST    prompt ids waiting for an actor (LPOP from the head; an expired
                                    lease puts its prompt back at the head).
    P prompt_data           HASH    prompt id -> msgpack {prompt, answer}.
    P leases                HASH    tree id (= lease id) -> the actor session holding it ("{actor id}#{random}":
                                    one per actor process, so a restart under the same id is a new holder).
    P lease_prompt          HASH    tree id -> prompt id.
    P lease_deadline        ZSET    tree id, scored by the unix time its lease expires.
    P actor:{session}       SET     the tree ids an actor session holds leases for (its heartbeat renews them all).

Every state change is one Lua script, so "stored + indexed + counted" (and "acknowledged + retained")
is atomic, and re-running a script with the same piece changes nothing but the duplicate counter.
Blobs never pass through Lua: a script argument of 0.4 MB costs Redis about 0.7 ms in copies (twice
what SET + XADD of the same bytes cost), so the blob is first SET under a staged key with a TTL, in
the same pipeline, and the script RENAMEs it into place (O(1)) or deletes it. A writer that dies
between the two leaves only a staged key that expires.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import redis

from protocol.codec import Limits, decode, encode
from protocol.messages import SubtreeMsg
from protocol.tree import Tree

GROUP = "learner"
STAGED_TTL_S = 600  # a staged blob whose script never ran (its writer died in between) expires after this

# ---------------------------------------------------------------------------------------- Lua scripts
# buffer/lua/<name>.lua; every script gets P (the key prefix) as ARGV[1]. `discard_pieces.lua` defines a
# function that store_tree.lua and expire.lua call, so it is prepended to them.
LUA_DIR = Path(__file__).parent / "lua"


def lua(name: str, *, with_discard_pieces: bool = False) -> str:
    """The source of buffer/lua/<name>.lua (after discard_pieces.lua's function when asked)."""
    body = (LUA_DIR / f"{name}.lua").read_text()
    return (LUA_DIR / "discard_pieces.lua").read_text() + body if with_discard_pieces else body


@dataclass
class PieceResult:
    """What the store did with one piece: stored | duplicate | backpressure | expired; `complete` when the
    piece was the last one missing (the caller then assembles the tree)."""

    status: str
    complete: bool = False


@dataclass
class ExpiredLease:
    tree_id: str
    actor_id: str
    discarded_pieces: int


@dataclass
class Prompt:
    prompt_id: str
    prompt: str
    answer: str = ""


@dataclass(frozen=True)
class AdvantageRecord:
    """The advantages one tree was trained with. level "leaf": `values` maps each leaf's node id to the
    advantage of every token of its path (TreePO, GRPO); level "segment": each trained segment's node id to the
    advantage of its own tokens (TreeRPO; segments of dropped sibling groups are absent).
    `trained_version`: the learner's policy version when it trained on the tree (the weights the gradient was
    taken at; the step made version trained_version + 1)."""

    tree_id: str
    level: str
    values: dict[int, float]
    trained_version: int


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


class TreeStore:
    """All Redis access of the buffer for one run (see the module docstring for the layout)."""

    def __init__(self, client: redis.Redis, run_id: str, *, max_unconsumed: int = 1024, retention: str = "keep_all",
                 retention_keep: int = 10_000, tombstone_seconds: float = 86_400.0, limits: Limits | None = None,
                 read_only: bool = False):
        self.r = client
        self.run_id = run_id
        self.p = f"treepo:{run_id}:"
        self.max_unconsumed = max_unconsumed
        self.retention = retention
        self.retention_keep = retention_keep
        self.tombstone_seconds = max(1, int(tombstone_seconds))
        self.limits = limits or Limits()
        self._token = os.urandom(6).hex()  # staged keys of this writer
        self._staged = itertools.count()
        self._store_tree = client.register_script(lua("store_tree", with_discard_pieces=True))
        self._store_piece = client.register_script(lua("store_piece"))
        self._ack = client.register_script(lua("ack"))
        self._consume = client.register_script(lua("consume"))
        self._reopen = client.register_script(lua("reopen"))
        self._note_published = client.register_script(lua("note_published"))
        self._lease = client.register_script(lua("lease"))
        self._heartbeat = client.register_script(lua("heartbeat"))
        self._expire = client.register_script(lua("expire", with_discard_pieces=True))
        if not read_only:  # a reader (offline training of another run) changes nothing, not even the group
            self.ensure_group()

    @classmethod
    def from_config(cls, client: redis.Redis, cfg) -> TreeStore:
        """The store of `cfg.run.run_id` with the buffer section's bounds (cfg: PipelineConfig)."""
        b = cfg.buffer
        return cls(client, cfg.run.run_id, max_unconsumed=b.max_unconsumed_trees, retention=b.retention,
                   retention_keep=b.retention_keep, tombstone_seconds=b.tombstone_seconds, limits=cfg.limits.limits())

    def key(self, name: str) -> str:
        return self.p + name

    def ensure_group(self) -> None:
        """The learner's consumer group (from the stream's start, so nothing stored before it is missed)."""
        try:
            self.r.xgroup_create(self.key("stream"), GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # ------------------------------------------------------------------------------------ ingest
    def _stage(self, pipe, blob: bytes | memoryview) -> str:
        """Queue the SET of a blob under a fresh staged key (see the module docstring); returns the key."""
        staged = self.key(f"in:{self._token}:{next(self._staged)}")
        pipe.set(staged, blob, ex=STAGED_TTL_S)
        return staged

    def queue_whole(self, pipe, tree_id: str, blob: bytes | memoryview, min_version: int, single: bool = True) -> int:
        """Queue storing a complete tree given as codec bytes (`single`: it arrived as one piece, admitted against
        the cap; else it was assembled from admitted pieces). Returns the index of its status in the results."""
        staged = self._stage(pipe, blob)
        self._store_tree(args=[self.p, tree_id, staged, min_version, self.max_unconsumed, int(single)], client=pipe)
        return len(pipe) - 1

    def queue_piece(self, pipe, tree_id: str, key: str, blob: bytes | memoryview, n_pieces: int) -> int:
        """Queue storing one piece of a multi-piece tree (`n_pieces` > 0 on the final piece). Its result is
        [status, pieces held, n_pieces or 0]; returns the index of that result."""
        staged = self._stage(pipe, blob)
        self._store_piece(args=[self.p, tree_id, key, staged, n_pieces, self.max_unconsumed], client=pipe)
        return len(pipe) - 1

    def store_whole(self, tree_id: str, blob: bytes, min_version: int, single: bool = True) -> bytes:
        """`queue_whole` in a round trip of its own; returns the status."""
        with self.r.pipeline(transaction=False) as pipe:
            i = self.queue_whole(pipe, tree_id, blob, min_version, single)
            return pipe.execute()[i]

    def store_piece(self, tree_id: str, key: str, blob: bytes, n_pieces: int) -> list:
        """`queue_piece` in a round trip of its own; returns [status, held, n_pieces]."""
        with self.r.pipeline(transaction=False) as pipe:
            i = self.queue_piece(pipe, tree_id, key, blob, n_pieces)
            return pipe.execute()[i]

    def assemble(self, tree_id: str) -> str:
        """Merge the stored pieces of a tree whose pieces are all present and store it whole."""
        keys = [_s(k) for k in self.r.hkeys(self.key(f"pieces:{tree_id}")) if k != b"#n"]
        if not keys:  # assembled already (the pieces are deleted in the same script that stores the tree)
            return "duplicate"
        blobs = self.r.mget([self.key(f"piece:{tree_id}:{k}") for k in keys])
        msgs = sorted((decode(blob, self.limits) for blob in blobs), key=lambda m: m.seq)
        tree = msgs[0].tree
        for m in msgs[1:]:
            tree.merge(m.tree)
        whole = SubtreeMsg(key=f"{tree_id}/tree", actor_id=msgs[-1].actor_id, seq=0, tree=tree, final=True,
                           n_pieces=1)
        return _s(self.store_whole(tree_id, encode(whole), min_version(tree), single=False))

    def count(self, pipe, name: str, by: int = 1) -> None:
        pipe.hincrby(self.key("counters"), name, by)

    # ------------------------------------------------------------------------------------ reading
    def counters(self) -> dict[str, int]:
        return {_s(k): int(v) for k, v in self.r.hgetall(self.key("counters")).items()}

    def learner_version(self) -> int:
        v = self.r.get(self.key("learner_version"))
        return int(v) if v is not None else 0

    def set_learner_version(self, version: int) -> None:
        self.r.set(self.key("learner_version"), version)

    def load(self, tree_id: str) -> Tree | None:
        blob = self.r.get(self.key(f"tree:{tree_id}"))
        return None if blob is None else decode(blob, self.limits).tree

    def blobs(self, tree_ids: list[str]) -> list[bytes | None]:
        """The stored codec bytes of complete trees (None where a tree is not stored)."""
        return self.r.mget([self.key(f"tree:{t}") for t in tree_ids]) if tree_ids else []

    def archive(self, trees: list[tuple[str, bytes, int]]) -> None:
        """Keep complete trees (id, codec bytes, oldest segment version) for replay, export and inspect, outside
        the learner's stream and counters (offline training copies what it trains into its own store)."""
        with self.r.pipeline(transaction=False) as pipe:
            for tree_id, blob, version in trees:
                pipe.set(self.key(f"tree:{tree_id}"), blob)
                pipe.zadd(self.key("by_version"), {tree_id: version})
            pipe.execute()

    def load_many(self, tree_ids: list[str]) -> list[Tree | None]:
        return [None if b is None else decode(b, self.limits).tree for b in self.blobs(tree_ids)]

    def tree_ids(self, min_version: float = float("-inf"), max_version: float = float("inf")) -> list[str]:
        """Stored trees whose oldest segment version lies in [min_version, max_version], oldest first."""
        lo = "-inf" if min_version == float("-inf") else int(min_version)
        hi = "+inf" if max_version == float("inf") else int(max_version)
        return [_s(t) for t in self.r.zrangebyscore(self.key("by_version"), lo, hi)]

    def iter_trees(self, min_version: float = float("-inf"), max_version: float = float("inf"),
                   chunk: int = 64) -> Iterator[Tree]:
        ids = self.tree_ids(min_version, max_version)
        for i in range(0, len(ids), chunk):
            yield from (t for t in self.load_many(ids[i:i + chunk]) if t is not None)

    # ------------------------------------------------------------------------------------ learner
    def consume(self, entries: list[tuple[str, str]], learner_version: int) -> int:
        """Entries [(entry id, tree id)] the learner trained at `learner_version`, before the checkpoint that holds
        the update: counted as consumed and out of the admission count, but still pending (see `ack`);
        returns how many were new."""
        return int(self._consume(args=[self.p, learner_version, *(e for e, _ in entries)]))

    def reopen_trained(self) -> int:
        """A resumed learner's entries trained after its checkpoint: unconsumed again; returns how many."""
        return int(self._reopen(args=[self.p]))

    def note_published(self, version: int) -> int:
        """Record that `version` was published; returns the highest version ever published in the run."""
        return int(self._note_published(args=[self.p, version]))

    def version_high(self) -> int:
        """The highest policy version ever published in the run (-1 before the first)."""
        v = self.r.get(self.key("version_high"))
        return int(v) if v is not None else -1

    def add_lineage_gap(self, after: int, resume: int) -> None:
        """A learner resumed at version `after` (its checkpoint) republishes those weights as `resume`: the
        versions in between were published by weights that are gone."""
        self.r.rpush(self.key("lineage_gaps"), f"{after}:{resume}")

    def lineage_gaps(self) -> list[tuple[int, int]]:
        return [tuple(int(x) for x in _s(g).split(":")) for g in self.r.lrange(self.key("lineage_gaps"), 0, -1)]

    def ack(self, entries: list[tuple[str, str]], kind: str = "consumed", learner_version: int | None = None) -> int:
        """Acknowledge stream entries [(entry id, tree id)], apply retention; returns how many were new. An entry
        `consume` counted already is not counted again."""
        if not entries and learner_version is None:  # nothing to do: no round trip (callers ack per read)
            return 0
        args = [self.p, kind, self.retention, self.retention_keep, self.tombstone_seconds,
                "" if learner_version is None else learner_version]
        for entry_id, tree_id in entries:
            args += [entry_id, tree_id]
        return int(self._ack(args=args))

    def save_advantages(self, records: list[AdvantageRecord]) -> None:
        """The advantages the learner trained a batch's trees with, in one write (read by export and inspect)."""
        if records:
            self.r.hset(self.key("advantages"), mapping={
                rec.tree_id: msgpack.packb({"level": rec.level, "node_ids": [int(n) for n in rec.values],
                                            "values": [float(v) for v in rec.values.values()],
                                            "trained_version": int(rec.trained_version)})
                for rec in records})

    def advantages(self, tree_id: str) -> AdvantageRecord | None:
        """What the learner saved for `tree_id` (the last training of it), or None."""
        blob = self.r.hget(self.key("advantages"), tree_id)
        if blob is None:
            return None
        d = msgpack.unpackb(blob)
        return AdvantageRecord(tree_id, d["level"], dict(zip(d["node_ids"], d["values"], strict=True)),
                               d["trained_version"])

    # ------------------------------------------------------------------------------------ prompts and leases
    def add_prompts(self, prompts: list[Prompt]) -> None:
        """Append prompts to the queue actors are dealt from."""
        with self.r.pipeline() as pipe:
            for p in prompts:
                pipe.hset(self.key("prompt_data"), p.prompt_id, msgpack.packb({"prompt": p.prompt, "answer": p.answer}))
                pipe.rpush(self.key("prompts"), p.prompt_id)
            pipe.execute()

    def queued_prompts(self) -> list[str]:
        return [_s(p) for p in self.r.lrange(self.key("prompts"), 0, -1)]

    def active_leases(self) -> dict[str, str]:
        """tree id -> actor id of every unexpired, incomplete lease."""
        return {_s(k): _s(v) for k, v in self.r.hgetall(self.key("leases")).items()}

    def admission_state(self) -> tuple[int, int, int]:
        """(unconsumed complete trees, active leases, learner version) in one round trip."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hget(self.key("counters"), "unconsumed")
            pipe.hlen(self.key("leases"))
            pipe.get(self.key("learner_version"))
            u, n_leases, v = pipe.execute()
        return int(u or 0), int(n_leases), int(v or 0)

    def lease(self, actor_id: str, n: int, deadline: float) -> list[tuple[str, Prompt]]:
        """Deal up to `n` prompts to `actor_id` until `deadline`: [(tree id, prompt)]."""
        flat = self._lease(args=[self.p, actor_id, n, repr(deadline)])
        pairs = [(_s(flat[i]), _s(flat[i + 1])) for i in range(0, len(flat), 2)]
        if not pairs:
            return []
        data = self.r.hmget(self.key("prompt_data"), [pid for _, pid in pairs])
        out = []
        for (tid, pid), blob in zip(pairs, data, strict=True):
            d = msgpack.unpackb(blob)
            out.append((tid, Prompt(prompt_id=pid, prompt=d["prompt"], answer=d["answer"])))
        return out

    def heartbeat(self, actor_id: str, deadline: float, pipe=None):
        """Renew every lease `actor_id` holds until `deadline`; returns how many (or queues it on `pipe`)."""
        return self._heartbeat(args=[self.p, actor_id, repr(deadline)], client=self.r if pipe is None else pipe)

    def expire_leases(self, now: float) -> list[ExpiredLease]:
        """Leases past their deadline: prompt back to the queue head, partial tree discarded (counted)."""
        flat = self._expire(args=[self.p, repr(now), self.tombstone_seconds])
        return [ExpiredLease(_s(flat[i]), _s(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]


def min_version(tree: Tree) -> int:
    """The staleness key of a tree: its oldest segment's policy version (0 for a tree without segments)."""
    return int(np.min(tree.versions)) if len(tree.versions) else 0
