"""Tree-packed forward/backward per attention backend against per-leaf rows: the check to run on a GPU.

On a tiny random Llama (fp32, GQA; no tokenizer or download needed) and batches of binary TreePO-shaped trees
at several sharing ratios, each side computes the loss entries' log-probs and the policy loss's gradient:
rows (per-leaf rows, SDPA: the reference), tree-packed with SDPA (dense boolean mask) and, where FlexAttention
can run, tree-packed with flex_attention (BlockMask; compiled by transformers). Reported per backend: the max
abs difference of the log-probs and of every parameter's gradient to the rows side, and the median
forward+backward time over `--repeats`. On CUDA every backend runs forward and backward; on CPU FlexAttention
has no backward, so flex runs forward only (its gradient difference is absent). Ends with one JSON line.

    python bench/tree_attention.py [--repeats 5] [--hidden 256] [--layers 4]

On the 2-core CPU box, `--repeats 2` takes about 5 minutes (rows 1.55 / 7.5 / 41 s, packed SDPA 0.64 / 3.5 /
20 s fwd+bwd; flex fwd 0.30 / 1.35 / 5.6 s; log-prob differences <= 3e-6, gradient <= 3e-8, fp32). The lent GPU
image (torch 2.11, transformers 5.17) has no pydantic, which `protocol.config` needs: carry the wheels of
pydantic, pydantic-core, annotated-types and typing-inspection as the device README describes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.learner import bench_trees  # noqa: E402
from learner.advantage import compute_advantages  # noqa: E402
from learner.batch import build_sequences, collate  # noqa: E402
from learner.forward import packed_token_logprobs, token_logprobs  # noqa: E402
from learner.loss import LossSettings, policy_loss  # noqa: E402
from learner.tree_attention import pad_multiple  # noqa: E402
from learner.tree_layout import pack_units, tree_units  # noqa: E402
from protocol.config.learner import LearnerConfig  # noqa: E402

SHAPES = {"depth3_seg16": (3, 16), "depth4_seg32": (4, 32), "depth5_seg64": (5, 64)}  # binary trees, 16-token prompts


def model(hidden: int, layers: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40_000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64, head_dim=32,
                      max_position_embeddings=4096, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device)


def run_side(m, batch, attn: str, grad: bool) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """(entry log-probs, parameter gradients, seconds) of one side."""
    device = next(m.parameters()).device
    m.config._attn_implementation = "sdpa" if attn == "rows" else attn
    settings = LossSettings()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad):
        if attn == "rows":
            mb = collate(build_sequences(batch), pad_id=0).to(device)
            lp, _ = token_logprobs(m, mb)
            on = mb.loss_mask[:, 1:] > 0
            loss, _ = policy_loss(lp, mb.behaviour_logprobs[:, 1:], mb.advantages[:, 1:], mb.loss_mask[:, 1:],
                                  settings)
            lp = lp[on]
        else:
            (mb,) = pack_units(tree_units(batch, 1 << 20), 1 << 20, 0, pad_multiple(m.config))
            mb = mb.to(device)
            lp, _ = packed_token_logprobs(m, mb)
            loss, _ = policy_loss(lp, mb.behaviour_logprobs, mb.advantages, torch.ones_like(mb.advantages), settings)
        grads = list(torch.autograd.grad(loss, list(m.parameters()))) if grad else []
    if device.type == "cuda":
        torch.cuda.synchronize()
    return lp.detach(), grads, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = model(args.hidden, args.layers, device)
    result: dict[str, float | str] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                      "torch": torch.__version__}
    for shape, (depth, seg) in SHAPES.items():
        trees = bench_trees(prompts=4, depth=depth, seg=seg)
        batch, _ = compute_advantages(trees, LearnerConfig())
        ref_lp, ref_grads, _ = run_side(m, batch, "rows", grad=True)
        for attn in ("rows", "sdpa", "flex_attention"):
            grad = attn != "flex_attention" or device.type == "cuda"
            lp, grads, _ = run_side(m, batch, attn, grad)  # warm-up (flex compiles here)
            times = [run_side(m, batch, attn, grad)[2] for _ in range(args.repeats)]
            key = f"{shape}_{'packed_' + attn if attn != 'rows' else 'rows'}"
            result[f"{key}_s"] = round(statistics.median(times), 5)
            result[f"{key}_logprob_max_diff"] = float((lp - ref_lp).abs().max())
            if grads:
                result[f"{key}_grad_max_diff"] = max(float((g - r).abs().max()) for g, r in zip(grads, ref_grads,
                                                                                               strict=True))
            print(f"{shape:14s} {attn:15s} {'fwd+bwd' if grad else 'fwd':7s} {statistics.median(times) * 1e3:9.2f} ms"
                  f"  logprob max diff {result[f'{key}_logprob_max_diff']:.2e}"
                  + (f"  grad max diff {result[f'{key}_grad_max_diff']:.2e}" if grads else ""), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
