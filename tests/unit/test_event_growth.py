"""Growth driven by engine events, on an engine stepped one token at a time (`SteppedEngine`, as vLLM is):
hand-worked engine-step counts when answers end in their first segment, a path that ends early re-branching
while its sibling still runs, the exactly-w invariant over many trees, reproducibility, weights swapped with
requests in flight, and the pool held near `target_running` sequences."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from actors.independent_sampler import IndependentSampler
from actors.tree_sampler import TreePOSampler
from actors.treerpo_sampler import TreeRPOSampler
from protocol.config.rollout import RolloutConfig
from protocol.tree import ROOT_ID
from tests.factories import same
from tests.fixtures.engines import SteppedEngine
from tests.unit.test_sampler import check_tree, items


def cfg(**kw) -> RolloutConfig:
    base = dict(segment_tokens=8, max_depth=4, width=8, branching=2, init_branching=2)
    return RolloutConfig(**(base | kw))


def lengths_in_order(*lengths: int, then: int | None = None):
    """`ends` for a SteppedEngine: the i-th request submitted ends with EOS after lengths[i] tokens, later ones
    after `then`."""
    it = iter(lengths)
    return lambda r: next(it, then)


def test_short_answers_two_waves_with_the_short_answer_fallback():
    """w=8, b0=2, every answer ends with EOS after 3 tokens: both first paths end at engine step 3, the 6 missing
    leaves start at once and end at step 6. Without the rule: 2 candidates x min(b, r) = 4, then 2: 3 waves,
    9 steps. Independent sampling: 3 steps."""
    for short, steps, waves in [(True, 6, [2, 6]), (False, 9, [2, 4, 2])]:
        eng = SteppedEngine(ends=lambda r: 3)
        tree = TreePOSampler(eng, cfg(short_answer_fallback=short)).sample(items(1))[0]
        check_tree(tree, cfg())
        assert eng.counters.engine_steps == steps and eng.counters.requests == 8
        at = [s for s, _ in eng.submitted]
        assert [at.count(s) for s in sorted(set(at))] == waves
    eng = SteppedEngine(ends=lambda r: 3)
    IndependentSampler(eng, cfg()).sample(items(1))
    assert eng.counters.engine_steps == 3


def test_a_path_that_ends_early_re_branches_while_its_sibling_runs():
    """b0=2; the first path ends after 2 tokens, its sibling after 5, every later one after 3.
    Short-answer rule: at step 2 the 6 missing leaves start (room = 8 - 1 leaf - 1 in flight); all end at step 5.
    Without it: at step 2 the ended path's share, min(b * 1, 6) = 2 copies; at step 5 (B, C, D end, nothing in
    flight) r = 4: 2 copies of each of 2 candidates; done at step 8. In rounds it would be 5 + 3 + 3 = 11."""
    eng = SteppedEngine(ends=lengths_in_order(2, 5, then=3))
    sampler = TreePOSampler(eng, cfg())
    check_tree(sampler.sample(items(1))[0], cfg())
    assert [s for s, _ in eng.submitted] == [0, 0] + [2] * 6 and eng.counters.engine_steps == 5
    assert sampler.fallbacks == 1

    eng = SteppedEngine(ends=lengths_in_order(2, 5, then=3))
    sampler = TreePOSampler(eng, cfg(short_answer_fallback=False))
    check_tree(sampler.sample(items(1))[0], cfg())
    assert [s for s, _ in eng.submitted] == [0, 0, 2, 2, 5, 5, 5, 5] and eng.counters.engine_steps == 8
    assert sampler.fallbacks == 2


def _random_ends(p_end: float):
    """EOS after 1..8 tokens with probability p_end, drawn from the request's own seed (reproducible)."""
    def ends(r):
        g = np.random.default_rng(r.seed)
        return int(g.integers(1, 9)) if g.random() < p_end else None
    return ends


