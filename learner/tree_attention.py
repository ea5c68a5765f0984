"""The tree attention mask of a packed micro-batch (`learner.tree_layout`), in the form each attention
backend of transformers takes, and the check that a model can be trained tree-packed at all.

The predicate: query q may attend to key k iff `k <= q < subtree_end[k]`, i.e. k is an ancestor-or-self
token of q in the same unit. transformers passes a prepared 4-D mask (or a BlockMask) through unchanged,
so the model's own causal mask is not applied on top:

- sdpa: a boolean [B, 1, T, T] mask (True = attend). With a mask given, SDPA does not use `is_causal`.
  Every row attends to at least itself (padding tokens attend only to themselves), so no softmax row
  is empty.
- eager: the same as an additive mask (0 where allowed, the dtype's minimum elsewhere): eager attention
  ADDS the mask to the scores, so a boolean mask would be silently wrong.
- flex_attention (GPU): a BlockMask built from the same predicate, O(T) memory; T is padded to a
  multiple of `FLEX_BLOCK` by the layout so blocks tile the sequence.

Refused: flash_attention_* (it derives sequence boundaries from position-id resets, wrong for trees) and
sliding-window models (the 4-D mask would silently replace the window).
"""

from __future__ import annotations

import torch

TREE_ATTENTION = frozenset({"sdpa", "eager", "flex_attention"})
FLEX_BLOCK = 128


def tree_packing_refusal(config) -> str | None:
    """Why a model with this HF config cannot be trained tree-packed, or None when it can."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in TREE_ATTENTION:
        return (f"attention implementation {impl!r} cannot take a tree mask (supported: {sorted(TREE_ATTENTION)}); "
                f"use learner.packing: rows")
    if any("sliding" in t for t in getattr(config, "layer_types", None) or ()):
        return "the model has sliding-window layers, which a tree mask would silently replace; use learner.packing: rows"
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return (f"the model has a {config.sliding_window}-token sliding window, which a tree mask would silently "
                f"replace; use learner.packing: rows")
    return None


def pad_multiple(config) -> int:
    """What the layout pads T to for this model's attention backend."""
    return FLEX_BLOCK if config._attn_implementation == "flex_attention" else 1


def dense_tree_mask(subtree_end: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: mask[b, 0, q, k] = k <= q < subtree_end[b, k]."""
    t = subtree_end.shape[-1]
    idx = torch.arange(t, device=subtree_end.device)
    return ((idx[None, :] <= idx[:, None])[None] & (idx[None, :, None] < subtree_end[:, None, :]))[:, None]


def flex_tree_mask(subtree_end: torch.Tensor):
    """A FlexAttention BlockMask of the same predicate (blocks of `FLEX_BLOCK`; T must be a multiple of it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = subtree_end.shape

    def tree(batch, head, q, k):
        return (k <= q) & (q < subtree_end[batch, k])

    return create_block_mask(tree, B=b, H=None, Q_LEN=t, KV_LEN=t, device=subtree_end.device, BLOCK_SIZE=FLEX_BLOCK)


def tree_attention_mask(subtree_end: torch.Tensor, config, dtype: torch.dtype):
    """The mask argument for a model whose HF config is `config`, computing in `dtype`."""
    impl = config._attn_implementation
    if impl == "flex_attention":
        return flex_tree_mask(subtree_end)
    dense = dense_tree_mask(subtree_end)
    if impl == "sdpa":
        return dense
    if impl == "eager":
        return torch.zeros(dense.shape, dtype=dtype, device=dense.device).masked_fill_(~dense, torch.finfo(dtype).min)
    raise ValueError(tree_packing_refusal(config))
