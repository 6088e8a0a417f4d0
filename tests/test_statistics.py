"""The statistics of the analysis package against independent NumPy computations: the
percentile bootstrap (resamples, level, paired rows, tiny n), the effects' paired
intervals, the routing mass's positions and the analytic recency schedule's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import randomize_routing, tiny_model

from hooked_attnres.analysis import routing_mass
from hooked_attnres.model.depth import FAMILIES
from hooked_attnres.tasks.base import TaskBatch


def _padded_batch(d_vocab: int) -> TaskBatch:
    """Four right-padded prompts of lengths 8, 5, 3, 8 (token 1 pads)."""
    tokens = torch.randint(3, d_vocab, (4, 8), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([8, 5, 3, 8])
    tokens[torch.arange(8) >= lengths[:, None]] = 1
    zeros = torch.zeros(4, dtype=torch.long)
    return TaskBatch(
        tokens=tokens,
        answer_pos=lengths - 1,
        answer=zeros,
        contrast=zeros,
        corrupted_tokens=tokens.clone(),
        targets=torch.full_like(tokens, -100),
    )


def test_routing_mass_refuses_an_answer_pos_in_the_padding_or_one_it_would_ignore():
    """Audit finding: with a TaskBatch, a position list past a prompt's answer_pos (its
    last real position) was refused, but the same position given as ``answer_pos=`` was
    read: routing weights of right-padding tokens, reported as the prompt's mass. And
    ``answer_pos=`` with ``positions="all"`` or a list was silently ignored."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"), seed=1).eval()
    batch = _padded_batch(model.cfg.d_vocab)
    one_past = torch.clamp(batch.answer_pos + 1, max=7)  # padding for prompts 1 and 2
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1, 2\], into their right padding"):
        routing_mass(model, batch, answer_pos=one_past)
    for positions in ("all", [0, 1]):
        with pytest.raises(ValueError, match="answer_pos applies to positions='answer' only"):
            routing_mass(model, batch, positions=positions, answer_pos=batch.answer_pos)
    # an answer_pos inside every prompt is read: the cache at those positions (independent)
    earlier = batch.answer_pos - 1
    mass = routing_mass(model, batch, answer_pos=earlier)
    _, cache = model.run_with_cache(batch.tokens)
    rows = torch.arange(len(batch))
    for site in model.sites():
        weights = cache[site.hook("weights")][rows, earlier].double()  # [batch, n_sources]
        for family, indices in model.routing_layout.families(site).items():
            expected = weights[:, indices].sum(-1).numpy() if indices else np.zeros(len(batch))
            got = mass[
                (mass.router == site.kind)
                & (mass.layer == site.table_layer)
                & (mass.family == family)
            ].sort_values("prompt")
            np.testing.assert_allclose(got.mass.to_numpy(), expected, atol=1e-5)  # float32
    assert set(mass.family) == set(FAMILIES)
