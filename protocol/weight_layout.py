"""The flat byte layout of one policy version on the wire (safetensors layout), shared by learner and actors.

A state dict becomes one flat little-endian buffer: each tensor's bytes, row-major, contiguous,
no holes; `TensorMeta` gives its safetensors dtype name (F32, BF16, F16, ...), shape, byte offset
and byte length. As safetensors does, tensors are placed in order of decreasing element size, so
every tensor starts at a multiple of its element size (the receiver views the buffer without
copies); the header lists them in the state dict's own order. The buffer travels as `n_chunks`
chunks, in order: chunk i starts where chunk i-1 ended. Each `WeightChunk` names its byte range
(offset, nbytes); its payload is the message's second frame (`protocol.messages.WeightChunk`),
which `check_chunk` validates before any byte is used. The sender cuts chunks at tensor boundaries
(`plan_chunks`): consecutive tensors share a chunk of at most the chunk size, and a larger tensor
spans chunks of its own; so a receiver can view every tensor that fits in a chunk inside that
chunk's frame and copies only the tensors larger than a chunk. Receivers accept any cut.
Each chunk carries `chunk_digest` of its bytes, checked on arrival at every hop.
`flatten_into` writes the buffer; the receiver (`actors/weight_receiver.py`) views it as tensors again.

Imports torch; `protocol/__init__` does not import this module, so the codec stays torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import xxhash

from protocol.errors import ProtocolError
from protocol.messages import TensorMeta, WeightChunk, WeightHeader

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES: dict[str, torch.dtype] = {name: dt for dt, name in DTYPE_NAMES.items()}


def storage_users(t: torch.Tensor) -> int:
    """How many tensors share `t`'s storage (views included); a buffer whose count is back to what it was
    when it was allocated alone is referenced by nobody else and may be refilled."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def plan_layout(state_dict: dict[str, torch.Tensor]) -> tuple[list[TensorMeta], int]:
    """Offsets of every tensor in the flat buffer, and its total size."""
    metas = []
    for name, t in state_dict.items():
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
        metas.append(TensorMeta(name=name, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), offset=0,
                                nbytes=t.numel() * t.element_size()))
    offset = 0
    for meta in sorted(metas, key=lambda m: -TORCH_DTYPES[m.dtype].itemsize):  # stable: keeps dict order
        meta.offset = offset
        offset += meta.nbytes
    return metas, offset


def plan_chunks(metas: list[TensorMeta], chunk_bytes: int) -> list[tuple[int, int]]:
    """The (offset, nbytes) of each chunk, in order, covering the buffer without holes, cut at tensor
    boundaries: consecutive tensors share a chunk of at most `chunk_bytes`; a tensor larger than that
    alone spans chunks of `chunk_bytes` (its last one shorter)."""
    chunks: list[tuple[int, int]] = []
    start = end = 0
    for m in sorted(metas, key=lambda m: m.offset):
        if m.nbytes > chunk_bytes:
            if end > start:
                chunks.append((start, end - start))
            chunks += [(at, min(chunk_bytes, m.offset + m.nbytes - at))
                       for at in range(m.offset, m.offset + m.nbytes, chunk_bytes)]
            start = end = m.offset + m.nbytes
        elif end - start + m.nbytes > chunk_bytes:
            chunks.append((start, end - start))
            start, end = m.offset, m.offset + m.nbytes
        else:
            end += m.nbytes
    if end > start:
        chunks.append((start, end - start))
    return chunks


def flatten_into(state_dict: dict[str, torch.Tensor], metas: list[TensorMeta], flat: torch.Tensor,
                 progress: Callable[[int], None] | None = None) -> None:
    """Copy every tensor's bytes into the 1-D uint8 tensor `flat` at its planned offset (from any device),
    in offset order; after each tensor, `progress(n)` says the first n bytes of `flat` are written.

    CPU tensors are copied by numpy (one thread, no GIL): torch's intra-op threads made these plain
    copies 40x slower on a busy 2-core machine (their workers spin while other processes hold the cores).
    """
    flat_np = flat.numpy()
    for m in sorted(metas, key=lambda m: m.offset):
        if m.nbytes:
            src = state_dict[m.name].detach().reshape(-1).view(torch.uint8)
            if src.device.type == "cpu":
                flat_np[m.offset:m.offset + m.nbytes] = src.numpy()
            else:
                flat[m.offset:m.offset + m.nbytes].copy_(src)
        if progress is not None:
            progress(m.offset + m.nbytes)


