import json
import struct

import pytest
import torch
from safetensors.torch import save

from protocol.errors import ProtocolError
from protocol.messages import TensorMeta, WeightChunk, WeightHeader
from protocol.weight_layout import (
    check_chunk,
    check_header,
    flatten_into,
    plan_chunks,
    plan_layout,
)
from tests.factories import mixed_state_dict


def flat_of(sd):
    metas, total = plan_layout(sd)
    flat = torch.full((total,), 0xAB, dtype=torch.uint8)
    flatten_into(sd, metas, flat)
    return metas, total, flat.numpy().tobytes()


def test_flat_buffer_holds_every_byte_once():
    sd = mixed_state_dict()
    metas, total, flat = flat_of(sd)
    assert len(flat) == total == sum(t.numel() * t.element_size() for t in sd.values())
    check_header(WeightHeader(run_id="r", version=1, tensors=metas, total_bytes=total, n_chunks=1))
    assert [m.name for m in metas] == list(sd)  # the header keeps the state dict's order


def test_layout_matches_safetensors_bytes_and_dtype_names():
    sd = mixed_state_dict()
    metas, _, flat = flat_of(sd)
    blob = save(sd)
    (n,) = struct.unpack_from("<Q", blob)
    st_header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    for m in metas:
        ref = st_header[m.name]
        assert m.dtype == ref["dtype"] and m.shape == ref["shape"]
        begin, end = ref["data_offsets"]
        assert flat[m.offset:m.offset + m.nbytes] == data[begin:end], m.name


def test_offsets_are_aligned_and_hole_free():
    metas, total = plan_layout(mixed_state_dict())
    sizes = {"F64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "BOOL": 1}
    assert all(m.offset % sizes[m.dtype] == 0 for m in metas)
    spans = sorted((m.offset, m.offset + m.nbytes) for m in metas)
    assert spans[0][0] == 0 and spans[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_chunks_are_cut_at_tensor_boundaries_unless_a_tensor_is_larger():
    sizes = [40, 30, 20, 100, 10, 10, 0, 50, 5]
    metas, at = [], 0
    for i, n in enumerate(sizes):
        metas.append(TensorMeta(f"t{i}", "U8", [n], at, n))
        at += n
    assert plan_chunks(metas, 50) == [(0, 40), (40, 50), (90, 50), (140, 50), (190, 20), (210, 50), (260, 5)]
    assert plan_chunks(metas, 1000) == [(0, 265)]
    assert plan_chunks(metas, 1) == [(i, 1) for i in range(265)]
    assert plan_chunks([TensorMeta("e", "F32", [0], 0, 0)], 8) == []


def header(*tensors, total):
    return WeightHeader(run_id="r", version=3, tensors=list(tensors), total_bytes=total, n_chunks=1)


@pytest.mark.parametrize("bad,match", [
    (header(TensorMeta("a", "F32", [2], 0, 8), TensorMeta("b", "F32", [2], 4, 8), total=12), "overlap"),
    (header(TensorMeta("a", "F32", [2], 0, 8), TensorMeta("b", "F32", [1], 12, 4), total=16), "hole"),
    (header(TensorMeta("a", "F32", [3], 0, 8), total=8), "shape"),
    (header(TensorMeta("a", "Q4", [2], 0, 2), total=2), "dtype"),
    (header(TensorMeta("a", "F32", [2], 0, 8), total=16), "cover"),
    (header(TensorMeta("a", "BF16", [1], 0, 2), TensorMeta("b", "F32", [1], 2, 4), total=6), "aligned"),
    (header(TensorMeta("a", "F32", [1], 0, 4), TensorMeta("a", "F32", [1], 4, 4), total=8), "duplicate"),
])
def test_bad_headers_are_refused(bad, match):
    with pytest.raises(ProtocolError, match=match):
        check_header(bad)


# 40 bytes in 3 chunks of 16, 16 and 8 bytes
FORTY = WeightHeader(run_id="r", version=5, tensors=[TensorMeta("w", "F32", [10], 0, 40)], total_bytes=40, n_chunks=3)


def test_chunks_in_order_with_matching_payloads_pass():
    for index, offset, nbytes in ((0, 0, 16), (1, 16, 16), (2, 32, 8)):
        check_chunk(FORTY, WeightChunk(version=5, index=index, offset=offset, nbytes=nbytes), nbytes, index, offset)


@pytest.mark.parametrize("chunk,payload,due,match", [
    (WeightChunk(5, 0, 0, 16), 15, (0, 0), "payload frame of 15 B, the chunk says 16"),
    (WeightChunk(5, 0, 0, 16), 17, (0, 0), "payload frame of 17 B"),
    (WeightChunk(5, 2, 32, 8), 8, (1, 16), "chunk 1 at byte 16 was due"),  # one skipped
    (WeightChunk(5, 1, 20, 16), 16, (1, 16), "chunk 1 at byte 16 was due"),  # a gap
    (WeightChunk(5, 3, 40, 8), 8, (3, 40), "index out of range"),
    (WeightChunk(5, -1, 0, 16), 16, (-1, 0), "index out of range"),
    (WeightChunk(5, 2, 32, 16), 16, (2, 32), r"bytes \[32, 48\) outside \[0, 40\)"),
    (WeightChunk(5, 0, 0, 0), 0, (0, 0), "outside"),  # an empty chunk
    (WeightChunk(5, 1, 16, 24), 24, (1, 16), "only the last of 3 chunks ends at 40"),  # ends early on chunk 1
    (WeightChunk(5, 2, 32, 4), 4, (2, 32), "ends at byte 36"),  # the last chunk leaves bytes out
])
def test_bad_chunks_are_refused(chunk, payload, due, match):
    with pytest.raises(ProtocolError, match=match):
        check_chunk(FORTY, chunk, payload, *due)
