"""Routing mass: how much weight each source family gets, per router, layer and prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from hooked_attnres._precision import sum_where
from hooked_attnres._study_limits import grid_condition_depth
from hooked_attnres._validation import (
    differ_in_kind,
    is_integer,
    non_finite_in_column,
    repeated_cell,
    require_columns,
    require_decisions,
    require_integer,
    require_labelled,
    require_one_kind,
    require_selection,
)
from hooked_attnres.analysis.bootstrap import as_numpy, bootstrap_ci_rows, check_bootstrap
from hooked_attnres.interventions.checks import check_count
from hooked_attnres.interventions.routing import require_whole_batch_means
from hooked_attnres.interventions.selection import BAND_NAMES, depth_bands, position_index
from hooked_attnres.model.depth import FAMILIES, RouterSite
from hooked_attnres.model.passes import padding_of
from hooked_attnres.tasks.base import TaskBatch, require_prompts

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

Positions = Union[str, Sequence[int], Tensor]
# what to pass for one position per prompt (a [batch, 1] positions tensor is refused)
PER_PROMPT = "pass answer_pos= ([batch], with positions='answer')"


def band_of(layer: Union[RouterSite, Optional[int]], bands: dict[str, list[int]]) -> str:
    """The band a layer (or a router site) belongs to (``"final"`` for the final router).
    A layer that is no integer (`require_integer`: ``"0"``, ``0.0``) is refused: no band
    holds it, so it was put in ``"other"`` without a word. A negative layer is refused
    naming the remedy: ``-1`` is a table's final router (`RouterSite.table_layer`), whose
    band is ``"final"`` (pass ``None`` or its `RouterSite`), or a Python index of the last
    layer (pass ``n_layers - 1``); it was ``"other"`` too."""
    if isinstance(layer, RouterSite):
        if layer.is_final:
            return "final"
        layer = layer.layer
    if layer is None:  # the final router given as (None, "final_res")
        return "final"
    if is_integer(layer) and layer < 0:
        raise ValueError(
            f"band_of's layer must be an integer >= 0, got {layer!r}: a mass table's layer "
            "-1 is the final router (band 'final': pass None or its RouterSite), and a "
            "layer counted from the end is no layer (pass n_layers - 1 for the last)"
        )
    layer = require_integer("band_of's layer", layer, 0)
    for name, layers in bands.items():
        if layer in layers:
            return name
    return "other"


def require_family_rows(
    summary: pd.DataFrame,
    routers: Sequence[str],
    what: str,
    remedy: str = "summarize_mass(routing_mass(...), by=('router', 'family')) of the same model",
) -> None:
    """Raise unless ``summary`` (a table with ``router`` and ``family`` columns: a
    `summarize_mass` table, or the effects of `ablation_effects`) has a row for every
    family at each of ``routers``: `routing_mass` (`ablation_effects` with its default
    families) gives every family a row at every router (mass or effect 0 where it is
    absent), so a missing row means a filtered or foreign table, and reading it as 0 or
    leaving the family out would be a silent wrong number. ``remedy`` says what to pass."""
    have = set(zip(summary.router, summary.family, strict=True))
    missing = [(router, family) for router in routers for family in FAMILIES]
    missing = [pair for pair in missing if pair not in have]
    if missing:
        raise ValueError(f"{what} lacks the (router, family) rows {missing}; pass {remedy}")


def family_read(mass: pd.DataFrame, what: str) -> pd.Series:
    """Per row of a `routing_mass` table: whether its router reads a source of its family
    (``n_sources > 0``). A family the router does not read has mass 0, as does one it reads
    and gives no weight; only ``n_sources`` tells them apart (not ``mass != 0``, which an
    underflowed weight also fails). ``what`` names the result that needs it: a table
    without ``n_sources`` (made before audit 51, or by hand) is refused."""
    if "n_sources" not in mass.columns:
        raise ValueError(
            f"mass lacks the column 'n_sources' (how many sources of each family a router "
            f"reads), which {what} needs: without it a family the router does not read "
            "(mass 0) cannot be told from one that gets no weight, and would be read as 0 "
            "(drawn as 0.00). Pass routing_mass output or a study's mass.csv of this version "
            "(one written before n_sources existed lacks it: run it again), or add the "
            "column to your table: len(model.routing_layout.families(site)[family]) for the "
            "site of each row's router and layer"
        )
    keys = ("condition", "seed", "router", "layer", "family")
    found = non_finite_in_column(mass, "n_sources", keys)
    if found is not None:  # NaN > 0 is False: the family would read as absent
        raise ValueError(
            f"mass holds {found[0]} non-finite 'n_sources' value(s) (first: {found[1]} at "
            f"{found[2]}), which {what} would read as a family the router does not read; "
            "recompute the table with routing_mass"
        )
    return mass.n_sources > 0


def require_summary_and_effects(
    mass_summary: pd.DataFrame, effects: pd.DataFrame, extra: Sequence[str] = ()
) -> None:
    """The columns of a mass summary and an effects table read side by side
    (`motif_report`, `dissociation_report`), `require_columns`, ``extra`` effects columns
    too (`motif_report` reads ``clean``): the two tables swapped failed with "'DataFrame'
    object has no attribute 'metric'"."""
    require_columns(
        mass_summary,
        ("router", "family", "mass"),
        "mass_summary",
        "summarize_mass(routing_mass(...)), the first argument",
    )
    require_columns(
        effects,
        ("router", "group", "family", "metric", "effect", "ci_low", "ci_high", *extra),
        "effects",
        "ablation_effects(...), the second argument",
    )


def require_family_read_column(mass_summary: pd.DataFrame, what: str) -> None:
    """Refuse a mass summary without a True / False ``family_read`` column (`summarize_mass`
    of a table without ``n_sources``, a ``mass_summary.csv`` written before audit 53, or a
    hand-made table): a family absent at every router of a type has mass 0 there, as has
    one its routers read and give no weight (an underflowed weight), and only
    ``family_read`` tells them apart. ``what`` names the result that needs it."""
    if "family_read" not in mass_summary.columns:
        raise ValueError(
            "mass_summary lacks the column 'family_read' (whether some router of the group "
            f"reads the family), which {what} needs: without it a family no router reads "
            "(mass 0) cannot be told from one that gets no weight, and would be drawn as 0 "
            "or ranked as present; pass summarize_mass(routing_mass(...)) (routing_mass "
            "gives n_sources, from which summarize_mass derives family_read)"
        )
    require_decisions(  # the one rule of a True / False column
        mass_summary,
        "family_read",
        ("condition", "seed", "model", "router", "band", "family"),
        "mass_summary",
        f"{what} cannot read them as whether a router reads the family",
        "pass summarize_mass(routing_mass(...)) of one model",
    )


