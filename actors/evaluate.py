"""Evaluation: k samples per eval prompt with an inference engine, scored by the run's reward, summarised by
`actors.eval_metrics` (accuracy with 95% intervals over problems). `treepo eval` runs it once on a model
directory or checkpoint export; `actors.evaluator` runs it during training on the weights the learner pushes.

The eval prompts are the `eval.prompts` section (own seed and size), keyed by problem
(`treepo.problem_keys`: every wording of one problem shares a key). `held_out` keeps the first item of each
problem (the others counted as `duplicates_dropped`) and, with `eval.exclude_training` (the default), leaves
out every item whose problem is also a problem of the training `prompts` (counted as `overlap_dropped`).
`eval_problems` counts the problems evaluated and `eval_overlap` those of them that are training problems
(0 with exclusion): the figures are "held-out" only when it is 0 (`eval_metrics.eval_label`). Building an
`Evaluation` logs these counts, and `treepo.prompts.problem_space_warning` when the training generators'
problem space is smaller than `prompts.size`.

Sampling: `eval.sampling: sequential` grows k independent samples per prompt (`rollout.mode: independent`;
mean@k, pass@k, maj@k); `tree` grows a TreePO tree with k leaves and the rollout section's segment length,
depth, branching and fallback (leaf_accuracy, any_correct, leaf_majority: the leaves are not independent).
Both at `eval.temperature` / `eval.top_p`, through the actor's pool (at least `rollout.prompts_per_step`
trees, topped up to `rollout.target_running` sequences). Each `Evaluation.run()` also leaves the
per-problem accuracy (problem key -> fraction of its samples correct) in `Evaluation.accuracy`, which the
evaluator logs so that two versions compare problem by problem (`eval_metrics.paired_gain`). Besides
accuracy, a run reports the engine's work for it (prompt tokens, tokens served from the prefix cache,
generated and processed tokens) and its wall time, so that tree and sequential test-time sampling compare on
one model and prompt set (ALGORITHMS.md §1.8).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from actors.engine import Engine
from actors.eval_metrics import PromptSamples, eval_label, figures_text, summarise
from actors.reward import RewardScorer
from actors.samplers import make_sampler
from protocol.config import ConfigError, PipelineConfig
from protocol.config.rollout import RolloutConfig
from protocol.tree import Tree
from treepo.checkpoint_export import checkpoint_step_dir, export_checkpoint, policy_version
from treepo.models import materialise_model
from treepo.prompts import PromptItem, load_prompts, problem_space_warning, raw_rows

log = logging.getLogger("treepo.evaluate")


def eval_rollout(cfg: PipelineConfig) -> RolloutConfig:
    """The rollout settings of evaluation sampling (see the module docstring)."""
    e = cfg.eval
    return cfg.rollout.model_copy(update={"mode": "independent" if e.sampling == "sequential" else "treepo",
                                          "width": e.k, "temperature": e.temperature, "top_p": e.top_p})


def select_problems(keys: list[str], training: set[str], exclude: bool) -> tuple[list[int], dict[str, int]]:
    """Which of the eval items with these problem keys to evaluate (indices, in order), and the counts
    eval_problems, eval_overlap, overlap_dropped, duplicates_dropped: an item whose key is in `training` is
    dropped when `exclude`; of the rest, an item whose key an earlier kept item has is dropped."""
    kept, seen, overlap_dropped = [], set(), 0
    for i, key in enumerate(keys):
        if exclude and key in training:
            overlap_dropped += 1
        elif key not in seen:
            kept.append(i)
            seen.add(key)
    return kept, {"eval_problems": len(kept), "eval_overlap": len(seen & training),
                  "overlap_dropped": overlap_dropped, "duplicates_dropped": len(keys) - overlap_dropped - len(kept)}


def held_out(cfg: PipelineConfig, training: list[dict], tokenizer) -> tuple[list[PromptItem], dict[str, int]]:
    """The eval items to evaluate, given the training rows (`raw_rows(cfg.prompts)`), and the counts of
    `select_problems`."""
    items = load_prompts(cfg.eval.prompts, tokenizer)
    kept, counts = select_problems([item.problem_key for item in items], {r["key"] for r in training},
                                   cfg.eval.exclude_training)
    return [items[i] for i in kept], counts


def leaf_samples(tree: Tree, dataset: str, decode, extract: Callable[[str], str | None]) -> PromptSamples:
    """What the metrics need from one evaluated tree's leaves; `extract` gives a leaf's answer (the one the
    reward grades) for majority voting."""
    correct, answers, lengths = [], [], []
    for j, leaf in enumerate(tree.leaf_ids.tolist()):
        ids = tree.path_tokens(leaf)
        acc = tree.reward_details.get("acc")
        correct.append(bool(acc[j] == 1.0) if acc is not None else bool(tree.rewards[j] >= 1.0))
        answer = extract(decode(ids.tolist()))
        answers.append(None if answer is None else answer.strip())
        lengths.append(len(ids))
    return PromptSamples(dataset, correct, answers, lengths, [float(r) for r in tree.rewards])


class Evaluation:
    """One engine, the eval prompts and a sampler; `run()` evaluates the engine's current weights."""

    def __init__(self, cfg: PipelineConfig, engine: Engine):
        self.cfg, self.engine = cfg, engine
        training = raw_rows(cfg.prompts)
        self.items, self.counts = held_out(cfg, training, engine.tokenizer)
        log.info("eval set: %s (eval_overlap: of the problems, those also in training)",
                 ", ".join(f"{name} {n}" for name, n in self.counts.items()))
        warning = problem_space_warning(cfg.prompts, training)
        if warning:
            log.warning(warning)
        if not self.items:
            raise ConfigError("eval.prompts: no held-out prompt left (every one is also a training problem; "
                              "eval.exclude_training: false keeps them)")
        self.keys = {item.prompt_id: item.problem_key for item in self.items}
        self.accuracy: dict[str, float] = {}  # of the last run(): problem key -> fraction of its samples correct
        rollout = eval_rollout(cfg)
        self.scorer = RewardScorer.for_rollout(cfg.reward, rollout)
        self.sampler = make_sampler(engine, rollout, self.scorer, run_id=f"{cfg.run.run_id}-eval", seed=cfg.run.seed,
                                    tree_prefix="eval")
        source = cfg.eval.prompts
        self.datasets = {item.prompt_id: (item.entry.get("metadata", {}).get("source_dataset", "reasoning_gym")
                                          if source.source == "reasoning_gym" else Path(source.path).stem)
                         for item in self.items}

    def run(self) -> dict[str, float]:
        """Metrics of the engine's current weights (flat keys; see `eval_metrics.summarise`), with the policy
        version, the engine's work, the wall time and the eval set's counts (`select_problems`); sets
        `self.accuracy`."""
        before = self.engine.counters.as_dict()
        start = time.perf_counter()
        trees = self.sampler.sample(self.items, slots=self.cfg.rollout.prompts_per_step,
                                    target_running=self.cfg.rollout.target_running)
        wall = time.perf_counter() - start
        work = {k: float(v - before[k]) for k, v in self.engine.counters.as_dict().items()}
        samples = [leaf_samples(t, self.datasets[t.prompt_id], self.engine.decode,
                                self.scorer.answer) for t in trees]
        self.accuracy = {self.keys[t.prompt_id]: float(np.mean(s.correct))
                         for t, s in zip(trees, samples, strict=True)}
        return {"policy_version": float(self.engine.policy_version),
                **summarise(samples, self.cfg.eval.k, self.cfg.eval.sampling),
                **{f"engine/{k}": v for k, v in work.items()}, "wall_s": wall,
                **{name: float(n) for name, n in self.counts.items()}}

    def close(self) -> None:
        self.scorer.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file: its eval section (prompts, k, temperature), reward, "
                   "engine and rollout (tree settings)")
    p.add_argument("--model", help="what to evaluate: a HF model directory (default: <run.output_dir>/export), "
                   "a learner checkpoint (<run>/checkpoints/stepN) or a checkpoints directory (its latest)")
    p.add_argument("--sampling", choices=["sequential", "tree"], help="eval.sampling")
    p.add_argument("-k", type=int, help="samples per prompt (eval.k)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON line")


