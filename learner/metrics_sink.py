"""Where a process's metrics go: a JSONL file (what `treepo up` reads for its progress view),
TensorBoard scalars, and Prometheus gauges on /metrics (when a port is given).

One `MetricsSink` per process; `log(step, metrics)` writes one JSON line {"step", "time", ...} and
the same scalars to TensorBoard (tag `<prefix>/<name>`) and to the gauge `treepo_<prefix>_<name>`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, start_http_server


class MetricsSink:
    def __init__(self, directory: str | Path, prefix: str, tensorboard: bool = True, prometheus_port: int = 0):
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
            start_http_server(prometheus_port, addr="127.0.0.1", registry=self.registry)

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

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
