"""End to end on CPU: Redis + buffer + 2 actors + a 2-rank DeepSpeed learner, each its own process,
asynchronous, started by `treepo up` on the cpu-tiny task (reward = fraction of all-lowercase words
of the completion, actors/toy_tasks.py, which the tiny random model learns within tens of steps).

Checks: the learner makes >= 20 steps; the stored trees carry >= 3 distinct policy versions (the
actors applied pushed weights while generating); the stored trees replay; the mean reward of the
last 5 steps beats the first 5 by more than 0.1. While it trains, actors come and go: an extra
actor joins (started by hand against the run's config) and later stops, and one of `up`'s actors
is killed with SIGKILL (its leased prompts go back to the queue when the lease expires; `up`
restarts it); the learner keeps going to its last step. An evaluator logs held-out accuracy every 6
versions and of the final weights; `up`, writing to a file, prints plain progress lines. Afterwards the
stored trees train an offline learner (`treepo replay --train`) without a byte of the run changing.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from buffer.redis_server import EmbeddedRedis
from buffer.replay import replay
from buffer.store import TreeStore
from protocol.config import load_config
from tests.fixtures.redis import key_snapshot

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
STEPS = 30  # cpu-tiny's own run length (a run that solves the task sooner ends early: learner.stop_after_skipped)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e")
    cfg = yaml.safe_load((ROOT / "configs" / "cpu-tiny.yaml").read_text())
    cfg["run"].update(output_dir=str(out), actors=2, learner_ranks=2)
    # once solved, 4 batches without signal end the run (each draws up to 16 trees from actors that share 2 cores)
    cfg["learner"].update(max_steps=STEPS, checkpoint_every=STEPS, stop_after_skipped=4)
    cfg["buffer"]["ingest_address"] = "tcp://127.0.0.1:0"  # `up` picks free ports
    cfg["weights"] = {"address": "tcp://127.0.0.1:0"}
    cfg["buffer"]["lease_seconds"] = 10
    cfg["eval"] = {"every_versions": 6, "k": 4, "prompts": {  # held-out accuracy while it trains
        "datasets": ["basic_arithmetic"], "size": 4, "seed": 1_000_000, "system_prompt": "", "max_prompt_tokens": 64}}
    path = out / "e2e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(out / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "treepo.cli", "up", "--config", str(path)], cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT)
    wait_for_step(out, 4, up)
    joiner = subprocess.Popen([sys.executable, "-m", "treepo.cli", "actor", "--config", str(out / "config.yaml"),
                               "--actor-id", "actor-late"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wait_for_step(out, 10, up)
    os.kill(actor_pid(out, "actor-1"), signal.SIGKILL)
    joiner.send_signal(signal.SIGTERM)
    rc = joiner.wait(timeout=120)
    assert rc == 0, (rc, (out / "up.log").read_text()[-4000:])
    assert up.wait(timeout=900) == 0, (out / "up.log").read_text()[-4000:]
    return out


def wait_for_step(out: Path, step: int, up: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while learner_steps(out) < step:
        assert up.poll() is None and time.monotonic() < deadline, (out / "up.log").read_text()[-4000:]
        time.sleep(1)


def learner_steps(out: Path) -> int:
    path = out / "metrics" / "learner.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def actor_pid(out: Path, actor_id: str) -> int:
    """The pid of `up`'s actor process `actor_id` (found by its command line)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError):
                continue
            if b"actor" in argv and actor_id.encode() in argv and str(out / "config.yaml").encode() in argv:
                return int(proc.name)
    raise AssertionError(f"no process for {actor_id}")


