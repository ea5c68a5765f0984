"""Prompt-level filtering (DAPO dynamic sampling, ALGORITHMS.md §1.6): drop a prompt whose leaves
all share one reward, since every group-relative advantage of it is zero. A prompt with no leaf or
a single leaf is uniform too."""

from __future__ import annotations

from protocol.tree import Tree


def is_uniform(tree: Tree) -> bool:
    """True if all leaves of the tree have the same reward (or it has fewer than two leaves)."""
    return len(tree.rewards) < 2 or bool(tree.rewards.min() == tree.rewards.max())


def drop_uniform_prompts(trees: list[Tree]) -> tuple[list[Tree], int]:
    """The trees with reward spread, and how many were dropped."""
    kept = [t for t in trees if not is_uniform(t)]
    return kept, len(trees) - len(kept)
