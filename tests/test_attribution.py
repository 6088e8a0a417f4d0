"""Attribution over routing: against finite differences, the exact sweep and bad inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import nan_at_padding, randomize_routing, tiny_model

from hooked_attnres.analysis import (
    ablation_effects,
    attribute_routing,
    attribution_patch_routing_weights,
    metric_values,
    plan_ablations,
    run_ablations,
)
from hooked_attnres.interventions import patch_sources, set_weights
from hooked_attnres.model.depth import FAMILIES
from hooked_attnres.patching import get_act_patch_routing_weights
from hooked_attnres.tasks.base import TaskBatch

EPS = 1e-6  # central differences: truncation error ~ EPS**2, rounding ~ 1e-16 / EPS


def random_batch(n: int = 4, n_pos: int = 7, d_vocab: int = 50, seed: int = 0) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (n, n_pos), generator=generator)
    answer = torch.randint(0, d_vocab, (n,), generator=generator)
    contrast = (answer + 1 + torch.randint(0, d_vocab - 1, (n,), generator=generator)) % d_vocab
    return TaskBatch(
        tokens=tokens,
        # one prompt answers before the end: the estimate must read the right position
        answer_pos=torch.tensor([n_pos - 1] * (n - 1) + [n_pos - 3]),
        answer=answer,
        contrast=contrast,
        corrupted_tokens=torch.randint(0, d_vocab, (n, n_pos), generator=generator),
        targets=torch.full((n, n_pos), -100),
    )


def routed_model(layout: str, dtype=torch.float64, scale: float = 2.0, **overrides):
    """A model with content-dependent routing; at ``scale=2`` some weights are saturated
    (below 1e-6), which `set_weights` refuses to move below 0 in a central difference."""
    model = tiny_model(attnres_layout=layout, attnres_recency_bias=0.5, **overrides)
    return randomize_routing(model, scale=scale).to(dtype).eval()


def routers_of(layout: str) -> tuple[str, ...]:
    return (
        ("attn_res", "mlp_res", "final_res")
        if layout in ("kimi", "full")
        else ("attn_res", "mlp_res")
    )


def metric_at(model, batch, hooks, metric="logit_diff"):
    with torch.no_grad():
        return metric_values(batch, model.run_with_hooks(batch.tokens, fwd_hooks=hooks), metric)


def central_difference_of_deltas(model, batch, deltas, metric="logit_diff"):
    """d metric / d eps of the run whose hooks add ``eps * delta`` to each named activation
    (``deltas``: ``{hook name: delta}``), by central differences."""
    values = []
    for sign in (1, -1):
        hooks = [
            (name, lambda x, hook, d=delta, s=sign: x + s * EPS * d)
            for name, delta in deltas.items()
        ]
        values.append(metric_at(model, batch, hooks, metric))
    return (values[0] - values[1]) / (2 * EPS)


def central_difference(model, batch, site, new_weights, positions=None, metric="logit_diff"):
    """d metric / d eps of the weights ``w + eps (new - w)`` at one router (set_weights)."""
    _, cache = model.run_with_cache(batch.tokens, names_filter=site.hook("weights"))
    weights = cache[site.hook("weights")]
    values = []
    for sign in (1, -1):
        moved = weights + sign * EPS * (new_weights - weights)
        hooks = set_weights(model, {site: moved}, routers=[site], positions=positions)
        values.append(metric_at(model, batch, hooks, metric))
    return (values[0] - values[1]) / (2 * EPS)


def masked_weights(model, batch, site, mask):
    _, cache = model.run_with_cache(batch.tokens, names_filter=site.hook("logits"))
    logits = cache[site.hook("logits")]
    return logits.masked_fill(torch.tensor(mask), float("-inf")).softmax(-1)


@pytest.mark.parametrize("metric", ["logit_diff", "logprob"])
def test_linear_estimate_equals_finite_differences(routed_layout, metric):
    """Every single-router cell of the per-layer plan (and the final router): the estimate
    per prompt is the derivative of the metric along w + eps (w_masked - w), float64."""
    model = routed_model(routed_layout, scale=0.15, n_layers=3, attnres_num_blocks=3)
    batch = random_batch()
    result = attribute_routing(
        model, batch, metric, routers=routers_of(routed_layout), groups="layers", progress=False
    )
    estimates = result.per_prompt[("linear", metric)]
    checked = 0
    for i, cell in enumerate(result.plan):
        if cell.is_noop:
            assert (estimates[i] == 0).all()
            continue
        assert len(cell.ablation.masks) == 1  # one router per layer and type
        site, mask = cell.ablation.masks[0]
        new = masked_weights(model, batch, site, mask)
        expected = central_difference(model, batch, site, new, metric=metric)
        np.testing.assert_allclose(estimates[i], expected.numpy(), rtol=0, atol=1e-6)
        checked += 1
    assert checked >= 10
    assert np.abs(estimates).max() > 1e-3  # the estimates are not all trivially 0


def test_band_cell_is_the_derivative_of_moving_every_router_at_once(routed_layout):
    """A cell of several routers: the first-order change when each router's weights move by
    eps (w_masked - w) on top of what they compute (an additive hook at every router)."""
    model = routed_model(routed_layout)
    batch = random_batch(seed=1)
    result = attribute_routing(model, batch, groups="all", progress=False)
    cells = [(i, c) for i, c in enumerate(result.plan) if len(c.ablation.masks) >= 2]
    assert cells
    _, cache = model.run_with_cache(batch.tokens)
    for i, cell in cells:
        deltas = {}
        for site, mask in cell.ablation.masks:
            logits = cache[site.hook("logits")]
            new = logits.masked_fill(torch.tensor(mask), float("-inf")).softmax(-1)
            deltas[site.hook("weights")] = new - cache[site.hook("weights")]
        expected = central_difference_of_deltas(model, batch, deltas).numpy()
        np.testing.assert_allclose(
            result.per_prompt[("linear", "logit_diff")][i], expected, atol=1e-6
        )


def test_per_position_estimates_sum_to_the_cell_and_equal_finite_differences():
    model = routed_model("kimi", scale=0.15, n_layers=2, attnres_num_blocks=2)
    batch = random_batch(seed=2)
    result = attribute_routing(model, batch, groups="layers", by_position=True, progress=False)
    per_pos = result.by_position[("linear", "logit_diff")]
    np.testing.assert_allclose(
        per_pos.sum(-1), result.per_prompt[("linear", "logit_diff")], atol=1e-12
    )
    cell = next(
        c for c in result.plan if c.router == "attn_res" and c.group == "layer 1" and not c.is_noop
    )
    i = result.plan.index(cell)
    site, mask = cell.ablation.masks[0]
    new = masked_weights(model, batch, site, mask)
    for pos in (0, 3, 6):
        expected = central_difference(model, batch, site, new, positions=pos)
        np.testing.assert_allclose(per_pos[i, :, pos], expected.numpy(), atol=1e-6)
    # the last prompt answers at position 4: nothing after it can matter
    assert (per_pos[:, -1, 5:] == 0).all()
    table = result.position_table()
    assert len(table) == len(result.plan) * batch.tokens.shape[1]


@pytest.mark.parametrize("layout", ["kimi", "full"])
def test_norm_method_is_exact_where_the_rest_is_linear(layout):
    """After the final router come ln_final and the unembedding, and logit_diff is linear
    in the logits: the norm-refined estimate is the exact ablation effect; the linear one
    is not."""
    model = routed_model(layout)
    batch = random_batch(seed=3)
    families = ["embedding", "older", "prev_completed", "current"]
    result = attribute_routing(
        model,
        batch,
        routers="final_res",
        families=families,
        method=["linear", "norm"],
        progress=False,
    )
    exact = ablation_effects(
        model,
        batch,
        families=families,
        routers="final_res",
        metrics=["logit_diff"],
        n_bootstrap=20,
        progress=False,
    )
    norm = result.table[result.table.method == "norm"]
    linear = result.table[result.table.method == "linear"]
    np.testing.assert_allclose(norm.estimate.to_numpy(), exact.effect.to_numpy(), atol=1e-10)
    assert np.abs(linear.estimate.to_numpy() - exact.effect.to_numpy()).max() > 1e-4
    # the sources are read before the router (a module pre-hook), or after other hooks on
    # hook_sources where some watch it: the same estimates either way
    watched = [(lambda name: name.endswith("hook_sources"), lambda x, hook: None)]
    with model.hooks(fwd_hooks=watched):
        again = attribute_routing(
            model, batch, routers="final_res", families=families, method="norm", progress=False
        )
    np.testing.assert_allclose(again.table.estimate, norm.estimate, atol=1e-12)


def _rms_by_hand(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full"])
def test_norm_method_is_the_derivative_at_the_norm_output_of_every_router(layout):
    """Audit 202: ``method="norm"`` at the attention and MLP routers (the test above
    checks the final router only), and in `attribution_patch_routing_weights` (checked
    against no reference before), with left padding. Reference by hand, float64: the
    derivative of the metric along ``y + eps (RMSNorm(sum_i w_new_i V_i) - y)`` at each
    router's norm output ``y`` (``hook_normalized``, before the gain), all of a band cell's
    routers at once; ``w_new`` the masked weights, or the clean run's in patching."""
    model = routed_model(layout, scale=0.3)
    batch = random_batch(seed=4)
    result = attribute_routing(model, batch, method="norm", progress=False)
    _, cache = model.run_with_cache(batch.tokens)
    checked = 0
    for i, cell in enumerate(result.plan):
        deltas = {}
        for site, mask in cell.ablation.masks:
            logits = cache[site.hook("logits")]
            new = logits.masked_fill(torch.tensor(mask), float("-inf")).softmax(-1)
            norm = model.norm_after(site)
            mixed = (new.unsqueeze(-1) * cache[site.hook("sources")]).sum(-2)
            change = _rms_by_hand(mixed, norm.eps) - cache[norm.hook_normalized.name]
            deltas[norm.hook_normalized.name] = change
        if not deltas:
            continue
        expected = central_difference_of_deltas(model, batch, deltas).numpy()
        np.testing.assert_allclose(
            result.per_prompt[("norm", "logit_diff")][i], expected, atol=1e-7
        )
        checked += 1
    assert checked >= 12 and np.abs(result.per_prompt[("norm", "logit_diff")]).max() > 1e-3

    generator = torch.Generator().manual_seed(12)
    clean = torch.randint(1, 50, (2, 6), generator=generator)
    corrupted = torch.randint(1, 50, (2, 6), generator=generator)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # the second prompt is 4 tokens long, left-padded
    clean[1, :2] = corrupted[1, :2] = 0

    def metric(logits):
        return (logits[:, -1, 3] - logits[:, -1, 7]).sum()

    routers = routers_of(layout)
    _, clean_cache = model.run_with_cache(clean, attention_mask=mask)
    _, corrupted_cache = model.run_with_cache(corrupted, attention_mask=mask)
    estimate = attribution_patch_routing_weights(
        model, corrupted, clean_cache, metric, routers=routers, method="norm", attention_mask=mask
    )
    with torch.no_grad():
        base = float(metric(model(corrupted, attention_mask=mask)))
    largest = 0.0
    for site in model.sites():
        norm = model.norm_after(site)
        name = norm.hook_normalized.name
        mixed = (
            clean_cache[site.hook("weights")].unsqueeze(-1) * corrupted_cache[site.hook("sources")]
        ).sum(-2)
        change = _rms_by_hand(mixed, norm.eps) - corrupted_cache[name]
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                logits = model.run_with_hooks(
                    corrupted,
                    attention_mask=mask,
                    fwd_hooks=[(name, lambda y, hook, s=sign, d=change: y + s * EPS * d)],
                )
            values.append(float(metric(logits)))
        expected = base + (values[0] - values[1]) / (2 * EPS)
        got = float(estimate[routers.index(site.kind), 0 if site.layer is None else site.layer])
        # a float32 result: its rounding is up to 3e-8 here; the largest change of a
        # layout is 3.7e-3 (cumulative) to 7.4e-2 (kimi)
        assert abs(got - expected) <= 1e-7, (site, got, expected)
        largest = max(largest, abs(expected - base))
    assert largest > 1e-3


