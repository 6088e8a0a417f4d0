"""Hugging Face Qwen3 config fields that change the computation: ``from_hf_qwen3`` either
reproduces what ``transformers`` computes from the same ``config.json`` / module, or refuses
with a `CheckpointError` naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import hf_qwen3
from transformers import Qwen3ForCausalLM
from transformers.utils import logging as hf_logging

from hooked_attnres import CheckpointError, HookedAttnRes

TOKENS = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))


def edited_checkpoint(directory, **changes):
    """A saved random Qwen3 whose ``config.json`` has ``changes`` (value None: removed)."""
    hf_qwen3().save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def hf_module(directory) -> Qwen3ForCausalLM:
    """transformers' own model of ``directory`` (its loading warnings silenced)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return Qwen3ForCausalLM.from_pretrained(directory).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


def hf_logits(directory):
    with torch.no_grad():
        return hf_module(directory)(TOKENS).logits


def our_logits(source, wrap="none"):
    model = HookedAttnRes.from_hf_qwen3(source, wrap=wrap)
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.parametrize(
    "changes",
    [
        # transformers reads rope_scaling before rope_parameters
        dict(rope_scaling={"rope_type": "default", "rope_theta": 50.0}),
        dict(rope_parameters=None, rope_theta=50.0),  # the transformers-4 spelling
        dict(rope_theta=50.0),  # rope_parameters' own rope_theta comes first
    ],
)
def test_rope_settings_are_read_as_transformers_reads_them(tmp_path, changes):
    directory = edited_checkpoint(tmp_path, **changes)
    expected = hf_logits(directory)
    assert (our_logits(directory) - expected).abs().max().item() <= 1e-5


