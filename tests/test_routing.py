"""Routing invariants, analytic weights and source counts of every layout."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import randomize_routing, tiny_model

from hooked_attnres import HookedAttnRes


def expected_n_sources(layout: str, mode: str, n_layers: int, num_blocks: int, layer, router):
    """Source counts written from attnres.md section 2 (independent of RoutingLayout)."""
    S = math.ceil(n_layers / num_blocks)
    if layout == "cumulative" and mode == "block":
        return 2 + layer // S  # embedding + completed snapshots + current
    if layout == "cumulative" and mode == "full":
        return 2 * layer + 2 if router == "attn_res" else 2 * layer + 3
    if layout == "kimi":
        if router == "final_res":
            return 1 + math.ceil(n_layers / S)
        j = layer // S
        return j + 1 if (router == "attn_res" and layer % S == 0) else j + 2
    if layout == "full":
        if router == "final_res":
            return 2 * n_layers + 1
        return 2 * layer + 1 if router == "attn_res" else 2 * layer + 2
    raise ValueError(layout)


@pytest.mark.parametrize(
    "layout,mode,n_layers,num_blocks",
    [
        ("cumulative", "block", 8, 4),
        ("cumulative", "block", 7, 3),
        ("cumulative", "full", 3, 3),
        ("kimi", "block", 8, 4),
        ("kimi", "block", 7, 3),
        ("kimi", "block", 5, 5),
        ("full", "block", 4, 4),
    ],
)
def test_number_of_sources_matches_attnres_md(layout, mode, n_layers, num_blocks):
    model = tiny_model(
        n_layers=n_layers, attnres_layout=layout, attnres_mode=mode, attnres_num_blocks=num_blocks
    )
    tokens = torch.randint(0, 50, (2, 5))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_sources"))
    routers = model.routers()
    assert len(routers) == 2 * n_layers + (layout in ("kimi", "full"))
    for layer, router in routers:
        n = expected_n_sources(layout, mode, n_layers, num_blocks, layer, router)
        prefix = "final_res" if layer is None else f"blocks.{layer}.{router}"
        assert cache[f"{prefix}.hook_sources"].shape == (2, 5, n, model.cfg.d_model)
        assert len(model.source_labels(layer, router)) == n


def test_qwen3_06b_shape_source_counts():
    """attnres.md section 4: L=28, N=8 gives n = 1 + floor(l / 4) non-current sources."""
    model = tiny_model(n_layers=28, attnres_num_blocks=8, d_model=16, n_heads=2, d_mlp=16)
    for layer in range(28):
        assert len(model.source_labels(layer, "attn_res")) - 1 == 1 + layer // 4


def test_weights_sum_to_one_and_equal_softmax_of_logits(routed_layout, tokens):
    model = randomize_routing(tiny_model(attnres_layout=routed_layout), scale=3.0)
    _, cache = model.run_with_cache(tokens)
    for layer, router in model.routers():
        prefix = "final_res" if layer is None else f"blocks.{layer}.{router}"
        weights, logits = cache[f"{prefix}.hook_weights"], cache[f"{prefix}.hook_logits"]
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-6)
        assert torch.allclose(weights, logits.softmax(-1), atol=1e-7)
        assert (weights >= 0).all()


@pytest.mark.parametrize(
    "layout,mode",
    [("kimi", "block"), ("cumulative", "block"), ("cumulative", "full"), ("full", "block")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_hooks_follow_the_routing_formula(layout, mode, dtype, tokens):
    """Recompute every router hook from its cached sources and its parameters, in float32
    (the routing runs in float32 in a bfloat16 model too: logits within 2e-5, where
    bfloat16 logits would be off by about 1e-2)."""
    model = randomize_routing(
        tiny_model(attnres_layout=layout, attnres_mode=mode, attnres_recency_bias=0.5),
        scale=2.0,
    ).to(dtype)
    _, cache = model.run_with_cache(tokens)
    for layer, router in model.routers():
        prefix = "final_res" if layer is None else f"blocks.{layer}.{router}"
        module = model.mod_dict[prefix]
        sources = cache[f"{prefix}.hook_sources"]
        assert sources.dtype == dtype
        values = sources.float()
        scale = (values.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        logits = (values / scale * module.key_norm.w.float()) @ module.query.float()
        logits[..., -1] += module.recency_bias.float()
        weights = logits.softmax(-1)
        for name, expected, atol in (
            ("key_norm.hook_scale", scale, 1e-6),
            ("hook_logits", logits, 2e-5),
            ("hook_weights", weights, 5e-6),
        ):
            got = cache[f"{prefix}.{name}"]
            assert got.dtype == torch.float32 and got.shape == expected.shape, (prefix, name)
            assert (got - expected).abs().max().item() <= atol, (prefix, name)
        out = cache[f"{prefix}.hook_out"]
        routed = (weights[..., None] * values).sum(-2)
        assert out.dtype == dtype
        # float32 rounding, or bfloat16's of the output (2**-8 relative)
        rtol = 1e-6 if dtype == torch.float32 else 2**-8
        assert (out.float() - routed).abs().max().item() <= rtol * routed.abs().max().item()


@pytest.mark.parametrize("bias", [None, 0.0, 3.0, -1.5])
def test_zero_queries_give_analytic_weights(bias, tokens):
    """With w = 0: current gets e^b / (e^b + n), every other source 1 / (e^b + n)."""
    model = tiny_model(
        attnres_layout="cumulative", attnres_recency_bias=bias, n_layers=6, attnres_num_blocks=3
    )
    _, cache = model.run_with_cache(tokens)
    b = 0.0 if bias is None else bias
    for layer, router in model.routers():
        weights = cache[f"blocks.{layer}.{router}.hook_weights"]
        n_other = weights.shape[-1] - 1
        expected = torch.full((n_other + 1,), 1 / (math.exp(b) + n_other))
        expected[-1] = math.exp(b) / (math.exp(b) + n_other)
        assert torch.allclose(weights, expected.expand_as(weights), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_recency_bias_starts_at_the_configured_number_in_the_model_dtype(dtype):
    """Review 186: a native float64 model's routers started at the float32 of the config's
    bias (0.1 read 0.100000001490116), as the weights were filled before the model was
    converted; each now holds the configured number as its dtype holds it, and the seeded
    matrices are the float32 draws they were (the same in every dtype's precision)."""
    model = tiny_model(attnres_layout="kimi", attnres_recency_bias=0.1, dtype=dtype)
    expected = torch.tensor(0.1, dtype=torch.float64).to(dtype)
    biases = [model.router(layer, router).recency_bias for layer, router in model.routers()]
    assert biases and all(torch.equal(bias.detach(), expected) for bias in biases)
    reference = tiny_model(attnres_layout="kimi", attnres_recency_bias=0.1)  # float32
    for (name, param), (_, ref) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        if not name.endswith("recency_bias"):
            assert torch.equal(param.detach(), ref.detach().to(dtype)), name


def test_uniform_routing_at_init_in_kimi_layout(tokens):
    model = tiny_model(attnres_layout="kimi", attnres_recency_bias=None)
    _, cache = model.run_with_cache(tokens)
    for layer, router in model.routers():
        prefix = "final_res" if layer is None else f"blocks.{layer}.{router}"
        weights = cache[f"{prefix}.hook_weights"]
        assert torch.allclose(weights, torch.full_like(weights, 1 / weights.shape[-1]))


def test_none_layout_has_no_routers(tokens):
    model = tiny_model(attnres_layout="none")
    assert model.routers() == []
    assert not [name for name in model.hook_dict if "_res." in name]
    with pytest.raises(ValueError, match="no routers"):
        model.source_labels(0, "attn_res")


def test_source_families_partition_sources(routed_layout):
    model = tiny_model(attnres_layout=routed_layout, n_layers=6, attnres_num_blocks=3)
    for layer, router in model.routers():
        families = model.source_families(layer, router)
        assert set(families) == {"embedding", "older", "prev_completed", "current"}
        indices = sorted(i for idx in families.values() for i in idx)
        assert indices == list(range(model.routing_layout.n_sources(layer, router)))
        labels = model.source_labels(layer, router)
        assert labels[0] == "embedding"
        if len(labels) > 1:
            assert families["current"] == [len(labels) - 1] and labels[-1] == "current"


def test_cumulative_labels_and_duplicates(tokens):
    model = tiny_model(attnres_layout="cumulative", n_layers=4, attnres_num_blocks=2)
    assert model.source_labels(0, "attn_res") == ["embedding", "current"]
    assert model.source_labels(3, "mlp_res") == ["embedding", "block_1", "current"]
    _, cache = model.run_with_cache(tokens)
    sources = cache["sources", 0, "attn_res"]
    # layer 0: embedding and current are the same tensor (documented duplicate)
    assert torch.equal(sources[:, :, 0], sources[:, :, 1])
    # block-start attention router: prev_completed equals current
    sources = cache["sources", 2, "attn_res"]
    families = model.source_families(2, "attn_res")
    assert torch.equal(sources[:, :, families["prev_completed"][0]], sources[:, :, -1])


def test_kimi_labels():
    model = tiny_model(attnres_layout="kimi", n_layers=4, attnres_num_blocks=2)
    assert model.source_labels(0, "attn_res") == ["embedding"]
    assert model.source_families(0, "attn_res")["current"] == []
    assert model.source_labels(2, "mlp_res") == ["embedding", "block_1", "current"]
    assert model.source_labels(None, "final_res") == ["embedding", "block_1", "current"]


def test_invalid_router_queries_are_refused():
    model = tiny_model(attnres_layout="cumulative")
    with pytest.raises(
        ValueError,
        match=r"^router must be one of \('attn_res', 'mlp_res', 'final_res'\), got 'attn'$",
    ):
        model.source_labels(0, "attn")
    with pytest.raises(ValueError, match="layer must be an integer"):
        model.source_labels(4, "attn_res")
    with pytest.raises(ValueError, match="no final router"):
        model.source_labels(None, "final_res")


def test_router_kind_hook_and_sublayer_names_are_checked_by_type(tokens):
    """A router kind, a router hook name or a sublayer that is no string is refused by
    name (`require_choice`), saying what to pass: a hook name array raised
    "'numpy.ndarray' object has no attribute 'removeprefix'", a one-element array of a
    kind was taken ("['attn_res']_weights", a RouterSite whose kind was an array). A NumPy
    string is the string it holds."""
    import numpy as np

    from hooked_attnres.model.depth import RouterSite, sublayer_index
    from hooked_attnres.patching import router_patch_index

    model = tiny_model(attnres_layout="cumulative").eval()
    _, cache = model.run_with_cache(tokens)
    hooks = r"hook must be one of \('sources', .*'weights', 'out', 'hook_sources', .*'hook_weights'"
    for bad in (np.array(["weights"]), 3, "bogus"):
        with pytest.raises(ValueError, match=hooks + r".*\), got " + re.escape(repr(bad)) + "$"):
            cache.stack_router_activation(hook=bad)
        with pytest.raises(ValueError, match=hooks):
            model.site(0, "attn_res").hook(bad)
        with pytest.raises(ValueError, match=hooks):
            RouterSite.activation_name("attn_res", bad)
    stacked, mask = cache.stack_router_activation(np.str_("hook_weights"))
    expected, expected_mask = cache.stack_router_activation("weights")
    assert torch.equal(stacked, expected) and torch.equal(mask, expected_mask)
    kinds = r"router must be one of \('attn_res', 'mlp_res', 'final_res'\), got array"
    with pytest.raises(ValueError, match=kinds):
        RouterSite.activation_name(np.array(["attn_res"]), "weights")
    with pytest.raises(ValueError, match=kinds):
        model.routing_layout.site(0, np.array(["attn_res"]))
    assert RouterSite.activation_name(np.str_("mlp_res"), "weights") == "mlp_res_weights"
    with pytest.raises(
        ValueError,
        match=r"^router must be one of \('attn_res', 'mlp_res'\) \(generic_activation_patch "
        r"indexes by layer; the final router has none\), got array\(\['attn_res'\]",
    ):
        router_patch_index(model, np.array(["attn_res"]), "weights")
    for bad in (np.array(["attn"]), "final"):
        sublayers = r"^sublayer must be one of \('attn', 'mlp'\), got "
        with pytest.raises(ValueError, match=sublayers + re.escape(repr(bad)) + "$"):
            sublayer_index(1, bad)
    assert sublayer_index(1, np.str_("mlp")) == 3


def test_editing_weights_changes_output_and_identity_hook_does_not(routed_layout, tokens):
    model = randomize_routing(tiny_model(attnres_layout=routed_layout))
    clean = model(tokens)
    name = "blocks.2.mlp_res.hook_weights"

    def unchanged(weights, hook):
        return weights

    def observe(weights, hook):
        return None

    def to_embedding_only(weights, hook):
        edited = torch.zeros_like(weights)
        edited[..., 0] = 1.0
        return edited

    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[(name, unchanged)]), clean)
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[(name, observe)]), clean)
    edited = model.run_with_hooks(tokens, fwd_hooks=[(name, to_embedding_only)])
    assert (edited - clean).abs().max() > 1e-3
    # and the edit really reached the routed input
    _, cache = model.run_with_cache(
        tokens, names_filter=["blocks.2.mlp_res.hook_out", "blocks.2.mlp_res.hook_sources"]
    )
    with model.hooks(fwd_hooks=[(name, to_embedding_only)]):
        _, edited_cache = model.run_with_cache(tokens, names_filter=["blocks.2.mlp_res.hook_out"])
    assert torch.allclose(
        edited_cache["blocks.2.mlp_res.hook_out"], cache["blocks.2.mlp_res.hook_sources"][:, :, 0]
    )