def require_masked_column(effects: pd.DataFrame, what: str) -> None:
    """Refuse effects without ``n_masked_routers`` (a hand-made table), or with a NaN or
    infinite value in it (an empty cell of a CSV, a row a merge did not match): only it
    tells an ablation that masked nothing (effect 0 by construction) from a measured 0, and
    NaN is not 0, so such a row would be shown as measured. ``what`` names the result that
    needs it (the study report's tables, the effect figures)."""
    if "n_masked_routers" not in effects.columns:
        raise ValueError(
            "effects lacks the column 'n_masked_routers' (how many routers each ablation "
            f"masked), needed by {what}: without it an ablation that masked nothing "
            "(effect 0 by construction) would be shown as a measured 0; pass "
            "ablation_effects output (a run_study result)"
        )
    keys = ("condition", "seed", "router", "group", "family", "metric")
    found = non_finite_in_column(effects, "n_masked_routers", keys)
    if found is not None:
        raise ValueError(
            f"effects holds {found[0]} non-finite 'n_masked_routers' value(s) (first: "
            f"{found[1]} at {found[2]}), which {what} cannot read: an ablation that masked "
            "nothing (effect 0 by construction) there would be shown as a measured effect; "
            "pass ablation_effects output (a run_study result) with every row's count (an "
            "empty cell of a CSV or a merge that did not match leaves NaN)"
        )


def masked_nothing(effects: pd.DataFrame, what: str) -> pd.Series:
    """Per row of an `ablation_effects` table: whether its ablation masked no router
    (``n_masked_routers`` 0: no router of the group reads the family, or each that does was
    left alone), so that its effect is 0 by construction, not a measured 0. The one rule of
    the report's "–" cells and the figures' blanks; a table without the column is refused
    (`require_masked_column`, ``what`` naming the result that needs it)."""
    require_masked_column(effects, what)
    return effects.n_masked_routers.eq(0)


def require_read_agrees(read: pd.Series, masked: Optional[pd.Series], where: str) -> None:
    """Refuse effects that masked routers (``masked``: `ablation_effects`'
    ``n_masked_routers`` by family) for a family the mass summary says no router reads
    (``read``: its ``family_read`` by family): an ablation masks only sources a router
    reads, so the two tables are of different models. ``masked`` ``None``: nothing to
    check (a table without the column)."""
    if masked is None:
        return
    clash = [f for f in read.index[read.eq(False)] if masked.get(f, 0) > 0]
    if clash:
        raise ValueError(
            f"at {where}, mass_summary says no router reads {clash} but the effects "
            f"masked {int(masked[clash[0]])} router(s) for {clash[0]!r}: the tables are "
            "of different models"
        )


def layers_text(layers: Sequence[int]) -> str:
    """A group's layers as a table's ``layers`` cell: ascending, comma-separated
    (``""``: none, the final router's group); the one writer of the column, for
    `ablation_effects`, `attribute_routing`'s tables and `summarize_mass` (`layer_tuple`
    reads it)."""
    return ",".join(map(str, sorted(set(layers))))


def _integer_text(text: str) -> Optional[int]:
    """The integer ``text`` writes, ``None`` if it writes none: digits (any that
    ``str.isdigit`` and ``int`` both take, ``"\u0663"`` too), after at most one ``-``, with
    spaces around (``"3"``, ``" -1 "``); not ``"+3"``, ``"1_0"``, ``"1.5"`` or ``""``. The
    one parser of a layer's text, for `_layer_number` (a ``layer`` label) and `layer_tuple`
    (each part of a ``layers`` cell), which had each their own (audit 147); theirs raised
    ``int``'s "invalid literal" for ``"--1"`` or ``"\u00b2"`` (digits to ``isdigit``, not to
    ``int``), refused now by the callers' messages."""
    text = text.strip()
    digits = text[1:] if text.startswith("-") else text
    if not digits.isdigit():
        return None
    try:
        return int(text)
    except ValueError:  # "\u00b2": a digit to isdigit, no number to int
        return None


def _layer_number(label: object) -> float:
    """One ``layer`` label as the number it is (`integer_layers` keeps it if whole): an
    integer, a float, or the text of an integer (``"3"``, ``"-1"``); NaN for anything
    else (a bool, text such as ``"a"`` or ``"1.5"``), which is then refused."""
    if isinstance(label, (bool, np.bool_)):
        return float("nan")
    if isinstance(label, str):
        number = _integer_text(label)
        return float("nan") if number is None else float(number)
    if isinstance(label, (int, np.integer, float, np.floating)):
        return float(label)
    return float("nan")


def integer_layers(table: pd.DataFrame, what: str) -> pd.DataFrame:
    """``table`` with its ``layer`` column as integers (``int64``), the one rule for a
    table's layers: integers, floats that are whole numbers and the text of an integer,
    each taken exactly as that integer (``0.0`` is layer 0: a CSV read back gives a float
    column where some cell of it is empty, as `layer_tuple` reads a one-layer cell
    ``3.0``; ``"0"`` is layer 0: a column made text, ``astype(str)``, or read with
    ``dtype=str``); a float that is not a whole number (``1.5``, never rounded), NaN,
    infinite, a missing value of a nullable integer column (``<NA>``: a CSV's empty cell
    read with ``dtype_backend=``), or a text that is no integer (``"a"``, ``"1.5"``) raises
    ``ValueError`` naming ``what`` (the table), how many rows and the first one. A table
    without ``layer``, or with integer layers (none missing), is returned as it is; a
    categorical column is read by its labels (review 140: float categories as floats),
    each distinct label once, and a column that may mix bools with numbers (``infer_dtype``
    "mixed" or "mixed-integer") row by row: ``True == 1``, so a bool among integers was
    read as layer 1 (review of audit 142). Until audit 137
    `summarize_mass` wrote a float column's layers as ``"0.0,1.0"``, which every pairing
    with the effects then refused as "not a list of layers", and ``1.5`` as ``"0.0,1.5"``,
    silently; until audit 142 a text column's as ``"0,1,10,11,2,...,9"`` (text order) and
    the final router's ``"-1"`` (no ``-1``), so its pairing with group ``"final"`` was
    refused as "of layers [-1]"."""
    if "layer" not in table.columns:
        return table
    values = table["layer"]
    if values.dtype.kind in "iu" and not values.isna().any():  # <NA>: a nullable dtype's
        return table
    if values.dtype.kind == "f":
        floats = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    else:  # object, text or categorical: each distinct label read once
        labels = values.astype(object)
        number = {label: _layer_number(label) for label in labels.dropna().unique()}
        floats = labels.map(number).to_numpy(dtype=float)
        if pd.api.types.infer_dtype(labels, skipna=True) in ("mixed", "mixed-integer"):
            # True equals 1 (and hashes as it): among numbers a bool shares 1's distinct
            # label, and was read as layer 1 (or, first, made the 1s "no layer"); a
            # column of mixed kinds is read row by row
            floats = labels.map(_layer_number, na_action="ignore").to_numpy(dtype=float)
    whole = np.isfinite(floats) & (floats == np.floor(floats))
    if not whole.all():
        bad = np.flatnonzero(~whole)
        first = np.asarray(values.iloc[bad[0]]).tolist()  # 1.5, not np.float64(1.5)
        raise ValueError(
            f"{what}'s column 'layer' holds {len(bad)} value(s) that are no layer (a whole "
            f"number), e.g. {first!r} in row {bad[0]}: a layer is an integer "
            "(a whole float such as 1.0, or its text '1', is taken as it), and a value such "
            "as 1.5 is not rounded; fix or drop those rows first"
        )
    return table.assign(layer=floats.astype(np.int64))


