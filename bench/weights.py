"""Weight push bandwidth: learner -> 1 and 4 actor processes on loopback, beside raw ZeroMQ of the same bytes.

Models: random bf16 state dicts with the real shapes of SmolLM2-135M (134.5M parameters, 269 MB)
and Qwen2.5-0.5B (494M parameters, 988 MB), tied embeddings. bf16 is what the actors' engines
load, so it is the size that travels.

weights: from `ZmqWeightPublisher.publish` (which copies the state dict into a flat buffer, streaming
each chunk as soon as its bytes are in, and returns once the copy is done; its thread sends each chunk
as a small WeightChunk frame plus a zero-copy payload frame; chunks are cut at tensor boundaries)
until every actor has assembled the version and acknowledged the last chunk (`wait_delivered`); the
actors are `ZmqWeightSubscriber`s in separate processes, which view the tensors inside a chunk in its
received frame and copy only the tensors larger than a chunk. Each actor polls for a new version
every 10 ms, as an actor loop does between tree steps. raw: the same bytes in the same chunk sizes,
sent ROUTER -> DEALER with zero-copy frames, receivers only count bytes (no codec, no credits, no
assembly). Raw and weight pushes alternate round by round to the same actor processes, so both see
the same machine load; the first two rounds warm memory up (the publisher double-buffers: version 3
is the first to refill version 1's memory).
Effective bandwidth = actors * bytes / time; ratio = weights / raw (best of rounds each, and the
median of the per-round ratios). CPU s per GB: CPU time (all threads, ZeroMQ's I/O threads included)
of the learner process and of the actor processes during a push, per GB delivered (median of rounds);
with every process busy on 2 cores, the ratio cannot beat raw CPU / weights CPU. Page faults: the
actors' minor faults per GB (fresh pages cost about as much as the copy on a small VM). apply: in
actor 0, `poll_latest()` plus copying the state dict into preallocated parameters of the same shapes
(what a transformers engine's load_state_dict does); `assemble` is the time to build the state dict
once the last chunk is in. Prints figures, then one JSON line (the last line).

Run: .venv/bin/python -m bench.weights   (1.5 to 3.5 minutes on 2 cores, depending on other load);
other chunking: TREEPO_WEIGHTS__CHUNK_BYTES=4194304 TREEPO_WEIGHTS__WINDOW=8 .venv/bin/python -m bench.weights
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import time

import torch
import zmq

from actors.weight_receiver import ZmqWeightSubscriber
from learner.weight_push import ZmqWeightPublisher
from protocol.config.weights import WeightsConfig
from protocol.role_process import retain_freed_memory

# the pipeline config's env overrides choose the chunking (spawned actor processes inherit them)
BENCH_CFG = WeightsConfig(**{f: int(os.environ[f"TREEPO_WEIGHTS__{f.upper()}"]) for f in ("chunk_bytes", "window")
                             if f"TREEPO_WEIGHTS__{f.upper()}" in os.environ})
CHUNK_BYTES = BENCH_CFG.chunk_bytes
MODELS = {  # vocab, hidden, intermediate, layers, kv_dim, qkv_bias
    "135m": (49152, 576, 1536, 30, 192, False),
    "0.5b": (151936, 896, 4864, 24, 128, True),
}


def shapes(name: str) -> dict[str, tuple[int, ...]]:
    vocab, h, inter, layers, kv, bias = MODELS[name]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h)}
        if bias:
            out |= {p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,)}
        out |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,)}
    out["model.norm.weight"] = (h,)
    return out


def random_state_dict(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g, dtype=torch.bfloat16) for k, s in shapes(name).items()}


# --- actor processes ---------------------------------------------------------------------------------
def actor_main(idx: int, conn) -> None:
    """One actor: per scenario a weight subscriber and a raw DEALER; the learner says which push comes next."""
    retain_freed_memory()  # as every role process does
    torch.set_num_threads(1)
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            return
        _, weights_address, raw_address, model, total = cmd
        params = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in shapes(model).items()} if idx == 0 else {}
        sub = ZmqWeightSubscriber(BENCH_CFG.model_copy(update={"address": weights_address}), f"actor-{idx}")
        ctx = zmq.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.rcvhwm = 0
        raw.connect(raw_address)
        raw.send(b"ready")
        conn.send("ready")
        while (step := conn.recv())[0] != "end":
            cpu0, faults0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            if step[0] == "raw":  # count the bytes of one raw push
                got_bytes = 0
                while got_bytes < total:
                    got_bytes += len(raw.recv(copy=False))
                raw.send(b"done")
                conn.send({"cpu_s": time.process_time() - cpu0,
                           "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0})
                continue
            got = None  # ("weights", version): poll between "tree steps", then apply
            while got is None:
                time.sleep(0.01)  # one "tree step" (a real one takes tens of ms or more)
                t0 = time.perf_counter()
                got = sub.poll_latest()
            t_poll = time.perf_counter() - t0
            assert got[0] == step[1], (got[0], step[1])
            cpu_receive = time.process_time() - cpu0  # this process, all threads (ZeroMQ's I/O thread included)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
            t0 = time.perf_counter()
            for k, t in (got[1].items() if idx == 0 else ()):
                params[k].copy_(t)
            conn.send({"poll_s": t_poll, "copy_s": time.perf_counter() - t0, "assemble_s": sub.assemble_s,
                       "cpu_s": cpu_receive, "faults": faults})
            del got
        sub.close()
        raw.close(linger=0)
        ctx.term()
        del params
        conn.send("closed")


# --- learner side ------------------------------------------------------------------------------------
def scenario(conns, sd, chunks: list[memoryview], total: int, model: str, rounds: int) -> dict[str, list]:
    """`rounds` pairs of pushes of the same bytes to len(conns) actors: raw ZeroMQ, then a weight version."""
    pub = ZmqWeightPublisher(BENCH_CFG.model_copy(update={"address": "tcp://127.0.0.1:*"}))
    ctx = zmq.Context()
    raw = ctx.socket(zmq.ROUTER)
    raw.linger = 0
    raw.router_mandatory = True  # block rather than drop when a receiver's queue is full
    raw.sndhwm = 0
    raw_port = raw.bind_to_random_port("tcp://127.0.0.1")
    for c in conns:
        c.send(("start", pub.address, f"tcp://127.0.0.1:{raw_port}", model, total))
    for c in conns:
        assert c.recv() == "ready"
    raw_peers = [raw.recv_multipart()[0] for _ in conns]
    deadline = time.monotonic() + 30
    while len(pub.peers()) < len(conns):
        assert time.monotonic() < deadline, "actors did not join"
        time.sleep(0.005)
    out: dict[str, list] = {"raw_s": [], "push_s": [], "publish_s": [], "apply": [], "raw_cpu": [], "push_cpu": [],
                            "raw_faults": [], "push_faults": []}
    for version in range(1, rounds + 1):
        for c in conns:
            c.send(("raw",))
        t0, cpu0 = time.perf_counter(), time.process_time()
        for chunk in chunks:
            for peer in raw_peers:
                raw.send_multipart([peer, chunk], copy=False)
        for _ in conns:
            raw.recv_multipart()
        out["raw_s"].append(time.perf_counter() - t0)
        replies = [c.recv() for c in conns]
        out["raw_cpu"].append((time.process_time() - cpu0, sum(r["cpu_s"] for r in replies)))
        out["raw_faults"].append(sum(r["faults"] for r in replies))
        for c in conns:
            c.send(("weights", version))
        t0, cpu0 = time.perf_counter(), time.process_time()
        pub.publish(version, sd)
        out["publish_s"].append(time.perf_counter() - t0)
        pub.wait_delivered(version, timeout_s=120, min_peers=len(conns))
        out["push_s"].append(time.perf_counter() - t0)
        learner_cpu = time.process_time() - cpu0
        replies = [c.recv() for c in conns]
        out["apply"].append(replies[0])
        out["push_cpu"].append((learner_cpu, sum(r["cpu_s"] for r in replies)))
        out["push_faults"].append(sum(r["faults"] for r in replies))
    assert not pub.failures, list(pub.failures)
    for c in conns:
        c.send(("end",))
    for c in conns:
        assert c.recv() == "closed"
    pub.close()
    raw.close()
    ctx.term()
    return {k: v[2:] for k, v in out.items()}  # the first two rounds warm memory up


def main() -> None:
    retain_freed_memory()
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    spawn = mp.get_context("spawn")
    pipes = [spawn.Pipe() for _ in range(4)]
    procs = [spawn.Process(target=actor_main, args=(i, child), daemon=True) for i, (_, child) in enumerate(pipes)]
    for p in procs:
        p.start()
    conns = [parent for parent, _ in pipes]
    results: dict[str, dict] = {}
    apply: dict[str, dict] = {}
    for model, rounds in (("135m", 8), ("0.5b", 6)):
        sd = random_state_dict(model)
        total = sum(t.numel() * t.element_size() for t in sd.values())
        flat = memoryview(torch.cat([t.reshape(-1).view(torch.uint8) for t in sd.values()]).numpy())
        chunks = [flat[i:i + CHUNK_BYTES] for i in range(0, total, CHUNK_BYTES)]
        n_params = sum(t.numel() for t in sd.values())
        print(f"{model}: {n_params / 1e6:.1f}M params, bf16, {total / 1e6:.0f} MB, {len(chunks)} chunks of "
              f"{CHUNK_BYTES / 2**20:g} MiB; {rounds} rounds of (raw push, weight version), the first two warm up")
        for n in (1, 4):
            r = scenario(conns[:n], sd, chunks, total, model, rounds)
            if n == 1:
                apply[model] = min(r["apply"], key=lambda a: a["poll_s"] + a["copy_s"])
            raw_bw, push_bw = n * total / min(r["raw_s"]) / 1e9, n * total / min(r["push_s"]) / 1e9
            paired = statistics.median(rs / ps for rs, ps in zip(r["raw_s"], r["push_s"], strict=True))
            gb = n * total / 1e9  # CPU seconds per GB delivered, learner and actors (median of rounds)
            cpu = {f"{kind}_{side}_cpu_s_per_gb": round(statistics.median(c[i] for c in r[f"{kind}_cpu"]) / gb, 3)
                   for kind in ("raw", "push") for i, side in enumerate(("learner", "actors"))}
            cpu |= {f"{kind}_actor_faults_per_gb": round(statistics.median(r[f"{kind}_faults"]) / gb)
                    for kind in ("raw", "push")}
            results[f"{model}_x{n}"] = {
                "weights_gb_s": round(push_bw, 3), "raw_gb_s": round(raw_bw, 3), "ratio": round(push_bw / raw_bw, 3),
                "ratio_paired_median": round(paired, 3), "push_s": round(min(r["push_s"]), 3),
                "raw_s": round(min(r["raw_s"]), 3), "publish_s": round(statistics.median(r["publish_s"]), 3), **cpu}
            print(f"  {n} actor(s): weights {push_bw:6.2f} GB/s ({min(r['push_s']):.3f} s; publish() returns after "
                  f"{statistics.median(r['publish_s']):.3f} s)   raw zmq {raw_bw:6.2f} GB/s ({min(r['raw_s']):.3f} s)   "
                  f"ratio best/best {push_bw / raw_bw:.2f}, median of paired rounds {paired:.2f}")
            print(f"      CPU s per GB delivered: weights learner {cpu['push_learner_cpu_s_per_gb']:.3f} + actors "
                  f"{cpu['push_actors_cpu_s_per_gb']:.3f}   raw learner {cpu['raw_learner_cpu_s_per_gb']:.3f} + actors "
                  f"{cpu['raw_actors_cpu_s_per_gb']:.3f}; actors' page faults per GB: weights "
                  f"{cpu['push_actor_faults_per_gb']}, raw {cpu['raw_actor_faults_per_gb']}")
        a = apply[model]
        print(f"  actor apply: poll_latest {a['poll_s'] * 1e6:.0f} us, assemble (views) {a['assemble_s'] * 1e3:.2f} ms, "
              f"copy into model params {a['copy_s']:.3f} s")
        del sd, flat, chunks
    for c in conns:
        c.send(("quit",))
    for p in procs:
        p.join(timeout=30)
    min_ratio = min(r["ratio"] for r in results.values())
    load = os.getloadavg()[0]
    print(f"min ratio weights/raw {min_ratio:.2f} (target >= 0.70); total {time.perf_counter() - t_start:.0f} s; "
          f"load average {load_start:.1f} at start, {load:.1f} at end (2 cores: above ~1, other jobs shared them)")
    print(json.dumps({"dtype": "bf16", "chunk_mib": CHUNK_BYTES / 2**20, "window": BENCH_CFG.window, **results,
                      "apply_s": {m: round(a["poll_s"] + a["copy_s"], 4) for m, a in apply.items()},
                      "assemble_ms": {m: round(a["assemble_s"] * 1e3, 3) for m, a in apply.items()},
                      "min_ratio": min_ratio, "target_met": min_ratio >= 0.7,
                      "load_avg": [round(load_start, 2), round(load, 2)]}))


if __name__ == "__main__":
    main()