def test_committed_block_patch_reaches_every_later_reader(tokens):
    model = randomize_routing(
        tiny_model(attnres_layout="cumulative", n_layers=6, attnres_num_blocks=3)
    )
    _, clean = model.run_with_cache(tokens)

    def zero(block, hook):
        return torch.zeros_like(block)

    with model.hooks(fwd_hooks=[("blocks.1.hook_committed_block", zero)]):
        _, patched = model.run_with_cache(tokens)
    # block_1 is source 1 of every router from layer 2 on, and nowhere before
    for layer in range(6):
        for router in ("attn_res", "mlp_res"):
            sources = patched[f"blocks.{layer}.{router}.hook_sources"]
            if layer >= 2:
                assert model.source_labels(layer, router)[1] == "block_1"
                assert sources[:, :, 1].abs().max() == 0
            else:
                assert torch.equal(sources, clean[f"blocks.{layer}.{router}.hook_sources"])
    # the running stream itself is not the committed snapshot
    assert torch.equal(patched["resid_post", 1], clean["resid_post", 1])


def test_kimi_committed_block_is_the_next_current_source(tokens):
    model = randomize_routing(tiny_model(attnres_layout="kimi", n_layers=4, attnres_num_blocks=2))

    def zero(block, hook):
        return torch.zeros_like(block)

    with model.hooks(fwd_hooks=[("blocks.1.hook_committed_block", zero)]):
        _, patched = model.run_with_cache(tokens)
    # the block ending at layer 1 is read as "current" by layer 2's attention router,
    # then as block_1 by every later router, including the final one
    assert patched["sources", 2, "attn_res"][:, :, -1].abs().max() == 0
    assert patched["sources", 3, "mlp_res"][:, :, 1].abs().max() == 0
    assert patched["final_res.hook_sources"][:, :, 1].abs().max() == 0


