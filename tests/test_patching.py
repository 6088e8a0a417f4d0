"""Activation patching of depth routing: shapes, NaN cells, self-patching, and cells checked
against full forward passes with the same patch."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import build_word_tokenizer, randomize_routing, tiny_model

from hooked_attnres import (
    DepthState,
    HookedAttnRes,
    HookedAttnResConfig,
    LeftPaddingWithoutMaskWarning,
    RoutedResidualPatchWarning,
    RunCacheDict,
)
from hooked_attnres.interventions import patch_committed
from hooked_attnres.patching import (
    depth_state_name,
    get_act_patch_committed_blocks_by_pos,
    get_act_patch_depth_state,
    get_act_patch_depth_state_by_pos,
    get_act_patch_routing_weights,
    get_act_patch_routing_weights_by_pos,
)
from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer

TASK = KeyValueRetrieval(n_pairs=3, n_keys=6, n_values=6)
N_LAYERS = 4


def build(layout: str):
    tokenizer = task_tokenizer(TASK)
    cfg = HookedAttnResConfig(
        d_model=32,
        n_layers=N_LAYERS,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=48,
        d_vocab=len(tokenizer),
        n_ctx=32,
        attnres_layout=layout,
        attnres_num_blocks=2,
        attnres_recency_bias=0.5,
        seed=0,
    )
    model = randomize_routing(HookedAttnRes(cfg, tokenizer=tokenizer), seed=1).eval()
    batch = TASK.sample(6, seed=5, split="test", vocab=tokenizer.get_vocab())
    return model, batch


@pytest.fixture(scope="module", params=["cumulative", "kimi", "full"])
def setup(request):
    model, batch = build(request.param)
    _, clean_cache = model.run_with_cache(batch.tokens)
    return model, batch, clean_cache


def routers_of(model) -> tuple[str, ...]:
    return ("attn_res", "mlp_res") + (
        ("final_res",) if model.routing_layout.has_final_router else ()
    )


def mean_logit_diff(batch):
    def metric(logits):
        return batch.logit_diff(logits).mean()

    return metric


def commit_layers(model) -> list[int]:
    return [
        l
        for l in range(model.cfg.n_layers)
        if f"blocks.{l}.hook_committed_block" in model.hook_dict
    ]


def test_shapes_and_nan_cells(setup):
    model, batch, clean_cache = setup
    corrupted, metric = batch.corrupted_tokens, mean_logit_diff(batch)
    n_pos = corrupted.shape[1]
    by_layer = get_act_patch_routing_weights(model, corrupted, clean_cache, metric)
    assert by_layer.shape == (2, N_LAYERS) and not torch.isnan(by_layer).any()
    by_pos = get_act_patch_routing_weights_by_pos(model, corrupted, clean_cache, metric)
    assert by_pos.shape == (2, N_LAYERS, n_pos) and not torch.isnan(by_pos).any()
    blocks = get_act_patch_committed_blocks_by_pos(model, corrupted, clean_cache, metric)
    assert blocks.shape == (N_LAYERS, n_pos)
    commits = commit_layers(model)
    assert 0 < len(commits) <= N_LAYERS
    with torch.no_grad():
        unpatched = model(corrupted)
    unread = []  # committed blocks whose patch changes nothing at all: no router reads them
    for layer in commits:
        name = f"blocks.{layer}.hook_committed_block"
        every_position = _full_forward(model, corrupted, name, lambda x, hook: x + 1.0)
        if torch.equal(every_position, unpatched):
            unread.append(layer)
    # the cumulative layout's block committed after the last layer (a snapshot of the
    # final stream): its row read the unpatched metric, as if the block did not matter
    assert unread == ([N_LAYERS - 1] if model.cfg.attnres_layout == "cumulative" else [])
    for layer in range(N_LAYERS):
        empty = layer not in commits or layer in unread
        assert bool(torch.isnan(blocks[layer]).all()) == empty
        assert not torch.isnan(blocks[layer]).any() or empty
    if model.routing_layout.has_final_router:
        with_final = get_act_patch_routing_weights(
            model, corrupted, clean_cache, metric, routers=routers_of(model)
        )
        assert with_final.shape == (3, N_LAYERS)
        assert torch.equal(with_final[:2], by_layer)
        assert not torch.isnan(with_final[2, 0]) and torch.isnan(with_final[2, 1:]).all()


def test_self_patching_changes_nothing(setup):
    model, batch, _ = setup
    corrupted, metric = batch.corrupted_tokens, mean_logit_diff(batch)
    _, own_cache = model.run_with_cache(corrupted)
    with torch.no_grad():
        unpatched = metric(model(corrupted)).item()
    routers = routers_of(model)
    results = [
        get_act_patch_routing_weights(model, corrupted, own_cache, metric, routers=routers),
        get_act_patch_routing_weights_by_pos(model, corrupted, own_cache, metric, routers=routers),
        get_act_patch_committed_blocks_by_pos(model, corrupted, own_cache, metric),
    ]
    for result in results:
        filled = result[~torch.isnan(result)]
        assert filled.numel() > 0
        assert (filled - unpatched).abs().max().item() <= 1e-5


def _from_donor_at(donor_cache, name: str, pos: int):
    """A hook that replaces position ``pos`` of its activation with the donor run's."""

    def patch(activation, hook):
        activation = activation.clone()
        activation[:, pos] = donor_cache[name][:, pos]
        return activation

    return patch


def _full_forward(model, tokens, name, hook):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])


