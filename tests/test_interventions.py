"""Routing interventions: mask-and-renormalise, setting weights, source patching, selection."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from helpers import eps_zero_config, hf_qwen3, nan_at_padding, randomize_routing, tiny_model

from hooked_attnres import HookedAttnRes, RoutedResidualPatchWarning, RunCacheDict
from hooked_attnres.interventions import (
    commit_hook_name,
    depth_bands,
    mask_sources,
    patch_committed,
    patch_sources,
    resolve_routers,
    resolve_sources,
    resolve_value,
    select_sites,
    set_weights,
)


def routed(layout: str, **overrides):
    return randomize_routing(
        tiny_model(attnres_layout=layout, attnres_recency_bias=0.5, **overrides)
    ).eval()


def routed_or_wrapped(layout: str) -> HookedAttnRes:
    """A float64 `routed` model of ``layout``, or for ``"recency"`` / ``"exact"`` a tiny
    HF Qwen3 wrapped with 2 blocks."""
    if layout in ("recency", "exact"):
        return HookedAttnRes.from_hf_qwen3(
            hf_qwen3(), wrap=layout, num_blocks=2, dtype=torch.float64
        ).eval()
    return routed(layout, dtype=torch.float64)


def weights_under(model, tokens, hooks) -> dict[str, torch.Tensor]:
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_weights"))
    return dict(cache.items())


@pytest.mark.parametrize(
    "sources", ["embedding", "older", "current", ["embedding", "prev_completed"], 0]
)
def test_mask_zeroes_exactly_the_masked_sources_and_renormalises(routed_layout, tokens, sources):
    model = routed(routed_layout, n_layers=6, attnres_num_blocks=3)
    clean = weights_under(model, tokens, [])
    checked = 0
    for layer in range(1, model.cfg.n_layers):  # one router at a time: its inputs stay clean
        try:
            hooks = mask_sources(model, sources, routers="mlp_res", layers=layer)
        except ValueError as error:  # the family is every source there
            assert "would mask all" in str(error)
            continue
        if not hooks:
            continue
        name = f"blocks.{layer}.mlp_res.hook_weights"
        masked = weights_under(model, tokens, hooks)
        for other, w in masked.items():
            upstream = other.startswith("blocks.") and int(other.split(".")[1]) < layer
            if upstream or other == f"blocks.{layer}.attn_res.hook_weights":
                assert torch.equal(w, clean[other]), other  # upstream routers untouched
        w = masked[name]
        keep = torch.ones(w.shape[-1], dtype=torch.bool)
        keep[resolve_sources(model, layer, "mlp_res", sources)] = False
        assert (w[..., ~keep] == 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6, rtol=0)
        expected = clean[name] * keep / (clean[name] * keep).sum(-1, keepdim=True)
        torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked >= 1


def test_mask_only_at_given_positions(tokens):
    model = routed("cumulative")
    name = "blocks.3.attn_res.hook_weights"
    clean = weights_under(model, tokens, [])[name]
    masked = weights_under(
        model, tokens, mask_sources(model, "embedding", layers=3, positions=[2, 5])
    )[name]
    assert (masked[:, [2, 5], 0] == 0).all()
    others = [p for p in range(tokens.shape[1]) if p not in (2, 5)]
    assert torch.equal(masked[:, others], clean[:, others])


def test_masking_a_source_of_zero_weight_changes_nothing(routed_layout, tokens):
    model = routed(routed_layout)
    layer, router = 3, "mlp_res"
    name = f"blocks.{layer}.{router}"
    # a finite logit 1e4 below the others: exp underflows, the embedding gets weight exactly 0
    push_down = [
        (
            f"{name}.hook_logits",
            lambda logits, hook: logits - 1e4 * (torch.arange(logits.shape[-1]) == 0),
        )
    ]
    weights = weights_under(model, tokens, push_down)[f"{name}.hook_weights"]
    assert (weights[..., 0] == 0).all() and (weights[..., 1:] > 0).all()
    # (no cache in the compared runs: observing the attention patterns switches attention
    # from the fused kernel to the explicit one, which moves the logits by ~1e-7)
    before = model.run_with_hooks(tokens, fwd_hooks=push_down)
    masked = mask_sources(model, "embedding", routers=router, layers=layer)
    after = model.run_with_hooks(tokens, fwd_hooks=push_down + masked)
    assert torch.equal(after, before)
    # control: the same construction with a source of non-zero weight does change the output
    changed = model.run_with_hooks(
        tokens, fwd_hooks=push_down + mask_sources(model, "current", routers=router, layers=layer)
    )
    assert (changed - before).abs().max() > 1e-3


def test_masking_every_source_of_a_router_is_refused(tokens):
    model = routed("cumulative")
    with pytest.raises(ValueError, match="would mask all"):
        mask_sources(
            model, ["embedding", "older", "prev_completed", "current"], routers="attn_res", layers=3
        )
    kimi = routed("kimi")
    with pytest.raises(ValueError, match="would mask all 1 of its sources"):
        mask_sources(kimi, "embedding", routers="attn_res", layers=0)


def test_two_mask_lists_that_together_mask_every_source_raise_not_nan(tokens):
    model = routed("cumulative")
    # each list alone is valid at attn_res layer 3; together they leave nothing to route
    first = mask_sources(model, ["embedding", "older"], routers="attn_res", layers=3)
    second = mask_sources(model, ["prev_completed", "current"], routers="attn_res", layers=3)
    model.run_with_hooks(tokens, fwd_hooks=first)  # fine alone
    with pytest.raises(
        ValueError, match="blocks.3.attn_res.hook_logits: together with earlier hooks"
    ):
        model.run_with_hooks(tokens, fwd_hooks=first + second)
    # at other positions only, the two lists leave every position one source: no error
    partial = mask_sources(
        model, ["prev_completed", "current"], routers="attn_res", layers=3, positions=[0]
    )
    other = mask_sources(model, ["embedding", "older"], routers="attn_res", layers=3, positions=[1])
    assert torch.isfinite(model.run_with_hooks(tokens, fwd_hooks=partial + other)).all()


def test_set_weights_uniform_and_patching_another_runs_weights(tokens):
    model = routed("kimi")
    uniform = weights_under(
        model, tokens, set_weights(model, "uniform", routers=["attn_res", "final_res"])
    )
    for name, w in uniform.items():
        if "mlp_res" not in name:
            assert torch.allclose(w, torch.full_like(w, 1 / w.shape[-1]))
    other = tokens.flip(0)
    _, other_cache = model.run_with_cache(other)
    patched = weights_under(
        model, tokens, set_weights(model, other_cache, routers=["attn_res", "mlp_res", "final_res"])
    )
    for name, w in patched.items():
        assert torch.equal(w, other_cache[name]), name


def test_patching_a_runs_own_weights_and_sources_is_a_no_op(routed_layout, tokens):
    model = routed(routed_layout)
    # without attention patterns in the cache, the cached run and the patched runs use the
    # same attention kernel, so "no-op" can mean bit for bit
    clean, cache = model.run_with_cache(
        tokens, names_filter=lambda name: not name.endswith(("hook_pattern", "hook_attn_scores"))
    )
    for hooks in (
        set_weights(model, cache),
        patch_sources(model, ["embedding", "older", "current"], cache),
        patch_committed(model, ["embedding"], cache),
        patch_committed(model, model.source_labels(model.cfg.n_layers - 1, "mlp_res")[1:-1], cache),
    ):
        assert hooks
        assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=hooks), clean)
    # control: another run's committed blocks do change the output
    _, other = model.run_with_cache(tokens.flip(0))
    blocks = model.source_labels(model.cfg.n_layers - 1, "mlp_res")[1:-1]
    assert not torch.equal(
        model.run_with_hooks(tokens, fwd_hooks=patch_committed(model, blocks, other)), clean
    )


def test_local_patching_touches_one_router_and_global_patching_every_reader(tokens):
    model = routed("cumulative", n_layers=6, attnres_num_blocks=3)
    _, clean = model.run_with_cache(tokens)
    # local: zero block_1 as layer 4's attention router sees it
    with model.hooks(
        fwd_hooks=patch_sources(model, "block_1", "zero", routers="attn_res", layers=4)
    ):
        _, local = model.run_with_cache(tokens)
    slot = model.source_labels(4, "attn_res").index("block_1")
    assert (local["blocks.4.attn_res.hook_sources"][..., slot, :] == 0).all()
    assert not torch.equal(local["blocks.4.attn_res.hook_out"], clean["blocks.4.attn_res.hook_out"])
    assert torch.equal(
        local["blocks.3.mlp_res.hook_out"], clean["blocks.3.mlp_res.hook_out"]
    )  # earlier
    # global: zero the committed block_1 for every later router
    name = commit_hook_name(model, "block_1")
    assert name.endswith("hook_committed_block")
    with model.hooks(fwd_hooks=patch_committed(model, "block_1", "zero")):
        _, glob = model.run_with_cache(tokens)
    readers = [(l, r) for l, r in model.routers() if "block_1" in model.source_labels(l, r)]
    assert len(readers) >= 4
    for layer, router in readers:
        slot = model.source_labels(layer, router).index("block_1")
        assert (glob[f"blocks.{layer}.{router}.hook_sources"][..., slot, :] == 0).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: mask_sources(m, "embedding", routers="bogus_res"), "router must be one of"),
        (lambda m: mask_sources(m, "embedding", layers=9), r"must be an integer in \[-4, 4\)"),
        (lambda m: mask_sources(m, "embedding", layers="deep"), "unknown depth band"),
        (lambda m: mask_sources(m, "newest"), "unknown source 'newest'"),
        (lambda m: mask_sources(m, 17, layers=3), "out of range"),
        (lambda m: mask_sources(m, "embedding", routers="final_res"), "no final router"),
        (lambda m: set_weights(m, "triangular"), "uniform"),
        (
            lambda m: set_weights(m, torch.tensor([0.5, 0.6, -0.1]), routers="attn_res", layers=3),
            "non-negative and sum to 1",
        ),
        (lambda m: set_weights(m, torch.ones(7) / 7, routers="attn_res", layers=3), "sources"),
        (lambda m: patch_committed(m, "current"), "not a committed source"),
    ],
)
def test_bad_selections_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call(routed("cumulative"))


def test_layout_none_has_no_routers():
    with pytest.raises(ValueError, match="no routers"):
        resolve_routers(tiny_model(attnres_layout="none"))


def test_global_patching_in_layout_none_says_it_has_no_routers():
    """Audit 11: `patch_committed(model, "embedding", ...)` on layout "none" said
    "'embedding' is not a committed source of this model; global patching takes
    'embedding' ...", contradicting itself; now it says the layout has no routers, as
    every other routing call does."""
    model = tiny_model(attnres_layout="none")
    for label in ("embedding", "block_1"):
        with pytest.raises(ValueError, match="attnres_layout='none' and therefore no routers"):
            patch_committed(model, label, "mean")
        with pytest.raises(ValueError, match="no routers"):
            commit_hook_name(model, label)


def test_depth_bands():
    assert depth_bands(8) == {"early": [0, 1, 2], "middle": [3, 4, 5], "late": [6, 7]}
    assert depth_bands(28)["late"] == list(range(19, 28))
    assert depth_bands(8, {"first": (0, 2), "last": [7], "odd": range(1, 8, 2)}) == {
        "first": [0, 1],
        "last": [7],
        "odd": [1, 3, 5, 7],
    }
    with pytest.raises(ValueError, match="empty"):
        depth_bands(8, {"none": []})
    with pytest.raises(ValueError, match=r"must be an integer in \[-8, 8\), got 8"):
        depth_bands(8, {"beyond": [8]})


# --- further checks: every layout, every kind of source spec, all routers at once ----------------


def source_specs(model, layer, router) -> dict[str, object]:
    """One spec of each kind that selects something but not everything at this router."""
    labels = model.source_labels(layer, router)
    specs = {"family": "embedding", "index": -1}
    if len(labels) > 2:
        specs["label"] = labels[1]  # a committed block: "block_1", "attn_0", ...
        specs["labels+family"] = [labels[1], "current"]
    return specs


def test_mask_one_router_by_family_label_and_index_every_layout(routed_layout, tokens):
    model = routed(routed_layout)
    clean = weights_under(model, tokens, [])
    kinds = set()
    for layer, router in model.routers():
        if model.routing_layout.n_sources(layer, router) < 2:
            continue
        prefix = "final_res" if layer is None else f"blocks.{layer}.{router}"
        for kind, spec in source_specs(model, layer, router).items():
            routers = router if layer is None else [router]
            hooks = mask_sources(
                model, spec, routers=routers, layers=layer if layer is not None else None
            )
            assert len(hooks) == 1 and hooks[0][0] == f"{prefix}.hook_logits"
            w = weights_under(model, tokens, hooks)[f"{prefix}.hook_weights"]
            labels = model.source_labels(layer, router)
            # the masked slots, derived from the labels (not from resolve_sources)
            if kind == "family":
                masked = [0]
            elif kind == "index":
                masked = [len(labels) - 1]
            elif kind == "label":
                masked = [labels.index(spec)]
            else:
                masked = [labels.index(spec[0]), len(labels) - 1]
            keep = torch.ones(len(labels), dtype=torch.bool)
            keep[masked] = False
            c = clean[f"{prefix}.hook_weights"]
            expected = c * keep / (c * keep).sum(-1, keepdim=True)
            assert torch.isfinite(w).all()
            assert (w[..., ~keep] == 0).all()
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6, rtol=0)
            torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-5)
            assert not torch.allclose(w, c, atol=1e-3)  # the mask did something
            kinds.add(kind)
    assert kinds == {"family", "index", "label", "labels+family"}


@pytest.mark.parametrize("spec", ["embedding", "prev_completed", "block_1", ["older", -1]])
def test_mask_at_every_router_renormalises_each_routers_own_logits(routed_layout, tokens, spec):
    """All routers at once: the upstream routers change the inputs, so compare each router with
    the softmax of the logits it computed in the same run, recorded before the mask hook."""
    model = routed(routed_layout, n_layers=6, attnres_num_blocks=3)
    routers = ["attn_res", "mlp_res"] + (
        ["final_res"] if model.routing_layout.has_final_router else []
    )
    if routed_layout == "full" and spec == "block_1":
        spec = "mlp_1"
    try:
        masks = mask_sources(model, spec, routers=routers)
    except (
        ValueError
    ) as error:  # e.g. the embedding is the only source of kimi/full layer-0 attention
        assert "would mask all" in str(error)
        masks = mask_sources(model, spec, routers=routers, layers=range(1, model.cfg.n_layers))
    assert masks
    recorded = {}

    def record(logits, hook):
        recorded[hook.name] = logits.detach().clone()

    recorders = [(name, record) for name, _ in masks]
    with model.hooks(fwd_hooks=recorders + masks):
        logits, cache = model.run_with_cache(
            tokens, names_filter=lambda n: n.endswith("hook_weights")
        )
    assert torch.isfinite(logits).all()
    assert len(recorded) == len(masks)
    for name, _ in masks:
        prefix = name.rsplit(".", 1)[0]
        layer = None if prefix == "final_res" else int(prefix.split(".")[1])
        router = prefix.rsplit(".", 1)[-1]
        labels = model.source_labels(layer, router)
        keep = torch.ones(len(labels), dtype=torch.bool)
        for item in [spec] if isinstance(spec, str) else spec:
            if item == -1:
                keep[-1] = False
            elif item in labels and item not in ("embedding",):
                keep[labels.index(item)] = False
            elif item == "embedding":
                keep[0] = False
            elif item == "prev_completed" and len(labels) >= 3:
                keep[len(labels) - 2] = False
            elif item == "older":
                keep[1 : len(labels) - 2] = False
        w = cache[f"{prefix}.hook_weights"]
        unmasked = recorded[name].softmax(-1)
        expected = unmasked * keep / (unmasked * keep).sum(-1, keepdim=True)
        assert torch.isfinite(w).all()
        assert (w[..., ~keep] == 0).all(), name
        torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-5)


def test_mask_at_positions_renormalises_there_only(routed_layout, tokens):
    model = routed(routed_layout)
    clean = weights_under(model, tokens, [])
    positions = [0, 4, -1]
    hooks = mask_sources(model, "current", routers="mlp_res", layers=2, positions=positions)
    w = weights_under(model, tokens, hooks)["blocks.2.mlp_res.hook_weights"]
    c = clean["blocks.2.mlp_res.hook_weights"]
    n_pos = tokens.shape[1]
    at = [p % n_pos for p in positions]
    others = [p for p in range(n_pos) if p not in at]
    keep = torch.ones(c.shape[-1], dtype=torch.bool)
    keep[-1] = False
    expected = c[:, at] * keep / (c[:, at] * keep).sum(-1, keepdim=True)
    assert (w[:, at, -1] == 0).all()
    torch.testing.assert_close(w[:, at], expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(w[:, others], c[:, others])


def test_masking_all_but_one_source_everywhere_is_one_hot_and_finite(routed_layout, tokens):
    model = routed(routed_layout)
    layers = range(1, model.cfg.n_layers)  # kimi/full layer-0 attention has only the embedding
    hooks = mask_sources(model, ["embedding", "older", "prev_completed"], layers=layers)
    weights = weights_under(model, tokens, hooks)
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert torch.isfinite(logits).all()
    for layer in layers:
        for router in ("attn_res", "mlp_res"):
            w = weights[f"blocks.{layer}.{router}.hook_weights"]
            expected = torch.zeros_like(w)
            expected[..., -1] = 1.0
            assert torch.equal(w, expected)


@pytest.mark.parametrize(
    "every",
    [
        ["embedding", "older", "prev_completed", "current"],
        [0, -1],
        ["embedding", "block_1", "current"],
    ],
)
def test_masking_every_source_is_refused_for_any_spec(every):
    model = routed("cumulative")  # layers 2-3 read [embedding, block_1, current]
    if len(every) == 2:
        with pytest.raises(ValueError, match="would mask all 2 of its sources"):
            mask_sources(model, every, layers=0)
    else:
        with pytest.raises(ValueError, match="would mask all 3 of its sources") as error:
            mask_sources(model, every, routers="mlp_res", layers=[2, 3])
        assert "mlp_res layer 2" in str(error.value)


def test_set_weights_uniform_every_layout_and_positions(routed_layout, tokens):
    model = routed(routed_layout)
    routers = ["attn_res", "mlp_res"] + (
        ["final_res"] if model.routing_layout.has_final_router else []
    )
    weights = weights_under(model, tokens, set_weights(model, "uniform", routers=routers))
    assert len(weights) == len(model.routers())
    for name, w in weights.items():
        assert torch.allclose(w, torch.full_like(w, 1 / w.shape[-1]), atol=0, rtol=1e-6), name
    # only at some positions
    clean = weights_under(model, tokens, [])
    name = "blocks.3.attn_res.hook_weights"
    part = weights_under(
        model, tokens, set_weights(model, "uniform", routers="attn_res", layers=3, positions=[1, 2])
    )[name]
    n = part.shape[-1]
    assert torch.allclose(part[:, [1, 2]], torch.full_like(part[:, [1, 2]], 1 / n))
    rest = [p for p in range(tokens.shape[1]) if p not in (1, 2)]
    assert torch.equal(part[:, rest], clean[name][:, rest])


def test_set_weights_from_a_vector_or_a_dict(tokens):
    model = routed("cumulative")
    vector = torch.tensor([0.2, 0.3, 0.5])
    w = weights_under(model, tokens, set_weights(model, vector, routers="mlp_res", layers=3))
    assert torch.equal(w["blocks.3.mlp_res.hook_weights"], vector.expand(*tokens.shape, 3))
    per_router = {(2, "attn_res"): torch.tensor([1.0, 0.0, 0.0]), (3, "mlp_res"): vector}
    # the selection also picks (3, attn_res) and (2, mlp_res), which the dict lacks: refused,
    # not silently skipped
    with pytest.raises(KeyError):
        set_weights(model, per_router, layers=[2, 3])
    # an entry outside the selection would be ignored: refused too (before, the second
    # router's entry was dropped silently), so each call gets its own routers' entries
    with pytest.raises(ValueError, match=r"entries for \['mlp_res layer 3'\], outside the"):
        set_weights(model, per_router, routers="attn_res", layers=2)
    hooks = set_weights(
        model, {(2, "attn_res"): per_router[(2, "attn_res")]}, routers="attn_res", layers=2
    ) + set_weights(model, {(-1, "mlp_res"): vector}, routers="mlp_res", layers=3)
    w = weights_under(model, tokens, hooks)
    assert (w["blocks.2.attn_res.hook_weights"][..., 0] == 1).all()
    assert torch.equal(w["blocks.3.mlp_res.hook_weights"], vector.expand(*tokens.shape, 3))
    # one router selected by both keys, and a key that is no router, are refused
    both = {(3, "mlp_res"): vector, model.site(3, "mlp_res"): vector}
    with pytest.raises(ValueError, match="two entries for mlp_res layer 3"):
        set_weights(model, both, routers="mlp_res", layers=3)
    with pytest.raises(ValueError, match="mixes router keys with 'blocks.3"):
        set_weights(model, {(3, "mlp_res"): vector, "blocks.3.mlp_res.hook_weights": vector})
    # the whole selection given, in every form of key: the same hooks
    sublayer_sites = [site for site in model.sites() if not site.is_final]
    every = {site: torch.rand(model.routing_layout.n_sources(site)) for site in sublayer_sites}
    every = {site: w / w.sum() for site, w in every.items()}
    by_pair = {(site.layer, site.kind): w for site, w in every.items()}
    assert torch.equal(
        model.run_with_hooks(tokens, fwd_hooks=set_weights(model, every)),
        model.run_with_hooks(tokens, fwd_hooks=set_weights(model, by_pair)),
    )


def test_routing_patching_reproduces_the_other_runs_weights_and_outputs(routed_layout, tokens):
    model = routed(routed_layout)
    other = torch.randint(0, 50, tokens.shape, generator=torch.Generator().manual_seed(7))
    _, clean = model.run_with_cache(tokens)
    _, donor = model.run_with_cache(other)
    routers = ["attn_res", "mlp_res"] + (
        ["final_res"] if model.routing_layout.has_final_router else []
    )
    hooks = set_weights(model, donor, routers=routers)
    with model.hooks(fwd_hooks=hooks):
        _, patched = model.run_with_cache(tokens)
    for layer, router in model.routers():
        prefix = "final_res" if layer is None else f"blocks.{layer}.{router}"
        assert torch.equal(patched[f"{prefix}.hook_weights"], donor[f"{prefix}.hook_weights"])
        # the sources are this run's, mixed with the donor's weights (independent computation)
        mixed = (
            patched[f"{prefix}.hook_weights"].unsqueeze(-1) * patched[f"{prefix}.hook_sources"]
        ).sum(-2)
        torch.testing.assert_close(patched[f"{prefix}.hook_out"], mixed, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        patched["blocks.3.attn_res.hook_weights"], clean["blocks.3.attn_res.hook_weights"]
    )


def test_local_patching_leaves_everything_upstream_and_the_stored_blocks_alone(tokens):
    model = routed("cumulative", n_layers=6, attnres_num_blocks=3)
    _, clean = model.run_with_cache(tokens)
    with model.hooks(
        fwd_hooks=patch_sources(model, "block_1", "zero", routers="attn_res", layers=4)
    ):
        _, local = model.run_with_cache(tokens)
    slot = model.source_labels(4, "attn_res").index("block_1")
    sources = local["blocks.4.attn_res.hook_sources"]
    others = [i for i in range(sources.shape[2]) if i != slot]
    assert (sources[..., slot, :] == 0).all()
    assert torch.equal(
        sources[..., others, :], clean["blocks.4.attn_res.hook_sources"][..., others, :]
    )
    for name, value in clean.items():  # every hook before layer 4's attention router
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if (
            name == "hook_embed"
            or (layer is not None and layer < 4)
            or name in ("blocks.4.hook_resid_pre",)
        ):
            assert torch.equal(local[name], value), name
    assert not torch.equal(local["blocks.4.attn_res.hook_out"], clean["blocks.4.attn_res.hook_out"])
    # the MLP router of the same layer and later routers still read the clean block_1
    for layer, router in [(4, "mlp_res"), (5, "attn_res"), (5, "mlp_res")]:
        s = model.source_labels(layer, router).index("block_1")
        name = f"blocks.{layer}.{router}.hook_sources"
        assert torch.equal(local[name][..., s, :], clean[name][..., s, :]), name
        assert local[name][..., s, :].abs().sum() > 0


def _readers_after(model, label: str) -> tuple[list, list]:
    """Routers before the commit of ``label`` and routers after it (forward order)."""
    hook = commit_hook_name(model, label)
    layer = int(hook.split(".")[1])
    after_attn = hook.endswith("hook_committed_mid")
    before, after = [], []
    for l, r in model.routers():
        is_after = l is None or l > layer or (l == layer and after_attn and r == "mlp_res")
        (after if is_after else before).append((l, r))
    return before, after


@pytest.mark.parametrize(
    "layout,label",
    [("cumulative", "block_1"), ("kimi", "block_1"), ("full", "attn_1"), ("full", "mlp_1")],
)
def test_global_patching_every_layout(layout, label, tokens):
    model = routed(layout, n_layers=6, attnres_num_blocks=3)
    _, clean = model.run_with_cache(tokens)
    hooks = patch_committed(model, label, "zero")
    assert [name for name, _ in hooks] == [commit_hook_name(model, label)]
    with model.hooks(fwd_hooks=hooks):
        _, glob = model.run_with_cache(tokens)
    assert (glob[hooks[0][0]] == 0).all()
    before, after = _readers_after(model, label)
    for l, r in before:
        name = f"blocks.{l}.{r}.hook_sources"
        assert torch.equal(glob[name], clean[name]), name
    readers = 0
    for i, (l, r) in enumerate(after):
        prefix = "final_res" if l is None else f"blocks.{l}.{r}"
        labels = model.source_labels(l, r)
        sources = glob[f"{prefix}.hook_sources"]
        if label in labels:
            assert (sources[..., labels.index(label), :] == 0).all(), prefix
            readers += 1
        elif i == 0:
            # the first router after the commit: partial-sum layouts read the new block as the
            # current source; the cumulative layout's current is the un-snapshotted stream
            if layout == "cumulative":
                assert torch.equal(sources[..., -1, :], clean[f"{prefix}.hook_sources"][..., -1, :])
            else:
                assert (sources[..., -1, :] == 0).all(), prefix
            readers += 1
    assert readers >= 3


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: mask_sources(m, "block_99"), "unknown source 'block_99'"),
        (
            lambda m: mask_sources(m, "attn_0"),
            "unknown source 'attn_0'",
        ),  # a label of other layouts
        (lambda m: mask_sources(m, -4, layers=3), "out of range"),
        (lambda m: mask_sources(m, True), "not a family, label or index"),
        (lambda m: mask_sources(m, "embedding", layers=-5), r"must be an integer in \[-4, 4\)"),
        (lambda m: mask_sources(m, "embedding", layers=(2, 9)), "not in"),
        (
            lambda m: mask_sources(m, "embedding", layers="early", bands={"first": [0]}),
            "unknown depth band 'early'",
        ),
        (lambda m: patch_sources(m, "embedding", "half"), "value must be"),
        (lambda m: patch_committed(m, "block_7"), "not a committed source"),
        (lambda m: set_weights(m, "uniform", routers=["attn_res", "final_res"]), "no final router"),
    ],
)
def test_more_bad_selections(call, message):
    model = routed("cumulative")
    with pytest.raises(ValueError, match=message):
        hooks = call(model)
        model.run_with_hooks(
            torch.zeros(1, 3, dtype=torch.long), fwd_hooks=hooks
        )  # value errors fire late


@pytest.mark.parametrize(
    "call",
    [
        lambda m: mask_sources(m, "embedding"),
        lambda m: set_weights(m, "uniform"),
        lambda m: patch_sources(m, "embedding"),
        lambda m: resolve_sources(m, 0, "attn_res", "embedding"),
    ],
)
def test_no_router_interventions_on_a_layout_none_model(call):
    with pytest.raises(ValueError, match="no routers"):
        call(tiny_model(attnres_layout="none"))


def test_custom_bands_select_layers(tokens):
    model = routed("cumulative", n_layers=6, attnres_num_blocks=3)
    bands = {"outer": [0, 5], "inner": (2, 4)}
    hooks = mask_sources(model, "embedding", routers="attn_res", layers="inner", bands=bands)
    assert [name for name, _ in hooks] == [
        "blocks.2.attn_res.hook_logits",
        "blocks.3.attn_res.hook_logits",
    ]
    hooks = mask_sources(
        model, "embedding", routers="mlp_res", layers=["outer", "inner"], bands=bands
    )
    assert [int(name.split(".")[1]) for name, _ in hooks] == [0, 2, 3, 5]
    default = mask_sources(model, "embedding", routers="mlp_res", layers="late")
    assert [int(name.split(".")[1]) for name, _ in default] == [4, 5]


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 5, 7, 28])
def test_default_bands_partition_the_layers_in_order(n_layers):
    bands = depth_bands(n_layers)
    flat = [layer for layers in bands.values() for layer in layers]
    assert flat == list(range(n_layers))
    assert list(bands) == [b for b in ("early", "middle", "late") if b in bands]
    assert all(bands.values())
    sizes = [len(v) for v in bands.values()]
    assert max(sizes) - min(sizes) <= 1


def test_patch_sources_values_several_slots_and_positions(tokens):
    model = routed("cumulative", n_layers=6, attnres_num_blocks=3)
    other = torch.randint(0, 50, tokens.shape, generator=torch.Generator().manual_seed(11))
    name = "blocks.5.mlp_res.hook_sources"
    # the same names_filter in every run: caching attention patterns would switch attention to
    # its explicit (unfused) kernel, which moves activations by ~1e-7
    _, clean = model.run_with_cache(tokens, names_filter=name)
    _, donor = model.run_with_cache(other, names_filter=name)
    labels = model.source_labels(5, "mlp_res")  # embedding, block_1, block_2, current
    slots = [labels.index("embedding"), labels.index("block_2")]
    rest = [i for i in range(len(labels)) if i not in slots]
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    c = clean[name]
    expected = {
        "zero": torch.zeros_like(c[..., slots, :]),
        "mean": c[..., slots, :].mean(0, keepdim=True).expand_as(c[..., slots, :]),
        "donor": donor[name][..., slots, :],
        "tensor": vector.expand_as(c[..., slots, :]),
    }
    values = {"zero": "zero", "mean": "mean", "donor": donor, "tensor": vector}
    for key, value in values.items():
        hooks = patch_sources(model, ["embedding", "block_2"], value, routers="mlp_res", layers=5)
        with model.hooks(fwd_hooks=hooks):
            _, patched = model.run_with_cache(tokens, names_filter=name)
        got = patched[name]
        torch.testing.assert_close(got[..., slots, :], expected[key], atol=1e-6, rtol=0)
        assert torch.equal(got[..., rest, :], c[..., rest, :]), key
    # positions: only there
    hooks = patch_sources(
        model, ["embedding", "block_2"], "zero", routers="mlp_res", layers=5, positions=[3]
    )
    with model.hooks(fwd_hooks=hooks):
        _, patched = model.run_with_cache(tokens, names_filter=name)
    assert (patched[name][:, 3][..., slots, :] == 0).all()
    others = [p for p in range(tokens.shape[1]) if p != 3]
    assert torch.equal(patched[name][:, others], c[:, others])
    assert torch.equal(patched[name][:, 3][..., rest, :], c[:, 3][..., rest, :])


def test_patch_committed_values_and_positions(tokens):
    model = routed("kimi", n_layers=6, attnres_num_blocks=3)
    other = torch.randint(0, 50, tokens.shape, generator=torch.Generator().manual_seed(12))
    hook = commit_hook_name(model, "block_1")
    _, donor = model.run_with_cache(other, names_filter=hook)
    names = [hook, "blocks.5.attn_res.hook_sources"]
    slot = model.source_labels(5, "attn_res").index("block_1")
    for value, expected in (("mean", None), (donor, donor[hook])):
        with model.hooks(fwd_hooks=patch_committed(model, "block_1", value, positions=[0, 2])):
            _, patched = model.run_with_cache(tokens, names_filter=names)
        _, clean = model.run_with_cache(tokens, names_filter=names)
        if expected is None:
            expected = clean[hook].mean(0, keepdim=True).expand_as(clean[hook])
        block = patched[hook]
        torch.testing.assert_close(block[:, [0, 2]], expected[:, [0, 2]], atol=1e-6, rtol=0)
        assert torch.equal(block[:, [1, 3, 4]], clean[hook][:, [1, 3, 4]])
        # a later reader sees the patched block
        assert torch.equal(patched["blocks.5.attn_res.hook_sources"][..., slot, :], block)


def test_selection_errors_name_the_problem(tokens):
    model = routed("cumulative")
    # the suggested spelling is Python (it printed "bands={{name: layers}}")
    with pytest.raises(ValueError, match=r"mixes band names and layer indices.*bands=\{name: "):
        mask_sources(model, "embedding", layers=["early", 3])
    with pytest.raises(ValueError, match="global patching takes source labels"):
        patch_committed(model, 0)
    with pytest.raises(
        ValueError,
        match=r"positions \(99,\) must be integers in \[-\d+, \d+\) \(this run has \d+ tokens\)",
    ):
        model.run_with_hooks(
            tokens, fwd_hooks=mask_sources(model, "embedding", layers=3, positions=[99])
        )
    with pytest.raises(ValueError, match=r"positions \[1.5\] must be integers in"):
        model.run_with_hooks(
            tokens, fwd_hooks=set_weights(model, "uniform", layers=3, positions=[1.5])
        )


def test_set_weights_from_a_cache_of_another_batch_or_length_is_refused_not_broadcast():
    model = randomize_routing(tiny_model(attnres_layout="kimi"))
    tokens = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    _, one_prompt = model.run_with_cache(tokens[:1])
    with pytest.raises(
        ValueError, match=r"the cache has \[batch, pos\] = \[1, 9\] but this run has \[3, 9\]"
    ):
        model.run_with_hooks(tokens, fwd_hooks=set_weights(model, one_prompt, layers=2))
    _, last_position = model.run_with_cache(tokens[:, -1:])
    with pytest.raises(ValueError, match=r"\[3, 1\] but this run has \[3, 9\]"):
        model.run_with_hooks(tokens, fwd_hooks=set_weights(model, last_position, layers=2))
    _, sliced = model.run_with_cache(tokens, pos_slice=[-1])  # refused as it is made
    with pytest.raises(ValueError, match=r"were cached with a pos_slice that drops or reorders"):
        set_weights(model, sliced, layers=2)
    # a tensor meant to broadcast still does; a dict by site names what it lacks
    site = model.site(2, "mlp_res")
    uniform = torch.full((model.routing_layout.n_sources(site),), 1 / 3)
    model.run_with_hooks(tokens, fwd_hooks=set_weights(model, uniform, routers=[site]))
    with pytest.raises(KeyError, match=r"no entry for attn_res layer 2 \(key \(2, 'attn_res'\)"):
        set_weights(model, {(2, "mlp_res"): uniform}, layers=2)


def test_per_prompt_positions_are_refused_not_flattened(tokens):
    """``positions=torch.tensor([[1], [4]])`` (one position per prompt) was flattened to
    ``[1, 4]`` and applied to every prompt (each prompt also ablated at the other's
    position), silently. Every intervention refuses a 2-d selection now."""
    model = routed("kimi")
    per_prompt = torch.tensor([[1], [4]])
    site = model.site(2, "mlp_res")
    uniform = torch.full((model.routing_layout.n_sources(site),), 1 / 3)
    message = r"flat list of positions .* got shape \(2, 1\)"
    for build in (
        lambda p: mask_sources(model, "embedding", layers=2, positions=p),
        lambda p: set_weights(model, uniform, routers=[site], positions=p),
        lambda p: patch_sources(model, "embedding", "zero", layers=2, positions=p),
        lambda p: patch_committed(model, "embedding", "zero", positions=p),
    ):
        with pytest.raises(ValueError, match=message):
            build(per_prompt)
        with pytest.raises(ValueError, match=message):
            build([[1], [4]])
        # flat selections still work: a 1-d tensor as the list, a 0-d one as the int
        flat = model.run_with_hooks(tokens, fwd_hooks=build(torch.tensor([1, 4])))
        assert torch.equal(flat, model.run_with_hooks(tokens, fwd_hooks=build([4, 1])))
        one = model.run_with_hooks(tokens, fwd_hooks=build(torch.tensor(4)))
        assert torch.equal(one, model.run_with_hooks(tokens, fwd_hooks=build(4)))
        assert not torch.equal(one, model(tokens))


def test_a_cache_of_a_key_value_cached_pass_is_refused_as_a_value():
    """A cache of ``run_with_cache(rest, past_kv_cache=kv)`` holds the sequence's positions
    from ``n_past`` on. As a value of ``set_weights`` / ``patch_sources`` /
    ``patch_committed`` in a whole run of its length it was accepted (the sweeps already
    refused it) and its position ``i`` (the sequence's ``n_past + i``) went to position
    ``i``: 0.38 logits off the unpatched run for the chunk's own weights (kimi)."""
    from hooked_attnres import KeyValueCache

    model = routed("kimi")
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    kv = KeyValueCache.init_cache(model.cfg)
    model(tokens[:, :3], past_kv_cache=kv)
    _, chunk = model.run_with_cache(tokens[:, 3:], past_kv_cache=kv)
    assert chunk.n_past == 3
    message = "comes from a pass after 3 cached positions .*its position 0 is the sequence's"
    for build in (
        lambda cache: set_weights(model, cache),
        lambda cache: patch_sources(model, "embedding", cache),
        lambda cache: patch_committed(model, "embedding", cache),
    ):
        with pytest.raises(ValueError, match=message):
            build(chunk)
        _, whole = model.run_with_cache(tokens[:, 3:])  # a whole run's cache still works
        patched = model.run_with_hooks(tokens[:, 3:], fwd_hooks=build(whole))
        torch.testing.assert_close(patched, model(tokens[:, 3:]), rtol=0, atol=1e-5)


def test_caching_hooks_record_the_pass_that_last_filled_them(tokens):
    """``add_caching_hooks`` (a plain ``dict``) and ``get_caching_hooks`` (which recorded
    the mask of its first pass only, and no ``n_past``) fill their dict on every pass.
    Filled by a key-value cached pass, the dict was accepted as a value for a whole run of
    its length (0.38 logits off the same interventions from a whole run's cache of those
    tokens, kimi); kept over an unpadded then a padded pass, it said "no padding" and was
    patched into an unpadded run (0.24 logits off). Each pass now records its extent, as
    ``run_with_cache`` does, so both are refused."""
    from hooked_attnres import KeyValueCache

    model = routed("kimi")
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    builds = (
        lambda cache: set_weights(model, cache),
        lambda cache: patch_committed(model, "block_1", cache),
    )
    kv = KeyValueCache.init_cache(model.cfg)
    model(tokens[:, :3], past_kv_cache=kv)
    added = model.add_caching_hooks()
    model(tokens[:, 3:], past_kv_cache=kv)
    model.reset_hooks()
    _, chunk = model.run_with_cache(tokens[:, 3:], past_kv_cache=KeyValueCache.init_cache(4))
    assert added.n_past == 3 and chunk.n_past == 0
    for build in builds:
        with pytest.raises(ValueError, match="comes from a pass after 3 cached positions"):
            build(added)
    # kept around generate: the dict holds its last step, the third new token's pass
    # (one position after the prompt's 5 and the first new token)
    cache, fwd, _ = model.get_caching_hooks()
    with model.hooks(fwd_hooks=fwd):
        model.generate(
            tokens[:, :5], max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False
        )
    assert cache.n_past == 6 and cache["hook_embed"].shape[1] == 1
    with pytest.raises(ValueError, match="comes from a pass after 6 cached positions"):
        set_weights(model, cache)
    # kept over an unpadded, then a padded pass: the padded pass's tensors and mask
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    _, padded = model.run_with_cache(tokens, attention_mask=mask)
    cache, fwd, _ = model.get_caching_hooks()
    with model.hooks(fwd_hooks=fwd):
        model(tokens)
        model(tokens, attention_mask=mask)
    assert cache.n_past == 0 and torch.equal(cache.attention_mask, mask.bool())
    for build in builds:
        with pytest.raises(ValueError, match="was made with an attention_mask marking 4"):
            model.run_with_hooks(tokens, fwd_hooks=build(cache))
        # with the mask it was made with, it patches as the padded run's own cache does
        torch.testing.assert_close(
            model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=build(cache)),
            model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=build(padded)),
            rtol=0,
            atol=0,
        )


