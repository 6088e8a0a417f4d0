"""Property tests (hypothesis) in float64 over random tiny configurations, every layout
(kimi, cumulative block/full, full, none), block counts that do not divide the layers,
left padding: the model's own identities hold to 1e-12 (docs/architecture.md), and so do
the metamorphic laws of the intervention and analysis API (docs/analysis.md), also on the
recency / exact wraps of a tiny Qwen3: identity patches, mask composition, sweep
invariances, attribution's linearity."""

from __future__ import annotations

import dataclasses
import functools
from unittest.mock import patch

import pytest
import torch
from helpers import (
    SMALL_QWEN3,
    eps_zero_config,
    hf_qwen3,
    nan_at_padding,
    randomize_routing,
    real_diff,
    rms_norm_in_float64,
)
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
    assert real_diff(logits, model(tokens, attention_mask=mask), mask) <= TOL
    assert len(model.routers()) == len(model.routing_layout.sites())
    for layer, router in model.routers():
        prefix = _prefix(layer, router)
        weights, sources = cache[f"{prefix}.hook_weights"], cache[f"{prefix}.hook_sources"]
        assert real_diff(weights.sum(-1), torch.ones_like(weights[..., 0]), mask) <= TOL
        expected = (weights[..., None] * sources).sum(-2)
        assert real_diff(cache[f"{prefix}.hook_out"], expected, mask) <= TOL
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
        assert real_diff(resumed, full, mask) <= TOL, sublayer


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
    assert real_diff(masked, baseline, mask) == 0


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
    assert real_diff(torch.cat(chunks, dim=1), full, mask) <= TOL


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
    with torch.no_grad(), patch.object(Qwen3RMSNorm, "forward", rms_norm_in_float64):
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


