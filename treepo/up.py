"""`treepo up`: the whole pipeline on one machine, each role its own process.

Starts, in order: the model directory (built once: tiny or SmolLM2, see `treepo/models.py`), Redis (the
configured URL, or an embedded server under `<output_dir>/redis`), the buffer service,
`run.actors` actor processes and the learner (`run.learner_ranks` DeepSpeed ranks through
torchrun when more than one). Children get the resolved config (`<output_dir>/config.yaml`,
with the model path, the Redis URL and concrete ports filled in: an address with port 0
gets a free one) and log to `<output_dir>/logs/<role>.log`.

While it runs it shows the learner's progress from `<output_dir>/metrics/*.jsonl` with rich
(step, reward, trees/s, tokens/s, staleness, policy versions, the latest held-out accuracy with its 95%
interval), or, when stdout is not a terminal, as a plain line every 10 s. With `eval.every_versions` it also
starts the evaluator (`actors/evaluator.py`) and prints at the end its accuracy first -> last, with the
paired gain over the problems and its 95% interval (`eval_summary`), said "held-out" only when no evaluated
problem is a training problem. TensorBoard logs are under
`<output_dir>/metrics/tensorboard`, Prometheus /metrics on `run.metrics_port` when set. It ends
when the learner reaches `learner.max_steps` (checkpoint + export written) or on Ctrl-C / SIGTERM
(the learner is asked to stop first, so it checkpoints), then stops actors, learner, buffer and
Redis in that order, draws the reward curve to `<output_dir>/reward.png` and prints it.

A role that dies is restarted (`Supervisor`: with backoff, at most `run.max_restarts` times per
`run.restart_window_s`, logged; the learner resumes from its checkpoint). Re-running on an existing
run directory resumes it (said at start-up; `--resume` insists on a checkpoint, `--fresh --force`
starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from actors.eval_metrics import accuracy_key, eval_label, metric_names, paired_gain
from buffer.redis_server import EmbeddedRedis, connect, die_with_parent, free_port
from protocol.config import dump_config, load_config
from protocol.config.evaluation import EvalConfig
from protocol.config.pipeline import PipelineConfig
from treepo.models import materialise_model

console = Console()
PLAIN_PROGRESS_S = 10.0  # seconds between plain progress lines when stdout is not a terminal


class Child:
    """One role's process, its log file, and how to stop it."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str], cpus: list[int] | None = None):
        """`cpus`: pin the process (and every thread and process it starts) to these cores with `taskset`,
        and size its OpenMP/torch thread pool to them."""
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "ab")
        if cpus:
            argv = ["taskset", "-c", ",".join(str(c) for c in cpus), *argv]
            env = {**env, "OMP_NUM_THREADS": str(len(cpus))}
        self.argv, self.env = argv, env
        self.restarts: list[float] = []  # monotonic times of this role's restarts
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, start_new_session=True, preexec_fn=die_with_parent)

    def restart(self) -> None:
        """The same command again (a dead process: reaped first), appending to the same log."""
        self.proc.wait()
        self.log.write(f"\n=== treepo up: restart {len(self.restarts) + 1} of {self.name} ===\n".encode())
        self.log.flush()
        self.restarts.append(time.monotonic())
        self.proc = self._spawn()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float) -> int:
        """SIGTERM to the role's own process, which stops what it started (torchrun its ranks, an engine its
        vLLM processes: a SIGTERM to the whole group killed the evaluator's engine before its final evaluation);
        SIGKILL to the whole group after `timeout_s`."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                console.print(f"[yellow]{self.name} did not stop in {timeout_s:.0f} s: killed")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class RedisChild:
    """The embedded redis-server as the supervisor sees a role: restarted on its port and data directory."""

    def __init__(self, server: EmbeddedRedis):
        self.server = server
        self.restarts: list[float] = []

    @property
    def proc(self) -> subprocess.Popen:
        return self.server.proc

    def alive(self) -> bool:
        return self.server.alive()

    def restart(self) -> None:
        self.restarts.append(time.monotonic())
        self.server.restart()

    def tail(self, n: int = 30) -> str:
        return "\n".join((self.server.data_dir / "redis.log").read_text(errors="replace").splitlines()[-n:])


class JsonlTail:
    """The rows appended to a JSONL file since the last call (a partly written last line waits)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def read_jsonl(path: Path) -> list[dict]:
    """Every complete row of a JSONL file (none if it does not exist yet)."""
    return JsonlTail(path).new_rows()