def test_a_cache_object_built_around_a_run_cache_dict_keeps_its_record():
    """``run_with_cache(..., return_cache_object=False)`` (or the caching hooks) gives a
    `RunCacheDict` that records ``n_past`` and the mask; wrapped as TransformerLens does it,
    ``ActivationCache(cache_dict, model)`` (or ``AttnResActivationCache(cache_dict,
    model)``), the record was dropped: a key-value chunk's cache was patched into a whole
    run of its length (0.38 logits off the same intervention from a whole run's cache,
    kimi; the sweeps took it too) and a padded run's cache into an unpadded run. Both
    wrappers now keep the record, so both are refused."""
    from transformer_lens import ActivationCache

    from hooked_attnres import KeyValueCache
    from hooked_attnres.model.cache import AttnResActivationCache
    from hooked_attnres.patching import get_act_patch_routing_weights

    model = routed("kimi")
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    kv = KeyValueCache.init_cache(model.cfg)
    model(tokens[:, :3], past_kv_cache=kv)
    _, chunk = model.run_with_cache(tokens[:, 3:], past_kv_cache=kv, return_cache_object=False)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    _, padded = model.run_with_cache(tokens, attention_mask=mask, return_cache_object=False)
    _, whole = model.run_with_cache(tokens, return_cache_object=False)

    def metric(logits):
        return logits[:, -1, 3].mean()

    for wrap in (AttnResActivationCache, ActivationCache):
        with pytest.raises(ValueError, match="comes from a pass after 3 cached positions"):
            set_weights(model, wrap(chunk, model))
        with pytest.raises(ValueError, match="comes from a pass after 3 cached positions"):
            get_act_patch_routing_weights(model, tokens[:, 3:], wrap(chunk, model), metric)
        with pytest.raises(ValueError, match="was made with an attention_mask marking 4"):
            model.run_with_hooks(tokens, fwd_hooks=set_weights(model, wrap(padded, model)))
        # the record of a whole unpadded run lets it through, with the dict's numbers
        torch.testing.assert_close(
            model.run_with_hooks(tokens, fwd_hooks=set_weights(model, wrap(whole, model))),
            model.run_with_hooks(tokens, fwd_hooks=set_weights(model, whole)),
            rtol=0,
            atol=0,
        )


