"""Async vs sync schedule of the whole pipeline on the same two workers: one actor pinned to one core, the
learner pinned to the other.

For each schedule the bench starts what `treepo up` starts (embedded Redis, buffer, 1 actor, learner, as
separate processes, through `treepo.up.launched`) from the same config (default configs/cpu-tiny.yaml,
transformers engine), with `taskset`: the actor on `--actor-core`, the learner on `--learner-core`, each
with a one-thread torch/OpenMP pool; the buffer and Redis are light and left unpinned. The learner runs
`--warmup + --steps` steps; figures cover the `--steps` steps after the warm-up, from the end of step
`warmup` to the end of the last step (wall), read from the metrics the processes write:

  steps/min      = steps / wall * 60
  learner idle   = sum of the learner's `wait_s` (waiting for a whole batch) / wall
  actor idle     = 1 - (time inside the actor's generation rounds, `generate_s`, clipped to the window) / wall;
                   a round includes weight swaps between tree steps, sending pieces and scoring
  trees/s        = trees the learner trained on in the window / wall (and trees the actor finished)

`sync` is `run.schedule: sync` (buffer.max_staleness 0: the buffer grants prompts only to an actor holding
the learner's current weights); `async` keeps the config's max_staleness. Ideal ratio with generation time G
and training time T per step: (G + T) / max(G, T), at most 2; the bench prints G and T to explain it.
`ideal_ratio` in the JSON is that bound for the sync run's G and T, `overlap_efficiency` = measured / ideal.
cpu-tiny as it stands is somewhat learner-bound (T about 1.4x G on one core each, with tree-packed training;
2.5x with per-leaf rows, `--set learner.packing=rows`), so its bound is about 1.7; `--set` overrides config fields for both
schedules to try other balances, e.g. the balanced workload of BENCHMARKS.md (G close to T):
`--set rollout.width=2 --set rollout.max_depth=6`. Actor `wait_s` in the metrics does not count asks that
got no permit, so actor idle is taken from `generate_s`. Prints both side by side, then one JSON line (the last line).

Run: .venv/bin/python -m bench.pipeline   (2-5 minutes on 2 cores: start-up is 30-90 s per schedule);
order-balanced: .venv/bin/python -m bench.pipeline --rounds 2 --schedules sync,async   (sync, async, async, sync)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import yaml

from buffer.redis_server import free_port
from protocol.config.pipeline import PipelineConfig, load_config
from treepo.up import Launch, launched, read_jsonl


def parse_sets(items: list[str]) -> dict:
    """`section.field=value` (value parsed as YAML) -> nested overrides."""
    out: dict = {}
    for item in items:
        key, _, raw = item.partition("=")
        section, _, field = key.partition(".")
        out.setdefault(section, {})[field] = yaml.safe_load(raw)
    return out


def schedule_config(base: PipelineConfig, schedule: str, out: Path, steps: int) -> PipelineConfig:
    data = base.model_dump()
    data["run"].update(run_id=f"bench-pipeline-{schedule}", output_dir=str(out / schedule), schedule=schedule,
                       actors=1, learner_ranks=1, metrics_port=0)
    data["engine"]["kind"] = "transformers"
    data["learner"].update(max_steps=steps, checkpoint_every=10 ** 6)
    data["buffer"].update(ingest_address=f"tcp://127.0.0.1:{free_port()}", redis_url="", data_dir="")
    data["weights"]["address"] = f"tcp://127.0.0.1:{free_port()}"
    return PipelineConfig.model_validate(data)


def wait_for_learner(launch: Launch, timeout_s: float) -> None:
    """Until the learner exits; raises if it fails, another role dies, or it takes too long."""
    deadline = time.monotonic() + timeout_s
    learner = launch.children["learner"]
    while learner.alive():
        for name, child in launch.children.items():
            if not child.alive() and name != "learner":
                raise RuntimeError(f"{name} exited ({child.proc.returncode}):\n{child.tail(30)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the learner did not finish in {timeout_s:.0f} s:\n{learner.tail(30)}")
        time.sleep(0.5)
    if learner.proc.returncode != 0:
        raise RuntimeError(f"the learner failed ({learner.proc.returncode}):\n{learner.tail(40)}")


def clipped(start: float, end: float, lo: float, hi: float) -> float:
    return max(0.0, min(end, hi) - max(start, lo))


def figures(metrics_dir: Path, warmup: int, steps: int) -> dict[str, float]:
    rows = {int(r["step"]): r for r in read_jsonl(metrics_dir / "learner.jsonl")}
    window = [rows[s] for s in range(warmup + 1, warmup + steps + 1)]
    lo, hi = rows[warmup]["time"], window[-1]["time"]
    wall = hi - lo
    actors = {p.stem: read_jsonl(p) for p in sorted(metrics_dir.glob("actor-*.jsonl"))}
    busy = {a: sum(clipped(r["time"] - r["generate_s"], r["time"], lo, hi) for r in rs) for a, rs in actors.items()}
    in_window = [r for rs in actors.values() for r in rs if lo < r["time"] <= hi]
    rounds = [r for rs in actors.values() for r in rs]
    return {
        "wall_s": wall,
        "steps_per_min": steps / wall * 60,
        "learner_idle": sum(r["wait_s"] for r in window) / wall,
        "actor_idle": statistics.fmean(1 - b / wall for b in busy.values()),
        "trees_per_s": sum(r["trees"] for r in window) / wall,
        "actor_trees_per_s": sum(r["trees"] for r in in_window) / wall,
        "train_step_s": statistics.median(r["step_time_s"] for r in window),
        "learner_busy_s": statistics.median(r["iteration_s"] - r["wait_s"] for r in window),
        "generate_round_s": statistics.median(r["generate_s"] for r in rounds[1:] or rounds),
        "trees_per_round": statistics.fmean(r["trees"] for r in rounds),
        "staleness_mean": statistics.fmean(r["staleness_mean"] for r in window),
        "stale_drops": window[-1]["stale_drops"],
        "reward_mean": statistics.fmean(r["reward_mean"] for r in window),
        "actor_generated_tokens_per_s": sum(r["generated_tokens"] for r in in_window) / wall,
        "cache_hit_rate": sum(r["cached_tokens"] for r in rounds) / max(1.0, sum(r["prompt_tokens"] for r in rounds)),
    }


def run_schedule(base: PipelineConfig, schedule: str, out: Path, warmup: int, steps: int,
                 cpus: dict[str, list[int]], timeout_s: float) -> dict[str, float]:
    cfg = schedule_config(base, schedule, out, warmup + steps)
    shutil.rmtree(cfg.run.output_dir, ignore_errors=True)  # no resume from an old checkpoint, fresh metrics
    t0 = time.perf_counter()
    with launched(cfg, cpus) as launch:
        wait_for_learner(launch, timeout_s)
    result = figures(launch.metrics_dir, warmup, steps)
    result["total_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cpu-tiny.yaml")
    p.add_argument("--steps", type=int, default=8, help="measured learner steps per schedule")
    p.add_argument("--warmup", type=int, default=2, help="learner steps excluded before the measured ones")
    p.add_argument("--schedules", default="async,sync", help="order in which the schedules run")
    p.add_argument("--rounds", type=int, default=1, help="run the schedules this many times, the order reversed "
                   "every other round (ABBA), and report each figure's median over a schedule's runs: the schedule "
                   "that runs first is often slower on a shared machine")
    p.add_argument("--actor-core", type=int, default=0)
    p.add_argument("--learner-core", type=int, default=1)
    p.add_argument("--out", default="runs/bench-pipeline")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one schedule may take")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field for both schedules (repeatable), e.g. rollout.width=4")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    base = load_config(args.config)
    data = base.model_dump()
    data["eval"]["every_versions"] = 0  # generation and training side by side, without an evaluator's share
    for section, fields in parse_sets(args.set).items():
        data[section].update(fields)
    base = PipelineConfig.model_validate(data)
    cpus = {"actor": [args.actor_core], "learner": [args.learner_core]}
    load_before = os.getloadavg()[0]
    order = args.schedules.split(",")
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in order}
    for r in range(args.rounds):
        for s in order if r % 2 == 0 else order[::-1]:
            runs[s].append(run_schedule(base, s, Path(args.out), args.warmup, args.steps, cpus, args.timeout))
    res = {s: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for s, rs in runs.items()}
    load_after = os.getloadavg()[0]
    report(args, base, res, load_before, load_after)


def ideal_ratio(r: dict[str, float], trees_per_step: int) -> float:
    """(G + T) / max(G, T): generation time G of one step's trees, learner busy time T per step."""
    g = r["generate_round_s"] * trees_per_step / r["trees_per_round"]
    t = r["learner_busy_s"]
    return (g + t) / max(g, t)


