"""Argument checks shared by every part of the package (a leaf module: no package imports).

One rule for "an integer": a Python ``int`` or a NumPy integer scalar (``np.int64(3)``,
what ``np.argsort`` or a pandas column gives), never a ``bool`` (``True`` is an ``int`` in
Python, but ``n_layers=True`` is a mistake, not 1; ``np.True_`` is no NumPy integer); and
one wording for the error. `require_integer` returns the value as a Python ``int``, so
what is stored or written to JSON is one (``json.dumps(np.int64(3))`` raises). Refused:
floats (even ``3.0``), strings, arrays of any shape (even of one element) and torch tensors
(even 0-d integer ones: a tensor hashes by identity and formats as ``tensor(3)``, so it is
no stand-in for an int; pass ``int(t)``). "A number" is the same with floats: a Python
``int`` or ``float`` or a NumPy integer or floating scalar, returned by
`require_finite_number` as a Python number.

torch is imported inside the checks that need it, not with the module: the command
line's ``list`` and its reading of arguments use these checks without loading torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Optional, TypeGuard, overload

import numpy as np

if TYPE_CHECKING:
    import torch


def some_names(names: Sequence[str], limit: int = 5) -> str:
    """``names`` joined for an error message, the first ``limit`` only when there are more:
    ``"a, b, c, d, e, ... (40 in all)"`` (a folder's whole listing made one line of
    thousands of names)."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def is_integer(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is a Python ``int`` or a NumPy integer scalar, and not a ``bool``
    (see the module docstring). Where the value is kept, stored or used to name something,
    take ``int(value)`` (or `require_integer`'s result)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def require_integer(
    name: str,
    value: Any,
    minimum: Optional[int] = None,
    optional: bool = False,
    maximum: Optional[int] = None,
    why_maximum: str = "",
) -> Any:
    """``value`` as a Python ``int`` if it is an integer (`is_integer`) ``>= minimum`` (no
    bound if ``None``), or ``None`` when ``optional``; otherwise ``ValueError("{name} must
    be an integer >= {minimum}[ or None], got {value!r}")``. An integer above ``maximum``
    (no bound if ``None``) raises ``ValueError("{name} must be an integer <= {maximum}
    ({why_maximum}), got {value!r}")``."""
    if optional and value is None:
        return value
    if not is_integer(value) or (minimum is not None and value < minimum):
        kind = "an integer" + ("" if minimum is None else f" >= {minimum}")
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
    if maximum is not None and value > maximum:
        why = f" ({why_maximum})" if why_maximum else ""
        raise ValueError(f"{name} must be an integer <= {maximum}{why}, got {value!r}")
    return int(value)


@overload
def require_bool(
    name: str,
    value: Any,
    optional: Literal[False] = False,
    error: type[Exception] = TypeError,
) -> bool: ...


@overload
def require_bool(
    name: str, value: Any, optional: bool, error: type[Exception] = TypeError
) -> Optional[bool]: ...


def require_bool(
    name: str, value: Any, optional: bool = False, error: type[Exception] = TypeError
) -> Optional[bool]:
    """``value`` as a Python ``bool`` if it is ``True`` or ``False`` or a NumPy boolean
    scalar (``np.True_``, what ``(a > b).any()`` of an array gives: as for integers, a
    NumPy scalar is taken, see the module docstring), or ``None`` when ``optional``;
    otherwise ``TypeError("{name} must be True or False[ or None], got {value!r}")``. A
    flag read by truthiness took ``"no"`` or ``"False"`` as ``True``; ``0`` / ``1`` and
    tensors (even 0-d boolean ones: pass ``bool(t)``) are refused. Use the returned value.
    ``error``: the exception class raised instead of ``TypeError`` (`HookedAttnResConfig`
    passes ``ValueError``: every field of a config, as every value of a config.json, is
    refused as a ``ValueError``)."""
    if optional and value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    import torch

    hint = " (a tensor: pass bool(t))" if isinstance(value, torch.Tensor) else ""
    raise error(
        f"{name} must be True or False{' or None' if optional else ''}, got {value!r}{hint}"
    )


