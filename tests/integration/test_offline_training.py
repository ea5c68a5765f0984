"""Offline training on stored trees (`treepo replay --train`) and what the learner computed, exported: the
offline learner trains (positive-advantage leaves gain log-probability, negative ones lose it) from a
source run it never writes to (its keys compared byte for byte), resumes from its own checkpoint, and
saves the advantages it trained with, which equal the estimator's and come out of `treepo export`
(JSONL and a `datasets` directory) and `treepo inspect` (text and an HTML page naming every node)."""

import json
from html.parser import HTMLParser
from xml.etree import ElementTree

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from buffer.store import TreeStore, min_version
from learner.advantage import compute_advantages
from protocol.codec import encode
from protocol.config.pipeline import load_config
from protocol.messages import SubtreeMsg
from tests.fixtures.learner import tree_from_edges, with_policy_logprobs, worked_example_tree
from tests.fixtures.redis import key_snapshot
from treepo.cli import main

pytestmark = pytest.mark.integration
SOURCE = "src"


def _trees(model) -> list:
    """Four prompts' trees as a run stores them: behaviour log-probs of `model`, policy versions 0..3."""
    trees = [worked_example_tree(tree_id="a"),
             tree_from_edges({1: 0, 2: 0, 3: 1, 4: 1}, {2: 1.0, 3: -1.0, 4: 0.5}, tree_id="b", first_token=300),
             tree_from_edges({1: 0, 2: 0, 3: 0}, {1: -1.0, 2: 1.0, 3: -1.0}, tree_id="c", first_token=600),
             worked_example_tree(tree_id="d", first_token=900)]
    for v, tree in enumerate(trees):
        tree.versions[:] = v
        with_policy_logprobs(tree, model)
    return trees


def _leaf_segment_logprob(model, tree, leaf: int) -> float:
    """Log-probability of the leaf's own last segment (its tokens are the leaf's alone) under `model`."""
    ids = torch.tensor(np.concatenate([tree.prompt_token_ids, tree.path_tokens(leaf)]), dtype=torch.long)[None]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(lp[-int(tree.seg_lens[tree.index[leaf]]):].sum())


