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
    match = r"unsupported settings: layer_types containing \['sliding_attention'\]"
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(hf)
    directory = edited_checkpoint(tmp_path, layer_types=["sliding_attention"] * 3)
    with pytest.raises(CheckpointError, match=match):
        HookedAttnRes.from_hf_qwen3(directory)


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
