"""Offline training on stored trees (`treepo replay --train`): a learner without actors.

1. Select, read only: the complete trees of `replay.runs` (default: `run.run_id`) in the config's Redis
   whose oldest segment's policy version lies in [replay.min_version, replay.max_version] and whose
   mean leaf reward lies in [replay.min_reward, replay.max_reward]. Left out and counted: trees
   without signal (with `learner.filter_uniform_prompts`) and, with `replay.max_version_distance`,
   trees too many versions from the starting weights. Nothing left is an error naming the filters.
2. The selected trees are copied into the offline run's own store (its own Redis under
   `replay.output_dir`, run id `replay.run_id`), so `treepo export` / `treepo inspect` with the
   offline run's config show them with the advantages this run trained them with. The source runs'
   keys are never written (a test compares them byte for byte).
3. Per epoch, in stored order (oldest version first) or a seeded permutation, batches of
   `learner.prompts_per_step` trees go through the same `Learner.step` as online training: the
   advantages of `learner.estimator` (which may differ from the source run's), the decoupled loss
   whose importance weight pi_prox / pi_behaviour against the stored behaviour log-probs is capped
   at `learner.importance_cap` (so trees from older policies are corrected, not dropped by a
   staleness bound). Per step: the advantages are saved (one write), metrics go to
   `metrics/learner.jsonl` + TensorBoard + a plain progress line, and the step's trees to
   `metrics/trained_trees.jsonl`. Every `learner.checkpoint_every` steps a checkpoint records the
   position (epoch, batch); a replay started again on the same directory goes on from it.
4. At the end: checkpoint, export (`<output_dir>/export`), and a summary line with trees/s.

Simplified against online training: one process (no data-parallel ranks), no weights are published,
`learner.max_steps` does not apply (the epochs bound the run), and a batch is cut from the selection in
order, with no refill (uniform trees were left out at selection).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from buffer.redis_server import connect
from buffer.store import TreeStore
from learner.advantage.filter import is_uniform
from learner.engine import Learner
from learner.forward import Sampling
from learner.loop import advantage_records, tree_metrics
from learner.trained_log import TrainedLog
from protocol.codec import decode
from protocol.config.pipeline import PipelineConfig, dump_config
from treepo.models import materialise_model
from treepo.telemetry import MetricsSink

log = logging.getLogger("treepo.replay")


class ReplayError(ValueError):
    """Offline training cannot start (nothing selected, clashing ids, a bad starting point)."""


@dataclass
class Selection:
    """The trees chosen for offline training: (tree id, codec bytes, oldest version), and what was left out."""

    trees: list[tuple[str, bytes, int]] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=lambda: {"reward": 0, "uniform": 0, "version_distance": 0})


def offline_config(source: PipelineConfig) -> PipelineConfig:
    """The offline run's config: the source's, in its own directory, run id and embedded Redis."""
    cfg = source.model_copy(deep=True)
    cfg.run.output_dir = source.replay.output_dir or f"{source.run.output_dir.rstrip('/')}-replay"
    cfg.run.run_id = source.replay.run_id or f"{source.run.run_id}-replay"
    cfg.buffer.data_dir = ""  # an embedded Redis lives under the offline run's directory, never the source's
    cfg.replay.runs = source.replay.runs or [source.run.run_id]
    cfg.replay.output_dir = cfg.replay.run_id = ""  # the offline run's own defaults (it is run.output_dir now)
    if Path(cfg.run.output_dir).resolve() == Path(source.run.output_dir).resolve():
        raise ReplayError("replay.output_dir resolves to the source run's directory")
    return cfg


def select(stores: list[TreeStore], cfg: PipelineConfig, reference_version: int | None) -> Selection:
    """Step 1 of the module docstring. `reference_version`: the starting weights' version (None: the newest
    selected tree's)."""
    r = cfg.replay
    lo = -math.inf if r.min_version is None else r.min_version
    hi = math.inf if r.max_version is None else r.max_version
    picked: list[tuple[str, bytes, int]] = []
    owner: dict[str, str] = {}
    sel = Selection()
    for store in stores:
        ids = store.tree_ids(lo, hi)
        for tree_id, blob in zip(ids, store.blobs(ids), strict=True):
            if blob is None:
                continue  # trimmed since the index was read
            if tree_id in owner:
                raise ReplayError(f"tree id {tree_id!r} is stored in runs {owner[tree_id]!r} and {store.run_id!r}: "
                                  "replay them separately")
            owner[tree_id] = store.run_id
            tree = decode(blob, store.limits).tree
            reward = float(tree.rewards.mean())
            if (r.min_reward is not None and reward < r.min_reward) or (r.max_reward is not None and reward > r.max_reward):
                sel.left_out["reward"] += 1
            elif cfg.learner.filter_uniform_prompts and is_uniform(tree):
                sel.left_out["uniform"] += 1
            else:
                picked.append((tree_id, blob, tree.min_policy_version()))
    if r.max_version_distance is not None and picked:
        ref = max(v for _, _, v in picked) if reference_version is None else reference_version
        kept = [t for t in picked if abs(t[2] - ref) <= r.max_version_distance]
        sel.left_out["version_distance"] = len(picked) - len(kept)
        picked = kept
    if not picked:
        raise ReplayError(
            f"no stored tree to train in runs {[s.run_id for s in stores]} with policy versions in "
            f"[{r.min_version if r.min_version is not None else '-inf'}, "
            f"{r.max_version if r.max_version is not None else '+inf'}] (replay.min_version/max_version)"
            f"; left out: {sel.left_out}")
    sel.trees = picked
    return sel


