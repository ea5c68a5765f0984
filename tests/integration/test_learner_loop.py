"""The learner process loop against a real Redis: batches are filled with trees that carry signal (uniform
ones acknowledged and counted), a batch that trains no token makes no step, a run without signal ends."""

import json
import threading

import pytest

from buffer.store import TreeStore, min_version
from learner.loop import LearnerLoop
from protocol.codec import encode
from protocol.config.pipeline import PipelineConfig
from protocol.messages import SubtreeMsg
from tests.fixtures.learner import tree_from_edges, worked_example_tree

pytestmark = pytest.mark.integration


def test_a_batch_without_signal_makes_no_step_and_the_loop_goes_on(redis_server, tiny_model_dir, tmp_path):
    cfg = PipelineConfig.model_validate({
        "run": {"run_id": "loop", "output_dir": str(tmp_path)},
        "buffer": {"redis_url": redis_server.url, "max_staleness": 8},
        "weights": {"address": "tcp://127.0.0.1:*"},
        "learner": {"prompts_per_step": 1, "max_steps": 2, "push_every": 1, "checkpoint_every": 1,
                    "micro_batch_tokens": 64, "warmup_steps": 0, "fill_max_draws": 1},  # no refill
    })
    store = TreeStore.from_config(redis_server.client(), cfg)
    flat = tree_from_edges({1: 0, 2: 0}, {1: 1.0, 2: 1.0}, tree_id="flat")  # equal rewards: filtered, no token
    trees = [worked_example_tree(tree_id="a"), flat, worked_example_tree(tree_id="b")]
    for t in trees:
        t.run_id = "loop"
        msg = SubtreeMsg(key=f"{t.tree_id}/0", actor_id="a", seq=0, tree=t, final=True, n_pieces=1)
        assert store.store_whole(t.tree_id, encode(msg), min_version(t)) == b"stored"
    loop = LearnerLoop(cfg, tiny_model_dir, threading.Event())
    try:
        loop.run()  # a skipped batch used to publish the same version again: ValueError
        assert loop.learner.step_count == 2 and loop.learner.policy_version == 2
        assert loop.publisher._latest.version == 2
        assert (store.counters()["consumed"], store.counters()["uniform_skips"]) == (2, 1)
        rows = [json.loads(line) for line in (tmp_path / "metrics" / "learner.jsonl").read_text().splitlines()]
        assert [r["skipped"] for r in rows] == [0.0, 1.0, 0.0]
        read_by_up = ("step", "time", "iteration_s", "trees", "reward_mean", "row_tokens_per_s", "staleness_mean",
                      "tree_version_min", "policy_version", "idle_fraction")  # `treepo up`'s progress line
        assert all(k in r for r in rows for k in read_by_up)  # a skipped row lacked tokens_per_s: up crashed
        assert (rows[1]["step"], rows[1]["policy_version"], rows[1]["row_tokens_per_s"]) == (1.0, 1.0, 0.0)
    finally:
        loop.close()


def test_a_run_without_signal_ends_early_with_a_checkpoint(redis_server, tiny_model_dir, tmp_path):
    cfg = PipelineConfig.model_validate({
        "run": {"run_id": "solved", "output_dir": str(tmp_path)},
        "buffer": {"redis_url": redis_server.url, "max_staleness": 8},
        "weights": {"address": "tcp://127.0.0.1:*"},
        "learner": {"prompts_per_step": 1, "max_steps": 5, "stop_after_skipped": 2, "micro_batch_tokens": 64,
                    "fill_max_draws": 2},
    })
    store = TreeStore.from_config(redis_server.client(), cfg)
    for i in range(4):  # every tree has equal rewards: the task is "solved"
        t = tree_from_edges({1: 0, 2: 0}, {1: 1.0, 2: 1.0}, tree_id=f"flat{i}")
        t.run_id = "solved"
        msg = SubtreeMsg(key=f"{t.tree_id}/0", actor_id="a", seq=0, tree=t, final=True, n_pieces=1)
        assert store.store_whole(t.tree_id, encode(msg), min_version(t)) == b"stored"
    loop = LearnerLoop(cfg, tiny_model_dir, threading.Event())
    try:
        loop.run()  # without the limit it waits for a batch with signal forever
        # two batches of two draws each, none with signal: nothing trained, every tree acknowledged
        assert loop.learner.step_count == 0
        assert (store.counters().get("consumed", 0), store.counters()["uniform_skips"]) == (0, 4)
        assert (tmp_path / "checkpoints" / "latest").exists() and any((tmp_path / "export").iterdir())
    finally:
        loop.close()


