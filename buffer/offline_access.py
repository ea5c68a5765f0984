"""Opening a run's tree store and its tokenizer for the offline commands (replay, export, inspect).

The store: the configured Redis URL, or the embedded server of `buffer.data_dir` (the running one
when `treepo buffer` is up, else one started for the command). The tokenizer: `--tokenizer DIR`,
else the run's model directory (`model.path`, default `<run.output_dir>/model`) when it holds one;
without a tokenizer, text is shown as token ids.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from buffer.redis_server import RedisHandle, connect
from buffer.store import TreeStore
from protocol.config.pipeline import PipelineConfig, load_config

TextDecoder = Callable[[list[int]], str]


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults when omitted)")
    p.add_argument("--run", help="run id (default: run.run_id of the config)")


def add_version_range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-version", type=int, default=None, help="oldest policy version (of a tree's oldest segment)")
    p.add_argument("--max-version", type=int, default=None, help="newest policy version (of a tree's oldest segment)")


def version_range(args: argparse.Namespace) -> tuple[float, float]:
    lo = float("-inf") if args.min_version is None else args.min_version
    hi = float("inf") if args.max_version is None else args.max_version
    return lo, hi


def open_store(args: argparse.Namespace) -> tuple[PipelineConfig, RedisHandle, TreeStore]:
    cfg = load_config(args.config)
    handle = connect(cfg, reuse_running=True)
    store = TreeStore.from_config(handle.client, cfg)
    if args.run:
        store = TreeStore(handle.client, args.run, limits=cfg.limits.limits())
    return cfg, handle, store


def text_decoder(cfg: PipelineConfig, tokenizer_dir: str | None) -> TextDecoder | None:
    """`ids -> text` with the run's tokenizer, or None when there is none to load."""
    path = Path(tokenizer_dir or cfg.model.path or Path(cfg.run.output_dir) / "model")
    if not (path / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is there

    tok = AutoTokenizer.from_pretrained(str(path))
    return lambda ids: tok.decode(ids, skip_special_tokens=False)
