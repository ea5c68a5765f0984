"""Codec throughput: protocol encode+decode of a realistic tree beside plain msgpack of the same raw arrays.

The tree: 16 leaves of 4096 response tokens each, grown TreePO-style (l=512, binary for 4 levels,
then 16 chains), every segment with int32 token ids and float32 log-probs.
Baselines, no schema and no validation:
- plain: msgpack of the same raw arrays the protocol carries (the tree's columns, as bytes);
- plain per-segment: msgpack of each segment's token and log-prob arrays as separate bytes
  (the layout a naive per-node schema would have).
Prints figures, then one JSON line; `ratio` = protocol time / plain time (target <= 1.5).
"""

from __future__ import annotations

import json
import time

import msgpack
import numpy as np

from protocol import Leaf, SamplingSettings, Segment, SubtreeMsg, Tree, decode, encode


def realistic_tree(leaves: int = 16, seg: int = 512, depth: int = 8) -> Tree:
    rng = np.random.default_rng(0)
    segments: list[Segment] = []
    frontier = [0]
    next_id = 1
    for d in range(1, depth + 1):
        new = []
        for parent in frontier:
            for _ in range(2 if len(frontier) * 2 <= leaves else 1):
                segments.append(Segment(node_id=next_id, parent_id=parent, depth=d,
                                        token_ids=rng.integers(0, 150_000, seg, dtype=np.int32),
                                        logprobs=-rng.random(seg, dtype=np.float32) * 5, policy_version=12,
                                        finish="length" if d < depth else "stop"))
                new.append(next_id)
                next_id += 1
        frontier = new
    return Tree.build(tree_id="bench", prompt_id="p", run_id="bench", prompt_token_ids=np.arange(300, dtype=np.int32),
                sampling=SamplingSettings(segment_tokens=seg, max_depth=depth, width=leaves), segments=segments,
                leaves=[Leaf(node_id=n, reward=1.0, stop_reason="finished", reward_details={"acc": 1.0}) for n in frontier])


def timeit(fn, repeats: int = 30, number: int = 50) -> float:
    """Best per-call time over `repeats` batches of `number` calls (robust to a loaded machine)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def main() -> None:
    tree = realistic_tree()
    msg = SubtreeMsg(key="bench/0", actor_id="a", seq=0, tree=tree, final=True, n_pieces=1)
    columns = [tree.prompt_token_ids, tree.node_ids, tree.parent_ids, tree.depths, tree.versions, tree.finishes,
               tree.seg_lens, tree.tokens, tree.logprobs, tree.leaf_ids, tree.rewards, tree.stop_reasons]
    per_segment = [tree.prompt_token_ids] + [a for s in tree.segments for a in (s.token_ids, s.logprobs)]
    payload = sum(a.nbytes for a in columns)
    wire = encode(msg)
    plain = msgpack.packb([a.tobytes() for a in columns], use_bin_type=True)

    t_codec = timeit(lambda: decode(encode(msg)))
    t_plain = timeit(lambda: msgpack.unpackb(msgpack.packb([a.tobytes() for a in columns], use_bin_type=True)))
    t_seg = timeit(lambda: msgpack.unpackb(msgpack.packb([a.tobytes() for a in per_segment], use_bin_type=True)))
    t_enc = timeit(lambda: encode(msg))
    t_dec = timeit(lambda: decode(wire))
    mb = payload / 1e6
    print(f"tree: {len(tree.segments)} segments, {len(tree.leaves)} leaves, {tree.unique_token_count()} unique tokens, "
          f"payload {mb:.2f} MB, protocol message {len(wire) / 1e6:.2f} MB, plain msgpack {len(plain) / 1e6:.2f} MB")
    print(f"protocol encode      {mb / t_enc:9.0f} MB/s  ({t_enc * 1e3:.3f} ms)")
    print(f"protocol decode      {mb / t_dec:9.0f} MB/s  ({t_dec * 1e3:.3f} ms)")
    print(f"protocol enc+dec     {mb / t_codec:9.0f} MB/s  ({t_codec * 1e3:.3f} ms)")
    print(f"plain msgpack enc+dec{mb / t_plain:9.0f} MB/s  ({t_plain * 1e3:.3f} ms)  same columns as bytes")
    print(f"plain per-segment    {mb / t_seg:9.0f} MB/s  ({t_seg * 1e3:.3f} ms)  {len(per_segment)} arrays as bytes")
    print(f"ratio protocol/plain {t_codec / t_plain:.2f}x (target <= 1.5), protocol/per-segment {t_codec / t_seg:.2f}x")
    print(json.dumps({"codec_mb_s": round(mb / t_codec, 1), "plain_mb_s": round(mb / t_plain, 1),
                      "plain_per_segment_mb_s": round(mb / t_seg, 1), "ratio": round(t_codec / t_plain, 3),
                      "ratio_vs_per_segment": round(t_codec / t_seg, 3), "wire_overhead": round(len(wire) / len(plain), 4),
                      "segments": len(tree.segments), "payload_mb": round(mb, 3)}))


if __name__ == "__main__":
    main()