@pytest.mark.parametrize("layout", ["kimi", "full"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_at_eps_zero_does_not_reach_real_positions(layout, side):
    """With ``eps = 0`` a padding position's zero attention output is a zero source, whose
    routing logit is 0 / 0 (nan). A real query gives that position's key weight 0, but
    ``0 * nan`` is nan: before, every real position of the padded prompt became nan
    (found by the property tests above). Each padded prompt equals itself unpadded, with
    the fused attention, the explicit one (``hook_pattern`` watched) and a key-value
    cache."""
    cfg = eps_zero_config(layout)
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
    the mean over the real predictions (`lm_cross_entropy_loss` on the real tokens). The
    norms of a padding row now use eps 1 (`padding_eps`), so the padding is finite: a hook
    writes the nan there (`nan_at_padding`), as any garbage a padding position holds."""
    cfg = eps_zero_config(layout)
    model = randomize_routing(HookedAttnRes(cfg))
    tokens = torch.tensor([[7, 3, 4, 5], [1, 2, 3, 6]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # left padding: the loss reads it
    pattern = [("blocks.1.attn.hook_pattern", lambda x, hook: None)] if watched else []

    def embedding_gradient(tokens, mask, picked):
        delta = torch.zeros(*tokens.shape, 8, dtype=torch.float64, requires_grad=True)
        hooks = [("hook_embed", lambda x, hook: x + delta), *pattern]
        if mask is not None:
            hooks.append(nan_at_padding(mask))
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens, attention_mask=mask)
        if mask is not None:  # the padding position is nan (the hook)
            assert torch.isnan(logits[0, 0]).all()
        return torch.autograd.grad(picked(logits), delta)[0]

    padded = embedding_gradient(tokens, mask, lambda logits: logits[0, 3, 4] + logits[1, 3, 5])
    alone = embedding_gradient(tokens[:1, 1:], None, lambda logits: logits[0, 2, 4])
    other = embedding_gradient(tokens[1:], None, lambda logits: logits[0, 3, 5])
    assert (padded[0, 1:] - alone[0]).abs().max().item() <= TOL
    assert (padded[1] - other[0]).abs().max().item() <= TOL

    with model.hooks(fwd_hooks=[nan_at_padding(mask)]):
        loss = model(tokens, attention_mask=mask, return_type="loss")
    per_token = torch.cat(
        [
            model(tokens[:1, 1:], return_type="loss", loss_per_token=True)[0],
            model(tokens[1:], return_type="loss", loss_per_token=True)[0],
        ]
    )
    assert abs(loss.item() - per_token.mean().item()) <= TOL


@pytest.mark.parametrize("layout", ["kimi", "full"])
def test_loss_of_right_padding_at_eps_zero_is_that_of_the_real_tokens(layout):
    """The loss at eps 0 with two padding tokens on the right: the first one's logits
    (nan, docs/hooks.md) predict the second, and ``nan * 0`` made the loss nan, as it did
    with left padding. The loss is the mean of the prompts' own per-token losses, and
    ``loss_per_token`` holds them at the real predictions and 0 elsewhere. The padding is
    finite since `padding_eps`: a hook writes the nan there (`nan_at_padding`)."""
    model = randomize_routing(HookedAttnRes(eps_zero_config(layout)))
    tokens = torch.tensor([[7, 3, 4, 5], [1, 2, 3, 6]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    first = model(tokens[:1, :2], return_type="loss", loss_per_token=True)[0]  # [1]
    second = model(tokens[1:], return_type="loss", loss_per_token=True)[0]  # [3]
    with model.hooks(fwd_hooks=[nan_at_padding(mask)]):
        assert torch.isnan(model(tokens, attention_mask=mask)[0, 2]).all()  # the case
        loss = model(tokens, attention_mask=mask, return_type="loss")
        per_token = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    assert abs(loss.item() - torch.cat([first, second]).mean().item()) <= TOL
    expected = torch.stack([torch.cat([first, first.new_zeros(2)]), second])
    assert (per_token - expected).abs().max().item() <= TOL


# --- metamorphic laws of the intervention and analysis API (session 14, audit 28) --------


@st.composite
def wrapped_cases(draw):
    """A float64 ``from_hf_qwen3`` wrap (``recency`` or ``exact``) of a random tiny Qwen3,
    with tokens and an optional left-padding mask, as `cases` gives for native layouts."""
    n_layers = draw(st.integers(1, 4))
    hf = hf_qwen3(seed=draw(st.integers(0, 1000)), num_hidden_layers=n_layers, **SMALL_QWEN3)
    wrap = draw(st.sampled_from(["recency", "exact"]))
    num_blocks = draw(st.integers(1, n_layers))
    model = HookedAttnRes.from_hf_qwen3(hf, wrap=wrap, num_blocks=num_blocks, dtype=torch.float64)
    batch, pos = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    tokens = torch.randint(0, 17, (batch, pos), generator=torch.Generator().manual_seed(pos))
    mask = None
    if draw(st.booleans()):
        pads = draw(st.lists(st.integers(0, pos - 1), min_size=batch, max_size=batch))
        mask = (torch.arange(pos)[None, :] >= torch.tensor(pads)[:, None]).long()
    return model.eval(), tokens, mask


def any_case():
    return st.one_of(cases(), wrapped_cases())


@SETTINGS
@given(case=any_case())
def test_interventions_with_the_runs_own_values_are_the_identity(case):
    """`set_weights` with the run's own cache or weights, `patch_sources` of every source
    and `patch_committed` of every committed source from the run's own cache give the
    unpatched run to 1e-12 (not bit for bit: which hooks a run observes changes the
    order of some float64 sums, so the cache's values and the patched run's own differ
    by an ulp). Layout ``none`` refuses them."""
    from hooked_attnres.interventions import patch_committed, patch_sources, set_weights
    from hooked_attnres.model.depth import FAMILIES

    model, tokens, mask = case
    logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    layout = model.routing_layout
    if not layout.has_routers:
        with pytest.raises(ValueError, match="none"):
            set_weights(model, "uniform")
        return
    sites = layout.sites()
    # a dict of tensors records no padding: its nan weights at padding positions (eps 0)
    # are refused, so they are made a distribution there (a padding position reaches no
    # real one)
    own_weights = {
        site: cache[site.hook("weights")].nan_to_num(1 / layout.n_sources(site)) for site in sites
    }
    # every committed source a router reads (patch_committed refuses the cumulative
    # layout's block after the last layer, which none reads)
    labels = [label for label in layout.commit_hooks() if layout.commit_readers(label)]
    for hooks in (
        set_weights(model, cache, routers=sites),
        set_weights(model, own_weights, routers=sites, positions=list(range(tokens.shape[1]))),
        patch_sources(model, list(FAMILIES), cache, routers=sites),
        patch_committed(model, labels, cache),
    ):
        patched = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
        assert real_diff(patched, logits, mask) <= TOL


@SETTINGS
@given(case=any_case(), data=st.data())
def test_masking_composes_and_equals_set_weights_of_the_renormalised_weights(case, data):
    """At one router: masking family A, then (a second hook list) family B, equals masking
    {A, B} at once, bit for bit; masking A equals `set_weights` with the softmax of the
    router's logits over the kept sources, computed by hand (1e-12)."""
    from hooked_attnres.interventions import set_weights

    model, tokens, mask = case
    if not model.routing_layout.has_routers:
        return
    site = data.draw(st.sampled_from(model.routing_layout.sites()))
    families = model.source_families(site)
    n = model.routing_layout.n_sources(site)
    present = sorted(f for f, idx in families.items() if idx)
    first = data.draw(st.sampled_from(present))
    second = data.draw(st.sampled_from(present))
    both = set(families[first]) | set(families[second])

    def run(hooks):
        return model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)

    if len(both) == n:  # nothing left: refused, at construction or when the hook runs
        with pytest.raises(ValueError, match="mask"):
            run(mask_sources(model, first, routers=[site]) + mask_sources(model, second, [site]))
        return
    composed = run(mask_sources(model, first, routers=[site]) + mask_sources(model, second, [site]))
    at_once = run(mask_sources(model, [first, second], routers=[site]))
    assert real_diff(composed, at_once, mask) == 0

    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=site.hook("logits"))
    where = torch.zeros(n, dtype=torch.bool)
    where[families[first]] = True
    by_hand = cache[site.hook("logits")].masked_fill(where, float("-inf")).softmax(-1)
    if mask is not None:  # padding positions may be nan (eps 0): any distribution there
        by_hand = torch.where(mask.bool()[..., None], by_hand, torch.full_like(by_hand, 1 / n))
    renormalised = run(set_weights(model, {site: by_hand}, routers=[site]))
    assert real_diff(run(mask_sources(model, first, routers=[site])), renormalised, mask) <= TOL


