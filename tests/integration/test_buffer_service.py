"""The buffer service over real ZeroMQ (loopback) into a real redis-server: acks after storage,
back-pressure, leases, admission, CURVE, a crash (kill -9) mid-stream, a Redis crash, and a flood of
malformed messages."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import yaml
import zmq

from buffer.client import BatchSource, BufferClient
from buffer.redis_server import free_port
from buffer.service import BufferService
from buffer.store import Prompt, TreeStore
from protocol.codec import SCHEMA_VERSION, decode, encode
from protocol.config.pipeline import PipelineConfig
from protocol.messages import ErrorMsg, SubtreeMsg, WeightChunk
from protocol.security import generate_keypair
from protocol.tree import Tree
from tests.factories import example_tree, frame, same
from tests.fixtures.redis import pieces_of

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def make_config(redis_url: str, **buffer) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "run": {"run_id": "run"},
        "buffer": {"ingest_address": f"tcp://127.0.0.1:{free_port()}", "redis_url": redis_url,
                   "resend_timeout_s": 0.5, "backpressure_wait_s": 0.05, "prompt_feed": False, **buffer},
        "learner": {"prompts_per_step": 2},
    })


def tree(i: int, version: int = 0, n_leaves: int = 4) -> Tree:
    t = example_tree(n_leaves=n_leaves, seed=i)
    t.tree_id, t.run_id = f"t{i}", "run"
    t.versions = np.full(len(t.versions), version, np.int32)
    return t


class ThreadService:
    """The service in a thread of the test process."""

    def __init__(self, cfg: PipelineConfig, client):
        self.service = BufferService(cfg, client)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.service.serve, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.service.close()


def start_process(cfg: PipelineConfig, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "buffer.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    log = (tmp_path / "buffer.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "treepo.cli", "buffer", "--config", str(path)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_for(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("curve", [False, True])
def test_pieces_are_acked_after_redis_holds_the_assembled_tree(redis_server, redis_client, curve):
    cfg = make_config(redis_server.url)
    client_cfg = cfg.security
    if curve:
        server_pub, server_sec = generate_keypair()
        actor_pub, actor_sec = generate_keypair()
        cfg.security = cfg.security.model_copy(update=dict(curve_public_key=server_pub, curve_secret_key=server_sec,
                                                           authorized_keys=[actor_pub]))
        client_cfg = cfg.security.model_copy(update=dict(curve_public_key=actor_pub, curve_secret_key=actor_sec,
                                                         server_public_key=server_pub, authorized_keys=[]))
    svc = ThreadService(cfg, redis_client)
    store = svc.service.store
    acked: list[str] = []

    def on_ack(key: str, _s: float) -> None:  # an ack means Redis holds the piece (and the tree once complete)
        tid, seq = key.split("/")
        if seq == "2":
            assert store.load(tid) is not None
        else:
            assert redis_client.hexists(store.key(f"pieces:{tid}"), key) or store.load(tid) is not None
        acked.append(key)

    client = BufferClient(cfg.buffer.ingest_address, "actor-0", cfg.buffer, client_cfg, on_ack=on_ack)
    trees = [tree(i) for i in range(6)]
    for t in trees:
        for p in pieces_of(t, 3):
            client.send(p, timeout_s=10)
    client.flush(10)
    client.send(pieces_of(trees[0], 3)[1], timeout_s=10)  # a re-sent piece
    client.flush(10)
    client.close()
    svc.close()
    assert len(acked) == 19 and client.refused == []
    for t in trees:
        assert same(store.load(t.tree_id).segments, t.segments)
    c = store.counters()
    assert (c["trees_stored"], c["pieces_stored"], c["duplicate_pieces"]) == (6, 18, 1)
    assert redis_client.xlen(store.key("stream")) == 6


def test_actors_wait_under_back_pressure_and_none_is_dropped(redis_server, redis_client):
    cfg = make_config(redis_server.url, max_unconsumed_trees=2)
    svc = ThreadService(cfg, redis_client)
    client = BufferClient(cfg.buffer.ingest_address, "actor-0", cfg.buffer)
    for i in range(4):
        client.send(pieces_of(tree(i), 1)[0], timeout_s=10)
    wait_for(lambda: client.poll(0.02) or (client.backpressure > 0 and client.acked == 2))
    assert sorted(client.unacked) == ["t2/0", "t3/0"]
    source = BatchSource.from_config(svc.service.store, cfg)
    consumed: list[str] = []
    while len(consumed) < 4:
        batch = source.next_batch(2, learner_version=0, timeout_s=0.2)
        source.commit(batch)
        consumed += [t.tree_id for t in batch.trees]
        client.poll(0.05)
    client.flush(10)
    client.close()
    svc.close()
    assert consumed == ["t0", "t1", "t2", "t3"] and client.acked == 4 and client.refused == []


def test_admission_and_lease_expiry_through_the_service(redis_server, redis_client):
    cfg = make_config(redis_server.url, lease_seconds=0.6, max_staleness=0)
    store = TreeStore.from_config(redis_client, cfg)
    store.add_prompts([Prompt(f"p{i}", f"question {i}", str(i)) for i in range(3)])
    svc = ThreadService(cfg, redis_client)
    dead = BufferClient(cfg.buffer.ingest_address, "actor-dead", cfg.buffer)
    live = BufferClient(cfg.buffer.ingest_address, "actor-live", cfg.buffer)
    # S=0, 2 trees per step: a window of 2 trees; the dead actor takes one lease, the live one the other
    g = dead.request_prompts(1, policy_version=0)
    assert [(x.prompt_id, x.prompt, x.answer) for x in g.leases] == [("p0", "question 0", "0")] and g.reason == ""
    g2 = live.request_prompts(5, policy_version=0)
    assert [x.prompt_id for x in g2.leases] == ["p1"] and g2.reason == "no_permit" and g2.retry_after_s == 0.05
    t = example_tree(seed=7)
    t.tree_id, t.run_id = g.leases[0].tree_id, "run"
    first, second = pieces_of(t, 2, actor_id="actor-dead")
    dead.send(first)
    dead.flush(5)
    for _ in range(6):  # heartbeats keep both leases alive past lease_seconds
        dead.heartbeat()
        live.heartbeat()
        time.sleep(0.2)
    assert sorted(store.active_leases().values()) == sorted([dead.session, live.session])
    # the dead actor stops; the live one keeps beating until the dead lease expires, and so does a new process
    # under the dead one's actor id (a restart): it is another session, so it does not renew the dead leases
    reborn = BufferClient(cfg.buffer.ingest_address, "actor-dead", cfg.buffer)
    assert reborn.session != dead.session and reborn.actor_id == dead.actor_id
    deadline = time.monotonic() + 5
    while dead.session in store.active_leases().values():
        assert time.monotonic() < deadline
        live.heartbeat()
        reborn.heartbeat()
        time.sleep(0.1)
    reborn.close()
    c = store.counters()
    assert (c["expired_leases"], c["discarded_partial_trees"], c["discarded_pieces"]) == (1, 1, 1)
    assert store.queued_prompts() == ["p0", "p2"]
    g3 = live.request_prompts(1, policy_version=0)
    assert [x.prompt_id for x in g3.leases] == ["p0"] and g3.leases[0].tree_id != t.tree_id
    dead.send(second)  # the dead actor comes back too late
    dead.flush(5)
    assert [(a.key, a.reason) for a in dead.refused] == [(second.key, "lease_expired")]
    for c_ in (dead, live):
        c_.close()
    svc.close()


def test_kill_9_while_actors_stream_loses_and_duplicates_nothing(redis_server, redis_client, tmp_path):
    cfg = make_config(redis_server.url)
    proc = start_process(cfg, tmp_path)
    n_actors, per_actor = 3, 30
    acked: list[list[str]] = [[] for _ in range(n_actors)]
    errors: list[BaseException] = []

    def actor(a: int) -> None:
        try:
            client = BufferClient(cfg.buffer.ingest_address, f"actor-{a}", cfg.buffer,
                                  on_ack=lambda k, _s: acked[a].append(k))
            for i in range(per_actor):
                for p in pieces_of(tree(a * 1000 + i), 2, actor_id=f"actor-{a}"):
                    client.send(p, timeout_s=60)
                time.sleep(0.005)
            client.flush(60)
            client.close()
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=actor, args=(a,)) for a in range(n_actors)]
    for th in threads:
        th.start()
    wait_for(lambda: sum(map(len, acked)) >= 40)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    acked_before = {k for keys in acked for k in keys}
    assert 40 <= len(acked_before) < 2 * n_actors * per_actor
    proc = start_process(cfg, tmp_path)
    for th in threads:
        th.join(90)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert errors == []
    store = TreeStore(redis_client, "run")
    expected = {f"t{a * 1000 + i}" for a in range(n_actors) for i in range(per_actor)}
    entries = redis_client.xrange(store.key("stream"))
    ids = [f[b"tree"].decode() for _, f in entries]
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    assert store.counters()["trees_stored"] == len(expected)
    for tid in sorted(expected)[::15]:
        assert same(store.load(tid).segments, tree(int(tid[1:])).segments)
    assert {k.split("/")[0] for k in acked_before} <= set(ids)


def test_redis_crash_keeps_acknowledged_trees_with_aof_everysec(redis_factory, tmp_path):
    server = redis_factory()
    store = TreeStore(server.client(), "run")
    trees = [tree(i, version=i) for i in range(5)]
    for t in trees:
        store.store_whole(t.tree_id, encode(SubtreeMsg(key=f"{t.tree_id}/0", actor_id="a", seq=0, tree=t, final=True,
                                                       n_pieces=1)), i := int(t.versions.min()))
    assert i == 4
    read = BatchSource(store, "learner-0").next_batch(2, learner_version=4, timeout_s=0.1)
    assert len(read.trees) == 2
    time.sleep(1.5)  # appendfsync everysec: what is older than a second is on disk
    server.kill()
    again = redis_factory(data_dir=server.data_dir, port=server.port)
    store = TreeStore(again.client(), "run")
    for t in trees:
        assert same(store.load(t.tree_id), t)
    assert store.tree_ids() == [t.tree_id for t in trees]
    assert store.counters()["unconsumed"] == 5
    # the learner's read-but-unacknowledged trees survive as pending and come again
    src = BatchSource(store, "learner-0")
    assert [tid for _, tid in src.next_batch(5, 4, 0.1).entries] == ["t0", "t1", "t2", "t3", "t4"]


def _malformed(i: int, big: bytes) -> list[bytes]:
    good = tree(0)
    bad_tree = tree(1)
    bad_tree.seg_lens = bad_tree.seg_lens[:-1]
    kinds = [
        lambda: [np.random.default_rng(i).bytes(1 + i % 50)],
        lambda: [frame({"not": "an envelope", "i": i})],
        lambda: [frame([SCHEMA_VERSION[0] + 1, 0, "subtree", {}])],
        lambda: [frame([SCHEMA_VERSION[0], 0, "no_such_type", {"i": i}])],
        lambda: [encode(SubtreeMsg(key=f"x/{i}", actor_id="evil", seq=0, tree=bad_tree, final=True, n_pieces=1))],
        lambda: [encode(SubtreeMsg(key=f"x/{i}", actor_id="evil", seq=0, tree=good, final=True, n_pieces=0))],
        lambda: [big],
        lambda: [b"frame one", b"frame two"],
        lambda: [encode(WeightChunk(version=i, index=0, offset=0, nbytes=1))],
        lambda: [encode(SubtreeMsg(key="k", actor_id="evil", seq=0, tree=good))[:-7]],
    ]
    return kinds[i % len(kinds)]()


def test_ten_thousand_malformed_messages_are_counted_and_service_stays_flat(redis_server, redis_client, tmp_path):
    cfg = make_config(redis_server.url)
    cfg.limits.max_message_bytes = 64 * 1024
    proc = start_process(cfg, tmp_path)
    store = TreeStore(redis_client, "run")
    ctx = zmq.Context.instance()
    evil = ctx.socket(zmq.DEALER)
    evil.setsockopt(zmq.ROUTING_ID, b"evil-actor")
    evil.setsockopt(zmq.LINGER, 0)
    evil.connect(cfg.buffer.ingest_address)
    big = os.urandom(100 * 1024)

    def malformed_total() -> int:
        return sum(v for k, v in store.counters().items() if k.startswith("malformed:"))

    for i in range(2000):
        evil.send_multipart(_malformed(i, big))
    wait_for(lambda: malformed_total() == 2000)
    rss_warm = rss_kib(proc.pid)
    for i in range(2000, 10_000):
        evil.send_multipart(_malformed(i, big))
        if i % 500 == 0:
            while evil.poll(0):
                evil.recv_multipart()  # the ErrorMsg replies
    wait_for(lambda: malformed_total() == 10_000)
    good = BufferClient(cfg.buffer.ingest_address, "actor-0", cfg.buffer)
    for i in range(5):
        good.send(pieces_of(tree(i), 1)[0])
    good.flush(10)
    good.close()
    evil.close()
    rss_end = rss_kib(proc.pid)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    c = store.counters()
    assert {k: v for k, v in c.items() if k.startswith("malformed:")} == {
        "malformed:malformed": 4000, "malformed:version": 1000, "malformed:type": 1000, "malformed:n_pieces": 1000,
        "malformed:too_large": 1000, "malformed:frames": 1000, "malformed:unexpected": 1000}
    assert c["trees_stored"] == 5
    assert rss_end - rss_warm < 8 * 1024, (rss_warm, rss_end)
    log = (tmp_path / "buffer.log").read_text()
    assert "dropped malformed message from b'evil-actor'" in log and "more dropped since the last line" in log


def test_an_actor_killed_mid_pool_loses_no_acknowledged_piece_and_its_leases_return(redis_server, redis_client):
    """A TreePO pool of 3 slots fed by real leases: p0's tree needs 10 steps, every other one 2. p1, p2 end at
    step 2 and p3, p4 take their slots; they end at step 4 and p5, p6 take theirs. The actor dies before step 6
    (an exception out of the pool, then no more heartbeats): the finished trees are whole in Redis, and the three
    open trees' leases (p0, p5, p6) expire, are counted, and return their prompts to the queue."""
    from actors.tree_sampler import TreePOSampler
    from protocol.config.rollout import RolloutConfig
    from tests.fixtures.engines import ScriptedEngine
    from treepo.prompts import PromptItem

    cfg = make_config(redis_server.url, lease_seconds=0.6, max_staleness=4)
    store = TreeStore.from_config(redis_client, cfg)
    store.add_prompts([Prompt(f"p{i}", f"question {i}", str(i)) for i in range(8)])
    svc = ThreadService(cfg, redis_client)
    actor = BufferClient(cfg.buffer.ingest_address, "actor-pool", cfg.buffer)
    engine = ScriptedEngine()
    engine.stops = lambda r, g: r.token_ids[0] != 0 and len(r.token_ids) > 5  # p0's paths never stop early

    def items(leases) -> list[PromptItem]:
        return [PromptItem(prompt_id=x.prompt_id, text=x.prompt, answer=x.answer, tree_id=x.tree_id,
                           token_ids=np.arange(10 * int(x.prompt_id[1:]), 10 * int(x.prompt_id[1:]) + 5,
                                               dtype=np.int32)) for x in leases]

    class Killed(Exception):
        pass

    def before_step() -> None:
        if len(engine.calls) == 5:
            raise Killed
        actor.heartbeat()

    sampler = TreePOSampler(engine, RolloutConfig(segment_tokens=4, max_depth=10, width=4), run_id="run",
                            before_step=before_step)
    finished = []
    with pytest.raises(Killed):
        for piece in sampler.grow(items(actor.request_prompts(3, policy_version=0).leases), slots=3,
                                  refill=lambda free: items(actor.request_prompts(free, policy_version=0).leases)):
            actor.send(piece.message("actor-pool"))
            if piece.final:
                finished.append(piece.whole)
    actor.flush(5)  # what was sent before the death is acknowledged
    assert sorted(t.prompt_id for t in finished) == ["p1", "p2", "p3", "p4"] and not actor.refused
    leased = store.active_leases()
    assert sorted(leased.values()) == [actor.session] * 3
    before = store.counters()
    deadline = time.monotonic() + 5
    while store.active_leases():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    c = store.counters()
    assert c["expired_leases"] - before.get("expired_leases", 0) == 3
    assert c.get("discarded_partial_trees", 0) == 0  # p0, p5 and p6 had sent no piece yet
    assert sorted(store.queued_prompts()) == ["p0", "p5", "p6", "p7"]
    for t in finished:  # every finished tree is whole in Redis, with exactly w leaves
        stored = store.load(t.tree_id)
        assert stored is not None and same(stored, t) and len(stored.leaf_ids) == 4
    actor.close()
    svc.close()