def test_in_place_edit_of_stream_does_not_reach_committed_snapshot(tokens):
    """TL patch setters edit activations in place; snapshots must not alias the stream."""
    model = tiny_model(attnres_layout="cumulative", n_layers=4, attnres_num_blocks=2)
    _, clean = model.run_with_cache(tokens)

    def zero_in_place(resid, hook):
        resid[:] = 0
        return resid

    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", zero_in_place)]):
        _, patched = model.run_with_cache(tokens)
    sources = patched["sources", 2, "attn_res"]
    assert sources[:, :, -1].abs().max() == 0  # the stream was zeroed
    assert torch.equal(sources[:, :, 1], clean["sources", 2, "attn_res"][:, :, 1])  # block_1 kept
    assert torch.equal(sources[:, :, 0], clean["hook_embed"])  # the embedding source kept


def test_model_has_routing_parameters_per_router():
    model = tiny_model(attnres_layout="kimi", attnres_recency_bias=1.0)
    names = {n for n, _ in model.named_parameters()}
    for layer, router in model.routers():
        prefix = "final_res" if layer is None else f"blocks.{layer}.{router}"
        assert {f"{prefix}.query", f"{prefix}.key_norm.w", f"{prefix}.recency_bias"} <= names
    assert isinstance(model, HookedAttnRes)