def check_device(device) -> None:
    """Refuse a device that torch cannot parse (``ValueError``, "is not a torch device"),
    and a CUDA device this machine does not have (``"cuda:7"`` with fewer GPUs, any
    ``"cuda"`` without CUDA) or ``"mps"`` where MPS is not available (``ValueError``, "is
    not on this machine"); ``None``, ``"cpu"`` and ``"meta"`` pass. The one device check of
    the loaders (before anything is read: torch failed only when the loaded model was moved
    there, after every weight was read, "Torch not compiled with CUDA enabled", an
    ``AssertionError``) and of `HookedAttnResConfig` (which took any device torch parses
    until audit 147, and the model built from it failed so)."""
    import torch

    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device ({error})") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise ValueError(
                f"device={device!r} is not on this machine: it has {count} CUDA device(s)"
                + (f", cuda:0 to cuda:{count - 1}" if count else "; use device='cpu'")
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} is not on this machine (MPS is not available)")


def require_bools(**flags: Any) -> list[bool]:
    """`require_bool` of each keyword (``name=value``), in the order given: the flags of
    one call as Python bools (``x, y = require_bools(x=x, y=y)``)."""
    return [require_bool(name, value) for name, value in flags.items()]


@overload
def require_choice(name: str, value: Any, choices: Sequence[str], why: str = "") -> str: ...


@overload
def require_choice(
    name: str, value: Any, choices: Sequence[Optional[str]], why: str = ""
) -> Optional[str]: ...


def require_choice(
    name: str, value: Any, choices: Sequence[Optional[str]], why: str = ""
) -> Optional[str]:
    """``value`` if it is one of ``choices`` (strings, and ``None`` where it is one): a
    ``str`` (a ``str`` subclass, a NumPy string scalar or a ``(str, Enum)`` member, is
    returned as the Python ``str`` it holds) or ``None``; otherwise ``ValueError("{name}
    must be one of {choices}[ ({why})], got {value!r}")``, ``why`` saying why a choice
    is not there (``router_patch_index``: the final router has no layer axis). Tested by
    type before equality: ``value in choices`` compared a NumPy array elementwise, which
    raised NumPy's "truth value of an array ... is ambiguous" naming no argument, took a
    one-element array ``np.array(["attn_res"])`` for ``"attn_res"`` and a 0-d
    ``np.array("str")`` for ``"str"``."""
    if value is None and None in choices:
        return None
    # the characters a str subclass holds: its str() may differ (a (str, Enum) member's is
    # 'Class.MEMBER', which refused padding_side=Side.LEFT, equal to "left")
    text = str.__str__(value) if isinstance(value, str) else None
    if text is not None and text in [c for c in choices if isinstance(c, str)]:
        return text
    because = f" ({why})" if why else ""
    raise ValueError(f"{name} must be one of {tuple(choices)}{because}, got {value!r}")


def require_text(name: str, value: Any, what: str) -> str:
    """``value`` as the Python ``str`` it holds, if it is a string with a character other
    than whitespace (a ``str`` subclass or a NumPy string scalar); otherwise
    ``ValueError("{name} must be a non-empty string ({what}), got {value!r}")``, ``what``
    saying what the text is for."""
    if isinstance(value, str) and value.strip():
        return str.__str__(value)
    raise ValueError(f"{name} must be a non-empty string ({what}), got {value!r}")


def require_tokenizer(name: str, value: Any) -> None:
    """Refuse a ``value`` that is no tokenizer object (one with ``get_vocab``, as every
    Hugging Face tokenizer has) and not ``None``: ``TypeError("{name} must be a Hugging Face
    tokenizer ...")``. A name or path (``"gpt2"``) is not loaded, as TransformerLens would
    (nothing here downloads); it failed later with ``AttributeError: 'str' object has no
    attribute 'pad_token'``. Duck-typed, so that a wrapper around a tokenizer is taken."""
    if value is None or (not isinstance(value, (str, bytes)) and hasattr(value, "get_vocab")):
        return
    why = (
        "a name or path is not loaded here (nothing is downloaded)"
        if isinstance(value, (str, bytes, os.PathLike))
        else "it has no get_vocab"
    )
    raise TypeError(
        f"{name} must be a Hugging Face tokenizer object or None, got the "
        f"{type(value).__name__} {value!r}: {why}; pass the tokenizer itself, e.g. "
        "transformers.AutoTokenizer.from_pretrained(local_directory)"
    )


