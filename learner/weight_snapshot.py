"""One published policy version as the push streams it: a flat buffer of the weights (filled while chunks of it
already go out), its encoded header and chunk ranges, and the trackers that tell when ZeroMQ has let go of
its memory (so a later version may refill it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import zmq

from protocol.codec import encode
from protocol.messages import WeightChunk


@dataclass(eq=False)
class Snapshot:
    """One version: its encoded header, chunk ranges and flat buffer, of which the first `ready` bytes are
    written (`publish` is still copying the rest). `trackers` tell when ZeroMQ has let go of the payload
    frames it was sent from."""

    version: int
    header: bytes
    chunks: list[tuple[int, int]]  # (offset, nbytes) of each chunk
    flat: torch.Tensor
    ready: int = 0
    trackers: list[zmq.MessageTracker] = field(default_factory=list)

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def is_ready(self, index: int) -> bool:
        offset, nbytes = self.chunks[index]
        return offset + nbytes <= self.ready

    def chunk(self, index: int) -> tuple[bytes, memoryview]:
        """The two frames of chunk `index`: its encoded WeightChunk, and its bytes as a view of `flat`."""
        offset, nbytes = self.chunks[index]
        payload = memoryview(self.flat.numpy())[offset:offset + nbytes]
        return encode(WeightChunk(version=self.version, index=index, offset=offset, nbytes=nbytes)), payload
