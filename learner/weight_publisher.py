"""The learner's end of the weight push, behind a small interface: publish each policy version, newest only,
and know when the actors hold it. `learner.weight_push.ZmqWeightPublisher` is the ZeroMQ implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from protocol.weight_stream import WeightSendTimeout

__all__ = ["WeightPublisher", "WeightPublisherError", "WeightSendTimeout"]


class WeightPublisherError(RuntimeError):
    """The publisher's background thread died; the cause is chained."""


class WeightPublisher(ABC):
    """Publishes policy versions to actors; only the newest version is ever delivered."""

    @abstractmethod
    def publish(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Snapshot `state_dict` as `version` (greater than the last one) and push it in the background."""

    @abstractmethod
    def wait_delivered(self, version: int, timeout_s: float, min_peers: int = 1) -> None:
        """Block until every live actor (at least `min_peers`) holds `version`; WeightSendTimeout otherwise."""

    @abstractmethod
    def close(self) -> None:
        """Stop pushing and release the sockets."""

    def __enter__(self) -> WeightPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