def test_a_run_ends_on_time_with_a_checkpoint_and_export(redis_server, tiny_model_dir, tmp_path):
    cfg = PipelineConfig.model_validate({
        "run": {"run_id": "timed", "output_dir": str(tmp_path)},
        "buffer": {"redis_url": redis_server.url, "max_staleness": 8},
        "weights": {"address": "tcp://127.0.0.1:*"},
        "learner": {"prompts_per_step": 1, "max_steps": 50, "max_minutes": 1e-6, "micro_batch_tokens": 64},
    })
    store = TreeStore.from_config(redis_server.client(), cfg)
    t = worked_example_tree(tree_id="w")
    t.run_id = "timed"
    store.store_whole("w", encode(SubtreeMsg(key="w/0", actor_id="a", seq=0, tree=t, final=True)), min_version(t))
    stop = threading.Event()
    loop = LearnerLoop(cfg, tiny_model_dir, stop)
    try:
        loop.run()  # the clock starts at the first batch: one step, then the time is up and the run ends as on SIGTERM
        assert stop.is_set() and loop.learner.step_count == 1
        assert (tmp_path / "checkpoints" / "latest").exists() and any((tmp_path / "export").iterdir())
    finally:
        loop.close()


def test_a_batch_is_filled_with_trees_that_carry_signal(redis_server, tiny_model_dir, tmp_path):
    """DAPO dynamic sampling: 2 trees with signal per step; uniform trees drawn on the way are acknowledged,
    counted and kept in the store, not trained; the reward figures cover every tree drawn."""
    cfg = PipelineConfig.model_validate({
        "run": {"run_id": "fill", "output_dir": str(tmp_path)},
        "buffer": {"redis_url": redis_server.url, "max_staleness": 8, "retention": "keep_all"},
        "weights": {"address": "tcp://127.0.0.1:*"},
        "learner": {"prompts_per_step": 2, "max_steps": 2, "micro_batch_tokens": 64, "warmup_steps": 0},
    })
    store = TreeStore.from_config(redis_server.client(), cfg)
    order = ["u0", "s0", "u1", "u2", "s1", "s2", "u3", "s3"]  # u: every leaf correct; s: one right, one wrong
    for name in order:
        acc = {1: 1.0, 2: 1.0} if name[0] == "u" else {1: 1.0, 2: 0.0}
        t = tree_from_edges({1: 0, 2: 0}, {k: 2 * v - 1 for k, v in acc.items()}, acc=acc, tree_id=name)
        t.run_id = "fill"
        msg = SubtreeMsg(key=f"{t.tree_id}/0", actor_id="a", seq=0, tree=t, final=True, n_pieces=1)
        assert store.store_whole(t.tree_id, encode(msg), min_version(t)) == b"stored"
    loop = LearnerLoop(cfg, tiny_model_dir, threading.Event())
    try:
        loop.run()
        assert loop.learner.step_count == 2
        counters = store.counters()
        assert (counters["consumed"], counters["uniform_skips"], counters["unconsumed"]) == (4, 4, 0)
        assert all(store.load(name) is not None for name in order)  # set aside, not deleted
        rows = [json.loads(line) for line in (tmp_path / "metrics" / "learner.jsonl").read_text().splitlines()]
        # step 1 drew u0 s0 u1 u2 s1; step 2 drew s2 u3 s3
        assert [(r["trees_drawn"], r["uniform_fraction"], r["prompts"], r["skipped"]) for r in rows] == [
            (5.0, 0.6, 2.0, 0.0), (3.0, pytest.approx(1 / 3), 2.0, 0.0)]
        assert [r["trees"] for r in rows] == [5.0, 3.0] and rows[1]["uniform_skips"] == 4.0
        assert rows[0]["reward_mean"] == pytest.approx((3 * 1.0 + 2 * 0.0) / 5)
        updates = [json.loads(line) for line in (tmp_path / "metrics" / "learner_update.jsonl").read_text().splitlines()]
        assert [u["step"] for u in updates] == [1, 2]  # one optimizer update per step, numbered by DeepSpeed
        # the advantages each trained tree was trained with (GRPO-like pairs +1/-1 whitened), none for the uniform
        saved = {name: store.advantages(name) for name in order}
        assert {n for n, rec in saved.items() if rec is not None} == {"s0", "s1", "s2", "s3"}
        assert [saved[n].trained_version for n in ("s0", "s1", "s2", "s3")] == [0, 0, 1, 1]
        assert all(rec.level == "leaf" and rec.values[1] > 0 > rec.values[2] for rec in saved.values() if rec)
    finally:
        loop.close()


class Crash(Exception):
    pass


def _store_trees(store, run_id: str, trees) -> None:
    for t in trees:
        t.run_id = run_id
        msg = SubtreeMsg(key=f"{t.tree_id}/0", actor_id="a", seq=0, tree=t, final=True, n_pieces=1)
        assert store.store_whole(t.tree_id, encode(msg), min_version(t)) == b"stored"