def _kv_chunk_and_whole(model, tokens, return_cache_object=True):
    """The cache of ``tokens[:, 3:]`` run after 3 key-value cached positions, and of the
    same tokens as a whole run."""
    from hooked_attnres import KeyValueCache

    kv = KeyValueCache.init_cache(model.cfg)
    model(tokens[:, :3], past_kv_cache=kv)
    _, chunk = model.run_with_cache(
        tokens[:, 3:], past_kv_cache=kv, return_cache_object=return_cache_object
    )
    _, whole = model.run_with_cache(tokens[:, 3:], return_cache_object=return_cache_object)
    return chunk, whole


RECORDS_NOTHING = "does not record the pass that made it .* hooked_attnres.RunCacheDict"


def test_a_cache_that_records_no_pass_is_refused_and_a_declared_one_is_exact():
    """A plain ``dict`` of tensors (``{k: v for k, v in cache.items()}``,
    ``dict(cache.cache_dict)``, ``torch.load``), or a cache object around one
    (``ActivationCache(d, model)``, ``AttnResActivationCache(d, model)``, which took it as
    a whole unpadded run), records neither ``n_past`` nor the mask; it was taken as it
    was. A key-value chunk's plain dict into a whole run of its length: set_weights 0.38
    logits off the same intervention from a whole run's cache (kimi; 0.41 full),
    patch_committed 0.39, patch_sources 0.24; the routing-weight sweep 0.049 off on a
    metric of 0.05 (full). A padded run's plain dict into an unpadded run: 0.24 (kimi),
    0.41 (full). Refused now, saying what to pass; a dict declared as
    ``RunCacheDict(tensors, n_past=..., attention_mask=...)`` is checked by its record."""
    from transformer_lens import ActivationCache

    from hooked_attnres.analysis import attribution_patch_routing_weights
    from hooked_attnres.model.cache import AttnResActivationCache
    from hooked_attnres.patching import get_act_patch_depth_state, get_act_patch_routing_weights

    model = routed("kimi")
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    chunk, whole = _kv_chunk_and_whole(model, tokens)
    plain = {name: tensor for name, tensor in chunk.items()}
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    _, padded = model.run_with_cache(tokens, attention_mask=mask)

    def metric(logits):
        return logits[:, -1, 3].mean()

    builds = (
        lambda cache: set_weights(model, cache),
        lambda cache: patch_sources(model, "current", cache),
        lambda cache: patch_committed(model, "block_1", cache),
    )
    sweeps = (
        get_act_patch_routing_weights,
        get_act_patch_depth_state,
        attribution_patch_routing_weights,
    )
    for unrecorded in (plain, ActivationCache(plain, model), AttnResActivationCache(plain, model)):
        for build in builds:
            with pytest.raises(ValueError, match=RECORDS_NOTHING):
                build(unrecorded)
        for sweep in sweeps:
            with pytest.raises(ValueError, match="the clean cache .*" + RECORDS_NOTHING):
                sweep(model, tokens[:, 3:], unrecorded, metric)
    # declared: the chunk's tensors as what they are (refused), the whole run's as a whole
    # unpadded run (the numbers of run_with_cache's own cache), the padded run's with its mask
    declared_chunk = RunCacheDict(plain, n_past=3)
    declared_whole = RunCacheDict({name: tensor for name, tensor in whole.items()}, n_past=0)
    declared_padded = RunCacheDict(dict(padded.cache_dict), attention_mask=mask)
    for build in builds:
        with pytest.raises(ValueError, match="comes from a pass after 3 cached positions"):
            build(declared_chunk)
        with pytest.raises(ValueError, match="was made with an attention_mask marking 4"):
            model.run_with_hooks(tokens, fwd_hooks=build(declared_padded))
        for declared, cache, run, run_mask in (
            (declared_whole, whole, tokens[:, 3:], None),
            (declared_padded, padded, tokens, mask),
        ):
            torch.testing.assert_close(
                model.run_with_hooks(run, attention_mask=run_mask, fwd_hooks=build(declared)),
                model.run_with_hooks(run, attention_mask=run_mask, fwd_hooks=build(cache)),
                rtol=0,
                atol=0,
            )
    for sweep in sweeps:
        torch.testing.assert_close(
            sweep(model, tokens[:, 3:], declared_whole, metric),
            sweep(model, tokens[:, 3:], whole, metric),
            rtol=0,
            atol=0,
            equal_nan=True,
        )


def test_transformerlens_cache_methods_keep_the_record_or_lose_it_detectably():
    """TransformerLens's ``ActivationCache`` methods that make a new ``cache_dict`` (``to``,
    ``apply_slice_to_batch_dim``) put plain dicts in it, and ``dict.copy`` returns a plain
    dict: a key-value chunk's record was dropped there and the chunk was patched into a
    whole run (0.38 logits off, kimi: ``ActivationCache(cache.to(d).cache_dict, model)``,
    ``ActivationCache(run_cache_dict, model).to(d)`` / ``.apply_slice_to_batch_dim``,
    ``cache_dict.copy()``). An ``AttnResActivationCache`` made around the dict of
    ``add_caching_hooks`` before its passes kept n_past = 0 (0.38 off). Now our cache's
    ``to`` / ``apply_slice_to_batch_dim`` (a list of rows too) / ``remove_batch_dim`` and
    ``RunCacheDict.copy`` keep the record, the cache object reads its dict's record as it
    is now, and what TransformerLens's own class drops is refused (records nothing)."""
    from transformer_lens import ActivationCache

    from hooked_attnres.model.cache import AttnResActivationCache

    model = routed("kimi")
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    chunk, _ = _kv_chunk_and_whole(model, tokens)
    chunk_dict, _ = _kv_chunk_and_whole(model, tokens, return_cache_object=False)
    chunk_message = "comes from a pass after 3 cached positions"
    kept = {
        "to": chunk.to("cpu"),
        "to().cache_dict": ActivationCache(chunk.to("cpu").cache_dict, model),
        "apply_slice_to_batch_dim([1, 0])": chunk.apply_slice_to_batch_dim([1, 0]),
        "its cache_dict": ActivationCache(chunk.apply_slice_to_batch_dim([1, 0]).cache_dict, model),
        "copy()": chunk_dict.copy(),
    }
    chunk.toggle_autodiff(torch.is_grad_enabled())  # global state only
    for what, cache in kept.items():
        assert cache is not None and what
        with pytest.raises(ValueError, match=chunk_message):
            set_weights(model, cache)
    one = chunk.apply_slice_to_batch_dim(slice(1, 2)).remove_batch_dim()
    assert one.n_past == 3 and not one.has_batch_dim
    for lost in (
        ActivationCache(chunk_dict, model).to("cpu"),
        ActivationCache(chunk_dict, model).apply_slice_to_batch_dim([0, 1]),
        dict(chunk_dict),
    ):
        with pytest.raises(ValueError, match=RECORDS_NOTHING):
            set_weights(model, lost)
    # the mask follows a list of rows: rows [1, 0] of a padded cache patch as the padded
    # cache of the rows [1, 0]
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    _, padded = model.run_with_cache(tokens, attention_mask=mask)
    swapped = padded.apply_slice_to_batch_dim([1, 0])
    assert torch.equal(swapped.attention_mask, mask[[1, 0]].bool())
    assert torch.equal(swapped.cache_dict.attention_mask, mask[[1, 0]].bool())
    assert padded.apply_slice_to_batch_dim([0]).attention_mask is None  # an unpadded row
    _, of_rows = model.run_with_cache(tokens[[1, 0]], attention_mask=mask[[1, 0]])
    rows, rows_mask = tokens[[1, 0]], mask[[1, 0]]
    torch.testing.assert_close(
        model.run_with_hooks(rows, attention_mask=rows_mask, fwd_hooks=set_weights(model, swapped)),
        model.run_with_hooks(rows, attention_mask=rows_mask, fwd_hooks=set_weights(model, of_rows)),
        rtol=0,
        atol=1e-6,  # another batch order rounds differently
    )
    with pytest.raises(ValueError, match="was made with an attention_mask marking 4"):
        model.run_with_hooks(tokens[[1, 0]], fwd_hooks=set_weights(model, swapped))
    # a cache object made around the caching hooks' dict before its passes reads the
    # dict's record as it is when used
    from hooked_attnres import KeyValueCache

    kv = KeyValueCache.init_cache(model.cfg)
    model(tokens[:, :3], past_kv_cache=kv)
    added = model.add_caching_hooks()
    early = AttnResActivationCache(added, model)
    model(tokens[:, 3:], past_kv_cache=kv)
    model.reset_hooks()
    assert early.n_past == 3
    with pytest.raises(ValueError, match=chunk_message):
        set_weights(model, early)


def test_caching_hooks_refuse_hooks_an_earlier_pass_with_another_mask_filled():
    """Caching hooks kept over a padded whole pass and then an unpadded pass that stops
    after layer 0 hold the padded pass's tensors at the later layers, but recorded the
    last pass only ("no padding"): layer 2's weights were patched into an unpadded run
    (0.41 logits off the unpadded run's own weights, full; 0.006 kimi). The hooks the
    last pass did not refill are now refused by name; the ones it did refill patch as
    the unpadded run's cache does."""
    from hooked_attnres.patching import get_act_patch_routing_weights

    model = routed("full")
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    cache, fwd, _ = model.get_caching_hooks()
    with model.hooks(fwd_hooks=fwd):
        model(tokens, attention_mask=mask)
        model(tokens, stop_at_layer=1)
    _, unpadded = model.run_with_cache(tokens)
    late, early = model.site(2, "attn_res"), model.site(0, "mlp_res")
    with pytest.raises(ValueError, match=r"blocks.2.attn_res.hook_weights'\] were last filled by"):
        set_weights(model, cache, routers=[late])
    assert cache.attention_mask is None and late.hook("weights") in cache.stale
    with pytest.raises(ValueError, match="were last filled by an earlier pass"):
        get_act_patch_routing_weights(model, tokens, cache, lambda logits: logits.sum())
    torch.testing.assert_close(
        model.run_with_hooks(tokens, fwd_hooks=set_weights(model, cache, routers=[early])),
        model.run_with_hooks(tokens, fwd_hooks=set_weights(model, unpadded, routers=[early])),
        rtol=0,
        atol=0,
    )
    # a later whole pass refills every hook: nothing is stale
    with model.hooks(fwd_hooks=fwd):
        model(tokens)
    assert cache.stale == frozenset()
    torch.testing.assert_close(
        model.run_with_hooks(tokens, fwd_hooks=set_weights(model, cache, routers=[late])),
        model.run_with_hooks(tokens, fwd_hooks=set_weights(model, unpadded, routers=[late])),
        rtol=0,
        atol=0,
    )


