"""The learner: a DeepSpeed engine around a transformers causal LM, one optimizer step per batch of trees.

`Learner.step(trees)`: advantages (`learner.advantage`) -> the batch laid out for training, either
tree-packed (`learner.tree_layout`: each tree's unique tokens once, dealt to the ranks by unique tokens)
or one row per leaf (`learner.batch`) -> micro-batches within the token budget -> forward,
`policy_loss`, backward per micro-batch (gradients accumulate) -> one optimizer step. Every rank
is given the same trees (the step's global batch) and derives its own share deterministically, so
the ranks agree on the micro-batch count (a rank short of data runs an empty micro-batch) and on
the normaliser: each micro-batch loss is its token sum / (trained tokens of the step / world size),
so after DeepSpeed averages gradients over ranks the step optimises the token-mean over the whole
batch.

Precision: fp32 with gloo on CPU, bf16 with nccl on GPU. Optimiser: torch AdamW (lr, weight
decay from config), linear warm-up over `warmup_steps` steps (step k uses lr * min(1, (k+1)/warmup))
then constant, gradient-norm clip `grad_clip`. ZeRO stage from config. Gradient accumulation is
unmanaged (`managed_gradient_accumulation: false`): the micro-batch count varies per step and
`engine.step()` is the boundary.

Checkpoints (`save_checkpoint`/`load_checkpoint`) restore model, optimizer, LR schedule, step and
policy version. `export` writes safetensors + config + tokenizer that transformers and vLLM load;
`full_weights` lends the full weights (gathered under ZeRO-3) to the weight publisher, which copies them once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from learner.advantage import compute_advantages
from learner.batch import MicroBatch, build_sequences, empty_micro_batch, pack, split_for_ranks
from learner.distributed import init_distributed
from learner.forward import micro_batch_loss
from learner.loss import LossSettings, LossStats
from learner.tree_attention import pad_multiple, tree_packing_refusal
from learner.tree_layout import PackedMicroBatch, empty_packed_micro_batch, pack_units, tree_units
from protocol.config.learner import LearnerConfig
from protocol.tree import Tree

log = logging.getLogger("treepo.learner")


def warmup_factor(warmup_steps: int):
    """LR multiplier of optimizer step k (0-based): linear warm-up, then 1."""
    return lambda k: min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def deepspeed_config(cfg: LearnerConfig, bf16: bool) -> dict:
    """DeepSpeed clips (and reports the norm) itself except for fp32 ZeRO-0: see `GradClipHook`."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0 if own_clipping(cfg, bf16) else cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
    }


def own_clipping(cfg: LearnerConfig, bf16: bool) -> bool:
    return cfg.zero_stage == 0 and not bf16


def choose_packing(packing: str, config) -> str:
    """`learner.packing` resolved for a model: "auto" is tree where the model supports it; an explicit
    tree on a model that does not is a start-up error naming the field."""
    refusal = tree_packing_refusal(config)
    if packing == "tree" and refusal:
        raise ValueError(f"learner.packing=tree: {refusal}")
    if packing == "auto":
        if refusal:
            log.warning("learner.packing=auto trains per-leaf rows: %s", refusal)
            return "rows"
        return "tree"
    return packing


class GradClipHook:
    """Optimizer step pre-hook for fp32 ZeRO-0, where DeepSpeed clips but does not keep the norm:
    runs after DeepSpeed has all-reduced the gradients, clips them to `max_norm` and keeps the norm."""

    def __init__(self, params: list[torch.nn.Parameter], max_norm: float):
        self.params, self.max_norm, self.norm = params, max_norm, 0.0

    def __call__(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_norm))