def report(args: argparse.Namespace, base: PipelineConfig, res: dict[str, dict[str, float]], load_before: float,
           load_after: float) -> None:
    print(f"\npipeline bench: {args.config} {' '.join(args.set)}, transformers engine, 1 actor on core "
          f"{args.actor_core}, learner on core {args.learner_core}; {args.steps} steps measured after {args.warmup} "
          f"warm-up; async max_staleness {base.buffer.max_staleness}; load average {load_before:.1f} before, "
          f"{load_after:.1f} after")
    names = list(res)
    rows = [("learner steps / min", "steps_per_min", "{:.2f}"), ("learner idle %", "learner_idle", "{:.1%}"),
            ("actor idle %", "actor_idle", "{:.1%}"), ("trees / s (trained)", "trees_per_s", "{:.3f}"),
            ("trees / s (actor finished)", "actor_trees_per_s", "{:.3f}"),
            ("train step, median s", "train_step_s", "{:.2f}"),
            ("learner busy per step, median s", "learner_busy_s", "{:.2f}"),
            ("generation round, median s", "generate_round_s", "{:.2f}"),
            ("trees per generation round", "trees_per_round", "{:.2f}"), ("staleness, mean", "staleness_mean", "{:.2f}"),
            ("stale trees dropped", "stale_drops", "{:.0f}"), ("reward, mean", "reward_mean", "{:.3f}"),
            ("actor generated tokens / s", "actor_generated_tokens_per_s", "{:.0f}"),
            ("prefix-cache hit rate", "cache_hit_rate", "{:.1%}"),
            ("measured wall, s", "wall_s", "{:.1f}"), ("whole run incl. start-up, s", "total_s", "{:.1f}")]
    print(f"{'figure':<34}" + "".join(f"{n:>12}" for n in names))
    for label, key, fmt in rows:
        print(f"{label:<34}" + "".join(f"{fmt.format(res[n][key]):>12}" for n in names))
    headline: dict[str, float | bool | str] = {}
    both = {"async", "sync"} <= set(names)
    if both:
        ratio = res["async"]["steps_per_min"] / res["sync"]["steps_per_min"]
        ideal = ideal_ratio(res["sync"], base.learner.prompts_per_step)
        print(f"async / sync steps per minute: {ratio:.2f} (target 1.8); ideal overlap for the sync run's "
              f"generation and learner times (G + T) / max(G, T): {ideal:.2f}")
        headline |= {"async_steps_per_min": res["async"]["steps_per_min"],
                     "sync_steps_per_min": res["sync"]["steps_per_min"], "ratio_async_over_sync": ratio}
    for key in ("learner_idle", "actor_idle", "trees_per_s", "train_step_s", "learner_busy_s", "generate_round_s",
                "actor_generated_tokens_per_s", "cache_hit_rate"):
        headline |= {f"{n}_{key}": res[n][key] for n in names}
    if both:
        headline |= {"ideal_ratio": ideal, "overlap_efficiency": ratio / ideal, "target_ratio": 1.8,
                     "meets_target": ratio >= 1.8}
    headline |= {"config": args.config, "overrides": " ".join(args.set), "steps": args.steps, "warmup": args.warmup,
                 "rounds": args.rounds, "order": args.schedules,
                 "load_before": load_before, "load_after": load_after}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items()}))

if __name__ == "__main__":
    main()