def reward_by_step(rows: list[dict]) -> list[tuple[float, float]]:
    """(step, mean leaf reward of the batches consumed at that step), weighting batches by their trees: a batch
    whose groups all had equal rewards makes no step, and counts at the step the learner was at."""
    by_step: dict[float, list[float]] = {}
    for r in rows:
        acc = by_step.setdefault(r["step"], [0.0, 0.0])
        acc[0] += r["reward_mean"] * r["trees"]
        acc[1] += r["trees"]
    return [(step, total / max(trees, 1e-9)) for step, (total, trees) in sorted(by_step.items())]


def plot_rewards(curve: list[tuple[float, float]], path: Path, held_out: list[tuple[float, float]] = (),
                 held_out_label: str = "") -> None:
    """The training reward per step, and (right axis) held-out accuracy per evaluated policy version (the learner
    publishes version k after step k, so the two share the x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [step for step, _ in curve]
    reward = [mean for _, mean in curve]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reward, marker=".", label="mean leaf reward of the batches")
    ax.set_xlabel("learner step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    if held_out:
        right = ax.twinx()
        right.plot([v for v, _ in held_out], [a for _, a in held_out], marker="o", color="tab:orange",
                   label=held_out_label)
        right.set_ylabel("held-out accuracy")
        right.set_ylim(0, 1)
        more = right.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    ax.legend(*handles, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def eval_summary(eval_cfg: EvalConfig, evals: list[dict], problems: list[dict]) -> str:
    """The end-of-run evaluation line: accuracy of the first and last rows of `metrics/eval_problems.jsonl`
    (`problems`; the figures from `metrics/eval.jsonl`'s rows of those versions, `evals`), the paired gain over
    the problems both evaluated with its 95% interval (`paired_gain`), and the majority vote first -> last."""
    accuracy, _, majority = metric_names(eval_cfg.sampling, eval_cfg.k)
    by_step = {int(row["step"]): row for row in evals}
    first, last = by_step[problems[0]["step"]], by_step[problems[-1]["step"]]
    gain, low, high = paired_gain(problems[0]["accuracy"], problems[-1]["accuracy"])
    both = len(problems[0]["accuracy"].keys() & problems[-1]["accuracy"].keys())
    label = eval_label(last)
    return (f"{label} {accuracy} {first[f'all/{accuracy}']:.3f} -> {last[f'all/{accuracy}']:.3f} (versions "
            f"{problems[0]['step']} -> {problems[-1]['step']}) on {both} {'unseen ' if label == 'held-out' else ''}"
            f"problems: gain {gain:+.3f}, 95% interval [{low:+.3f}, {high:+.3f}] (paired bootstrap over problems); "
            f"{majority} {first[f'all/{majority}']:.3f} -> {last[f'all/{majority}']:.3f}")


def print_curve(curve: list[tuple[float, float]], buckets: int = 10) -> None:
    """The reward curve as text: mean reward per slice of steps, with a bar."""
    size = max(1, len(curve) // buckets)
    for i in range(0, len(curve), size):
        part = curve[i:i + size]
        mean = sum(m for _, m in part) / len(part)
        console.print(f"  steps {int(part[0][0]):>4}-{int(part[-1][0]):<4} reward {mean:+.3f} "
                      f"{'#' * max(0, int(round((mean + 1) * 20)))}")


def with_gpus(env: dict[str, str], cfg: PipelineConfig, role: str, index: int = 0) -> dict[str, str]:
    """`env` with CUDA_VISIBLE_DEVICES set from `run.gpus` for a role: actor `index` takes the index-th group
    of `engine.tensor_parallel_size` ids, round-robin over the groups."""
    ids = cfg.run.gpus.get(role)
    if not ids:
        return env
    if role == "actor":
        tp = cfg.engine.tensor_parallel_size
        group = index % (len(ids) // tp)
        ids = ids[group * tp:(group + 1) * tp]
    return {**env, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in ids)}


def start_children(cfg: PipelineConfig, config_path: Path, log_dir: Path,
                   cpus: dict[str, list[int]] | None = None) -> dict[str, Child]:
    """Buffer, `run.actors` actors, the learner and the evaluator; `cpus` (default `run.cpus`) optionally pins a
    role ("buffer", "actor" for every actor, "learner" for all its ranks, "evaluator", by default on the actors'
    cores) to cores (see `Child`)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cpus = cfg.run.cpus if cpus is None else cpus
    py = [sys.executable, "-m", "treepo.cli"]
    children = {"buffer": Child("buffer", py + ["buffer", "--config", str(config_path)], log_dir, env,
                                cpus.get("buffer"))}
    for i in range(cfg.run.actors):
        children[f"actor-{i}"] = Child(f"actor-{i}", py + ["actor", "--config", str(config_path), "--actor-id",
                                                             f"actor-{i}"], log_dir, with_gpus(env, cfg, "actor", i),
                                       cpus.get("actor"))
    learner = py + ["learner", "--config", str(config_path)]
    if cfg.run.learner_ranks > 1:
        learner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(cfg.run.learner_ranks), "-m", "treepo.cli", *learner[3:]]
    children["learner"] = Child("learner", learner, log_dir, with_gpus(env, cfg, "learner"), cpus.get("learner"))
    if cfg.eval.every_versions:
        children["evaluator"] = Child("evaluator", py + ["evaluator", "--config", str(config_path)], log_dir,
                                      with_gpus(env, cfg, "evaluator"), cpus.get("evaluator", cpus.get("actor")))
    return children


