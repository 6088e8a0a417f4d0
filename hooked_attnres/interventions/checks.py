"""Checks of caches and tensors handed to interventions and patching, made when the call
is made (not deep inside a sweep): the cache comes from a model with this routing layout,
holds every hook the call patches, with this model's sources per router and ``d_model``,
and (where the run is known) the run's ``[batch, pos]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from hooked_attnres._validation import require_integer
from hooked_attnres.model.cache import require_cached
from hooked_attnres.model.depth import source_axis
from hooked_attnres.model.passes import padding_of, same_padding

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes


def require_eval(model: HookedAttnRes, what: str) -> None:
    """Refuse a model in train mode (as TransformerLens 4.x's patching does): measured
    effects, patching results and their estimates must not depend on the mode."""
    if model.training:
        raise ValueError(
            f"{what} needs the model in eval mode (model.eval()); its results "
            "must not depend on the mode"
        )


def weights_signature(model: HookedAttnRes) -> tuple:
    """What the parameters of ``model`` are now: for each, its name, dtype, device, storage
    and version counter (which every in-place edit advances: ``load_state_dict``,
    ``process_weights``, an optimiser step). Two equal signatures mean the same weights,
    to compare the model of two runs (`RoutingAttribution.verify_top`)."""
    return tuple(
        (name, param.dtype, param.device, param.data_ptr(), param._version)
        for name, param in model.named_parameters()
    )


def check_count(name: str, value: Any) -> int:
    """An integer >= 1 (prompts per pass, rows, resamples, ...), or ``ValueError``."""
    return require_integer(name, value, 1)


def activation_shapes(model: HookedAttnRes) -> dict[str, tuple[int, ...]]:
    """The shape after ``[batch, pos]`` of every router hook, ``hook_embed`` and the
    committed-block hooks, by hook name (other hooks are not checked)."""
    d_model = model.cfg.d_model
    out: dict[str, tuple[int, ...]] = {"hook_embed": (d_model,)}
    layout = model.routing_layout
    for site in model.sites():
        n = layout.n_sources(site)
        out[site.hook("weights")] = (n,)
        out[site.hook("logits")] = (n,)
        out[site.hook("sources")] = (n, d_model)
        out[site.hook("out")] = (d_model,)
    for name in layout.commit_hooks().values():
        out[name] = (d_model,)
    return out


def _describe(model) -> str:
    cfg = model.cfg
    return (
        f"layout {cfg.attnres_layout!r}, {cfg.n_layers} layers, "
        f"{cfg.attnres_num_blocks} blocks, mode {cfg.attnres_mode!r}, d_model {cfg.d_model}"
    )


def run_record(cache: Any) -> Any:
    """What records the run that made ``cache`` (its ``n_past`` and ``attention_mask``):
    the cache itself (an `AttnResActivationCache`, a `RunCacheDict`), else the
    `RunCacheDict` inside a TransformerLens ``ActivationCache(cache_dict, model)`` built
    around one (which would drop the record), else the cache, which then records nothing."""
    if hasattr(cache, "n_past") or hasattr(cache, "attention_mask"):
        return cache
    return getattr(cache, "cache_dict", cache)


def check_cache_model(model: HookedAttnRes, cache: Any, what: str) -> None:
    """``what`` describes the cache (e.g. ``"the clean cache"``). An ``ActivationCache``
    knows its model: refuse one from a model whose depth routing
    or width differs (its sources would be other sources)."""
    other = getattr(cache, "model", None)
    if other is None or other is model or not hasattr(other, "routing_layout"):
        return
    if other.routing_layout != model.routing_layout or other.cfg.d_model != model.cfg.d_model:
        raise ValueError(
            f"{what} comes from a model with {_describe(other)}, but this model "
            f"has {_describe(model)}; its sources are not this model's sources. Cache a run "
            "of this model (model.run_with_cache(tokens))"
        )


def check_cached(
    model: HookedAttnRes,
    cache: Mapping,
    names: Iterable[str],
    what: str,
    batch_pos: Optional[tuple[int, int]] = None,
) -> None:
    """Every hook in ``names`` is in ``cache`` with this model's shape (sources per router,
    ``d_model``) and, with ``batch_pos``, the run's ``[batch, pos]``.

    Raises:
        KeyError: a hook is missing from the cache.
        ValueError: the cache comes from another model, or a tensor has another shape, or
            the cache is of a pass after key-value-cached positions (``cache.n_past``),
            whose positions are not the run's (every cache checked here is patched into a
            run's positions, and a run that takes another run's cache is a whole-sequence
            run, `require_whole_sequence`).
    """
    check_cache_model(model, cache, what)
    names = list(dict.fromkeys(names))
    require_cached(cache, names, what)
    n_past = getattr(run_record(cache), "n_past", 0)
    if n_past:
        raise ValueError(
            f"{what} comes from a pass after {n_past} cached positions (past_kv_cache): its "
            f"position 0 is the sequence's position {n_past}, not the run's position 0; "
            "cache a whole-sequence run (model.run_with_cache(tokens), no past_kv_cache)"
        )
    shapes = activation_shapes(model)
    for name in names:
        tensor = cache[name]
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{what}: {name} is a {type(tensor).__name__}, not a tensor")
        expected = shapes.get(name)
        found = tuple(tensor.shape)
        if expected is not None and (len(found) < 2 or found[2:] != expected):
            hint = ""
            axis = source_axis(name)
            if axis is not None and len(found) == len(expected) + 2:
                hint = f" ({found[axis]} sources; this router reads {expected[axis]})"
            raise ValueError(
                f"{what}: {name} has shape {found}, but this model's {name} is "
                f"[batch, pos, {', '.join(map(str, expected))}]{hint}; the cache comes from "
                "another model or was sliced (remove_batch_dim / pos_slice)"
            )
        if batch_pos is not None and found[:2] != tuple(batch_pos):
            raise ValueError(
                f"{what}: {name} has [batch, pos] = {list(found[:2])} but the run "
                f"(corrupted_tokens) has {list(batch_pos)}; patch prompts pairwise, with equal "
                "lengths"
            )


def _describe_mask(real: Optional[Tensor]) -> str:
    if real is None:
        return "no padding (no attention_mask, or all ones)"
    return f"an attention_mask marking {int((~real).sum())} padding position(s)"


def check_cache_mask(cache: Any, attention_mask: Optional[Tensor], what: str, run: str) -> None:
    """Refuse a cache made with another attention mask than the run it is patched into:
    with padding, its position ``p`` is another token, or the same token at another
    rotary position, than the run's (silently wrong numbers). ``attention_mask`` is the
    run's mask (``None``: no padding); ``what`` names the cache, ``run`` the run.
    A cache that records no mask (a TransformerLens ``ActivationCache`` around a plain
    dict, or a dict not made by `run_with_cache` or the caching hooks) cannot be checked
    and is taken as it is; one around a `RunCacheDict` is checked (`run_record`)."""
    record = run_record(cache)
    if not hasattr(record, "attention_mask"):
        return
    if same_padding(record.attention_mask, attention_mask):
        return
    made, runs = padding_of(record.attention_mask), padding_of(attention_mask)
    raise ValueError(
        f"{what} was made with {_describe_mask(made)}, but {run} runs with "
        f"{_describe_mask(runs) if made is None or runs is None else 'another one'}: with "
        "padding, a position of the cache is not the same token at the same position of "
        "the run, so the patched numbers would be wrong. Cache the clean run with the "
        "run's mask (model.run_with_cache(clean_tokens, attention_mask=mask)) and pass the "
        "same attention_mask= here (cache.attention_mask is the mask a cache was made with)"
    )


def check_run_shape(cached: Tensor, current: Tensor, name: str, what: str) -> None:
    """At hook time: a cached activation matches the running one's ``[batch, pos]``."""
    if cached.shape[:2] != current.shape[:2]:
        raise ValueError(
            f"{what} at {name}: the cache has [batch, pos] = {list(cached.shape[:2])} but this "
            f"run has {list(current.shape[:2])}; cache a run of the same prompts' shape"
        )


def check_value_tensor(value: Any, d_model: int, what: str) -> Tensor:
    """A replacement tensor broadcastable to ``[batch, pos, d_model]`` (checked now)."""
    tensor = torch.as_tensor(value)
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{what}: value must be a real tensor, got dtype {tensor.dtype}")
    if tensor.ndim > 3 or (tensor.ndim >= 1 and tensor.shape[-1] not in (1, d_model)):
        raise ValueError(
            f"{what}: a value tensor must broadcast to [batch, pos, d_model={d_model}], got "
            f"shape {tuple(tensor.shape)}"
        )
    return tensor


def check_broadcast(value: Tensor, current: Tensor, name: str, what: str) -> None:
    """At hook time: a replacement tensor broadcasts to the running activation."""
    try:
        shape = torch.broadcast_shapes(value.shape, current.shape)
    except RuntimeError:
        shape = None
    if shape != current.shape:
        raise ValueError(
            f"{what} at {name}: a value of shape {tuple(value.shape)} does not broadcast to "
            f"this run's {tuple(current.shape)}"
        )
