"""Real checkpoints: HF Qwen3 directories and models, the qwen3_attnres format, TL cross-check."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import build_word_tokenizer, hf_qwen3, nan_at_padding, randomize_routing
from reference_attnres import reference_forward
from safetensors import safe_open
from safetensors.torch import save_file

from hooked_attnres import CheckpointError, HookedAttnRes, QKNormWarning, RunCacheDict
from hooked_attnres._tl import Slice
from hooked_attnres.analysis import recency_schedule, schedule_deviation


def write_public_qwen3_attnres(directory, hf, num_blocks, mode="block", gate="bias", seed=0):
    """A qwen3_attnres checkpoint laid out as the public code base writes it: HF
    ``save_pretrained`` (sharded) plus the router tensors, config fields per attnres.md 6."""
    hf.save_pretrained(directory, max_shard_size="20KB")
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="qwen3_attnres",
        architectures=["Qwen3AttnResForCausalLM"],
        attnres_num_blocks=num_blocks,
        attnres_recency_bias_init=3.0,
        attnres_mode=mode,
        attnres_gate_type=gate,
    )
    (directory / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    d = hf.config.hidden_size
    routers = {}
    for layer in range(hf.config.num_hidden_layers):
        for prefix in ("attn_res", "mlp_res"):
            routers[f"model.layers.{layer}.{prefix}_proj.weight"] = torch.randn(
                1, d, generator=generator
            )
            routers[f"model.layers.{layer}.{prefix}_norm.weight"] = 1 + 0.3 * torch.randn(
                d, generator=generator
            )
            routers[f"model.layers.{layer}.{prefix}_bias"] = 3 + torch.randn(
                (), generator=generator
            )
    save_file(routers, str(directory / "model-routers.safetensors"))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"].update({key: "model-routers.safetensors" for key in routers})
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return routers


def public_router_params(routers):
    def params(prefix):
        layer, router = prefix.split(".")[1], prefix.split(".")[2]
        base = f"model.layers.{layer}.{router}"
        return (
            routers[f"{base}_proj.weight"].reshape(-1),
            routers[f"{base}_norm.weight"],
            routers[f"{base}_bias"],
        )

    return params


def read_all(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


@pytest.mark.parametrize(
    "mode,num_blocks", [("block", 2), ("block", 3), ("full", 8), ("block", 9)]
)  # 3 blocks of 4 layers: ceil(4 / 3) = 2 layers per block, so 2 blocks
def test_public_qwen3_attnres_checkpoint_loads(tmp_path, mode, num_blocks):
    hf = hf_qwen3(num_hidden_layers=4)
    routers = write_public_qwen3_attnres(tmp_path / "public", hf, num_blocks, mode)
    model = HookedAttnRes.from_pretrained(tmp_path / "public")
    assert model.cfg.attnres_layout == "cumulative" and model.cfg.attnres_mode == mode
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = reference_forward(
            hf, "cumulative", num_blocks, public_router_params(routers), tokens, mode
        )
        got = model(tokens)
    assert (got - expected).abs().max().item() <= 1e-5


def test_a_qwen3_attnres_config_without_its_attnres_and_rope_fields_loads_with_the_public_defaults(
    tmp_path,
):
    """The public code's config class (``Qwen3AttnResConfig`` in ``modeling_attnres.py`` of
    github.com/wdlctc/open-attention-residuals, a subclass of transformers' ``Qwen3Config``)
    defaults ``attnres_num_blocks`` to 8, ``attnres_mode`` to "block", ``attnres_gate_type``
    to "bias" and ``attnres_recency_bias_init`` to 3.0, and leaves RoPE to ``Qwen3Config``;
    a config.json without them is that model (audit 206). 10 layers: 8 blocks are blocks of
    2 layers, unlike 1 (N = n_layers) or 10 (N = 1); block mode unlike full."""
    from transformers import Qwen3Config

    hf = hf_qwen3(num_hidden_layers=10)
    directory = tmp_path / "public"
    routers = write_public_qwen3_attnres(directory, hf, 2)
    config = json.loads((directory / "config.json").read_text())
    omitted = [
        "attnres_num_blocks",
        "attnres_mode",
        "attnres_gate_type",
        "attnres_recency_bias_init",
        "rope_parameters",
        "rope_theta",
        "rope_scaling",
    ]
    for name in omitted:
        config.pop(name, None)
    (directory / "config.json").write_text(json.dumps(config))
    # transformers reads no RoPE settings as the default RoPE of the reference module
    plain = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    assert Qwen3Config(**plain).rope_parameters == hf.config.rope_parameters

    model = HookedAttnRes.from_pretrained(directory)
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = reference_forward(
            hf, "cumulative", 8, public_router_params(routers), tokens, "block"
        )
        got = model(tokens)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["block", "full"])
def test_qwen3_attnres_round_trip(tmp_path, mode):
    hf = hf_qwen3(num_hidden_layers=4, tie_word_embeddings=(mode == "full"))
    wrapped = HookedAttnRes.from_hf_qwen3(hf, wrap="recency", num_blocks=2)
    model = HookedAttnRes(wrapped.cfg.replace(attnres_mode=mode))
    model.load_state_dict(wrapped.state_dict())
    randomize_routing(model, seed=3, scale=2.0)
    model.save_pretrained(tmp_path / "export", format="qwen3_attnres")

    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "qwen3_attnres" and config["attnres_gate_type"] == "bias"
    assert config["attnres_mode"] == mode and config["attnres_num_blocks"] == 2
    tensors = read_all(tmp_path / "export")
    expected_keys = set(hf.state_dict()) | {
        f"model.layers.{i}.{p}_{k}"
        for i in range(4)
        for p in ("attn_res", "mlp_res")
        for k in ("proj.weight", "norm.weight", "bias")
    }
    if hf.config.tie_word_embeddings:
        expected_keys.discard("lm_head.weight")
    assert set(tensors) == expected_keys
    assert tensors["model.layers.0.attn_res_proj.weight"].shape == (1, 32)
    assert tensors["model.layers.0.attn_res_bias"].shape == ()

    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    reloaded = HookedAttnRes.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), model(tokens))
        # what the public code base would compute from the exported files
        expected, _ = reference_forward(
            hf, "cumulative", 2, public_router_params(tensors), tokens, mode
        )
    assert (model(tokens) - expected).abs().max().item() <= 1e-5


def test_other_gate_types_and_layouts_are_refused(tmp_path):
    hf = hf_qwen3(num_hidden_layers=2)
    write_public_qwen3_attnres(tmp_path / "sigmoid", hf, 2, gate="sigmoid_scalar")
    with pytest.raises(CheckpointError, match="attnres_gate_type='sigmoid_scalar'"):
        HookedAttnRes.from_pretrained(tmp_path / "sigmoid")
    # a fork's extra routing option would have been ignored: refused by name
    write_public_qwen3_attnres(tmp_path / "fork", hf, 2)
    config = json.loads((tmp_path / "fork" / "config.json").read_text())
    config["attnres_use_null_source"] = True
    (tmp_path / "fork" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not implement: \['attnres_use_null_source'\]"):
        HookedAttnRes.from_pretrained(tmp_path / "fork")
    kimi = HookedAttnRes.from_hf_qwen3(hf, wrap="exact")
    with pytest.raises(ValueError, match="cumulative-layout models only"):
        kimi.save_pretrained(tmp_path / "kimi", format="qwen3_attnres")
    assert not (tmp_path / "kimi").exists()


@pytest.mark.parametrize("n_layers,n_kv,tied", [(3, 2, False), (4, 1, True), (6, 4, False)])
def test_exact_wrap_equals_vanilla_qwen3(n_layers, n_kv, tied):
    tokens = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(0))
    hf = hf_qwen3(
        num_hidden_layers=n_layers,
        num_key_value_heads=n_kv,
        tie_word_embeddings=tied,
        rms_norm_eps=0.0,
    )
    for num_blocks in range(1, n_layers + 1):
        model = HookedAttnRes.from_hf_qwen3(hf, wrap="exact", num_blocks=num_blocks)
        assert model.cfg.attnres_layout == "kimi" and model.routing_layout.has_final_router
        with torch.no_grad():
            assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
    # with the default epsilon the function moves slightly, the predictions do not
    hf = hf_qwen3(num_hidden_layers=n_layers, num_key_value_heads=n_kv, tie_word_embeddings=tied)
    model = HookedAttnRes.from_hf_qwen3(hf, wrap="exact", num_blocks=2)
    with torch.no_grad():
        expected, got = hf(tokens).logits, model(tokens)
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    assert (got - expected).abs().max().item() < 0.05


@pytest.mark.parametrize(
    "n_layers,num_blocks,bias", [(4, 2, 3.0), (7, 3, 1.0), (28, 8, 3.0), (5, 5, 0.0)]
)
def test_recency_wrap_routes_exactly_as_the_schedule(n_layers, num_blocks, bias):
    hf = hf_qwen3(num_hidden_layers=n_layers, hidden_size=16, head_dim=4, intermediate_size=16)
    model = HookedAttnRes.from_hf_qwen3(
        hf, wrap="recency", num_blocks=num_blocks, recency_bias=bias
    )
    schedule = recency_schedule(n_layers, num_blocks, bias)
    for seed in range(3):  # content independence: any input gives the same routing
        tokens = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(seed))
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_weights"))
        assert schedule_deviation(model, cache, schedule) <= 1e-6
    if (n_layers, num_blocks, bias) == (28, 8, 3.0):
        assert abs(schedule.mean_current - 0.8397) < 5e-5


def test_from_hf_qwen3_refuses_a_wrap_argument_the_wrap_ignores():
    """Audit 76: ``wrap="none", num_blocks=7`` loaded the plain Qwen3 as if num_blocks
    were not there (the logits of num_blocks 2 and 7 were equal), and ``wrap="exact",
    recency_bias=1.0`` loaded a model without a bias: refused by name. Left out, the
    defaults are the recency wrap's 8 blocks and bias 3 (as before)."""
    hf = hf_qwen3(num_hidden_layers=8, hidden_size=16, head_dim=4, intermediate_size=16)
    with pytest.raises(
        ValueError,
        match=r"^num_blocks applies to the recency and exact wraps \(the AttnRes blocks "
        r"they route over\); wrap='none' loads the plain residual Qwen3, which has no "
        r"blocks, and would ignore it: leave num_blocks out, or pass wrap='recency' or "
        r"'exact'$",
    ):
        HookedAttnRes.from_hf_qwen3(hf, wrap="none", num_blocks=7)
    for wrap, has in (("exact", "routes without a bias"), ("none", "has no routers")):
        with pytest.raises(
            ValueError,
            match=rf"^recency_bias applies to the recency wrap only; wrap='{wrap}' {has} "
            r"and would ignore it: leave recency_bias out, or pass wrap='recency'$",
        ):
            HookedAttnRes.from_hf_qwen3(hf, wrap=wrap, recency_bias=1.0)
    default = HookedAttnRes.from_hf_qwen3(hf)
    given = HookedAttnRes.from_hf_qwen3(hf, num_blocks=8, recency_bias=3.0)
    assert default.cfg == given.cfg
    assert (default.cfg.attnres_num_blocks, default.cfg.attnres_recency_bias) == (8, 3.0)
    # without the refused arguments: loads
    assert HookedAttnRes.from_hf_qwen3(hf, wrap="exact").cfg.attnres_recency_bias is None
    assert HookedAttnRes.from_hf_qwen3(hf, wrap="none").cfg.attnres_layout == "none"


