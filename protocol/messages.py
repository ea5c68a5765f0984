"""Every message that crosses a process boundary, and its wire name.

Actors -> buffer: `SubtreeMsg` (a piece of a tree, keyed for idempotent at-least-once delivery),
answered by `Ack`. Learner -> actors: `WeightHeader` then `WeightChunk`s of one policy version
(safetensors layout: the header lists each tensor's dtype, shape and byte range in one flat
buffer that the chunks carry in order). Control: `Hello`, `Heartbeat`, `Shutdown`; `ErrorMsg`
tells a peer why its message was refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.tree import Tree


@dataclass
class SubtreeMsg:
    """Segments and leaves of one tree that the actor has finished, sent as soon as they are.

    `key` is unique per piece (tree_id/seq) and is what the buffer acknowledges and
    de-duplicates on. The last piece of a tree has `final=True` and `n_pieces` = pieces in all,
    so the receiver knows when it holds the whole tree.
    """

    key: str
    actor_id: str
    seq: int
    tree: Tree
    final: bool = False
    n_pieces: int = 0


@dataclass
class Ack:
    """The buffer holds the piece `key` durably (ok) or refused it (ok=False, reason says why)."""

    key: str
    ok: bool = True
    reason: str = ""


@dataclass
class TensorMeta:
    name: str
    dtype: str  # safetensors dtype name: F32, BF16, F16, I64, ...
    shape: list[int]
    offset: int  # byte offset in the flat buffer
    nbytes: int


@dataclass
class WeightHeader:
    """Announces policy `version`: the tensors of the flat buffer and how it is chunked."""

    run_id: str
    version: int
    tensors: list[TensorMeta]
    total_bytes: int
    n_chunks: int


@dataclass
class WeightChunk:
    version: int
    index: int
    data: bytes


@dataclass
class Hello:
    """A process introduces itself; `role` is actor | buffer | learner."""

    sender: str
    role: str
    pid: int = 0
    host: str = ""
    policy_version: int = -1
    info: dict[str, str] = field(default_factory=dict)


@dataclass
class Heartbeat:
    sender: str
    policy_version: int = -1
    unix_time: float = 0.0


@dataclass
class Shutdown:
    sender: str
    reason: str = ""


@dataclass
class ErrorMsg:
    """Why a peer's message was refused (`code` is a ProtocolError reason tag)."""

    code: str
    message: str


# Wire names. Renaming one is a breaking (major) change of the schema.
MESSAGE_TYPES: dict[str, type] = {
    "subtree": SubtreeMsg,
    "ack": Ack,
    "weight_header": WeightHeader,
    "weight_chunk": WeightChunk,
    "hello": Hello,
    "heartbeat": Heartbeat,
    "shutdown": Shutdown,
    "error": ErrorMsg,
}
WIRE_NAME: dict[type, str] = {cls: name for name, cls in MESSAGE_TYPES.items()}
