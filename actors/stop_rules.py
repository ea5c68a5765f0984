"""Termination rules of a TreePO path after each segment (ALGORITHMS.md §1.3.3), first match wins.

0. repetition (only when `repetition_rule="most_prioritized"`);
1. answer finished -> "finished": a complete \\boxed{} and EOS in the segment (`boxed_and_eos_first`),
   or the boxed answer alone (`boxed_as_eos`);
2. EOS without a boxed answer -> "eos";
3. total response length >= the cap -> "max_tokens";
4. depth >= max depth -> "max_depth";
5. repetition (`least_prioritized`, the effective reference setting) -> "repetition";
otherwise the path stays active (None). The rules look at the new segment only, as the reference
does. EOS means the engine stopped on a stop token (`finish == "stop"`), wherever it sits (the
reference's reverse search skipped index 0; not reproduced).
"""

from __future__ import annotations

from collections import Counter

from actors.boxed import last_boxed
from protocol.config.rollout import RolloutConfig
from protocol.tree import StopReason


def is_repetitive(text: str, window: int, min_count: int) -> bool:
    """True if some `window`-character substring occurs >= `min_count` times (overlapping count)."""
    if len(text) < window + min_count - 1:
        return False
    counts = Counter(text[i:i + window] for i in range(len(text) - window + 1))
    return max(counts.values()) >= min_count


def classify(cfg: RolloutConfig, seg_text: str, finish: str, total_tokens: int, max_tokens: int,
             depth: int) -> StopReason | None:
    """Why the path that just grew this segment ends, or None if it stays active."""
    rep = (cfg.repetition_rule != "off"
           and is_repetitive(seg_text, cfg.repetition_window_chars, cfg.repetition_min_count))
    eos = finish == "stop"
    if rep and cfg.repetition_rule == "most_prioritized":
        return "repetition"
    boxed = last_boxed(seg_text) is not None
    if boxed and (eos or cfg.finish_rule == "boxed_as_eos"):
        return "finished"
    if eos:
        return "eos"
    if total_tokens >= max_tokens:
        return "max_tokens"
    if depth >= cfg.max_depth:
        return "max_depth"
    if rep:
        return "repetition"
    return None