def test_cells_equal_a_full_forward_with_the_same_patch(setup):
    model, batch, clean_cache = setup
    corrupted, metric = batch.corrupted_tokens, mean_logit_diff(batch)
    n_pos = corrupted.shape[1]
    routers = routers_of(model)
    with torch.no_grad():
        unpatched = metric(model(corrupted)).item()

    by_layer = get_act_patch_routing_weights(model, corrupted, clean_cache, metric, routers=routers)
    for row, layer in [(0, 0), (1, 2), (0, 3)]:
        name = f"blocks.{layer}.{routers[row]}.hook_weights"
        logits = _full_forward(
            model, corrupted, name, lambda w, hook, name=name: clean_cache[name].clone()
        )
        assert by_layer[row, layer].item() == pytest.approx(metric(logits).item(), abs=1e-5)
    if "final_res" in routers:
        logits = _full_forward(
            model,
            corrupted,
            "final_res.hook_weights",
            lambda w, hook: clean_cache["final_res.hook_weights"].clone(),
        )
        assert by_layer[2, 0].item() == pytest.approx(metric(logits).item(), abs=1e-5)
    # clean routing differs from corrupted routing, so some cell must move the metric
    assert (by_layer[~torch.isnan(by_layer)] - unpatched).abs().max() > 1e-4

    # A clean/corrupted pair differs only in the last token, so the routing at earlier
    # positions is the same in both runs; a donor of unrelated prompts differs everywhere.
    other = TASK.sample(len(batch), seed=9, split="test", vocab=model.tokenizer.get_vocab()).tokens
    _, donor = model.run_with_cache(other)
    assert not torch.equal(
        donor["blocks.1.attn_res.hook_weights"][:, 1],  # position 0 is <bos>
        clean_cache["blocks.1.attn_res.hook_weights"][:, 1],
    )
    clean_cache = donor
    by_pos = get_act_patch_routing_weights_by_pos(model, corrupted, clean_cache, metric)
    assert (by_pos[:, :, :-1] - unpatched).abs().max() > 1e-4  # earlier positions act via attention
    for row, layer, pos in [(0, 1, n_pos - 1), (1, 2, 0), (1, 3, n_pos - 1), (0, 2, 3), (1, 1, 5)]:
        name = f"blocks.{layer}.{('attn_res', 'mlp_res')[row]}.hook_weights"
        logits = _full_forward(model, corrupted, name, _from_donor_at(clean_cache, name, pos))
        assert by_pos[row, layer, pos].item() == pytest.approx(metric(logits).item(), abs=1e-5)
    assert by_pos[:, :, -1].sub(unpatched).abs().max() > 1e-4

    blocks = get_act_patch_committed_blocks_by_pos(model, corrupted, clean_cache, metric)
    layer = commit_layers(model)[0]
    name = f"blocks.{layer}.hook_committed_block"
    for pos in (0, 4, n_pos - 1):
        logits = _full_forward(model, corrupted, name, _from_donor_at(clean_cache, name, pos))
        assert blocks[layer, pos].item() == pytest.approx(metric(logits).item(), abs=1e-5)
    assert (blocks[~torch.isnan(blocks)] - unpatched).abs().max() > 1e-4


def test_blocks_committed_after_attention_are_patched_where_every_sublayer_commits():
    model, batch = build("full")
    corrupted, metric = batch.corrupted_tokens, mean_logit_diff(batch)
    other = TASK.sample(len(batch), seed=9, split="test", vocab=model.tokenizer.get_vocab()).tokens
    _, donor = model.run_with_cache(other)
    mids = get_act_patch_committed_blocks_by_pos(model, corrupted, donor, metric, sublayer="attn")
    assert mids.shape == (N_LAYERS, corrupted.shape[1])
    for layer in range(N_LAYERS):  # every attention sublayer commits "attn_{l}" in this layout
        assert f"blocks.{layer}.hook_committed_mid" in model.hook_dict
        assert not torch.isnan(mids[layer]).any()
    for layer, pos in [(0, 2), (2, corrupted.shape[1] - 1)]:
        name = f"blocks.{layer}.hook_committed_mid"
        logits = _full_forward(model, corrupted, name, _from_donor_at(donor, name, pos))
        assert mids[layer, pos].item() == pytest.approx(metric(logits).item(), abs=1e-5)
    _, own = model.run_with_cache(corrupted)
    with torch.no_grad():
        unpatched = metric(model(corrupted)).item()
    own_mids = get_act_patch_committed_blocks_by_pos(model, corrupted, own, metric, sublayer="attn")
    assert (own_mids - unpatched).abs().max().item() <= 1e-5
    blocks_model, _ = build("cumulative")
    _, blocks_cache = blocks_model.run_with_cache(corrupted)
    with pytest.raises(ValueError, match="commits a block after its attn sublayer"):
        get_act_patch_committed_blocks_by_pos(
            blocks_model, corrupted, blocks_cache, metric, sublayer="attn"
        )
    with pytest.raises(
        ValueError, match=r"^sublayer must be one of \('attn', 'mlp'\), got 'final'$"
    ):
        get_act_patch_committed_blocks_by_pos(model, corrupted, own, metric, sublayer="final")


def test_the_committed_blocks_sweep_refusals_say_what_to_patch_instead():
    """Audit 48: where no layer commits a block after the asked sublayer that a router
    reads, the refusal names what to use: ``sublayer="mlp"`` where no attention sublayer
    commits (it said only that ``hook_committed_mid`` does not exist), and for the
    cumulative layout's only block, committed after the last layer, the reason
    `patch_committed` gives (`unread_commit`, one wording) with the hook of the final
    stream it snapshots."""
    model = randomize_routing(
        tiny_model(n_layers=2, attnres_num_blocks=1, attnres_layout="cumulative")
    )
    tokens = torch.randint(0, 50, (1, 3), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)

    def metric(logits):
        return logits[:, -1, 3].sum()

    with pytest.raises(
        ValueError, match=r"there is no blocks\.\*\.hook_committed_mid; pass sublayer='mlp'"
    ):
        get_act_patch_committed_blocks_by_pos(model, tokens, cache, metric, sublayer="attn")
    unread = (
        r"after the last layer: no router reads it; it is a snapshot .*blocks\.1\.hook_resid_post"
    )
    with pytest.raises(ValueError, match=unread):
        get_act_patch_committed_blocks_by_pos(model, tokens, cache, metric)
    with pytest.raises(
        ValueError, match=r"patch_committed\('block_1'\): no router reads it; it is"
    ):
        patch_committed(model, "block_1")


