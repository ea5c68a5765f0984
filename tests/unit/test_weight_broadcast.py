"""The co-located weight path on CPU (gloo stands in for NCCL, same code): every co-located actor gets each
version bit-exact from one broadcast, the newest is handed over, and the learner's close ends the actors' threads."""

import pytest
import torch

from actors.weight_broadcast_receiver import BroadcastWeightSubscriber
from buffer.redis_server import free_port
from learner.weight_broadcast import BroadcastWeightPublisher
from protocol.config.weights import WeightsConfig
from tests.factories import mixed_state_dict


def test_two_colocated_actors_receive_every_version_bit_exact_over_gloo():
    address = f"127.0.0.1:{free_port()}"
    learner_cfg = WeightsConfig(broadcast_actors=2, broadcast_address=address, broadcast_backend="gloo")
    pub = BroadcastWeightPublisher(learner_cfg, run_id="run")
    subs = [BroadcastWeightSubscriber(learner_cfg.model_copy(update={"transport": "broadcast", "broadcast_rank": r}),
                                      f"a{r}", run_id="run") for r in (1, 2)]
    for version in (1, 2):
        sd = {**mixed_state_dict(), "w": torch.randn(64, 32) * version}
        pub.publish(version, sd)
        pub.wait_delivered(version, timeout_s=30)
        for sub in subs:
            assert sub.wait_new(10)
            got_version, got = sub.poll_latest()
            assert got_version == version and list(got) == list(sd)
            assert all(got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t)
                       for k, t in sd.items())
    assert pub.bytes_sent == 2 * 2 * sum(t.numel() * t.element_size() for t in sd.values())
    pub.close()
    for sub in subs:
        sub.close()
        assert sub.versions_received == [1, 2] and sub.poll_latest() is None


def test_versions_must_increase_and_a_broadcast_actor_needs_its_rank():
    pub = BroadcastWeightPublisher(WeightsConfig(broadcast_actors=1, broadcast_address=f"127.0.0.1:{free_port()}",
                                                 broadcast_backend="gloo"))
    with pytest.raises(ValueError, match="weights.broadcast_rank"):
        WeightsConfig(transport="broadcast")
    sub = BroadcastWeightSubscriber(WeightsConfig(transport="broadcast", broadcast_rank=1, broadcast_actors=1,
                                                  broadcast_address=pub.cfg.broadcast_address,
                                                  broadcast_backend="gloo"), "a1")
    pub.publish(3, {"w": torch.ones(4)})
    with pytest.raises(ValueError, match="not newer"):
        pub.publish(3, {"w": torch.ones(4)})
    pub.close()
    sub.close()
    assert sub.versions_received == [3]