def _metric(logits):
    """A patching metric reading the last position (real in left-padded batches)."""
    return (logits[:, -1, 3] - logits[:, -1, 5]).mean()


@SETTINGS
@given(case=any_case(), by_pos=st.booleans())
def test_patching_a_run_with_its_own_cache_gives_its_metric_in_every_cell(case, by_pos):
    """Every cell of every sweep, clean cache into the clean run: the clean metric (float32
    results). Attribution patching of the run's own weights estimates no change: the base
    metric in every cell, both methods."""
    from hooked_attnres.analysis import attribution_patch_routing_weights
    from hooked_attnres.patching import (
        get_act_patch_committed_blocks_by_pos,
        get_act_patch_depth_state,
        get_act_patch_depth_state_by_pos,
        get_act_patch_routing_weights,
        get_act_patch_routing_weights_by_pos,
    )

    model, tokens, mask = case
    logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    expected = _metric(logits).float()
    assert expected.isfinite()
    depth = get_act_patch_depth_state_by_pos if by_pos else get_act_patch_depth_state
    results = [
        depth(model, tokens, cache, _metric, sublayer=sub, attention_mask=mask)
        for sub in ("attn", "mlp")
    ]
    layout = model.routing_layout
    if layout.has_routers:
        routers = tuple(sorted({site.kind for site in layout.sites()}))
        sweep = get_act_patch_routing_weights_by_pos if by_pos else get_act_patch_routing_weights
        results.append(sweep(model, tokens, cache, _metric, routers, attention_mask=mask))
        if by_pos:
            results.append(
                get_act_patch_committed_blocks_by_pos(
                    model, tokens, cache, _metric, attention_mask=mask
                )
            )
        for method in ("linear", "norm"):
            results.append(
                attribution_patch_routing_weights(
                    model, tokens, cache, _metric, routers, by_pos, method, attention_mask=mask
                )
            )
    for result in results:
        filled = result[~result.isnan()]
        assert filled.numel() and (filled - expected).abs().max().item() <= 1e-6


