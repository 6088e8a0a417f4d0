"""`DepthRouter`: one Block AttnRes router (a softmax over depth sources).

For stacked sources ``V = [s_0, ..., s_k]`` (each ``[batch, pos, d_model]``)::

    K      = RMSNorm(V) * key_norm.w           # float32, per source
    logit  = K . query  (+ recency_bias on s_k)
    weight = softmax(logit) over the source axis   # float32
    out    = sum_i weight_i * V_i              # the routed sublayer input

Computed as ``logit_i = (V_i . (key_norm.w * query)) / rms(V_i)``, which is the same
number without materialising the keys (a third fewer passes over the sources).

(``../shared/design/attnres.md`` section 1). No temperature, no value projection; the
keys see normalised sources, the values are the raw sources.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attnres.model.norms import KeyNorm, make_hook


class DepthRouter(nn.Module):
    """A Block AttnRes router.

    Parameters:
        query: ``[d_model]`` pseudo-query ``w_r``.
        key_norm.w: ``[d_model]`` gain of the key RMSNorm (a `KeyNorm`).
        recency_bias: ``[]`` learnable bias on the current (last) source's logit, or
            ``None`` when the model has no bias.

    Hooks (``n_sources`` depends on the layer, layout and router; see
    ``HookedAttnRes.source_labels``):
        hook_sources: ``[batch, pos, n_sources, d_model]``, the stacked sources read
            (editing it changes what this router mixes, not the stored sources).
        key_norm.hook_scale: ``[batch, pos, n_sources, 1]``, each source's RMS.
        hook_logits: ``[batch, pos, n_sources]``, after the recency bias.
        hook_weights: ``[batch, pos, n_sources]``, softmax of the logits.

    The scale, logits and weights are float32 whatever the model dtype (float64 in a
    float64 model).
        hook_out: ``[batch, pos, d_model]``, the weighted sum fed to the sublayer norm.
    """

    def __init__(self, d_model: int, eps: float, recency_bias: Optional[float]):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(d_model))
        self.key_norm = KeyNorm(d_model, eps)
        if recency_bias is None:
            self.register_parameter("recency_bias", None)
        else:
            self.recency_bias = nn.Parameter(torch.tensor(float(recency_bias)))
        self.hook_sources = make_hook(-3)
        self.hook_logits = make_hook(-2)
        self.hook_weights = make_hook(-2)
        self.hook_out = make_hook(-2)

    def forward(
        self, sources: list[Float[Tensor, "batch pos d_model"]]
    ) -> Float[Tensor, "batch pos d_model"]:
        values = self.hook_sources(torch.stack(sources, dim=-2))
        scale = self.key_norm(values)  # float32 (float64 in a float64 model)
        values_hp = values.to(scale.dtype)  # no copy unless the model runs in bf16 / fp16
        effective_query = self.key_norm.w.to(scale.dtype) * self.query.to(scale.dtype)
        logits = (values_hp @ effective_query) / scale.squeeze(-1)
        if self.recency_bias is not None:
            n_sources = logits.shape[-1]
            bias = self.recency_bias.to(logits.dtype).reshape(1)
            logits = logits + F.pad(bias, (n_sources - 1, 0))
        logits = self.hook_logits(logits)
        weights = self.hook_weights(logits.softmax(dim=-1))
        routed = (weights.unsqueeze(-2) @ values_hp).squeeze(-2)
        return self.hook_out(routed.to(values.dtype))