def test_recency_schedule_for_the_qwen3_06b_shape():
    schedule = recency_schedule(28, 8, 3.0)
    means = schedule.family_means
    expected = {"current": 0.840, "embedding": 0.042, "prev_completed": 0.035, "older": 0.083}
    for family, value in expected.items():
        assert abs(means.loc["all", family] - value) < 5e-4, family
        assert abs(means.loc["attn_res", family] - means.loc["mlp_res", family]) < 1e-12
    assert round(schedule.mean_current, 4) == 0.8397
    # per layer, the family weights sum to one
    totals = schedule.families.groupby(["layer", "router"]).weight.sum()
    assert torch.allclose(
        torch.tensor(totals.to_numpy()), torch.ones(len(totals), dtype=torch.float64)
    )


def test_recency_schedule_of_a_large_bias_and_a_bool_bias():
    """Audit finding: ``math.exp(bias)`` overflowed for a finite bias >= 710
    (``OverflowError``), and ``bias=True`` was read as 1 (mean current 0.654)."""
    for bias in (3.0, 705.0, 710.0, 1000.0, -800.0):
        schedule = recency_schedule(4, 2, bias)
        for layer in range(4):
            for router in ("attn_res", "mlp_res"):
                n_other = len(schedule.weights(layer, router)) - 1
                logits = torch.zeros(n_other + 1, dtype=torch.float64)
                logits[-1] = bias  # zero query: the bias on the current source only
                expected = torch.softmax(logits, dim=0)
                assert torch.allclose(
                    schedule.weights(layer, router), expected, rtol=1e-12, atol=1e-300
                )
    with pytest.raises(ValueError, match="bias must be a finite number, got True"):
        recency_schedule(4, 2, True)