def _task_batch(tokens, data):
    """A `TaskBatch` of ``tokens`` (right-padded prompts: answer positions drawn per prompt)."""
    from hooked_attnres.tasks.base import TaskBatch

    n, pos = tokens.shape
    answer_pos = torch.tensor(data.draw(st.lists(st.integers(0, pos - 1), min_size=n, max_size=n)))
    answer = (tokens[:, 0] + 1) % 17
    return TaskBatch(
        tokens=tokens,
        answer_pos=answer_pos,
        answer=answer,
        contrast=(answer + 3) % 17,
        corrupted_tokens=tokens.flip(0),
        targets=torch.full_like(tokens, -100),
    )


@pytest.mark.filterwarnings("ignore:a bootstrap interval needs at least 2 prompts")
@SETTINGS
@given(case=any_case(), data=st.data())
def test_ablation_sweeps_are_invariant_and_equal_the_hand_made_runs(case, data):
    """`run_ablations`: the fast sweep equals the slow one and, per cell, the metric of a
    plain run with that cell's hooks (1e-12); chunking the prompts and permuting them
    (rows permute alike) change nothing. `attribute_routing`: the estimates of
    ``c * metric`` are ``c`` times those of the metric, cells that mask nothing estimate
    exactly 0, the per-position estimates sum to the cell's, and `verify_top`'s rows are
    `ablation_effects`' rows of those cells bit for bit."""
    import numpy as np

    from hooked_attnres.analysis import (
        ablation_effects,
        attribute_routing,
        metric_values,
        plan_ablations,
        run_ablations,
    )

    model, tokens, _ = case
    if not model.routing_layout.has_routers:
        return
    batch = _task_batch(tokens, data)
    groups = data.draw(st.sampled_from(["all", "layers", "bands"]))
    plan = plan_ablations(model, groups=groups)
    args = (model, batch, plan, ("logit_diff", "logprob"))
    clean, ablated = run_ablations(*args, progress=False)
    for other in (
        run_ablations(*args, fast=False, progress=False),
        run_ablations(*args, chunk=data.draw(st.integers(1, 3)), progress=False),
    ):
        for metric in ("logit_diff", "logprob"):
            assert np.abs(other[0][metric] - clean[metric]).max() <= TOL
            assert np.abs(other[1][metric] - ablated[metric]).max() <= TOL
    order = torch.tensor(data.draw(st.permutations(range(len(batch)))))
    permuted = run_ablations(model, batch[order], plan, ("logit_diff",), progress=False)
    assert np.abs(permuted[1]["logit_diff"] - ablated["logit_diff"][:, order.numpy()]).max() <= TOL
    with torch.no_grad():
        for i, cell in enumerate(plan):
            out = model.run_with_hooks(batch.tokens, fwd_hooks=cell.ablation.hooks())
            by_hand = metric_values(batch, out, "logit_diff").numpy()
            assert np.abs(ablated["logit_diff"][i] - by_hand).max() <= TOL

    def logit_diff(batch, logits):
        rows = torch.arange(len(batch))
        answer_logits = logits[rows, batch.answer_pos]
        return answer_logits[rows, batch.answer] - answer_logits[rows, batch.contrast]

    def scaled(batch, logits):
        return -2.5 * logit_diff(batch, logits)

    result = attribute_routing(
        model,
        batch,
        [logit_diff, scaled],
        groups=groups,
        method=["linear", "norm"],
        by_position=True,
        n_bootstrap=40,
    )
    for method in ("linear", "norm"):
        estimates = result.per_prompt[(method, "logit_diff")]
        scale = max(1.0, float(np.abs(estimates).max()))
        assert np.abs(result.per_prompt[(method, "scaled")] + 2.5 * estimates).max() <= TOL * scale
        summed = result.by_position[(method, "logit_diff")].sum(-1)
        assert np.abs(summed - estimates).max() <= TOL * scale
        for i, cell in enumerate(result.plan):
            if cell.is_noop:
                assert (estimates[i] == 0).all()
    verified = result.verify_top(3, metric="logit_diff").set_index(["router", "group", "family"])
    exact = ablation_effects(
        model, batch, groups=groups, metrics=[logit_diff], n_bootstrap=40, progress=False
    ).set_index(["router", "group", "family"])
    columns = ["clean", "ablated", "effect", "ci_low", "ci_high", "n_masked_routers"]
    assert verified[columns].equals(exact.loc[verified.index, columns])


