"""The DeepSpeed learner on the tiny model, one process (ZeRO-0, fp32, gloo): training moves log-probs the
right way, metrics, the reference-model KL, and an export that transformers loads with identical logits."""

import json

import numpy as np
import pytest
import torch

from learner.engine import Learner
from protocol.config.learner import LearnerConfig
from tests.fixtures.learner import tree_from_edges, with_policy_logprobs, worked_example_tree

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def learner(tiny_model_dir):
    return Learner(LearnerConfig(lr=1e-3, warmup_steps=0, micro_batch_tokens=32), tiny_model_dir)


def _segment_logprob(model, tree, leaf: int) -> float:
    """Sum of log-probs of the leaf's own last segment under `model`."""
    ids = torch.tensor(np.concatenate([tree.prompt_token_ids, tree.path_tokens(leaf)]), dtype=torch.long)[None]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(lp[-int(tree.seg_lens[tree.index[leaf]]):].sum())


def test_steps_raise_positive_and_lower_negative_leaves(learner):
    module = learner.engine.module
    tree = with_policy_logprobs(worked_example_tree(seg_lens={n: 3 for n in range(1, 7)}), module)
    flat = with_policy_logprobs(tree_from_edges({1: 0, 2: 0, 3: 0}, {1: 1.0, 2: -1.0, 3: -1.0}, tree_id="flat",
                                                first_token=500), module)
    before = {(t.tree_id, leaf): _segment_logprob(module, t, leaf) for t in (tree, flat) for leaf in t.leaf_ids.tolist()}
    metrics = [learner.step([tree, flat]) for _ in range(3)]
    after = {k: _segment_logprob(module, t, k[1]) for t in (tree, flat) for k in before if k[0] == t.tree_id}
    # TreePO advantages before whitening: A1 1.25, A2 -0.75, B1/B2 -0.25; flat: 4/3, -2/3, -2/3 (whitening keeps signs)
    up = {("t", 3), ("flat", 1)}
    for key in before:
        assert (after[key] > before[key]) == (key in up), key
    first = metrics[0]
    # behaviour = the current weights: importance weight 1; one update per batch: the proximal policy is the
    # current one, so the ratio is 1 (the clip acts only from a batch's second update on: see the mini-batch test);
    # tree-packed (the default): the trees' 21 and 9 unique tokens in two micro-batches of <= 32 tokens, for rows
    # of 9,9,9,9 / 5,5,5 tokens
    assert first["importance_weight"] == pytest.approx(1.0, abs=1e-5)
    assert first["ratio_mean"] == 1.0 and first["proximal_kl"] == 0.0 and first["optimizer_steps"] == 1
    assert first["proximal_pass_s"] == 0.0  # no extra forward for a single update
    assert first["trained_tokens"] == 4 * 6 + 3 * 2 and first["sequences"] == 7
    assert (first["tokens"], first["row_tokens"]) == (21 + 9, 4 * 9 + 3 * 5)
    assert first["head_positions"] == 6 * 3 + 3 * 2  # every response token once through the LM head
    assert first["micro_batches"] == 2 and first["grad_norm"] > 0 and first["lr"] == 1e-3
    assert metrics[2]["step"] == metrics[2]["policy_version"] == 3
    assert metrics[2]["importance_weight"] > 1.0  # the policy moved away from the behaviour log-probs


@pytest.mark.parametrize("estimator", ["treepo", "treerpo", "grpo"])
def test_tree_packed_steps_equal_per_leaf_rows(tiny_model_dir, estimator):
    """Three DeepSpeed steps each way on the same trees: the same losses, gradient norms and weights (fp32)."""
    tree = worked_example_tree(seg_lens={1: 3, 2: 1, 3: 2, 4: 5, 5: 4, 6: 1})
    flat = tree_from_edges({1: 0, 2: 0, 3: 0}, {1: 1.0, 2: -1.0, 3: 0.0}, tree_id="flat", first_token=500)
    runs = {}
    for packing in ("rows", "tree"):
        learner = Learner(LearnerConfig(estimator=estimator, packing=packing, lr=1e-3, warmup_steps=0,
                                        micro_batch_tokens=32, kl_coef=0.1), tiny_model_dir)
        assert learner.packing == packing
        runs[packing] = ([learner.step([tree, flat]) for _ in range(3)], learner.cpu_state_dict())
    (rows, rows_weights), (packed, packed_weights) = runs["rows"], runs["tree"]
    for r, p in zip(rows, packed, strict=True):
        for key in ("loss", "grad_norm", "importance_weight", "ref_kl", "entropy", "trained_tokens", "sequences"):
            assert p[key] == pytest.approx(r[key], rel=1e-4, abs=1e-7), key
        assert p["tokens"] < r["tokens"] and p["row_tokens"] == r["row_tokens"] == r["tokens"]
        assert p["head_positions"] <= r["head_positions"] == r["trained_tokens"]
    for name, w in rows_weights.items():  # Adam moves a weight by up to lr per step whatever its gradient's size,
        # so a float32 rounding difference on a near-zero gradient can show up to a fraction of lr
        torch.testing.assert_close(packed_weights[name], w, rtol=0, atol=1e-4)


