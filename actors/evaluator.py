"""The evaluator process (`treepo evaluator`; `treepo up` starts one when `eval.every_versions` > 0): held-out
accuracy of the policy while it trains.

It subscribes to the learner's weight push like an actor (identity `evaluator`, newest version only),
evaluates policy version 0 (the starting weights) at once, then each time it holds a version at least
`eval.every_versions` past the last one it evaluated, that version (`actors.evaluate.Evaluation`). On
SIGTERM it evaluates the newest version it holds if that one is not evaluated yet (the run's final
weights, when the learner's last push reached it), then leaves. Metrics: `metrics/eval.jsonl` (a row per
evaluation, `step` = the policy version), TensorBoard `eval/...`, Prometheus on `run.metrics_port + 1`
when `run.metrics_port` is set.

Why a process of its own rather than an actor between trees: evaluation then never delays a batch the
learner waits for, nor holds an actor's tree pool (and its leases) for the length of an eval set; it costs
one more engine's memory, and on a machine short of cores its work competes with the actors'.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

from actors.evaluate import Evaluation
from actors.loop import make_engine
from actors.weight_receiver import ZmqWeightSubscriber
from protocol.config import PipelineConfig
from protocol.role_process import add_config_argument, start_role
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
        self.evaluated = -1

    def _evaluate(self) -> None:
        metrics = self.evaluation.run()
        self.evaluated = self.engine.policy_version
        self.sink.log(self.evaluated, metrics)
        k = self.cfg.eval.k
        log.info("policy version %d: mean@%d %.3f maj@%d %.3f pass@%d %.3f on %d prompts in %.1f s", self.evaluated,
                 k, metrics[f"all/mean@{k}"], k, metrics[f"all/maj@{k}"], k, metrics[f"all/pass@{k}"],
                 metrics["all/prompts"], metrics["wall_s"])

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
