"""`treepo export`: stored trees as a table with one row per leaf (JSONL or Parquet).

Columns: run_id, tree_id, prompt_id, leaf_id, prompt (text), path_text (the response of the leaf's
trajectory decoded with the run's tokenizer; null without one), path_token_ids, n_tokens, reward,
stop_reason, versions (policy version of each segment on the path), min_version, max_version,
advantage (what the learner saved with `TreeStore.save_advantages`; null if none).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from buffer.offline_access import (
    TextDecoder,
    add_store_arguments,
    add_version_range,
    open_store,
    text_decoder,
    version_range,
)
from buffer.store import TreeStore
from protocol.tree import STOP_REASONS, Tree


def leaf_rows(tree: Tree, advantages: dict[int, float], decode_text: TextDecoder | None) -> list[dict]:
    """One row per leaf of `tree` (see the module docstring)."""
    rows = []
    for j, leaf_id in enumerate(tree.leaf_ids.tolist()):
        ids = tree.path_tokens(leaf_id).tolist()
        versions = [int(tree.versions[tree.index[n]]) for n in tree.path_ids(leaf_id)]
        rows.append({
            "run_id": tree.run_id, "tree_id": tree.tree_id, "prompt_id": tree.prompt_id, "leaf_id": leaf_id,
            "prompt": tree.prompt_text, "path_text": None if decode_text is None else decode_text(ids),
            "path_token_ids": ids, "n_tokens": len(ids), "reward": float(tree.rewards[j]),
            "stop_reason": STOP_REASONS[tree.stop_reasons[j]], "versions": versions,
            "min_version": min(versions), "max_version": max(versions), "advantage": advantages.get(leaf_id),
        })
    return rows


def export(store: TreeStore, out: Path, fmt: str, decode_text: TextDecoder | None = None,
           min_version: float = float("-inf"), max_version: float = float("inf")) -> int:
    """Write the leaves of the run's stored trees to `out` (fmt: jsonl | parquet); returns the row count."""
    rows = [row for tree in store.iter_trees(min_version, max_version)
            for row in leaf_rows(tree, store.advantages(tree.tree_id), decode_text)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), out)
    else:
        with out.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return len(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_store_arguments(p)
    add_version_range(p)
    p.add_argument("--out", required=True, help="output file (.jsonl or .parquet)")
    p.add_argument("--format", choices=["jsonl", "parquet"], help="default: from the file suffix")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the run's model directory)")


def run(args: argparse.Namespace) -> int:
    cfg, handle, store = open_store(args)
    out = Path(args.out)
    fmt = args.format or ("parquet" if out.suffix == ".parquet" else "jsonl")
    lo, hi = version_range(args)
    with handle:
        n = export(store, out, fmt, text_decoder(cfg, args.tokenizer), lo, hi)
    print(f"wrote {n} leaves of run {store.run_id!r} to {out}")
    return 0