def _path_logprobs(model, tree, leaf: int) -> np.ndarray:
    """log pi(token) of every response token on the leaf's path under `model` (raw distribution)."""
    ids = torch.tensor(np.concatenate([tree.prompt_token_ids, tree.path_tokens(leaf)]), dtype=torch.long)[None]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[len(tree.prompt_token_ids) - 1:].numpy().astype(np.float64)


def test_mini_batches_take_each_ratio_against_the_batch_start_and_clip(tiny_model_dir):
    """Two mini-batches of one tree each: the first update has ratio 1 and no clipping; the second's ratio is
    against the proximal (start-of-batch) log-probs, and its loss and clip fractions equal a hand computation
    of the clipped objective (decoupled, behaviour weight capped) on log-probs computed here."""
    from transformers import AutoModelForCausalLM

    from learner.advantage.grpo import grpo_advantages

    w0 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    t1 = with_policy_logprobs(tree_from_edges({1: 0, 2: 0, 3: 0}, {1: 1.0, 2: -1.0, 3: 0.0}, tree_id="t1",
                                              seg_lens={1: 4, 2: 4, 3: 4}), w0)
    t2 = with_policy_logprobs(tree_from_edges({1: 0, 2: 0, 3: 0}, {1: -1.0, 2: 1.0, 3: -1.0}, tree_id="t2",
                                              seg_lens={1: 4, 2: 4, 3: 4}, first_token=500), w0)
    t2.logprobs[:] = t2.logprobs - np.linspace(-0.3, 0.9, len(t2.logprobs))  # the actor lagged: weights 0.74..2.46
    base = {"estimator": "grpo", "lr": 0.05, "warmup_steps": 0, "micro_batch_tokens": 64}
    learner = Learner(LearnerConfig(**base, mini_batches_per_batch=2), tiny_model_dir)
    after_first = Learner(LearnerConfig(**base), tiny_model_dir)  # one update on t1 alone: where update 2 starts
    after_first.step([t1])
    metrics = learner.step([t1, t2])
    assert (metrics["mini_batches"], metrics["optimizer_steps"], metrics["step"]) == (2, 2, 1)
    assert metrics["proximal_pass_s"] > 0
    u1, u2 = learner.updates
    assert u1["ratio_min"] == pytest.approx(1.0, abs=1e-5) and u1["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert u1["clip_frac_low"] == u1["clip_frac_high"] == u1["dual_clip_frac"] == 0.0

    adv = grpo_advantages(t2, LearnerConfig().adv_eps)
    leaves = t2.leaf_ids.tolist()
    a = np.concatenate([np.full(len(t2.path_tokens(leaf)), adv[leaf]) for leaf in leaves])
    lp = np.concatenate([_path_logprobs(after_first.engine.module, t2, leaf) for leaf in leaves])
    prox = np.concatenate([_path_logprobs(w0, t2, leaf) for leaf in leaves])
    beh = np.concatenate([t2.path_logprobs(leaf) for leaf in leaves]).astype(np.float64)
    r = np.exp(lp - prox)
    w = np.minimum(np.exp(prox - beh), 2.0)
    per_token = np.maximum(-a * r, -a * np.clip(r, 0.8, 1.28))
    per_token = np.where(a < 0, np.minimum(per_token, -a * 10.0), per_token) * w
    assert np.abs(r - 1).max() > 0.2  # lr 0.05 moved the policy far
    assert u2["loss"] == pytest.approx(per_token.mean(), rel=1e-4)
    assert u2["ratio_mean"] == pytest.approx(r.mean(), rel=1e-4)
    assert u2["clip_frac_low"] == pytest.approx(((a < 0) & (r < 0.8)).mean())
    assert u2["clip_frac_high"] == pytest.approx(((a > 0) & (r > 1.28)).mean())
    assert u2["dual_clip_frac"] == pytest.approx(((a < 0) & (r > 10)).mean())
    assert u2["clip_frac_low"] + u2["clip_frac_high"] > 0
    assert u2["importance_capped_frac"] == pytest.approx((np.exp(prox - beh) > 2.0).mean())
    assert metrics["clip_frac_high"] == pytest.approx(u2["clip_frac_high"] / 2)  # the step: both updates' tokens


def test_export_loads_in_transformers_with_identical_logits(learner, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = learner.export(tmp_path / "export")
    assert (out / "model.safetensors").exists()
    assert json.loads((out / "policy.json").read_text()) == {"step": learner.step_count,
                                                             "policy_version": learner.policy_version}
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 100, 101, 102, 500]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, learner.engine.module(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(out).vocab_size > 0
    pushed = learner.cpu_state_dict()
    assert set(pushed) >= {k for k in loaded.state_dict() if k != "lm_head.weight"}
    params = dict(learner.engine.module.named_parameters())
    with learner.full_weights() as weights:  # lent to the publisher without a copy
        assert all(weights[k].data_ptr() == p.data_ptr() for k, p in params.items() if k in weights)
        assert "lm_head.weight" not in weights  # tied to the embedding: its bytes travel once
        assert all(torch.equal(weights[k], pushed[k]) for k in pushed)


def test_treerpo_with_reference_kl(tiny_model_dir):
    cfg = LearnerConfig(estimator="treerpo", kl_coef=0.1, lr=1e-3, warmup_steps=2, micro_batch_tokens=64)
    learner = Learner(cfg, tiny_model_dir)
    tree = with_policy_logprobs(worked_example_tree(), learner.engine.module)
    m1, m2 = learner.step([tree]), learner.step([tree])
    assert m1["ref_kl"] == pytest.approx(0.0, abs=1e-9) and m2["ref_kl"] > 0
    assert (m1["groups_kept"], m1["groups_dropped_zero_spread"]) == (2, 1)
    assert m1["trained_tokens"] == 8  # segments 1..4, each once
    assert (m1["lr"], m2["lr"]) == (5e-4, 1e-3)  # warm-up over 2 steps


def test_zero3_gathers_full_weights_for_push_and_export(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    # logit chunks of 5 positions: the LM head (gathered by ZeRO-3) is re-run chunk by chunk in the backward pass
    learner = Learner(LearnerConfig(zero_stage=3, lr=1e-3, warmup_steps=0, micro_batch_tokens=64,
                                    logit_chunk_tokens=5), tiny_model_dir)
    tree = with_policy_logprobs(worked_example_tree(), AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    plain = Learner(LearnerConfig(lr=1e-3, warmup_steps=0, micro_batch_tokens=64), tiny_model_dir).step([tree])
    metrics = learner.step([tree])
    assert metrics["grad_norm"] > 0 and metrics["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    pushed = learner.cpu_state_dict()
    embed = pushed["model.embed_tokens.weight"]
    assert embed.shape == (learner.engine.module.config.vocab_size, learner.engine.module.config.hidden_size)
    loaded = AutoModelForCausalLM.from_pretrained(learner.export(tmp_path / "z3"), dtype=torch.float32)
    assert torch.equal(loaded.state_dict()["model.embed_tokens.weight"], embed)
    ids = torch.tensor([[1, 2, 3, 100, 101]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, learner.engine(input_ids=ids).logits, atol=1e-5)
    # a ZeRO-3 checkpoint (partitioned weights) exported as a model directory holds the same weights
    from treepo.checkpoint_export import export_checkpoint

    learner.save_checkpoint(tmp_path / "ckpt")
    restored = AutoModelForCausalLM.from_pretrained(export_checkpoint(tmp_path / "ckpt" / "step1", tiny_model_dir,
                                                                      tmp_path / "z3-ckpt"), dtype=torch.float32)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in pushed.items())
