"""How every role process (`treepo buffer|actor|learner`) starts: the same log format, the validated
config, a stop event that SIGTERM or SIGINT sets, so each role finishes its current work (flush,
checkpoint) and leaves cleanly instead of dying mid-write, a heap that keeps what it frees, and the
seconds since the process started (each role logs its start-up time: `process_age_s`).

Every role moves messages of 0.1-10 MB (trees, weight chunks). glibc returns a freed heap top to the
kernel once it exceeds a threshold that adapts to about twice the largest freed block, so a batch of
such messages freed together is handed back and faulted in again for the next batch: the buffer
service took ~110 page faults per 0.4 MB tree, 70% of its CPU time in the kernel. `retain_freed_memory`
raises both thresholds (bench/buffer.py: service CPU per tree 1.23 -> 0.90 ms). RSS then stays at the
high-water mark of one batch, which every role bounds.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import signal
import sys
import threading
import time

import psutil

from protocol.config import PipelineConfig, load_config


def process_age_s() -> float:
    """Seconds since this process started (the kernel's start time: imports and set-up included)."""
    return time.time() - psutil.Process().create_time()


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults when omitted)")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters of glibc's malloc.h


def retain_freed_memory(trim_bytes: int = 1 << 30, mmap_bytes: int = 32 << 20) -> None:
    """Keep freed heap memory up to `trim_bytes`, serve blocks below `mmap_bytes` from the heap, and use one
    heap for all threads (Linux; musl's mallopt ignores it, other systems keep their allocator's defaults).

    Call it before the process starts threads. One heap matters for ZeroMQ: its I/O thread allocates
    every received message, and glibc gives a thread's own heap back to the kernel as soon as its blocks
    are freed, so each weight version page-faulted its chunks in afresh (an actor spent half its CPU on
    the faults of 130k pages per GB received)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes)
    libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)
    libc.mallopt(_M_ARENA_MAX, 1)


def start_role(args: argparse.Namespace, cfg: PipelineConfig | None = None) -> tuple[PipelineConfig, threading.Event]:
    """Logging, heap, config (`cfg` when the caller composed it, else the file `--config`), stop event."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    retain_freed_memory()
    cfg = cfg or load_config(args.config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return cfg, stop
