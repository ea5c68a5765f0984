"""msgpack codec for every message of `protocol.messages`.

Wire format (schema version SCHEMA_VERSION = (major, minor)):

    msgpack array [major, minor, type_name, body]

`body` is a map of the message's fields; nested dataclasses are maps too. numpy arrays travel as
msgpack ext type 1 whose payload is `<u8 dtype code><u8 ndim><u32 dim>*ndim` followed by the
raw little-endian bytes: no per-element encoding, and decoding is a zero-copy view (read-only
arrays). Nothing is ever pickled.

Decoding untrusted bytes raises only `ProtocolError`: unknown major version, unknown message
type, malformed msgpack, a field of the wrong type or dtype, or a size over `Limits`. A minor
version bump may add fields with defaults; a decoder of the same major ignores fields it does not
know, and fills the defaults of fields the sender did not have.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import msgpack
import numpy as np

from protocol.errors import ProtocolError
from protocol.messages import MESSAGE_TYPES, WIRE_NAME
from protocol.tree import SEGMENT_FINISHES, STOP_REASONS, Tree

SCHEMA_VERSION = (1, 0)
_ARRAY_EXT = 1
_DTYPES = [np.dtype(t).newbyteorder("<") for t in
           ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "float16", "float32", "float64")]
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


@dataclass(frozen=True)
class Limits:
    """Bounds enforced on every decoded message (protects a service from hostile or buggy peers)."""

    max_message_bytes: int = 256 * 1024 * 1024
    max_nodes: int = 100_000  # segments in one tree message
    max_tokens: int = 16 * 1024 * 1024  # prompt + segment tokens in one tree message
    max_str_bytes: int = 4 * 1024 * 1024


def _pack_array(arr: np.ndarray) -> msgpack.ExtType:
    dt = arr.dtype.newbyteorder("<")
    code = _DTYPE_CODE.get(dt)
    if code is None:
        raise ProtocolError("dtype", f"cannot encode arrays of dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=dt)
    head = struct.pack(f"<BB{arr.ndim}I", code, arr.ndim, *arr.shape)
    return msgpack.ExtType(_ARRAY_EXT, b"".join((head, arr.data)))  # one copy


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if dataclasses.is_dataclass(obj):
        return {k: getattr(obj, k) for k in _field_names(type(obj))}
    if isinstance(obj, np.generic):
        return obj.item()
    raise ProtocolError("type", f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> np.ndarray:
    if code != _ARRAY_EXT or len(data) < 2:
        raise ProtocolError("malformed", f"unknown ext type {code}")
    dcode, ndim = data[0], data[1]
    if dcode >= len(_DTYPES):
        raise ProtocolError("dtype", f"unknown dtype code {dcode}")
    head = 2 + 4 * ndim
    if len(data) < head:
        raise ProtocolError("malformed", "truncated array header")
    shape = struct.unpack_from(f"<{ndim}I", data, 2)
    dt = _DTYPES[dcode]
    if math.prod(shape) * dt.itemsize != len(data) - head:
        raise ProtocolError("malformed", "array byte length does not match its shape")
    return np.frombuffer(data, dtype=dt, offset=head).reshape(shape)


def encode(msg: Any) -> bytes:
    """Serialise one message of `protocol.messages` to bytes."""
    name = WIRE_NAME.get(type(msg))
    if name is None:
        raise ProtocolError("type", f"{type(msg).__name__} is not a protocol message")
    return msgpack.packb([SCHEMA_VERSION[0], SCHEMA_VERSION[1], name, msg], default=_default,
                         use_bin_type=True)


def decode(data: bytes, limits: Limits = Limits()) -> Any:
    """Parse and validate one message; raises only ProtocolError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("type", f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_message_bytes:
        raise ProtocolError("too_large", f"{len(data)} bytes > max_message_bytes={limits.max_message_bytes}")
    try:
        env = msgpack.unpackb(
            data, ext_hook=_ext_hook, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limits.max_str_bytes, max_bin_len=limits.max_message_bytes,
            max_ext_len=limits.max_message_bytes, max_array_len=4 * limits.max_nodes + 16,
            max_map_len=4 * limits.max_nodes + 16,
        )
    except ProtocolError:
        raise
    except Exception as e:  # untrusted bytes: any unpack failure becomes the protocol's error
        raise ProtocolError("malformed", f"not valid msgpack: {e}") from None
    if not isinstance(env, list) or len(env) != 4:
        raise ProtocolError("malformed", "envelope must be [major, minor, type, body]")
    major, _minor, name, body = env
    if major != SCHEMA_VERSION[0]:
        raise ProtocolError("version", f"schema major version {major!r} not supported (this is {SCHEMA_VERSION[0]})")
    cls = MESSAGE_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError("type", f"unknown message type {name!r}")
    msg = _decoder(cls)(body, name)
    _check_limits(msg, limits)
    return msg


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@cache
def _decoder(tp: Any) -> Callable[[Any, str], Any]:
    """A validating converter for type `tp`, compiled once per type (decoding is on the hot path)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        dtype = typing.get_args(tp)[1]

        def array(v, where):
            if type(v) is not np.ndarray or v.dtype != dtype or v.ndim != 1:
                raise ProtocolError("dtype", f"{where}: expected a 1-D {dtype} array, got {_describe(v)}")
            return v
        return array
    if origin is list:
        item = _decoder(typing.get_args(tp)[0])

        def lst(v, where):
            if type(v) is not list:
                raise ProtocolError("type", f"{where}: expected a list, got {_describe(v)}")
            return [item(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return lst
    if origin is dict:
        kt, vt = (_decoder(a) for a in typing.get_args(tp))

        def dct(v, where):
            if type(v) is not dict:
                raise ProtocolError("type", f"{where}: expected a map, got {_describe(v)}")
            return {kt(k, f"{where} key"): vt(x, f"{where}[{k!r}]") for k, x in v.items()}
        return dct
    if origin is typing.Literal:
        allowed = frozenset(typing.get_args(tp))

        def literal(v, where):
            if type(v) is not str or v not in allowed:
                raise ProtocolError("type", f"{where}: {v!r} is not one of {sorted(allowed)}")
            return v
        return literal
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        fields = {f.name: _decoder(hints[f.name]) for f in dataclasses.fields(tp)}
        required = frozenset(f.name for f in dataclasses.fields(tp)
                             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        name = tp.__name__

        def build(v, where):
            if type(v) is not dict:
                raise ProtocolError("type", f"{where}: expected a map for {name}, got {_describe(v)}")
            if not required <= v.keys():
                raise ProtocolError("type", f"{where}: missing field(s) {sorted(required - v.keys())}")
            return tp(**{k: fields[k](x, f"{where}.{k}") for k, x in v.items() if k in fields})
        return build
    if tp is float:
        def number(v, where):
            if type(v) is not float and type(v) is not int:
                raise ProtocolError("type", f"{where}: expected a number, got {_describe(v)}")
            return float(v)
        return number
    if tp in (int, str, bool, bytes):
        def scalar(v, where):
            if type(v) is not tp:
                raise ProtocolError("type", f"{where}: expected {tp.__name__}, got {_describe(v)}")
            return v
        return scalar
    raise TypeError(f"protocol field type {tp} has no decoder")


def _describe(v: Any) -> str:
    return f"{v.ndim}-D {v.dtype} array" if isinstance(v, np.ndarray) else type(v).__name__


def _check_limits(msg: Any, limits: Limits) -> None:
    tree = getattr(msg, "tree", None)
    if isinstance(tree, Tree):
        check_tree(tree, limits)


def check_tree(tree: Tree, limits: Limits = Limits()) -> None:
    """Structural checks of a (partial) tree: sizes, ids, column lengths. Raises ProtocolError."""
    n = len(tree.node_ids)
    if n > limits.max_nodes:
        raise ProtocolError("limit", f"{n} segments > max_nodes={limits.max_nodes}")
    n_tokens = len(tree.prompt_token_ids) + len(tree.tokens)
    if n_tokens > limits.max_tokens:
        raise ProtocolError("limit", f"{n_tokens} tokens > max_tokens={limits.max_tokens}")
    for col in ("parent_ids", "depths", "versions", "finishes", "seg_lens"):
        if len(getattr(tree, col)) != n:
            raise ProtocolError("malformed", f"tree.{col} has {len(getattr(tree, col))} entries for {n} segments")
    if len(tree.logprobs) != len(tree.tokens) or sum(tree.seg_lens.tolist()) != len(tree.tokens):
        raise ProtocolError("malformed", "tree.tokens, tree.logprobs and tree.seg_lens disagree on the token count")
    ids = tree.node_ids.tolist()
    if n and (min(ids) <= 0 or min(tree.parent_ids.tolist()) < 0 or min(tree.depths.tolist()) < 1
              or min(tree.seg_lens.tolist()) < 0 or max(tree.finishes.tolist()) >= len(SEGMENT_FINISHES)):
        raise ProtocolError("malformed", "tree: a segment has a bad id, parent, depth, length or finish code")
    id_set = set(ids)
    if len(id_set) != n:
        raise ProtocolError("malformed", "tree: duplicate segment ids")
    m = len(tree.leaf_ids)
    if len(tree.rewards) != m or len(tree.stop_reasons) != m or any(len(v) != m for v in tree.reward_details.values()):
        raise ProtocolError("malformed", f"tree: leaf columns disagree with {m} leaves")
    if m and max(tree.stop_reasons.tolist()) >= len(STOP_REASONS):
        raise ProtocolError("malformed", "tree: unknown stop reason code")
    missing = set(tree.leaf_ids.tolist()) - id_set
    if missing:
        raise ProtocolError("malformed", f"tree: leaf {min(missing)} has no segment in the message")