@SETTINGS
@given(case=any_case(), data=st.data())
def test_routing_mass_is_a_distribution_read_from_the_cache_and_permutes_with_the_batch(case, data):
    """`routing_mass`: at every router and prompt the families' masses sum to 1; each is
    the sum of its sources' cached weights at the answer position (``"answer"``) or their
    mean over positions ``0..answer_pos`` (``"all"``); permuting the prompts permutes the
    rows and nothing else."""
    import numpy as np

    from hooked_attnres.analysis import routing_mass
    from hooked_attnres.model.depth import FAMILIES

    model, tokens, _ = case
    layout = model.routing_layout
    if not layout.has_routers:
        return
    batch = _task_batch(tokens, data)
    positions = data.draw(st.sampled_from(["answer", "all"]))
    mass = routing_mass(model, batch, positions=positions)
    totals = mass.groupby(["prompt", "router", "layer"]).mass.sum()
    assert np.abs(totals.to_numpy() - 1).max() <= TOL
    _, cache = model.run_with_cache(batch.tokens)
    table = mass.set_index(["prompt", "router", "layer", "family"]).mass
    for site in layout.sites():
        weights = cache[site.hook("weights")]
        for prompt, answer in enumerate(batch.answer_pos.tolist()):
            read = (
                weights[prompt, answer] if positions == "answer" else weights[prompt, : answer + 1]
            )
            for family in FAMILIES:
                index = layout.families(site)[family]
                expected = read[..., index].sum(-1).mean().item() if index else 0.0
                got = table[(prompt, site.kind, site.table_layer, family)]
                assert abs(got - expected) <= TOL
    order = data.draw(st.permutations(range(len(batch))))
    permuted = routing_mass(model, batch[torch.tensor(order)], positions=positions)
    moved = permuted.assign(prompt=[order[p] for p in permuted.prompt])
    moved = moved.set_index(["prompt", "router", "layer", "family"]).mass
    assert np.abs(moved.sort_index().to_numpy() - table.sort_index().to_numpy()).max() <= TOL


