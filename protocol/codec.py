"""msgpack codec for every message of `protocol.messages`.

Wire format (schema version SCHEMA_VERSION = (major, minor)):

    u32 little-endian H | H bytes: msgpack array [major, minor, type_name, body] | zero padding to a
    multiple of 8 bytes from the message start | arena: the raw bytes of every array of the message

`body` is a map of the message's fields; nested dataclasses are maps too. A (1-D) numpy array
travels as a msgpack ext of type 1 holding `<BQQ` (dtype_code, offset, nbytes): its little-endian
bytes lie at `offset` (a multiple of 8) in the arena, and dtype_code indexes `_DTYPES`. So the
encoder copies an array's memory once (into the message) with no per-element work, and the
decoder returns read-only numpy views of the received buffer: msgpack only parses the small
header, the array bytes are neither copied nor touched. Nothing is ever pickled.

Decoding untrusted bytes raises only `ProtocolError` (every field is type-checked before it is used,
the version included): a bad frame, a version that is not two integers or an unknown major, an unknown
message type, malformed msgpack, an array outside the arena, a field of the wrong type or dtype,
or a size over `Limits`. A minor version bump may add fields with defaults; a decoder of the same
major ignores fields it does not know, and fills the defaults of fields the sender did not have.
"""

from __future__ import annotations

import dataclasses
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

SCHEMA_VERSION = (2, 1)
_ARRAY_EXT = 1  # msgpack ext type of an array reference into the arena
_ARRAY_REF = struct.Struct("<BQQ")  # dtype code, offset in the arena, nbytes
_ALIGN = 8
_PAD = bytes(_ALIGN)
_DTYPES = [np.dtype(t).newbyteorder("<") for t in
           ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "float16", "float32", "float64")]
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
_NUM_CODE = {dt.num: i for i, dt in enumerate(_DTYPES)}


@dataclass(frozen=True)
class Limits:
    """Bounds enforced on every decoded message (protects a service from hostile or buggy peers)."""

    max_message_bytes: int = 256 * 1024 * 1024
    max_nodes: int = 100_000  # segments in one tree message
    max_tokens: int = 16 * 1024 * 1024  # prompt + segment tokens in one tree message
    max_str_bytes: int = 4 * 1024 * 1024


def _array_bytes(arr: np.ndarray) -> tuple[int, memoryview]:
    code = _NUM_CODE.get(arr.dtype.num)
    if code is None or arr.ndim != 1:
        raise ProtocolError("dtype", f"cannot encode a {arr.ndim}-D {arr.dtype} array (1-D, dtypes {_DTYPES})")
    if arr.dtype.byteorder == ">" or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=_DTYPES[code])
    return code, arr.data.cast("B")


def _array_decoder(dtype: np.dtype) -> Callable[[Any, Any], np.ndarray]:
    dtype = dtype.newbyteorder("<")

    def array(v: Any, where: Any) -> np.ndarray:
        if type(v) is not np.ndarray:
            raise ProtocolError("type", f"{_loc(where)}: expected an array, got {_describe(v)}")
        if v.dtype != dtype:
            raise ProtocolError("dtype", f"{_loc(where)}: expected dtype {dtype}, got {v.dtype}")
        return v
    return array


def encode(msg: Any) -> bytes:
    """Serialise one message of `protocol.messages` to bytes."""
    name = WIRE_NAME.get(type(msg))
    if name is None:
        raise ProtocolError("type", f"{type(msg).__name__} is not a protocol message")
    arena: list[bytes | memoryview] = []
    size = 0

    def default(obj: Any) -> Any:
        nonlocal size
        if isinstance(obj, np.ndarray):
            code, data = _array_bytes(obj)
            ref = msgpack.ExtType(_ARRAY_EXT, _ARRAY_REF.pack(code, size, len(data)))
            pad = -len(data) % _ALIGN
            arena.extend((data, _PAD[:pad]))
            size += len(data) + pad
            return ref
        if dataclasses.is_dataclass(obj):
            return {k: getattr(obj, k) for k in _field_names(type(obj))}
        if isinstance(obj, np.generic):
            return obj.item()
        raise ProtocolError("type", f"cannot encode {type(obj).__name__}")

    header = msgpack.packb([SCHEMA_VERSION[0], SCHEMA_VERSION[1], name, msg], default=default, use_bin_type=True)
    return b"".join((len(header).to_bytes(4, "little"), header, _PAD[:-(4 + len(header)) % _ALIGN], *arena))


