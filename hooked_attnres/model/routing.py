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

from hooked_attnres.model.norms import KeyNorm, is_observed, make_hook, rms_scale, stat_dtype


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

    def _observed(self) -> bool:
        return any(is_observed(hook) for hook in (self.hook_sources, self.key_norm.hook_scale,
                                                  self.hook_logits, self.hook_weights, self.hook_out))

    def forward(
        self, sources: list[Float[Tensor, "batch pos d_model"]]
    ) -> Float[Tensor, "batch pos d_model"]:
        if sources[0].dtype == stat_dtype(sources[0].dtype) and not self._observed():
            # nothing watches the intermediate tensors: one fused forward and backward
            effective_query = self.key_norm.w * self.query
            return _FusedRouting.apply(torch.stack(sources, dim=-2), effective_query,
                                       self.recency_bias, self.key_norm.eps)
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
        # a broadcast multiply-and-sum: batched [1 x n] @ [n x d] matmuls have a slow backward
        routed = (weights.unsqueeze(-1) * values_hp).sum(dim=-2)
        return self.hook_out(routed.to(values.dtype))


class _FusedRouting(torch.autograd.Function):
    """The router of an unobserved float32/float64 `DepthRouter` with a hand-written
    backward: the same numbers as the hooked path (up to rounding), a fraction of the
    autograd graph (training runs about twice as fast through the routers).

    Forward, with ``r = 1 / sqrt(mean(V**2) + eps)`` per source::

        logits = (V . q) * r  (+ bias on the last source);  w = softmax(logits)
        out    = sum_i w_i V_i
    """

    @staticmethod
    def forward(ctx, values: Tensor, query: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:
        # the same operations as the hooked path, so that the two agree bit for bit
        scale = rms_scale(values, eps).squeeze(-1)  # [batch, pos, n_sources]
        dots = values @ query
        logits = dots / scale
        if bias is not None:
            logits = logits + F.pad(bias.reshape(1), (logits.shape[-1] - 1, 0))
        weights = logits.softmax(dim=-1)
        out = (weights.unsqueeze(-1) * values).sum(dim=-2)
        ctx.save_for_backward(values, query, scale, dots, weights)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, query, scale, dots, weights = ctx.saved_tensors
        d_model = values.shape[-1]
        inv_rms = scale.reciprocal()
        grad_weights = (values * grad_out.unsqueeze(-2)).sum(dim=-1)  # [batch, pos, n_sources]
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True))
        grad_dots = grad_logits * inv_rms
        # d inv_rms / d V = -inv_rms**3 * V / d_model
        coef = -grad_logits * dots * inv_rms.pow(3) / d_model
        grad_values = values * coef.unsqueeze(-1)
        grad_values.addcmul_(weights.unsqueeze(-1), grad_out.unsqueeze(-2))
        grad_values.addcmul_(grad_dots.unsqueeze(-1), query)
        # not a [1, N] @ [N, d] matmul: BLAS splits that reduction differently from run to run
        grad_query = (grad_dots.unsqueeze(-1) * values).flatten(0, -2).sum(0)
        grad_bias = grad_logits[..., -1].sum() if ctx.has_bias else None
        return grad_values, grad_query.reshape(-1), grad_bias, None