def test_schedule_deviation_detects_learned_routing():
    hf = hf_qwen3(num_hidden_layers=4)
    model = randomize_routing(HookedAttnRes.from_hf_qwen3(hf, wrap="recency", num_blocks=2))
    _, cache = model.run_with_cache(torch.randint(0, 61, (2, 5)))
    assert schedule_deviation(model, cache, recency_schedule(4, 2, 3.0)) > 0.01
    with pytest.raises(ValueError, match="different shape"):
        schedule_deviation(model, cache, recency_schedule(4, 1, 3.0))
    with pytest.raises(ValueError, match="num_blocks must be"):
        recency_schedule(4, 5, 3.0)


def test_a_non_finite_routing_weight_is_refused_not_read_as_agreement():
    """Audit finding: Python's ``max(worst, nan)`` keeps ``worst`` and pandas' mean / max skip
    NaN, so a NaN routing weight passed the schedule claim (deviation 2.2e-8)."""
    from hooked_attnres.analysis import routing_mass, schedule_comparison

    model = HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap="recency", num_blocks=2).eval()
    tokens = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(0))
    names = [site.hook("weights") for site in model.sites()]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    cache = RunCacheDict({name: cache[name].clone() for name in names})  # of an unpadded run
    schedule = recency_schedule(3, 2, 3.0)
    assert schedule_deviation(model, cache, schedule) < 1e-6
    cache[names[1]][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{re.escape(names[1])} holds non-finite"):
        schedule_deviation(model, cache, schedule)
    mass = routing_mass(model, tokens, positions="all")
    assert schedule_comparison(mass, schedule).max_abs_deviation.max() < 1e-6
    mass.loc[5, "mass"] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite mass value"):
        schedule_comparison(mass, schedule)


def test_schedule_deviation_reads_the_real_positions_of_a_padded_cache():
    """Audit finding: schedule_deviation read the padding positions too, so a NaN there
    (garbage a padding position may hold: here a hook's, with eps 0 the model's own 0 / 0
    before padding_eps) made it refuse a cache whose real tokens route exactly as the
    schedule ("non-finite routing weights"). It now reads the real positions the cache
    records (all of them for a hook cached with a ``pos_slice``)."""
    model = HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap="recency", num_blocks=2)
    tokens = torch.tensor([[1, 1, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    schedule = recency_schedule(3, 2, 3.0)
    for rows, keep_batch in ((slice(None), True), (slice(0, 1), False)):
        with model.hooks(fwd_hooks=[nan_at_padding(mask[rows])]):
            _, cache = model.run_with_cache(
                tokens[rows], attention_mask=mask[rows], remove_batch_dim=not keep_batch
            )
        expected = 0.0  # e^b / (e^b + n) on current, 1 / (e^b + n) elsewhere, real tokens
        for site in model.sites():
            weights = cache[site.hook("weights")].double()
            real = weights[mask[rows].bool()] if keep_batch else weights[mask[0].bool()]
            n = weights.shape[-1] - 1
            predicted = torch.full((n + 1,), 1 / (math.exp(3) + n), dtype=torch.float64)
            predicted[-1] = math.exp(3) / (math.exp(3) + n)
            expected = max(expected, (real - predicted).abs().max().item())
        assert expected < 1e-6
        assert schedule_deviation(model, cache, schedule) == pytest.approx(expected, abs=1e-15)
    # a pos_slice's positions: the cache records it, so their padding is told (audit 60)
    with model.hooks(fwd_hooks=[nan_at_padding(mask)]):
        _, cache = model.run_with_cache(tokens, attention_mask=mask, pos_slice=[0, 3])
    assert schedule_deviation(model, cache, schedule) < 1e-6


def test_schedule_deviation_refuses_hooks_whose_padding_cannot_be_told():
    """Review finding: a hook of a padded run cached with a ``pos_slice``, or left by an
    earlier (padded) pass of kept caching hooks, was read at every position, its padding
    included (finite routing of the pad token): here 0.63276 for a sliced cache whose real
    tokens deviate by at most 0.62873. The second is refused; the first was too until
    audit 60, and is read at the real tokens of its kept positions now that the cache
    records its ``pos_slice`` (a list, an int ``Slice`` that drops the axis); a pos_slice
    of an unpadded run is read as before."""
    from helpers import tiny_model

    model = randomize_routing(
        tiny_model(attnres_layout="cumulative", dtype=torch.float64), seed=24, scale=0.5
    )
    cfg = model.cfg
    schedule = recency_schedule(cfg.n_layers, cfg.attnres_num_blocks, cfg.attnres_recency_bias)
    tokens = torch.tensor([[9, 9, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = (tokens != 9).long()
    _, whole = model.run_with_cache(tokens, attention_mask=mask)

    def deviation(rows_and_positions):  # independent: max |measured - predicted|
        worst = 0.0
        for site in model.sites():
            weights = whole[site.hook("weights")]
            measured = torch.stack([weights[b, p] for b, p in rows_and_positions])
            predicted = schedule.weights(site.layer, site.kind).to(measured)
            worst = max(worst, (measured - predicted).abs().max().item())
        return worst

    _, sliced = model.run_with_cache(tokens, attention_mask=mask, pos_slice=[0, 3])
    assert deviation([(0, 3), (1, 0), (1, 3)]) != pytest.approx(
        deviation([(0, 0), (0, 3), (1, 0), (1, 3)]), abs=1e-3
    )  # the padding (0, 0) would change the answer
    assert schedule_deviation(model, sliced, schedule) == pytest.approx(
        deviation([(0, 3), (1, 0), (1, 3)]), abs=1e-15
    )
    _, one = model.run_with_cache(tokens, attention_mask=mask, pos_slice=Slice(0))
    assert one["blocks.0.attn_res.hook_weights"].ndim == 2  # [batch, n]
    assert schedule_deviation(model, one, schedule) == pytest.approx(deviation([(1, 0)]), abs=1e-15)
    # unpadded: every position is a real token, a pos_slice is read as it is
    _, unpadded = model.run_with_cache(tokens[1:], pos_slice=[0, 3])
    _, whole = model.run_with_cache(tokens[1:])
    assert schedule_deviation(model, unpadded, schedule) == pytest.approx(
        deviation([(0, 0), (0, 3)]), abs=1e-15
    )
    # caching hooks kept over a padded pass and a shorter unpadded one: the later layers
    # hold the padded pass's weights, recorded as unpadded
    cache, fwd, _ = model.get_caching_hooks()
    with model.hooks(fwd_hooks=fwd):
        model(tokens, attention_mask=mask)
        model(tokens, stop_at_layer=1)
    with pytest.raises(ValueError, match="were last filled by an earlier pass"):
        schedule_deviation(model, cache, schedule)


def test_schedule_deviation_refuses_a_cache_that_records_no_padding():
    """Audit 199: a plain ``dict`` of a cache (``dict(cache.cache_dict)``, a dict built by
    hand or loaded), or a TransformerLens ``ActivationCache`` around one, records no
    padding, and schedule_deviation read every position of it as a real token: 0.357 for a
    left-padded run whose real token deviates by 0.299 (the padding's routing counted). It
    refuses such a cache now, naming the cache object and `RunCacheDict`, which records
    it; a `RunCacheDict` declaring the mask gives the real tokens' deviation (by hand)."""
    from helpers import tiny_model
    from transformer_lens import ActivationCache

    model = randomize_routing(
        tiny_model(attnres_layout="cumulative", dtype=torch.float64), seed=6, scale=0.5
    )
    cfg = model.cfg
    schedule = recency_schedule(cfg.n_layers, cfg.attnres_num_blocks, cfg.attnres_recency_bias)
    tokens = torch.tensor([[28] * 8 + [7]])
    mask = torch.tensor([[0] * 8 + [1]])
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    by_hand = max(
        (cache[site.hook("weights")][0, -1] - schedule.weights(site.layer, site.kind))
        .abs()
        .max()
        .item()
        for site in model.sites()
    )
    padded = max(
        (cache[site.hook("weights")][0] - schedule.weights(site.layer, site.kind))
        .abs()
        .max()
        .item()
        for site in model.sites()
    )
    assert padded > by_hand + 0.05  # the padding would change the answer
    assert schedule_deviation(model, cache, schedule) == pytest.approx(by_hand, abs=1e-15)
    plain = dict(cache.cache_dict)
    for unrecorded in (plain, ActivationCache(plain, model)):
        with pytest.raises(
            ValueError,
            match=r"^schedule_deviation's cache \((dict|ActivationCache)\) does not record "
            r"the pass that made it .*padding positions would be read as real tokens.*"
            r"model\.run_with_cache.*hooked_attnres\.RunCacheDict\(tensors, n_past=0, "
            r"attention_mask=mask\)",
        ):
            schedule_deviation(model, unrecorded, schedule)
    declared = RunCacheDict(plain, attention_mask=mask)
    assert schedule_deviation(model, declared, schedule) == pytest.approx(by_hand, abs=1e-15)


def test_schedule_deviation_refuses_a_cache_of_padding_only():
    """Audit 193: a padded run cached at positions that are all padding (``pos_slice=[1, 0]``
    of a prompt with two padding tokens first) left no token to compare, and
    schedule_deviation failed inside torch ("max(): Expected reduction dim to be specified
    for input.numel() == 0"); 0.0 would report agreement with nothing measured. Refused by
    name, with what to cache instead; a position of a real token in the same slice is read
    (control, against the weights read by hand)."""
    from helpers import tiny_model

    model = randomize_routing(
        tiny_model(attnres_layout="cumulative", dtype=torch.float64), seed=3
    ).eval()
    cfg = model.cfg
    schedule = recency_schedule(cfg.n_layers, cfg.attnres_num_blocks, cfg.attnres_recency_bias)
    tokens = torch.tensor([[9, 9, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    for pos_slice in ([1, 0], Slice(0), slice(0, 2)):
        for drop in (False, True):
            _, cache = model.run_with_cache(
                tokens, attention_mask=mask, pos_slice=pos_slice, remove_batch_dim=drop
            )
            with pytest.raises(
                ValueError,
                match=r"schedule_deviation's cache holds no real token.*only padding"
                r".*pos_slice that keeps a real token",
            ):
                schedule_deviation(model, cache, schedule)
    _, cache = model.run_with_cache(tokens, attention_mask=mask, pos_slice=[1, 3])
    _, whole = model.run_with_cache(tokens, attention_mask=mask)
    expected = max(
        (whole[site.hook("weights")][0, 3] - schedule.weights(site.layer, site.kind))
        .abs()
        .max()
        .item()
        for site in model.sites()
    )
    assert expected > 0.01
    assert schedule_deviation(model, cache, schedule) == pytest.approx(expected, abs=1e-15)


def test_sharded_transformers_directory_with_tokenizer(tmp_path):
    hf = hf_qwen3(num_hidden_layers=3)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(50)])
    tokenizer.save_pretrained(tmp_path / "hf")
    model = HookedAttnRes.from_hf_qwen3(tmp_path / "hf", wrap="none")
    tokens = model.to_tokens(["w1 w2 w3 w4 w5"])
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
    assert model.to_str_tokens(tokens) == ["w1", "w2", "w3", "w4", "w5"]
    single = HookedAttnRes.from_hf_qwen3(hf, wrap="recency", num_blocks=3)
    hf.save_pretrained(tmp_path / "single")
    from_dir = HookedAttnRes.from_hf_qwen3(tmp_path / "single", wrap="recency", num_blocks=3)
    # both keep Hugging Face's memory layout (the file's, or a copy of the module's): same bits
    assert torch.equal(from_dir(tokens), single(tokens))


# TransformerBridge lays q_norm / k_norm hooks out [batch, head, pos, d] (Hugging Face's
# attention layout); ours are [batch, pos, head, d] like hook_q / hook_k (docs/hooks.md)
HEAD_MAJOR_IN_BRIDGE = re.compile(r"attn\.[qk]_norm\.hook_(scale|normalized)$")


def test_transformerlens_bridge_sees_the_same_activations(tmp_path):
    """Layout "none" and TL 4.x TransformerBridge, both loaded offline from the same local
    Qwen3 directory, agree on the logits and on every hook name they share (every hook of
    ours, with the optional hooks switched on in both) to 1e-5, without padding and, at the
    real positions, with left padding; the names only the Bridge has are those
    docs/hooks.md lists."""
    from transformer_lens.model_bridge import TransformerBridge

    directory = tmp_path / "qwen3"
    hf_qwen3().save_pretrained(directory)
    build_word_tokenizer([f"w{i}" for i in range(50)]).save_pretrained(directory)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
    model = HookedAttnRes.from_hf_qwen3(directory, wrap="none")
    bridge.eval()
    for flagged in (bridge, model):
        flagged.set_use_attn_result(True)
        flagged.set_use_split_qkv_input(True)
        flagged.set_use_hook_mlp_in(True)
    tokens = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
    left_padded = torch.ones(2, 7, dtype=torch.long)
    left_padded[1, :3] = 0
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    for mask in (None, left_padded):
        real = torch.ones(2, 7, dtype=torch.bool) if mask is None else mask.bool()
        with torch.no_grad():
            bridge_logits, bridge_cache = bridge.run_with_cache(tokens, attention_mask=mask)
            logits, cache = model.run_with_cache(tokens, attention_mask=mask)
        assert (bridge_logits - logits)[real].abs().max().item() <= 1e-5
        # every hook of ours has a TransformerBridge counterpart under the same name
        assert set(cache.keys()) <= set(bridge_cache.keys())
        for name in cache.keys():
            theirs, ours = bridge_cache[name], cache[name]
            if HEAD_MAJOR_IN_BRIDGE.search(name):
                theirs = theirs.transpose(1, 2)
            assert theirs.shape == ours.shape, name
            if name.endswith(("hook_attn_scores", "hook_pattern")):
                # [batch, head, query, key]: real queries (a padding query's row differs,
                # docs/hooks.md); TL masks with the dtype minimum, we with -inf
                rows = real[:, None, :, None].expand_as(ours)
                if name.endswith("hook_attn_scores"):
                    allowed = causal & real[:, None, None, :]
                    assert torch.equal(
                        (ours == float("-inf"))[rows], (~allowed.expand_as(ours))[rows]
                    )
                    rows = rows & allowed.expand_as(ours)
                theirs, ours = theirs[rows], ours[rows]
            elif ours.shape[:2] == real.shape:  # [batch, pos, ...]: the real positions
                theirs, ours = theirs[real], ours[real]
            assert (theirs - ours).abs().max().item() <= 1e-5, name
    # the Bridge's own names (component hook_in / hook_out, rotary tables, ...) are listed
    hooks_doc = (Path(__file__).parents[1] / "docs" / "hooks.md").read_text()
    section = hooks_doc.split("## Names only TransformerBridge has")[1].split("\n## ")[0]
    for name in set(bridge_cache.keys()) - set(cache.keys()):
        generic = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", name)
        assert f"`{generic}`" in section, name
    # editing each optional hook changes what the Bridge's edit of it changes: one head's
    # query / key / value input, one head's result, the MLP input (measured 1.5e-7 apart,
    # for effects of 0.03 to 0.17)
    delta = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))

    def add_to_head(head):
        def hook(x, hook):
            x = x.clone()
            x[:, :, head] += delta
            return x

        return hook

    edits = [
        ("blocks.1.hook_q_input", add_to_head(2)),
        ("blocks.1.attn.hook_q_input", add_to_head(1)),
        ("blocks.1.hook_k_input", add_to_head(1)),
        ("blocks.2.attn.hook_v_input", add_to_head(0)),
        ("blocks.1.attn.hook_result", lambda x, hook: x.index_fill(2, torch.tensor([3]), 0)),
        ("blocks.0.hook_mlp_in", lambda x, hook: x + delta),
    ]
    with torch.no_grad():
        plain = model(tokens)
        for name, hook in edits:
            ours = model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])
            theirs = bridge.run_with_hooks(tokens, fwd_hooks=[(name, hook)])
            assert (ours - plain).abs().max() > 0.01, name  # the edit matters
            assert (ours - theirs).abs().max() <= 1e-5, name
    # composition scores: the Bridge's on the same weights, in every wrap (the routing
    # scales sources by numbers, which a score does not see); before, AttributeError
    wraps = [model] + [HookedAttnRes.from_hf_qwen3(directory, wrap=w) for w in ("recency", "exact")]
    for mode in ("Q", "K", "V"):
        theirs = bridge.all_composition_scores(mode)
        assert theirs.scores.abs().max() > 0.05, mode  # later heads score against earlier
        for wrapped in wraps:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", QKNormWarning)  # mode Q / K reads model.QK
                ours = wrapped.all_composition_scores(mode)
            assert ours.head_labels == theirs.head_labels
            assert ours.layer_indices == theirs.layer_indices
            assert ours.scores.shape == theirs.scores.shape == (3, 4, 3, 4)
            assert (ours.scores - theirs.scores).abs().max() <= 1e-6, mode
    with pytest.raises(ValueError, match=r"^mode must be one of \('Q', 'K', 'V'\), got 'O'$"):
        model.all_composition_scores("O")


@pytest.mark.parametrize("mmap", [False, True])
def test_non_finite_weights_of_a_vanilla_qwen3_are_refused(tmp_path, mmap):
    """A NaN in a (sharded) directory or a module loaded silently before (NaN logits)."""
    hf = hf_qwen3()
    with torch.no_grad():
        hf.model.layers[1].self_attn.k_proj.weight[2, 5] = float("nan")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    with pytest.raises(
        CheckpointError,
        match=r"model-\d+-of-00006\.safetensors has weights with NaN or infinite values: "
        + re.escape("model.layers.1.self_attn.k_proj.weight (1 of 512 elements)"),
    ):
        # with mmap the weights read into memory are scanned (here: converted), mapped
        # ones are not (docs/loading.md)
        HookedAttnRes.from_hf_qwen3(
            tmp_path / "hf", wrap="none", mmap=mmap, dtype=torch.bfloat16 if mmap else "float32"
        )
    with torch.no_grad():
        hf.model.norm.weight[0] = float("inf")
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "the in-memory Qwen3ForCausalLM has weights with NaN or infinite values: "
            "model.layers.1.self_attn.k_proj.weight (1 of 512 elements), model.norm.weight "
            "(1 of 32 elements)"
        ),
    ):
        HookedAttnRes.from_hf_qwen3(hf, wrap="exact", num_blocks=2)


@pytest.mark.parametrize("first_sharded", [False, True])
def test_a_directory_with_both_a_single_file_and_a_shard_index_is_refused(tmp_path, first_sharded):
    """``save_pretrained`` over a save of the other layout leaves both behind. A sharded
    save over a single file: the shards were loaded here while ``transformers`` loads the
    stale ``model.safetensors`` (the two models' logits differed by 0.58). The reverse
    leaves a stale index whose shards are gone: refused here as "missing shards", loaded
    by ``transformers``. Which weights are meant is not in the directory."""
    from transformers import Qwen3ForCausalLM

    old, new = hf_qwen3(seed=0), hf_qwen3(seed=1)
    old.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if first_sharded else "5GB")
    new.save_pretrained(tmp_path / "hf", max_shard_size="5GB" if first_sharded else "20KB")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    tokens = torch.arange(8)[None]
    with torch.no_grad():
        theirs = Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").eval()(tokens).logits
        # transformers reads model.safetensors: the newer save or the stale one
        assert torch.equal(theirs, (new if first_sharded else old)(tokens).logits)
    both = "holds both model.safetensors and model.safetensors.index.json.*transformers loads"
    with pytest.raises(CheckpointError, match=both):
        HookedAttnRes.from_hf_qwen3(tmp_path / "hf", wrap="none")
    # the qwen3_attnres reader shares the file lookup
    randomize_routing(HookedAttnRes.from_hf_qwen3(new, num_blocks=2)).save_pretrained(
        tmp_path / "attnres", format="qwen3_attnres"
    )
    (tmp_path / "attnres" / "model.safetensors.index.json").write_text(
        (tmp_path / "hf" / "model.safetensors.index.json").read_text()
    )
    with pytest.raises(CheckpointError, match=both):
        HookedAttnRes.from_pretrained(tmp_path / "attnres")


