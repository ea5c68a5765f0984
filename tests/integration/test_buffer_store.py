"""The Redis tree store and the learner's BatchSource against a real redis-server (flushed per test)."""

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from buffer.client import BatchSource
from buffer.export import export
from buffer.replay import replay, replay_into
from buffer.store import STAGED_TTL_S, AdvantageRecord, Prompt, TreeStore
from protocol.codec import encode
from protocol.messages import SubtreeMsg
from protocol.tree import Tree
from tests.factories import example_tree, same
from tests.fixtures.redis import pieces_of

pytestmark = pytest.mark.integration


def whole(tree: Tree) -> bytes:
    return encode(SubtreeMsg(key=f"{tree.tree_id}/0", actor_id="a", seq=0, tree=tree, final=True, n_pieces=1))


def versioned(seed: int, version: int) -> Tree:
    t = example_tree(seed=seed)
    t.versions = np.full(len(t.versions), version, np.int32)
    t.run_id = "run"
    return t


def test_a_whole_tree_is_stored_once_and_indexed(redis_client):
    store = TreeStore(redis_client, "run")
    tree = versioned(0, 3)
    assert store.store_whole("t0", whole(tree), 3) == b"stored"
    assert store.store_whole("t0", whole(tree), 3) == b"duplicate"
    assert store.counters() == {"trees_stored": 1, "unconsumed": 1, "pieces_stored": 1, "duplicate_pieces": 1}
    assert redis_client.xlen(store.key("stream")) == 1
    assert store.tree_ids(3, 3) == ["t0"] and store.tree_ids(4) == []
    assert same(store.load("t0"), tree)


def test_pieces_out_of_order_assemble_into_the_tree(redis_client):
    store = TreeStore(redis_client, "run")
    tree = example_tree(n_leaves=6, seed=1)
    p0, p1, p2 = pieces_of(tree, 3)
    # final piece first, then a duplicate, then the rest
    assert [x.decode() if isinstance(x, bytes) else x for x in store.store_piece("t1", p2.key, encode(p2), 3)] == [
        "stored", 1, 3]
    assert store.store_piece("t1", p2.key, encode(p2), 3)[:2] == [b"duplicate", 1]
    assert store.store_piece("t1", p0.key, encode(p0), 0)[1:] == [2, 3]
    status, held, total = store.store_piece("t1", p1.key, encode(p1), 0)
    assert (status, held, total) == (b"stored", 3, 3)
    assert store.assemble("t1") == "stored"
    assert store.assemble("t1") == "duplicate"  # a re-sent completing piece runs the assembly again: no change
    got = store.load("t1")
    assert same(got.segments, tree.segments) and same(got.leaves, tree.leaves)
    assert redis_client.exists(store.key("pieces:t1")) == 0
    assert redis_client.keys(store.key("piece:*")) == []  # every held piece deleted with the assembly
    assert redis_client.keys(store.key("in:*")) == []  # every staged blob renamed into place or deleted
    assert store.store_piece("t1", p0.key, encode(p0), 0)[0] == b"duplicate"  # after completion
    c = store.counters()
    assert (c["trees_stored"], c["pieces_stored"], c["duplicate_pieces"], c["unconsumed"]) == (1, 3, 2, 1)
    assert redis_client.xlen(store.key("stream")) == 1


def test_back_pressure_at_the_unconsumed_cap(redis_client):
    store = TreeStore(redis_client, "run", max_unconsumed=2)
    src = BatchSource(store)
    for i in range(2):
        assert store.store_whole(f"t{i}", whole(versioned(i, 0)), 0) == b"stored"
    assert store.store_whole("t2", whole(versioned(2, 0)), 0) == b"backpressure"
    p0 = pieces_of(versioned(3, 0), 2)[0]
    assert store.store_piece("t3", p0.key, encode(p0), 0)[0] == b"backpressure"
    assert store.counters()["backpressure"] == 2
    batch = src.next_batch(1, learner_version=0, timeout_s=0.1)
    src.commit(batch)
    assert store.store_whole("t2", whole(versioned(2, 0)), 0) == b"stored"


def test_learner_crash_before_ack_gets_the_trees_again(redis_client):
    store = TreeStore(redis_client, "run")
    for i in range(5):
        store.store_whole(f"t{i}", whole(versioned(i, 0)), 0)
    first = BatchSource(store, "learner-0")
    batch = first.next_batch(3, 0, timeout_s=0.1)
    assert [tid for _, tid in batch.entries] == ["t0", "t1", "t2"]
    # "crash": no commit. The same consumer restarted reads its pending trees first, then new ones
    again = BatchSource(store, "learner-0")
    assert [tid for _, tid in again.next_batch(3, 0, 0.1).entries] == ["t0", "t1", "t2"]
    assert [tid for _, tid in again.next_batch(3, 0, 0.1).entries] == ["t3", "t4"]
    # a consumer with another name takes over what was left unacknowledged (idle >= claim_idle_s)
    other = BatchSource(store, "learner-1", claim_idle_s=0)
    taken = other.next_batch(10, 0, 0.1)
    assert sorted(tid for _, tid in taken.entries) == ["t0", "t1", "t2", "t3", "t4"]
    assert other.commit(taken, learner_version=1) == 5
    assert other.commit(taken, learner_version=1) == 0
    for name in ("learner-0", "learner-1", "learner-2"):
        assert BatchSource(store, name, claim_idle_s=0).next_batch(10, 1, 0.1).entries == []
    c = store.counters()
    assert (c["consumed"], c["unconsumed"]) == (5, 0) and store.learner_version() == 1
    assert redis_client.xlen(store.key("stream")) == 0


