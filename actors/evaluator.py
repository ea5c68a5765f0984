"""The evaluator process (`treepo evaluator`; `treepo up` starts one when `eval.every_versions` > 0): held-out
accuracy of the policy while it trains, with 95% intervals over problems, and each problem's accuracy.

It subscribes to the learner's weight push like an actor (identity `evaluator`, newest version only),
evaluates policy version 0 (the starting weights) at once, then each time it holds a version at least
`eval.every_versions` past the last one it evaluated, that version (`actors.evaluate.Evaluation`). On
SIGTERM it evaluates the newest version it holds if that one is not evaluated yet (the run's final
weights, when the learner's last push reached it), then leaves. Metrics: `metrics/eval.jsonl` (a row per
evaluation, `step` = the policy version; the keys of `actors.evaluate.Evaluation.run`), TensorBoard `eval/...`,
Prometheus on `run.metrics_port + 1` when `run.metrics_port` is set; and `metrics/eval_problems.jsonl`, a row
per evaluation {"step": policy version, "time": unix time, "k", "sampling": "sequential" | "tree",
"accuracy": {problem key: fraction of its samples correct}}, from which `treepo up` reads the paired gain of
the last evaluation over the first (`actors.eval_metrics.paired_gain`). Each evaluation's log line gives the
three figures of `eval_metrics.metric_names` with their 95% intervals (`eval_metrics.figures_text`), said
"held-out" only when no evaluated problem is a training problem (`eval_metrics.eval_label`).

Why a process of its own rather than an actor between trees: evaluation then never delays a batch the
learner waits for, nor holds an actor's tree pool (and its leases) for the length of an eval set; it costs
one more engine's memory, and on a machine short of cores its work competes with the actors'.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

from actors.eval_metrics import eval_label, figures_text
from actors.evaluate import Evaluation
from actors.loop import make_engine
from actors.weight_receiver import ZmqWeightSubscriber
from protocol.config import PipelineConfig
from protocol.role_process import add_config_argument, process_age_s, start_role
from treepo.models import materialise_model
from treepo.telemetry import MetricsSink

log = logging.getLogger("treepo.evaluator")


class EvaluatorLoop:
    def __init__(self, cfg: PipelineConfig, model_dir: Path, stop: threading.Event):
        self.cfg, self.stop = cfg, stop
        self.engine = make_engine(cfg, model_dir)
        self.evaluation = Evaluation(cfg, self.engine)
        self.weights = ZmqWeightSubscriber(cfg.weights, "evaluator", cfg.security, relay=False)
        port = cfg.run.metrics_port + 1 if cfg.run.metrics_port else 0
        self.sink = MetricsSink(Path(cfg.run.output_dir) / "metrics", "eval", prometheus_port=port,
                                prometheus_host=cfg.run.metrics_host, wandb=cfg.run.wandb, run_id=cfg.run.run_id)
        self.problems_path = Path(cfg.run.output_dir) / "metrics" / "eval_problems.jsonl"
        log.info("start-up: engine and eval set ready %.1f s after the process started", process_age_s())
        self.evaluated = -1

    def _evaluate(self) -> None:
        metrics = self.evaluation.run()
        self.evaluated = self.engine.policy_version
        self.sink.log(self.evaluated, metrics)
        e = self.cfg.eval
        with open(self.problems_path, "a") as f:
            f.write(json.dumps({"step": self.evaluated, "time": time.time(), "k": e.k, "sampling": e.sampling,
                                "accuracy": self.evaluation.accuracy}) + "\n")
        log.info("policy version %d, %s: %s on %d problems in %.1f s", self.evaluated, eval_label(metrics),
                 figures_text(metrics, e), metrics["all/prompts"], metrics["wall_s"])

    def _take_newest(self) -> None:
        got = self.weights.poll_latest()
        if got is not None:
            version, state = got
            self.engine.load_weights(state, version)

    def run(self) -> None:
        self._evaluate()  # version 0: the starting weights
        every = self.cfg.eval.every_versions
        while not self.stop.is_set():
            self.weights.wait_new(timeout_s=0.5)
            self._take_newest()
            if self.engine.policy_version >= self.evaluated + every:
                self._evaluate()
        self._take_newest()
        if self.engine.policy_version > self.evaluated:  # the final weights
            self._evaluate()

    def close(self) -> None:
        self.weights.close()
        self.evaluation.close()
        self.sink.close()
        self.engine.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)


def run(args: argparse.Namespace) -> int:
    cfg, stop = start_role(args)
    model_dir = materialise_model(cfg.model, Path(cfg.run.output_dir) / "model")
    loop = EvaluatorLoop(cfg, model_dir, stop)
    try:
        loop.run()
    finally:
        loop.close()
    return 0