def layer_tuple(cell: object, what: str) -> tuple[int, ...]:
    """A ``layers`` cell (`layers_text`; `ablation_effects`' and `summarize_mass`'s
    column) as a tuple of layers: the text ``"0,1,2"``, one layer read back from a CSV as
    a number (``3`` or ``3.0``), or none (``""``, or the missing value a CSV gives an
    empty cell: NaN, or ``<NA>`` read with pandas' nullable dtypes, ``dtype_backend=``).
    ``what`` names the table in the message refusing anything else."""
    if cell is None or (
        not isinstance(cell, str) and pd.api.types.is_scalar(cell) and pd.isna(cell)
    ):
        return ()
    if isinstance(cell, (bool, np.bool_)):
        raise ValueError(f"{what}'s 'layers' holds {cell!r}, not a list of layers")
    if isinstance(cell, (int, np.integer)):
        return (int(cell),)
    if isinstance(cell, (float, np.floating)) and float(cell).is_integer():
        return (int(cell),)
    if isinstance(cell, str):
        parts = [_integer_text(part) for part in cell.split(",")] if cell.strip() else []
        if None not in parts:
            return tuple(sorted({part for part in parts if part is not None}))
    raise ValueError(
        f"{what}'s 'layers' holds {cell!r}, not a list of layers (comma-separated, as "
        "ablation_effects and summarize_mass write them)"
    )


# the columns that tell the models of a table apart (a study's tables hold several)
_MODEL_KEYS = ("condition", "seed", "model")


def _layers_by_router(table: pd.DataFrame, keys: Sequence[str], what: str) -> dict:
    """``{key: layers}`` of ``table``'s rows (``keys``: router and the model columns): the
    one layer list each holds, refusing a key whose rows hold several."""
    out: dict = {}
    for key, cell in zip(
        table[list(keys)].itertuples(index=False, name=None), table["layers"], strict=True
    ):
        layers = layer_tuple(cell, what)
        if out.setdefault(key, layers) != layers:
            where = dict(zip(keys, key, strict=True))
            raise ValueError(
                f"{what} holds rows of several layer sets at {where} ({list(out[key])} and "
                f"{list(layers)}): pass the rows of one group (one band of the mass)"
            )
    return out


def default_sweep_mismatch(effects: pd.DataFrame) -> Optional[str]:
    """Why ``effects`` (with its ``layers`` column) is not the study's sweep (each of its
    models with a group ``"all"`` of every layer ``0..n-1`` and each default depth band it
    has of that band's layers, the thirds of `depth_bands` of that model's n; the models
    may differ in depth, as a task's 8- and 16-layer conditions do), in words naming the
    first group that is not and the thirds; ``None`` where it is. The pre-registered
    criteria are defined on those groups (`motif_report`)."""
    if "layers" not in effects.columns:
        return "the effects lack the column 'layers' (which layers each group masked)"
    return _sweep_groups(effects)[1]


def _sweep_groups(effects: pd.DataFrame) -> tuple[set[str], Optional[str]]:
    """(the group names a mass summary without a ``layers`` column, one written before
    audit 129, is read as the library's defaults of where ``effects`` is the study's sweep
    (band ``all`` or no band: every layer; a default band: its thirds; ``final``: the final
    router), `default_sweep_mismatch`'s words: ``None`` where it is the sweep, and then
    only; otherwise the pairing by name would be a guess)."""
    keys = [c for c in _MODEL_KEYS if c in effects.columns]
    parts = effects.groupby(keys, dropna=False, sort=False) if keys else [((), effects)]
    names: set[str] = set()
    for key, part in parts:
        model = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        at = f" (at {', '.join(f'{k}={v!r}' for k, v in model.items())})" if model else ""
        groups: dict[str, set[tuple[int, ...]]] = {}
        for group, cell, router in zip(part.group, part.layers, part.router, strict=True):
            if router != "final_res":
                groups.setdefault(group, set()).add(layer_tuple(cell, "effects"))
        every = groups.get("all", set())
        if len(every) != 1:
            sets = sorted(list(layers) for layers in every)
            return names, f"the effects' group 'all' masked the layer sets {sets}{at}"
        (layers,) = every
        if not layers or layers != tuple(range(len(layers))):
            return names, (
                f"the effects' group 'all' masked layers {list(layers)}{at}, not every layer 0..n-1"
            )
        thirds = depth_bands(len(layers))
        defaults = {**{name: tuple(band) for name, band in thirds.items()}, "all": layers}
        for group, held in groups.items():
            if group in (*BAND_NAMES, "all") and held != {defaults.get(group)}:
                shown = " and ".join(str(list(h)) for h in sorted(held))
                written = ", ".join(f"{name} {band}" for name, band in thirds.items())
                return names, (
                    f"the effects' group {group!r} masked layers {shown}{at}; the thirds of "
                    f"{len(layers)} layers: {written}"
                )
        names.update(defaults, ("final",))  # each model's own defaults were checked
    return names, (None if names else "the effects hold no model")


def _default_layers(group: str, router: object, n_layers: int) -> Optional[str]:
    """The layers (`layers_text`) of the library's default group ``group`` of a model of
    ``n_layers`` at ``router``, as `summarize_mass` writes a study's band: ``""`` at the
    final router (its one group ``final``, no layers), every layer for ``all``, a default
    depth band's thirds; ``None`` for another name (no default to read it as)."""
    if router == "final_res":
        return ""
    defaults = {**depth_bands(n_layers), "all": list(range(n_layers))}
    return layers_text(defaults[group]) if group in defaults else None


