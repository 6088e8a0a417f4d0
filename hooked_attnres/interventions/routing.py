"""Routing interventions as TransformerLens hook lists.

Every function returns ``[(hook_name, hook_fn), ...]`` for ``model.run_with_hooks``,
``model.hooks`` or ``model.run_with_cache``::

    hooks = mask_sources(model, "embedding", routers="mlp_res", layers="early")
    ablated_logits = model.run_with_hooks(tokens, fwd_hooks=hooks)

*Where* an intervention applies is a list of `RouterSite` s (chosen by
`hooked_attnres.interventions.selection`); *what* it does is one hook function per site.
Mask-and-renormalise ablation has one compiler, `Ablation`: `mask_sources` and the fast
ablation sweep of `hooked_attnres.analysis` both build their hooks with it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooked_attnres._precision import stat_dtype, sum_where, widened
from hooked_attnres._validation import (
    as_items,
    one_or_list,
    require_choice,
    require_integer,
    require_selection,
    some_names,
)
from hooked_attnres.interventions.checks import (
    check_axes,
    check_bool_mask,
    check_broadcast,
    check_cache_mask,
    check_cached,
    check_run_shape,
    check_source_tensor,
    check_value_tensor,
    recorded_run,
)
from hooked_attnres.interventions.selection import (
    LayerSpec,
    RouterSpec,
    SourceSpec,
    check_positions,
    iter_selected,
    position_index,
    select_sites,
    unread_commit,
)
from hooked_attnres.model.depth import RouterSite
from hooked_attnres.model.norms import rms_scale
from hooked_attnres.model.passes import (
    InterventionTag,
    TensorContents,
    note_intervention,
    padding_of,
    pass_mask,
    real_tokens,
    require_whole_sequence,
)

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

# TransformerLens's hook-list type: (hook name or name predicate, hook function)
Hooks = list[tuple[Union[str, Callable[[str], bool]], Callable]]
Value = Union[str, Tensor, Mapping]


def _positions_mask(positions, n_pos: int, device) -> Optional[Tensor]:
    """``[pos]`` bool mask of the positions an edit applies to (``None``: all); refused in
    a pass that runs part of the sequence (`require_whole_sequence`)."""
    if positions is None:
        return None
    require_whole_sequence(n_pos, f"positions={positions!r}")
    mask = torch.zeros(n_pos, dtype=torch.bool, device=device)
    mask[position_index(positions, n_pos, device)] = True
    return mask


def _intervention_tag(
    what: str, where: object, value: object, index: Optional[Tensor]
) -> Union[InterventionTag, Callable[[], InterventionTag]]:
    """The `InterventionTag` of one hook (``what``: its description) that writes ``value``
    at ``where`` (its router or hook and sources) at positions ``index``
    (`check_positions`), for `note_intervention`. A value given by name (``"uniform"``,
    ``"zero"``, ``"mean"``) or a tensor (a value or an ablation's mask) makes the same
    intervention built again the same one (e.g. the hook list written inline in each call
    that fills a key-value cache): a tensor by the contents the hook reads when it runs
    (`_TensorTag`: a value edited in place after a pass read it is another intervention).
    Any other value (``None``: another run's cache) makes each hook built its own. Positions
    given are shown in the description (``" (positions=[0, 2])"``): they tell two
    interventions apart as the value does."""
    positions = None if index is None else tuple(index.reshape(-1).tolist())
    if positions is not None:
        what = f"{what} (positions={list(positions)})"
    if isinstance(value, Tensor):
        return _TensorTag(what, where, value, positions)
    if isinstance(value, str):
        return InterventionTag(what, (where, value, positions))
    return InterventionTag(what)


class _TensorTag:
    """Makes the `InterventionTag` of a hook that reads ``value`` (a tensor) when it runs:
    keyed by the contents it reads then (`TensorContents`, a copy made when they change),
    so a key-value cache records what its passes computed with, not what the tensor holds
    later. Called by `note_intervention` only in a pass with a key-value cache; there it
    costs one bit-wise comparison with the last copy (about 2 us for a ``[d_model]``
    value). A tensor with a position axis (`_has_position_axis`) is refused by every pass
    that continues a cache (`_require_aligned`): each call makes a tag of its own, and
    nothing is copied."""

    __slots__ = ("what", "where", "value", "positions", "_tag", "_read")

    def __init__(self, what: str, where: object, value: Tensor, positions: Optional[tuple]):
        self.what, self.where, self.value, self.positions = what, where, value, positions
        self._tag: Optional[InterventionTag] = None
        self._read: Optional[TensorContents] = None  # the contents in ``_tag``'s key

    def __call__(self) -> InterventionTag:
        if _has_position_axis(self.value):
            # a pass that continues a key-value cache refuses it (`_require_aligned`): a
            # tag of its own, nothing copied
            return InterventionTag(self.what)
        if self._tag is None or self._read is None or not self._read.holds(self.value):
            self._read = TensorContents(self.value.detach().clone())
            self._tag = InterventionTag(self.what, (self.where, self._read, self.positions))
        return self._tag


def _named(value: object) -> Optional[str]:
    """A value given by name (``"mean"``), ``None`` for any other."""
    return value if isinstance(value, str) else None


def _tagged(value: object) -> object:
    """What names a value in its hooks' tags (`_intervention_tag`): a name or a tensor;
    ``None`` for another run's cache, read at positions of the whole sequence, which a
    pass that continues a key-value cache refuses (`_require_aligned`) whatever filled it."""
    return value if isinstance(value, (str, Tensor)) else None


def _call(function: str, value: object, *args: object) -> str:
    """``function(args, value)`` as an intervention's description (`InterventionTag.what`)
    shows it: a value given by name is shown, as it tells two such interventions apart,
    and a tensor by its dtype and shape (a cache is not)."""
    shown = [repr(arg) for arg in args]
    if _named(value) is not None:
        shown.append(repr(str(value)))
    elif isinstance(value, Tensor):
        shown.append(f"<{str(value.dtype).removeprefix('torch.')} tensor {list(value.shape)}>")
    return f"{function}({', '.join(shown)})" if shown else function


def _at_positions(new: Tensor, current: Tensor, positions, pos_dim: int = 1) -> Tensor:
    """``new`` where ``positions`` select (all of it if ``positions`` is None), else
    ``current``; ``pos_dim`` is the position axis of ``[batch, pos, ...]`` tensors."""
    pos_mask = _positions_mask(positions, current.shape[pos_dim], current.device)
    if pos_mask is None:
        return new.clone()  # never hand out a cache's tensor or a broadcast view
    pos_mask = pos_mask.reshape(-1, *([1] * (current.ndim - pos_dim - 1)))
    return torch.where(pos_mask, new, current)


def _has_position_axis(value: Tensor) -> bool:
    """Whether a value tensor (or a mask) addresses positions: its position axis, the one
    before the last, has more than one (`_require_aligned`)."""
    return value.ndim >= 2 and value.shape[-2] != 1


def _require_aligned(
    value: Optional[Tensor], current: Tensor, where: str, kind: str = "value tensor"
) -> None:
    """A value that addresses positions of the whole sequence (another run's cache:
    ``value=None``; a tensor whose position axis, the one before the last, has more than
    one position) is refused in a pass that runs part of the sequence
    (`require_whole_sequence`): a key-value cache chunk would read the value's first
    positions at its own, later ones. ``kind`` names the tensor in the message (``"mask"``
    for `mask_hook`'s, ``"weights tensor"`` for `set_weights`')."""
    if value is None:
        require_whole_sequence(
            current.shape[-2],
            f"{where}: a value from another run's cache",
            instead="patch from a cache of a run over the same positions, in one pass",
        )
    elif _has_position_axis(value):
        require_whole_sequence(
            current.shape[-2],
            f"{where}: a {kind} of shape {tuple(value.shape)} (a position axis of "
            f"{value.shape[-2]})",
            instead=f"give a {kind} without a position axis (its position axis of size 1)",
        )


def _is_cache(value) -> bool:
    """An ``ActivationCache`` or a dict of tensors (not a tensor, not a string)."""
    return hasattr(value, "keys") and not isinstance(value, (Tensor, str))


VALUE_NAMES = ("zero", "mean")


def check_value(
    model: HookedAttnRes,
    value: Value,
    hook_names: Sequence[str],
    what: str,
    positions=None,
    zero_nan: Sequence[str] = (),
) -> Value:
    """Check a patching value when the intervention is built: ``"zero"`` / ``"mean"``, a
    cache holding ``hook_names`` with this model's shapes, or a tensor of the shapes
    `check_value_tensor` takes. ``what`` is the calling function's name. Returns the value
    (a tensor for tensor-likes).

    Where a zero source is ``0 / 0`` at a norm that reads it (``zero_nan``, the norms
    `zero_nan_norms` names), a value that is zero at every row it patches (``"zero"`` or
    an all-zero tensor, ``positions`` None) is refused now (`_refuse_zero_source`); one
    that may be zero at some rows only is checked when the hook runs (`_zero_row_check`),
    where the pass's padding is known."""
    if isinstance(value, str):
        if value not in VALUE_NAMES:
            raise ValueError(f"value must be 'zero', 'mean', a tensor or a cache, got {value!r}")
        if value == "zero" and positions is None and zero_nan:
            _refuse_zero_source(what, "value='zero'", zero_nan)
        return value
    if _is_cache(value):
        check_cached(model, value, hook_names, f"the cache given to {what}")  # type: ignore[arg-type]
        return value
    if isinstance(value, (Tensor, float, int, list, tuple)) and not isinstance(value, bool):
        tensor = check_value_tensor(value, model.cfg.d_model, what)
        if positions is None and zero_nan and bool((tensor == 0).all()):
            _refuse_zero_source(what, "a value tensor that is zero", zero_nan)
        return tensor
    raise TypeError(
        f"{what}: value must be 'zero', 'mean', a tensor or a cache, got {type(value).__name__}"
    )


_ZERO_SOURCE = (
    "a zero source has no RMS, its routing logit (and RMSNorm) is 0 / 0, so the patched "
    "logits would be NaN (at padding rows the norms take eps 1, so a zero there is "
    "finite and allowed). Remove the source from the mix instead (mask_sources, "
    "mask-and-renormalise), or patch it with 'mean' or another run's cache"
)


def zero_nan_norms(model: HookedAttnRes, zeroed: Mapping[RouterSite, Collection[int]]) -> list[str]:
    """The norms where a value that is zero over ``d_model`` at a real row, given to the
    routers of ``zeroed`` as their sources of the indices it maps them to, is ``0 / 0``: a
    router's key norm with eps 0 (its routing logit), and, after a router whose every
    source the value replaces (a single source, or all of them: passed on as a zero),
    the sublayer norm reading its output, with eps 0. Their module paths; ``[]`` where
    there is none. The eps set at each norm is read: every norm of an ``eps = 0`` model
    (e.g. the exact wrap of a Qwen3 with ``rms_norm_eps = 0``), a hand-set
    ``key_norm.eps = 0`` in another. The one rule of the zero-source refusals."""
    found = []
    for site, indices in zeroed.items():
        if not indices:
            continue
        norm = model.norm_after(site)
        if model.router(site).key_norm.eps == 0:
            found.append(f"{site.prefix}.key_norm")
        elif len(set(indices)) == model.routing_layout.n_sources(site) and norm.eps == 0:
            name = norm.hook_scale.name
            assert name is not None  # named by the model's setup()
            found.append(name.rsplit(".", 1)[0])
    return found


def _refuse_zero_source(what: str, value: str, norms: Sequence[str]) -> None:
    """A source patched to zero at a real row has no RMS at the ``norms`` whose ``eps`` is
    0 (`zero_nan_norms`): its routing logit (or RMSNorm) is ``0 / 0``, so the logits would
    be NaN, not a number to report. Refused when the call is made where every patched row
    is zero."""
    raise ValueError(
        f"{what} with {value} where a norm reading it has eps = 0 ({some_names(norms)}; "
        f"e.g. the exact wrap of a Qwen3 with rms_norm_eps = 0): {_ZERO_SOURCE}"
    )


def _zero_row_check(norms: Sequence[str], what: str) -> Optional[Callable]:
    """Where a zero source is ``0 / 0`` at the ``norms`` that read it (`zero_nan_norms`):
    ``check(new, positions, where)``, raising ``ValueError`` when the value ``new``
    (``[batch, pos, d_model]``) is zero over ``d_model`` (its RMS in the routing dtype is
    0, as the key norm computes it, `rms_scale`: a value whose squares or their mean over
    ``d_model`` underflow too) at a real row of the running pass that ``positions`` patch;
    ``None`` where ``norms`` is empty. Padding rows are not refused: their norms take
    eps 1 (`hooked_attnres.model.norms.padding_eps`)."""
    if not norms:
        return None

    def check(new: Tensor, positions, where: str) -> None:
        with torch.no_grad():
            # the scale itself: the sum of squares alone missed a mean that underflows
            # (1e-323 / d_model), whose scale 0 made the logits NaN
            zero = rms_scale(new, 0.0).squeeze(-1) == 0  # [batch, pos]
        pos_mask = _positions_mask(positions, zero.shape[1], zero.device)
        if pos_mask is not None:
            zero = zero & pos_mask
        real = real_tokens(zero.shape[0], zero.shape[1])
        if real is not None:
            zero = zero & real.to(zero.device)
        if bool(zero.any()):
            raise ValueError(
                f"{what} at {where} where a norm reading it has eps = 0 ({some_names(norms)}; "
                "e.g. the exact wrap of a Qwen3 with rms_norm_eps = 0): the value is zero "
                f"over d_model (or its mean square underflows to 0) at {int(zero.sum())} real "
                f"position(s) it patches; {_ZERO_SOURCE}"
            )

    return check


def resolve_value(
    value: Value,
    current: Float[Tensor, "batch pos d_model"],
    from_cache: Callable[[Mapping], Tensor],
    where: str = "patching",
) -> Float[Tensor, "batch pos d_model"]:
    """What replaces ``current``: ``"zero"``; ``"mean"`` (over the batch, per position;
    in a pass whose ``attention_mask`` marks padding, over the prompts whose token at that
    position is real);
    a cache of another run (``from_cache(cache)`` picks the matching tensor, which must
    have the run's ``[batch, pos]``); or a tensor broadcastable to ``current`` whose axes
    follow `check_value_tensor` (a 2-D ``[batch, d_model]`` is refused: it would be read as
    ``[pos, d_model]``). The one value resolver of every patching intervention; ``where``
    names the hook in errors."""
    if isinstance(value, str):
        if value == "zero":
            return torch.zeros_like(current)
        if value == "mean":
            # the prompts' positions must line up (not after a logit_positions gather)
            require_whole_sequence(current.shape[1], "value='mean'", cached_ok=True)
            real = real_tokens(current.shape[0], current.shape[1])
            if real is None:
                return current.mean(dim=0, keepdim=True).expand_as(current)
            return _mean_over_real(current, real).expand_as(current)
        raise ValueError(f"value must be 'zero', 'mean', a tensor or a cache, got {value!r}")
    if _is_cache(value):
        new = from_cache(value)  # type: ignore[arg-type]
        _require_aligned(None, current, where)
        check_run_shape(new, current, where, "patching from a cache")
        check_cache_mask(value, pass_mask(), f"the cache patched in at {where}", "this run")
    else:
        new = check_value_tensor(value, current.shape[-1], f"patching at {where}")
        _require_aligned(new, current, where)
        check_broadcast(new, current, where, "patching with a tensor")
    return new.to(current.device, current.dtype).expand_as(current)


def _mean_over_real(
    current: Float[Tensor, "batch pos d_model"], real: Bool[Tensor, "batch pos"]
) -> Float[Tensor, "1 pos d_model"]:
    """The mean over the prompts whose token at each position is real (``real``, the
    pass's attention mask), accumulated in float32 (float64 for float64); a position
    where every prompt has padding gets the mean over all prompts."""
    values = widened(current)
    real = real.to(values.device)[..., None]  # [batch, pos, 1]
    count = real.to(values.dtype).sum(dim=0, keepdim=True)
    # selected (`sum_where`): a padding position's sources can be nan (a hook's edit; with
    # eps = 0 they were 0 / 0 before `padding_eps`), and a product with 0 made the mean nan
    # at every real position there
    mean = sum_where(values, real, dim=0, keepdim=True) / count.clamp(min=1)
    mean = torch.where(count > 0, mean, values.mean(dim=0, keepdim=True))
    return mean.to(current.dtype)


def mask_logits(
    logits: Float[Tensor, "batch pos n_sources"], where: Bool[Tensor, "... n_sources"], what: str
) -> Float[Tensor, "batch pos n_sources"]:
    """``logits`` with ``-inf`` where ``where`` (broadcast) is true: mask-and-renormalise.

    Raises ``ValueError("{what} masks every source at some position ...")`` if a position
    is left with no finite logit, counting ``-inf`` already there (e.g. from another hook
    on the same router), where the softmax would return NaN.
    ``where`` has the shapes of `mask_hook`'s mask (`check_axes`): ``[n_sources]``,
    ``[1, n_sources]``, ``[batch, 1, n_sources]`` or ``[batch, pos, n_sources]``;
    ``ValueError`` naming them for another number of axes (extra leading axes broadcast the
    result to more axes than the logits', silently before audit 147; a 2-D ``[batch,
    n_sources]`` broadcast as ``[pos, n_sources]``).
    ``TypeError`` for a ``where`` that is not bool (`check_bool_mask`); ``ValueError`` for
    one that does not broadcast to ``logits`` (`check_broadcast`: another number of
    sources, torch's bare size mismatch named neither; or a batch or position axis longer
    than the logits' axis of size 1, e.g. ``[3, 1, n_sources]`` for ``[1, pos,
    n_sources]`` logits, which broadcast the result to ``[3, pos, n_sources]``, silently
    until audit 152).
    """
    check_axes(where, f"{what}'s mask", "n_sources", "mask")
    check_bool_mask(where, f"{what}'s mask")
    try:
        masked = logits.masked_fill(where, float("-inf"))
    except RuntimeError:  # checked only on failure: broadcast_shapes doubled the hook's time
        check_broadcast(where, logits, "the router's logits", f"{what}'s mask")
        raise
    if masked.shape != logits.shape:  # a longer axis where the logits' is 1 (audit 152)
        check_broadcast(where, logits, "the router's logits", f"{what}'s mask")
    if torch.isneginf(masked).all(dim=-1).any():
        raise ValueError(
            f"{what} masks every source at some position; the renormalised weights would be NaN"
        )
    return masked


def mask_hook(
    site: RouterSite,
    where: Bool[Tensor, "... n_sources"],
    positions=None,
    what: str = "this ablation",
) -> tuple[str, Callable]:
    """The ``hook_logits`` hook that masks ``where`` at one router.

    Args:
        where: bool ``[n_sources]`` (every prompt alike), ``[batch, 1, n_sources]`` (one
            mask per row of the batch, as the batched ablation sweep uses) or ``[batch,
            pos, n_sources]`` (one per prompt and position, a whole-sequence pass only);
            ``[1, n_sources]`` is ``[n_sources]``; another shape is refused when built
            (`check_source_tensor`: a 2-D ``[batch, n_sources]`` broadcast as ``[pos,
            n_sources]`` until audit 110); another dtype than bool (a 0/1 integer or float
            tensor) is refused when built, ``TypeError`` (`check_bool_mask`).
        positions: only mask at these positions (default: all; checked when built,
            `check_positions`, and against the run's length when the hook runs).

    The hook reads ``where`` when it runs, and records the contents it read and its
    positions in the running pass (`note_intervention`): a key-value cache refuses a pass
    that continues it under other interventions than the passes that filled it
    (`KeyValueCache.note_interventions`), a mask edited in place since included. A mask
    with a position axis (``[batch, pos, n_sources]``) is refused in a pass that runs part
    of the sequence (`_require_aligned`).
    """
    if not isinstance(site, RouterSite):  # no model here to check a pair against
        raise TypeError(
            f"mask_hook takes a RouterSite (model.site(layer, router)), got {site!r}; a "
            "(layer, router) pair needs the model: pass model.site(*pair)"
        )
    index = check_positions(positions)
    where = check_source_tensor(where, f"{what}'s mask")
    check_bool_mask(where, f"{what}'s mask")
    # equal masks at equal positions are one intervention (an ablation compiled again)
    tag = _intervention_tag(f"{what} at {site.hook('logits')}", ("mask", site), where, index)

    def hook(logits: Float[Tensor, "batch pos n_sources"], hook):
        note_intervention(tag)
        _require_aligned(where, logits, f"{what} at {hook.name}", "mask")
        mask = where.to(logits.device)
        pos_mask = _positions_mask(positions, logits.shape[-2], logits.device)
        if pos_mask is not None:
            mask = mask & pos_mask[None, :, None]  # [1 or batch, pos, n_sources]
        # another hook on the same router (e.g. a second mask_sources list) may have
        # masked the rest already
        return mask_logits(
            logits, mask, f"{hook.name}: together with earlier hooks on this router, {what}"
        )

    return site.hook("logits"), hook


@dataclass(frozen=True)
class Ablation:
    """A mask-and-renormalise ablation: at each of its router sites, which sources are
    masked (their logits become ``-inf``; the other weights renormalise to sum to 1).

    Build it with `Ablation.compile`; `hooks` gives the TransformerLens hook list.

    Attributes:
        masks: ``((site, mask), ...)`` in forward order; ``mask[i]`` is whether source
            ``i`` of that router is masked. Only routers where something is masked.
        skipped: sites where the selection was every source (left alone, with
            ``on_full="skip"``).
        positions: only mask at these positions (``None``: all; given as an int, a list
            or a tensor, kept as a tuple of ints, so that ablations at different positions
            compare unequal; checked against the run's length when the hook runs).
        what: a description used in error messages.
    """

    masks: tuple[tuple[RouterSite, tuple[bool, ...]], ...]
    skipped: tuple[RouterSite, ...] = ()
    positions: Optional[tuple[int, ...]] = None
    what: str = "this ablation"

    def __post_init__(self) -> None:
        index = check_positions(self.positions)  # int64 (NumPy's uint64 is no tensor)
        if index is not None:
            flat = index.reshape(-1).tolist()
            object.__setattr__(self, "positions", tuple(int(p) for p in flat))

    @classmethod
    def compile(
        cls,
        model: HookedAttnRes,
        sources: SourceSpec,
        routers: RouterSpec = None,
        layers: LayerSpec = None,
        bands: Optional[dict] = None,
        positions=None,
        on_full: str = "raise",
    ) -> Ablation:
        """Resolve a selection to per-router masks.

        Args:
            sources: families, labels and/or indices (see `hooked_attnres.interventions.selection`).
            routers, layers, bands: which routers (default: every attention and MLP router).
            positions: only ablate at these positions (default: all).
            on_full: a router where the selection is every source: ``"raise"`` a
                ``ValueError`` naming it (the renormalisation is undefined there) or
                ``"skip"`` it (listed in ``skipped``).
        """
        on_full = require_choice("on_full", on_full, ("raise", "skip"))
        check_positions(positions)
        layout = model.routing_layout
        masks, skipped = [], []
        for site, indices in iter_selected(model, sources, routers, layers, bands):
            n_sources = layout.n_sources(site)
            if len(indices) == n_sources:
                if on_full == "skip":
                    skipped.append(site)
                    continue
                raise ValueError(
                    f"masking {sources!r} at {site} would mask all {n_sources} of its sources "
                    f"{layout.labels(site)}; the renormalised weights are undefined there. "
                    "Exclude that router (routers= / layers=) or mask fewer sources."
                )
            masks.append((site, tuple(i in indices for i in range(n_sources))))
        return cls(tuple(masks), tuple(skipped), positions, f"masking {sources!r}")

    @property
    def sites(self) -> tuple[RouterSite, ...]:
        return tuple(site for site, _ in self.masks)

    @property
    def is_noop(self) -> bool:
        """Nothing is masked (the family does not exist at the selected routers)."""
        return not self.masks

    @property
    def start_sublayer(self) -> Optional[int]:
        """The first sublayer it changes (`RouterSite.sublayer`; ``None`` for a no-op): a
        forward pass can start there from the clean run's depth state."""
        return min((site.sublayer for site in self.sites), default=None)

    def hooks(self) -> Hooks:
        """One ``hook_logits`` hook per masked router."""
        return [
            mask_hook(site, torch.tensor(mask), self.positions, self.what)
            for site, mask in self.masks
        ]


def batched_mask_hooks(ablations: Sequence[Ablation], rows_per_copy: int, device=None) -> Hooks:
    """Hooks for a batch made of ``len(ablations)`` copies of ``rows_per_copy`` prompts:
    copy ``i`` gets ablation ``i``'s masks (one hook per touched router, built by
    `mask_hook` like `Ablation.hooks`). Position-restricted ablations are not batched.
    ``rows_per_copy`` is an integer >= 1 (0 and ``True`` built hooks for no or one row)."""
    rows_per_copy = require_integer("rows_per_copy", rows_per_copy, 1)
    ablations = as_items("ablations", ablations)
    for ablation in ablations:
        if not isinstance(ablation, Ablation):
            raise TypeError(
                "batched_mask_hooks takes Ablation objects (plan_ablations' entries' .ablation), "
                f"got "
                f"the {type(ablation).__name__} {ablation!r:.80}"
            )
    per_site: dict[RouterSite, Tensor] = {}
    for copy, ablation in enumerate(ablations):
        if ablation.positions is not None:
            raise ValueError("batched_mask_hooks takes ablations over all positions")
        for site, mask in ablation.masks:
            if site not in per_site:
                per_site[site] = torch.zeros(
                    len(ablations) * rows_per_copy, len(mask), dtype=torch.bool, device=device
                )
            per_site[site][copy * rows_per_copy : (copy + 1) * rows_per_copy] = torch.tensor(
                mask, device=device
            )
    return [
        mask_hook(site, rows[:, None, :], what="this ablation (with the hooks already attached)")
        for site, rows in per_site.items()
    ]


def mask_sources(
    model: HookedAttnRes,
    sources: SourceSpec,
    routers: RouterSpec = None,
    layers: LayerSpec = None,
    bands: Optional[dict] = None,
    positions=None,
) -> Hooks:
    """Mask-and-renormalise ablation: the selected sources get weight 0 and the others
    are renormalised to sum to 1 (their logits are set to ``-inf`` before the softmax,
    so ``hook_weights`` shows the renormalised weights). ``Ablation.compile(...).hooks()``.

    Args:
        sources: families, labels and/or indices (see `hooked_attnres.interventions.selection`).
        routers, layers, bands: which routers (default: every attention and MLP router;
            `RouterSite` s are accepted too).
        positions: only ablate at these positions (default: all).

    Raises:
        ValueError: if the selection would mask every source of some router (the
            renormalisation is undefined there), naming the router.
    """
    return Ablation.compile(model, sources, routers, layers, bands, positions).hooks()


def _is_by_site(weights) -> bool:
    """A dict of weights by router (``{(layer, router) or RouterSite: tensor}``), not a
    cache (whose keys are hook names)."""
    return isinstance(weights, dict) and any(
        isinstance(key, (tuple, RouterSite)) for key in weights
    )


def _weights_by_site(
    model: HookedAttnRes, weights: dict, selected: Sequence[RouterSite]
) -> dict[RouterSite, object]:
    """``{RouterSite: weights}`` of a dict by router (keys checked by the layout, so a
    negative layer counts from the end), refusing a key that names no router, two keys for
    one router, and an entry for a router outside the selection (it would be ignored)."""
    layout = model.routing_layout
    out: dict[RouterSite, object] = {}
    for key, value in weights.items():
        if not isinstance(key, (tuple, RouterSite)):
            raise ValueError(
                f"the weights dict mixes router keys with {key!r}; its keys must all be "
                "(layer, router) pairs or RouterSites (a cache's hook names: pass the cache)"
            )
        site = layout.check(key)
        if site in out:
            raise ValueError(f"the weights dict has two entries for {site} (one is {key!r})")
        out[site] = value
    outside = [str(site) for site in out if site not in selected]
    if outside:
        raise ValueError(
            f"the weights dict has entries for {outside}, outside the selected routers "
            f"{[str(site) for site in selected]} (routers= / layers= / bands=); set_weights "
            "would ignore them. Select those routers too, or pass only the selected "
            "routers' entries"
        )
    return out


def _weights_for(
    weights, model: HookedAttnRes, site: RouterSite
) -> tuple[Union[str, Tensor], bool]:
    """The weights for ``site`` and whether they come from another run's cache (whose
    ``[batch, pos]`` must then equal the run's, not broadcast to it)."""
    layout = model.routing_layout
    n_sources = layout.n_sources(site)
    if isinstance(weights, str):
        if weights != "uniform":
            raise ValueError(
                f"weights must be 'uniform', a tensor, a dict or a cache; got {weights!r}"
            )
        return weights, False
    by_site = _is_by_site(weights)
    from_cache = _is_cache(weights) and not by_site
    if by_site:
        if site in weights:
            weights = weights[site]
        else:
            raise KeyError(
                f"the weights dict has no entry for {site} (key ({site.layer}, "
                f"{site.kind!r}) or the RouterSite); give one or select fewer routers"
            )
    real = None  # [batch, pos], True at real tokens: the positions the check reads
    if from_cache:
        name = site.hook("weights")
        check_cached(model, weights, [name], "the cache given to set_weights")
        # the cache's padding positions are the run's (`check_cache_mask` when the hook
        # runs) and never reach a real one; their weights may be nan (a hook's edit; with
        # eps = 0 they were 0 / 0 before `padding_eps`), which refused every padded cache
        # as not summing to 1
        real = padding_of(recorded_run(weights, "the cache given to set_weights").attention_mask)
        weights = weights[name]
    weights = check_source_tensor(weights, f"weights for {site}", "weights")
    if weights.is_complex():  # .float() dropped the imaginary part, a UserWarning only
        raise TypeError(f"weights for {site} must be real, got dtype {weights.dtype}")
    if not weights.is_floating_point():
        weights = weights.float()  # a float64 model's float64 weights stay float64
    if weights.shape[-1] != n_sources:
        raise ValueError(
            f"weights for {site} have {weights.shape[-1]} sources, the router has {n_sources} "
            f"({layout.labels(site)})"
        )
    checked = weights
    if real is not None and weights.ndim == 3 and tuple(weights.shape[:2]) == tuple(real.shape):
        checked = weights[real.to(weights.device)]
    # summed in at least float32, the routing dtype where the hook applies them: a
    # bfloat16 sum rounds to 8 bits and passed weights 2e-3 off 1 (three bfloat16 1/3)
    total = checked.sum(-1, dtype=stat_dtype(checked.dtype))
    if (checked < 0).any() or not torch.allclose(total, torch.ones_like(total), atol=1e-4):
        hint = ""
        if weights.dtype in (torch.bfloat16, torch.float16):
            hint = (
                f" (summed in float32, where the router applies them: {weights.dtype} "
                "cannot hold most fractions to 1e-4; give the weights in float32, the "
                "routing dtype of bfloat16 / float16 models)"
            )
        elif not bool(checked.isfinite().all()):
            hint = (
                f" ({int((~checked.isfinite()).sum())} of them are nan or infinite: e.g. the "
                "padding positions of a run where a hook wrote nan; pass that run's cache "
                "itself, which records its padding, or give finite weights there)"
            )
        raise ValueError(f"weights for {site} must be non-negative and sum to 1{hint}")
    return weights, from_cache


def set_weights(
    model: HookedAttnRes,
    weights,
    routers: RouterSpec = None,
    layers: LayerSpec = None,
    bands: Optional[dict] = None,
    positions=None,
) -> Hooks:
    """Replace routing weights.

    Args:
        weights: ``"uniform"``; a tensor ``[n_sources]`` (or ``[1, n_sources]``), ``[batch,
            1, n_sources]`` or ``[batch, pos, n_sources]`` (one router's shape, so usually
            with a single router selected; another shape is refused, `check_source_tensor`:
            a 2-D ``[batch, n_sources]`` broadcast as ``[pos, n_sources]`` until audit
            110); a dict
            ``{(layer, router) or RouterSite: tensor}`` with one entry per selected router
            and none for another (a list of Python floats is read in float64,
            `as_number_tensor`); or an ``ActivationCache`` / dict of another run holding
            ``hook_weights`` (routing patching, e.g. clean weights into a corrupted run).
        routers, layers, bands: which routers (default: every attention and MLP router).
        positions: only replace at these positions (default: all).

    Raises:
        KeyError: a dict by router without an entry for a selected router.
        ValueError: a dict by router with an entry for a router outside the selection
            (it would be ignored), two entries for one router or a key that is not a
            router; weights of another shape or number of sources, negative or not
            summing to 1.
        TypeError: complex weights (their imaginary part was dropped, audit 186).
    """
    index = check_positions(positions)
    hooks: Hooks = []
    sites = select_sites(model, routers, layers, bands)
    if _is_by_site(weights):
        weights = _weights_by_site(model, weights, sites)
    for site in sites:
        value, from_cache = _weights_for(weights, model, site)

        def hook(
            current: Float[Tensor, "batch pos n_sources"],
            hook,
            value=value,
            cached=from_cache,
            cache=weights,
            tag=_intervention_tag(
                f"{_call('set_weights', None if from_cache else value)} at {site.hook('weights')}",
                ("set_weights", site),
                None if from_cache else value,
                index,
            ),
        ):
            note_intervention(tag)
            if isinstance(value, str):
                new = torch.full_like(current, 1.0 / current.shape[-1])
            else:
                _require_aligned(
                    None if cached else value,
                    current,
                    f"set_weights at {hook.name}",
                    "weights tensor",
                )
                if cached:  # another run's weights: its prompts, position by position
                    check_run_shape(value, current, hook.name, "set_weights")
                    where = f"the cache given to set_weights at {hook.name}"
                    check_cache_mask(cache, pass_mask(), where, "this run")
                check_broadcast(value, current, hook.name, "set_weights")
                new = value.to(current.device, current.dtype).expand_as(current)
            return _at_positions(new, current, positions)

        hooks.append((site.hook("weights"), hook))
    return hooks


def patch_sources(
    model: HookedAttnRes,
    sources: SourceSpec,
    value: Value = "zero",
    routers: RouterSpec = None,
    layers: LayerSpec = None,
    bands: Optional[dict] = None,
    positions=None,
) -> Hooks:
    """Replace depth sources as *one router* sees them (local patching).

    Edits ``hook_sources`` of each selected router, so only that router's mix changes;
    the stored blocks, and every other router, are untouched.

    Args:
        sources: families, labels and/or indices.
        value: ``"zero"``; ``"mean"`` (the mean over the batch, per position, over the
            prompts whose token there is real if the run has an ``attention_mask``); a
            scalar, ``[d_model]`` or ``[1, d_model]`` tensor (every prompt and position
            alike), ``[batch, 1, d_model]`` (one per prompt) or ``[batch, pos, d_model]``
            (`check_value_tensor`: a 2-D ``[batch, d_model]``, which would be read as
            ``[pos, d_model]``, is refused when built, audit 128); Python numbers (a
            float, a list) are read in float64 (`as_number_tensor`); or a cache of another
            run (its ``hook_sources`` at the same router, e.g. clean sources into a
            corrupted run).
        positions: only patch at these positions (default: all).
    """
    index = check_positions(positions)
    selected = list(iter_selected(model, sources, routers, layers, bands))
    names = [site.hook("sources") for site, _ in selected]
    # a selection that no selected router has patches nothing: no hook, nothing to refuse
    zero_nan = {site: zero_nan_norms(model, {site: indices}) for site, indices in selected}
    all_nan = [norm for norms in zero_nan.values() for norm in norms]
    value = check_value(model, value, names, "patch_sources", positions, all_nan)
    hooks: Hooks = []
    for site, indices in selected:
        name = site.hook("sources")
        zero_check = _zero_row_check(zero_nan[site], "patch_sources")

        def hook(
            stacked: Float[Tensor, "batch pos n_sources d_model"],
            hook,
            indices=indices,
            name=name,
            zero_check=zero_check,
            tag=_intervention_tag(
                f"{_call('patch_sources', value, sources)} at {name}",
                ("patch_sources", name, tuple(indices)),
                _tagged(value),
                index,
            ),
        ):
            note_intervention(tag)
            out = stacked.clone()
            for index in indices:
                current = stacked[..., index, :]

                def cached(cache: Mapping, index: int = index) -> Tensor:
                    return cache[name][..., index, :]

                new = resolve_value(value, current, cached, name)
                if zero_check is not None:
                    zero_check(new, positions, f"{name} (source {index})")
                out[..., index, :] = _at_positions(new, current, positions)
            return out

        hooks.append((name, _marked(hook, value)))
    return hooks


def commit_hook_name(model: HookedAttnRes, label: str) -> str:
    """The hook through which every reader sees source ``label`` (``"embedding"`` or a
    committed block such as ``"block_2"``, ``"attn_3"``, ``"mlp_3"``); ``ValueError`` on
    layout ``"none"`` (no routers, so nothing is committed)."""
    model.routing_layout.require_routers()
    if not isinstance(label, str):
        raise ValueError(
            f"global patching takes source labels such as 'embedding' or 'block_1', "
            f"not {label!r}; indices and families name different blocks at different routers"
        )
    hooks = model.routing_layout.commit_hooks()
    if label in hooks:
        return hooks[label]
    raise ValueError(
        f"{label!r} is not a committed source of this model; global patching takes 'embedding' "
        "or a committed block label (see model.source_labels); families name different blocks "
        "at different routers, and 'current' is the running stream (patch hook_resid_* instead)"
    )


def patch_committed(
    model: HookedAttnRes, labels: Union[str, list[str]], value: Value = "zero", positions=None
) -> Hooks:
    """Replace committed sources for *every* later reader (global patching).

    ``"embedding"`` patches ``hook_embed`` (the token embedding wherever it is used, so
    in the cumulative layout also the start of the stream); a block label patches the
    hook where that block is committed (``blocks.{l}.hook_committed_block``, or
    ``blocks.{l}.hook_committed_mid`` for an ``attn_{l}`` source), so every router that
    reads the block afterwards reads the patched value. Families and indices are refused:
    they name different blocks at different routers (use `patch_sources` for that), and
    so is a block that no router reads (`RoutingLayout.commit_readers` empty: the
    cumulative layout's block committed after the last layer, whose patch changes
    nothing; the message, `unread_commit`, names the hook of the final stream).

    Args:
        labels: one label or a list (not empty, each label once).
        value: ``"zero"``, ``"mean"`` (over the batch; over the prompts whose token is
            real where the run has an ``attention_mask``), a tensor as `patch_sources`
            takes (a scalar, ``[d_model]``, ``[1, d_model]``, ``[batch, 1, d_model]`` or
            ``[batch, pos, d_model]``; a 2-D ``[batch, d_model]`` is refused; Python
            numbers in float64), or a cache of another run (its value of the same hook).
        positions: only patch at these positions (default: all).
    """
    index = check_positions(positions)
    labels = one_or_list("labels", labels)  # an index or a bool is refused by name below
    require_selection("labels", labels, why="it patches no source")
    names = [commit_hook_name(model, label) for label in labels]
    layout = model.routing_layout
    for label in labels:
        if not layout.commit_readers(label):  # the cumulative layout's last block
            raise ValueError(f"patch_committed({label!r}): {unread_commit(model)}")
    # the norms among each source's readers where a zero is 0 / 0, with the sources of
    # each reader that the labels replace together
    held = {site: layout.held_sources(site) for site in layout.sites()}
    replaced = {site: [i for i, h in enumerate(hs) if h in labels] for site, hs in held.items()}
    zero_nan = {
        name: zero_nan_norms(model, {site: replaced[site] for site in layout.commit_readers(label)})
        for label, name in zip(labels, names, strict=True)
    }
    all_nan = [norm for norms in zero_nan.values() for norm in norms]
    value = check_value(model, value, names, "patch_committed", positions, all_nan)
    hooks: Hooks = []
    for name in names:
        zero_check = _zero_row_check(zero_nan[name], "patch_committed")

        def hook(
            block: Float[Tensor, "batch pos d_model"],
            hook,
            name=name,
            check=zero_check,
            tag=_intervention_tag(
                f"{_call('patch_committed', value)} at {name}",
                ("patch_committed", name),
                _tagged(value),
                index,
            ),
        ):
            note_intervention(tag)
            new = resolve_value(value, block, lambda cache: cache[name], name)
            if check is not None:
                check(new, positions, name)
            return _at_positions(new, block, positions)

        hooks.append((name, _marked(hook, value)))
    return hooks


def _marked(hook: Callable, value: object) -> Callable:
    """``hook``, marked as averaging over the prompts of its pass where ``value`` is
    ``"mean"`` (`require_whole_batch_means` finds it attached)."""
    if isinstance(value, str) and value == "mean":
        hook._batch_mean = True  # type: ignore[attr-defined]
    return hook


def batch_mean_hooks(model: HookedAttnRes) -> list[str]:
    """The hook points of ``model`` with a `patch_sources` / `patch_committed` hook of
    ``value="mean"`` attached (`_marked`): each prompt of a pass is patched with the mean
    over the pass's prompts, so the prompts of one pass are no longer independent."""
    return [
        str(point.name)
        for point in model.hook_points()
        for handle in point.fwd_hooks
        if getattr(handle.user_hook, "_batch_mean", False)
    ]


def require_whole_batch_means(model: HookedAttnRes, n_prompts: int, chunk: int, what: str) -> None:
    """Refuse an analysis (``what``) that runs ``n_prompts`` prompts in passes of
    ``chunk`` while a `patch_sources` / `patch_committed` hook with ``value="mean"`` is
    attached to ``model`` (``model.hooks(...)``, ``add_hook``): its mean is over the prompts
    of each pass, so each chunk would be patched with its own prompts' mean, not the
    batch's (a silently other intervention than ``model.run_with_hooks(tokens, ...)``
    applies; audit 163). Nothing to refuse in one pass (``n_prompts <= chunk``)."""
    if n_prompts <= chunk:
        return
    found = batch_mean_hooks(model)
    if found:
        raise ValueError(
            f"{what} runs the {n_prompts} prompts in passes of chunk={chunk}, but an "
            f"intervention with value='mean' is attached ({some_names(found)}): it averages "
            "over the prompts of each pass, so each chunk would be patched with the mean of "
            "its own prompts, not of the batch. Pass chunk >= the number of prompts, or "
            "patch with the batch's mean as a [1, pos, d_model] tensor from a cache of a run "
            "of the whole batch: cache[hook].mean(0, keepdim=True) for patch_committed, "
            "cache[hook][:, :, i].mean(0, keepdim=True) for source i of patch_sources (one "
            "call per router and source; in a padded batch, the mean over the prompts real "
            "at each position, as 'mean' takes it)"
        )