def decode(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> Any:
    """Parse and validate one message; raises only ProtocolError. Its arrays are views of `data`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("type", f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_message_bytes:
        raise ProtocolError("too_large", f"{len(data)} bytes > max_message_bytes={limits.max_message_bytes}")
    view = memoryview(data).cast("B")
    if len(view) < 4:
        raise ProtocolError("malformed", f"a {len(view)}-byte message has no header length")
    n_header = int.from_bytes(view[:4], "little")
    start = 4 + n_header + (-(4 + n_header) % _ALIGN)
    if start > len(view):
        raise ProtocolError("malformed", f"a {len(view)}-byte message cannot hold a {n_header}-byte header")
    arena = view[start:]

    def array(code: int, ref: bytes) -> np.ndarray:
        if code != _ARRAY_EXT or len(ref) != _ARRAY_REF.size:
            raise ProtocolError("malformed", f"unknown msgpack ext type {code} ({len(ref)} bytes)")
        dtype_code, offset, nbytes = _ARRAY_REF.unpack(ref)
        if dtype_code >= len(_DTYPES):
            raise ProtocolError("dtype", f"unknown dtype code {dtype_code}")
        dtype = _DTYPES[dtype_code]
        if offset + nbytes > len(arena) or nbytes % dtype.itemsize:
            raise ProtocolError("malformed", f"array of {nbytes} bytes at {offset}: not whole {dtype} items "
                                             f"inside the {len(arena)}-byte arena")
        return np.frombuffer(arena, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)

    try:
        env = msgpack.unpackb(
            view[4:4 + n_header], raw=False, strict_map_key=True, use_list=True, ext_hook=array,
            max_str_len=limits.max_str_bytes, max_bin_len=limits.max_str_bytes,
            max_ext_len=_ARRAY_REF.size, max_array_len=4 * limits.max_nodes + 16,
            max_map_len=4 * limits.max_nodes + 16,
        )
    except ProtocolError:
        raise
    except Exception as e:  # untrusted bytes: any unpack failure becomes the protocol's error
        raise ProtocolError("malformed", f"not valid msgpack: {e}") from None
    if not isinstance(env, list) or len(env) != 4:
        raise ProtocolError("malformed", "envelope must be [major, minor, type, body]")
    major, minor, name, body = env
    if type(major) is not int or type(minor) is not int:  # not `!=` on whatever came: an array has no truth value
        raise ProtocolError("version", f"schema version must be two integers, got [{_describe(major)}, "
                                       f"{_describe(minor)}]")
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
def _decoder(tp: Any) -> Callable[[Any, Any], Any]:
    """A validating converter for type `tp`, compiled once per type (decoding is on the hot path)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _array_decoder(typing.get_args(tp)[1])
    if origin is list:
        item = _decoder(typing.get_args(tp)[0])

        def lst(v, where):
            if type(v) is not list:
                raise ProtocolError("type", f"{_loc(where)}: expected a list, got {_describe(v)}")
            return [item(x, (where, i)) for i, x in enumerate(v)]
        return lst
    if origin is dict:
        kt, vt = (_decoder(a) for a in typing.get_args(tp))

        def dct(v, where):
            if type(v) is not dict:
                raise ProtocolError("type", f"{_loc(where)}: expected a map, got {_describe(v)}")
            return {kt(k, (where, "<key>")): vt(x, (where, k)) for k, x in v.items()}
        return dct
    if origin is typing.Literal:
        allowed = frozenset(typing.get_args(tp))

        def literal(v, where):
            if type(v) is not str or v not in allowed:
                raise ProtocolError("type", f"{_loc(where)}: {v!r} is not one of {sorted(allowed)}")
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
                raise ProtocolError("type", f"{_loc(where)}: expected a map for {name}, got {_describe(v)}")
            if not required <= v.keys():
                raise ProtocolError("type", f"{_loc(where)}: missing field(s) {sorted(required - v.keys())}")
            return tp(**{k: fields[k](x, (where, k)) for k, x in v.items() if k in fields})
        return build
    if tp is float:
        def number(v, where):
            if type(v) is not float and type(v) is not int:
                raise ProtocolError("type", f"{_loc(where)}: expected a number, got {_describe(v)}")
            return float(v)
        return number
    if tp in (int, str, bool, bytes):
        def scalar(v, where):
            if type(v) is not tp:
                raise ProtocolError("type", f"{_loc(where)}: expected {tp.__name__}, got {_describe(v)}")
            return v
        return scalar
    raise TypeError(f"protocol field type {tp} has no decoder")


def _loc(where: Any) -> str:
    """Render a location path: decoders pass (parent, key) pairs so nothing is formatted unless it fails."""
    if not isinstance(where, tuple):
        return str(where)
    parent, key = where
    return f"{_loc(parent)}.{key}" if isinstance(key, str) else f"{_loc(parent)}[{key}]"


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