@pytest.mark.parametrize("watched", ["hook_weights", "hook_sources"])
def test_fused_router_gradients_equal_the_hooked_path(routed_layout, tokens, watched):
    """Unobserved routers use a hand-written backward; observing a hook switches to plain
    autograd (per source, or stacked when the sources are watched). All must give the same
    loss and gradients."""
    model = randomize_routing(tiny_model(attnres_layout=routed_layout, attnres_recency_bias=0.5))
    model = model.to(torch.float64)

    def grads(observe: bool):
        model.zero_grad(set_to_none=True)
        hooks = [(lambda name: name.endswith(watched), lambda w, hook: None)] if observe else []
        with model.hooks(fwd_hooks=hooks):
            loss = model(tokens, return_type="loss")
        loss.backward()
        return loss.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    fused_loss, fused = grads(False)
    plain_loss, plain = grads(True)
    assert torch.equal(fused_loss, plain_loss)
    assert fused.keys() == plain.keys()
    routers = [n for n in fused if n.endswith(("query", "recency_bias", "key_norm.w"))]
    assert (
        routers and sum(bool(plain[n].abs().max() > 0) for n in routers if n.endswith("query")) >= 2
    )
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("watched", [("hook_logits", "hook_weights"), ("hook_sources",)])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_unobserved_router_paths_equal_the_hooked_path_bit_for_bit(
    routed_layout, tokens, mode, watched, dtype
):
    """Four ways through a router: the autograd Function (grad mode; float32 only), the
    same math without it (no grad needed; per source in bfloat16), the per-source hooked
    path (only logits / weights / out watched) and the stacked hooked path (the sources
    watched). Same bits, in float32 and in bfloat16."""
    model = randomize_routing(tiny_model(attnres_layout=routed_layout, attnres_recency_bias=0.5))
    model = model.to(dtype)
    watch = [(lambda name: name.endswith(watched), lambda x, hook: None)]
    context = {
        "grad": torch.enable_grad,
        "no_grad": torch.no_grad,
        "inference": torch.inference_mode,
    }[mode]
    with context():
        plain = model(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=watch)
    with torch.enable_grad():
        reference = model(tokens)
    assert plain.requires_grad == (mode == "grad")
    assert torch.equal(plain, hooked) and torch.equal(plain, reference.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_hook_tensors_and_mix_agree_bit_for_bit_across_paths(routed_layout, tokens, dtype):
    """The float32 logits and weights and the output of every router are the same bits
    whether the router runs per source (only they are watched) or stacked (its sources
    watched too), and `DepthRouter.mix` on the sources it read gives them again: in
    bfloat16 the model output alone (rounded to bfloat16) could hide a 1-ulp difference."""
    model = randomize_routing(tiny_model(attnres_layout=routed_layout, attnres_recency_bias=0.5))
    model = model.to(dtype)

    def watched(name: str) -> bool:
        return name.endswith(("hook_logits", "hook_weights", "hook_out"))

    _, per_source = model.run_with_cache(tokens, names_filter=watched)
    _, stacked = model.run_with_cache(
        tokens, names_filter=lambda name: watched(name) or name.endswith("hook_sources")
    )
    assert per_source.keys() and all(watched(name) for name in per_source.keys())
    for name in per_source.keys():
        assert torch.equal(per_source[name], stacked[name]), name
    for site in model.sites():
        assert stacked[site.hook("weights")].dtype == torch.float32
        out, weights = model.router(site).mix(list(stacked[site.hook("sources")].unbind(-2)))
        assert torch.equal(weights, stacked[site.hook("weights")]), site
        assert torch.equal(out, stacked[site.hook("out")]), site


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits (so that -0.0 and +0.0, or two nan payloads, are told apart)."""
    integer = {
        torch.bfloat16: torch.int16,
        torch.float16: torch.int16,
        torch.float32: torch.int32,
        torch.float64: torch.int64,
    }
    return tensor.view(integer[tensor.dtype])


def _record_calls(monkeypatch, name: str) -> list:
    """A list that gains an entry at every call of ``hooked_attnres.model.routing.<name>``
    (which still runs), for as long as the test runs."""
    from hooked_attnres.model import routing

    calls: list = []
    function = getattr(routing, name)
    monkeypatch.setattr(routing, name, lambda *a: calls.append(1) or function(*a))
    return calls


@pytest.fixture
def content_free_calls(monkeypatch) -> list:
    """Records every call of the content-free router shortcut (so that a test of it fails
    if the shortcut never runs)."""
    return _record_calls(monkeypatch, "_route_content_free")


def _content_free_model(
    layout: str, dtype: torch.dtype, zero: str, one_bias: bool = False
) -> HookedAttnRes:
    """Routers whose effective query ``key_norm.w * query`` is exactly zero, through a zero
    query (as in the wraps of a vanilla Qwen3) or a zero gain, with content elsewhere;
    with ``one_bias`` every recency bias is 0.5, as in the wraps (else each is random)."""
    model = randomize_routing(tiny_model(attnres_layout=layout, attnres_recency_bias=0.5))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".query" if zero == "query" else "key_norm.w"):
                param.zero_()
            elif one_bias and name.endswith("recency_bias"):
                param.fill_(0.5)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("zero", ["query", "gain"])
def test_content_free_routers_equal_the_general_path_bit_for_bit(
    routed_layout, tokens, dtype, zero, content_free_calls
):
    """A router whose effective query is exactly zero skips the RMS and dot products
    without a gradient (the wraps' routers): the model output and every router output equal
    the general path's (routers watched) bit for bit, in every dtype."""
    model = _content_free_model(routed_layout, dtype, zero)
    with torch.inference_mode():
        plain = model(tokens)
        outs = {}
        for site in model.sites():  # one router watched at a time: the rest stay content-free
            _, cache = model.run_with_cache(tokens, names_filter=site.hook("out"))
            outs[site] = cache[site.hook("out")]
        _, general = model.run_with_cache(
            tokens, names_filter=lambda name: name.endswith(("hook_logits", "hook_out"))
        )
    assert len(content_free_calls) >= len(model.sites())  # the shortcut ran
    assert torch.equal(
        _bits(plain),
        _bits(
            model.run_with_hooks(
                tokens,
                fwd_hooks=[(lambda name: name.endswith("hook_logits"), lambda x, hook: None)],
            )
        ),
    )
    for site, out in outs.items():
        assert torch.equal(_bits(out), _bits(general[site.hook("out")])), site
    # with a gradient the general path runs and gives the same numbers
    assert torch.equal(_bits(model(tokens).detach()), _bits(plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [None, 2.0])
def test_content_free_router_keeps_the_general_path_non_finite_and_signed_zero_bits(
    dtype, bias, content_free_calls
):
    """`DepthRouter.mix` is the general path (logits ``V . 0 / rms``): a source with an inf
    or a nan at one position makes that whole position nan there (``inf * 0``), and the
    content-free shortcut must give the same bits, including at a position whose sources
    are all -0.0 (the output is -0.0) and a position with a huge but finite value."""
    from hooked_attnres.model.routing import DepthRouter

    generator = torch.Generator().manual_seed(3)
    router = DepthRouter(16, 1e-6, bias).to(dtype)
    sources = [torch.randn(2, 6, 16, generator=generator).to(dtype) for _ in range(4)]
    sources[1][0, 1, 3] = float("inf")
    sources[2][1, 4, 0] = float("nan")
    sources[0][0, 2, 5] = float("-inf")
    sources[3][1, 0, 7] = 1e30
    for source in sources:
        source[1, 5] = -0.0
    with torch.no_grad():
        shortcut = router(sources)
    general, weights = router.mix(sources)
    assert content_free_calls == [1]  # the query starts at zero: the shortcut ran, mix not
    # the same nan positions (a nan's sign bit is not defined) and the same bits elsewhere
    assert torch.equal(shortcut.isnan(), general.isnan())
    finite = ~general.isnan()
    assert torch.equal(_bits(shortcut)[finite], _bits(general)[finite])
    nan_positions = {(0, 1), (1, 4), (0, 2)}
    for b in range(2):
        for p in range(6):
            assert bool(shortcut[b, p].isnan().all()) == ((b, p) in nan_positions)
            assert bool(weights[b, p].isnan().all()) == ((b, p) in nan_positions)
    assert torch.equal(_bits(shortcut[1, 5]), _bits(torch.full((16,), -0.0, dtype=dtype)))


@pytest.fixture
def weighted_sums(monkeypatch) -> list:
    """Records every `weighted_sum` the routers compute (a content-free router that reuses
    its block's committed sum (`SharedSums`) computes none)."""
    return _record_calls(monkeypatch, "weighted_sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["cumulative", "kimi"])
def test_shared_committed_sums_are_used_only_in_a_pass_without_hooks(
    layout, tokens, dtype, weighted_sums
):
    """The content-free routers of a block share the weighted sum of their committed
    sources in a pass with no hook anywhere; any hook (a do-nothing one on a non-routing
    hook point, a raw PyTorch hook on a submodule, a global module hook) turns the sharing
    off. The output bits are the same either way."""
    model = _content_free_model(layout, dtype, "query", one_bias=True)
    n_routers = len(model.sites())
    with torch.inference_mode():
        plain = model(tokens)
        shared = len(weighted_sums)
        weighted_sums.clear()
        hooked = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: None)]
        )
        unshared = len(weighted_sums)
        raw_hook = model.blocks[1].mlp.register_forward_hook(lambda *args: None)
        raw_hooked, raw_sums = _run_while(model, tokens, raw_hook, weighted_sums)
        global_hook = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
        global_hooked, global_sums = _run_while(model, tokens, global_hook, weighted_sums)
    assert raw_sums == global_sums == unshared
    assert unshared == n_routers  # without sharing every router sums its sources
    assert shared <= n_routers - 4  # 2 blocks of 4 routers: 3 of each reuse a sum
    assert torch.equal(_bits(hooked), _bits(plain))
    assert torch.equal(_bits(raw_hooked), _bits(plain))
    # a global hook watches every hook point, as a hook on each of them does (the
    # attention pattern is then computed explicitly: not the fused kernel's bits)
    with torch.inference_mode():
        every_point = model.run_with_hooks(
            tokens, fwd_hooks=[(lambda name: True, lambda x, hook: None)]
        )
    assert torch.equal(_bits(global_hooked), _bits(every_point))


def _run_while(model: HookedAttnRes, tokens, handle, calls: list) -> tuple[torch.Tensor, int]:
    """``model(tokens)`` while the hook ``handle`` is attached (removed afterwards), and
    the number of calls ``calls`` (a recording fixture's list) gained in it."""
    calls.clear()
    try:
        return model(tokens), len(calls)
    finally:
        handle.remove()


def test_an_in_place_edit_of_a_committed_block_reaches_the_later_routers_of_its_block(tokens):
    """A hook that edits a committed block in place between two routers of the next
    block: the later routers must read the edited block (a shared committed sum made
    before the edit would be stale), as the watched general path does."""
    model = _content_free_model("kimi", torch.float32, "query", one_bias=True)
    committed: list = []

    def edit_committed_block(x, hook):  # after layer 2's MLP router, before layer 3's
        committed[0].mul_(3.0)

    edit_hooks = [
        ("blocks.1.hook_committed_block", lambda x, hook: committed.append(x)),
        ("blocks.2.hook_mlp_out", edit_committed_block),
    ]
    watch_all = [(lambda name: name.endswith("hook_logits"), lambda x, hook: None)]
    with torch.inference_mode():
        unedited = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=edit_hooks)
        committed.clear()
        general = model.run_with_hooks(tokens, fwd_hooks=edit_hooks + watch_all)
    assert not torch.allclose(edited, unedited)  # the edit matters
    assert torch.equal(_bits(edited), _bits(general))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [None, 2.0])