def with_free_port(address: str) -> str:
    """tcp://HOST:0 -> tcp://HOST:<a free port>, so several runs can share a machine."""
    host, _, port = address.rpartition(":")
    return f"{host}:{free_port()}" if port == "0" else address


def resolve(cfg: PipelineConfig, model_dir: Path, redis_url: str) -> PipelineConfig:
    """What the children run with: the built model, the Redis URL, concrete ports."""
    data = cfg.model_dump()
    data["model"].update(source="path", path=str(model_dir))
    data["buffer"].update(redis_url=redis_url, ingest_address=with_free_port(cfg.buffer.ingest_address))
    data["weights"]["address"] = with_free_port(cfg.weights.address)
    return PipelineConfig.model_validate(data)


class Supervisor:
    """Restarts a role that died (`run.max_restarts` per `run.restart_window_s`, with backoff): an actor, the
    buffer, the embedded redis-server (on its AOF; the other roles ride the outage out, `buffer.redis_retry_s`),
    or the learner when it failed (it resumes from its checkpoint; a learner that exits 0 has finished)."""

    def __init__(self, cfg: PipelineConfig, children: dict[str, Child | RedisChild]):
        self.run, self.children = cfg.run, children
        self.due: dict[str, float] = {}  # role -> when its restart is due
        self.failed: str | None = None  # a role past its restart budget: the run ends

    def check(self) -> list[str]:
        """One look at the children: schedule and perform restarts; lines saying what happened."""
        now, lines = time.monotonic(), []
        for name, child in self.children.items():
            if child.alive() or (name == "learner" and child.proc.returncode == 0):
                continue
            if name not in self.due:
                recent = [t for t in child.restarts if now - t < self.run.restart_window_s]
                if len(recent) >= self.run.max_restarts:
                    self.failed = name
                    lines.append(f"[red]{name} exited ({child.proc.returncode}) and was restarted {len(recent)} "
                                 f"times in {self.run.restart_window_s:.0f} s (run.max_restarts): giving up; "
                                 f"last lines:\n{child.tail(10)}")
                    continue
                wait = min(60.0, self.run.restart_backoff_s * 2 ** len(recent))
                self.due[name] = now + wait
                lines.append(f"[yellow]{name} exited ({child.proc.returncode}); restarting in {wait:.0f} s "
                             f"(restart {len(recent) + 1} of at most {self.run.max_restarts} in "
                             f"{self.run.restart_window_s:.0f} s); last lines:\n{child.tail(10)}")
            elif now >= self.due[name]:
                del self.due[name]
                child.restart()
                lines.append(f"[yellow]{name} restarted (pid {child.proc.pid})")
        return lines

    def restarts(self) -> int:
        return sum(len(c.restarts) for c in self.children.values())


