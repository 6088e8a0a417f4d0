"""Layout "none" is Qwen3: parity with Hugging Face ``Qwen3ForCausalLM`` on the same weights."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_qwen3

from hooked_attnres import HookedAttnRes

SHAPES = [
    # (layers, heads, kv heads, head_dim, hidden, tied)
    (3, 4, 4, 8, 32, False),  # multi-head attention
    (3, 4, 2, 8, 32, False),  # grouped-query attention
    (2, 4, 1, 8, 32, True),  # multi-query attention, tied embeddings
    (2, 2, 1, 24, 32, True),  # n_heads * d_head != d_model (allowed in Qwen3)
    (4, 8, 2, 16, 64, False),
]


@pytest.mark.parametrize("n_layers,n_heads,n_kv,d_head,d_model,tied", SHAPES)
def test_layout_none_matches_hf_qwen3(n_layers, n_heads, n_kv, d_head, d_model, tied):
    hf = hf_qwen3(
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=d_head,
        hidden_size=d_model,
        tie_word_embeddings=tied,
    )
    model = HookedAttnRes.from_hf_qwen3(hf, wrap="none")
    tokens = torch.randint(0, 61, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    assert got.shape == expected.shape == (3, 13, 61)
    assert (got - expected).abs().max().item() <= 1e-4
    # the explicit attention path (taken while a pattern hook is attached) agrees too
    logits, cache = model.run_with_cache(tokens)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert cache["pattern", 0].shape == (3, n_heads, 13, 13)


def test_loss_matches_hf_qwen3():
    hf = hf_qwen3()
    model = HookedAttnRes.from_hf_qwen3(hf, wrap="none")
    tokens = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(tokens, labels=tokens).loss
        got = model(tokens, return_type="loss")
    assert abs(got.item() - expected.item()) <= 1e-5


def test_attention_pattern_matches_hf_eager_attention():
    """``hook_pattern`` is the softmax HF computes (eager attention, which returns it)."""
    hf = hf_qwen3(attn_implementation="eager")
    model = HookedAttnRes.from_hf_qwen3(hf, wrap="none")
    tokens = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(tokens, output_attentions=True).attentions
        _, cache = model.run_with_cache(tokens)
    for layer, hf_pattern in enumerate(expected):
        assert torch.allclose(cache["pattern", layer], hf_pattern, atol=1e-6)


def test_residual_stream_matches_hf_hidden_states():
    hf = hf_qwen3()
    model = HookedAttnRes.from_hf_qwen3(hf, wrap="none")
    tokens = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(tokens)
    # hidden_states[l] is the input of layer l (the last one is after the final norm)
    for layer in range(model.cfg.n_layers):
        assert torch.allclose(cache["resid_pre", layer], hidden[layer], atol=1e-5)


def test_bfloat16_forward_is_close_to_float32():
    hf = hf_qwen3()
    model32 = HookedAttnRes.from_hf_qwen3(hf, wrap="recency", num_blocks=2)
    model16 = HookedAttnRes.from_hf_qwen3(hf, wrap="recency", num_blocks=2, dtype="bfloat16")
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(6))
    _, cache = model16.run_with_cache(tokens)
    # routing math stays in float32 in a bf16 model
    assert cache["weights", 1, "attn_res"].dtype == torch.float32
    assert cache["logits", 1, "attn_res"].dtype == torch.float32
    assert cache["resid_pre", 1].dtype == torch.bfloat16
    diff = (model16(tokens).float() - model32(tokens)).abs().max().item()
    assert diff < 0.05