def test_exactly_w_leaves_over_many_event_grown_trees():
    rng = np.random.default_rng(0)
    spreads = ["fixed_avg", "logprob", "inverse_logprob", "norm_logprob", "node_inverse_logprob"]
    policies = ["soft_boxed_and_eos", "finished_first", "finished_first_strict", "random_all", "longer_first"]
    n_trees, fallbacks = 0, 0
    for trial in range(40):
        w = int(rng.integers(1, 20))
        c = cfg(width=w, branching=int(rng.integers(1, 4)), max_depth=int(rng.integers(1, 7)),
                segment_tokens=int(rng.integers(1, 9)), init_branching=1, init_branching_max=int(rng.integers(0, 9)),
                spread=spreads[trial % len(spreads)], fallback_candidates=policies[trial % len(policies)],
                fallback_point="from_start" if trial % 7 == 0 else "random", short_answer_fallback=trial % 2 == 0)
        eng = SteppedEngine(ends=_random_ends(float(rng.random())))
        sampler = TreePOSampler(eng, c, seed=trial)  # it asserts leaves + queued + in flight <= w at every event
        trees = sampler.sample(items(30), slots=3, target_running=2 * w)
        for tree in trees:
            check_tree(tree, c)
        n_trees += len(trees)
        fallbacks += sampler.fallbacks
        assert eng.in_flight == 0
    assert n_trees == 40 * 30 and fallbacks > 0


def test_event_growth_is_reproducible_for_a_seed():
    def grow():
        eng = SteppedEngine(ends=_random_ends(0.4))
        return TreePOSampler(eng, cfg(width=6), seed=3).sample(items(5))
    assert all(same(a, b) for a, b in zip(grow(), grow(), strict=True))


@pytest.mark.parametrize("sampler_cls", [TreePOSampler, TreeRPOSampler, IndependentSampler])
def test_weights_swapped_with_requests_in_flight_restart_them(sampler_cls):
    """A swap before the engine's 2nd call: the requests in flight restart under the new version, so every
    segment carries the version of the weights that produced all of it."""
    eng = SteppedEngine(ends=lengths_in_order(2, then=None))
    c = cfg(width=4, max_depth=3, treerpo_depth=2, treerpo_step_tokens=8)
    calls = []

    def before_step():
        calls.append(1)
        if len(calls) == 2:
            eng.load_weights({}, 5)
    tree = sampler_cls(eng, c, before_step=before_step).sample(items(1))[0]
    assert eng.counters.restarted > 0 and eng.counters.discarded_tokens > 0
    first = [s for s in tree.segments if s.parent_id == ROOT_ID]
    assert int(first[0].policy_version) == 0 and all(int(s.policy_version) == 5 for s in tree.segments[1:])


def test_the_pool_holds_the_engine_near_target_running():
    """No answer ends early; w=8, b0=2, b=2, d=4, l=4: a tree holds 2, 4, 8, 8 sequences for 4 engine steps each.
    One slot alone: 5.5 sequences per engine step, 20 x 16 steps. With target_running=32 (`actors.pool`): a tree
    counts as w/2 = 4 sequences at first, so 8 trees start; the estimate then follows the measured sequences per
    tree (2, 4, 8, 8 per 4-step call, each call weighing 1 - 0.98^4): 4.48 when the first wave ends, so
    round(32 / 4.48) = 7 trees start at step 16; two calls later (2 and 4 per tree) it is 4.26 and an 8th tree
    joins at step 24; the last 4 start at step 32. 48 engine steps instead of 320."""
    for target, starts, steps in [(0, [(16 * i, 1) for i in range(20)], 320),
                                  (32, [(0, 8), (16, 7), (24, 1), (32, 4)], 48)]:
        eng = SteppedEngine()
        trees = TreePOSampler(eng, cfg(segment_tokens=4)).sample(items(20), slots=1, target_running=target)
        assert all(len(t.leaves) == 8 for t in trees)
        roots = Counter(at for at, r in eng.submitted if len(r.token_ids) == 5)  # b0 = 2 root requests per tree
        assert sorted((at, n // 2) for at, n in roots.items()) == starts
        assert eng.counters.engine_steps == steps and eng.counters.running_sum == 20 * 4 * (2 + 4 + 8 + 8)
