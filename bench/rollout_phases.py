"""Where the transformers engine's time goes, TreePO tree sampling vs independent sampling (issue 11's question:
does the tree step cost more than an independent step, e.g. rebuilding the batch cache from per-path caches?).

The same prompts, shapes and sampler settings as `bench/rollout.py` (SmolLM2-135M-Instruct, reasoning-gym
basic_arithmetic, 4 trees in flight, b=2), on the transformers engine with its phases timed by wrapping its
methods: `prefill_s` (model calls that prefill prompt or path tokens), `decode_s` and `decode_steps` (the
batched one-token model calls), `cache_build_s` (left-padding the per-path caches into the batch cache),
`sample_s`, and the rest of the wall time (`other_s`: sampler bookkeeping, cache cuts). Each side runs twice
after a warm-up; the second run is reported. The last line is one JSON object with flat keys
`{shape}_{side}_{figure}` and `{shape}_decode_s_per_step_ratio` (tree / independent).

    .venv/bin/python -m bench.rollout_phases [--shapes short,long] [--prompts 4]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

from actors.hf_engine import HfEngine
from actors.independent_sampler import IndependentSampler
from actors.tree_sampler import TreePOSampler
from bench.rollout import SHAPES
from protocol.config.engine import EngineConfig
from protocol.config.prompts import PromptsConfig
from protocol.config.rollout import RolloutConfig
from treepo.models import smollm2_model
from treepo.prompts import load_prompts


def timed_engine(model_dir: Path) -> tuple[HfEngine, dict[str, float], collections.Counter]:
    """A transformers engine whose model calls and cache building add to the returned totals."""
    engine = HfEngine(model_dir, EngineConfig(kind="transformers", max_model_len=1024))
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    forward = engine.model.forward

    def model_call(*args, **kw):
        t = time.perf_counter()
        out = forward(*args, **kw)
        phase = "prefill" if kw.get("logits_to_keep") == 1 else "decode"
        seconds[phase] += time.perf_counter() - t
        calls[phase] += 1
        return out

    engine.model.forward = model_call
    for method, phase in (("_left_pad", "cache_build"), ("_sample", "sample")):
        original = getattr(engine, method)

        def wrapped(*args, _original=original, _phase=phase, **kw):
            t = time.perf_counter()
            out = _original(*args, **kw)
            seconds[_phase] += time.perf_counter() - t
            return out

        setattr(engine, method, wrapped)
    return engine, seconds, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="short,long")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "treepo-bench-models"))
    args = ap.parse_args()
    engine, seconds, calls = timed_engine(smollm2_model(Path(args.model_dir) / "smollm2"))
    prompts = load_prompts(PromptsConfig(datasets=["basic_arithmetic"], size=args.prompts, seed=0), engine.tokenizer)
    headline: dict[str, float] = {}
    for shape in args.shapes.split(","):
        rollout = RolloutConfig(branching=2, init_branching=2, **SHAPES[shape])
        IndependentSampler(engine, rollout.model_copy(update={"max_depth": 1, "width": 2})).sample(prompts[:1])
        figures = {}
        for _ in range(2):
            for side, sampler in (("indep", IndependentSampler(engine, rollout, seed=1)),
                                  ("tree", TreePOSampler(engine, rollout, seed=1))):
                engine.clear_prefix_cache()
                seconds.clear()
                calls.clear()
                before = engine.counters.as_dict()
                t = time.perf_counter()
                sampler.sample(prompts)
                wall = time.perf_counter() - t
                generated = engine.counters.as_dict()["generated_tokens"] - before["generated_tokens"]
                timed = seconds["prefill"] + seconds["decode"] + seconds["cache_build"] + seconds["sample"]
                figures[side] = {"wall_s": wall, "prefill_s": seconds["prefill"], "decode_s": seconds["decode"],
                                 "decode_steps": calls["decode"], "cache_build_s": seconds["cache_build"],
                                 "sample_s": seconds["sample"], "other_s": wall - timed,
                                 "generated_tokens": generated, "decode_s_per_step": seconds["decode"] / calls["decode"]}
        print(f"== {shape}: w={rollout.width} l={rollout.segment_tokens} d={rollout.max_depth}, {args.prompts} trees")
        for side, f in figures.items():
            print(f"  {side:6s} " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in f.items()), flush=True)
            headline.update({f"{shape}_{side}_{k}": round(v, 4) for k, v in f.items()})
        headline[f"{shape}_decode_s_per_step_ratio"] = round(figures["tree"]["decode_s_per_step"]
                                                             / figures["indep"]["decode_s_per_step"], 3)
        headline[f"{shape}_wall_ratio"] = round(figures["tree"]["wall_s"] / figures["indep"]["wall_s"], 3)
    engine.close()
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
