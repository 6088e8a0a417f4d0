"""The hand-written backward passes (router and RMSNorm) against finite differences
(`torch.autograd.gradcheck`) and against plain autograd of the hooked path."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL_QWEN3, eps_zero_config, hf_qwen3, randomize_routing, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from hooked_attnres import HookedAttnRes
from hooked_attnres.model.norms import RMSNorm, _FusedRMSNorm, padding_eps, rms_scale
from hooked_attnres.model.passes import pass_extent
from hooked_attnres.model.routing import _FusedRouting, source_scales


def _router_inputs(n_sources: int, bias) -> tuple:
    """``_FusedRouting.apply``'s arguments: a query, a bias (or None), eps and ``n_sources``
    float64 sources ``[2, 3, 6]``, all requiring a gradient."""
    generator = torch.Generator().manual_seed(n_sources)
    sources = [
        torch.randn(2, 3, 6, dtype=torch.float64, generator=generator).requires_grad_()
        for _ in range(n_sources)
    ]
    query = torch.randn(6, dtype=torch.float64, generator=generator).requires_grad_()
    bias_t = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    return (query, bias_t, 1e-6, *sources)


@pytest.mark.parametrize("n_sources", [1, 2, 4])
@pytest.mark.parametrize("bias", [None, 0.7])
def test_fused_router_backward_passes_gradcheck(n_sources, bias):
    assert torch.autograd.gradcheck(_FusedRouting.apply, _router_inputs(n_sources, bias))


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


# Second derivatives (docs/architecture.md, "hand-written backward passes"): with
# ``create_graph=True`` both hand-written backward passes differentiate the same formula
# with autograd, so a Hessian-vector product or a gradient penalty is exact; before, the
# graph of the first gradient silently lost every path through them (a finite, wrong
# Hessian-vector product, or "appears to not have been used in the graph").


@pytest.mark.parametrize("n_sources", [1, 3])
@pytest.mark.parametrize("bias", [None, 0.7])
def test_fused_router_double_backward_gradgradcheck(n_sources, bias):
    assert torch.autograd.gradgradcheck(_FusedRouting.apply, _router_inputs(n_sources, bias))


def test_fused_rms_norm_double_backward_gradgradcheck():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=generator).requires_grad_()
    w = (1 + 0.3 * torch.randn(8, dtype=torch.float64, generator=generator)).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w: _FusedRMSNorm.apply(x, w, 1e-6), (x, w))


SECOND_ORDER_KINDS = ["kimi", "cumulative", "full", "none", "recency", "exact"]


def _second_order_model(kind: str):
    """A tiny float64 model: a native layout with random routing, or a wrap of a tiny
    Qwen3 (``recency`` / ``exact``)."""
    if kind in ("recency", "exact"):
        hf = hf_qwen3(seed=1, num_hidden_layers=2, **SMALL_QWEN3)
        return HookedAttnRes.from_hf_qwen3(hf, wrap=kind, num_blocks=1, dtype=torch.float64)
    model = tiny_model(
        d_model=8,
        n_layers=2,
        n_heads=2,
        n_key_value_heads=1,
        d_head=4,
        d_mlp=12,
        d_vocab=17,
        attnres_layout=kind,
        attnres_num_blocks=1,
        attnres_recency_bias=0.5,
        dtype=torch.float64,
    )
    return randomize_routing(model, seed=3)


def _grad_fn_names(tensor: torch.Tensor) -> set[str]:
    """The class names of every node of ``tensor``'s autograd graph."""
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _hvp_against_finite_differences(model, kind, thetas, fwd_hooks) -> None:
    """The Hessian-vector product of a scalar metric of the logits with respect to
    ``thetas`` (double backward) against central differences of its first gradient
    (Richardson-extrapolated, so truncation is ``O(h**4)``), to 1e-7 relative."""
    tokens = torch.randint(0, 17, (2, 4), generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(5)
    vs = [torch.randn(t.shape, dtype=torch.float64, generator=generator) for t in thetas]
    length = torch.cat([v.flatten() for v in vs]).norm()
    vs = [v / length for v in vs]  # a unit direction, so that the steps below are small

    def first_gradient(create_graph: bool):
        logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
        if create_graph:  # the fast paths are the ones differentiated twice
            names = " ".join(_grad_fn_names(logits))
            assert "FusedRoutingBackward" in names or kind == "none"
            assert "FusedRMSNormBackward" in names
        metric = logits.logsumexp(-1).sum() + logits[..., 3].square().sum()
        return torch.autograd.grad(metric, thetas, create_graph=create_graph)

    grads = first_gradient(True)
    dot = sum((g * v).sum() for g, v in zip(grads, vs, strict=True))
    hvp = torch.cat([h.flatten() for h in torch.autograd.grad(dot, thetas)])

    def central(h: float) -> torch.Tensor:
        with torch.no_grad():
            for theta, v in zip(thetas, vs, strict=True):
                theta.add_(h * v)
        plus = first_gradient(False)
        with torch.no_grad():
            for theta, v in zip(thetas, vs, strict=True):
                theta.sub_(2 * h * v)
        minus = first_gradient(False)
        with torch.no_grad():
            for theta, v in zip(thetas, vs, strict=True):
                theta.add_(h * v)
        return torch.cat([(p - m).flatten() / (2 * h) for p, m in zip(plus, minus, strict=True)])

    h = 1e-4
    expected = (4 * central(h / 2) - central(h)) / 3
    assert (hvp - expected).norm() <= 1e-7 * expected.norm()


@pytest.mark.parametrize("kind", SECOND_ORDER_KINDS)
def test_hessian_vector_product_without_hooks(kind):
    """The last block's MLP weights: no attention downstream, so no hook is needed and
    the routers and norms take their hand-written backward passes (a finite Hessian-vector
    product 0.3-9 % off before second derivatives went through them)."""
    model = _second_order_model(kind)
    params = dict(model.named_parameters())
    thetas = [params["blocks.1.mlp.W_gate"], params["blocks.1.mlp.W_in"]]
    _hvp_against_finite_differences(model, kind, thetas, fwd_hooks=[])


@pytest.mark.parametrize("kind", SECOND_ORDER_KINDS)
def test_hessian_vector_product_of_every_parameter_and_the_input(kind):
    """Every parameter and an offset added to the embeddings, with an identity hook on
    every ``attn.hook_pattern`` (PyTorch's CPU scaled_dot_product_attention has no second
    derivative; the hooked attention has): exact against finite differences."""
    model = _second_order_model(kind)
    offset = torch.zeros(2, 4, model.cfg.d_model, dtype=torch.float64, requires_grad=True)
    hooks = [("hook_embed", lambda t, hook: t + offset)]
    hooks.append((lambda name: name.endswith("attn.hook_pattern"), lambda t, hook: t))
    _hvp_against_finite_differences(model, kind, [*model.parameters(), offset], hooks)


def test_second_derivative_through_fused_attention_refuses():
    """Without a hook on ``attn.hook_pattern`` the attention is PyTorch's fused kernel,
    whose backward has no derivative on CPU: PyTorch raises (docs/architecture.md)."""
    model = _second_order_model("kimi")
    tokens = torch.randint(0, 17, (2, 4), generator=torch.Generator().manual_seed(7))
    query = model.blocks[1].attn_res.query
    (grad,) = torch.autograd.grad(model(tokens).square().sum(), query, create_graph=True)
    with pytest.raises(RuntimeError, match="scaled_dot_product.*not implemented"):
        torch.autograd.grad(grad.sum(), query)


@pytest.mark.parametrize("kind", ["kimi", "recency"])
def test_first_gradient_with_create_graph_equals_the_fused_one(kind):
    """``backward(create_graph=True)`` (differentiated by autograd) gives the first-order
    gradients of the hand-written backward passes, to 1e-12 relative."""
    model = _second_order_model(kind)
    tokens = torch.randint(0, 17, (2, 4), generator=torch.Generator().manual_seed(7))
    params = list(model.parameters())

    def grads(create_graph: bool):
        loss = model(tokens, return_type="loss")
        return torch.autograd.grad(loss, params, create_graph=create_graph)

    for mine, reference in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(mine.detach(), reference, rtol=1e-12, atol=1e-15)


def test_double_backward_of_a_source_read_by_two_routers():
    """The embedding read by two routers (the second also reads the first's output):
    the first gradient under ``create_graph=True`` equals the hand-written one (it was
    6.5 off when the inner autograd call differentiated with respect to the saved inputs
    themselves, not a view of each), and its derivative passes gradgradcheck."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(5, 6, dtype=torch.float64, generator=generator).requires_grad_()
    query = torch.randn(6, dtype=torch.float64, generator=generator).requires_grad_()
    index = torch.tensor([[0, 1, 2]])

    def two_routers(table, query):
        embedded = table[index]
        first = _FusedRouting.apply(query, None, 1e-6, embedded, torch.tanh(embedded))
        return _FusedRouting.apply(0.5 * query, None, 1e-6, embedded, first)

    def first_gradient(create_graph: bool):
        loss = two_routers(table, query).square().sum()
        return torch.autograd.grad(loss, (table, query), create_graph=create_graph)

    for mine, reference in zip(first_gradient(True), first_gradient(False), strict=True):
        torch.testing.assert_close(mine.detach(), reference, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradgradcheck(two_routers, (table, query))


def test_torch_func_transforms_differentiate_the_norms():
    """``torch.func.grad`` / ``vmap`` through a norm whose input needs a gradient (the
    hooked path): `squared_norm`'s autograd.Function raised that it "must override the
    setup_context staticmethod", where the `vector_norm` it replaced was accepted."""
    x = torch.randn(3, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scale = (x.square().mean(-1, keepdim=True) + 1e-6).sqrt()  # by hand
    expected = x / (x.shape[-1] * scale)  # d sqrt(mean(x**2) + eps) / dx

    def total_scale(x):
        return rms_scale(x, 1e-6).sum()

    torch.testing.assert_close(torch.func.grad(total_scale)(x), expected, rtol=1e-12, atol=0)
    per_row = torch.func.vmap(torch.func.grad(total_scale))(x)
    torch.testing.assert_close(per_row, expected, rtol=1e-12, atol=0)


class _CountOps(TorchDispatchMode):
    """Records every ATen operation dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_source_scales_are_the_norms_bits_with_one_operation_per_extra_source(requires_grad):
    """`source_scales` equals `rms_scale` of each source bit for bit (with or without a
    gradient), and without one it runs one operation per extra source (its norm), the
    rest once on all of them: a square and a squeeze per source made a no-grad router's
    scales about 1.5x slower at small shapes."""
    generator = torch.Generator().manual_seed(0)

    def scales(n_sources: int) -> tuple[int, torch.Tensor, list]:
        sources = [
            torch.randn(2, 3, 8, generator=generator).requires_grad_(requires_grad)
            for _ in range(n_sources)
        ]
        with torch.set_grad_enabled(requires_grad), _CountOps() as counted:
            out = source_scales(sources, 1e-6)
        return len(counted.ops), out, sources

    for n_sources in (1, 4):
        _, out, sources = scales(n_sources)
        for source, scale in zip(sources, out, strict=True):
            assert torch.equal(scale, rms_scale(source, 1e-6).squeeze(-1))
    if not requires_grad:
        assert scales(4)[0] - scales(1)[0] == 3


def test_padding_eps_is_the_passs_padding_made_once_per_pass():
    """`padding_eps` of an eps-0 norm in a padded pass: 1 at the pass's padding rows, 0 at
    its real ones, ``[batch, pos, 1, ...]``; one tensor for every norm of the pass (a new
    one per norm cost about 7 % of a tiny padded eps-0 pass), and a later pass gets its own
    padding, not the earlier pass's."""
    x = torch.randn(2, 3, 4)
    heads = torch.randn(2, 3, 2, 4)  # a q_norm / k_norm input [batch, pos, head, d_head]
    for mask in (torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([[1, 1, 1], [1, 0, 0]])):
        expected = (mask == 0).to(torch.float32)
        with pass_extent(0, 3, mask):
            first = padding_eps(0.0, x)
            assert torch.equal(first, expected[..., None])
            assert padding_eps(0.0, x.clone()) is first
            assert torch.equal(padding_eps(0.0, heads), expected[..., None, None])
            assert torch.equal(padding_eps(0.0, x.double()), expected.double()[..., None])
            assert padding_eps(1e-6, x) == 1e-6  # eps > 0: unchanged
            assert padding_eps(0.0, torch.randn(2, 4, 4)) == 0.0  # not the pass's positions
    assert padding_eps(0.0, x) == 0.0  # outside a pass


def test_padding_eps_of_a_tensor_outside_its_pass_takes_the_given_padding():
    """`padding_eps(..., real=)`: a tensor of another pass (a cache's) with that pass's
    padding ``real`` (True at real tokens) of the axes before its last gets
    ``[*lead, 1]``, 1 at padding, for any axes in front (a stack of entries); a ``real``
    of other axes is ignored (the rows cannot be told), as is an eps > 0."""
    real = torch.tensor([[False, True, True], [True, True, False]])
    expected = (~real).to(torch.float64)[..., None]
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.equal(padding_eps(0.0, x, real), expected)
    assert torch.equal(padding_eps(0.0, torch.randn(5, 2, 3, 4).double(), real), expected)
    assert torch.equal(padding_eps(0.0, x[1], real[1]), expected[1])  # no batch axis
    assert padding_eps(0.0, torch.randn(2, 4, 4), real) == 0.0  # other positions
    assert padding_eps(0.0, torch.randn(3, 4), real) == 0.0  # fewer axes than the mask
    assert padding_eps(1e-6, x, real) == 1e-6
    with pass_extent(0, 3, torch.ones(2, 3)):  # the given padding, not the pass's
        assert torch.equal(padding_eps(0.0, x, real), expected)


@pytest.mark.parametrize("layout", ["kimi", "full"])
def test_a_norm_in_a_hook_of_a_padded_eps_zero_pass_normalises_another_tensor_exactly(layout):
    """In a padded pass of an eps-0 model a norm applied in a hook to another run's tensor
    (``model.ln_final(clean_cache[...])``, a router's `mix` of its sources) took eps 1 at
    this pass's padding rows, real tokens of that run: 1.7 off at such a row of a 2-layer
    kimi model (review finding). eps 1 is now kept to padding rows that are all zero, the
    rows whose ``0 / 0`` it is for: another tensor is normalised exactly, bit for bit as
    outside the pass, and the pass's own padding rows stay finite."""
    model = HookedAttnRes(eps_zero_config(layout, 2, 1))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 5), generator=generator)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    other = torch.randn(2, 5, model.cfg.d_model, dtype=torch.float64, generator=generator)
    other[0, 0] *= 1e-3  # a small real row of the other run at this pass's padding
    sources = [other, 2 * other]
    router = model.blocks[1].attn_res
    outside = (model.ln_final(other), model.blocks[0].ln2(other), router.mix(sources))
    inside = {}

    def normalise_other(x, hook):
        inside["ln_final"] = model.ln_final(other)
        inside["ln2"] = model.blocks[0].ln2(other)
        inside["mix"] = router.mix(sources)

    with torch.no_grad():
        logits = model.run_with_hooks(
            tokens, attention_mask=mask, fwd_hooks=[("blocks.1.hook_resid_pre", normalise_other)]
        )
    assert logits.isfinite().all()  # the pass's own all-zero padding rows: eps 1
    assert torch.equal(inside["ln_final"], outside[0])
    assert torch.equal(inside["ln2"], outside[1])
    assert all(torch.equal(a, b) for a, b in zip(inside["mix"], outside[2], strict=True))


def test_a_padding_row_whose_mean_square_underflows_gets_eps_one():
    """eps 1 was given to padding rows whose sum of squares is 0; a row whose sum is not 0
    but whose mean (the sum over d_model) underflows to 0 still had scale 0 and was nan
    (review finding): the rule now reads the mean square the scale adds eps to."""
    model = HookedAttnRes(eps_zero_config("kimi", 2, 1))
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0

    def tiny_padding(x, hook):  # one entry whose square is subnormal, and /8 underflows
        x = x.clone()
        x[0, :2] = 0.0
        x[0, :2, 0] = 3.2e-162
        return x

    assert (torch.tensor(3.2e-162, dtype=torch.float64) ** 2 / 8).item() == 0.0
    assert (torch.tensor(3.2e-162, dtype=torch.float64) ** 2).item() > 0.0
    with torch.no_grad():
        logits = model.run_with_hooks(
            tokens, attention_mask=mask, fwd_hooks=[("blocks.0.hook_attn_out", tiny_padding)]
        )
    assert logits.isfinite().all()
