"""Prompt sources: JSONL and Parquet files written here, reasoning-gym generators; chat template."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from protocol.config.prompts import PromptsConfig
from treepo.prompts import load_prompts

ROWS = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "Half of 1?", "answer": "\\frac{1}{2}", "id": "half"}]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_jsonl_and_parquet(tmp_path, tok):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS]),
                   tmp_path / "p.parquet")
    got_j = load_prompts(PromptsConfig(source="jsonl", path=str(tmp_path / "p.jsonl"), system_prompt="SYS"), tok)
    got_p = load_prompts(PromptsConfig(source="parquet", path=str(tmp_path / "p.parquet"), system_prompt="SYS"), tok)
    assert [(p.prompt_id, p.text, p.answer) for p in got_j] == [("p-0", "What is 1+1?", "2"),
                                                               ("half", "Half of 1?", "\\frac{1}{2}")]
    assert [(p.prompt_id, p.answer) for p in got_p] == [("p-0", "2"), ("p-1", "\\frac{1}{2}")]
    text = tok.decode(got_j[0].token_ids.tolist())
    assert text == ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert got_p[0].token_ids.tolist() == got_j[0].token_ids.tolist()
    short = load_prompts(PromptsConfig(source="jsonl", path=str(tmp_path / "p.jsonl"), max_prompt_tokens=5), tok)
    assert short[0].token_ids.tolist() == got_j[0].token_ids.tolist()[-5:]  # left-truncated


def test_reasoning_gym_sources(tok):
    cfg = PromptsConfig(datasets=["gsm_symbolic", "basic_arithmetic", "chain_sum", "countdown"], size=3, seed=4)
    got = load_prompts(cfg, tok)
    assert len(got) == 12 and len({p.prompt_id for p in got}) == 12
    assert [p.entry["metadata"]["source_dataset"] for p in got[::3]] == cfg.datasets
    again = load_prompts(cfg, tok)
    assert [p.text for p in got] == [p.text for p in again]  # seeded
    assert all(p.text in tok.decode(p.token_ids.tolist()) and p.answer for p in got)


def test_reasoning_gym_generator_arguments(tok):
    easy = {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+"],
                                 "allow_parentheses": False, "allow_negation": False}}
    got = load_prompts(PromptsConfig(datasets=["basic_arithmetic"], dataset_args=easy, size=20, seed=3), tok)
    for p in got:  # "Calculate a + b." with one-digit operands (reasoning-gym draws them from 0..10)
        a, b = p.entry["metadata"]["expression"].split(" + ")
        assert 0 <= int(a) <= 10 and 0 <= int(b) <= 10 and int(p.answer) == int(a) + int(b)
    with pytest.raises(ValueError, match="dataset_args names generators not in datasets: \\['chain_sum'\\]"):
        PromptsConfig(datasets=["basic_arithmetic"], dataset_args={"chain_sum": {}})
