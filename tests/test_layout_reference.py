"""Each AttnRes layout against the independent reference in ``reference_attnres.py``."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from helpers import SMALL_QWEN3, hf_qwen3, randomize_routing, rms_norm_in_float64
from reference_attnres import Edit, model_router_params, reference_forward, reference_route
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from hooked_attnres import HookedAttnRes
from hooked_attnres.analysis import routing_lens

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
LAYOUT_NONE = ("none", "block", 3, 1, None)  # vanilla Qwen3: the reference's one stream


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


class _States(Edit):
    """Records the depth state entering every sublayer (the reference's `state`)."""

    def __init__(self):
        self.seen: dict[int, list[torch.Tensor]] = {}

    def state(self, sublayer, sources):
        self.seen[sublayer] = list(sources)
        return sources


@pytest.mark.parametrize("layout,mode,n_layers,num_blocks,bias", CASES + [LAYOUT_NONE])
def test_routing_lens_is_the_reference_readout_of_each_state(
    layout, mode, n_layers, num_blocks, bias
):
    """docs/analysis.md, the routing lens: each entry is the model's readout of the depth
    state entering that sublayer (the final router's softmax of its query against the
    RMS-normalised sources, where the layout has one; else the current stream), then
    ``ln_final`` and ``W_U``; the last entry is the model's logits. Checked in float64
    against the reference pass's states read out by hand (Hugging Face's norm and head),
    with left padding (real positions; the last entry everywhere) and a position
    selection; audit 171 found it exact (4e-16 at most)."""
    hf = hf_qwen3(
        num_hidden_layers=n_layers, tie_word_embeddings=(n_layers % 2 == 0), **SMALL_QWEN3
    ).double()
    wrap = {"cumulative": "recency", "kimi": "exact", "full": "exact", "none": "none"}[layout]
    kwargs = {} if layout == "none" else {"num_blocks": num_blocks}
    model = HookedAttnRes.from_hf_qwen3(hf, wrap=wrap, dtype=torch.float64, **kwargs)
    if layout != "none":
        cfg = model.cfg.replace(attnres_layout=layout, attnres_mode=mode, attnres_recency_bias=bias)
        rebuilt = HookedAttnRes(cfg)
        own = {k: v for k, v in model.state_dict().items() if "_res." not in k}
        rebuilt.load_state_dict(own, strict=False)
        model = randomize_routing(rebuilt, seed=n_layers, scale=2.0)
    tokens = torch.randint(0, 17, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    mask[2, :5] = 0
    states = _States()
    with torch.no_grad(), patch.object(Qwen3RMSNorm, "forward", rms_norm_in_float64):
        reference_forward(
            hf,
            layout,
            num_blocks,
            model_router_params(model),
            tokens,
            mode,
            attention_mask=mask,
            edit=states,
        )
        final = model.routing_layout.has_final_router
        final_params = model_router_params(model)("final_res") if final else None
        eps = hf.config.rms_norm_eps
        expected = []
        for point in range(2 * n_layers):
            sources = states.seen[point]
            stream = reference_route(sources, final_params, eps)[0] if final else sources[-1]
            expected.append(hf.lm_head(hf.model.norm(stream)))
        lens = routing_lens(model, tokens, incl_mid=True, attention_mask=mask)
        logits = model(tokens, attention_mask=mask)
    real = mask.bool()
    assert lens.labels[-1] == "final_post" and len(lens.labels) == 2 * n_layers + 1
    for point, want in enumerate(expected):
        assert (lens.logits[point][real] - want[real]).abs().max().item() <= 1e-12, point
    assert (lens.logits[-1] - logits).abs().max().item() <= 1e-12  # every position
    last = routing_lens(model, tokens, attention_mask=mask, positions=[-1, -3])
    pre = torch.stack(expected[::2])[:, :, [-1, -3]]
    rows = real[:, [-1, -3]]
    assert (last.logits[:-1][:, rows] - pre[:, rows]).abs().max().item() <= 1e-12