def test_shared_committed_sum_keeps_the_general_path_non_finite_bits(dtype, bias):
    """A router that reuses a shared committed sum gives the general path's bits (`mix`)
    with an inf or a nan in a committed source or in the current one, on the miss that
    makes the sum and on the hit that reuses it."""
    from hooked_attnres.model.routing import DepthRouter, SharedSums

    generator = torch.Generator().manual_seed(4)
    routers = [DepthRouter(16, 1e-6, bias).to(dtype) for _ in range(2)]
    committed = [torch.randn(2, 6, 16, generator=generator).to(dtype) for _ in range(3)]
    committed[1][0, 1, 3] = float("inf")
    committed[0][1, 4, 0] = float("nan")
    shared_sums = SharedSums(routers[0])
    for index, router in enumerate(routers):
        current = torch.randn(2, 6, 16, generator=generator).to(dtype)
        current[index, 2, 5] = float("-inf")
        current[1, 3, 1] = 1e30
        sources = [*committed, current]
        with torch.no_grad():
            shortcut = router(sources, shared_sums)
        general, _ = router.mix(sources)
        assert torch.equal(shortcut.isnan(), general.isnan())
        assert int(general.isnan().any(-1).sum()) == 3
        finite = ~general.isnan()
        assert torch.equal(_bits(shortcut)[finite], _bits(general)[finite])
    assert shared_sums._committed == tuple(committed)  # the second router reused the sum


