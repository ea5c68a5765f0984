import time

import pytest
import torch
import zmq

from actors.weight_receiver import ZmqWeightSubscriber
from learner.weight_push import ZmqWeightPublisher
from protocol.codec import decode, encode
from protocol.config.transport import SecurityConfig
from protocol.config.weights import WeightsConfig
from protocol.messages import Heartbeat
from protocol.security import (
    SecurityConfigError,
    generate_keypair,
    is_enabled,
    secure_client,
    secure_server,
    stop_authenticator,
)

SERVER = generate_keypair()
GOOD = generate_keypair()
INTRUDER = generate_keypair()


def server_cfg(*clients: tuple[str, str]) -> SecurityConfig:
    return SecurityConfig(curve_public_key=SERVER[0], curve_secret_key=SERVER[1],
                          authorized_keys=[c[0] for c in clients])


def client_cfg(pair: tuple[str, str]) -> SecurityConfig:
    return SecurityConfig(curve_public_key=pair[0], curve_secret_key=pair[1], server_public_key=SERVER[0])


def test_keypairs_are_z85_and_off_means_no_op():
    public, secret = generate_keypair()
    assert len(public) == len(secret) == 40 and zmq.curve_public(secret.encode()).decode() == public
    assert not is_enabled(SecurityConfig())
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    secure_server(s, SecurityConfig(), ctx)
    secure_client(s, SecurityConfig())
    assert s.mechanism == zmq.NULL
    s.close()
    ctx.term()


@pytest.mark.parametrize("cfg,match", [
    (SecurityConfig(curve_public_key=GOOD[0]), "curve_secret_key"),
    (SecurityConfig(curve_public_key=GOOD[0], curve_secret_key=INTRUDER[1]), "does not belong"),
    (SecurityConfig(curve_public_key="short", curve_secret_key=GOOD[1]), "curve_public_key"),
])
def test_half_configured_security_is_an_error(cfg, match):
    with pytest.raises(SecurityConfigError, match=match):
        is_enabled(cfg)


def test_server_needs_authorized_keys_and_client_needs_server_key():
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    with pytest.raises(SecurityConfigError, match="authorized_keys"):
        secure_server(s, server_cfg(), ctx)
    with pytest.raises(SecurityConfigError, match="server_public_key"):
        secure_client(s, SecurityConfig(curve_public_key=GOOD[0], curve_secret_key=GOOD[1]))
    s.close()
    ctx.term()


def delivered(port: int, cfg: SecurityConfig | None, ctx: zmq.Context) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if cfg is not None:
        secure_client(sock, cfg)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def test_only_authorized_clients_deliver_to_a_curve_server():
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    secure_server(server, server_cfg(GOOD), ctx)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    other = ctx.socket(zmq.ROUTER)  # a second server on the same context with another key list reuses the ZAP thread
    other.linger = 0
    secure_server(other, server_cfg(INTRUDER), ctx)
    other_port = other.bind_to_random_port("tcp://127.0.0.1")
    clients = {name: delivered(port, cfg, ctx) for name, cfg in
               [("good", client_cfg(GOOD)), ("intruder", client_cfg(INTRUDER)), ("plain", None)]}
    for name, sock in clients.items():
        sock.send(encode(Heartbeat(sender=name)))
    got = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if server.poll(50):
            got.append(decode(server.recv_multipart()[1]).sender)
    assert got == ["good"]
    intruder_elsewhere = delivered(other_port, client_cfg(INTRUDER), ctx)
    intruder_elsewhere.send(encode(Heartbeat(sender="intruder")))
    assert other.poll(2000) and decode(other.recv_multipart()[1]).sender == "intruder"
    for sock in [*clients.values(), intruder_elsewhere, server, other]:
        sock.close()
    stop_authenticator(ctx)
    ctx.term()


def test_weights_reach_only_authorized_actors():
    address = "tcp://127.0.0.1:*"
    pub = ZmqWeightPublisher(WeightsConfig(address=address, chunk_bytes=256), server_cfg(GOOD))
    cfg = WeightsConfig(address=pub.address, heartbeat_s=0.1)
    sd = {"w": torch.randn(40, 8).to(torch.bfloat16), "b": torch.randn(8)}
    with (ZmqWeightSubscriber(cfg, "good", client_cfg(GOOD)) as good,
          ZmqWeightSubscriber(cfg, "intruder", client_cfg(INTRUDER)) as intruder,
          ZmqWeightSubscriber(cfg, "plain") as plain):
        pub.publish(1, sd)
        pub.wait_delivered(1, timeout_s=5)
        version, got = good.poll_latest()
        assert version == 1 and torch.equal(got["w"], sd["w"])
        time.sleep(0.5)  # several heartbeats of the refused actors
        assert intruder.poll_latest() is None and plain.poll_latest() is None
        assert pub.peers() == {"good": 1}
    pub.close()