def require_same_models(tables: Sequence[tuple[str, pd.DataFrame]], what: str) -> None:
    """Refuse ``tables`` (``(name, table)`` pairs: a mass summary and effects, with the study's
    accuracy) that hold other models, where ``what`` (the result) pairs their rows by router
    and family: the model labels (``condition`` / ``seed`` / ``model``, those every table has,
    each of one kind in all: a seed 0 beside ``'0'`` is read as a column they do not share,
    as `require_same_layers` reads it) of each table must be those of the others. Until
    audit 148 `dissociation_report` and the mass-effect figures paired seed 0's mass with
    seed 1's effects, and the study's seeds summary and report tables left a model out of
    the one table without a word (its seeds mean taken over the others, its report table
    printed empty)."""
    keys = [
        c
        for c in _MODEL_KEYS
        if all(c in table.columns for _, table in tables) and not differ_in_kind(tables, c)
    ]
    if not keys:
        return

    def models(table: pd.DataFrame) -> set[tuple]:
        rows = table[keys].itertuples(index=False, name=None)
        return {tuple(None if pd.isna(v) else v for v in row) for row in rows}

    (first, held), *others = [(name, models(table)) for name, table in tables]
    for name, other in others:
        for a, b, have, lack in ((first, name, held, other), (name, first, other, held)):
            extra = [dict(zip(keys, m, strict=True)) for m in sorted(have - lack, key=repr)]
            if extra:
                raise ValueError(
                    f"{what}: the rows of {first} and {name} are paired by model, but {a} holds "
                    f"models that {b} lacks: {extra[:3]} "
                    f"(by {keys}); pass the tables of the same models (e.g. the rows of one "
                    "model in each: table[table.seed == 0])"
                )


def require_one_model(table: pd.DataFrame, what: str, remedy: str) -> None:
    """Refuse a ``table`` of several models (several labels in a ``condition`` / ``seed`` /
    ``model`` column, NaN counted as one) where ``what`` (the result) reads one model:
    its means pooled the models' rows without a word. ``remedy`` says what to pass."""
    for column in _MODEL_KEYS:
        if column in table.columns and table[column].nunique(dropna=False) > 1:
            labels = list(dict.fromkeys(table[column].tolist()))
            raise ValueError(
                f"{what} reads one model, but the table holds {len(labels)} {column!r} "
                f"values ({labels[:4]}), whose rows it would pool into one mean; {remedy}"
            )


def every_layer_mass(mass_summary: pd.DataFrame, effects: pd.DataFrame, what: str) -> pd.DataFrame:
    """The rows of ``mass_summary`` over every layer (band ``"all"`` of a summary by band, as
    the study's; a summary without ``band`` is every layer), refused unless they are of the
    models of the ``effects`` (`require_same_models`) and of the layers their group ``"all"``
    masked (`require_same_layers`): the one pairing of
    the every-layer mass with the effects of group ``"all"`` (`motif_report`'s D1 and D3, the
    study's seeds summary and its report's tables). ``what`` names the result that needs it.
    Until audit 148 the seeds summary and the report's tables paired them by name only: a
    6-layer model's mass (attention ``embedding`` 0.563, ``prev_completed`` 0.104) was
    printed beside the effects of a 3-layer model's layers 0-2 (whose mass is 0.581 and 0)."""
    if "band" in mass_summary.columns:
        mass_summary = mass_summary[mass_summary.band == "all"]
    require_same_models((("mass_summary", mass_summary), ("effects", effects)), what)
    require_same_layers(mass_summary, effects, "all", what)
    return mass_summary


def require_same_layers(mass: pd.DataFrame, effects: pd.DataFrame, group: str, what: str) -> None:
    """Refuse pairing ``mass`` (the mass summary's rows shown or compared with the effects
    of ``group``: one band, or a summary without bands) with the effects of ``group`` unless
    both are of the same layers, at each router type (and model: ``condition`` / ``seed`` /
    ``model``) both have: the summary's ``layers`` (`summarize_mass`) against the effects'
    (`ablation_effects`). A band and a group are paired by name, and a name says nothing of
    the layers (``ablation_effects(groups={"early": [0]})`` beside the default bands'
    mass, early = 0-2: the mass of other routers than those masked). ``effects``: the whole
    effects table. A summary without ``layers`` (written before audit 129, or by hand) is
    read as the library's defaults of its band's name (``group``): its rows of a grid
    condition (a ``condition`` label naming a fixed recipe, `grid_condition_depth`) at that
    recipe's depth, and checked so (since audit 148: before, a 16-layer condition's mass
    was paired with the effects of an 8-layer model's default groups; a mismatch may also
    be a model of another depth studied under a grid condition's name, which the tables
    cannot tell apart: the message says both and names the summary's ``layers`` as the
    remedy, review 157); its other rows (no
    ``condition`` column, the conditions ``attnres`` / ``vanilla``, a name that is no
    condition), whose depth neither table tells, only where the effects are the study's
    sweep (`default_sweep_mismatch`), unchecked; otherwise it is refused, as are effects without
    ``layers`` (by hand). ``what`` names the result that needs the pairing."""
    chosen = effects[effects.group == group]
    if "layers" not in effects.columns:
        raise ValueError(
            f"effects lacks the column 'layers' (which layers each group masked), which "
            f"{what} needs to pair the mass with the effects of group {group!r}: a group "
            "named like a band need not be of its layers; pass ablation_effects output"
        )
    # the model columns both tables have, each of one kind in both: a seed 0 beside '0' (one
    # table read back as text) matches no key, and the layers went unchecked
    # (dissociation_report ranked every layer's mass beside a band's effects, audit 144); it
    # is read as a column one table lacks (the pairings that match rows by it refuse it,
    # `require_same_kind`)
    tables = (("mass_summary", mass), ("effects", chosen))
    keys = [
        "router",
        *(
            c
            for c in _MODEL_KEYS
            if c in chosen.columns and c in mass.columns and not differ_in_kind(tables, c)
        ),
    ]
    masked = _layers_by_router(chosen, keys, "effects")
    from_recipe = "layers" not in mass.columns
    if from_recipe:
        # a summary written before audit 129: its band is read as the library's default of
        # its name, at the depth its condition's recipe fixes (a grid condition), which is
        # then checked exactly; rows of no known depth only beside the study's sweep
        conditions = mass["condition"] if "condition" in mass.columns else [None] * len(mass)
        depths = [grid_condition_depth(condition) for condition in conditions]
        cells = pd.Series(
            [
                None if depth is None else _default_layers(group, router, depth)
                for router, depth in zip(mass.router, depths, strict=True)
            ],
            index=mass.index,
            dtype=object,
        )
        known = cells.notna()
        if not known.all() or mass.empty:
            sweep, mismatch = _sweep_groups(effects)  # effects has 'layers' (checked above)
            if mismatch is not None or group not in sweep:
                raise ValueError(
                    f"mass_summary lacks the column 'layers' (which layers each band covers: "
                    f"a summary written before audit 129, or by hand), so {what} cannot tell "
                    f"whether its mass is of the layers the effects of group {group!r} masked "
                    f"({[list(layers) for layers in dict.fromkeys(masked.values())]}); pass "
                    "summarize_mass(routing_mass(...)) of this version, or add the column "
                    "(each row's layers, comma-separated, as ablation_effects writes them)"
                )
            # the study's sweep: the band's layers are the defaults of its name (the depth
            # of the summary itself unknown: the check skipped, docs/analysis.md)
        mass = mass[known.to_numpy()].assign(layers=cells[known])
    summarised = _layers_by_router(mass, keys, "mass_summary")
    for key, layers in masked.items():
        if key in summarised and summarised[key] != layers:
            where = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key, strict=True))
            if from_recipe:
                # the depth is the recipe's guess: the summary's own layers are unknown, and
                # a grid condition's name may hold a model of another depth (a model saved
                # under it without its metrics.json is studied as it is; audit 157)
                raise ValueError(
                    f"at {where}, the mass summary has no 'layers' column (a summary written "
                    "before audit 129, or by hand), so its rows paired with group "
                    f"{group!r} were read as the default band of that name at the depth of "
                    f"their condition's recipe, layers {list(summarised[key])}, but the "
                    f"effects of group {group!r} masked layers {list(layers)}: either the "
                    "tables are of other models, or the run studied under this grid "
                    "condition's name is not of its recipe's depth (a model saved there "
                    f"without its metrics.json), and the summary cannot tell which, so {what} "
                    "cannot pair them; recompute the summary with summarize_mass(routing_mass"
                    "(...)) of this version (it records each band's layers), or add the "
                    "column 'layers' (each row's layers, comma-separated, as ablation_effects "
                    "writes them)"
                )
            raise ValueError(
                f"at {where}, the mass summary's rows paired with group {group!r} are of "
                f"layers {list(summarised[key])} but the effects of group {group!r} "
                f"masked layers {list(layers)}: {what} would show or compare the mass of "
                "other routers than those masked (a band and a group are paired by name); "
                "summarise the mass over the group's layers (routing_mass(..., bands=B) "
                "with ablation_effects(..., groups=B), or the defaults of both)"
            )


