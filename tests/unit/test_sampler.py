"""TreePO / TreeRPO / independent samplers on a scripted engine: budget examples, the exactly-w
invariant, fallback cut points, streaming pieces, stop rules."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from actors.budget import (
    largest_remainder,
    spread,
    spread_by_scores,
    spread_fixed_avg,
    spread_temperature,
    step_budget,
)
from actors.fallback import fallback_paths, kept_segments
from actors.independent_sampler import IndependentSampler
from actors.stop_rules import classify, is_repetitive
from actors.tree_sampler import TreePOSampler
from actors.tree_state import LeafRecord, Path
from actors.treerpo_sampler import TreeRPOSampler
from protocol.config.rollout import RolloutConfig
from protocol.tree import ROOT_ID, Tree
from tests.factories import same
from tests.fixtures.engines import EOS, ScriptedEngine
from treepo.prompts import PromptItem


def items(n: int, plen: int = 5) -> list[PromptItem]:
    return [PromptItem(prompt_id=f"p{i}", text=f"q{i}", answer="1",
                       token_ids=np.arange(10 * i, 10 * i + plen, dtype=np.int32)) for i in range(n)]


def cfg(**kw) -> RolloutConfig:
    base = dict(segment_tokens=4, max_depth=6, width=16, branching=2, init_branching=2)
    return RolloutConfig(**(base | kw))


def queue_sizes(engine: ScriptedEngine) -> list[int]:
    return [len(c) for c in engine.calls]


# ---------------------------------------------------------------- budget (§1.3.4 worked examples)
def test_budget_doubles_to_width_then_chains():
    assert [step_budget(16, 0, 0, a, 2) for a in (2, 4, 8, 16)] == [4, 8, 16, 16]
    eng = ScriptedEngine()
    trees = TreePOSampler(eng, cfg()).sample(items(1))
    assert queue_sizes(eng) == [2, 4, 8, 16, 16, 16]
    assert len(trees[0].leaves) == 16
    assert {leaf.stop_reason for leaf in trees[0].leaves} == {"max_tokens"}  # d*l reached at depth d: rule 3 first


def test_two_of_eight_finishing_at_step_three():
    assert step_budget(16, 2, 2, 6, 2) == 14
    assert spread_fixed_avg(14, 6) == [2, 2, 2, 2, 2, 4]
    # the same through the sampler: the first 2 requests of step 3 stop with EOS
    eng = ScriptedEngine()
    eng.stops = lambda r, g: len(eng.calls) == 3 and any(r is x for x in eng.calls[2][:2])
    trees = TreePOSampler(eng, cfg(max_depth=5)).sample(items(1))
    assert queue_sizes(eng)[:4] == [2, 4, 8, 14]
    parents = [eng.calls[3][i].token_ids[-1] for i in range(14)]
    runs = [sum(1 for _ in g) for _, g in itertools.groupby(parents)]
    assert runs == [2, 2, 2, 2, 2, 4]
    assert len(trees[0].leaves) == 16


def test_probability_driven_spread_hand_example():
    # scores s = [-1, -2, -3] (sum of log-probs), low-prob encourage (sigma=-1), tau=1, T=7 over a=3:
    # z = -(s - min) = [-2, -1, 0] -> w = [0.090, 0.245, 0.665]; 4 extra -> quotas [0.36, 0.98, 2.66]
    # floors [0, 0, 2], 2 left by largest remainder (0.98, 0.66) -> [0, 1, 3] -> counts [1, 2, 4]
    assert spread_by_scores(7, [-1.0, -2.0, -3.0], -1.0, 1.0) == [1, 2, 4]
    assert spread_by_scores(7, [-1.0, -2.0, -3.0], +1.0, 1.0) == [4, 2, 1]
    assert largest_remainder([0.5, 0.5], 3) == [2, 1]  # tie -> earlier path
    c = cfg(spread="node_logprob", spread_temperature=1.0)
    # node score = mean of the last segment: [-1, -3] -> path 2 (lower prob) gets more
    assert spread(c, 6, [[0.0, -1.0], [-5.0, -3.0]], [[-1.0], [-3.0]], 0) == [1, 5]
    c = cfg(spread="norm_inverse_logprob", spread_temperature=1e-3)
    assert spread(c, 5, [[-1.0, -1.0], [-4.0]], [[-1.0], [-4.0]], 0) == [4, 1]


def test_temperature_schedule():
    c = cfg(spread_temperature=1.0, spread_temperature_max=5.0, spread_temperature_steps=10,
            spread_temperature_schedule="sinusoid_descending")
    assert [round(spread_temperature(c, t), 6) for t in (0, 5, 10, 50)] == [5.0, 3.0, 1.0, 1.0]
    c.spread_temperature_schedule = "sinusoid_ascending"
    assert [round(spread_temperature(c, t), 6) for t in (0, 5, 10)] == [1.0, 3.0, 5.0]
    c.spread_temperature_schedule = "constant"
    assert spread_temperature(c, 7) == 1.0


# ---------------------------------------------------------------- stop rules (§1.3.3)
def test_stop_rules_in_order():
    c = cfg(max_depth=3)
    rep = "abcdefgh" * 40
    assert classify(c, "x \\boxed{2}", "stop", 5, 12, 1) == "finished"
    assert classify(c, "x \\boxed{2}", "length", 4, 12, 1) is None  # boxed without EOS: still active
    assert classify(cfg(finish_rule="boxed_as_eos"), "\\boxed{2}", "length", 4, 12, 1) == "finished"
    assert classify(c, "no answer", "stop", 5, 12, 3) == "eos"
    assert classify(c, "x", "length", 12, 12, 3) == "max_tokens"
    assert classify(c, "x", "length", 8, 12, 3) == "max_depth"
    assert classify(c, rep, "length", 8, 12, 1) == "repetition"
    assert classify(c, rep + "\\boxed{1}", "stop", 8, 12, 1) == "finished"  # least_prioritized
    assert classify(cfg(repetition_rule="most_prioritized"), rep + "\\boxed{1}", "stop", 8, 12, 1) == "repetition"
    assert classify(cfg(repetition_rule="off"), rep, "length", 8, 12, 1) is None
    # 32-char window x 8: "a"*39 has 8 overlapping windows of "a"*32, "a"*38 has 7
    assert is_repetitive("a" * 39, 32, 8) and not is_repetitive("a" * 38, 32, 8)


# ---------------------------------------------------------------- the exactly-w invariant (§1.3.6)
def check_tree(tree: Tree, c: RolloutConfig) -> None:
    kids = tree.children()
    assert len(tree.leaves) == c.width
    assert len(set(tree.node_ids.tolist())) == len(tree.node_ids)
    assert len(set(tree.leaf_ids.tolist())) == c.width
    depth = {ROOT_ID: 0} | {int(n): int(d) for n, d in zip(tree.node_ids, tree.depths, strict=True)}
    for s in tree.segments:
        assert s.parent_id in depth and s.depth == depth[s.parent_id] + 1 <= c.max_depth
        assert 1 <= len(s.token_ids) <= c.segment_tokens and len(s.logprobs) == len(s.token_ids)
        if s.finish == "length":
            assert len(s.token_ids) == c.segment_tokens
    for leaf in tree.leaves:
        assert leaf.node_id not in kids  # a leaf never gets children (fallback cuts above it)
        assert len(tree.path_tokens(leaf.node_id)) <= c.max_depth * c.segment_tokens
    # every internal node has a leaf below it
    assert {n for leaf in tree.leaves for n in tree.path_ids(leaf.node_id)} == set(tree.node_ids.tolist())


def test_exactly_w_leaves_over_random_early_stops():
    rng = np.random.default_rng(0)
    spreads = ["fixed_avg", "logprob", "inverse_logprob", "norm_logprob", "node_inverse_logprob"]
    policies = ["soft_boxed_and_eos", "finished_first", "finished_first_strict", "random_all", "longer_first"]
    n_trees = 0
    for trial in range(60):
        w = int(rng.integers(1, 20))
        c = cfg(width=w, branching=int(rng.integers(1, 4)), max_depth=int(rng.integers(1, 7)),
                segment_tokens=int(rng.integers(1, 5)), init_branching=1, init_branching_max=int(rng.integers(0, 9)),
                spread=spreads[trial % len(spreads)], fallback_candidates=policies[trial % len(policies)],
                fallback_point="from_start" if trial % 7 == 0 else "random")
        p_stop = float(rng.random())
        eng = ScriptedEngine(stops=lambda r, g, p=p_stop: g.random() < p, seed=trial, boxed=trial % 2 == 0)
        sampler = TreePOSampler(eng, c, seed=trial)
        for tree in sampler.sample(items(40)):
            check_tree(tree, c)
            n_trees += 1
    assert n_trees == 2400


def test_fallback_cut_points_and_engine_input():
    # every request's input is exactly prompt + the tokens of the path up to its new node's parent:
    # after a fallback that is the kept prefix, which ends on a segment boundary (the parent node)
    eng = ScriptedEngine(stops=lambda r, g: g.random() < 0.5, seed=3, boxed=True)
    c = cfg(width=8, max_depth=5, segment_tokens=3)
    sampler = TreePOSampler(eng, c, seed=1)
    trees = sampler.sample(items(30))
    first_token = {}
    for t, tree in enumerate(trees):
        for s in tree.segments:
            first_token[int(s.token_ids[0])] = (t, s)
    assert sum(len(call) for call in eng.calls) == sum(len(tree.node_ids) for tree in trees)
    made_at: dict[tuple[int, int], int] = {}  # (tree, node) -> engine call that made it
    for call_no, (call, results) in enumerate(zip(eng.calls, eng.results, strict=True)):
        for req, res in zip(call, results, strict=True):
            t, seg = first_token[res.token_ids[0]]
            tree = trees[t]
            want = tree.prompt_token_ids.tolist() + (tree.path_tokens(seg.parent_id).tolist()
                                                     if seg.parent_id != ROOT_ID else [])
            assert req.token_ids == want
            assert list(seg.token_ids) == res.token_ids and np.allclose(seg.logprobs, res.logprobs)
            made_at[t, seg.node_id] = call_no
    assert sampler.fallbacks > 0
    # a fallback branch hangs off an EXISTING internal node: siblings made by different engine calls
    late_branches = sum(1 for t, tree in enumerate(trees) for parent, kids in tree.children().items()
                        if parent != ROOT_ID and len({made_at[t, k] for k in kids}) > 1)
    assert late_branches > 0


def test_fallback_keeps_a_segment_boundary_prefix():
    c = cfg(segment_tokens=4, max_depth=5, width=16, branching=2)
    chain = (11, 12, 13, 14)
    leaf = Path(parent=14, chain=chain, tokens=tuple(range(14)), logprobs=tuple(-0.1 * i for i in range(14)),
                seg_lens=(4, 4, 4, 2))
    rng = np.random.default_rng(0)
    kept = [kept_segments(c, leaf, rng) for _ in range(4000)]
    assert set(kept) == {0, 1, 2, 3}  # n_blk = ceil(14/4) = 4 -> c in {0, 4, 8, 12}
    assert abs(np.mean(kept) - 1.5) < 0.1
    assert set(kept_segments(cfg(segment_tokens=4, max_depth=2), leaf, rng) for _ in range(200)) == {0, 1}  # depth cap
    paths = fallback_paths(c, [LeafRecord(leaf, "eos")] * 3 + [LeafRecord(leaf, "max_depth")] * 10, rng)
    assert len(paths) == 3  # r = 3: 2 copies of the first eos candidate, 1 of the second; max_depth is no candidate
    for p in paths:
        m = p.depth
        assert p.chain == chain[:m] and p.parent == (chain[m - 1] if m else ROOT_ID)
        assert p.tokens == leaf.tokens[:4 * m] and p.seg_lens == leaf.seg_lens[:m]
    assert paths[0] == paths[1]
    fresh = fallback_paths(c, [LeafRecord(leaf, "max_depth")] * 13, rng)
    assert fresh == [Path(), Path()]  # no candidate: min(b, r) fresh requests from the prompt


def test_random_initial_divergence_is_drawn_in_range():
    c = cfg(width=8, init_branching=2, init_branching_max=6, max_depth=1)
    eng = ScriptedEngine()
    sampler = TreePOSampler(eng, c, seed=0)
    draws = [sampler.initial_branching() for _ in range(500)]
    assert set(draws) == {2, 3, 4, 5, 6}
    assert {sampler.initial_branching() for _ in range(50)} <= set(range(2, 7))
    assert TreePOSampler(eng, cfg(init_branching=3)).initial_branching() == 3


# ---------------------------------------------------------------- streaming
def test_streaming_pieces_merge_to_the_whole_tree():
    eng = ScriptedEngine(stops=lambda r, g: g.random() < 0.3, seed=5, boxed=True)
    c = cfg(width=8, max_depth=6, segment_tokens=2)
    pieces = list(TreePOSampler(eng, c, seed=2).grow(items(12)))
    by_tree: dict[str, list] = {}
    for p in pieces:
        by_tree.setdefault(p.tree.tree_id, []).append(p)
    early = 0
    for tree_pieces in by_tree.values():
        assert [p.seq for p in tree_pieces] == list(range(len(tree_pieces)))
        assert [p.final for p in tree_pieces] == [False] * (len(tree_pieces) - 1) + [True]
        final = tree_pieces[-1]
        assert final.n_pieces == len(tree_pieces) and final.whole is not None
        sent = [int(n) for p in tree_pieces for n in p.tree.node_ids]
        assert len(sent) == len(set(sent))  # nothing resent
        merged = tree_pieces[0].tree
        for p in tree_pieces[1:]:
            merged.merge(p.tree)
        whole = final.whole
        assert same(sorted(merged.segments, key=lambda s: s.node_id), whole.segments)
        assert same(sorted(merged.leaves, key=lambda v: v.node_id), sorted(whole.leaves, key=lambda v: v.node_id))
        for p in tree_pieces[:-1]:  # an early piece holds only finished subtrees: all its nodes' leaves are in it
            early += 1
            leaves_in = set(p.tree.leaf_ids.tolist())
            for n in p.tree.node_ids.tolist():
                assert {v.node_id for v in whole.leaves_under(n)} <= leaves_in | {
                    int(x) for q in tree_pieces[p.seq + 1:] for x in q.tree.leaf_ids}
        assert final.message("a0").key == f"{whole.tree_id}/{final.seq}"
    assert early > 0


# ---------------------------------------------------------------- versions, TreeRPO, independent
def test_segments_record_the_engine_policy_version():
    eng = ScriptedEngine()
    sampler = TreePOSampler(eng, cfg(width=4, max_depth=3))
    gen = sampler.grow(items(1))
    eng.load_weights({}, 7)
    pieces = list(gen)
    whole = pieces[-1].whole
    assert set(whole.versions.tolist()) == {7}


def test_treerpo_full_tree_and_last_step_to_the_cap():
    eng = ScriptedEngine()
    c = cfg(treerpo_children=2, treerpo_depth=3, treerpo_step_tokens=4, treerpo_max_tokens=20)
    tree = TreeRPOSampler(eng, c).sample(items(1))[0]
    assert queue_sizes(eng) == [2, 4, 8]
    assert [r.max_new_tokens for r in eng.calls[2]] == [12] * 8  # 20 - 2*4
    assert len(tree.node_ids) == 14 and len(tree.leaves) == 8
    assert {leaf.stop_reason for leaf in tree.leaves} == {"max_tokens"}
    assert tree.sampling.mode == "treerpo" and tree.sampling.width == 8


def test_treerpo_early_eos_makes_shallow_leaves():
    eng = ScriptedEngine(stops=lambda r, g: len(r.token_ids) == 5 and g.random() < 0.5, seed=1)
    tree = TreeRPOSampler(eng, cfg(treerpo_children=2, treerpo_depth=3, treerpo_step_tokens=4)).sample(items(1))[0]
    depths = {leaf.node_id: tree.segment(leaf.node_id).depth for leaf in tree.leaves}
    shallow = [n for n, d in depths.items() if d == 1]
    assert all(tree.segment(n).token_ids[-1] == EOS for n in shallow)
    assert len(tree.leaves) == 8 - 3 * len(shallow)


def test_independent_sampling():
    eng = ScriptedEngine(stops=lambda r, g: g.random() < 0.5, seed=2, boxed=True)
    trees = IndependentSampler(eng, cfg(width=5, max_depth=3, segment_tokens=4)).sample(items(3))
    assert queue_sizes(eng) == [15]
    assert all(r.max_new_tokens == 12 for r in eng.calls[0])
    for t in trees:
        assert len(t.leaves) == 5 and set(t.depths.tolist()) == {1} and set(t.parent_ids.tolist()) == {ROOT_ID}
        for leaf in t.leaves:
            ends_eos = t.segment(leaf.node_id).token_ids[-1] == EOS
            assert leaf.stop_reason == ("max_tokens" if not ends_eos else
                                        "finished" if BOXED_IN(t, leaf.node_id) else "eos")


def BOXED_IN(tree: Tree, node: int) -> bool:  # noqa: N802
    return 7 in tree.segment(node).token_ids.tolist()


@pytest.mark.parametrize("policy", ["soft_boxed_and_eos", "finished_first_strict"])
def test_fallback_happens_and_still_w(policy):
    eng = ScriptedEngine(stops=lambda r, g: True, seed=4, boxed=True)  # every segment ends: fallback every step
    c = cfg(width=6, max_depth=4, fallback_candidates=policy, short_answer_fallback=False)
    sampler = TreePOSampler(eng, c, seed=0)
    tree = sampler.sample(items(1))[0]
    check_tree(tree, c)
    assert queue_sizes(eng) == [2, 4]  # 2 leaves, r = 4: 2 candidates x min(b, r) = 2 copies each
    assert sampler.fallbacks == 1


# ---------------------------------------------------------------- the pool: continuous tree batching
def _slow_first_prompt(eng: ScriptedEngine) -> None:
    """p0's paths never stop; every other prompt's paths stop at their second segment (prompts are 5 tokens,
    p0's first token is 0)."""
    eng.stops = lambda r, g: r.token_ids[0] != 0 and len(r.token_ids) > 5


def _refill_from(rest: list[PromptItem], offered: list[int]):
    def refill(free: int) -> list[PromptItem]:
        offered.append(free)
        got, rest[:] = rest[:free], rest[free:]
        return got
    return refill


def test_a_slow_tree_holds_back_no_other_tree_in_the_pool():
    """TreePO, 4 slots, 10 prompts: p0 needs d = 10 steps, the others 2. Their slots are refilled as soon as
    their trees end (p4..p6 join at step 3, p7..p9 at step 5) while p0 runs on; every tree has exactly w leaves."""
    eng = ScriptedEngine()
    _slow_first_prompt(eng)
    pending, offered = items(10), []
    sampler = TreePOSampler(eng, cfg(segment_tokens=4, max_depth=10, width=4))
    finals = [p for p in sampler.grow(pending[:4], refill=_refill_from(pending[4:], offered), slots=4) if p.final]
    trees = {p.whole.prompt_id: p.whole for p in finals}
    assert sorted(trees) == sorted(i.prompt_id for i in pending)
    assert all(len(t.leaves) == 4 for t in trees.values())  # exactly w, always
    prompts_per_call = [sorted({int(r.token_ids[0]) for r in call}) for call in eng.calls]
    assert prompts_per_call[:5] == [[0, 10, 20, 30]] * 2 + [[0, 40, 50, 60]] * 2 + [[0, 70, 80, 90]]
    assert len(eng.calls) == 10  # p0's 10 steps bound the run; with rounds it would be 10 + 2 + 2 steps
    assert offered[0] == 3  # after step 2, p1..p3 are done
    assert int(trees["p0"].depths.max()) == 10 and int(trees["p5"].depths.max()) == 2


@pytest.mark.parametrize("sampler_cls", [TreeRPOSampler, IndependentSampler])
def test_every_sampler_grows_a_pool(sampler_cls):
    eng = ScriptedEngine()
    _slow_first_prompt(eng)
    pending, offered = items(7), []
    c = cfg(segment_tokens=4, max_depth=2, width=4, treerpo_children=2, treerpo_depth=4, treerpo_step_tokens=4)
    sampler = sampler_cls(eng, c)
    finals = [p for p in sampler.grow(pending[:3], refill=_refill_from(pending[3:], offered), slots=3) if p.final]
    trees = {p.whole.prompt_id: p.whole for p in finals}
    assert sorted(trees) == [f"p{i}" for i in range(7)]
    assert sum(offered) >= 4 and all(f <= 3 for f in offered)
    calls_with_p0 = [i for i, call in enumerate(eng.calls) if any(r.token_ids[0] == 0 for r in call)]
    if sampler_cls is TreeRPOSampler:  # p0 grows its full binary tree of depth 4 while the others come and go
        assert len(calls_with_p0) == 4 and len(trees["p0"].leaves) == 16
        assert any(r.token_ids[0] == 40 for r in eng.calls[calls_with_p0[-1]])  # p4 joined at step 3
    else:  # one step per tree: every step's 3 slots are refilled at once (p0-p2, p3-p5, p6)
        assert [sorted({int(r.token_ids[0]) for r in call}) for call in eng.calls] == [[0, 10, 20], [30, 40, 50], [60]]
        assert offered == [3, 3, 3] and all(len(t.leaves) == 4 for t in trees.values())


def test_without_refill_the_trees_grow_as_before():
    eng = ScriptedEngine()
    trees = TreePOSampler(eng, cfg()).sample(items(3))
    assert queue_sizes(eng) == [6, 12, 24, 48, 48, 48] and all(len(t.leaves) == 16 for t in trees)


@pytest.mark.parametrize("sampler_cls", [TreePOSampler, TreeRPOSampler])
def test_the_first_child_of_a_path_continues_its_running_request(sampler_cls):
    """On an engine that keeps requests running, every path that goes on is continued by exactly one child
    (the first queued), its other children and the fallbacks are new requests, no handle outlives the next
    call, and the trees are the ones grown without continuations."""
    c = cfg(width=8, max_depth=4, treerpo_depth=3, treerpo_children=2, treerpo_step_tokens=4)
    stops = lambda r, g: g.random() < 0.2  # noqa: E731
    plain, running = ScriptedEngine(stops=stops, seed=7, boxed=True), ScriptedEngine(stops=stops, seed=7, boxed=True,
                                                                                     handles=True)
    want = sampler_cls(plain, c, seed=1).sample(items(6))
    got = sampler_cls(running, c, seed=1).sample(items(6))
    assert all(same(a, b) for a, b in zip(want, got, strict=True))
    continued = 0
    for prev_call, prev_results, call in zip(running.calls, running.results, running.calls[1:], strict=False):
        grown = {tuple(q.token_ids) + tuple(r.token_ids): r.handle for q, r in zip(prev_call, prev_results, strict=True)
                 if r.handle is not None}
        claims = {tuple(r.token_ids): r.continues for r in call if r.continues is not None}
        going_on = {tuple(r.token_ids) for r in call} & grown.keys()
        assert claims == {k: grown[k] for k in going_on}  # one child of each path that goes on, with its handle
        for i, r in enumerate(call):  # ... the first queued
            if r.continues is not None:
                assert all(q.token_ids != r.token_ids for q in call[:i])
        continued += len(claims)
    assert continued > 0
    assert sum(map(len, running.calls)) == sum(map(len, plain.calls))
