"""Percentile bootstrap confidence intervals over prompts."""

from __future__ import annotations

import math
import warnings
from typing import Any, Union

import numpy as np
import torch

from hooked_attnres._study_limits import MAX_BOOTSTRAP, WHY_MAX_BOOTSTRAP
from hooked_attnres._validation import is_finite_number, require_finite_number, require_integer


def as_numpy(values) -> np.ndarray:
    """A float64 NumPy array of a tensor on any device (or of any array-like): the one
    place where the analyses move results to the host, once per table. Values that are no
    numbers (strings, ``["1", "2"]``, which NumPy parsed as 1.0 and 2.0, or an object
    array holding text) raise ``TypeError``, and so do values of a dtype that is no real
    number (complex, whose imaginary part NumPy dropped with a warning, or a datetime, read
    as its count of days); booleans are read as 0 and 1."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    held = np.asarray(values)
    kind = held.dtype.kind
    if kind == "O":  # numbers (or booleans) held as objects are read as before
        text = any(isinstance(v, (str, bytes)) for v in held.ravel())
    else:
        text = kind in "US"
    if text:
        raise TypeError(
            f"values must be numbers (an array or tensor of a numeric dtype), got dtype "
            f"{held.dtype}{' holding text' if kind == 'O' else ''}: text is not "
            "parsed as numbers; convert it first (e.g. table[column].astype(float))"
        )
    if kind not in "biufO":  # complex, datetime, ...: the text's remedy would be wrong
        raise TypeError(
            f"values must be real numbers (an array or tensor of a numeric dtype), got dtype "
            f"{held.dtype}; take the real quantity to analyse first (e.g. values.real)"
        )
    return np.asarray(held, dtype=np.float64)


def bootstrap_ci(
    values, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` ``[n]`` and its percentile-bootstrap interval.

    Resamples prompts with replacement ``n_resamples`` times (seeded, so the interval is
    reproducible) and takes the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    quantiles of the resampled means.

    Returns:
        ``(mean, low, high)``.

    Raises:
        ValueError: ``values`` that are not one axis ``[n]`` (a number, ``3.0``, failed
            with NumPy's "too many indices for array"; for rows use `bootstrap_ci_rows`),
            or of no values (``[]``: named by its shape ``(0,)``; review 185: it named the
            ``(1, 0)`` of the one-row table built for `bootstrap_ci_rows`).
    """
    values = as_numpy(values)
    if values.ndim != 1:
        raise ValueError(
            f"values must be [n] (one number per prompt), got shape {values.shape}; for "
            "several rows [rows, n] use bootstrap_ci_rows"
        )
    if len(values) == 0:  # named by its own shape, not by the [1, 0] table built below
        raise ValueError(
            f"values must hold at least one number (one per prompt), got shape {values.shape}: "
            "the mean of no values is undefined"
        )
    mean, low, high = bootstrap_ci_rows(values[None, :], n_resamples, confidence, seed)
    return float(mean[0]), float(low[0]), float(high[0])


def check_bootstrap(
    n_resamples: Any, confidence: Any, seed: Any, resamples_name: str = "n_resamples"
) -> tuple[int, float, int]:
    """The bootstrap's arguments, checked (analyses call it before their forward passes),
    as Python numbers (NumPy scalars are accepted: `hooked_attnres._validation`). The
    count is refused under ``resamples_name``, the name the caller's caller wrote (the
    analyses take it as ``n_bootstrap``; "n_resamples must be ..." named an argument
    they do not have), and past `MAX_BOOTSTRAP` (100000) too: the resampled means of every
    row are held at once, so ``ablation_effects(..., n_bootstrap=10**12)`` ran its whole
    sweep before it failed allocating 175 TiB (audit 127)."""
    if not is_finite_number(confidence) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    return (
        require_integer(
            resamples_name, n_resamples, 1, maximum=MAX_BOOTSTRAP, why_maximum=WHY_MAX_BOOTSTRAP
        ),
        require_finite_number("confidence", confidence),
        require_integer("seed", seed, 0),
    )


def level_text(confidence: float) -> str:
    """An interval's level as the report and the figures write it: ``0.95`` -> ``"95 %"``,
    six significant digits, more where those would read 100 % or 0 %, levels no interval
    has (review 182: ``0.9999999`` read "100 %")."""
    percent = 100 * float(confidence)
    for digits in range(6, 18):
        text = f"{percent:.{digits}g}"
        if 0 < float(text) < 100:
            break
    return f"{text} %"


