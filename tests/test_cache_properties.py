"""Property tests (hypothesis, float64) of the cache's TransformerLens analyses against an
independent computation, in every layout (kimi, cumulative block / full, full, none) and
the recency / exact wraps of a tiny Qwen3 (audit 159).

The independent side is `reference_attnres.reference_forward` (Hugging Face's Qwen3
modules, the layouts written from the design notes) instrumented with PyTorch hooks: each
norm's input, each sublayer output as an autograd leaf, and the routing weights detached,
so the routed coefficient of a component at a read point is a gradient of the norm's input
(no code of ``hooked_attnres.model`` involved). Every drawn call either returns that
number to 1e-10 or refuses with an error saying why."""

from __future__ import annotations

import functools
import warnings
from unittest.mock import patch

import pytest
import torch
from helpers import SMALL_QWEN3, hf_qwen3, randomize_routing, rms_norm_in_float64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_attnres import (
    Edit,
    model_reference_forward,
    model_router_params,
    reference_route,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from hooked_attnres import HookedAttnRes
from hooked_attnres._tl import Slice

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
TOL = 1e-10
KINDS = [
    "recency",
    "exact",
    ("kimi", "block"),
    ("cumulative", "block"),
    ("cumulative", "full"),
    ("full", "block"),
    ("none", "block"),
]


@functools.cache
def _models(kind, n_layers: int, num_blocks: int):
    """A float64 tiny Qwen3 and a HookedAttnRes of it: a wrap (``kind`` a string), or a
    native ``(layout, mode)`` on its weights with random routing."""
    hf = hf_qwen3(seed=n_layers, num_hidden_layers=n_layers, **SMALL_QWEN3).double()
    wrap = kind if isinstance(kind, str) else "exact"
    model = HookedAttnRes.from_hf_qwen3(hf, wrap=wrap, num_blocks=num_blocks, dtype=torch.float64)
    if not isinstance(kind, str):
        layout, mode = kind
        cfg = model.cfg.replace(attnres_layout=layout, attnres_mode=mode, attnres_recency_bias=0.7)
        own = {k: v for k, v in model.state_dict().items() if "_res." not in k}
        model = HookedAttnRes(cfg)
        model.load_state_dict(own, strict=False)
        randomize_routing(model, seed=n_layers, scale=2.0)
    return hf, model.eval()


class _Capture(Edit):
    def __init__(self):
        self.states = {}

    def embed(self, embedding):
        self.embedding = embedding.detach().requires_grad_()
        return self.embedding

    def state(self, sublayer, sources):
        self.states[sublayer] = [s.detach() for s in sources]
        return sources

    def weights(self, prefix, weights):
        return weights.detach()  # the norm inputs are then linear in the components


def reference(hf, model, tokens, mask) -> dict:
    """The reference pass of ``model``'s layout: ``norm_in[point]`` (``[batch, pos, d]``),
    ``comps[label]`` (``"embed"``, ``"{l}_attn_out"``, ``"{l}_mlp_out"``),
    ``coef[point][label]`` (``[batch, pos]``, the gradient of the norm's input by the
    component), ``z[l]`` / ``post[l]`` (``o_proj`` / ``down_proj`` inputs), ``states``,
    ``weights`` and ``logits``."""
    n = model.cfg.n_layers
    edit, leaves, norm_in, z, post, handles = _Capture(), {}, {}, {}, {}, []

    def pre(store, key, detach=False):
        def fn(module, args):
            store[key] = args[0].detach() if detach else args[0]

        return fn

    def leaf(label, first=False):
        def fn(module, args, out):
            value = (out[0] if first else out).detach().requires_grad_()
            leaves[label] = value
            return (value, *out[1:]) if first else value

        return fn

    for layer, block in enumerate(hf.model.layers):
        handles += [
            block.input_layernorm.register_forward_pre_hook(pre(norm_in, 2 * layer)),
            block.post_attention_layernorm.register_forward_pre_hook(pre(norm_in, 2 * layer + 1)),
            block.self_attn.register_forward_hook(leaf(f"{layer}_attn_out", first=True)),
            block.mlp.register_forward_hook(leaf(f"{layer}_mlp_out")),
            block.self_attn.o_proj.register_forward_pre_hook(pre(z, layer, True)),
            block.mlp.down_proj.register_forward_pre_hook(pre(post, layer, True)),
        ]
    handles.append(hf.model.norm.register_forward_pre_hook(pre(norm_in, 2 * n)))
    try:
        with torch.enable_grad(), patch.object(Qwen3RMSNorm, "forward", rms_norm_in_float64):
            logits, weights = model_reference_forward(
                hf, model, tokens, attention_mask=mask, edit=edit
            )
            leaves = {"embed": edit.embedding, **leaves}
            coef = {}
            for point, x in norm_in.items():
                grads = torch.autograd.grad(
                    x[..., 0].sum(), list(leaves.values()), retain_graph=True, allow_unused=True
                )
                coef[point] = {
                    label: torch.zeros(tokens.shape, dtype=x.dtype) if g is None else g[..., 0]
                    for label, g in zip(leaves, grads, strict=True)
                }
    finally:
        for handle in handles:
            handle.remove()
    return dict(
        logits=logits.detach(),
        weights={k: v.detach() for k, v in weights.items()},
        norm_in={k: v.detach() for k, v in norm_in.items()},
        comps={k: v.detach() for k, v in leaves.items()},
        coef=coef,
        z=z,
        post=post,
        states=edit.states,
    )


def cut(x, pos_slice, dim):
    """``pos_slice`` (an int, a slice, a list, a ``Slice`` of them) applied to ``dim``."""
    if isinstance(pos_slice, Slice):
        pos_slice = pos_slice.slice
    if pos_slice is None:
        return x
    if isinstance(pos_slice, int):
        return x.select(dim, pos_slice)
    index = list(range(x.shape[dim]))[pos_slice] if isinstance(pos_slice, slice) else pos_slice
    return x.index_select(dim, torch.tensor(index, dtype=torch.long) % x.shape[dim])


def assert_close(got, expected, real, lead=1, trail=1):
    """``got == expected`` to ``TOL`` (relative to max(1, |expected|)) at the real positions
    (``real``: the ``[*batch_and_pos]`` mask, cut as the tensors are)."""
    assert tuple(got.shape) == tuple(expected.shape)
    keep = real.reshape([1] * lead + list(real.shape) + [1] * trail)
    zero = torch.zeros((), dtype=got.dtype)
    error = torch.where(keep, (got - expected).abs(), zero)
    size = torch.where(keep, expected.abs(), zero)
    if error.numel():
        assert error.max().item() <= TOL * max(1.0, size.max().item())


def pos_slices(pos):
    return st.one_of(
        st.none(),
        st.integers(-pos, pos - 1),
        st.integers(0, pos - 1).map(lambda k: slice(k, None)),
        st.lists(st.integers(-pos, pos - 1), min_size=1, max_size=3),
        st.integers(-pos, pos - 1).map(Slice),
    )


@st.composite
def cases(draw):
    """A model of every kind, tokens and (or not) left padding, cached whole (or with
    ``remove_batch_dim`` for one prompt), with the reference pass and the drawn
    ``pos_slice``: ``(model, cache, ref, real, has_batch, pos_slice)``; ``real``
    ``[*batch_and_pos]`` before ``pos_slice``."""
    n_layers = draw(st.integers(1, 3))
    hf, model = _models(draw(st.sampled_from(KINDS)), n_layers, draw(st.integers(1, n_layers)))
    batch, pos = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 100))
    tokens = torch.randint(0, 17, (batch, pos), generator=torch.Generator().manual_seed(seed))
    mask = None
    if draw(st.booleans()):
        pads = draw(st.lists(st.integers(0, pos - 1), min_size=batch, max_size=batch))
        mask = (torch.arange(pos)[None, :] >= torch.tensor(pads)[:, None]).long()
    has_batch = batch > 1 or draw(st.booleans())
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, remove_batch_dim=not has_batch)
    ref = reference(hf, model, tokens, mask)
    real = torch.ones(tokens.shape, dtype=torch.bool) if mask is None else mask.bool()
    if not has_batch:  # drop the batch axis of every expected tensor
        ref = _rows(ref, 0)
        real = real[0]
    return hf, model, cache, ref, real, has_batch, draw(pos_slices(pos))


