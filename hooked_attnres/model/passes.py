"""Which positions of the sequence the running forward pass covers.

A hook sees the positions its pass runs: a pass with a key-value cache runs only the new
positions (its position 0 is the sequence's position ``n_past``), and after the last
attention a ``logit_positions`` pass runs one position per prompt. An intervention that
addresses positions of the whole sequence (``positions=``, a value tensor with a position
axis, another run's cache) would silently move there, so
the model records the extent of every pass (`pass_extent`) and such a hook checks it
(`require_whole_sequence`) before it resolves a position.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

if TYPE_CHECKING:
    from torch import nn

    from hooked_attnres.model.weights import WeightsSignature


@dataclass(frozen=True)
class PassExtent:
    """The positions a forward pass runs: ``length`` positions after ``n_past`` cached
    ones (``length`` counts every position the pass starts with, before a
    ``logit_positions`` pass narrows to one per prompt). ``real``: ``[batch, length]``,
    True at real tokens, where the pass's ``attention_mask`` marks padding (``None``: no
    padding)."""

    n_past: int
    length: int
    real: Optional[Tensor] = None
    # `padding_rows` of this pass, made at its first norm: {(ndim, dtype, device, inference
    # mode): tensor}
    padding: dict = field(default_factory=dict, compare=False, repr=False)
    # the pass's `PassInput`, made when a caching hook first asks (`pass_input`); shared by
    # the extents of one forward pass (its embedding and its sublayers)
    source: Optional[Callable[[], PassInput]] = field(default=None, compare=False, repr=False)
    # the `InterventionTag` s of the intervention hooks that fired in the pass
    # (`note_intervention`); shared by the extents of one forward pass; ``None`` in a pass
    # without a key-value cache, which records none
    fired: Optional[set] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class InterventionTag:
    """Names one hook of an intervention (`hooked_attnres.interventions`) in the record of
    the passes that fill a key-value cache (`note_intervention`,
    `KeyValueCache.note_interventions`). ``what`` describes it for error messages;
    ``key`` makes two tags equal: by default a new object, so each hook built is its own
    intervention, or a value (an ablation's router and mask, a value given by name such as
    ``"uniform"`` or a value tensor's `TensorContents`, with its hook and positions), so an
    equal intervention built again is the same, however described (``what`` takes no part:
    one mask selected as ``'current'`` or ``['current']`` is one intervention)."""

    what: str = field(compare=False)
    key: Any = field(default_factory=object, repr=False)

    def __copy__(self) -> InterventionTag:
        return self

    def __deepcopy__(self, memo: dict) -> InterventionTag:
        # a copy of a cache (copy.deepcopy, to continue it two ways) names the same hooks
        return self


_CURRENT: ContextVar[Optional[PassExtent]] = ContextVar("hooked_attnres_pass", default=None)


def padding_of(mask: Optional[Tensor]) -> Optional[Tensor]:
    """The one rule for "a pass has padding": ``[batch, pos]`` bool, True at real tokens,
    when ``mask`` (an ``attention_mask``, any dtype) marks some padding; ``None`` for no
    mask or an all-ones mask, which runs the same pass as none."""
    if mask is None:
        return None
    real = torch.as_tensor(mask) != 0
    return None if bool(real.all()) else real


def same_padding(first: Optional[Tensor], second: Optional[Tensor]) -> bool:
    """Whether two ``attention_mask``s (or ``None``) give the same padding (`padding_of`):
    a cache or a depth state made with one may be used in a pass run with the other."""
    first, second = padding_of(first), padding_of(second)
    if first is None or second is None:
        return first is None and second is None
    return first.shape == second.shape and torch.equal(first, second.to(first.device))


def left_padded_rows(real: Optional[Bool[Tensor, "batch pos"]]) -> list[int]:
    """The rows of ``real`` (``[batch, pos]``, True at real tokens) with padding before a
    real token: those whose real tokens a pass without the mask would move (right
    padding, after every real token, changes no real token of a causal pass)."""
    if real is None or real.ndim != 2:
        return []
    before = torch.cummax(real.flip(-1).int(), dim=-1).values.flip(-1).bool()
    return (before & ~real).any(-1).nonzero().flatten().tolist()


@dataclass(frozen=True, eq=False)
class PassInput:
    """What a forward pass computed its activations from, besides its ``n_past`` and padding
    (which caches record apart): the model and its weights, the pass's input (``kind``
    ``"tokens"``: copies of its token ids and ``logit_positions``; ``"state"``: of the
    sources of the `DepthState` it started from, for ``start_at_layer`` / `forward_from`)
    and what its key-value cache held (``past``: the token ids and mask of every pass that
    filled it, `KeyValueCache.filled_with`; ``None`` where not recorded). Two passes with
    equal records compute the same activations at every hook both reach (up to hooks that
    edit activations): a cache filled by caching hooks over several passes
    (`RunCacheDict.note_pass`) is whole only where they agree.

    Made once per pass, and only when a caching hook asks (`pass_input`): a pass caches
    nothing else. Its cost is one copy of the input (``[batch, pos]`` token ids; a state's
    sources, ``[batch, pos, d_model]`` each) and a `WeightsSignature` (no weights copied).
    Pickled (``torch.save`` of a cache), it keeps its tensors but no model (``model`` is
    ``None``): a pass after it counts as a pass of another model."""

    model: Optional[weakref.ReferenceType[nn.Module]]
    weights: WeightsSignature
    kind: str
    tensors: tuple[Optional[Tensor], ...]
    past: Optional[tuple[Optional[Tensor], ...]] = ()

    def difference(self, other: PassInput) -> Optional[str]:
        """``None`` if ``other`` (a later pass) computed from the same model, weights and
        input as this pass, else how it differs (for an error message)."""
        model = None if other.model is None else other.model()
        if model is None or self.model is None or model is not self.model():
            return "a pass of another model"
        changed = self.weights.change(model)
        if changed is not None:
            return f"a pass with other weights ({changed})"
        if other.kind != self.kind or not _same_tensors(other.tensors, self.tensors):
            what = "other token ids" if self.kind == other.kind == "tokens" else "another input"
            return f"a pass over {what}" + (
                " (a pass from a DepthState and one from token ids count as different inputs)"
                if other.kind != self.kind
                else ""
            )
        if self.past is None or other.past is None or not _same_tensors(self.past, other.past):
            return "a pass after other positions in its key-value cache"
        return None

    def __reduce__(self):
        # a weak reference to the model cannot be pickled: a loaded record names no model
        return (PassInput, (None, self.weights, self.kind, self.tensors, self.past))


def _same_tensors(first: tuple, second: tuple) -> bool:
    """Whether two tuples of tensors (or ``None``) hold the same values."""
    return len(first) == len(second) and all(
        one is two
        or (
            one is not None
            and two is not None
            and one.shape == two.shape
            and one.dtype == two.dtype
            and one.device == two.device
            and torch.equal(one, two)
        )
        for one, two in zip(first, second, strict=True)
    )


def continuation(source: Optional[Callable[[], PassInput]], sources: list) -> Optional[tuple]:
    """What a state returned by a pass (``stop_at_layer``) records of it
    (`DepthState.continues`): the pass's `PassInput` maker and its ``sources`` with their
    version counters, where the maker has made its record (caching hooks recorded the pass:
    the record is of the input as it was); ``None`` otherwise, or for inference tensors
    (which have no version counter)."""
    made = getattr(source, "cache_info", None)
    if made is None or made().currsize == 0 or any(s.is_inference() for s in sources):
        return None
    return _Continuation((source, tuple((tensor, tensor._version) for tensor in sources)))


class _Continuation(tuple):
    """`continuation`'s record. A deep copy or a pickle of a state drops it (``None``): its
    copied tensors have new version counters, which could not tell an edit made before."""

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return (_dropped, ())


def _dropped() -> None:
    return None


def continued(record: Optional[tuple], sources: list) -> Optional[Callable[[], PassInput]]:
    """The `PassInput` maker of the pass a state continues (`continuation`), if its
    ``sources`` are still the tensors that pass returned, unedited; else ``None``."""
    if record is None:
        return None
    source, kept = record
    if len(kept) != len(sources) or any(s.is_inference() for s in sources):
        return None
    same = all(s is t and s._version == v for s, (t, v) in zip(sources, kept, strict=True))
    return source if same else None


def in_pass() -> bool:
    """Whether a forward pass is running (`pass_extent`)."""
    return _CURRENT.get() is not None


def pass_input() -> Optional[PassInput]:
    """The running pass's `PassInput` (made at the first call of the pass); ``None`` outside
    a pass or in one that records none. What a cache of the pass records
    (`RunCacheDict.source`)."""
    extent = _CURRENT.get()
    return None if extent is None or extent.source is None else extent.source()


@contextmanager
def pass_extent(
    n_past: int,
    length: int,
    real: Optional[Tensor] = None,
    source: Optional[Callable[[], PassInput]] = None,
    fired: Optional[set] = None,
) -> Iterator[None]:
    """Record the running pass's extent for the hooks that fire inside the block (a pass
    started from inside a hook restores the outer one afterwards); ``real``: the pass's
    ``[batch, length]`` attention mask of its own positions (True at real tokens), if any;
    ``source``: a function (memoised: every call returns one object) that makes the pass's
    `PassInput`, for `pass_input`; ``fired``: the set that collects the pass's
    `InterventionTag` s (`note_intervention`), one for all the extents of a pass (``None``:
    a pass without a key-value cache, which records none)."""
    extent = PassExtent(n_past, length, padding_of(real), source=source, fired=fired)
    token = _CURRENT.set(extent)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def note_intervention(tag: Union[InterventionTag, Callable[[], InterventionTag]]) -> None:
    """Record that an intervention's hook (``tag``, or a function that makes it from what
    the hook reads now, called only here) fired in the running pass (nothing outside a
    pass, or in a pass without a key-value cache): a key-value cache compares the
    interventions of the passes that fill it with those of a pass that continues it
    (`KeyValueCache.note_interventions`)."""
    extent = _CURRENT.get()
    if extent is not None and extent.fired is not None:
        extent.fired.add(tag if isinstance(tag, InterventionTag) else tag())


# integer dtypes of each element size, to compare floating-point tensors bit by bit
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: Tensor) -> Tensor:
    """``tensor``'s bits (a view; an integer or bool tensor itself)."""
    return tensor.view(_BITS[tensor.element_size()]) if tensor.is_floating_point() else tensor