def require_token_mask(name: str, mask: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """``mask``, a ``[batch, pos]`` tensor of booleans or 0/1 integers (1 = real token, 0 =
    padding) of the tokens' ``shape``, as a boolean tensor; otherwise ``TypeError`` (not
    such a tensor) or ``ValueError`` (another shape, a value other than 0 and 1), naming
    ``name``."""
    import torch

    if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"{name} must be a [batch, pos] tensor of 0/1 integers or booleans, got "
            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        )
    if tuple(mask.shape) != tuple(shape):
        # tokens [pos] are one prompt [1, pos]: a [pos] mask beside them was refused
        # quoting (1, pos), a shape the caller never passed, and no remedy (audit 151)
        if mask.ndim == 1 and len(shape) == 2 and shape[0] == 1:
            remedy = f": pass {name}[None]" if mask.shape[0] == shape[1] else ""
            raise ValueError(
                f"{name} must be [batch, pos] with the tokens' shape {tuple(shape)} (tokens "
                f"[pos] are read as one prompt, [1, pos]), got {tuple(mask.shape)}{remedy}"
            )
        raise ValueError(
            f"{name} must have the shape of the tokens {tuple(shape)}, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must hold only 0 (padding) and 1 (real token)")
        mask = mask != 0
    return mask


def require_token_ids(tokens: torch.Tensor, d_vocab: int) -> None:
    """Refuse token ids that are not an integer tensor (``TypeError``) or lie outside
    ``[0, d_vocab)`` (``ValueError``, showing the range found). Indexing a weight with
    them would not fail but give other rows: a negative id counts from the end, a boolean
    tensor is a mask."""
    import torch

    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(
            f"token ids must be an integer tensor (torch.long), got dtype {tokens.dtype}"
        )
    if tokens.numel() == 0 or tokens.is_meta:  # a meta tensor holds no values to check
        return
    values: Any = tokens
    if tokens.dtype in (torch.uint16, torch.uint32, torch.uint64):
        # torch has no min / max for them ('"min_all" not implemented for UInt16'): a NumPy
        # uint16 array of ids, as token datasets store them, crashed here (audit 151)
        values = tokens.detach().cpu().numpy()
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= d_vocab:
        raise ValueError(
            f"token ids must be in [0, {d_vocab}) (d_vocab), got values in [{low}, {high}]"
        )


def require_positions_in_range(shown: str, index: Any, n_pos: int, where: str) -> None:
    """Refuse integer positions ``index`` (an int, or a tensor or array of integers of any
    shape) outside ``[-n_pos, n_pos)``: ``ValueError("{shown} must be integers in [-n_pos,
    n_pos) ({where})")``, ``shown`` naming the argument and its value (``"positions 30"``)
    and ``where`` what has ``n_pos`` positions (``"this run has 6 tokens"``). The one range
    check of positions (the interventions', `routing_mass`'s, `source_heatmap`'s and, of
    a TransformerLens ``Slice``, the cache's methods', `routing_lens`'s and
    ``run_with_cache``'s ``pos_slice``): indexing with such a position failed in torch
    with a bare ``IndexError`` naming no argument."""
    import torch

    values = index if isinstance(index, torch.Tensor) else np.asarray(index)
    if bool(((values < -n_pos) | (values >= n_pos)).any()):
        raise ValueError(f"{shown} must be integers in [-{n_pos}, {n_pos}) ({where})")


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite number: a Python ``int`` or ``float``, or a NumPy
    integer or floating scalar (``np.float32(0.5)``, ``np.int64(3)``: what accepts ``0.5``
    and ``3`` accepts them too), never a ``bool`` (nor ``np.True_``), an array or a tensor
    (as for integers, see the module docstring), nor an integer too large for a float
    (``10**400``: every use reads it as one, and ``math.isfinite`` raised a bare
    ``OverflowError``). Where the value is kept, take `require_finite_number`'s result (a
    Python number)."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the largest float
        return False


def require_finite_number(name: str, value: Any, optional: bool = False) -> Any:
    """``value`` as a Python ``int`` or ``float`` if it is a finite number
    (`is_finite_number`; a NumPy scalar becomes the Python number of its value, so what is
    stored or written to JSON is one), or ``None`` when ``optional``; otherwise
    ``ValueError("{name} must be a finite number[ or None], got {value!r}")`` (an integer
    too large for a float named by its size in bits)."""
    if optional and value is None:
        return value
    if not is_finite_number(value):
        # an int too large for a float: named by its size (its repr may be thousands of
        # digits, or beyond what Python converts to a str)
        got = (
            f"an integer of {value.bit_length()} bits, too large for a float"
            if is_integer(value)
            else repr(value)
        )
        raise ValueError(
            f"{name} must be a finite number{' or None' if optional else ''}, got {got}"
        )
    if isinstance(value, np.integer):
        return int(value)
    # float(), not .item(): np.longdouble's .item() is an np.longdouble
    return float(value) if isinstance(value, np.floating) else value