def min_resamples(confidence: float) -> int:
    """The fewest bootstrap resamples that put one resampled mean, or more, in each tail
    that a ``confidence`` interval cuts off (``(1 - confidence) / 2`` of the resamples:
    ``n * 2.5 % >= 1`` at 95 %): ``2 / (1 - confidence)`` (40 at 95 %, 200 at 99 %). With
    fewer, each bound is read between the two most extreme resampled means on its side and
    the interval covers the mean less often than its level says (review 202: this said
    "at least one resampled mean beyond each bound", which every count of two or more
    resamples leaves)."""
    return math.ceil(2 / (1 - confidence) - 1e-9)  # 1e-9: 2 / (1 - 0.9) is 20.000000000000004


def too_few_resamples(n_resamples: int, confidence: float) -> bool:
    """Whether ``n_resamples`` is below `min_resamples` for ``confidence``."""
    return n_resamples < min_resamples(confidence)


def too_few_resamples_text(given: str, confidence: float) -> str:
    """The warning of `too_few_resamples`, the count written as the caller gave it
    (``given``: ``"n_bootstrap=10"`` in Python, ``"--bootstrap 10"`` on the command line)."""
    return (
        f"{given} leaves fewer than one resampled mean per {level_text((1 - confidence) / 2)} "
        f"tail of a {level_text(confidence)} interval (it needs at least "
        f"{min_resamples(confidence)}): the bounds are read between the most extreme resampled "
        "means and the interval covers the mean less often than its level says"
    )


def bootstrap_ci_rows(
    values: Union[np.ndarray, torch.Tensor],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    *,
    resamples_name: str = "n_resamples",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise `bootstrap_ci` of ``values`` ``[rows, n]`` with the *same* resampled
    prompts for every row (so that rows stay paired). ``resamples_name``: the name under
    which a refusal or the too-few-resamples warning gives the count (`check_bootstrap`;
    the analyses pass ``"n_bootstrap"``, the argument their caller wrote).

    Returns:
        ``(mean, low, high)``, each ``[rows]``. A row that holds NaN or an infinite value
        has no interval: its ``low`` and ``high`` are NaN (its mean is the plain mean, NaN
        or infinite) and a ``RuntimeWarning`` names it (resampled means with and without
        an infinite value would otherwise give one finite, meaningless bound). With one
        prompt (``n = 1``) every resample is that prompt, so there is no interval: ``low``
        and ``high`` are NaN and a ``RuntimeWarning`` says so (the mean is returned).
        Fewer than ``2 / (1 - confidence)`` resamples (40 at 95 %) leave less than one
        resampled mean per tail the interval cuts off (`min_resamples`): the interval is
        returned with a ``RuntimeWarning`` (its coverage falls short of ``confidence``:
        75 % for a 95 % interval of 10 resamples of 30 normal values, 0 % for 1 resample).
    """
    values = as_numpy(values)
    if values.ndim != 2 or values.shape[1] < 1:
        raise ValueError(f"values must be [rows, n] with n >= 1, got shape {values.shape}")
    n_resamples, confidence, seed = check_bootstrap(n_resamples, confidence, seed, resamples_name)
    n = values.shape[1]
    if n == 1:
        warnings.warn(
            "a bootstrap interval needs at least 2 prompts; with 1 the interval is "
            "undefined and is returned as NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        nan = np.full(values.shape[0], math.nan)
        return values.mean(axis=1), nan, nan.copy()
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite).tolist()
        warnings.warn(
            f"row(s) {rows[:8]}{' ...' if len(rows) > 8 else ''} of the bootstrap hold NaN "
            "or infinite values: their interval is undefined and is returned as NaN",
            RuntimeWarning,
            stacklevel=2,
        )
    if too_few_resamples(n_resamples, confidence):
        warnings.warn(
            too_few_resamples_text(f"{resamples_name}={n_resamples}", confidence),
            RuntimeWarning,
            stacklevel=2,
        )
    rng = np.random.default_rng(seed)  # the resamples depend on n and the seed only
    kept = values[finite]
    means = np.empty((kept.shape[0], n_resamples))
    for start in range(0, n_resamples, 256):  # bounded memory: rows x 256 x n at a time
        stop = min(n_resamples, start + 256)
        index = rng.integers(0, n, size=(stop - start, n))
        means[:, start:stop] = kept[:, index].mean(axis=-1)
    alpha = (1 - confidence) / 2
    low, high = np.full((2, values.shape[0]), math.nan)
    if kept.shape[0]:
        low[finite], high[finite] = np.quantile(means, [alpha, 1 - alpha], axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf in a row: NaN, as documented
        mean = values.mean(axis=1)
    return mean, low, high
