"""The `treepo` command: thin entry points that dispatch to each role's own module.

SUBCOMMANDS maps a name to (help, module); the module has `add_arguments(parser)` and
`run(args) -> exit code`. Only the chosen subcommand's module is imported, so `treepo --help`
does not load torch, vLLM or DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version

from protocol.config import ConfigError, config_warnings, dump_config, load_config

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("run the whole pipeline on this machine: Redis, buffer, actors, learner", "treepo.up"),
    "actor": ("run one actor: lease prompts, grow trees, stream them to the buffer", "actors.loop"),
    "learner": ("run the learner: train on buffered trees, push weights, checkpoint", "learner.loop"),
    "buffer": ("run the buffer service (ZeroMQ ingest -> Redis tree store)", "buffer.service"),
    "replay": ("feed stored trees (by run, version range) to a summary, another run's learner stream, or "
               "(--train) an offline learner", "treepo.replay"),
    "export": ("write stored trees as one row per leaf (JSONL, Parquet or a HF datasets directory)",
               "buffer.export"),
    "inspect": ("print a stored tree as an indented view, or (--html) draw it on a page", "buffer.tree_view"),
    "evaluator": ("run the evaluator: held-out accuracy of each pushed policy version (eval.every_versions)",
                  "actors.evaluator"),
    "eval": ("evaluate a model on the config's held-out prompts: accuracy, maj@k, pass@k, sampling cost",
             "actors.evaluate"),
    "keys": ("generate a CURVE key pair (Z85) for the security section", "treepo.keys"),
    "config": ("validate a config; --dry-run prints the resolved config", "treepo.cli"),
}


# this module is the `config` subcommand
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="YAML config file (defaults when omitted)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    import torch

    for warning in config_warnings(cfg, gpu=torch.cuda.is_available()):
        print(f"treepo: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(dump_config(cfg), end="")
    else:
        print(f"config OK: {args.file or '(defaults)'}")
    return 0


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treepo", description="Tree-structured RL post-training (TreePO/TreeRPO/GRPO).")
    parser.add_argument("--version", action="version", version=f"treepo {version('treepo')}")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (help_, module_name) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args._run(args)
    except ConfigError as e:
        print(f"treepo: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
