"""CURVE encryption and authentication of the pipeline's ZeroMQ sockets, driven by `SecurityConfig`.

Security is on when `security.curve_public_key` is set; then every pipeline socket uses CURVE
(encrypted, and servers accept only clients whose public key is in `authorized_keys`). With the
key empty, every function here is a no-op, so callers need no `if`.

Key model: one Z85 key pair per process (`treepo keys` makes one). A server (a socket that binds:
buffer ingest, learner weight push) uses its own pair and accepts the clients listed in
`authorized_keys`; a client (a socket that connects: actors) uses its own pair and names the
server's public key in `server_public_key`. A process that connects to several servers needs them
to share one server key pair (deployments typically have one server pair for buffer and learner,
and one pair per actor, each actor's public key listed in `authorized_keys`).

API (call before bind/connect):

    secure_server(socket, cfg, context=None)  # CURVE server + ZAP authenticator allowing authorized_keys
    secure_client(socket, cfg)                # CURVE client towards cfg.server_public_key
    stop_authenticator(context)               # before context.term(): stops the ZAP thread
    generate_keypair() -> (public_z85, secret_z85)
    is_enabled(cfg) -> bool

The authenticator is one `zmq.auth.thread.ThreadAuthenticator` per context, started on the first
`secure_server` and reused by later ones; each distinct `authorized_keys` list gets its own ZAP
domain, so servers with different lists can share a context. A refused client sees no error: its
handshake fails and ZeroMQ retries, so nothing it sends is delivered and it receives nothing.
A half-filled config (a public key without its secret, a client without `server_public_key`, a
server without `authorized_keys`) raises `SecurityConfigError` instead of running unprotected.
"""

from __future__ import annotations

import hashlib
import threading
import weakref

import zmq
from zmq.auth.thread import ThreadAuthenticator

from protocol.config.transport import SecurityConfig

Z85_KEY_LEN = 40


class SecurityConfigError(ValueError):
    """The security section cannot secure a socket (missing or malformed key); names the field."""


class _AllowedKeys:
    """ZAP credentials provider: per ZAP domain, the set of Z85 client keys that may connect."""

    def __init__(self) -> None:
        self.by_domain: dict[str, frozenset[bytes]] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.by_domain.get(domain, frozenset())


_lock = threading.Lock()
_authenticators: weakref.WeakKeyDictionary[zmq.Context, tuple[ThreadAuthenticator, _AllowedKeys]] = (
    weakref.WeakKeyDictionary())


def generate_keypair() -> tuple[str, str]:
    """A new CURVE key pair as Z85 strings (public, secret)."""
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def _check_key(value: str, field: str) -> bytes:
    if len(value) != Z85_KEY_LEN:
        raise SecurityConfigError(f"security.{field}: a Z85 CURVE key has {Z85_KEY_LEN} characters, got {len(value)}")
    return value.encode("ascii")


def is_enabled(cfg: SecurityConfig) -> bool:
    """True when the config names this process's key pair (both halves are then required)."""
    if not cfg.curve_public_key and not cfg.curve_secret_key:
        return False
    _check_key(cfg.curve_public_key, "curve_public_key")
    _check_key(cfg.curve_secret_key, "curve_secret_key")
    public = zmq.curve_public(cfg.curve_secret_key.encode("ascii")).decode("ascii")
    if public != cfg.curve_public_key:
        raise SecurityConfigError("security.curve_public_key does not belong to security.curve_secret_key")
    return True


def secure_server(socket: zmq.Socket, cfg: SecurityConfig, context: zmq.Context | None = None) -> None:
    """Make `socket` (before it binds) a CURVE server that accepts only `cfg.authorized_keys`."""
    if not is_enabled(cfg):
        return
    if not cfg.authorized_keys:
        raise SecurityConfigError("security.authorized_keys is empty: a CURVE server would refuse every client")
    allowed = frozenset(_check_key(k, "authorized_keys[]") for k in cfg.authorized_keys)
    domain = "treepo-" + hashlib.sha256(b"".join(sorted(allowed))).hexdigest()[:16]
    ctx = context if context is not None else socket.context
    with _lock:
        entry = _authenticators.get(ctx)
        if entry is None:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            entry = (auth, _AllowedKeys())
            _authenticators[ctx] = entry
        auth, keys = entry
        keys.by_domain[domain] = allowed
        auth.configure_curve_callback(domain, credentials_provider=keys)
    socket.zap_domain = domain.encode("ascii")
    socket.curve_secretkey = cfg.curve_secret_key.encode("ascii")
    socket.curve_publickey = cfg.curve_public_key.encode("ascii")
    socket.curve_server = True


def secure_client(socket: zmq.Socket, cfg: SecurityConfig) -> None:
    """Make `socket` (before it connects) a CURVE client of the server whose key is `cfg.server_public_key`."""
    if not is_enabled(cfg):
        return
    socket.curve_serverkey = _check_key(cfg.server_public_key, "server_public_key")
    socket.curve_secretkey = cfg.curve_secret_key.encode("ascii")
    socket.curve_publickey = cfg.curve_public_key.encode("ascii")


def stop_authenticator(context: zmq.Context) -> None:
    """Stop the context's ZAP thread, if `secure_server` started one (required before `context.term()`)."""
    with _lock:
        entry = _authenticators.pop(context, None)
    if entry is not None:
        entry[0].stop()