def test_positions_are_refused_in_a_pass_over_part_of_the_sequence(routed_layout, tokens):
    """positions= address the whole sequence: a key-value cache chunk (its position 0 is
    a later position of the sequence) and the last layer of a logit_positions pass (one
    position per prompt) refuse them; positions=None works there and gives the full run's
    numbers."""
    from hooked_attnres import KeyValueCache

    model = routed(routed_layout)
    last = model.cfg.n_layers - 1
    at_zero = mask_sources(model, "current", routers="mlp_res", layers=last, positions=0)
    everywhere = mask_sources(model, "current", routers="mlp_res", layers=last)
    answer = torch.tensor([8, 5, 3])
    rows = torch.arange(3)
    with model.hooks(fwd_hooks=at_zero):
        full = model(tokens)  # the whole sequence: allowed
        with pytest.raises(ValueError, match=r"positions=\(0,\) .* sees 1 position\(s\) of a 9"):
            model(tokens, logit_positions=answer)
        cache = KeyValueCache.init_cache(model.cfg)
        first = model(tokens[:, :5], past_kv_cache=cache)  # the start of the sequence
        torch.testing.assert_close(first, full[:, :5], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=r"its position 0 is the sequence's position 5"):
            model(tokens[:, 5:], past_kv_cache=cache)
        with pytest.raises(ValueError, match=r"positions=\(0,\) refers to positions of the whole"):
            model.generate(
                tokens, max_new_tokens=2, do_sample=False, stop_at_eos=False, verbose=False
            )
        model.generate(
            tokens,
            max_new_tokens=2,
            do_sample=False,
            stop_at_eos=False,
            use_past_kv_cache=False,
            verbose=False,
        )
    with model.hooks(fwd_hooks=everywhere):
        full = model(tokens)
        gathered = model(tokens, logit_positions=answer)
        torch.testing.assert_close(gathered[:, 0], full[rows, answer], atol=1e-5, rtol=0)
        torch.testing.assert_close(in_two_cached_chunks(model, tokens), full, atol=1e-5, rtol=0)


def test_values_with_a_position_axis_are_refused_in_a_cache_chunk(tokens):
    """A value tensor with a position axis, or another run's cache, addresses positions of
    the whole sequence: a key-value cache chunk of the same length used to take them at
    its own, later positions silently (the full forward of the sequence refuses the
    shape). Refused now, naming the pass; position-free values still give the full
    forward's numbers in chunks. An ablation's mask with a position axis (`mask_hook`) was
    still taken at the chunk's positions until audit 107. Each message names its tensor
    (a mask since audit 110, weights since audit 115: before, "a value tensor")."""
    from hooked_attnres import KeyValueCache
    from hooked_attnres.interventions import mask_hook

    model = routed("kimi", dtype=torch.float64)
    first, rest = tokens[:, :4], tokens[:, 4:8]  # two chunks of 4 positions
    _, clean = model.run_with_cache(first)
    site = model.site(2, "mlp_res")
    n = model.routing_layout.n_sources(site)
    generator = torch.Generator().manual_seed(0)
    per_position = torch.randn(3, 4, model.cfg.d_model, generator=generator).double()
    weights = torch.softmax(torch.randn(3, 4, n, generator=generator), -1)
    refused = {
        r"a value tensor of shape \(3, 4, 32\)": patch_committed(model, "block_1", per_position),
        "a value from another run's cache": patch_sources(model, "embedding", clean, layers=2),
        # audit 115: named weights, not a value tensor, with the remedy for weights
        r"set_weights at .*hook_weights: a weights tensor of shape \(3, 4, 3\)"
        r"(?=.*give a weights tensor without a position axis)": set_weights(
            model, weights, routers=[site]
        ),
        "set_weights at .* another run's cache": set_weights(model, clean, routers=[site]),
        # audit 107: a mask with a position axis was applied at the chunk's positions
        # (audit 110: named a mask, not a value tensor, with the remedy for a mask)
        r"this ablation at .*hook_logits: a mask of shape \(3, 4, 3\)"
        r"(?=.*give a mask without a position axis)": [mask_hook(site, weights > 0.5)],
    }
    for what, hooks in refused.items():
        with model.hooks(fwd_hooks=hooks):
            model(first)  # the whole sequence of 4: the value's positions
            cache = KeyValueCache.init_cache(model.cfg)
            model(first, past_kv_cache=cache)
            with pytest.raises(ValueError, match=rf"{what}.* sequence's position 4"):
                model(rest, past_kv_cache=cache)
    vector = per_position[0, 0]
    for hooks in (
        patch_committed(model, "block_1", vector),
        patch_committed(model, "block_1", per_position[:, :1]),  # [batch, 1, d_model]
        set_weights(model, weights[0, 0], routers=[site]),
    ):
        with model.hooks(fwd_hooks=hooks):
            full = model(tokens[:, :8])
            torch.testing.assert_close(
                in_two_cached_chunks(model, tokens[:, :8], 4), full, atol=1e-10, rtol=0
            )


def in_two_cached_chunks(model, tokens, split: int = 5) -> torch.Tensor:
    """The logits of ``tokens`` from two passes that share a key-value cache."""
    from hooked_attnres import KeyValueCache

    cache = KeyValueCache.init_cache(model.cfg)
    first = model(tokens[:, :split], past_kv_cache=cache)
    return torch.cat([first, model(tokens[:, split:], past_kv_cache=cache)], dim=1)


def test_a_mean_over_the_prompts_is_refused_where_their_positions_differ(tokens):
    model = routed("kimi")
    last = model.cfg.n_layers - 1
    mean = patch_sources(model, "embedding", "mean", routers="mlp_res", layers=last)
    with model.hooks(fwd_hooks=mean):
        full = model(tokens)
        with pytest.raises(ValueError, match=r"value='mean' .* logit_positions"):
            model(tokens, logit_positions=torch.tensor([8, 5, 3]))
        # a cached pass: the prompts' positions line up, allowed
        torch.testing.assert_close(in_two_cached_chunks(model, tokens), full, atol=1e-5, rtol=0)


def test_interventions_at_hook_embed_see_the_passs_extent_and_mask(routed_layout, tokens):
    """hook_embed fired before the pass recorded its extent and attention mask, so
    patch_committed("embedding", ...) took neither into account: value="mean" averaged
    padding into the mean (0.34-0.48 logits off at real positions of a left-padded batch),
    and positions= in a key-value cache chunk patched the chunk's own position 0 (0.43
    logits off the full forward). Checked against a hand-written mean over the real
    tokens, in forward and depth_states, and the chunk is refused."""
    from hooked_attnres import KeyValueCache

    model = routed(routed_layout, dtype=torch.float64)
    mask = torch.ones_like(tokens)
    mask[1, :3], mask[2, :5] = 0, 0  # left padding
    weights = mask[..., None].double()
    mean = masked_mean(model.embed(tokens), weights)
    by_hand = [("hook_embed", lambda x, hook: mean.clone())]
    hooks = patch_committed(model, "embedding", "mean")
    with torch.no_grad():
        got = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
        expected = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=by_hand)
        at_real = mask.bool()
        torch.testing.assert_close(got[at_real], expected[at_real], atol=1e-12, rtol=0)
        with model.hooks(fwd_hooks=hooks):
            embedding = model.depth_states(tokens, attention_mask=mask)[0].sources[0]
        torch.testing.assert_close(embedding[at_real], mean[at_real], atol=1e-12, rtol=0)
        at_zero = patch_committed(model, "embedding", "zero", positions=0)
        with model.hooks(fwd_hooks=at_zero):
            cache = KeyValueCache.init_cache(model.cfg)
            model(tokens[:, :5], past_kv_cache=cache)
            with pytest.raises(ValueError, match=r"positions=0 .* sequence's position 5"):
                model(tokens[:, 5:], past_kv_cache=cache)


def test_ablations_at_different_positions_are_different_ablations(tokens):
    from hooked_attnres.interventions import Ablation

    model = routed("cumulative")
    at = {p: Ablation.compile(model, "current", positions=p) for p in (0, 1)}
    assert at[0] != at[1] and len({at[0], at[1]}) == 2
    same = [Ablation.compile(model, "current", positions=p) for p in (3, [3], torch.tensor([3]))]
    assert same[0] == same[1] == same[2] and same[0].positions == (3,)
    assert Ablation.compile(model, "current") != at[0]


def masked_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of ``x [batch, pos, d]`` weighted by ``weights [batch, pos,
    1]`` (1 at real tokens), expanded to ``x``'s shape."""
    return ((x * weights).sum(0) / weights.sum(0)).expand_as(x)


def test_a_mean_over_the_prompts_skips_their_padding(tokens):
    """value='mean' in a padded batch: the mean over the prompts whose token is real at
    each position (padding is no prompt's token; it used to enter the mean, 0.12 logits
    off at real positions of a right-padded kimi batch). Checked against a hand-written
    hook with the masked mean, right and left padding, patch_sources and patch_committed,
    and a key-value cache pass (its mask covers the new positions)."""
    model = randomize_routing(
        tiny_model(attnres_layout="kimi", attnres_recency_bias=0.5, dtype=torch.float64)
    ).eval()
    real = torch.ones_like(tokens)
    real[1, 6:], real[2, 4:] = 0, 0  # right padding
    site = model.site(2, "attn_res")
    name = site.hook("sources")
    for mask in (real, real.flip(-1)):  # right and left padding
        _, clean = model.run_with_cache(tokens, attention_mask=mask)
        weights = mask[..., None].double()
        committed = commit_hook_name(model, "block_1")
        source_mean = masked_mean(clean[name][..., 0, :], weights)
        committed_mean = masked_mean(clean[committed], weights)

        def by_hand(x, hook, mean=source_mean):
            x = x.clone()
            x[..., 0, :] = mean
            return x

        def committed_by_hand(x, hook, mean=committed_mean):
            return mean

        cases = [
            (patch_sources(model, "embedding", "mean", routers=site), [(name, by_hand)]),
            (patch_committed(model, "block_1", "mean"), [(committed, committed_by_hand)]),
        ]
        with torch.no_grad():
            for hooks, reference in cases:
                got = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
                expected = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=reference)
                at_real = mask.bool()
                torch.testing.assert_close(got[at_real], expected[at_real], atol=1e-12, rtol=0)
    # unpadded (a mask of ones): the plain mean over the prompts
    hooks = patch_sources(model, "embedding", "mean", routers=site)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        torch.testing.assert_close(
            model(tokens, attention_mask=torch.ones_like(tokens)), model(tokens), atol=0, rtol=0
        )
        # a cached pass: the second chunk's mask covers its own positions
        from hooked_attnres import KeyValueCache

        cache = KeyValueCache.init_cache(model.cfg)
        first = model(tokens[:, :3], attention_mask=real[:, :3], past_kv_cache=cache)
        second = model(tokens[:, 3:], attention_mask=real[:, 3:], past_kv_cache=cache)
        whole = model(tokens, attention_mask=real)
    at_real = real.bool()
    torch.testing.assert_close(
        torch.cat([first, second], dim=1)[at_real], whole[at_real], atol=1e-10, rtol=0
    )


def test_patching_from_a_cache_made_with_another_attention_mask_is_refused(tokens):
    """set_weights / patch_sources / patch_committed from another run's cache in a run
    with another attention mask (a clean cache made without the mask of a left-padded
    batch) took the cache's positions as the run's, silently: 0.05 (set_weights), 0.26
    (patch_sources, patch_committed) logits off at real positions, 2-layer kimi. The
    cache records its run's mask and the hook refuses another one; with the same mask the
    patch equals a hand-written hook that copies the cached tensor."""
    model = randomize_routing(tiny_model(attnres_layout="kimi", n_layers=2)).eval()
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    other = torch.randint(0, 50, tokens.shape, generator=torch.Generator().manual_seed(3))
    _, clean = model.run_with_cache(other, attention_mask=mask)
    _, unmasked = model.run_with_cache(other)
    site = model.site(1, "attn_res")
    committed = commit_hook_name(model, "block_1")
    interventions = {
        site.hook("weights"): lambda c: set_weights(model, c, routers=[site]),
        site.hook("sources"): lambda c: patch_sources(model, "current", c, routers=[site]),
        committed: lambda c: patch_committed(model, "block_1", c),
    }
    for name, intervene in interventions.items():
        with pytest.raises(ValueError, match="was made with no padding .* but this run runs"):
            model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=intervene(unmasked))
        with pytest.raises(ValueError, match="marking 3 padding .* this run runs with no padding"):
            model.run_with_hooks(tokens, fwd_hooks=intervene(clean))

        def by_hand(x, hook, name=name):
            if name.endswith("hook_sources"):
                x = x.clone()
                x[..., -1, :] = clean[name][..., -1, :]  # the current source is the last
                return x
            return clean[name]

        with torch.no_grad():
            got = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=intervene(clean))
            expected = model.run_with_hooks(
                tokens, attention_mask=mask, fwd_hooks=[(name, by_hand)]
            )
            # what the refusal prevents: the unmasked cache's tensors, declared (wrongly)
            # as made with the mask, give other numbers at real positions
            lie = RunCacheDict(unmasked.cache_dict, attention_mask=mask)
            wrong = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=intervene(lie))
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert float((wrong - got)[mask.bool()].abs().max()) > 1e-3


def test_patch_committed_refuses_no_label_or_a_label_twice(tokens):
    """patch_committed(model, []) returned no hook (the run was silently unpatched); a
    label twice patched one hook twice. Refused by the one selection check."""
    model = routed("kimi")
    with pytest.raises(ValueError, match="labels is empty: it patches no source"):
        patch_committed(model, [])
    with pytest.raises(ValueError, match=r"labels repeats \['block_1'\]"):
        patch_committed(model, ["block_1", "embedding", "block_1"])
    hooks = patch_committed(model, ["block_1", "embedding"])
    assert [name for name, _ in hooks] == [
        commit_hook_name(model, "block_1"),
        commit_hook_name(model, "embedding"),
    ]


def test_a_cache_whose_pos_slice_reorders_positions_is_refused():
    """``run_with_cache(pos_slice=...)`` with a list that keeps the number of positions but
    not their order (reversed here) gave tensors of the run's shape whose position ``p``
    is another position of the pass: set_weights from it was 0.39 logits off the same
    intervention from the whole cache (kimi; 0.47 full). Refused by hook name now; a
    pos_slice that keeps every position in order is the whole cache."""
    model = routed("kimi")
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    _, reversed_cache = model.run_with_cache(tokens, pos_slice=list(range(8, -1, -1)))
    _, whole = model.run_with_cache(tokens)
    with pytest.raises(ValueError, match="were cached with a pos_slice that drops or reorders"):
        set_weights(model, reversed_cache)
    for kept in (list(range(9)), slice(None)):
        _, same = model.run_with_cache(tokens, pos_slice=kept)
        torch.testing.assert_close(
            model.run_with_hooks(tokens, fwd_hooks=set_weights(model, same)),
            model.run_with_hooks(tokens, fwd_hooks=set_weights(model, whole)),
            rtol=0,
            atol=0,
        )


def test_a_declaration_that_contradicts_a_recorded_pass_is_refused():
    """``AttnResActivationCache(run_cache_dict, model, attention_mask=ones)`` around a
    padded run's dict fell back to the dict's mask (an all-ones mask declares no padding,
    which reads as no declaration), and ``n_past=0`` around a key-value chunk's dict was
    taken over its record: a declaration that contradicts the record is now refused;
    one that agrees with it changes nothing."""
    from hooked_attnres.model.cache import AttnResActivationCache

    model = routed("kimi")
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    chunk, _ = _kv_chunk_and_whole(model, tokens, return_cache_object=False)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    _, padded = model.run_with_cache(tokens, attention_mask=mask, return_cache_object=False)
    with pytest.raises(ValueError, match="n_past=0 contradicts the n_past=3"):
        AttnResActivationCache(chunk, model, n_past=0)
    with pytest.raises(ValueError, match="attention_mask contradicts the padding"):
        AttnResActivationCache(padded, model, attention_mask=torch.ones_like(tokens))
    with pytest.raises(ValueError, match="attention_mask contradicts the padding"):
        AttnResActivationCache(chunk, model, attention_mask=mask[:, 3:])
    agreeing = AttnResActivationCache(padded, model, attention_mask=mask, n_past=0)
    assert agreeing.n_past == 0 and torch.equal(agreeing.attention_mask, mask.bool())
    assert AttnResActivationCache(chunk, model, n_past=3).n_past == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_set_weights_sums_half_precision_weights_where_the_router_applies_them(dtype):
    """The weights are applied in the routing dtype (float32 in a bfloat16 / float16
    model), but the sum-to-1 check summed them in their own dtype: three bfloat16 1/3
    (0.333984375 each, 1.00195 together) summed to 1.0 in bfloat16 and were accepted,
    scaling the router's output by 1.002, while the same values in float32 are refused."""
    model = routed("cumulative").to(dtype)
    third = torch.full((3,), 1 / 3, dtype=dtype)  # the router at layer 3 has 3 sources
    with pytest.raises(ValueError, match="sum to 1 .summed in float32"):
        set_weights(model, third, routers="attn_res", layers=3)
    with pytest.raises(ValueError, match="sum to 1"):
        set_weights(model, third.float(), routers="attn_res", layers=3)
    exact = torch.tensor([0.25, 0.25, 0.5], dtype=dtype)  # sums to 1 exactly
    hooks = set_weights(model, exact, routers="attn_res", layers=3)
    weights = weights_under(model, torch.tensor([[1, 2, 3]]), hooks)
    assert torch.equal(weights["blocks.3.attn_res.hook_weights"][0, 0], exact.float())


