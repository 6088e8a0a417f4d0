"""Property tests (hypothesis) in float64 over random tiny configurations, every layout
(kimi, cumulative block/full, full, none), block counts that do not divide the layers,
left padding: the model's own identities hold to 1e-12 (docs/architecture.md)."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from helpers import hf_qwen3, randomize_routing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from hooked_attnres import HookedAttnRes, HookedAttnResConfig, KeyValueCache
from hooked_attnres.interventions import mask_sources

SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TOL = 1e-12
LAYOUT_MODES = [
    ("kimi", "block"),
    ("cumulative", "block"),
    ("cumulative", "full"),
    ("full", "block"),
    ("none", "block"),
]


@st.composite
def cases(draw, layouts=LAYOUT_MODES):
    """A float64 model with random routing, tokens ``[batch, pos]`` and an attention mask
    (``None``, or left padding leaving every prompt at least one real token)."""
    layout, mode = draw(st.sampled_from(layouts))
    n_layers = draw(st.integers(1, 6))
    n_kv = draw(st.sampled_from([1, 2]))
    d_head = draw(st.sampled_from([2, 4]))
    cfg = HookedAttnResConfig(
        d_model=draw(st.sampled_from([4, 8, 12])),
        n_layers=n_layers,
        n_heads=n_kv * draw(st.sampled_from([1, 2])),
        n_key_value_heads=n_kv,
        d_head=d_head,
        d_mlp=draw(st.integers(1, 12)),
        d_vocab=17,
        n_ctx=8,
        attnres_layout=layout,
        attnres_mode=mode,
        attnres_num_blocks=draw(st.integers(1, n_layers)),
        attnres_recency_bias=draw(st.one_of(st.none(), st.floats(-4, 4))),
        eps=draw(st.sampled_from([1e-6, 0.0])),
        tie_word_embeddings=draw(st.booleans()),
        dtype=torch.float64,
        seed=draw(st.integers(0, 10_000)),
    )
    model = randomize_routing(
        HookedAttnRes(cfg), seed=cfg.seed, scale=draw(st.sampled_from([0.0, 0.5, 3.0]))
    )
    batch, pos = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, cfg.d_vocab, (batch, pos), generator=generator)
    mask = None
    if draw(st.booleans()):
        pads = draw(st.lists(st.integers(0, pos - 1), min_size=batch, max_size=batch))
        mask = (torch.arange(pos)[None, :] >= torch.tensor(pads)[:, None]).long()
    return model, tokens, mask


def _real_diff(got, expected, mask) -> float:
    """max |got - expected| over the real positions (every position without a mask); a
    padding position may be nan with ``eps = 0`` (docs/hooks.md)."""
    real = torch.ones(got.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    assert torch.isfinite(got[real]).all() and torch.isfinite(expected[real]).all()
    return (got[real] - expected[real]).abs().max().item()


def _prefix(layer, router) -> str:
    return "final_res" if layer is None else f"blocks.{layer}.{router}"


@SETTINGS
@given(case=cases())
def test_routing_identities_hold_in_float64(case):
    """Every router: weights sum to 1, ``hook_out`` is the weighted sum of
    ``hook_sources``, one label per source and the families partition them; the cached
    pass's logits are the plain pass's."""
    model, tokens, mask = case
    logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert _real_diff(logits, model(tokens, attention_mask=mask), mask) <= TOL
    assert len(model.routers()) == len(model.routing_layout.sites())
    for layer, router in model.routers():
        prefix = _prefix(layer, router)
        weights, sources = cache[f"{prefix}.hook_weights"], cache[f"{prefix}.hook_sources"]
        assert _real_diff(weights.sum(-1), torch.ones_like(weights[..., 0]), mask) <= TOL
        expected = (weights[..., None] * sources).sum(-2)
        assert _real_diff(cache[f"{prefix}.hook_out"], expected, mask) <= TOL
        n = weights.shape[-1]
        assert sources.shape[-2] == n == len(model.source_labels(layer, router))
        families = model.source_families(layer, router)
        assert sorted(i for idx in families.values() for i in idx) == list(range(n))


@SETTINGS
@given(case=cases())
def test_every_sublayer_state_resumes_to_the_full_pass(case):
    model, tokens, mask = case
    full = model(tokens, attention_mask=mask)
    states = model.depth_states(tokens, sublayers=True, attention_mask=mask)
    assert len(states) == 2 * model.cfg.n_layers + 1
    for sublayer, state in enumerate(states):
        resumed = model.forward_from(state, sublayer, attention_mask=mask)
        assert _real_diff(resumed, full, mask) <= TOL, sublayer


@SETTINGS
@given(case=cases(layouts=LAYOUT_MODES[:4]), data=st.data())
def test_masking_a_family_of_exactly_zero_weight_changes_nothing(case, data):
    """A hook pushes one family's logits 1e4 below the rest (``exp`` underflows to exactly
    0 in float64); masking that family on top changes no logit."""
    model, tokens, mask = case
    site = data.draw(st.sampled_from(model.routing_layout.sites()))
    families = model.source_families(site)
    n = model.routing_layout.n_sources(site)
    candidates = sorted(f for f, idx in families.items() if 0 < len(idx) < n)
    if not candidates:
        return
    family = data.draw(st.sampled_from(candidates))
    index = torch.tensor(families[family])

    def starve(logits, hook):
        logits = logits.clone()
        logits[..., index] -= 1e4
        return logits

    zero_hook = [(site.hook("logits"), starve)]
    watched = []
    with model.hooks(fwd_hooks=zero_hook):
        _, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=site.hook("weights")
        )
        starved = cache[site.hook("weights")][..., index]
        assert (starved[mask.bool()] if mask is not None else starved).eq(0).all()
        baseline = model(tokens, attention_mask=mask)
        watched = mask_sources(model, [family], routers=[site])
        masked = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=watched)
    assert _real_diff(masked, baseline, mask) == 0


@SETTINGS
@given(case=cases(), fraction=st.floats(0, 1))
def test_key_value_cached_chunks_equal_the_full_pass(case, fraction):
    model, tokens, mask = case
    pos = tokens.shape[1]
    split = round(fraction * pos)
    full = model(tokens, attention_mask=mask)
    cache = KeyValueCache.init_cache(model.cfg)
    chunks = []
    for lo, hi in ((0, split), (split, pos)):
        if hi == lo:
            continue
        part = None if mask is None else mask[:, lo:hi]
        if lo == 0 and part is not None and not part.any(-1).all():
            with pytest.raises(ValueError, match="all zero"):
                model(tokens[:, lo:hi], attention_mask=part, past_kv_cache=cache)
            return
        chunks.append(model(tokens[:, lo:hi], attention_mask=part, past_kv_cache=cache))
    assert _real_diff(torch.cat(chunks, dim=1), full, mask) <= TOL


def _rms_norm_in_float64(self, hidden):
    """``Qwen3RMSNorm.forward`` without its float32 round trip (transformers computes the
    statistic of a float64 input in float32: 4e-8 on these logits, the only difference
    from this model in float64)."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    n_layers=st.integers(1, 4),
    num_blocks=st.integers(1, 6),
    n_kv=st.sampled_from([1, 2]),
    tied=st.booleans(),
    batch=st.integers(1, 3),
    pos=st.integers(1, 6),
)
def test_exact_wrap_equals_transformers_in_float64_at_eps_zero(
    n_layers, num_blocks, n_kv, tied, batch, pos
):
    """docs/loading.md: with ``rms_norm_eps = 0`` the exact wrap is vanilla Qwen3 (the
    routers' uniform average is undone by every RMSNorm); a larger ``num_blocks`` than
    layers is clipped."""
    hf = hf_qwen3(
        num_hidden_layers=n_layers,
        num_key_value_heads=n_kv,
        tie_word_embeddings=tied,
        rms_norm_eps=0.0,
        hidden_size=8,
        intermediate_size=12,
        head_dim=4,
        num_attention_heads=2 * n_kv,
    ).double()
    exact = HookedAttnRes.from_hf_qwen3(
        hf, wrap="exact", num_blocks=num_blocks, dtype=torch.float64
    )
    assert exact.cfg.attnres_num_blocks == min(num_blocks, n_layers)
    plain = HookedAttnRes.from_hf_qwen3(hf, wrap="none", dtype=torch.float64)
    tokens = torch.randint(0, 61, (batch, pos), generator=torch.Generator().manual_seed(pos))
    with torch.no_grad(), patch.object(Qwen3RMSNorm, "forward", _rms_norm_in_float64):
        expected = hf(tokens).logits
    with torch.no_grad():
        assert (exact(tokens) - expected).abs().max().item() <= TOL
        assert (plain(tokens) - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("n_layers", [1, 3, 5])
def test_more_blocks_than_layers_is_refused(n_layers):
    with pytest.raises(ValueError, match=f"between 1 and n_layers={n_layers}"):
        HookedAttnResConfig(
            d_model=8,
            n_layers=n_layers,
            n_heads=2,
            d_vocab=10,
            attnres_num_blocks=n_layers + 1,
        )


def _eps_zero_config(layout: str) -> HookedAttnResConfig:
    """A 2-layer float64 model with ``eps = 0`` (one block) in ``layout``."""
    return HookedAttnResConfig(
        d_model=8,
        n_layers=2,
        n_heads=2,
        d_head=4,
        d_vocab=17,
        n_ctx=8,
        attnres_layout=layout,
        attnres_num_blocks=1,
        eps=0.0,
        dtype=torch.float64,
        seed=0,
    )


@pytest.mark.parametrize("layout", ["kimi", "full"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_at_eps_zero_does_not_reach_real_positions(layout, side):
    """With ``eps = 0`` a padding position's zero attention output is a zero source, whose
    routing logit is 0 / 0 (nan). A real query gives that position's key weight 0, but
    ``0 * nan`` is nan: before, every real position of the padded prompt became nan
    (found by the property tests above). Each padded prompt equals itself unpadded, with
    the fused attention, the explicit one (``hook_pattern`` watched) and a key-value
    cache."""
    cfg = _eps_zero_config(layout)
    model = randomize_routing(HookedAttnRes(cfg))
    tokens = torch.tensor([[7, 3, 4, 5], [1, 2, 3, 6]])
    real = [1, 2, 3] if side == "left" else [0, 1, 2]
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0, 3 if side == "right" else 0] = 0
    alone = model(tokens[:1, real])
    kv = KeyValueCache.init_cache(cfg)
    chunks = [model(tokens[:, :2], attention_mask=mask[:, :2], past_kv_cache=kv)]
    chunks.append(model(tokens[:, 2:], attention_mask=mask[:, 2:], past_kv_cache=kv))
    for logits in (
        model(tokens, attention_mask=mask),
        model.run_with_cache(tokens, attention_mask=mask)[0],
        torch.cat(chunks, 1),
    ):
        assert (logits[:1, real] - alone).abs().max().item() <= TOL
        assert (logits[1:] - model(tokens[1:])).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["kimi", "full"])
@pytest.mark.parametrize("watched", [False, True])
def test_padding_at_eps_zero_keeps_gradients_and_loss_of_real_positions(layout, watched):
    """The backward pass of the case above: a padding query's nan query (0 / 0 routing at
    eps 0) met a zero gradient in the backward of its scores, and ``0 * nan`` made the
    gradient of every real position of the padded prompt nan (an attribution's gradients
    with respect to ``hook_embed`` or ``hook_weights``); and the loss, which excludes the
    padding, multiplied its nan terms by 0: nan. Now the gradients at the real positions
    equal those of the prompt alone (fused and explicit attention), and the loss equals
    the mean over the real predictions (`lm_cross_entropy_loss` on the real tokens)."""
    cfg = _eps_zero_config(layout)
    model = randomize_routing(HookedAttnRes(cfg))
    tokens = torch.tensor([[7, 3, 4, 5], [1, 2, 3, 6]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # left padding: the loss reads it
    pattern = [("blocks.1.attn.hook_pattern", lambda x, hook: None)] if watched else []

    def embedding_gradient(tokens, mask, picked):
        delta = torch.zeros(*tokens.shape, 8, dtype=torch.float64, requires_grad=True)
        hooks = [("hook_embed", lambda x, hook: x + delta), *pattern]
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens, attention_mask=mask)
        if mask is not None:  # the padding position is nan (docs/hooks.md)
            assert torch.isnan(logits[0, 0]).all()
        return torch.autograd.grad(picked(logits), delta)[0]

    padded = embedding_gradient(tokens, mask, lambda logits: logits[0, 3, 4] + logits[1, 3, 5])
    alone = embedding_gradient(tokens[:1, 1:], None, lambda logits: logits[0, 2, 4])
    other = embedding_gradient(tokens[1:], None, lambda logits: logits[0, 3, 5])
    assert (padded[0, 1:] - alone[0]).abs().max().item() <= TOL
    assert (padded[1] - other[0]).abs().max().item() <= TOL

    loss = model(tokens, attention_mask=mask, return_type="loss")
    per_token = torch.cat(
        [
            model(tokens[:1, 1:], return_type="loss", loss_per_token=True)[0],
            model(tokens[1:], return_type="loss", loss_per_token=True)[0],
        ]
    )
    assert abs(loss.item() - per_token.mean().item()) <= TOL
