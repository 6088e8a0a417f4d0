"""The TransformerLens names this package builds on, imported in one place.

TransformerLens 4.x removed ``HookedTransformer`` but keeps ``HookedRootModule``,
``HookPoint``, ``ActivationCache``, ``FactoredMatrix`` and the ``utilities`` helpers.
Every module of the package imports TransformerLens names from here (a test checks it),
so a future move in TransformerLens is a one-file fix. Only TransformerLens 4.x is
supported (``pyproject.toml``).
"""

from __future__ import annotations

import numpy as np
from transformer_lens import ActivationCache, FactoredMatrix, HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.composition_scores import CompositionScores
from transformer_lens.utilities import Slice, composition_scores, get_act_name, remove_batch_dim

from hooked_attnres._validation import (
    refuse_uint8_index,
    require_positions_in_range,
    unsigned_as_int64,
)


def as_slice(value, name: str) -> Slice:
    """``value`` as a TransformerLens ``Slice`` (a ``Slice`` as is: ``Slice(Slice(...))``
    raises), for the ``pos_slice`` / ``batch_slice`` arguments TransformerLens takes,
    checked by `slice_input`."""
    checked = slice_input(value, name)
    return checked if isinstance(checked, Slice) else Slice(checked)


def selects_positions(pos_slice: Slice) -> bool:
    """Whether a checked position ``Slice`` names positions (an int or an index array,
    of integers or a bool mask), which `require_slice_in_range` checks: a ``slice`` keeps
    the positions it finds, as in Python, and ``None`` keeps all."""
    return pos_slice.mode in ("int", "array")


def require_slice_in_range(pos_slice: Slice, n_pos: int, name: str, where: str) -> None:
    """Refuse a checked position ``Slice`` (`as_slice`) that selects a position outside
    ``[-n_pos, n_pos)`` (an int or an index array: `require_positions_in_range`, naming
    ``name`` and ``where``, what has ``n_pos`` positions) or is a bool mask of another
    length than ``n_pos``; torch raised a bare ``IndexError`` naming no argument. A
    ``slice`` (``(start, stop)``) is not checked: as in Python, it keeps the positions it
    finds (`selects_positions`)."""
    if not selects_positions(pos_slice):
        return
    index = np.asarray(pos_slice.slice)
    if index.dtype.kind != "b":
        shown = f"{name} {index.tolist()!r}"  # [0, 30], not array([ 0, 30])
        require_positions_in_range(shown, index, n_pos, where)
    elif index.ndim == 1 and len(index) != n_pos:
        raise ValueError(
            f"{name} is a bool mask of {len(index)} positions, but {where}: give a mask of "
            f"{n_pos} (or integer positions)"
        )


def slice_input(value, name: str):
    """``value``, a ``pos_slice`` / ``batch_slice`` argument, checked, to hand to
    TransformerLens (or to ``Slice``): as is, or an index array of unsigned integers (or
    an empty list) as an int64 NumPy array (torch took a uint8 array as a mask: ``[0, 1, 1,
    0]`` of the sequence's length selected positions 1 and 2). Anything else (a float, a
    string, a generator, or a ``bool``: ``Slice(True)`` is index 1) is refused as
    ``ValueError`` naming ``name``, the caller's argument (TransformerLens said "Invalid
    input_slice 2.5"). So is an index array (a list, array or tensor) of floats or strings,
    or a 0-d bool: torch truncated ``[2.5]`` to index 2 and a 0-d bool added an axis,
    silently; an integer array and a bool mask of one or more dimensions are
    TransformerLens' (numpy's) index arrays. A ``Slice`` of an index array is checked as
    that array (``Slice(np.array([0, 1, 1], dtype=np.uint8))`` was a mask too). A
    ``torch.uint8`` tensor is refused as ambiguous (`refuse_uint8_index`, the package's
    one rule: ``AmbiguousIndexError``, a ``ValueError``)."""
    if isinstance(value, Slice):
        if value.mode != "array":
            return value
        try:
            checked = slice_input(value.slice, name)
        except ValueError:
            checked = None  # refused below, naming the Slice
        if checked is value.slice:
            return value
        if checked is not None:
            return Slice(checked)
    elif not isinstance(value, bool):
        refuse_uint8_index(name, value)  # a mask to torch, indices to NumPy: ambiguous
        try:
            sliced = Slice(value)
        except (ValueError, TypeError):  # TypeError: torch cannot hold ["2"]
            sliced = None
        if sliced is not None and sliced.mode != "array":
            return value
        if sliced is not None:
            index = np.asarray(sliced.slice)
            if index.size == 0:  # [] reads as float64: an empty index
                return index.astype(np.int64)
            try:
                signed = unsigned_as_int64(index)
                past_int64 = False
            except ValueError:  # no index of any run: refused below
                signed, past_int64 = None, True
            if signed is not None:
                return signed
            integer = index.dtype.kind == "i" or (index.dtype.kind == "b" and index.ndim > 0)
            if integer and not past_int64:
                return value
    raise ValueError(
        f"{name} must be None, an int, a (start, stop[, step]) tuple, a list, array or tensor "
        f"of integer indices (or a bool mask), or a Slice, got {value!r}"
    )


__all__ = [
    "ActivationCache",
    "CompositionScores",
    "FactoredMatrix",
    "HookPoint",
    "HookedRootModule",
    "Slice",
    "as_slice",
    "require_slice_in_range",
    "selects_positions",
    "composition_scores",
    "get_act_name",
    "remove_batch_dim",
    "slice_input",
]