def epoch_order(tree_ids: list[str], order: str, seed: int, epoch: int) -> list[str]:
    """The trees of one epoch: as stored, or a permutation seeded by (seed, epoch)."""
    if order == "stored":
        return list(tree_ids)
    perm = np.random.default_rng([seed, epoch]).permutation(len(tree_ids))
    return [tree_ids[i] for i in perm]


class OfflineLoop:
    def __init__(self, source_cfg: PipelineConfig, stop: threading.Event):
        self.stop = stop
        self.cfg = cfg = offline_config(source_cfg)
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(cfg))
        self.ckpt_dir = self.out / "checkpoints"
        resumed = (self.ckpt_dir / "latest").exists()
        init = Path(cfg.replay.init) if cfg.replay.init else None
        from_checkpoint = init is not None and (init / "latest").exists()
        model_dir = self._model_dir(source_cfg, init, from_checkpoint)
        self.learner = Learner(cfg.learner, model_dir, seed=cfg.run.seed, sampling=Sampling.from_rollout(cfg.rollout))
        self.position = {"epoch": 0, "batch": 0}
        if resumed:
            self.position = self.learner.load_checkpoint(self.ckpt_dir)["position"]
        elif from_checkpoint:
            self.learner.load_checkpoint(init)
        self.own = connect(cfg, stop=stop)
        self.store = TreeStore.from_config(self.own.client, cfg)
        if not resumed:
            self._select_and_copy(source_cfg, None if init is not None and not from_checkpoint
                                  else self.learner.policy_version)
        self.tree_ids = self.store.tree_ids()
        self.sink = MetricsSink(self.out / "metrics", "learner")
        self.trained_log = TrainedLog(self.out / "metrics" / "trained_trees.jsonl")
        self.trees_trained = 0

    def _model_dir(self, source_cfg: PipelineConfig, init: Path | None, from_checkpoint: bool) -> Path:
        """The HF directory the learner is built from: `init` when it is a model directory, else the source
        run's model (read where the source run keeps it; built in this run's directory when it is not there)."""
        if init is not None and not from_checkpoint:
            if not (init / "config.json").exists():
                raise ReplayError(f"replay.init={str(init)!r} is neither a checkpoint directory (with `latest`) nor "
                                  "a Hugging Face model directory (with config.json)")
            return init
        source_model = Path(source_cfg.model.path or Path(source_cfg.run.output_dir) / "model")
        if (source_model / "config.json").exists():
            return source_model
        return materialise_model(source_cfg.model.model_copy(update={"path": ""}), self.out / "model")

    def _select_and_copy(self, source_cfg: PipelineConfig, reference_version: int | None) -> None:
        with connect(source_cfg, reuse_running=True) as handle:
            stores = [TreeStore(handle.client, run, limits=source_cfg.limits.limits(), read_only=True)
                      for run in self.cfg.replay.runs]
            sel = select(stores, self.cfg, reference_version)
        self.store.archive(sel.trees)
        versions = [v for _, _, v in sel.trees]
        log.info("selected %d trees of runs %s (policy versions %d..%d); left out %s", len(sel.trees),
                 self.cfg.replay.runs, min(versions), max(versions), sel.left_out)

    def run(self) -> dict[str, float]:
        cfg, lrn = self.cfg, self.learner
        per_step = cfg.learner.prompts_per_step
        batches = math.ceil(len(self.tree_ids) / per_step)
        total_steps = batches * cfg.replay.epochs
        start = time.perf_counter()
        done_before = self.position["epoch"] * batches + self.position["batch"]
        order: tuple[int, list[str]] = (-1, [])  # (epoch, its order of the trees)
        while self.position["epoch"] < cfg.replay.epochs and not self.stop.is_set():
            epoch, b = self.position["epoch"], self.position["batch"]
            if order[0] != epoch:
                order = (epoch, epoch_order(self.tree_ids, cfg.replay.order, cfg.run.seed, epoch))
            ids = order[1][b * per_step:(b + 1) * per_step]
            trees = [t for t in self.store.load_many(ids) if t is not None]
            t0 = time.perf_counter()
            version = lrn.policy_version
            metrics = lrn.step(trees)
            self.store.save_advantages(advantage_records(lrn.advantages, version))
            self.trees_trained += len(trees)
            self.position = {"epoch": epoch + (b + 1 == batches), "batch": (b + 1) % batches}
            self.trained_log.batch(lrn.step_count, lrn.policy_version, bool(lrn.advantages), False, ids)
            data = tree_metrics(trees, version)
            self.sink.log(lrn.step_count, {**data, **metrics, "epoch": float(epoch),
                                           "trees_per_s": len(trees) / (time.perf_counter() - t0)})
            done = epoch * batches + b + 1
            print(f"replay step {done}/{total_steps} epoch {epoch + 1}/{cfg.replay.epochs}: reward "
                  f"{data['reward_mean']:+.3f} loss {metrics.get('loss', 0.0):+.4f} importance weight "
                  f"{metrics.get('importance_weight', 1.0):.3f} trees/s "
                  f"{self.trees_trained / (time.perf_counter() - start):.2f}", flush=True)
            if lrn.step_count and done % cfg.learner.checkpoint_every == 0:
                self._checkpoint()
        self._checkpoint()
        lrn.export(self.out / "export")
        wall = time.perf_counter() - start
        summary = {"steps": float(self.position["epoch"] * batches + self.position["batch"] - done_before),
                   "trees": float(self.trees_trained), "trees_per_s": self.trees_trained / wall, "wall_s": wall}
        print(f"replay trained {self.trees_trained} trees in {wall:.1f} s ({summary['trees_per_s']:.2f} trees/s); "
              f"checkpoint {self.ckpt_dir}, weights {self.out / 'export'}, trees and advantages in run "
              f"{cfg.run.run_id!r} (treepo export --config {self.out / 'config.yaml'})", flush=True)
        return summary

    def _checkpoint(self) -> None:
        self.learner.save_checkpoint(self.ckpt_dir, {"position": self.position})

    def close(self) -> None:
        self.sink.close()
        self.trained_log.close()
        self.own.close()

