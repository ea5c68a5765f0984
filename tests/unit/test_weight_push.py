import re
import time

import pytest
import torch
import zmq

from actors.weight_receiver import WeightReceiveError, ZmqWeightSubscriber
from learner.weight_publisher import WeightSendTimeout
from learner.weight_push import ZmqWeightPublisher
from protocol.codec import decode, encode
from protocol.config.weights import WeightsConfig
from protocol.errors import ProtocolError
from protocol.messages import Ack, ErrorMsg, Hello, Shutdown, TensorMeta, WeightChunk, WeightHeader
from protocol.weight_layout import chunk_digest, flatten_into, plan_layout
from protocol.weight_stream import send_or_timeout
from tests.factories import mixed_state_dict


def small_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "layers.0.mlp.weight": torch.randn(32, 96, generator=g),
        "layers.0.norm.weight": torch.randn(32, generator=g).to(torch.bfloat16),
        "lm_head.bias": torch.randn(64, generator=g),
    }


def wait_until(cond, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def publisher():
    pubs = []

    def make(**kw):
        pub = ZmqWeightPublisher(WeightsConfig(address="tcp://127.0.0.1:*", **kw), run_id="run")
        pubs.append(pub)
        return pub

    yield make
    for p in pubs:
        p.close()


class RawActor:
    """A hand-driven actor that speaks the wire protocol, to observe exactly what the learner sends."""

    def __init__(self, address: str, name: str = "raw"):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)
        self.name = name
        self.payloads: dict[tuple[int, int], bytes] = {}

    def send(self, msg):
        self.sock.send(encode(msg))

    def recv(self, timeout_ms=2000):
        """The next message; a WeightChunk's payload frame is checked against it and kept in `payloads`."""
        if not self.sock.poll(timeout_ms):
            return None
        first, *rest = self.sock.recv_multipart()
        msg = decode(first)
        if isinstance(msg, WeightChunk):
            assert len(rest) == 1 and len(rest[0]) == msg.nbytes
            self.payloads[(msg.version, msg.index)] = rest[0]
        else:
            assert rest == []
        return msg

    def close(self):
        self.sock.close()
        self.ctx.term()


# the tensors larger than a chunk (the others are views of the received frames, never copied)
@pytest.mark.parametrize("chunk_bytes,copied", [(333, [4096, 12288]), (1000, [4096, 12288]), (4096, [12288]),
                                                (1 << 20, [])])
def test_round_trip_bf16_and_f32_is_exact(publisher, chunk_bytes, copied):
    sd = small_model()
    pub = publisher(chunk_bytes=chunk_bytes, window=3)  # tensors spread over chunks, sharing them, one for all
    with ZmqWeightSubscriber(WeightsConfig(address=pub.address), "a0", run_id="run") as sub:
        pub.publish(7, sd)
        pub.wait_delivered(7, timeout_s=5)
        version, got = sub.poll_latest()
        assert version == 7 and list(got) == list(sd)
        for k, t in sd.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
        assert sub.poll_latest() is None
        assert pub.peers() == {"a0": 7} and not pub.failures
        assert sorted(b.numel() for b in sub._spare) == copied
        buffers = {b.data_ptr() for b in sub._spare}
        for k, t in got.items():  # a copied tensor fills a buffer of its own, the others view received frames
            assert (t.data_ptr() in buffers) == (t.numel() * t.element_size() in copied), k


