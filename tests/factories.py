"""Builders of protocol objects for tests: a deterministic example tree and a structural comparer."""

from __future__ import annotations

import dataclasses
import struct

import msgpack
import numpy as np

from protocol import Leaf, SamplingSettings, Segment, SubtreeMsg, Tree


def example_tree(n_leaves: int = 4, seg_tokens: int = 8, seed: int = 0) -> Tree:
    """A binary tree q->{A,B}, A->{A1,A2}, B->{B1,B2}, ... with n_leaves leaves at depth 2 (n_leaves even)."""
    rng = np.random.default_rng(seed)

    def seg(node_id: int, parent: int, depth: int, finish="length") -> Segment:
        return Segment(node_id=node_id, parent_id=parent, depth=depth,
                       token_ids=rng.integers(0, 50_000, seg_tokens, dtype=np.int32),
                       logprobs=-rng.random(seg_tokens, dtype=np.float32), policy_version=3, finish=finish)

    segments, leaves = [], []
    next_id = 1
    for _ in range(n_leaves // 2):
        parent = next_id
        segments.append(seg(parent, 0, 1))
        next_id += 1
        for _ in range(2):
            segments.append(seg(next_id, parent, 2, "stop"))
            leaves.append(Leaf(node_id=next_id, reward=float(rng.choice([-1.0, 1.0])), stop_reason="eos",
                               reward_details={"acc": 1.0}))
            next_id += 1
    return Tree.build(tree_id=f"t{seed}", prompt_id=f"p{seed}", run_id="run", prompt_token_ids=np.arange(5, dtype=np.int32),
                sampling=SamplingSettings(segment_tokens=seg_tokens, max_depth=2, width=n_leaves),
                segments=segments, leaves=leaves, prompt_text="1+1=?", answer="2")


def example_subtree_msg(**kw) -> SubtreeMsg:
    return SubtreeMsg(key="t0/0", actor_id="actor-0", seq=0, tree=example_tree(**kw), final=True, n_pieces=1)


def same(a, b) -> bool:
    """Deep equality that understands numpy arrays (dtype and values) inside dataclasses."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def frame(envelope, arena: bytes = b"") -> bytes:
    """A message in the wire format, written here by hand from the codec's docstring (not by `encode`)."""
    header = msgpack.packb(envelope, use_bin_type=True)
    return struct.pack("<I", len(header)) + header + bytes(-(4 + len(header)) % 8) + arena


def unframe(wire: bytes) -> tuple[list, bytes]:
    """(envelope with arrays left as ExtType references, arena) of an encoded message."""
    n = struct.unpack_from("<I", wire)[0]
    env = msgpack.unpackb(wire[4:4 + n], ext_hook=msgpack.ExtType)
    return env, wire[4 + n + (-(4 + n) % 8):]


def mixed_state_dict() -> dict:
    """A state dict of every kind of tensor the weight push must carry: bf16, f32, a 0-d f64, int32, bool,
    f16 and an empty tensor."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(37, 16, generator=g).to(torch.bfloat16),
        "w": torch.randn(16, 16, generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "ids": torch.arange(5, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(3, generator=g).to(torch.float16),
        "empty": torch.zeros(0, 7),
    }
