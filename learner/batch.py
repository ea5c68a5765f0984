"""From trees with advantages to training data: one sequence per leaf, packed into micro-batches.

A sequence is prompt + the leaf's path tokens. Every array is aligned with the tokens: entry t
describes the prediction of token t (from the logits at t-1), so prompt positions carry no loss.

- level "leaf" (TreePO, GRPO): the leaf's advantage on every response token, loss mask 1 on the
  whole response. As in the reference, each leaf is its own full sequence, so a shared prefix
  segment is trained once per leaf under it, each copy with that leaf's advantage.
- level "segment" (TreeRPO): each segment's tokens are trained exactly once, as part of exactly
  one sequence: the first leaf (in `tree.leaf_ids` order) whose path passes through it. That
  sequence's loss mask covers the segments assigned to it; the rest of its path is context only.
  A leaf with no segment assigned to it is not built at all.

Packing (`pack`): sequences sorted by length (longest first) are cut greedily into micro-batches
whose padded size (rows x longest row) stays within the token budget; rows are right-padded, with
an attention mask and position ids 0..len-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from learner.advantage.result import TreeAdvantages


@dataclass
class Sequence:
    """One training row: prompt + response, with per-token advantage, behaviour log-prob and loss mask."""

    tokens: np.ndarray  # int32 [L]
    advantages: np.ndarray  # float32 [L], 0 on the prompt
    behaviour_logprobs: np.ndarray  # float32 [L], 0 on the prompt
    loss_mask: np.ndarray  # float32 [L], 1 where token t is trained

    def __len__(self) -> int:
        return len(self.tokens)


def _sequence(ta: TreeAdvantages, leaf: int, trained: dict[int, float]) -> Sequence:
    """The row of `leaf`, training the segments in `trained` (node id -> advantage)."""
    tree = ta.tree
    prompt = tree.prompt_token_ids
    path = tree.path_ids(leaf)
    adv = np.zeros(len(prompt) + sum(int(tree.seg_lens[tree.index[n]]) for n in path), np.float32)
    mask = np.zeros_like(adv)
    pos = len(prompt)
    for node in path:
        n = int(tree.seg_lens[tree.index[node]])
        if node in trained:
            adv[pos:pos + n] = trained[node]
            mask[pos:pos + n] = 1.0
        pos += n
    logprobs = np.concatenate([np.zeros(len(prompt), np.float32), tree.path_logprobs(leaf)])
    return Sequence(np.concatenate([prompt, tree.path_tokens(leaf)]).astype(np.int32), adv, logprobs, mask)


def trained_rows(ta: TreeAdvantages) -> list[tuple[int, dict[int, float]]]:
    """The tree's training rows as (leaf, {node id: advantage of the segments that row trains}), in leaf order.

    The one definition of what each estimator trains, shared by the per-leaf rows here and the
    tree-packed layout (`learner.tree_layout`)."""
    if ta.level == "leaf":
        return [(leaf, dict.fromkeys(ta.tree.path_ids(leaf), a)) for leaf, a in ta.values.items()]
    out, assigned = [], set()
    for leaf in ta.tree.leaf_ids.tolist():
        own = {n: ta.values[n] for n in ta.tree.path_ids(leaf) if n in ta.values and n not in assigned}
        if own:
            assigned.update(own)
            out.append((leaf, own))
    return out


def build_sequences(batch: list[TreeAdvantages]) -> list[Sequence]:
    """Training rows of the batch, in tree order then leaf order."""
    return [_sequence(ta, leaf, trained) for ta in batch for leaf, trained in trained_rows(ta)]


@dataclass
class MicroBatch:
    """Right-padded rows of one forward/backward pass."""

    input_ids: torch.Tensor  # long [B, T]
    attention_mask: torch.Tensor  # long [B, T]
    position_ids: torch.Tensor  # long [B, T]
    advantages: torch.Tensor  # float32 [B, T]
    behaviour_logprobs: torch.Tensor  # float32 [B, T]
    loss_mask: torch.Tensor  # float32 [B, T]

    @property
    def trained_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum().item())

    @property
    def row_tokens(self) -> int:
        """Tokens of the per-leaf rows: what this layout forwards."""
        return self.real_tokens

    @property
    def head_positions(self) -> int:
        """Positions that go through the LM head: every trained token of every row."""
        return self.trained_tokens

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(**{k: v.to(device) for k, v in vars(self).items()})


def collate(rows: list[Sequence], pad_id: int) -> MicroBatch:
    """Right-pad rows to the longest one."""
    width = max(len(r) for r in rows)

    def stack(field: str, fill: float, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((len(rows), width), fill, dtype=dtype)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.from_numpy(np.asarray(getattr(r, field)))
        return out

    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        attention[i, :len(r)] = 1
    positions = torch.arange(width).expand(len(rows), width).clone()
    return MicroBatch(input_ids=stack("tokens", pad_id, torch.long), attention_mask=attention,
                      position_ids=positions, advantages=stack("advantages", 0.0, torch.float32),
                      behaviour_logprobs=stack("behaviour_logprobs", 0.0, torch.float32),
                      loss_mask=stack("loss_mask", 0.0, torch.float32))


def group_by_budget(items: list, token_budget: int) -> list[list]:
    """Items (anything with a length in tokens) sorted longest first and cut greedily into groups whose
    padded size (items x longest) stays within `token_budget`."""
    too_long = [len(r) for r in items if len(r) > token_budget]
    if too_long:
        raise ValueError(f"a sequence of {max(too_long)} tokens exceeds learner.micro_batch_tokens={token_budget}")
    groups: list[list] = []
    for r in sorted(items, key=len, reverse=True):
        if groups and (len(groups[-1]) + 1) * len(groups[-1][0]) <= token_budget:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def pack(rows: list[Sequence], token_budget: int, pad_id: int) -> list[MicroBatch]:
    """Micro-batches of padded size (rows x longest) <= token_budget; longest rows first."""
    return [collate(g, pad_id) for g in group_by_budget(rows, token_budget)]


def split_mini_batches(batch: list[TreeAdvantages], n: int) -> list[list[TreeAdvantages]]:
    """The trees with something to train, in order, cut into at most `n` consecutive groups of sizes
    differing by at most one (fewer groups when there are fewer trees): one optimizer update each."""
    trained = [ta for ta in batch if ta.values]
    n = max(1, min(n, len(trained)))
    size, extra = divmod(len(trained), n)
    bounds = np.cumsum([0] + [size + (i < extra) for i in range(n)])
    return [trained[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def split_for_ranks(rows: list, world_size: int) -> list[list]:
    """Deal rows (or tree units: anything with a length in tokens) to data-parallel ranks, longest first,
    each to the rank with the fewest tokens so far."""
    shards: list[list] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for r in sorted(rows, key=len, reverse=True):
        k = load.index(min(load))
        shards[k].append(r)
        load[k] += len(r)
    return shards


def empty_micro_batch(pad_id: int) -> MicroBatch:
    """Two pad tokens with no loss: lets a rank with less data join a collective backward pass."""
    return collate([Sequence(np.full(2, pad_id, np.int32), np.zeros(2, np.float32), np.zeros(2, np.float32),
                             np.zeros(2, np.float32))], pad_id)
