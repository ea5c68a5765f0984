"""Learner throughput, three comparisons in one run, each side by side on the same batches:

1. packing (`learner.packing`): tree-packed training (each tree's unique tokens forwarded once) against
   per-leaf rows, `Learner.step` on DEFAULT learner settings (ZeRO-0, fp32; micro_batch_tokens 4096 as both
   CPU presets set it: at the default 8192 the rows side of the long shape needs more than this box's 24 GiB
   beside the other runs) for three shapes, 4 prompts per step:
   - tiny: cpu-tiny's model (random Llama, hidden 128, 2 layers) and tree shape (w=8, l=8, d=4);
   - smollm2_short: SmolLM2-135M-Instruct, w=8, l=8, d=4;
   - smollm2_long: SmolLM2-135M-Instruct, w=16, l=32, d=4.
   The trees are grown by the real TreePO sampler (`actors.tree_sampler`, budgeted branching and
   fallback) on reasoning-gym `basic_arithmetic` prompts under the SmolLM2 chat template, from an engine
   that samples random tokens and ends a segment early (EOS) with probability `--stop-p`, the leaves
   scored 0/1 at random. Reported: tokens forwarded per step (rows: every row's tokens; tree: unique
   tokens), the per-leaf-row tokens, step time (median of the timed steps, the two sides alternating, each
   after one warm-up step), and the peak RSS of a fresh process that loads the learner and runs 2 steps
   of one side (`--probe`), over its RSS before the first step.
2. DeepSpeed overhead: `Learner.step` (ZeRO-0 and ZeRO-2) beside a plain PyTorch loop with the same
   weights, batch, optimizer, loss and micro-batching (rows, the tiny model, 2 binary trees of depth 3
   with 16-token segments, micro-batches of 512 tokens), steps rotating, medians of wall-clock tokens/s
   and of tokens per CPU-second; `overhead_zN` = 1 - deepspeed tokens/s / plain tokens/s (target <= 0.15).
3. PPO mini-batches (`learner.mini_batches_per_batch`): the smollm2_short shape's batches trained as one
   update and as 4 mini-batches (one tree each; the proximal log-probs of one no-grad pass first),
   tree-packed, the two sides alternating, medians: `minibatch4_over_1_step_time` (target <= 1.5) and
   `proximal_pass_fraction`, the proximal pass's share of the 4-update step (target <= 0.35).

Prints figures, then one JSON line with flat keys (`tiny_forwarded_over_unique`,
`tiny_packed_over_rows_step_time`, `smollm2_short_packed_over_rows_step_time`,
`smollm2_long_packed_over_rows_step_time`, `smollm2_long_forwarded_over_unique`, `packed_peak_rss_over_rows`
(the largest over the shapes), `overhead_z0`, `minibatch4_over_1_step_time`, `proximal_pass_fraction`, ...).

    .venv/bin/python bench/learner.py [--steps 3] [--shapes tiny,smollm2_short,smollm2_long] [--no-overhead]
                                      [--no-minibatch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.engine import BatchEngine, EngineCounters, SegmentRequest, SegmentResult  # noqa: E402
from actors.tree_sampler import TreePOSampler  # noqa: E402
from learner.advantage import compute_advantages  # noqa: E402
from learner.batch import build_sequences, pack  # noqa: E402
from learner.engine import Learner, warmup_factor  # noqa: E402
from learner.forward import micro_batch_loss  # noqa: E402
from learner.loss import LossSettings  # noqa: E402
from protocol import Leaf, SamplingSettings, Segment, Tree  # noqa: E402
from protocol.config.learner import LearnerConfig  # noqa: E402
from protocol.config.prompts import PromptsConfig  # noqa: E402
from protocol.config.rollout import RolloutConfig  # noqa: E402
from treepo.models import smollm2_model, tiny_model  # noqa: E402
from treepo.prompts import load_prompts  # noqa: E402

# shape: model, w, l, d, learner settings beyond the defaults
SHAPES = {"tiny": ("tiny", 8, 8, 4, {"micro_batch_tokens": 4096}),  # configs/cpu-tiny.yaml
          "smollm2_short": ("smollm2", 8, 8, 4, {"micro_batch_tokens": 4096}),  # configs/cpu-smollm2.yaml
          "smollm2_long": ("smollm2", 16, 32, 4, {"micro_batch_tokens": 4096})}
PROMPTS_PER_STEP = 4


class RandomEngine(BatchEngine):
    """Random tokens of the model's vocabulary; a segment ends early (EOS, at a random length) with
    probability `stop_p`. Enough to give the real sampler the shapes of real trees."""

    def __init__(self, vocab: int, eos: int, stop_p: float, seed: int = 0):
        super().__init__()
        self.vocab, self.eos, self.stop_p = vocab, eos, stop_p
        self.rng = np.random.default_rng(seed)
        self.eos_token_ids = frozenset({eos})
        self.policy_version = 0
        self.counters = EngineCounters()

    def generate_batch(self, requests: list[SegmentRequest]) -> list[SegmentResult]:
        out = []
        for r in requests:
            stop = self.rng.random() < self.stop_p
            n = int(self.rng.integers(1, r.max_new_tokens + 1)) if stop else r.max_new_tokens
            ids = self.rng.integers(100, self.vocab, n).tolist()
            if stop:
                ids[-1] = self.eos
            out.append(SegmentResult(token_ids=ids, logprobs=(-2.0 + self.rng.normal(0, 0.3, n)).tolist(),
                                     finish="stop" if stop else "length", prompt_tokens=len(r.token_ids),
                                     cached_tokens=0, policy_version=0))
        return out

    def load_weights(self, state_dict, version: int) -> None:
        self.policy_version = version

    def decode(self, token_ids) -> str:
        return ""

    def clear_prefix_cache(self) -> None:
        """It caches nothing."""

    def close(self) -> None:
        """Nothing to release."""


def sampled_trees(model_dir: Path, width: int, seg: int, depth: int, steps: int, stop_p: float) -> list[list[Tree]]:
    """`steps` batches of PROMPTS_PER_STEP TreePO trees grown by the real sampler on real prompts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = load_prompts(PromptsConfig(source="reasoning_gym", datasets=["basic_arithmetic"],
                                         size=steps * PROMPTS_PER_STEP), tok)
    rng = np.random.default_rng(0)
    sampler = TreePOSampler(RandomEngine(len(tok), tok.eos_token_id, stop_p),
                            RolloutConfig(mode="treepo", width=width, segment_tokens=seg, max_depth=depth),
                            scorer=lambda item, text, n: (float(rng.random() < 0.5), {}), run_id="bench")
    return [sampler.sample(prompts[i * PROMPTS_PER_STEP:(i + 1) * PROMPTS_PER_STEP]) for i in range(steps)]


