"""The learner process: take batches of trees from the buffer under the staleness bound, train,
acknowledge, push the new weights to the actors, checkpoint. `treepo learner` runs it.

One iteration (policy version v -> v+1):
  1. rank 0 reads complete trees from the run's Redis stream (trees more than
     `buffer.max_staleness` versions behind v are dropped and counted by the source) until it holds
     `learner.prompts_per_step` that carry signal (DAPO dynamic sampling: with
     `filter_uniform_prompts`, a tree whose leaves are uniform is set aside, and more are drawn, up
     to `fill_max_draws` x prompts_per_step in all); with N ranks it hands the same trees to every
     rank, encoded with the protocol codec;
  2. `Learner.step(trees)` (advantages, loss, the optimizer updates; each rank trains its share);
  3. rank 0 marks the batch trained (`BatchSource.trained`: consumed, out of the admission count) and
     saves the advantages it trained with (one write per step: `TreeStore.save_advantages`); the
     trained trees stay pending in the stream until a checkpoint holds their update (the uniform trees
     drawn were set aside at once, `BatchSource.set_aside`, counter `uniform_skips`);
  4. every `push_every` steps the weights are published as version v+1 (newest-only per actor);
  5. every `checkpoint_every` steps, and at the end, a checkpoint that lists the trees trained since
     the previous one, which are acknowledged once it is saved; at the end also an export of the
     weights as a HF directory (`<output_dir>/export`).
Exactly once: a learner that crashes resumes from its latest checkpoint, acknowledges the trees that
checkpoint lists (in case it died before doing so), and reopens the trees trained after it, which
come again from the stream; so every stored tree within the staleness bound is trained once in the
final model's lineage (`metrics/trained_trees.jsonl` records each step's trees, and each resume).
Redis gone for longer than `buffer.redis_retry_s` stops the learner with a checkpoint (no step lost) and
an error exit, which `treepo up` restarts from that checkpoint.
Policy versions never repeat: the resumed weights are published as one past the highest version ever
published, and trees from the lost versions in between are dropped, counted (`buffer.lineage`).
Actors that started from the base weights, or hold lost ones, catch up before generating more.

Schedules: `async` lets actors generate while the learner trains (bounded by the staleness
admission of the buffer); `sync` is the same loop with max_staleness 0 (the config enforces it),
so the buffer grants new prompts only to actors holding the learner's current version: generate a
batch, train on it, push, repeat.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from buffer.client import Batch, BatchSource
from buffer.redis_server import OUTAGE_ERRORS, connect
from buffer.store import AdvantageRecord, TreeStore
from learner.advantage.filter import is_uniform
from learner.advantage.result import TreeAdvantages
from learner.distributed import collective_device, exit_cleanly, node_command
from learner.engine import Learner
from learner.forward import Sampling
from learner.trained_log import TrainedLog
from learner.weight_broadcast import BroadcastWeightPublisher
from learner.weight_push import ZmqWeightPublisher
from protocol.codec import decode, encode
from protocol.config.pipeline import PipelineConfig, load_config
from protocol.messages import SubtreeMsg
from protocol.role_process import add_config_argument, process_age_s, start_role
from protocol.tree import Tree
from treepo.models import materialise_model
from treepo.telemetry import MetricsSink

log = logging.getLogger("treepo.learner")


def tree_metrics(trees: list[Tree], learner_version: int) -> dict[str, float]:
    """Reward and staleness figures of a batch (before training on it)."""
    rewards = np.concatenate([t.rewards for t in trees])
    oldest = np.array([t.min_policy_version() for t in trees])
    newest = np.array([int(t.versions.max()) for t in trees])
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "leaves": float(len(rewards)), "trees": float(len(trees)),
            "staleness_mean": float((learner_version - oldest).mean()),
            "staleness_max": float((learner_version - oldest).max()),
            "versions_in_batch": float(len(np.unique(np.concatenate([t.versions for t in trees])))),
            "tree_version_min": float(oldest.min()), "tree_version_max": float(newest.max()),
            "tree_tokens": float(sum(t.unique_token_count() for t in trees))}


def advantage_records(trained: list[TreeAdvantages], version: int) -> list[AdvantageRecord]:
    """What a step trained with, as the store keeps it (`version`: the policy version the step started from)."""
    return [AdvantageRecord(ta.tree.tree_id, ta.level, ta.values, version) for ta in trained]


def broadcast_trees(trees: list[Tree] | None, rank: int, world: int) -> list[Tree]:
    """Rank 0's trees on every rank, as protocol bytes (no pickle) over the process group."""
    if world == 1:
        return trees or []
    import torch.distributed as dist

    device = collective_device()
    if rank == 0:
        blobs = [encode(SubtreeMsg(key=t.tree_id, actor_id="learner", seq=0, tree=t)) for t in trees or []]
        sizes = torch.tensor([len(b) for b in blobs], dtype=torch.int64, device=device)
        count = torch.tensor([len(blobs)], dtype=torch.int64, device=device)
    else:
        count = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(count, 0)
    if int(count) == 0:  # a batch whose trees were all set aside (uniform): nothing to send
        return []
    if rank != 0:
        sizes = torch.zeros(int(count), dtype=torch.int64, device=device)
    dist.broadcast(sizes, 0)
    flat = (torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8).to(device) if rank == 0
            else torch.zeros(int(sizes.sum()), dtype=torch.uint8, device=device))
    dist.broadcast(flat, 0)
    if rank == 0:
        return list(trees or [])
    raw, out, at = flat.cpu().numpy().tobytes(), [], 0
    for n in sizes.tolist():
        out.append(decode(raw[at:at + n]).tree)
        at += n
    return out