def test_zero_patches_are_refused_when_eps_is_zero():
    """With eps = 0 (the exact wrap of a Qwen3 with rms_norm_eps = 0) a zero source has no
    RMS: its routing logit is 0 / 0, and patching one to zero made every logit of the run
    NaN (neither a number nor an error). Refused, naming mask_sources; with eps > 0 a zero
    patch runs and is finite."""
    from helpers import hf_qwen3

    from hooked_attnres import HookedAttnRes

    tokens = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    model = HookedAttnRes.from_hf_qwen3(hf_qwen3(rms_norm_eps=0.0), wrap="exact", num_blocks=2)
    for make in (
        lambda: patch_sources(model, "embedding", "zero", layers=1),
        lambda: patch_sources(model, "embedding", torch.zeros(model.cfg.d_model), layers=1),
        lambda: patch_committed(model, "block_1", "zero"),
        lambda: patch_committed(model, "embedding", 0.0),
    ):
        with pytest.raises(ValueError, match=r"eps = 0 .*0 / 0.*mask_sources"):
            make()
    masked = model.run_with_hooks(tokens, fwd_hooks=mask_sources(model, "embedding", layers=1))
    assert masked.isfinite().all()
    finite = tiny_model(attnres_layout="kimi")  # eps 1e-6
    assert (
        finite.run_with_hooks(tokens % 50, fwd_hooks=patch_committed(finite, "embedding", "zero"))
        .isfinite()
        .all()
    )


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative"])
def test_zero_patch_refusal_reads_the_eps_of_the_norms_that_read_the_source(layout):
    """The zero-source refusal keys on the eps set at the norms a zero meets
    (`zero_nan_norms`), not on the model's ``cfg.eps``. Before (audit 42), a hand-set
    ``key_norm.eps = 0`` on one router of an eps > 0 model was not refused: a zero
    embedding patched at that router (or committed for every reader) made every logit NaN
    (600 of 600, kimi / full / cumulative); now refused, naming the norm, at the call and
    in the hook for ``positions=``; at a router whose key norm keeps eps > 0 the patch
    runs, finite. Conversely, an eps-0 model whose key norms were set to 1e-6 was refused
    though finite; now it runs, and only a router with a single source (whose sublayer
    norm reads the zero itself) is refused."""
    model = randomize_routing(tiny_model(attnres_layout=layout)).eval()  # eps 1e-6
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    model.blocks[2].attn_res.key_norm.eps = 0.0
    refused = r"eps = 0 \(blocks\.2\.attn_res\.key_norm; .*0 / 0.*mask_sources"
    for make in (
        lambda: patch_sources(model, "embedding", "zero", routers="attn_res", layers=2),
        lambda: patch_sources(model, "embedding", torch.zeros(model.cfg.d_model)),
        lambda: patch_committed(model, "embedding", "zero"),
    ):
        with pytest.raises(ValueError, match=refused):
            make()
    at_two = patch_sources(model, "embedding", "zero", routers="attn_res", layers=2, positions=1)
    with pytest.raises(ValueError, match=r"eps = 0 \(blocks\.2\.attn_res\.key_norm; .* at 2 real"):
        model.run_with_hooks(tokens, fwd_hooks=at_two)
    elsewhere = patch_sources(model, "embedding", "zero", routers="mlp_res", layers=2)
    assert model.run_with_hooks(tokens, fwd_hooks=elsewhere).isfinite().all()

    zero = HookedAttnRes(eps_zero_config(layout, n_layers=3, num_blocks=2))
    randomize_routing(zero)
    for router in zero.sites():
        zero.router(router).key_norm.eps = 1e-6
    short = tokens[:, :4] % zero.cfg.d_vocab
    later = patch_sources(zero, "embedding", "zero", layers=2)
    assert zero.run_with_hooks(short, fwd_hooks=later).isfinite().all()
    if zero.routing_layout.n_sources(zero.site(0, "attn_res")) == 1:  # kimi, full
        with pytest.raises(ValueError, match=r"eps = 0 \(blocks\.0\.ln1; "):
            patch_sources(zero, "embedding", "zero", routers="attn_res", layers=0)


def _zeroing(model: HookedAttnRes, zeroed: dict) -> list:
    """Plain hooks (not the code under test) writing zeros at ``{hook name: slots}``:
    the slots of a ``hook_sources`` stack, or ``None`` for a whole activation."""

    def make(slots):
        def fn(x: torch.Tensor, hook) -> torch.Tensor:
            x = x.clone()
            if slots is None:
                return torch.zeros_like(x)
            x[..., slots, :] = 0
            return x

        return fn

    return [(name, make(slots)) for name, slots in zeroed.items()]


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative"])
def test_a_patch_that_zeroes_every_source_of_a_router_is_refused_at_its_sublayer_norm(layout):
    """With key norms of eps > 0 the routing logit of a zero source is finite, but a
    router whose every source is zero passes on zero, and a sublayer norm of eps 0
    normalises it: 0 / 0. The rule named that norm only for a router with a single
    source, so in an eps-0 model whose key norms were given eps 1e-6, patching every
    source of a router (`patch_sources`), or committed labels that are all its sources
    (`patch_committed`; in the cumulative layout the embedding alone is both sources of
    the first router, the committed one and the stream), made every logit NaN,
    unrefused (before session 16 every zero was refused in such a model). Refused now,
    naming the norm; each refused patch is NaN when written as plain hooks, and the
    patches that leave one source are finite."""
    model = randomize_routing(HookedAttnRes(eps_zero_config(layout, n_layers=3, num_blocks=2)))
    model.eval()
    for site in model.sites():
        model.router(site).key_norm.eps = 1e-6
    tokens = torch.randint(1, 17, (2, 4), generator=torch.Generator().manual_seed(0))
    site = model.site(1, "attn_res")
    n = model.routing_layout.n_sources(site)
    assert n >= 2
    every = list(range(n))
    plain = model.run_with_hooks(tokens, fwd_hooks=_zeroing(model, {site.hook("sources"): every}))
    assert plain.isnan().all()  # what the refusal keeps from being reported
    with pytest.raises(ValueError, match=r"eps = 0 \(blocks\.1\.ln1; .*mask_sources"):
        patch_sources(model, every, "zero", routers="attn_res", layers=1)
    some = patch_sources(model, every[:-1], "zero", routers="attn_res", layers=1)
    assert model.run_with_hooks(tokens, fwd_hooks=some).isfinite().all()
    at_one = patch_sources(model, every, "zero", routers="attn_res", layers=1, positions=1)
    with pytest.raises(ValueError, match=r"eps = 0 \(blocks\.1\.ln1; .* at 2 real"):
        model.run_with_hooks(tokens, fwd_hooks=at_one)
    if layout == "cumulative":  # the first router reads the embedding twice
        plain = model.run_with_hooks(tokens, fwd_hooks=_zeroing(model, {"hook_embed": None}))
        assert plain.isnan().all()
        with pytest.raises(ValueError, match=r"eps = 0 \(blocks\.0\.ln1; "):
            patch_committed(model, "embedding", "zero")
    else:  # every source of the router right after a commit is a committed source
        after, committed, norm = {
            "kimi": ((2, "attn_res"), ["embedding", "block_1"], r"blocks\.2\.ln1"),
            "full": ((1, "attn_res"), ["embedding", "attn_0", "mlp_0"], r"blocks\.1\.ln1"),
        }[layout]  # kimi's block_1 is the "current" source there
        reader = model.site(*after)
        assert model.routing_layout.n_sources(reader) == len(committed)
        hooks = {model.routing_layout.commit_hooks()[label]: None for label in committed}
        assert model.run_with_hooks(tokens, fwd_hooks=_zeroing(model, hooks)).isnan().all()
        with pytest.raises(ValueError, match=rf"eps = 0 \(.*{norm}"):
            patch_committed(model, committed, "zero")
        for label in committed[1:]:  # one block leaves a source (the embedding is
            # layer 0's attention's single source: refused there, tested above)
            one = patch_committed(model, label, "zero")
            assert model.run_with_hooks(tokens, fwd_hooks=one).isfinite().all()


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative", "recency", "exact"])
def test_held_sources_are_the_sources_a_commit_hook_edit_replaces(layout):
    """`RoutingLayout.held_sources` (what the zero refusals of `patch_committed` count on)
    against the forward pass: adding 1 at a commit hook moves by exactly 1 the sources
    that hold that committed value and no other (a sum with later outputs moves by more),
    and `commit_readers` are the routers with such a source."""
    if layout in ("recency", "exact"):
        model = HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap=layout, num_blocks=2)
        model = model.to(torch.float64)
    else:
        model = randomize_routing(tiny_model(attnres_layout=layout, dtype=torch.float64))
    model.eval()
    routing = model.routing_layout
    tokens = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    _, base = model.run_with_cache(tokens)
    for label, hook in routing.commit_hooks().items():
        with model.hooks(fwd_hooks=[(hook, lambda x, hook: x + 1.0)]):
            _, moved = model.run_with_cache(tokens)
        readers = []
        for site in model.sites():
            step = moved[site.hook("sources")] - base[site.hook("sources")]
            by_one = [
                (step[..., i, :] - 1).abs().max().item() < 1e-9 for i in range(step.shape[-2])
            ]
            assert by_one == [h == label for h in routing.held_sources(site)], (label, site)
            if any(by_one):
                readers.append(site)
        assert routing.commit_readers(label) == readers