def test_a_single_router_may_be_given_as_a_string(setup):
    model, batch, clean_cache = setup
    corrupted, metric = batch.corrupted_tokens, mean_logit_diff(batch)
    both = get_act_patch_routing_weights(model, corrupted, clean_cache, metric)
    mlp = get_act_patch_routing_weights(model, corrupted, clean_cache, metric, routers="mlp_res")
    assert mlp.shape == (1, N_LAYERS)
    torch.testing.assert_close(mlp[0], both[1], atol=1e-6, rtol=0)


def test_a_metric_is_called_on_logits_of_the_patched_run(setup):
    model, batch, clean_cache = setup
    seen = []

    def metric(logits):
        seen.append(tuple(logits.shape))
        return logits[:, -1].sum()

    get_act_patch_routing_weights(model, batch.corrupted_tokens, clean_cache, metric)
    assert seen == [(len(batch), batch.tokens.shape[1], model.cfg.d_vocab)] * (2 * N_LAYERS)


def test_bad_calls_are_refused():
    model, batch = build("cumulative")
    tokens, metric = batch.tokens, mean_logit_diff(batch)
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(ValueError, match="batch"):
        get_act_patch_routing_weights(model, tokens[:5], cache, metric)
    with pytest.raises(ValueError, match="batch"):
        get_act_patch_committed_blocks_by_pos(model, tokens[:5], cache, metric)
    with pytest.raises(ValueError, match="router must be one of .*, got 'bogus_res'"):
        get_act_patch_routing_weights(model, tokens, cache, metric, routers=("bogus_res",))
    with pytest.raises(
        ValueError, match=r"\[batch, pos\] = \[6, \d+\] .* has \[6, \d+\]; .*equal lengths"
    ):
        get_act_patch_routing_weights(model, tokens[:, :-1], cache, metric)
    with pytest.raises(ValueError, match="must be \\[batch, pos\\]"):
        get_act_patch_routing_weights(model, tokens[0], cache, metric)
    _, weights_only = model.run_with_cache(
        tokens, names_filter=lambda name: "attn_res.hook_weights" in name
    )
    with pytest.raises(KeyError, match="the clean cache lacks .*mlp_res.hook_weights"):
        get_act_patch_routing_weights(model, tokens, weights_only, metric)
    with pytest.raises(KeyError, match="hook_committed_block"):
        get_act_patch_committed_blocks_by_pos(model, tokens, weights_only, metric)
    with pytest.raises(ValueError, match="no final router"):
        get_act_patch_routing_weights_by_pos(model, tokens, cache, metric, routers=("final_res",))
    with pytest.raises(ValueError, match="scalar"):
        get_act_patch_routing_weights(model, tokens, cache, lambda logits: batch.logit_diff(logits))
    model.train()
    try:
        for fn in (
            get_act_patch_routing_weights,
            get_act_patch_routing_weights_by_pos,
            get_act_patch_committed_blocks_by_pos,
        ):
            with pytest.raises(ValueError, match="eval mode"):
                fn(model, tokens, cache, metric)
    finally:
        model.eval()
    none = tiny_model(attnres_layout="none").eval()
    toks = torch.randint(0, 50, (2, 5))
    _, none_cache = none.run_with_cache(toks)
    with pytest.raises(ValueError, match="no routers"):
        get_act_patch_routing_weights(none, toks, none_cache, lambda logits: logits.sum())


