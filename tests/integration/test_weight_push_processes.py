"""Weight push across processes with CURVE on: a learner publishes versions faster than actors apply them;
the authorized actor process applies only increasing versions between its "tree steps" and ends on the
newest, bit-exact; an actor process whose key is not authorized receives nothing."""

import multiprocessing as mp
import time

import pytest
import torch

from learner.weight_push import ZmqWeightPublisher
from protocol.config.transport import SecurityConfig
from protocol.config.weights import WeightsConfig
from protocol.security import generate_keypair

pytestmark = pytest.mark.integration


def model(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    return {"embed": torch.randn(256, 64, generator=g).to(torch.bfloat16), "head": torch.randn(64, 32, generator=g)}


def actor_process(address: str, name: str, security: dict, last_version: int, stop, conn) -> None:
    from actors.weight_receiver import ZmqWeightSubscriber

    sub = ZmqWeightSubscriber(WeightsConfig(address=address, heartbeat_s=0.2), name, SecurityConfig(**security))
    applied, weights = [], None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not stop.is_set() and (not applied or applied[-1] < last_version):
        time.sleep(0.05)  # one "tree step"
        got = sub.poll_latest()  # between two steps
        if got is not None:
            applied.append(got[0])
            weights = {k: (str(t.dtype), list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
                       for k, t in got[1].items()}  # plain values: the control pipe carries no tensors
    conn.send((applied, weights, sub.versions_received))
    sub.close()


def test_curve_weight_push_to_actor_processes():
    server, good, intruder = generate_keypair(), generate_keypair(), generate_keypair()
    pub = ZmqWeightPublisher(
        WeightsConfig(address="tcp://127.0.0.1:*", chunk_bytes=4096, window=2),
        SecurityConfig(curve_public_key=server[0], curve_secret_key=server[1], authorized_keys=[good[0]]))
    ctx = mp.get_context("spawn")
    procs, conns, stop = [], [], ctx.Event()
    for name, (public, secret) in (("good", good), ("intruder", intruder)):
        parent, child = ctx.Pipe()
        sec = {"curve_public_key": public, "curve_secret_key": secret, "server_public_key": server[0]}
        procs.append(ctx.Process(target=actor_process, args=(pub.address, name, sec, 8, stop, child)))
        conns.append(parent)
    for p in procs:
        p.start()
    deadline = time.monotonic() + 30
    while "good" not in pub.peers():
        assert time.monotonic() < deadline, "the authorized actor never joined"
        time.sleep(0.02)
    for v in range(1, 9):  # faster than the actor's steps
        pub.publish(v, model(v))
        time.sleep(0.02)
    pub.wait_delivered(8, timeout_s=10)
    time.sleep(0.5)  # a few more heartbeats of the refused actor
    stop.set()
    (applied, weights, received), (i_applied, i_weights, i_received) = (c.recv() for c in conns)
    for p in procs:
        p.join(timeout=10)
    assert pub.peers() == {} or set(pub.peers()) == {"good"}
    pub.close()
    assert applied[-1] == 8 and applied == sorted(set(applied)) and len(applied) < 8
    assert received[-1] == 8 and received == sorted(set(received))
    for k, t in model(8).items():
        assert weights[k] == (str(t.dtype), list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()), k
    assert i_applied == [] and i_weights is None and i_received == []
