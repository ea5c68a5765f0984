"""Every message that crosses a process boundary, and its wire name.

Actors -> buffer: `SubtreeMsg` (a piece of a tree, keyed for idempotent at-least-once delivery),
answered by `Ack`. Learner -> actors: `WeightHeader` then `WeightChunk`s of one policy version
(safetensors layout: the header lists each tensor's dtype, shape and byte range in one flat
buffer that the chunks carry in order). Every message is one ZeroMQ frame, except `WeightChunk`:
its payload bytes travel out of band, as a second frame of the same multipart message, so that
neither side copies them through msgpack (see `WeightChunk`). Control: `Hello`, `Heartbeat`,
`Shutdown`; `ErrorMsg` tells a peer why its message was refused. Actors -> buffer: `PromptRequest`, answered by
`PromptGrant` (prompt leases, which are also the admission permits); an actor's `Heartbeat`
keeps its leases alive. The buffer answers a piece it cannot take yet with
`Ack(ok=False, reason="backpressure")`: the actor keeps it and re-sends later.
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
    """Chunk `index` of version `version`: bytes [offset, offset + nbytes) of the flat buffer.

    Out-of-band payload: the bytes themselves are NOT a field. On the wire a chunk is a two-frame
    ZeroMQ multipart message `[encode(WeightChunk), payload]`, where payload is exactly `nbytes` raw
    bytes (sent zero-copy from the learner's flat buffer, received straight into the actor's). A
    receiver refuses (ProtocolError) a chunk without its payload frame, a payload whose length is
    not `nbytes`, an extra frame after any message, and a chunk whose index or byte range lies
    outside its `WeightHeader` (`protocol.weight_layout.check_chunk`). `digest` is set by the learner and
    forwarded unchanged by relays; a receiver whose payload does not match it counts, logs and drops the
    partial version and fetches it again (never applies it).
    """

    version: int
    index: int
    offset: int
    nbytes: int
    digest: str = ""  # xxh3-128 of the payload as hex (`protocol.weight_layout.chunk_digest`); required


@dataclass
class Hello:
    """A process introduces itself; `role` is actor | buffer | learner."""

    sender: str
    role: str
    pid: int = 0
    host: str = ""
    policy_version: int = -1
    info: dict[str, str] = field(default_factory=dict)
    relay_address: str = ""  # weights: where this actor serves versions to other actors ('' = it does not relay)
    relay_key: str = ""  # weights: the Z85 CURVE public key of that relay ('' = security off)
    avoid: str = ""  # weights: the relay this actor must not be fed by again (it sent a corrupt chunk)


@dataclass
class WeightRoute:
    """The learner tells an actor where to take weights from: the relay at `address` (the actor `parent`,
    whose CURVE server key is `server_key`), or, with `address` empty, the learner itself."""

    address: str = ""
    parent: str = ""
    server_key: str = ""


@dataclass
class Heartbeat:
    """Alive, holding `policy_version`. To a weight server that does not know the sender it is a join, so it
    carries the sender's relay (as `Hello` does)."""

    sender: str
    policy_version: int = -1
    unix_time: float = 0.0
    relay_address: str = ""
    relay_key: str = ""


@dataclass
class Shutdown:
    sender: str
    reason: str = ""


@dataclass
class ErrorMsg:
    """Why a peer's message was refused (`code` is a ProtocolError reason tag)."""

    code: str
    message: str


@dataclass
class PromptRequest:
    """An actor asks the buffer for up to `n` prompts to grow trees for (one admission permit each).

    Answered by `PromptGrant`. `policy_version` is the version of the weights the actor holds
    (-1 = unknown): the buffer uses it to grant no more work than the learner can use within the
    staleness bound.
    """

    actor_id: str
    n: int = 1
    policy_version: int = -1


@dataclass
class PromptLease:
    """One prompt dealt to an actor. The actor grows its tree under `tree_id` (= the lease id) and
    must heartbeat at least every `lease_seconds`, or the prompt goes back to the queue."""

    tree_id: str
    prompt_id: str
    prompt: str
    answer: str = ""
    lease_seconds: float = 0.0


@dataclass
class PromptGrant:
    """The buffer's answer to `PromptRequest`: the leases granted (possibly none) and, when fewer
    than asked, why (`no_permit`: the staleness/back-pressure bound; `queue_empty`: no prompts)
    and how long to wait before asking again."""

    leases: list[PromptLease] = field(default_factory=list)
    learner_version: int = -1
    reason: str = ""
    retry_after_s: float = 0.0


# Wire names. Renaming one is a breaking (major) change of the schema.
MESSAGE_TYPES: dict[str, type] = {
    "subtree": SubtreeMsg,
    "ack": Ack,
    "weight_header": WeightHeader,
    "weight_chunk": WeightChunk,
    "weight_route": WeightRoute,
    "hello": Hello,
    "heartbeat": Heartbeat,
    "shutdown": Shutdown,
    "error": ErrorMsg,
    "prompt_request": PromptRequest,
    "prompt_grant": PromptGrant,
}
WIRE_NAME: dict[type, str] = {cls: name for name, cls in MESSAGE_TYPES.items()}