@pytest.fixture
def source(redis_server, redis_client, tiny_model_dir, tmp_path):
    """A source run in Redis (its trees stored as the buffer stores them) and its config file."""
    from transformers import AutoModelForCausalLM

    trees = _trees(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    store = TreeStore(redis_client, SOURCE)
    for t in trees:
        store.store_whole(t.tree_id, encode(SubtreeMsg(key=f"{t.tree_id}/0", actor_id="a", seq=0, tree=t, final=True)),
                          min_version(t))
    cfg = {"run": {"run_id": SOURCE, "output_dir": str(tmp_path / "src")},
           "model": {"source": "path", "path": str(tiny_model_dir)},
           "buffer": {"redis_url": redis_server.url},
           "learner": {"lr": 1e-3, "warmup_steps": 0, "prompts_per_step": 4, "micro_batch_tokens": 256,
                       "checkpoint_every": 1},
           "replay": {"output_dir": str(tmp_path / "offline"), "epochs": 2}}
    path = tmp_path / "src.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, trees


def test_replay_train_trains_leaves_saves_advantages_and_leaves_the_source_untouched(source, redis_client,
                                                                                      tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    path, trees = source
    before = key_snapshot(redis_client, SOURCE)
    assert main(["replay", "--train", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "replay step 2/2 epoch 2/2" in printed and "replay trained 8 trees" in printed
    assert key_snapshot(redis_client, SOURCE) == before  # read only, byte for byte
    out = tmp_path / "offline"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trained = AutoModelForCausalLM.from_pretrained(out / "export", dtype=torch.float32)
    offline = load_config(out / "config.yaml")
    assert (offline.run.run_id, offline.replay.runs) == ("src-replay", [SOURCE])
    expected, _ = compute_advantages(trees, offline.learner)  # one batch of all four trees, as trained
    store = TreeStore.from_config(redis_client, offline)
    for ta in expected:
        saved = store.advantages(ta.tree.tree_id)
        assert saved.level == "leaf" and saved.trained_version == 1  # the second epoch's step
        assert saved.values == pytest.approx(ta.values, abs=1e-9)
        for leaf, adv in ta.values.items():
            moved = _leaf_segment_logprob(trained, ta.tree, leaf) - _leaf_segment_logprob(base, ta.tree, leaf)
            if abs(adv) > 0.3:
                assert np.sign(moved) == np.sign(adv), (ta.tree.tree_id, leaf, adv, moved)
    rows = [json.loads(line) for line in (out / "metrics" / "learner.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0.0, 1.0] and rows[0]["trees"] == 4.0

    # export: one row per leaf with the advantage it was trained with; and a `datasets` directory
    assert main(["export", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "adv.jsonl")]) == 0
    exported = [json.loads(line) for line in (tmp_path / "adv.jsonl").read_text().splitlines()]
    assert len(exported) == sum(len(t.leaf_ids) for t in trees)
    by_leaf = {(r["tree_id"], r["leaf_id"]): r for r in exported}
    for ta in expected:
        for leaf, adv in ta.values.items():
            row = by_leaf[(ta.tree.tree_id, leaf)]
            assert (row["advantage_level"], row["trained_version"]) == ("leaf", 1)
            assert row["advantage"] == pytest.approx(adv, abs=1e-9) and row["segment_advantages"] is None
    assert by_leaf[("b", 2)]["versions"] == [1] and by_leaf[("d", 3)]["min_version"] == 3
    assert main(["export", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    data_file = header["configs"][0]["data_files"][0]["path"]
    table = pq.read_table(tmp_path / "hf" / data_file)
    assert table.num_rows == len(exported) and f"{len(exported)} rows" in card
    assert all(f"| `{name}` |" in card for name in table.schema.names)
    assert table.to_pylist() == exported
    from datasets import load_dataset

    loaded = load_dataset(str(tmp_path / "hf"), split="train")  # what other tools do with it
    assert loaded.num_rows == len(exported) and loaded[0] == exported[0]

    # starting weights: this run's checkpoint (weights, optimizer and version 2 go on) or its exported model
    for init, version in ((out / "checkpoints", 2), (out / "export", 0)):
        again = tmp_path / f"from-{init.name}"
        assert main(["replay", "--train", "--config", str(path), "--epochs", "1", "--init", str(init),
                     "--out", str(again)]) == 0
        assert TreeStore.from_config(redis_client, load_config(again / "config.yaml")).advantages("a").trained_version \
            == version


def test_replay_goes_on_from_its_checkpoint_and_treerpo_saves_segment_advantages(source, redis_client, tmp_path,
                                                                                   capsys):
    path, trees = source
    assert main(["replay", "--train", "--config", str(path), "--epochs", "1", "--estimator", "treerpo",
                 "--max-version", "2"]) == 0
    assert "replay step 1/1 epoch 1/1" in capsys.readouterr().out
    # again on the same directory with 3 epochs: the checkpoint's position (epoch 1) is where it goes on
    assert main(["replay", "--train", "--config", str(path), "--epochs", "3", "--estimator", "treerpo",
                 "--max-version", "2"]) == 0
    printed = capsys.readouterr().out
    assert "replay step 2/3 epoch 2/3" in printed and "replay step 1/3" not in printed
    offline = load_config(tmp_path / "offline" / "config.yaml")
    store = TreeStore.from_config(redis_client, offline)
    assert store.tree_ids() == ["a", "b", "c"]  # versions 0..2
    saved = store.advantages("a")
    # TreeRPO on the worked example: groups {A,B}, {A1,A2}; {B1,B2} has no spread and is not trained
    assert saved.level == "segment" and saved.trained_version == 2 and set(saved.values) == {1, 2, 3, 4}
    assert main(["inspect", "a", "--config", str(tmp_path / "offline" / "config.yaml")]) == 0
    view = capsys.readouterr().out
    assert "trained at v2 (segment advantages)" in view and f"adv={saved.values[3]:+.3f}" in view


def test_a_version_range_without_trees_fails_naming_it(source, redis_client, tmp_path, capsys):
    path, _ = source
    assert main(["replay", "--train", "--config", str(path), "--min-version", "7", "--max-version", "9"]) == 2
    err = capsys.readouterr().err
    assert "no stored tree to train in runs ['src'] with policy versions in [7, 9]" in err
    # trees more than 1 version from the starting weights (the initial model: version 0) are left out
    assert main(["replay", "--train", "--config", str(path), "--epochs", "1", "--max-version-distance", "1"]) == 0
    assert TreeStore(redis_client, "src-replay").tree_ids() == ["a", "b"]


def test_inspect_html_draws_every_node(source, tmp_path, capsys):
    path, trees = source
    page = tmp_path / "a.html"
    assert main(["inspect", "b", "--config", str(path), "--html", str(page)]) == 0
    text = page.read_text()
    ElementTree.fromstring(text.split("\n", 1)[1])  # well-formed (XHTML) after the doctype

    class Ids(HTMLParser):
        ids: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.ids += [v for k, v in attrs if k == "id"]

    parser = Ids()
    parser.feed(text)
    assert parser.ids == ["node-root"] + [f"node-{n}" for n in trees[1].node_ids.tolist()]
    assert "not trained" in text and "hsl(120, 70%, 62%)" in text  # the best leaf (reward 1) is green