def test_rope_scaling_next_to_rope_parameters_is_refused(tmp_path):
    """transformers uses the linear scaling here (not rope_parameters' default RoPE)."""
    directory = edited_checkpoint(tmp_path, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(CheckpointError, match="rope type 'linear'.*default RoPE only"):
        HookedAttnRes.from_hf_qwen3(directory)


def test_tied_config_with_a_different_lm_head_is_refused(tmp_path):
    """transformers 5 leaves such a checkpoint untied (it unembeds with lm_head.weight);
    loading it tied gave logits off by 0.98 with no argmax in common."""
    directory = edited_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    match = r"tie_word_embeddings=True but also an lm_head.weight that differs .*max \|difference\|"
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(directory)
    module = hf_module(directory)
    assert module.config.tie_word_embeddings  # yet the module is untied
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(module)
    # untied on purpose: the separate lm_head, as transformers computes
    module.config.tie_word_embeddings = False
    with torch.no_grad():
        expected = module(TOKENS).logits
    assert (our_logits(module) - expected).abs().max().item() <= 1e-5


def test_tied_config_with_a_copy_of_the_embedding_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_qwen3(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, path, metadata={"format": "pt"})
    with torch.no_grad():
        expected = hf(TOKENS).logits
    for wrap_source in (tmp_path, hf):
        assert (our_logits(wrap_source) - expected).abs().max().item() <= 1e-5


def test_sliding_window_layer_types_are_refused_by_name(tmp_path):
    """Sliding-window layers are refused whether use_sliding_window says so or layer_types
    does (transformers masks the latter with config.sliding_window, or fails without one)."""
    hf = hf_qwen3(layer_types=["full_attention", "sliding_attention", "full_attention"])
    hf.config.sliding_window = 4  # the module masks layer 1 with a 4-token window
    match = r"unsupported settings: layer_types containing \['sliding_attention'\] at layers \["
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(hf)
    directory = edited_checkpoint(tmp_path, layer_types=["sliding_attention"] * 3)
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(directory)


def float64_logits_of_transformers(source):
    """``[batch, pos, d_vocab]`` float64 logits of transformers' Qwen3ForCausalLM of
    ``source`` (a directory; its float32 weights widened)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        module = Qwen3ForCausalLM.from_pretrained(source, dtype=torch.float64).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    with torch.no_grad():
        return module(TOKENS).logits, module.config.layer_types


@pytest.mark.parametrize(
    "changes",
    [
        # save_pretrained writes the derived layer_types (all full: 3 layers < 3)
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=3),
        # an older config.json without layer_types: transformers derives them
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=3, layer_types=None),
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=7, layer_types=None),
        # a null window: transformers slides no layer
        dict(use_sliding_window=True, max_window_layers=0, layer_types=None),
    ],
    ids=["layer_types", "max_window_layers=3", "max_window_layers=7", "null_window"],
)
def test_sliding_window_flag_without_a_sliding_layer_loads(tmp_path, changes):
    """transformers runs every layer of these configs with full attention; they were
    refused for use_sliding_window=True. Logits equal transformers' in float64 (to 1e-7:
    measured 4.2e-8, transformers' RMSNorm computes in float32 even in a float64 model)."""
    directory = edited_checkpoint(tmp_path, **changes)
    if "sliding_window" not in changes:
        config = json.loads((directory / "config.json").read_text())
        config["sliding_window"] = None
        (directory / "config.json").write_text(json.dumps(config))
    expected, layer_types = float64_logits_of_transformers(directory)
    assert layer_types == ["full_attention"] * 3
    model = HookedAttnRes.from_hf_qwen3(directory, wrap="none", dtype=torch.float64)
    with torch.no_grad():
        assert (model(TOKENS) - expected).abs().max().item() <= 1e-7
    for wrap in ("recency", "exact"):  # the AttnRes wraps load it too
        assert HookedAttnRes.from_hf_qwen3(directory, wrap=wrap).cfg.n_layers == 3
    # control: a window of 4 over these 12 tokens changes transformers' logits
    sliding = edited_checkpoint(
        tmp_path / "sliding",
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        layer_types=None,
    )
    assert (float64_logits_of_transformers(sliding)[0] - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "changes,match",
    [
        (
            dict(max_window_layers=1),
            r"sliding_window=4 and max_window_layers=1: transformers' Qwen3 gives layers \[1, 2\] "
            r"\(those >= max_window_layers\) sliding-window attention",
        ),
        (dict(max_window_layers=-2), r"gives layers \[0, 1, 2\] \(those >= max_window_layers\)"),
        (dict(max_window_layers=None), r"max_window_layers=None \(expected an integer\)"),
        (dict(max_window_layers=1.0), r"max_window_layers=1.0 \(expected an integer\)"),
    ],
    ids=["1", "negative", "null", "float"],
)
def test_a_sliding_layer_without_layer_types_is_refused_by_name(tmp_path, changes, match):
    directory = edited_checkpoint(
        tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=3, layer_types=None
    )
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(directory)


N_POS = TOKENS.shape[1]  # 12: n_ctx of the configs below, the longest sequence accepted


@pytest.mark.parametrize(
    "changes",
    [
        # a window of exactly n_ctx positions: transformers keeps kv_idx > q_idx - window,
        # i.e. the last `window` positions, the query's own included, so every position
        dict(use_sliding_window=True, sliding_window=N_POS, max_window_layers=1),
        dict(use_sliding_window=True, sliding_window=10 * N_POS, max_window_layers=0),
        # layer_types given: sliding layers masked with sliding_window (use_sliding_window
        # True, else transformers drops the window and fails)
        dict(
            use_sliding_window=True,
            sliding_window=N_POS,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ],
    ids=["window=n_ctx", "window>n_ctx", "layer_types"],
)
def test_a_window_covering_every_accepted_length_loads(tmp_path, changes):
    """A sliding window of at least max_position_embeddings (n_ctx, beyond which the
    loaded model refuses a sequence) masks nothing transformers' causal mask does not, so
    the checkpoint computes full attention at every accepted length; it was refused. Its
    float64 logits at length n_ctx equal transformers' (to 1e-7, as above)."""
    changes = dict(max_position_embeddings=N_POS, **changes)
    if "layer_types" not in changes:
        changes["layer_types"] = None  # derived by transformers from max_window_layers
    directory = edited_checkpoint(tmp_path, **changes)
    expected, layer_types = float64_logits_of_transformers(directory)
    assert "sliding_attention" in layer_types
    model = HookedAttnRes.from_hf_qwen3(directory, wrap="none", dtype=torch.float64)
    assert model.cfg.n_ctx == N_POS
    with torch.no_grad():
        assert (model(TOKENS) - expected).abs().max().item() <= 1e-7
    for wrap in ("recency", "exact"):
        assert HookedAttnRes.from_hf_qwen3(directory, wrap=wrap).cfg.n_layers == 3
    module = hf_module(directory)  # and the in-memory module of that config
    with torch.no_grad():
        assert (our_logits(module) - module(TOKENS).logits).abs().max().item() <= 1e-5


def test_a_window_one_short_of_n_ctx_is_refused(tmp_path):
    """A window of n_ctx - 1 positions differs from full attention at length n_ctx (the
    control: transformers' logits move), so it stays refused, saying which window loads."""
    full = edited_checkpoint(tmp_path / "full", max_position_embeddings=N_POS)
    expected = float64_logits_of_transformers(full)[0]
    directory = edited_checkpoint(
        tmp_path / "short",
        max_position_embeddings=N_POS,
        use_sliding_window=True,
        sliding_window=N_POS - 1,
        max_window_layers=2,
        layer_types=None,
    )
    logits, layer_types = float64_logits_of_transformers(directory)
    assert layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert (logits - expected).abs().max().item() > 1e-4
    match = (
        rf"layers \[2\].*sliding-window attention over the last {N_POS - 1} positions.*"
        rf"at least max_position_embeddings={N_POS}"
    )
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(directory)
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(hf_module(directory))


def test_a_module_built_with_a_shorter_window_than_its_config_says_is_refused(tmp_path):
    """transformers' attention modules keep the window of the config they were built from
    (flash attention uses it, the mask the config's): a config widened afterwards does not
    make such a module full attention."""
    module = hf_qwen3(
        max_position_embeddings=N_POS,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )
    module.config.sliding_window = N_POS
    match = r"sliding_window: .* modules .*layers\.1\.self_attn.* were built with \[4\]"
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(module)


@pytest.mark.parametrize(
    "field,found", [("head_dim", "uses 128, not 8"), ("num_key_value_heads", "uses 32, not 4")]
)
def test_a_missing_size_is_refused_where_transformers_reads_another(tmp_path, field, found):
    """transformers reads a missing head_dim as 128 and num_key_value_heads as 32 (its
    class defaults), not as hidden_size // num_attention_heads and num_attention_heads."""
    directory = edited_checkpoint(tmp_path, **{field: None})
    if field == "num_key_value_heads":  # a checkpoint whose weights fit the derived value
        hf_qwen3(num_key_value_heads=4).save_pretrained(directory)
        config = json.loads((directory / "config.json").read_text())
        del config[field]
        (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=rf"no {field} \(transformers' Qwen3Config then {found}"
    ):
        HookedAttnRes.from_hf_qwen3(directory)
    with pytest.raises(RuntimeError, match="mismatched|size mismatch|ignore_mismatched_sizes"):
        Qwen3ForCausalLM.from_pretrained(directory)


def _edit_eps(module):
    module.config.rms_norm_eps = 0.1


def _edit_rope_theta(module):
    module.config.rope_parameters = {"rope_type": "default", "rope_theta": 50.0}


@pytest.mark.parametrize(
    "built,edit,match",
    [
        (
            {},
            _edit_eps,
            r"rms_norm_eps: the config says 0\.1 but the RMSNorm modules .* use \[1e-06\]",
        ),
        (
            {},
            _edit_rope_theta,
            r"RoPE: .*rope_theta=50\.0.*model\.rotary_emb has other frequencies",
        ),
        (
            dict(hidden_act="gelu"),
            lambda module: setattr(module.config, "hidden_act", "silu"),
            r"hidden_act: the MLPs model\.layers\.0\.mlp, .* do not compute SiLU",
        ),
        (
            dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
            lambda module: setattr(
                module.config, "rope_parameters", {"rope_type": "default", "rope_theta": 1e4}
            ),
            r"RoPE: .* model\.rotary_emb has rope_type='linear'",
        ),
    ],
    ids=["rms_norm_eps", "rope_theta", "hidden_act", "rope_type"],
)
def test_a_module_whose_layers_differ_from_its_config_is_refused(built, edit, match):
    """transformers reads these settings when it builds the layers, so a config edited
    afterwards does not change what the module computes (it loaded from the edited config
    before: logits 0.375 away for rms_norm_eps, 0.112 for rope_theta, 2e-3 for the
    activation, 0.14 for a linear-RoPE module, on logits of size 0.39)."""
    module = hf_qwen3(**built)
    edit(module)
    with pytest.raises(CheckpointError, match=f"does not compute what its config says .*: {match}"):
        HookedAttnRes.from_hf_qwen3(module)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_converted_module_is_not_taken_for_an_edited_one(dtype):
    """``module.to(dtype)`` converts the rotary inv_freq buffer too; its rounding is not a
    different RoPE."""
    module = hf_qwen3().to(dtype)
    model = HookedAttnRes.from_hf_qwen3(module, wrap="none", dtype=dtype)
    with torch.no_grad():
        expected = module(TOKENS).logits.float()
        difference = (model(TOKENS).float() - expected).abs().max().item()
    assert difference <= (1e-6 if dtype == torch.float64 else 1e-2)


def test_swish_is_silu(tmp_path):
    """transformers' ACT2FN maps "swish" to torch.nn.SiLU."""
    module = hf_qwen3(hidden_act="swish")
    module.save_pretrained(tmp_path)
    expected = hf_logits(tmp_path)
    for source in (tmp_path, module):
        assert (our_logits(source) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "field",
    [
        "head_dim",
        "hidden_act",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
        "use_sliding_window",
    ],
)
def test_a_null_field_is_refused_as_transformers_refuses_it(tmp_path, field):
    """Null read as a default here (head_dim: hidden_size // heads, tie: False) or crashed
    (rms_norm_eps: TypeError); transformers refuses such a config.json."""
    directory = edited_checkpoint(tmp_path, **{field: 0})
    config = json.loads((directory / "config.json").read_text())
    config[field] = None
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"unsupported settings: .*null \['{field}'\]"):
        HookedAttnRes.from_hf_qwen3(directory)
    with pytest.raises(Exception, match=field):
        Qwen3ForCausalLM.from_pretrained(directory)


def test_a_missing_max_position_embeddings_means_transformers_default(tmp_path):
    """It meant 2048 here (to_tokens truncated to it, longer inputs were refused) and
    32768 to transformers."""
    directory = edited_checkpoint(tmp_path, max_position_embeddings=None)
    model = HookedAttnRes.from_hf_qwen3(directory)
    assert model.cfg.n_ctx == hf_module(directory).config.max_position_embeddings


@pytest.mark.parametrize(
    "fields",
    [
        dict(rms_norm_eps=0.1),
        dict(head_dim=16),  # != hidden_size // num_attention_heads
        dict(num_key_value_heads=1),
        dict(tie_word_embeddings=True),
        dict(attention_dropout=0.5),  # dropout only in training
        dict(bos_token_id=2, eos_token_id=[3, 4], pad_token_id=1),
        dict(dtype="bfloat16"),  # the stored dtype; loaded as dtype= asks
        # no layer slides: transformers drops sliding_window when use_sliding_window is False
        dict(use_sliding_window=False, sliding_window=4, max_window_layers=0),
        # Qwen3's default RoPE ignores partial_rotary_factor
        dict(
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 50.0,
                "partial_rotary_factor": 0.5,
            }
        ),
    ],
    ids=lambda fields: ",".join(fields),
)
def test_implemented_and_inert_fields_give_transformers_logits(tmp_path, fields):
    module = hf_qwen3(**fields)
    module.save_pretrained(tmp_path)
    expected = hf_logits(tmp_path)
    for source in (tmp_path, module):
        assert (our_logits(source) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(hidden_act="gelu"), r"hidden_act='gelu' \(expected one of \['silu', 'swish'\]\)"),
        (dict(attention_bias=True), r"attention_bias=True \(expected False\)"),
        (
            dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
            r"layer_types containing \['sliding_attention'\] at layers \[1, 2\]",
        ),
    ]
    + [
        (
            dict(rope_parameters={"rope_type": kind, "rope_theta": 1e4, **extra}),
            rf"rope type '{kind}' .* default RoPE only",
        )
        for kind, extra in (
            ("yarn", dict(factor=4.0, original_max_position_embeddings=16)),
            ("linear", dict(factor=2.0)),
            ("dynamic", dict(factor=2.0)),
            (
                "llama3",
                dict(
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                ),
            ),
        )
    ],
    ids=["gelu", "attention_bias", "sliding_window", "yarn", "linear", "dynamic", "llama3"],
)
def test_unimplemented_fields_are_refused_by_every_loader(tmp_path, fields, match):
    module = hf_qwen3(**fields)
    module.save_pretrained(tmp_path / "hf")
    attnres = tmp_path / "attnres"
    module.save_pretrained(attnres)
    config = json.loads((attnres / "config.json").read_text())
    config.update(model_type="qwen3_attnres", attnres_num_blocks=1)
    (attnres / "config.json").write_text(json.dumps(config))
    for wrap in ("none", "recency", "exact"):
        for source in (tmp_path / "hf", module):
            with pytest.raises(CheckpointError, match=match):
                HookedAttnRes.from_hf_qwen3(source, wrap=wrap)
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_pretrained(attnres)


@pytest.mark.parametrize(
    "layer_types", [["full_attention"] * 2, ["full_attention"] * 3 + ["sliding_attention"]]
)
def test_layer_types_of_another_length_than_the_layers_are_refused(tmp_path, layer_types):
    """transformers refuses layer_types with another number of entries than layers (the
    3-layer checkpoint here); a short all-full list used to load, a long one was refused
    for a sliding layer 3 the model does not have."""
    directory = edited_checkpoint(tmp_path, layer_types=layer_types)
    with pytest.raises(Exception, match=r"`num_hidden_layers` \(3\) must be equal"):
        hf_module(directory)  # huggingface_hub's StrictDataclassClassValidationError
    match = r"layer_types=\[.*\] \(expected a list of num_hidden_layers=3 entries"
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(directory)