def test_a_clean_cache_of_a_key_value_cached_pass_is_refused():
    """A cache of ``model.run_with_cache(rest, past_kv_cache=kv)`` holds the positions after
    the cached ones: with the corrupted run's [batch, pos] it was accepted, and its
    position 0 (the sequence's position n_past) was patched into position 0. Refused
    now; ``cache.n_past`` says where it starts."""
    from hooked_attnres import KeyValueCache
    from hooked_attnres.analysis import attribution_patch_routing_weights
    from hooked_attnres.interventions.checks import check_cached

    model, batch = build("kimi")
    tokens, metric = batch.tokens, mean_logit_diff(batch)
    n_pos = tokens.shape[1]
    longer = torch.cat((tokens[:, :3], tokens), dim=1)  # the clean run after 3 cached ones
    kv = KeyValueCache.init_cache(model.cfg)
    model(longer[:, :3], past_kv_cache=kv)
    _, after_cache = model.run_with_cache(longer[:, 3:], past_kv_cache=kv)
    assert (
        after_cache.n_past == 3 and after_cache["blocks.0.attn_res.hook_weights"].shape[1] == n_pos
    )
    message = "comes from a pass after 3 cached positions .*its position 0 is the sequence's"
    for sweep in (get_act_patch_routing_weights, get_act_patch_committed_blocks_by_pos):
        with pytest.raises(ValueError, match=message):
            sweep(model, tokens, after_cache, metric)
    with pytest.raises(ValueError, match=message):
        attribution_patch_routing_weights(model, tokens, after_cache, metric)
    first = after_cache.apply_slice_to_batch_dim(slice(0, 1))  # a batch slice keeps n_past
    assert first.n_past == 3 and isinstance(first, type(after_cache))
    with pytest.raises(ValueError, match=message):
        check_cached(model, first, ["blocks.0.attn_res.hook_weights"], "a cache", (1, n_pos))
    kv = KeyValueCache.init_cache(model.cfg)  # and so does a plain dict of such a pass
    model(longer[:, :3], past_kv_cache=kv)
    _, as_dict = model.run_with_cache(longer[:, 3:], past_kv_cache=kv, return_cache_object=False)
    assert isinstance(as_dict, dict) and as_dict.n_past == 3
    with pytest.raises(ValueError, match=message):
        get_act_patch_routing_weights(model, tokens, as_dict, metric)
    _, whole = model.run_with_cache(tokens)
    assert whole.n_past == 0
    assert torch.isfinite(get_act_patch_routing_weights(model, tokens, whole, metric)).any()


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "none"])
def test_left_padded_prompts_are_patched_with_their_attention_mask(layout):
    """Every sweep takes ``attention_mask``: each cell equals a masked ``run_with_hooks``
    with that one cell patched (before, the sweeps ran left-padded prompts unmasked,
    silently: padding attended and rotary positions shifted)."""
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(20)])
    model = tiny_model(
        attnres_layout=layout, n_layers=2, d_vocab=len(tokenizer), default_padding_side="left"
    )
    if layout != "none":
        randomize_routing(model, seed=2)
    model.set_tokenizer(tokenizer)
    model.eval()
    clean, mask = model.to_tokens_and_mask(["w1 w2 w3 w4", "w5 w6"])
    corrupted, corrupted_mask = model.to_tokens_and_mask(["w7 w2 w3 w4", "w8 w6"])
    assert torch.equal(mask, corrupted_mask) and not bool(mask.all())
    _, cache = model.run_with_cache(clean, attention_mask=mask)

    def metric(logits):
        return logits[:, -1, 5].sum() - logits[:, -1, 9].sum()

    def by_hand(name, pos):
        with torch.no_grad():
            logits = model.run_with_hooks(
                corrupted, attention_mask=mask, fwd_hooks=[(name, _from_donor_at(cache, name, pos))]
            )
        return metric(logits).item()

    cells = [(0, 1), (1, 2), (1, 3)]  # (layer, pos): row 1's first real token is at pos 2
    state = get_act_patch_depth_state_by_pos(
        model, corrupted, cache, metric, sublayer="mlp", attention_mask=mask
    )
    if layout == "none":
        for layer, pos in cells:  # the state entering the MLP is hook_resid_mid
            name = f"blocks.{layer}.hook_resid_mid"
            assert state[layer, pos].item() == pytest.approx(by_hand(name, pos), abs=1e-4)
    else:
        weights = get_act_patch_routing_weights_by_pos(
            model, corrupted, cache, metric, attention_mask=mask
        )
        blocks = get_act_patch_committed_blocks_by_pos(
            model, corrupted, cache, metric, attention_mask=mask
        )
        for layer, pos in cells:
            for row, router in enumerate(("attn_res", "mlp_res")):
                name = model.site(layer, router).hook("weights")
                assert weights[row, layer, pos].item() == pytest.approx(
                    by_hand(name, pos), abs=1e-4
                )
        # 2 layers, 2 blocks: both layers commit; the cumulative layout's block after the
        # last layer is read by no router (its row is NaN), so check layer 0's there
        read = 0 if layout == "cumulative" else 1
        assert torch.isnan(blocks[1]).all() == (layout == "cumulative")
        name = f"blocks.{read}.hook_committed_block"
        assert blocks[read, 3].item() == pytest.approx(by_hand(name, 3), abs=1e-4)
        # the whole state entering layer 1's MLP, clean at pos 3: the clean run's
        # hook_sources there, written in by hand into a masked run from that state
        states = model.depth_states(corrupted, sublayers=True, attention_mask=mask)
        clean_sources = cache[model.site(1, "mlp_res").hook("sources")].unbind(-2)
        sources = []
        for corrupted_source, clean_source in zip(states[3].sources, clean_sources, strict=True):
            patched = corrupted_source.clone()
            patched[:, 3] = clean_source[:, 3]
            sources.append(patched)
        patched_state = DepthState(sources[:-1], sources[-1], states[3].current_is_committed)
        with torch.no_grad():
            expected = metric(model.forward_from(patched_state, 3, attention_mask=mask))
        assert state[1, 3].item() == pytest.approx(expected.item(), abs=1e-4)
    # unmasked: the padding is attended (other numbers), and it warns as model(tokens) does
    model._left_padding_warned = False
    with pytest.warns(LeftPaddingWithoutMaskWarning, match="attention_mask"):
        _, unmasked_cache = model.run_with_cache(clean)
        unmasked = get_act_patch_depth_state_by_pos(model, corrupted, unmasked_cache, metric, "mlp")
    assert (unmasked - state).abs().max() > 1e-3


def test_a_clean_cache_made_with_another_attention_mask_is_refused():
    """A clean cache made without the sweep's attention_mask (or with another one) was
    accepted: with left padding its position p is another token, or the same token at
    another rotary position, so every cell was off (up to 0.12 logits of a 0.2 metric,
    kimi, 2 layers). The cache records the mask of its run (as it records n_past), also
    as a plain dict and through a batch slice, and the sweeps refuse another one."""
    from hooked_attnres.analysis import attribution_patch_routing_weights

    tokenizer = build_word_tokenizer([f"w{i}" for i in range(20)])
    model = tiny_model(
        attnres_layout="kimi", n_layers=2, d_vocab=len(tokenizer), default_padding_side="left"
    )
    randomize_routing(model, seed=2)
    model.set_tokenizer(tokenizer)
    model.eval()
    prompts = ["w1 w2 w3 w4", "w5 w6"]
    clean, mask = model.to_tokens_and_mask(prompts)
    corrupted, _ = model.to_tokens_and_mask(["w7 w2 w3 w4", "w8 w6"])
    _, cache = model.run_with_cache(clean, attention_mask=mask)
    _, from_strings = model.run_with_cache(prompts)  # the mask made for string prompts
    _, as_dict = model.run_with_cache(clean, attention_mask=mask, return_cache_object=False)
    for made in (cache, from_strings, as_dict):
        assert torch.equal(made.attention_mask, mask.bool())
    with pytest.warns(LeftPaddingWithoutMaskWarning):
        model._left_padding_warned = False
        _, unmasked = model.run_with_cache(clean)
    _, all_ones = model.run_with_cache(clean, attention_mask=torch.ones_like(mask))
    assert unmasked.attention_mask is None and all_ones.attention_mask is None
    other_mask = mask.clone()
    other_mask[1, 2] = 0
    _, other = model.run_with_cache(clean, attention_mask=other_mask)

    def metric(logits):
        return logits[:, -1, 5].sum() - logits[:, -1, 9].sum()

    sweeps = [
        get_act_patch_routing_weights,
        get_act_patch_routing_weights_by_pos,
        get_act_patch_committed_blocks_by_pos,
        get_act_patch_depth_state,
        get_act_patch_depth_state_by_pos,
        attribution_patch_routing_weights,
    ]
    refusals = [
        (unmasked, mask, "was made with no padding .* but the sweep runs with an attention_mask"),
        (cache, None, "was made with an attention_mask marking 2 padding .* runs with no padding"),
        (other, mask, "marking 3 padding position.* but the sweep runs with another one"),
        (as_dict, None, "was made with an attention_mask marking 2"),
    ]
    for sweep in sweeps:
        for made, run_mask, message in refusals:
            with pytest.raises(ValueError, match=message):
                sweep(model, corrupted, made, metric, attention_mask=run_mask)
        good = sweep(model, corrupted, cache, metric, attention_mask=mask)
        assert torch.equal(
            sweep(model, corrupted, from_strings, metric, attention_mask=mask).isnan(), good.isnan()
        )
        # an all-ones mask is no padding: the same pass as none
        sweep(model, corrupted[:1], all_ones.apply_slice_to_batch_dim(slice(0, 1)), metric)
    # a batch slice keeps its rows of the mask: the one-prompt sweep of the padded prompt
    second = cache.apply_slice_to_batch_dim(slice(1, 2))
    assert torch.equal(second.attention_mask, mask[1:].bool())
    alone = get_act_patch_routing_weights(
        model, corrupted[1:], second, metric, attention_mask=mask[1:]
    )
    with pytest.raises(ValueError, match="was made with an attention_mask marking 2"):
        get_act_patch_routing_weights(model, corrupted[1:], second, metric)
    assert torch.isfinite(alone).any()
    # what the refusal prevents: the numbers of the unmasked cache (its tensors declared,
    # wrongly, as made with the mask) are far from the masked cache's
    good = get_act_patch_depth_state_by_pos(model, corrupted, cache, metric, attention_mask=mask)
    lie = RunCacheDict(unmasked.cache_dict, attention_mask=mask)
    wrong = get_act_patch_depth_state_by_pos(model, corrupted, lie, metric, attention_mask=mask)
    assert float((wrong - good).abs().max()) > 1e-2


