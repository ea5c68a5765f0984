"""One micro-batch through a causal LM: per-token log-probs and entropy, then the policy loss.

Two layouts (`learner.packing`):
- rows (`learner.batch.MicroBatch`): one right-padded row per leaf. Logits at position t-1 predict
  token t, so every output has one column fewer than the micro-batch (`[:, 1:]` of its arrays).
- tree (`learner.tree_layout.PackedMicroBatch`): each unique token once, with the tree attention
  mask (`learner.tree_attention`); each unique trained token is predicted by the hidden state its
  `predictors` entry names, and the log-probs are then gathered into one value per loss entry
  (per-leaf row and trained token), which is what the loss sees.

Either way only the positions that predict a trained token go through the LM head: the model is
called for its final hidden states (`output_hidden_states`, with `logits_to_keep` empty so that it
computes no logits itself), the output embedding is applied to the selected hidden rows, and a
log-softmax over the vocabulary in float32 (or the model's dtype when wider; `PickedLogprob`, one
fused pass) gives log pi(token | context) there, pi being the distribution the actors sample from
(`protocol.sampling`: the logits divided by the rollout temperature, with its top-k / top-p; the
sampled token itself always stays in the support, so a rounding difference at the nucleus edge
cannot give -inf). The head runs in
chunks of `logit_chunk` positions; with more than one chunk each chunk is recomputed in the
backward pass (activation checkpointing), so peak memory holds one chunk x vocabulary of logits,
not all of them. The entropy is that of the full next-token distribution at the same positions,
computed without grad, for metrics only.

The shortcut assumes the model's logits are its output embedding of the final hidden state, with
nothing after it (no soft-cap or scaling, as in Gemma, Cohere or Granite), so it is taken only for the
model types in `PLAIN_HEAD_MODELS`; any other model runs its full forward (its own logits at every
position, soft-cap and scaling included), and the same selection, sampling filters and log-softmax
follow: correct for every causal LM, at the memory of a full [T, V] logit tensor per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.batch import MicroBatch
from learner.loss import LossSettings, LossStats, policy_loss
from learner.tree_attention import tree_attention_mask
from learner.tree_layout import PackedMicroBatch
from protocol.config.learner import LearnerConfig
from protocol.config.rollout import RolloutConfig
from protocol.sampling import removed_by_filters

PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
DEFAULT_LOGIT_CHUNK: int = LearnerConfig.model_fields["logit_chunk_tokens"].default


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside `model` (a DeepSpeed engine's `config` is its own)."""
    return getattr(model, "module", model)


@dataclass(frozen=True)
class Sampling:
    """The actors' sampling distribution, which the learner's log-probs are taken under."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1

    @classmethod
    def from_rollout(cls, cfg: RolloutConfig) -> Sampling:
        return cls(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


RAW = Sampling()


class PickedLogprob(torch.autograd.Function):
    """(log softmax(logits)[target], entropy of softmax(logits)) per row of logits [N, V], in one pass.

    Forward: one exp over the logits (shifted by the row max) gives the probabilities p, from which come
    the log-normaliser, the picked log-prob and the entropy (no grad: a metric). It keeps p alone for the
    backward, where the gradient of the picked log-prob is g * (onehot(target) - p): no second exp, no
    dense gather gradient, and one [N, V] tensor alive between the passes instead of autograd's log-softmax
    output plus the gradients it builds."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = logits.amax(-1, keepdim=True)
        probs = (logits - top).exp_()
        total = probs.sum(-1, keepdim=True)
        probs.div_(total)
        log_norm = (top + total.log()).squeeze(-1)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
        entropy = log_norm - (probs * logits).nansum(-1)  # 0 * -inf where a filter removed a token
        ctx.save_for_backward(probs, targets)
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked: torch.Tensor, grad_entropy: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, targets = ctx.saved_tensors
        grad = probs * -grad_picked.unsqueeze(-1)
        return grad.scatter_add_(-1, targets.unsqueeze(-1), grad_picked.unsqueeze(-1)), None


def _sampling_logits(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                     sampling: Sampling) -> torch.Tensor:
    """head(hidden) as the actors sampled from it: float32 at least, over the temperature, the tokens the
    top-k/top-p filters removed at -inf (never the target)."""
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if sampling.filtered:
        removed = removed_by_filters(logits.detach(), sampling.top_k, sampling.top_p)
        removed.scatter_(-1, targets.unsqueeze(-1), False)
        logits = logits.masked_fill(removed, float("-inf"))
    return logits


def _head_chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    return PickedLogprob.apply(_sampling_logits(head, hidden, targets, sampling), targets)