def test_frames_that_once_ended_the_buffer_are_dropped_between_valid_trees(redis_server, redis_client, tmp_path,
                                                                           monkeypatch):
    """A frame whose major version is an array reference (decode raised ValueError: the buffer exited), a complete
    tree without leaves, and a message whose handling raises are each counted, answered and dropped; the trees
    around them are stored and the service goes on."""
    cfg = make_config(redis_server.url)
    service = ThreadService(cfg, redis_client)
    real = service.service._queue_piece

    def failing(pipe, replies, pending, sender, msg, raw):
        if msg.key == "boom/0":
            raise KeyError("injected")
        real(pipe, replies, pending, sender, msg, raw)

    monkeypatch.setattr(service.service, "_queue_piece", failing)
    store = TreeStore(redis_client, "run")
    evil = zmq.Context.instance().socket(zmq.DEALER)
    evil.setsockopt(zmq.LINGER, 0)
    evil.connect(cfg.buffer.ingest_address)
    good = BufferClient(cfg.buffer.ingest_address, "actor-0", cfg.buffer)
    try:
        array_version = frame([msgpack.ExtType(1, struct.pack("<BQQ", 5, 0, 4)), 0, "ack", {"key": "k"}], bytes(8))
        base = tree(9)
        empty = Tree.build(tree_id="empty", prompt_id="p", run_id="run", prompt_token_ids=base.prompt_token_ids,
                           sampling=base.sampling, segments=[], leaves=[])
        good.send(pieces_of(tree(0), 1)[0])
        good.flush(10)
        for wire in (array_version, encode(SubtreeMsg(key="e/0", actor_id="evil", seq=0, tree=empty, final=True,
                                                      n_pieces=1)),
                     encode(SubtreeMsg(key="boom/0", actor_id="evil", seq=0, tree=tree(5), final=True, n_pieces=1))):
            evil.send(wire)
            assert evil.poll(5000)
            assert isinstance(decode(evil.recv()), ErrorMsg)
        good.send(pieces_of(tree(1), 1)[0])
        good.flush(10)
        assert service.thread.is_alive()
        c = store.counters()
        assert (c["malformed:version"], c["malformed:empty_tree"], c["malformed:unhandled"]) == (1, 1, 1)
        assert c["trees_stored"] == 2 and store.load("t0") is not None and store.load("t1") is not None
    finally:
        good.close()
        evil.close()
        service.close()