def run(args: argparse.Namespace) -> int:
    from actors.loop import make_engine
    from protocol.role_process import start_role

    cfg, _ = start_role(args)
    update = {k: v for k, v in (("sampling", args.sampling), ("k", args.k)) if v is not None}
    if update:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=update)})
    model = Path(args.model or Path(cfg.run.output_dir) / "export")
    with tempfile.TemporaryDirectory(prefix="treepo-eval-") as scratch:
        step_dir = checkpoint_step_dir(model)
        if step_dir is not None:  # a learner checkpoint: its weights as a model directory first
            base = materialise_model(cfg.model, Path(cfg.run.output_dir) / "model")
            model = export_checkpoint(step_dir, base, Path(scratch) / "model")
        elif not (model / "config.json").exists():
            print(f"treepo eval: {model} is neither a Hugging Face model directory (a run's `export`) nor a "
                  f"learner checkpoint (<run>/checkpoints[/stepN])", file=sys.stderr)
            return 2
        engine = make_engine(cfg, model, policy_version(model))
        evaluation = Evaluation(cfg, engine)
        try:
            metrics = evaluation.run()
        finally:
            evaluation.close()
            engine.close()
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{args.model or model} (policy version {metrics['policy_version']:.0f}), {eval_label(metrics)}: "
              f"{metrics['all/prompts']:.0f} problems, {cfg.eval.k} {cfg.eval.sampling} samples each: "
              f"{figures_text(metrics, cfg.eval)} "
              f"(95% intervals over problems)  reward {metrics['all/reward']:+.3f}  "
              f"response {metrics['all/response_tokens']:.1f} tokens")
        print(f"sampling: {metrics['wall_s']:.1f} s, engine processed {metrics['engine/processed_tokens']:.0f} tokens "
              f"(prompt {metrics['engine/prompt_tokens']:.0f}, of which cached {metrics['engine/cached_tokens']:.0f}; "
              f"generated {metrics['engine/generated_tokens']:.0f}) in {metrics['engine/calls']:.0f} calls")
    return 0