class LearnerLoop:
    def __init__(self, cfg: PipelineConfig, model_dir: Path, stop: threading.Event):
        self.cfg, self.stop = cfg, stop
        self.first_batch_at: float | None = None  # monotonic time the first batch came: `max_minutes` counts from it
        self.out = Path(cfg.run.output_dir)
        self.learner = Learner(cfg.learner, model_dir, seed=cfg.run.seed, sampling=Sampling.from_rollout(cfg.rollout))
        self.rank, self.world = self.learner.rank, self.learner.world
        self.ckpt_dir = self.out / "checkpoints"
        resumed = (self.ckpt_dir / "latest").exists()
        saved = self.learner.load_checkpoint(self.ckpt_dir) if resumed else {}
        self.unsaved: list[tuple[str, str]] = []  # entries trained since the last checkpoint (rank 0)
        self.outage: Exception | None = None  # Redis was gone for good (rank 0): the run stopped on it
        self.source = self.publisher = self.broadcaster = self.sink = self.redis = None
        version = self.learner.policy_version
        if self.rank == 0:
            self.redis = connect(cfg, stop=stop)
            store = TreeStore.from_config(self.redis.client, cfg)
            if resumed:
                version = self._resume_store(store, saved)
            self.source = BatchSource(store, "learner-0", cfg.buffer.max_staleness, cfg.buffer.claim_idle_s)
            self.publisher = ZmqWeightPublisher(cfg.weights, cfg.security, run_id=cfg.run.run_id)
            if cfg.weights.broadcast_actors:  # co-located actors: one collective broadcast, no TCP
                self.broadcaster = BroadcastWeightPublisher(cfg.weights, run_id=cfg.run.run_id)
            self.sink = MetricsSink(self.out / "metrics", "learner", prometheus_port=cfg.run.metrics_port,
                                    prometheus_host=cfg.run.metrics_host, wandb=cfg.run.wandb,
                                    run_id=cfg.run.run_id, config=cfg.model_dump(mode="json"))
            # one line per optimizer update (several per step with mini-batches), indexed by update count
            self.update_sink = MetricsSink(self.out / "metrics", "learner_update")
            # which trees each step trained (the lineage record `bench/chaos.py` audits)
            self.trained_log = TrainedLog(self.out / "metrics" / "trained_trees.jsonl")
            if resumed:
                self.trained_log.resumed(self.learner.step_count, version, self.learner.policy_version)
            self.uniform_skips = 0
        self.learner.policy_version = self._from_rank0(version)
        if self.rank == 0:
            self.source.store.set_learner_version(self.learner.policy_version)
        self._publish()

    def _resume_store(self, store: TreeStore, saved: dict) -> int:
        """Rank 0, resuming: acknowledge what the checkpoint holds, reopen what it does not, and the version to
        publish the checkpoint's weights as (past every version already published: `buffer.lineage`)."""
        lrn = self.learner
        held = store.ack([tuple(e) for e in saved["acks"]], kind="consumed")
        reopened = store.reopen_trained()
        high = store.version_high()
        version = lrn.policy_version
        lost = ""
        if high > version:
            store.add_lineage_gap(version, high + 1)
            version = high + 1
            lost = f" (versions {lrn.policy_version + 1}..{high} came from lost weights; their trees are dropped)"
        log.info("resumed at step %d from the checkpoint of policy version %d, published as version %d%s; %d trees "
                 "acknowledged with the checkpoint, %d trained after it come again", lrn.step_count,
                 lrn.policy_version, version, lost, held, reopened)
        return version

    def _from_rank0(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=collective_device())
        dist.broadcast(t, 0)
        return int(t.item())

    def _publish(self) -> bool:
        """Publish the current weights as the current version (collective); rank 0: whether they went out."""
        with self.learner.full_weights() as weights:  # collective under ZeRO-3
            if self.publisher is None:
                return False
            recorded = False
            with self._redis_outage_stops():  # recorded first: a version out without the record could be reused
                self.source.store.note_published(self.learner.policy_version)
                recorded = True
            if recorded:
                self.publisher.publish(self.learner.policy_version, weights)  # snapshots them before returning
                if self.broadcaster is not None:
                    self.broadcaster.publish(self.learner.policy_version, weights)
            return recorded

    def _checkpoint(self) -> None:
        """Save (collective), then acknowledge the trees whose updates the checkpoint now holds: a crash before
        the acknowledgement finds them in the checkpoint, one before the save finds them pending."""
        self.learner.save_checkpoint(self.ckpt_dir, {"acks": self.unsaved})
        if self.rank == 0:
            with self._redis_outage_stops():
                self.source.acknowledge(self.unsaved)
            self.unsaved = []

    def _next_batch(self) -> tuple[Batch, Batch]:
        """Rank 0 waits for a batch of trees with signal (or a stop) and returns it with the uniform trees
        drawn on the way; idle time is what the learner waited for data."""
        cfg = self.cfg.learner
        need = cfg.prompts_per_step
        limit = need * (cfg.fill_max_draws if cfg.filter_uniform_prompts else 1)
        batch, uniform = Batch(), Batch()
        while len(batch.trees) < need and len(batch.trees) + len(uniform.trees) < limit and not self._stopping():
            drawn = len(batch.trees) + len(uniform.trees)
            got = self.source.next_batch(min(need - len(batch.trees), limit - drawn), self.learner.policy_version,
                                         timeout_s=0.5)
            aside = Batch()
            for tree, entry in zip(got.trees, got.entries, strict=True):
                into = aside if cfg.filter_uniform_prompts and is_uniform(tree) else batch
                into.trees.append(tree)
                into.entries.append(entry)
            # acknowledged at once: trained by no lineage, and until then they would count against the admission
            # window, which could leave the actors no permit to grow the trees this batch still waits for
            self.source.set_aside(aside)
            uniform.trees += aside.trees
            uniform.entries += aside.entries
        return batch, uniform

    def _stopping(self) -> bool:
        """A stop signal came, or `learner.max_minutes` is spent (which then stops the run as SIGTERM does)."""
        limit, since = self.cfg.learner.max_minutes, self.first_batch_at
        if limit and since is not None and not self.stop.is_set() and time.monotonic() - since > 60 * limit:
            log.warning("learner.max_minutes=%g reached at step %d: checkpoint, export and stop", limit,
                        self.learner.step_count)
            self.stop.set()
        return self.stop.is_set()

    def _stop_requested(self) -> bool:
        """Whether to stop now (rank 0 decides, every rank follows)."""
        flag = torch.tensor([1 if self._stopping() else 0], device=collective_device())
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast(flag, 0)
        return bool(flag.item())

    def run(self) -> None:
        cfg, lrn = self.cfg.learner, self.learner
        skipped = 0  # batches in a row that trained no token
        startup: dict[str, float] = {}  # the first metrics row's start-up figures
        while lrn.step_count < cfg.max_steps:
            if cfg.stop_after_skipped and skipped >= cfg.stop_after_skipped:
                log.warning("ending at step %d of %d: %d batches in a row had no group with unequal rewards "
                            "(the task is solved, or out of reach, for this policy)", lrn.step_count,
                            cfg.max_steps, skipped)
                break
            t0 = time.perf_counter()
            batch, uniform = (Batch(), Batch()) if self.rank == 0 else (None, None)
            if self.rank == 0:
                with self._redis_outage_stops():
                    batch, uniform = self._next_batch()
            if self._stop_requested():
                break
            waited = time.perf_counter() - t0
            if self.first_batch_at is None:
                self.first_batch_at = time.monotonic()
                startup = {"startup_s": process_age_s(), "first_batch_wait_s": waited}
                log.info("start-up: first batch %.1f s after the process started (%.1f s of it waiting for the "
                         "actors); learner.max_minutes counts from here", startup["startup_s"], waited)
            trees = broadcast_trees(batch.trees if batch else None, self.rank, self.world)
            drawn = batch.trees + uniform.trees if self.rank == 0 else []  # the reward figures cover every tree drawn
            data = tree_metrics(drawn, lrn.policy_version) if self.rank == 0 else {}
            stepped_from, stepped_from_version = lrn.step_count, lrn.policy_version
            metrics = lrn.step(trees)
            # a batch without a trained token (every group filtered) makes no step: no new version to push or save
            stepped = lrn.step_count > stepped_from
            skipped = 0 if stepped else skipped + 1
            if self.rank == 0:
                self.unsaved += batch.entries  # first: the final checkpoint must list them even if Redis is gone
                with self._redis_outage_stops():
                    self.source.trained(batch, lrn.policy_version)
                    self.source.store.save_advantages(advantage_records(lrn.advantages, stepped_from_version))
            published = stepped and lrn.step_count % cfg.push_every == 0 and self._publish()
            if self.rank == 0:  # before the checkpoint: a checkpointed step is always in the log
                self.trained_log.batch(lrn.step_count, lrn.policy_version, stepped, published,
                                       [t.tree_id for t in trees])
            if stepped and lrn.step_count % cfg.checkpoint_every == 0:
                self._checkpoint()
            if self.sink is not None:
                total = time.perf_counter() - t0
                self.uniform_skips += len(uniform.trees)
                self.sink.log(lrn.step_count, {**data, **metrics, "wait_s": waited, "iteration_s": total,
                                               "idle_fraction": waited / total, "trees_drawn": float(len(drawn)),
                                               "uniform_fraction": len(uniform.trees) / len(drawn),
                                               "uniform_skips": float(self.uniform_skips),
                                               "stale_drops": float(self.source.stale_drops),
                                               "lost_weights_drops": float(self.source.lost_weights),
                                               "redis_retries": float(self.redis.client.get_retry().failures),
                                               **self._weight_metrics(), **startup})
                startup = {}
                first = lrn.engine.global_steps - len(lrn.updates)  # DeepSpeed counts optimizer steps (checkpointed)
                for i, update in enumerate(lrn.updates, start=1):
                    self.update_sink.log(first + i, update)
        self._finish()

    def _weight_metrics(self) -> dict[str, float]:
        """The weight push seen from rank 0: the learner's egress, actors fed through relays, placements the
        learner had to take beyond `weights.fanout` for want of a relay slot, failures."""
        if self.publisher is None:
            return {}
        routes = self.publisher.routes()
        return {"weight_egress_bytes": float(self.publisher.bytes_sent), "weight_actors": float(len(routes)),
                "weight_actors_via_relay": float(sum(parent is not None for parent in routes.values())),
                "weight_relay_overflow": float(self.publisher.server.tree.overflow),
                "weight_push_failures": float(self.publisher.failure_count)}

    def _finish(self) -> None:
        """The final checkpoint (and its acknowledgements), then the export."""
        self._checkpoint()
        self.learner.export(self.out / "export")

    @contextmanager
    def _redis_outage_stops(self) -> Iterator[None]:
        """Rank 0's Redis calls. Redis unreachable past `buffer.redis_retry_s` (`OutageRetry`) stops the learner
        as SIGTERM does: it goes on to its final checkpoint, which lists what these calls would have recorded,
        so no step since the last checkpoint is lost, and `run` then exits with an error (`treepo up` restarts it
        from that checkpoint). A stopping learner may find Redis stopped with it (a killed `treepo up` stops every
        role at once; the retry then gives up within seconds): no error. Any other failure is raised."""
        try:
            yield
        except OUTAGE_ERRORS as e:
            if self.stop.is_set():
                log.warning("stopping with Redis unreachable (%s): the final checkpoint holds what was not recorded", e)
                return
            self.outage = e
            log.error("Redis unreachable for buffer.redis_retry_s=%g s (%s): checkpoint at step %d, then exit",
                      self.cfg.buffer.redis_retry_s, e, self.learner.step_count)
            self.stop.set()

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        if self.broadcaster is not None:
            self.broadcaster.close()
        if self.sink is not None:
            self.sink.close()
            self.update_sink.close()
            self.trained_log.close()
        if self.redis is not None:
            self.redis.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--nnodes", type=int, default=1, help="machines the learner spans: this node starts "
                   "run.learner_ranks / nnodes ranks under torchrun, meeting the others at --master-addr (one node "
                   "with run.learner_ranks > 1: torchrun --standalone)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank among --nnodes (0 = the master)")
    p.add_argument("--master-addr", default="", help="address of node rank 0, reachable from every node")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port on the master node")


def run(args: argparse.Namespace) -> int:
    """`treepo learner`: train until learner.max_steps or SIGTERM/SIGINT (then checkpoint and export)."""
    ranks = load_config(args.config).run.learner_ranks
    if "RANK" not in os.environ and (args.nnodes > 1 or ranks > 1):  # this node's ranks, under torchrun
        argv = node_command(args.config, ranks, args.nnodes, args.node_rank, args.master_addr, args.master_port)
        os.execv(argv[0], argv)  # torchrun takes this process's place: SIGTERM reaches it, and it stops the ranks
    cfg, stop = start_role(args)
    model_dir = materialise_model(cfg.model, Path(cfg.run.output_dir) / "model")
    loop = LearnerLoop(cfg, model_dir, stop)
    try:
        loop.run()
    finally:
        loop.close()
    rc = 1 if loop.outage else 0  # checkpointed, but the run is not over: `treepo up` restarts the learner
    if loop.world > 1:  # STACK.md: a clean multi-process exit on CPU
        exit_cleanly(rc)
    return rc