def chunk_digest(payload: bytes | memoryview) -> str:
    """The digest a WeightChunk carries of its payload: xxh3-128 as hex (about 20 GB/s on one core, so a
    version is checked at every hop at a small fraction of the copy's cost). It detects corruption (a
    relay's bug, a bad buffer, a partial assembly); CURVE authenticates each hop."""
    return xxhash.xxh3_128_hexdigest(payload)


def check_header(header: WeightHeader) -> None:
    """Raise ProtocolError unless the header describes a hole-free, in-bounds, well-typed layout."""
    if header.total_bytes < 0 or header.n_chunks < 0 or (header.total_bytes > 0) != (header.n_chunks > 0):
        raise ProtocolError("malformed", f"weights v{header.version}: {header.total_bytes} bytes in {header.n_chunks} chunks")
    if header.n_chunks > header.total_bytes:
        raise ProtocolError("malformed", f"weights v{header.version}: more chunks than bytes")
    spans = []
    for m in header.tensors:
        dtype = TORCH_DTYPES.get(m.dtype)
        if dtype is None:
            raise ProtocolError("dtype", f"tensor {m.name!r}: unknown dtype {m.dtype!r}")
        if any(d < 0 for d in m.shape) or math.prod(m.shape) * dtype.itemsize != m.nbytes:
            raise ProtocolError("malformed", f"tensor {m.name!r}: shape {m.shape} does not match {m.nbytes} bytes")
        if m.offset < 0 or m.offset % dtype.itemsize:
            raise ProtocolError("malformed", f"tensor {m.name!r}: offset {m.offset} not aligned to {dtype.itemsize}")
        spans.append((m.offset, m.offset + m.nbytes))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise ProtocolError("malformed", f"weights v{header.version}: tensor bytes overlap or leave a hole at {end}")
        end = stop
    if end != header.total_bytes:
        raise ProtocolError("malformed", f"weights v{header.version}: tensors cover {end} of {header.total_bytes} bytes")
    if len({m.name for m in header.tensors}) != len(header.tensors):
        raise ProtocolError("malformed", f"weights v{header.version}: duplicate tensor names")


def check_chunk(header: WeightHeader, chunk: WeightChunk, payload_nbytes: int, due_index: int, due_offset: int) -> None:
    """Raise ProtocolError unless `chunk` of `header`'s version is the one due (index `due_index`, starting at
    byte `due_offset`), its payload frame holds exactly `chunk.nbytes` bytes, and its range lies inside the
    buffer, the last chunk ending where the buffer ends."""
    where = f"weights v{header.version} chunk {chunk.index}"
    if payload_nbytes != chunk.nbytes:
        raise ProtocolError("malformed", f"{where}: a payload frame of {payload_nbytes} B, the chunk says {chunk.nbytes}")
    if chunk.index != due_index or chunk.offset != due_offset:
        raise ProtocolError("malformed", f"{where} at byte {chunk.offset}: chunk {due_index} at byte {due_offset} was due")
    if not 0 <= chunk.index < header.n_chunks:
        raise ProtocolError("malformed", f"{where}: index out of range (n_chunks={header.n_chunks})")
    end = chunk.offset + chunk.nbytes
    if chunk.nbytes <= 0 or end > header.total_bytes:
        raise ProtocolError("malformed", f"{where}: bytes [{chunk.offset}, {end}) outside [0, {header.total_bytes})")
    if (chunk.index == header.n_chunks - 1) != (end == header.total_bytes):
        raise ProtocolError("malformed", f"{where}: ends at byte {end}; only the last of {header.n_chunks} chunks "
                            f"ends at {header.total_bytes}")
