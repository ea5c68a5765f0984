"""Prompt sources: reasoning-gym generators and {prompt, answer} files, rendered with the chat template.

- reasoning_gym: `size` entries of each named generator (gsm_symbolic, basic_arithmetic, chain_sum,
  countdown, ...), seeded; the entry is kept so its own scorer can grade the answer.
- jsonl / parquet: one row per prompt with string fields `prompt` and `answer` (GSM8K, MATH-500, ...
  converted by the user); an optional `id` field names the prompt.
Every row carries its problem key (`treepo.problem_keys`): the same for every wording of one problem.
`problem_space_warning` says when a reasoning-gym generator's rows hold fewer distinct problems than
`size` (its arguments leave a smaller problem space), or a file repeats problems.
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
from treepo.problem_keys import file_key, reasoning_gym_key


@dataclass
class PromptItem:
    prompt_id: str
    text: str  # the question as given (before the chat template)
    answer: str  # the gold answer
    token_ids: np.ndarray  # int32, chat-templated prompt
    entry: dict[str, Any] = field(default_factory=dict)  # the reasoning-gym entry (for its scorer), else empty
    tree_id: str = ""  # the buffer's lease id, which names the tree; "" = the sampler names it
    problem_key: str = ""  # the problem's key (treepo.problem_keys); "" = not keyed (an actor's leased prompt)


def raw_rows(cfg: PromptsConfig) -> list[dict[str, Any]]:
    """Rows {id, prompt, answer, entry, key} of the configured source, in source order (key: the problem key)."""
    if cfg.source == "reasoning_gym":
        import reasoning_gym

        rows = []
        for name in cfg.datasets:
            args = cfg.dataset_args.get(name, {})
            for i, entry in enumerate(reasoning_gym.create_dataset(name, size=cfg.size, seed=cfg.seed, **args)):
                rows.append({"id": f"{name}-{cfg.seed}-{i}", "prompt": entry["question"],
                             "answer": str(entry["answer"]), "entry": entry, "key": reasoning_gym_key(name, entry)})
        return rows
    path = Path(cfg.path)
    if cfg.source == "jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    return [{"id": str(r.get("id", f"{path.stem}-{i}")), "prompt": str(r["prompt"]), "answer": str(r["answer"]),
             "entry": {}, "key": file_key(r)} for i, r in enumerate(records)]


def render(tokenizer, cfg: PromptsConfig, question: str) -> np.ndarray:
    """Token ids of the chat-templated prompt (system message if configured), left-truncated."""
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids[-cfg.max_prompt_tokens:], dtype=np.int32)


def load_prompts(cfg: PromptsConfig, tokenizer) -> list[PromptItem]:
    return [PromptItem(prompt_id=r["id"], text=r["prompt"], answer=r["answer"],
                       token_ids=render(tokenizer, cfg, r["prompt"]), entry=r["entry"], problem_key=r["key"])
            for r in raw_rows(cfg)]


def problem_space_warning(cfg: PromptsConfig, rows: list[dict[str, Any]]) -> str | None:
    """What to warn about when the source's rows (`raw_rows(cfg)`) repeat problems. A file: any repeat. A
    reasoning-gym generator: fewer than 90% of its `size` items distinct, which (n draws from a space of N
    problems leave about N(1 - exp(-n/N)) distinct) means its problem space is less than about 5x `size`, so
    training covers much of it and few problems are left to hold out. None otherwise."""
    if cfg.source != "reasoning_gym":
        problems = len({r["key"] for r in rows})
        return (f"prompts: the {len(rows)} rows of {cfg.path} hold {problems} distinct problems"
                if problems < len(rows) else None)
    lines = []
    for name in cfg.datasets:
        problems = len({r["key"] for r in rows if r["key"].startswith(f"{name}:")})
        if problems < 0.9 * cfg.size:
            args = cfg.dataset_args.get(name)
            space = (f"dataset_args.{name} {{{', '.join(f'{k}: {v}' for k, v in args.items())}}}" if args else
                     f"{name} with its default arguments")
            lines.append(f"prompts: {cfg.size} generated {name} items hold {problems} distinct problems; the "
                         f"problem space of {space} is not much larger than prompts.size (training covers much "
                         f"of it, little is left to hold out)")
    return "; ".join(lines) or None