def first_non_finite(values: Any) -> Optional[tuple[int, ...]]:
    """The index (one integer per axis) of the first NaN or infinite element of
    ``values`` (anything ``np.asarray(values, dtype=float)`` reads, in C order), or ``None``
    when every element is finite: for refusals that name the offending cell."""
    bad = np.argwhere(~np.isfinite(np.asarray(values, dtype=float)))
    return None if len(bad) == 0 else tuple(int(i) for i in bad[0])


def non_finite_in_column(
    table: Any, column: str, keys: Sequence[str]
) -> Optional[tuple[int, Any, str]]:
    """``(count, first value, "key=value, ...")`` of the NaN or infinite values in
    ``table[column]`` (a pandas ``DataFrame``), the first one's row named by those of
    ``keys`` the table has; ``None`` when every value is finite. For refusals of tables
    whose means or figures would skip a NaN."""
    found = first_non_finite(table[column])
    if found is None:
        return None
    row = table.iloc[found[0]]
    # np.asarray(...).tolist(): plain Python values in the message (no np.int64(3))
    where = ", ".join(f"{k}={np.asarray(row[k]).tolist()!r}" for k in keys if k in table)
    count = int((~np.isfinite(np.asarray(table[column], dtype=float))).sum())
    return count, row[column], where


def distinct_labels(values: Iterable[Any]) -> list[Any]:
    """The distinct values of ``values``, in order of first appearance, as plain Python
    values for a message (``0``, not ``np.int64(0)``)."""
    return [np.asarray(value).tolist() for value in dict.fromkeys(values)]


def require_unique_columns(table: Any, what: str) -> None:
    """Refuse a pandas ``DataFrame`` with several columns of one name (``pd.concat([a, b],
    axis=1)`` of two tables that share a column): ``ValueError`` naming them. ``table.router``
    of such a table is a table, not a column: its names were read as labels (the router type
    'router'), rows compared by both columns (``duplicated``: two cells where one column
    repeats a key), or pandas and NumPy failed with their own words (audit 196). ``what``
    names the table."""
    repeated = table.columns[table.columns.duplicated()]
    if len(repeated):
        names = distinct_labels(repeated)
        raise ValueError(
            f"{what} has several columns named {names} (e.g. of pd.concat(axis=1)), so "
            "which one a column name reads is unknown; keep one of each: "
            "table.loc[:, ~table.columns.duplicated()] (if they hold the same values), or "
            "rename them"
        )


def require_columns(table: Any, columns: Sequence[str], what: str, made_by: str = "") -> None:
    """Refuse a ``table`` that is no pandas ``DataFrame`` (``TypeError``) or lacks one of
    ``columns`` (``ValueError("{what} lacks the column(s) [...] (it has [...])")``):
    ``what`` names the table as the caller's argument (``"mass_summary"``), ``made_by`` the
    call that makes it (``"summarize_mass(routing_mass(...))"``), shown as the remedy. The
    one check of a table's columns: a table of another kind (the effects passed as the
    mass summary, two arguments swapped) failed deep inside with pandas' ``KeyError`` or
    "'DataFrame' object has no attribute 'metric'". A table with several columns of one
    name is refused too (`require_unique_columns`)."""
    remedy = f"; pass {made_by}" if made_by else ""
    if not hasattr(table, "columns") or not hasattr(table, "groupby"):
        raise TypeError(f"{what} must be a pandas DataFrame{remedy}, got {type(table).__name__}")
    require_unique_columns(table, what)
    missing = [c for c in dict.fromkeys(columns) if c not in table.columns]
    if missing:
        raise ValueError(
            f"{what} lacks the column(s) {missing} (it has {list(table.columns)}){remedy}"
        )