@pytest.fixture
def hand_learner():
    """A hand-driven learner: a bound ROUTER, and the address a subscriber connects to."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield router, f"tcp://127.0.0.1:{port}"
    router.close()
    ctx.term()


@pytest.mark.parametrize("chunk_bytes", [7, 1 << 20])
def test_every_dtype_and_an_empty_tensor_round_trip_in_the_state_dicts_order(publisher, chunk_bytes):
    sd = mixed_state_dict()
    pub = publisher(chunk_bytes=chunk_bytes)
    with ZmqWeightSubscriber(WeightsConfig(address=pub.address), "a0") as sub:
        pub.publish(1, sd)
        pub.wait_delivered(1, timeout_s=5)
        version, got = sub.poll_latest()
    assert version == 1 and list(got) == list(sd)
    for k, t in sd.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k


def test_subscriber_assembles_chunks_cut_anywhere(hand_learner):
    """Receivers accept any cut: a hand-driven learner cuts the flat buffer every 10 bytes, across tensors."""
    sd = small_model(3)
    metas, total = plan_layout(sd)
    flat = torch.empty(total, dtype=torch.uint8)
    flatten_into(sd, metas, flat)
    cuts = list(range(0, total, 10))
    router, address = hand_learner
    with ZmqWeightSubscriber(WeightsConfig(address=address), "a0") as sub:
        identity, _ = router.recv_multipart()
        router.send_multipart([identity, encode(WeightHeader(run_id="", version=1, tensors=metas, total_bytes=total,
                                                             n_chunks=len(cuts)))])
        for i, at in enumerate(cuts):
            payload = flat.numpy()[at:at + 10].tobytes()
            router.send_multipart([identity, encode(WeightChunk(1, i, at, len(payload), chunk_digest(payload))),
                                   payload])
        wait_until(lambda: sub.versions_received == [1])
        version, got = sub.poll_latest()
        assert version == 1 and all(torch.equal(got[k], t) for k, t in sd.items())


def test_a_version_whose_copy_fails_is_withdrawn_and_the_next_one_arrives(publisher):
    pub = publisher(chunk_bytes=1000, window=2)
    with ZmqWeightSubscriber(WeightsConfig(address=pub.address, heartbeat_s=0.1), "a0") as sub:
        pub.publish(1, small_model(1))
        pub.wait_delivered(1, timeout_s=5)
        broken = {**small_model(2), "zz.meta": torch.empty(8, device="meta")}  # its bytes cannot be copied
        with pytest.raises(NotImplementedError):  # after the first chunks may have gone out
            pub.publish(2, broken)
        pub.publish(3, small_model(3))
        pub.wait_delivered(3, timeout_s=5)
        version, got = sub.poll_latest()
        assert version == 3 and torch.equal(got["embed.weight"], small_model(3)["embed.weight"])
        assert sub.versions_received == [1, 3]


def test_slow_actor_gets_the_version_in_flight_then_only_the_newest(publisher):
    pub = publisher(chunk_bytes=1000, window=2)
    pub.publish(1, small_model(1))
    actor = RawActor(pub.address)
    actor.send(Hello(sender="slow", role="actor", policy_version=-1))
    header = actor.recv()
    assert isinstance(header, WeightHeader) and header.version == 1 and header.n_chunks > 4
    held = [actor.recv(), actor.recv()]
    assert all(isinstance(c, WeightChunk) and c.version == 1 for c in held)
    assert actor.recv(timeout_ms=300) is None  # credit window: nothing more until it acknowledges
    for v in (2, 3, 4):  # the learner moves on while this actor is slow
        pub.publish(v, small_model(v))
    for i in range(header.n_chunks):  # finish v1, one credit at a time
        chunk = held.pop(0) if held else actor.recv()
        assert isinstance(chunk, WeightChunk) and (chunk.version, chunk.index) == (1, i)
        actor.send(Ack(key=f"1/{i}"))
    nxt = actor.recv()
    assert isinstance(nxt, WeightHeader) and nxt.version == 4  # 2 and 3 were skipped
    for i in range(nxt.n_chunks):
        chunk = actor.recv()
        assert (chunk.version, chunk.index) == (4, i)
        actor.send(Ack(key=f"4/{i}"))
    assert actor.recv(timeout_ms=300) is None
    wait_until(lambda: pub.peers() == {"slow": 4})
    actor.close()


def test_chunk_payloads_are_second_frames_holding_the_flat_buffer(publisher):
    # flat layout: mlp F32 12288 B at 0, bias F32 256 at 12288, embed BF16 4096 at 12544, norm BF16 64 at 16640;
    # cut at tensor boundaries: mlp in 12 chunks of 1000 and one of 288, bias alone (the embed does not fit
    # beside it), embed in 4 of 1000 and one of 96, norm alone
    sd = small_model()
    expected = ([(at, 1000) for at in range(0, 12000, 1000)] + [(12000, 288), (12288, 256)]
                + [(at, 1000) for at in range(12544, 16544, 1000)] + [(16544, 96), (16640, 64)])
    metas, total = plan_layout(sd)
    flat = torch.empty(total, dtype=torch.uint8)
    flatten_into(sd, metas, flat)
    pub = publisher(chunk_bytes=1000, window=2)
    actor = RawActor(pub.address)
    actor.send(Hello(sender="raw", role="actor", policy_version=-1))
    pub.publish(1, sd)
    header = actor.recv()
    assert isinstance(header, WeightHeader) and (header.total_bytes, header.n_chunks) == (16704, 20)
    for i, (offset, nbytes) in enumerate(expected):
        chunk = actor.recv()
        payload = flat.numpy()[offset:offset + nbytes].tobytes()
        assert chunk == WeightChunk(version=1, index=i, offset=offset, nbytes=nbytes, digest=chunk_digest(payload))
        actor.send(Ack(key=f"1/{i}"))
    assert b"".join(actor.payloads[(1, i)] for i in range(20)) == flat.numpy().tobytes()
    wait_until(lambda: pub.peers() == {"raw": 1})
    assert pub.bytes_sent > 16704 and not pub.failures
    actor.close()


def test_wait_new_wakes_when_a_version_is_complete(publisher):
    pub = publisher()
    with ZmqWeightSubscriber(WeightsConfig(address=pub.address), "a0") as sub:
        assert sub.wait_new(0.05) is False
        pub.publish(1, small_model())
        t0 = time.monotonic()
        assert sub.wait_new(5.0) is True and time.monotonic() - t0 < 2.0
        assert sub.wait_new(0.0) is True  # still not taken
        assert sub.poll_latest()[0] == 1
        assert sub.wait_new(0.05) is False


def test_subscriber_only_ever_hands_over_the_newest(publisher):
    pub = publisher(chunk_bytes=500)
    for v in (1, 2, 3):
        pub.publish(v, small_model(v))
    with ZmqWeightSubscriber(WeightsConfig(address=pub.address), "late") as sub:
        pub.wait_delivered(3, timeout_s=5)
        assert sub.versions_received == [3]
        for v in (4, 5, 6):  # published while the actor does not poll (mid tree step)
            pub.publish(v, small_model(v))
        pub.wait_delivered(6, timeout_s=5)
        version, got = sub.poll_latest()
        assert version == 6 and torch.equal(got["embed.weight"], small_model(6)["embed.weight"])
        assert sub.poll_latest() is None
        received = sub.versions_received
        assert received[0] == 3 and received[-1] == 6 and received == sorted(set(received))


def test_socket_send_times_out_with_a_typed_error():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.router_mandatory = True
    router.sndhwm = 1
    router.sndtimeo = 200
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.rcvhwm = 1
    dealer.linger = 0
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hi")
    identity, _ = router.recv_multipart()
    t0 = time.monotonic()
    with pytest.raises(WeightSendTimeout, match="blocked"):
        for _ in range(1000):  # the dealer never reads: the kernel buffers fill, then the HWM
            send_or_timeout(router, [identity, bytes(1 << 20)], "test")
    assert time.monotonic() - t0 < 10
    router.close()
    dealer.close()
    ctx.term()


def test_actor_that_stops_acknowledging_times_out_and_is_dropped(publisher):
    pub = publisher(chunk_bytes=1000, window=2, send_timeout_s=0.3)
    actor = RawActor(pub.address)
    actor.send(Hello(sender="stuck", role="actor", policy_version=-1))
    wait_until(lambda: pub.peers() == {"stuck": -1})
    pub.publish(1, small_model())
    with pytest.raises(WeightSendTimeout, match="behind"):
        pub.wait_delivered(1, timeout_s=1.0)
    assert pub.peers() == {}
    assert any(isinstance(f, WeightSendTimeout) and "no credit" in str(f) for f in pub.failures)
    # a late credit from the dropped actor is answered with Shutdown: drop the partial version, rejoin
    while isinstance(actor.recv(timeout_ms=100), WeightHeader | WeightChunk):
        pass
    actor.send(Ack(key="1/0"))
    assert isinstance(actor.recv(), Shutdown)
    actor.close()


def test_a_malformed_message_is_refused_and_the_publisher_goes_on(publisher):
    pub = publisher()
    bad = RawActor(pub.address)
    bad.sock.send(b"\x93not msgpack")
    reply = bad.recv()
    assert isinstance(reply, ErrorMsg) and reply.code == "malformed"
    with ZmqWeightSubscriber(WeightsConfig(address=pub.address), "good") as sub:
        pub.publish(1, small_model())
        pub.wait_delivered(1, timeout_s=5)
        assert sub.poll_latest()[0] == 1
    bad.close()


def test_a_frame_that_once_killed_the_publisher_thread_is_refused(publisher, monkeypatch):
    """A frame whose major version is an array reference ended the publisher's thread (the next
    `publish` raised WeightPublisherError); and a handler that raises drops that peer, not the thread."""
    import struct

    import msgpack

    from tests.factories import frame

    pub = publisher()
    bad = RawActor(pub.address)
    bad.sock.send(frame([msgpack.ExtType(1, struct.pack("<BQQ", 5, 0, 4)), 0, "ack", {"key": "k"}], bytes(8)))
    reply = bad.recv()
    assert isinstance(reply, ErrorMsg) and reply.code == "version"
    monkeypatch.setattr(pub.server, "_on_ack", lambda *a: (_ for _ in ()).throw(RuntimeError("injected")))
    bad.send(Hello(sender="bad", role="actor", policy_version=-1))
    wait_until(lambda: pub.peers() == {"bad": -1})
    bad.send(Ack(key="0/0"))
    reply = bad.recv()
    assert isinstance(reply, ErrorMsg) and reply.code == "unhandled" and pub.peers() == {}
    monkeypatch.undo()
    with ZmqWeightSubscriber(WeightsConfig(address=pub.address), "good") as sub:
        pub.publish(1, small_model())
        pub.wait_delivered(1, timeout_s=5)
        assert sub.poll_latest()[0] == 1
    assert pub.failure_count == 2
    bad.close()


def test_a_multipart_message_from_an_actor_is_refused_and_the_publisher_goes_on(publisher):
    pub = publisher()
    bad = RawActor(pub.address)
    bad.sock.send_multipart([encode(Hello(sender="bad", role="actor")), b"extra"])
    reply = bad.recv()
    assert isinstance(reply, ErrorMsg) and reply.code == "malformed" and "2 frames" in reply.message
    assert pub.peers() == {} and len(pub.failures) == 1
    with ZmqWeightSubscriber(WeightsConfig(address=pub.address), "good") as sub:
        pub.publish(1, small_model())
        pub.wait_delivered(1, timeout_s=5)
        assert sub.poll_latest()[0] == 1
    bad.close()


SIXTEEN = WeightHeader(run_id="", version=1, tensors=[TensorMeta("w", "F32", [4], 0, 16)], total_bytes=16, n_chunks=2)


@pytest.mark.parametrize("messages,match", [
    ([[encode(SIXTEEN)], [encode(WeightChunk(1, 0, 0, 8)), bytes(7)]], "payload frame of 7 B, the chunk says 8"),
    ([[encode(SIXTEEN)], [encode(WeightChunk(1, 0, 0, 8))]], r"WeightChunk in 1 frame\(s\)"),
    ([[encode(SIXTEEN)], [encode(WeightChunk(1, 0, 0, 8)), bytes(8), b"more"]], r"WeightChunk in 3 frame\(s\)"),
    ([[encode(SIXTEEN)], [encode(WeightChunk(1, 0, 0, 8, chunk_digest(bytes(8)))), bytes(8)],
      [encode(WeightChunk(1, 1, 8, 16)), bytes(16)]], "outside"),
    ([[encode(SIXTEEN), bytes(16)]], r"WeightHeader with 1 extra frame\(s\)"),
])
def test_subscriber_refuses_bad_chunk_frames(messages, match, hand_learner):
    """A hand-driven learner sends a valid header and then chunk frames that break the framing rules."""
    router, address = hand_learner
    with ZmqWeightSubscriber(WeightsConfig(address=address), "a0") as sub:
        identity, hello = router.recv_multipart()
        assert isinstance(decode(hello), Hello)
        for frames in messages:
            router.send_multipart([identity, *frames])
        deadline = time.monotonic() + 5
        with pytest.raises(WeightReceiveError) as e:
            while time.monotonic() < deadline:
                assert sub.poll_latest() is None
                time.sleep(0.01)
        cause = e.value.__cause__
        assert isinstance(cause, ProtocolError) and cause.reason == "malformed" and re.search(match, str(cause))
        assert sub.versions_received == []


def test_subscriber_surfaces_a_foreign_run(publisher):
    pub = publisher()
    with ZmqWeightSubscriber(WeightsConfig(address=pub.address), "a0", run_id="other-run") as sub:
        pub.publish(1, small_model())
        deadline = time.monotonic() + 5
        with pytest.raises(WeightReceiveError) as e:
            while time.monotonic() < deadline:
                sub.poll_latest()
                time.sleep(0.01)
        assert "other-run" in str(e.value.__cause__)


def test_versions_must_increase(publisher):
    pub = publisher()
    pub.publish(2, small_model())
    with pytest.raises(ValueError, match="not newer"):
        pub.publish(2, small_model())


def test_weights_config_fields_are_documented():
    for name, field in WeightsConfig.model_fields.items():
        assert field.description, name
