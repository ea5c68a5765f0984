"""Replay: feed stored trees of a run (by policy-version range) to a consumer, without actors.

`replay(store, consume, ...)` calls `consume(trees)` with batches of `batch_size` trees, oldest
policy version first. `replay_into(source, target, ...)` copies the trees into another run's stream
(as the buffer would store them, waiting while that run is at its unconsumed cap), so a learner
started on the target run trains on them through its usual `BatchSource`.

`treepo replay` prints a summary per batch, or with `--into-run` copies into that run's stream.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from buffer.offline_access import add_store_arguments, add_version_range, open_store, version_range
from buffer.store import TreeStore
from protocol.tree import Tree


def replay(store: TreeStore, consume: Callable[[list[Tree]], None], *, min_version: float = float("-inf"),
           max_version: float = float("inf"), batch_size: int = 8) -> int:
    """Hand stored trees to `consume` in batches; returns how many trees were replayed."""
    batch: list[Tree] = []
    n = 0
    for tree in store.iter_trees(min_version, max_version):
        batch.append(tree)
        n += 1
        if len(batch) == batch_size:
            consume(batch)
            batch = []
    if batch:
        consume(batch)
    return n


def replay_into(source: TreeStore, target: TreeStore, *, min_version: float = float("-inf"),
                max_version: float = float("inf"), wait_s: float = 0.2) -> int:
    """Copy stored trees into `target`'s stream; returns how many were new there."""
    lo = "-inf" if min_version == float("-inf") else int(min_version)
    hi = "+inf" if max_version == float("inf") else int(max_version)
    new = 0
    for tid, version in source.r.zrangebyscore(source.key("by_version"), lo, hi, withscores=True):
        tree_id = tid.decode()
        blob = source.r.get(source.key(f"tree:{tree_id}"))
        if blob is None:
            continue  # trimmed since the index was read
        while (status := target.store_whole(tree_id, blob, int(version)).decode()) == "backpressure":
            time.sleep(wait_s)
        new += status == "stored"
    return new


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_store_arguments(p)
    add_version_range(p)
    p.add_argument("--batch", type=int, default=8, help="trees per batch")
    p.add_argument("--into-run", help="copy the trees into this run's learner stream instead of printing")


def run(args: argparse.Namespace) -> int:
    _, handle, store = open_store(args)
    lo, hi = version_range(args)
    with handle:
        if args.into_run:
            target = TreeStore(handle.client, args.into_run, limits=store.limits)
            n = replay_into(store, target, min_version=lo, max_version=hi)
            print(f"replayed {n} new trees of run {store.run_id!r} into run {args.into_run!r}")
            return 0
        index = 0

        def summary(trees: list[Tree]) -> None:
            nonlocal index
            versions = [int(t.versions.min()) for t in trees if len(t.versions)]
            leaves = sum(len(t.leaf_ids) for t in trees)
            tokens = sum(len(t.tokens) for t in trees)
            span = f"{min(versions)}..{max(versions)}" if versions else "-"
            print(f"batch {index}: {len(trees)} trees, {leaves} leaves, {tokens} tokens, versions {span}")
            index += 1

        n = replay(store, summary, min_version=lo, max_version=hi, batch_size=args.batch)
        print(f"replayed {n} trees of run {store.run_id!r}")
    return 0