def test_table_has_the_shape_columns_and_order_of_ablation_effects():
    model = routed_model("cumulative", dtype=torch.float32, n_layers=4)
    batch = random_batch(n=6, seed=4)
    for groups in ("bands", "layers"):
        exact = ablation_effects(
            model,
            batch,
            groups=groups,
            metrics=["logit_diff", "logprob"],
            n_bootstrap=50,
            progress=False,
        )
        result = attribute_routing(
            model, batch, ["logit_diff", "logprob"], groups=groups, n_bootstrap=50, progress=False
        )
        table = result.table
        assert table.shape == (exact.shape[0], exact.shape[1] + 2)
        assert list(table.columns) == [*exact.columns, "estimate", "method"]
        same = [
            "router",
            "group",
            "layers",
            "family",
            "metric",
            "n_masked_routers",
            "skipped",
            "n_prompts",
        ]
        pd.testing.assert_frame_equal(table[same], exact[same])
        np.testing.assert_allclose(table.clean, exact.clean, rtol=1e-6)
        assert (table.method == "linear").all()
        np.testing.assert_array_equal(table.effect, table.estimate)
        assert (table[table.n_masked_routers == 0].estimate == 0).all()


def test_verify_top_agrees_exactly_with_ablation_effects():
    model = routed_model("cumulative", dtype=torch.float32)
    batch = random_batch(n=8, seed=5)
    result = attribute_routing(
        model,
        batch,
        ["logit_diff", "logprob"],
        groups="layers",
        n_bootstrap=100,
        seed=3,
        progress=False,
    )
    verified = result.verify_top(4)
    assert len(verified) == 8 and set(verified.metric) == {"logit_diff", "logprob"}
    exact = ablation_effects(
        model,
        batch,
        groups="layers",
        metrics=["logit_diff", "logprob"],
        n_bootstrap=100,
        seed=3,
        progress=False,
    )
    keys = ["router", "group", "family", "metric"]
    merged = verified.merge(exact, on=keys, suffixes=("", "_sweep"))
    assert len(merged) == len(verified)
    for column in ("clean", "ablated", "effect", "ci_low", "ci_high"):
        np.testing.assert_array_equal(merged[column], merged[f"{column}_sweep"], err_msg=column)
    # the verified cells are the largest estimates, each next to its exact value
    for metric, rows in verified.groupby("metric"):
        estimates = result.table[(result.table.metric == metric)].estimate.abs()
        assert rows.estimate.abs().min() >= np.sort(estimates.to_numpy())[-4] - 1e-12
    np.testing.assert_allclose(verified.error, verified.estimate - verified.effect)
    assert (verified.method == "exact").all()


@pytest.mark.parametrize(
    "layout,n_layers,families,routers",
    [
        ("cumulative", 2, ["older"], ("attn_res", "mlp_res")),  # no router has an older block
        ("kimi", 1, list(FAMILIES), ("attn_res",)),  # its one attention router reads 1 source
        ("full", 1, ["embedding", "current"], ("attn_res",)),
    ],
)
def test_attribution_of_a_plan_that_masks_nothing_estimates_zero(
    layout, n_layers, families, routers
):
    """Audit 44: when no cell of the plan masks anything (the family is at no router, or
    is every source of a one-source router), no router is captured and the metric does
    not reach any tensor that needs a gradient: `attribute_routing` refused with
    "metric 'logit_diff' does not depend on the logits through a gradient", blaming the
    metric, where `ablation_effects` of the same cells gives effect 0. Now every estimate
    is exactly 0, the clean metric is that of a plain forward pass, and a detached metric
    is still refused."""
    model = routed_model(layout, n_layers=n_layers, attnres_num_blocks=1)
    batch = random_batch(n=3, seed=2)
    kwargs = dict(families=families, routers=routers, n_bootstrap=40, progress=False)
    exact = ablation_effects(model, batch, metrics=["logit_diff", "logprob"], **kwargs)
    assert (exact.n_masked_routers == 0).all()  # the case: every cell a no-op
    result = attribute_routing(model, batch, ["logit_diff", "logprob"], **kwargs)
    assert (result.table.estimate == 0).all() and (result.table.effect == 0).all()
    with torch.no_grad():
        logits = model(batch.tokens)
    for metric in ("logit_diff", "logprob"):
        by_hand = metric_values(batch, logits, metric).numpy()
        assert np.abs(result.clean[metric] - by_hand).max() <= 1e-12
        rows = result.table[result.table.metric == metric]
        assert np.abs(rows.clean.to_numpy() - by_hand.mean()).max() <= 1e-12
    verified = result.verify_top(2)
    assert (verified.effect == 0).all()
    with pytest.raises(ValueError, match="does not depend on the logits through a gradient"):
        attribute_routing(
            model, batch, lambda b, logits: metric_values(b, logits, "accuracy"), **kwargs
        )