def shape_model(kind: str, root: Path) -> Path:
    return tiny_model(root / "tiny") if kind == "tiny" else smollm2_model(root / "smollm2")


def probe_peak_rss(shape: str, packing: str, model_root: str, stop_p: float) -> None:
    """(--probe) In a fresh process: load one side's learner, run 2 steps, print its peak RSS over the RSS
    before the first step, in MiB (one JSON line)."""
    kind, w, seg, depth, extra = SHAPES[shape]
    model_dir = shape_model(kind, Path(model_root))
    batches = sampled_trees(model_dir, w, seg, depth, 2, stop_p)
    learner = Learner(LearnerConfig(packing=packing, lr=1e-6, warmup_steps=0, **extra), model_dir)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS (Linux >= 4.0)
        f.write("5")
    before = _status_mib("VmRSS")
    for trees in batches:
        learner.step(trees)
    print(json.dumps({"peak_rss_mib": _status_mib("VmHWM") - before}))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _peak_rss(shape: str, packing: str, model_root: Path, stop_p: float) -> float:
    env = {k: v for k, v in os.environ.items()  # not this process's process group
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, __file__, "--probe", shape, packing, str(model_root), "--stop-p",
                          str(stop_p)], check=True, capture_output=True, text=True, env=env).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_rss_mib"])