def test_pre_hooks_and_global_hooks_on_router_hook_points_fire(tokens):
    """A raw PyTorch forward pre-hook on a router's hook point, and a global module hook,
    see the router's tensors (the unwatched router paths skip only unwatched points)."""
    model = _content_free_model("cumulative", torch.float32, "query")
    site = model.sites()[2]
    point = model.hook_dict[site.hook("weights")]

    def uniform(module, args):
        return (torch.full_like(args[0], 1.0 / args[0].shape[-1]),)

    with torch.inference_mode():
        plain = model(tokens)
        expected = model.run_with_hooks(
            tokens,
            fwd_hooks=[(site.hook("weights"), lambda x, hook: torch.full_like(x, 1 / x.shape[-1]))],
        )
        handle = point.register_forward_pre_hook(uniform)
        try:
            pre_hooked = model(tokens)
        finally:
            handle.remove()
        seen: list = []
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, out: seen.append(module) if module is point else None
        )
        try:
            model(tokens)
        finally:
            handle.remove()
    assert not torch.equal(expected, plain)
    assert torch.equal(pre_hooked, expected)
    assert seen == [point]


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full", "none"])
def test_pytorch_hooks_on_key_norm_unembed_and_blocks_run(layout, tokens):
    """A PyTorch forward hook on a module the pass used to bypass: ``key_norm`` (the router
    computed the scales itself unless a hook point watched it), ``unembed`` (the pass
    multiplied by ``W_U``) and ``blocks[l]`` (the pass ran its halves). Each was skipped
    silently: scaling the key norm's output moved nothing where the equal weight edit moves
    the logits by 0.13, scaling the unembedding's output nothing instead of 0.26 (float64,
    tiny models). Now each equals the same edit made another way; a pass that would run
    half of a hooked block raises instead."""
    import copy
    import dataclasses

    model = tiny_model(attnres_layout=layout, dtype=torch.float64)
    if layout != "none":
        randomize_routing(model)
    model.eval()
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding

    def with_hook(module, hook, **kwargs):
        handle = module.register_forward_hook(hook)
        try:
            return model(tokens, attention_mask=mask, **kwargs)
        finally:
            handle.remove()

    edits = [(model.unembed, lambda m: m.unembed.W_U.mul_(1.5))]
    if layout != "none":  # the key norm's output is the scale: scale * 1.5 == gain / 1.5
        edits += [
            (model.blocks[1].attn_res.key_norm, lambda m: m.blocks[1].attn_res.key_norm.w.div_(1.5))
        ]
    with torch.no_grad():
        plain = model(tokens, attention_mask=mask)
        for module, weight_edit in edits:
            edited = copy.deepcopy(model)
            weight_edit(edited)
            expected = edited(tokens, attention_mask=mask)
            assert (expected - plain).abs().max() > 1e-3  # the edit matters
            got = with_hook(module, lambda m, args, out: out * 1.5)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        # a block's output is the DepthState leaving it; its current source is hook_resid_post
        seen = []
        with_hook(model.blocks[2], lambda m, args, out: seen.append(out.current.clone()))
        names = "blocks.2.hook_resid_post"  # without the pattern hooks: the plain bits
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
        assert len(seen) == 1 and torch.equal(seen[0], cache["blocks.2.hook_resid_post"])
        if layout == "none":  # no committed blocks: editing the stream is the whole edit
            expected = model.run_with_hooks(
                tokens,
                attention_mask=mask,
                fwd_hooks=[("blocks.2.hook_resid_post", lambda x, hook: x * 0.5)],
            )
            got = with_hook(
                model.blocks[2],
                lambda m, args, out: dataclasses.replace(out, current=out.current * 0.5),
            )
            assert torch.equal(got, expected)
        states = model.depth_states(tokens, sublayers=True, attention_mask=mask)
        handle = model.blocks[2].register_forward_hook(lambda *args: None)
        try:
            with pytest.raises(
                ValueError, match=r"on blocks.2 .*forward_from starts at its MLP sublayer \(5\)"
            ):
                model.forward_from(states[5], 5, attention_mask=mask)
            with pytest.raises(ValueError, match=r"depth_states\(sublayers=True\) runs each"):
                model.depth_states(tokens, sublayers=True, attention_mask=mask)
            # whole layers run it: from the layer's attention on, and per-layer states
            torch.testing.assert_close(
                model.forward_from(states[4], 4, attention_mask=mask), plain, rtol=0, atol=1e-12
            )
        finally:
            handle.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [False, True])
def test_a_zero_source_with_eps_zero_gives_the_general_path_nan(dtype, shared, content_free_calls):
    """With a key-norm eps of 0 a zero source row has the logit ``0 / 0``: the general path
    makes that position nan, so a content-free router may not take its shortcut (which
    would give a finite row); with eps > 0 it does and agrees with the general path."""
    from hooked_attnres.model.routing import DepthRouter, SharedSums

    generator = torch.Generator().manual_seed(5)
    sources = [torch.randn(2, 3, 8, generator=generator).to(dtype) for _ in range(3)]
    sources[1][0, 2] = 0.0
    for eps, expected_nan in ((0.0, True), (1e-6, False)):
        router = DepthRouter(8, eps, 1.0).to(dtype)
        shared_sums = SharedSums(router) if shared else None
        content_free_calls.clear()
        with torch.inference_mode():
            unhooked = router(sources, shared_sums)
        general, _ = router.mix(sources)
        assert bool(general[0, 2].isnan().all()) == expected_nan
        assert int(general.isnan().sum()) == (8 if expected_nan else 0)
        assert torch.equal(unhooked.isnan(), general.isnan())
        finite = ~general.isnan()
        assert torch.equal(_bits(unhooked)[finite], _bits(general)[finite])
        assert content_free_calls == ([] if expected_nan else [1])