@pytest.mark.parametrize("layout", ["cumulative", "kimi"])
def test_attribution_patching_of_left_padded_prompts_uses_their_attention_mask(layout):
    """Row separability as the independent reference: with a metric summed over prompts,
    the estimate for a left-padded batch (clean cache and corrupted run with the mask)
    equals the sum over prompts of each prompt's estimate run alone, unpadded.
    Without the mask the padding is attended and the numbers differ (before, no mask
    could be given)."""
    model = routed_model(layout, scale=0.15)
    generator = torch.Generator().manual_seed(11)
    clean = torch.randint(1, 50, (2, 6), generator=generator)
    corrupted = torch.randint(1, 50, (2, 6), generator=generator)
    pad = 2  # the second prompt is 4 tokens long, left-padded
    clean[1, :pad] = corrupted[1, :pad] = 0
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :pad] = 0

    def metric(logits):  # summed over prompts: each row adds its own term
        return (logits[:, -1, 3] - logits[:, -1, 7]).sum()

    routers = routers_of(layout)
    _, clean_cache = model.run_with_cache(clean, attention_mask=mask)
    padded = attribution_patch_routing_weights(
        model, corrupted, clean_cache, metric, routers=routers, attention_mask=mask
    )
    alone = []
    for row, start in ((0, 0), (1, pad)):
        _, row_cache = model.run_with_cache(clean[row : row + 1, start:])
        alone.append(
            attribution_patch_routing_weights(
                model, corrupted[row : row + 1, start:], row_cache, metric, routers=routers
            )
        )
    # each estimate is the base metric plus the change; both add up over prompts
    expected = alone[0] + alone[1]
    assert torch.equal(padded.isnan(), expected.isnan())
    finite = ~padded.isnan()
    torch.testing.assert_close(padded[finite], expected[finite], atol=1e-5, rtol=0)
    _, unmasked_cache = model.run_with_cache(clean)
    unmasked = attribution_patch_routing_weights(
        model, corrupted, unmasked_cache, metric, routers=routers
    )
    assert float((unmasked[finite] - expected[finite]).abs().max()) > 1e-3


def test_attribution_patching_of_padded_prompts_at_eps_zero_is_finite_and_separable():
    """With eps 0 (the exact wrap of a Qwen3 with rms_norm_eps = 0) a padding position's
    routing weights can be 0 / 0 in both runs, and g * (nan - nan) made every estimate
    that sums over it nan, where the exact sweep is finite. A padding position never
    reaches a real one, so its change is 0: the padded batch's estimate equals the sum of
    the prompts' estimates run alone, unpadded (float64). Since `padding_eps` the padding
    is finite: a hook writes the nan into the clean run's padding (`nan_at_padding`)."""
    from helpers import hf_qwen3

    from hooked_attnres import HookedAttnRes

    model = HookedAttnRes.from_hf_qwen3(
        hf_qwen3(rms_norm_eps=0.0), wrap="exact", num_blocks=2, dtype=torch.float64
    ).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # content-dependent routing: the estimates are not all zero
        for site in model.sites():
            model.router(site).query.normal_(generator=generator)
    clean = torch.randint(1, 61, (2, 6), generator=generator)
    corrupted = torch.randint(1, 61, (2, 6), generator=generator)
    pad = 2
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :pad] = 0

    def metric(logits):
        return logits[:, -1, 3].sum()

    with model.hooks(fwd_hooks=[nan_at_padding(mask)]):
        _, clean_cache = model.run_with_cache(clean, attention_mask=mask)
    assert clean_cache["blocks.1.attn_res.hook_weights"][1, :pad].isnan().all()
    for by_pos in (False, True):
        padded = attribution_patch_routing_weights(
            model, corrupted, clean_cache, metric, by_pos=by_pos, attention_mask=mask
        )
        alone = []
        for row, start in ((0, 0), (1, pad)):
            _, row_cache = model.run_with_cache(clean[row : row + 1, start:])
            estimate = attribution_patch_routing_weights(
                model, corrupted[row : row + 1, start:], row_cache, metric, by_pos=by_pos
            )
            if by_pos:  # back to the batch's positions; a padding position changes nothing
                with torch.no_grad():
                    base = float(metric(model(corrupted[row : row + 1, start:])))
                estimate = torch.cat(
                    [estimate.new_full((*estimate.shape[:2], start), base), estimate], -1
                )
            alone.append(estimate)
        expected = alone[0] + alone[1]
        assert torch.equal(padded.isnan(), expected.isnan())
        finite = ~padded.isnan()
        assert finite.any(dim=-1).all()
        # the results are float32 (as the sweeps')
        torch.testing.assert_close(padded[finite], expected[finite], atol=1e-6, rtol=0)


def test_attribution_patching_keeps_a_finite_estimate_at_a_padding_position():
    """The padding rule of `attribution_patch_routing_weights` replaces a padding
    position's estimate only where it is not finite. A metric that reads a padding
    position's logits (``logits[:, -1]`` of a right-padded batch) depends on that
    position's own routing, and its finite estimate there is kept: the result equals
    ``metric + g . (w_clean - w_corrupted)`` computed by hand from the gradients of the
    metric with respect to every router's ``hook_weights`` (float64, eps 1e-6)."""
    model = randomize_routing(tiny_model(attnres_layout="kimi", dtype=torch.float64)).eval()
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (2, 6), generator=generator)
    corrupted = torch.randint(0, 50, (2, 6), generator=generator)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # right padding: the metric reads padding position 5 of prompt 1

    def metric(logits):
        return logits[:, -1, 3].sum()

    _, clean_cache = model.run_with_cache(clean, attention_mask=mask)
    estimate = attribution_patch_routing_weights(
        model, corrupted, clean_cache, metric, by_pos=True, attention_mask=mask
    )
    sites = [site for site in model.routing_layout.sites() if site.layer is not None]
    _, corrupted_cache = model.run_with_cache(corrupted, attention_mask=mask)
    deltas = {
        site: torch.zeros_like(corrupted_cache[site.hook("weights")], requires_grad=True)
        for site in sites
    }
    hooks = [(site.hook("weights"), lambda x, hook, d=deltas[site]: x + d) for site in sites]
    with model.hooks(fwd_hooks=hooks):
        value = metric(model(corrupted, attention_mask=mask))
    grads = torch.autograd.grad(value, list(deltas.values()))
    at_padding = 0.0  # the largest estimate of prompt 1's padding position 5
    for site, grad in zip(sites, grads, strict=True):
        change = clean_cache[site.hook("weights")] - corrupted_cache[site.hook("weights")]
        per_prompt = (grad * change).sum(-1)  # [batch, pos]
        at_padding = max(at_padding, abs(float(per_prompt[1, 5])))
        expected = value.detach() + per_prompt.sum(0)  # [pos]
        row = ["attn_res", "mlp_res"].index(site.kind)
        torch.testing.assert_close(estimate[row, site.layer], expected.float(), atol=1e-5, rtol=0)
    assert at_padding > 1e-2  # not 0: dropping it would be a silent wrong number


def test_attribution_patching_equals_finite_differences_and_matches_the_layout_of_patching():
    model = routed_model("kimi", scale=0.15)
    batch = random_batch(seed=6)
    _, clean_cache = model.run_with_cache(batch.tokens)

    def patching_metric(logits):
        return metric_values(batch, logits, "logit_diff").mean()

    estimate = attribution_patch_routing_weights(
        model,
        batch.corrupted_tokens,
        clean_cache,
        patching_metric,
        routers=("attn_res", "mlp_res", "final_res"),
    )
    exact = get_act_patch_routing_weights(
        model,
        batch.corrupted_tokens,
        clean_cache,
        patching_metric,
        routers=("attn_res", "mlp_res", "final_res"),
    )
    assert estimate.shape == exact.shape and estimate.dtype == exact.dtype
    assert torch.equal(estimate.isnan(), exact.isnan())
    corrupted = batch.corrupted_tokens
    with torch.no_grad():
        base = patching_metric(model(corrupted))
    corrupted_batch = TaskBatch(
        corrupted, batch.answer_pos, batch.answer, batch.contrast, corrupted, batch.targets
    )
    for row, router in enumerate(("attn_res", "mlp_res", "final_res")):
        for site in model.sites(router):
            clean = clean_cache[site.hook("weights")]
            slope = central_difference(model, corrupted_batch, site, clean).mean()
            column = 0 if site.layer is None else site.layer
            torch.testing.assert_close(
                estimate[row, column].double(), (base + slope).double(), atol=1e-5, rtol=0
            )
    by_pos = attribution_patch_routing_weights(
        model, corrupted, clean_cache, patching_metric, by_pos=True
    )
    assert by_pos.shape == (2, model.cfg.n_layers, corrupted.shape[1])
    torch.testing.assert_close(
        (by_pos - base.float()).sum(-1) + base.float(), estimate[:2], atol=1e-5, rtol=0
    )


def test_bfloat16_model_attribution_runs_in_float32_routing():
    model = routed_model("cumulative", dtype=torch.float32)
    batch = random_batch(n=6, seed=7)
    full = attribute_routing(model, batch, groups="bands", n_bootstrap=10, progress=False)
    half = attribute_routing(
        model.to(torch.bfloat16), batch, groups="bands", n_bootstrap=10, progress=False
    )
    assert np.isfinite(half.table.estimate).all()
    # bfloat16 activations: the estimates agree roughly (about 3 significant digits)
    np.testing.assert_allclose(
        half.table.estimate, full.table.estimate, atol=0.05 * full.table.estimate.abs().max()
    )