@pytest.mark.parametrize("layout", ["kimi", "full"])
def test_set_weights_from_a_padded_cache_at_eps_zero(layout):
    """Property-test finding (session 14): with eps = 0 a padding position's routing
    weights are 0 / 0 (nan) from the first router that reads its zero attention output on,
    in the cache as in the run. `set_weights(model, clean_cache)` of a left-padded batch
    was refused as "must be non-negative and sum to 1", even with the run's own cache.
    The check now reads the real positions (the cache records its padding, and the run
    must have the same): each prompt's real positions equal that prompt patched alone,
    unpadded, with its own clean run's weights; a dict of such weights (no record of
    the padding) is refused, saying that they are nan. Since `padding_eps` the padding
    is finite: a hook writes the nan there (`nan_at_padding`), in every padded run."""
    from hooked_attnres import HookedAttnRes

    model = randomize_routing(HookedAttnRes(eps_zero_config(layout))).eval()
    clean = torch.tensor([[7, 3, 4, 5], [1, 2, 3, 6]])
    corrupted = torch.tensor([[7, 9, 8, 2], [1, 11, 3, 12]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # prompt 0: one left pad
    garbage = nan_at_padding(mask)
    with model.hooks(fwd_hooks=[garbage]):
        _, cache = model.run_with_cache(clean, attention_mask=mask)
    assert cache["blocks.0.mlp_res.hook_weights"][0, 0].isnan().all()  # the nan padding
    patched = model.run_with_hooks(
        corrupted, attention_mask=mask, fwd_hooks=[garbage, *set_weights(model, cache)]
    )
    for row, real in ((0, slice(1, None)), (1, slice(None))):
        _, alone_cache = model.run_with_cache(clean[row : row + 1, real])
        alone = model.run_with_hooks(
            corrupted[row : row + 1, real], fwd_hooks=set_weights(model, alone_cache)
        )
        assert (patched[row, real] - alone[0]).abs().max().item() <= 1e-12
    weights = {site: cache[site.hook("weights")] for site in model.routing_layout.sites()}
    with pytest.raises(ValueError, match=r"sum to 1 \(\d+ of them are nan.*cache itself"):
        set_weights(model, weights, routers=list(weights))
    # a pos_slice cache of the padded run is refused for its slicing (was: the nan message
    # above, which told to pass the cache itself)
    _, sliced = model.run_with_cache(clean, attention_mask=mask, pos_slice=[1, 0, 2, 3])
    with pytest.raises(ValueError, match="were cached with a pos_slice"):
        set_weights(model, sliced)


@pytest.mark.parametrize("layout", ["kimi", "full"])
def test_mean_patches_of_a_padded_batch_at_eps_zero_are_finite(layout):
    """Property-test finding (session 14): with eps = 0 a padding position's sources are
    nan from its first 0 / 0 routing on, and the mean over the real prompts multiplied
    them by 0: nan, so `"mean"` (`patch_sources`, `patch_committed`) made every logit of
    the prompts real at that position nan (silently). Now each real position equals the
    patch with the mean over the prompts real there, computed by hand from the cache.
    Since `padding_eps` the padding is finite: a hook writes the nan there
    (`nan_at_padding`), in every padded run."""
    from hooked_attnres import HookedAttnRes

    cfg = eps_zero_config(layout, n_layers=3, num_blocks=3 if layout == "kimi" else 1)
    model = randomize_routing(HookedAttnRes(cfg)).eval()
    tokens = torch.tensor([[7, 3, 4, 5], [1, 2, 3, 6], [9, 9, 2, 4]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    real = mask.bool()
    garbage = nan_at_padding(mask)
    with model.hooks(fwd_hooks=[garbage]):
        _, cache = model.run_with_cache(tokens, attention_mask=mask)

    def mean_over_real(values):  # [batch, pos, d_model] -> [1, pos, d_model], by hand
        rows = [
            torch.stack([values[b, p] for b in range(len(values)) if real[b, p]]).mean(0)
            for p in range(values.shape[1])
        ]
        return torch.stack(rows)[None]

    site = model.site(2, "attn_res")
    sources = cache[site.hook("sources")]
    label = model.routing_layout.labels(site)[0]
    assert sources[0, 0].isnan().any()  # the padding's nan sources reach this router
    committed_label, name = next(  # the first committed source that is nan at padding
        (lab, n)
        for lab, n in model.routing_layout.commit_hooks().items()
        if cache[n][0, 0].isnan().any()
    )
    for by_mean, by_hand in (
        (
            patch_sources(model, label, "mean", routers=[site]),
            patch_sources(model, label, mean_over_real(sources[..., 0, :]), routers=[site]),
        ),
        (
            patch_committed(model, committed_label, "mean"),
            patch_committed(model, committed_label, mean_over_real(cache[name])),
        ),
    ):
        got = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[garbage, *by_mean])
        expected = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[garbage, *by_hand])
        got, expected = got[real], expected[real]
        assert got.isfinite().all()
        assert (got - expected).abs().max().item() <= 1e-12


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full", "exact"])
def test_zero_patches_at_eps_zero_are_refused_at_real_rows_only(layout):
    """Audit 11: since `padding_eps` a zero source at a padding row of an eps = 0 model is
    finite (eps 1 there), but `patch_sources` / `patch_committed` still refused every zero
    value when the call was made: `"zero"` at positions that are padding in every prompt, a
    value tensor zero only at padding rows or only at positions it does not patch, and a
    block that no router reads (the last snapshot of the cumulative layout). Those now run,
    and their real positions equal an independent computation (the unpatched run, or the
    same patch with a non-zero value at the rows the zero never reached). A source that is
    zero at a real row, where the key norm is still 0 / 0, stays refused when the hook
    runs, counting the rows; so does a value whose squares underflow to 0 (1e-170 in
    float64: its logit was 1e-170 / 0 = inf and every logit nan, not refused)."""
    from helpers import hf_qwen3

    from hooked_attnres import HookedAttnRes

    if layout == "exact":
        qwen = hf_qwen3(rms_norm_eps=0.0)
        model = HookedAttnRes.from_hf_qwen3(qwen, wrap="exact", num_blocks=2, dtype=torch.float64)
    else:
        model = randomize_routing(HookedAttnRes(eps_zero_config(layout, 4, 2))).eval()
    tokens = torch.tensor([[5, 3, 4, 5, 6], [5, 5, 2, 3, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # position 0 is padding in both
    real = mask.bool()
    d_model = model.cfg.d_model
    ones = torch.ones(2, 5, d_model, dtype=torch.float64)
    zero_at_padding = torch.where(real[..., None], ones, 0.0)
    zero_at_0, zero_at_1 = ones.clone(), ones.clone()
    zero_at_0[:, 0] = 0  # position 0 only: padding in both prompts
    zero_at_1[:, 1] = 0  # position 1 only: real in prompt 0

    def run(hooks):
        return model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)[real]

    clean = run([])
    assert patch_sources(model, "older", "zero", layers=0) == []  # no router has it: no-op
    for patch, kwargs in ((patch_sources, dict(sources="embedding", layers=2)),):
        for value, positions, same_as in (
            ("zero", 0, clean),
            (zero_at_padding, None, run(patch(model, value=ones, **kwargs))),
            (zero_at_0, [1, 2, 3, 4], run(patch(model, value=ones, **kwargs))),
        ):
            got = run(patch(model, value=value, positions=positions, **kwargs))
            assert (got - same_as).abs().max().item() <= 1e-12
    assert (
        run(patch_committed(model, "embedding", "zero", positions=0)) - clean
    ).abs().max() <= 1e-12
    assert (
        run(patch_committed(model, "embedding", zero_at_padding))
        - run(patch_committed(model, "embedding", ones))
    ).abs().max() <= 1e-12
    if layout == "cumulative":  # block_2 is committed after the last layer: no router reads it
        assert model.routing_layout.commit_hooks()["block_2"] == "blocks.3.hook_committed_block"
        zeroed = run([("blocks.3.hook_committed_block", lambda x, hook: x * 0)])
        assert (zeroed - clean).abs().max() <= 1e-12
        with pytest.raises(ValueError, match="no router reads it"):  # a no-op, refused
            patch_committed(model, "block_2", "zero")
    # a zero (or underflowing) source at a real row: 0 / 0, refused when the hook runs
    tiny = torch.full((d_model,), 1e-170, dtype=torch.float64)  # 1e-340 squared: 0
    for hooks in (
        patch_sources(model, "embedding", "zero", layers=2, positions=[0, 1]),  # 1 real in row 0
        patch_sources(model, "embedding", zero_at_1, layers=2),
        patch_sources(model, "embedding", tiny, layers=2),
        patch_committed(model, "embedding", "zero", positions=[-1]),
    ):
        with pytest.raises(ValueError, match=r"eps = 0.*zero .* at \d+ real position"):
            run(hooks)


@pytest.mark.parametrize("layout", ["kimi", "cumulative"])
def test_a_patch_whose_mean_square_underflows_is_refused_at_eps_zero(layout):
    """The hook-time check of zero patches at eps 0 tested the sum of squares, but the key
    norm divides it by d_model first (`rms_scale`): a value 3.2e-162 in one of 8 entries
    (float64) has a sum of squares 1e-323 (not 0) and a mean square 0, a scale of 0, and
    its run gave NaN logits unrefused. Refused now, as a zero value is; the same value
    with its mean square above 0 still runs, finite."""
    from hooked_attnres import HookedAttnRes

    model = randomize_routing(HookedAttnRes(eps_zero_config(layout, 4, 2))).eval()
    tokens = torch.tensor([[5, 3, 4, 5, 6]])
    tiny = torch.zeros(model.cfg.d_model, dtype=torch.float64)
    tiny[0] = 3.2e-162
    squares = (tiny**2).sum()
    assert squares > 0 and squares / model.cfg.d_model == 0  # the case: only the mean is 0
    for hooks in (
        patch_sources(model, "embedding", tiny, layers=2),
        patch_committed(model, "embedding", tiny),
    ):
        with pytest.raises(ValueError, match=r"eps = 0.*zero .* at 5 real position"):
            model.run_with_hooks(tokens, fwd_hooks=hooks)
    tiny[0] = 1e-160  # a mean square of 1.25e-321: a scale, finite logits
    logits = model.run_with_hooks(tokens, fwd_hooks=patch_sources(model, "embedding", tiny))
    assert logits.isfinite().all()


def test_a_committed_label_no_router_lists_is_refused_with_where_to_find_it():
    """In a one-layer full model the block committed after the MLP, ``mlp_0``, is read
    only by the final router, as its ``current`` source; no router lists ``mlp_0``. The
    refusal says so, and the two ways to reach it work."""
    model = tiny_model(n_layers=1, attnres_num_blocks=1, attnres_layout="full")
    layout = model.routing_layout
    assert "mlp_0" in layout.commit_hooks()
    assert all("mlp_0" not in layout.labels(site) for site in layout.sites())
    message = r"'mlp_0' is committed, but no router lists it.*final_res reads it as 'current'"
    with pytest.raises(ValueError, match=message):
        mask_sources(model, "mlp_0")
    tokens = torch.zeros(1, 3, dtype=torch.long)
    model.run_with_hooks(tokens, fwd_hooks=mask_sources(model, "current", routers="final_res"))
    model.run_with_hooks(tokens, fwd_hooks=patch_committed(model, "mlp_0"))
    with pytest.raises(ValueError, match="unknown source 'block_99': families are"):
        mask_sources(model, "block_99")  # not committed anywhere: no such note
    # the cumulative layout's block committed after the last layer has no reader at all
    cumulative = tiny_model(n_layers=2, attnres_num_blocks=2, attnres_layout="cumulative")
    assert cumulative.routing_layout.commit_readers("block_2") == []
    with pytest.raises(ValueError, match=r"'block_2' is committed, .*: no router reads it; "):
        mask_sources(cumulative, "block_2")


@pytest.mark.parametrize("mode,label", [("block", "block_2"), ("full", "mlp_1")])
def test_the_last_cumulative_block_refusal_says_where_the_final_stream_is_edited(mode, label):
    """Audit 46: the cumulative layout's block committed after the last layer is read by
    no router (`patch_committed` of it changes nothing); the refusal of it as a source
    said only that, not where the stream it snapshots (what ``ln_final`` reads) is
    edited. It names the hook now, and editing that hook reaches the logits.
    `patch_committed` of the block, a no-op, is refused with the same reason."""
    model = randomize_routing(
        tiny_model(n_layers=2, attnres_num_blocks=2, attnres_layout="cumulative", attnres_mode=mode)
    )
    tokens = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(0))
    message = rf"'{label}' is committed.*no router reads it.*blocks\.1\.hook_resid_post"
    with pytest.raises(ValueError, match=message):
        mask_sources(model, label)
    refused = rf"patch_committed\('{label}'\): no router reads it.*blocks\.1\.hook_resid_post"
    with pytest.raises(ValueError, match=refused):
        patch_committed(model, label)  # it would change nothing (before, accepted)
    commit = model.routing_layout.commit_hooks()[label]
    with torch.no_grad():
        plain = model(tokens)
        unread = model.run_with_hooks(tokens, fwd_hooks=[(commit, lambda x, hook: x * 0)])
        with warnings.catch_warnings():
            # the hook the refusal names: ln_final reads it alone, so no warning that the
            # edit misses what routers read (there was one, audit 48)
            warnings.simplefilter("error", RoutedResidualPatchWarning)
            zeroed = model.run_with_hooks(
                tokens, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: x * 0)]
            )
    assert torch.equal(unread, plain)
    assert zeroed.abs().max() == 0 < plain.abs().max()  # lm_head(ln_final(0)) = 0


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full"])
def test_the_resid_edit_warning_fires_where_routers_read_other_sources(layout):
    """An edit of ``hook_resid_*`` warns that it misses the sources routers read, except
    at the final stream of a layout without a final router (the cumulative layout's last
    ``hook_resid_post``), which ``ln_final`` reads alone: there the edit reaches every
    logit, as zeroing it shows."""
    tokens = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(0))
    zero = lambda x, hook: x * 0  # noqa: E731
    for name in ("blocks.3.hook_resid_post", "blocks.2.hook_resid_post", "blocks.1.hook_resid_pre"):
        model = randomize_routing(tiny_model(attnres_layout=layout))
        silent = layout == "cumulative" and name == "blocks.3.hook_resid_post"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            zeroed = model.run_with_hooks(tokens, fwd_hooks=[(name, zero)])
        warned = any(issubclass(w.category, RoutedResidualPatchWarning) for w in caught)
        assert warned != silent, name
        if silent:  # the edit reached every logit (lm_head(ln_final(0)) = 0)
            assert zeroed.abs().max() == 0


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full", "exact"])
def test_a_key_value_cache_continued_under_other_interventions_is_refused(layout, tokens):
    """Audit 83: a key-value cache filled without an intervention and continued with it
    (or the reverse) mixed a prefix computed one way with a suffix computed another: the
    continuation gave the full pass with the intervention at the new positions only (or at
    the cached ones only; equal to positions=range(...) to 1e-15), silently 0.01-0.6
    logits off the full pass under the hooks attached (float64; kimi 0.50, cumulative
    0.012, full 0.48, exact wrap 0.19 for masking the embedding). Each cache now records
    the interventions that fired in the passes that filled it, and a pass that continues
    it under others is refused (the cache left as it was); the same interventions, also
    an equal ablation rebuilt, continue it exactly."""
    import copy

    from hooked_attnres import KeyValueCache
    from hooked_attnres.interventions import Ablation

    model = routed_or_wrapped(layout)
    layers = range(1, model.cfg.n_layers)
    ablation = Ablation.compile(model, "embedding", layers=layers)
    patch = patch_sources(model, "current", "mean")
    first, rest = tokens[:, :5], tokens[:, 5:]
    for hooks in (ablation.hooks(), patch):
        with model.hooks(fwd_hooks=hooks):
            hooked = model(tokens)
        for prefix_hooks, rest_hooks, message in (
            ([], hooks, "computed without .* which this pass applies"),
            (hooks, [], "computed with .* which this pass does not apply"),
        ):
            cache = KeyValueCache.init_cache(model.cfg)
            with model.hooks(fwd_hooks=prefix_hooks):
                model(first, past_kv_cache=cache)
            with model.hooks(fwd_hooks=rest_hooks):
                with pytest.raises(ValueError, match=message):
                    model(rest, past_kv_cache=cache)
            assert cache.n_past == 5  # left as it was: continued as it was filled, exact
            with model.hooks(fwd_hooks=prefix_hooks):
                continued = model(rest, past_kv_cache=cache)
            expected = hooked if prefix_hooks else model(tokens)
            torch.testing.assert_close(continued, expected[:, 5:], atol=1e-12, rtol=0)
        # a copy of a cache filled under the hooks continues under them
        cache = KeyValueCache.init_cache(model.cfg)
        with model.hooks(fwd_hooks=hooks), torch.no_grad():  # no graph: the cache copies
            model(first, past_kv_cache=cache)
            continued = model(rest, past_kv_cache=copy.deepcopy(cache))
        torch.testing.assert_close(continued, hooked[:, 5:], atol=1e-12, rtol=0)
    # an equal ablation built again (its masks compare equal) continues the cache
    cache = KeyValueCache.init_cache(model.cfg)
    with model.hooks(fwd_hooks=ablation.hooks()):
        model(first, past_kv_cache=cache)
    again = Ablation.compile(model, "embedding", layers=layers).hooks()
    with model.hooks(fwd_hooks=again):
        continued = model(rest, past_kv_cache=cache)
    with model.hooks(fwd_hooks=again):
        torch.testing.assert_close(continued, model(tokens)[:, 5:], atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full", "recency"])
def test_interventions_given_by_name_built_again_continue_a_key_value_cache(layout, tokens):
    """Audit 86: the record of a key-value cache's interventions (audit 83) took every
    `set_weights`, `patch_sources` and `patch_committed` hook built again for another
    intervention, so the TransformerLens habit of writing the hook list inline in each
    call (``fwd_hooks=set_weights(model, "uniform")`` in the prefill and again in the
    continuation) was refused though the hooks are the same. A value given by name
    (``"uniform"``, ``"zero"``, ``"mean"``) now names the intervention, as an ablation's
    masks do: the continuation equals the full pass under the hooks; another name is still
    refused. (A tensor value built again was refused here until audit 107, which compares
    it by its contents: `test_a_tensor_value_built_again_continues_a_key_value_cache`.)"""
    from hooked_attnres import KeyValueCache

    model = routed_or_wrapped(layout)
    builds = [
        lambda: set_weights(model, "uniform", layers=[1]),
        lambda: patch_sources(model, "current", "mean"),
        lambda: patch_committed(model, "embedding", "mean"),
    ]
    first, rest = tokens[:, :5], tokens[:, 5:]
    for build in builds:
        cache = KeyValueCache.init_cache(model.cfg)
        model.run_with_hooks(first, past_kv_cache=cache, fwd_hooks=build())
        continued = model.run_with_hooks(rest, past_kv_cache=cache, fwd_hooks=build())
        expected = model.run_with_hooks(tokens, fwd_hooks=build())
        torch.testing.assert_close(continued, expected[:, 5:], atol=1e-12, rtol=0)
    cache = KeyValueCache.init_cache(model.cfg)
    model.run_with_hooks(
        first, past_kv_cache=cache, fwd_hooks=patch_sources(model, "current", "mean")
    )
    with pytest.raises(ValueError, match="which this pass does not apply"):
        model.run_with_hooks(
            rest, past_kv_cache=cache, fwd_hooks=patch_sources(model, "current", "zero")
        )


def test_a_key_value_cache_under_another_named_value_names_both_values(tokens):
    """Audit 88: a cache filled under ``patch_sources(model, "current", "mean")`` and
    continued under the same call with ``"zero"`` was refused (rightly), but both
    interventions were described alike (``patch_sources('current') at ...``, once as
    applied and once as not), with the note that interventions of one description built
    again count as other ones except those whose value is given by name: as if the same
    intervention were refused. The description shows a value given by name, so the message
    says which value each pass applied, and the note (for tensor values built again) is
    left out."""
    from hooked_attnres import KeyValueCache

    model = routed("kimi", dtype=torch.float64)
    site = model.site(1, "attn_res")
    name = site.hook("sources")
    pairs = [
        (
            lambda value: patch_sources(model, "current", value, routers=[site]),
            f"patch_sources('current', '{{}}') at {name}",
        ),
        (
            lambda value: patch_committed(model, "embedding", value),
            "patch_committed('{}') at hook_embed",
        ),
    ]
    for build, described in pairs:
        cache = KeyValueCache.init_cache(model.cfg)
        model.run_with_hooks(tokens[:, :5], past_kv_cache=cache, fwd_hooks=build("mean"))
        with pytest.raises(ValueError) as error:
            model.run_with_hooks(tokens[:, 5:], past_kv_cache=cache, fwd_hooks=build("zero"))
        message = str(error.value)
        expected = (
            f"computed without {described.format('zero')}, which this pass applies; and with "
            f"{described.format('mean')}, which this pass does not apply: "
        )
        assert expected in message, message
        assert "built again" not in message, message
    n_sources = model.routing_layout.n_sources(site)
    uniform = torch.full((n_sources,), 1.0 / n_sources, dtype=torch.float64)
    cache = KeyValueCache.init_cache(model.cfg)
    model.run_with_hooks(
        tokens[:, :5], past_kv_cache=cache, fwd_hooks=set_weights(model, "uniform", routers=[site])
    )
    weights = site.hook("weights")
    with pytest.raises(
        ValueError, match=rf"with set_weights\('uniform'\) at {re.escape(weights)}, "
    ):
        model.run_with_hooks(
            tokens[:, 5:],
            past_kv_cache=cache,
            fwd_hooks=set_weights(model, uniform, routers=[site]),
        )


def test_a_key_value_cache_under_other_positions_names_them(tokens):
    """Audit 89: a cache filled under an intervention at some positions and continued under
    the same call at all positions (or others) was refused (rightly: its key holds the
    positions), but both were described alike (``patch_sources('current', 'mean') at ...``
    once as applied and once as not, for every kind, ablations too), with the note that
    interventions built again count as other ones except ablations and values given by name:
    as if the same intervention were refused. The description shows positions given."""
    from hooked_attnres import KeyValueCache

    model = routed("kimi", dtype=torch.float64)
    site = model.site(1, "attn_res")
    sources, weights, logits = (site.hook(kind) for kind in ("sources", "weights", "logits"))
    kinds = [
        (
            lambda **kw: patch_sources(model, "current", "mean", routers=[site], **kw),
            f"patch_sources('current', 'mean') at {sources}",
        ),
        (
            lambda **kw: set_weights(model, "uniform", routers=[site], **kw),
            f"set_weights('uniform') at {weights}",
        ),
        (
            lambda **kw: patch_committed(model, "embedding", "zero", **kw),
            "patch_committed('zero') at hook_embed",
        ),
        (
            lambda **kw: mask_sources(model, "current", routers=[site], **kw),
            f"masking 'current' at {logits}",
        ),
    ]
    for build, described in kinds:
        cache = KeyValueCache.init_cache(model.cfg)
        model.run_with_hooks(tokens[:, :5], past_kv_cache=cache, fwd_hooks=build(positions=[0]))
        with pytest.raises(ValueError) as error:
            model.run_with_hooks(tokens[:, 5:], past_kv_cache=cache, fwd_hooks=build())
        message = str(error.value)
        expected = (
            f"computed without {described}, which this pass applies; and with {described} "
            "(positions=[0]), which this pass does not apply: "
        )
        assert expected in message, message
        assert "built again" not in message, message


def test_an_ablation_written_another_way_continues_a_key_value_cache(tokens):
    """Audit 89: an ablation's record compares by its masks and positions, but its
    description (``masking 'current'`` / ``masking ['current']``) took part too, so the same
    masks selected in another spelling were refused as other interventions (two
    descriptions of one mask). The continuation is the full pass with the ablation."""
    from hooked_attnres import KeyValueCache

    model = routed("kimi", dtype=torch.float64)
    site = model.site(1, "attn_res")
    cache = KeyValueCache.init_cache(model.cfg)
    model.run_with_hooks(
        tokens[:, :5], past_kv_cache=cache, fwd_hooks=mask_sources(model, "current", routers=[site])
    )
    got = model.run_with_hooks(
        tokens[:, 5:],
        past_kv_cache=cache,
        fwd_hooks=mask_sources(model, ["current"], routers=[site]),
    )
    full = model.run_with_hooks(tokens, fwd_hooks=mask_sources(model, "current", routers=[site]))
    torch.testing.assert_close(got, full[:, 5:])


def _tensor_interventions(model):
    """``(build, value, changed)`` for every intervention that reads a tensor (a value or a
    mask): ``build(value)`` makes its hooks, ``changed`` is a value with other contents
    (float64 values): patch_sources, patch_committed, set_weights and `mask_hook`."""
    from hooked_attnres.interventions import mask_hook

    site = model.site(2, "attn_res")
    n = model.routing_layout.n_sources(site)
    generator = torch.Generator().manual_seed(3)
    vector = torch.randn(model.cfg.d_model, generator=generator, dtype=torch.float64)
    weights = torch.softmax(torch.randn(n, generator=generator, dtype=torch.float64), -1)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[0] = True
    one_changed = vector.clone()
    one_changed[1] += 0.25
    return [
        (lambda v: patch_sources(model, "current", v, routers=[site]), vector, one_changed),
        (lambda v: patch_committed(model, "embedding", v), vector, one_changed),
        (lambda v: set_weights(model, v, routers=[site]), weights, weights.flip(-1)),
        (lambda v: [mask_hook(site, v)], mask, mask.roll(1)),  # another source masked
    ]


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full"])
def test_a_tensor_value_built_again_continues_a_key_value_cache(layout, tokens, tmp_path):
    """Audit 107: an intervention with a value tensor was keyed by the hook object built,
    so a cache filled under ``patch_sources(..., value=t)`` was refused under
    ``patch_sources(..., value=t.clone())`` (equal contents built again, e.g. the hook list
    written inline in each call), and a cache loaded from a file could not be continued at
    all under it. A value tensor now counts by the contents the hooks read (dtype, shape,
    device, bits): the continuation equals the full pass under the intervention, also for
    a cache saved and loaded (float64)."""
    from hooked_attnres import KeyValueCache

    model = routed(layout, dtype=torch.float64)
    first, rest = tokens[:, :5], tokens[:, 5:]
    for build, value, _ in _tensor_interventions(model):
        full = model.run_with_hooks(tokens, fwd_hooks=build(value))
        cache = KeyValueCache.init_cache(model.cfg)
        model.run_with_hooks(first, past_kv_cache=cache, fwd_hooks=build(value))
        torch.save(cache, tmp_path / "cache.pt")
        again = build(value.clone())
        continued = model.run_with_hooks(rest, past_kv_cache=cache, fwd_hooks=again)
        torch.testing.assert_close(continued, full[:, 5:], atol=1e-12, rtol=0)
        loaded = torch.load(tmp_path / "cache.pt", weights_only=False)
        loaded.mark_filled_by(model)
        continued = model.run_with_hooks(rest, past_kv_cache=loaded, fwd_hooks=again)
        torch.testing.assert_close(continued, full[:, 5:], atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", ["kimi", "cumulative"])
def test_a_tensor_value_of_other_contents_is_refused_by_a_key_value_cache(layout, tokens):
    """Audit 107: a value tensor (or an ablation's mask) edited in place between the pass
    that filled a cache and the pass that continues it, under the same hook list, was
    taken as the same intervention (the key was the hook built): the continuation mixed
    keys computed with the old value and a suffix with the new one, silently (float64,
    max |logit difference| from the full pass under the edited value: patch_sources with
    a vector + 1, 0.15 kimi, 0.094 cumulative; a mask moved to another source 0.30 kimi,
    0.0071 cumulative). The record holds the contents each pass read: a value of other
    contents (one element changed, in place or built again; -0.0 for 0.0) is refused,
    naming the intervention; put back, the cache continues exactly."""
    from hooked_attnres import KeyValueCache

    model = routed(layout, dtype=torch.float64)
    first, rest = tokens[:, :5], tokens[:, 5:]
    for build, value, changed in _tensor_interventions(model):
        value = value.clone()  # edited below
        hooks = build(value)
        at = re.escape(hooks[0][0])
        refused = (
            f"computed without [^;]* at {at}, which this pass applies; and with [^:]* at {at}, "
            "which this pass does not apply .*holds other contents"
        )
        cache = KeyValueCache.init_cache(model.cfg)
        model.run_with_hooks(first, past_kv_cache=cache, fwd_hooks=hooks)
        kept = value.clone()
        with pytest.raises(ValueError, match=refused):  # built again with other contents
            model.run_with_hooks(rest, past_kv_cache=cache, fwd_hooks=build(changed))
        value.copy_(changed)  # the same hooks, their value edited in place
        with pytest.raises(ValueError, match=refused):
            model.run_with_hooks(rest, past_kv_cache=cache, fwd_hooks=hooks)
        value.copy_(kept)  # put back: the contents the cache was filled with
        continued = model.run_with_hooks(rest, past_kv_cache=cache, fwd_hooks=hooks)
        full = model.run_with_hooks(tokens, fwd_hooks=hooks)
        torch.testing.assert_close(continued, full[:, 5:], atol=1e-12, rtol=0)
    # bits, not ==: -0.0 is another value than 0.0
    value = torch.zeros(model.cfg.d_model, dtype=torch.float64)
    value[0] = 1.0
    negative = torch.where(value == 0, -0.0, value)
    assert torch.equal(negative, value)
    cache = KeyValueCache.init_cache(model.cfg)
    hooks = patch_committed(model, "embedding", value)
    model.run_with_hooks(first, past_kv_cache=cache, fwd_hooks=hooks)
    with pytest.raises(ValueError, match="holds other contents"):
        hooks = patch_committed(model, "embedding", negative)
        model.run_with_hooks(rest, past_kv_cache=cache, fwd_hooks=hooks)


@pytest.mark.parametrize(
    "settings",
    [dict(attnres_layout="full"), dict(attnres_layout="cumulative", attnres_mode="full")],
)
def test_a_cache_of_the_same_routing_is_taken_whatever_its_unused_block_count(settings):
    """Audit 95: where ``attnres_num_blocks`` is unused (a block per sublayer; no routers,
    e.g. ``from_hf_qwen3(wrap="none")``, which holds ``min(8, n_layers)``), a cache of one
    model was refused for the same model with another number ("comes from a model with
    layout 'full', 4 layers, 4 blocks, mode 'block' ... this model has ... 2 blocks: its
    sources are not this model's sources"). Taken now: patching it in gives what patching
    the model's own cache gives; and a refused cache names the blocks each model has."""
    model = randomize_routing(tiny_model(**settings, attnres_num_blocks=2)).eval()
    other = HookedAttnRes(model.cfg.replace(attnres_num_blocks=4)).eval()
    other.load_state_dict(model.state_dict())
    clean, corrupted = torch.randint(0, 50, (2, 2, 6))
    own = model.run_with_cache(clean)[1]
    theirs = other.run_with_cache(clean)[1]
    outputs = []
    for cache in (own, theirs):
        hooks = patch_sources(model, "embedding", cache, routers="mlp_res")
        outputs.append(model.run_with_hooks(corrupted, fwd_hooks=hooks))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], model(corrupted))  # the patch changed something
    blocks = HookedAttnRes(model.cfg.replace(attnres_layout="kimi", attnres_mode="block"))
    with pytest.raises(
        ValueError,
        match=rf"comes from a model with layout 'kimi', 4 layers, 2 blocks of 2 layers, "
        rf"d_model 32, but this model has layout '{settings['attnres_layout']}', 4 layers, "
        "a block per sublayer, d_model 32;",
    ):
        patch_sources(model, "embedding", blocks.run_with_cache(clean)[1], routers="mlp_res")
    plain = tiny_model(attnres_layout="none", attnres_num_blocks=2)
    plain_other = HookedAttnRes(plain.cfg.replace(attnres_num_blocks=4))
    assert plain.routing_layout == plain_other.routing_layout


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full"])
def test_a_two_dimensional_mask_or_weights_tensor_is_refused_not_read_as_positions(layout):
    """Audit 110: `mask_hook` (and `set_weights`) documents ``[n_sources]`` and
    ``[batch, 1, n_sources]`` (``[batch, pos, n_sources]`` in a whole-sequence pass), but
    took any shape: a 2-D ``[batch, n_sources]`` mask (one per prompt) broadcast over
    ``[batch, pos, n_sources]`` as ``[pos, n_sources]``, its row ``i`` at position ``i``
    of every prompt. With ``batch == pos`` silently (float64, max |logit difference| from
    the per-prompt masks meant: 0.38 kimi, 0.0086 cumulative, 0.27 full; weights 0.32
    kimi, 0.0067 cumulative, 0.21 full, re-measured in audit 141), otherwise a bare broadcasting
    error. Refused now when built, naming the shapes
    accepted; the per-prompt shape gives each prompt's own mask (checked against each
    prompt run alone)."""
    from hooked_attnres.interventions import mask_hook

    model = routed(layout, dtype=torch.float64)
    site = model.site(2, "attn_res")
    n = model.routing_layout.n_sources(site)
    tokens = torch.randint(0, 50, (3, 3), generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, n, dtype=torch.bool)
    for row in range(3):
        masks[row, row % n] = True  # each prompt masks another source
    accepted = (
        "must be \\[n_sources\\], \\[1, n_sources\\], \\[batch, 1, n_sources\\] or "
        "\\[batch, pos, n_sources\\]"
    )
    for bad in (masks, masks[None, None], torch.tensor(True)):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=f"this ablation's mask {accepted}, got shape {shape}"):
            mask_hook(site, bad)
    with pytest.raises(ValueError, match=r"as \[pos, n_sources\].*mask\[:, None, :\]"):
        mask_hook(site, masks)
    weights = torch.softmax(torch.randn(3, n, dtype=torch.float64), -1)
    with pytest.raises(ValueError, match=f"weights for {re.escape(str(site))} {accepted}"):
        set_weights(model, weights, routers=[site])
    # the documented shapes: one mask per prompt is each prompt's own
    got = model.run_with_hooks(tokens, fwd_hooks=[mask_hook(site, masks[:, None, :])])
    for row in range(3):
        alone = model.run_with_hooks(tokens[row : row + 1], fwd_hooks=[mask_hook(site, masks[row])])
        torch.testing.assert_close(got[row : row + 1], alone, atol=1e-12, rtol=0)
    every = masks[:, None, :].expand(3, 3, n)  # [batch, pos, n_sources]
    torch.testing.assert_close(
        model.run_with_hooks(tokens, fwd_hooks=[mask_hook(site, every)]), got, atol=0, rtol=0
    )
    got = model.run_with_hooks(
        tokens, fwd_hooks=set_weights(model, weights[:, None], routers=[site])
    )
    for row in range(3):
        hooks = set_weights(model, weights[row], routers=[site])
        alone = model.run_with_hooks(tokens[row : row + 1], fwd_hooks=hooks)
        torch.testing.assert_close(got[row : row + 1], alone, atol=1e-12, rtol=0)


