"""Relay fan-out on loopback: the learner streams each version to `fanout` actors, the others get it from relay
actors, bit-exact; relays that die or corrupt a chunk are routed around; CURVE holds at every hop."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import zmq

from actors.weight_receiver import ZmqWeightSubscriber
from learner.weight_push import ZmqWeightPublisher
from protocol.codec import encode
from protocol.config.transport import SecurityConfig
from protocol.config.weights import WeightsConfig
from protocol.messages import Heartbeat
from protocol.security import generate_keypair

FAST = dict(heartbeat_s=0.1, peer_timeout_s=1.0, stall_timeout_s=2.0, send_timeout_s=5.0)


def model(seed: int, n: int = 6, width: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(width, width, generator=g) for i in range(n)}


def wait_until(cond, timeout_s=10.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def latest(sub, version, timeout_s=10.0):
    """The newest version `sub` hands over, once it is `version`."""
    got = None

    def arrived():
        nonlocal got
        polled = sub.poll_latest()
        got = polled if polled is not None else got
        return got is not None and got[0] == version
    wait_until(arrived, timeout_s, f"{sub.actor_id} to hold v{version}")
    return got[1]


def assert_same(got, sd):
    assert list(got) == list(sd) and all(torch.equal(got[k], t) for k, t in sd.items())


@pytest.fixture
def publisher():
    pubs = []

    def make(security=None, **kw):
        pub = ZmqWeightPublisher(WeightsConfig(address="tcp://127.0.0.1:*", **{**FAST, **kw}), security, run_id="run")
        pubs.append(pub)
        return pub

    yield make
    for p in pubs:
        p.close()


def test_seven_actors_with_fanout_two_get_every_version_bit_exact_and_the_learner_sends_two_copies(publisher):
    pub = publisher(fanout=2, chunk_bytes=64 * 1024)
    cfg = WeightsConfig(address=pub.address, **FAST, chunk_bytes=64 * 1024, fanout=2)
    subs = []
    for i in range(7):  # one at a time: the tree's shape is then fixed (a0, a1 direct; a2..a5 under them; a6 deeper)
        subs.append(ZmqWeightSubscriber(cfg, f"a{i}", run_id="run"))
        wait_until(lambda i=i: len(pub.routes()) == i + 1)
    routes = pub.routes()
    assert routes == {"a0": None, "a1": None, "a2": "a0", "a3": "a1", "a4": "a0", "a5": "a1", "a6": "a2"}
    wait_until(lambda: all(s.parent == (routes[s.actor_id] or "") for s in subs))
    model_bytes = sum(t.numel() * t.element_size() for t in model(0).values())
    for version in (1, 2, 3):
        sd = model(version)
        pub.publish(version, sd)
        for sub in subs:
            assert_same(latest(sub, version), sd)
        pub.wait_delivered(version, timeout_s=10, min_peers=7)
    assert model_bytes * 2 * 3 <= pub.bytes_sent <= model_bytes * 2 * 3 * 1.01  # 2 direct actors, 3 versions
    assert all(s.bad_digests == 0 and s.versions_received == [1, 2, 3] for s in subs)
    for sub in subs:
        sub.close()


def test_leaving_relays_rebalance_the_tree_and_a_joining_actor_gets_the_newest(publisher):
    pub = publisher(fanout=2)
    cfg = WeightsConfig(address=pub.address, **FAST, fanout=2)
    subs = {}
    for i in range(5):
        subs[f"a{i}"] = ZmqWeightSubscriber(cfg, f"a{i}")
        wait_until(lambda i=i: len(pub.routes()) == i + 1)
    pub.publish(1, model(1))
    pub.wait_delivered(1, timeout_s=10, min_peers=5)
    subs.pop("a0").close()  # a relay leaves (feeding a2 and a4): they are routed again, nobody stalls
    wait_until(lambda: "a0" not in pub.routes() and all(p != "a0" for p in pub.routes().values()))
    subs["a5"] = ZmqWeightSubscriber(cfg, "a5")
    sd = model(2)
    pub.publish(2, sd)
    pub.wait_delivered(2, timeout_s=10, min_peers=5)
    for sub in subs.values():
        assert_same(latest(sub, 2), sd)
    routes = pub.routes()
    assert sum(parent is None for parent in routes.values()) == 2 and set(routes) == set(subs)
    for sub in subs.values():
        sub.close()


def test_a_corrupt_chunk_from_a_relay_is_caught_by_its_digest_and_fetched_again_elsewhere(publisher):
    pub = publisher(fanout=1, chunk_bytes=64 * 1024)
    cfg = WeightsConfig(address=pub.address, **FAST, fanout=1, chunk_bytes=64 * 1024)
    relay = ZmqWeightSubscriber(cfg, "relay")
    wait_until(lambda: pub.routes() == {"relay": None})
    add = relay.relay.add

    def corrupting_add(chunk: bytes, payload: memoryview) -> None:  # the relay's memory flips a byte of chunk 1
        if len(relay.relay.current.frames) == 1 and relay.relay.current.version == 1:
            payload = bytearray(payload)
            payload[7] ^= 0xFF
            payload = memoryview(payload)
        add(chunk, payload)
    relay.relay.add = corrupting_add
    child = ZmqWeightSubscriber(cfg, "child")
    wait_until(lambda: child.parent == "relay")
    sd = model(1)
    pub.publish(1, sd)
    assert_same(latest(child, 1), sd)
    assert child.bad_digests == 1 and child.versions_received == [1]
    # routed around the relay it must avoid; that relay then moves under the child (the learner feeds one actor)
    wait_until(lambda: pub.routes() == {"relay": "child", "child": None})
    relay.close()
    child.close()


RELAY_PROCESS = textwrap.dedent("""
    import sys, time
    from actors.weight_receiver import ZmqWeightSubscriber
    from protocol.config.weights import WeightsConfig
    sub = ZmqWeightSubscriber(WeightsConfig.model_validate_json(sys.argv[1]), "relay")
    time.sleep(600)
