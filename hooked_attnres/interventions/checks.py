"""Checks of caches and tensors handed to interventions and patching, made when the call
is made (not deep inside a sweep): the cache comes from a model with this routing layout,
holds every hook the call patches, with this model's sources per router and ``d_model``,
and (where the run is known) the run's ``[batch, pos]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import Tensor

from hooked_attnres._validation import require_integer
from hooked_attnres.model.cache import (
    RunRecord,
    record_of,
    require_cached,
    require_run_positions,
)
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
    """The routing and width of ``model``: the blocks it has (`RoutingLayout.blocks_text`;
    the config's ``attnres_num_blocks`` and ``attnres_mode`` were printed, "3 blocks, mode
    'block'" for a model without routers)."""
    layout = model.routing_layout
    return (
        f"layout {layout.layout!r}, {layout.n_layers} layers, {layout.blocks_text()}, "
        f"d_model {model.cfg.d_model}"
    )


def recorded_run(
    cache: Any, what: str, names: Iterable[str] = (), sliced: bool = True
) -> RunRecord:
    """The record of the pass that made ``cache`` (`record_of`), refusing a cache that
    records nothing (a plain ``dict``, or a cache object around one) and one whose hooks
    ``names`` were last filled by another pass than the recorded one (`RunCacheDict.stale`),
    or (``sliced``) cached with a ``pos_slice`` that drops or reorders positions
    (`require_run_positions`): a cache of a key-value chunk, or of padded prompts, could not
    be told from a whole unpadded run's and would be patched in at the wrong positions
    (silently)."""
    record = record_of(cache)
    if record is None:
        raise ValueError(
            f"{what} ({type(cache).__name__}) does not record the pass that made it (its "
            "n_past and attention_mask: a plain dict, e.g. dict(cache.cache_dict), "
            "{k: v for k, v in cache.items()} or torch.load, or a cache object around one), "
            "so a cache of a key-value cached chunk or of padded prompts could not be told "
            "from a whole unpadded run's: its padding positions would be read as real tokens "
            "(patched in, or counted), silently wrong. Pass the cache of "
            "model.run_with_cache(...) (or its return_cache_object=False dict, or the dict of "
            "add_caching_hooks), or declare the pass of a dict of tensors: "
            "hooked_attnres.RunCacheDict(tensors, n_past=0, attention_mask=mask) (mask: the "
            "run's [batch, pos] attention_mask, None without padding)"
        )
    require_run_positions(record, what, names, sliced)
    return record


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


def refuse_chunk_cache(n_past: int, what: str) -> None:
    """Refuse a cache (``what``) of a pass after ``n_past > 0`` key-value-cached positions:
    its position ``p`` is the sequence's position ``n_past + p``, not a whole run's ``p``."""
    if n_past:
        raise ValueError(
            f"{what} comes from a pass after {n_past} cached positions (past_kv_cache): its "
            f"position 0 is the sequence's position {n_past}, not the run's position 0; "
            "cache a whole-sequence run (model.run_with_cache(tokens), no past_kv_cache)"
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
            run, `require_whole_sequence`), or records nothing of its pass, or holds
            some of ``names`` from an earlier pass than the recorded one (`recorded_run`).
    """
    check_cache_model(model, cache, what)
    names = list(dict.fromkeys(names))
    require_cached(cache, names, what)
    refuse_chunk_cache(getattr(record_of(cache), "n_past", 0), what)
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
    recorded_run(cache, what, names)  # after the shapes, which say more where they differ


def _describe_mask(real: Optional[Tensor]) -> str:
    if real is None:
        return "no padding (no attention_mask, or all ones)"
    return f"an attention_mask marking {int((~real).sum())} padding position(s)"


def check_cache_mask(cache: Any, attention_mask: Optional[Tensor], what: str, run: str) -> None:
    """Refuse a cache made with another attention mask than the run it is patched into:
    with padding, its position ``p`` is another token, or the same token at another
    rotary position, than the run's (silently wrong numbers). ``attention_mask`` is the
    run's mask (``None``: no padding); ``what`` names the cache, ``run`` the run.
    A cache that records nothing is refused (`recorded_run`)."""
    record = recorded_run(cache, what)
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


def as_number_tensor(value: Any) -> Tensor:
    """``value`` (a replacement value, routing weights, a mask) as a tensor: a tensor
    itself, a NumPy array or scalar in its own dtype, and Python numbers (a float, a list
    or a tuple of them) with Python floats in float64, their own precision. Read by
    ``torch.as_tensor`` alone they became float32 (torch's default dtype): in a float64
    model ``patch_committed(model, label, 0.1)`` wrote 0.100000001490116, and a
    ``[d_model]`` list of floats was up to 6e-8 off what it says (audit 183). The hook
    casts the tensor to the activation's dtype when it runs: below float64 the bits of the
    float32 reading (torch casts float64 to bfloat16 / float16 through float32)."""
    if isinstance(value, Tensor):
        return value
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() and not isinstance(value, (np.ndarray, np.generic)):
        tensor = torch.as_tensor(value, dtype=torch.float64)
    return tensor


def check_value_tensor(value: Any, d_model: int, what: str) -> Tensor:
    """A replacement tensor (`patch_sources`, `patch_committed`) checked when the
    intervention is built: real, its last axis ``d_model`` (or 1, broadcast over it), and
    its axes by the rule of the tensors over a router's sources (`check_axes`): a scalar,
    ``[d_model]``, ``[1, d_model]`` (every prompt and position alike), ``[batch, 1,
    d_model]`` (one per prompt) or ``[batch, pos, d_model]``. A 2-D ``[batch, d_model]``
    read as ``[pos, d_model]`` (silently where batch == pos, before audit 128) is
    refused, naming both remedies. Returns the tensor (`as_number_tensor`: Python floats
    in float64)."""
    tensor = as_number_tensor(value)
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{what}: value must be a real tensor, got dtype {tensor.dtype}")
    check_axes(tensor, f"{what}: a value tensor", "d_model", "value", scalar=True)
    if tensor.ndim >= 1 and tensor.shape[-1] not in (1, d_model):
        raise ValueError(
            f"{what}: a value tensor must broadcast to [batch, pos, d_model={d_model}], got "
            f"shape {tuple(tensor.shape)}"
        )
    return tensor


def check_axes(tensor: Tensor, what: str, last: str, example: str, scalar: bool = False) -> None:
    """The one rule for a tensor over a last axis ``last`` (a router's sources, ``d_model``)
    that an intervention broadcasts over ``[batch, pos, last]``: ``[last]`` (every prompt
    and position alike), ``[1, last]`` (which reads alike as one prompt's and as one
    position's), ``[batch, 1, last]`` (one per prompt) or ``[batch, pos, last]`` (one per
    prompt and position); a 0-D tensor too where ``scalar``. Any other shape raises
    ``ValueError`` naming ``what`` and the shapes accepted: a 2-D ``[batch, last]``
    broadcast as ``[pos, last]``, its row ``i`` at position ``i`` of every prompt (a
    silently wrong number where batch == pos), so the message names both remedies
    (``example[:, None, :]`` for one per prompt, ``tensor[None]`` for one per position)."""
    if tensor.ndim in (1, 3) or (tensor.ndim == 2 and tensor.shape[0] == 1):
        return
    if scalar and tensor.ndim == 0:
        return
    hint = ""
    if tensor.ndim == 2:
        hint = (
            f" (a 2-D tensor would broadcast over [batch, pos, {last}] as [pos, {last}]: its "
            "row i at position i of every prompt, not at prompt i; for one per prompt give "
            f"[batch, 1, {last}], tensor[:, None, :], e.g. {example}[:, None, :]; for one per "
            f"position, every prompt alike, [1, pos, {last}], tensor[None])"
        )
    scalar_text = "a scalar, " if scalar else ""
    raise ValueError(
        f"{what} must be {scalar_text}[{last}], [1, {last}], [batch, 1, {last}] or [batch, "
        f"pos, {last}], got shape {tuple(tensor.shape)}{hint}"
    )


def check_source_tensor(value: Any, what: str, example: str = "mask") -> Tensor:
    """A tensor over a router's sources (an ablation's mask, routing weights), checked when
    the intervention is built by the rule of `check_axes`: ``[n_sources]`` (every prompt
    and position alike), ``[batch, 1, n_sources]`` (one per prompt) or ``[batch, pos,
    n_sources]`` (one per prompt and position); ``[1, n_sources]`` too, which reads alike
    as one prompt's and as one position's (every prompt and position alike, e.g. a single
    prompt's ``cache[name][:, -1]``; refused from audit 110 to 113). Any other shape is
    refused: a 2-D ``[batch, n_sources]`` broadcast over ``[batch, pos, n_sources]`` as
    ``[pos, n_sources]``, its row ``i`` at position ``i`` of every prompt (silently where
    batch == pos, before audit 110). ``what`` names the tensor and ``example`` the
    caller's argument in the message's remedy (``mask[:, None, :]``, ``weights[:, None,
    :]``); returns it (`as_number_tensor`: a tensor itself, Python floats in float64)."""
    tensor = as_number_tensor(value)
    check_axes(tensor, what, "n_sources", example)
    return tensor


def check_bool_mask(mask: Tensor, what: str) -> None:
    """Refuse a mask over a router's sources that is not a bool tensor (``True`` where a
    source is masked): ``TypeError`` naming ``what`` and the dtype. A 0/1 integer or float
    tensor is not read as one (it could as well be source indices or routing weights, and
    torch's ``masked_fill`` refuses it only when the hook runs, in its own words)."""
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{what} must be a bool tensor (True where a source is masked), got dtype "
            f"{mask.dtype}; for a 0/1 mask give mask == 1 (torch.tensor(mask) == 1 for a "
            "list: a list == 1 is False), for source indices select them by name or index "
            "(mask_sources(model, sources=[...]))"
        )


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
