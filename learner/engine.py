"""The learner: a DeepSpeed engine around a transformers causal LM; one training step per batch of trees.

`Learner.step(trees)`: advantages (`learner.advantage`) -> the kept trees cut into
`mini_batches_per_batch` consecutive mini-batches -> each laid out for training, either tree-packed
(`learner.tree_layout`: each tree's unique tokens once, dealt to the ranks by unique tokens) or one
row per leaf (`learner.batch`) -> micro-batches within the token budget. With more than one update
per batch (mini-batches x `ppo_epochs`), one no-grad pass over the micro-batches first computes the
proximal log-probs (the weights at the start of the batch; the first mini-batch's are those of its own first
update, so with one epoch the pass skips it). Then per epoch, per mini-batch: forward,
`policy_loss`, backward per micro-batch (gradients accumulate) -> one optimizer step. Every rank is
given the same trees (the step's global batch) and derives its own share deterministically, so the
ranks agree on the micro-batch counts (a rank short of data runs an empty micro-batch) and on the
normaliser: each micro-batch loss is its token sum / (trained tokens of its mini-batch / world
size), so after DeepSpeed averages gradients over ranks each update optimises the token-mean over
its whole mini-batch.

Precision: fp32 with gloo on CPU, bf16 with nccl on GPU. Optimiser: torch AdamW (fused; lr, weight
decay from config), linear warm-up over `warmup_steps` training steps (step k uses
lr * min(1, (k+1)/warmup) for all its updates) then constant, gradient-norm clip `grad_clip` per
update. ZeRO stage from config. Gradient accumulation is unmanaged
(`managed_gradient_accumulation: false`): the micro-batch count varies and `engine.step()` is the
boundary.

Checkpoints (`save_checkpoint`/`load_checkpoint`) restore model, optimizer, LR schedule, step and
policy version. `export` writes safetensors + config + tokenizer that transformers and vLLM load;
`full_weights` lends the full weights (gathered under ZeRO-3) to the weight publisher, which copies them once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from learner.advantage import compute_advantages
from learner.advantage.result import TreeAdvantages
from learner.batch import (
    MicroBatch,
    build_sequences,
    empty_micro_batch,
    pack,
    split_for_ranks,
    split_mini_batches,
)
from learner.distributed import collective_device, init_distributed
from learner.forward import RAW, Sampling, micro_batch_logprobs, micro_batch_loss
from learner.loss import LossSettings, LossStats
from learner.tree_attention import pad_multiple, tree_packing_refusal
from learner.tree_layout import PackedMicroBatch, empty_packed_micro_batch, pack_units, tree_units
from protocol.config.learner import LearnerConfig
from protocol.tree import Tree
from treepo.checkpoint_export import write_policy

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


def training_dtype(cfg: LearnerConfig, gpu: bool) -> torch.dtype:
    """`learner.dtype` resolved: auto is bfloat16 on GPU, float32 on CPU."""
    name = ("bfloat16" if gpu else "float32") if cfg.dtype == "auto" else cfg.dtype
    return getattr(torch, name)


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
    runs after DeepSpeed has all-reduced the gradients, keeps the gradient norm and clips to `max_norm`.

    The clip costs one read of the gradients, not three: the norm is one BLAS dot per gradient (on CPU
    faster than `vector_norm`'s reduction, and closer to the float64 norm, in a one-off measurement), and the
    scaling is left to the fused AdamW kernel as its `grad_scale` (the attribute torch's GradScaler sets for
    fused optimizers: the kernel divides each gradient by it as it reads it) instead of a separate multiply pass."""

    def __init__(self, params: list[torch.nn.Parameter], max_norm: float):
        self.params, self.max_norm, self.norm = params, max_norm, 0.0

    def __call__(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad.reshape(-1) for p in self.params if p.grad is not None]
        self.norm = grad_norm(grads)
        coef = self.max_norm / (self.norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s coefficient
        optimizer.grad_scale = torch.tensor(1.0 / coef, device=grads[0].device) if grads and coef < 1 else None


def grad_norm(grads: list[torch.Tensor]) -> float:
    """L2 norm over flat gradients."""
    return float(torch.stack([torch.dot(g, g) for g in grads]).sum().sqrt()) if grads else 0.0


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

    def __init__(self, cfg: LearnerConfig, model_dir: str | Path, seed: int = 0, sampling: Sampling = RAW):
        from transformers import AutoModelForCausalLM

        self.rank, self.world = init_distributed()
        import deepspeed

        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.settings = LossSettings.from_config(cfg)
        self.sampling = sampling  # the actors' sampling distribution: log-probs are taken under it
        gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpu else torch.device("cpu")
        dtype = training_dtype(cfg, gpu)
        bf16 = dtype == torch.bfloat16
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype,
                                                     attn_implementation=cfg.attn_implementation)
        self.pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
        self.packing = choose_packing(cfg.packing, model.config)
        self.pad_multiple = pad_multiple(model.config)
        # fused: one kernel over all parameters (on CPU 4x faster than the default per-tensor loop for SmolLM2-135M,
        # which counts once per update with mini-batches)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(cfg.warmup_steps))
        self.clip_hook = None
        if own_clipping(cfg, bf16):
            self.clip_hook = GradClipHook(list(model.parameters()), cfg.grad_clip)
            optimizer.register_step_pre_hook(self.clip_hook)
        self.scheduler = scheduler  # stepped once per training step (not per update), so DeepSpeed does not own it
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, bf16))
        if self.world == 1 and cfg.zero_stage == 0:  # nothing to average; DeepSpeed would still flatten and copy
            self.engine.enable_backward_allreduce = False  # back every gradient at each step (0.18 s, SmolLM2-135M)
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=dtype, attn_implementation=cfg.attn_implementation).to(self.device).eval()
            self.ref_model.requires_grad_(False)
        self.step_count = 0
        self.policy_version = 0
        self.updates: list[dict[str, float]] = []
        self.advantages: list[TreeAdvantages] = []  # what the last step trained with (empty if it made no step)

    # ------------------------------------------------------------------ training
    def step(self, trees: list[Tree]) -> dict[str, float]:
        """One training step on the batch (one or more optimizer updates); metrics of the whole batch
        (identical on every rank). The summaries of its updates are left in `self.updates`, the advantages it
        trained with in `self.advantages`."""
        start = time.perf_counter()
        batch, metrics = compute_advantages(trees, self.cfg)
        minis = [m for m in (self._lay_out(part) for part in split_mini_batches(batch, self.cfg.mini_batches_per_batch))
                 if m[1] > 0]
        total = float(sum(t for _, t, _ in minis))
        metrics["sequences"] = float(sum(n for _, _, n in minis))
        self.updates = []
        self.advantages = batch if total > 0 else []
        if total == 0:  # every group filtered: no step, but the same metric keys as a step (zeros)
            metrics.update(skipped=1.0, step=float(self.step_count), policy_version=float(self.policy_version),
                           micro_batches=0.0, mini_batches=0.0, optimizer_steps=0.0, proximal_pass_s=0.0,
                           tokens=0.0, row_tokens=0.0, row_tokens_over_tokens=0.0, head_positions=0.0,
                           step_time_s=time.perf_counter() - start, tokens_per_s=0.0, row_tokens_per_s=0.0)
            return metrics
        plans = [self._plan(items) for items, _, _ in minis]  # per mini-batch: every rank's micro-batches
        mine = [self._mine(packed) for packed in plans]
        self.engine.train()
        # proximal log-probs: None = the current weights' (detached), right for the first update of the batch
        proximal: list[list[torch.Tensor] | None] = [None] * len(minis)
        proximal_s = 0.0
        if self.settings.off_policy == "decoupled" and self.cfg.ppo_epochs * len(minis) > 1:
            t = time.perf_counter()
            with torch.no_grad():  # the first mini-batch is needed again only in a later epoch
                for k in range(0 if self.cfg.ppo_epochs > 1 else 1, len(minis)):
                    proximal[k] = [micro_batch_logprobs(self.engine, mb.to(self.device), sampling=self.sampling,
                                                        logit_chunk=self.cfg.logit_chunk_tokens)[0] for mb in mine[k]]
            proximal_s = time.perf_counter() - t
        lr = float(self.scheduler.get_last_lr()[0])  # the rate every update of this step uses
        stats = LossStats()
        for _ in range(self.cfg.ppo_epochs):
            for k, ((_, mini_total, _), mbs) in enumerate(zip(minis, mine, strict=True)):
                update = LossStats()
                for j, mb in enumerate(mbs):
                    loss, st = micro_batch_loss(self.engine, mb.to(self.device), self.settings, mini_total / self.world,
                                                self.ref_model, self.cfg.logit_chunk_tokens, self.sampling,
                                                None if proximal[k] is None else proximal[k][j])
                    self.engine.backward(loss, scale_wrt_gas=False)
                    update.merge(st)
                self.engine.step()
                update = self._all_reduce(update)
                self.updates.append({**update.summary(), "loss": update.loss / mini_total,
                                     "grad_norm": self._grad_norm()})
                stats.merge(update)
        self.scheduler.step()
        self.step_count += 1
        self.policy_version += 1
        elapsed = time.perf_counter() - start
        every = [mb for packed in plans for p in packed for mb in p]
        processed = float(sum(mb.real_tokens for mb in every))
        row_tokens = float(sum(mb.row_tokens for mb in every))
        metrics.update(stats.summary())
        metrics.update(skipped=0.0, loss=float(np.mean([u["loss"] for u in self.updates])),
                       grad_norm=float(np.mean([u["grad_norm"] for u in self.updates])),
                       grad_norm_max=max(u["grad_norm"] for u in self.updates),
                       lr=lr, step=float(self.step_count), policy_version=float(self.policy_version),
                       micro_batches=float(sum(len(m) for m in mine)), mini_batches=float(len(minis)),
                       optimizer_steps=float(len(self.updates)), proximal_pass_s=proximal_s, tokens=processed,
                       row_tokens=row_tokens, row_tokens_over_tokens=row_tokens / processed,
                       head_positions=float(sum(mb.head_positions for mb in every)),
                       step_time_s=elapsed, tokens_per_s=processed / elapsed, row_tokens_per_s=row_tokens / elapsed)
        return metrics

    def _lay_out(self, part: list[TreeAdvantages]) -> tuple[list, float, int]:
        """A mini-batch's training items (tree units or per-leaf rows), its trained-token count and its rows."""
        if self.packing == "tree":
            items = tree_units(part, self.cfg.micro_batch_tokens)
            return items, float(sum(len(u.entry_token) for u in items)), sum(len(u.row_index) for u in items)
        items = build_sequences(part)
        return items, float(sum(r.loss_mask.sum() for r in items)), len(items)

    def _plan(self, items: list) -> list[list[MicroBatch | PackedMicroBatch]]:
        """Every rank's micro-batches of one mini-batch (each rank derives the same plan)."""
        return [self._micro_batches(shard) for shard in split_for_ranks(items, self.world)]

    def _mine(self, packed: list[list[MicroBatch | PackedMicroBatch]]) -> list[MicroBatch | PackedMicroBatch]:
        """This rank's micro-batches, padded with empty ones to the most any rank has (collective backward)."""
        n_micro = max(len(p) for p in packed)
        return packed[self.rank] + [self._empty_micro_batch()] * (n_micro - len(packed[self.rank]))

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
        highs = [k for k in vars(stats) if k.endswith("_max")]
        lows = [k for k in vars(stats) if k.endswith("_min")]
        device = collective_device()
        sums = torch.tensor([getattr(stats, k) for k in names], dtype=torch.float64, device=device)
        extremes = torch.tensor([getattr(stats, k) for k in highs] + [-getattr(stats, k) for k in lows],
                                dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        values = extremes.tolist()
        return LossStats(**dict(zip(names, sums.tolist(), strict=True)),
                         **dict(zip(highs, values[:len(highs)], strict=True)),
                         **{k: -v for k, v in zip(lows, values[len(highs):], strict=True)})

    # ------------------------------------------------------------------ checkpoints and weights
    def save_checkpoint(self, directory: str | Path, loop_state: dict | None = None) -> None:
        """Model, optimizer, LR schedule, step, policy version and the caller's `loop_state` (what the learner
        loop must find again with these weights) under `directory` (collective; rank 0's `loop_state` is kept)."""
        self.engine.save_checkpoint(str(directory), tag=f"step{self.step_count}",
                                    client_state={"step": self.step_count, "policy_version": self.policy_version,
                                                  "lr_schedule": self.scheduler.state_dict(),  # "lr_scheduler" is
                                                  "loop": loop_state or {}})  # DeepSpeed's own key

    def load_checkpoint(self, directory: str | Path, tag: str | None = None) -> dict:
        """Restore the checkpoint `tag` (default: the latest) saved under `directory` (collective); returns its
        `loop_state`."""
        path, client = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        self.step_count = int(client["step"])
        self.policy_version = int(client["policy_version"])
        self.scheduler.load_state_dict(client["lr_schedule"])
        return client["loop"]

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
            write_policy(tmp, self.step_count, self.policy_version)
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
