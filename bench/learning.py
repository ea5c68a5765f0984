"""Learning efficacy of TreePO against GRPO over paired seeds, with 95% intervals: each variant trains the main
job's model on its task, one run after the other, and the held-out accuracy each run reaches is read against
training wall time and generated tokens.

Each variant is the main job's config (default configs/cpu-smollm2.yaml, what `make train` runs) with:

  treepo   rollout.mode treepo (segment tree, the config's w, l, d)     + learner.estimator treepo
  grpo     rollout.mode independent (w independent samples of d*l)     + learner.estimator grpo
  treerpo  rollout.mode treerpo (2 children per node, depth log2(w), steps of l tokens, cap d*l)
                                                                        + learner.estimator treerpo

and, for every variant alike: `learner.max_minutes` = `--minutes` (counted from the learner's first batch),
`eval.every_versions` = `--eval-every` (so a crossing is not decided by the first evaluation), `eval.sampling`
sequential (k independent samples per held-out prompt), no checkpoint before the final one and free ports
for the buffer and the weight push (other jobs may hold the config's). The `prompts` and `eval.prompts`
sections are untouched: every run has the same training prompts in the same order (`prompts.seed`) and the
same held-out set. Runs: treepo and grpo for each of `--seeds`, treerpo for each of
`--treerpo-seeds`, one after the other, interleaved by seed (treepo s0, grpo s0, treepo s1, grpo s1, ...,
then treerpo) so that drift of the machine hits both variants alike; run s of every variant has `run.seed` s,
output under `<out>/<variant>-s<seed>/`. `run.seed` changes the sampling only: the vLLM engines' seed and the
samplers' per-request seeds of the actor (training rollouts) and of the evaluator (held-out samples), the
tree ids, and the learner's torch seed (no effect on training without dropout). The processes are
asynchronous, so even two runs with one seed differ by timing.

Per run, from the metrics the processes write (`metrics/learner.jsonl`, `actor-*.jsonl`, `eval.jsonl`,
`eval_problems.jsonl`):
  wall s of version v    = time of the learner's step that made v - the time both roles are up: the later of
                           the learner starting to wait for its first batch and the first actor starting its
                           first generation round (version 0 is at 0 s). Start-ups are left out: the actor's
                           engine start-up is the same in every variant but varies by tens of seconds with the
                           machine's load, and the learner would count it while it waits for its first batch
  generated tokens to v  = tokens the actors generated (training rollouts) up to that step
  accuracy of v          = held-out `all/mean@k` of version v (eval.jsonl); versions 0, every `--eval-every`
                           the evaluator reaches, and the final weights
  time/tokens to threshold = the first crossing of the threshold, linearly interpolated between the two
                           evaluations that straddle it (version 0's if it is already at it; none if never reached)
  AUC at equal time      = the mean of the curve, linear between evaluations, over [0, T] s, T = the smallest
                           final wall time over all treepo and grpo runs
The threshold is `--threshold`, or by default halfway between the initial accuracy (mean over all runs of
version 0) and GRPO's final accuracy (mean over its seeds).

Summary: ratios TreePO/GRPO of time to threshold, tokens to threshold and AUC at equal time, paired by seed,
as the geometric mean over seeds with a 95% t interval on the log ratios (none with one seed); a seed where
either run never reaches the threshold (or starts at it) is left out of that ratio, and the runs that never
reach it are counted (`treepo_seeds_not_reaching`, `grpo_seeds_not_reaching`; the seeds where a run starts
at it in `seeds_at_threshold_at_start`). Held-out gain of TreePO: per held-out problem, its accuracy averaged
over TreePO seeds at the final evaluation minus that at version 0 (`eval_problems.jsonl`), then the mean over
problems with a 95% bootstrap interval over problems (`actors.eval_metrics.paired_gain`). `eval_problems`: the
distinct problem keys evaluated over all runs; `eval_overlap`: the most of them that are training problems in
any run's eval.jsonl (0: held-out). In configs/cpu-smollm2.yaml the evaluator shares the learner's core
(`run.cpus`), so frequent evaluation slows the training of every variant.

Prints each run's curve as it ends, a table of the runs, the summary, the plot path (`<out>/learning.png`:
accuracy against wall minutes and against generated tokens, a thin line per seed, a colour per variant, the
threshold dotted), then one JSON line of flat headline keys (the last line).

Run: .venv/bin/python -m bench.learning   (7 runs x (4 minutes of training + 3-4 minutes of start-up, last
step and final evaluation; more on a loaded machine): 50-60 minutes on 2 cores)
Smoke: .venv/bin/python -m bench.learning --minutes 1 --seeds 0 --treerpo-seeds '' --out /tmp/bench-learning-smoke
(2 runs, about 9 minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from actors.eval_metrics import paired_gain
from bench.pipeline import wait_for_learner
from protocol.config.pipeline import PipelineConfig, load_config
from treepo.up import launched, read_jsonl

COLOURS = {"treepo": "C0", "grpo": "C1", "treerpo": "C2"}
# t_{0.975, df} for df = 1..30; beyond 30 degrees of freedom the df-30 value (slightly wide)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Run:
    """One finished run: its curve (version, wall_s, generated_tokens, accuracy per evaluation) and per-problem
    held-out accuracy of version 0 and of the final evaluation."""

    variant: str
    seed: int
    points: list[dict[str, float]]
    initial_problems: dict[str, float]
    final_problems: dict[str, float]
    eval_overlap: float

    def xs(self, axis: str) -> list[float]:
        return [p[axis] for p in self.points]

    @property
    def accuracies(self) -> list[float]:
        return [p["accuracy"] for p in self.points]


def run_order(seeds: Sequence[int], treerpo_seeds: Sequence[int]) -> list[tuple[str, int]]:
    """treepo s, grpo s for each seed in turn, then treerpo for each of its seeds."""
    return [(v, s) for s in seeds for v in ("treepo", "grpo")] + [("treerpo", s) for s in treerpo_seeds]


def variant_config(base: PipelineConfig, name: str, seed: int, out: Path, minutes: float,
                   eval_every: int) -> PipelineConfig:
    data = base.model_dump()
    r = data["rollout"]
    data["run"].update(run_id=f"bench-learning-{name}-s{seed}", output_dir=str(out / f"{name}-s{seed}"), seed=seed)
    data["learner"].update(max_minutes=minutes, max_steps=100_000, estimator=name, checkpoint_every=10 ** 6)
    data["eval"].update(every_versions=eval_every, sampling="sequential")
    data["buffer"]["ingest_address"] = data["weights"]["address"] = "tcp://127.0.0.1:0"  # `launched` picks free ports
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
    per_actor = [read_jsonl(path) for path in metrics.glob("actor-*.jsonl")]
    actors_up = min(rows[0]["time"] - rows[0]["generate_s"] for rows in per_actor if rows)
    start = max(learner[0]["time"] - learner[0]["iteration_s"], actors_up)
    made = {0: start} | {int(row["policy_version"]): row["time"] for row in learner if not row["skipped"]}
    actors = [row for rows in per_actor for row in rows]
    points = []
    for row in sorted(read_jsonl(metrics / "eval.jsonl"), key=lambda r: r["step"]):
        version = int(row["step"])
        at = made.get(version, learner[-1]["time"])
        points.append({"version": version, "wall_s": at - start,
                       "generated_tokens": sum(a["generated_tokens"] for a in actors if a["time"] <= at),
                       "accuracy": row[f"all/mean@{k}"]})
    return points


def problem_accuracy(metrics: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Per-problem held-out accuracy of version 0 and of the final evaluation (`eval_problems.jsonl`)."""
    rows = sorted(read_jsonl(metrics / "eval_problems.jsonl"), key=lambda r: r["step"])
    if not rows or rows[0]["step"] != 0:
        raise RuntimeError(f"{metrics / 'eval_problems.jsonl'}: no per-problem accuracy of version 0")
    return rows[0]["accuracy"], rows[-1]["accuracy"]