def test_bad_inputs_are_refused():
    model = routed_model("cumulative", dtype=torch.float32)
    batch = random_batch()
    with pytest.raises(ValueError, match="accuracy is piecewise constant"):
        attribute_routing(model, batch, "accuracy", progress=False)
    with pytest.raises(
        ValueError,
        match=r"must return one float per prompt, a tensor of shape \[batch\] = \[4\]; got \(\)",
    ):
        attribute_routing(
            model,
            batch,
            lambda b, logits: metric_values(b, logits, "logit_diff").mean(),
            progress=False,
        )
    with pytest.raises(ValueError, match="does not depend on the logits through a gradient"):
        attribute_routing(
            model, batch, lambda b, logits: metric_values(b, logits, "accuracy"), progress=False
        )
    with pytest.raises(ValueError, match="unknown source 'shortcut': families are"):
        attribute_routing(model, batch, families=["shortcut"], progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        attribute_routing(model, batch, "loss", progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        attribute_routing(model, batch, method="quadratic", progress=False)
    with pytest.raises(TypeError, match="batch must be a TaskBatch"):
        attribute_routing(model, batch.tokens, progress=False)
    weights_hook = [(model.site(1, "attn_res").hook("weights"), lambda w, hook: w)]
    with (
        model.hooks(fwd_hooks=weights_hook),
        pytest.raises(
            ValueError, match=r"a hook is already attached to blocks.1.attn_res.hook_weights"
        ),
    ):
        attribute_routing(model, batch, progress=False)
    out_hook = [(model.site(1, "mlp_res").hook("out"), lambda x, hook: x)]
    with model.hooks(fwd_hooks=out_hook):
        attribute_routing(model, batch, n_bootstrap=10, progress=False)  # linear: fine
        with pytest.raises(ValueError, match="already attached to blocks.1.mlp_res.hook_out"):
            attribute_routing(model, batch, method="norm", progress=False)
    # the norm method also reads the norm after the router unedited
    for point in ("blocks.1.ln2.hook_normalized", "blocks.2.ln1.hook_scale"):
        with model.hooks(fwd_hooks=[(point, lambda x, hook: x)]):
            attribute_routing(model, batch, n_bootstrap=10, progress=False)  # linear: fine
            with pytest.raises(ValueError, match=f"already attached to {point}"):
                attribute_routing(model, batch, method="norm", progress=False)
    result = attribute_routing(model, batch, n_bootstrap=10, progress=False)
    with pytest.raises(ValueError, match="k=0 verifies no cell"):
        result.verify_top(0)
    with pytest.raises(ValueError, match=r"min_masked_mass must be in \(0, 1\]"):
        result.verify_top(3, min_masked_mass=1.5)
    with pytest.raises(ValueError, match="min_masked_mass must be a finite number or None"):
        result.verify_top(3, min_masked_mass=True)  # was read as 1.0: no cell, silently
    with pytest.raises(ValueError, match="metric 'logprob' was not computed"):
        result.verify_top(3, metric="logprob")
    with pytest.raises(ValueError, match="by_position=True"):
        result.position_table()
    model.train()
    with pytest.raises(ValueError, match=r"needs the model in eval mode \(model.eval\(\)\)"):
        attribute_routing(model, batch, progress=False)
    with pytest.raises(ValueError, match="eval mode"):
        result.verify_top(3)
    model.eval()
    _, cache = model.run_with_cache(batch.tokens)
    with pytest.raises(ValueError, match="patching_metric must return a scalar"):
        attribution_patch_routing_weights(
            model, batch.corrupted_tokens, cache, lambda logits: logits[:, -1, 0]
        )
    with pytest.raises(ValueError, match="no routers"):
        attribute_routing(tiny_model(attnres_layout="none"), batch, progress=False)
    # arguments checked before any pass (a bad chunk once gave an empty, all-zero table)
    for bad in (-1, 0, 2.5):
        with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
            attribute_routing(model, batch, chunk=bad, progress=False)
    with pytest.raises(ValueError, match=r"confidence must be a number in \(0, 1\)"):
        attribute_routing(model, batch, confidence=95, progress=False)
    # a cache from a model with another routing is refused, as in exact patching
    other = routed_model("kimi", dtype=torch.float32)
    _, other_cache = other.run_with_cache(batch.tokens)
    with pytest.raises(ValueError, match="comes from a model with layout .kimi."):
        attribution_patch_routing_weights(
            model, batch.corrupted_tokens, other_cache, lambda logits: logits[:, -1, 0].sum()
        )
    # masking that leaves a router nothing, together with hooks already attached, is refused
    from hooked_attnres.interventions import mask_sources

    site = model.site(2, "attn_res")
    labels = model.source_labels(site)
    outer = mask_sources(model, labels[:-1], routers=[site])
    with model.hooks(fwd_hooks=outer), pytest.raises(ValueError, match="masks every source"):
        attribute_routing(
            model,
            batch,
            families=["current"],
            routers=["attn_res"],
            groups={"l2": [2]},
            progress=False,
        )
    # the parameters' requires_grad flags are restored, also after an error
    assert all(p.requires_grad for p in model.parameters())


def test_plan_is_the_one_ablation_compiler():
    model = routed_model("full", dtype=torch.float32)
    result = attribute_routing(
        model, random_batch(), groups="bands", n_bootstrap=10, progress=False
    )
    expected = plan_ablations(model, groups="bands")
    assert [cell.ablation for cell in result.plan] == [cell.ablation for cell in expected]


@pytest.mark.parametrize("condition", ["attnres", "vanilla"])
def test_validation_on_the_shipped_checkpoints(condition):
    """Estimates against the exact per-layer sweep on 32 probe prompts (the full numbers,
    on 256 prompts, come from benchmarks/validate_attribution.py; docs/analysis.md).

    The trained AttnRes model: every effect is small (|effect| <= 0.06 on a logit
    difference near 14) and the estimate ranks them with Spearman 0.66. The wrapped
    vanilla model: masking `current` at layer 1's attention router destroys the answer
    (-13.4), which the linear estimate misses entirely (an all-or-nothing router: it
    removes 95 % of the weight and the answer circuit downstream saturates); verify_top
    reports it, and min_masked_mass makes sure it is among the verified cells.
    """
    from hooked_attnres.analysis.dissociation import _spearman
    from hooked_attnres.study import load_condition, probe_prompts

    model = load_condition(condition)
    batch = probe_prompts(model, 32)
    result = attribute_routing(
        model, batch, groups="layers", method=["linear", "norm"], n_bootstrap=100, progress=False
    )
    exact = ablation_effects(
        model, batch, groups="layers", metrics=["logit_diff"], n_bootstrap=100, progress=False
    )
    x = exact.effect.to_numpy()
    linear = result.table[result.table.method == "linear"].estimate.to_numpy()
    norm = result.table[result.table.method == "norm"].estimate.to_numpy()
    top = np.argsort(-np.abs(x))[:10]
    if condition == "attnres":
        assert _spearman(linear, x) > 0.5 and _spearman(norm, x) > 0.5
        assert np.abs(linear - x)[top].max() < 0.1
        return
    assert _spearman(linear, x) > 0.7 and _spearman(norm, x) > 0.9
    failing = exact.index[
        (exact.router == "attn_res") & (exact.group == "layer 1") & (exact.family == "current")
    ][0]
    assert x[failing] < -10 and abs(linear[failing]) < 0.5 and abs(norm[failing]) < 0.5
    assert result.masked_mass[failing] > 0.95
    verified = result.verify_top(10, min_masked_mass=0.9)
    row = verified[
        (verified.router == "attn_res")
        & (verified.group == "layer 1")
        & (verified.family == "current")
    ]
    assert len(row) == 1 and row.effect.iloc[0] == exact.effect[failing]
    assert abs(row.error.iloc[0]) > 10
    assert (verified.verified_because == "masked mass").sum() >= 1


@pytest.mark.parametrize("wrap", ["recency", "exact"])
def test_linear_estimate_equals_finite_differences_on_wrapped_qwen3(wrap):
    """The from_hf_qwen3 wraps (zero queries: content-independent routing), float64."""
    from helpers import hf_qwen3

    from hooked_attnres import HookedAttnRes

    bias = {"recency_bias": 1.0} if wrap == "recency" else {}  # the exact wrap has none
    model = HookedAttnRes.from_hf_qwen3(
        hf_qwen3(), wrap=wrap, num_blocks=3, dtype=torch.float64, **bias
    ).eval()
    batch = random_batch(d_vocab=model.cfg.d_vocab, seed=8)
    routers = ("attn_res", "mlp_res", "final_res") if wrap == "exact" else ("attn_res", "mlp_res")
    result = attribute_routing(model, batch, routers=routers, groups="layers", progress=False)
    estimates = result.per_prompt[("linear", "logit_diff")]
    checked = 0
    for i, cell in enumerate(result.plan):
        if cell.is_noop:
            continue
        site, mask = cell.ablation.masks[0]
        expected = central_difference(model, batch, site, masked_weights(model, batch, site, mask))
        np.testing.assert_allclose(estimates[i], expected.numpy(), rtol=0, atol=1e-6)
        checked += 1
    assert checked >= 6 and np.abs(estimates).max() > 1e-4


def test_a_users_position_hook_after_the_last_attention_sees_every_position():
    """Under a surrounding hook that edits position 0 of the last MLP's output (a position
    the metric does not read), the estimates are the derivatives of what plain hooked
    forward passes give, and the clean metric is theirs: the pass must not show that hook
    the answer position alone as its position 0 (``logit_positions``)."""
    model = routed_model("kimi", scale=0.15, n_layers=3, attnres_num_blocks=3)
    batch = random_batch(seed=5)
    last = model.cfg.n_layers - 1

    def zero_position_0(x, hook):
        x = x.clone()
        x[:, 0] = 0.0
        return x

    def zero_answer(x, hook):
        x = x.clone()
        x[torch.arange(len(x)), batch.answer_pos] = 0.0
        return x

    user = [(f"blocks.{last}.hook_mlp_out", zero_position_0)]
    at_answer = [(f"blocks.{last}.hook_mlp_out", zero_answer)]
    # the test can tell: at the answer position the hook changes the metric
    assert (metric_at(model, batch, at_answer) - metric_at(model, batch, [])).abs().max() > 1e-3
    with model.hooks(fwd_hooks=user):
        result = attribute_routing(
            model, batch, routers=("mlp_res", "final_res"), groups="layers", progress=False
        )
        np.testing.assert_allclose(
            result.clean["logit_diff"], metric_at(model, batch, []).numpy(), rtol=0, atol=1e-10
        )
        estimates = result.per_prompt[("linear", "logit_diff")]
        checked = 0
        for i, cell in enumerate(result.plan):
            if cell.is_noop or cell.group not in (f"layer {last}", "final"):
                continue
            site, mask = cell.ablation.masks[0]
            new = masked_weights(model, batch, site, mask)
            expected = central_difference(model, batch, site, new)
            np.testing.assert_allclose(estimates[i], expected.numpy(), rtol=0, atol=1e-6)
            checked += 1
    assert checked >= 4


def test_masked_mass_averages_the_positions_the_metric_reads_at_every_router(routed_layout):
    """Up to the answer position at a router that feeds an attention, the answer position
    at the routers after the last attention (recomputed here from a cache), the same with
    hooks attached (where the pass runs every position)."""
    model = routed_model(routed_layout, scale=0.5, n_layers=3, attnres_num_blocks=3)
    batch = random_batch(seed=6)  # one prompt answers two positions before the end
    result = attribute_routing(
        model, batch, routers=routers_of(routed_layout), groups="layers", progress=False
    )
    _, cache = model.run_with_cache(batch.tokens)
    n_pos = batch.tokens.shape[1]
    positions = torch.arange(n_pos)
    last_attention = 2 * model.cfg.n_layers - 2
    checked = 0
    for i, cell in enumerate(result.plan):
        if cell.is_noop:
            continue
        site, mask = cell.ablation.masks[0]
        removed = cache[site.hook("weights")][..., torch.tensor(mask)].sum(-1)  # [batch, pos]
        if site.sublayer > last_attention:
            read = positions[None, :] == batch.answer_pos[:, None]
        else:
            read = positions[None, :] <= batch.answer_pos[:, None]
        expected = ((removed * read).sum(-1) / read.sum(-1)).mean()
        assert result.masked_mass[i] == pytest.approx(float(expected), abs=1e-12)
        checked += 1
    assert checked >= 8
    watched = [(lambda name: name.endswith("hook_mlp_out"), lambda x, hook: None)]
    with model.hooks(fwd_hooks=watched):
        again = attribute_routing(
            model, batch, routers=routers_of(routed_layout), groups="layers", progress=False
        )
    np.testing.assert_allclose(again.masked_mass, result.masked_mass, rtol=0, atol=1e-12)


def test_a_callable_metric_must_read_the_answer_position_only():
    """Attribution computes logits at the answer positions only: a callable metric that
    reads another position is refused (it used to read the answer position's logits
    instead, silently); one that reads the answer position gives the built-in's numbers."""
    model = routed_model("kimi")
    batch = random_batch()  # one prompt answers two positions before the end

    def at_last(b, logits):
        rows = torch.arange(len(b))
        return logits[rows, -1, b.answer] - logits[rows, -1, b.contrast]

    def before_answer(b, logits):
        return logits[torch.arange(len(b)), b.answer_pos - 1, b.answer]

    def at_answer(b, logits):
        rows = torch.arange(len(b))
        return logits[rows, b.answer_pos, b.answer] - logits[rows, b.answer_pos, b.contrast]

    for metric in (at_last, before_answer):
        for hooks in ([], [("hook_embed", lambda x, hook: x)]):  # both passes of attribution
            with model.hooks(fwd_hooks=hooks):
                with pytest.raises(ValueError, match="reads logits at positions other than"):
                    attribute_routing(model, batch, metric, progress=False)
    got = attribute_routing(model, batch, at_answer, n_bootstrap=10, progress=False)
    expected = attribute_routing(model, batch, "logit_diff", n_bootstrap=10, progress=False)
    np.testing.assert_allclose(
        got.per_prompt[("linear", "at_answer")], expected.per_prompt[("linear", "logit_diff")]
    )


def test_every_chunk_of_attribution_is_probed():
    model = routed_model("cumulative")
    batch = random_batch(n=12)  # only the last prompt answers before the end

    def at_last(b, logits):
        rows = torch.arange(len(b))
        return logits[rows, -1, b.answer] - logits[rows, -1, b.contrast]

    with pytest.raises(ValueError, match="reads logits at positions other than"):
        attribute_routing(model, batch, at_last, chunk=4, progress=False)


def test_verify_top_refuses_other_hooks_than_the_attribution_had():
    """attribute_routing under a user's hooks and verify_top outside them (or the other
    way round) compared estimates of one model with exact effects of another, silently."""
    model = routed_model("kimi", dtype=torch.float32)
    batch = random_batch(n=4, seed=2)

    def halve(act, hook):
        return act * 0.5

    hooks = [("blocks.1.hook_mlp_out", halve)]
    kwargs = dict(groups="layers", n_bootstrap=20, seed=0, progress=False)
    with model.hooks(fwd_hooks=hooks):
        hooked = attribute_routing(model, batch, ["logit_diff"], **kwargs)
        inside = hooked.verify_top(2)  # the same hooks: allowed
    with pytest.raises(ValueError, match="other hooks attached to the model than attribute"):
        hooked.verify_top(2)
    plain = attribute_routing(model, batch, ["logit_diff"], **kwargs)
    with model.hooks(fwd_hooks=hooks), pytest.raises(ValueError, match="other hooks attached"):
        plain.verify_top(2)
    # what the check protects: the exact rows under the hooks are not those without
    outside = plain.verify_top(2)
    assert not np.allclose(
        inside.sort_values("effect").effect, outside.sort_values("effect").effect
    )


def test_attribution_refuses_backward_hooks_which_would_edit_its_gradients():
    """A backward hook runs in the attribution's backward pass, and one that returns a
    tensor replaces the gradient there: a hook doubling the gradient at layer 1's
    ``hook_resid_pre`` moved the cell estimates of a 3-layer kimi model by up to 0.019
    (largest estimate 0.17) and the patching estimates by their whole change from the
    base metric, while the exact effects (forward passes) stay as they are. Both refuse;
    without the hook the estimates are the finite differences checked above."""
    model = routed_model("kimi", scale=0.15, n_layers=3, attnres_num_blocks=3)
    batch = random_batch(seed=3)
    _, clean_cache = model.run_with_cache(batch.tokens)

    def metric(logits):
        return metric_values(batch, logits, "logit_diff").sum()

    def double(grad, hook):
        return 2 * grad

    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", double)]):
        with pytest.raises(ValueError, match=r"backward hook .*blocks\.1\.hook_resid_pre"):
            attribute_routing(model, batch, groups="layers", progress=False)
        with pytest.raises(ValueError, match=r"backward hook .*blocks\.1\.hook_resid_pre"):
            attribution_patch_routing_weights(model, batch.corrupted_tokens, clean_cache, metric)
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda *args: None)
    try:
        with pytest.raises(ValueError, match=r"backward hook .*<global>"):
            attribute_routing(model, batch, groups="layers", progress=False)
    finally:
        handle.remove()
    assert all(param.requires_grad for param in model.parameters())  # restored
    attribute_routing(model, batch, groups="layers", progress=False)  # no hook: runs


def test_norm_method_refuses_module_hooks_between_the_router_and_its_norm():
    """``method="norm"`` recomputes the norm's input as the router's weighted sum. A raw
    PyTorch forward hook on the router module (or a forward pre-hook on the norm) edits
    that input where no hook point shows it: with the forward hook below, the per-prompt
    estimates of masking a family at layer 1's attention router were up to 0.15 off the
    method's own definition (the first-order change through the hooked norm input; 0.40
    against 0.25 for one prompt), and ``current``'s mean read 0.051 for -0.001. It refuses;
    the linear estimate is exact through such hooks (it is the derivative of the hooked
    model: finite differences)."""
    model = routed_model("kimi", scale=0.15, n_layers=3, attnres_num_blocks=3)
    batch = random_batch(seed=4)
    site = model.site(1, "attn_res")
    gains = torch.linspace(0.2, 2.0, model.cfg.d_model, dtype=torch.float64)
    for module, register in (
        (model.router(site), "register_forward_hook"),
        (model.blocks[1].ln1, "register_forward_pre_hook"),
    ):
        if register == "register_forward_hook":
            handle = module.register_forward_hook(lambda mod, args, out: out * gains)
        else:
            handle = module.register_forward_pre_hook(lambda mod, args: (args[0] * gains,))
        try:
            with pytest.raises(ValueError, match=r"PyTorch forward .*blocks\.1\.attn_res"):
                attribute_routing(model, batch, groups="layers", method="norm", progress=False)
            result = attribute_routing(model, batch, "logit_diff", groups="layers", progress=False)
            cell = next(
                i
                for i, c in enumerate(result.plan)
                if c.ablation.masks and c.ablation.masks[0][0] == site and c.family == "embedding"
            )
            (_, mask), *_ = result.plan[cell].ablation.masks
            expected = central_difference(
                model, batch, site, masked_weights(model, batch, site, mask)
            )
            np.testing.assert_allclose(
                result.per_prompt[("linear", "logit_diff")][cell], expected.numpy(), atol=1e-6
            )
        finally:
            handle.remove()


def test_norm_method_in_bfloat16_is_as_close_to_float64_as_the_linear_one():
    """In a bfloat16 model the norm method rounded the masked router's normalised output
    to bfloat16 before subtracting the model's (rounded) one, so each element of a small
    change was a difference of two 8-bit numbers: here its cell estimates were 5.9x as far
    from the float64 estimates of the same weights as the linear method's (7.3e-5 against
    1.2e-5). Both normalised outputs are now float32: 1.2e-5, as close as the linear
    method's (the float64 estimates are checked against finite differences above)."""
    model = routed_model("cumulative", scale=0.3, n_layers=3, attnres_num_blocks=3)
    batch = random_batch(n=8, seed=3)
    methods = ["linear", "norm"]
    exact = attribute_routing(model, batch, groups="layers", method=methods, progress=False)
    half = attribute_routing(
        model.to(torch.bfloat16), batch, groups="layers", method=methods, progress=False
    )
    error = {
        method: np.abs(
            half.per_prompt[(method, "logit_diff")].mean(1)
            - exact.per_prompt[(method, "logit_diff")].mean(1)
        ).max()
        for method in methods
    }
    assert error["linear"] > 0  # bfloat16 rounding is there to compare with
    assert error["norm"] <= 1.5 * error["linear"], error


def test_verify_top_refuses_other_weights_than_the_attribution_had():
    """Weights loaded into the same model object after the attribution (a loop over
    checkpoints) gave exact rows of the other weights next to the first ones' estimates:
    the effects of the same 3 cells moved by up to 0.026 (kimi, 3 layers) and ``error``
    compared two models. verify_top refuses after any edit of a parameter (in place, a
    reload, a dtype change); with the weights unchanged it runs."""
    model = routed_model("kimi", scale=0.15, n_layers=3, attnres_num_blocks=3)
    batch = random_batch(seed=2)
    result = attribute_routing(model, batch, groups="layers", n_bootstrap=10, progress=False)
    result.verify_top(2)  # unchanged weights: runs
    other = routed_model("kimi", scale=0.9, n_layers=3, attnres_num_blocks=3)
    original = {name: value.clone() for name, value in model.state_dict().items()}
    edits = [
        lambda: model.load_state_dict(other.state_dict()),
        lambda: model.blocks[0].attn.W_Q.mul_(1.0),  # in place, even without a change
        lambda: model.to(torch.float32),
    ]
    for edit in edits:
        with torch.no_grad():
            edit()
        with pytest.raises(ValueError, match="other weights than attribute_routing"):
            result.verify_top(2)
        model.to(torch.float64).load_state_dict(original)
        result = attribute_routing(model, batch, groups="layers", n_bootstrap=10, progress=False)
        result.verify_top(2)


def test_masked_mass_selects_the_positions_the_metric_reads():
    """Audit 30: `attribute_routing`'s masked mass averaged each router's removed weight
    over the positions the metric reads by multiplying by a 0 / 1 mask (and summed the
    masked sources the same way), so a nan weight after the answer position (a right-
    padded prompt whose pad token has a zero embedding in a model with eps = 0: 0 / 0
    routing there) made the cell's mass nan. Now the positions and sources are selected:
    the mass equals the mean over the read positions computed by hand."""
    from hooked_attnres.analysis.attribution import _Capture, _masked_mass, _metric_positions
    from hooked_attnres.analysis.effects import plan_ablations

    model = randomize_routing(tiny_model(attnres_layout="full"))
    plan = plan_ablations(model)
    sites = {site for cell in plan for site, _ in cell.ablation.masks}
    answer_pos = torch.tensor([1, 3])
    captures = {}
    for site in sites:
        weights = torch.rand(2, 4, model.routing_layout.n_sources(site)).softmax(-1)
        weights[0, 2:] = float("nan")  # prompt 0's positions after its answer
        captures[site] = _Capture(weights=weights)
    got = _masked_mass(model, plan, captures, answer_pos)
    last_attention = model.routing_layout.last_attention_sublayer
    for i, cell in enumerate(plan):
        for j, (site, mask) in enumerate(cell.ablation.masks):
            read = _metric_positions(site, last_attention, 4, answer_pos)
            expected = sum(
                np.mean(
                    [
                        sum(
                            float(captures[site].weights[b, p, s])
                            for s in range(len(mask))
                            if mask[s]
                        )
                        for p in range(4)
                        if read[b, p]
                    ]
                )
                for b in range(2)
            )
            assert abs(float(got[i, j]) - expected) <= 1e-6
    assert got.isfinite().all()


def test_flags_are_refused_unless_true_or_false():
    """Audit 79: ``by_position`` and ``by_pos`` were read by truthiness, so
    ``by_position="False"`` kept every per-position estimate and ``by_pos="no"`` returned
    ``[routers, n_layers, pos]`` in place of ``[routers, n_layers]``, silently. Now a value
    that is not True or False is refused by name (`require_bool`)."""
    model = routed_model("cumulative", dtype=torch.float32)
    batch = random_batch()
    for bad in ("False", 0, None):
        with pytest.raises(TypeError, match="by_position must be True or False"):
            attribute_routing(model, batch, by_position=bad, progress=False)
    _, cache = model.run_with_cache(batch.tokens)

    def metric(logits):
        return logits[:, -1, 0].sum()

    for bad in ("no", 1):
        with pytest.raises(TypeError, match="by_pos must be True or False"):
            attribution_patch_routing_weights(
                model, batch.corrupted_tokens, cache, metric, by_pos=bad
            )
    # NumPy booleans are taken, as everywhere
    shape = attribution_patch_routing_weights(
        model, batch.corrupted_tokens, cache, metric, by_pos=np.False_
    ).shape
    assert shape == (2, model.cfg.n_layers)


def test_distinct_callable_metrics_of_one_name_are_refused_with_the_remedy():
    """Audit 79: two different lambdas share the name ``<lambda>`` (the table and
    ``per_prompt`` key metrics by name, so refusing is right), but the refusal said
    "each entry would give the same rows again; give each once", which is false for two
    different metrics and gives no way out. Now it says to name them."""
    model = routed_model("cumulative", dtype=torch.float32)
    batch = random_batch()
    metrics = [
        lambda b, logits: metric_values(b, logits, "logit_diff"),
        lambda b, logits: metric_values(b, logits, "logprob"),
    ]
    for run in (attribute_routing, ablation_effects):
        with pytest.raises(ValueError, match=r"different callables named '<lambda>'.*__name__"):
            run(model, batch, metrics=metrics, progress=False)
    with pytest.raises(ValueError, match="metrics repeats"):  # one callable twice: as before
        attribute_routing(model, batch, metrics=[metrics[0], metrics[0]], progress=False)


def test_one_metric_given_twice_as_equal_objects_is_a_repeat_not_two_callables():
    """Audit 87: 6d4c391 told "different callables" by identity (``is not``), so one
    metric given twice as two equal objects got "metrics has different callables named
    'logprob' ... Give each callable its own __name__", a false message with a wrong
    remedy: a name built at run time (``"log" + "prob"``, a command line's, a NumPy
    string) is equal to the literal but not the same object, and ``obj.method`` makes a
    new bound method at each access. They are the same metric twice, refused as before
    6d4c391 ("metrics repeats ... give each once"); different callables of one name are
    still refused with the remedy."""
    from hooked_attnres.analysis.effects import check_metrics

    class Scorer:
        def logprob(self, batch, logits):
            return metric_values(batch, logits, "logprob")

    scorer = Scorer()
    literal, built = "logprob", "".join(["log", "prob"])
    assert built == literal and built is not literal
    assert scorer.logprob == scorer.logprob and scorer.logprob is not scorer.logprob
    for metrics in (
        [literal, built],
        [literal, np.str_(literal)],
        [scorer.logprob, scorer.logprob],
    ):
        with pytest.raises(ValueError, match=r"^metrics repeats .*give each once$"):
            check_metrics(metrics)
    with pytest.raises(ValueError, match=r"different callables named 'logprob'.*__name__"):
        check_metrics([scorer.logprob, Scorer().logprob])  # two objects' methods


def test_verify_top_of_zero_cells_verifies_the_masked_mass_cells_only():
    """Audit 79: ``verify_top(0, min_masked_mass=m)`` (verify only the all-or-nothing
    cells, whatever their estimate) was refused as "k must be an integer >= 1". Now it
    returns the `ablation_effects` rows of exactly the cells whose masked mass reaches
    ``m``; a threshold no cell reaches gives an empty table with the same columns, and
    ``k=0`` alone (which verifies nothing) is refused with the remedy."""
    model = routed_model("kimi", dtype=torch.float32)
    batch = random_batch(n=6, seed=7)
    kwargs = dict(groups="layers", n_bootstrap=50, progress=False)
    result = attribute_routing(model, batch, ["logit_diff", "logprob"], **kwargs)
    threshold = float(np.quantile(result.masked_mass, 0.8))
    chosen = {
        (cell.router, cell.group, cell.family)
        for cell, mass in zip(result.plan, result.masked_mass, strict=True)
        if mass >= threshold
    }
    assert 0 < len(chosen) < len(result.plan)
    verified = result.verify_top(0, min_masked_mass=threshold)
    assert set(zip(verified.router, verified.group, verified.family, strict=True)) == chosen
    assert len(verified) == 2 * len(chosen) and (verified.verified_because == "masked mass").all()
    exact = ablation_effects(model, batch, metrics=["logit_diff", "logprob"], **kwargs)
    merged = verified.merge(exact, on=["router", "group", "family", "metric"], suffixes=("", "_x"))
    assert len(merged) == len(verified)
    for column in ("clean", "ablated", "effect", "ci_low", "ci_high"):
        np.testing.assert_array_equal(merged[column], merged[f"{column}_x"], err_msg=column)
    none = result.verify_top(0, min_masked_mass=1.0)
    assert result.masked_mass.max() < 1.0 and len(none) == 0
    assert list(none.columns) == list(result.verify_top(1).columns)
    with pytest.raises(ValueError, match="k=0 verifies no cell.*min_masked_mass"):
        result.verify_top(0)
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        result.verify_top(-1)


def test_progress_and_fast_flags_are_refused_unless_true_or_false():
    """Audit 81: ``progress`` (attribute_routing, verify_top, run_ablations,
    ablation_effects) and ``fast`` (run_ablations, ablation_effects) were read by
    truthiness: ``progress="no"`` showed the bar and ``fast="False"`` took the fast path.
    Each is refused by name now (`require_bool`, the one rule for flags), before any work."""
    model = routed_model("cumulative", dtype=torch.float32)
    batch = random_batch()
    plan = plan_ablations(model, ["embedding"], "attn_res", "all")
    calls = {
        "attribute_routing": lambda **kw: attribute_routing(model, batch, **kw),
        "ablation_effects": lambda **kw: ablation_effects(
            model, batch, families=["embedding"], metrics=["logit_diff"], n_bootstrap=10, **kw
        ),
        "run_ablations": lambda **kw: run_ablations(model, batch, plan, **kw),
    }
    for name, call in calls.items():
        for bad in ("no", 0, None):
            with pytest.raises(TypeError, match=f"^progress must be True or False, got {bad!r}$"):
                call(progress=bad)
            if name != "attribute_routing":
                with pytest.raises(TypeError, match=f"^fast must be True or False, got {bad!r}$"):
                    call(fast=bad, progress=False)
    result = attribute_routing(model, batch, n_bootstrap=10, progress=False)
    with pytest.raises(TypeError, match="^progress must be True or False, got 'False'$"):
        result.verify_top(1, progress="False")
    assert len(result.verify_top(1, progress=np.False_)) == 1  # NumPy booleans are taken


def test_a_source_index_out_of_range_at_some_router_names_the_remedy():
    """Audit 81: ``families=[1]`` in a sweep over routers that read different numbers of
    sources (layer 0's attention router reads the embedding alone) was refused with
    "source index 1 is out of range ..." and no way out; the message now says that an
    index counts one router's sources and to name the family or label instead (a router
    that lacks it selects nothing there)."""
    model = routed_model("kimi", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"source index 1 is out of range .*name the family"):
        plan_ablations(model, families=[1], routers="attn_res", groups="layers")
    # the named family runs: layer 0's router, which lacks it, is left out of its masks
    (cell, *_) = plan_ablations(model, families=["current"], routers="attn_res", groups="all")
    assert 0 not in [site.layer for site, _ in cell.ablation.masks]


def test_verify_top_refuses_to_rank_estimates_that_are_not_numbers():
    """Audit 81: in a float16 model whose forward pass overflows, 17 of 32 cells of the
    per-layer sweep had NaN estimates; ``verify_top(3)`` ranked by ``|estimate|`` with
    NaN sorted last, so it verified three cells whose estimate was 0 and returned them as
    "the top estimates" (the NaN cells, of unknown size, were never looked at), and
    ``min_masked_mass`` skipped the cells whose masked mass was NaN. Now it refuses,
    naming the cells and the remedy (float32)."""
    model = routed_model("kimi", dtype=torch.float64, scale=0.5)
    with torch.no_grad():
        model.blocks[1].mlp.W_out.mul_(1e8)  # its output overflows float16
    model = model.to(torch.float16)
    batch = random_batch(n=6, seed=1)
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        result = attribute_routing(model, batch, groups="layers", n_bootstrap=10, progress=False)
    estimates = result.per_prompt[("linear", "logit_diff")].mean(axis=1)
    assert np.isnan(estimates).any() and not np.isnan(estimates).all()  # some cells NaN
    with pytest.raises(ValueError, match=r"not finite .* float32"):
        result.verify_top(3)
    with pytest.raises(ValueError, match=r"not finite .* float32"):
        result.verify_top(0, min_masked_mass=0.5)


def test_a_callable_metric_is_told_from_nan_logits():
    """Audit 81: `reads_answer_only` compared the metric of NaN-padded logits with its
    value on the answer logits by ``allclose``, for which NaN != NaN; a prompt whose own
    logits were NaN (a float16 overflow, here a hook writing NaN into one prompt) made a
    metric that reads the answer position only look like one reading other positions:
    attribute_routing refused it, blaming the metric. Prompts whose answer logits are not
    finite now tell nothing either way; the others decide (a metric reading
    ``answer_pos - 1`` is still refused), and when no probed prompt is finite the refusal
    says the logits are not finite."""
    model = routed_model("kimi", dtype=torch.float32)
    batch = random_batch(n=6, seed=1)

    def nan_in_prompt_0(x, hook):
        x = x.clone()
        x[0] = float("nan")
        return x

    def answer_only(b, logits):
        return metric_values(b, logits, "logit_diff")

    def before_answer(b, logits):
        rows = torch.arange(len(b))
        return logits[rows, b.answer_pos - 1, b.answer] * 1.0

    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", nan_in_prompt_0)]):
        with pytest.warns(RuntimeWarning, match="NaN or infinite"):
            result = attribute_routing(model, batch, answer_only, n_bootstrap=10, progress=False)
        estimates = result.per_prompt[("linear", "answer_only")]
        assert np.isnan(estimates[:, 0]).any() and np.isfinite(estimates[:, 1:]).all()
        with pytest.raises(ValueError, match="reads logits at positions other than"):
            attribute_routing(model, batch, before_answer, n_bootstrap=10, progress=False)
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", lambda x, hook: x * float("nan"))]):
        with pytest.raises(ValueError, match="logits are not finite"):
            attribute_routing(model, batch, answer_only, n_bootstrap=10, progress=False)


def test_attribution_runs_under_inference_mode_and_on_a_batch_made_there():
    """The estimates do not depend on where the call or the batch was made (audit 175:
    under ``torch.inference_mode()``, or on a batch whose tensors were made there, the
    answer positions indexed the logits in the backward's graph as inference tensors and
    the call failed: "Inference tensors cannot be saved for backward")."""
    model = routed_model("kimi", n_layers=2, attnres_num_blocks=2)
    batch = random_batch()
    kwargs = dict(metrics=["logit_diff", "logprob"], groups="layers", method=["linear", "norm"])
    kwargs.update(n_bootstrap=40, progress=False)
    plain = attribute_routing(model, batch, **kwargs)
    with torch.inference_mode():
        inside = attribute_routing(model, batch, **kwargs)
        made_there = batch[list(range(len(batch)))]  # its tensors are inference tensors
    assert made_there.answer_pos.is_inference()
    outside = attribute_routing(model, made_there, **kwargs)
    assert np.abs(plain.per_prompt[("linear", "logit_diff")]).max() > 1e-3
    for result in (inside, outside):
        for key, values in plain.per_prompt.items():
            np.testing.assert_array_equal(result.per_prompt[key], values)
        np.testing.assert_array_equal(result.masked_mass, plain.masked_mass)


def test_attribution_refuses_a_batch_mean_intervention_which_couples_the_prompts():
    """Under a ``value="mean"`` patch of a block source the prompts share the batch's mean,
    so moving one prompt's routing weights changes the others' metrics: one backward of
    the summed metric put those changes in the moved prompt's estimate. The cell means
    were right, the per-prompt estimates (and the intervals over them) were not the
    derivative of each prompt's own metric (audit 175: 6e-3 off, largest estimate 0.3,
    3-layer kimi). Refused, naming the fixed-tensor mean that does not couple them."""
    model = routed_model("kimi", scale=0.15, n_layers=3, attnres_num_blocks=3)
    batch = random_batch(seed=3)
    mean = patch_sources(model, "prev_completed", value="mean", routers="mlp_res", layers=[2])
    plain = attribute_routing(model, batch, groups="layers", n_bootstrap=40, progress=False)
    with model.hooks(fwd_hooks=mean):
        message = "value='mean' is attached.*couples the prompts.*fixed.*cache"
        with pytest.raises(ValueError, match=message):
            attribute_routing(model, batch, groups="layers", n_bootstrap=40, progress=False)
        # one prompt has no other to couple to
        with pytest.warns(RuntimeWarning, match="needs at least 2 prompts"):
            alone = attribute_routing(model, batch[:1], groups="layers", progress=False)
        assert alone.per_prompt[("linear", "logit_diff")].shape == (len(plain.plan), 1)
    # the remedy: the batch's mean as a fixed tensor, per prompt the derivative of its
    # own metric (a central difference moving every prompt's weights at once)
    (name,) = [name for name, _ in mean]
    site = model.site(2, "mlp_res")
    index = model.source_labels(site).index("block_2")  # prev_completed there
    _, cache = model.run_with_cache(batch.tokens)
    fixed = patch_sources(
        model,
        "prev_completed",
        value=cache[name][:, :, index].mean(0, keepdim=True),
        routers="mlp_res",
        layers=[2],
    )
    with model.hooks(fwd_hooks=fixed):
        result = attribute_routing(model, batch, groups="layers", n_bootstrap=40, progress=False)
        cell = next(c for c in result.plan if c.group == "layer 1" and not c.is_noop)
        site, mask = cell.ablation.masks[0]
        new = masked_weights(model, batch, site, mask)
        expected = central_difference(model, batch, site, new)
    i = result.plan.index(cell)
    np.testing.assert_allclose(
        result.per_prompt[("linear", "logit_diff")][i], expected.numpy(), atol=1e-6
    )


def test_a_batch_mean_taken_before_every_attributed_router_is_not_refused():
    """A ``value="mean"`` patch whose mean does not depend on any routing weight the
    attribution moves (the mean of layer 2's ``prev_completed`` source, attributing layer
    2's ``mlp_res`` and the final router, read after it) couples no prompt's estimate to
    another's: each per-prompt estimate is the derivative of its own metric (a central
    difference under the same patch). Audit 179: refused as if coupled whenever more
    than one prompt was attributed; the routers before it are still refused."""
    model = routed_model("kimi", scale=0.15, n_layers=3, attnres_num_blocks=3)
    batch = random_batch(seed=3)
    mean = patch_sources(model, "prev_completed", value="mean", routers="mlp_res", layers=[2])
    kwargs = dict(n_bootstrap=40, progress=False)
    late = dict(routers=("mlp_res", "final_res"), groups={"late": [2]}, **kwargs)
    with model.hooks(fwd_hooks=mean):
        result = attribute_routing(model, batch, **late)
        checked = 0
        for i, cell in enumerate(result.plan):
            if cell.is_noop:
                continue
            site, mask = cell.ablation.masks[0]
            new = masked_weights(model, batch, site, mask)
            expected = central_difference(model, batch, site, new)
            estimates = result.per_prompt[("linear", "logit_diff")][i]
            np.testing.assert_allclose(estimates, expected.numpy(), atol=1e-6)
            checked += 1
        assert checked == 8  # 4 families at layer 2's mlp_res, 4 at the final router
        assert np.abs(result.per_prompt[("linear", "logit_diff")]).max() > 1e-2
        # layer 1's mlp_res feeds the block the mean is taken of: coupled, refused
        with pytest.raises(ValueError, match="value='mean'.*depends on routing weights"):
            attribute_routing(model, batch, routers="mlp_res", groups={"l1": [1]}, **kwargs)
        # refused mid-pass, nothing left behind: the allowed call gives the same numbers
        again = attribute_routing(model, batch, **late)
    for key, values in result.per_prompt.items():
        np.testing.assert_array_equal(again.per_prompt[key], values)
    assert all(param.requires_grad for param in model.parameters())


def test_a_hook_or_a_metric_that_mixes_the_prompts_of_a_pass_is_refused():
    """A user's hook that mixes the prompts of a pass (a mean over the batch, a roll) or
    a callable metric that does (values minus their batch mean) couples the prompts like
    a ``value="mean"`` patch: one backward of the summed metric put the other prompts'
    changes in each prompt's estimate. The cell means were first-order right, the
    per-prompt estimates and their intervals were not each prompt's own, silently
    (audit 235, this model and batch: under a batch mean of layer 1's ``hook_attn_out``
    the per-prompt estimates were up to 0.0098 off the central difference of each
    prompt's metric, largest estimate 0.035; under the roll 0.024 off, largest 0.15;
    with the batch-centred metric every estimate was 0, the summed metric being
    constant, where each prompt's derivative reached 0.072; the cell means within
    3e-11). A probe backward refuses it; a hook or metric acting on each prompt alone,
    and one prompt, are not refused, and their per-prompt estimates are the central
    differences of each prompt's metric."""
    model = routed_model("kimi", scale=0.15, n_layers=3, attnres_num_blocks=3)
    batch = random_batch(n=6, seed=1)
    kwargs = dict(groups="layers", n_bootstrap=20, progress=False)

    def batch_mean(x, hook):
        return x.mean(0, keepdim=True).expand_as(x)

    def roll_by_2(x, hook):
        return 0.5 * (x + x.roll(2, 0))

    def rescale(x, hook):  # each prompt alone
        return 1.1 * x

    def centred(b, logits):
        values = metric_values(b, logits, "logit_diff")
        return values - values.mean()

    def shifted(b, logits):  # each prompt alone
        return metric_values(b, logits, "logit_diff") - 1.0

    message = "prompts of a pass are coupled.*'logit_diff'.*act on each prompt alone"
    for hook in (batch_mean, roll_by_2):
        for method in ("linear", "norm"):
            with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", hook)]):
                with pytest.raises(ValueError, match=message):
                    attribute_routing(model, batch, method=method, **kwargs)
    with pytest.raises(ValueError, match="prompts of a pass are coupled.*'centred'"):
        attribute_routing(model, batch, ["logit_diff", centred], **kwargs)
    assert all(param.requires_grad for param in model.parameters())  # restored
    # one prompt (each chunk of one) has no other to couple to
    with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", batch_mean)]):
        with pytest.warns(RuntimeWarning, match="needs at least 2 prompts"):
            attribute_routing(model, batch[:1], **kwargs)
        attribute_routing(model, batch, chunk=1, **kwargs)
    with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", rescale)]):
        result = attribute_routing(model, batch, [shifted], **kwargs)
        checked = 0
        for i, cell in enumerate(result.plan):
            if cell.is_noop or cell.group != "layer 0":
                continue
            site, mask = cell.ablation.masks[0]
            new = masked_weights(model, batch, site, mask)
            expected = central_difference(model, batch, site, new, metric=shifted)
            np.testing.assert_allclose(
                result.per_prompt[("linear", "shifted")][i], expected.numpy(), atol=1e-6
            )
            checked += 1
    assert checked >= 2