def test_stale_trees_are_dropped_and_counted(redis_client):
    store = TreeStore(redis_client, "run")
    for i, v in enumerate([5, 6, 10, 4]):
        store.store_whole(f"t{i}", whole(versioned(i, v)), v)
    src = BatchSource(store, max_staleness=4)
    batch = src.next_batch(4, learner_version=10, timeout_s=0.2)
    assert [tid for _, tid in batch.entries] == ["t1", "t2"]  # 10-5=5 and 10-4=6 > 4
    assert [int(t.versions.min()) for t in batch.trees] == [6, 10]
    assert src.stale_drops == 2 and store.counters()["stale_drops"] == 2
    src.commit(batch)
    assert store.counters()["unconsumed"] == 0


@pytest.mark.parametrize("retention,kept", [("keep_all", 3), ("keep_last", 2), ("trim", 0)])
def test_retention_of_consumed_trees(redis_client, retention, kept):
    store = TreeStore(redis_client, "run", retention=retention, retention_keep=2)
    for i in range(3):
        store.store_whole(f"t{i}", whole(versioned(i, i)), i)
    src = BatchSource(store)
    src.commit(src.next_batch(3, 2, 0.1))
    assert store.tree_ids() == ["t0", "t1", "t2"][3 - kept:]
    assert sum(store.load(f"t{i}") is not None for i in range(3)) == kept
    # a late re-send of a consumed (maybe trimmed) tree changes nothing
    assert store.store_whole("t0", whole(versioned(0, 0)), 0) == b"duplicate"
    assert redis_client.xlen(store.key("stream")) == 0 and store.counters()["unconsumed"] == 0


def test_leases_expire_back_to_the_queue_and_discard_partial_trees(redis_client):
    store = TreeStore(redis_client, "run", tombstone_seconds=60)
    store.add_prompts([Prompt(f"p{i}", f"q{i}", str(i)) for i in range(3)])
    now = time.time()
    got = store.lease("a0", 2, now + 10)
    assert [(tid, p.prompt_id, p.prompt, p.answer) for tid, p in got] == [("p0@1", "p0", "q0", "0"),
                                                                          ("p1@2", "p1", "q1", "1")]
    assert store.queued_prompts() == ["p2"] and store.active_leases() == {"p0@1": "a0", "p1@2": "a0"}
    tree = example_tree(seed=5)
    tree.tree_id = "p0@1"
    p0, p1 = pieces_of(tree, 2)
    assert store.store_piece("p0@1", p0.key, encode(p0), 0)[0] == b"stored"
    assert store.expire_leases(now + 5) == []
    assert store.heartbeat("a0", now + 30) == 2
    assert store.expire_leases(now + 20) == []  # renewed
    expired = store.expire_leases(now + 31)
    assert [(e.tree_id, e.actor_id, e.discarded_pieces) for e in expired] == [("p0@1", "a0", 1), ("p1@2", "a0", 0)]
    assert sorted(store.queued_prompts()[:2]) == ["p0", "p1"] and store.queued_prompts()[2] == "p2"
    assert store.active_leases() == {}
    c = store.counters()
    assert (c["expired_leases"], c["discarded_partial_trees"], c["discarded_pieces"]) == (2, 1, 1)
    assert redis_client.exists(store.key("pieces:p0@1")) == 0
    assert redis_client.keys(store.key("piece:*")) == []
    # the dead actor's late pieces are refused: the prompt was dealt again under a new tree id
    assert store.store_piece("p0@1", p1.key, encode(p1), 2)[0] == b"expired"
    assert store.store_whole("p1@2", whole(versioned(1, 0)), 0) == b"expired"
    assert store.counters()["refused_expired"] == 2
    assert redis_client.keys(store.key("in:*")) == []  # refused blobs are not left behind
    again = store.lease("a1", 3, now + 100)
    assert sorted(p.prompt_id for _, p in again) == ["p0", "p1", "p2"]
    # completing a leased tree ends its lease
    tid = again[0][0]
    t = versioned(9, 0)
    t.tree_id = tid
    assert store.store_whole(tid, whole(t), 0) == b"stored"
    assert tid not in store.active_leases() and store.counters()["leases_completed"] == 1