@pytest.mark.parametrize(
    "weight_map", [["model.safetensors"], "model.safetensors", {"lm_head.weight": 3}, None]
)
def test_a_malformed_shard_index_is_refused(tmp_path, weight_map):
    """A ``weight_map`` that is not a mapping of weight names to shard files raised a bare
    ``TypeError`` / ``AttributeError`` from the shard lookup."""
    hf_qwen3(seed=0).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="is not a valid shard index"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "hf", wrap="none")
    index.write_text(json.dumps([1, 2]))  # not even an object
    with pytest.raises(CheckpointError, match="is not a valid shard index"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "hf", wrap="none")
    index.write_bytes(b"\xff\xfe{")  # not text (a bare UnicodeDecodeError before)
    with pytest.raises(CheckpointError, match="is not a valid shard index"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "hf", wrap="none")


def test_bad_sources_fail_with_what_was_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "missing")
    with pytest.raises(TypeError, match="source must be a checkpoint directory"):
        HookedAttnRes.from_hf_qwen3(42)
    with pytest.raises(ValueError, match="wrap must be one of"):
        HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap="approximate")

    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=20,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="not a Qwen3 checkpoint"):
        HookedAttnRes.from_hf_qwen3(llama)

    hf = hf_qwen3(num_hidden_layers=3)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"missing 1 of \d+ shard\(s\).*{shard.name}"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "sharded")

    hf.save_pretrained(tmp_path / "resized")
    config = json.loads((tmp_path / "resized" / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "resized" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped keys.*mlp.down_proj.weight expected \(32, 48\) found \(32, 40\)",
    ):
        HookedAttnRes.from_hf_qwen3(tmp_path / "resized")

    config["intermediate_size"], config["num_hidden_layers"] = 40, 4
    (tmp_path / "resized" / "config.json").write_text(json.dumps(config))
    # the saved layer_types still lists 3 layers, which transformers refuses too
    with pytest.raises(CheckpointError, match=r"list of num_hidden_layers=4 entries"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "resized")
    del config["layer_types"]  # as an older config.json without them
    (tmp_path / "resized" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing keys.*model.layers.3"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "resized")

    config.update(num_hidden_layers=3, use_sliding_window=True, sliding_window=4)
    config.update(max_window_layers=0, layer_types=None)  # every layer slides
    (tmp_path / "resized" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="use_sliding_window=True with sliding_window=4"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "resized")

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(hf.config.to_dict()))
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors checkpoints are supported"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "bin")

    write_public_qwen3_attnres(tmp_path / "attnres", hf_qwen3(num_hidden_layers=2), 2)
    with pytest.raises(CheckpointError, match="load it with HookedAttnRes.from_pretrained"):
        HookedAttnRes.from_hf_qwen3(tmp_path / "attnres")
    hf.save_pretrained(tmp_path / "vanilla")
    with pytest.raises(CheckpointError, match="from_hf_qwen3"):
        HookedAttnRes.from_pretrained(tmp_path / "vanilla")

    # the decoder alone (no "model." prefix, no lm_head): named, not a KeyError
    with pytest.raises(
        CheckpointError,
        match=r"the weights of the in-memory Qwen3Model are a base Qwen3Model's \(keys without ",
    ):
        HookedAttnRes.from_hf_qwen3(hf.model)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_base_qwen3model_is_refused_saying_what_it_is(tmp_path, tied):
    """A Qwen3Model directory (what ``Qwen3ForCausalLM.model.save_pretrained`` writes:
    keys without "model.", no lm_head) was refused with 36 missing and 35 unexpected keys
    listed; now in one sentence that says what to do."""
    from transformers import Qwen3ForCausalLM

    hf = hf_qwen3(tie_word_embeddings=tied)
    hf.model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3Model"]
    whose = {str(tmp_path): "in " + re.escape(str(tmp_path)), "module": "of the in-memory"}
    what = r"are a base Qwen3Model's \(keys without the 'model.' prefix, no lm_head.weight\): "
    todo = (
        r"tie_word_embeddings=true\), so transformers' Qwen3ForCausalLM.from_pretrained of it"
        if tied
        else r"tie_word_embeddings=false\), so the head's weights are not in it"
    )
    for source, where in ((tmp_path, whose[str(tmp_path)]), (hf.model, whose["module"])):
        with pytest.raises(CheckpointError, match=rf"the weights {where}.* {what}.*{todo}") as info:
            HookedAttnRes.from_hf_qwen3(source)
        assert "missing keys" not in str(info.value)
    if tied:  # what the message says to do gives transformers' logits
        module = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
        tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
        with torch.no_grad():
            expected = hf(tokens).logits
            assert torch.equal(module(tokens).logits, expected)
            loaded = HookedAttnRes.from_hf_qwen3(module, wrap="none")(tokens)
        assert (loaded - expected).abs().max().item() <= 1e-5


def test_config_fields_that_are_missing_or_not_numbers_are_named(tmp_path):
    hf = hf_qwen3(num_hidden_layers=2)
    write_public_qwen3_attnres(tmp_path / "attnres", hf, 2)
    hf.save_pretrained(tmp_path / "vanilla")
    for directory, load in (
        ("attnres", HookedAttnRes.from_pretrained),
        ("vanilla", HookedAttnRes.from_hf_qwen3),
    ):
        path = tmp_path / directory
        good = json.loads((path / "config.json").read_text())
        for field, value in (("num_hidden_layers", None), ("hidden_size", 32.0)):
            config = dict(good)
            if value is None:
                del config[field]
            else:
                config[field] = value
            (path / "config.json").write_text(json.dumps(config))
            with pytest.raises(
                CheckpointError, match=rf"{path} has {field}={value!r} in its config; expected a"
            ):
                load(path)
        (path / "config.json").write_text(json.dumps(good))
    path = tmp_path / "attnres"
    good = json.loads((path / "config.json").read_text())
    for field, value, expected in (
        ("attnres_recency_bias_init", None, "a finite number"),
        ("attnres_recency_bias_init", "3", "a finite number"),
        ("attnres_num_blocks", True, "an integer >= 1"),
    ):
        (path / "config.json").write_text(json.dumps({**good, field: value}))
        with pytest.raises(CheckpointError, match=rf"{field}={value!r}; expected {expected}"):
            HookedAttnRes.from_pretrained(path)


@pytest.mark.parametrize("from_directory", [False, True])
def test_wrapped_projections_are_private_and_multiplied_without_copies(tmp_path, from_directory):
    """``from_hf_qwen3`` on a module copies its weights (editing the module afterwards
    changes nothing) and, from a module or a directory, keeps HF's memory order, in which
    the forward's ``[d_model, n_heads * d_head]`` projection matrices are views of the
    parameters (not a copy per forward pass, which cost 5 % of a bfloat16 0.6B forward)."""
    hf = hf_qwen3()
    if from_directory:
        hf.save_pretrained(tmp_path)
    model = HookedAttnRes.from_hf_qwen3(tmp_path if from_directory else hf, wrap="exact")
    tokens = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    before = model(tokens)
    hf_weights = {name: p for name, p in hf.named_parameters()}
    for name, weight in model.named_parameters():
        assert not any(
            weight.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
            for p in hf_weights.values()
        ), name
    for attn in (block.attn for block in model.blocks):
        for weight in (attn.W_Q, attn._W_K, attn._W_V):
            n_heads, d_model, d_head = weight.shape
            flat = weight.permute(1, 0, 2).reshape(d_model, n_heads * d_head)
            assert flat.data_ptr() == weight.data_ptr()  # a view
        assert attn.W_O.flatten(0, 1).data_ptr() == attn.W_O.data_ptr()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(1.0)
    assert torch.equal(model(tokens), before)


def _float64_qwen3():
    """A ``Qwen3ForCausalLM`` in float64 whose weights float32 cannot hold."""
    module = hf_qwen3().double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(1e-3 * torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return module


@pytest.mark.parametrize("wrap", ["none", "recency"])
@pytest.mark.parametrize("kind", ["directory", "module"])
def test_from_hf_qwen3_keeps_float64_weights_by_default(tmp_path, wrap, kind):
    """The default dtype was float32 whatever the weights: a float64 Qwen3 (e.g. a vanilla
    study run trained in float64) was rounded silently, by up to 5.9e-8 per weight and
    1.0e-7 in the logits of the tiny model, while ``from_pretrained`` of a ``qwen3_attnres``
    directory keeps float64 weights. Now the default is float32 unless a weight is float64,
    as there (and as ``transformers``' own ``from_pretrained`` gives the stored dtype)."""
    module = _float64_qwen3()
    source = module
    if kind == "directory":
        module.save_pretrained(tmp_path)
        source = tmp_path
    model = HookedAttnRes.from_hf_qwen3(source, wrap=wrap)
    assert model.cfg.dtype == torch.float64
    asked = HookedAttnRes.from_hf_qwen3(source, wrap=wrap, dtype=torch.float64)
    expected = dict(asked.named_parameters())
    for name, got in model.named_parameters():
        assert got.dtype == torch.float64 and torch.equal(got, expected[name]), name
    tokens = torch.arange(12)[None] % 61
    with torch.no_grad():
        assert torch.equal(model(tokens), asked(tokens))
        if wrap == "none":  # the vanilla function in float64 (its float32 RoPE tables aside)
            hf = module(input_ids=tokens).logits
            assert (model(tokens) - hf).abs().max() < 1e-7
    # float32 weights still load as float32, and dtype= still converts
    float32 = HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap=wrap)
    assert {p.dtype for p in float32.parameters()} == {torch.float32}
    rounded = HookedAttnRes.from_hf_qwen3(source, wrap=wrap, dtype="float32")
    assert {p.dtype for p in rounded.parameters()} == {torch.float32}


@pytest.mark.parametrize("kind", ["directory", "module"])
def test_a_tokenizer_given_by_name_is_refused_with_what_to_pass(tmp_path, kind, monkeypatch):
    """``from_hf_qwen3(tokenizer="gpt2")`` failed with ``AttributeError: 'str' object has no
    attribute 'pad_token'`` (TransformerLens would download the named tokenizer; nothing
    here downloads). A name, a path or another non-tokenizer is refused by name, saying to
    pass the tokenizer object, before the weights are read; so is ``set_tokenizer`` and
    `train`'s ``tokenizer=``. No tokenizer is loaded to find out."""
    import transformers

    from hooked_attnres.study import build_model
    from hooked_attnres.tasks import KeyValueRetrieval, task_tokenizer
    from hooked_attnres.training import TrainConfig, train

    def no_loading(*args, **kwargs):
        raise AssertionError("a tokenizer was loaded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    source = hf_qwen3()
    if kind == "directory":
        source.save_pretrained(tmp_path)
        source = tmp_path
    for given, shown in (("gpt2", "the str 'gpt2'"), (Path("tok"), "the PosixPath"), (3, "int")):
        with pytest.raises(
            TypeError,
            match=rf"^tokenizer must be a Hugging Face tokenizer .*{shown}"
            r".*AutoTokenizer\.from_pretrained",
        ):
            HookedAttnRes.from_hf_qwen3(source, wrap="none", tokenizer=given)
    model = HookedAttnRes.from_hf_qwen3(source, wrap="none")
    with pytest.raises(TypeError, match=r"^tokenizer must be a Hugging Face tokenizer .*'gpt2'"):
        model.set_tokenizer("gpt2")
    task = KeyValueRetrieval(n_pairs=2, n_keys=4, n_values=4)
    tok = task_tokenizer(task)
    small = build_model("attnres", 0, tok, dict(d_model=16, n_layers=1, n_heads=2), 1)
    with pytest.raises(TypeError, match=r"^tokenizer must be a Hugging Face tokenizer .*'gpt2'"):
        train(small, task, TrainConfig(steps=1, warmup_steps=0), tmp_path / "run", "gpt2")
    assert not (tmp_path / "run").exists()
