"""Which routers and which sources an intervention touches.

Routers are chosen by type (``"attn_res"``, ``"mlp_res"``, ``"final_res"``) and layers
(an index, a list, a ``range``, a ``(start, stop)`` pair, or the name of a depth band).
Sources are chosen by family (``"embedding"``, ``"older"``, ``"prev_completed"``,
``"current"``), by label (``"block_2"``, as in ``model.source_labels``) or by index;
a family or label that a router does not have selects nothing there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor

from hooked_attnres._tl import get_act_name
from hooked_attnres._validation import (
    is_integer,
    one_or_list,
    refuse_uint8_index,
    require_integer,
    require_positions_in_range,
    require_selection,
    unsigned_as_int64,
)
from hooked_attnres.model.depth import (
    FAMILIES,
    ROUTERS,
    SUBLAYER_ROUTERS,
    RouterSite,
    layer_index,
)

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

LayerSpec = Union[None, int, str, range, tuple, Sequence]
SourceSpec = Union[str, int, Sequence[Union[str, int]]]
BAND_NAMES = ("early", "middle", "late")


def depth_bands(n_layers: int, bands: Optional[dict] = None) -> dict[str, list[int]]:
    """Named groups of layers.

    Default: thirds, ``early = [0, ceil(L/3))``, ``middle = [ceil(L/3), ceil(2L/3))``,
    ``late`` the rest (8 layers: 0-2, 3-5, 6-7). Custom bands: ``{"name": range or
    (start, stop) or list}``; they must be non-empty, their layers in ``[-n_layers,
    n_layers)`` (`layer_index`: a negative one counts from the end).
    """
    n_layers = require_integer("n_layers", n_layers, 1)
    check_bands(bands)
    if bands is None:
        cuts = [0, math.ceil(n_layers / 3), math.ceil(2 * n_layers / 3), n_layers]
        out = {name: list(range(cuts[i], cuts[i + 1])) for i, name in enumerate(BAND_NAMES)}
        return {name: layers for name, layers in out.items() if layers}
    out = {}
    for name, spec in bands.items():
        layers = sorted(set(_layer_list(spec, n_layers)))
        if not layers:
            raise ValueError(f"band {name!r} is empty")
        out[name] = layers
    return out


def check_bands(bands) -> None:
    """Refuse ``bands`` that is neither ``None`` nor a non-empty mapping of band name ->
    layers: ``ValueError`` naming what was given. A list of layer lists failed with
    "'list' object has no attribute 'items'"; an empty dict named no band (a mass table of
    band 'other' only)."""
    if bands is None:
        return
    if not isinstance(bands, Mapping):
        raise ValueError(
            f"bands must be a dict of band name -> layers (e.g. {{'early': [0, 1], 'late': "
            f"[2, 3]}}) or None, got the {type(bands).__name__} {bands!r:.80}"
        )
    if not bands:
        raise ValueError("bands={} names no band; give at least one name -> layers, or None")


def _refuse_tensor(name: str, value) -> None:
    """Refuse a torch tensor as a layer or source selection (or one of its items): no
    integer by the rule of `hooked_attnres._validation`; iterating a 0-d one crashed, and
    its items were named out of range or unknown."""
    if isinstance(value, Tensor):
        raise ValueError(
            f"{name}={value!r}: a torch tensor is not taken as {name} (an index is a Python "
            "int or a NumPy integer); pass value.tolist() (or int(value) for one index)"
        )


def _layer_list(spec, n_layers: int) -> list[int]:
    """Layer indices of an index, a list / range, or a ``(start, stop)`` pair (negative
    values count from the end, as in a slice); an empty selection is refused."""
    _refuse_tensor("layers", spec)
    if isinstance(spec, bool):
        raise ValueError(f"layers must be integers, got {spec!r}")
    if is_integer(spec):  # a NumPy integer too (np.argsort gives them)
        items = [spec]
    elif isinstance(spec, tuple) and len(spec) == 2 and all(is_integer(v) for v in spec):
        for v in spec:
            if not -n_layers <= v <= n_layers:
                raise ValueError(
                    f"layers={spec!r}: {v} is not in [-{n_layers}, {n_layers}] "
                    "(a (start, stop) range)"
                )
        start, stop = (int(v) + n_layers if v < 0 else int(v) for v in spec)
        if not 0 <= start < stop <= n_layers:
            raise ValueError(
                f"layers={spec!r} is a (start, stop) range that selects no layer of "
                f"[0, {n_layers}); it needs start < stop (negative values count from the end)"
            )
        items = list(range(start, stop))
    elif isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
        raise ValueError(
            f"layers must be an index, a list, a range, a (start, stop) pair or band "
            f"name(s), got {spec!r}"
        )
    else:
        items = list(spec)
    if not items:
        raise ValueError(f"layers={spec!r} is empty: it selects no layer; give at least one")
    out = []
    for layer in items:
        _refuse_tensor("layers", layer)
        out.append(layer_index(layer, n_layers))  # the rule of model.site (audit 162)
    return out


def resolve_layers(
    model: HookedAttnRes, layers: LayerSpec = None, bands: Optional[dict] = None
) -> list[int]:
    """Layer indices from an index, list, range, ``(start, stop)``, or band name(s).

    ``bands`` (custom band name -> layers, `depth_bands`) is read only for the band names
    in ``layers``: with ``layers=None`` (every layer) or layer indices it is refused, as
    it would be ignored (``mask_sources(model, "embedding", bands={"early": [0]})``
    masked every layer, silently)."""
    n_layers = model.cfg.n_layers
    named = depth_bands(n_layers, bands)
    if isinstance(layers, str):
        layers = [layers]
    by_name = isinstance(layers, (list, tuple)) and any(isinstance(v, str) for v in layers)
    if bands is not None and not by_name:
        raise ValueError(
            f"bands={bands!r:.80} defines layer groups that layers selects by name "
            f"(layers={next(iter(bands))!r}), but layers={layers!r:.80} names none, so "
            "bands would be ignored; pass layers=<band name(s)>, or leave bands out"
        )
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (list, tuple)) and by_name:
        if not all(isinstance(v, str) for v in layers):
            raise ValueError(
                f"layers mixes band names and layer indices ({layers!r}); give "
                "band names or indices, or custom bands={name: layers}"
            )
        out = []
        for name in layers:
            if name not in named:
                raise ValueError(f"unknown depth band {name!r}; bands are {sorted(named)}")
            out.extend(named[name])
        return sorted(set(out))
    return sorted(set(_layer_list(layers, n_layers)))


def check_routers(
    model: HookedAttnRes, routers: Union[None, str, Sequence[str]] = None
) -> tuple[str, ...]:
    """Router types as a checked tuple: ``None`` is the two sublayer routers, a string is
    one router; raises ``ValueError`` for a model without routers, an empty list or a
    router type given twice (`require_selection`: a sweep would give its rows twice, an
    intervention on no router would do nothing), an unknown router type, or
    ``"final_res"`` on a layout without a final router."""
    layout = model.routing_layout
    layout.require_routers()
    # "got 1" / "must be a list ... of items, got RouterSite(...)" named no cause
    if _names_sites(routers):
        raise ValueError(
            f"routers={routers!r:.80} names single routers, but this argument takes router "
            f"types {ROUTERS} (its rows or cells are by type and layer); to edit single "
            "routers, pass RouterSites or (layer, router) pairs to select_sites / mask_sources "
            "/ set_weights / patch_sources"
        )
    kinds = tuple(
        require_selection(
            "routers",
            SUBLAYER_ROUTERS if routers is None else one_or_list("routers", routers),
            why="it selects no router",
        )
    )
    layout.sites(kinds)  # raises for unknown kinds and a missing final router
    return kinds


RouterSpec = Union[None, str, RouterSite, tuple, Sequence[Union[str, RouterSite, tuple]]]


def _names_a_site(value) -> bool:
    """Whether ``routers=`` as a whole names one router (`RoutingLayout.check` reads it): a
    `RouterSite` or a ``(layer, router)`` pair, a 2-tuple whose second item is a string and
    whose first is no router spelling (``("attn_res", "mlp_res")`` is two router types,
    ``(site, "mlp_res")`` and ``((1, "attn_res"), "mlp_res")`` a router and a type, as in a
    list: audit 165). Inside a list, every tuple is read as a pair."""
    if isinstance(value, RouterSite):
        return True
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[1], str)
        and not isinstance(value[0], (str, RouterSite, tuple))
    )


def _names_sites(routers) -> bool:
    """Whether ``routers=`` names single routers: as a whole (`_names_a_site`), or a list or
    tuple with a `RouterSite` or a ``(layer, router)`` pair among its items."""
    return _names_a_site(routers) or (
        isinstance(routers, (list, tuple))
        and any(isinstance(r, (RouterSite, tuple)) for r in routers)
    )


def select_sites(
    model: HookedAttnRes,
    routers: RouterSpec = None,
    layers: LayerSpec = None,
    bands: Optional[dict] = None,
) -> list[RouterSite]:
    """The `RouterSite` s an intervention or analysis touches, in forward order.

    Args:
        routers: router types (``"attn_res"``, ``"mlp_res"``, ``"final_res"``; default the
            two sublayer types) and/or explicit routers, `RouterSite` s or ``(layer,
            router)`` pairs as ``model.source_labels`` takes them (`RoutingLayout.check`:
            a negative layer counts from the end), kept as given (``layers`` does not
            filter them; with only such routers, ``layers`` or ``bands`` is refused, as it
            would be ignored).
        layers, bands: which layers of the router types (see `resolve_layers`); the final
            router has no layer, so ``layers`` does not filter it (it must be asked for).
    """
    layout = model.routing_layout
    if _names_sites(routers):
        given: list = [routers] if _names_a_site(routers) else list(routers)  # type: ignore[arg-type]
        explicit = [layout.check(r) for r in given if isinstance(r, (RouterSite, tuple))]
        named = [r for r in given if not isinstance(r, (RouterSite, tuple))]
        if not named and (layers is not None or bands is not None):
            # layers / bands select layers of router types: beside single routers only,
            # they selected nothing, and routers=[(1, "attn_res")], layers=[0] edited layer 1
            given_layers = f"layers={layers!r:.60}" if layers is not None else ""
            given_bands = f"bands={bands!r:.60}" if bands is not None else ""
            raise ValueError(
                f"routers={routers!r:.80} names only single routers, each with its own layer, "
                f"so {' and '.join(x for x in (given_layers, given_bands) if x)} would be "
                "ignored; leave it out, or name router types (e.g. routers='attn_res') for "
                "layers to select"
            )
        typed = select_sites(model, named, layers, bands) if named else []
        chosen = set(explicit) | set(typed)
        return [site for site in layout.sites() if site in chosen]
    kinds = check_routers(model, routers)  # type: ignore[arg-type]
    chosen_layers = set(resolve_layers(model, layers, bands))
    return [site for site in layout.sites(kinds) if site.is_final or site.layer in chosen_layers]


def resolve_routers(
    model: HookedAttnRes,
    routers: RouterSpec = None,
    layers: LayerSpec = None,
    bands: Optional[dict] = None,
) -> list[tuple[Optional[int], str]]:
    """``(layer, router)`` pairs of `select_sites` (kept for compatibility)."""
    return [(site.layer, site.kind) for site in select_sites(model, routers, layers, bands)]


def _integer_positions(positions, bounds: str, alternative: str = "") -> Tensor:
    """``positions`` as an int64 tensor if they are integers (an int, a list, a range, a
    NumPy array or a tensor of any integer dtype; an empty one passes), else
    ``ValueError`` naming ``positions`` and what to pass: a bool (``True`` indexed as a
    mask), floats, strings, or a generator (no tensor reads one; "Could not infer dtype of
    generator" named no argument). Unsigned
    integers (NumPy's or torch's) are read as int64 (a uint8 index compared with
    ``-n_pos`` wrapped around, refusing ``np.uint8(1)``; torch has no uint32 comparison),
    and one past int64 is refused (cast, ``2**64 - 1`` is -1); a ``torch.uint8`` tensor is
    refused as ambiguous (`refuse_uint8_index`: a mask to torch, indices to NumPy)."""
    refuse_uint8_index("positions", positions)
    try:
        signed = unsigned_as_int64(positions)  # refuses one past int64: no position
        index = torch.as_tensor(positions if signed is None else signed)
    except (TypeError, ValueError, RuntimeError):
        index = None
    if index is not None and index.numel() == 0:
        return index.long()  # torch reads [] as float
    if (
        index is None
        or isinstance(positions, bool)
        or index.dtype == torch.bool
        or index.is_floating_point()
        or index.is_complex()
    ):
        raise ValueError(
            f"positions {positions!r} must be integers in {bounds} (an int, a list or a "
            f"tensor; list(...) a generator){_positions_hint(positions, index)}{alternative}"
        )
    return index.long()  # torch indexes with int32 / int64 only: int8 / int16 failed


def _positions_hint(positions, index: Optional[Tensor]) -> str:
    """What to give instead of a slice or a bool mask over positions (`_integer_positions`
    refuses both): a conversion that runs on what was given (a list, a NumPy array or a
    tensor) and gives the positions it marks (audit 183: refused without the conversion;
    audit 186: ``torch.nonzero(mask)`` raised TypeError on a list or an array). A bool
    mask of more than one axis marks positions per prompt, which no flat list of positions
    is: the 1-d conversion would interleave prompt and position indices, so it is offered
    for a ``[pos]`` mask only."""
    if isinstance(positions, slice):
        return (
            f"; for a slice, its positions: list(range(n_pos))[{positions!r}], n_pos the "
            "run's number of positions (tokens.shape[1])"
        )
    if index is None or index.dtype != torch.bool or index.ndim == 0:
        return ""
    convert = "torch.as_tensor(mask).nonzero().flatten().tolist()"
    if index.ndim == 1:
        return f"; for a bool mask over positions, the positions it marks: {convert}"
    return (
        f"; a bool mask of shape {tuple(index.shape)} marks positions per prompt, but every "
        f"prompt takes the same positions: a 1-d [pos] mask's positions are {convert}"
    )


def check_positions(positions) -> Optional[Tensor]:
    """Check ``positions`` of an intervention when it is built: ``None`` (all) or integer
    positions (an int, a flat list or a 0-d / 1-d tensor), not empty. Every prompt is
    edited at the same positions, so a nested list or a 2-d tensor (per-prompt positions,
    which would be flattened and applied to every prompt) is refused. Their range is
    checked when the hook runs (the sequence length is known only then). Returns them as
    an integer tensor (``None`` for ``None``)."""
    if positions is None:
        return None
    index = _integer_positions(positions, "[-pos, pos) of the run", ", or None for all positions")
    if index.numel() == 0:
        raise ValueError("positions is empty: give at least one position, or None for all")
    require_flat_positions(index, "edited", "write a hook that edits [batch_index, positions]")
    return index


def require_flat_positions(index: Tensor, verb: str, per_prompt: str) -> None:
    """Refuse ``index`` (integer positions as a tensor, `_integer_positions`) with more than
    one axis, a nested list or a ``[batch, k]`` tensor: every prompt is read (``verb``:
    "edited", "read") at the same positions, so per-prompt positions would be flattened
    and applied to every prompt. ``per_prompt`` says what to do instead."""
    if index.ndim > 1:
        raise ValueError(
            f"positions must be one position or a flat list of positions (every prompt is "
            f"{verb} at the same ones), got shape {tuple(index.shape)}: per-prompt positions "
            f"would be flattened and applied to every prompt. For per-prompt positions, "
            f"{per_prompt}"
        )


def position_index(
    positions, n_pos: int, device=None, per_prompt: str = "read each prompt on its own"
) -> Tensor:
    """``positions`` (an int, a flat list or a 0-d / 1-d tensor) as a long index tensor
    ``[n]`` (possibly empty), checked to be integers in ``[-n_pos, n_pos)`` of a run with
    ``n_pos`` tokens; a nested list or a ``[batch, k]`` tensor (per-prompt positions, which
    would be flattened and read at every prompt) is refused, ``per_prompt`` saying what to
    do instead (`require_flat_positions`)."""
    bounds = f"[-{n_pos}, {n_pos})"
    index = _integer_positions(positions, bounds)
    require_flat_positions(index, "read", per_prompt)
    index = index.to(device).reshape(-1)
    if index.numel() == 0:
        return index
    require_positions_in_range(
        f"positions {positions!r}", index, n_pos, f"this run has {n_pos} tokens"
    )
    return index


def _as_list(sources: SourceSpec) -> list:
    _refuse_tensor("sources", sources)
    if not isinstance(sources, (str, bool, Iterable)) and not is_integer(sources):
        raise ValueError(f"sources must be a family, a label, an index or a list, got {sources!r}")
    out = one_or_list("sources", sources)
    if not out:
        raise ValueError("sources is empty; name at least one family, label or index")
    return out


def source_indices(model: HookedAttnRes, site: RouterSite, sources: SourceSpec) -> list[int]:
    """Source indices of one router selected by families, labels and/or indices.

    Raises ``ValueError`` for a name that is neither a family nor a label of *any*
    router of the model, or for an index out of range; a family or label that this
    router lacks selects nothing.
    """
    layout = model.routing_layout
    labels = layout.labels(site)
    families = layout.families(site)
    out: list[int] = []
    for spec in _as_list(sources):
        _refuse_tensor("sources", spec)
        if isinstance(spec, bool):
            raise ValueError(f"source {spec!r} is not a family, label or index")
        if is_integer(spec):
            if not -len(labels) <= spec < len(labels):
                raise ValueError(
                    f"source index {spec} is out of range for {len(labels)} sources at "
                    f"{site} ({labels}); an index counts the sources of one router, and "
                    "routers read different numbers of them: name the family (one of "
                    f"{FAMILIES}) or the label instead, which a router that lacks it leaves "
                    "alone (it selects nothing there), or select routers that all have "
                    "that index (routers= / layers=)"
                )
            out.append(int(spec) % len(labels))
        elif spec in FAMILIES:
            out.extend(families[spec])
        elif spec in labels:
            out.append(labels.index(spec))
        elif spec not in all_labels(model):
            committed = ""
            if spec in layout.commit_hooks():  # the block committed after the last layer
                readers = layout.commit_readers(spec)
                committed = f" ({spec!r} is committed, but no router lists it under that name: " + (
                    f"{readers[0]} reads it as 'current'; select 'current' there, or "
                    "patch it with patch_committed)"
                    if readers
                    else f"{unread_commit(model)})"
                )
            raise ValueError(
                f"unknown source {spec!r}{committed}: families are {FAMILIES}, labels are "
                f"{sorted(all_labels(model))}"
            )
    return sorted(set(out))


def resolve_sources(
    model: HookedAttnRes, layer: Optional[int], router: str, sources: SourceSpec
) -> list[int]:
    """`source_indices` of ``(layer, router)`` (kept for compatibility)."""
    return source_indices(model, model.site(layer, router), sources)


def unread_commit(model: HookedAttnRes) -> str:
    """Why a committed block that no router reads (`RoutingLayout.commit_readers` empty:
    the cumulative layout's block committed after the last layer) cannot be selected or
    patched, and which hook to edit instead: the end of a refusal's message."""
    return (
        "no router reads it; it is a snapshot of the final residual stream, what ln_final "
        "reads, so editing it changes nothing: to edit that stream, hook "
        f"{get_act_name('resid_post', model.cfg.n_layers - 1)}"
    )


def all_labels(model: HookedAttnRes) -> set[str]:
    """Every source label of every router of the model."""
    layout = model.routing_layout
    return {label for site in layout.sites() for label in layout.labels(site)}


def iter_selected(
    model: HookedAttnRes,
    sources: SourceSpec,
    routers: RouterSpec = None,
    layers: LayerSpec = None,
    bands: Optional[dict] = None,
) -> Iterable[tuple[RouterSite, list[int]]]:
    """``(site, source_indices)`` for every selected router with a non-empty selection.
    ``sources`` is read once (a generator of them was empty from the second router on)."""
    sources = _as_list(sources)
    for site in select_sites(model, routers, layers, bands):
        indices = source_indices(model, site, sources)
        if indices:
            yield site, indices
