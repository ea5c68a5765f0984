"""The policy loss against hand-computed values: clip on both sides, dual clip, importance cap, KL."""

import math

import pytest
import torch

from learner.loss import LossSettings, LossStats, policy_loss

ON_POLICY = LossSettings(off_policy="on_policy")


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def test_clip_both_sides_and_dual_clip():
    # on-policy: r = exp(lp - behaviour) with behaviour 0
    ratios = [1.5, 0.5, 0.5, 1.5, 20.0, 3.0]
    adv = _t(1, 1, -1, -1, -1, 1)
    mask = _t(1, 1, 1, 1, 1, 0)  # the last token is not trained
    lp = torch.log(_t(*ratios)).requires_grad_()
    loss, stats = policy_loss(lp, torch.zeros(6, dtype=torch.float64), adv, mask, ON_POLICY)
    # per token: -1.28 (clip high), -0.5, 0.8 (clip low), 1.5, 10 (dual clip)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5 + 10) / 5)
    loss.backward()
    # d loss / d lp = -A r / 5 where unclipped, 0 where clipped
    assert lp.grad.tolist() == pytest.approx([0, -0.5 / 5, 0, 1.5 / 5, 0, 0])
    assert (stats.tokens, stats.clipped_high, stats.clipped_low, stats.dual_clipped) == (5, 1, 1, 1)
    summary = stats.summary()
    assert summary["clip_frac_low"] == summary["clip_frac_high"] == summary["dual_clip_frac"] == 0.2


def test_decoupled_importance_weight_is_capped():
    settings = LossSettings(importance_cap=2.0)
    behaviour = _t(-1.0, -1.0, -1.0)
    prox = behaviour + torch.log(_t(1.5, 3.0, 0.5))
    lp = prox.clone().requires_grad_()  # current = proximal: ratio 1
    loss, stats = policy_loss(lp, behaviour, _t(1, 1, -1), _t(1, 1, 1), settings, proximal_logprobs=prox)
    # -A * w: -1.5, -2 (3 capped at 2), +0.5
    assert loss.item() == pytest.approx((-1.5 - 2.0 + 0.5) / 3)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-1.5 / 3, -2 / 3, 0.5 / 3])
    assert stats.importance_weight == pytest.approx(5.0) and stats.importance_capped == 1
    assert (stats.importance_weight_max, stats.importance_weight_min) == pytest.approx((3.0, 0.5))


def test_decoupled_clips_against_the_proximal_policy():
    behaviour = _t(0.0, 0.0)
    prox = _t(0.0, 0.0)
    lp = torch.log(_t(1.5, 0.5))
    loss, _ = policy_loss(lp, behaviour, _t(1, -1), _t(1, 1), LossSettings(), proximal_logprobs=prox)
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2)


def test_on_policy_is_the_special_case_of_decoupled():
    g = torch.Generator().manual_seed(0)
    lp0 = torch.randn(64, generator=g, dtype=torch.float64) * 0.3 - 2
    behaviour = lp0 + torch.randn(64, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(64, generator=g, dtype=torch.float64)
    mask = (torch.rand(64, generator=g) > 0.2).double()
    a, b = lp0.clone().requires_grad_(), lp0.clone().requires_grad_()
    plain, _ = policy_loss(a, behaviour, adv, mask, ON_POLICY)
    # decoupled with proximal = behaviour (and a cap that never binds) is plain PPO
    dec, _ = policy_loss(b, behaviour, adv, mask, LossSettings(importance_cap=1.5), proximal_logprobs=behaviour)
    plain.backward()
    dec.backward()
    assert dec.item() == pytest.approx(plain.item(), rel=1e-12)
    assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=0)


def test_kl_to_reference_k3_and_normaliser():
    lp = _t(-1.0, -2.0)
    ref = lp + math.log(2.0)  # k3 = 2 - ln 2 - 1
    settings = LossSettings(off_policy="on_policy", kl_coef=0.1)
    loss, stats = policy_loss(lp, lp, _t(0, 0), _t(1, 1), settings, ref_logprobs=ref, normaliser=4.0)
    k3 = 1 - math.log(2.0)
    assert loss.item() == pytest.approx(2 * 0.1 * k3 / 4)
    assert stats.ref_kl == pytest.approx(2 * k3)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(lp, lp, _t(0, 0), _t(1, 1), settings)


def test_approx_kl_and_stats_merge():
    lp, behaviour = _t(math.log(2.0)), _t(0.0)
    _, s1 = policy_loss(lp, behaviour, _t(1), _t(1), ON_POLICY)
    assert s1.approx_kl == pytest.approx(2 - 1 - math.log(2.0))
    total = LossStats()
    total.merge(s1)
    total.merge(s1)
    assert total.tokens == 2 and total.summary()["approx_kl"] == pytest.approx(1 - math.log(2.0))
