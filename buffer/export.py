"""`treepo export`: stored trees as a table with one row per leaf (JSONL, Parquet, or a Hugging Face
`datasets` directory).

Columns: run_id, tree_id, prompt_id, leaf_id, prompt (text), path_text (the response of the leaf's
trajectory decoded with the run's tokenizer; null without one), path_token_ids, n_tokens, reward,
stop_reason, versions (behaviour policy version of each segment on the path), min_version,
max_version, and what the learner trained the tree with (`TreeStore.save_advantages`; null when it
was never trained): advantage_level ("leaf" or "segment"), advantage (level leaf: the advantage of
every token of the path; level segment: null), segment_advantages (level segment: one per segment
of the path, null where its sibling group was dropped; level leaf: null), trained_version (the
learner's policy version when it trained the tree).

`--format hf` writes a directory that `datasets.load_dataset(DIR)` loads as one `train` split:
`data/train-00000-of-00001.parquet` (the columns above, a fixed Parquet schema) and a `README.md`
dataset card whose YAML header names the data file and whose body lists the columns and types. Rows can feed other tools: SFT on the best
leaves (`reward`), preference or reward-model pairs (leaves of one `prompt_id`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from buffer.offline_access import (
    TextDecoder,
    add_store_arguments,
    add_version_range,
    open_store,
    text_decoder,
    version_range,
)
from buffer.store import AdvantageRecord, TreeStore
from protocol.tree import STOP_REASONS, Tree

SCHEMA = pa.schema([  # fixed, so that an export without any trained tree has the same columns and types
    ("run_id", pa.string()), ("tree_id", pa.string()), ("prompt_id", pa.string()), ("leaf_id", pa.int64()),
    ("prompt", pa.string()), ("path_text", pa.string()), ("path_token_ids", pa.list_(pa.int64())),
    ("n_tokens", pa.int64()), ("reward", pa.float64()), ("stop_reason", pa.string()),
    ("versions", pa.list_(pa.int64())), ("min_version", pa.int64()), ("max_version", pa.int64()),
    ("advantage_level", pa.string()), ("advantage", pa.float64()), ("segment_advantages", pa.list_(pa.float64())),
    ("trained_version", pa.int64()),
])
HF_DATA_FILE = "data/train-00000-of-00001.parquet"  # one train split (the Hub's file naming)


def leaf_rows(tree: Tree, trained: AdvantageRecord | None, decode_text: TextDecoder | None) -> list[dict]:
    """One row per leaf of `tree` (see the module docstring)."""
    rows = []
    for j, leaf_id in enumerate(tree.leaf_ids.tolist()):
        ids = tree.path_tokens(leaf_id).tolist()
        path = tree.path_ids(leaf_id)
        versions = [int(tree.versions[tree.index[n]]) for n in path]
        level = None if trained is None else trained.level
        rows.append({
            "run_id": tree.run_id, "tree_id": tree.tree_id, "prompt_id": tree.prompt_id, "leaf_id": leaf_id,
            "prompt": tree.prompt_text, "path_text": None if decode_text is None else decode_text(ids),
            "path_token_ids": ids, "n_tokens": len(ids), "reward": float(tree.rewards[j]),
            "stop_reason": STOP_REASONS[tree.stop_reasons[j]], "versions": versions,
            "min_version": min(versions), "max_version": max(versions), "advantage_level": level,
            "advantage": trained.values.get(leaf_id) if level == "leaf" else None,
            "segment_advantages": [trained.values.get(n) for n in path] if level == "segment" else None,
            "trained_version": None if trained is None else trained.trained_version,
        })
    return rows


def _card(n_rows: int, run_id: str) -> str:
    """The dataset card of an hf export: a YAML header naming the data file of the `train` split (the types come
    from the Parquet schema), then the columns and their types."""
    header = yaml.safe_dump({"configs": [{"config_name": "default",
                                          "data_files": [{"split": "train", "path": HF_DATA_FILE}]}]}, sort_keys=False)
    columns = "\n".join(f"| `{f.name}` | {f.type} |" for f in SCHEMA)
    return (f"---\n{header}---\n\n# TreePO trees of run `{run_id}`\n\n{n_rows} rows, one per leaf of each stored "
            f"tree, written by `treepo export --format hf` (the columns are described in `buffer/export.py` of the "
            f"treepo repository). Load with `datasets.load_dataset(\"<this directory>\")`.\n\n"
            f"| column | type |\n|---|---|\n{columns}\n")


def export(store: TreeStore, out: Path, fmt: str, decode_text: TextDecoder | None = None,
           min_version: float = float("-inf"), max_version: float = float("inf")) -> int:
    """Write the leaves of the run's stored trees to `out` (fmt: jsonl | parquet | hf); returns the row count."""
    rows = [row for tree in store.iter_trees(min_version, max_version)
            for row in leaf_rows(tree, store.advantages(tree.tree_id), decode_text)]
    if fmt == "jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return len(rows)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    if fmt == "hf":
        (out / HF_DATA_FILE).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / HF_DATA_FILE)
        (out / "README.md").write_text(_card(len(rows), store.run_id))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    return len(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_store_arguments(p)
    add_version_range(p)
    p.add_argument("--out", required=True, help="output file (.jsonl or .parquet), or directory (--format hf)")
    p.add_argument("--format", choices=["jsonl", "parquet", "hf"],
                   help="default: from the file suffix; hf: a directory `datasets.load_dataset` loads")
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