def _picked_only(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The picked log-probs alone (no backward, no entropy): two passes over the logits instead of five."""
    logits = _sampling_logits(head, hidden, targets, sampling)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, logit_chunk: int,
                  with_entropy: bool = False, sampling: Sampling = RAW) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log-softmax(sampling logits of head(hidden))[targets] for hidden [N, H], targets [N]: [N], float32 at
    least; and the entropy of that distribution.

    In chunks of `logit_chunk` rows; when there are several, each is recomputed in the backward pass.
    Without grad and entropy (the proximal and reference passes) only the picked log-probs are computed."""
    if not (with_entropy or torch.is_grad_enabled()):
        return torch.cat([_picked_only(head, h, t, sampling)
                          for h, t in zip(hidden.split(logit_chunk), targets.split(logit_chunk), strict=True)]), None
    if len(hidden) <= logit_chunk:
        picked, entropy = _head_chunk(head, hidden, targets, sampling)
    else:
        from torch.utils.checkpoint import checkpoint

        parts = [checkpoint(_head_chunk, head, h, t, sampling, use_reentrant=False)
                 for h, t in zip(hidden.split(logit_chunk), targets.split(logit_chunk), strict=True)]
        picked, entropy = torch.cat([p for p, _ in parts]), torch.cat([e for _, e in parts])
    return picked, entropy if with_entropy else None


def _head_inputs(model: torch.nn.Module, **inputs) -> tuple[torch.Tensor, torch.nn.Module]:
    """What the head turns into logits, per position, and the head: the final hidden states and the output
    embedding for a plain-head model (no logits computed by the model); for any other model its own logits
    and the identity. Through `model` itself, not the HF model inside: a DeepSpeed engine hooks the outputs
    for its backward."""
    hf_model = _hf_model(model)
    if hf_model.config.model_type not in PLAIN_HEAD_MODELS:
        return model(**inputs, use_cache=False).logits, torch.nn.Identity()
    no_logits = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=no_logits)
    return out.hidden_states[-1], hf_model.get_output_embeddings()


def token_logprobs(model: torch.nn.Module, mb: MicroBatch, with_entropy: bool = False,
                   logit_chunk: int = DEFAULT_LOGIT_CHUNK,
                   sampling: Sampling = RAW) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows: log pi(token_t | tokens_<t) for t >= 1 where token t is trained, else 0: [B, T-1] float32;
    and the entropy there if asked. `model` is a HF causal LM or a DeepSpeed engine around one."""
    hidden, head = _head_inputs(model, input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                position_ids=mb.position_ids)
    trained = mb.loss_mask[:, 1:] > 0
    picked, entropy = head_logprobs(head, hidden[:, :-1][trained], mb.input_ids[:, 1:][trained], logit_chunk,
                                    with_entropy, sampling)
    logprobs = picked.new_zeros(trained.shape).masked_scatter(trained, picked)
    if not with_entropy:
        return logprobs, None
    return logprobs, picked.new_zeros(trained.shape).masked_scatter(trained, entropy)


def packed_token_logprobs(model: torch.nn.Module, mb: PackedMicroBatch, with_entropy: bool = False,
                          logit_chunk: int = DEFAULT_LOGIT_CHUNK,
                          sampling: Sampling = RAW) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tree: log pi of each loss entry's token, float32 [E] (each unique token computed once, then
    gathered); and the entropy there if asked."""
    hf_model = _hf_model(model)
    mask = tree_attention_mask(mb.subtree_end, hf_model.config, hf_model.dtype)
    hidden, head = _head_inputs(model, input_ids=mb.input_ids, attention_mask=mask, position_ids=mb.position_ids)
    picked, entropy = head_logprobs(head, hidden.flatten(0, 1)[mb.predictors], mb.input_ids.flatten()[mb.targets],
                                    logit_chunk, with_entropy, sampling)
    return picked[mb.entry_slots], entropy[mb.entry_slots] if with_entropy else None


def micro_batch_logprobs(model: torch.nn.Module, mb: MicroBatch | PackedMicroBatch, with_entropy: bool = False,
                         logit_chunk: int = DEFAULT_LOGIT_CHUNK,
                         sampling: Sampling = RAW) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-probs the loss reads for either layout: [B, T-1] for rows, [E] for tree packing."""
    logprobs_of = packed_token_logprobs if isinstance(mb, PackedMicroBatch) else token_logprobs
    return logprobs_of(model, mb, with_entropy=with_entropy, logit_chunk=logit_chunk, sampling=sampling)


def micro_batch_loss(model: torch.nn.Module, mb: MicroBatch | PackedMicroBatch, settings: LossSettings,
                     normaliser: float, ref_model: torch.nn.Module | None = None,
                     logit_chunk: int = DEFAULT_LOGIT_CHUNK, sampling: Sampling = RAW,
                     proximal: torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
    """The micro-batch's share of the step loss (its token sum / `normaliser`) and its statistics.
    `proximal`: the log-probs at the batch's starting weights (`micro_batch_logprobs` under no_grad);
    None means the current weights are the proximal policy (one update per batch)."""
    logprobs, entropy = micro_batch_logprobs(model, mb, True, logit_chunk, sampling)
    ref = None
    if ref_model is not None:
        with torch.no_grad():
            ref, _ = micro_batch_logprobs(ref_model, mb, logit_chunk=logit_chunk, sampling=sampling)
    if isinstance(mb, PackedMicroBatch):
        behaviour, advantages = mb.behaviour_logprobs, mb.advantages
        mask = torch.ones_like(advantages)
    else:
        behaviour, advantages, mask = mb.behaviour_logprobs[:, 1:], mb.advantages[:, 1:], mb.loss_mask[:, 1:]
    loss, stats = policy_loss(logprobs, behaviour, advantages, mask, settings, proximal_logprobs=proximal,
                              ref_logprobs=ref, normaliser=normaliser)
    stats.entropy = float((entropy * mask).sum())
    return loss, stats
