"""The learner's own gradient clip (fp32 ZeRO-0) equals torch's clip_grad_norm_ followed by the AdamW step."""

import pytest
import torch

from learner.engine import GradClipHook


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 40), (40,), (17, 3, 5)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.3
    return params


def _step_both(max_norm: float, seed: int):
    reference, ours = _params(seed), _params(seed)
    ref_opt = torch.optim.AdamW(reference, lr=0.1, weight_decay=0.01, fused=True)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(reference, max_norm))
    ref_opt.step()
    opt = torch.optim.AdamW(ours, lr=0.1, weight_decay=0.01, fused=True)
    hook = GradClipHook(ours, max_norm)
    opt.register_step_pre_hook(hook)
    opt.step()
    return reference, ours, ref_norm, hook, opt, ref_opt


@pytest.mark.parametrize("max_norm", [0.5, 1e9])  # clipped (the norm is about 20), and not
def test_clip_in_the_fused_step_equals_clip_then_step(max_norm):
    reference, ours, ref_norm, hook, opt, ref_opt = _step_both(max_norm, seed=3)
    assert hook.norm == pytest.approx(ref_norm, rel=1e-5)
    assert (opt.grad_scale is None) == (max_norm > ref_norm)
    for a, b in zip(reference, ours, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        # Adam's first step is nearly scale-free: the moments show that the clipped gradient went in
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[b][key], ref_opt.state[a][key], rtol=1e-5, atol=1e-9)
    assert not torch.equal(ours[0], _params(3)[0])  # it did step


def test_a_step_that_needs_no_clip_resets_the_scale_of_one_that_did():
    params = _params(5)
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    hook = GradClipHook(params, 1.0)
    opt.register_step_pre_hook(hook)
    opt.step()
    assert opt.grad_scale is not None and float(opt.grad_scale) == pytest.approx(hook.norm, rel=1e-5)
    for p in params:
        p.grad = torch.full_like(p, 1e-4)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert opt.grad_scale is None
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
