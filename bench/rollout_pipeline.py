"""TreePO against GRPO through the real asynchronous pipeline on the main job: how fast the actor grows trees.

Each variant is `bench.learning`'s (the main job's config, default configs/cpu-smollm2.yaml, what `make train`
runs; TreePO: rollout.mode treepo + estimator treepo; GRPO: rollout.mode independent + estimator grpo), with the
evaluator off (the actor and the learner each on their own core, as the preset pins them) and the learner's time
capped at `--seconds` from its first batch (`learner.max_minutes`). Every process is what `treepo up` starts
(embedded Redis, buffer, one actor, learner), on DEFAULT rollout settings: growth driven by the engine's events,
the actor's pool topped up to `rollout.target_running` sequences, the buffer's admission bounding it.

Per variant, from the metrics the processes write (the actor writes a row per `rollout.prompts_per_step` trees):
  trees/s              = trees the actor finished / the actor's generating window (first row's start to last row)
  generated tokens/s   = tokens it generated / that window
  engine s per tree    = time inside its generation rounds (`generate_s`) / trees: the tree's cost on the engine
  engine calls, engine steps per tree; mean sequences per engine step; actor busy share of the window
  learner steps; time (since the learner's first step) at which the 10-step mean training reward first reaches
  `--reward` (the issue's yardstick, not a held-out figure: `bench.learning` measures learning)
Prints a table, then one JSON line (the last line) with `{variant}_{figure}` keys and
`treepo_over_grpo_trees_per_s`, `treepo_over_grpo_generated_tokens_per_s`, `treepo_over_grpo_engine_s_per_tree`.
One run per variant: its figures carry the run-to-run spread of this machine (several percent).

Run: .venv/bin/python -m bench.rollout_pipeline   (2 x (--seconds + about 2 minutes of start-up))
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from bench.learning import variant_config
from bench.pipeline import wait_for_learner
from protocol.config.pipeline import PipelineConfig, load_config
from treepo.up import launched, read_jsonl

VARIANTS = ("treepo", "grpo")


def actor_figures(metrics: Path) -> dict[str, float]:
    rows = sorted((r for path in metrics.glob("actor-*.jsonl") for r in read_jsonl(path)), key=lambda r: r["time"])
    start = rows[0]["time"] - rows[0]["generate_s"]
    window = rows[-1]["time"] - start
    trees = sum(r["trees"] for r in rows)
    steps = sum(r["engine_steps"] for r in rows)
    return {"window_s": window, "trees": trees, "trees_per_s": trees / window,
            "generated_tokens_per_s": sum(r["generated_tokens"] for r in rows) / window,
            "generated_tokens_per_tree": sum(r["generated_tokens"] for r in rows) / trees,
            "processed_tokens_per_tree": sum(r["processed_tokens"] for r in rows) / trees,
            "engine_s_per_tree": sum(r["generate_s"] for r in rows) / trees,
            "engine_calls_per_tree": sum(r["calls"] for r in rows) / trees,
            "engine_steps_per_tree": steps / trees,
            "mean_running_sequences": sum(r["running_sum"] for r in rows) / max(1, steps),
            "actor_busy": min(1.0, sum(r["generate_s"] for r in rows) / window)}


def learner_figures(metrics: Path, reward: float) -> dict[str, float | None]:
    rows = [r for r in read_jsonl(metrics / "learner.jsonl") if not r["skipped"]]
    first = rows[0]["time"] - rows[0]["step_time_s"]
    reached = None
    for i in range(9, len(rows)):
        if statistics.fmean(r["reward_mean"] for r in rows[i - 9:i + 1]) >= reward:
            reached = rows[i]["time"] - first
            break
    return {"learner_steps": len(rows), "reward_first_10": statistics.fmean(r["reward_mean"] for r in rows[:10]),
            "reward_last_10": statistics.fmean(r["reward_mean"] for r in rows[-10:]), "time_to_reward_s": reached}


def run_variant(base: PipelineConfig, name: str, out: Path, seconds: float, reward: float) -> dict[str, float | None]:
    cfg = variant_config(base, name, out, seconds / 60)
    shutil.rmtree(cfg.run.output_dir, ignore_errors=True)
    t0 = time.perf_counter()
    with launched(cfg) as launch:
        wait_for_learner(launch, timeout_s=seconds + 600)
    return {**actor_figures(launch.metrics_dir), **learner_figures(launch.metrics_dir, reward),
            "total_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cpu-smollm2.yaml")
    p.add_argument("--seconds", type=float, default=570.0, help="the learner's time of each variant")
    p.add_argument("--reward", type=float, default=0.7, help="10-step mean training reward the time is taken to")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="runs/bench-rollout-pipeline")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = load_config(args.config).model_dump()
    data["eval"]["every_versions"] = 0
    base = PipelineConfig.model_validate(data)
    res = {name: run_variant(base, name, Path(args.out), args.seconds, args.reward)
           for name in args.variants.split(",")}
    r = base.rollout
    print(f"\nrollout pipeline bench: {args.config}, {args.seconds:.0f} s of learner time per variant, w={r.width}, "
          f"l={r.segment_tokens}, d={r.max_depth}, pool >= {r.prompts_per_step} trees, target {r.target_running} "
          f"sequences")
    keys = list(next(iter(res.values())))
    print(f"{'figure':<28}" + "".join(f"{n:>12}" for n in res))
    for k in keys:
        print(f"{k:<28}" + "".join(f"{'-' if v[k] is None else round(v[k], 3):>12}" for v in res.values()))
    headline: dict[str, float | None] = {f"{n}_{k}": None if v[k] is None else round(v[k], 4)
                                         for n, v in res.items() for k in keys}
    if {"treepo", "grpo"} <= res.keys():
        for k in ("trees_per_s", "generated_tokens_per_s", "engine_s_per_tree"):
            headline[f"treepo_over_grpo_{k}"] = round(res["treepo"][k] / res["grpo"][k], 3)
    headline["seconds"] = args.seconds
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