def require_labelled(table: Any, columns: Sequence[str], what: str) -> None:
    """Refuse a NaN (or ``None``) label in those of ``columns`` that ``table`` (a pandas
    ``DataFrame``) has: ``ValueError`` naming each such column and its number of rows.
    pandas' ``groupby``, ``pivot_table`` and ``unstack`` leave rows with a NaN key out of
    every group, ``nunique`` does not count NaN, and ``==`` matches no NaN, so such rows
    would drop out of a mean (or a second model pass for one) without a word. ``what``
    names the table (``"the mass table"``)."""
    unlabelled = {
        c: n for c in dict.fromkeys(columns) if c in table and (n := int(table[c].isna().sum()))
    }
    if unlabelled:
        raise ValueError(
            f"{what} has NaN labels (column: rows) {unlabelled}: such rows would be left "
            "out of every group without a word; fill them (table.fillna({column: value})) "
            "or drop those rows first"
        )


def _is_text(value: Any) -> bool:
    return isinstance(value, (str, bytes, np.str_, np.bytes_))


def _label_kinds(values: Any) -> set[bool]:
    """The kinds of the labels a pandas ``Series`` holds: ``True`` for text, ``False``
    for numbers (and other labels), each kind once; empty for a column of NaN only. A
    numeric or bool column holds numbers, a pandas string one text; an object or
    categorical one (a categorical one by its categories) the kinds of its distinct
    labels, each tested once (text is never equal to a number, so they have the rows'
    kinds): testing row by row took 0.1 s a column of 300k rows."""
    if values.dtype.name == "category":  # the labels the rows hold, as for object
        labels = values.cat.remove_unused_categories().cat.categories
    elif values.dtype.kind in "biufc" or values.dtype.name in ("str", "string"):
        # numbers, or pandas' string dtypes (text only)
        return {values.dtype.kind not in "biufc"} if bool(values.notna().any()) else set()
    else:
        labels = values.drop_duplicates().dropna()
    return {_is_text(v) for v in labels}


def _kinds_held(tables: Sequence[tuple[str, Any]], column: str) -> dict[bool, str]:
    """The kinds of label (``True``: text, ``False``: numbers, `_label_kinds`) that
    ``column`` holds across ``tables`` (``(what, DataFrame)`` pairs), each with the first
    table holding it; tables without the column are skipped."""
    kinds: dict[bool, str] = {}
    for what, table in tables:
        if column in table:
            for kind in _label_kinds(table[column]):
                kinds.setdefault(kind, what)
    return kinds


def differ_in_kind(tables: Sequence[tuple[str, Any]], column: str) -> bool:
    """Whether ``column`` holds text in one of ``tables`` (``(what, DataFrame)`` pairs) and
    numbers in another (`require_same_kind` refuses it): its labels match across them in
    no row (``0`` is not ``'0'``)."""
    return len(_kinds_held(tables, column)) > 1


def require_same_kind(tables: Sequence[tuple[str, Any]], columns: Sequence[str]) -> None:
    """Refuse a column of ``columns`` that holds text in one of ``tables`` (``(what,
    DataFrame)`` pairs, ``what`` naming the table: ``"the first report"``) and numbers in
    another (seeds ``0, 1`` beside ``'0', '1'``, one table read back from a CSV without
    its dtypes): ``ValueError`` naming the column, the two tables and the remedy (one
    dtype). Matched across the tables, ``0`` and ``'0'`` are two labels: pandas' merge
    failed with its own error ("You are trying to merge on int64 and str columns") and a
    comparison of the keys found none in common. Each table's own column is checked by
    `require_one_kind`; a table without the column, or with NaN labels only, is skipped."""
    for column in dict.fromkeys(columns):
        kinds = _kinds_held(tables, column)
        if len(kinds) > 1:  # in the order of tables (each of one kind, `require_one_kind`)
            held = " and ".join(f"{'text' if t else 'numbers'} in {w}" for t, w in kinds.items())
            raise ValueError(
                f"the column {column!r} holds {held}: 1 and '1' would be "
                f"two different labels, so no row would match; give both one dtype first "
                f"(table.astype({{{column!r}: int}}), or str for text labels)"
            )