def packing_bench(shape: str, steps: int, model_root: Path, stop_p: float) -> dict[str, float]:
    """Rows vs tree on the same batches, steps alternating; step-time medians, tokens, peak RSS."""
    kind, w, seg, depth, extra = SHAPES[shape]
    model_dir = shape_model(kind, model_root)
    rss = {p: _peak_rss(shape, p, model_root, stop_p) for p in ("rows", "tree")}  # before this process holds learners
    batches = sampled_trees(model_dir, w, seg, depth, steps + 1, stop_p)
    learners = {p: Learner(LearnerConfig(packing=p, lr=1e-6, warmup_steps=0, **extra), model_dir)
                for p in ("rows", "tree")}
    times: dict[str, list[float]] = {p: [] for p in learners}
    tokens: dict[str, list[float]] = {p: [] for p in learners}
    heads: dict[str, list[float]] = {p: [] for p in learners}  # positions through the LM head
    for i, trees in enumerate(batches):
        for p in (("rows", "tree") if i % 2 else ("tree", "rows")):
            m = learners[p].step(trees)
            if i > 0:
                times[p].append(m["step_time_s"])
                tokens[p].append(m["tokens"])
                heads[p].append(m["head_positions"])
    unique = sum(t.unique_token_count() for b in batches[1:] for t in b)
    rows_tokens, tree_tokens = sum(tokens["rows"]), sum(tokens["tree"])
    t_rows, t_tree = statistics.median(times["rows"]), statistics.median(times["tree"])
    out = {"forwarded_over_unique": tree_tokens / unique, "rows_forwarded_over_unique": rows_tokens / unique,
           "rows_step_s": t_rows, "packed_step_s": t_tree, "packed_over_rows_step_time": t_tree / t_rows,
           "rows_tokens_per_step": rows_tokens / steps, "packed_tokens_per_step": tree_tokens / steps,
           "packed_over_rows_head_positions": sum(heads["tree"]) / sum(heads["rows"]),
           "rows_peak_rss_mib": rss["rows"], "packed_peak_rss_mib": rss["tree"],
           "packed_peak_rss_over_rows": rss["tree"] / rss["rows"]}
    print(f"{shape}: {kind}, w={w} l={seg} d={depth}, {PROMPTS_PER_STEP} trees/step; tokens forwarded per step "
          f"rows {out['rows_tokens_per_step']:.0f} / packed {out['packed_tokens_per_step']:.0f} "
          f"(rows forward {out['rows_forwarded_over_unique']:.2f}x the unique tokens, packed "
          f"{out['forwarded_over_unique']:.2f}x; LM-head positions packed/rows "
          f"{out['packed_over_rows_head_positions']:.2f}); step time rows {t_rows:.2f} s "
          f"({', '.join(f'{x:.2f}' for x in times['rows'])}) / packed {t_tree:.2f} s "
          f"({', '.join(f'{x:.2f}' for x in times['tree'])}) = {out['packed_over_rows_step_time']:.2f}; peak RSS "
          f"rows {rss['rows']:.0f} MiB / packed {rss['tree']:.0f} MiB", flush=True)
    return out


def minibatch_bench(steps: int, model_root: Path, stop_p: float, minis: int = 4) -> dict[str, float]:
    """One update per batch against `minis` mini-batches on the same batches (smollm2_short's shape)."""
    kind, w, seg, depth, extra = SHAPES["smollm2_short"]
    model_dir = shape_model(kind, model_root)
    batches = sampled_trees(model_dir, w, seg, depth, steps + 1, stop_p)
    learners = {k: Learner(LearnerConfig(mini_batches_per_batch=k, lr=1e-6, warmup_steps=0, **extra), model_dir)
                for k in (1, minis)}
    times: dict[int, list[float]] = {k: [] for k in learners}
    proximal: list[float] = []
    for i, trees in enumerate(batches):
        for k in ((1, minis) if i % 2 else (minis, 1)):
            m = learners[k].step(trees)
            if i > 0:
                times[k].append(m["step_time_s"])
                if k == minis:
                    proximal.append(m["proximal_pass_s"] / m["step_time_s"])
    t1, tk = statistics.median(times[1]), statistics.median(times[minis])
    out = {f"minibatch{minis}_over_1_step_time": tk / t1, "proximal_pass_fraction": statistics.median(proximal),
           "minibatch1_step_s": t1, f"minibatch{minis}_step_s": tk}
    print(f"mini-batches ({kind}, w={w} l={seg} d={depth}, {PROMPTS_PER_STEP} trees/step, tree-packed): step time "
          f"1 update {t1:.2f} s ({', '.join(f'{x:.2f}' for x in times[1])}) / {minis} updates {tk:.2f} s "
          f"({', '.join(f'{x:.2f}' for x in times[minis])}) = {tk / t1:.2f}x; proximal pass "
          f"{100 * out['proximal_pass_fraction']:.0f}% of the {minis}-update step", flush=True)
    return out


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
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
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