@pytest.mark.parametrize("layout", ["kimi", "full"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_decomposition_checks_of_a_padded_cache_at_eps_zero(layout, side):
    """Audit 30: the sum checks of the cache decompositions (`_require_decomposable`: the
    routed components sum to the norm's input; `_require_unit_results`: the neurons sum
    to ``hook_mlp_out``) took the max error over every position. With eps = 0 a padding
    position's entries are nan (docs/hooks.md), the max error was nan, and ``nan >
    tolerance`` is False: every check passed, so the cache of an edited run with padding
    was decomposed silently, where the same edit of each prompt alone, unpadded, is
    refused. Now the checks read the real positions the cache records: an unedited cache
    decomposes each prompt as it alone does, an edited one is refused as it alone is, and
    a plain dict holding the nan padding is refused unless its mask is declared. Since
    `padding_eps` the padding is finite: a hook writes the nan (`nan_at_padding`)."""
    from hooked_attnres.interventions import patch_sources
    from hooked_attnres.model.cache import AttnResActivationCache

    model = randomize_routing(HookedAttnRes(eps_zero_config(layout))).eval()
    tokens = torch.tensor([[7, 3, 4, 5], [1, 2, 3, 6]])
    real = [1, 2, 3] if side == "left" else [0, 1, 2]
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0, 3 if side == "right" else 0] = 0
    site = model.site(1, "attn_res")
    edits = {  # a router's copy of a source / a sublayer output after its neurons
        "decompose_resid": patch_sources(
            model, model.routing_layout.labels(site)[0], torch.full((8,), 0.7), routers=[site]
        ),
        "stack_neuron_results": [("blocks.0.hook_mlp_out", lambda x, hook: 1.5 * x)],
    }

    def analysis(cache, method):
        if method == "decompose_resid":
            return cache.decompose_resid(layer=1, routed=True)
        return cache.stack_neuron_results(1, routed=True)

    garbage = [nan_at_padding(mask)]  # the padding is finite since padding_eps: make it nan
    for method, hooks in edits.items():
        with model.hooks(fwd_hooks=garbage):
            _, clean = model.run_with_cache(tokens, attention_mask=mask)
        _, alone = model.run_with_cache(tokens[:1, real])
        padded = analysis(clean, method)
        assert padded[:, 0, 0 if side == "left" else 3].isnan().any()  # the nan padding
        assert (padded[:, :1, real] - analysis(alone, method)).abs().max().item() <= TOL
        with model.hooks(fwd_hooks=hooks):
            with model.hooks(fwd_hooks=garbage):
                _, edited = model.run_with_cache(tokens, attention_mask=mask)
            _, edited_alone = model.run_with_cache(tokens[:1, real])
        with pytest.raises(ValueError, match="do not sum"):
            analysis(edited_alone, method)  # the independent verdict: refused unpadded
        with pytest.raises(ValueError, match="do not sum"):
            analysis(edited, method)
        undeclared = AttnResActivationCache(dict(clean.cache_dict), model)
        with pytest.raises(ValueError, match="nan: the cache holds nan.*attention_mask=mask"):
            analysis(undeclared, method)
        declared = AttnResActivationCache(dict(clean.cache_dict), model, attention_mask=mask)
        declared_stack = analysis(declared, method)[:, :1, real]
        assert (declared_stack - analysis(alone, method)).abs().max().item() <= TOL


@functools.cache
def _padding_gradient_model(name: str) -> HookedAttnRes:
    """A float64 model with ``eps = 0``: a native layout (3 layers, 2 blocks, routing made
    content-dependent) or a wrap of a Qwen3 with ``rms_norm_eps = 0``; token 0's embedding
    is zero (as Hugging Face zeroes the ``padding_idx`` row)."""
    if name in ("kimi", "full", "cumulative"):
        model = randomize_routing(HookedAttnRes(eps_zero_config(name, 3, 2)))
    else:
        blocks = {} if name == "none" else {"num_blocks": 2}  # "none" has no blocks
        model = HookedAttnRes.from_hf_qwen3(
            hf_qwen3(rms_norm_eps=0.0), wrap=name, dtype=torch.float64, **blocks
        )
    with torch.no_grad():
        model.embed.W_E[0] = 0.0
    return model


# the paths a pass may take: fused routers and norms (nothing watched), the routers'
# plain-autograd path (their weights watched), the stacked key norm, the hooked RMSNorms
# and the explicit attention (every scale and pattern watched)
_WATCHED = {"unhooked": (), "weights": ("hook_weights",), "scales": ("hook_scale", "hook_pattern")}


@pytest.mark.parametrize("name", ["kimi", "full", "cumulative", "exact", "recency", "none"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("watched", sorted(_WATCHED))
@pytest.mark.parametrize("pad_token", [None, 0])
def test_parameter_gradients_of_a_padded_batch_at_eps_zero(name, side, watched, pad_token):
    """With eps = 0 a padding position's row can be all zero (a padding query's zero
    attention output, a source or norm input made of such), whose RMS is 0: its routing
    logit and norm were 0 / 0, nan, and although the loss excludes the padding, the
    backward's ``0 * nan`` made the gradient of nearly every parameter nan (48 of 57
    tensors in kimi / full, 42 of 50 in the exact wrap, fused and hooked paths alike;
    with a zero pad-token embedding, ``pad_token=0``, every tensor in every layout).
    The norms of a padding row now use eps 1 (`padding_eps`): every parameter gradient of
    the padded batch's loss (the model's own and a hand-written masked sum) equals the
    sum of the prompts' gradients run alone, unpadded."""
    model = _padding_gradient_model(name)
    suffixes = _WATCHED[watched]
    hooks = [(lambda hook_name: hook_name.endswith(suffixes), lambda x, hook: None)]
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 5), generator=generator)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, slice(0, 2) if side == "left" else slice(3, None)] = 0
    if pad_token is not None:  # a pad token whose embedding is zero
        tokens[mask == 0] = pad_token
    params = list(model.parameters())

    def own_loss(tokens, mask):  # the model's loss, summed over the real predictions
        per_token = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
        return per_token[(mask[:, :-1] != 0) & (mask[:, 1:] != 0)].sum()

    def masked_loss(tokens, mask):  # by hand: log-softmax of the real predictions
        logits = model(tokens, attention_mask=mask)
        picked = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        return -picked[(mask[:, :-1] != 0) & (mask[:, 1:] != 0)].sum()

    def gradients(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    for loss_of in (own_loss, masked_loss):
        with model.hooks(fwd_hooks=hooks if suffixes else []):
            padded = gradients(loss_of(tokens, mask))
            alone = [
                gradients(loss_of(real, torch.ones_like(real)))
                for real in (tokens[row : row + 1, mask[row] != 0] for row in range(2))
            ]
        for (param, _), got, first, second in zip(
            model.named_parameters(), padded, *alone, strict=True
        ):
            expected = first + second
            error = (got - expected).abs().max().item()
            assert error <= 1e-12 * max(1.0, expected.abs().max().item()), (param, error)


@pytest.mark.parametrize("name", ["kimi", "full", "exact", "kimi eps 1e-6", "full eps 1e-6"])
@pytest.mark.parametrize("watched", ["unhooked", "weights"])
def test_second_derivatives_of_a_padded_batch(name, watched):
    """A Hessian-vector product of a padded batch's masked loss equals the sum of the
    prompts' run alone (attention needs a ``hook_pattern`` hook for a second derivative:
    CPU SDPA has none). Two causes of nan at padding rows, which are all zero there:
    autograd's derivative of `vector_norm` divides by the norm, ``0 / 0`` at a zero row in
    a second derivative, whatever the eps (every norm's sum of squares now has the
    derivative ``2 x``, `squared_norm`); and with eps 0 the hand-written backward passes
    take their second derivative after the pass, when its padding is no longer known, so
    they keep the eps their forward used (`padding_eps`). ``watched``: the routers'
    fused or plain-autograd path."""
    layout, _, eps = name.partition(" eps ")
    if eps:  # a native model with a positive eps, the same shape and routing
        model = randomize_routing(
            HookedAttnRes(dataclasses.replace(eps_zero_config(layout, 3, 2), eps=float(eps)))
        )
    else:
        model = _padding_gradient_model(layout)
    suffixes = ("hook_pattern", *_WATCHED[watched])
    hooks = [(lambda hook_name: hook_name.endswith(suffixes), lambda x, hook: None)]
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 5), generator=generator)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    tokens[mask == 0] = 0  # the zero-embedding pad token: all-zero padding rows
    params = [p for n, p in model.named_parameters() if "blocks" in n]
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]

    def hvp(tokens, mask):
        logits = model(tokens, attention_mask=mask)
        picked = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        loss = -picked[(mask[:, :-1] != 0) & (mask[:, 1:] != 0)].sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, direction, strict=True))
        return torch.autograd.grad(dot, params, allow_unused=True)

    with model.hooks(fwd_hooks=hooks):
        padded = hvp(tokens, mask)
        alone = [
            hvp(real, torch.ones_like(real))
            for real in (tokens[row : row + 1, mask[row] != 0] for row in range(2))
        ]
    for param, got, first, second in zip(params, padded, *alone, strict=True):
        parts = [g for g in (got, first, second) if g is not None]
        if not parts:
            continue
        expected = sum(torch.zeros_like(param) if g is None else g for g in (first, second))
        assert got is not None
        error = (got - expected).abs().max().item()
        assert error <= 1e-10 * max(1.0, expected.abs().max().item()), error


