"""Property tests (hypothesis) over random small configurations."""

from __future__ import annotations

import math

import torch
from helpers import randomize_routing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hooked_attnres import HookedAttnRes, HookedAttnResConfig

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw, layouts=("cumulative", "kimi", "full")):
    n_layers = draw(st.integers(1, 6))
    n_kv = draw(st.sampled_from([1, 2]))
    layout = draw(st.sampled_from(layouts))
    mode = draw(st.sampled_from(["block", "full"])) if layout == "cumulative" else "block"
    return HookedAttnResConfig(
        d_model=16,
        n_layers=n_layers,
        n_heads=2 * n_kv,
        n_key_value_heads=n_kv,
        d_head=4,
        d_mlp=24,
        d_vocab=30,
        n_ctx=16,
        attnres_layout=layout,
        attnres_mode=mode,
        attnres_num_blocks=draw(st.integers(1, n_layers)),
        attnres_recency_bias=draw(st.one_of(st.none(), st.floats(-4, 4))),
        seed=draw(st.integers(0, 10_000)),
    )


def _tokens(seed: int, batch: int = 2, pos: int = 5) -> torch.Tensor:
    return torch.randint(0, 30, (batch, pos), generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(cfg=configs(), scale=st.floats(0.0, 5.0), seed=st.integers(0, 1000))
def test_routing_weights_are_a_distribution_and_the_softmax_of_logits(cfg, scale, seed):
    model = randomize_routing(HookedAttnRes(cfg), seed=seed, scale=scale)
    _, cache = model.run_with_cache(_tokens(seed))
    for layer, router in model.routers():
        prefix = "final_res" if layer is None else f"blocks.{layer}.{router}"
        weights = cache[f"{prefix}.hook_weights"]
        assert torch.isfinite(weights).all()
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.allclose(weights, cache[f"{prefix}.hook_logits"].softmax(-1), atol=1e-6)
        n = weights.shape[-1]
        assert (
            cache[f"{prefix}.hook_sources"].shape[-2]
            == n
            == len(model.source_labels(layer, router))
        )
        families = model.source_families(layer, router)
        assert sorted(i for idx in families.values() for i in idx) == list(range(n))


@SETTINGS
@given(cfg=configs())
def test_routed_input_is_a_convex_combination_of_sources(cfg):
    model = randomize_routing(HookedAttnRes(cfg), scale=2.0)
    _, cache = model.run_with_cache(_tokens(cfg.seed))
    for layer, router in model.routers():
        prefix = "final_res" if layer is None else f"blocks.{layer}.{router}"
        sources, out = cache[f"{prefix}.hook_sources"], cache[f"{prefix}.hook_out"]
        weights = cache[f"{prefix}.hook_weights"]
        assert torch.allclose(out, (weights[..., None] * sources).sum(-2), atol=1e-5)


@SETTINGS
@given(cfg=configs(), layer_fraction=st.floats(0, 1))
def test_stop_then_start_equals_one_pass(cfg, layer_fraction):
    model = randomize_routing(HookedAttnRes(cfg), scale=1.0)
    tokens = _tokens(cfg.seed)
    layer = round(layer_fraction * cfg.n_layers)
    state = model(tokens, stop_at_layer=layer)
    assert torch.allclose(model(state, start_at_layer=layer), model(tokens), atol=1e-5)


@SETTINGS
@given(cfg=configs(layouts=("kimi", "full")), n_layers=st.integers(1, 5))
def test_zero_query_partial_sum_layouts_equal_plain_residual_when_eps_is_zero(cfg, n_layers):
    """attnres.md section 4: uniform weights over sources that sum to the stream."""
    cfg = cfg.replace(
        n_layers=n_layers,
        attnres_num_blocks=min(cfg.attnres_num_blocks, n_layers),
        attnres_recency_bias=None,
        eps=0.0,
    )
    routed = HookedAttnRes(cfg)  # zero queries at init
    plain = HookedAttnRes(cfg.replace(attnres_layout="none"))
    plain.load_state_dict({k: v for k, v in routed.state_dict().items() if "_res." not in k})
    tokens = _tokens(cfg.seed)
    assert torch.allclose(routed(tokens), plain(tokens), atol=1e-4)


@SETTINGS
@given(n_layers=st.integers(1, 40), num_blocks=st.integers(1, 40), bias=st.floats(-5, 5))
def test_zero_query_cumulative_weights_are_analytic(n_layers, num_blocks, bias):
    num_blocks = min(num_blocks, n_layers)
    cfg = HookedAttnResConfig(
        d_model=8,
        n_layers=n_layers,
        n_heads=2,
        d_vocab=10,
        d_mlp=8,
        n_ctx=4,
        attnres_num_blocks=num_blocks,
        attnres_recency_bias=bias,
        seed=0,
    )
    model = HookedAttnRes(cfg)
    _, cache = model.run_with_cache(
        torch.tensor([[1, 2, 3]]), names_filter=lambda n: n.endswith("hook_weights")
    )
    S = math.ceil(n_layers / num_blocks)
    for layer in range(n_layers):
        n_other = 1 + layer // S
        current = math.exp(bias) / (math.exp(bias) + n_other)
        weights = cache["weights", layer, "mlp_res"]
        assert weights.shape[-1] == n_other + 1
        assert abs(weights[0, 0, -1].item() - current) < 1e-6
        assert abs(weights[0, 0, 0].item() - (1 - current) / n_other) < 1e-6


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(
            st.one_of(
                st.floats(allow_nan=False, allow_infinity=False),
                st.sampled_from([float("nan"), float("inf"), float("-inf")]),
            ),
            min_size=3,
            max_size=3,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_first_non_finite_is_the_first_bad_cell_in_reading_order(rows):
    """The shared finder behind the refusals that name a NaN / infinite cell (motifs,
    dissociations, schedule): against a loop over the rows in reading order."""
    import math

    from hooked_attnres._validation import first_non_finite

    expected = next(
        ((i, j) for i, row in enumerate(rows) for j, v in enumerate(row) if not math.isfinite(v)),
        None,
    )
    assert first_non_finite(rows) == expected
    flat = [v for row in rows for v in row]
    flat_expected = None if expected is None else (expected[0] * 3 + expected[1],)
    assert first_non_finite(flat) == flat_expected
