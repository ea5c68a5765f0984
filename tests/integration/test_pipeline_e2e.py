"""End to end on CPU: Redis + buffer + 2 actors + a 2-rank DeepSpeed learner, each its own process,
asynchronous, started by `treepo up` on the cpu-tiny task (reward = fraction of all-lowercase words
of the completion, actors/toy_tasks.py, which the tiny random model learns within tens of steps).

Checks: the learner makes >= 20 steps; the stored trees carry >= 3 distinct policy versions (the
actors applied pushed weights while generating); the stored trees replay into a learner step
without actors; the mean reward of the last 5 steps beats the first 5 by more than 0.1.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from buffer.redis_server import EmbeddedRedis
from buffer.replay import replay
from buffer.store import TreeStore
from protocol.config import load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
STEPS = 24


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e")
    cfg = yaml.safe_load((ROOT / "configs" / "cpu-tiny.yaml").read_text())
    cfg["run"].update(output_dir=str(out), actors=2, learner_ranks=2)
    cfg["learner"].update(max_steps=STEPS, checkpoint_every=STEPS)
    cfg["buffer"]["ingest_address"] = "tcp://127.0.0.1:0"  # `up` picks free ports
    cfg["weights"] = {"address": "tcp://127.0.0.1:0"}
    path = out / "e2e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "up", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_learner_trains_on_fresh_weights_and_reward_rises(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics" / "learner.jsonl").read_text().splitlines()]
    assert len(rows) >= 20 and rows[-1]["step"] == STEPS
    first = np.mean([r["reward_mean"] for r in rows[:5]])
    last = np.mean([r["reward_mean"] for r in rows[-5:]])
    assert last - first > 0.1, (first, last)
    assert max(r["staleness_max"] for r in rows) <= 2  # buffer.max_staleness of cpu-tiny
    assert (run_dir / "reward.png").stat().st_size > 0
    assert (run_dir / "export" / "model.safetensors").exists()


def test_stored_trees_carry_versions_and_replay(run_dir):
    cfg = load_config(run_dir / "config.yaml")
    with EmbeddedRedis(run_dir / "redis") as server:  # the run's AOF, reopened after `up` stopped it
        store = TreeStore(server.client(), cfg.run.run_id)
        seen: list = []
        n = replay(store, seen.extend, batch_size=cfg.learner.prompts_per_step)
    assert n >= STEPS * cfg.learner.prompts_per_step
    versions = set(np.concatenate([t.versions for t in seen]).tolist())
    assert len(versions) >= 3, versions
    assert all(len(t.leaf_ids) == cfg.rollout.width for t in seen)  # exactly w leaves per prompt
