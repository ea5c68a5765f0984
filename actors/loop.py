"""The actor process: lease prompts from the buffer, grow their trees, stream the pieces, apply new
weights between two tree steps, heartbeat. `treepo actor` runs it.

Loop: ask the buffer for up to `rollout.prompts_per_step` prompt leases (its admission bound may
grant fewer, or none: then wait `retry_after_s`, or less when new weights arrive); grow one tree per
lease with the configured sampler, driven by the engine's events (`actors.sampler_base`), as a pool of at
least `prompts_per_step` trees and as many more as keep `rollout.target_running` sequences in the engine
(new leases are asked for before the engine's next step, and not again before `retry_after_s` once the
buffer granted none, so no tree waits for another); send each finished piece (`SubtreeMsg`,
re-sent until acknowledged) as soon as the sampler yields it. Before every engine call the actor
applies the newest weights the learner pushed (assembled off the hot path by the subscriber's
thread), so segments generated after the swap carry the new policy version; it also renews its
leases and reads the buffer's acks there. An actor killed mid-pool loses only its unacknowledged
pieces: the buffer keeps every acknowledged piece, and the leases of unfinished trees expire and
return their prompts to the queue. A buffer outage is ridden out: a prompt request left unanswered for
`buffer.grant_timeout_s` is counted and logged and asked again, for as long as it lasts, and the
pieces waiting for acknowledgement are re-sent once the buffer is back.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path

from actors.engine import Engine
from actors.reward import RewardScorer
from actors.samplers import make_sampler
from actors.weight_broadcast_receiver import BroadcastWeightSubscriber
from actors.weight_receiver import ZmqWeightSubscriber
from buffer.client import BufferClient
from protocol.config import PipelineConfig, config_warnings
from protocol.messages import PromptGrant, PromptLease
from protocol.role_process import add_config_argument, process_age_s, start_role
from protocol.tree import Tree
from treepo.models import materialise_model
from treepo.prompts import PromptItem, raw_rows, render
from treepo.telemetry import MetricsSink

log = logging.getLogger("treepo.actor")


def make_engine(cfg: PipelineConfig, model_dir: Path, policy_version: int = 0) -> Engine:
    """The configured engine on `model_dir`, whose weights are `policy_version`."""
    if cfg.engine.kind == "vllm":
        import torch

        from actors.vllm_engine import VllmEngine

        for warning in config_warnings(cfg, gpu=torch.cuda.is_available()):
            log.warning(warning)

        return VllmEngine(model_dir, cfg.engine, seed=cfg.run.seed, policy_version=policy_version)
    from actors.hf_engine import HfEngine

    return HfEngine(model_dir, cfg.engine, policy_version=policy_version)


class _RoundRow:
    """What one metrics row of the actor covers: from its start, the trees finished and their rewards."""

    def __init__(self, counters: dict[str, int], waited: float):
        self.counters, self.waited, self.start = counters, waited, time.perf_counter()
        self.trees = 0
        self.rewards: list[float] = []

    def add(self, tree: Tree) -> None:
        self.trees += 1
        self.rewards += tree.rewards.tolist()


class ActorLoop:
    def __init__(self, cfg: PipelineConfig, actor_id: str, model_dir: Path, stop: threading.Event):
        self.cfg, self.actor_id, self.stop = cfg, actor_id, stop
        self.engine = make_engine(cfg, model_dir)
        self.weights = (BroadcastWeightSubscriber(cfg.weights, actor_id, run_id=cfg.run.run_id)
                        if cfg.weights.transport == "broadcast" else ZmqWeightSubscriber(cfg.weights, actor_id, cfg.security))
        self.client = BufferClient(cfg.buffer.ingest_address, actor_id, cfg.buffer, cfg.security)
        self.scorer = RewardScorer.for_rollout(cfg.reward, cfg.rollout)
        self.sampler = make_sampler(self.engine, cfg.rollout, self.scorer, run_id=cfg.run.run_id,
                                    seed=cfg.run.seed, tree_prefix=actor_id, before_step=self.between_steps)
        # reasoning-gym scorers need the generator's entry; leases carry only the prompt id and text
        self.entries = ({str(r["id"]): r["entry"] for r in raw_rows(cfg.prompts)}
                        if cfg.reward.kind == "reasoning_gym" else {})
        self.sink = MetricsSink(Path(cfg.run.output_dir) / "metrics", actor_id, tensorboard=False)
        self.last_heartbeat = 0.0
        self.swaps = 0
        self.swap_s = 0.0
        self.buffer_timeouts = 0  # prompt requests the buffer left unanswered for buffer.grant_timeout_s
        self.no_permit_until = 0.0  # the buffer granted nothing: the pool asks again after this (monotonic)
        log.info("%s start-up: engine, weights and buffer connections ready %.1f s after the process started",
                 actor_id, process_age_s())

    def between_steps(self) -> None:
        """Called before every engine call: newest weights in, leases renewed, acks read."""
        got = self.weights.poll_latest()
        if got is not None:
            t0 = time.perf_counter()
            version, state = got
            self.engine.load_weights(state, version)
            self.swaps += 1
            self.swap_s += time.perf_counter() - t0
            log.info("%s applied policy version %d in %.2f s", self.actor_id, version, time.perf_counter() - t0)
        now = time.monotonic()
        if now - self.last_heartbeat > self.cfg.buffer.lease_seconds / 4:
            self.client.heartbeat(self.engine.policy_version)
            self.last_heartbeat = now
        self.client.poll(0)

    def _item(self, lease: PromptLease) -> PromptItem:
        return PromptItem(prompt_id=lease.prompt_id, text=lease.prompt, answer=lease.answer,
                          token_ids=render(self.engine.tokenizer, self.cfg.prompts, lease.prompt),
                          entry=self.entries.get(lease.prompt_id, {}), tree_id=lease.tree_id)

    def _refill(self, free: int) -> list[PromptItem]:
        """Prompts for the pool's free slots, as the buffer's admission grants them now (none once stopping)."""
        if self.stop.is_set() or time.monotonic() < self.no_permit_until:
            return []
        grant = self._request(free)
        if grant is not None and not grant.leases:
            self.no_permit_until = time.monotonic() + max(grant.retry_after_s, 0.05)
        return [self._item(lease) for lease in grant.leases] if grant else []

    def _request(self, n: int) -> PromptGrant | None:
        """The buffer's grant for up to `n` prompts, or None when it does not answer within
        `buffer.grant_timeout_s` (down or restarting): counted and logged; the caller asks again later, and the
        pieces waiting for acknowledgement are re-sent (`BufferClient.poll`) as soon as the buffer is back."""
        try:
            return self.client.request_prompts(n, self.engine.policy_version, timeout_s=self.cfg.buffer.grant_timeout_s)
        except TimeoutError:
            self.buffer_timeouts += 1
            log.warning("%s: the buffer has not answered for %.0f s (%d pieces wait for acknowledgement); "
                        "still trying", self.actor_id, time.monotonic() - self.client.last_reply,
                        len(self.client.unacked))
            return None

    def run(self) -> None:
        """Grow a pool of at least `rollout.prompts_per_step` trees, topped up to `rollout.target_running`
        sequences before every engine step. A metrics row per `prompts_per_step` finished trees, and when the pool
        drains."""
        rounds = 0
        slots = self.cfg.rollout.prompts_per_step
        t0 = time.perf_counter()  # waiting for a grant (admission, back-pressure) counts from here
        while not self.stop.is_set():
            self.between_steps()
            grant = self._request(slots)
            if grant is None:
                continue
            if not grant.leases:  # no permit yet: ask again after retry_after_s, or at once when new weights
                self.weights.wait_new(max(grant.retry_after_s, 0.05))  # arrive (they often bring the permit)
                continue
            waited = time.perf_counter() - t0
            row = _RoundRow(self.engine.counters.as_dict(), waited)
            for piece in self.sampler.grow([self._item(lease) for lease in grant.leases], refill=self._refill,
                                           slots=slots, target_running=self.cfg.rollout.target_running):
                self.client.send(piece.message(self.actor_id))
                if piece.final and piece.whole is not None:
                    row.add(piece.whole)
                    if row.trees >= slots:
                        rounds += 1
                        self._log(rounds, row)
                        row = _RoundRow(self.engine.counters.as_dict(), 0.0)
            if row.trees:
                rounds += 1
                self._log(rounds, row)
            t0 = time.perf_counter()
        self.client.flush(timeout_s=self.cfg.buffer.resend_timeout_s * 4)

    def _log(self, rounds: int, row: _RoundRow) -> None:
        gen_s = time.perf_counter() - row.start
        after = self.engine.counters.as_dict()
        delta = {k: float(after[k] - row.counters[k]) for k in after}
        self.sink.log(rounds, {"trees": float(row.trees), "reward_mean": sum(row.rewards) / max(1, len(row.rewards)),
                               "generate_s": gen_s, "wait_s": row.waited,
                               "policy_version": float(self.engine.policy_version),
                               "weight_swaps": float(self.swaps), "weight_swap_s": self.swap_s,
                               "buffer_timeouts": float(self.buffer_timeouts),
                               **self.weights.metrics(),
                               "generated_tokens_per_s": delta["generated_tokens"] / gen_s,
                               "cache_hit_rate": delta["cached_tokens"] / max(1.0, delta["prompt_tokens"]),
                               "running_sequences_mean": delta["running_sum"] / max(1.0, delta["engine_steps"]),
                               **delta})

    def close(self) -> None:
        self.weights.close()
        self.client.close()
        self.scorer.close()
        self.sink.close()
        self.engine.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--actor-id", default="actor-0", help="unique name of this actor (its ZeroMQ identity)")


def run(args: argparse.Namespace) -> int:
    """`treepo actor`: grow trees until SIGTERM/SIGINT, then flush unacknowledged pieces and leave."""
    cfg, stop = start_role(args)
    model_dir = materialise_model(cfg.model, Path(cfg.run.output_dir) / "model")
    loop = ActorLoop(cfg, args.actor_id, model_dir, stop)
    try:
        loop.run()
    finally:
        loop.close()
    return 0