def collect(variant: str, seed: int, metrics: Path, k: int) -> Run:
    initial, final = problem_accuracy(metrics)
    overlap = max(row["eval_overlap"] for row in read_jsonl(metrics / "eval.jsonl"))
    return Run(variant, seed, curve(metrics, k), initial, final, overlap)


def crossing(xs: Sequence[float], ys: Sequence[float], threshold: float) -> float | None:
    """x where ys first reaches `threshold`, linear between the two points that straddle it; xs[0] if ys[0]
    is already at it; None if it is never reached."""
    for i, y in enumerate(ys):
        if y >= threshold:
            if i == 0:
                return xs[0]
            x0, y0, x1 = xs[i - 1], ys[i - 1], xs[i]
            return x0 + (threshold - y0) * (x1 - x0) / (y - y0)
    return None


def mean_up_to(xs: Sequence[float], ys: Sequence[float], end: float) -> float:
    """Mean of the curve through (xs, ys), linear between points, over [xs[0], end]; xs ascending, end in
    (xs[0], xs[-1]]."""
    area, x_prev, y_prev = 0.0, xs[0], ys[0]
    for x, y in zip(xs[1:], ys[1:], strict=True):
        if x >= end:
            y_end = y_prev + (end - x_prev) * (y - y_prev) / (x - x_prev)
            return (area + (end - x_prev) * (y_prev + y_end) / 2) / (end - xs[0])
        area += (x - x_prev) * (y_prev + y) / 2
        x_prev, y_prev = x, y
    raise ValueError(f"end {end} lies beyond the curve's last x {xs[-1]}")