""")


def test_a_relay_killed_mid_transfer_leaves_no_partial_version_and_its_children_get_the_newest(publisher):
    pub = publisher(fanout=1, chunk_bytes=16 * 1024, window=1)
    cfg = WeightsConfig(address=pub.address, **FAST, fanout=1, chunk_bytes=16 * 1024, window=1)
    relay = subprocess.Popen([sys.executable, "-c", RELAY_PROCESS, cfg.model_dump_json()],
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        wait_until(lambda: pub.routes() == {"relay": None}, 30, "the relay process to join")
        children = []
        for i in range(2):  # learner -> relay -> c0 -> c1
            children.append(ZmqWeightSubscriber(cfg, f"c{i}"))
            wait_until(lambda i=i: children[-1].parent == ("relay", "c0")[i])
        pub.publish(1, model(1))
        pub.wait_delivered(1, timeout_s=10, min_peers=3)
        big = model(2, n=16, width=512)  # 16 MiB in 1024 chunks, one credit at a time: a transfer of a while
        pub.publish(2, big)
        wait_until(lambda: all(c._header is not None and c._next_index > 10 for c in children), 10, "v2 under way")
        relay.send_signal(signal.SIGKILL)
        relay.wait()
        assert all(c.versions_received == [1] for c in children)  # v2 is partial: nothing handed over
        sd = model(3)
        pub.publish(3, sd)
        for child in children:
            got = latest(child, 3, timeout_s=20)
            assert_same(got, sd)
            assert child.versions_received[0] == 1 and child.versions_received[-1] == 3
        assert pub.routes() == {"c0": None, "c1": "c0"}  # c0 took the dead relay's slot, with its subtree
        for child in children:
            child.close()
    finally:
        relay.kill()


def test_with_curve_a_relay_serves_keyed_children_and_refuses_an_unkeyed_one(publisher):
    server, relay_pair, child_pair = generate_keypair(), generate_keypair(), generate_keypair()
    actors = [relay_pair[0], child_pair[0]]
    pub = publisher(SecurityConfig(curve_public_key=server[0], curve_secret_key=server[1], authorized_keys=actors),
                    fanout=1)
    cfg = WeightsConfig(address=pub.address, **FAST, fanout=1)

    def actor_security(pair):
        return SecurityConfig(curve_public_key=pair[0], curve_secret_key=pair[1], server_public_key=server[0],
                              authorized_keys=actors)
    relay = ZmqWeightSubscriber(cfg, "relay", actor_security(relay_pair))
    wait_until(lambda: pub.routes() == {"relay": None})
    child = ZmqWeightSubscriber(cfg, "child", actor_security(child_pair))
    wait_until(lambda: child.parent == "relay")
    sd = model(1)
    pub.publish(1, sd)
    assert_same(latest(child, 1), sd)
    ctx = zmq.Context()  # an unkeyed peer at the relay's address: its handshake fails, nothing reaches the relay
    plain = ctx.socket(zmq.DEALER)
    plain.linger = 0
    plain.connect(relay.relay.address)
    plain.send(encode(Heartbeat(sender="plain")))
    time.sleep(0.5)
    assert not plain.poll(0) and "plain" not in {p.name for p in relay.relay.server.peers.values()}
    plain.close()
    ctx.term()
    relay.close()
    child.close()
