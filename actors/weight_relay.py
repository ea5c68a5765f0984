"""An actor's relay: it serves the policy versions it receives to the actors the learner routes to it, chunk by
chunk as the chunks arrive, so the learner sends each version to only `weights.fanout` actors.

The relay is a `protocol.weight_stream.WeightStreamServer` (the same wire protocol, credits, latest-only and
timeouts as the learner's) whose source is the version this actor is receiving: `begin` when its header
arrives, `add` for each chunk once its digest checked out (the chunk's frames are forwarded as received:
the learner's digest travels unchanged, and the payload is sent zero-copy from the received frame), and
`abandon` when the transfer is dropped before its end (children streaming it get Shutdown, drop their partial
version and ask again; they are never handed a partial version). A complete version stays the relay's newest
until the next one begins, so a child that (re)joins late gets it; once the next one begins, only the children
still streaming the old one keep its frames alive (a relay holds about one version of memory).

Security: with CURVE on, the relay is a CURVE server with this actor's own key pair (the learner tells the
children its public key in their `WeightRoute`), accepting the clients of `security.authorized_keys`; an actor
whose config lists none does not relay (`actors/weight_receiver.py` says so in its log).
The relay owns no thread: the weight receiver's thread polls `socket` and calls `on_readable`/`service`.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

import zmq

from protocol.codec import Limits
from protocol.config.transport import SecurityConfig
from protocol.config.weights import WeightsConfig
from protocol.weight_stream import VersionSource, WeightStreamServer


class RelaySource(VersionSource):
    """A version as this actor receives it: its chunks' frames, in order, as they arrive."""

    def __init__(self, version: int, header: bytes, n_chunks: int):
        self.version, self.header, self.n_chunks = version, header, n_chunks
        self.frames: list[tuple[bytes, memoryview]] = []
        self._withdrawn = False

    @property
    def withdrawn(self) -> bool:
        return self._withdrawn

    def withdraw(self) -> None:
        self._withdrawn = True

    def is_ready(self, index: int) -> bool:
        return index < len(self.frames)

    def chunk(self, index: int) -> tuple[bytes, memoryview]:
        return self.frames[index]

    def sent(self, tracker: zmq.MessageTracker) -> None:
        """Nothing to track: the payload views a received frame, which lives as long as anything sends it."""


def local_address_towards(address: str) -> str:
    """This host's IP on the route to the ZeroMQ endpoint `address` (tcp://host:port)."""
    parts = urlsplit(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # connect() on UDP sends nothing
        probe.connect((parts.hostname, parts.port or 9))
        return probe.getsockname()[0]


class WeightRelay:
    def __init__(self, ctx: zmq.Context, cfg: WeightsConfig, name: str, security: SecurityConfig,
                 limits: Limits | None = None):
        host = cfg.relay_host or local_address_towards(cfg.address)
        bind_host = "*" if cfg.relay_host else host
        own = SecurityConfig(curve_public_key=security.curve_public_key, curve_secret_key=security.curve_secret_key,
                             authorized_keys=security.authorized_keys)
        self.server = WeightStreamServer(ctx, f"tcp://{bind_host}:{cfg.relay_port or '*'}", cfg, own, limits,
                                         threading.Condition(), name=name)
        port = urlsplit(self.server.address).port
        self.address = f"tcp://{host}:{port}"
        self.key = security.curve_public_key  # '' when security is off
        self.socket = self.server.socket
        self.current: RelaySource | None = None  # the version being received, until complete or abandoned

    def begin(self, version: int, header: bytes, n_chunks: int) -> None:
        """A new version's header arrived: serve it from now on (its chunks as they come)."""
        self.abandon()
        self.current = RelaySource(version, header, n_chunks)
        self.server.offer(self.current)  # the previous version lives on only while a child still streams it
        if n_chunks == 0:
            self.current = None

    def add(self, chunk: bytes, payload: memoryview) -> None:
        """The next chunk of the current version arrived, and checked out."""
        self.current.frames.append((chunk, payload))
        if len(self.current.frames) == self.current.n_chunks:  # complete: it stays the server's newest
            self.current = None

    def abandon(self) -> None:
        """The version being received will not complete: children streaming it drop it and ask again."""
        if self.current is not None:
            self.current.withdraw()
            self.server.offer(None)
            self.current = None

    def on_readable(self) -> None:
        self.server.on_readable()

    def service(self) -> None:
        self.server.service()

    def close(self) -> None:
        self.server.close()