class TensorContents:
    """The contents of a tensor that an intervention's hook read (``tensor``: a copy of it,
    any shape), as part of its `InterventionTag` key: equal to another where dtype, shape,
    device and bits are (`holds`). So a hook built again with a value of equal contents
    (``value=t.clone()``) is the same intervention, and one whose value was edited in
    place after a pass read it is another. Pickled with its copy: the interventions of a
    key-value cache loaded from a file compare as before it was saved."""

    __slots__ = ("tensor", "_bits", "_hash")

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self._bits = _bits(tensor)
        self._hash = hash((tensor.dtype, tuple(tensor.shape), tensor.device))

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` has these contents: the same dtype, shape, device and bits,
        what no computation can tell apart (a nan equals the same nan and ``-0.0`` is not
        ``0.0``, unlike ``torch.equal``). One comparison: a hook asks at every call of a
        cached pass (`_TensorTag`)."""
        mine = self.tensor
        if tensor.dtype != mine.dtype or tensor.shape != mine.shape:
            return False
        return tensor.device == mine.device and torch.equal(_bits(tensor), self._bits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorContents) and other.holds(self.tensor)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):
        return (TensorContents, (self.tensor,))


def require_whole_sequence(
    n_pos: int,
    what: str,
    cached_ok: bool = False,
    instead: str = "intervene at every position (positions=None)",
) -> None:
    """Raise unless a hook that sees ``n_pos`` positions sees the whole sequence of the
    running pass (outside any pass, or in a full pass, nothing to check). ``cached_ok``:
    also accept a key-value cache pass over the new positions (for an operation that is
    the same at every position, such as a mean over the prompts); ``what`` names the
    operation in the error, ``instead`` the alternative that works in any pass."""
    extent = _CURRENT.get()
    if extent is None or (n_pos == extent.length and (extent.n_past == 0 or cached_ok)):
        return
    if n_pos != extent.length:
        why = (
            "after the last attention a logit_positions pass runs one position per prompt, "
            "each prompt's own"
        )
    else:
        why = (
            f"a pass with a key-value cache runs only the new positions (its position 0 is "
            f"the sequence's position {extent.n_past})"
        )
    raise ValueError(
        f"{what} refers to positions of the whole sequence, but this hook sees {n_pos} "
        f"position(s) of a {extent.n_past + extent.length}-position sequence: {why}. Run the "
        "whole sequence in one pass (no key-value cache, no logit_positions; generate(..., "
        f"use_past_kv_cache=False)), or {instead}"
    )


def real_tokens(batch: int, n_pos: int) -> Optional[Tensor]:
    """``[batch, n_pos]``, True at real tokens, when a hook that sees ``[batch, n_pos]``
    runs in a pass whose ``attention_mask`` marks padding among exactly those positions;
    ``None`` without padding (or outside a pass, or where the hook sees other rows or
    positions than the mask's)."""
    extent = _CURRENT.get()
    if extent is None or extent.real is None or tuple(extent.real.shape) != (batch, n_pos):
        return None
    return extent.real


def padding_rows(
    batch: int, n_pos: int, ndim: int, dtype: torch.dtype, device: torch.device
) -> Optional[Float[Tensor, "batch n_pos *ones"]]:
    """``[batch, n_pos, 1, ...]`` (``ndim`` axes) in ``dtype`` on ``device``: 1 at the
    padding and 0 at the real tokens of the running pass, for a tensor that is
    ``[batch, n_pos, ...]`` (`real_tokens`, ``None`` where it is). Made once per pass for
    each ``ndim``, ``dtype`` and ``device`` (a new ``[batch, n_pos]`` tensor for every norm
    of the pass cost about 7 % of a tiny padded ``eps = 0`` pass): every caller gets the
    same tensor, so never edit it."""
    real = real_tokens(batch, n_pos)
    if real is None:
        return None
    extent = _CURRENT.get()
    assert extent is not None  # real_tokens found the pass
    key = (ndim, dtype, device, torch.is_inference_mode_enabled())
    rows = extent.padding.get(key)
    if rows is None:
        rows = padding_rows_of(real, ndim, dtype, device)
        extent.padding[key] = rows
    return rows


def padding_rows_of(
    real: Bool[Tensor, "*lead"], ndim: int, dtype: torch.dtype, device: torch.device
) -> Float[Tensor, "*lead *ones"]:
    """``[*lead, 1, ...]`` (``ndim`` axes) in ``dtype`` on ``device``: 1 where ``real`` (an
    attention mask as `padding_of` gives it, True at real tokens) marks padding, 0 at the
    real tokens. The one construction of `padding_rows` (the running pass's) and of the
    padding a tensor made in another pass carries (`norms.padding_eps`'s ``real``)."""
    return (~real).to(device=device, dtype=dtype).reshape(*real.shape, *[1] * (ndim - real.ndim))


def pass_n_past() -> int:
    """The positions a key-value cache held before the running pass (its position 0 is the
    sequence's position ``n_past``); 0 without a cache or outside a pass. What a cache of
    the pass records (`RunCacheDict.n_past`)."""
    extent = _CURRENT.get()
    return 0 if extent is None else extent.n_past


def pass_mask() -> Optional[Tensor]:
    """The running pass's ``[batch, length]`` attention mask (True at real tokens) when it
    marks padding; ``None`` without padding or outside a pass. What a cache of the pass
    records (`RunCacheDict.attention_mask`)."""
    extent = _CURRENT.get()
    return None if extent is None else extent.real
