"""The hand-written backward passes (router and RMSNorm) against finite differences
(`torch.autograd.gradcheck`) and against plain autograd of the hooked path."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_routing, tiny_model

from hooked_attnres.model.norms import RMSNorm, _FusedRMSNorm
from hooked_attnres.model.routing import _FusedRouting


@pytest.mark.parametrize("n_sources", [1, 2, 4])
@pytest.mark.parametrize("bias", [None, 0.7])
def test_fused_router_backward_passes_gradcheck(n_sources, bias):
    generator = torch.Generator().manual_seed(n_sources)
    sources = [
        torch.randn(2, 3, 6, dtype=torch.float64, generator=generator).requires_grad_()
        for _ in range(n_sources)
    ]
    query = torch.randn(6, dtype=torch.float64, generator=generator).requires_grad_()
    bias_t = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    inputs = (query, bias_t, 1e-6, *sources)
    assert torch.autograd.gradcheck(_FusedRouting.apply, inputs)


def test_fused_rms_norm_backward_passes_gradcheck():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64, generator=generator).requires_grad_()
    w = (1 + 0.3 * torch.randn(8, dtype=torch.float64, generator=generator)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _FusedRMSNorm.apply(x, w, 1e-6), (x, w))


@pytest.mark.parametrize("shape", [(3, 5, 16), (2, 4, 3, 8)])
def test_fused_rms_norm_equals_the_hooked_path(shape):
    """Same forward bits; gradients equal to 1e-9 relative (float64); and the fused path
    is the one taken when a gradient is needed and nothing watches."""
    norm = RMSNorm(shape[-1], 1e-6).double()
    with torch.no_grad():
        norm.w.mul_(1 + 0.3 * torch.randn(shape[-1], dtype=torch.float64))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    fused = norm(x)
    assert fused.grad_fn is not None and "FusedRMSNorm" in type(fused.grad_fn).__name__
    upstream = torch.randn_like(fused)
    grads = torch.autograd.grad(fused, (x, norm.w), upstream)
    with _watch(norm):
        plain = norm(x)
    assert "FusedRMSNorm" not in type(plain.grad_fn).__name__
    assert torch.equal(fused, plain)
    for mine, reference in zip(
        grads, torch.autograd.grad(plain, (x, norm.w), upstream), strict=True
    ):
        torch.testing.assert_close(mine, reference, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(norm(x), fused)


class _watch:
    """Attach an identity hook to ``hook_normalized`` (forces the hooked path)."""

    def __init__(self, norm: RMSNorm):
        self.norm = norm

    def __enter__(self):
        self.handle = self.norm.hook_normalized.register_forward_hook(lambda m, i, o: None)

    def __exit__(self, *exc):
        self.handle.remove()


def test_training_step_gradients_equal_with_and_without_fused_kernels(routed_layout, tokens):
    """Every parameter's gradient of a float64 model: fused router + fused norms (nothing
    watched) against plain autograd (every hook watched), to 1e-9 relative."""
    model = randomize_routing(tiny_model(attnres_layout=routed_layout, attnres_recency_bias=0.5))
    model = model.to(torch.float64)

    def grads(watch: bool):
        model.zero_grad(set_to_none=True)
        hooks = [(lambda name: True, lambda t, hook: None)] if watch else []
        with model.hooks(fwd_hooks=hooks):
            loss = model(tokens, return_type="loss")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused_loss, fused = grads(False)
    plain_loss, plain = grads(True)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-12, atol=0)
    for name, grad in fused.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-9, atol=1e-12, msg=name)