def _rows(ref: dict, row: int) -> dict:
    def pick(value):
        if isinstance(value, dict):
            return {k: pick(v) for k, v in value.items()}
        if isinstance(value, list):
            return [pick(v) for v in value]
        return value[row]

    out = {k: pick(v) for k, v in ref.items() if k != "weights"}
    out["weights"] = {k: v[:, row] for k, v in ref["weights"].items()}  # [n, batch, pos]
    return out


def _layers(n):
    return st.sampled_from([None, -1, *range(n + 1)])


def _scale(ref, model, point):
    x = ref["norm_in"][point]
    return (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()


def _refuses_unrouted(call, model, point):
    """Without ``routed=True`` a read point where a router mixes sources is refused."""
    if model.routing_layout.reader(point) is None:
        return False
    try:
        call()
    except ValueError as error:
        assert "routed=True" in str(error)
        return True
    raise AssertionError("an unrouted decomposition at a routed read point was not refused")


@SETTINGS
@given(case=cases(), data=st.data())
def test_decompositions_are_the_reference_components_weighted_by_routing(case, data):
    """``decompose_resid``, ``stack_head_results``, ``stack_neuron_results`` and
    ``get_full_resid_decomposition``: each component is the reference's (a sublayer
    output, ``z_h W_O[h]``, ``post_n W_out[n]``) times its routed coefficient (1 where
    nothing routes), ``apply_ln`` divides by the reference norm input's RMS; without
    ``routed=True`` the same numbers where no router reads, else a refusal."""
    hf, model, cache, ref, real, has_batch, pos_slice = case
    n, heads, d_head = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    method = data.draw(st.sampled_from(["decompose", "heads", "neurons", "full"]))
    layer = data.draw(_layers(n))
    top = layer in (None, -1, n)
    mlp_input = method != "heads" and not top and data.draw(st.booleans())
    apply_ln, remainder = data.draw(st.booleans()), data.draw(st.booleans())
    point = 2 * (n if top else layer) + mlp_input
    coef = ref["coef"][point]
    items = []
    if method == "decompose":
        mode = data.draw(st.sampled_from(["all", "attn", "mlp"]))
        labels = ["embed"] + [f"{l}_{k}_out" for l in range(point // 2) for k in ("attn", "mlp")]
        labels += [f"{point // 2}_attn_out"] if point % 2 else []
        labels = [x for x in labels if x == "embed" or mode == "all" or f"_{mode}_" in x]
        items = [(x, ref["comps"][x]) for x in labels]
    if method in ("heads", "full"):
        for l in range((point + 1) // 2 if method == "full" else point // 2):
            weight = hf.model.layers[l].self_attn.o_proj.weight
            for h in range(heads):
                part = slice(h * d_head, (h + 1) * d_head)
                items.append((f"L{l}H{h}", ref["z"][l][..., part] @ weight[:, part].T))
    if method in ("neurons", "full"):
        for l in range(point // 2):
            weight = hf.model.layers[l].mlp.down_proj.weight
            items += [(f"L{l}N{k}", ref["post"][l][..., k, None] * weight[:, k]) for k in range(12)]
    if method == "full":
        items += [("embed", ref["comps"]["embed"]), ("bias", 0 * ref["comps"]["embed"])]
    expected = [coef[_label(x)][..., None] * v for x, v in items]
    if remainder and method in ("heads", "neurons"):
        expected.append(ref["norm_in"][point] - sum(expected))
        items.append(("remainder", None))
    shape = (0, *real.shape, model.cfg.d_model)
    expected = torch.stack(expected) if expected else torch.zeros(shape, dtype=torch.float64)
    if apply_ln:
        expected = expected / _scale(ref, model, point)

    def call(routed):
        if method == "decompose":
            return cache.decompose_resid(
                layer, mlp_input, mode, apply_ln, pos_slice, True, True, routed=routed
            )
        if method == "heads":
            return cache.stack_head_results(layer, True, remainder, pos_slice, apply_ln, routed)
        if method == "neurons":
            return cache.stack_neuron_results(
                layer, pos_slice, None, True, remainder, apply_ln, None, mlp_input, routed
            )
        return cache.get_full_resid_decomposition(
            layer, mlp_input, True, apply_ln, pos_slice, True, None, routed
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unfolded gains: apply_ln's documented warning
        for routed in (True, False):
            if not routed and _refuses_unrouted(lambda: call(False), model, point):
                continue
            stack, labels = call(routed)
            assert labels == [x for x, _ in items]
            assert_close(stack, cut(expected, pos_slice, -2), cut(real, pos_slice, -1))


def _label(label):
    """The component a head / neuron label belongs to."""
    if label[0] == "L":
        layer = label[1:].split("H" if "H" in label else "N")[0]
        return f"{layer}_{'attn' if 'H' in label else 'mlp'}_out"
    return "embed" if label == "bias" else label


@SETTINGS
@given(case=cases(), data=st.data())
def test_accumulated_resid_is_what_ln_final_would_read_at_each_depth(case, data):
    """Each entry of ``accumulated_resid`` is what ``ln_final`` would read if the model
    stopped there: the reference's current stream, or its final router applied to the
    depth state's sources (kimi, full: ``routed=True``); ``apply_ln`` at the unembedding
    is the reference's ``ln_final`` of each entry, elsewhere the RMS of the norm there
    (refused where that norm reads a router's mixture)."""
    hf, model, cache, ref, real, has_batch, pos_slice = case
    n, eps, layout = model.cfg.n_layers, model.cfg.eps, model.routing_layout
    layer = data.draw(_layers(n))
    stop = n if layer in (None, -1) else layer
    incl_mid, apply_ln, routed = (data.draw(st.booleans()) for _ in range(3))
    mlp_input = stop < n and data.draw(st.booleans())
    final = model_router_params(model)("final_res") if layout.has_final_router else None

    def state(point):
        sources = ref["states"][point]
        if final is None:
            return sources[-1]
        if not has_batch:  # the reference router reads [batch, pos, d]
            return reference_route([s[None] for s in sources], final, eps)[0][0]
        return reference_route(sources, final, eps)[0]

    labels, expected = [], []
    for l in range(stop + 1):
        if l == n:
            labels.append("final_post")
            expected.append(ref["norm_in"][2 * n])
            continue
        labels.append(f"{l}_pre")
        expected.append(state(2 * l))
        if (incl_mid and l < stop) or (mlp_input and l == stop):
            labels.append(f"{l}_mid")
            expected.append(state(2 * l + 1))
    expected = torch.stack(expected)
    if apply_ln and stop == n:
        expected = expected / (expected.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        expected = expected * hf.model.norm.weight
    elif apply_ln:
        expected = expected / _scale(ref, model, 2 * stop + mlp_input)

    def call():
        return cache.accumulated_resid(
            layer, incl_mid, apply_ln, pos_slice, mlp_input, True, routed=routed
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a final router read without routed=True, or a routed layer's RMS: refused
        if (final is not None and not routed) or (apply_ln and stop < n and layout.has_routers):
            with pytest.raises(ValueError, match="routing_lens"):
                call()
            return
        stack, got = call()
    assert got == labels
    assert_close(stack, cut(expected, pos_slice, -2), cut(real, pos_slice, -1))


@SETTINGS
@given(case=cases(), data=st.data())
def test_apply_ln_to_stack_and_logit_attrs_are_the_models_norms_and_logits(case, data):
    """``apply_ln_to_stack`` divides by the reference RMS at its read point (with
    ``recompute_ln`` at the unembedding: ``ln_final`` of each entry); ``logit_attrs`` of
    the routed decomposition is each component over the final RMS dotted with the
    gain-folded unembedding direction, and sums to the reference logit difference."""
    hf, model, cache, ref, real, has_batch, pos_slice = case
    n, eps = model.cfg.n_layers, model.cfg.eps
    layer = data.draw(_layers(n))
    top = layer in (None, -1, n)
    mlp_input = not top and data.draw(st.booleans())
    point = 2 * (n if top else layer) + mlp_input
    recompute = data.draw(st.booleans())
    rows = data.draw(st.sampled_from([None, 0, -1, [0], slice(0, 1)])) if has_batch else None
    generator = torch.Generator().manual_seed(point)
    full = torch.randn(3, *real.shape, model.cfg.d_model, dtype=torch.float64, generator=generator)
    if recompute and top:
        expected = full / (full.pow(2).mean(-1, keepdim=True) + eps).sqrt() * hf.model.norm.weight
    else:
        expected = full / _scale(ref, model, point)
    stack = cut(full, pos_slice, -2)
    kept = cut(real, pos_slice, -1)

    def by_rows(x, dim):
        return x if rows is None else cut(x, rows, dim)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = cache.apply_ln_to_stack(
            stack, layer, mlp_input, pos_slice, rows, True, recompute, True
        )
        assert_close(got, by_rows(cut(expected, pos_slice, -2), 1), by_rows(kept, 0))
        token, wrong = data.draw(st.integers(0, 16)), data.draw(st.none() | st.integers(0, 16))
        direction = hf.lm_head.weight[token] - (0 if wrong is None else hf.lm_head.weight[wrong])
        direction = direction * hf.model.norm.weight
        labels = ["embed"] + [f"{l}_{k}_out" for l in range(n) for k in ("attn", "mlp")]
        parts = torch.stack([ref["coef"][2 * n][x][..., None] * ref["comps"][x] for x in labels])
        expected = (parts / _scale(ref, model, 2 * n)) @ direction
        difference = ref["logits"][..., token] - (0 if wrong is None else ref["logits"][..., wrong])
        components = cache.decompose_resid(pos_slice=pos_slice, routed=True)
        attrs = cache.logit_attrs(components, token, wrong, pos_slice, rows, routed=True)
    assert_close(attrs, by_rows(cut(expected, pos_slice, -1), 1), by_rows(kept, 0), trail=0)
    assert_close(attrs.sum(0), by_rows(cut(difference, pos_slice, -1), 0), by_rows(kept, 0), 0, 0)


@SETTINGS
@given(case=cases(), data=st.data())
def test_raw_stacks_and_routing_coefficients_are_the_reference(case, data):
    """``get_neuron_results``, ``compute_head_results``, ``stack_activation``,
    ``stack_router_activation``, ``routed_coefficients`` and ``norm_input`` against the
    reference's ``post * W_out``, ``z_h W_O[h]``, sublayer outputs, routing weights,
    gradients and norm inputs."""
    hf, model, cache, ref, real, has_batch, pos_slice = case
    n, heads, d_head = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    layer = data.draw(st.integers(0, n - 1))
    weight = hf.model.layers[layer].mlp.down_proj.weight
    neurons = torch.stack([ref["post"][layer][..., k, None] * weight[:, k] for k in range(12)], -2)
    got = cache.get_neuron_results(layer, None, pos_slice)
    assert_close(got, cut(neurons, pos_slice, -3), cut(real, pos_slice, -1), 0, 2)
    cache.compute_head_results()
    for l in range(n):
        w_o = hf.model.layers[l].self_attn.o_proj.weight
        parts = [slice(h * d_head, (h + 1) * d_head) for h in range(heads)]
        results = torch.stack([ref["z"][l][..., p] @ w_o[:, p].T for p in parts], -2)
        assert_close(cache["result", l], results, real, 0, 2)
    stop = data.draw(st.integers(0, n))
    outputs = [ref["comps"][f"{l}_mlp_out"] for l in range(stop)]
    got = cache.stack_activation("mlp_out", stop)
    assert got.shape[0] == stop
    if stop:
        assert_close(got, torch.stack(outputs), real)
    router = data.draw(st.sampled_from(["attn_res", "mlp_res"]))
    weights = [ref["weights"].get(f"blocks.{l}.{router}") for l in range(n)]
    if weights[0] is not None:
        stacked, mask = cache.stack_router_activation("weights", router, -1.0)
        for l, w in enumerate(weights):
            assert mask[l].sum() == w.shape[0]
            assert_close(stacked[l, ..., : w.shape[0]], w.movedim(0, -1), real, 0, 1)
            assert (stacked[l, ..., w.shape[0] :] == -1).all()
    for point in range(2 * n + 1):
        coefficients = cache.routed_coefficients(point)
        assert set(coefficients) <= set(ref["coef"][point])
        for label, value in ref["coef"][point].items():
            got = torch.as_tensor(coefficients.get(label, 0.0), dtype=torch.float64)
            assert_close(got.expand(value.shape), value, real, 0, 0)
        assert_close(cache.norm_input(point), ref["norm_in"][point], real, 0, 1)
