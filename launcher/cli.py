"""The `treepo` command: thin entry points that dispatch to each package's own main.

Subcommands register themselves in SUBCOMMANDS: (help, add_arguments, run). Each role's package
owns its `run`; this file only wires them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import version

from buffer import export as buffer_export
from buffer import replay as buffer_replay
from buffer import service as buffer_service
from buffer import tree_view as buffer_tree_view
from launcher import keys
from protocol.config import ConfigError, dump_config, load_config


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="YAML config file (defaults when omitted)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def _config_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    if args.dry_run:
        print(dump_config(cfg), end="")
    else:
        print(f"config OK: {args.file or '(defaults)'}")
    return 0


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "config": ("validate a config; --dry-run prints the resolved config", _config_args, _config_run),
    "keys": ("generate a CURVE key pair (Z85) for the security section", keys.add_arguments, keys.run),
    "buffer": ("run the buffer service (ZeroMQ ingest -> Redis tree store)", buffer_service.add_arguments,
               buffer_service.run),
    "replay": ("feed stored trees (by run, version range) to a summary or another run's learner stream",
               buffer_replay.add_arguments, buffer_replay.run),
    "export": ("write stored trees as one row per leaf (JSONL or Parquet)", buffer_export.add_arguments,
               buffer_export.run),
    "inspect": ("print a stored tree as an indented view", buffer_tree_view.add_arguments, buffer_tree_view.run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treepo", description="Tree-structured RL post-training (TreePO/TreeRPO/GRPO).")
    parser.add_argument("--version", action="version", version=f"treepo {version('treepo')}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except ConfigError as e:
        print(f"treepo: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