def require_one_kind(table: Any, columns: Sequence[str], what: str) -> None:
    """Refuse a column of ``columns`` that ``table`` (a pandas ``DataFrame``) has and whose
    labels mix text and numbers (``1`` and ``'1'``, e.g. one part of a concatenated table
    read back from a CSV): ``ValueError`` naming the column, the kinds with their numbers
    of rows and the remedy (one dtype). As a key, ``1`` and ``'1'`` are two labels, so rows
    that should be one key (a repeated row, one prompt) would be told apart without a word,
    and sorting the keys fails with a bare ``TypeError``. Only object and categorical
    columns can mix (a categorical one by its categories: until audit 120 it was not read,
    and its ``0`` and ``'0'`` were two keys silently); ``what`` names the table (``"the
    mass table"``)."""

    for column in dict.fromkeys(columns):
        if column not in table:
            continue
        values = table[column]
        if len(_label_kinds(values)) > 1:
            values = values.astype(object).dropna()
            text = values.map(_is_text)
            shown = (values[text].iloc[0], values[~text].iloc[0])
            raise ValueError(
                f"{what}'s column {column!r} mixes text and numbers ({int(text.sum())} text "
                f"and {int((~text).sum())} other labels, e.g. {shown[0]!r} and {shown[1]!r}): "
                "1 and '1' would be two different labels; give the column one dtype "
                f"first (table.astype({{{column!r}: int}}), or str for text labels)"
            )


def require_keys(table: Any, columns: Sequence[str], what: str) -> None:
    """Refuse key columns that cannot be grouped or matched by: a NaN label
    (`require_labelled`) or labels that mix text and numbers (`require_one_kind`) in those
    of ``columns`` that ``table`` (a pandas ``DataFrame``) has; ``what`` names the table.
    The one check of the columns a table is grouped, matched (``==``) or merged by; not of
    an effects table's ``family`` (or ``group``) column, which may mix family names and
    source indices (`plan_ablations`' families) by design."""
    require_labelled(table, columns, what)
    require_one_kind(table, columns, what)


# the columns that tell models, bands or groups apart: the ones a repeated row's message
# names where its rows differ in them (the column to split or select by)
LABEL_COLUMNS = ("condition", "seed", "model", "band", "group")


def repeated_cell(table: Any, keys: Sequence[str]) -> Optional[tuple[int, Any]]:
    """The first cell of ``keys`` that ``table`` (a pandas ``DataFrame``) holds several
    rows of: ``(position, rows)``, the position of its first repeated row (the one
    ``duplicated`` marks) and a boolean array over the table's rows, ``True`` for each row
    of that cell; ``None`` where no cell repeats. Keys are matched as ``duplicated``
    matches them, by their factorisation (NaN and ``<NA>`` equal to each other, ``0`` and
    ``'0'`` two labels): ``rows == first`` read a nullable column's ``<NA> == 1`` as
    equal (a row without the key counted in the cell) and failed on a missing key."""
    keys = list(dict.fromkeys(keys))
    repeated = table.duplicated(keys).to_numpy()
    if not repeated.any():
        return None
    at = int(np.flatnonzero(repeated)[0])
    codes = np.stack([table[k].factorize()[0] for k in keys], axis=1)
    return at, (codes == codes[at]).all(axis=1)


def require_one_row(table: Any, keys: Sequence[str], what: str, remedy: str) -> None:
    """Refuse a ``table`` (a pandas ``DataFrame`` with the columns ``keys``) with several
    rows for one value of ``keys``: ``ValueError("{what} has several rows for router='a',
    family='x' (they differ in ['seed']): 2 rows of one ('router', 'family'), where it must
    hold one; {remedy}")``, naming the first repeated cell, its number of rows, the key
    columns, the `LABEL_COLUMNS` outside ``keys`` its rows differ in (where any do) and
    the caller's ``remedy`` (pass one model's table, ...). The one check of "one row per
    cell" before a table is indexed, paired or drawn by ``keys`` (several seeds' rows of a
    cell were paired with each other, drawn on top of each other or read as one); ``what``
    names the table. Keys are matched as pandas' ``duplicated`` matches them (NaN equal
    to NaN; `repeated_cell`). A table with several columns of one name is refused
    (`require_unique_columns`: it passed whatever its rows, audit 196)."""
    require_unique_columns(table, what)
    keys = list(dict.fromkeys(keys))
    found = repeated_cell(table, keys)
    if found is None:
        return
    at, same = found
    first = table[keys].iloc[at]
    cell = ", ".join(f"{k}={np.asarray(first[k]).tolist()!r}" for k in keys)
    shared = table[same]
    differ = [
        c
        for c in LABEL_COLUMNS
        if c in table and c not in keys and shared[c].nunique(dropna=False) > 1
    ]
    raise ValueError(
        f"{what} has several rows for {cell}"
        + (f" (they differ in {differ})" if differ else "")
        + f": {int(same.sum())} rows of one {tuple(keys)}, where it must hold one; {remedy}"
    )


