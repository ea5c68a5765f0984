"""Buffer throughput and added latency, beside a raw redis-py pipeline on the same Redis, in one run.

Setup: one embedded redis-server (AOF, appendfsync everysec, as in production), the buffer service as
its own process (`treepo buffer`, retention=trim so memory stays bounded), N actor processes each
sending M realistic trees (bench/codec.py `realistic_tree`: 94 segments, 16 leaves, ~48k tokens) as
one piece each through `BufferClient`, and one consumer process taking batches through `BatchSource`
and acknowledging them. Figures:

- buffer: trees/s and MB/s from the first send until the consumer holds every tree (actors -> ZeroMQ ->
  decode/validate -> Lua store -> stream -> consumer -> ack);
- buffer ingest: trees/s from the first send until the last Ack (the part the raw baseline also does);
- raw: one redis-py client pipelining SET + XADD of the same encoded payloads (32 per round trip), timed
  before and after the buffer run and averaged (the machine is shared);
  `ratio` = buffer trees/s / raw trees/s (target >= 0.5);
- latency: one actor, one piece in flight: send -> Ack (the piece is in Redis) p50/p99 (target
  p99 <= 10 ms), and send -> consumer holds the tree; plus send -> Ack under the full load above;
- CPU per tree of each process kind under the load (the service, Redis, the actors, the consumer).

Each phase starts once Redis runs no AOF rewrite (the previous phase wrote ~300 MB, which schedules
one). The bench's own processes keep freed heap memory as the role processes do
(`protocol.role_process.retain_freed_memory`).

Run: `.venv/bin/python -m bench.buffer [--actors N] [--trees M]`. Prints figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.codec import realistic_tree
from buffer.client import BatchSource, BufferClient
from buffer.redis_server import EmbeddedRedis, free_port, redis_client
from buffer.store import TreeStore
from protocol.codec import encode
from protocol.config.pipeline import PipelineConfig
from protocol.messages import SubtreeMsg
from protocol.role_process import retain_freed_memory

ROOT = Path(__file__).resolve().parents[1]


def message(tree, tree_id: str, actor: str) -> SubtreeMsg:
    tree.tree_id = tree_id
    return SubtreeMsg(key=f"{tree_id}/0", actor_id=actor, seq=0, tree=tree, final=True, n_pieces=1)


def actor_main(cfg_json: str, actor: int, n: int, go, out) -> None:
    retain_freed_memory()  # as every role process does
    cfg = PipelineConfig.model_validate_json(cfg_json)
    tree = realistic_tree()
    tree.run_id = cfg.run.run_id
    lat: list[float] = []
    client = BufferClient(cfg.buffer.ingest_address, f"actor-{actor}", cfg.buffer, on_ack=lambda _k, s: lat.append(s))
    go.wait()
    cpu0 = time.process_time()
    for i in range(n):
        client.send(message(tree, f"a{actor}-{i}", f"actor-{actor}"))
        client.poll(0)
    client.flush(120)
    out.put((lat, time.perf_counter(), time.process_time() - cpu0))
    client.close()


def consumer_main(cfg_json: str, total: int, go, out) -> None:
    retain_freed_memory()
    cfg = PipelineConfig.model_validate_json(cfg_json)
    store = TreeStore.from_config(redis_client(cfg.buffer.redis_url), cfg)
    source = BatchSource.from_config(store, cfg)
    go.wait()
    cpu0 = time.process_time()
    got = 0
    while got < total:
        batch = source.next_batch(min(8, total - got), learner_version=0, timeout_s=1.0)
        source.commit(batch)
        got += len(batch.trees)
    out.put((time.perf_counter(), time.process_time() - cpu0))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_pipeline(server: EmbeddedRedis, payload: bytes, n: int, per_round_trip: int = 32) -> float:
    """Seconds for one client to pipeline SET + XADD of `n` payloads."""
    r = server.client()
    t0 = time.perf_counter()
    for start in range(0, n, per_round_trip):
        with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + per_round_trip)):
                pipe.set(f"raw:tree:{i}", payload)
                pipe.xadd("raw:stream", {"tree": str(i), "v": 12})
            pipe.execute()
    elapsed = time.perf_counter() - t0
    r.delete("raw:stream", *[f"raw:tree:{i}" for i in range(n)])
    return elapsed


def wait_idle(server: EmbeddedRedis, timeout_s: float = 120.0) -> None:
    """Until Redis runs no AOF rewrite (one is due after every ~64 MB phase): each phase starts on a quiet server."""
    r = server.client()
    deadline = time.monotonic() + timeout_s
    while True:
        info = r.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("an AOF rewrite is still running")
        time.sleep(0.05)


def paced_latency(cfg: PipelineConfig, store: TreeStore, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One piece in flight at a time: (send -> Ack, send -> consumer holds it), seconds."""
    tree = realistic_tree()
    tree.run_id = cfg.run.run_id
    client = BufferClient(cfg.buffer.ingest_address, "actor-paced", cfg.buffer)
    source = BatchSource(store, "bench-paced", cfg.buffer.max_staleness)
    acks, ends = [], []
    for i in range(n):
        t0 = time.perf_counter()
        client.send(message(tree, f"paced-{i}", "actor-paced"))
        client.flush(10)
        acks.append(time.perf_counter() - t0)
        batch = source.next_batch(1, learner_version=0, timeout_s=5)
        ends.append(time.perf_counter() - t0)
        source.commit(batch)
    client.close()
    return np.array(acks), np.array(ends)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--trees", type=int, default=400, help="trees per actor")
    ap.add_argument("--paced", type=int, default=200, help="trees of the one-at-a-time latency run")
    args = ap.parse_args()
    total = args.actors * args.trees
    tree = realistic_tree()
    payload = encode(message(tree, "a0-0", "actor-0"))
    mb = len(payload) / 1e6
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        cfg = PipelineConfig.model_validate({
            "run": {"run_id": "bench", "output_dir": tmp},
            "buffer": {"prompt_feed": False, "ingest_address": f"tcp://127.0.0.1:{free_port()}", "redis_url": server.url,
                       "retention": "trim", "max_unconsumed_trees": 256},
        })
        cfg_path = Path(tmp) / "buffer.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        t_raw_before = raw_pipeline(server, payload, total)
        wait_idle(server)

        service = subprocess.Popen([sys.executable, "-m", "treepo.cli", "buffer", "--config", str(cfg_path)],
                                   cwd=ROOT, stderr=subprocess.DEVNULL)
        store = TreeStore.from_config(server.client(), cfg)
        acks, ends = paced_latency(cfg, store, args.paced)
        wait_idle(server)

        ctx = mp.get_context("spawn")
        go, out, done = ctx.Event(), ctx.Queue(), ctx.Queue()
        cfg_json = cfg.model_dump_json()
        procs = [ctx.Process(target=actor_main, args=(cfg_json, a, args.trees, go, out)) for a in range(args.actors)]
        procs.append(ctx.Process(target=consumer_main, args=(cfg_json, total, go, done)))
        for p in procs:
            p.start()
        time.sleep(3.0)  # spawned processes import and connect
        cpu0 = {name: cpu_seconds(pid) for name, pid in (("service", service.pid), ("redis", server.proc.pid))}
        t0 = time.perf_counter()
        go.set()
        results = [out.get(timeout=600) for _ in range(args.actors)]
        loaded = np.concatenate([np.asarray(lat) for lat, _, _ in results])
        t_ingest = max(end for _, end, _ in results) - t0
        t_end, consumer_cpu = done.get(timeout=600)
        t_buf = t_end - t0
        cpu = {name: cpu_seconds(pid) - c for name, c, pid in
               (("service", cpu0["service"], service.pid), ("redis", cpu0["redis"], server.proc.pid))}
        cpu["actors"] = sum(c for _, _, c in results)
        cpu["consumer"] = consumer_cpu
        for p in procs:
            p.join(30)
        service.terminate()
        service.wait(10)
        counters = store.counters()
        wait_idle(server)
        t_raw_after = raw_pipeline(server, payload, total)  # the box is shared: raw is taken before and after
        t_raw = (t_raw_before + t_raw_after) / 2

    raw_rate, buf_rate, ingest_rate = total / t_raw, total / t_buf, total / t_ingest
    pct = lambda a, q: float(np.percentile(a, q) * 1e3)  # noqa: E731
    print(f"payload: {mb:.3f} MB per tree ({len(tree.node_ids)} segments, {tree.unique_token_count()} tokens); "
          f"{args.actors} actors x {args.trees} trees")
    print(f"raw redis-py pipeline  {raw_rate:8.1f} trees/s {raw_rate * mb:8.1f} MB/s  (SET + XADD, 32 per round trip; "
          f"{total / t_raw_before:.1f} before, {total / t_raw_after:.1f} after the buffer run)")
    print(f"buffer end to end      {buf_rate:8.1f} trees/s {buf_rate * mb:8.1f} MB/s  ratio {buf_rate / raw_rate:.2f} "
          f"(target >= 0.5)")
    print(f"buffer ingest (acked)  {ingest_rate:8.1f} trees/s {ingest_rate * mb:8.1f} MB/s  ratio "
          f"{ingest_rate / raw_rate:.2f}  (actors -> Redis, until the last Ack)")
    print(f"paced send->ack        p50 {pct(acks, 50):6.2f} ms  p99 {pct(acks, 99):6.2f} ms  (target p99 <= 10 ms)")
    print(f"paced send->consumer   p50 {pct(ends, 50):6.2f} ms  p99 {pct(ends, 99):6.2f} ms")
    print(f"loaded send->ack       p50 {pct(loaded, 50):6.2f} ms  p99 {pct(loaded, 99):6.2f} ms  "
          f"(window {cfg.buffer.max_unacked_pieces} pieces per actor)")
    print("CPU per tree under load (all share the machine's cores): "
          + ", ".join(f"{name} {c / total * 1e3:.2f} ms" for name, c in cpu.items()))
    print(f"counters: {counters}")
    print(json.dumps({
        "buffer_trees_s": round(buf_rate, 1), "buffer_mb_s": round(buf_rate * mb, 1), "raw_trees_s": round(raw_rate, 1),
        "raw_mb_s": round(raw_rate * mb, 1), "ratio": round(buf_rate / raw_rate, 3),
        "ingest_trees_s": round(ingest_rate, 1), "ingest_ratio": round(ingest_rate / raw_rate, 3),
        "ack_p50_ms": round(pct(acks, 50), 3), "ack_p99_ms": round(pct(acks, 99), 3),
        "e2e_p50_ms": round(pct(ends, 50), 3), "e2e_p99_ms": round(pct(ends, 99), 3),
        "loaded_ack_p50_ms": round(pct(loaded, 50), 3), "loaded_ack_p99_ms": round(pct(loaded, 99), 3),
        **{f"{name}_cpu_ms_per_tree": round(c / total * 1e3, 3) for name, c in cpu.items()}, "payload_mb": round(mb, 4), "actors": args.actors, "trees": total,
    }))


if __name__ == "__main__":
    main()
