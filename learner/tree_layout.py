"""Tree packing: the trees of a micro-batch laid out so that the model forwards each unique token once.

The per-leaf rows of `learner.batch` forward a tree's prompt once per leaf and a segment once per
leaf under it. Here a *unit* (a whole tree, or a group of its rows when the tree alone exceeds the
token budget) is one row of the micro-batch holding each node once:

- tokens in DFS pre-order of the tree's nodes, prompt first, each node's tokens contiguous;
- `positions`: the token's position along its root-to-leaf path, which is its position in every
  per-leaf row that holds it (rotary embeddings are exact);
- `subtree_end`: the exclusive end of the subtree of the token's node. A query q may attend to a
  key k iff `k <= q < subtree_end[k]` (k is q itself, an earlier token of q's node, or a token of
  one of its ancestors): causal inside a node, no attention across branches or across units;
- `predictor`: the index of the token whose hidden state predicts this one. Inside a node that is
  the previous token; for a node's first token it is the last token of its parent (the last token
  of a node predicts the first token of EVERY child, so labels are never a shift by one);
- loss entries: one per (per-leaf row, token that row trains), in the order of the rows path, each
  naming the token, its advantage and its behaviour log-prob.

What each estimator trains is `learner.batch.trained_rows`, shared with the rows path: TreePO and
GRPO (level "leaf") train every token of a leaf's path with that leaf's advantage, so a token shared
by k leaves is k entries; TreeRPO (level "segment") trains each segment in exactly one row, so one
entry. The loss (`learner.forward`) computes each unique trained token's log-prob once, gathers
it into the entries and runs the unchanged `policy_loss` over them with the rows path's normaliser.
Each entry's value equals the rows path's value of the same (row, token), so the loss is the same
sum, and autograd gives a shared token the sum of its entries' gradients: the rows path's gradient.

Micro-batches: units sorted longest first and cut greedily so that units x longest unit (padded
tokens) stays within `learner.micro_batch_tokens`, as the rows path counts rows x longest row; but
here the tokens are unique ones. Padding tokens attend only to themselves (no empty softmax rows).
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import numpy as np
import torch

from learner.advantage.result import TreeAdvantages
from learner.batch import group_by_budget, trained_rows
from protocol.tree import ROOT_ID

Rows = list[tuple[int, dict[int, float]]]


@dataclass
class PackedUnit:
    """One tree (or a group of its rows) with each needed node once; indices are local to the unit."""

    tokens: np.ndarray  # int64 [n]
    positions: np.ndarray  # int64 [n]
    subtree_end: np.ndarray  # int64 [n]
    predictor: np.ndarray  # int64 [n], -1 for the first prompt token
    row_index: list[np.ndarray]  # per row: unit indices of the row's tokens (prompt + path), in order
    entry_token: np.ndarray  # int64 [E]: unit index of each loss entry's token
    entry_advantage: np.ndarray  # float32 [E]
    entry_logprob: np.ndarray  # float32 [E], behaviour log-prob

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def row_tokens(self) -> int:
        """Tokens the per-leaf rows of this unit forward."""
        return sum(len(r) for r in self.row_index)


def lay_out(ta: TreeAdvantages, rows: Rows) -> PackedUnit:
    """The unit holding the nodes on the paths of `rows` (a subset of `trained_rows(ta)`)."""
    tree = ta.tree
    prompt = tree.prompt_token_ids
    if len(prompt) == 0:
        raise ValueError(f"tree {tree.tree_id!r} has an empty prompt: its first response token has no predictor")
    needed = {n for leaf, _ in rows for n in tree.path_ids(leaf)}
    kids = tree.children()
    p = len(prompt)
    n_tokens = p + sum(int(tree.seg_lens[tree.index[n]]) for n in needed)
    tokens = np.empty(n_tokens, np.int64)
    positions = np.empty(n_tokens, np.int64)
    predictor = np.empty(n_tokens, np.int64)
    logprob = np.zeros(n_tokens, np.float32)
    tokens[:p], positions[:p], predictor[:p] = prompt, np.arange(p), np.arange(-1, p - 1)
    start, path_len, last = {ROOT_ID: 0}, {ROOT_ID: p}, {ROOT_ID: p - 1}
    order, cursor, stack = [], p, [ROOT_ID]
    while stack:  # DFS pre-order; children in the tree's column order
        node = stack.pop()
        if node != ROOT_ID:
            i, parent = tree.index[node], tree.parent(node)
            a, b = int(tree.offsets[i]), int(tree.offsets[i + 1])
            k = b - a
            start[node] = cursor
            tokens[cursor:cursor + k] = tree.tokens[a:b]
            logprob[cursor:cursor + k] = tree.logprobs[a:b]
            positions[cursor:cursor + k] = path_len[parent] + np.arange(k)
            predictor[cursor:cursor + k] = np.arange(cursor - 1, cursor + k - 1)
            if k:
                predictor[cursor] = last[parent]
            path_len[node] = path_len[parent] + k
            last[node] = cursor + k - 1 if k else last[parent]
            order.append(node)
            cursor += k
        stack.extend(reversed([c for c in kids.get(node, []) if c in needed]))
    end = {n: start[n] + int(tree.seg_lens[tree.index[n]]) for n in order}
    end[ROOT_ID] = cursor
    for node in reversed(order):  # children come after their parent in pre-order
        parent = tree.parent(node)
        end[parent] = max(end[parent], end[node])
    subtree_end = np.full(n_tokens, cursor, np.int64)
    for node in order:
        subtree_end[start[node]:start[node] + int(tree.seg_lens[tree.index[node]])] = end[node]

    row_index, entry_token, entry_adv = [], [], []
    for leaf, trained in rows:
        parts = [np.arange(p)]
        for node in tree.path_ids(leaf):
            span = np.arange(start[node], start[node] + int(tree.seg_lens[tree.index[node]]))
            parts.append(span)
            if node in trained:
                entry_token.append(span)
                entry_adv.append(np.full(len(span), trained[node], np.float32))
        row_index.append(np.concatenate(parts))
    entry = np.concatenate(entry_token) if entry_token else np.zeros(0, np.int64)
    return PackedUnit(tokens=tokens, positions=positions, subtree_end=subtree_end, predictor=predictor,
                      row_index=row_index, entry_token=entry,
                      entry_advantage=np.concatenate(entry_adv) if entry_adv else np.zeros(0, np.float32),
                      entry_logprob=logprob[entry])


def tree_units(batch: list[TreeAdvantages], token_budget: int) -> list[PackedUnit]:
    """One unit per tree with something to train; a tree over `token_budget` unique tokens is cut into
    groups of consecutive rows (neighbouring leaves share the most), each group re-holding its prefix."""
    units = []
    for ta in batch:
        rows = trained_rows(ta)
        if not rows:
            continue
        whole = lay_out(ta, rows)
        if len(whole) <= token_budget:
            units.append(whole)
            continue
        group: Rows = []
        fitting = None  # the layout of `group`
        for row in rows:
            grown = lay_out(ta, [*group, row])
            if group and len(grown) > token_budget:
                units.append(fitting)
                group, grown = [], lay_out(ta, [row])
            group.append(row)
            fitting = grown
        units.append(fitting)
    return units


@dataclass
class PackedMicroBatch:
    """Units side by side ([B, T], right-padded) and the loss entries that read them.

    Indices into the micro-batch are flat (`b * T + t`)."""

    input_ids: torch.Tensor  # long [B, T]
    position_ids: torch.Tensor  # long [B, T]
    subtree_end: torch.Tensor  # long [B, T]; a padding token's is its own index + 1
    targets: torch.Tensor  # long [U]: flat index of each unique trained token
    predictors: torch.Tensor  # long [U]: flat index of the hidden state that predicts it
    entry_slots: torch.Tensor  # long [E]: index into `targets` of each loss entry
    advantages: torch.Tensor  # float32 [E]
    behaviour_logprobs: torch.Tensor  # float32 [E]
    real_tokens: int  # tokens forwarded, padding excluded
    row_tokens: int  # tokens the per-leaf rows of the same trees forward

    @property
    def trained_tokens(self) -> int:
        return len(self.entry_slots)

    @property
    def head_positions(self) -> int:
        """Positions that go through the LM head: each unique trained token once."""
        return len(self.targets)

    def to(self, device: torch.device) -> PackedMicroBatch:
        return PackedMicroBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})


def collate_units(units: SequenceOf[PackedUnit], pad_id: int, pad_multiple: int = 1) -> PackedMicroBatch:
    """Right-pad units to the longest (rounded up to `pad_multiple`) and index their entries."""
    width = max(len(u) for u in units)
    width = -(-width // pad_multiple) * pad_multiple
    b = len(units)
    input_ids = np.full((b, width), pad_id, np.int64)
    position_ids = np.zeros((b, width), np.int64)
    subtree_end = np.tile(np.arange(1, width + 1, dtype=np.int64), (b, 1))
    entry_flat, predictor_of = [], np.full(b * width, -1, np.int64)
    for i, u in enumerate(units):
        n = len(u)
        input_ids[i, :n], position_ids[i, :n], subtree_end[i, :n] = u.tokens, u.positions, u.subtree_end
        predictor_of[i * width + 1:i * width + n] = u.predictor[1:] + i * width
        entry_flat.append(u.entry_token + i * width)
    flat = np.concatenate(entry_flat)
    targets, slots = np.unique(flat, return_inverse=True)
    return PackedMicroBatch(
        input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(position_ids),
        subtree_end=torch.from_numpy(subtree_end), targets=torch.from_numpy(targets),
        predictors=torch.from_numpy(predictor_of[targets]), entry_slots=torch.from_numpy(slots.astype(np.int64)),
        advantages=torch.from_numpy(np.concatenate([u.entry_advantage for u in units])),
        behaviour_logprobs=torch.from_numpy(np.concatenate([u.entry_logprob for u in units])),
        real_tokens=sum(len(u) for u in units), row_tokens=sum(u.row_tokens for u in units))


def pack_units(units: list[PackedUnit], token_budget: int, pad_id: int, pad_multiple: int = 1) -> list[PackedMicroBatch]:
    """Micro-batches of padded size (units x longest) <= token_budget; longest units first."""
    return [collate_units(g, pad_id, pad_multiple) for g in group_by_budget(units, token_budget)]


def empty_packed_micro_batch(pad_id: int, pad_multiple: int = 1) -> PackedMicroBatch:
    """Two pad tokens with no loss entry: lets a rank with less data join a collective backward pass."""
    pad = np.full(2, pad_id, np.int64)
    unit = PackedUnit(tokens=pad, positions=np.arange(2), subtree_end=np.arange(1, 3), predictor=np.arange(-1, 1),
                      row_index=[], entry_token=np.zeros(0, np.int64), entry_advantage=np.zeros(0, np.float32),
                      entry_logprob=np.zeros(0, np.float32))
    mb = collate_units([unit], pad_id, pad_multiple)
    mb.real_tokens = 0
    return mb
