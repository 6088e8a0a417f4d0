"""`AttnResActivationCache`: TransformerLens's ``ActivationCache``, exact or refusing in
every layout.

TransformerLens's residual-stream analyses (``decompose_resid``, ``accumulated_resid``,
``stack_head_results``, ``stack_neuron_results``, ``get_full_resid_decomposition``,
``apply_ln_to_stack``, ``logit_attrs``, ``logit_lens``) assume that the stream a norm
reads is ``hook_resid_*``, the sum of the embedding and every earlier sublayer output.
Here that holds only where the norm reads the current source directly: everywhere in
layout ``"none"``, and at the unembedding (``ln_final``) of the ``"cumulative"`` layout.
Everywhere else a router mixes several depth sources before the norm::

    norm input = sum_i w_i s_i        (w: the router's hook_weights, s_i: its sources)

and every source is a sum of components (the embedding and sublayer outputs; the layout
says which: ``RoutingLayout.components``). So the exact decomposition of the norm's
input weights each component ``c`` by ``sum_{i: c in s_i} w_i`` (per batch and position):
the **routed** decomposition. At such a read point the analyses refuse, naming the layout,
unless called with ``routed=True``; they then return (or, for ``apply_ln_to_stack`` and
``logit_attrs``, expect) router-weighted components, which sum to the norm's input, so
``apply_ln`` and direct logit attribution are exact. ``routed=True`` is accepted in every
layout (the weights are 1 where nothing routes), so code written with it runs anywhere.

A read point is a sublayer index as in ``HookedAttnRes.forward_from``: ``2 * layer``
(layer ``layer``'s attention input; TransformerLens's ``layer=layer``), ``2 * layer + 1``
(its MLP input; ``mlp_input=True``), ``2 * n_layers`` (``ln_final``; ``layer=None``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooked_attnres._precision import stat_dtype, widened
from hooked_attnres._tl import (
    ActivationCache,
    Slice,
    as_slice,
    get_act_name,
    require_slice_in_range,
    selects_positions,
    slice_input,
)
from hooked_attnres._validation import (
    is_integer,
    require_bool,
    require_bools,
    require_choice,
    require_integer,
)
from hooked_attnres.model.depth import (
    SOURCE_AXIS,
    SUBLAYER_ROUTERS,
    layer_index,
    router_hook_key,
    sublayer_index,
)
from hooked_attnres.model.norms import padding_eps, rms_scale
from hooked_attnres.model.passes import PassInput, padding_of, same_padding


def require_cached(cache, names, what: str) -> None:
    """Raise `UncachedHookError` naming the hooks of ``names`` that ``cache`` lacks (the one
    message for a cache cached with a ``names_filter`` that dropped what is needed, or
    of a pass that stopped before them; ``what`` names the reader)."""
    missing = [name for name in dict.fromkeys(names) if name not in cache]
    if missing:
        raise UncachedHookError(missing[0], what, missing)


def require_one_position_axis(model: Any, cache: Any, names, what: str) -> None:
    """Refuse a cache whose hooks ``names`` cover different numbers of positions: a cache
    of a ``logit_positions`` run (the last layer ran at one position per prompt), whose
    stacks would mix each prompt's answer position with the positions asked for
    (``pos_slice=-1`` reads the last position of the early hooks but the answer position
    of the late ones)."""
    lengths = {
        name: cache[name].shape[model.hook_dict[name].pos_dim]
        for name in names
        if name in cache and name in model.hook_dict
    }
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name}: {length}" for name, length in list(lengths.items())[-3:])
        raise ValueError(
            f"the cache's hooks cover different numbers of positions (e.g. {shown}): it comes "
            "from a logit_positions run, whose last layer ran at one position per prompt. "
            f"{what} reads every depth component at the same positions: cache a full run "
            "(model.run_with_cache(tokens), without logit_positions)"
        )


def residual_hook_names(model: Any) -> list[str]:
    """``[batch, pos, d_model]``-like hooks of every sublayer (the embedding, each layer's
    writes and residual hooks, the routers' outputs, ``ln_final``'s scale): the hooks
    whose position extents `require_one_position_axis` compares for the cache's
    residual-stream analyses."""
    names = ["hook_embed"]  # first: `_require_cached_positions` reads it alone
    for layer in range(model.cfg.n_layers):
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            names.append(get_act_name(name, layer))
    names += [site.hook("out") for site in model.sites()]
    names.append("ln_final.hook_scale")
    return names


class HookKeyError(KeyError):
    """A ``KeyError`` of one hook name, as TransformerLens's ``KeyError(name)`` of
    ``mod_dict[name]`` / ``cache_dict[name]``: ``args == (name,)`` and `key` is the name
    (``except KeyError as error: error.args[0]`` reads it), while ``str()`` and `message`
    say why and what to do (a bare ``KeyError`` prints only ``repr(name)``). The base of
    `UnknownHookError`, `UnknownCacheKeyError` and `UncachedHookError`; until audit 174 a
    hook switched off (``set_use_*``), a misspelt one or a module was refused with the
    message as ``args[0]``. The ``message`` given here is ``str()``; a subclass that writes
    its own ``__str__`` (a cache's, from its model or its reader) passes none, and its
    `message` property is that ``str()`` too (review 181)."""

    def __init__(self, name: str, message: Optional[str] = None) -> None:
        super().__init__(name)
        self._message = message

    @property
    def key(self) -> str:
        """The hook name (``args[0]``)."""
        return self.args[0]

    @property
    def message(self) -> str:
        """Why the name is refused and what to do: ``str(self)``, for every subclass (it
        was ``None`` for a cache's until review 181)."""
        return str(self)

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return repr(self.args[0]) if self._message is None else self._message

    def __reduce__(self):  # pickled with its class, its name and its message
        return type(self), (self.args[0], self._message)


class UnknownCacheKeyError(HookKeyError):
    """A cache key that names no hook of the model (a misspelt name, a hook switched off, a
    router hook the layout lacks): a `HookKeyError` of the name (``args[0]``, as
    TransformerLens's) whose message is ``check_hook_name``'s (the model's suggestions,
    "Did you mean", or the flag to switch on, or what the layout has). It is written when
    the message is read, not at the raise: difflib over every hook name took 10 to 40 ms on
    a 28-layer model, paid on every miss by code that tests membership by catching the
    ``KeyError``."""

    def __init__(self, name: str, model: Any = None, message: Optional[str] = None) -> None:
        super().__init__(name, message)
        self.model = model  # None once pickled: the message written then is kept

    def __str__(self) -> str:
        if self.model is None:
            return super().__str__()
        try:
            self.model.check_hook_name(self.args[0])
        except KeyError as unknown:
            return f"{self.args[0]!r} is not in this cache: {unknown}"
        return repr(self.args[0])  # a hook the model gained since

    def __reduce__(self):  # pickled (another process) without the model, with its message
        # and its class (a HookKeyError until review 181: `except UnknownCacheKeyError`
        # in the process that received it missed it)
        return type(self), (self.args[0], None, str(self))


class UncachedHookError(HookKeyError):
    """A hook of the model that the cache does not hold, read by an analysis or by
    indexing: a `HookKeyError` of the name (``args[0]``, as TransformerLens's bare one, which
    said neither why nor what to do; audit 159) whose message says both. ``what`` (the
    reader) and ``missing`` (every hook it lacks, ``name`` first) are given by
    `require_cached`, whose ``KeyError`` of the message said the same remedy in other words
    until review 170."""

    def __init__(
        self, name: str, what: Optional[str] = None, missing: Optional[list[str]] = None
    ) -> None:
        super().__init__(name)
        self.what = what
        self.missing = list(missing) if missing else [name]

    def __reduce__(self):  # pickled with the reader and the hooks it lacks
        return type(self), (self.args[0], self.what, self.missing)

    def __str__(self) -> str:
        from hooked_attnres.model.tl_methods import optional_hook_method

        # an optional hook, on now, may have been off in that pass (review of audit 159)
        flag = next(filter(None, map(optional_hook_method, self.missing)), None)
        off = f"model.{flag}(True) was off, " if flag else ""
        on = f" and with model.{flag}(True) on" if flag else ""
        if self.what is None:
            lacks, them = f"{self.args[0]!r} is not in this cache", ("that hook", "it")
        else:
            more = " ..." if len(self.missing) > 3 else ""
            lacks, them = f"{self.what} lacks {self.missing[:3]}{more}", ("those hooks", "them")
        return (
            f"{lacks}: the pass that made it did not cache {them[0]} ({off}a names_filter "
            f"dropped {them[1]}, or a stop_at_layer stopped before {them[1]}). Run "
            f"model.run_with_cache(tokens) without them{on}"
        )


@contextlib.contextmanager
def naming_uncached(cache_dict: dict, model: Any) -> Iterator[None]:
    """Re-raise TransformerLens's bare ``KeyError`` of a hook of ``model`` that
    ``cache_dict`` lacks, from a method run inside, as `UncachedHookError`."""
    try:
        yield
    except UncachedHookError:
        raise
    except KeyError as error:
        name = error.args[0] if len(error.args) == 1 else None
        if isinstance(name, str) and name not in cache_dict and name in model.hook_dict:
            raise UncachedHookError(name) from None
        raise


class UnfoldedNormWarning(UserWarning):
    """``apply_ln`` divides by the cached RMS only, and this model still has norm gains
    that are not folded into the matrices that read the stream."""


def _point(model: Any, layer: Optional[int], mlp_input: bool) -> int:
    """TransformerLens's ``(layer, mlp_input)`` as a read point (see the module docstring)."""
    n_layers = model.cfg.n_layers
    if layer is None or layer == -1:
        layer = n_layers
    if not is_integer(layer) or not 0 <= layer <= n_layers:
        raise ValueError(
            f"layer must be an integer in [0, {n_layers}] (or -1 / None), got {layer!r}"
        )
    layer = int(layer)
    if mlp_input and layer == n_layers:
        raise ValueError("mlp_input=True needs a layer below n_layers (the unembedding has no MLP)")
    return sublayer_index(layer, "mlp" if mlp_input else "attn")


def _tl_layer(layer: Any) -> Optional[int]:
    """A ``layer`` `_point` accepted, as TransformerLens's methods take it: a Python ``int``
    (or ``None``). A NumPy integer passed on made ``decompose_resid``'s ``assert
    isinstance(layer, int)`` fail bare (audit 159)."""
    return None if layer is None else int(layer)


def _where(model: Any, point: int) -> str:
    layer, is_mlp = divmod(point, 2)
    if layer == model.cfg.n_layers:
        return "the unembedding (ln_final)"
    return f"layer {layer}'s {'MLP' if is_mlp else 'attention'} input (ln{1 + is_mlp})"


def is_single_stream(model: Any, point: int) -> bool:
    """Whether the norm at ``point`` reads ``hook_resid_*`` (the sum of every earlier
    component) directly: layout ``"none"``, and the unembedding of layouts without a
    final router."""
    return model.routing_layout.reader(point) is None


def _shown(value) -> str:
    """A ``pos_slice`` / ``batch_slice`` argument as a message shows it (a `Slice` by
    what it holds)."""
    return repr(value.slice if isinstance(value, Slice) else value)


def _resid_name(model: Any, point: int) -> str:
    """The ``hook_resid_*`` TransformerLens reads as the stream at ``point``."""
    layer, is_mlp = divmod(point, 2)
    if layer == model.cfg.n_layers:
        return get_act_name("resid_post", layer - 1)
    return get_act_name("resid_mid" if is_mlp else "resid_pre", layer)


def state_source_names(model: Any, point: int) -> list[str]:
    """The hooks that hold, as stored, each source of the depth state read at sublayer
    ``point`` (the order of the reading router's ``hook_sources``;
    `RoutingLayout.source_hooks`): ``hook_embed``, commit hooks and ``hook_resid_*``
    (``hook_resid_*`` alone where no router reads). Unlike the router's ``hook_sources``
    (its own copy), these are what every later reader sees: an edit of one router's
    sources does not show in them."""
    layout = model.routing_layout
    if layout.reader(point) is None:
        return [_resid_name(model, point)]
    return layout.source_hooks(point)


# id(tensor) -> (weak reference to the tensor, weak reference to the cache, a `RunCacheDict`
# or an `AttnResActivationCache`, that last returned it by ``cache[name]``): how a
# TransformerLens patching hook, which holds only ``clean_cache[name]``, is traced to the
# padding its cache records (`served_padding`). A plain dict, its entry dropped when the
# tensor dies. Every ``cache[name]`` notes its tensor: torch's WeakTensorKeyDictionary made
# that lookup of the cache object 0.3 -> 4.3 us and of its dict 0.1 -> 1.4 us (medians, a
# tiny model's 141 names, one thread); this record 1.1 us and 0.5 us (review 212)
_SERVED: dict[int, tuple[weakref.ReferenceType, weakref.ReferenceType]] = {}


def _forget_served(key: int, tensor_ref: weakref.ReferenceType) -> None:
    """Drop the record of a tensor that died (its weak reference's callback); a record of
    a later tensor with the same id is kept."""
    entry = _SERVED.get(key)
    if entry is not None and entry[0] is tensor_ref:
        _SERVED.pop(key, None)


def _note_served(value: Any, cache: Any) -> Any:
    if isinstance(value, Tensor):
        key = id(value)
        owner = weakref.ref(cache)  # CPython returns the one plain reference of ``cache``
        entry = _SERVED.get(key)
        if entry is None or entry[0]() is not value:
            tensor_ref = weakref.ref(value, functools.partial(_forget_served, key))
            _SERVED[key] = (tensor_ref, owner)
        elif entry[1] is not owner:
            _SERVED[key] = (entry[0], owner)
    return value


def served_padding(tensor: Tensor) -> Optional[Bool[Tensor, "batch pos"]]:
    """The padding (``[batch, pos]``, True at real tokens; `RunCacheDict.attention_mask`)
    recorded by the cache that last returned ``tensor`` by ``cache[name]``, or ``None``
    where that cache records none or no cache returned it."""
    entry = _SERVED.get(id(tensor))
    cache = None if entry is None or entry[0]() is not tensor else entry[1]()
    record = None if cache is None else record_of(cache)
    return None if record is None else record.attention_mask


class RunCacheDict(dict):
    """The plain ``dict`` of ``run_with_cache(..., return_cache_object=False)`` and of the
    caching hooks: it records what patching must know of the pass that made it, as the
    cache object does. Build one around a dict of tensors made or loaded some other way
    to declare its pass: ``RunCacheDict(tensors, n_past=0, attention_mask=mask)`` (the
    interventions and sweeps refuse a dict that records nothing, `record_of`).

    Attributes:
        n_past: positions a key-value cache held before the pass (position 0 of every
            tensor is the sequence's position ``n_past``; 0 without one).
        attention_mask: ``[batch, pos]`` bool, True at real tokens, of a pass whose
            ``attention_mask`` marked padding (given, or made for string prompts);
            ``None`` without padding (no mask, or all ones).
        source: the `PassInput` of the last pass (its model, weights, input: token ids or
            a `DepthState`'s sources, and what its key-value cache held); ``None`` where
            not recorded.
        stale: the hooks last filled by an earlier pass that differs from the last pass
            in its ``n_past``, mask, ``pos_slice`` or `PassInput` (caching hooks kept over
            several passes, the last of which did not reach them, e.g. ``model(A)`` then
            ``model(B, stop_at_layer=1)``): their tensors are not of the recorded pass.
            Two passes over the same input (split ``names_filter`` s) leave none stale.
        stale_reason: how the last pass that made hooks `stale` differed from the one
            before (for the error message).
        sliced: the hooks cached with a ``pos_slice`` that does not keep every position
            in order: their position ``p`` is not the pass's position ``p``.
        pos_slice: the TransformerLens ``Slice`` the caching hooks cut every position
            axis with (``run_with_cache(..., pos_slice=...)``), ``None`` without one: the
            cached positions are ``pos_slice.apply(range(pos))`` of the pass's
            (`AttnResActivationCache.real_rows` cuts ``attention_mask`` with it).
        other_hooks_attached: whether a forward hook or pre-hook was attached to the
            model when the pass began, besides the caching hooks ``run_with_cache`` adds
            (TransformerLens's or raw PyTorch ones, or a global module hook: they may have
            edited activations; backward hooks do not count); set by ``run_with_cache``,
            ``None`` (unknown) for a dict filled by ``add_caching_hooks``.
    """

    n_past: int = 0
    attention_mask: Optional[Tensor] = None
    stale: frozenset = frozenset()
    sliced: frozenset = frozenset()
    other_hooks_attached: Optional[bool] = None
    pos_slice: Optional[Slice] = None
    source: Optional[PassInput] = None
    stale_reason: str = ""

    def __init__(
        self, *args: Any, n_past: int = 0, attention_mask: Optional[Tensor] = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.n_past = require_integer("n_past", n_past, 0)
        self.attention_mask = padding_of(attention_mask)

    def __getitem__(self, name: Any) -> Any:
        return _note_served(super().__getitem__(name), self)

    def copy(self) -> RunCacheDict:
        """A shallow copy that keeps the record (``dict.copy`` would drop it)."""
        out = RunCacheDict(self, n_past=self.n_past)
        out.attention_mask, out.stale = self.attention_mask, self.stale
        out.sliced, out.other_hooks_attached = self.sliced, self.other_hooks_attached
        out.pos_slice, out.source, out.stale_reason = (
            self.pos_slice,
            self.source,
            self.stale_reason,
        )
        return out

    def note_pass(
        self,
        name: str,
        n_past: int,
        mask: Optional[Tensor],
        sliced: bool = False,
        pos_slice: Optional[Slice] = None,
        source: Optional[PassInput] = None,
    ) -> None:
        """Record that the pass with ``n_past``, ``mask`` (`pass_mask`) and ``source``
        (`pass_input`) fills ``name`` now, cut by ``pos_slice`` (``sliced``: one that drops
        or reorders positions): a pass with another record than the last one's makes every
        hook it has not (yet) refilled `stale`. The sources are compared once per pass (at
        its first hook here; its later hooks bring the same object)."""
        why = None
        if n_past != self.n_past:
            why = f"a pass with n_past={n_past} after one with n_past={self.n_past}"
        elif not (mask is self.attention_mask or same_padding(mask, self.attention_mask)):
            why = "a pass with another attention mask"
        elif not _same_slice(pos_slice, self.pos_slice):
            why = "a pass with another pos_slice"
        elif source is not self.source:
            if source is None or self.source is None:
                why = "a pass after hooks filled by no recorded pass"
            else:
                why = self.source.difference(source)
        if why is not None:
            self.stale = frozenset(self)
            self.stale_reason = why
            self.n_past, self.attention_mask = n_past, mask
            self.pos_slice = pos_slice
        self.source = source  # equal to the last one if why is None: compare once per pass
        if name in self.stale:
            self.stale = self.stale - {name}
        if sliced != (name in self.sliced):
            self.sliced = self.sliced | {name} if sliced else self.sliced - {name}


KeyValueRunCacheDict = RunCacheDict  # its name before it also recorded the attention mask


@dataclass(frozen=True)
class RunRecord:
    """What a cache records of the pass that made it (see `RunCacheDict`)."""

    n_past: int
    attention_mask: Optional[Tensor]
    stale: frozenset
    sliced: frozenset = frozenset()
    pos_slice: Optional[Slice] = None  # `RunCacheDict.pos_slice`
    source: Optional[PassInput] = None  # `RunCacheDict.source`
    stale_reason: str = ""  # `RunCacheDict.stale_reason`

    @property
    def has_position_axis(self) -> bool:
        """Whether the cache's tensors keep their position axis: ``False`` for one cached
        with ``pos_slice=Slice(k)`` (an int ``Slice``, which TransformerLens applies as it
        is: ``[batch, ...]`` at that position)."""
        return self.pos_slice is None or self.pos_slice.mode != "int"

    def kept(self, real: Optional[Tensor]) -> Optional[Tensor]:
        """``real`` (the recorded padding, ``[batch, pos]``, or ``[pos]`` of one prompt;
        ``None``: none) at the positions the cache holds: cut by its ``pos_slice``
        (``[batch, kept]``; ``[batch]`` for an int ``Slice``, which drops the axis)."""
        if real is None or self.pos_slice is None:
            return real
        return self.pos_slice.apply(real, dim=-1)


def _same_slice(first: Optional[Slice], second: Optional[Slice]) -> bool:
    """Whether two ``pos_slice`` records cut the same positions (``None``: none cut)."""
    if first is None or second is None:
        return first is second
    one, other = first.slice, second.slice
    if isinstance(one, slice) or isinstance(other, slice):
        return isinstance(one, slice) and isinstance(other, slice) and one == other
    return bool(np.array_equal(np.asarray(one), np.asarray(other)))


def record_of(cache: Any) -> Optional[RunRecord]:
    """The record of the pass that made ``cache``, or ``None`` where nothing records it.

    A `RunCacheDict` records its pass; an `AttnResActivationCache` records what it was
    given (``n_past=`` / ``attention_mask=``), else what its ``cache_dict`` records; a
    TransformerLens ``ActivationCache`` what its ``cache_dict`` records. A plain ``dict``
    (``dict(cache.cache_dict)``, ``{k: v for k, v in cache.items()}``, ``torch.load``),
    or a cache object around one, records nothing."""
    if isinstance(cache, AttnResActivationCache):
        return cache._record()
    if not isinstance(cache, RunCacheDict):
        cache = getattr(cache, "cache_dict", None)
        if not isinstance(cache, RunCacheDict):
            return None
    return RunRecord(
        cache.n_past,
        cache.attention_mask,
        cache.stale,
        cache.sliced,
        cache.pos_slice,
        cache.source,
        cache.stale_reason,
    )


def require_run_positions(
    record: RunRecord, what: str, names: Iterable[str], sliced: bool = True
) -> None:
    """Refuse the hooks ``names`` of a cache (its ``record``, `record_of`) whose position
    ``p`` may not be the recorded run's position ``p``: those last filled by an earlier
    pass (`RunCacheDict.stale`), and (``sliced``) those cached with a ``pos_slice`` that
    drops or reorders positions. Their padding, in particular, cannot be told."""
    for marked, why in (
        (
            record.stale,
            "were last filled by an earlier pass than the one it records (caching hooks kept "
            "over several passes into one dict, the last of which did not reach them and "
            f"was {record.stale_reason or 'another pass'}), so they are not of the recorded "
            "pass. Cache the pass in one call (model.run_with_cache(tokens)), or clear the "
            "dict (cache_dict.clear()) before caching a pass over another input; split "
            "names_filters are taken over the same input, mask, pos_slice and weights",
        ),
        (
            record.sliced if sliced else frozenset(),
            "were cached with a pos_slice that drops or reorders positions, so their position "
            "p is not the run's position p. Cache the run without pos_slice",
        ),
    ):
        found = [name for name in dict.fromkeys(names) if name in marked]
        if found:
            raise ValueError(f"{what}: {found[:3]}{' ...' if len(found) > 3 else ''} {why}")


def _recorded(
    items: dict, record: Any, rows: Any = None, device: Any = None
) -> Union[dict, RunCacheDict]:
    """``items`` in a `RunCacheDict` with the record of ``record`` (a cache, or a
    `RunRecord`), its mask moved to ``device`` and cut to the batch rows ``rows`` (a
    TransformerLens ``Slice``); a plain ``dict`` if ``record`` records nothing."""
    if not isinstance(record, RunRecord):
        record = record_of(record)
    if record is None:
        return dict(items)
    mask = record.attention_mask
    if mask is not None and rows is not None:
        mask = rows.apply(mask, dim=0)
    if mask is not None and device is not None:
        mask = mask.to(device)
    out = RunCacheDict(items, n_past=record.n_past, attention_mask=mask)  # None: rows unpadded
    out.stale = frozenset(name for name in record.stale if name in out)
    out.sliced = frozenset(name for name in record.sliced if name in out)
    out.pos_slice = record.pos_slice
    out.source, out.stale_reason = record.source, record.stale_reason
    return out


class AttnResActivationCache(ActivationCache):
    """A TransformerLens ``ActivationCache`` (``isinstance`` holds) whose residual-stream
    analyses are exact in every layout or refuse; see the module docstring.

    Also: router hooks can be read by their ``get_act_name`` aliases
    (``cache["attn_res_weights", 3]``, see `RouterSite.alias`), `stack_activation` refuses
    router hooks whose ``n_sources`` varies (use `stack_router_activation`), and
    `routed_coefficients` / `norm_input` expose the weights of the routed decomposition.
    In a bfloat16 / float16 model the decompositions (`decompose_resid`,
    `stack_head_results`, `stack_neuron_results`, `get_full_resid_decomposition`) and
    `logit_attrs` compute in float32 and return float32 (`analysis_dtype`);
    `accumulated_resid` and `logit_lens` keep the model's dtype (its states and readout).

    It records the pass that made it (``n_past``, ``attention_mask``; `RunCacheDict`):
    what its ``cache_dict`` records (a `RunCacheDict`, as ``run_with_cache`` makes), or
    what ``n_past=`` / ``attention_mask=`` declare (for a plain dict, which records
    nothing: giving either declares the pass, the other then meaning no key-value cache
    or no padding; around a `RunCacheDict`, a declaration that contradicts its record
    raises ``ValueError``). `to`, `apply_slice_to_batch_dim` and `remove_batch_dim` keep it.
    ``has_batch_dim`` (``True`` / ``False``) and ``other_hooks_attached`` (or ``None``) are
    checked as every flag (`require_bool`, ``TypeError``; unchecked before audit 147).
    """

    model: Any  # a HookedAttnRes

    def __init__(
        self,
        cache_dict: dict,
        model: Any,
        has_batch_dim: bool = True,
        n_past: Optional[int] = None,
        attention_mask: Optional[Tensor] = None,
        other_hooks_attached: Optional[bool] = None,
    ) -> None:
        # flags checked as every other cache flag is (`require_bool`): a truthy "no" or 0
        # was kept as has_batch_dim, read by TransformerLens as a batch axis (audit 147)
        has_batch_dim = require_bool("has_batch_dim", has_batch_dim)
        other_hooks_attached = require_bool("other_hooks_attached", other_hooks_attached, True)
        super().__init__(cache_dict, model, has_batch_dim)
        # what the arguments declare (None: read the cache_dict's record, live, so that a
        # dict the caching hooks refill after this object was made is read as it is now)
        self._n_past = None if n_past is None else require_integer("n_past", n_past, 0)
        self._mask = padding_of(attention_mask)
        self._declared = n_past is not None or attention_mask is not None
        if isinstance(cache_dict, RunCacheDict):  # a declaration may not contradict a record
            if n_past is not None and self._n_past != cache_dict.n_past:
                raise ValueError(
                    f"n_past={n_past} contradicts the n_past={cache_dict.n_past} its "
                    "RunCacheDict recorded of the pass that filled it; leave n_past out"
                )
            if attention_mask is not None and not same_padding(
                attention_mask, cache_dict.attention_mask
            ):
                raise ValueError(
                    "attention_mask contradicts the padding its RunCacheDict recorded of "
                    "the pass that filled it (cache_dict.attention_mask); leave "
                    "attention_mask out"
                )
        # whether other hooks than the caching ones were attached in the cached pass
        # (`run_with_cache` records it in its RunCacheDict); None: unknown. A decomposition
        # that cannot check itself (a names_filter dropped what it needs) refuses unless
        # this is False
        if other_hooks_attached is None:
            other_hooks_attached = getattr(cache_dict, "other_hooks_attached", None)
        self.other_hooks_attached = other_hooks_attached

    def _record(self) -> Optional[RunRecord]:
        inner = self.cache_dict if isinstance(self.cache_dict, RunCacheDict) else None
        if not self._declared:
            return None if inner is None else record_of(inner)
        n_past = self._n_past if self._n_past is not None else getattr(inner, "n_past", 0)
        mask = self._mask if self._mask is not None else getattr(inner, "attention_mask", None)
        return RunRecord(
            n_past,
            mask,
            getattr(inner, "stale", frozenset()),
            getattr(inner, "sliced", frozenset()),
            getattr(inner, "pos_slice", None),
            getattr(inner, "source", None),
            getattr(inner, "stale_reason", ""),
        )

    @property
    def n_past(self) -> int:
        """Positions a key-value cache held before the cached pass: position 0 of every
        tensor here is the sequence's position ``n_past`` (0 if nothing records it)."""
        record = self._record()
        return 0 if record is None else record.n_past

    @n_past.setter
    def n_past(self, value: int) -> None:  # declares the pass (see the class docstring)
        self._n_past = require_integer("n_past", value, 0)
        self._declared = True

    @property
    def attention_mask(self) -> Optional[Bool[Tensor, "batch pos"]]:
        """``[batch, pos]`` bool (True at real tokens) of the cached pass where its
        ``attention_mask`` marked padding; ``None`` without padding (or if nothing
        records it)."""
        record = self._record()
        return None if record is None else record.attention_mask

    @attention_mask.setter
    def attention_mask(self, value: Optional[Tensor]) -> None:
        self._mask = padding_of(value)
        self._declared = True

    # --- indexing -----------------------------------------------------------------------
    def __getitem__(self, key) -> Tensor:
        return _note_served(self._item(key), self)

    def _item(self, key) -> Tensor:
        try:
            return super().__getitem__(key)
        except KeyError:
            layout = getattr(self.model, "routing_layout", None)
            if layout is None:
                raise
            if isinstance(key, str):
                name = key if key in self.cache_dict else get_act_name(key)
            else:
                key = tuple(key)
                n_layers = self.model.cfg.n_layers
                if len(key) > 1 and is_integer(key[1]):  # NumPy too; negative from the end
                    try:  # the layer rule of model.site (`layer_index`)
                        key = (key[0], layer_index(key[1], n_layers), *key[2:])
                    except ValueError:  # it named 'blocks.-95.hook_resid_pre' for -99 of 4
                        # a HookKeyError of TransformerLens's name for the key (args[0])
                        raise HookKeyError(
                            get_act_name(*key),
                            f"layer {key[1]!r} of {key!r} is not in [-{n_layers}, {n_layers}): "
                            f"the model has {n_layers} layers",
                        ) from None
                name = get_act_name(*key)
            real = layout.resolve_alias(name)
            if real is not None and real in self.cache_dict:
                return self.cache_dict[real]
            if self.model.resolve_hook_name(name) not in self.model.hook_dict:
                # a misspelt name, a hook switched off, a router hook the layout lacks:
                # check_hook_name's message, written when shown
                raise UnknownCacheKeyError(name, self.model) from None
            if name in self.model.hook_dict and name not in self.cache_dict:
                raise UncachedHookError(name) from None
            raise

    # --- TransformerLens methods that make a new cache_dict: keep the record -------------
    def apply_slice_to_batch_dim(self, batch_slice) -> AttnResActivationCache:
        """TransformerLens's, keeping the record (the same rows of the mask)."""
        batch_slice = slice_input(batch_slice, "batch_slice")  # checked, unsigned as int64
        sliced = super().apply_slice_to_batch_dim(batch_slice)  # same positions, fewer rows
        rows = None
        if self.has_batch_dim:
            rows = as_slice(batch_slice, "batch_slice")
        items = _recorded(sliced.cache_dict, self, rows=rows)
        return AttnResActivationCache(
            items, self.model, sliced.has_batch_dim, other_hooks_attached=self.other_hooks_attached
        )

    def to(self, device) -> AttnResActivationCache:
        """TransformerLens's (in place), keeping the record (the mask moves too)."""
        record = self._record()
        super().to(device)
        self.cache_dict = _recorded(self.cache_dict, record, device=device)
        if isinstance(self.cache_dict, RunCacheDict):
            self.cache_dict.other_hooks_attached = self.other_hooks_attached
        self._n_past, self._mask, self._declared = None, None, False
        return self

    # --- the routed decomposition ---------------------------------------------------------
    def _layout_name(self) -> str:
        return repr(self.model.cfg.attnres_layout)

    def _require(self, method: str, point: int, routed: bool, instead: str = "") -> None:
        """Refuse a TransformerLens analysis at a read point where a router mixes sources,
        unless ``routed=True``."""
        if routed or is_single_stream(self.model, point):
            return
        site = self.model.routing_layout.reader(point)
        n_sources = len(self.model.routing_layout.components(point))
        sources = f"{n_sources} depth source{'s' if n_sources != 1 else ''}"
        raise ValueError(
            f"cache.{method} at {_where(self.model, point)} assumes one residual stream, but "
            f"in the {self._layout_name()} layout the {site.kind} router there reads "
            f"{sources} (hook_resid_* holds only the current one), so "
            "TransformerLens's unweighted components need not sum to what the norm reads. "
            f"Pass routed=True to weight each component by the routing weights of the sources "
            f"that contain it (exact: they then sum to {site.hook('out')})"
            + (f", or use {instead}" if instead else "")
            + "."
        )

    def norm_input(self, point: int) -> Float[Tensor, "*batch_and_pos d_model"]:
        """What the norm at read point ``point`` normalises: the router's ``hook_out``, or
        ``hook_resid_*`` where no router reads."""
        site = self.model.routing_layout.reader(point)
        name = _resid_name(self.model, point) if site is None else site.hook("out")
        return self._need(name)

    def _need(self, name: str) -> Tensor:
        require_cached(self.cache_dict, [name], "this analysis's cache")
        return self.cache_dict[name]

    def _has_position_axis(self) -> bool:
        """Whether the cache's tensors keep their position axis (`RunRecord.has_position_axis`:
        ``False`` for one cached with ``pos_slice=Slice(k)``)."""
        record = self._record()
        return record is None or record.has_position_axis

    def _require_position_axis(self, method: str, pos_slice=None, name: str = "pos_slice") -> None:
        """Refuse a ``pos_slice`` (the argument ``name``) other than ``None`` on a cache
        without a position axis (cached with ``pos_slice=Slice(k)``, an int ``Slice``,
        which TransformerLens applies as it is): it would index the prompts."""
        record = self._record()
        if record is None or self._has_position_axis():
            self._require_cached_positions(pos_slice, name)
            return
        if as_slice(pos_slice, name).mode != "identity":
            cut = record.pos_slice
            assert cut is not None
            raise ValueError(
                f"cache.{method}: this cache has no position axis (it was cached with "
                f"pos_slice=Slice({cut.slice}), an int Slice, which drops it: its tensors "
                f"hold that one position of every prompt), so {name}={_shown(pos_slice)} "
                f"would index its prompts. Pass {name}=None, or cache with "
                f"pos_slice={cut.slice} (a plain int keeps a position axis of 1)"
            )

    def _require_batch_or_position_axis(self, what: str) -> None:
        """Refuse a cache without a position axis nor a batch axis (``remove_batch_dim=True``
        with an int ``Slice``: its tensors are one ``[d_model]`` vector per hook), for the
        depth stacks (``what``: ``"cache.accumulated_resid"``, ``"routing_lens"``), which
        read both axes and failed with a bare ``IndexError: tuple index out of range``."""
        record = self._record()
        if record is None or record.has_position_axis or self.has_batch_dim:
            return
        cut = record.pos_slice
        assert cut is not None
        raise ValueError(
            f"{what}: this cache has neither a batch axis (remove_batch_dim=True) nor a "
            f"position axis (pos_slice=Slice({cut.slice}), an int Slice, which drops it): its "
            f"tensors are one [d_model] vector per hook. Cache with pos_slice={cut.slice} (a "
            "plain int keeps a position axis of 1), or without remove_batch_dim"
        )

    def _require_cached_positions(self, pos_slice, name: str = "pos_slice") -> None:
        """Refuse a ``pos_slice`` (the argument ``name``) that selects a position the
        cache does not hold (`require_slice_in_range`: an int or index out of ``[-n, n)``
        of its ``n`` positions, or a bool mask of another length); torch raised a bare
        ``IndexError``. ``n`` is the position extent of the cached residual hooks
        (`residual_hook_names`; not checked for a cache without any), which for a cache
        made with a ``pos_slice`` is the number of positions it kept. Nothing is checked
        for a ``pos_slice`` that names no position (`selects_positions`) nor on a cache
        without a position axis, whose axis -2 is the batch (`_require_position_axis`
        refuses a ``pos_slice`` there); and the hooks are listed only without a cached
        ``hook_embed``, the first of them: listing them took 50 us, 4 times what
        ``get_neuron_results`` took (review 140)."""
        checked = as_slice(pos_slice, name)
        if not selects_positions(checked) or not self._has_position_axis():
            return
        cached = self.cache_dict
        first = (
            "hook_embed"
            if "hook_embed" in cached
            else next((hook for hook in residual_hook_names(self.model) if hook in cached), None)
        )
        if first is None:
            return
        n_pos = cached[first].shape[-2]  # [..., pos, d_model] (or 1)
        record = self._record()
        kept = " (those its pos_slice kept)" if record and record.pos_slice is not None else ""
        where = f"the cache holds {n_pos} positions{kept}"
        require_slice_in_range(checked, n_pos, name, where)

    def _require_full_run(self, method: str, pos_slice=None, name: str = "pos_slice") -> None:
        """Refuse a cache whose residual hooks an earlier pass than the recorded one
        filled (`RunCacheDict.stale`, `require_run_positions`: caching hooks kept over
        passes with other padding, key-value caches or ``pos_slice``, the last of which
        did not reach them; their positions and padding are not the recorded pass's),
        a cache of a ``logit_positions`` run (`require_one_position_axis`), and a
        ``pos_slice`` on a cache without a position axis (`_require_position_axis`), and a
        cache without a position axis nor a batch axis (``remove_batch_dim=True`` with an int
        ``Slice``: its tensors are one ``[d_model]`` vector per hook; the depth stacks read
        both axes, and failed with a bare ``IndexError``)."""
        record = self._record()
        names = residual_hook_names(self.model)  # listed once, read by both checks
        if record is not None:
            require_run_positions(record, f"cache.{method}", names, sliced=False)
        self._require_batch_or_position_axis(f"cache.{method}")
        self._require_position_axis(method, pos_slice, name)
        require_one_position_axis(self.model, self.cache_dict, names, f"cache.{method}")

    def _require_head_inputs(self, method: str) -> None:
        """Refuse (`require_cached`) a cache without every layer's ``hook_z`` (or
        ``hook_result``): TransformerLens computes the head results of every layer, not
        only of those a call reads, and its bare ``KeyError`` did not say why (a
        ``stop_at_layer`` run)."""
        names = [
            get_act_name("z", layer)
            for layer in range(self.model.cfg.n_layers)
            if get_act_name("result", layer) not in self.cache_dict
        ]
        require_cached(
            self.cache_dict,
            names,
            f"cache.{method} (TransformerLens computes every layer's head results)",
        )

    def compute_head_results(self) -> None:
        """TransformerLens's ``compute_head_results`` (``cache["result", l]``,
        ``[*batch_and_pos, n_heads, d_model]``, for every layer); refuses a cache without
        every layer's ``hook_z`` (`_require_head_inputs`)."""
        self._require_head_inputs("compute_head_results")
        super().compute_head_results()

    def routed_coefficients(self, point: int) -> dict[str, Union[float, Tensor]]:
        """``{component label: weight}`` of the routed decomposition at ``point``: the sum
        of the routing weights (``[*batch_and_pos]``) of the sources that contain the
        component (``"embed"``, ``"{l}_attn_out"``, ``"{l}_mlp_out"``); ``1.0`` where no
        router reads. ``sum_c weight_c * component_c`` equals `norm_input`."""
        layout = self.model.routing_layout
        sources = layout.components(point)
        site = layout.reader(point)
        if site is None:
            return {label: 1.0 for label in sources[-1]}
        weights = self._need(site.hook("weights"))
        out: dict[str, Union[float, Tensor]] = {}
        for index, source in enumerate(sources):
            for label in source:
                previous = out.get(label, 0.0)
                out[label] = weights[..., index] + previous
        return out

    def _require_decomposable(
        self,
        method: str,
        point: int,
        needs_embed: bool = False,
        head_layers: int = 0,
        neuron_layers: int = 0,
    ) -> None:
        """Refuse a cache in which the components, weighted by `routed_coefficients`, do not
        sum to the norm's input at ``point`` (to the float rounding of the cache's dtype):
        the run that made it edited a depth source, a router's copy of its sources or a
        residual hook (``patch_sources``, ``mask_sources``, a commit-hook or
        ``hook_resid_*`` edit), so no decomposition into components is exact there.

        When a ``names_filter`` dropped the hooks needed to check, the check is skipped
        for a cache of a pass with no forward hook attached but the caching ones
        (``other_hooks_attached`` False: unedited, so exact); otherwise (another was
        attached, or unknown) it refuses with ``KeyError`` naming them.
        ``needs_embed``: the method sums the embedding (TransformerLens silently leaves
        it out of a cache without ``hook_embed``), so a cache without it refuses.
        ``head_layers`` / ``neuron_layers``: the method reads the per-head / per-neuron
        results of the layers below these (`_require_unit_results`)."""
        self._require_unit_results(method, head_layers, neuron_layers)
        if needs_embed:
            require_cached(
                self.cache_dict, ["hook_embed"], f"this cache (cache.{method} sums the embedding)"
            )
        coefficients = self.routed_coefficients(point)
        names = {label: _component_name(label) for label in coefficients}
        site = self.model.routing_layout.reader(point)
        target_name = _resid_name(self.model, point) if site is None else site.hook("out")
        if target_name not in self.cache_dict or any(
            name not in self.cache_dict for name in names.values()
        ):
            if self.other_hooks_attached is False:
                return
            require_cached(
                self.cache_dict,
                [target_name, *names.values()],
                f"cache.{method} at {_where(self.model, point)} (other hooks than the "
                "caching ones were attached to the model in the pass that made this cache, "
                "or it does not record that, so they may have edited the stream; checking "
                "that the components sum to what the norm reads needs every component and "
                "the norm's input)",
            )
        target = self.cache_dict[target_name]
        dtype = stat_dtype(target.dtype)
        total = torch.zeros(target.shape, dtype=dtype, device=target.device)
        for label, coefficient in coefficients.items():
            component = self.cache_dict[names[label]].to(dtype)
            if isinstance(coefficient, Tensor):
                coefficient = coefficient.to(dtype)[..., None]
            total += coefficient * component
        error, size = self._sum_error(total, target.to(dtype))
        tolerance = _decomposition_rtol(target.dtype, len(coefficients)) * max(size, 1e-30)
        if not error <= tolerance:  # a nan error is refused (`_sum_error`)
            raise ValueError(
                f"cache.{method}: at {_where(self.model, point)} the cached components "
                "(hook_embed, attn_out, mlp_out) weighted by the routing weights do not sum "
                f"to what the norm reads ({target_name}): max error {error:.3g}, max |input| "
                f"{size:.3g}{_nan_note(error)}. The run that made this cache edited a depth "
                "source, a router's "
                "copy of its sources (patch_sources / mask_sources) or a residual hook, so no "
                "decomposition into components is exact there. Decompose a cache of an "
                "unedited run, or read the router's hook_sources and hook_weights directly."
            )

    def _require_norm_output(
        self, method: str, point: int, recompute: bool = False, if_cached: bool = False
    ) -> None:
        """Refuse a cache whose norm at ``point`` did not output what ``method`` (the
        caller's name, e.g. ``"cache.logit_attrs"``) stands for it to output: its input
        divided by its cached RMS (``hook_normalized`` against `norm_input` over
        ``hook_scale``, at the real tokens, to the rounding of the cache's dtype). The run
        edited ``hook_normalized``, so the sublayer (or the unembedding) read another
        vector than the one ``apply_ln`` / ``logit_attrs`` divide a stack by the cached RMS
        to stand for, and their entries do not sum to it (``logit_attrs``: not to the run's
        logit differences). An edit of ``hook_scale``, which the norm divides by, passes.

        ``recompute``: for an analysis that applies the norm itself, its RMS recomputed
        from the cached input (the routing lens, ``accumulated_resid(apply_ln=True)`` and
        ``logit_lens`` at the unembedding): the output must then be the input over its own
        RMS, so an edit of ``hook_scale`` is refused too (the readout of the norm's input
        would not be what the run read after the norm: at ``ln_final``, not its logits).

        A nan in both the output and the input over the RMS (an input that is not finite:
        ``inf / inf``, as in the run) counts as agreeing; a nan only in the output is refused.

        A cache without the hooks compared (input, ``hook_normalized`` and, unless
        ``recompute``, ``hook_scale``) is refused as in `_require_decomposable`
        (``KeyError``) unless no forward hook but the caching ones was attached to its
        pass, or ``if_cached`` (then only a cache that holds them is checked)."""
        norm = self.model.norm_at(point)
        normalized_name, scale_name = norm.hook_normalized.name, norm.hook_scale.name
        site = self.model.routing_layout.reader(point)
        input_name = _resid_name(self.model, point) if site is None else site.hook("out")
        names = [input_name, normalized_name] + ([] if recompute else [scale_name])
        if any(name not in self.cache_dict for name in names):
            if not recompute:  # divided by (TransformerLens: an IndexError at ln_final)
                require_cached(
                    self.cache_dict, [scale_name], f"{method} (it divides by the cached RMS)"
                )
            if if_cached or self.other_hooks_attached is False:
                return
            require_cached(
                self.cache_dict,
                names,
                f"{method} at {_where(self.model, point)} (other hooks than the caching "
                "ones were attached to the model in the pass that made this cache, or it "
                "does not record that, so they may have edited the norm's output; checking "
                f"that it is the norm's input over {'its' if recompute else 'the cached'} "
                f"RMS needs {'both' if recompute else 'all three'})",
            )
        normalized = self.cache_dict[normalized_name]
        dtype = stat_dtype(normalized.dtype)
        with torch.no_grad():
            read = self.cache_dict[input_name].to(dtype)
            if recompute:  # with eps = 0 an all-zero row (padding) is 0, as the run made it,
                # whether or not the cache records its padding (the readout's 0 / 0 there is
                # nan, visibly; not a reason to refuse its other rows)
                scale = rms_scale(read, padding_eps(norm.eps, read, self.real_rows()))
                expected = read / scale.masked_fill(scale == 0, 1)
            else:
                expected = read / self.cache_dict[scale_name].to(dtype)
            output = normalized.to(dtype)
            error, size = self._sum_error(expected, output)
            if math.isnan(error):  # a row whose input is not finite (a float16 overflow) is
                # nan after the norm in the run as here (inf / inf): what the run read, not an
                # edit (an edit's nan where the input is finite is still refused)
                both = expected.isnan() & output.isnan()
                error, size = self._sum_error(
                    expected.masked_fill(both, 0), output.masked_fill(both, 0)
                )
        if error <= _decomposition_rtol(normalized.dtype, 1) * max(size, 1e-30):
            return
        head = (
            f"{method}: at {_where(self.model, point)} the norm's output ({normalized_name}) "
            f"is not its input ({input_name}) divided by "
        )
        numbers = f": max error {error:.3g}, max |output| {size:.3g}{_nan_note(error)}. "
        if recompute:
            raise ValueError(
                f"{head}its RMS{numbers}The run that made this cache edited "
                f"{normalized_name} or {scale_name} (for a lens of token ids: a hook attached "
                f"to the model during its pass), but {method} applies the norm to the cached "
                "stream itself, recomputing the RMS, so its entry for the norm's input is not "
                "what the run read after the norm"
                + (" (not the run's logits)" if point == 2 * self.model.cfg.n_layers else "")
                + f". An edit of the norm changes nothing it reads: run {method} on a run "
                "without that edit (the same stream, only the entry for the norm's input is "
                f"the unedited readout), and read what the edited norm output from the "
                f"edited run itself ({normalized_name}, its logits)."
            )
        raise ValueError(
            f"{head}its cached RMS ({scale_name}){numbers}The run that made this cache "
            f"edited {normalized_name}, so a stack divided by the cached RMS (apply_ln, "
            "logit_attrs) does not sum to what was read after the norm (logit_attrs: not to "
            "the run's logit differences). Analyse a cache of a run without that edit (an "
            "edit of hook_scale, which the norm divides by, is exact), or read the edited "
            "output directly."
        )

    def _require_unit_results(self, method: str, head_layers: int, neuron_layers: int) -> None:
        """Refuse a cache whose per-head results (what TransformerLens's head stacks read:
        ``hook_result``, else ``hook_z @ W_O``) of a layer below ``head_layers``, or
        per-neuron results (``hook_post * W_out``) of a layer below ``neuron_layers``, do
        not sum to that layer's ``hook_attn_out`` / ``hook_mlp_out`` (to the rounding of
        the cache's dtype): the run edited the sublayer's output after its heads or
        neurons (``hook_attn_out`` / ``hook_mlp_out``, e.g. a zero ablation), or
        ``W_O`` / ``W_out`` changed since, so the heads or neurons are not what the layer
        wrote. `_require_decomposable`'s sum reads the sublayer outputs and does not see
        this. A cache without a sublayer output is refused as there (``KeyError``) unless
        no forward hook but the caching ones was attached to its pass."""
        checks = [("attn_out", layer) for layer in range(head_layers)]
        checks += [("mlp_out", layer) for layer in range(neuron_layers)]
        with torch.no_grad():
            for kind, layer in checks:
                self._require_unit_result(method, kind, layer)

    def _require_unit_result(self, method: str, kind: str, layer: int) -> None:
        """`_require_unit_results` for one layer's ``kind`` (``"attn_out"`` / ``"mlp_out"``)."""
        out_name = get_act_name(kind, layer)
        if kind == "attn_out":
            source = get_act_name("result", layer)
            result = self.cache_dict.get(source)
            if result is None or result.ndim != 3 + self.has_batch_dim:
                source = get_act_name("z", layer)  # TransformerLens computes hook_result
        else:
            source = get_act_name("post", layer)
        if source not in self.cache_dict:
            return  # TransformerLens's stack raises KeyError naming it
        if out_name not in self.cache_dict:
            if self.other_hooks_attached is False:
                return
            require_cached(
                self.cache_dict,
                [out_name],
                f"cache.{method} (other hooks than the caching ones were attached to the "
                "model in the pass that made this cache, or it does not record that; "
                "checking that the per-head / per-neuron results sum to each sublayer's "
                "output needs that output)",
            )
        out = self.cache_dict[out_name]
        dtype = stat_dtype(out.dtype)
        unit = self.cache_dict[source].to(dtype)
        if source.endswith("hook_result"):
            total, count, how = unit.sum(-2), unit.shape[-2], "hook_result"
        elif kind == "attn_out":
            weight = self.model.blocks[layer].attn.W_O
            total = unit.flatten(-2) @ weight.flatten(0, 1).to(unit.device, dtype)
            count, how = weight.shape[0], "hook_z @ W_O"
        else:
            weight = self.model.blocks[layer].mlp.W_out
            total = unit @ weight.to(unit.device, dtype)
            count, how = weight.shape[0], "hook_post * W_out"
        error, size = self._sum_error(total, out.to(dtype))
        if not error <= _decomposition_rtol(out.dtype, count) * max(size, 1e-30):
            what = "per-head results" if kind == "attn_out" else "per-neuron results"
            edit = "hook_z / hook_result" if kind == "attn_out" else "hook_post"
            raise ValueError(
                f"cache.{method}: layer {layer}'s {what} ({how}) do not sum to its "
                f"{out_name} (max error {error:.3g}, max |output| {size:.3g}"
                f"{_nan_note(error)}): the run that "
                f"made this cache edited {out_name} after them (or the model's weights "
                "changed since), so they are not what the layer wrote. Use "
                "cache.decompose_resid (whole sublayer outputs; exact), or edit "
                f"{edit} instead of the sublayer output."
            )

    def real_rows(self) -> Optional[Bool[Tensor, "*batch_and_pos"]]:
        """The recorded padding (`attention_mask`, True at real tokens) laid out as this
        cache's ``[*batch_and_pos]`` axes: ``[batch, pos]``, or ``[pos]`` for a cache
        without a batch axis (its one prompt's row), at the positions it holds (those a
        ``run_with_cache(..., pos_slice=...)`` kept: ``[batch, kept]``, ``[batch]`` for
        an int); ``None`` without padding."""
        real = self.attention_mask
        if real is None:
            return None
        if not self.has_batch_dim and real.ndim == 2 and real.shape[0] == 1:
            real = real[0]
        record = self._record()
        return real if record is None else record.kept(real)

    def _stack_padding(
        self, stack: Tensor, pos_slice=None, batch_slice=None, has_batch_dim: bool = True
    ) -> Optional[Bool[Tensor, "*batch_and_pos"]]:
        """`real_rows` as the rows of ``stack`` (``[n, *batch_and_pos, d_model]``, cut by
        ``pos_slice`` and ``batch_slice``), for a norm applied to it (`norms.padding_eps`);
        ``None`` without padding or where the stack's rows cannot be told (a stack without
        a batch axis, ``has_batch_dim=False``, whose prompt ``batch_slice`` does not name
        in a batch of several)."""
        real = self.real_rows()
        if real is None:
            return None
        if self.has_batch_dim:
            # an int drops the batch axis
            real = as_slice(batch_slice, "batch_slice").apply(real, dim=0)
            if not has_batch_dim and real.ndim == 2:  # the stack has no batch axis
                if real.shape[0] != 1:
                    return None
                real = real[0]
        real = as_slice(pos_slice, "pos_slice").apply(real, dim=-1)
        return real if tuple(stack.shape[1:-1]) == tuple(real.shape) else None

    def _require_stack_fits(
        self,
        method: str,
        residual_stack: Tensor,
        point: int,
        pos_slice,
        batch_slice,
        has_batch_dim: bool,
    ) -> None:
        """Refuse a ``[n_components, *batch_and_pos, d_model]`` stack whose batch and
        position axes are not those of the cached RMS at ``point`` cut by this call's
        ``pos_slice`` / ``batch_slice``, which TransformerLens divides it by: the two
        broadcast whenever the shapes allow, and each entry was divided by the RMS of
        another position (a stack made without ``pos_slice`` read with ``pos_slice=-1``:
        every position by the last one's; with as many prompts as positions, position
        ``p`` by prompt ``p``'s). A stack without a batch axis (``has_batch_dim=False``)
        on a cache of one prompt fits the RMS's batch axis of 1."""
        name = self.model.norm_at(point).hook_scale.name
        if name not in self.cache_dict:
            return  # TransformerLens raises its KeyError naming the hook
        rows = as_slice(batch_slice, "batch_slice")
        scale = as_slice(pos_slice, "pos_slice").apply(self.cache_dict[name], dim=-2)
        if self.has_batch_dim:
            scale = rows.apply(scale)
        stack = rows.apply(residual_stack, dim=1) if has_batch_dim else residual_stack
        fits, axes = tuple(scale.shape[:-1]), tuple(stack.shape[1:-1])
        # a stack without a batch axis against the RMS of the one prompt it keeps
        batchless = not has_batch_dim and self.has_batch_dim and rows.mode != "int"
        if axes == fits or (batchless and fits == (1, *axes)):
            return
        args = f"pos_slice={_shown(pos_slice)}, batch_slice={_shown(batch_slice)}"
        fix = (
            "A stack without a batch axis (has_batch_dim=False) is one prompt's: pass its "
            "index as an int batch_slice (e.g. batch_slice=0)."
            if batchless
            else "Pass the same pos_slice to the call that made the stack (e.g. "
            "cache.decompose_resid(pos_slice=-1)) and to this one."
        )
        raise ValueError(
            f"cache.{method}: the residual stack's batch and position axes are {axes} "
            f"(stack shape {tuple(residual_stack.shape)}), but the cached RMS it is "
            f"divided by ({name}) with {args} covers {fits}: the stack was made with "
            "another pos_slice (or batch slice) than this call, and the two would "
            f"broadcast, dividing entries by the RMS of other positions. {fix}"
        )

    def _require_tokens_fit(
        self, residual_stack: Tensor, tokens, pos_slice, batch_slice, has_batch_dim: bool
    ) -> None:
        """Refuse answer ``tokens`` of `logit_attrs` whose axes, aligned with the stack's
        batch and position axes from the right as TransformerLens aligns them, are not
        each 1 or the stack's (at most one more leading axis, of size 1), except
        ``[batch]`` tokens of the stack's rows, which TransformerLens reads at every
        position of each row: the whole batch's answers with a ``batch_slice`` widened
        the result, or, with as many answers as positions, kept its shape and dotted
        position ``p`` with prompt ``p``'s answer. So ``[pos]`` tokens, one per position
        for every row (TransformerLens's documented form for a 1-D tensor of another length
        than the stack's rows), are taken unless their length is the cache's batch: then
        they may be the whole batch's answers, which TransformerLens would dot along the
        positions; ``[1, pos]`` says per position unambiguously."""
        rows = as_slice(batch_slice, "batch_slice")
        stack = rows.apply(residual_stack, dim=1) if has_batch_dim else residual_stack
        axes = tuple(stack.shape[1:-1])
        shape = tuple(tokens.shape)
        if len(shape) == 1 and len(axes) == 2 and has_batch_dim and rows.mode != "int":
            if shape[0] == axes[0]:
                return  # [batch]: TransformerLens reads them at every position of each row
        extra = max(len(shape) - len(axes), 0)
        inner = shape[extra:]
        aligned = zip(inner, axes[len(axes) - len(inner) :], strict=True)
        fits = (
            extra <= 1  # a leading axis of 1 against the components'
            and all(size == 1 for size in shape[:extra])
            and all(size in (1, axis) for size, axis in aligned)
        )
        # a [pos] vector read along the positions, of the batch's length: it may be the
        # whole batch's answers (without ln_final's scale TransformerLens raises its
        # KeyError naming the hook)
        scale = self.cache_dict.get(self.model.norm_at(2 * self.model.cfg.n_layers).hook_scale.name)
        batch = scale.shape[0] if self.has_batch_dim and scale is not None else 1
        along_positions = (
            as_slice(pos_slice, "pos_slice").mode != "int"
            and self._has_position_axis()
            and len(shape) == 1
            and len(axes) > 0
        )
        if fits and not (along_positions and 1 < shape[0] == batch):
            return
        held = axes[0] if len(axes) == 2 and has_batch_dim and rows.mode != "int" else 1
        why = (
            f"TransformerLens would read them along the positions, one answer per position, "
            f"but their length is the cache's batch ({batch}), not the {held} row(s) the "
            "stack holds: they may be the whole batch's answers, whose position p would be "
            "dotted with prompt p's answer"
            if fits
            else "TransformerLens broadcasts them from the last axis, dotting the stack's "
            "components with the answers of other rows or positions"
        )
        raise ValueError(
            f"cache.logit_attrs: tokens of shape {shape} do not fit the stack's batch and "
            f"position axes {axes} (after batch_slice={_shown(batch_slice)}): {why}. Pass "
            "one token, [batch] tokens of the rows the stack holds (e.g. tokens[rows] with "
            "batch_slice=rows), [batch, pos] tokens of its rows and positions, or [1, pos] "
            "tokens (tokens[None]), one answer per position for every row it holds."
        )

    def _token_tensor(self, tokens: Any, name: str) -> Tensor:
        """``tokens`` / ``incorrect_tokens`` of `logit_attrs` as the tensor of token ids
        they hold: a string of one token (``to_single_token``, as TransformerLens), a token
        id (an int or NumPy integer), a list, tuple, array or tensor of ids. TransformerLens
        4.3 read a list's ``.shape`` in its shape check (``AttributeError`` with
        ``incorrect_tokens``)."""
        if isinstance(tokens, str):
            tokens = self.model.to_single_token(tokens)
        try:
            return torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"cache.logit_attrs: {name} must be a string of one token, a token id, or a "
                f"list, array or tensor of token ids, got {tokens!r}; for several strings "
                "pass [model.to_single_token(s) for s in strings]"
            ) from error

    def _sum_error(self, total: Tensor, target: Tensor) -> tuple[float, float]:
        """``(max |total - target|, max |target|)`` of a sum check, over the real tokens of
        the cached pass where it recorded padding (`attention_mask`; ``total`` and
        ``target``: ``[batch, pos, ...]``, or ``[pos, ...]`` without a batch axis). A padding
        position's entries can be nan (a hook's edit; with ``eps = 0`` they were ``0 / 0``
        before `padding_eps`, docs/hooks.md) and reach no real position; they made the max
        error nan, and ``nan > tolerance`` is False: every check passed, so an edited run's
        cache was decomposed silently. A nan
        left (at a real position, or padding the cache does not record) is refused by the
        caller's ``not error <= tolerance``."""
        real = self.real_rows()
        if real is not None:
            if tuple(target.shape[: real.ndim]) == tuple(real.shape):
                real = real.to(target.device)
                total, target = total[real], target[real]
        if not target.numel():
            return 0.0, 0.0
        return float((total - target).abs().max()), float(target.abs().max())

    def _view(self, point: int, remainder: bool = False) -> ActivationCache:
        """The cache TransformerLens's own methods run on for a decomposition at ``point``:
        this cache where the norm reads ``hook_resid_*`` in a float32 / float64 model;
        else a plain ``ActivationCache`` on its tensors in which every component is weighted
        by `routed_coefficients` at ``point`` and the stream TransformerLens reads there is
        the norm's input (where a router reads: TransformerLens's methods on it give the
        routed decomposition), and in a bfloat16 / float16 model every tensor is widened
        to `analysis_dtype` (exact) before it is weighted, with the weights the methods
        multiply it by widened too (`_wide_model`): their sums, weightings and products
        are float32, as are the stacks they return. ``remainder``: the caller reads
        TransformerLens's remainder (which at layer 0 is the stream there, not the last
        layer's output TransformerLens reads)."""
        dtype = analysis_dtype(self.model)
        single = is_single_stream(self.model, point)
        whole_model = remainder and point == 0  # what TL reads there: `_stream_names`
        if single and dtype is None and not whole_model:
            return self
        weighted: dict[str, Union[float, Tensor]] = {}
        replaced: dict[str, Tensor] = {}
        if not single:
            coefficients = self.routed_coefficients(point)
            if "embed" in coefficients:
                weighted["hook_embed"] = coefficients["embed"]
            for layer in range(self.model.cfg.n_layers):
                for names, label in (
                    (("attn_out", "z", "result"), f"{layer}_attn_out"),
                    (("mlp_out", "post"), f"{layer}_mlp_out"),
                ):
                    for name in names:
                        weighted[get_act_name(name, layer)] = coefficients.get(label, 0.0)
        if not single or whole_model:
            norm_input = self.norm_input(point)
            replaced = {name: norm_input for name in _stream_names(self.model, point)}
        model = self.model if dtype is None else _wide_model(self.model, dtype)
        return ActivationCache(
            _WeightedDict(self.cache_dict, weighted, replaced, dtype), model, self.has_batch_dim
        )

    # --- TransformerLens analyses, exact or refusing -----------------------------------
    def decompose_resid(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice=None,
        incl_embeds: bool = True,
        return_labels: bool = False,
        routed: bool = False,
    ):
        """TransformerLens's ``decompose_resid`` (same arguments and labels,
        ``[n_components, *batch_and_pos, d_model]``); at a routed read point it needs
        ``routed=True`` and returns router-weighted components that sum to the norm's
        input (module docstring). Where nothing is selected (layer 0 with
        ``incl_embeds=False``) the stack is empty (``n_components = 0``)."""
        # flags read by truthiness took "no" for True
        (mlp_input, apply_ln, incl_embeds, return_labels, routed) = require_bools(
            mlp_input=mlp_input,
            apply_ln=apply_ln,
            incl_embeds=incl_embeds,
            return_labels=return_labels,
            routed=routed,
        )
        pos_slice = slice_input(pos_slice, "pos_slice")  # checked, unsigned as int64
        self._require_full_run("decompose_resid", pos_slice)
        point = _point(self.model, layer, mlp_input)
        layer = _tl_layer(layer)
        self._require("decompose_resid", point, routed)
        self._require_decomposable("decompose_resid", point, needs_embed=incl_embeds)
        self._warn_unfolded(point, apply_ln)
        if apply_ln:
            self._require_norm_output("cache.decompose_resid", point)
        n_outputs = (point // 2) * ((mode != "mlp") + (mode != "attn")) + (
            point % 2 == 1 and mode != "mlp"
        )
        if not incl_embeds and n_outputs == 0:  # TransformerLens's torch.stack([]) raises
            like = as_slice(pos_slice, "pos_slice").apply(self.norm_input(point), dim=-2)
            dtype = analysis_dtype(self.model) or like.dtype
            empty = like.new_zeros((0, *like.shape), dtype=dtype)
            return (empty, []) if return_labels else empty
        cache = self._view(point)
        with naming_uncached(self.cache_dict, self.model):
            return ActivationCache.decompose_resid(
                cache, layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels
            )

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice=None,
        apply_ln: bool = False,
        routed: bool = False,
    ):
        """TransformerLens's ``stack_head_results`` (``[layer * n_heads, *batch_and_pos,
        d_model]``, labels ``L{l}H{h}``); at a routed read point (the attention input of
        ``layer``, or the unembedding) it needs ``routed=True`` and weights each head by
        its layer's routed coefficient. Raw per-head outputs: ``cache.compute_head_results()``
        then ``cache["result", l]``. Refuses a cache whose heads do not sum to
        ``hook_attn_out`` (an edited sublayer output; `_require_unit_results`)."""
        # flags read by truthiness took "no" for True
        (return_labels, incl_remainder, apply_ln, routed) = require_bools(
            return_labels=return_labels,
            incl_remainder=incl_remainder,
            apply_ln=apply_ln,
            routed=routed,
        )
        pos_slice = slice_input(pos_slice, "pos_slice")  # checked, unsigned as int64
        self._require_full_run("stack_head_results", pos_slice)
        point = _point(self.model, layer, False)
        tl_layer = point // 2  # an int, as TransformerLens takes it (-1 / None: n_layers)
        self._require(
            "stack_head_results", point, routed, 'cache["result", l] for raw per-head outputs'
        )
        self._require_decomposable("stack_head_results", point, head_layers=point // 2)
        self._require_head_inputs("stack_head_results")
        self._warn_unfolded(point, apply_ln)
        if apply_ln:
            self._require_norm_output("cache.stack_head_results", point)
        cache = self._view(point, remainder=incl_remainder)
        with naming_uncached(self.cache_dict, self.model):
            return ActivationCache.stack_head_results(
                cache, tl_layer, return_labels, incl_remainder, pos_slice, apply_ln
            )

    def stack_neuron_results(
        self,
        layer: int,
        pos_slice=None,
        neuron_slice=None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: Optional[Tensor] = None,
        mlp_input: bool = False,
        routed: bool = False,
    ):
        """TransformerLens's ``stack_neuron_results``; at a routed read point it needs
        ``routed=True`` and weights each neuron by its layer's routed coefficient. Refuses
        a cache whose neurons do not sum to ``hook_mlp_out`` (`_require_unit_results`)."""
        # flags read by truthiness took "no" for True
        (return_labels, incl_remainder, apply_ln, mlp_input, routed) = require_bools(
            return_labels=return_labels,
            incl_remainder=incl_remainder,
            apply_ln=apply_ln,
            mlp_input=mlp_input,
            routed=routed,
        )
        pos_slice = slice_input(pos_slice, "pos_slice")  # checked, unsigned as int64
        neuron_slice = slice_input(neuron_slice, "neuron_slice")
        self._require_full_run("stack_neuron_results", pos_slice)
        point = _point(self.model, layer, mlp_input)
        tl_layer = point // 2  # an int, as TransformerLens takes it (-1 / None: n_layers)
        self._require(
            "stack_neuron_results", point, routed, "cache.get_neuron_results(l) for raw outputs"
        )
        self._require_decomposable("stack_neuron_results", point, neuron_layers=point // 2)
        self._warn_unfolded(point, apply_ln)
        if apply_ln:
            self._require_norm_output("cache.stack_neuron_results", point)
        cache = self._view(point, remainder=incl_remainder)
        project_output_onto = _widened(project_output_onto, analysis_dtype(self.model))
        with naming_uncached(self.cache_dict, self.model):
            return ActivationCache.stack_neuron_results(
                cache,
                tl_layer,
                pos_slice,
                neuron_slice,
                return_labels,
                incl_remainder,
                apply_ln,
                project_output_onto,
                mlp_input,
            )

    def get_full_resid_decomposition(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice=None,
        return_labels: bool = False,
        project_output_onto: Optional[Tensor] = None,
        routed: bool = False,
    ):
        """TransformerLens's ``get_full_resid_decomposition`` (heads, neurons or MLPs,
        ``embed``, ``bias``); at a routed read point it needs ``routed=True`` and returns
        router-weighted components summing to the norm's input. Refuses a cache whose heads
        (or, with ``expand_neurons``, neurons) do not sum to the sublayer outputs
        (`_require_unit_results`)."""
        # flags read by truthiness took "no" for True
        (mlp_input, expand_neurons, apply_ln, return_labels, routed) = require_bools(
            mlp_input=mlp_input,
            expand_neurons=expand_neurons,
            apply_ln=apply_ln,
            return_labels=return_labels,
            routed=routed,
        )
        pos_slice = slice_input(pos_slice, "pos_slice")  # checked, unsigned as int64
        self._require_full_run("get_full_resid_decomposition", pos_slice)
        point = _point(self.model, layer, mlp_input)
        layer = _tl_layer(layer)
        self._require("get_full_resid_decomposition", point, routed)
        self._require_decomposable(
            "get_full_resid_decomposition",
            point,
            needs_embed=True,
            head_layers=(point + 1) // 2,
            neuron_layers=point // 2 if expand_neurons else 0,
        )
        self._require_head_inputs("get_full_resid_decomposition")
        self._warn_unfolded(point, apply_ln)
        if apply_ln:
            self._require_norm_output("cache.get_full_resid_decomposition", point)
        cache = self._view(point)
        project_output_onto = _widened(project_output_onto, analysis_dtype(self.model))
        with naming_uncached(self.cache_dict, self.model):
            return ActivationCache.get_full_resid_decomposition(
                cache,
                layer,
                mlp_input,
                expand_neurons,
                apply_ln,
                pos_slice,
                return_labels,
                project_output_onto,
            )

    def apply_ln_to_stack(
        self,
        residual_stack: Tensor,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        pos_slice=None,
        batch_slice=None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
        routed: bool = False,
    ) -> Tensor:
        """TransformerLens's ``apply_ln_to_stack``: divide by the cached RMS of the norm at
        ``(layer, mlp_input)`` (the gain is not applied; `process_weights` folds it).

        At a routed read point the cached RMS is that of the router's mixture, so the
        stack must decompose the mixture: pass ``routed=True`` to confirm that it does
        (what the ``routed=True`` producers return). ``recompute_ln=True`` at the
        unembedding applies ``ln_final`` itself to every entry (without firing its hooks:
        the result depends on the cache and the weights only, as the routing lens's) and
        is allowed anywhere, except on a cache that holds ``ln_final``'s hooks and shows
        that its run edited them (TransformerLens's ``logit_lens`` tool reads the stream
        through here: its last entry would not be the run's logits); with ``eps = 0`` it
        takes the run's padding (`real_rows`), so an all-zero padding row (a padding
        query's attention output) is finite, as in the run, not ``0 / 0``."""
        # flags read by truthiness took "no" for True
        (mlp_input, has_batch_dim, recompute_ln, routed) = require_bools(
            mlp_input=mlp_input,
            has_batch_dim=has_batch_dim,
            recompute_ln=recompute_ln,
            routed=routed,
        )
        pos_slice = slice_input(pos_slice, "pos_slice")  # checked, unsigned as int64
        self._require_full_run("apply_ln_to_stack", pos_slice)
        batch_slice = slice_input(batch_slice, "batch_slice")
        point = _point(self.model, layer, mlp_input)
        layer = _tl_layer(layer)
        if recompute_ln and point == 2 * self.model.cfg.n_layers:
            batch_slice = as_slice(batch_slice, "batch_slice")
            if has_batch_dim:  # as TransformerLens: the stack is cut to the batch slice
                residual_stack = batch_slice.apply(residual_stack, dim=1)
            # the run's padding: with eps 0 an all-zero padding row (a padding query's zero
            # attention output) is finite, as in the run, where it was 0 / 0
            real = self._stack_padding(residual_stack, pos_slice, batch_slice, has_batch_dim)
            # TransformerLens's logit_lens tool reads the accumulated stream through here:
            # its last entry stands for the run's logits, so a cache that shows an edit of
            # ln_final is refused (one that does not hold its hooks cannot show it)
            self._require_norm_output("cache.apply_ln_to_stack", point, True, if_cached=True)
            return self.model.ln_final.unhooked(residual_stack, real)
        self._require("apply_ln_to_stack", point, routed)
        self._require_stack_fits(
            "apply_ln_to_stack", residual_stack, point, pos_slice, batch_slice, has_batch_dim
        )
        self._warn_unfolded(point, True)
        self._require_norm_output("cache.apply_ln_to_stack", point)
        with naming_uncached(self.cache_dict, self.model):
            return ActivationCache.apply_ln_to_stack(
                self._plain(),
                residual_stack,
                layer,
                mlp_input,
                pos_slice,
                batch_slice,
                has_batch_dim,
                recompute_ln,
            )

    def logit_attrs(
        self,
        residual_stack: Tensor,
        tokens,
        incorrect_tokens=None,
        pos_slice=None,
        batch_slice=None,
        has_batch_dim: bool = True,
        routed: bool = False,
    ) -> Tensor:
        """TransformerLens's ``logit_attrs`` (exact: the ``ln_final`` gain is folded into
        the token directions). In layouts with a final router the stack must be a routed
        decomposition of the final router's output: pass ``routed=True`` (and build the
        stack with ``routed=True``).

        ``tokens`` / ``incorrect_tokens``: a string of one token or a token id; ``[rows]``
        (one answer per prompt the stack holds, at each of its positions); ``[pos]`` (one
        per position, for every row) unless of the cache's batch's length (then
        ``[1, pos]``); ``[rows, pos]``. Lists, tuples and arrays of ids are read as tensors.
        Returns ``[n_components, *batch_and_pos]``."""
        # flags read by truthiness took "no" for True
        has_batch_dim, routed = require_bools(has_batch_dim=has_batch_dim, routed=routed)
        pos_slice = slice_input(pos_slice, "pos_slice")  # checked, unsigned as int64
        self._require_full_run("logit_attrs", pos_slice)
        batch_slice = slice_input(batch_slice, "batch_slice")
        point = 2 * self.model.cfg.n_layers
        self._require("logit_attrs", point, routed)
        self._require_decomposable("logit_attrs", point)
        self._require_norm_output("cache.logit_attrs", point)
        self._require_stack_fits(
            "logit_attrs", residual_stack, point, pos_slice, batch_slice, has_batch_dim
        )
        tokens = self._token_tensor(tokens, "tokens")
        if incorrect_tokens is not None:
            incorrect_tokens = self._token_tensor(incorrect_tokens, "incorrect_tokens")
        self._require_tokens_fit(residual_stack, tokens, pos_slice, batch_slice, has_batch_dim)
        with naming_uncached(self.cache_dict, self.model):
            return ActivationCache.logit_attrs(
                self._plain(wide=True),
                residual_stack,
                tokens,
                incorrect_tokens,
                pos_slice,
                batch_slice,
                has_batch_dim,
            )

    def accumulated_resid(
        self,
        layer: Optional[int] = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice=None,
        mlp_input: bool = False,
        return_labels: bool = False,
        routed: bool = False,
    ):
        """TransformerLens's ``accumulated_resid`` (``[n_entries, *batch_and_pos,
        d_model]``, labels ``"{l}_pre"``, ``"{l}_mid"``, ``"final_post"``).

        Layouts without a final router (``none``, ``cumulative``): the entries are
        ``hook_resid_*``, the stream ``ln_final`` would read if the model stopped there.
        Layouts with one (``kimi``, ``full``) need ``routed=True``: each entry is then the
        final router applied to the sources of the depth state at that point (what
        ``ln_final`` would read if the model stopped there; the last entry is exactly
        ``final_res.hook_out``). ``apply_ln=True`` is exact at the unembedding
        (``layer=None``: ``ln_final`` applied to every entry by hand, its RMS recomputed,
        the logit lens; the last entry is what ``ln_final`` output in the run, and a cache
        whose run edited ``ln_final.hook_scale`` or ``hook_normalized`` is refused); with a
        smaller ``layer`` it divides by that layer's ``ln1`` RMS (``ln2`` with
        ``mlp_input``; a cached RMS, so it warns on unfolded gains, and a cache whose run
        edited that norm's ``hook_normalized`` is refused), which is the RMS of a router's
        mixture in routed layouts, and refuses there."""
        # flags read by truthiness took "no" for True
        (incl_mid, apply_ln, mlp_input, return_labels, routed) = require_bools(
            incl_mid=incl_mid,
            apply_ln=apply_ln,
            mlp_input=mlp_input,
            return_labels=return_labels,
            routed=routed,
        )
        pos_slice = slice_input(pos_slice, "pos_slice")  # checked, unsigned as int64
        self._require_full_run("accumulated_resid", pos_slice)
        model, layout = self.model, self.model.routing_layout
        n_layers = model.cfg.n_layers
        if layer is None or layer == -1:
            layer = n_layers
        # the range, as the decompositions check it (layer 99 was TransformerLens's KeyError
        # 'blocks.5.hook_resid_pre', layer "1" a bare AssertionError)
        _point(model, layer, False)
        layer = int(layer)
        if apply_ln and layer != n_layers and layout.has_routers:
            raise ValueError(
                f"accumulated_resid(apply_ln=True, layer={layer}) divides every entry by layer "
                f"{layer}'s {'ln2' if mlp_input else 'ln1'} RMS, which in the "
                f"{self._layout_name()} layout is the RMS of the "
                f"{'mlp_res' if mlp_input else 'attn_res'} router's mixture, not of any entry. "
                "Use apply_ln=True with "
                "layer=None (ln_final applied to every entry) or "
                "hooked_attnres.analysis.routing_lens."
            )
        if not layout.has_final_router:
            with naming_uncached(self.cache_dict, self.model):
                stack, labels = ActivationCache.accumulated_resid(
                    self._plain(), layer, incl_mid, False, pos_slice, mlp_input, True
                )
        elif not routed:
            raise ValueError(
                f"cache.accumulated_resid: in the {self._layout_name()} layout hook_resid_* "
                "holds the current block's partial sum, not a residual stream, and a final "
                "router mixes the depth sources before ln_final. Pass routed=True for the "
                "final router's mixture of each depth state's sources, or use "
                "hooked_attnres.analysis.routing_lens (logits at every layer)."
            )
        else:
            stack, labels = self._routed_accumulated(layer, incl_mid, pos_slice, mlp_input)
        if apply_ln:  # ln_final per entry at the unembedding, else the cached RMS ("none")
            # the last entry must be what the norm output (ln_final: over its own RMS)
            self._require_norm_output(
                "cache.accumulated_resid(apply_ln=True)",
                _point(model, layer, mlp_input and layer < n_layers),
                recompute=layer == n_layers,
            )
            stack = self.apply_ln_to_stack(
                stack,
                layer,
                mlp_input and layer < n_layers,
                pos_slice=pos_slice,
                has_batch_dim=self.has_batch_dim,
                recompute_ln=layer == n_layers,
            )
        return (stack, labels) if return_labels else stack

    def _routed_accumulated(
        self, layer: int, incl_mid: bool, pos_slice, mlp_input: bool
    ) -> tuple[Float[Tensor, "n_entries *batch_and_pos d_model"], list[str]]:
        """`accumulated_resid`'s entries with a final router, before any ``apply_ln``."""
        n_layers = self.model.cfg.n_layers
        pos_slice = as_slice(pos_slice, "pos_slice")
        entries, labels = [], []
        for entry in range(layer + 1):
            if entry == n_layers:
                entries.append(self.norm_input(2 * n_layers))
                labels.append("final_post")
                continue
            entries.append(self._state_mixture(2 * entry))
            labels.append(f"{entry}_pre")
            if (incl_mid and entry < layer) or (mlp_input and entry == layer):
                entries.append(self._state_mixture(2 * entry + 1))
                labels.append(f"{entry}_mid")
        return torch.stack([pos_slice.apply(entry, dim=-2) for entry in entries]), labels

    def _state_mixture(self, point: int) -> Float[Tensor, "*batch_and_pos d_model"]:
        """The final router applied to the sources of the depth state at ``point``, as
        stored (`state_source_names`)."""
        sources = [self._need(name) for name in state_source_names(self.model, point)]
        final = self.model.router(None, "final_res")
        # the run's padding at the cached positions, for eps = 0
        return final.mix(sources, self.real_rows())[0]

    def logit_lens(self, **kwargs: Any) -> Any:
        """TransformerLens's logit lens (``transformer_lens.tools.analysis.logit_lens``)
        in layouts without a final router; refuses in ``kimi`` / ``full``, where
        ``hooked_attnres.analysis.routing_lens`` is the lens over depth states. It runs
        on this cache, so ``ln_final`` is applied to each entry by `apply_ln_to_stack`
        (``recompute_ln=True``: by hand, without firing ``ln_final``'s hooks), and a cache
        whose run edited ``ln_final`` (``hook_scale`` or ``hook_normalized``) is refused
        with ``apply_ln`` (the default): the final entry would not be its logits. A
        ``batch_slice`` cuts the cache (`apply_slice_to_batch_dim`, which keeps its rows
        of the run's padding) before the lens reads it: TransformerLens cuts the stack and
        normalises it without the slice, whose rows the cache could not tell (with
        ``eps = 0`` its all-zero padding rows were ``0 / 0``)."""
        self._require_full_run("logit_lens", kwargs.get("positions", -1), "positions")
        if self.model.routing_layout.has_final_router:
            raise ValueError(
                f"cache.logit_lens reads hook_resid_* through ln_final, but in the "
                f"{self._layout_name()} layout a final router mixes the depth sources before "
                "ln_final (hook_resid_* is the current block's partial sum). Use "
                "hooked_attnres.analysis.routing_lens(model, cache), which applies the final "
                "router to each depth state."
            )
        if kwargs.get("apply_ln", True):  # its last entry must be the run's logits
            self._require_norm_output(
                "cache.logit_lens", 2 * self.model.cfg.n_layers, recompute=True
            )
        cache: ActivationCache = self
        if self.has_batch_dim and kwargs.get("batch_slice") is not None:
            cache = self.apply_slice_to_batch_dim(kwargs.pop("batch_slice"))
        return ActivationCache.logit_lens(cache, **kwargs)

    def get_neuron_results(
        self,
        layer: int,
        neuron_slice=None,
        pos_slice=None,
        project_output_onto: Optional[Tensor] = None,
    ) -> Tensor:
        """TransformerLens's ``get_neuron_results`` (each neuron's raw write ``post[n] *
        W_out[n]``: ``[*batch_and_pos, n_neurons, d_model]``, or the projection's last
        axis), with ``neuron_slice`` and ``pos_slice`` checked as the cache's other
        methods check theirs (`slice_input`: unchecked, an unsigned index array was a
        mask and ``[2.5]`` index 2, silently), and a ``pos_slice`` on a cache without a
        position axis refused (`_require_position_axis`: it indexed the prompts)."""
        neuron_slice = slice_input(neuron_slice, "neuron_slice")
        pos_slice = slice_input(pos_slice, "pos_slice")
        self._require_position_axis("get_neuron_results", pos_slice)
        return ActivationCache.get_neuron_results(
            self, layer, neuron_slice, pos_slice, project_output_onto
        )

    # --- stacking router hooks ---------------------------------------------------------
    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: Optional[str] = None
    ) -> Tensor:
        """TransformerLens's ``stack_activation`` (``[layer, *hook shape]``, the layers
        below ``layer``; empty for ``layer=0``); refuses router hooks whose ``n_sources``
        varies with depth (use `stack_router_activation`)."""
        # the decompositions' range (a bool was layer 1, -2 a bare RuntimeError; audit 159)
        stop = _point(self.model, layer, False) // 2
        if stop == 0:  # no layer below 0 (TransformerLens's torch.stack of nothing raises)
            return self[(activation_name, 0, sublayer_type)].unsqueeze(0)[:0]
        names = [get_act_name(activation_name, lay, sublayer_type) for lay in range(stop)]
        require_one_position_axis(self.model, self.cache_dict, names, "cache.stack_activation")
        shapes = {tuple(self[(activation_name, lay, sublayer_type)].shape) for lay in range(stop)}
        if len(shapes) > 1:
            raise ValueError(
                f"cache.stack_activation({activation_name!r}, sublayer_type={sublayer_type!r}) "
                f"finds shapes {sorted(shapes)}: in the {self._layout_name()} layout a router's "
                "n_sources depends on its layer. Use cache.stack_router_activation("
                f"{activation_name!r}, {sublayer_type!r}), which pads the source axis to the "
                "largest n_sources and returns a mask."
            )
        return torch.stack([self[(activation_name, lay, sublayer_type)] for lay in range(stop)])

    def stack_router_activation(
        self, hook: str, router: str = "attn_res", pad_value: float = 0.0
    ) -> tuple[Tensor, Bool[Tensor, "n_layers max_sources"]]:
        """A router hook of every layer, stacked with the source axis padded.

        Args:
            hook: ``"sources"``, ``"scale"``, ``"logits"``, ``"weights"`` or ``"out"``.
            router: ``"attn_res"`` or ``"mlp_res"``.
            pad_value: the value of padded entries.

        Returns:
            ``(stacked, mask)``: ``stacked`` is ``[n_layers, *hook shape]`` with the
            ``n_sources`` axis grown to the largest ``n_sources`` of these routers,
            ``max_sources``: ``[n_layers, batch, pos, max_sources, d_model]`` for
            ``"sources"``, ``[n_layers, batch, pos, max_sources, 1]`` for ``"scale"``,
            ``[n_layers, batch, pos, max_sources]`` for ``"logits"`` and ``"weights"``,
            ``[n_layers, batch, pos, d_model]`` for ``"out"`` (no source axis, nothing
            padded); ``mask`` is ``[n_layers, max_sources]``, ``mask[l, i]`` ``True``
            where layer ``l``'s router has source ``i`` (sources are oldest first, so the
            padding is at the end).
        """
        router = require_choice("router", router, SUBLAYER_ROUTERS)
        sites = self.model.sites(router)
        if not sites:
            raise ValueError(f"the {self._layout_name()} layout has no routers; nothing to stack")
        key = router_hook_key(hook)
        layout = self.model.routing_layout
        counts = [layout.n_sources(site) for site in sites]
        width = max(counts)
        names = [site.hook(key) for site in sites]
        require_one_position_axis(
            self.model, self.cache_dict, names, "cache.stack_router_activation"
        )
        values = [self._need(site.hook(key)) for site in sites]
        mask = torch.zeros(len(sites), width, dtype=torch.bool, device=values[0].device)
        for row, count in enumerate(counts):
            mask[row, :count] = True
        if key == "out":
            return torch.stack(values), mask
        axis = SOURCE_AXIS[key]
        assert axis is not None
        padded = []
        for value in values:
            pad = [0, 0] * (-axis - 1) + [0, width - value.shape[axis]]
            padded.append(torch.nn.functional.pad(value, pad, value=pad_value))
        return torch.stack(padded), mask

    # --- helpers --------------------------------------------------------------------------
    def _plain(self, wide: bool = False) -> ActivationCache:
        """TransformerLens's own class on the same tensors (no checks); ``wide``: with the
        weights its methods multiply by in `analysis_dtype` (`_wide_model`)."""
        dtype = analysis_dtype(self.model) if wide else None
        model = self.model if dtype is None else _wide_model(self.model, dtype)
        return ActivationCache(self.cache_dict, model, self.has_batch_dim)

    def _warn_unfolded(self, point: int, apply_ln: bool) -> None:
        if not apply_ln:
            return
        gain = self.model.norm_at(point).w
        if bool((gain == 1).all()) or getattr(self.model, "_unfolded_warned", False):
            return
        self.model._unfolded_warned = True
        warnings.warn(
            f"apply_ln divides by the cached RMS of the norm at {_where(self.model, point)} "
            "only (TransformerLens semantics); this model keeps its norm gains unfolded, so "
            "multiplying the result by W_U (or W_Q, W_in) misses the gain. Call "
            "model.process_weights() first (function-preserving; folds every gain), or use "
            "cache.logit_attrs, which folds the ln_final gain itself. Silence with "
            "warnings.filterwarnings('ignore', category=hooked_attnres.UnfoldedNormWarning).",
            UnfoldedNormWarning,
            stacklevel=3,
        )


# relative tolerance of `_require_decomposable` by the cache's dtype (rounding of the
# partial sums); bfloat16 / float16: `_decomposition_rtol`
_DECOMPOSITION_RTOL: dict[torch.dtype, float] = {torch.float64: 1e-9, torch.float32: 1e-4}


def _decomposition_rtol(dtype: torch.dtype, n_components: int) -> float:
    """The relative tolerance of `_require_decomposable` for a sum of ``n_components``
    cached components in ``dtype``. In bfloat16 / float16 the forward pass's rounding of
    its partial sums grows like ``eps * sqrt(n_components)`` (measured at most 0.6 of it
    relative to the largest input, up to 28 layers, every layout): 4 times that, at most
    5e-2. A fixed 5e-2 let a float16 cache whose components miss the norm's input by
    4 % through (about 40 times float16's rounding of a 4-layer model there)."""
    fixed = _DECOMPOSITION_RTOL.get(dtype)
    if fixed is not None:
        return fixed
    return min(5e-2, 4 * torch.finfo(dtype).eps * math.sqrt(max(n_components, 1)))


def _nan_note(error: float) -> str:
    """The sum checks' hint when their max error is nan (`AttnResActivationCache._sum_error`)."""
    if not math.isnan(error):
        return ""
    return (
        " (nan: the cache holds nan at a real position, or at padding it does not record, "
        "e.g. where a hook wrote nan; a cache of model.run_with_cache(tokens, "
        "attention_mask=mask) records its padding, which the check leaves out; for a plain "
        "dict declare it: AttnResActivationCache(tensors, model, attention_mask=mask))"
    )


def _component_name(label: str) -> str:
    """The hook of a `RoutingLayout.components` label: ``"embed"`` -> ``hook_embed``,
    ``"{l}_attn_out"`` / ``"{l}_mlp_out"`` -> ``blocks.{l}.hook_attn_out`` / ``hook_mlp_out``."""
    if label == "embed":
        return "hook_embed"
    layer, name = label.split("_", 1)
    return get_act_name(name, int(layer))


def _stream_names(model: Any, point: int) -> list[str]:
    """The ``hook_resid_*`` names TransformerLens reads as the stream at ``point``
    (``decompose_resid``'s target and the remainders of ``stack_head_results`` /
    ``stack_neuron_results``, which read ``resid_post`` of ``layer - 1``: at layer 0 its
    negative index makes that the last layer's ``resid_post``, the whole model's output,
    so there `_view` replaces it with the input of layer 0 for a remainder)."""
    layer, is_mlp = divmod(point, 2)
    if is_mlp:
        return [get_act_name("resid_mid", layer)]
    names = [] if layer == model.cfg.n_layers else [get_act_name("resid_pre", layer)]
    names.append(get_act_name("resid_post", (layer or model.cfg.n_layers) - 1))
    return names


class _WeightedDict(dict):
    """The tensors of a cache with some entries multiplied by a coefficient and some
    replaced, computed when first read (a routed view is cheap to make). ``dtype``: every
    floating tensor is first widened to at least it (exact), so the weighting, and what
    TransformerLens computes from the entries, is done in it."""

    def __init__(
        self, base: dict, weighted: dict, replaced: dict, dtype: Optional[torch.dtype] = None
    ):
        super().__init__(base)
        super().update(replaced)
        self._pending = {name: c for name, c in weighted.items() if name in base}
        self._dtype = dtype
        self._narrow = set(self) if dtype is not None else set()  # not yet widened

    def __getitem__(self, name):
        value = super().__getitem__(name)
        coefficient = self._pending.pop(name, None)
        widen = name in self._narrow
        self._narrow.discard(name)
        if widen:
            value = _widened(value, self._dtype)
        if coefficient is not None:
            if isinstance(coefficient, Tensor):
                coefficient = coefficient.to(value.dtype).reshape(
                    *coefficient.shape, *([1] * (value.ndim - coefficient.ndim))
                )
            value = value * coefficient
        if widen or coefficient is not None:
            super().__setitem__(name, value)
        return value

    def get(self, name, default=None):
        return self[name] if name in self else default

    def __setitem__(self, name, value) -> None:
        self._pending.pop(name, None)
        self._narrow.discard(name)
        super().__setitem__(name, value)


def analysis_dtype(model: Any) -> Optional[torch.dtype]:
    """The dtype in which the cache's decompositions (`decompose_resid`,
    `stack_head_results`, `stack_neuron_results`, `get_full_resid_decomposition`) and
    `logit_attrs` compute and return their results in a bfloat16 / float16 model:
    `stat_dtype` (float32); they widen the cached activations (exact) and the weights they
    multiply them by. ``None`` in a float32 / float64 model (computed in its dtype, as
    TransformerLens does)."""
    dtype = model.W_E.dtype
    wide = stat_dtype(dtype)
    return None if wide == dtype else wide


def _widened(value: Any, dtype: Optional[torch.dtype]) -> Any:
    """A floating tensor ``value`` `widened` when ``dtype`` (`analysis_dtype`: float32 in
    a bfloat16 / float16 model) is given; as it is for ``None`` and for anything else."""
    if dtype is None or not isinstance(value, Tensor) or not value.is_floating_point():
        return value
    return widened(value)


class _Overlay:
    """``target`` read through, with the attributes ``overrides`` replaced."""

    def __init__(self, target: Any, **overrides: Any) -> None:
        self.__dict__.update(overrides)
        self._target = target

    def __getattr__(self, name: str) -> Any:  # only for what ``overrides`` does not set
        return getattr(self._target, name)


def _wide_model(model: Any, dtype: torch.dtype) -> Any:
    """``model`` as TransformerLens's cache methods read it, with what they multiply the
    cached activations by in ``dtype``: each block's ``attn.W_O`` and ``mlp.W_out``,
    ``tokens_to_residual_directions`` and ``accumulated_bias``."""
    blocks = [
        _Overlay(
            block,
            attn=_Overlay(block.attn, W_O=block.attn.W_O.to(dtype)),
            mlp=_Overlay(block.mlp, W_out=block.mlp.W_out.to(dtype)),
        )
        for block in model.blocks
    ]

    def accumulated_bias(*args: Any, **kwargs: Any) -> Tensor:
        return model.accumulated_bias(*args, **kwargs).to(dtype)

    return _Overlay(
        model,
        blocks=blocks,
        tokens_to_residual_directions=functools.partial(
            model.tokens_to_residual_directions, dtype=dtype
        ),
        accumulated_bias=accumulated_bias,
    )
