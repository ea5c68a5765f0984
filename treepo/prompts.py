"""Prompt sources: reasoning-gym generators and {prompt, answer} files, rendered with the chat template.

- reasoning_gym: `size` entries of each named generator (gsm_symbolic, basic_arithmetic, chain_sum,
  countdown, ...), seeded; the entry is kept so its own scorer can grade the answer.
- jsonl / parquet: one row per prompt with string fields `prompt` and `answer` (GSM8K, MATH-500, ...
  converted by the user); an optional `id` field names the prompt.
Each prompt becomes a user message (after the configured system message) of the tokenizer's chat
template with the generation prompt appended, and is left-truncated to `max_prompt_tokens`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.config.prompts import PromptsConfig


@dataclass
class PromptItem:
    prompt_id: str
    text: str  # the question as given (before the chat template)
    answer: str  # the gold answer
    token_ids: np.ndarray  # int32, chat-templated prompt
    entry: dict[str, Any] = field(default_factory=dict)  # the reasoning-gym entry (for its scorer), else empty
    tree_id: str = ""  # the buffer's lease id, which names the tree; "" = the sampler names it


def raw_rows(cfg: PromptsConfig) -> list[dict[str, Any]]:
    """Rows {id, prompt, answer, entry} of the configured source, in source order."""
    if cfg.source == "reasoning_gym":
        import reasoning_gym

        rows = []
        for name in cfg.datasets:
            args = cfg.dataset_args.get(name, {})
            for i, entry in enumerate(reasoning_gym.create_dataset(name, size=cfg.size, seed=cfg.seed, **args)):
                rows.append({"id": f"{name}-{cfg.seed}-{i}", "prompt": entry["question"],
                             "answer": str(entry["answer"]), "entry": entry})
        return rows
    path = Path(cfg.path)
    if cfg.source == "jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    return [{"id": str(r.get("id", f"{path.stem}-{i}")), "prompt": str(r["prompt"]), "answer": str(r["answer"]),
             "entry": {}} for i, r in enumerate(records)]


def render(tokenizer, cfg: PromptsConfig, question: str) -> np.ndarray:
    """Token ids of the chat-templated prompt (system message if configured), left-truncated."""
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids[-cfg.max_prompt_tokens:], dtype=np.int32)


def load_prompts(cfg: PromptsConfig, tokenizer) -> list[PromptItem]:
    return [PromptItem(prompt_id=r["id"], text=r["prompt"], answer=r["answer"],
                       token_ids=render(tokenizer, cfg, r["prompt"]), entry=r["entry"])
            for r in raw_rows(cfg)]