def require_decisions(
    table: Any,
    column: str,
    keys: Sequence[str],
    what: str,
    reason: str = "a missing decision would count as not present",
    remedy: str = (
        "pass the table motif_report made (read back from a CSV, every cell of the column "
        "True or False)"
    ),
) -> None:
    """Refuse a ``column`` of ``table`` (a pandas ``DataFrame``) that holds anything but a
    decision in some row: ``ValueError`` naming the number of such rows and the first one's
    value, by those of ``keys`` the table has, then ``reason`` (what reading it would do)
    and ``remedy``. ``what`` names the table. A decision is a value equal to ``True`` or
    ``False`` (``isin``): a Python or NumPy boolean, or the number 1 / 0 (a CSV column of
    1 and 0), each read as the boolean it equals; NaN (an empty cell of a CSV read back),
    text (``"False"``, true to Python) and any other number are refused. The one rule of a
    column of decisions: ``present`` of a claim (counted: "present in k of n seeds") and a
    mass summary's ``family_read`` (`require_family_read_column`), which had each their
    own until review 170 (``present`` refused the 1 / 0 that ``family_read`` read)."""
    values = table[column]
    if values.dtype == bool:
        return
    bad = ~values.isin([True, False]).to_numpy(dtype=bool)
    if bad.any():
        row = table.iloc[int(np.flatnonzero(bad)[0])]
        where = ", ".join(f"{k}={np.asarray(row[k]).tolist()!r}" for k in keys if k in table)
        raise ValueError(
            f"{what}'s column {column!r} must hold True or False (a decision) in every row, "
            f"but {int(bad.sum())} row(s) hold other values (first: "
            f"{np.asarray(row[column]).tolist()!r} at {where}): {reason}; {remedy}"
        )


def non_finite_tensors(named: Any) -> list[tuple[str, int]]:
    """``(name, number of NaN or infinite elements)`` for every floating tensor of
    ``named`` (a mapping or ``(name, tensor)`` pairs) that has any, in the order given.

    The scan is one ``aminmax`` per tensor (NaN propagates through both, so a tensor is
    finite iff its minimum and maximum are; 27 GB/s on one thread of this machine's CPU
    for a warm, contiguous tensor, so it costs little next to reading the weights); only a
    tensor that fails it is counted element by element."""
    import torch

    items = named.items() if hasattr(named, "items") else named
    out = []
    for name, tensor in items:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        low, high = torch.aminmax(tensor.detach())
        if not (torch.isfinite(low) and torch.isfinite(high)):
            out.append((name, int((~torch.isfinite(tensor.detach())).sum())))
    return out


class AmbiguousIndexError(ValueError, IndexError):
    """A ``torch.uint8`` tensor given as an index (`refuse_uint8_index`): both a
    ``ValueError`` (what the analyses raise for a bad argument) and an ``IndexError``
    (what ``TaskBatch[...]`` raises, as NumPy does)."""


def refuse_uint8_index(name: str, value: Any) -> None:
    """The package's one rule for a torch tensor used as an index (``pos_slice``,
    ``batch_slice``, ``neuron_slice``, ``positions``, ``TaskBatch`` rows): a ``torch.bool``
    tensor is a mask (as torch, NumPy and TransformerLens read it) where the argument takes
    masks; a ``torch.uint8`` tensor of one or more dimensions raises `AmbiguousIndexError`:
    torch reads it as a (deprecated) mask, so TransformerLens's ``Slice``, which hands it
    to torch, takes ``[0, 1, 1, 0]`` as positions 1 and 2, while NumPy, TransformerLens's
    documentation and the package's other unsigned integers read it as indices 0, 1, 1, 0.
    A 0-d one is the integer it holds (as TransformerLens's ``to_python_int`` reads it),
    and NumPy unsigned arrays are indices (as in NumPy: `unsigned_as_int64`); a ``Slice``
    holds a NumPy array (TransformerLens converts a tensor), so ``Slice(t)`` of a uint8
    tensor is read as NumPy's uint8 array."""
    import torch

    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.ndim > 0:
        raise AmbiguousIndexError(
            f"{name} is a torch.uint8 tensor, which is ambiguous as an index: torch (and "
            "TransformerLens's Slice, which hands it to torch) reads it as a deprecated mask, "
            f"NumPy as indices; pass {name}.bool() for a mask or {name}.long() for indices"
        )


