"""One published policy version as the push streams it: a flat buffer of the weights (filled while chunks of it
already go out), its encoded header and chunk ranges, each chunk's digest (computed once, on its first send),
and the trackers that tell when ZeroMQ has let go of its memory (so a later version may refill it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import zmq

from protocol.codec import encode
from protocol.messages import WeightChunk
from protocol.weight_layout import chunk_digest
from protocol.weight_stream import VersionSource


@dataclass(eq=False)
class Snapshot(VersionSource):
    """One version: its encoded header, chunk ranges and flat buffer, of which the first `ready` bytes are
    written (`publish` is still copying the rest; -1: the copy failed and the version is withdrawn)."""

    version: int
    header: bytes
    chunks: list[tuple[int, int]]  # (offset, nbytes) of each chunk
    flat: torch.Tensor
    ready: int = 0
    trackers: list[zmq.MessageTracker] = field(default_factory=list)
    frames: dict[int, bytes] = field(default_factory=dict)  # encoded WeightChunk (with its digest) per index

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    @property
    def withdrawn(self) -> bool:
        return self.ready < 0

    def is_ready(self, index: int) -> bool:
        offset, nbytes = self.chunks[index]
        return offset + nbytes <= self.ready

    def chunk(self, index: int) -> tuple[bytes, memoryview]:
        """The two frames of chunk `index`: its encoded WeightChunk, and its bytes as a view of `flat`."""
        offset, nbytes = self.chunks[index]
        payload = memoryview(self.flat.numpy())[offset:offset + nbytes]
        frame = self.frames.get(index)
        if frame is None:
            frame = self.frames[index] = encode(WeightChunk(version=self.version, index=index, offset=offset,
                                                            nbytes=nbytes, digest=chunk_digest(payload)))
        return frame, payload

    def sent(self, tracker: zmq.MessageTracker) -> None:
        self.trackers.append(tracker)