def watch(cfg: PipelineConfig, children: dict[str, Child], metrics_dir: Path,
          redis: EmbeddedRedis | None = None) -> bool:
    """Progress until the learner finishes; False if a role failed for good. Ctrl-C asks the learner to stop.
    `redis`: the embedded server, supervised with the roles."""
    learner = children["learner"]
    supervisor = Supervisor(cfg, {**children, **({"redis": RedisChild(redis)} if redis else {})})
    columns = [TextColumn("[bold]learner"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("steps", total=cfg.learner.max_steps, info="starting (model, engines, DeepSpeed)")
        learner_rows, actor_tails = JsonlTail(metrics_dir / "learner.jsonl"), {}
        eval_rows, held_out, key = JsonlTail(metrics_dir / "eval.jsonl"), "", accuracy_key(cfg.eval)
        first = last = None
        plain_at, started = 0.0, time.monotonic()
        trees = gen_tokens = prompt_tokens = cached_tokens = 0.0
        while not (learner.proc.poll() == 0 or supervisor.failed):
            try:
                time.sleep(1.0)
            except KeyboardInterrupt:
                console.print("[yellow]Ctrl-C: asking the learner to checkpoint and stop")
                if learner.alive():
                    os.killpg(learner.proc.pid, signal.SIGINT)
                    learner.proc.wait()
                return learner.proc.returncode == 0
            # only what was appended since the last look: a week-long run must not re-read its history
            for row in learner_rows.new_rows():
                first, last = first or row, row
                trees += row["trees"]
            for path in metrics_dir.glob("actor-*.jsonl"):
                tail = actor_tails.setdefault(path, JsonlTail(path))
                for r in tail.new_rows():
                    gen_tokens += r["generated_tokens"]
                    prompt_tokens += r["prompt_tokens"]
                    cached_tokens += r["cached_tokens"]
            for row in eval_rows.new_rows():
                interval = (f" [{row[f'{key}_ci_low']:.2f},{row[f'{key}_ci_high']:.2f}]" if f"{key}_ci_low" in row
                            else "")  # rows of a run resumed from an older version carry none
                held_out = f"  {eval_label(row)} {row[key]:.3f}{interval} (v{int(row['step'])})"
            for line in supervisor.check():
                console.print(line)
            if last is not None:
                elapsed = max(1e-9, last["time"] - first["time"] + first["iteration_s"])
                info = (f"reward {last['reward_mean']:+.3f}  trees/s {trees / elapsed:.2f}  "
                        f"gen tok/s {gen_tokens / elapsed:.0f}  cache hits {100 * cached_tokens / max(1.0, prompt_tokens):.0f}%  "
                        f"train tok/s {last['row_tokens_per_s']:.0f}  "
                        f"staleness {last['staleness_mean']:.1f}  versions {int(last['tree_version_min'])}.."
                        f"{int(last['policy_version'])}  idle {100 * last['idle_fraction']:.0f}%{held_out}"
                        + (f"  restarts {supervisor.restarts()}" if supervisor.restarts() else ""))
                progress.update(task, completed=int(last["step"]), info=info)
            if not console.is_terminal and time.monotonic() - plain_at >= PLAIN_PROGRESS_S:
                # no terminal (CI, nohup, a cluster's log file): the bar does not draw, a plain line does
                print(f"step {int(last['step'])}/{cfg.learner.max_steps}  {info}" if last is not None else
                      f"starting: {time.monotonic() - started:.0f} s (model, engines, DeepSpeed){held_out}", flush=True)
                plain_at = time.monotonic()
    return supervisor.failed is None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults when omitted), e.g. configs/cpu-tiny.yaml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in run.output_dir from its checkpoint, stored trees and prompt queue "
                           "(an error if there is none); also what a plain re-run on an existing run does")
    mode.add_argument("--fresh", action="store_true",
                      help="start over: refuses a run.output_dir that holds a run unless --force (which deletes it)")
    p.add_argument("--force", action="store_true", help="with --fresh: delete the existing run first")


def prepare_output(out: Path, resume: bool, fresh: bool, force: bool) -> str:
    """What `treepo up` does with `out`, said in one line (or a SystemExit naming the flag to use)."""
    checkpoint = out / "checkpoints" / "latest"
    existing = out.exists() and any(out.iterdir())
    if fresh and existing:
        if not force:
            raise SystemExit(f"treepo up --fresh: {out} holds a run; add --force to delete it, or drop --fresh to "
                             f"resume it")
        shutil.rmtree(out)
        return f"fresh run in {out} (the previous run there was deleted: --fresh --force)"
    if resume and not checkpoint.exists():
        raise SystemExit(f"treepo up --resume: no checkpoint under {out / 'checkpoints'} to resume from")
    if checkpoint.exists():
        return (f"resuming the run in {out} from its checkpoint ({checkpoint.read_text().strip()}), its stored "
                f"trees and its prompt queue (--fresh --force starts over)")
    return f"fresh run in {out}" + (" (its stored data, if any, is kept: --fresh --force starts over)" if existing else "")


