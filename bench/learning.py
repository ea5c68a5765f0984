"""Learning efficacy side by side: TreePO, GRPO and TreeRPO train the main job's model on its task, one
after the other, and the held-out accuracy each reaches is read against wall time and generated tokens.

Each variant is the main job's config (default configs/cpu-smollm2.yaml, what `make train` runs) with:

  treepo   rollout.mode treepo (segment tree, the config's w, l, d)     + learner.estimator treepo
  grpo     rollout.mode independent (w independent samples of d*l)     + learner.estimator grpo
  treerpo  rollout.mode treerpo (2 children per node, depth log2(w), steps of l tokens, cap d*l)
                                                                        + learner.estimator treerpo

so every variant has the same prompts (seed), leaves per prompt (w), response cap, eval set, learning rate
and the same training-time cap (`learner.max_minutes`, `--minutes`). The evaluator measures held-out
mean@k of version 0 and every `eval.every_versions` versions, and of the final weights.

Per variant, from the metrics the processes write:
  wall s of version v      = time of the learner's step that made v - time the learner started waiting for
                             its first batch (start-up excluded; it is the same for every variant)
  generated tokens to v    = tokens the actors generated (training rollouts) up to that step
  time/tokens to threshold = those of the first evaluated version whose held-out mean@k >= `--threshold`
                             (absolute accuracy; none if never reached)
Ratios are TreePO (or TreeRPO) over GRPO. The plot (accuracy against wall time and against generated tokens)
goes to `<out>/learning.png`. Prints a table per variant, then one JSON line (the last line).

Run: .venv/bin/python -m bench.learning   (3 x (minutes + about 2 minutes of start-up and final evaluation))
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

from bench.pipeline import wait_for_learner
from protocol.config.pipeline import PipelineConfig, load_config
from treepo.up import launched, read_jsonl

VARIANTS = ("treepo", "grpo", "treerpo")


def variant_config(base: PipelineConfig, name: str, out: Path, minutes: float) -> PipelineConfig:
    data = base.model_dump()
    r = data["rollout"]
    data["run"].update(run_id=f"bench-learning-{name}", output_dir=str(out / name))
    data["learner"].update(max_minutes=minutes, max_steps=100_000, estimator=name)
    if name == "grpo":
        r["mode"] = "independent"
    elif name == "treerpo":
        depth = int(round(math.log2(r["width"])))
        if 2 ** depth != r["width"]:
            raise ValueError(f"rollout.width={r['width']}: TreeRPO with 2 children per node needs a power of 2")
        r.update(mode="treerpo", treerpo_children=2, treerpo_depth=depth, treerpo_step_tokens=r["segment_tokens"],
                 treerpo_max_tokens=r["segment_tokens"] * r["max_depth"])
    else:
        r["mode"] = "treepo"
    return PipelineConfig.model_validate(data)


def curve(metrics: Path, k: int) -> list[dict[str, float]]:
    """(version, wall s, generated tokens, held-out mean@k) of each evaluated version, in version order."""
    learner = read_jsonl(metrics / "learner.jsonl")
    start = learner[0]["time"] - learner[0]["iteration_s"]
    made = {0: start} | {int(row["policy_version"]): row["time"] for row in learner if not row["skipped"]}
    actors = [row for path in metrics.glob("actor-*.jsonl") for row in read_jsonl(path)]
    points = []
    for row in sorted(read_jsonl(metrics / "eval.jsonl"), key=lambda r: r["step"]):
        version = int(row["step"])
        at = made.get(version, learner[-1]["time"])
        points.append({"version": version, "wall_s": at - start,
                       "generated_tokens": sum(a["generated_tokens"] for a in actors if a["time"] <= at),
                       "accuracy": row[f"all/mean@{k}"]})
    return points


def first_reaching(points: list[dict[str, float]], threshold: float) -> dict[str, float] | None:
    return next((p for p in points if p["accuracy"] >= threshold), None)


def plot(curves: dict[str, list[dict[str, float]]], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, points in curves.items():
        axes[0].plot([p["wall_s"] / 60 for p in points], [p["accuracy"] for p in points], marker="o", label=name)
        axes[1].plot([p["generated_tokens"] / 1000 for p in points], [p["accuracy"] for p in points], marker="o",
                     label=name)
    for ax, xlabel in zip(axes, ("training wall time (min)", "generated tokens (thousands)"), strict=True):
        ax.axhline(threshold, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out mean@k")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    return None if a is None or b is None or not b[key] else round(a[key] / b[key], 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cpu-smollm2.yaml")
    p.add_argument("--minutes", type=float, default=8.0, help="training-time cap of each variant")
    p.add_argument("--threshold", type=float, default=0.3, help="held-out mean@k the time and tokens are taken to")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="runs/bench-learning")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    base = load_config(args.config)
    if not base.eval.every_versions:
        raise SystemExit(f"{args.config}: eval.every_versions is 0; the bench reads held-out accuracy")
    out = Path(args.out)
    curves, totals = {}, {}
    for name in args.variants.split(","):
        cfg = variant_config(base, name, out, args.minutes)
        shutil.rmtree(cfg.run.output_dir, ignore_errors=True)  # fresh: no resume from an earlier bench
        t0 = time.perf_counter()
        with launched(cfg) as launch:
            wait_for_learner(launch, timeout_s=60 * args.minutes + 600)
        totals[name] = time.perf_counter() - t0
        curves[name] = curve(launch.metrics_dir, cfg.eval.k)
        print(f"\n{name} ({totals[name]:.0f} s in all, start-up and final evaluation included)")
        print(f"  {'version':>7} {'wall s':>8} {'gen tokens':>11} {'mean@k':>7}")
        for pt in curves[name]:
            print(f"  {pt['version']:>7} {pt['wall_s']:>8.0f} {pt['generated_tokens']:>11.0f} {pt['accuracy']:>7.3f}")
    plot(curves, args.threshold, out / "learning.png")
    reach = {name: first_reaching(points, args.threshold) for name, points in curves.items()}
    result: dict[str, float | None] = {
        "threshold": args.threshold, "minutes": args.minutes,
        "initial_accuracy": curves[next(iter(curves))][0]["accuracy"],
    }
    for name, points in curves.items():
        hit = reach[name]
        result.update({f"{name}_final_accuracy": points[-1]["accuracy"],
                       f"{name}_final_version": points[-1]["version"],
                       f"{name}_generated_tokens": points[-1]["generated_tokens"],
                       f"{name}_time_to_threshold_s": None if hit is None else round(hit["wall_s"], 1),
                       f"{name}_tokens_to_threshold": None if hit is None else hit["generated_tokens"]})
    if "grpo" in reach:
        for name in ("treepo", "treerpo"):
            if name in reach:
                result[f"{name}_over_grpo_tokens_to_threshold"] = ratio(reach[name], reach["grpo"], "generated_tokens")
                result[f"{name}_over_grpo_time_to_threshold"] = ratio(reach[name], reach["grpo"], "wall_s")
    print(f"\nplot: {out / 'learning.png'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
