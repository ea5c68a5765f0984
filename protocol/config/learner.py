"""Config of the learner: advantage estimator, loss, optimiser, DeepSpeed, checkpoints."""

from typing import Literal

from pydantic import Field

from protocol.config.base import Section


class LearnerConfig(Section):
    estimator: Literal["treepo", "treerpo", "grpo"] = Field("treepo", description="Advantage estimator.")
    treepo_weighting: Literal["average", "group_size"] = Field(
        "average", description="TreePO: how subgroup advantages of a leaf's ancestors are combined (§1.5.2).")
    treepo_subtree_std_filter: bool = Field(False, description="TreePO: skip subgroups whose rewards have zero std.")
    whiten: bool = Field(True, description="TreePO: token-level whitening of advantages over the batch "
                         "(REINFORCE++; token-weighted mean, unbiased variance). GRPO and TreeRPO normalise per group.")
    treerpo_node_value: Literal["mean_children", "mean_leaves"] = Field(
        "mean_children", description="TreeRPO: node value = mean over children, or over descendant leaves.")
    treerpo_norm: Literal["none", "group", "batch"] = Field(
        "group", description="TreeRPO advantage normalisation: none = r - mean; group = / (sibling std + eps); "
        "batch = / (std of all centred values of the batch + eps).")
    adv_eps: float = Field(1e-6, gt=0, description="epsilon of (r - mean) / (std + eps).")
    filter_uniform_prompts: bool = Field(
        True, description="Leave out prompts whose leaves carry no signal (counted): all equally correct (the reward's "
        "`acc`, as DAPO filters), or, for rewards without correctness, all of one reward. The learner loop then fills "
        "its batch with trees that do carry signal (DAPO dynamic sampling, `fill_max_draws`).")
    fill_max_draws: int = Field(
        4, ge=1, description="Dynamic sampling: to fill a batch with prompts_per_step trees that carry signal, the "
        "learner draws at most this many x prompts_per_step trees; uniform ones are acknowledged and counted, not "
        "trained. If the draws run out it trains what it has (a batch with none makes no step and counts towards "
        "stop_after_skipped). 1 = no refill. Only with filter_uniform_prompts.")
    mask_truncated: bool = Field(
        False, description="Overlong masking (DAPO): leaves cut by the length cap (stop reason max_tokens or "
        "max_depth) are left out of the loss, counted; their rewards still count in the groups. Off by default: the "
        "reference shapes the reward with the overlong penalty instead (reward.overlong_*).")
    clip_low: float = Field(0.2, ge=0, description="PPO clip epsilon below 1.")
    clip_high: float = Field(0.28, ge=0, description="PPO clip epsilon above 1 (clip-higher).")
    dual_clip: float = Field(10.0, gt=1, description="Dual-clip c for negative advantages.")
    importance_cap: float = Field(2.0, gt=0, description="Truncation of the behaviour importance weight "
                                  "pi_prox / pi_behaviour (decoupled PPO).")
    off_policy: Literal["decoupled", "on_policy"] = Field(
        "decoupled", description="decoupled: the ratio is taken against the proximal policy (the weights at the start "
        "of the batch) and the actors' behaviour log-probs enter as a capped importance weight pi_prox / pi_behaviour; "
        "on_policy: plain PPO, the ratio against the behaviour log-probs.")
    kl_coef: float = Field(0.0, ge=0, description="KL penalty to the reference model (0 = no reference model).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each batch (PPO epochs).")
    mini_batches_per_batch: int = Field(
        1, ge=1, description="Optimizer steps per epoch: the batch's trees are split into this many mini-batches "
        "(fewer when the batch has fewer trees), each one optimizer step. With more than one update per batch a "
        "no-grad forward first computes the proximal log-probs at the batch's starting weights (once, not per epoch), "
        "so from the second update on the ratio pi / pi_prox moves and the PPO clip and dual clip act. The "
        "reference (§1.6): 512 prompts in 16 mini-batches of 32.")
    lr: float = Field(1e-6, gt=0, description="AdamW learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up over this many training steps (batches; every "
                              "optimizer step of one batch uses the same rate), then constant.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    prompts_per_step: int = Field(8, gt=0, description="Trees (prompts) per optimizer step.")
    packing: Literal["auto", "tree", "rows"] = Field(
        "auto", description="How a batch is laid out for the forward pass. tree: each tree's tokens once (its prompt "
        "and every shared segment forwarded once, with a tree attention mask), the loss expanded to the per-leaf rows' "
        "terms by gather, so it equals rows; rows: one padded row per leaf (the reference). auto: tree when the model "
        "supports it (sdpa, eager or flex_attention attention, no sliding window), else rows.")
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        "sdpa", description="The learner model's attention backend (transformers' attn_implementation). Tree packing "
        "takes sdpa (a boolean tree mask; dense, fine on CPU), eager (an additive mask) or flex_attention (a block-"
        "sparse BlockMask of the same tree predicate, for GPU: FlexAttention has no CPU backward); flash_attention_2 "
        "trains rows only.")
    micro_batch_tokens: int = Field(8192, gt=0, description="Token budget of one micro-batch: rows x longest row "
                                    "after padding, where a row is a leaf's sequence (rows packing) or a tree's "
                                    "unique tokens (tree packing); a longer single sequence is an error.")
    logit_chunk_tokens: int = Field(1024, gt=0, description="The LM head, log-softmax and entropy run on at most this "
                                    "many trained positions at a time; with more, each chunk is recomputed in the "
                                    "backward pass, so peak memory holds one chunk x vocabulary of logits.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Training dtype of the weights (DeepSpeed bf16 with fp32 master weights when bfloat16); "
        "auto = bfloat16 on GPU, float32 on CPU.")
    max_steps: int = Field(100, gt=0, description="Optimizer steps of the run.")
    max_minutes: float = Field(0.0, ge=0, description="End the run cleanly (checkpoint, export, exit 0, as on SIGTERM) "
                               "once this many minutes have passed since this process's first batch came (start-up and the wait for the "
                               "actors' first trees excluded; the first metrics row records both); 0 = no time limit.")
    stop_after_skipped: int = Field(50, ge=0, description="End the run early (checkpoint, export, exit 0) after this "
                                    "many batches in a row without a trained token: every group's rewards were equal, "
                                    "so the task is solved (or out of reach) for the policy. 0 never ends early.")
    checkpoint_every: int = Field(50, gt=0, description="Save a checkpoint every N steps.")
    push_every: int = Field(1, gt=0, description="Publish weights to actors every k steps.")
