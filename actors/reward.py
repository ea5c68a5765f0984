"""Leaf rewards (ALGORITHMS.md §1.4), each verification bounded in time in a worker process.

- math: the last \\boxed{} of the completion against the gold answer with math-verify
  (`verify(parse(gold), parse(answer))`); `correct` if equivalent, else `incorrect` (also when no
  boxed answer, or on a timeout).
- reasoning_gym: the prompt's own reasoning-gym scorer on the last \\boxed{} content (or, without
  one, the last line, or with `fallback: last_number` the last number in the text); correct only when the
  score is 1.0 (it gives partial credit to wrong answers).
- callable: any importable 'module:function' f(completion_text, answer) -> float; its value is the
  score as is.
Optional DAPO overlong shaping: + factor * min(0, -(L - (L_max - buffer)) / buffer), L = response
tokens, L_max = the sampler's response cap.

Verification runs in one spawned worker process (math-verify's signal timeouts work only in a main
thread; the worker's jobs run in its main thread, and the caller bounds each job by `timeout_s`:
on expiry the worker is killed and restarted and the leaf scores `incorrect`, details timeout=1).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import re
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from actors.boxed import last_boxed
from protocol.config.reward import RewardConfig
from protocol.config.rollout import RolloutConfig
from treepo.prompts import PromptItem


def resolve(name: str) -> Callable[..., Any]:
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise ValueError(f"reward function {name!r} is not 'module:function'")
    return getattr(importlib.import_module(module), attr)


def math_equal(answer: str, gold: str) -> float:
    """1.0 if math-verify finds `answer` equivalent to `gold` (both read as boxed LaTeX), else 0.0."""
    from math_verify import parse, verify

    return float(verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{answer}}}")))


def reasoning_gym_score(answer: str, entry: dict[str, Any]) -> float:
    import reasoning_gym

    return float(reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])(answer=answer, entry=entry))


def _serve(conn: Connection, preload: list[str]) -> None:
    for module in preload:
        importlib.import_module(module)
    conn.send("ready")
    while True:
        name, args = conn.recv()
        conn.send(float(resolve(name)(*args)))


class BoundedWorker:
    """Runs 'module:function' jobs in a spawned process, each bounded by a timeout.

    The worker imports `preload` before it takes jobs, so the bound covers the job, not the start-up."""

    def __init__(self, preload: list[str]) -> None:
        self.preload = preload
        self._ctx = mp.get_context("spawn")
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None

    def _start(self) -> Connection:
        if self._proc is None or not self._proc.is_alive():
            self._conn, child = self._ctx.Pipe()
            self._proc = self._ctx.Process(target=_serve, args=(child, self.preload), daemon=True)
            self._proc.start()
            if self._conn.recv() != "ready":
                raise RuntimeError("the reward worker did not start")
        assert self._conn is not None
        return self._conn

    def call(self, name: str, args: tuple, timeout_s: float) -> float | None:
        """The job's value, or None if it ran past `timeout_s` (the worker is then restarted)."""
        conn = self._start()
        conn.send((name, args))
        if conn.poll(timeout_s):
            return conn.recv()
        self.close()
        return None

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._proc = None


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def unboxed_answer(text: str, fallback: str) -> str:
    """The answer of a completion without \\boxed{}: its last line, or its last number ("" if none)."""
    if fallback == "last_number":
        numbers = NUMBER.findall(text.replace(",", ""))
        return numbers[-1] if numbers else ""
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def overlong_penalty(n_tokens: int, max_tokens: int, buffer: int, factor: float) -> float:
    if buffer <= 0:
        return 0.0
    return factor * max(-1.0, min(0.0, -(n_tokens - (max_tokens - buffer)) / buffer))


class RewardScorer:
    """Scores a leaf: (prompt, completion text, response tokens) -> (reward, details)."""

    def __init__(self, cfg: RewardConfig, max_tokens: int):
        self.cfg, self.max_tokens = cfg, max_tokens  # the response cap the overlong penalty counts from
        preload = {"math": ["math_verify"], "reasoning_gym": ["reasoning_gym"],
                   "callable": [cfg.function.partition(":")[0]]}[cfg.kind]
        self.worker = BoundedWorker(["actors.reward", *preload])

    @classmethod
    def for_rollout(cls, cfg: RewardConfig, rollout: RolloutConfig) -> RewardScorer:
        """The scorer of leaves grown under `rollout`: its overlong penalty counts from that mode's response cap."""
        return cls(cfg, max_tokens=rollout.response_cap())

    def answer(self, text: str) -> str | None:
        """The answer this scorer grades in `text` (what majority votes count); None if it finds none, or
        for a callable reward (which reads the whole text)."""
        if self.cfg.kind == "callable":
            return None
        boxed = last_boxed(text)
        if boxed is not None or self.cfg.kind == "math":
            return boxed
        return unboxed_answer(text, self.cfg.fallback) or None

    def _job(self, item: PromptItem, text: str) -> tuple[str, tuple] | None:
        if self.cfg.kind == "callable":
            return self.cfg.function, (text, item.answer)
        answer = self.answer(text)
        if self.cfg.kind == "math":
            return None if answer is None else ("actors.reward:math_equal", (answer, item.answer))
        return "actors.reward:reasoning_gym_score", (answer or "", item.entry)

    def __call__(self, item: PromptItem, text: str, n_tokens: int) -> tuple[float, dict[str, float]]:
        job = self._job(item, text)
        value = 0.0 if job is None else self.worker.call(*job, timeout_s=self.cfg.timeout_s)
        details: dict[str, float] = {}
        if self.cfg.kind == "callable":
            score = self.cfg.incorrect if value is None else value
        else:
            details["acc"] = 1.0 if value == 1.0 else 0.0
            score = self.cfg.correct if value == 1.0 else self.cfg.incorrect
        penalty = overlong_penalty(n_tokens, self.max_tokens, self.cfg.overlong_buffer, self.cfg.overlong_factor)
        details.update(score=score, overlong=penalty, timeout=float(value is None and job is not None))
        return score + penalty, details

    def close(self) -> None:
        self.worker.close()
