"""Where a process's metrics go: a JSONL file (what `treepo up` reads for its progress view),
TensorBoard scalars, Prometheus gauges on /metrics (when a port is given) and, optionally, a Weights &
Biases run.

One `MetricsSink` per process; `log(step, metrics)` writes one JSON line {"step", "time", ...} and
the same scalars to TensorBoard (tag `<prefix>/<name>`), to the gauge `treepo_<prefix>_<name>` and to
W&B (key `<prefix>/<name>` at that step). A W&B run is one per sink: name `<run_id>-<prefix>`, group
`<run_id>`, job type `<prefix>`, files under `<directory>/wandb`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, start_http_server

from protocol.config.pipeline import ConfigError, WandbConfig


class MetricsSink:
    def __init__(self, directory: str | Path, prefix: str, tensorboard: bool = True, prometheus_port: int = 0,
                 prometheus_host: str = "127.0.0.1", wandb: WandbConfig | None = None, run_id: str = "",
                 config: dict[str, Any] | None = None):
        """`wandb` with a project: log to a W&B run too (`config`: the run's settings, shown with it)."""
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.jsonl = open(self.dir / f"{prefix}.jsonl", "a", buffering=1)
        self.tb = SummaryWriter(str(self.dir / "tensorboard" / prefix)) if tensorboard else None
        self.registry = CollectorRegistry()  # its own: two sinks in one process (tests, tools) do not collide
        ProcessCollector(registry=self.registry)  # CPU, memory, open files of the process, as the default registry
        self.gauges: dict[str, Gauge] = {}
        if prometheus_port:
            start_http_server(prometheus_port, addr=prometheus_host, registry=self.registry)
        self.wandb_run = None
        if wandb is not None and wandb.project:
            try:
                import wandb as wb
            except ImportError as e:
                raise ConfigError("run.wandb.project is set but wandb is not installed: pip install "
                                  "'treepo[wandb]'") from e
            (self.dir / "wandb").mkdir(exist_ok=True)
            self.wandb_run = wb.init(project=wandb.project, entity=wandb.entity or None, mode=wandb.mode,
                                     dir=str(self.dir), group=run_id or None, job_type=prefix,
                                     name=f"{run_id}-{prefix}" if run_id else prefix, config=config,
                                     reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        for name, value in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(f"{self.prefix}/{name}", value, step)
            gauge = self.gauges.get(name)
            if gauge is None:
                safe = re.sub(r"[^a-zA-Z0-9_]", "_", f"treepo_{self.prefix}_{name}")
                gauge = self.gauges[name] = Gauge(safe, f"{self.prefix} {name}", registry=self.registry)
            gauge.set(value)
        if self.wandb_run is not None:
            self.wandb_run.log({f"{self.prefix}/{name}": value for name, value in metrics.items()}, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
