"""Routing interventions: mask-and-renormalise, setting weights, source patching, selection."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize_routing, tiny_model
from hooked_attnres.interventions import (
    commit_hook_name,
    depth_bands,
    mask_sources,
    patch_committed,
    patch_sources,
    resolve_routers,
    resolve_sources,
    set_weights,
)


def routed(layout: str, **overrides):
    return randomize_routing(tiny_model(attnres_layout=layout, attnres_recency_bias=0.5, **overrides)).eval()


def weights_under(model, tokens, hooks) -> dict[str, torch.Tensor]:
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_weights"))
    return dict(cache.items())


@pytest.mark.parametrize("sources", ["embedding", "older", "current", ["embedding", "prev_completed"], 0])
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
    masked = weights_under(model, tokens, mask_sources(model, "embedding", layers=3, positions=[2, 5]))[name]
    assert (masked[:, [2, 5], 0] == 0).all()
    others = [p for p in range(tokens.shape[1]) if p not in (2, 5)]
    assert torch.equal(masked[:, others], clean[:, others])


def test_masking_a_source_of_zero_weight_changes_nothing(tokens):
    model = routed("cumulative")
    # give the embedding source zero weight at layer 3's MLP router, then mask it there
    zero_embedding = weights_under(model, tokens, [])["blocks.3.mlp_res.hook_weights"][0, 0].clone()
    zero_embedding[0] = 0.0
    zero_embedding /= zero_embedding.sum()
    base = set_weights(model, zero_embedding, routers="mlp_res", layers=3)
    before = model.run_with_hooks(tokens, fwd_hooks=base)
    after = model.run_with_hooks(tokens, fwd_hooks=mask_sources(model, "embedding", routers="mlp_res",
                                                                layers=3) + base)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_masking_every_source_of_a_router_is_refused(tokens):
    model = routed("cumulative")
    with pytest.raises(ValueError, match="would mask all"):
        mask_sources(model, ["embedding", "older", "prev_completed", "current"], routers="attn_res", layers=3)
    kimi = routed("kimi")
    with pytest.raises(ValueError, match="would mask all 1 of its sources"):
        mask_sources(kimi, "embedding", routers="attn_res", layers=0)


def test_set_weights_uniform_and_patching_another_runs_weights(tokens):
    model = routed("kimi")
    uniform = weights_under(model, tokens, set_weights(model, "uniform", routers=["attn_res", "final_res"]))
    for name, w in uniform.items():
        if "mlp_res" not in name:
            assert torch.allclose(w, torch.full_like(w, 1 / w.shape[-1]))
    other = tokens.flip(0)
    _, other_cache = model.run_with_cache(other)
    patched = weights_under(model, tokens, set_weights(model, other_cache, routers=["attn_res", "mlp_res", "final_res"]))
    for name, w in patched.items():
        assert torch.equal(w, other_cache[name]), name


def test_patching_a_runs_own_weights_and_sources_is_a_no_op(routed_layout, tokens):
    model = routed(routed_layout)
    clean, cache = model.run_with_cache(tokens)
    for hooks in (set_weights(model, cache), patch_sources(model, ["embedding", "older", "current"], cache),
                  patch_committed(model, ["embedding"], cache)):
        torch.testing.assert_close(model.run_with_hooks(tokens, fwd_hooks=hooks), clean, atol=1e-6, rtol=0)


def test_local_patching_touches_one_router_and_global_patching_every_reader(tokens):
    model = routed("cumulative", n_layers=6, attnres_num_blocks=3)
    _, clean = model.run_with_cache(tokens)
    # local: zero block_1 as layer 4's attention router sees it
    with model.hooks(fwd_hooks=patch_sources(model, "block_1", "zero", routers="attn_res", layers=4)):
        _, local = model.run_with_cache(tokens)
    slot = model.source_labels(4, "attn_res").index("block_1")
    assert (local["blocks.4.attn_res.hook_sources"][..., slot, :] == 0).all()
    assert not torch.equal(local["blocks.4.attn_res.hook_out"], clean["blocks.4.attn_res.hook_out"])
    assert torch.equal(local["blocks.3.mlp_res.hook_out"], clean["blocks.3.mlp_res.hook_out"])  # earlier
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


@pytest.mark.parametrize("call, message", [
    (lambda m: mask_sources(m, "embedding", routers="bogus_res"), "unknown router"),
    (lambda m: mask_sources(m, "embedding", layers=9), "not in"),
    (lambda m: mask_sources(m, "embedding", layers="deep"), "unknown depth band"),
    (lambda m: mask_sources(m, "newest"), "unknown source 'newest'"),
    (lambda m: mask_sources(m, 17, layers=3), "out of range"),
    (lambda m: mask_sources(m, "embedding", routers="final_res"), "no final router"),
    (lambda m: set_weights(m, "triangular"), "uniform"),
    (lambda m: set_weights(m, torch.tensor([0.5, 0.6, -0.1]), routers="attn_res", layers=3), "non-negative and sum to 1"),
    (lambda m: set_weights(m, torch.ones(7) / 7, routers="attn_res", layers=3), "sources"),
    (lambda m: patch_committed(m, "current"), "not a committed source"),
])
def test_bad_selections_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call(routed("cumulative"))


def test_layout_none_has_no_routers():
    with pytest.raises(ValueError, match="no routers"):
        resolve_routers(tiny_model(attnres_layout="none"))


def test_depth_bands():
    assert depth_bands(8) == {"early": [0, 1, 2], "middle": [3, 4, 5], "late": [6, 7]}
    assert depth_bands(28)["late"] == list(range(19, 28))
    assert depth_bands(8, {"first": (0, 2), "last": [7], "odd": range(1, 8, 2)}) == {
        "first": [0, 1], "last": [7], "odd": [1, 3, 5, 7]}
    with pytest.raises(ValueError, match="empty"):
        depth_bands(8, {"none": []})
    with pytest.raises(ValueError, match="not in"):
        depth_bands(8, {"beyond": [8]})
