"""How every role process (`treepo buffer|actor|learner`) starts: the same log format, the validated
config, and a stop event that SIGTERM or SIGINT sets, so each role finishes its current work
(flush, checkpoint) and leaves cleanly instead of dying mid-write."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from protocol.config import PipelineConfig, load_config


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults when omitted)")


def start_role(args: argparse.Namespace) -> tuple[PipelineConfig, threading.Event]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return cfg, stop