def without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict (detached) without the tensors that are the same memory as an earlier one: with tied
    embeddings `lm_head.weight` is `model.embed_tokens.weight`, and pushing it would send those bytes twice
    (a fifth of SmolLM2-135M, half of the tiny model). Receivers re-tie (`HfEngine.load_weights`, vLLM's loader)."""
    seen: set[tuple] = set()
    out = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    return out


class Learner:
    """Trains one policy with DeepSpeed; every rank of the process group builds one."""

    def __init__(self, cfg: LearnerConfig, model_dir: str | Path, seed: int = 0):
        from transformers import AutoModelForCausalLM

        self.rank, self.world = init_distributed()
        import deepspeed

        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.settings = LossSettings.from_config(cfg)
        gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpu else torch.device("cpu")
        dtype = torch.bfloat16 if gpu else torch.float32
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype,
                                                     attn_implementation=cfg.attn_implementation)
        self.pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
        self.packing = choose_packing(cfg.packing, model.config)
        self.pad_multiple = pad_multiple(model.config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(cfg.warmup_steps))
        self.clip_hook = None
        if own_clipping(cfg, gpu):
            self.clip_hook = GradClipHook(list(model.parameters()), cfg.grad_clip)
            optimizer.register_step_pre_hook(self.clip_hook)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, gpu))
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=dtype, attn_implementation=cfg.attn_implementation).to(self.device).eval()
            self.ref_model.requires_grad_(False)
        self.step_count = 0
        self.policy_version = 0

    # ------------------------------------------------------------------ training
    def step(self, trees: list[Tree]) -> dict[str, float]:
        """One optimizer step on the batch; metrics of the whole batch (identical on every rank)."""
        start = time.perf_counter()
        batch, metrics = compute_advantages(trees, self.cfg)
        if self.packing == "tree":
            items = tree_units(batch, self.cfg.micro_batch_tokens)
            total = float(sum(len(u.entry_token) for u in items))
            metrics["sequences"] = float(sum(len(u.row_index) for u in items))
        else:
            items = build_sequences(batch)
            total = float(sum(r.loss_mask.sum() for r in items))
            metrics["sequences"] = float(len(items))
        if total == 0:  # every group filtered: no step, but the same metric keys as a step (zeros)
            metrics.update(skipped=1.0, step=float(self.step_count), policy_version=float(self.policy_version),
                           micro_batches=0.0, tokens=0.0, row_tokens=0.0, row_tokens_over_tokens=0.0, head_positions=0.0,
                           step_time_s=time.perf_counter() - start, tokens_per_s=0.0, row_tokens_per_s=0.0)
            return metrics
        packed = [self._micro_batches(shard) for shard in split_for_ranks(items, self.world)]
        n_micro = max(len(p) for p in packed)
        mine = packed[self.rank] + [self._empty_micro_batch()] * (n_micro - len(packed[self.rank]))
        stats = LossStats()
        self.engine.train()
        for mb in mine:
            loss, st = micro_batch_loss(self.engine, mb.to(self.device), self.settings, total / self.world,
                                        self.ref_model, self.cfg.logit_chunk_tokens)
            self.engine.backward(loss, scale_wrt_gas=False)
            stats.merge(st)
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this update uses
        self.engine.step()
        self.step_count += 1
        self.policy_version += 1
        stats = self._all_reduce(stats)
        elapsed = time.perf_counter() - start
        processed = float(sum(mb.real_tokens for p in packed for mb in p))
        row_tokens = float(sum(mb.row_tokens for p in packed for mb in p))
        head_positions = float(sum(mb.head_positions for p in packed for mb in p))
        metrics.update(stats.summary())
        metrics.update(skipped=0.0, loss=stats.loss / total, grad_norm=self._grad_norm(),
                       lr=lr, step=float(self.step_count),
                       policy_version=float(self.policy_version), micro_batches=float(n_micro), tokens=processed,
                       row_tokens=row_tokens, row_tokens_over_tokens=row_tokens / processed,
                       head_positions=head_positions,
                       step_time_s=elapsed, tokens_per_s=processed / elapsed, row_tokens_per_s=row_tokens / elapsed)
        return metrics

    def _micro_batches(self, shard: list) -> list[MicroBatch | PackedMicroBatch]:
        if self.packing == "tree":
            return pack_units(shard, self.cfg.micro_batch_tokens, self.pad_id, self.pad_multiple)
        return pack(shard, self.cfg.micro_batch_tokens, self.pad_id)

    def _empty_micro_batch(self) -> MicroBatch | PackedMicroBatch:
        if self.packing == "tree":
            return empty_packed_micro_batch(self.pad_id, self.pad_multiple)
        return empty_micro_batch(self.pad_id)

    def _grad_norm(self) -> float:
        """Norm of the step's gradient before clipping."""
        return self.clip_hook.norm if self.clip_hook else float(self.engine.get_global_grad_norm())

    def _all_reduce(self, stats: LossStats) -> LossStats:
        """The statistics of all ranks together."""
        if self.world == 1:
            return stats
        import torch.distributed as dist

        names = [k for k in vars(stats) if not k.endswith(("_max", "_min"))]
        sums = torch.tensor([getattr(stats, k) for k in names], dtype=torch.float64)
        extremes = torch.tensor([stats.importance_weight_max, -stats.importance_weight_min], dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        out = LossStats(**dict(zip(names, sums.tolist(), strict=True)))
        out.importance_weight_max, out.importance_weight_min = extremes[0].item(), -extremes[1].item()
        return out

    # ------------------------------------------------------------------ checkpoints and weights
    def save_checkpoint(self, directory: str | Path) -> None:
        """Model, optimizer, LR schedule, step and policy version under `directory` (collective)."""
        self.engine.save_checkpoint(str(directory), tag=f"step{self.step_count}",
                                    client_state={"step": self.step_count, "policy_version": self.policy_version})

    def load_checkpoint(self, directory: str | Path, tag: str | None = None) -> None:
        """Restore the checkpoint `tag` (default: the latest) saved under `directory` (collective)."""
        path, client = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        self.step_count = int(client["step"])
        self.policy_version = int(client["policy_version"])

    @contextmanager
    def full_weights(self) -> Iterator[dict[str, torch.Tensor]]:
        """The full weights by HF parameter name, as the parameters themselves (no copy, on their device),
        valid inside the block only: under ZeRO-3 they are gathered for it (collective). The weight
        publisher copies them once, straight into its snapshot. Tied weights appear once (see
        `without_aliases`)."""
        module = self.engine.module
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield without_aliases(module.state_dict())
        else:
            yield without_aliases(module.state_dict())

    def cpu_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the full weights on CPU, by HF parameter name (collective under ZeRO-3)."""
        with self.full_weights() as weights:
            return {k: v.cpu().clone() for k, v in weights.items()}

    def export(self, directory: str | Path) -> Path:
        """Write the current weights as a HF model directory (rank 0 writes; collective).

        The directory is replaced atomically, so a reader sees the old or the new weights, never a mix.
        It also holds `policy.json` with the step and policy version.
        """
        from transformers import AutoTokenizer

        state = self.cpu_state_dict()
        out = Path(directory)
        if self.rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
            self.engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            AutoTokenizer.from_pretrained(self.model_dir).save_pretrained(tmp)
            (tmp / "policy.json").write_text(json.dumps({"step": self.step_count,
                                                         "policy_version": self.policy_version}))
            old = out.with_name(f".{out.name}-old")
            if out.exists():
                os.rename(out, old)
            os.rename(tmp, out)
            if old.exists():
                shutil.rmtree(old)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return out
