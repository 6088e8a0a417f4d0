"""Argument checks shared by every part of the package (a leaf module: no package imports).

One rule for "an integer": a Python ``int`` that is not a ``bool`` (``True`` is an ``int``
in Python, but ``n_layers=True`` is a mistake, not 1), and one wording for the error.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, TypeGuard

import numpy as np


def is_integer(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is a Python ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_integral(value: Any) -> TypeGuard[int]:  # NumPy integers act as ints where it is used
    """Whether ``value`` is a Python or NumPy integer (any ``numbers.Integral``) and not a
    ``bool``: for values that are only read (token ids, seeds), not stored in a config."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_integer(
    name: str, value: Any, minimum: Optional[int] = None, optional: bool = False
) -> Any:
    """``value`` if it is an integer (`is_integer`) ``>= minimum`` (no bound if ``None``),
    or ``None`` when ``optional``; otherwise ``ValueError("{name} must be an integer >=
    {minimum}[ or None], got {value!r}")``."""
    if optional and value is None:
        return value
    if not is_integer(value) or (minimum is not None and value < minimum):
        kind = "an integer" + ("" if minimum is None else f" >= {minimum}")
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
    return value


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite Python ``int`` or ``float`` (not a ``bool``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_finite_number(name: str, value: Any, optional: bool = False) -> Any:
    """``value`` if it is a finite number (`is_finite_number`), or ``None`` when
    ``optional``; otherwise ``ValueError("{name} must be a finite number[ or None], got
    {value!r}")``."""
    if optional and value is None:
        return value
    if not is_finite_number(value):
        raise ValueError(
            f"{name} must be a finite number{' or None' if optional else ''}, got {value!r}"
        )
    return value


def first_non_finite(values: Any) -> Optional[tuple[int, ...]]:
    """The index (one integer per axis) of the first NaN or infinite element of
    ``values`` (anything ``np.asarray(values, dtype=float)`` reads, in C order), or ``None``
    when every element is finite: for refusals that name the offending cell."""
    bad = np.argwhere(~np.isfinite(np.asarray(values, dtype=float)))
    return None if len(bad) == 0 else tuple(int(i) for i in bad[0])