def test_a_redis_crash_is_ridden_out_by_the_clients_and_nothing_acknowledged_is_lost(redis_factory):
    """kill -9 of redis-server while the buffer serves an actor and the learner reads: both retry with backoff
    (OutageRetry) until it is back (restarted on its AOF), then carry on; every acknowledged tree is stored."""
    from buffer.redis_server import OutageRetry

    server = redis_factory()
    retry = OutageRetry(within_s=30)
    cfg = make_config(server.url)
    client = server.client(retry=retry)
    service = ThreadService(cfg, client)
    actor = BufferClient(cfg.buffer.ingest_address, "actor-0", cfg.buffer)
    try:
        for i in range(3):
            actor.send(pieces_of(tree(i), 1)[0])
        actor.flush(10)
        time.sleep(1.2)  # appendfsync everysec
        server.kill()
        for i in range(3, 6):  # sent while Redis is down: the service retries and acknowledges once it is back
            actor.send(pieces_of(tree(i), 1)[0])
        learner_retry = OutageRetry(within_s=30)
        read: list = []

        def learner() -> None:  # reads while Redis is down: waits the outage out as well
            source = BatchSource(TreeStore(server.client(retry=learner_retry), "run"), "learner-0")
            read.append((source, source.next_batch(6, learner_version=0, timeout_s=20)))

        reader = threading.Thread(target=learner)
        reader.start()
        time.sleep(2.0)
        # restarted here, not in a helper thread: PDEATHSIG follows the thread that started the server
        redis_factory(data_dir=server.data_dir, port=server.port)
        actor.flush(20)
        reader.join(30)
        (source, batch), = read
        assert service.thread.is_alive() and retry.failures > 0 and learner_retry.failures > 0
        assert sorted(t.tree_id for t in batch.trees) == [f"t{i}" for i in range(6)]
        assert source.commit(batch) == 6
    finally:
        actor.close()
        service.close()