def require_finite_mass(mass: pd.DataFrame, what: str) -> None:
    """Raise unless every ``mass`` value of a `routing_mass` table is finite: pandas'
    means and maxima skip NaN, so a NaN mass (routing weights of a non-finite forward pass,
    e.g. a float16 overflow) would drop out of an average and leave a finite, wrong number.
    ``what`` names the result that cannot be computed."""
    found = non_finite_in_column(mass, "mass", ("prompt", "router", "layer", "family"))
    if found is None:
        return
    n_bad, _, where = found
    raise ValueError(
        f"the mass table holds {n_bad} non-finite mass value(s) (first: {where}); {what} "
        "cannot be computed (pandas' mean and max would skip them): find what made the "
        "routing weights non-finite (a float16 overflow? run the model in bfloat16 or "
        "float32)"
    )


def _position_weights(
    weights: Tensor,
    positions: Positions,
    answer_pos: Optional[Tensor],
    real: Optional[Tensor] = None,
) -> Tensor:
    """``[batch, pos, n]`` -> ``[batch, n]`` at the positions of interest; ``real``
    (``[batch, pos]`` bool, True at real tokens: `_real_positions`) makes ``"all"`` average
    each prompt's real positions only (`routing_mass` refuses a list or an ``answer_pos``
    that reads padding)."""
    n_pos = weights.shape[1]
    if isinstance(positions, str):
        if positions == "all":
            if real is None:
                return weights.mean(dim=1)
            keep = real.to(weights.device)[..., None]
            # selected (a nan weight a hook wrote in the padding)
            return sum_where(weights, keep, dim=1) / keep.sum(dim=1).to(weights.dtype)
        if positions == "answer":
            if answer_pos is None:
                raise ValueError("positions='answer' needs a TaskBatch (or answer_pos=...)")
            rows = torch.arange(weights.shape[0], device=weights.device)
            return weights[rows, answer_pos.to(weights.device)]
        raise ValueError(
            f"positions must be 'answer', 'all' or a list of positions, got {positions!r}"
        )
    index = position_index(positions, n_pos, weights.device, PER_PROMPT)
    # one weight per position: a position twice (also as p and p - n_pos) would count twice
    require_selection(
        "positions",
        (index % n_pos).tolist(),
        why="nothing to average over",
        written=index.tolist(),
    )
    return weights[:, index].mean(dim=1)


def _real_positions(
    model: HookedAttnRes,
    prompts: Union[TaskBatch, Tensor],
    tokens: Tensor,
    attention_mask: Optional[Tensor],
) -> tuple[Optional[Tensor], Optional[Tensor], str]:
    """The padding `routing_mass` leaves out: ``(mask, real, padding)``, ``mask`` the
    checked ``attention_mask`` to run the prompts with (``None``: run unpadded), ``real``
    ``[batch, pos]`` bool, True at real tokens (``None``: every position is real), and
    ``padding`` how the message of a refusal names the padding. A `TaskBatch` is
    right-padded after its ``answer_pos`` and run without a mask (causal attention keeps
    its padding from the real positions); token ids are padded where ``attention_mask``
    (`padding_of`) says, and run with it, as ``model(tokens, attention_mask=...)``."""
    if isinstance(prompts, TaskBatch):
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is for token inputs: a TaskBatch has none (its padding is "
                "the right padding after each prompt's answer_pos); pass routing_mass("
                "model, batch.tokens, answer_pos=batch.answer_pos, attention_mask=mask)"
            )
        n_pos = tokens.shape[1]
        last = prompts.answer_pos.to(tokens.device)
        real = torch.arange(n_pos, device=tokens.device) <= last[:, None]
        return None, real, "right padding, past the TaskBatch's answer_pos"
    mask = model._validate_attention_mask(attention_mask, tuple(tokens.shape), tokens.device)
    return mask, padding_of(mask), "padding (attention_mask 0)"