def test_a_mask_that_is_not_bool_is_refused_when_built_naming_its_dtype():
    """Audit 115: `mask_hook` documents a bool mask but took any dtype when built; a 0/1
    integer, uint8 or float mask (or a list of ints, which could as well be source
    indices) failed only when the hook ran, with torch's "masked_fill_ only supports
    boolean masks". Refused when built now (and by `mask_logits`), naming the mask, its
    dtype and the remedies; the bool mask it names (``mask == 1``) runs as the bool mask."""
    from hooked_attnres.interventions import mask_hook, mask_logits

    model = routed("kimi", dtype=torch.float64)
    site = model.site(2, "attn_res")
    n = model.routing_layout.n_sources(site)
    tokens = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(0))
    ones = torch.zeros(n, dtype=torch.long)
    ones[0] = 1
    for bad in (ones, ones.to(torch.uint8), ones.double(), ones.tolist(), ones[None, None]):
        dtype = re.escape(str(torch.as_tensor(bad).dtype))
        with pytest.raises(
            TypeError, match=rf"this ablation's mask must be a bool tensor .*got dtype {dtype}"
        ):
            mask_hook(site, bad, positions=[1])
    with pytest.raises(TypeError, match=r"x's mask must be a bool tensor.*mask == 1"):
        mask_logits(torch.zeros(2, 3, n, dtype=torch.float64), ones, "x")
    # independent: the same source masked by name (mask_sources) and by the bool mask
    label = model.routing_layout.labels(site)[0]
    by_name = model.run_with_hooks(tokens, fwd_hooks=mask_sources(model, [label], routers=[site]))
    got = model.run_with_hooks(tokens, fwd_hooks=[mask_hook(site, ones == 1)])
    torch.testing.assert_close(got, by_name, atol=0, rtol=0)


def test_mask_logits_refuses_a_mask_with_extra_leading_axes_naming_the_shapes_accepted():
    """Audit 147: `mask_logits` broadcast a mask with more axes than ``[batch, pos,
    n_sources]`` (e.g. ``[1, 1, 1, n]`` or ``[5, batch, pos, n]``), returning logits of
    more axes than the router's, silently; a 2-D ``[batch, n]`` was read as ``[pos, n]``
    where batch == pos. It takes `mask_hook`'s shapes now (`check_axes`), refusing another
    number of axes naming them; the shapes accepted give torch's own masked_fill."""
    from hooked_attnres.interventions import mask_logits

    n = 4
    logits = torch.randn(3, 3, n, generator=torch.Generator().manual_seed(0))
    accepted = r"\[n_sources\], \[1, n_sources\], \[batch, 1, n_sources\] or \[batch, pos"
    for shape in ((1, 1, 1, n), (5, 3, 3, n), (3, n)):
        bad = torch.zeros(shape, dtype=torch.bool)
        bad[..., 0] = True
        with pytest.raises(ValueError, match=rf"probe's mask must be {accepted}.*{shape[0]}"):
            mask_logits(logits, bad, "probe")
    for shape in ((n,), (1, n), (3, 1, n), (3, 3, n)):
        where = torch.zeros(shape, dtype=torch.bool)
        where[..., 1] = True
        expected = torch.where(where.expand(3, 3, n), float("-inf"), logits)
        torch.testing.assert_close(mask_logits(logits, where, "probe"), expected)


def test_mask_logits_refuses_a_mask_longer_than_the_logits_on_an_axis_they_have_of_one():
    """Audit 152: a mask of an accepted shape whose batch or position axis is longer than
    the logits' axis of size 1 (``[3, 1, n]`` masks for one prompt's ``[1, pos, n]``,
    ``[1, 4, n]`` for one position's ``[1, 1, n]``) broadcast the result to more rows or
    positions than the logits have (``[3, pos, n]``), silently; `check_broadcast` ran only
    when torch refused. Refused naming both shapes; a mask that broadcasts to the logits
    still gives torch's own masked_fill of them."""
    from hooked_attnres.interventions import mask_logits

    n = 4
    generator = torch.Generator().manual_seed(0)
    for logits_shape, mask_shape in (((1, 5, n), (3, 1, n)), ((1, 1, n), (1, 4, n))):
        logits = torch.randn(logits_shape, generator=generator)
        where = torch.zeros(mask_shape, dtype=torch.bool)
        where[..., 0] = True
        message = rf"probe's mask .*{re.escape(str(mask_shape))} does not broadcast to .*" + (
            re.escape(str(logits_shape))
        )
        with pytest.raises(ValueError, match=message):
            mask_logits(logits, where, "probe")
    logits = torch.randn(3, 5, n, generator=generator)
    where = torch.rand(3, 1, n, generator=generator) < 0.5
    where[..., 0] = False
    expected = torch.where(where.expand(3, 5, n), float("-inf"), logits)
    torch.testing.assert_close(mask_logits(logits, where, "probe"), expected)