@dataclass
class Launch:
    """A started pipeline: the resolved config, its children and where they write metrics."""

    cfg: PipelineConfig
    children: dict[str, Child]
    metrics_dir: Path
    redis: EmbeddedRedis | None  # the embedded server, when the run started one


@contextmanager
def launched(cfg: PipelineConfig, cpus: dict[str, list[int]] | None = None) -> Iterator[Launch]:
    """Model, Redis, then the children (see `start_children`); on exit stops actors, learner, buffer and Redis."""
    out = Path(cfg.run.output_dir)
    log_dir, metrics_dir = out / "logs", out / "metrics"
    log_dir.mkdir(parents=True, exist_ok=True)
    with console.status("materialising the model"):
        model_dir = materialise_model(cfg.model, out / "model")
    with connect(cfg, reuse_running=False) as redis_handle:
        url = (cfg.buffer.redis_url or (redis_handle.server.url if redis_handle.server else
                                        f"unix://{redis_handle.lite.socket_file}"))
        resolved = resolve(cfg, model_dir, url)
        config_path = out / "config.yaml"
        config_path.write_text(dump_config(resolved))
        console.print(f"model {model_dir}, redis {url}, logs {log_dir}")
        children = start_children(resolved, config_path, log_dir, cpus)
        try:
            yield Launch(resolved, children, metrics_dir, redis_handle.server)
        finally:  # actors first (nothing new to train), the learner (final checkpoint, acknowledgements), the
            # buffer; Redis last, when the context above exits
            # the evaluator after the learner: it evaluates the final weights it holds before it leaves
            for name in [n for n in children if n.startswith("actor-")] + ["learner", "evaluator", "buffer"]:
                if name in children:
                    children[name].stop(timeout_s=300 if name == "evaluator" else 60)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the run like Ctrl-C: checkpoint, then stop all
    cfg = load_config(args.config)
    out = Path(cfg.run.output_dir)
    console.print(f"[bold]treepo up[/]: run {cfg.run.run_id!r} -> {out}  ({cfg.run.actors} actor(s), "
                  f"{cfg.run.learner_ranks} learner rank(s), {cfg.rollout.mode} rollouts, {cfg.learner.estimator} advantages)")
    console.print(prepare_output(out, args.resume, args.fresh, args.force))
    with launched(cfg) as launch:
        ok = watch(launch.cfg, launch.children, launch.metrics_dir, launch.redis)
    rows = read_jsonl(launch.metrics_dir / "learner.jsonl")
    evals, key = read_jsonl(launch.metrics_dir / "eval.jsonl"), accuracy_key(cfg.eval)
    if not ok:
        learner = launch.children["learner"]
        console.print(f"[red]the run failed; last lines of {learner.log_path}:\n{learner.tail(40)}")
        return 1
    if rows:
        curve = reward_by_step(rows)
        trailing = next((i for i, r in enumerate(reversed(rows)) if not r["skipped"]), len(rows))
        if cfg.learner.stop_after_skipped and trailing >= cfg.learner.stop_after_skipped:
            console.print(f"[yellow]the learner ended at step {int(rows[-1]['step'])} of {cfg.learner.max_steps}: "
                          f"its last {cfg.learner.stop_after_skipped} batches had no group with unequal rewards")
        plot_rewards(curve, out / "reward.png", [(e["step"], e[key]) for e in evals],
                     f"{eval_label(evals[-1])} {key.removeprefix('all/')} by policy version" if evals else "")
        console.print(f"reward curve ({len(curve)} steps, {len(rows)} batches) -> {out / 'reward.png'}")
        print_curve(curve)
        started = [r for r in rows if "startup_s" in r][-1:]  # this launch's learner (a resumed run has several)
        if started:
            console.print(f"start-up: the learner's first batch came {started[0]['startup_s']:.0f} s after it started "
                          f"({started[0]['first_batch_wait_s']:.0f} s of it waiting for the actors' first trees); "
                          f"the actors' and the evaluator's start-up is in their logs ({launch.children['learner'].log_path.parent})")
    problems = read_jsonl(launch.metrics_dir / "eval_problems.jsonl")
    if problems:
        console.print(eval_summary(cfg.eval, evals, problems))
    console.print(f"checkpoint {out / 'checkpoints'}, weights {out / 'export'}, trees in Redis (run {cfg.run.run_id!r})")
    return 0
