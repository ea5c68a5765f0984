"""`treepo replay`: stored trees to a summary or another run's stream (`buffer.replay`), or, with `--train`,
to an offline learner (`learner.offline_loop`). The flags of `--train` set the config's `replay` section
(and `learner.estimator`) over what the file says."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from buffer import replay as buffer_replay
from protocol.config import ConfigError, PipelineConfig, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    buffer_replay.add_arguments(p)
    t = p.add_argument_group("offline training (--train)")
    t.add_argument("--train", action="store_true", help="train a learner on the stored trees (no actors)")
    t.add_argument("--out", help="output directory of the offline run (replay.output_dir)")
    t.add_argument("--epochs", type=int, help="passes over the selected trees (replay.epochs)")
    t.add_argument("--shuffle", action="store_true", help="a new order every epoch (replay.order: shuffled)")
    t.add_argument("--init", help="starting weights: a checkpoint or HF model directory (replay.init)")
    t.add_argument("--min-reward", type=float, help="keep trees whose mean leaf reward is at least this")
    t.add_argument("--max-reward", type=float, help="keep trees whose mean leaf reward is at most this")
    t.add_argument("--max-version-distance", type=int, help="replay.max_version_distance")
    t.add_argument("--estimator", choices=["treepo", "treerpo", "grpo"], help="learner.estimator")


def _with_flags(args: argparse.Namespace):
    """The config file with the flags of --train applied (validated again, so a bad value names its field)."""
    data = load_config(args.config).model_dump()
    replay = data["replay"]
    for flag, key in (("out", "output_dir"), ("epochs", "epochs"), ("init", "init"), ("min_version", "min_version"),
                      ("max_version", "max_version"), ("min_reward", "min_reward"), ("max_reward", "max_reward"),
                      ("max_version_distance", "max_version_distance")):
        if getattr(args, flag) is not None:
            replay[key] = getattr(args, flag)
    if args.run:
        replay["runs"] = [args.run]
    if args.shuffle:
        replay["order"] = "shuffled"
    if args.estimator:
        data["learner"]["estimator"] = args.estimator
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid replay flags:\n" + "\n".join(
            f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())) from None


def run(args: argparse.Namespace) -> int:
    if not args.train:
        return buffer_replay.run(args)
    from learner.offline_loop import OfflineLoop, ReplayError
    from protocol.role_process import start_role

    cfg, stop = start_role(args, _with_flags(args))
    try:
        loop = OfflineLoop(cfg, stop)
    except ReplayError as e:
        print(f"treepo replay: {e}", file=sys.stderr)
        return 2
    try:
        loop.run()
    finally:
        loop.close()
    return 0
