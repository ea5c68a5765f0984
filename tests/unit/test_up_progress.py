from treepo.up import JsonlTail, reward_by_step


def test_jsonl_tail_returns_only_new_complete_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = JsonlTail(path)
    assert tail.new_rows() == []
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert tail.new_rows() == [{"step": 1}, {"step": 2}]
    with open(path, "a") as f:
        f.write('p": 3}\n')
    assert tail.new_rows() == [{"step": 3}]
    assert tail.new_rows() == []


def test_reward_curve_counts_skipped_batches_at_the_step_they_were_consumed():
    rows = [{"step": 1.0, "reward_mean": 0.5, "trees": 4.0}, {"step": 2.0, "reward_mean": 0.75, "trees": 4.0},
            {"step": 2.0, "reward_mean": 1.0, "trees": 4.0, "skipped": 1.0},  # equal rewards: no step
            {"step": 2.0, "reward_mean": 1.0, "trees": 8.0, "skipped": 1.0}, {"step": 3.0, "reward_mean": 0.0,
                                                                              "trees": 2.0}]
    assert reward_by_step(rows) == [(1.0, 0.5), (2.0, (0.75 * 4 + 4 + 8) / 16), (3.0, 0.0)]