@pytest.mark.filterwarnings("ignore::hooked_attnres.RoutedResidualPatchWarning")  # meant
def test_a_sweep_under_an_in_place_hook_equals_full_runs_with_it(setup):
    """A sweep inside ``model.hooks(...)`` whose hook edits ``hook_resid_pre`` in place:
    each cell equals a full run with that hook and the cell's patch. Before, the cached
    state entering layer 2 held the edit already, so the cells starting there applied it
    twice (and once more per cell)."""
    model, batch, clean_cache = setup
    corrupted, metric = batch.corrupted_tokens, mean_logit_diff(batch)

    def shift(activation, hook):
        activation[:, 2] += 0.5

    hooks = [("blocks.2.hook_resid_pre", shift)]
    with model.hooks(fwd_hooks=hooks):
        by_pos = get_act_patch_routing_weights_by_pos(
            model, corrupted, clean_cache, metric, routers="attn_res"
        )
    name = model.site(2, "attn_res").hook("weights")
    for pos in (0, 3, corrupted.shape[1] - 1):
        with torch.no_grad():
            logits = model.run_with_hooks(
                corrupted, fwd_hooks=[*hooks, (name, _from_donor_at(clean_cache, name, pos))]
            )
        assert by_pos[0, 2, pos].item() == pytest.approx(metric(logits).item(), abs=1e-5)


