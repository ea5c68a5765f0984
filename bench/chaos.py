"""Chaos as a measurement: a `treepo up` run with faults injected on a schedule, then an audit of what it trained.

The run: configs/cpu-tiny.yaml with 2 actors, `--steps` learner steps (checkpoint every 4), short leases and
grant timeouts so that outages show within the run, and no prompt filter (the tiny task is solved in about
30 steps; batches without signal would end the run early). Faults, each once the learner has reached the step
given in `FAULTS` (so each lands on a working run):

  1. kill -9 of actor-0                       (`treepo up` restarts it)
  2. the buffer unreachable for 45 s          (SIGSTOP; then kill -9, and `treepo up` restarts it)
  3. kill -9 of redis-server                  (`treepo up` restarts it on its port and AOF; every client
                                               rides the outage out)
  4. kill -9 of the learner                   (`treepo up` restarts it: it resumes from its checkpoint)
  5. kill -9 of `treepo up` itself            (its children get SIGTERM, Redis stops at the same moment),
     then `treepo up --resume` runs the rest of the steps.

The audit reads Redis (the run's store, on its AOF) and the learner's logs:

  faults_injected            faults above that happened
  run_completed              1 if the resumed run ended at its last step with exit status 0
  acked_trees_missing        trees the store indexed (stored and acknowledged to an actor) without a loadable blob
  trees_trained_twice        trees trained more than once in the final model's lineage (`trained_trees.jsonl`,
                             steps after a resumed checkpoint replaced by the resumed ones)
  trees_never_trained        stored trees neither trained in that lineage, nor still waiting in the stream, nor
                             counted as dropped on purpose (stale, uniform, grown by lost weights)
  version_reuses             policy versions published a second time for other weights (each version a step
                             publishes must exceed every one published before it; a resume may publish the last
                             version again only when its checkpoint holds exactly those weights)
  negative_staleness_trained batches trained with a tree newer than the weights training it
  decoder_crashes            of 100,000 mutated frames of every message type, decodes that raised anything but
                             ProtocolError

Target: run_completed 1, every other figure 0. Prints the events, then one JSON line (the last line).

    .venv/bin/python bench/chaos.py [--steps 60]      (6-9 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buffer.redis_server import EmbeddedRedis  # noqa: E402
from buffer.store import TreeStore  # noqa: E402
from learner.trained_log import final_lineage  # noqa: E402
from protocol.config.pipeline import load_config  # noqa: E402
from treepo.up import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAULTS = {"actor": 4, "buffer": 10, "redis": 16, "learner": 22, "up": 28}  # learner step -> fault
BUFFER_OUTAGE_S = 45.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def chaos_config(out: Path, steps: int) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "cpu-tiny.yaml").read_text())
    data["run"].update(run_id="chaos", output_dir=str(out / "run"), actors=2, restart_backoff_s=1.0)
    data["buffer"].update(lease_seconds=20, grant_timeout_s=10, redis_retry_s=120)
    # every batch trains (no prompt filter): the tiny task is solved within ~30 steps, and a run of batches without
    # signal would end it early (learner.stop_after_skipped); the faults need a run that keeps stepping
    data["learner"].update(max_steps=steps, checkpoint_every=4, filter_uniform_prompts=False)
    data["eval"]["every_versions"] = 0  # the faults target the training roles; no evaluator process
    path = out / "chaos.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def children_of(pid: int) -> dict[int, list[str]]:
    """pid -> argv of the processes whose parent is `pid`."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def find(up_pid: int, *words: str) -> int:
    """The child of `treepo up` whose command line holds every word (waits for it to exist)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for pid, argv in children_of(up_pid).items():
            line = " ".join(argv)
            if all(w in line for w in words):
                return pid
        time.sleep(0.5)
    raise RuntimeError(f"no child of treepo up runs {words}")


def learner_step(metrics: Path) -> int:
    path = metrics / "learner.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    return int(rows[-1]["step"]) if rows else 0


def wait_step(metrics: Path, step: int, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while learner_step(metrics) < step:
        if proc.poll() is not None:
            raise RuntimeError(f"treepo up exited ({proc.returncode}) before step {step}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the learner did not reach step {step} in {timeout_s:.0f} s")
        time.sleep(0.5)


def up(config: Path, out: Path, *flags: str) -> subprocess.Popen:
    logf = open(out / "up.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "treepo.cli", "up", "--config", str(config), *flags], cwd=ROOT,
                            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_gone(pids: list[int], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
              for p in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} still alive after {timeout_s:.0f} s")
        time.sleep(0.5)


def inject(config: Path, out: Path, steps: int) -> tuple[int, int, int]:
    """Faults 1-5 on a first `treepo up`; returns (faults injected, the resumed run's exit status, its last
    learner step)."""
    cfg = load_config(str(config))
    metrics = Path(cfg.run.output_dir) / "metrics"
    proc = up(config, out)
    faults = 0

    wait_step(metrics, FAULTS["actor"], proc)
    os.kill(find(proc.pid, "--actor-id", "actor-0"), signal.SIGKILL)
    faults += 1
    log(f"step {learner_step(metrics)}: kill -9 actor-0")

    wait_step(metrics, FAULTS["buffer"], proc)
    buffer = find(proc.pid, "treepo.cli", "buffer")
    os.kill(buffer, signal.SIGSTOP)
    log(f"step {learner_step(metrics)}: buffer stopped (SIGSTOP) for {BUFFER_OUTAGE_S:.0f} s")
    time.sleep(BUFFER_OUTAGE_S)
    os.kill(buffer, signal.SIGKILL)
    faults += 1
    log(f"step {learner_step(metrics)}: kill -9 buffer after its outage")

    wait_step(metrics, FAULTS["redis"], proc)
    server = find(proc.pid, "redis-server")
    os.kill(server, signal.SIGKILL)
    wait_gone([server])
    restarted = find(proc.pid, "redis-server")  # by `treepo up`'s supervisor, on the same port and AOF
    faults += 1
    log(f"step {learner_step(metrics)}: kill -9 redis-server; treepo up restarted it (pid {restarted})")

    wait_step(metrics, FAULTS["learner"], proc)
    os.kill(find(proc.pid, "treepo.cli", "learner"), signal.SIGKILL)
    faults += 1
    log(f"step {learner_step(metrics)}: kill -9 learner")

    wait_step(metrics, FAULTS["up"], proc)
    children = list(children_of(proc.pid))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    faults += 1
    log(f"step {learner_step(metrics)}: kill -9 treepo up (its roles and Redis get SIGTERM)")
    wait_gone(children)

    resumed = up(config, out, "--resume")
    log("treepo up --resume")
    rc = resumed.wait()
    log(f"the resumed run ended: exit status {rc}, learner step {learner_step(metrics)} of {steps}")
    return faults, rc, learner_step(metrics)


def audit(config: Path) -> dict[str, int]:
    cfg = load_config(str(config))
    out = Path(cfg.run.output_dir)
    with EmbeddedRedis(out / "redis") as server:
        store = TreeStore(server.client(), cfg.run.run_id)
        counters = store.counters()
        stored = store.tree_ids()
        blobs = store.r.mget([store.key(f"tree:{t}") for t in stored]) if stored else []
        waiting = {f[b"tree"].decode() for _, f in store.r.xrange(store.key("stream"))}
    lineage = final_lineage(out / "metrics" / "trained_trees.jsonl")
    trained = Counter(t for _, trees in lineage for t in trees)
    dropped = sum(counters.get(k, 0) for k in ("stale_drops", "uniform_skips", "lost_weights"))
    unexplained = len(set(stored) - set(trained) - waiting) - dropped

    reuses, high = 0, -1
    for line in (out / "metrics" / "trained_trees.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "resumed_at_step" in row:  # the same version again only for the same weights: a checkpoint of the last one
            v = row["policy_version"]
            reuses += v < high or (v == high and row["checkpoint_version"] != v)
            high = max(high, v)
        elif row["published"]:
            reuses += row["policy_version"] <= high
            high = max(high, row["policy_version"])
    rows = read_jsonl(out / "metrics" / "learner.jsonl")
    negative = sum(1 for r in rows if not r["skipped"] and r["tree_version_max"] > r["policy_version"] - 1)
    return {"acked_trees_missing": sum(b is None for b in blobs) + counters.get("trees_stored", 0) - len(stored),
            "trees_trained_twice": sum(1 for n in trained.values() if n > 1),
            "trees_never_trained": unexplained,
            "version_reuses": reuses, "negative_staleness_trained": negative,
            "trees_stored": len(stored), "trees_trained": len(trained), "trees_waiting": len(waiting),
            "trees_dropped_counted": dropped, "restarts_logged": sum(
                (out / "logs" / f"{r}.log").read_text(errors="replace").count("=== treepo up: restart")
                for r in ("actor-0", "actor-1", "buffer", "learner") if (out / "logs" / f"{r}.log").exists())}


def fuzz_decoder(n: int = 100_000, seed: int = 0) -> int:
    """Mutated frames of every message type (bytes flipped, cut, spliced, fields replaced): decodes that raise
    anything but ProtocolError."""
    import msgpack

    from protocol.codec import decode, encode
    from protocol.errors import ProtocolError
    from protocol.messages import (
        Ack,
        ErrorMsg,
        Heartbeat,
        Hello,
        PromptGrant,
        PromptLease,
        PromptRequest,
        Shutdown,
        TensorMeta,
        WeightChunk,
        WeightHeader,
        WeightRoute,
    )
    from tests.factories import example_subtree_msg, frame, unframe

    rng = random.Random(seed)
    seeds = [encode(m) for m in (
        example_subtree_msg(n_leaves=2, seg_tokens=3), Ack(key="k"),
        Hello(sender="a", role="actor", pid=1, relay_address="tcp://h:5557", relay_key="k", avoid="b"),
        Heartbeat(sender="a", relay_address="tcp://h:5557"), Shutdown(sender="a"), ErrorMsg(code="c", message="m"), PromptRequest(actor_id="a"),
        PromptGrant(leases=[PromptLease(tree_id="t", prompt_id="p", prompt="q")]),
        WeightChunk(version=1, index=0, offset=0, nbytes=4, digest="0" * 32),
        WeightHeader(run_id="r", version=1, tensors=[TensorMeta(name="w", dtype="F32", shape=[1], offset=0, nbytes=4)],
                     total_bytes=4, n_chunks=1),
        WeightRoute(address="tcp://127.0.0.1:5557", parent="a", server_key="k"))]
    pool = [None, True, 2, -1, 2**64 - 1, 1.5, "x", b"y", [2], {"a": 1}, [], {},
            msgpack.ExtType(1, bytes([5]) + bytes(16)), msgpack.ExtType(1, bytes(17)), msgpack.ExtType(7, b"")]

    def mutate_fields(wire: bytes) -> bytes:
        env, arena = unframe(wire)

        def walk(obj):
            if isinstance(obj, list) and obj and rng.random() < 0.5:
                i = rng.randrange(len(obj))
                obj[i] = rng.choice(pool) if rng.random() < 0.3 else walk(obj[i])
            elif isinstance(obj, dict) and obj and rng.random() < 0.5:
                k = rng.choice(list(obj))
                obj[k] = rng.choice(pool) if rng.random() < 0.3 else walk(obj[k])
            elif rng.random() < 0.2:
                return rng.choice(pool)
            return obj

        return frame(walk(env), arena)

    crashes = 0
    for i in range(n):
        wire = bytearray(rng.choice(seeds))
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                wire[rng.randrange(len(wire))] = rng.randrange(256)
        elif kind == 1:
            wire = wire[:rng.randrange(len(wire))]
        elif kind == 2:
            other = rng.choice(seeds)
            cut = rng.randrange(min(len(wire), len(other)))
            wire = wire[:cut] + other[cut:]
        else:
            wire = bytearray(mutate_fields(bytes(wire)))
        try:
            decode(bytes(wire))
        except ProtocolError:
            pass
        except Exception:  # noqa: BLE001 - what this counts
            crashes += 1
    return crashes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="learner steps of the run (the faults need 28)")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    config = chaos_config(out, args.steps)
    log(f"run in {out} (logs: {out / 'run' / 'logs'}, {out / 'up.log'})")
    faults, rc, last_step = inject(config, out, args.steps)
    figures = audit(config)
    log("fuzzing the decoder with 100,000 mutated frames")
    crashes = fuzz_decoder()
    result = {"faults_injected": faults, "run_completed": int(rc == 0 and last_step == args.steps),
              "decoder_crashes": crashes, **figures}
    for k, v in result.items():
        print(f"  {k:28s} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
