"""`DepthRouter`: one Block AttnRes router (a softmax over depth sources).

For stacked sources ``V = [s_0, ..., s_k]`` (each ``[batch, pos, d_model]``)::

    K      = RMSNorm(V) * key_norm.w           # float32, per source
    logit  = K . query  (+ recency_bias on s_k)
    weight = softmax(logit) over the source axis   # float32
    out    = sum_i weight_i * V_i              # the routed sublayer input

Computed as ``logit_i = (V_i . (key_norm.w * query)) / rms(V_i)``, which is the same
number without materialising the keys, and source by source: the unobserved path never
stacks the sources (``hook_sources`` is a stacked copy, made only while it is watched).
Every path runs the same per-source operations, so their outputs agree bit for bit.

*Content-free routing*: when ``key_norm.w * query`` is exactly zero (every router of the
``recency`` and ``exact`` wraps of a vanilla Qwen3, an untrained model), the key norm's
eps is positive and nothing watches the router or needs a gradient, every
``V_i . query`` is zero, so the logits are the recency bias alone: no source's RMS or
dot product is computed, and in bf16 / fp16 each source is converted to float32 into one
reused buffer just before the weighted sum reads it (`routing_stream`). The same bits as
the general path, including its ``nan`` at a position where a source is not finite
(``inf * 0``; only a nan's sign may differ): a finite weighted sum proves every source
finite, so the per-position test runs only when the sum is not (`_nan_checked_sum`).
With eps 0 a zero source's logit is ``0 / 0``, nan, so such a router takes the general
path. The zero test reads the query, so it runs on CPU tensors only (on an accelerator it
would synchronise the device once per router). The weights then depend only on the
number of sources and the bias, so in a pass with no hook anywhere in the model the
routers of a block share the weighted sum of their committed sources, the zero test
is made for all the model's routers at once (`SharedSums`), and without a gradient the
current source's finiteness test reads the RMS of the norm that normalises the sum
(`SharedSums.route_normalized`).

(``../shared/design/attnres.md`` section 1). No temperature, no value projection; the
keys see normalised sources, the values are the raw sources.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from hooked_attnres._precision import stat_dtype
from hooked_attnres.model.norms import (
    Eps,
    KeyNorm,
    RMSNorm,
    differentiable_backward,
    has_module_hooks,
    is_observed,
    make_hook,
    modules_if_unhooked,
    padding_eps,
    squared_norms,
    zero_row_eps,
)
from hooked_attnres.model.passes import padding_of


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
        hook_out: ``[batch, pos, d_model]``, the weighted sum fed to the sublayer norm.

    The scale, logits, weights and weighted sum are computed in float32 whatever the model
    dtype (float64 in a float64 model); ``hook_out`` is in the model dtype. Unless its
    sources are watched, a bfloat16 router converts each source once (`routing_parts`;
    a content-free router, see the module docstring, into one reused buffer,
    `routing_stream`) and never makes a stacked copy.
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
        return self._stack_observed() or any(
            is_observed(hook) for hook in (self.hook_logits, self.hook_weights, self.hook_out)
        )

    def _stack_observed(self) -> bool:
        """Whether a hook on a stacked tensor (sources or their scale) is attached: also a
        PyTorch hook on the `KeyNorm` module itself (its input is the stacked sources, its
        output their scale), which only the stacked path calls."""
        return (
            is_observed(self.hook_sources)
            or is_observed(self.key_norm.hook_scale)
            or has_module_hooks(self.key_norm)
        )

    def forward(
        self,
        sources: list[Float[Tensor, "batch pos d_model"]],
        shared_sums: Optional[SharedSums] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The routed input of the sublayer (``hook_out``); ``shared_sums``: the pass's
        `SharedSums`, if any (used by content-free routers in a pass without hooks)."""
        if shared_sums is not None and shared_sums.enabled:
            # no hook anywhere in the model (tested once per pass): nothing watches it
            return shared_sums.route(self, sources)
        if not self._observed():
            return self._route_unobserved(sources)
        if not self._stack_observed():
            # only the logits, weights or output are watched: the same per-source math in
            # plain autograd, still without a stacked copy of the sources
            parts = routing_parts(sources)
            scale = source_scales(parts, self.key_norm.eps)
            return self._hooked_tail(parts, scale, sources[0].dtype)
        values = self.hook_sources(torch.stack(sources, dim=-2))
        stacked = values.to(stat_dtype(values.dtype))  # one float32 copy in bf16 / fp16
        scale = self.key_norm(stacked)  # [batch, pos, n_sources, 1]
        return self._hooked_tail(
            stacked.unbind(dim=-2), scale.squeeze(-1).movedim(-1, 0), values.dtype
        )

    def _needs_grad(self, sources: Sequence[Tensor]) -> bool:
        """Whether the routing of ``sources`` needs a gradient (grad mode is on and a
        parameter of the router or a source requires one)."""
        if not torch.is_grad_enabled():
            return False
        bias = self.recency_bias
        return (
            self.query.requires_grad
            or self.key_norm.w.requires_grad
            or (bias is not None and bias.requires_grad)
            or any(source.requires_grad for source in sources)
        )

    def _route_unobserved(
        self, sources: list[Float[Tensor, "batch pos d_model"]], shortcut_ruled_out: bool = False
    ) -> Float[Tensor, "batch pos d_model"]:
        """`forward` while none of the router's hook points is watched, without using a
        pass's `SharedSums` (also `SharedSums.route`'s path when the shortcut does not
        apply: ``shortcut_ruled_out``, then the content-free test is not made again)."""
        dtype = sources[0].dtype
        bias = self.recency_bias
        needs_grad = self._needs_grad(sources)
        effective_query = self._effective_query(dtype)
        if not (shortcut_ruled_out or needs_grad) and self._content_free(effective_query):
            # content-free: skip what is known and stream bf16 conversions
            return _route_content_free(sources, bias)
        if dtype != stat_dtype(dtype):
            # bf16 / fp16: per source, the float32 math of the hooked path, plain autograd
            return self._mix(sources, effective_query)[0]
        if needs_grad:
            # float32 / float64 and nothing watches the intermediate tensors: the fused path
            return _FusedRouting.apply(effective_query, bias, self.key_norm.eps, *sources)
        return _route(sources, effective_query, bias, self.key_norm.eps)[0]

    def _content_free(self, effective_query: Float[Tensor, " d_model"]) -> bool:
        """Whether the router is content-free (`_content_free_given`) with this
        ``effective_query``. The zero test reads the query, so CPU only: on an accelerator
        it would synchronise the device once per router."""
        return effective_query.is_cpu and self._content_free_given(not effective_query.any())

    def _content_free_given(self, query_is_zero: bool) -> bool:
        """The content-free rule: the effective query is exactly zero and the key norm's
        eps positive (with eps 0 a zero source's logit is 0 / 0, nan: the general path's)."""
        return query_is_zero and self.key_norm.eps > 0

    @torch.no_grad()
    def mix(
        self,
        sources: Sequence[Float[Tensor, "batch pos d_model"]],
        attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos n_sources"]]:
        """``(out, weights)`` of this router on any list of sources, without firing its
        hooks (the routing lens applies the final router to the sources of earlier
        depth states with it). The same operations as every path of `forward`.

        ``attention_mask``: for sources made in another pass (a cache's), that pass's
        ``[batch, pos]`` mask at their positions (``cache.real_rows()``: the cache's
        ``attention_mask`` at the positions it holds, ``[pos]`` for sources without a
        batch axis; 1 / True at real tokens). With ``eps = 0`` a source that is all zero
        at a padding row (a padding query's attention output) then takes eps 1 there, as
        in the pass (`norms.padding_eps`): without it its logit is ``0 / 0`` and the
        row's weights and output nan. Real rows are the same bits either way."""
        out, weights = self._mix(sources, real=padding_of(attention_mask))
        return out, weights.movedim(0, -1)

    def _mix(
        self,
        sources: Sequence[Float[Tensor, "batch pos d_model"]],
        effective_query: Optional[Float[Tensor, " d_model"]] = None,
        real: Optional[Bool[Tensor, "batch pos"]] = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "n_sources batch pos"]]:
        """The unhooked routing of any dtype: ``(out in the sources' dtype, weights)``
        (``effective_query``: `_effective_query` of the sources' dtype, if already made;
        ``real``: the padding of the pass that made the sources, `padding_eps`)."""
        if effective_query is None:
            effective_query = self._effective_query(sources[0].dtype)
        eps = (
            self.key_norm.eps if real is None else padding_eps(self.key_norm.eps, sources[0], real)
        )
        out, _, _, weights = _route(routing_parts(sources), effective_query, self.recency_bias, eps)
        return out.to(sources[0].dtype), weights

    def _effective_query(self, dtype: torch.dtype) -> Float[Tensor, " d_model"]:
        """``key_norm.w * query`` in the routing dtype (`stat_dtype` of the sources')."""
        routing_dtype = stat_dtype(dtype)
        return self.key_norm.w.to(routing_dtype) * self.query.to(routing_dtype)

    def _hooked_tail(
        self,
        parts: Sequence[Float[Tensor, "batch pos d_model"]],
        scale: Float[Tensor, "n_sources batch pos"],
        dtype: torch.dtype,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Logits, weights and output with ``hook_logits``, ``hook_weights`` and
        ``hook_out`` (``parts``: the sources in the routing dtype; ``dtype``: the model's,
        that of ``hook_out``)."""
        dots = source_dots(parts, self._effective_query(dtype))
        logits = source_logits(dots, scale, self.recency_bias)
        logits = self.hook_logits(logits.movedim(0, -1)).movedim(-1, 0)
        weights = self.hook_weights(logits.softmax(dim=0).movedim(0, -1)).movedim(-1, 0)
        return self.hook_out(weighted_sum(parts, weights).to(dtype))


# The routing math, shared by the hooked and the fused path so that both give the same
# bits. Per-source quantities are laid out source-major, ``[n_sources, batch, pos]``:
# a softmax over a short leading axis is several times faster than over a short last one.


def routing_parts(
    sources: Sequence[Float[Tensor, "batch pos d_model"]],
) -> list[Float[Tensor, "batch pos d_model"]]:
    """The sources in the routing dtype (`stat_dtype`): the same tensors in float32 /
    float64, one float32 copy each in bf16 / fp16 (made once, read by the scale, the dot
    and the weighted sum; a norm with ``dtype=float32`` would convert its input again)."""
    dtype = stat_dtype(sources[0].dtype)
    return [source.to(dtype) for source in sources]


def routing_stream(
    sources: Sequence[Float[Tensor, "batch pos d_model"]],
) -> Iterator[Float[Tensor, "batch pos d_model"]]:
    """The sources in the routing dtype one at a time, for a no-grad pass that reads each
    once: the same tensors in float32 / float64; in bf16 / fp16 each is converted into one
    reused float32 buffer (valid until the next one is yielded). The same numbers as
    `routing_parts` (the conversion is exact) without a float32 copy of every source."""
    dtype = stat_dtype(sources[0].dtype)
    if sources[0].dtype == dtype:
        yield from sources
        return
    buffer = torch.empty(sources[0].shape, dtype=dtype, device=sources[0].device)
    for source in sources:
        yield buffer.copy_(source)


def source_scales(
    sources: Sequence[Float[Tensor, "batch pos d_model"]], eps: Eps
) -> Float[Tensor, "n_sources batch pos"]:
    """``rms_scale`` of every source (the same bits: one norm per source, then the
    elementwise ``sqrt(norm**2 / d_model + eps)`` on all of them at once; `padding_eps`
    of a source ``[batch, pos, 1]`` is ``[batch, pos]`` here)."""
    mean_squares = squared_norms(sources) / sources[0].shape[-1]
    row_eps = padding_eps(eps, sources[0])
    if isinstance(row_eps, Tensor):
        row_eps = row_eps.squeeze(-1)
    return (mean_squares + zero_row_eps(row_eps, mean_squares)).sqrt()


def source_dots(
    sources: Sequence[Float[Tensor, "batch pos d_model"]], query: Float[Tensor, " d_model"]
) -> Float[Tensor, "n_sources batch pos"]:
    """``V_i . query`` for every source (one matrix-vector product per source)."""
    return torch.stack([source @ query for source in sources])


def add_recency_bias(
    logits: Float[Tensor, "n_sources batch pos"], bias: Optional[Float[Tensor, ""]]
) -> Float[Tensor, "n_sources batch pos"]:
    """``logits`` plus ``bias`` on the last source (``logits`` itself without a bias).
    ``logits`` is ``[n_sources, *rest]`` for any ``rest`` (``[pos]`` for the sources of a
    cache without a batch axis, as `DepthRouter.mix` may be given)."""
    if bias is None:
        return logits
    pad = F.pad(bias.to(logits.dtype).reshape(1), (logits.shape[0] - 1, 0))
    return logits + pad.reshape(-1, *([1] * (logits.ndim - 1)))


def source_logits(
    dots: Float[Tensor, "n_sources batch pos"],
    scale: Float[Tensor, "n_sources batch pos"],
    bias: Optional[Float[Tensor, ""]],
) -> Float[Tensor, "n_sources batch pos"]:
    """``dots_i / scale_i``, plus ``bias`` on the last source."""
    return add_recency_bias(dots / scale, bias)


def weighted_sum(
    sources: Iterable[Float[Tensor, "batch pos d_model"]],
    weights: Float[Tensor, "n_sources batch pos"],
) -> Float[Tensor, "batch pos d_model"]:
    """``sum_i weights_i * V_i``, accumulated in source order (one pass per source;
    ``sources`` may be a `routing_stream`)."""
    out: Optional[Tensor] = None
    for index, source in enumerate(sources):
        if out is None:
            out = source * weights[index].unsqueeze(-1)
        else:
            out.addcmul_(source, weights[index].unsqueeze(-1))
    assert out is not None, "a router reads at least one source"
    return out


def _route(
    sources: Sequence[Float[Tensor, "batch pos d_model"]],
    query: Float[Tensor, " d_model"],
    bias: Optional[Float[Tensor, ""]],
    eps: Eps,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, scale, dots, weights)`` of an unobserved router (the last three
    ``[n_sources, batch, pos]``)."""
    scale = source_scales(sources, eps)
    dots = source_dots(sources, query)
    weights = source_logits(dots, scale, bias).softmax(dim=0)
    return weighted_sum(sources, weights), scale, dots, weights


class SharedSums:
    """One forward pass's memo for its content-free routers (module docstring).

    Such a router's weights depend only on its number of sources and its recency bias,
    so every router of a block that reads the same committed sources with the same bias
    (all routers of a block in the ``recency`` and ``exact`` wraps) would recompute the
    same weighted sum of the committed sources before adding the current one, the last in
    source order. The memo keeps the latest such sum with the committed sources it was
    made from, matched by identity (it holds them, so no other tensor can take their
    place). The sum is the first ``n - 1`` steps of `weighted_sum`, so a router that reuses
    it gives the same bits.

    It is used only while no hook is attached anywhere in ``model`` (`modules_if_unhooked`,
    one walk over all its modules per pass, at the first router): then nothing but the
    model's own code runs during the pass, and that never edits a committed source or a
    parameter in place. So the routers then skip their own hook checks, and whether each
    is content-free is decided for all of them at once (`is_content_free`). Make a new
    one for every pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._enabled: Optional[bool] = None
        self._routers: list[DepthRouter] = []
        # by the sources' dtype (bf16 and fp16 decide apart, as each router would)
        self._content_free: dict[torch.dtype, dict[DepthRouter, bool]] = {}
        self._key: Optional[tuple[int, Optional[float]]] = None
        self._committed: tuple[Tensor, ...] = ()
        self._sum: Optional[tuple[Tensor, Tensor]] = None

    @property
    def enabled(self) -> bool:
        """Whether the memo may be used in this pass (no hook anywhere in the model)."""
        if self._enabled is None:
            modules = modules_if_unhooked(self._model)  # one walk: the hooks and the routers
            self._enabled = modules is not None
            if modules is not None:
                self._routers = [module for module in modules if isinstance(module, DepthRouter)]
        return self._enabled

    def route(
        self, router: DepthRouter, sources: list[Float[Tensor, "batch pos d_model"]]
    ) -> Float[Tensor, "batch pos d_model"]:
        """``router(sources, self)`` in a pass where the memo is `enabled`. Nothing watches
        the router, so this skips its hook checks; `route_normalized` calls it without
        ``nn.Module.__call__``, which with no hook anywhere only calls `forward`. Only
        while `enabled` (asserted): otherwise the router's hooks would be skipped."""
        assert self.enabled, "SharedSums.route is only for a pass without hooks"
        if router._needs_grad(sources) or not self.is_content_free(router, sources[0].dtype):
            return router._route_unobserved(sources, shortcut_ruled_out=True)
        return _route_content_free(sources, router.recency_bias, self)

    def route_normalized(
        self,
        router: DepthRouter,
        sources: list[Float[Tensor, "batch pos d_model"]],
        norm: RMSNorm,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``norm(router(sources, self))``, the normalised input of a sublayer, in a pass
        where the memo is `enabled`, bit for bit.

        Without a gradient, a content-free router that reuses a committed sum hands its
        sum to ``norm`` before the current source's finiteness test: the norm's RMS of a
        row that is not finite is inf or nan, so testing the ``[batch, pos, 1]`` scale
        replaces testing the ``[batch, pos, d_model]`` sum. Only when a scale is not
        finite (a source is not, or a row's RMS overflows) does the router's own test
        run (`_nan_where_not_finite`), and the norm again on its output. Only while
        `enabled` (asserted): the router's and the norm's hooks are not called."""
        assert self.enabled, "SharedSums.route_normalized is only for a pass without hooks"
        dtype = sources[0].dtype
        if len(sources) < 2 or torch.is_grad_enabled() or not self.is_content_free(router, dtype):
            return norm(self.route(router, sources))
        total = _shared_unchecked_sum(sources, router.recency_bias, self)
        if total.dtype == dtype:  # a float32 / float64 model
            normalized, scale = norm.normalize(total)
        else:  # the float32 sum is not needed after its rounding: the norm reuses it
            normalized, scale = norm.normalize(total.to(dtype), stat_buffer=total)
        if _all_finite(scale):  # then so is total: a non-finite element makes its row's
            return normalized  # scale inf or nan, and the test would change nothing
        return norm(self.route(router, sources))  # with the current source's test

    def is_content_free(self, router: DepthRouter, dtype: torch.dtype) -> bool:
        """`DepthRouter._content_free` of ``router`` for sources of ``dtype``, decided for
        every router of the model at once at the first call (`_content_free_routers`):
        while no hook is attached nothing edits a parameter during the pass."""
        decisions = self._content_free.get(dtype)
        if decisions is None:
            decisions = self._content_free[dtype] = (
                _content_free_routers(self._routers, stat_dtype(dtype)) if self.enabled else {}
            )
        decided = decisions.get(router)
        if decided is None:  # a router outside the model, or not decided at once
            return router._content_free(router._effective_query(dtype))
        return decided

    def committed_sum(
        self, committed: Sequence[Float[Tensor, "batch pos d_model"]], bias: Optional[Tensor]
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos 1"]]:
        """``(sum, last_weight)`` of a content-free router that reads ``committed`` and then
        one more source: the weighted sum of the committed sources in the routing dtype
        (`_nan_checked_sum`, its weights from `_content_free_weights`) and the weight of
        the one more source; the remembered ones if the same sources were summed with the
        same bias. Never edit them."""
        key = (len(committed), None if bias is None else float(bias))
        if key != self._key or any(
            a is not b for a, b in zip(self._committed, committed, strict=True)
        ):
            weights = _content_free_weights(len(committed) + 1, committed[0], bias)
            total = _nan_checked_sum(committed, weights[:-1])
            self._key, self._committed = key, tuple(committed)
            self._sum = (total, weights[-1].unsqueeze(-1))
        assert self._sum is not None
        return self._sum


def normalized_route(
    router: Optional[DepthRouter],
    sources: list[Float[Tensor, "batch pos d_model"]],
    norm: RMSNorm,
    shared_sums: Optional[SharedSums],
) -> Float[Tensor, "batch pos d_model"]:
    """``norm`` of what ``router`` makes of ``sources`` (``router(sources, shared_sums)``),
    the normalised input of a sublayer or of the unembedding; ``norm(sources[-1])``, the
    current source, without a router. In a pass where ``shared_sums`` is enabled,
    `SharedSums.route_normalized`."""
    if router is None:
        return norm(sources[-1])
    if shared_sums is not None and shared_sums.enabled:
        return shared_sums.route_normalized(router, sources, norm)
    return norm(router(sources, shared_sums))


def _content_free_routers(
    routers: Sequence[DepthRouter], routing_dtype: torch.dtype
) -> dict[DepthRouter, bool]:
    """`DepthRouter._content_free` of every router in ``routing_dtype``, with one product
    for all of them: the same elementwise ``key_norm.w * query`` as each router's
    `DepthRouter._effective_query` (stacked; the conversions are exact or the same
    rounding). If they cannot be stacked (shapes or devices differ) or are not on the CPU,
    none is decided."""
    if not routers:
        return {}
    with torch.no_grad():
        try:
            queries = torch.stack([router.query for router in routers])
            gains = torch.stack([router.key_norm.w for router in routers])
        except RuntimeError:
            return {}
    if not (queries.is_cpu and gains.is_cpu and queries.shape == gains.shape):
        return {}
    nonzero = (gains.to(routing_dtype) * queries.to(routing_dtype)).any(dim=-1).tolist()
    return {
        router: router._content_free_given(not flag)
        for router, flag in zip(routers, nonzero, strict=True)
    }


def _content_free_weights(
    n_sources: int, source: Float[Tensor, "batch pos d_model"], bias: Optional[Tensor]
) -> Float[Tensor, "n_sources batch pos"]:
    """The weights of a content-free router over ``n_sources`` sources shaped like
    ``source``: the softmax of zero logits plus the recency bias on the last (the same
    bits as the general path's ``0 / scale + bias``)."""
    zeros = torch.zeros(
        (n_sources, *source.shape[:-1]), dtype=stat_dtype(source.dtype), device=source.device
    )
    return add_recency_bias(zeros, bias).softmax(dim=0)


def _non_finite_rows(x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos"]:
    """``|x . 0|``: 0 where a row of ``x`` is finite, ``nan`` where it is not (as the
    general path's ``inf * 0`` makes its logits). Adding or subtracting it keeps every
    finite bit and makes a non-finite row ``nan``."""
    return (x @ x.new_zeros(x.shape[-1])).abs_()


def _all_finite(x: Tensor) -> bool:
    """Whether every element of ``x`` (float32 / float64) is finite: its sum is (one
    reduction; a ``nan`` or an infinity makes the sum one too, and an overflow of finite
    elements only answers ``False`` too early). Reads the result, so CPU tensors only (it
    would synchronise an accelerator)."""
    return math.isfinite(x.sum().item())


def _nan_checked_sum(
    sources: Sequence[Float[Tensor, "batch pos d_model"]],
    weights: Float[Tensor, "n_sources batch pos"],
) -> Float[Tensor, "batch pos d_model"]:
    """`weighted_sum` of ``sources`` in the routing dtype (bf16 / fp16 streamed through one
    buffer, `routing_stream`), ``nan`` over a position where a source is not finite."""
    return _nan_where_not_finite(weighted_sum(routing_stream(sources), weights), sources)


def _nan_where_not_finite(
    total: Float[Tensor, "batch pos d_model"],
    sources: Sequence[Float[Tensor, "batch pos d_model"]],
) -> Float[Tensor, "batch pos d_model"]:
    """``total``, a weighted sum that includes ``sources``, made ``nan`` in place over a
    position where one of them is not finite (subtracting `_non_finite_rows` keeps every
    finite bit). A non-finite source element makes its element of the sum non-finite (a
    weight is 0 or more: ``0 * inf`` is ``nan``), so a finite sum needs no per-position
    test; only a sum with a non-finite element (rare) tests the sources' rows."""
    if not _all_finite(total):
        for source in sources:
            total.sub_(_non_finite_rows(source).unsqueeze(-1))
    return total


def _route_content_free(
    sources: Sequence[Float[Tensor, "batch pos d_model"]],
    bias: Optional[Float[Tensor, ""]],
    shared_sums: Optional[SharedSums] = None,
) -> Float[Tensor, "batch pos d_model"]:
    """`_route`'s output, in the sources' dtype, when the effective query is exactly zero:
    every ``V_i . query`` is 0, so the logits are the recency bias alone and no RMS or dot
    product is needed. A position where a source is not finite is ``nan``, as the general
    path's ``inf * 0`` makes it. With ``shared_sums`` (enabled: from `SharedSums.route`)
    the committed sources' part of the sum and the weights may be reused."""
    dtype = sources[0].dtype
    if len(sources) > 1 and shared_sums is not None:
        total = _shared_unchecked_sum(sources, bias, shared_sums)
        return _nan_where_not_finite(total, sources[-1:]).to(dtype)
    weights = _content_free_weights(len(sources), sources[0], bias)
    return _nan_checked_sum(sources, weights).to(dtype)


def _shared_unchecked_sum(
    sources: Sequence[Float[Tensor, "batch pos d_model"]],
    bias: Optional[Float[Tensor, ""]],
    shared_sums: SharedSums,
) -> Float[Tensor, "batch pos d_model"]:
    """The weighted sum of a content-free router over two or more ``sources``, in the
    routing dtype, from the shared sum of the committed ones (`SharedSums.committed_sum`,
    nan already where one is not finite) and the current (last) source, before the
    current source's finiteness test (`_nan_where_not_finite`)."""
    committed, last_weight = shared_sums.committed_sum(sources[:-1], bias)
    last = sources[-1].to(committed.dtype)
    # the same kernel as weighted_sum's last addcmul_, out of place so that the memo
    # stays intact: into the float32 copy of a bf16 / fp16 source, a new tensor for a
    # float32 one
    return torch.addcmul(committed, last, last_weight, out=None if last is sources[-1] else last)


class _FusedRouting(torch.autograd.Function):
    """The router of an unobserved float32/float64 `DepthRouter` with a hand-written
    backward: the same numbers as the hooked path, a fraction of the autograd graph and
    no stacked copy of the sources.

    Forward, with ``r_i = 1 / sqrt(mean(V_i**2) + eps)`` per source::

        logits = (V_i . q) * r_i  (+ bias on the last source);  w = softmax(logits)
        out    = sum_i w_i V_i

    Under ``create_graph=True`` the backward is `differentiable_backward` of `_route`
    (the same function), so second derivatives are exact.
    """

    @staticmethod
    def forward(ctx, query: Tensor, bias: Optional[Tensor], eps: float, *sources: Tensor) -> Tensor:
        ctx.eps = padding_eps(eps, sources[0])  # the pass's, kept for the second derivative
        out, scale, dots, weights = _route(sources, query, bias, ctx.eps)
        ctx.save_for_backward(query, scale, dots, weights, bias, *sources)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():  # create_graph=True
            query, _, _, _, bias, *sources = ctx.saved_tensors
            grads = differentiable_backward(
                lambda query, bias, *sources: _route(sources, query, bias, ctx.eps)[0],
                (query, bias, *sources),
                (ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[3:]),
                grad_out,
            )
            return (*grads[:2], None, *grads[2:])
        # Memory passes over [batch, pos, d_model] tensors dominate (the per-source numbers
        # are [n_sources, batch, pos]): per source, two for the weight gradient, three for
        # the source gradient, one multiply-accumulate for the query gradient.
        query, scale, dots, weights, _, *sources = ctx.saved_tensors  # [n_sources, batch, pos]
        inv_rms = scale.reciprocal()
        grad_weights = torch.stack([(source * grad_out).sum(dim=-1) for source in sources])
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(0, keepdim=True))
        grad_dots = grad_logits * inv_rms
        # d inv_rms / d V = -inv_rms**3 * V / d_model
        coef = (grad_dots * dots * inv_rms.square()).mul_(-1.0 / query.shape[-1]).unsqueeze(-1)
        grad_dots_, weights_ = grad_dots.unsqueeze(-1), weights.unsqueeze(-1)
        grad_sources: list[Tensor] = []
        per_position_query: Optional[Tensor] = None
        for index, source in enumerate(sources):
            grad = source * coef[index]
            grad.addcmul_(weights_[index], grad_out)
            grad.addcmul_(grad_dots_[index], query)
            grad_sources.append(grad)
            # accumulated per position, reduced once at the end: not a [1, N] @ [N, d]
            # matmul, because BLAS splits that reduction differently from run to run
            if per_position_query is None:
                per_position_query = source * grad_dots_[index]
            else:
                per_position_query.addcmul_(source, grad_dots_[index])
        assert per_position_query is not None
        grad_query = per_position_query.flatten(0, -2).sum(0)
        grad_bias = grad_logits[-1].sum() if ctx.has_bias else None
        return (grad_query, grad_bias, None, *grad_sources)