@pytest.mark.parametrize("shared", [False, True])
def test_a_finite_sum_that_overflows_is_inf_as_in_the_general_path(shared):
    """Sources at the float32 maximum whose weighted sum rounds past it: the general path
    gives inf there (every source is finite, so no logit is nan), and so does the
    content-free shortcut: it makes a position nan only where a source is not finite."""
    from hooked_attnres.model.routing import DepthRouter, SharedSums

    top = torch.finfo(torch.float32).max
    sources = [torch.full((1, 2, 4), top) for _ in range(7)]
    sources[-1][0, 1, 0] = float("nan")
    router = DepthRouter(4, 1e-6, -20.0)
    with torch.inference_mode():
        unhooked = router(sources, SharedSums(router) if shared else None)
    general, _ = router.mix(sources)
    assert bool(general[0, 0].isinf().all())  # the overflow this test is about
    assert bool(general[0, 1].isnan().all())  # a non-finite source: nan, as before
    assert torch.equal(unhooked.isnan(), general.isnan())
    assert torch.equal(unhooked[~general.isnan()], general[~general.isnan()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_pass_wide_content_free_decision_equals_each_routers_own(dtype):
    """`SharedSums.is_content_free` decides for all the model's routers with one product;
    it equals each router's own test: a zero query, a zero gain, a nonzero query, an
    infinite gain times a zero query (nan, not content-free), eps 0, and a product that
    underflows to zero in float32 but not in float64."""
    from hooked_attnres.model.routing import SharedSums

    model = _content_free_model("kimi", dtype, "query")
    routers = [model.get_submodule(site.prefix) for site in model.sites()]
    tiny = 1e-30 if dtype != torch.bfloat16 else 1e-25
    with torch.no_grad():
        routers[0].query[3] = 0.5  # content
        routers[1].key_norm.w[2] = float("inf")  # inf * 0: nan
        routers[2].query.fill_(tiny)
        routers[2].key_norm.w.fill_(tiny)  # the product underflows in float32
        routers[3].key_norm.w.zero_()
        routers[3].query.fill_(0.25)
    routers[4].key_norm.eps = 0.0
    for source_dtype in {dtype, torch.float64}:
        shared_sums = SharedSums(model)
        decided = [shared_sums.is_content_free(router, source_dtype) for router in routers]
        own = [router._content_free(router._effective_query(source_dtype)) for router in routers]
        assert decided == own
        assert decided[:5] == [False, False, source_dtype != torch.float64, True, False]
        assert all(decided[5:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [False, True])
def test_finite_sources_need_no_per_position_test(monkeypatch, dtype, shared):
    """With every source finite, the content-free shortcut's sum is finite and no
    per-position test runs (`_non_finite_rows`), also in float16, where the sum of a
    ``[1, 64, 1024]`` tensor of values near 1 leaves float16's range (so the test must
    not sum the float16 output); the bits are the general path's."""
    from hooked_attnres.model.routing import DepthRouter, SharedSums

    row_tests = _record_calls(monkeypatch, "_non_finite_rows")
    generator = torch.Generator().manual_seed(6)
    sources = [(torch.rand(1, 64, 1024, generator=generator) + 1).to(dtype) for _ in range(3)]
    assert not math.isfinite(sources[-1].sum().item()) or dtype != torch.float16
    routers = [DepthRouter(1024, 1e-6, 1.5).to(dtype) for _ in range(2)]
    shared_sums = SharedSums(routers[0]) if shared else None
    for router in routers:
        with torch.inference_mode():
            unhooked = router(sources, shared_sums)
        general, _ = router.mix(sources)
        assert torch.equal(_bits(unhooked), _bits(general))
    assert row_tests == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [None, 2.0])
def test_route_normalized_equals_the_norm_of_the_general_route_bit_for_bit(
    monkeypatch, dtype, bias
):
    """`SharedSums.route_normalized` tests the current source's finiteness through the
    norm's RMS instead of the routed sum: its output equals ``norm`` of the general path
    (`DepthRouter.mix`) bit for bit (nan where the general path is nan) with finite
    sources, an inf or a nan in the current source, a row whose RMS overflows (finite, so
    not nan), each with and without an inf in a committed source; the current source's
    rows are tested only when the sum is not finite."""
    from hooked_attnres.model.norms import RMSNorm
    from hooked_attnres.model.routing import DepthRouter, SharedSums

    row_tests = _record_calls(monkeypatch, "_non_finite_rows")
    generator = torch.Generator().manual_seed(7)
    norm = RMSNorm(16, 1e-6).to(dtype)
    with torch.no_grad():
        norm.w.copy_(torch.rand(16, generator=generator) + 0.5)
    huge = torch.finfo(dtype).max / 2  # a finite row whose sum of squares overflows
    cases = ("finite", "non-finite", "overflow")
    for committed_inf in (False, True):
        routers = [DepthRouter(16, 1e-6, bias).to(dtype) for _ in cases]
        committed = [torch.randn(2, 6, 16, generator=generator).to(dtype) for _ in range(3)]
        if committed_inf:
            committed[1][0, 1, 3] = float("inf")  # a nan row of the shared committed sum
        shared_sums = SharedSums(routers[0])
        counted = []
        for router, case in zip(routers, cases, strict=True):
            current = torch.randn(2, 6, 16, generator=generator).to(dtype)
            if case == "non-finite":
                current[1, 2, 5] = float("-inf")
                current[0, 4, 0] = float("nan")
            elif case == "overflow":
                current[1, 3] = huge
            sources = [*committed, current]
            row_tests.clear()
            with torch.inference_mode():
                folded = shared_sums.route_normalized(router, sources, norm)
                general = norm(router.mix(sources)[0])
            counted.append(len(row_tests))
            nan = general.isnan()
            assert torch.equal(folded.isnan(), nan), case
            assert torch.equal(_bits(folded)[~nan], _bits(general)[~nan]), case
            n_nan_rows = int(nan.all(-1).sum())
            assert n_nan_rows == committed_inf + 2 * (case == "non-finite"), case
            assert int(nan.any(-1).sum()) == n_nan_rows  # nan rows are whole rows
            if case == "overflow":
                assert not bool(nan[1, 3].any())  # an overflow is not a nan row
        assert shared_sums._committed == tuple(committed)  # made once, then reused
        # an inf committed row: its 3 sources' rows tested once for the shared sum; then
        # every sum has a nan row, so the current source's rows are tested every time.
        # Else only a non-finite current source is tested, and the overflowing row,
        # whose elements (not the float16 ones) add up past the float32 range
        overflow_tested = int(dtype != torch.float16)
        assert counted == ([3 + 1, 1, 1] if committed_inf else [0, 1, overflow_tested])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_normalized_skips_every_finiteness_test_of_the_sum_when_finite(monkeypatch, dtype):
    """With finite sources the folded path makes no test of the ``[batch, pos, d_model]``
    sum (`_nan_where_not_finite`) and no row test: the norm's scale proves it finite."""
    from hooked_attnres.model.norms import RMSNorm
    from hooked_attnres.model.routing import DepthRouter, SharedSums

    sum_tests = _record_calls(monkeypatch, "_nan_where_not_finite")
    generator = torch.Generator().manual_seed(8)
    sources = [torch.randn(1, 5, 32, generator=generator).to(dtype) for _ in range(4)]
    norm = RMSNorm(32, 1e-6).to(dtype)
    routers = [DepthRouter(32, 1e-6, 1.0).to(dtype) for _ in range(2)]
    shared_sums = SharedSums(routers[0])
    with torch.inference_mode():
        folded = [shared_sums.route_normalized(router, sources, norm) for router in routers]
        general = norm(routers[0].mix(sources)[0])
    assert sum_tests == [1]  # only the committed sum, made once, is tested
    for out in folded:
        assert torch.equal(_bits(out), _bits(general))


@pytest.mark.parametrize("layout", ["cumulative", "kimi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("value", ["inf", "huge"])
def test_a_non_finite_or_huge_embedding_gives_the_watched_pass_bits(layout, dtype, value):
    """An inf, or a finite value whose square overflows, in one token's embedding reaches
    the routers of a pass without hooks (shared committed sums, the finiteness test
    through the norm's RMS and its fallback) as a current and a committed source: the
    logits equal the watched general path's bit for bit (nan where it is: with an inf,
    the whole prompt, as a nan value row reaches every query through ``0 * nan``)."""
    model = _content_free_model(layout, dtype, "query", one_bias=True)
    tokens = torch.arange(1, 13).reshape(2, 6)  # token 4 at [0, 3] only
    with torch.no_grad():
        model.embed.W_E[4, 5] = float("inf") if value == "inf" else torch.finfo(dtype).max / 2
    watch_all = [(lambda name: name.endswith("hook_logits"), lambda x, hook: None)]
    with torch.inference_mode():
        plain = model(tokens)
        general = model.run_with_hooks(tokens, fwd_hooks=watch_all)
    nan = general.isnan()
    assert bool(nan[0].all()) == (value == "inf")
    assert not bool(nan[1].any())
    assert torch.equal(plain.isnan(), nan)
    assert torch.equal(_bits(plain)[~nan], _bits(general)[~nan])


def test_modules_if_unhooked_lists_every_module_or_finds_any_hook():
    """`modules_if_unhooked` lists the modules of ``model.modules()`` (a ``None``
    submodule skipped), and is ``None`` with a TransformerLens hook, a raw forward
    pre-hook deep in the model, or a global module hook; `any_hook_attached` agrees."""
    from hooked_attnres.model.norms import any_hook_attached, modules_if_unhooked

    model = tiny_model(attnres_layout="kimi")
    model.blocks[1].register_module("unused", None)
    listed = modules_if_unhooked(model)
    assert listed is not None
    assert {id(module) for module in listed} == {id(module) for module in model.modules()}
    assert len(listed) == len(list(model.modules()))
    assert not any_hook_attached(model)
    deep = model.blocks[1].mlp
    for attach in (
        lambda: model.blocks[0].hook_resid_pre.add_hook(lambda x, hook: None) and None,
        lambda: deep.register_forward_pre_hook(lambda module, args: None),
        lambda: torch.nn.modules.module.register_module_forward_hook(lambda *args: None),
    ):
        handle = attach()
        try:
            assert modules_if_unhooked(model) is None
            assert any_hook_attached(model)
        finally:
            if handle is None:
                model.reset_hooks()
            else:
                handle.remove()
        assert modules_if_unhooked(model) is not None


def test_raw_hooks_on_a_norm_or_a_router_fire_in_a_plain_forward(tokens):
    """The shared pass calls the routers and the sublayer norms without
    ``nn.Module.__call__``; a raw forward hook on a norm (``ln1``) or on a router
    (``final_res``) must turn that off and fire, and its edit must reach the output."""
    model = _content_free_model("kimi", torch.float32, "query", one_bias=True)
    with torch.inference_mode():
        plain = model(tokens)
    for module in (model.blocks[1].ln1, model.final_res):
        calls: list = []

        def double(module, args, out, calls=calls):
            calls.append(1)
            return out * 2

        handle = module.register_forward_hook(double)
        try:
            with torch.inference_mode():
                hooked = model(tokens)
        finally:
            handle.remove()
        assert calls == [1]
        assert not torch.allclose(hooked, plain)


@pytest.mark.parametrize(
    "layout,mode,num_blocks",
    [
        ("cumulative", "block", 2),
        ("cumulative", "full", 4),
        ("kimi", "block", 2),
        ("kimi", "block", 3),
        ("full", "block", 4),
    ],
)
def test_source_hooks_name_the_hook_whose_output_each_router_reads(layout, mode, num_blocks):
    """``routing_layout.source_hooks(point)`` (derived from `RoutingLayout.trace`) against
    the forward pass itself: with every hook that can hold a source (``hook_embed``,
    ``hook_resid_*``, the commit hooks) scaling its activation by its own factor, each
    source a router reads (its ``hook_sources``) is bit for bit the cached output of the
    hook ``source_hooks`` names for it."""
    import warnings

    from hooked_attnres import RoutedResidualPatchWarning

    model = randomize_routing(
        tiny_model(attnres_layout=layout, attnres_mode=mode, attnres_num_blocks=num_blocks)
    )
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    names = [
        name
        for name in model.hook_dict
        if name == "hook_embed" or "hook_resid_" in name or "hook_committed_" in name
    ]
    hooks = [
        (name, lambda act, hook, factor=1.0 + 0.125 * (k + 1): act * factor)
        for k, name in enumerate(names)
    ]
    with warnings.catch_warnings(), model.hooks(fwd_hooks=hooks):
        warnings.simplefilter("ignore", RoutedResidualPatchWarning)
        _, cache = model.run_with_cache(tokens)
    layout_rules = model.routing_layout
    checked = 0
    for site in layout_rules.sites():
        read = cache[site.hook("sources")].unbind(-2)
        stored = layout_rules.source_hooks(site.sublayer)
        assert len(stored) == len(read), site
        for source, name in zip(read, stored, strict=True):
            assert torch.equal(source, cache[name]), (site, name)
            checked += 1
    assert checked > len(layout_rules.sites())  # routers with several sources were compared