def test_a_learner_killed_after_its_checkpoint_trains_every_tree_once_and_never_reuses_a_version(
        redis_server, tiny_model_dir, tmp_path, monkeypatch):
    """Steps 1-2 are checkpointed, step 3 is trained and logged, then the learner dies before its next checkpoint.
    The resumed learner acknowledges nothing twice, trains step 3's tree again (its update was lost), publishes
    its weights past every version already out, drops a tree grown by the lost weights (v3) and trains one grown
    by the checkpoint's (v2): in the final lineage every tree is trained exactly once."""
    import numpy as np

    from learner.trained_log import final_lineage

    def cfg(max_steps: int) -> PipelineConfig:
        return PipelineConfig.model_validate({
            "run": {"run_id": "crash", "output_dir": str(tmp_path)},
            "buffer": {"redis_url": redis_server.url, "max_staleness": 8},
            "weights": {"address": "tcp://127.0.0.1:*"},
            "learner": {"prompts_per_step": 1, "max_steps": max_steps, "checkpoint_every": 2,
                        "micro_batch_tokens": 64, "warmup_steps": 0},
        })

    store = TreeStore.from_config(redis_server.client(), cfg(3))
    _store_trees(store, "crash", [worked_example_tree(tree_id=f"a{i}") for i in range(6)])
    first = LearnerLoop(cfg(3), tiny_model_dir, threading.Event())

    def dies_before_the_last_checkpoint():
        raise Crash

    monkeypatch.setattr(first, "_finish", dies_before_the_last_checkpoint)
    with pytest.raises(Crash):
        first.run()
    first.close()
    c = store.counters()
    assert (c["consumed"], c["unconsumed"], store.version_high()) == (3, 3, 3)  # a2 trained, not acknowledged

    lost, fine = worked_example_tree(tree_id="lost"), worked_example_tree(tree_id="fine")
    lost.versions = np.full(len(lost.versions), 3, np.int32)  # grown by v3: weights no checkpoint holds
    fine.versions = np.full(len(fine.versions), 2, np.int32)  # grown by v2: the checkpoint's weights
    _store_trees(store, "crash", [lost, fine])
    second = LearnerLoop(cfg(7), tiny_model_dir, threading.Event())
    try:
        assert (second.learner.step_count, second.learner.policy_version) == (2, 4)  # v3 is never issued again
        assert second.publisher._latest.version == 4 and store.lineage_gaps() == [(2, 4)]
        second.run()
        assert (second.learner.step_count, second.learner.policy_version) == (7, 9)
    finally:
        second.close()
    c = store.counters()
    assert (c["consumed"], c["unconsumed"], c["lost_weights"]) == (7, 0, 1)
    assert store.r.scard(store.key("trained")) == 0 and store.r.xlen(store.key("stream")) == 0
    lineage = final_lineage(tmp_path / "metrics" / "trained_trees.jsonl")
    assert [step for step, _ in lineage] == [1, 2, 3, 4, 5, 6, 7]
    assert sorted(t for _, trees in lineage for t in trees) == sorted(["a0", "a1", "a2", "a3", "a4", "a5", "fine"])


def test_redis_gone_for_good_stops_the_learner_with_a_checkpoint_of_every_step(tiny_model_dir, tmp_path):
    """Redis dies after step 2 (checkpoints every 100 steps) and stays down past buffer.redis_retry_s: the
    learner stops, checkpoints step 2 and reports the outage (its process exits 1: `treepo up` restarts it).
    Redis back on its AOF, the resumed learner starts at step 2 and acknowledges both trees (none comes again)."""
    from buffer.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis").start()
    cfg = PipelineConfig.model_validate({
        "run": {"run_id": "gone", "output_dir": str(tmp_path / "run")},
        "buffer": {"redis_url": server.url, "max_staleness": 8, "redis_retry_s": 1.0},
        "weights": {"address": "tcp://127.0.0.1:*"},
        "learner": {"prompts_per_step": 1, "max_steps": 50, "checkpoint_every": 100, "micro_batch_tokens": 64,
                    "warmup_steps": 0},
    })
    store = TreeStore.from_config(server.client(), cfg)
    _store_trees(store, "gone", [worked_example_tree(tree_id=f"g{i}") for i in range(2)])
    stop = threading.Event()
    loop = LearnerLoop(cfg, tiny_model_dir, stop)

    def kill_after_two_steps():
        while loop.learner.step_count < 2:
            threading.Event().wait(0.05)
        # every write so far on disk first: under `appendfsync everysec` a SIGKILL may lose the last 1-2 s of
        # writes (Redis's documented window; a busy box postpones the AOF write), which this test is not about.
        # With `always`, Redis writes and fsyncs its AOF buffer before it replies to this command.
        server.client().config_set("appendfsync", "always")
        server.kill()

    killer = threading.Thread(target=kill_after_two_steps, daemon=True)
    killer.start()
    try:
        loop.run()  # waits for a third batch; Redis is gone; 1 s later the learner stops
    finally:
        loop.close()
    killer.join(timeout=5)
    assert stop.is_set() and loop.outage is not None and loop.learner.step_count == 2
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step2"
    server.start()  # same port, its AOF replayed
    try:
        assert store.counters()["consumed"] == 2 and store.r.scard(store.key("trained")) == 2  # not acknowledged
        second = LearnerLoop(cfg, tiny_model_dir, threading.Event())
        try:
            assert second.learner.step_count == 2
            assert store.r.scard(store.key("trained")) == 0 and store.r.xlen(store.key("stream")) == 0
        finally:
            second.close()
    finally:
        server.stop()