def paired_ratios(numerators: Mapping[int, float | None], denominators: Mapping[int, float | None]) -> list[float]:
    """numerator / denominator per seed of `numerators`, over the seeds where neither is None."""
    return [n / d for s, n in numerators.items() if n is not None and (d := denominators[s]) is not None]


def geometric_interval(ratios: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """Geometric mean of the ratios and its 95% interval: exp(mean ± t_{0.975, n-1} * s / sqrt(n)) on the log
    ratios (s their sample standard deviation); no interval with one ratio, nothing with none."""
    if not ratios:
        return None, None, None
    logs = [math.log(r) for r in ratios]
    centre = statistics.fmean(logs)
    if len(logs) == 1:
        return math.exp(centre), None, None
    half = T_975[min(len(logs) - 1, len(T_975)) - 1] * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(centre), math.exp(centre - half), math.exp(centre + half)


def mean_by_key(maps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per key held by every mapping, the mean of its values."""
    keys = set.intersection(*(set(m) for m in maps))
    return {key: statistics.fmean(m[key] for m in maps) for key in sorted(keys)}


def treepo_over_grpo(table: Mapping[tuple[str, int], float | None],
                     seeds: Sequence[int]) -> tuple[float | None, float | None, float | None]:
    """Geometric mean and 95% interval of table[treepo, s] / table[grpo, s] over the seeds."""
    return geometric_interval(paired_ratios({s: table[("treepo", s)] for s in seeds},
                                            {s: table[("grpo", s)] for s in seeds}))


def rounded(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def final_accuracy(runs: Sequence[Run], variant: str) -> float | None:
    """Mean over the variant's runs of the final evaluation's accuracy (None without a run)."""
    finals = [r.accuracies[-1] for r in runs if r.variant == variant]
    return statistics.fmean(finals) if finals else None


def halfway(runs: Sequence[Run]) -> float:
    """The default threshold: halfway between version 0's accuracy (mean over all runs) and GRPO's final one."""
    return (statistics.fmean(r.accuracies[0] for r in runs) + final_accuracy(runs, "grpo")) / 2


def report(runs: Sequence[Run], seeds: Sequence[int], threshold: float) -> dict[str, float | int | None]:
    """Prints the table of the runs and the summary; returns the headline figures."""
    paired = [r for r in runs if r.variant in ("treepo", "grpo")]
    equal_s = min(r.points[-1]["wall_s"] for r in paired)
    to_time = {(r.variant, r.seed): crossing(r.xs("wall_s"), r.accuracies, threshold) for r in runs}
    to_tokens = {(r.variant, r.seed): crossing(r.xs("generated_tokens"), r.accuracies, threshold) for r in runs}
    auc = {(r.variant, r.seed): mean_up_to(r.xs("wall_s"), r.accuracies, equal_s) for r in paired}
    at_start = {r.seed for r in paired if r.accuracies[0] >= threshold}
    below = [s for s in seeds if s not in at_start]

    print(f"\nthreshold {threshold:.3f} (held-out mean@k), equal time {equal_s:.0f} s")
    print(f"  {'variant':>8} {'seed':>4} {'initial':>7} {'final':>7} {'version':>7} {'to thr s':>9} "
          f"{'to thr tokens':>13} {'AUC':>6}")
    for r in runs:
        key = (r.variant, r.seed)
        print(f"  {r.variant:>8} {r.seed:>4} {r.accuracies[0]:>7.3f} {r.accuracies[-1]:>7.3f} "
              f"{r.points[-1]['version']:>7} {shown(to_time[key], '.0f', 'never'):>9}"
              f" {shown(to_tokens[key], '.0f', 'never'):>13} "
              f"{shown(auc.get(key), '.3f', '-'):>6}")
    if at_start:
        print(f"seeds {sorted(at_start)}: a run is at the threshold at version 0; left out of the threshold ratios")

    ratios = {"time_to_threshold": treepo_over_grpo(to_time, below),
              "tokens_to_threshold": treepo_over_grpo(to_tokens, below),
              "auc_at_equal_time": treepo_over_grpo(auc, seeds)}
    treepo = [r for r in runs if r.variant == "treepo"]
    gain, gain_low, gain_high = paired_gain(mean_by_key([r.initial_problems for r in treepo]),
                                            mean_by_key([r.final_problems for r in treepo]))
    print(f"\nTreePO / GRPO over {len(seeds)} paired seed(s), geometric mean [95% interval]:")
    for name, (centre, low, high) in ratios.items():
        interval = "" if low is None else f" [{low:.3f}, {high:.3f}]"
        print(f"  {name:<20} {shown(centre, '.3f', 'no pair reaches it')}{interval}")
    print(f"TreePO held-out gain (final - version 0 per problem, averaged over seeds): {gain:+.3f} "
          f"[{gain_low:+.3f}, {gain_high:+.3f}]")

    result: dict[str, float | int | None] = {
        "seeds": len(seeds),
        "eval_problems": len(set().union(*(set(r.initial_problems) | set(r.final_problems) for r in runs))),
        "eval_overlap": max(r.eval_overlap for r in runs),
        "threshold": rounded(threshold), "equal_time_s": rounded(equal_s, 1),
        "initial_accuracy": rounded(statistics.fmean(r.accuracies[0] for r in runs)),
        **{f"{v}_final_accuracy": rounded(final_accuracy(runs, v)) for v in COLOURS},
        "treepo_heldout_gain": rounded(gain), "treepo_heldout_gain_ci_low": rounded(gain_low),
        "treepo_heldout_gain_ci_high": rounded(gain_high),
    }
    for name, (centre, low, high) in ratios.items():
        result |= {f"treepo_over_grpo_{name}": rounded(centre), f"treepo_over_grpo_{name}_ci_low": rounded(low),
                   f"treepo_over_grpo_{name}_ci_high": rounded(high)}
    for v in ("treepo", "grpo"):
        result[f"{v}_seeds_not_reaching"] = sum(to_time[(v, s)] is None for s in seeds)
    result["seeds_at_threshold_at_start"] = len(at_start)
    return result


def plot(runs: list[Run], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    labelled = set()
    for run in runs:
        label = None if run.variant in labelled else run.variant
        labelled.add(run.variant)
        style = {"color": COLOURS[run.variant], "linewidth": 1, "marker": "o", "markersize": 2.5, "alpha": 0.8}
        axes[0].plot([x / 60 for x in run.xs("wall_s")], run.accuracies, label=label, **style)
        axes[1].plot([x / 1000 for x in run.xs("generated_tokens")], run.accuracies, **style)
    for ax, xlabel in zip(axes, ("training wall time (min)", "generated tokens (thousands)"), strict=True):
        ax.axhline(threshold, color="grey", linestyle=":", linewidth=1, label="threshold")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out mean@k")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_curve(run: Run, total_s: float) -> None:
    print(f"\n{run.variant} seed {run.seed} ({total_s:.0f} s in all, start-up and final evaluation included)")
    print(f"  {'version':>7} {'wall s':>8} {'gen tokens':>11} {'mean@k':>7}")
    for pt in run.points:
        print(f"  {pt['version']:>7} {pt['wall_s']:>8.0f} {pt['generated_tokens']:>11.0f} {pt['accuracy']:>7.3f}")


def shown(x: float | None, fmt: str, missing: str) -> str:
    return missing if x is None else format(x, fmt)


def parse_seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cpu-smollm2.yaml")
    p.add_argument("--minutes", type=float, default=4.0, help="training-time cap of each run (learner.max_minutes)")
    p.add_argument("--seeds", default="0,1,2", help="run.seed of the treepo and grpo runs (paired)")
    p.add_argument("--treerpo-seeds", default="0", help="run.seed of the treerpo runs ('' = none)")
    p.add_argument("--eval-every", type=int, default=2, help="eval.every_versions")
    p.add_argument("--threshold", type=float, default=None, help="held-out mean@k the time and tokens are "
                   "taken to (default: halfway between the initial accuracy and GRPO's final accuracy)")
    p.add_argument("--out", default="runs/bench-learning")
    args = p.parse_args()
    seeds, treerpo_seeds = parse_seeds(args.seeds), parse_seeds(args.treerpo_seeds)
    if not seeds:
        raise SystemExit("--seeds: at least one seed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    base = load_config(args.config)
    out = Path(args.out)
    bench_start = time.perf_counter()
    runs: list[Run] = []
    for name, seed in run_order(seeds, treerpo_seeds):
        cfg = variant_config(base, name, seed, out, args.minutes, args.eval_every)
        shutil.rmtree(cfg.run.output_dir, ignore_errors=True)  # fresh: no resume from an earlier bench
        t0 = time.perf_counter()
        with launched(cfg) as launch:
            wait_for_learner(launch, timeout_s=60 * args.minutes + 600)
        runs.append(collect(name, seed, launch.metrics_dir, cfg.eval.k))
        print_curve(runs[-1], time.perf_counter() - t0)

    threshold = args.threshold if args.threshold is not None else halfway(runs)
    result = report(runs, seeds, threshold) | {"minutes": args.minutes}
    plot(runs, threshold, out / "learning.png")
    print(f"plot: {out / 'learning.png'}")
    result["wall_minutes"] = rounded((time.perf_counter() - bench_start) / 60, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