def test_a_right_padded_string_cache_needs_its_mask_in_the_sweep():
    """Right padding is refused like left padding (docs/analysis.md): the cache of string
    prompts records the mask made for them, and the sweep must run with it. With it, the
    sweep equals the one from a cache of the same tokens and mask."""
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(20)])
    model = tiny_model(attnres_layout="cumulative", n_layers=2, d_vocab=len(tokenizer))
    randomize_routing(model, seed=3)
    model.set_tokenizer(tokenizer)
    model.eval()
    prompts = ["w1 w2 w3 w4", "w5 w6"]
    tokens, mask = model.to_tokens_and_mask(prompts)
    assert model.default_padding_side == "right" and not bool(mask[1, -1])
    corrupted = model.to_tokens(["w7 w2 w3 w4", "w8 w6"])
    _, from_strings = model.run_with_cache(prompts)
    assert torch.equal(from_strings.attention_mask, mask.bool())

    def metric(logits):
        return logits[0, -1, 5] - logits[1, 1, 9]  # each prompt's last real position

    with pytest.raises(ValueError, match="marking 2 padding position.* runs with no padding"):
        get_act_patch_routing_weights_by_pos(model, corrupted, from_strings, metric)
    patched = get_act_patch_routing_weights_by_pos(
        model, corrupted, from_strings, metric, attention_mask=from_strings.attention_mask
    )
    _, from_tokens = model.run_with_cache(tokens, attention_mask=mask)
    expected = get_act_patch_routing_weights_by_pos(
        model, corrupted, from_tokens, metric, attention_mask=mask
    )
    torch.testing.assert_close(patched, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_metric_gets_float32_logits(dtype):
    """A metric written on the logits as given (``logits[:, -1, a] - logits[:, -1, b]``,
    then a mean) did its arithmetic in bfloat16 / float16 and rounded each cell to 8 (11)
    bits: up to 1.8e-3 off on cells of 0.24 in a 4-layer cumulative bfloat16 model. The
    metric now gets the logits in float32 (exactly), so every cell, and attribution's
    metric of the corrupted run, is the model's own logits put through it in float64."""
    from hooked_attnres.analysis import attribution_patch_routing_weights
    from hooked_attnres.interventions import set_weights

    model, batch = build("kimi")
    with torch.no_grad():
        model.W_U.mul_(8.0)  # logits of a few units, as in a trained model
    model = model.to(dtype)
    rows = torch.arange(len(batch))

    def metric(logits):
        return (logits[rows, -1, batch.answer] - logits[rows, -1, batch.contrast]).mean()

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(batch.tokens)
        result = get_act_patch_routing_weights(
            model, batch.corrupted_tokens, clean_cache, metric, routers="mlp_res"
        )
        expected = [
            metric(model.run_with_hooks(
                batch.corrupted_tokens, fwd_hooks=set_weights(model, clean_cache, routers=site)
            ).double())
            for site in model.sites("mlp_res")
        ]  # fmt: skip
        corrupted = metric(model(batch.corrupted_tokens).double())
    assert min(abs(float(value)) for value in expected) > 0.5  # cells of a few units
    torch.testing.assert_close(result[0].double(), torch.stack(expected), rtol=1e-6, atol=0)
    # kimi's first attention router has one source: its clean weights are the corrupted
    # ones, and the estimate is the metric of the corrupted run
    estimate = attribution_patch_routing_weights(
        model, batch.corrupted_tokens, clean_cache, metric, routers="attn_res"
    )
    torch.testing.assert_close(estimate[0, 0].double(), corrupted, rtol=1e-6, atol=0)


def test_a_sweep_with_a_hooked_block_is_refused_naming_the_sweep():
    """A PyTorch hook on ``blocks[l]`` (the whole layer) cannot run in a sweep: the
    corrupted states come from ``depth_states(sublayers=True)``, which runs each layer by
    halves. The refusal named only ``depth_states`` and told a sweep's caller to pass
    ``sublayers=False``, an argument the sweep does not take; it now says the sweep runs
    it and to remove the hook."""
    model, batch = build("kimi")
    _, clean_cache = model.run_with_cache(batch.tokens)
    handle = model.blocks[1].register_forward_hook(lambda *args: None)
    try:
        with pytest.raises(
            ValueError, match=r"blocks\.1 .*activation-patching sweeps .*remove the hook"
        ):
            get_act_patch_routing_weights(
                model, batch.corrupted_tokens, clean_cache, lambda logits: logits.sum()
            )
    finally:
        handle.remove()


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative"])
def test_sweeps_refuse_a_clean_cache_of_two_inputs(layout):
    """Audit 67: a clean cache filled by caching hooks kept over ``model(clean)`` and then
    ``model(other, stop_at_layer=1)`` holds layer 0 of other prompts beside the clean
    run's later layers; nothing was stale and the sweep patched the mix in silently (0.020
    off the clean cache's sweep, of values up to 0.079, kimi). It
    is refused now, naming the difference; the same split over the clean tokens is taken,
    equal to the sweep of one ``run_with_cache``."""
    model = randomize_routing(tiny_model(attnres_layout=layout)).eval()
    clean = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    corrupted = clean.roll(1, dims=0)

    def metric(logits):
        return logits[:, -1, 0].mean()

    def two_passes(second):
        cache, hooks, _ = model.get_caching_hooks()
        with model.hooks(fwd_hooks=hooks):
            model(clean)
        _, hooks, _ = model.get_caching_hooks(
            cache=cache, names_filter=lambda name: name.startswith("blocks.0.")
        )
        with model.hooks(fwd_hooks=hooks):
            model(second, stop_at_layer=1)
        return cache

    with pytest.raises(ValueError, match="earlier pass.*a pass over other token ids"):
        get_act_patch_routing_weights(model, corrupted, two_passes(corrupted), metric)
    _, whole = model.run_with_cache(clean)
    torch.testing.assert_close(
        get_act_patch_routing_weights(model, corrupted, two_passes(clean.clone()), metric),
        get_act_patch_routing_weights(model, corrupted, whole, metric),
    )


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full"])
def test_generic_activation_patch_is_exact_with_right_padding_and_refused_with_left(
    layout, monkeypatch
):
    """Audit 90 (docs/analysis.md): TransformerLens's ``generic_activation_patch`` runs
    ``model(corrupted)`` with no ``attention_mask``. With right padding every real token
    is as in the masked run, so its cells equal the masked sweep's for a metric that reads
    each prompt's last real token. With left padding they were off, silently: 0.445 on
    cells up to 0.566 (kimi), 0.390 of 0.659 (full), 0.012 of 0.020 (cumulative; audit
    199). A TransformerLens patching hook whose clean activation comes from a cache that
    records left padding now refuses a pass run without that mask, naming the sweeps that
    take ``attention_mask=``; the same hook in a pass run with the mask is exact."""
    from functools import partial

    from transformer_lens.patching import (
        generic_activation_patch,
        get_act_patch_resid_pre,
        layer_pos_patch_setter,
    )
    from transformer_lens.utilities import get_act_name

    from hooked_attnres.patching import router_patch_index

    model = randomize_routing(
        tiny_model(attnres_layout=layout, n_layers=3, dtype=torch.float64), seed=3
    ).eval()
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(1, 50, (3, 6), generator=generator)
    corrupted = torch.randint(1, 50, (3, 6), generator=generator)
    rows = torch.arange(3)
    right = torch.ones(3, 6, dtype=torch.long)
    right[1, 4:] = 0
    right[2, 2:] = 0
    left = right.flip(1)
    name = model.site(2, "attn_res").hook("weights")
    for mask, exact in ((right, True), (left, False)):
        last = mask.sum(1) - 1 if exact else torch.full((3,), 5)

        def metric(logits, last=last):
            return (logits[rows, last, 3] - logits[rows, last, 7]).sum()

        _, cache = model.run_with_cache(clean, attention_mask=mask)
        masked = get_act_patch_routing_weights_by_pos(
            model, corrupted, cache, metric, routers="attn_res", attention_mask=mask
        )[0]
        # the masked sweep's cell, against a masked full run with the same patch
        with torch.no_grad():
            logits = model.run_with_hooks(
                corrupted, attention_mask=mask, fwd_hooks=[(name, _from_donor_at(cache, name, 5))]
            )
        assert masked[2, 5].item() == pytest.approx(metric(logits).item(), abs=1e-6)
        # TransformerLens's residual patching over the cache's RunCacheDict (the dict of
        # return_cache_object=False), against a masked full run with its cell patched
        resid = get_act_name("resid_pre", 1)
        with torch.no_grad():
            logits = model.run_with_hooks(
                corrupted, attention_mask=mask, fwd_hooks=[(resid, _from_donor_at(cache, resid, 2))]
            )
        resid_cell = metric(logits).item()
        runs = {
            "routing": partial(
                generic_activation_patch,
                model,
                corrupted,
                cache,
                metric,
                layer_pos_patch_setter,
                **router_patch_index(model, "attn_res", "weights"),
            ),
            "resid": partial(get_act_patch_resid_pre, model, corrupted, cache.cache_dict, metric),
        }
        if exact:
            assert (runs["routing"]() - masked).abs().max().item() <= 1e-6
            assert runs["resid"]()[1, 2].item() == pytest.approx(resid_cell, abs=1e-6)
            continue
        for what, hook in (("routing", "attn_res\\.hook_weights"), ("resid", "hook_resid_pre")):
            with pytest.raises(
                ValueError,
                match=r"^TransformerLens's activation patching patched blocks\.0\."
                + hook
                + r" from a cache whose attention_mask records left padding \(prompts "
                r"\[1, 2\]\).*without that mask.*get_act_patch_routing_weights\(_by_pos\)"
                r".*attention_mask=mask",
            ):
                runs[what]()
        # a hook of your own that reads the clean cache is not checked: it runs in the pass
        # asked for (docs/analysis.md), one with the mask above (resid_cell), one without
        # it here, whose cell is that of the unmasked run
        with torch.no_grad():
            unmasked = model.run_with_hooks(
                corrupted, fwd_hooks=[(resid, _from_donor_at(cache, resid, 2))]
            )
        assert abs(metric(unmasked).item() - resid_cell) > 1e-3
        # TransformerLens's own hooks in passes run with the cache's mask (its
        # model.run_with_hooks given the mask): the cells of the masked runs
        with monkeypatch.context() as patched:
            patched.setattr(
                model,
                "run_with_hooks",
                partial(type(model).run_with_hooks, model, attention_mask=mask),
            )
            assert (runs["routing"]() - masked).abs().max().item() <= 1e-6
            assert runs["resid"]()[1, 2].item() == pytest.approx(resid_cell, abs=1e-6)


def test_the_record_of_served_tensors_names_the_last_cache_and_is_released():
    """The record that traces ``clean_cache[name]`` to its cache's padding (`served_padding`,
    read by the TransformerLens patching refusal above): the padding of the cache that last
    returned the tensor (the cache object or its `RunCacheDict`, another cache returning it
    later decides), none once that cache is gone, and nothing is kept for a tensor that is
    gone (review 212 made the record a plain dict keyed by the tensor's id, cheaper per
    lookup than torch's WeakTensorKeyDictionary: this test guards that change)."""
    import gc

    from hooked_attnres.model import cache as cache_module
    from hooked_attnres.model.cache import served_padding

    model = tiny_model(n_layers=2)
    tokens = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    name = "blocks.1.hook_resid_pre"
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    tensor = cache[name]
    assert torch.equal(served_padding(tensor), mask.bool())
    assert served_padding(tensor.clone()) is None  # no cache returned it
    assert cache[name] is tensor  # served again: the same record
    assert torch.equal(served_padding(tensor), mask.bool())
    unpadded = RunCacheDict({name: tensor})  # another cache, recording no padding
    assert unpadded[name] is tensor
    assert served_padding(tensor) is None
    assert torch.equal(served_padding(cache.cache_dict[name]), mask.bool())  # its dict's
    del unpadded
    del cache
    gc.collect()
    assert served_padding(tensor) is None  # the cache that returned it is gone
    recorded = len(cache_module._SERVED)
    fresh = RunCacheDict({name: tensor.clone()}, attention_mask=mask)
    assert torch.equal(served_padding(fresh[name]), mask.bool())
    assert len(cache_module._SERVED) == recorded + 1
    del fresh
    gc.collect()
    assert len(cache_module._SERVED) == recorded  # its tensor gone, so is its record


@pytest.mark.parametrize("layout", ["kimi", "cumulative", "full"])
def test_depth_state_cells_equal_full_runs_patching_what_each_later_router_reads(layout):
    """Audit 90: a cell of `get_act_patch_depth_state_by_pos` against a full masked run
    (right padding, float64) whose hooks give every router at and after the patched point
    (and the final router / final stream) the sources it would read from the clean state
    at that position: sources older than the state's current one are the clean ones; the
    state's current source carries ``clean - corrupted`` into what grows from it (the
    partial block and the block it commits in kimi / full; the stream and every later
    snapshot in the cumulative layout)."""
    model = randomize_routing(
        tiny_model(attnres_layout=layout, n_layers=3, dtype=torch.float64), seed=3
    ).eval()
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(1, 50, (3, 6), generator=generator)
    corrupted = torch.randint(1, 50, (3, 6), generator=generator)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    last, rows = mask.sum(1) - 1, torch.arange(3)

    def metric(logits):
        return (logits[rows, last, 3] - logits[rows, last, 7]).sum()

    _, cache = model.run_with_cache(clean, attention_mask=mask)
    states = model.depth_states(corrupted, sublayers=True, attention_mask=mask)
    snapshots = layout == "cumulative"
    routers = [model.site(s // 2, ("attn_res", "mlp_res")[s % 2]) for s in range(6)]
    for sublayer, layer, pos in [("attn", 1, 1), ("mlp", 1, 3), ("attn", 2, 0), ("mlp", 0, 1)]:
        start = 2 * layer + (sublayer == "mlp")
        state = cache[depth_state_name(model, layer, sublayer)]  # [batch, pos, n, d_model]
        n = state.shape[-2]
        delta = state[:, pos, -1] - states[start].current[:, pos]

        # the sources growing from the state's current one (last index n - 1 or beyond)
        grown = slice(n - 1, None if snapshots else n)

        def give(sources, hook, pos=pos, state=state, n=n, grown=grown, delta=delta):
            sources = sources.clone()
            sources[:, pos, : n - 1] = state[:, pos, : n - 1]
            sources[:, pos, grown] += delta[:, None]
            return sources

        hooks = [(site.hook("sources"), give) for site in routers[start:]]
        if snapshots:  # ln_final reads the stream itself

            def shift(stream, hook, pos=pos, delta=delta):
                stream = stream.clone()
                stream[:, pos] += delta
                return stream

            hooks.append(("blocks.2.hook_resid_post", shift))
        else:
            hooks.append(("final_res.hook_sources", give))
        with torch.no_grad():
            expected = metric(model.run_with_hooks(corrupted, attention_mask=mask, fwd_hooks=hooks))
        cells = get_act_patch_depth_state_by_pos(
            model, corrupted, cache, metric, sublayer=sublayer, attention_mask=mask
        )
        assert cells[layer, pos].item() == pytest.approx(expected.item(), rel=1e-6)


def _float64_model(kind: str) -> HookedAttnRes:
    """A float64 model of a native layout with random routing, or a wrap of a tiny Qwen3."""
    from helpers import SMALL_QWEN3, hf_qwen3

    hf = hf_qwen3(seed=3, num_hidden_layers=3, **SMALL_QWEN3).double()
    if kind in ("recency", "exact"):
        return HookedAttnRes.from_hf_qwen3(hf, wrap=kind, num_blocks=2, dtype=torch.float64).eval()
    wrapped = HookedAttnRes.from_hf_qwen3(hf, wrap="recency", num_blocks=2, dtype=torch.float64)
    model = HookedAttnRes(wrapped.cfg.replace(attnres_layout=kind, attnres_recency_bias=0.7))
    own = {k: v for k, v in wrapped.state_dict().items() if "_res." not in k}
    model.load_state_dict(own, strict=False)
    return randomize_routing(model, seed=1).eval()


@pytest.mark.parametrize("kind", ["kimi", "cumulative", "full", "recency", "exact"])
def test_depth_state_patching_reads_the_stored_state_not_a_routers_edited_copy(kind):
    """A clean cache of a run under `patch_sources` at layer 1's attention router (that
    router's copy of the embedding replaced) holds the edit in that router's
    ``hook_sources``, not in the depth state every later router reads. Patching the whole
    clean state at every position, under the same hooks, must give the clean run under
    them (a full forward pass). Audit 163: the sweep read ``hook_sources`` as the state, so
    the edit leaked to every later router (layer 1's cell 0.158 off on 0.039, kimi)."""
    from hooked_attnres.interventions import patch_sources

    model = _float64_model(kind)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 17, (2, 4), generator=generator)
    corrupted = torch.randint(0, 17, (2, 4), generator=generator)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])

    def metric(logits):
        return logits[:, -1, 3].sum()

    site = model.site(1, "attn_res")
    value = torch.randn(model.cfg.d_model, generator=generator, dtype=torch.float64)
    hooks = patch_sources(model, "embedding", value, routers=[site])
    for attention_mask in (None, mask):
        with model.hooks(fwd_hooks=hooks):
            expected = metric(model(clean, attention_mask=attention_mask)).item()
            _, cache = model.run_with_cache(clean, attention_mask=attention_mask)
            for sublayer in ("attn", "mlp"):
                cells = get_act_patch_depth_state(
                    model, corrupted, cache, metric, sublayer, attention_mask=attention_mask
                )
                assert (cells.double() - expected).abs().max().item() <= 1e-6 * max(
                    1, abs(expected)
                )
        # a cache of the router copies alone cannot tell the state: refused
        with model.hooks(fwd_hooks=hooks):
            _, sources_only = model.run_with_cache(
                clean,
                attention_mask=attention_mask,
                names_filter=lambda name: name.endswith("hook_sources"),
            )
        with pytest.raises(KeyError, match="own copy of its sources"):
            get_act_patch_depth_state(
                model, corrupted, sources_only, metric, attention_mask=attention_mask
            )


