"""Learner throughput: `Learner.step` (DeepSpeed, 1 process, fp32 CPU, ZeRO-0 and ZeRO-2) beside a plain
PyTorch loop with the same model weights, batch, optimizer, loss and micro-batching.

The model: a tiny random Llama with the SmolLM2 tokenizer (default hidden 128, 2 layers; its 49k-token
LM head dominates the cost). The batch: 2 prompts of 16 tokens, each a binary tree of depth 3 with
16-token segments (8 leaves, 16 rows of 64 tokens, 1024 tokens per step), random tokens and rewards,
micro-batches of 512 tokens. Both
sides do the same work per step: advantages (TreePO + whitening), rows, packing, forward with
entropy, the decoupled PPO loss, backward per micro-batch, grad-norm clip 1.0, AdamW, LR schedule.
Steps alternate between the engines, in a rotating order, after one warm-up step each, so load from
other processes hits all of them alike. Figures are medians over steps, of wall-clock tokens/s and of tokens per
CPU-second of this process (steadier when other jobs share the cores). Prints figures, then one JSON
line; `overhead_zN` = 1 - deepspeed tokens/s / plain tokens/s, `overhead_zN_cpu` the same per
CPU-second (target <= 0.15).

    .venv/bin/python bench/learner.py [--steps 8] [--hidden 128] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from learner.advantage import compute_advantages  # noqa: E402
from learner.batch import build_sequences, pack  # noqa: E402
from learner.engine import Learner, warmup_factor  # noqa: E402
from learner.forward import micro_batch_loss  # noqa: E402
from learner.loss import LossSettings  # noqa: E402
from models import tiny_model  # noqa: E402
from protocol import Leaf, SamplingSettings, Segment, Tree  # noqa: E402
from protocol.config.learner import LearnerConfig  # noqa: E402


def bench_trees(prompts: int = 2, depth: int = 3, seg: int = 16, prompt_len: int = 16, seed: int = 0) -> list[Tree]:
    rng = np.random.default_rng(seed)
    trees = []
    for p in range(prompts):
        segments, frontier, next_id = [], [0], 1
        for d in range(1, depth + 1):
            new = []
            for parent in frontier:
                for _ in range(2):
                    toks = rng.integers(100, 40_000, seg, dtype=np.int32)
                    segments.append(Segment(node_id=next_id, parent_id=parent, depth=d, token_ids=toks,
                                            logprobs=(-10.8 + rng.normal(0, 0.1, seg)).astype(np.float32),
                                            policy_version=0, finish="length" if d < depth else "stop"))
                    new.append(next_id)
                    next_id += 1
            frontier = new
        leaves = [Leaf(node_id=n, reward=float(rng.choice([-1.0, 1.0])), stop_reason="eos") for n in frontier]
        leaves[0].reward, leaves[1].reward = 1.0, -1.0  # never a uniform prompt
        trees.append(Tree.build(tree_id=f"b{p}", prompt_id=f"p{p}", run_id="bench",
                                prompt_token_ids=rng.integers(100, 40_000, prompt_len, dtype=np.int32),
                                sampling=SamplingSettings(segment_tokens=seg, max_depth=depth), segments=segments,
                                leaves=leaves))
    return trees


class PlainLoop:
    """The same training step without DeepSpeed: torch AdamW, clip_grad_norm_, LambdaLR."""

    def __init__(self, cfg: LearnerConfig, model_dir: Path):
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.train()
        self.pad_id = int(self.model.config.pad_token_id or 0)
        self.settings = LossSettings.from_config(cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_factor(cfg.warmup_steps))

    def step(self, trees: list[Tree]) -> dict[str, float]:
        start = time.perf_counter()
        batch, _ = compute_advantages(trees, self.cfg)
        rows = build_sequences(batch)
        total = float(sum(r.loss_mask.sum() for r in rows))
        mbs = pack(rows, self.cfg.micro_batch_tokens, self.pad_id)
        for mb in mbs:
            loss, _ = micro_batch_loss(self.model, mb, self.settings, total)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        tokens = float(sum(mb.real_tokens for mb in mbs))
        return {"tokens": tokens, "tokens_per_s": tokens / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    model_dir = tiny_model(Path(tempfile.mkdtemp(prefix="bench-learner-")) / "model", hidden=args.hidden,
                           layers=args.layers)
    trees = bench_trees(prompts=2)
    base = {"lr": 1e-5, "warmup_steps": 0, "micro_batch_tokens": 512}
    engines = {"plain": PlainLoop(LearnerConfig(**base), model_dir),
               "deepspeed_z0": Learner(LearnerConfig(**base, zero_stage=0), model_dir),
               "deepspeed_z2": Learner(LearnerConfig(**base, zero_stage=2), model_dir)}
    wall: dict[str, list[float]] = {k: [] for k in engines}
    cpu: dict[str, list[float]] = {k: [] for k in engines}
    tokens = 0.0
    names = list(engines)
    for i in range(args.steps + 1):
        for name in names[i % 3:] + names[:i % 3]:  # rotate who goes first each round
            w0, c0 = time.perf_counter(), time.process_time()
            tokens = engines[name].step(trees)["tokens"]
            if i > 0:
                wall[name].append(tokens / (time.perf_counter() - w0))
                cpu[name].append(tokens / (time.process_time() - c0))
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"model: tiny Llama hidden {args.hidden}, {args.layers} layers; {tokens:.0f} tokens/step; "
          f"{args.steps} timed steps each, rotating order; threads {torch.get_num_threads()}")
    for k in engines:
        print(f"  {k:14s} {med[k]:7.0f} tokens/s wall ({', '.join(f'{x:.0f}' for x in wall[k])}); "
              f"{med_cpu[k]:7.0f} tokens per CPU-second ({', '.join(f'{x:.0f}' for x in cpu[k])})")
    result = {"tokens_per_step": tokens, **{f"{k}_tokens_per_s": round(v, 1) for k, v in med.items()},
              **{f"{k}_tokens_per_cpu_s": round(v, 1) for k, v in med_cpu.items()}}
    for z in ("z0", "z2"):
        result[f"overhead_{z}"] = round(1 - med[f"deepspeed_{z}"] / med["plain"], 4)
        result[f"overhead_{z}_cpu"] = round(1 - med_cpu[f"deepspeed_{z}"] / med_cpu["plain"], 4)
    result["target_overhead"] = 0.15
    result["meets_target"] = result["overhead_z0"] <= 0.15 and result["overhead_z0_cpu"] <= 0.15
    print(json.dumps(result))


if __name__ == "__main__":
    main()
