"""The weight push and the buffer at cluster-like actor counts, simulated on loopback: N = 4, 16, 64 actors.

Per N, fresh: one embedded redis-server (AOF, as in production), the buffer service as its own process
(`treepo buffer`), the learner's real `ZmqWeightPublisher` in this process (default `weights` config: fan-out 4,
16 MiB chunks, credit window 4) publishing a bf16 state dict with the shapes of SmolLM2-135M (269 MB) every
`--interval` seconds, a consumer thread here taking and acknowledging batches, and N simulated actors spread
over 4 processes as threads. No engine: an actor receives and verifies weights and sends a realistic tree
(`bench/codec.py`, 16 leaves, ~48k tokens) every `--tree-every` seconds through the real `BufferClient`.
As many actors as the tree needs inner nodes are real `ZmqWeightSubscriber`s that relay (started first, so
they take the inner slots); the others are leaves that speak the same protocol but keep no weights: they
check each chunk's digest, acknowledge it and drop it (a leaf that assembled every version would need
N x 269 MB of memory here). A probe process of its own sends one tree at a time (every 0.1 s) and times
send -> Ack: the buffer's latency under the load, without the simulated actors' own GIL waits (their
acknowledgement times are printed too).

Side by side, the same N=64 run without fan-out (`weights.fanout` = 64: the learner feeds every actor, as
the push did before relays). Figures per N: the learner's egress per version / model bytes; time from `publish` until every actor holds the
version (median over the versions every actor got); the largest staleness an actor had when it sent a tree (versions published
minus the version it held); buffer trees/s acknowledged and the send -> Ack p99; Redis memory per stored tree;
CPU seconds per version of each process kind. Targets (issue 18): egress_over_model_n64 <= 2.0, all_hold_s_n64
<= 3 x all_hold_s_n4, ack_p99_ms_n64 <= 20.

Run: `.venv/bin/python -m bench.scale` (about 3 minutes). Prints figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
import zmq

from actors.weight_receiver import ZmqWeightSubscriber
from bench.buffer import cpu_seconds, message
from bench.codec import realistic_tree
from bench.weights import random_state_dict
from buffer.client import BatchSource, BufferClient
from buffer.redis_server import EmbeddedRedis, free_port, redis_client
from buffer.store import TreeStore
from learner.weight_push import ZmqWeightPublisher
from protocol.codec import decode, encode
from protocol.config.pipeline import PipelineConfig
from protocol.messages import Ack, Heartbeat, Hello, Shutdown, WeightChunk, WeightHeader, WeightRoute
from protocol.role_process import retain_freed_memory
from protocol.weight_layout import chunk_digest

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 4


class LeafActor:
    """A leaf of the relay tree that keeps no weights: it verifies and acknowledges every chunk, then drops it."""

    def __init__(self, cfg: PipelineConfig, name: str):
        self.cfg, self.name = cfg, name
        self.ctx = zmq.Context()
        self.learner = self._dealer(cfg.weights.address)
        self.source = self.learner
        self.have = -1
        self.header: WeightHeader | None = None
        self.next_index = 0
        self.bad_digests = 0

    def _dealer(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(address)
        return sock

    def hello(self, sock: zmq.Socket) -> None:
        sock.send(encode(Hello(sender=self.name, role="actor", policy_version=self.have)))

    def beat(self, sock: zmq.Socket) -> None:
        sock.send(encode(Heartbeat(sender=self.name, policy_version=self.have)))

    def step(self, timeout_ms: int, held: list) -> None:
        """Handle what arrived within `timeout_ms`; completed versions go to `held` as (version, time)."""
        poller = zmq.Poller()
        for sock in {self.learner, self.source}:
            poller.register(sock, zmq.POLLIN)
        for sock in dict(poller.poll(timeout_ms)):
            while sock.poll(0):
                frames = sock.recv_multipart(copy=False)
                msg = decode(frames[0].buffer)
                if isinstance(msg, WeightRoute):
                    if self.source is not self.learner:
                        self.source.close()
                    self.source, self.header = (self._dealer(msg.address) if msg.address else self.learner), None
                    if msg.address:
                        self.hello(self.source)
                    return
                if isinstance(msg, Shutdown):  # rejoin by Heartbeat, as the real receiver does
                    self.header = None
                    self.beat(sock)
                elif sock is not self.source:
                    continue
                elif isinstance(msg, WeightHeader):
                    self.header, self.next_index = msg, 0
                elif isinstance(msg, WeightChunk) and self.header is not None and msg.version == self.header.version:
                    if chunk_digest(frames[1].buffer) != msg.digest:
                        self.bad_digests += 1
                    sock.send(encode(Ack(key=f"{msg.version}/{msg.index}")))
                    if msg.index == self.header.n_chunks - 1:
                        self.have, self.header = msg.version, None
                        held.append((msg.version, time.time()))
                        self.beat(self.learner)


def actor_process(cfg_json: str, first: int, count: int, relays: int, tree_every: float, stop, out) -> None:
    retain_freed_memory()  # as every role process does
    cfg = PipelineConfig.model_validate_json(cfg_json)
    tree = realistic_tree()
    tree.run_id = cfg.run.run_id
    results: dict[str, dict] = {}
    lock = threading.Lock()

    def actor(idx: int) -> None:
        name = f"actor-{idx}"
        held: list[tuple[int, float]] = []
        sends: list[tuple[float, int]] = []
        acks: list[float] = []
        client = BufferClient(cfg.buffer.ingest_address, name, cfg.buffer, on_ack=lambda _k, s: acks.append(s))
        relay = idx < relays
        sub = ZmqWeightSubscriber(cfg.weights, name) if relay else None
        leaf = None if relay else LeafActor(cfg, name)
        if leaf is not None:
            leaf.hello(leaf.learner)
        next_tree, next_beat, n = time.monotonic() + tree_every * (idx % 16) / 16, 0.0, 0
        while not stop.is_set():
            client.poll(0.02)  # waits on the buffer's socket: an Ack is timed when it arrives
            if sub is not None:
                got = sub.poll_latest()
                if got is not None:
                    held.append((got[0], time.time()))
            else:
                leaf.step(0, held)
                if time.monotonic() > next_beat:
                    next_beat = time.monotonic() + cfg.weights.heartbeat_s
                    leaf.beat(leaf.learner)
                    if leaf.source is not leaf.learner and leaf.header is None:
                        leaf.beat(leaf.source)
            if time.monotonic() >= next_tree:
                next_tree += tree_every
                client.send(message(tree, f"{name}-{n}", name))
                sends.append((time.time(), held[-1][0] if held else -1))
                n += 1
        client.flush(30)
        client.close()
        bad = sub.bad_digests if sub is not None else leaf.bad_digests
        if sub is not None:
            sub.close()
        with lock:
            results[name] = {"held": held, "sends": sends, "acks": acks, "bad_digests": bad}

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(first, first + count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((results, resource.getrusage(resource.RUSAGE_SELF)))


def probe_process(cfg_json: str, every: float, stop, out) -> None:
    """One piece in flight at a time, from a process of its own: the buffer's send -> Ack under the load."""
    retain_freed_memory()
    cfg = PipelineConfig.model_validate_json(cfg_json)
    tree = realistic_tree()
    tree.run_id = cfg.run.run_id
    client = BufferClient(cfg.buffer.ingest_address, "probe", cfg.buffer)
    lat, i = [], 0
    while not stop.is_set():
        t0 = time.perf_counter()
        client.send(message(tree, f"probe-{i}", "probe"))
        client.flush(30)
        lat.append(time.perf_counter() - t0)
        i += 1
        time.sleep(max(0.0, every - (time.perf_counter() - t0)))
    client.close()
    out.put(lat)