def routing_mass(
    model: HookedAttnRes,
    prompts: Union[TaskBatch, Int[Tensor, "batch pos"]],
    positions: Positions = "answer",
    answer_pos: Optional[Int[Tensor, " batch"]] = None,
    bands: Optional[dict] = None,
    chunk: int = 256,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> pd.DataFrame:
    """Routing weight of every source family at every router, per prompt.

    Args:
        model: a routed `HookedAttnRes`.
        prompts: a `TaskBatch` or token ids ``[batch, pos]``.
        positions: ``"answer"`` (the answer position of each prompt), ``"all"`` (mean over
            each prompt's real positions), or a list of positions (mean over them). A
            position is a column of the padded ``[batch, pos]`` tokens, the same index in
            every prompt, as for the interventions' ``positions=`` (with left padding
            ``[-1]`` is every prompt's last real token). The padding is never read: for a
            `TaskBatch` the positions after each prompt's ``answer_pos`` (right padding),
            for token ids those where ``attention_mask`` is 0; ``"all"`` averages each
            prompt's real positions (its mass as if run alone, unpadded), and a list
            holding a padding position of some prompt raises ``ValueError``. Every prompt
            is read at the same positions: a nested list or a ``[batch, k]`` tensor
            (per-prompt positions) raises ``ValueError`` (one position per prompt:
            ``answer_pos=``).
        answer_pos: ``[batch]``, the positions ``positions="answer"`` reads, columns of
            the padded tokens (needed for token inputs; a `TaskBatch`'s own by default).
            One at padding (past a `TaskBatch`'s ``answer_pos``, or where
            ``attention_mask`` is 0) raises ``ValueError``, and so does ``answer_pos=``
            with other ``positions`` (it would be ignored).
        bands: custom depth bands (default: thirds, see `depth_bands`).
        chunk: prompts per forward pass.
        attention_mask: ``[batch, pos]``, 1 at real tokens and 0 at padding (left, right
            or anywhere; e.g. the mask of ``model.to_tokens_and_mask``), for padded token
            ids: the prompts are run with it, as ``model(tokens, attention_mask=mask)``,
            so that each prompt's real positions route as the prompt alone, unpadded, and
            its padding is left out as above. Without it token ids are taken as unpadded,
            as by ``model(tokens)``: left padding would be attended as real tokens. A
            `TaskBatch` takes none (``ValueError``: pass ``batch.tokens`` with
            ``answer_pos=batch.answer_pos`` and the mask).

    Returns:
        A tidy DataFrame with one row per (prompt, router, layer, family): columns
        ``prompt, router, layer, band, family, n_sources, mass`` (``layer`` is -1 and
        ``band`` is ``"final"`` for the final router). ``n_sources`` is how many of the
        router's sources belong to the family (``len(model.routing_layout.families(site)
        [family])``); a family absent at a router (``n_sources`` 0, e.g. ``older`` at a
        router that reads no older block) has mass 0, so ``n_sources`` is what tells it
        from a family that is there and gets no weight (figures draw it blank).
    """
    tokens = prompts.tokens if isinstance(prompts, TaskBatch) else prompts
    reads_answer = isinstance(positions, str) and positions == "answer"
    if answer_pos is not None and not reads_answer:
        raise ValueError(
            f"answer_pos applies to positions='answer' only; positions={positions!r} would "
            "ignore it"
        )
    if isinstance(prompts, TaskBatch) and answer_pos is None:
        answer_pos = prompts.answer_pos
    check_count("chunk", chunk)
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise ValueError("prompts must be a TaskBatch or a [batch, pos] tensor of token ids")
    require_prompts(tokens.shape[0], "routing_mass")
    require_whole_batch_means(model, tokens.shape[0], chunk, "routing_mass")
    # the padding, never read: [batch, pos] True at real tokens (None: none)
    mask, real, padding = _real_positions(model, prompts, tokens, attention_mask)
    if answer_pos is not None:
        answer_pos = torch.as_tensor(answer_pos)
        if answer_pos.shape != (tokens.shape[0],) or answer_pos.is_floating_point():
            raise ValueError(
                f"answer_pos must be an integer tensor [batch={tokens.shape[0]}], got shape "
                f"{tuple(answer_pos.shape)} and dtype {answer_pos.dtype}"
            )
        if len(answer_pos) and (
            int(answer_pos.min()) < 0 or int(answer_pos.max()) >= tokens.shape[1]
        ):
            raise ValueError(
                f"answer_pos must be in [0, {tokens.shape[1]}), got values in "
                f"[{int(answer_pos.min())}, {int(answer_pos.max())}]"
            )
        if real is not None:
            prompt = torch.arange(len(answer_pos), device=real.device)
            padded = (~real[prompt, answer_pos.to(real.device)]).nonzero().flatten()
            if len(padded):
                raise ValueError(
                    f"answer_pos points at prompt(s) {padded.tolist()[:8]}, into their "
                    f"{padding}; pass a real position of every prompt (positions are "
                    "columns of the padded tokens)"
                )
    if real is not None and not isinstance(positions, str):
        index = position_index(positions, tokens.shape[1], real.device, PER_PROMPT)
        padded = (~real[:, index]).any(dim=1)
        if bool(padded.any()):
            where = padded.nonzero().flatten().tolist()
            raise ValueError(
                f"positions {positions!r} read prompt(s) {where[:8]} at padding ({padding}); "
                "pass positions real in every prompt (columns of the padded tokens: with "
                "left padding [-1] is every prompt's last real token), 'all' (each "
                "prompt's real positions) or 'answer' with answer_pos="
            )
    layout = model.routing_layout
    layout.require_routers()
    sites = layout.sites()
    band_map = depth_bands(model.cfg.n_layers, bands)
    names = [site.hook("weights") for site in sites]
    family_index = [layout.families(site) for site in sites]
    with torch.no_grad():
        chunks = []
        for start in range(0, tokens.shape[0], chunk):
            part = tokens[start : start + chunk]
            part_pos = None if answer_pos is None else answer_pos[start : start + chunk]
            part_mask = None if mask is None else mask[start : start + chunk]
            part_real = None if real is None else real[start : start + chunk]
            _, cache = model.run_with_cache(part, names_filter=names, attention_mask=part_mask)
            rows = []
            for name, families in zip(names, family_index, strict=True):
                w = _position_weights(cache[name], positions, part_pos, part_real)  # [b, n]
                rows.append(
                    torch.stack(
                        [
                            w[:, idx].sum(-1) if idx else w.new_zeros(w.shape[0])
                            for idx in (families[f] for f in FAMILIES)
                        ],
                        dim=-1,
                    )
                )
            chunks.append(torch.stack(rows, dim=0))  # [router, b, family]
        per_router = as_numpy(torch.cat(chunks, dim=1))
    n_routers, n_prompts, n_families = per_router.shape
    router_names = np.array([site.kind for site in sites])
    layers = np.array([site.table_layer for site in sites])
    router_bands = np.array([band_of(site, band_map) for site in sites])
    counts = np.array([[len(families[f]) for f in FAMILIES] for families in family_index])
    return pd.DataFrame(
        {
            "prompt": np.tile(np.repeat(np.arange(n_prompts), n_families), n_routers),
            "router": np.repeat(router_names, n_prompts * n_families),
            "layer": np.repeat(layers, n_prompts * n_families),
            "band": np.repeat(router_bands, n_prompts * n_families),
            "family": np.tile(np.array(FAMILIES), n_routers * n_prompts),
            "n_sources": np.repeat(counts[:, None, :], n_prompts, axis=1).reshape(-1),
            "mass": per_router.reshape(-1),
        }
    )


def _require_one_prompt_set(mass: pd.DataFrame, by: list[str]) -> None:
    """Refuse rows of one prompt id that `summarize_mass` would average as one prompt
    without their being one prompt. Within a group, rows of one prompt id are averaged
    across the ``seed`` and ``model`` values outside ``by`` (the same prompts under several
    models: the study's seeds of one condition), so every such model must hold the same
    prompt ids (one without some prompts would weigh less in the mean). Conditions are not
    pooled so: a study's conditions can use different tasks, and prompt 0 of one task is
    not prompt 0 of another (the table cannot tell), so rows of one prompt id under several
    ``condition`` values are refused (conditions whose prompt ids are apart are summarised
    as their prompts together, each (condition, prompt) one prompt)."""
    if "condition" in mass.columns and "condition" not in by:
        shared = mass.groupby([*by, "prompt"], dropna=False).condition.nunique(dropna=False)
        if (shared > 1).any():
            where = shared.index[(shared > 1).to_numpy()][0]
            prompt = where[-1].item() if isinstance(where[-1], np.generic) else where[-1]
            conditions = sorted(map(str, mass[mass.prompt == prompt].condition.unique()))
            raise ValueError(
                f"the mass table holds the prompt ids of several conditions (prompt {prompt} "
                f"of {conditions[:4]}), and 'condition' is not in by: a study's conditions "
                "can use different tasks, so prompt 0 of one need not be prompt 0 of "
                "another, and the table cannot tell (rows of one prompt id are averaged as "
                "one prompt across 'seed' and 'model' only). Add 'condition' to by; or, for "
                "conditions of different prompts, number their prompts apart "
                "(mass.assign(prompt=mass.groupby(['condition', 'prompt']).ngroup())); or, "
                "for conditions of the same prompts (one task), label them as models "
                "(mass.rename(columns={'condition': 'model'}))"
            )
    pooled = [c for c in ("seed", "model") if c in mass.columns and c not in by]
    if not pooled:
        return
    # within a group (and a condition), every pooled model holds the same prompt ids
    scope = [*by, *(["condition"] if "condition" in mass.columns else [])]
    scope = list(dict.fromkeys(scope))
    part = mass.groupby(pooled, dropna=False, sort=False).ngroup()
    parts = part.groupby([mass[c] for c in scope], dropna=False).nunique()
    per_prompt = part.groupby([mass[c] for c in [*scope, "prompt"]], dropna=False).nunique()
    lacking = per_prompt.to_numpy() < parts.reindex(per_prompt.index.droplevel(-1)).to_numpy()
    if not lacking.any():
        return
    where = per_prompt.index[lacking][0]
    rows = (mass[scope] == pd.Series(dict(zip(scope, where[:-1], strict=True)))).all(axis=1)
    inside = mass[rows.to_numpy()]
    prompts = set(inside.prompt)
    for key, held in inside.groupby(pooled, dropna=False, sort=True):
        missing = sorted(prompts - set(held.prompt))
        if missing:
            key = key if isinstance(key, tuple) else (key,)
            model = {
                c: k.item() if isinstance(k, np.generic) else k
                for c, k in zip(pooled, key, strict=True)
            }
            group = {
                c: k.item() if isinstance(k, np.generic) else k
                for c, k in zip(scope, where[:-1], strict=True)
            }
            raise ValueError(
                f"in the group {group}, the model {model} lacks prompt(s) "
                f"{[p.item() if isinstance(p, np.generic) else p for p in missing][:8]} that "
                f"other {' / '.join(pooled)} values have: rows of one prompt id are averaged "
                "as one prompt across them (the same prompts under several models), so "
                "this model would weigh less in the mean over prompts; summarise the "
                "models on the same prompts, or add "
                f"{pooled[0]!r} to by"
            )
    raise ValueError(  # a group label that does not compare equal to itself (NaN)
        f"a {' / '.join(pooled)} value lacks prompt ids that others have in the group "
        f"{where[:-1]}: rows of one prompt id are averaged as one prompt across them, so it "
        f"would weigh less; summarise the models on the same prompts, or add {pooled[0]!r} "
        "to by"
    )


def _per_prompt(mass: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """The mean mass of each group (``by``) and prompt, ``[group, prompt]``: groups in the
    order of `summarize_mass`'s rows, prompts in id order (the bootstrap draws prompts by
    position: with ``sort=False`` the columns followed the table's row order, so a
    reordered table got other intervals); NaN where a group has no rows for a prompt."""
    return (
        mass.groupby([*by, "prompt"], sort=False).mass.mean().unstack("prompt").sort_index(axis=1)
    )


# the columns that identify a row of a routing_mass table (with ``by``): prompt and router
# (its layer), the family and the condition / seed / model of a study's table
_KEYS = ("prompt", "router", "layer", "family", "condition", "seed", "model")


def summarize_mass(
    mass: pd.DataFrame,
    by: Sequence[str] = ("router", "family"),
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean family mass per group with bootstrap intervals over prompts.

    Each prompt's mass is first averaged over the routers in the group (e.g. all layers
    of one router type), then the mean and its interval are taken over prompts.

    Returns:
        Columns ``*by, mass, ci_low, ci_high, n_prompts, confidence`` (the intervals'
        level, as `ablation_effects` records it; the figures say it, since session 22)
        and, when ``mass`` has
        ``n_sources`` (`routing_mass` output), ``family_read`` (last): whether
        some router of the group reads a source of the family (`family_read`); False
        where the family is absent at every router of the group (its mass is 0 because
        there is nothing to weigh, not because the routers give it no weight); and, when
        ``mass`` has ``layer``, ``layers`` (last, since audit 129): the layers of the
        group's routers, ascending and comma-separated as `ablation_effects` writes a
        group's (the final router, layer -1, adds none, as its group ``"final"``), which
        every pairing of the mass with the effects of a group checks
        (`require_same_layers`).

    Raises:
        ValueError: a NaN or infinite mass (pandas' mean would skip it, averaging the
            other routers and prompts into a finite, wrong number), an unknown ``by``
            column (or ``"prompt"``, the bootstrap's unit), an empty ``by`` or one naming a
            column twice, an empty table, a NaN in a ``by`` column or ``prompt`` (pandas
            would drop those rows from every group), a key column (``by``, ``prompt``,
            ``router``, ``layer``, ``family``, ``condition``, ``seed``, ``model``) whose
            labels mix text and numbers (``1`` and ``'1'`` are two keys), a ``layer`` that
            is no whole number (``1.5``, NaN; `integer_layers`: a whole float such as
            ``1.0``, of a CSV column with an empty cell, is that layer), a group without
            rows for some prompt that other groups have (a filtered table), or a
            ``(prompt, router, layer, family)`` row twice within a group (two tables
            concatenated with the same prompt ids; the message names a column outside
            ``by`` that the repeated rows differ in, ``condition`` / ``seed`` / ``model``
            excepted). Rows of one prompt id are
            averaged as one prompt across the ``seed`` and ``model`` values outside ``by``
            (the same prompts under several models, as a study's seeds of one condition):
            a model without some prompt ids the others have in its group (and condition)
            is refused (it would weigh less in the mean), and so are rows of one prompt id
            under several ``condition`` values outside ``by`` (a study's conditions can use
            different tasks, and the table cannot tell whether prompt 0 of one is prompt 0
            of another; `_require_one_prompt_set`). Conditions whose prompt ids are apart
            are summarised as their prompts together. With ``condition`` in ``by``, each
            condition is summarised as its own prompt set (its rows equal its summary
            alone, in the rows' order by ``by``), so conditions of different prompt
            counts can be summarised together.
    """
    n_bootstrap, confidence, seed = check_bootstrap(n_bootstrap, confidence, seed, "n_bootstrap")
    require_columns(mass, ("mass", "prompt"), "mass", "routing_mass(...) output")
    by = require_selection(
        "by",
        [by] if isinstance(by, str) else by,
        why="no columns to group by, e.g. ('router', 'family')",
    )
    unknown = [c for c in by if c not in mass.columns or c in ("mass", "prompt")]
    if unknown:
        raise ValueError(
            f"cannot group by {unknown}; group by columns of the routing_mass table "
            f"{[c for c in mass.columns if c not in ('mass', 'prompt')]} (the bootstrap "
            "resamples the prompts)"
        )
    if mass.empty:
        raise ValueError("the mass table is empty: there is nothing to summarise")
    require_finite_mass(mass, "the summary")
    # a row without a label would fall out of every group (pandas drops NaN keys)
    require_labelled(mass, [*by, "prompt"], "the mass table")
    # 1 and '1' are two keys: a repeated row would go unseen (and sorting them fails)
    require_one_kind(mass, [*by, *_KEYS], "the mass table")
    # whole floats as the layers they are (a CSV column with an empty cell is float); any
    # other float refused, so that the layers column holds "0,1", never "0.0,1.5"
    mass = integer_layers(mass, "the mass table")
    # a (prompt, router, layer, family) twice within a group: the prompt ids do not name
    # one prompt each (two routing_mass tables concatenated, both numbered from 0), and
    # the per-prompt means would pool different prompts into one (a wrong mean and n)
    keys = list(dict.fromkeys([*by, *_KEYS]))
    keys = [c for c in keys if c in mass.columns]
    found = repeated_cell(mass, keys)
    if found is not None:
        at, rows = found
        first = mass.iloc[at]
        where = {k: v.item() if isinstance(v, np.generic) else v for k, v in first[keys].items()}
        # what the repeated rows differ in (other than the mass): the column to group by
        same = mass[rows]
        differ = [
            c
            for c in same.columns
            if c not in ("mass", "n_sources") and same[c].nunique(dropna=False) > 1
        ]
        missing = [c for c in ("router", "layer") if c not in mass.columns]
        head = (
            f"the mass table repeats {int(mass.duplicated(keys).sum())} row(s) of one "
            f"{tuple(keys)} (first: {where})"
        )
        if missing:
            raise ValueError(
                f"{head}: it has no {' or '.join(map(repr, missing))} column, so the rows of "
                "different routers cannot be told apart from prompts counted twice; add it "
                "(routing_mass gives both)"
            )
        if differ:
            raise ValueError(
                f"{head}: the repeated rows differ in {differ}, which is not in by; rows of "
                "one prompt id are averaged as one prompt across 'seed' and 'model' only "
                "(the same prompts under several models). Add "
                f"{differ[0]!r} to by, or renumber the prompts of each part if they are "
                "different prompts (second.assign(prompt=second.prompt + n_first))"
            )
        raise ValueError(
            f"{head}: its prompt ids do not name one "
            "prompt each (two routing_mass tables concatenated, both numbering their "
            "prompts from 0?), and the summary would average different prompts as one; "
            "renumber the prompts of each further table (second.assign(prompt="
            "second.prompt + n_first)) or tell the tables apart by a column in by"
        )
    _require_one_prompt_set(mass, list(by))
    if "condition" in by and mass["condition"].nunique(dropna=False) > 1:
        # each condition is its own prompt set (its own task): its prompts are resampled
        # on their own, so conditions of different prompt counts summarise together and
        # each condition's rows equal its summary alone (the same draws as one table of
        # equal counts, whose bootstrap draws the prompt columns shared by every group);
        # rows in the order of one summary of the table (by `by`, not condition first)
        out = pd.concat(
            [
                summarize_mass(part, by, n_bootstrap, confidence, seed)
                for _, part in mass.groupby("condition", sort=False, dropna=False)
            ],
            ignore_index=True,
        )
        order = pd.MultiIndex.from_frame(_per_prompt(mass, by).index.to_frame(index=False))
        rows = order.get_indexer(pd.MultiIndex.from_frame(out[list(by)]))
        return out.iloc[np.argsort(rows, kind="stable")].reset_index(drop=True)
    per_prompt = _per_prompt(mass, by)
    absent = per_prompt.isna()  # the mass is finite: NaN is a (group, prompt) without rows
    if absent.any(axis=None):
        group = absent.any(axis=1).idxmax()
        keys = [
            k.item() if isinstance(k, np.generic) else k
            for k in (group if isinstance(group, tuple) else (group,))
        ]
        raise ValueError(
            f"the group {dict(zip(by, keys, strict=True))} has "
            f"no rows for prompt(s) {per_prompt.columns[absent.loc[group]].tolist()[:8]} that "
            "other groups have; its mass over the prompts cannot be compared with theirs: "
            "summarise a routing_mass table with every router of every prompt"
        )
    mean, low, high = bootstrap_ci_rows(
        per_prompt.to_numpy(), n_bootstrap, confidence, seed, resamples_name="n_bootstrap"
    )
    out = per_prompt.index.to_frame(index=False)
    out["mass"], out["ci_low"], out["ci_high"] = mean, low, high
    out["n_prompts"] = per_prompt.shape[1]
    out["confidence"] = confidence  # the intervals' level, as ablation_effects records it
    if "n_sources" in mass.columns:
        read = family_read(mass, "the summary").groupby([mass[c] for c in by]).any()
        out["family_read"] = read.reindex(per_prompt.index).to_numpy()
    if "layer" in mass.columns:
        # the layers each group covers (the final router, layer -1, has none: as the
        # effects of its group "final"), which the mass-effect pairings check
        sublayer = mass[mass.layer.ne(-1)]
        layers = sublayer.groupby([sublayer[c] for c in by]).layer.agg(layers_text)
        out["layers"] = layers.reindex(per_prompt.index).fillna("").to_numpy()
    return out
