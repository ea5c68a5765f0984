"""Admission: how many new prompts (permits) the buffer may deal so that no generated tree goes stale.

Computes

    lag     = max(0, learner_version - actor_version)        (0 when the actor's version is unknown)
    window  = B * (S + 1 - lag)                              trees the learner can still use in time
    permits = max(0, min(window, cap) - unconsumed - leased)

with B = trees per optimizer step (learner.prompts_per_step), S = buffer.max_staleness,
cap = buffer.max_unconsumed_trees, `unconsumed` = complete trees not yet taken by the learner and
`leased` = prompts being grown now.

Why: the learner takes trees first in, first out, B per step, and its version goes up by one per
step. A tree started now by an actor at version v_a has k = unconsumed + leased trees ahead of it,
so it is trained in step floor(k / B) from now, at learner version learner_version + floor(k / B);
its staleness is then learner_version + floor(k / B) - v_a (its oldest segment is at least v_a),
which is <= S exactly when k < B * (S + 1 - lag). Simplifications: it assumes every granted prompt
becomes one tree and that the learner steps on B trees at a time; trees that finish out of order
can only be newer than assumed, so the bound is conservative for them.
"""

from __future__ import annotations


def permits(*, unconsumed: int, leased: int, learner_version: int, actor_version: int, trees_per_step: int,
            max_staleness: int, cap: int) -> int:
    """New prompts that may be started now (see the module docstring)."""
    lag = max(0, learner_version - actor_version) if actor_version >= 0 else 0
    window = trees_per_step * (max_staleness + 1 - lag)
    return max(0, min(window, cap) - unconsumed - leased)