@pytest.mark.parametrize("kind", ["none", "kimi", "cumulative", "full", "recency", "exact"])
def test_depth_state_patching_under_a_hook_on_the_layers_resid_pre_applies_it_once(kind):
    """A hook on ``blocks.1.hook_resid_pre`` (a steering vector added), attached to the
    clean run and to the sweep: the clean cache holds the current source after it, and a
    pass started at layer 1 runs it again. The whole-state cells must be the clean run's
    metric under the hook, and in layout ``none`` each ``by_pos`` cell TransformerLens's
    resid_pre patch (the clean value replacing the position after the steering hook), full
    forward passes. Audit 163: the hook ran on the clean state a second time (layer 1's
    whole-state cell 2.4e-4 to 1.4e-3 off on about 0.01, float64; 16 % in layout none)."""
    model = _float64_model(kind)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 17, (2, 4), generator=generator)
    corrupted = torch.randint(0, 17, (2, 4), generator=generator)
    steer = torch.randn(model.cfg.d_model, generator=generator, dtype=torch.float64)

    def metric(logits):
        return logits[:, -1, 3].sum()

    def add(stream, hook):
        return stream + steer

    hooks = [("blocks.1.hook_resid_pre", add)]
    with model.hooks(fwd_hooks=hooks), warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutedResidualPatchWarning)
        expected = metric(model(clean)).item()
        _, cache = model.run_with_cache(clean)
        cells = get_act_patch_depth_state(model, corrupted, cache, metric)
        by_pos = get_act_patch_depth_state_by_pos(model, corrupted, cache, metric)
    assert (cells.double() - expected).abs().max().item() <= 1e-6 * max(1, abs(expected))
    if kind != "none":
        return
    for pos in range(4):

        def patch(stream, hook, pos=pos):
            stream = stream.clone()
            stream[:, pos] = cache["blocks.1.hook_resid_pre"][:, pos]
            return stream

        with torch.no_grad():
            want = metric(
                model.run_with_hooks(
                    corrupted, fwd_hooks=[*hooks, ("blocks.1.hook_resid_pre", patch)]
                )
            ).item()
        assert by_pos[1, pos].item() == pytest.approx(want, rel=1e-6, abs=1e-7)