def _edited_sum_errors(model, tokens, mask, name, factor, point):
    """Run with the activation ``name`` times ``factor`` and cache; return ``{analysis:
    error}`` for each cache analysis at read point ``point`` that did not refuse, the error
    against what the run itself read: the norm's input (`norm_input`, the router's
    ``hook_out`` or ``hook_resid_*``), the norm's output (its cached ``hook_normalized``)
    and, at the unembedding, the logit difference of the run's logits and the run's logits
    (the last entry of a readout that applies ``ln_final`` itself)."""
    import warnings

    from hooked_attnres import RoutedResidualPatchWarning, UnfoldedNormWarning
    from hooked_attnres.analysis import routing_lens

    n_layers = model.cfg.n_layers
    layer, sublayer = (None, 0) if point == 2 * n_layers else divmod(point, 2)
    mlp_input = bool(sublayer)  # the flags take True or False only (require_bool)
    norm = model.norm_at(point).hook_normalized.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutedResidualPatchWarning)
        warnings.simplefilter("ignore", UnfoldedNormWarning)
        with model.hooks(fwd_hooks=[(name, lambda x, hook: x * factor)]):
            logits, cache = model.run_with_cache(tokens, attention_mask=mask)
        answers = torch.arange(tokens.shape[0]) % 17
        wrongs = (answers + 5) % 17
        rows = torch.arange(tokens.shape[0])
        difference = logits[rows, :, answers] - logits[rows, :, wrongs]
        target, normalized = cache.norm_input(point), cache[norm]
        calls = {
            "decompose_resid": (
                lambda: cache.decompose_resid(layer, mlp_input, routed=True).sum(0),
                target,
            ),
            "get_full_resid_decomposition": (
                lambda: cache.get_full_resid_decomposition(layer, mlp_input, routed=True).sum(0),
                target,
            ),
            "decompose_resid(apply_ln=True)": (
                lambda: cache.decompose_resid(layer, mlp_input, apply_ln=True, routed=True).sum(0),
                normalized,
            ),
        }
        if layer is None:
            calls["logit_attrs"] = (
                lambda: cache.logit_attrs(
                    cache.decompose_resid(routed=True), answers, wrongs, routed=True
                ).sum(0)[..., None],
                difference[..., None],
            )
            # the readouts that apply ln_final themselves: their last entry is the run's
            calls["routing_lens"] = (lambda: routing_lens(model, cache).logits[-1], logits)
            calls["accumulated_resid(apply_ln=True)"] = (
                lambda: cache.accumulated_resid(apply_ln=True, routed=True)[-1],
                normalized * model.ln_final.w,
            )
            if not model.routing_layout.has_final_router:
                calls["logit_lens"] = (
                    lambda: cache.logit_lens(positions=None).values[-1],
                    logits,
                )
        errors = {}
        for analysis, (call, expected) in calls.items():
            try:
                got = call()
            except ValueError as error:
                assert "edited" in str(error), error
                continue
            errors[analysis] = real_diff(got, expected, mask) / max(
                1.0, expected.abs().max().item()
            )
    return errors


