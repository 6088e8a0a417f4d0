"""One rule, one message for "a table has several rows for one cell" (`require_one_row`):
every table check that needs one row per (router, family), (router, group, family),
(condition, seed, ...) or (seed, claim) refuses a repeated row with a message that names
the repeated cell, the number of its rows, the key columns and the call site's remedy
(audit 173: five sites had five wordings, some without the keys or the columns)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from test_analysis import _plot_tables
from test_motifs import harmful, tables

from hooked_attnres import plotting
from hooked_attnres._validation import require_one_row
from hooked_attnres.analysis import dissociation_report, motif_report, verdict_changes

PLOT_REMEDY = (
    "pass one model's tables, with the mass summarised by ('router', 'family') (for several "
    "seeds or conditions use mass_effect_by_seed)"
)
BY_SEED_REMEDY = "give each model a distinct condition or seed (and the mass one band, 'all')"


def refused(cell: str, count: int, keys: tuple, remedy: str, what: str, differ: str = ""):
    """The whole message of `require_one_row`, escaped (built from its parts by hand)."""
    return re.escape(
        f"{what} has several rows for {cell}{differ}: {count} rows of one {keys}, where it "
        f"must hold one; {remedy}"
    )


def test_require_one_row_names_the_cell_its_rows_the_columns_and_the_remedy():
    from hooked_attnres._validation import require_one_row

    table = pd.DataFrame(
        {
            "router": ["a", "a", "b", "a"],
            "family": ["x", "x", "x", "x"],
            "seed": [0, 1, 0, 2],
            "mass": [0.1, 0.2, 0.3, 0.4],
        }
    )
    require_one_row(table[table.seed != 1].iloc[:2], ("router", "family"), "t", "do this")
    with pytest.raises(
        ValueError,
        match=refused(
            "router='a', family='x'",
            3,
            ("router", "family"),
            "do this",
            "t",
            " (they differ in ['seed'])",
        ),
    ):
        require_one_row(table, ("router", "family"), "t", "do this")
    # NaN keys repeat as pandas' duplicated finds them (counted as one cell, not as 0 rows)
    nan = pd.DataFrame({"router": [None, None], "family": ["x", "x"], "mass": [0.1, 0.2]})
    with pytest.raises(
        ValueError, match=refused("router=None, family='x'", 2, ("router", "family"), "r", "t")
    ):
        require_one_row(nan, ["router", "family"], "t", "r")


def test_a_table_with_two_columns_of_one_name_is_refused_naming_the_columns():
    """Audit 196: a table with two columns of one name (``pd.concat([a, b], axis=1)``)
    passed `require_one_row` whatever its rows (``duplicated`` matched both columns, so the
    rows a, x, p and a, x, q were two cells of ('router', 'family')), and the callers then
    read ``table.router`` as a table: `dissociation_report` refused the router type
    'router' (the column's name) as one the mass summary lacks, and with a repeated
    ``family`` or ``effect`` failed with Python's "zip() argument 2 is shorter than
    argument 1" or NumPy's "truth value of an array ... is ambiguous". Refused by name, by
    `require_one_row` and by `require_columns` (the one check of a table's columns)."""
    from hooked_attnres._validation import require_columns

    twice = pd.concat(
        [
            pd.DataFrame({"router": ["a", "a"], "family": ["x", "x"], "effect": [1.0, 2.0]}),
            pd.DataFrame({"router": ["p", "q"], "effect": [1.0, 2.0]}),
        ],
        axis=1,
    )
    message = re.escape(
        "t has several columns named ['router', 'effect'] (e.g. of pd.concat(axis=1)), so "
        "which one a column name reads is unknown"
    )
    with pytest.raises(ValueError, match=message):
        require_one_row(twice, ("router", "family"), "t", "r")
    with pytest.raises(ValueError, match=message):
        require_columns(twice, ("family",), "t")
    mass, effects = tables()
    effects = effects[effects.group == "all"]
    with pytest.raises(ValueError, match=r"^effects has several columns named \['router'\]"):
        dissociation_report(mass, pd.concat([effects, effects[["router"]]], axis=1))
    with pytest.raises(ValueError, match=r"^mass_summary has several columns named \['family'\]"):
        dissociation_report(pd.concat([mass, mass[["family"]]], axis=1), effects)


def test_the_mass_effect_figures_refuse_a_repeated_router_and_family():
    mass, effects = _plot_tables()
    two_mass, two_effects = _plot_tables(seeds=(0, 1))
    differ = " (they differ in ['seed'])"
    for plot in (plotting.mass_effect_scatter, plotting.mass_effect_bars):
        cell = "router='attn_res', family='embedding'"
        keys = ("router", "family")
        with pytest.raises(
            ValueError, match=refused(cell, 2, keys, PLOT_REMEDY, "mass_summary", differ)
        ):
            plot(two_mass[two_mass.seed.isin([0, 1])], effects)
        with pytest.raises(
            ValueError, match=refused(cell, 2, keys, PLOT_REMEDY, "effects", differ)
        ):
            plot(mass, two_effects)


def test_effect_bands_refuses_a_repeated_router_group_and_family():
    _, two_effects = _plot_tables(seeds=(0, 1))
    remedy = "pass one model's effects (for several seeds or conditions use effects_by_seed)"
    cell = "router='attn_res', group='early', family='embedding'"
    keys = ("router", "group", "family")
    with pytest.raises(
        ValueError,
        match=refused(cell, 2, keys, remedy, "effects", " (they differ in ['seed'])"),
    ):
        plotting.effect_bands(two_effects)


def test_the_by_seed_figures_refuse_a_repeated_model_row():
    mass, effects = _plot_tables(seeds=(0, 1))
    mass, effects = mass.assign(condition="a"), effects.assign(condition="a")
    twice = pd.concat([effects, effects], ignore_index=True)
    with pytest.raises(
        ValueError,
        match=refused(
            "condition='a', seed=0, router='mlp_res', group='early'",
            2,
            ("condition", "seed", "router", "group"),
            "give each model a distinct condition or seed",
            "effects",
        ),
    ):
        plotting.effects_by_seed(twice, "older", ["mlp_res"], ["early"])
    keys = ("condition", "seed", "family")
    with pytest.raises(
        ValueError,
        match=refused(
            "condition='a', seed=0, family='embedding'", 2, keys, BY_SEED_REMEDY, "effects"
        ),
    ):
        plotting.mass_effect_by_seed(mass, twice, "mlp_res")
    with pytest.raises(
        ValueError,
        match=refused(
            "condition='a', seed=0, family='embedding'", 2, keys, BY_SEED_REMEDY, "mass_summary"
        ),
    ):
        plotting.mass_effect_by_seed(pd.concat([mass, mass], ignore_index=True), effects, "mlp_res")


def test_motif_report_refuses_a_repeated_effect_or_mass_row():
    summary, effects = tables({("mlp_res", "early", "embedding"): harmful(-1.0)})
    with pytest.raises(
        ValueError,
        match=refused(
            "router='attn_res', group='early', family='embedding'",
            2,
            ("router", "group", "family"),
            "pass one model seed at a time (motif_report splits by a 'seed' column)",
            "the effects table",
        ),
    ):
        motif_report(summary, pd.concat([effects, effects]), by=[])
    with pytest.raises(
        ValueError,
        match=refused(
            "router='attn_res', family='embedding'",
            2,
            ("router", "family"),
            "pass one seed's summary over all layers (band 'all')",
            "mass_summary",
        ),
    ):
        motif_report(pd.concat([summary, summary]), effects, by=[])


def test_verdict_changes_refuses_a_repeated_report_row():
    summary, effects = tables(seed=0)
    report = motif_report(summary, effects)
    remedy = (
        "pass motif_report's table of each model once; for models told apart by another "
        "column (motif_report's by), name it in by (e.g. by=['seed', 'model'])"
    )
    with pytest.raises(
        ValueError,
        match=refused("seed=0, claim='M1'", 2, ("seed", "claim"), remedy, "the first report"),
    ):
        verdict_changes(pd.concat([report, report], ignore_index=True), report)


def test_dissociation_report_refuses_a_repeated_router_and_family():
    summary, effects = tables()
    summary, effects = summary.drop(columns="band"), effects.assign(seed=0)
    remedy = "summarize mass by ('router', 'family') and pass the effects of one model / seed"
    keys = ("router", "family")
    cell = "router='attn_res', family='embedding'"
    banded = pd.concat([summary.assign(band="early"), summary.assign(band="all")])
    with pytest.raises(
        ValueError,
        match=refused(cell, 2, keys, remedy, "mass_summary", " (they differ in ['band'])"),
    ):
        dissociation_report(banded, effects)
    two = pd.concat([effects, effects.assign(seed=1)])
    with pytest.raises(
        ValueError, match=refused(cell, 2, keys, remedy, "effects", " (they differ in ['seed'])")
    ):
        dissociation_report(summary, two)


def test_a_missing_key_in_a_nullable_column_is_neither_counted_in_the_cell_nor_a_crash():
    """Review 180: with pandas' nullable dtypes (a CSV read with ``dtype_backend=
    "numpy_nullable"`` or ``"pyarrow"``) ``<NA> == 1`` is ``<NA>``, which the cell's
    comparison read as "equal": a row whose key is missing was counted in the repeated
    cell (``3 rows`` of seed 1 where it has 2, and its labels named as the difference), and
    a repeated cell whose key is missing failed with pandas' "boolean value of NA is
    ambiguous". The cell's rows are the ones ``duplicated`` matches (NaN equal to NaN)."""
    from hooked_attnres._validation import require_one_row

    keys = ("seed", "family")
    for dtype in ("Int64", "int64[pyarrow]", "float64"):
        # seed 1 twice (conditions a, b) and a row without a seed (condition c)
        table = pd.DataFrame(
            {
                "seed": pd.array([1, 1, None], dtype=dtype),
                "family": ["x", "x", "x"],
                "condition": ["a", "a", "c"],
            }
        )
        one = 1.0 if dtype == "float64" else 1
        with pytest.raises(
            ValueError, match=refused(f"seed={one!r}, family='x'", 2, keys, "r", "t")
        ):
            require_one_row(table, keys, "t", "r")
        # no seed twice (conditions a, b) and seed 1 (condition c)
        table = table.assign(seed=pd.array([None, None, 1], dtype=dtype))
        with pytest.raises(ValueError, match=r"t has several rows for seed=(<NA>|nan), family='x'"):
            require_one_row(table, keys, "t", "r")
        with pytest.raises(ValueError, match=r": 2 rows of one \('seed', 'family'\), where"):
            require_one_row(table, keys, "t", "r")
    for dtype in ("string", "object"):
        table = pd.DataFrame(
            {
                "router": pd.array(["a", "a", None], dtype=dtype),
                "family": ["x", "x", "x"],
                "seed": [0, 1, 2],
            }
        )
        with pytest.raises(
            ValueError,
            match=refused(
                "router='a', family='x'",
                2,
                ("router", "family"),
                "r",
                "t",
                " (they differ in ['seed'])",
            ),
        ):
            require_one_row(table, ("router", "family"), "t", "r")


def test_effect_bands_counts_the_repeated_cell_beside_a_row_without_a_family():
    """Review 180: one effect row given twice beside a row of its router and group whose
    family cell is missing (a nullable ``string`` column): "3 rows of one (router, group,
    family)" where the cell has 2. Since audit 191 effect_bands refuses the missing family
    first (by name); the count is that of the one-row check the figure runs."""
    _, effects = _plot_tables()
    twice = pd.concat([effects, effects.iloc[[0]]], ignore_index=True)
    first = twice.iloc[0]
    cell = (twice.router == first.router) & (twice.group == first.group)
    other = int(np.flatnonzero(cell & (twice.family != first.family))[0])
    family = twice.family.astype("string")
    family.iloc[other] = pd.NA
    twice = twice.assign(family=family)
    rows = int(
        (
            (twice.router == first.router)
            & (twice.group == first.group)
            & (twice.family == first.family).fillna(False)
        ).sum()
    )
    assert rows == 2
    remedy = "pass one model's effects (for several seeds or conditions use effects_by_seed)"
    with pytest.raises(
        ValueError,
        match=refused(
            f"router={first.router!r}, group={first.group!r}, family={first.family!r}",
            rows,
            ("router", "group", "family"),
            remedy,
            "effects",
        ),
    ):
        require_one_row(twice, ("router", "group", "family"), "effects", remedy)
    with pytest.raises(
        ValueError, match=r"^effects has NaN labels \(column: rows\) \{'family': 1\}"
    ):
        plotting.effect_bands(twice)


def test_summarize_mass_names_what_the_repeated_rows_differ_in_beside_a_missing_seed():
    """Review 180: summarize_mass found the repeated cell's rows by ``rows == first``, as
    require_one_row did: with a nullable ``seed`` (``Int64``, a CSV read with
    ``dtype_backend="numpy_nullable"``), seed 1's table given twice beside rows without a
    seed (<NA>) was said to "differ in ['seed'], which is not in by" (add 'seed' to by:
    the two seed-1 copies would still repeat), and the same tables with the copies'
    seed missing failed with pandas' "boolean value of NA is ambiguous". Both repeat a
    prompt id: their rows differ in nothing, the prompts are counted twice."""
    from hooked_attnres.analysis.mass import summarize_mass

    rows = [
        dict(prompt=p, router=r, layer=k, family=f, mass=0.5, n_sources=1)
        for p in range(3)
        for r in ("attn_res", "mlp_res")
        for k in (0, 1)
        for f in ("embedding", "older")
    ]
    one = pd.DataFrame(rows)
    for twice, other in ((1, None), (None, 1)):
        table = pd.concat(
            [one.assign(seed=twice), one.assign(seed=twice), one.assign(seed=other)],
            ignore_index=True,
        )
        table["seed"] = table.seed.astype("Int64")
        with pytest.raises(ValueError) as info:
            summarize_mass(table, by=("router", "family"), n_bootstrap=10)
        message = str(info.value)
        assert "differ in" not in message, message
        assert "its prompt ids do not name one prompt each" in message, message