def scenario(n: int, versions: int, interval: float, tree_every: float, fanout: int | None = None) -> dict:
    """One run with `n` actors; `fanout` overrides the config's (n: the learner feeds every actor itself)."""
    sd = random_state_dict("135m")
    model_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        cfg = PipelineConfig.model_validate({
            "run": {"run_id": "scale", "output_dir": tmp},
            "buffer": {"prompt_feed": False, "ingest_address": f"tcp://127.0.0.1:{free_port()}",
                       "redis_url": server.url, "retention": "keep_all"},
            "weights": {"address": f"tcp://127.0.0.1:{free_port()}", **({"fanout": fanout} if fanout else {})},
        })
        fanout = cfg.weights.fanout
        cfg_path = Path(tmp) / "buffer.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        service = subprocess.Popen([sys.executable, "-m", "treepo.cli", "buffer", "--config", str(cfg_path)],
                                   cwd=ROOT, stderr=subprocess.DEVNULL)
        redis = server.client()
        memory0 = redis.info("memory")["used_memory"]
        pub = ZmqWeightPublisher(cfg.weights, run_id="scale")
        store = TreeStore.from_config(redis_client(cfg.buffer.redis_url), cfg)
        source = BatchSource.from_config(store, cfg)
        ctx = mp.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        relays = max(1, -(-(n - fanout) // fanout))  # inner nodes enough for every actor: fanout + relays x fanout >= n
        half = PROCESSES // 2  # relays in the first processes, started (and joined) first, then the leaves
        ranges = [(relays * i // half, relays * (i + 1) // half) for i in range(half)]
        ranges += [(relays + (n - relays) * i // half, relays + (n - relays) * (i + 1) // half) for i in range(half)]
        procs = [ctx.Process(target=actor_process, args=(cfg.model_dump_json(), lo, hi - lo, relays, tree_every, stop,
                                                         out)) for lo, hi in ranges if hi > lo]
        deadline = time.monotonic() + 120
        for group, joined in ((procs[:half], relays), (procs[half:], n)):
            for p in group:
                p.start()
            while len(pub.peers()) < joined:
                assert time.monotonic() < deadline, f"{len(pub.peers())} of {joined} actors joined"
                time.sleep(0.1)
        probe_out = ctx.Queue()
        probe = ctx.Process(target=probe_process, args=(cfg.model_dump_json(), 0.1, stop, probe_out))
        probe.start()
        consumed, consuming, latest = [0], threading.Event(), [0]

        def consume() -> None:  # as the learner: batches within the staleness bound of the newest version
            while not consuming.is_set():
                batch = source.next_batch(8, learner_version=latest[0], timeout_s=0.5)
                source.commit(batch)
                consumed[0] += len(batch.trees)
        consumer = threading.Thread(target=consume)
        consumer.start()
        pids = {"buffer": service.pid, "redis": server.proc.pid}
        cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
        learner0 = resource.getrusage(resource.RUSAGE_SELF)
        published: list[tuple[int, float]] = []
        t_start = time.time()
        for version in range(1, versions + 1):
            t0 = time.time()
            pub.publish(version, sd)
            published.append((version, t0))
            latest[0] = version
            if version < versions:
                time.sleep(max(0.0, interval - (time.time() - t0)))
        pub.wait_delivered(versions, timeout_s=300, min_peers=n)
        routes = pub.routes()
        time.sleep(tree_every)
        stop.set()
        results: dict[str, dict] = {}
        usage = []
        for _ in procs:
            r, u = out.get(timeout=300)
            results.update(r)
            usage.append(u)
        probe_lat = np.asarray(probe_out.get(timeout=60))
        for p in [*procs, probe]:
            p.join(60)
        t_end = time.time()
        consuming.set()
        consumer.join()
        learner1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = {k: cpu_seconds(pid) - cpu0[k] for k, pid in pids.items()}
        cpu["learner+consumer"] = (learner1.ru_utime + learner1.ru_stime) - (learner0.ru_utime + learner0.ru_stime)
        cpu["actors"] = sum(u.ru_utime + u.ru_stime for u in usage)  # whole life of the actor processes
        stored = sum(1 for _ in redis.scan_iter(match=store.key("tree:*"), count=1000))
        memory = redis.info("memory")["used_memory"] - memory0
        egress = pub.bytes_sent
        pub.close()
        service.terminate()
        service.wait(10)

    holds = []
    for version, t0 in published:
        times = [t for r in results.values() for v, t in r["held"] if v == version]
        if len(times) == n:  # a version every actor got (a slow one may have skipped to a newer version)
            holds.append(max(times) - t0)
    staleness = max((sum(1 for _, tp in published if tp <= ts) - held for r in results.values()
                     for ts, held in r["sends"] if held >= 1), default=0)
    acks = np.concatenate([np.asarray(r["acks"]) for r in results.values()])
    trees = len(acks)
    depth = {}
    for name in routes:
        d, k = 1, name
        while routes[k] is not None:
            d, k = d + 1, routes[k]
        depth[name] = d
    return {
        "n": n, "model_mb": model_bytes / 1e6, "versions": versions,
        "egress_over_model": egress / (versions * model_bytes),
        "all_hold_s": float(np.median(holds)) if holds else float("nan"), "versions_all_held": len(holds),
        "max_staleness": staleness, "tree_depth": max(depth.values()),
        "direct": sum(p is None for p in routes.values()),
        "buffer_trees_s": (trees + len(probe_lat)) / (t_end - t_start),
        "ack_p99_ms": float(np.percentile(probe_lat, 99) * 1e3), "ack_p50_ms": float(np.percentile(probe_lat, 50) * 1e3),
        "actor_ack_p99_ms": float(np.percentile(acks, 99) * 1e3), "trees": trees + len(probe_lat),
        "consumed": consumed[0], "relays": relays,
        "redis_bytes_per_tree": memory / max(1, stored),
        "bad_digests": sum(r["bad_digests"] for r in results.values()),
        **{f"cpu_s_per_version_{k}": c / versions for k, c in cpu.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--versions", type=int, default=4)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between two published versions")
    ap.add_argument("--tree-every", type=float, default=4.0, help="seconds between two trees of one actor")
    args = ap.parse_args()
    rows = {}
    last = max(args.actors)
    runs = [(n, n, None) for n in args.actors] + [("no_fanout", last, last)]  # the push before relays, side by side
    for key, n, fanout in runs:
        row = rows[key] = scenario(n, args.versions, args.interval, args.tree_every, fanout)
        print(f"N={n:3d}{' without fan-out (the learner feeds all)' if fanout else ''}: egress/model {row['egress_over_model']:.2f} per version, all hold in "
              f"{row['all_hold_s']:.2f} s (median of {row['versions_all_held']}), tree depth {row['tree_depth']}, "
              f"{row['direct']} fed by the learner, max staleness {row['max_staleness']}; buffer "
              f"{row['buffer_trees_s']:.1f} trees/s, probe send->ack p50 {row['ack_p50_ms']:.1f} ms p99 "
              f"{row['ack_p99_ms']:.1f} ms (actors saw p99 {row['actor_ack_p99_ms']:.1f} ms); "
              f"Redis {row['redis_bytes_per_tree'] / 1e3:.0f} kB/tree; bad digests {row['bad_digests']}; CPU s per "
              "version: " + ", ".join(f"{k[len('cpu_s_per_version_'):]} {v:.2f}" for k, v in row.items()
                                     if k.startswith("cpu_s_per_version_")), flush=True)
    first = min(args.actors)
    summary = {f"{k}_{'n' + str(key) if isinstance(key, int) else key}": round(v, 3) if isinstance(v, float) else v
               for key, row in rows.items() for k, v in row.items() if k not in ("n", "model_mb", "versions")}
    print(json.dumps({
        f"egress_over_model_n{last}": round(rows[last]["egress_over_model"], 3),
        f"all_hold_s_n{last}": round(rows[last]["all_hold_s"], 3), f"all_hold_s_n{first}": round(rows[first]["all_hold_s"], 3),
        f"buffer_trees_s_n{last}": round(rows[last]["buffer_trees_s"], 2),
        f"ack_p99_ms_n{last}": round(rows[last]["ack_p99_ms"], 2),
        "redis_bytes_per_tree": round(rows[last]["redis_bytes_per_tree"]), **summary,
    }))


if __name__ == "__main__":
    main()