def test_replay_by_version_range_and_into_another_run(redis_client):
    store = TreeStore(redis_client, "run")
    for v in range(1, 6):
        store.store_whole(f"t{v}", whole(versioned(v, v)), v)
    batches: list[list[str]] = []
    n = replay(store, lambda trees: batches.append([t.tree_id for t in trees]), min_version=2, max_version=4,
               batch_size=2)
    assert n == 3 and batches == [["t2", "t3"], ["t4"]]
    target = TreeStore(redis_client, "offline")
    assert replay_into(store, target, min_version=4) == 2
    assert replay_into(store, target, min_version=4) == 0
    got = BatchSource(target).next_batch(5, learner_version=0, timeout_s=0.1)
    assert [tid for _, tid in got.entries] == ["t4", "t5"] and same(got.trees[0], store.load("t4"))


def test_export_writes_a_row_per_leaf(redis_client, tmp_path):
    store = TreeStore(redis_client, "run")
    for v in (1, 2):
        store.store_whole(f"t{v}", whole(versioned(v, v)), v)
    store.save_advantages([AdvantageRecord("t2", "leaf", {2: 0.5, 3: -0.5}, 4),
                           AdvantageRecord("t1", "segment", {1: 0.25, 2: -0.25, 3: 1.0}, 3)])
    assert store.advantages("t2") == AdvantageRecord("t2", "leaf", {2: 0.5, 3: -0.5}, 4)
    assert export(store, tmp_path / "out.jsonl", "jsonl") == 8
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["tree_id"], r["leaf_id"]) for r in rows][:5] == [("t1", 2), ("t1", 3), ("t1", 5), ("t1", 6), ("t2", 2)]
    assert [r["advantage"] for r in rows[4:]] == [0.5, -0.5, None, None]  # none saved for leaves 5, 6
    assert [r["trained_version"] for r in rows] == [3] * 4 + [4] * 4
    # segment level: one value per segment of the path (paths 1-2, 1-3, 4-5, 4-6), None where untrained
    assert all(r["advantage"] is None for r in rows[:4])
    assert [r["segment_advantages"] for r in rows[:4]] == [[0.25, -0.25], [0.25, 1.0], [None, None], [None, None]]
    assert export(store, tmp_path / "out.parquet", "parquet", lambda ids: str(len(ids)), min_version=2) == 4
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["path_text"] for r in table] == ["16"] * 4 and table[0]["versions"] == [2, 2]


def test_offline_commands_on_an_embedded_redis(tmp_path, capsys):
    from buffer.redis_server import connect
    from protocol.config.pipeline import load_config
    from treepo.cli import main

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(f"run: {{run_id: run, output_dir: {tmp_path / 'out'}}}\n")
    cfg = load_config(cfg_path)
    with connect(cfg) as handle:  # no URL: an embedded redis-server with AOF under <output_dir>/redis
        assert handle.server is not None and (tmp_path / "out" / "redis" / "redis.url").exists()
        store = TreeStore.from_config(handle.client, cfg)
        for v in (1, 2, 3):
            store.store_whole(f"t{v}", whole(versioned(v, v)), v)
        # the commands find the running server instead of starting a second one on the same directory
        assert main(["inspect", "t2", "--config", str(cfg_path)]) == 0
        out = capsys.readouterr().out
        assert "t2 run=run prompt=p2 6 segments, 4 leaves" in out and "#1 v2 8 tok length" in out
        assert main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "x.parquet"), "--min-version", "2"]) == 0
        assert pq.read_table(tmp_path / "x.parquet").num_rows == 8
        assert main(["replay", "--config", str(cfg_path), "--batch", "2"]) == 0
        assert capsys.readouterr().out.splitlines()[-3:] == [
            "batch 0: 2 trees, 8 leaves, 96 tokens, versions 1..2", "batch 1: 1 trees, 4 leaves, 48 tokens, versions 3..3",
            "replayed 3 trees of run 'run'"]
        assert main(["replay", "--config", str(cfg_path), "--into-run", "again", "--max-version", "2"]) == 0
        assert TreeStore(handle.client, "again").tree_ids() == ["t1", "t2"]
        assert main(["inspect", "nope", "--config", str(cfg_path)]) == 1
    # stopped with SHUTDOWN: a new embedded server on the directory has the data back from the AOF
    with connect(cfg) as handle:
        assert TreeStore.from_config(handle.client, cfg).tree_ids() == ["t1", "t2", "t3"]


def test_a_staged_blob_whose_script_never_ran_expires(redis_client):
    store = TreeStore(redis_client, "run")
    with redis_client.pipeline(transaction=False) as pipe:
        staged = store._stage(pipe, whole(versioned(0, 0)))
        pipe.execute()  # the writer dies before its store script
    assert 0 < redis_client.ttl(staged) <= STAGED_TTL_S
    assert store.store_whole("t0", whole(versioned(0, 0)), 0) == b"stored"
    assert redis_client.ttl(store.key("tree:t0")) == -1  # the stored tree does not inherit the staged TTL