def test_a_list_mask_that_is_not_bool_is_told_a_remedy_that_works_for_a_list():
    """Audit 120: a list of 0/1 ints was told "for a 0/1 mask give mask == 1", but a list
    compared with 1 is the Python bool ``False``, refused as a mask of shape ``()``. The
    message names the list's remedy, ``torch.tensor(mask) == 1``, and that mask runs as
    the same source masked by name (independent: `mask_sources`)."""
    from hooked_attnres.interventions import mask_hook

    model = routed("kimi", dtype=torch.float64)
    site = model.site(2, "attn_res")
    n = model.routing_layout.n_sources(site)
    tokens = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(0))
    mask = [1] + [0] * (n - 1)
    with pytest.raises(TypeError, match=r"got dtype torch.int64.*torch\.tensor\(mask\) == 1"):
        mask_hook(site, mask)
    label = model.routing_layout.labels(site)[0]
    by_name = model.run_with_hooks(tokens, fwd_hooks=mask_sources(model, [label], routers=[site]))
    got = model.run_with_hooks(tokens, fwd_hooks=[mask_hook(site, torch.tensor(mask) == 1)])
    torch.testing.assert_close(got, by_name, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full"])
def test_a_mask_or_weights_of_one_row_over_sources_is_taken_as_every_prompts(layout):
    """Audit 113: a 2-D tensor whose first axis is 1 (``[1, n_sources]``, e.g. a single
    prompt's ``clean_cache[name][:, -1]``) reads alike as one prompt's and as one
    position's (both broadcast to every prompt and position) and was exact before audit
    110, which refused it with the ambiguous ``[batch, n_sources]``. Taken again: equal
    to the ``[n_sources]`` tensor's run (mask_hook, set_weights by tensor and by dict);
    a 2-D tensor of more rows stays refused, naming both remedies."""
    from hooked_attnres.interventions import mask_hook

    model = routed(layout, dtype=torch.float64)
    site = model.site(2, "attn_res")
    n = model.routing_layout.n_sources(site)
    tokens = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[-1] = True
    weights = torch.softmax(torch.randn(n, dtype=torch.float64), -1)
    for one_row, flat in (
        ([mask_hook(site, mask[None])], [mask_hook(site, mask)]),
        (set_weights(model, weights[None], routers=[site]), set_weights(model, weights, [site])),
        (
            set_weights(model, {site: weights[None]}, [site]),
            set_weights(model, {site: weights}, [site]),
        ),
    ):
        torch.testing.assert_close(
            model.run_with_hooks(tokens, fwd_hooks=one_row),
            model.run_with_hooks(tokens, fwd_hooks=flat),
            atol=0,
            rtol=0,
        )
    # the masked source is masked: its weight is exactly 0 at every prompt and position
    assert (
        weights_under(model, tokens, [mask_hook(site, mask[None])])[site.hook("weights")][..., -1]
        == 0
    ).all()
    # the remedy names set_weights' argument (it said ``mask[:, None, :]`` until review 132)
    remedy = r"got shape \(2, .*tensor\[:, None, :\], e\.g\. weights\[:, None, :\].*tensor\[None\]"
    with pytest.raises(ValueError, match=remedy):
        set_weights(model, torch.stack([weights, weights]), routers=[site])
    with pytest.raises(ValueError, match=remedy):
        set_weights(model, {site: torch.stack([weights, weights])}, routers=[site])


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full", "recency", "exact"])
def test_a_value_of_one_row_per_prompt_is_refused_as_it_reads_as_one_per_position(layout):
    """Audit 128: `patch_sources` / `patch_committed` took any value tensor that
    broadcasts to ``[batch, pos, d_model]``, so a 2-D ``[batch, d_model]`` (one value per
    prompt) was read as ``[pos, d_model]``, its row ``i`` at position ``i`` of every
    prompt: silently where batch == pos (float64, max |logit difference| from the
    per-prompt values meant, this test's models and prompts, kimi / cumulative / full /
    recency / exact: patch_sources 0.47 / 0.11 / 0.42 / 0.25 / 0.23, patch_committed
    0.48 / 0.48 / 0.48 / 0.38 / 0.38),
    otherwise a broadcasting error when the hook ran. Refused now when built, by the rule
    of `mask_hook` / `set_weights` (`check_axes`), naming the shapes accepted and
    both remedies; ``[1, d_model]`` is taken as ``[d_model]``; the per-prompt shape gives
    each prompt's own value (each prompt run alone), the per-position shape each
    position's (one patch per position, `positions=`)."""
    model = routed_or_wrapped(layout)
    d_model = model.cfg.d_model
    site = model.site(1, "attn_res")
    tokens = torch.randint(0, 50, (3, 3), generator=torch.Generator().manual_seed(0))
    values = torch.randn(
        3, d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    accepted = (
        r"must be a scalar, \[d_model\], \[1, d_model\], \[batch, 1, d_model\] or "
        r"\[batch, pos, d_model\]"
    )
    for patch in (
        lambda value, positions=None: patch_sources(
            model, "embedding", value, routers=[site], positions=positions
        ),
        lambda value, positions=None: patch_committed(model, "embedding", value, positions),
    ):
        for bad in (values, values[:, :1]):  # [batch, d_model] and [batch, 1]
            with pytest.raises(
                ValueError,
                match=rf"{accepted}, got shape {re.escape(str(tuple(bad.shape)))}"
                r".*as \[pos, d_model\].*\[batch, 1, d_model\], .*value\[:, None, :\]"
                r".*\[1, pos, d_model\], tensor\[None\]",
            ):
                patch(bad)
        torch.testing.assert_close(
            model.run_with_hooks(tokens, fwd_hooks=patch(values[:1])),
            model.run_with_hooks(tokens, fwd_hooks=patch(values[0])),
            atol=0,
            rtol=0,
        )
        per_prompt = model.run_with_hooks(tokens, fwd_hooks=patch(values[:, None, :]))
        for row in range(3):
            alone = model.run_with_hooks(tokens[row : row + 1], fwd_hooks=patch(values[row]))
            torch.testing.assert_close(per_prompt[row : row + 1], alone, atol=1e-12, rtol=0)
        one_per_position = [hook for p in range(3) for hook in patch(values[p], positions=[p])]
        torch.testing.assert_close(
            model.run_with_hooks(tokens, fwd_hooks=patch(values[None])),  # [1, pos, d_model]
            model.run_with_hooks(tokens, fwd_hooks=one_per_position),
            atol=1e-12,
            rtol=0,
        )
    # the one resolver of both, public: the same rule
    with pytest.raises(ValueError, match=rf"patching at here: a value tensor {accepted}"):
        resolve_value(values, torch.zeros(3, 3, d_model), lambda cache: cache["x"], "here")


def test_bands_without_band_names_in_layers_are_refused_not_ignored(tokens):
    """Audit 138: ``bands`` is read only for the band names in ``layers``, so
    ``mask_sources(model, "embedding", bands={"early": [0]})`` masked the embedding at every
    layer (0.012 off the intended layer-0 ablation on logits of 0.36, a 4-layer cumulative
    model), and ``layers=[1]`` with ``bands`` ignored them too; a list of layer lists as
    ``bands`` failed with "'list' object has no attribute 'items'"."""
    model = tiny_model()
    with pytest.raises(ValueError, match=r"bands=\{'early': \[0\]\} .*layers=None names none"):
        mask_sources(model, "embedding", bands={"early": [0]})
    with pytest.raises(ValueError, match=r"but layers=\[1\] names none, so bands would be ign"):
        set_weights(model, torch.ones(3) / 3, layers=[1], bands={"early": [0]})
    with pytest.raises(ValueError, match=r"^bands must be a dict of band name -> layers"):
        mask_sources(model, "embedding", layers="early", bands=[[0], [1]])
    # the control: band names in layers read the custom bands
    assert select_sites(model, layers="x", bands={"x": [1]}) == select_sites(model, layers=[1])


def _kimi_answer_batch(seed: int):
    """A float64 kimi model with random routing, and 6 random prompts of 5 tokens as a
    `TaskBatch` answered at the last position: ``(model, tokens, batch)``."""
    from hooked_attnres.tasks.base import TaskBatch

    model = randomize_routing(tiny_model(attnres_layout="kimi", dtype=torch.float64)).eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(50, (6, 5), generator=generator)
    answer = torch.randint(50, (6,), generator=generator)
    targets = torch.full((6, 5), -100)
    targets[:, -1] = answer
    batch = TaskBatch(tokens, torch.full((6,), 4), answer, (answer + 1) % 50, tokens, targets)
    return model, tokens, batch


def test_analyses_refuse_chunks_under_an_attached_mean_patch():
    """A `patch_committed` / `patch_sources` hook with ``value="mean"`` averages over the
    prompts of its pass. Attached around an analysis that runs the batch in chunks, each
    chunk was patched with the mean of its own prompts (audit 163: `run_ablations`' clean
    logit differences 0.35 off the whole batch's run under the hook with ``chunk=2``, 6
    prompts, tiny kimi model, float64): refused. In one pass (``chunk`` >= the prompts)
    the clean values are the full pass's under the hook."""
    from hooked_attnres.analysis import (
        attribute_routing,
        plan_ablations,
        routing_mass,
        run_ablations,
    )

    model, tokens, batch = _kimi_answer_batch(seed=0)
    plan = plan_ablations(model)
    for hooks in (
        patch_committed(model, "embedding", "mean"),
        patch_sources(model, "embedding", "mean", layers=1),
    ):
        with model.hooks(fwd_hooks=hooks):
            expected = batch.logit_diff(model(tokens)).detach().numpy()
            clean, _ = run_ablations(model, batch, plan, chunk=6, progress=False)
            assert abs(clean["logit_diff"] - expected).max() <= 1e-12
            message = "passes of chunk=2, but an intervention with value='mean' is attached"
            with pytest.raises(ValueError, match=message):
                run_ablations(model, batch, plan, chunk=2, progress=False)
            with pytest.raises(ValueError, match=message):
                routing_mass(model, batch, chunk=2)
            with pytest.raises(ValueError, match=message):
                attribute_routing(model, batch, chunk=2, progress=False)


def test_the_chunked_mean_refusal_names_a_tensor_that_reproduces_the_batch_mean():
    """The refusal of a chunked analysis under ``value="mean"`` offers a tensor instead.
    Followed as written it must reproduce the whole batch's ``"mean"``, for
    `patch_sources` too, whose ``hook_sources`` is ``[batch, pos, n_sources, d_model]``:
    review of audit 163: the message said ``cache[name].mean(0, keepdim=True)``, which for
    `patch_sources` is ``[1, pos, n_sources, d_model]``, a value `patch_sources` refuses."""
    from hooked_attnres.analysis import plan_ablations, run_ablations

    model, tokens, batch = _kimi_answer_batch(seed=1)
    plan = plan_ablations(model)[:3]
    site = model.site(1, "attn_res")
    index = model.source_labels(site).index("embedding")
    _, cache = model.run_with_cache(tokens)  # a run of the whole batch
    for patch, recipe in (
        (lambda value: patch_committed(model, "embedding", value), "cache[hook].mean(0"),
        (
            lambda value: patch_sources(model, "embedding", value, routers=[site]),
            "cache[hook][:, :, i].mean(0",
        ),
    ):
        hooks = patch("mean")
        with model.hooks(fwd_hooks=hooks):
            want = run_ablations(model, batch, plan, chunk=6, progress=False)
            with pytest.raises(ValueError, match=re.escape(recipe)):
                run_ablations(model, batch, plan, chunk=2, progress=False)
        (name,) = [name for name, _ in hooks]
        value = cache[name]
        if value.ndim == 4:  # patch_sources: source i of that router
            value = value[:, :, index]
        with model.hooks(fwd_hooks=patch(value.mean(0, keepdim=True))):
            got = run_ablations(model, batch, plan, chunk=2, progress=False)
        for part in (0, 1):
            assert abs(got[part]["logit_diff"] - want[part]["logit_diff"]).max() <= 1e-12


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full", "recency", "exact"])
def test_python_number_values_are_taken_at_python_precision(layout):
    """A value or weights given as Python numbers (a float, a list or a tuple of floats,
    which are float64) is what the hook writes in a float64 model, to the bit, as the same
    numbers given as a float64 tensor are (audit 183: ``torch.as_tensor`` read them as
    float32, so ``0.1`` was written as 0.100000001490116 and a ``[d_model]`` list of
    random floats was 3e-9 off in the logits of the reference test's models)."""
    model = routed_or_wrapped(layout)
    tokens = torch.tensor([[1, 5, 2, 7], [3, 3, 9, 4]])
    layout_ = model.routing_layout
    site = next(s for s in model.sites() if layout_.n_sources(s) >= 3)
    n_sources, d_model = layout_.n_sources(site), model.cfg.d_model
    vector = [0.1 * (i + 1) / 3 for i in range(d_model)]  # no float32 holds these
    weights = [0.1, 0.2] + [0.7 / (n_sources - 2)] * (n_sources - 2)
    label = next(label for label in layout_.commit_hooks() if layout_.commit_readers(label))
    commit = commit_hook_name(model, label)
    cases = [
        (patch_sources(model, 0, vector, routers=[site]), site.hook("sources"), vector, 0),
        (patch_sources(model, 0, tuple(vector), routers=[site]), site.hook("sources"), vector, 0),
        (patch_sources(model, 0, 0.1, routers=[site]), site.hook("sources"), [0.1] * d_model, 0),
        (patch_committed(model, label, vector), commit, vector, None),
        (patch_committed(model, label, 0.1), commit, [0.1] * d_model, None),
        (set_weights(model, weights, routers=[site]), site.hook("weights"), weights, None),
        (set_weights(model, {site: weights}, routers=[site]), site.hook("weights"), weights, None),
    ]
    for hooks, name, numbers, source in cases:
        with model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(tokens, names_filter=name)
        written = cache[name] if source is None else cache[name][:, :, source]
        expected = torch.tensor(numbers, dtype=torch.float64).expand_as(written)
        assert written.dtype == torch.float64
        assert torch.equal(written, expected), (name, (written - expected).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_python_number_values_write_the_bits_of_before_below_float64(dtype):
    """Below float64 the float64 reading of Python numbers (audit 183) writes the bits the
    float32 reading wrote: torch casts float64 to bfloat16 / float16 through float32 (so
    ``1 + 2**-8 + 2**-30``, a bfloat16 tie once in float32, is written as 1.0 both ways,
    not as the correctly rounded 1.0078125), and float64 to float32 rounds once. No stored
    or tested number of a float32 / bfloat16 / float16 model moves (audit 186)."""
    model = routed("kimi", dtype=dtype)
    tokens = torch.tensor([[1, 5, 2, 7], [3, 3, 9, 4]])
    layout = model.routing_layout
    site = next(s for s in model.sites() if layout.n_sources(s) >= 3)
    n_sources, d_model = layout.n_sources(site), model.cfg.d_model
    ties = [1 + 2**-8 + 2**-30, 1 + 2**-11 + 2**-40]  # bfloat16 / float16 ties in float32
    vector = [ties[i % 2] if i < 4 else 0.1 * (i + 1) / 3 for i in range(d_model)]
    weights = [0.1, 0.2] + [0.7 / (n_sources - 2)] * (n_sources - 2)
    cases = [
        (patch_sources(model, 0, vector, routers=[site]), site.hook("sources"), vector, 0),
        (patch_committed(model, "embedding", vector), "hook_embed", vector, None),
        (set_weights(model, weights, routers=[site]), site.hook("weights"), weights, None),
    ]
    for hooks, name, numbers, source in cases:
        with model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(tokens, names_filter=name)
        written = cache[name] if source is None else cache[name][:, :, source]
        before = torch.tensor(numbers, dtype=torch.float32).to(written.dtype)
        assert torch.equal(written, before.expand_as(written)), name


def test_a_slice_or_a_bool_mask_as_positions_is_refused_naming_the_indices_to_give():
    """``positions=`` takes integer positions; a slice and a bool mask over positions are
    refused when the intervention is built (and by `routing_mass`, which shares the rule),
    and the message says what to give instead, a conversion that runs on what was given
    and gives the positions it marks: the slice's, ``list(range(n_pos))[s]``, or the
    mask's, ``torch.as_tensor(mask).nonzero().flatten().tolist()`` (audit 183: refused as
    "must be integers" without the conversion; audit 186: the conversion given,
    ``torch.nonzero(mask)``, raised TypeError on a list or a NumPy mask). A 2-d bool
    mask marks positions per prompt: the 1-d conversion would interleave prompt and
    position indices ([0, 0, 0, 2, 1, 1, ...] for a [2, 4] mask), so it is not offered
    there; the message says every prompt takes the same positions."""
    from hooked_attnres.analysis import routing_mass

    model = routed("kimi")
    n_pos = 4
    tokens = torch.tensor([[1, 5, 2, 7], [3, 3, 9, 4]])
    one_d = (
        (slice(1, 3), [1, 2]),
        (slice(-2, None), [2, 3]),
        (slice(None, None, -2), [3, 1]),
        ([True, False, True, False], [0, 2]),
        (np.array([False, True, True, False]), [1, 2]),
        (torch.tensor([False, True, False, True]), [1, 3]),
    )
    advised = re.compile(r"list\(range\(n_pos\)\)\[[^]]*\]|torch\.as_tensor\(mask\)[^,]*")
    builders = (
        lambda p: mask_sources(model, "embedding", layers=[1], positions=p),
        lambda p: patch_committed(model, "embedding", "mean", positions=p),
        lambda p: set_weights(model, "uniform", positions=p),
        lambda p: routing_mass(model, tokens, positions=p),
    )
    for positions, marked in one_d:
        for build in builders:
            with pytest.raises(ValueError, match="must be integers") as error:
                build(positions)
            message = str(error.value)
            advice = advised.search(message)
            assert advice is not None, message
            scope = {"torch": torch, "n_pos": n_pos, "mask": positions}
            assert eval(advice.group(0), scope) == marked, message  # the advice runs
    per_prompt = torch.tensor([[True, False, True, False], [False, True, True, True]])
    for build in builders:
        with pytest.raises(ValueError, match="must be integers") as error:
            build(per_prompt)
        message = str(error.value)
        assert "shape (2, 4) marks positions per prompt" in message, message
        assert "every prompt" in message and "1-d [pos] mask" in message, message


def test_routing_interventions_in_layout_none_name_the_hooks_to_edit_instead():
    """Layout ``none`` has no routers: every routing intervention refuses it when built,
    saying so and naming what edits its one residual stream instead, its TransformerLens
    hooks with ``run_with_hooks`` (audit 183: the message said why, not what to use)."""
    model = tiny_model(attnres_layout="none")
    for build in (
        lambda: mask_sources(model, "embedding"),
        lambda: set_weights(model, "uniform"),
        lambda: patch_sources(model, "embedding"),
        lambda: patch_committed(model, "embedding"),
        lambda: select_sites(model),
        lambda: commit_hook_name(model, "embedding"),
    ):
        with pytest.raises(ValueError, match="attnres_layout='none' and therefore no routers") as e:
            build()
        for name in ("hook_embed", "hook_resid_pre", "run_with_hooks"):
            assert name in str(e.value), str(e.value)


def test_set_weights_refuses_complex_weights():
    """Routing weights are real: complex ones (a Python list holding ``0.5 + 0.5j``, or a
    complex tensor) are refused when the intervention is built, ``TypeError`` naming the
    dtype (audit 186: ``.float()`` dropped the imaginary part with a UserWarning only, so
    ``[0.5 + 0.5j, 0.5, 0, ...]`` was applied as ``[0.5, 0.5, 0, ...]``), as a patching
    value's complex tensor is."""
    model = routed("kimi", dtype=torch.float64)
    site = next(s for s in model.sites() if model.routing_layout.n_sources(s) >= 3)
    n_sources = model.routing_layout.n_sources(site)
    given = [0.5 + 0.5j, 0.5] + [0.0] * (n_sources - 2)
    for weights in (given, torch.tensor(given), {site: given}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the UserWarning was all there was
            refused = rf"weights for {re.escape(str(site))} must be real"
            with pytest.raises(TypeError, match=refused):
                set_weights(model, weights, routers=[site])
