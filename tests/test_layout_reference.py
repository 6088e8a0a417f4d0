"""Each AttnRes layout against the independent reference in ``reference_attnres.py``."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_qwen3, randomize_routing
from reference_attnres import model_router_params, reference_forward

from hooked_attnres import HookedAttnRes

CASES = [
    # layout, mode, n_layers, num_blocks, bias
    ("cumulative", "block", 4, 2, 3.0),
    ("cumulative", "block", 5, 2, 0.5),  # ragged: blocks of 3 and 2 layers
    ("cumulative", "block", 6, 6, None),
    ("cumulative", "full", 3, 3, 1.0),
    ("kimi", "block", 4, 2, None),
    ("kimi", "block", 7, 3, 0.7),  # ragged, with a bias
    ("kimi", "block", 3, 1, None),  # one block: the final router reads [emb, partial]
    ("full", "block", 3, 3, None),
]


@pytest.mark.parametrize("layout,mode,n_layers,num_blocks,bias", CASES)
def test_layout_matches_reference(layout, mode, n_layers, num_blocks, bias):
    hf = hf_qwen3(num_hidden_layers=n_layers, tie_word_embeddings=(n_layers % 2 == 0))
    wrap = {"cumulative": "recency", "kimi": "exact", "full": "exact"}[layout]
    model = HookedAttnRes.from_hf_qwen3(hf, wrap=wrap, num_blocks=num_blocks)
    cfg = model.cfg.replace(attnres_layout=layout, attnres_mode=mode, attnres_recency_bias=bias)
    rebuilt = HookedAttnRes(cfg)
    own = {k: v for k, v in model.state_dict().items() if "_res." not in k}
    missing, unexpected = rebuilt.load_state_dict(own, strict=False)
    assert not unexpected and all("_res." in k for k in missing)
    randomize_routing(rebuilt, seed=n_layers, scale=2.0)

    tokens = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits, expected_weights = reference_forward(
            hf, layout, num_blocks, model_router_params(rebuilt), tokens, mode
        )
        logits, cache = rebuilt.run_with_cache(tokens)
        plain = rebuilt(tokens)
    assert (logits - expected_logits).abs().max().item() <= 1e-4
    assert (plain - expected_logits).abs().max().item() <= 1e-4
    assert set(expected_weights) == {
        name.removesuffix(".hook_weights") for name in cache if name.endswith("hook_weights")
    }
    for prefix, ref in expected_weights.items():
        got = cache[f"{prefix}.hook_weights"]  # [batch, pos, n_sources]
        assert got.shape == ref.permute(1, 2, 0).shape
        # float32 rounding in both implementations, amplified by sharp routing (scale 2.0)
        # over up to 7 layers, reaches ~1.3e-5 (kimi, 7 layers); a wrong source, order or
        # schedule moves weights by 1e-2 or more
        assert (got - ref.permute(1, 2, 0)).abs().max().item() <= 5e-5, prefix
