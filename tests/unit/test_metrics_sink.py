import json
import time
import urllib.request

from buffer.redis_server import free_port
from protocol.config.pipeline import WandbConfig
from treepo.telemetry import MetricsSink


def test_metrics_go_to_jsonl_and_prometheus_and_two_sinks_share_a_process(tmp_path):
    port = free_port()
    sink = MetricsSink(tmp_path / "a", "learner", tensorboard=False, prometheus_port=port)
    sink.log(3, {"reward_mean": 0.5, "tokens_per_s": 12.0})
    other = MetricsSink(tmp_path / "b", "learner", tensorboard=False)  # same gauge names, own registry
    other.log(1, {"reward_mean": 0.25})
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "treepo_learner_reward_mean 0.5" in page and "treepo_learner_tokens_per_s 12.0" in page
    assert "process_cpu_seconds_total" in page
    row = json.loads((tmp_path / "a" / "learner.jsonl").read_text())
    assert (row["step"], row["reward_mean"], row["tokens_per_s"]) == (3, 0.5, 12.0)
    sink.close()
    other.close()


def test_wandb_offline_run_records_the_logged_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = MetricsSink(tmp_path, "eval", tensorboard=False, wandb=WandbConfig(project="treepo-test", mode="offline"),
                       run_id="r1", config={"learner": {"lr": 0.5}})
    sink.log(0, {"mean@4": 0.25})
    sink.log(10, {"mean@4": 0.75})
    sink.close()
    (record,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # what `wandb sync` uploads
    # the W&B service process writes this file; its last flush can lag finish() (CI once read only the header)
    deadline = time.monotonic() + 60
    while b"eval/mean@4" not in (data := record.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    # protobuf records: keys and JSON values appear as they are
    assert b"treepo-test" in data and b'{"lr":0.5}' in data
    assert data.count(b"eval/mean@4") >= 2 and b"0.25" in data and b"0.75" in data
