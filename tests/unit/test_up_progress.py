from protocol.config.evaluation import EvalConfig
from treepo.up import JsonlTail, eval_summary, reward_by_step


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


def test_eval_summary_gives_the_paired_gain_of_the_last_evaluation_over_the_first():
    counts = {"eval_problems": 3.0, "eval_overlap": 0.0}
    evals = [{"step": 0.0, "all/mean@4": 0.25, "all/maj@4": 0.5, **counts},
             {"step": 10.0, "all/mean@4": 0.4, "all/maj@4": 0.6, **counts},
             {"step": 14.0, "all/mean@4": 0.5, "all/maj@4": 0.75, **counts}]
    row = {"k": 4, "sampling": "sequential", "time": 0.0}
    problems = [{**row, "step": 0, "accuracy": {"a": 0.0, "b": 0.25, "c": 0.5}},
                {**row, "step": 14, "accuracy": {"a": 0.25, "b": 0.5, "c": 0.75}}]  # +0.25 on every problem
    assert eval_summary(EvalConfig(k=4), evals, problems) == (
        "held-out mean@4 0.250 -> 0.500 (versions 0 -> 14) on 3 unseen problems: gain +0.250, 95% interval "
        "[+0.250, +0.250] (paired bootstrap over problems); maj@4 0.500 -> 0.750")
    tree = [{"step": e["step"], "all/leaf_accuracy": e["all/mean@4"], "all/leaf_majority": e["all/maj@4"],
             "eval_problems": 3.0, "eval_overlap": 1.0} for e in evals]
    assert eval_summary(EvalConfig(k=4, sampling="tree"), tree, problems) == (
        "eval (1 of 3 problems also in training) leaf_accuracy 0.250 -> 0.500 (versions 0 -> 14) on 3 problems: "
        "gain +0.250, 95% interval [+0.250, +0.250] (paired bootstrap over problems); leaf_majority 0.500 -> 0.750")
