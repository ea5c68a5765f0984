"""Export rows and the inspect view of a tree, on the hand-built example tree."""

import io

import numpy as np
from rich.console import Console

from buffer.export import leaf_rows
from buffer.store import AdvantageRecord
from buffer.tree_view import render
from tests.factories import example_tree


def test_leaf_rows_follow_each_leaf_path():
    tree = example_tree(n_leaves=4, seg_tokens=8)  # 1->{2,3}, 4->{5,6}
    rows = leaf_rows(tree, AdvantageRecord("t0", "leaf", {3: 0.5}, 7), None)
    assert [r["leaf_id"] for r in rows] == [2, 3, 5, 6]
    r = rows[1]
    expect = np.concatenate([tree.segment(1).token_ids, tree.segment(3).token_ids]).tolist()
    assert r["path_token_ids"] == expect and r["n_tokens"] == 16
    assert r["versions"] == [3, 3] and r["min_version"] == 3 and r["max_version"] == 3
    assert r["reward"] == float(tree.rewards[1]) and r["stop_reason"] == "eos"
    assert r["advantage"] == 0.5 and rows[0]["advantage"] is None and r["trained_version"] == 7
    assert r["path_text"] is None and r["prompt"] == "1+1=?" and r["tree_id"] == "t0"
    decoded = leaf_rows(tree, None, lambda ids: f"<{len(ids)} ids>")  # never trained
    assert decoded[0]["path_text"] == "<16 ids>"
    assert (decoded[0]["advantage_level"], decoded[0]["advantage"], decoded[0]["trained_version"]) == (None,) * 3


def test_render_shows_segments_rewards_and_versions():
    tree = example_tree(n_leaves=2, seg_tokens=3)
    out = io.StringIO()
    Console(file=out, width=200).print(render(tree, lambda ids: "x" * len(ids), AdvantageRecord("t0", "leaf", {2: -0.25}, 5),
                                              width=40))
    text = out.getvalue()
    lines = text.splitlines()
    assert "t0" in lines[0] and "3 segments, 2 leaves, trained at v5 (leaf advantages)" in lines[0] and "1+1=?" in lines[0]
    assert "#1 v3 3 tok length: xxx" in text
    assert f"#2 v3 3 tok stop: xxx  reward={tree.rewards[0]:g} eos (acc=1) adv=-0.250" in text
    assert text.index("#1") < text.index("#2") < text.index("#3")
    ids_view = io.StringIO()
    Console(file=ids_view, width=200).print(render(tree))
    assert " ".join(map(str, tree.segment(1).token_ids.tolist())) in ids_view.getvalue()