@SETTINGS
@given(case=any_case(), data=st.data())
def test_cache_analyses_of_an_edited_run_are_exact_or_refuse(case, data):
    """Audit 78: a hook scales one activation of the cached run (any hook of the model,
    a norm's output among them); every decomposition at a random read point then either
    refuses (naming the edit) or sums to what the run read there: the norm's input, the
    norm's output for ``apply_ln=True`` and, at the unembedding, the run's own logit
    differences for ``logit_attrs``, the run's logits (its ``ln_final`` output for
    ``accumulated_resid(apply_ln=True)``) for the last entry of the readouts that apply
    ``ln_final`` themselves (the routing lens, ``cache.logit_lens``). An edit of
    ``hook_normalized`` passed silently before (``_require_norm_output``), and in the
    readouts an edit of ``ln_final``'s ``hook_scale`` too (audit 82)."""
    model, tokens, mask = case
    norm_outputs = sorted(n for n in model.hook_dict if n.startswith("ln_final.hook_"))
    others = sorted(n for n in model.hook_dict if not n.endswith("hook_pattern"))
    name = data.draw(st.one_of(st.sampled_from(norm_outputs), st.sampled_from(others)))
    factor = data.draw(st.sampled_from([0.5, -1.0]))
    point = data.draw(st.integers(0, 2 * model.cfg.n_layers))
    if name.startswith("ln_final"):
        point = 2 * model.cfg.n_layers
    errors = _edited_sum_errors(model, tokens, mask, name, factor, point)
    assert all(error <= 1e-9 for error in errors.values()), (name, point, errors)
