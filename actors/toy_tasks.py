"""Toy rewards for plumbing demos and end-to-end tests on the tiny random model.

A random-init model cannot solve prompts, so a task whose reward depends on the prompt gives no
signal. These rewards depend only on the completion's surface, which a tiny model can learn in
tens of steps: a rising curve proves that rollouts, rewards, advantages, the loss, the optimizer
and the weight push are wired together, not that the model reasons.
"""

from __future__ import annotations


def lowercase_fraction(completion: str, answer: str = "") -> float:
    """Fraction of the completion's whitespace-separated words that are entirely lowercase letters (0 if none)."""
    words = completion.split()
    if not words:
        return 0.0
    return sum(w.isalpha() and w.islower() for w in words) / len(words)