def unsigned_as_int64(value: Any) -> Optional[np.ndarray]:
    """``value`` as an int64 NumPy array if it holds unsigned integers, else ``None``: a
    NumPy or torch array or a NumPy scalar of an unsigned type, or a list / tuple that
    NumPy reads as one (of NumPy unsigned scalars, or of Python ints past int64). An index
    or position of an unsigned type is an integer like any other, but torch reads a uint8
    index array as a mask and compares a uint8 position with ``-n_pos`` wrapped around
    (``np.uint8(1) < -5``), so the analyses read them as int64. ``ValueError`` for a value
    past int64 (its cast would wrap: ``2**64 - 1`` is -1), which is no index of any run;
    the caller names its argument."""
    import torch

    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype.is_signed or dtype == torch.bool:
            return None
        unsigned = value.detach().cpu().numpy()
    elif isinstance(value, (np.ndarray, np.generic)):
        unsigned = np.asarray(value)
    elif isinstance(value, (list, tuple)):
        try:
            unsigned = np.asarray(value)
        except (ValueError, TypeError):  # ragged, or what NumPy cannot read
            return None
    else:
        return None
    if unsigned.dtype.kind != "u":
        return None
    if unsigned.size and unsigned.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{value!r} holds an integer past int64, no index of any run")
    return unsigned.astype(np.int64)


def one_or_list(name: str, value: Any) -> list[Any]:
    """``[value]`` for one name or index (a string, an integer as `is_integer` says, or a
    ``bool``, kept so that the caller refuses it by name), else `as_items` (``value``
    read once as a list; a non-iterable such as ``2.5`` refused by ``name``): the
    selections that take one item or a list (sources, labels, families, routers)."""
    if isinstance(value, (str, bool)) or is_integer(value):
        return [value]
    return as_items(name, value)


def as_items(name: str, value: Any) -> list[Any]:
    """``value`` as a list, read once (a generator, an iterator, a range, a tuple or a
    NumPy array are lists of their items), or ``ValueError("{name} must be a list ...,
    got {value!r}")`` for a value that is no iterable (``list(0)`` said "'int' object is
    not iterable", naming no argument). Take this list and use it from then on: a
    generator read a second time is empty. A 0-d NumPy array or tensor is refused too: it
    is an Iterable that cannot be iterated ("iteration over a 0-d array")."""
    if getattr(value, "ndim", None) == 0:
        raise ValueError(
            f"{name} must be a list (or a tuple, range, array or generator) of items, got the "
            f"0-d {type(value).__name__} {value!r}: pass [value.item()] for its one item"
        )
    if not isinstance(value, Iterable):
        raise ValueError(
            f"{name} must be a list (or a tuple, range, array or generator) of items, got {value!r}"
        )
    return list(value)


def require_selection(
    name: str,
    items: Iterable[Any],
    labels: Optional[Sequence[Any]] = None,
    why: str = "the sweep would have no cell",
    written: Optional[Sequence[Any]] = None,
) -> list[Any]:
    """``items`` as a list if it names at least one thing and nothing twice (compared by
    ``labels``, one per item, e.g. a metric's name; by the items themselves when
    ``None``); otherwise ``ValueError("{name} is empty: {why}; give at least one")`` or
    ``ValueError("{name} repeats ...")``: a repeated entry would give the same rows (or
    hooks) twice, silently. The one check of every list a sweep or intervention takes
    (families, routers, metrics, methods, positions). ``items`` may be any iterable
    (`as_items`: it is read once; use the returned list), anything else is refused by
    ``name``. ``written``: what the caller wrote, one per item, when the items (or
    labels) are normalised forms of it: the message shows it, and the normalised keys
    when they differ (positions ``[1, -6]`` of a 7-token run: "got [1, -6], read as
    [1, 1]"; it showed only ``[1, 1]``)."""
    items = as_items(name, items)
    if not items:
        raise ValueError(f"{name} is empty: {why}; give at least one")
    keys = list(items if labels is None else labels)
    repeated = [key for index, key in enumerate(keys) if key in keys[:index]]
    if repeated:
        got = keys if written is None else list(written)
        read = "" if got == keys else f", read as {keys}"
        raise ValueError(
            f"{name} repeats {list(dict.fromkeys(repeated))} (got {got}{read}): each entry "
            "would give the same rows again; give each once"
        )
    return items