def overhead_bench(steps: int, hidden: int, layers: int) -> dict[str, float]:
    """DeepSpeed (ZeRO-0, ZeRO-2) against the plain loop, per-leaf rows on the tiny model."""
    model_dir = tiny_model(Path(tempfile.mkdtemp(prefix="bench-learner-")) / "model", hidden=hidden, layers=layers)
    trees = bench_trees(prompts=2)
    base = {"lr": 1e-5, "warmup_steps": 0, "micro_batch_tokens": 512, "packing": "rows"}
    engines = {"plain": PlainLoop(LearnerConfig(**base), model_dir),
               "deepspeed_z0": Learner(LearnerConfig(**base, zero_stage=0), model_dir),
               "deepspeed_z2": Learner(LearnerConfig(**base, zero_stage=2), model_dir)}
    wall: dict[str, list[float]] = {k: [] for k in engines}
    cpu: dict[str, list[float]] = {k: [] for k in engines}
    tokens = 0.0
    names = list(engines)
    for i in range(steps + 1):
        for name in names[i % 3:] + names[:i % 3]:  # rotate who goes first each round
            w0, c0 = time.perf_counter(), time.process_time()
            tokens = engines[name].step(trees)["tokens"]
            if i > 0:
                wall[name].append(tokens / (time.perf_counter() - w0))
                cpu[name].append(tokens / (time.process_time() - c0))
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"overhead: tiny Llama hidden {hidden}, {layers} layers; {tokens:.0f} tokens/step; "
          f"{steps} timed steps each, rotating order; threads {torch.get_num_threads()}")
    for k in engines:
        print(f"  {k:14s} {med[k]:7.0f} tokens/s wall ({', '.join(f'{x:.0f}' for x in wall[k])}); "
              f"{med_cpu[k]:7.0f} tokens per CPU-second ({', '.join(f'{x:.0f}' for x in cpu[k])})")
    result = {"tokens_per_step": tokens, **{f"{k}_tokens_per_s": round(v, 1) for k, v in med.items()},
              **{f"{k}_tokens_per_cpu_s": round(v, 1) for k, v in med_cpu.items()}}
    for z in ("z0", "z2"):
        result[f"overhead_{z}"] = round(1 - med[f"deepspeed_{z}"] / med["plain"], 4)
        result[f"overhead_{z}_cpu"] = round(1 - med_cpu[f"deepspeed_{z}"] / med_cpu["plain"], 4)
    result["target_overhead"] = 0.15
    result["overhead_meets_target"] = result["overhead_z0"] <= 0.15 and result["overhead_z0_cpu"] <= 0.15
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side of the packing comparison")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="packing shapes to run")
    ap.add_argument("--stop-p", type=float, default=0.15, help="chance that a segment ends early (EOS)")
    ap.add_argument("--no-overhead", action="store_true", help="skip the DeepSpeed-overhead comparison")
    ap.add_argument("--no-minibatch", action="store_true", help="skip the mini-batch comparison")
    ap.add_argument("--overhead-steps", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--probe", nargs=3, metavar=("SHAPE", "PACKING", "MODEL_ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe_peak_rss(*args.probe, stop_p=args.stop_p)
        return
    model_root = Path(tempfile.mkdtemp(prefix="bench-learner-models-"))
    result: dict[str, float] = {}
    for shape in [s for s in args.shapes.split(",") if s]:
        for k, v in packing_bench(shape, args.steps, model_root, args.stop_p).items():
            result[f"{shape}_{k}"] = round(v, 4)
    rss = [v for k, v in result.items() if k.endswith("_packed_peak_rss_over_rows")]
    if rss:
        result["packed_peak_rss_over_rows"] = max(rss)
    if not args.no_overhead:
        result.update(overhead_bench(args.overhead_steps, args.hidden, args.layers))
    if not args.no_minibatch:
        result.update({k: round(v, 4) for k, v in minibatch_bench(args.steps, model_root, args.stop_p).items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