def test_learner_trains_on_fresh_weights_and_reward_rises(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics" / "learner.jsonl").read_text().splitlines()]
    # every step, or an early end once the task is solved (learner.stop_after_skipped batches without signal);
    # the joins and the kill above wait for learner batches (rows), which a solved task keeps making
    trailing = next(i for i, r in enumerate(reversed(rows)) if not r["skipped"])
    limit = load_config(run_dir / "config.yaml").learner.stop_after_skipped
    assert rows[-1]["step"] == STEPS or trailing >= limit, (rows[-1]["step"], trailing)
    first = np.mean([r["reward_mean"] for r in rows[:5]])
    last = np.mean([r["reward_mean"] for r in rows[-5:]])
    assert last - first > 0.1, (first, last)
    assert max(r["staleness_max"] for r in rows) <= 2  # buffer.max_staleness of cpu-tiny
    assert (run_dir / "reward.png").stat().st_size > 0
    assert (run_dir / "export" / "model.safetensors").exists()


def test_the_evaluator_logged_held_out_accuracy_by_version_and_up_printed_plain_progress(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics" / "eval.jsonl").read_text().splitlines()]
    versions = [r["step"] for r in rows]
    assert versions[0] == 0 and versions == sorted(versions) and len(versions) >= 3, versions
    # every eval.every_versions versions, and the final weights (which may come sooner) when up stops it
    assert all(b - a >= 6 for a, b in zip(versions[:-2], versions[1:-1], strict=True)) and versions[-1] > versions[-2]
    assert all(r["all/prompts"] == 4 and 0 <= r["all/mean@4"] <= r["all/pass@4"] <= 1 for r in rows)
    assert rows[-1]["all/reward"] > rows[0]["all/reward"]  # held-out reward rose with training reward
    problems = [json.loads(line) for line in (run_dir / "metrics" / "eval_problems.jsonl").read_text().splitlines()]
    assert [r["step"] for r in problems] == versions and all(len(r["accuracy"]) == 4 for r in problems)
    up_log = (run_dir / "up.log").read_text()
    summary = " ".join(up_log.split())  # rich wraps the line at the console's width
    assert "held-out mean@4 " in summary and " on 4 unseen problems: gain " in summary
    # stdout is a file here, not a terminal: plain progress lines every few seconds
    assert sum(line.startswith("step ") for line in up_log.splitlines()) >= 3
    assert any(line.startswith("starting: ") for line in up_log.splitlines())  # from the start, before a step


def test_actors_joined_and_left_while_the_learner_went_on(run_dir):
    late = [json.loads(line) for line in (run_dir / "metrics" / "actor-late.jsonl").read_text().splitlines()]
    assert sum(r["trees"] for r in late) > 0  # the late actor's trees were accepted
    up_log = (run_dir / "up.log").read_text()
    assert "actor-1 exited (-9)" in up_log and "actor-1 restarted" in up_log
    assert "learner exited" not in up_log and "buffer exited" not in up_log  # only the killed actor restarted


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


def test_stored_trees_train_offline_and_export_the_advantages(run_dir, tmp_path, capsys):
    """The online learner saved the advantages it trained each tree with; `treepo replay --train` trains on the
    run's first versions for 2 epochs into its own directory, and the run's keys stay byte for byte."""
    from treepo.cli import main

    cfg = load_config(run_dir / "config.yaml")
    source = run_dir / "e2e.yaml"  # the config `up` was given: the run's embedded Redis, no fixed URL
    with EmbeddedRedis(run_dir / "redis") as server:  # found running by the commands below
        client = server.client()
        before = key_snapshot(client, cfg.run.run_id)
        store = TreeStore(client, cfg.run.run_id)
        saved = [r for r in (store.advantages(t) for t in store.tree_ids()) if r is not None]
        steps = int(json.loads((run_dir / "metrics" / "learner.jsonl").read_text().splitlines()[-1])["step"])
        assert len(saved) >= steps * cfg.learner.prompts_per_step // 2 and {r.level for r in saved} == {"leaf"}
        assert max(r.trained_version for r in saved) == steps - 1  # the last step started from version steps - 1
        assert main(["replay", "--train", "--config", str(source), "--max-version", "2", "--epochs", "2",
                     "--out", str(tmp_path / "offline")]) == 0
        assert key_snapshot(client, cfg.run.run_id) == before
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "replay trained" in printed
    rows = [json.loads(line) for line in (tmp_path / "offline" / "metrics" / "learner.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 1.0 and all(r["tree_version_min"] <= 2 for r in rows)
    assert (tmp_path / "offline" / "export" / "model.safetensors").exists()
