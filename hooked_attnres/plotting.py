"""Plotly figures for routing and mass-versus-effect analyses.

Every function returns a ``plotly.graph_objects.Figure`` with a title and axis labels that
sizes to its container (``autosize``); a long title is broken into lines (`wrapped_title`).
Colour scales come from the data (routing mass:
0 to its largest value; signed results: symmetric around 0 up to the largest magnitude),
missing cells are blank, and ablation effects are shown as a percentage of the clean logit
difference by default (``relative=True``), so that -0.15 out of 14 reads as -1 %.
`save_html` writes a self-contained file (plotly.js inlined, so it opens offline);
`figure_div` gives the figure as an HTML fragment for a page that includes plotly.js once.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from hooked_attnres._validation import (
    as_items,
    distinct_labels,
    is_integer,
    non_finite_in_column,
    require_bool,
    require_columns,
    require_keys,
    require_labelled,
    require_one_row,
    require_same_kind,
    require_selection,
)
from hooked_attnres.analysis.bootstrap import as_numpy, level_text
from hooked_attnres.analysis.effects import effect_name, estimate_method
from hooked_attnres.analysis.mass import (
    family_read,
    integer_layers,
    layer_tuple,
    masked_nothing,
    require_family_read_column,
    require_finite_mass,
    require_masked_column,
    require_read_agrees,
    require_same_layers,
    require_same_models,
)
from hooked_attnres.interventions.checks import (
    check_cache_model,
    recorded_run,
    refuse_chunk_cache,
)
from hooked_attnres.interventions.selection import position_index
from hooked_attnres.model.cache import RunRecord
from hooked_attnres.model.depth import FAMILIES, ROUTERS
from hooked_attnres.model.passes import padding_of

if TYPE_CHECKING:
    from hooked_attnres.model.hooked_attnres import HookedAttnRes

FAMILY_COLORS = {
    "embedding": "#1f77b4",
    "older": "#2ca02c",
    "prev_completed": "#ff7f0e",
    "current": "#d62728",
}
SEED_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def _palette(n: int) -> list[str]:
    """``n`` distinct colours for seeds or masked labels: `SEED_COLORS` first, then plotly's
    ``Dark24``, then a sample of ``Turbo``. They were `SEED_COLORS` taken modulo six, so
    seeds 0 and 6 were drawn in one colour under two legend entries."""
    from plotly.colors import qualitative, sample_colorscale

    colors = list(dict.fromkeys([*SEED_COLORS, *qualitative.Dark24]))
    if n > len(colors):
        colors += sample_colorscale("Turbo", [k / (n - 1) for k in range(n - len(colors))])
    return colors[:n]


ROUTER_TITLES = {
    "attn_res": "attention routers",
    "mlp_res": "MLP routers",
    "final_res": "final router",
}
CONFIG = {"responsive": True, "displaylogo": False}  # plotly's config for every page


def save_html(fig: go.Figure, path: Union[str, Path]) -> Path:
    """Write ``fig`` as a self-contained HTML file (works offline); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True, config=CONFIG)
    return path


def figure_div(fig: go.Figure) -> str:
    """``fig`` as an HTML ``<div>`` (plus its script) for a page that loads plotly.js once
    (`plotly_js`)."""
    return fig.to_html(include_plotlyjs=False, full_html=False, config=CONFIG)


def plotly_js() -> str:
    """The plotly.js bundle, to inline once in a self-contained page."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _cell_text(z: np.ndarray, digits: int = 2) -> list[list[str]]:
    """Cell labels: the value rounded to ``digits`` decimals, blank where it is missing
    (never "NaN"); a value that is not 0 but prints as 0 there with two significant digits
    (audit 177: a mass of 0.004 read "0.00", the text of a family read with no weight; the
    printed text decides, review 182: a bound ``0.5 * 10**-digits`` in floating point let
    5e-7 print "0.000000"); exact 0, -0.0 too, reads ``0.00...``."""

    def label(v: float) -> str:
        if np.isnan(v):
            return ""
        text = f"{v + 0.0:.{digits}f}"  # + 0.0: -0.0 is 0.0
        if v != 0 and float(text) == 0:
            return f"{v:.2g}"
        return text

    return [[label(v) for v in row] for row in np.asarray(z, float)]


def _distinct_labels(labels: Sequence, what: str) -> list[str]:
    """``labels`` as strings, a repeated one followed by its index (``"k3 (9)"``, ``"k3
    (20)"``): plotly puts equal labels of a categorical axis into one category, so the
    second row or column would be drawn over the first and vanish from the axis (the
    query key of a retrieval prompt repeats a stored key)."""
    text = [str(label) for label in labels]
    repeated = {label for label in text if text.count(label) > 1}
    out = [f"{label} ({i})" if label in repeated else label for i, label in enumerate(text)]
    if len(set(out)) != len(out):
        raise ValueError(f"{what} {text} cannot be made distinct by their indices; rename them")
    return out


def _require_table(
    table: pd.DataFrame,
    columns: Sequence[str],
    what: str,
    finite: Sequence[str] = (),
    intervals: bool = False,
) -> None:
    """Refuse a table without ``columns``, an empty one, one with a NaN or infinite value
    in a ``finite`` column (plotly draws a NaN bar as no bar, read as 0, and a NaN whisker
    as no whisker, read as a certain value), or, with ``intervals``, a row whose
    ``ci_low`` exceeds its ``ci_high`` (swapped bounds). An estimate outside its ordered
    interval is drawn as it is: plotly draws a whisker from ``value - arrayminus`` to
    ``value + array`` whatever their signs, i.e. from ``ci_low`` to ``ci_high`` (a
    percentile bootstrap interval may exclude the mean, e.g. with few resamples)."""
    require_columns(table, columns, what)
    if table.empty:
        raise ValueError(f"{what} has no rows: there is nothing to plot")
    keys = ("condition", "seed", "router", "layer", "group", "band", "family", "metric")
    for column in finite:
        found = non_finite_in_column(table, column, keys)
        if found is None:
            continue
        n_bad, first, where = found
        raise ValueError(
            f"{what} holds {n_bad} non-finite {column!r} value(s) (first: {first} at "
            f"{where}); a figure would draw it as a missing bar or whisker, i.e. as 0 or as "
            "certain (an interval is NaN when the bootstrap had one prompt): recompute it "
            "(more prompts, or a finite forward pass)"
        )
    if intervals:
        swapped = table.ci_low > table.ci_high
        if swapped.any():
            row = table[swapped].iloc[0]
            raise ValueError(
                f"{what} has an interval [ci_low, ci_high] = [{row.ci_low}, {row.ci_high}] "
                f"whose lower bound exceeds its upper ({int(swapped.sum())} row(s)): "
                "swapped bounds? the whisker would not show the interval"
            )


def _is_count(value: object) -> bool:
    """Whether ``value`` (a cell of ``n_prompts``) is a count of prompts: an integer
    (`is_integer`: no ``bool``) or a whole float from 1. Not ``True`` (read as 1), text
    (``"12"``: the library reads no text as a number, `as_numpy`), a complex number or a
    date (read as its count of time units since 1970)."""
    if is_integer(value):
        return bool(value >= 1)
    if isinstance(value, (float, np.floating)):
        return bool(np.isfinite(value) and value >= 1) and float(value).is_integer()
    return False


def _prompt_counts(column: pd.Series, what: str) -> list[int]:
    """The distinct prompt counts of a table's ``n_prompts`` column (missing cells left
    out), in order; a value that is no count (`_is_count`: ``12.5``, a mean over tables;
    0; ``True``; text; a date) is refused, naming the values (audit 196: ``int()`` printed
    12.5 as "12 prompts", and text was left out without a word; review 200: ``True`` read
    as 1 prompt, a date as its time units since 1970, ``"12"`` as 12, and a complex number failed
    with Python's "int() argument must be [...]")."""
    present = column.dropna().tolist()
    bad = distinct_labels(v for v in present if not _is_count(v))
    if bad:
        raise ValueError(
            f"{what} has n_prompts value(s) {bad[:4]} that are no count of prompts (a whole "
            "number from 1): its intervals are over no one prompt set (a mean over tables?), "
            "and the figure would misstate it; pass the rows as summarize_mass, "
            "ablation_effects or attribute_routing wrote them"
        )
    return sorted({int(n) for n in present})


def _interval_source(rows: pd.DataFrame, what: str) -> str:
    """What the intervals ``ci_low`` / ``ci_high`` of ``rows`` (the rows a figure draws)
    are, read from their own columns: the level from ``confidence`` (``"95 %"``; not stated
    where the column is missing or NaN: "level and method not recorded in the table"), the prompts
    from ``n_prompts`` (``"over 256 prompts"``, a range where the rows differ; a count that is
    no whole number refused, `_prompt_counts`; rows without one said), and, for
    attribution estimates (`estimate_method`: a ``method`` other than ``"exact"``), whose
    intervals they are. A recorded level is that of percentile-bootstrap intervals over
    prompts, as `summarize_mass`, `ablation_effects` and `attribute_routing` compute and
    record them; a table without one (built by hand, or a CSV written before the column)
    says neither level nor method (review 182: "percentile-bootstrap" was stated of any
    table). A level outside (0, 1) (95 for 95 %) is refused: it would be printed as
    9500 %."""
    levels, unrecorded = [], True
    if "confidence" in rows.columns:
        values = pd.to_numeric(rows.confidence, errors="coerce")
        bad = sorted({float(v) for v in values.dropna() if not 0 < v < 1})
        if bad:
            raise ValueError(
                f"{what} has confidence value(s) {bad[:4]} outside (0, 1): the level of its "
                "intervals is a fraction (0.95 for 95 %); the figure would misstate it"
            )
        levels = [level_text(v) for v in sorted(set(values.dropna()))]
        unrecorded = bool(values.isna().any())
    head = " or ".join(levels) + " " if levels else ""
    prompts, uncounted = "prompts", False
    if "n_prompts" in rows.columns:
        counts = _prompt_counts(rows.n_prompts, what)
        if counts:
            span = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
            prompts = f"{span} prompts"
            uncounted = bool(rows.n_prompts.isna().any())
    kind = f"{head}percentile-bootstrap intervals" if levels else "intervals"
    text = f"{kind} over {prompts}"
    method = estimate_method(rows, what)
    if method is not None:
        text += f" of the attribution estimates (method {method})"
    if uncounted:
        text += " (the number of prompts not recorded for some rows)"
    if unrecorded:
        text += (
            " (level and method not recorded in the table)"
            if not levels
            else " (level and method not recorded for some rows)"
        )
    return text


def _whiskers(parts: Sequence[tuple[str, str, pd.DataFrame]]) -> str:
    """The line under a figure's title that says what its whiskers are: ``parts``, ``(name
    of the whiskers, name of their table, the table rows they draw)``, each read by
    `_interval_source`; one
    phrase when they agree, one per part (``"routing mass, ...; effect, ..."``) when not.
    Every figure with whiskers says it (a figure saved alone or shown in a notebook has no
    report prose beside it)."""
    texts = [(name, _interval_source(rows, table)) for name, table, rows in parts]
    if len({text for _, text in texts}) == 1:
        return f"whiskers: {texts[0][1]}"
    return "whiskers: " + "; ".join(f"{name}, {text}" for name, text in texts)


# what a figure's blank cell, missing bar or point means (`_blank_line`)
UNREAD_CELL = "blank: the router reads no source of the family (n_sources 0)"
NO_SOURCE = "blank: the layer has no such source"
UNREAD = "no router of the type reads the family"
UNMASKED = "the ablation masked no router (its effect is 0 by construction)"


def _blank_line(reasons: Sequence[tuple[bool, str]]) -> str:
    """The line under a figure's title that says what its blanks are: the texts of
    ``reasons`` (``(the figure draws such a blank, text)``) that occur, ``""`` if none.
    A blank cell or a missing bar of a figure saved alone (or in the study report, whose
    prose does not say it) read as a measured 0 or a dropped row (audit 221)."""
    return "; ".join(text for occurs, text in reasons if occurs)


def _effect_blanks(kinds: tuple[bool, bool], missing: tuple[str, str]) -> str:
    """`_blank_line` of an effect figure's blanks (`_blank_kinds`: a family no router of the
    type reads, an ablation that masked no router), ``missing`` naming what the figure
    leaves out for each (``("no bars", "no effect bar")``, ``"no point"``, ``"no bar"``)."""
    unread, nothing = kinds
    return _blank_line(
        ((unread, f"{missing[0]}: {UNREAD}"), (nothing, f"{missing[1]}: {UNMASKED}"))
    )


PAIRED = ("no bars", "no effect bar")  # a mass and an effect bar per family (`_effect_blanks`)


def _effect_noun(method: Optional[str], measured: str) -> str:
    """A default title's word for the plotted effects: ``measured`` (the figure's own
    word) for measured effects, `effect_name` for attribution estimates (``method``,
    `estimate_method`): a first-order estimate titled "causal effect" read as measured."""
    return measured if method is None else effect_name(method)


# plotly's line break (``<br>``, ``<BR>``, ``<br />``: the pattern plotly.js reads)
_BREAK = re.compile(r"<br(\s[^>]*)?>", re.IGNORECASE)
# plotly.js (svg_text) splits text at ``<...>`` and draws a piece as markup if its name (after
# ``<`` or ``</``, up to a space or ``>``, in any case) is one of `_MARKUP`, any other as its
# text ("mass < 0.1 and effect > 1"); markup is not shown, and a space inside it is no place
# to break a line (review 233: every ``<...>`` was taken for markup, `_is_markup`)
_PIECES = re.compile(r"(<[^<>]*>)")
_MARKUP = ("br", "sup", "sub", "s", "u", "b", "i", "a", "span", "em")


def _is_markup(piece: str) -> bool:
    """Whether ``piece`` (of ``_PIECES.split``) is a tag plotly draws as markup."""
    name = re.match(r"<(/?)([^ >]*)", piece) if piece.endswith(">") else None
    return name is not None and name.group(2).lower() in _MARKUP


def _shown_text(text: str) -> str:
    """``text`` as plotly shows it: its markup (`_is_markup`) left out."""
    return "".join(piece for piece in _PIECES.split(text) if not _is_markup(piece))


def _added_lines(text: str) -> int:
    """The number of line breaks plotly draws in ``text``."""
    return len(_BREAK.findall(text))


# the figures are laid out for this width and wider (px): a notebook's output area, a report
# column. A title line, a subtitle line and a panel title are fitted to it by an estimate of
# their rendered width (`text_width`); a wider figure only spreads its panels further apart.
REFERENCE_WIDTH = 800
TITLE_WIDTH = 700  # px a title or subtitle line may take there (it starts 40 px in)
TITLE_SIZE = 17  # plotly's title font (px); its subtitle's and its panel titles' below
SUBTITLE_SIZE = 12
PANEL_TITLE_SIZE = 16
PANEL_TITLE_MIN = 11  # the smallest font a panel title is shrunk to before words are split
PANEL_GAP = 8  # px kept between neighbouring panel titles (and a title and the figure's edge)
TITLE_LINE = 22  # px of top margin (and of height) per added title line

# The width of a character in em (its font size): an upper bound of each class's widths in
# DejaVu Sans, the font chromium draws plotly's list ("Open Sans", verdana, arial,
# sans-serif) with where none of those is installed, measured with canvas.measureText; Open
# Sans and Arial are narrower. A wide or fullwidth character (CJK: `unicodedata`'s
# east_asian_width "W" or "F") is 1 em in a CJK font. A non-ASCII character is counted as
# its ASCII base (é as e; not with a horn, Ơ 0.91 em), any other as `OTHER_EM`, which
# bounds all but 13 of DejaVu's 903 characters of U+0080-024F and U+0370-052F (Щ 1.09 em;
# wider: ligatures such as Ǆ, 1.42, and Ѽ, 1.18) and all but 53 of its 2982 of
# U+2000-2BFF (‰ 1.34, ‱ 1.74). Review 233: the backtick (0.50 em) was counted 0.42 and
# every non-ASCII character 0.8 (→ 0.84, Œ 1.07, Щ 1.09; 131 of the 903, 1043 of the 2982).
_NARROW = set(" '.,:;!|/\\()[]-ijlIJftr")
_WIDE = set("mwMW%@#+<=>^~×&—…")
OTHER_EM = 1.1


def _char_width(char: str) -> float:
    """The width of ``char`` in em (`text_width`)."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0.0
    if char in _WIDE or unicodedata.east_asian_width(char) in ("W", "F"):
        return 1.0
    if not char.isascii():
        parts = unicodedata.normalize("NFD", char)
        if parts[0].isascii() and "\u031b" not in parts:  # U+031B: the horn
            return _char_width(parts[0])
        return OTHER_EM
    if char == " ":
        return 0.32
    if char in _NARROW:
        return 0.42
    if char.isupper():
        return 0.8
    return 0.64


def text_width(text: str, size: float) -> float:
    """An estimate, from above, of the width in px of ``text`` drawn by plotly in a font of
    ``size`` px, its markup left out (`_shown_text`); calibrated in chromium, whose fallback
    font DejaVu Sans is the widest of plotly's font list: the study's titles measured 0.80
    to 0.95 of it; the estimate counts 1 em per CJK character, as every CJK font draws it."""
    return size * sum(_char_width(char) for char in _shown_text(text))


def _units(text: str, split_words: bool) -> list[tuple[bool, str]]:
    """``text`` as the units a line may be broken between, each ``(a space before it,
    text)``: words (plotly's markup, whose spaces are no place to break, glued to its word:
    `_is_markup`; other text in ``<...>`` is words as any text), each
    wide character (CJK: a line may break between any two) and, with ``split_words``, the
    pieces of a word after each ``_`` (``hard_`` ``cumulative_`` ``L16``)."""
    units: list[tuple[bool, str]] = []
    space, word = False, ""
    pieces = (
        [part] if _is_markup(part) else re.findall(r"\s+|.", part, re.DOTALL)
        for part in _PIECES.split(text)
    )
    for piece in (piece for part in pieces for piece in part):
        if piece.isspace():
            if word:
                units.append((space, word))
            space, word = bool(units), ""
            continue
        wide = len(piece) == 1 and unicodedata.east_asian_width(piece) in ("W", "F")
        if wide and word and not _is_markup(word):
            units.append((space, word))
            space, word = False, ""
        word += piece
        if wide or (split_words and piece == "_"):
            units.append((space, word))
            space, word = False, ""
    if word:
        units.append((space, word))
    return units


def _wrapped(text: str, width: float, size: float, split_words: bool = False) -> list[str]:
    """``text`` broken greedily into lines whose `text_width` at ``size`` is at most
    ``width`` px, between the `_units` of the text (a unit wider than ``width`` stays
    whole, on its own line)."""
    lines: list[str] = []
    for space, unit in _units(text, split_words):
        if lines and text_width(f"{lines[-1]}{' ' if space else ''}{unit}", size) <= width:
            lines[-1] += f"{' ' if space else ''}{unit}"
        else:
            lines.append(unit)
    return lines


def wrapped_title(text: str, width: float = TITLE_WIDTH, size: float = TITLE_SIZE) -> str:
    """``text`` broken into lines of at most ``width`` px in a font of ``size`` px, by the
    estimate of their rendered width (`text_width`, tags not counted), joined by plotly's
    ``<br>``: at spaces outside its tags and between wide (CJK) characters (a word wider
    than ``width`` stays whole, on its own line); text that already has a line break
    (``<br>`` in any of plotly's spellings) is returned as it is, as is text that fits."""
    if _added_lines(text) or text_width(text, size) <= width:
        return text
    return "<br>".join(_wrapped(text, width, size))


LEGEND_ITEM = 50  # px a legend entry takes besides its text (plotly's symbol and padding)
COLORBAR = 100  # px a colour bar and its title take at the right of the panels
PANEL_LINES = 3  # the most lines a panel title is broken into before its font shrinks
LINE_SPACING = 1.3  # plotly's line height, in em


def _right_side(fig: go.Figure) -> float:
    """The px at the right of the panels: the right margin, or what plotly widens it to for
    the legend (its longest entry, `text_width` at 12 px, plus `LEGEND_ITEM`) or for a
    colour bar (`COLORBAR`). plotly draws the legend (``layout.showlegend`` unset) where two
    traces would show in it or one trace sets ``showlegend=True`` (review 233: a figure of
    one seed, or `effect_bands` of one family, was taken to have no legend, and its panel
    titles were fitted to panels 80 px wider than drawn)."""
    shown = [t for t in fig.data if t.showlegend is not False and t.type != "heatmap"]
    drawn = fig.layout.showlegend
    if drawn is None:
        drawn = len(shown) > 1 or any(t.showlegend is True for t in shown)
    names = [str(t.name) for t in shown if t.name]
    legend = LEGEND_ITEM + max(text_width(n, 12) for n in names) if drawn and names else 0
    scale = any(t.type == "heatmap" and t.showscale is not False for t in fig.data)
    return max(fig.layout.margin.r, legend + 20, COLORBAR if scale else 0)


def _fit_panel_titles(fig: go.Figure) -> tuple[float, float]:
    """Fit the panel titles (the annotations of ``make_subplots``) to the figure at
    `REFERENCE_WIDTH` px, and so at every wider one (the panels only spread apart): each is
    broken into lines (`wrapped_title`'s units) no wider, by `text_width`, than the distance
    from its centre to its neighbour's in the row (or twice that to the figure's edge) less
    `PANEL_GAP`, so two neighbours never meet; in the largest font from
    ``PANEL_TITLE_SIZE`` down to `PANEL_TITLE_MIN` at which each is at most `PANEL_LINES`
    lines of whole words, else at the smallest, a word wider than its room split after its
    ``_`` (``hard_cumulative_<br>L16``). Their added lines are given room: the rows below
    the first are moved down (their y-axis domains and titles), and the figure's top margin
    grows for the first row's. Returns ``(px added above the first row, px added between
    rows)``. Before (audit 227), plotly's one-line titles of the study's six conditions ran
    into each other at 800, 1000 and 1400 px (chromium: by 184, 150 and 82 px)."""
    titles = [a for a in fig.layout.annotations if a.yanchor == "bottom" and a.xref == "paper"]
    if not titles:
        return 0.0, 0.0
    left, right = fig.layout.margin.l, _right_side(fig)
    plot = REFERENCE_WIDTH - left - right  # the panels' width, px
    rooms = []
    for a in titles:
        centre = a.x * plot
        others = [abs(b.x - a.x) * plot for b in titles if b is not a and b.y == a.y]
        edges = (2 * (left + centre), 2 * (plot + right - centre))
        rooms.append(min([*others, *edges]) - PANEL_GAP)
    texts = [str(a.text) for a in titles]
    for size in range(PANEL_TITLE_SIZE, PANEL_TITLE_MIN - 1, -1):
        lines = [_wrapped(t, room, size) or [t] for t, room in zip(texts, rooms, strict=True)]
        fits = all(
            len(ls) <= PANEL_LINES and max(text_width(line, size) for line in ls) <= room
            for ls, room in zip(lines, rooms, strict=True)
        )
        if fits:
            break
    else:
        lines = [_wrapped(t, room, size, True) or [t] for t, room in zip(texts, rooms, strict=True)]
    line = LINE_SPACING * size
    rows = sorted({a.y for a in titles}, reverse=True)  # paper y of each row's top
    added = {y: 0.0 for y in rows}
    for a, ls in zip(titles, lines, strict=True):
        a.update(text="<br>".join(ls), font_size=size)
        added[a.y] = max(added[a.y], line * (len(ls) - 1))
    inner = sum(added[y] for y in rows[1:])
    if inner:
        margin = fig.layout.margin
        height = fig.layout.height - margin.t - (80 if margin.b is None else margin.b)

        def moved(y: float) -> float:  # paper y after the gaps above the rows below y grew
            return (y * height + sum(added[r] for r in rows[1:] if r < y - 1e-9)) / (height + inner)

        for axis in fig.select_yaxes():
            low, high = axis.domain
            shift = moved(high) - high * height / (height + inner)
            axis.domain = (low * height / (height + inner) + shift, moved(high))
        for a in titles:
            a.y = moved(a.y)
    top = added[rows[0]]
    fig.update_layout(height=fig.layout.height + top + inner, margin_t=fig.layout.margin.t + top)
    return top, inner


def _finish(
    fig: go.Figure,
    title: str,
    height: int,
    categories: str = "",
    whiskers: str = "",
    blanks: str = "",
) -> go.Figure:
    """Title, height and margins; the axes named in ``categories`` (``"x"``, ``"y"``,
    ``"xy"``) are categorical whatever the plotly template. Only some templates (the
    default ``"plotly"`` among them) keep labels that look like numbers as categories;
    under ``pio.templates.default = "none"`` (or ``"presentation"``, ``"gridon"``, ...)
    plotly.js made such an axis numeric: position tokens ``["9", "3", "5"]`` drew their
    columns at x = 9, 3, 5 (in the order 3, 5, 9), and ``["<bos>", "7", "+", "5", "="]``
    lost the columns of its three non-numbers. ``whiskers`` (`_whiskers`), where the figure
    has any, and ``blanks`` (`_blank_line`), where it draws any, are the title's subtitle,
    each on lines of its own. A title or either subtitle line wider than `TITLE_WIDTH` px
    (`text_width`, in its font) is broken into lines there (`wrapped_title`) and the top
    margin and the height grow by `TITLE_LINE` per added line of either: plotly draws a
    title on one line and cuts it at the figure's edge. The panel titles are fitted to
    `REFERENCE_WIDTH` (`_fit_panel_titles`)."""
    title = wrapped_title(title)
    subtitle = "<br>".join(
        wrapped_title(line, size=SUBTITLE_SIZE) for line in (whiskers, blanks) if line
    )
    extra = TITLE_LINE * (_added_lines(title) + _added_lines(subtitle))
    fig.update_layout(
        # anchored at the top (plotly's "auto" puts its first line's baseline mid-margin
        # and its further lines below, over the subtitle): in chromium the first line's top
        # is 17 px below the figure's for one line, 5 px for more (review 223)
        title=dict(text=title, yref="container", y=1, yanchor="top", pad_t=20),
        height=height + extra,
        autosize=True,
        margin=dict(t=80 + extra, l=70, r=30),
    )
    if subtitle:
        fig.update_layout(title_subtitle_text=subtitle, margin_t=100 + extra)
    _fit_panel_titles(fig)
    if "x" in categories:
        fig.update_xaxes(type="category")
    if "y" in categories:
        fig.update_yaxes(type="category")
    return fig


EFFECT_COLUMNS = ("router", "group", "family", "metric", "effect", "ci_low", "ci_high")
MASS_COLUMNS = ("router", "family", "mass", "ci_low", "ci_high")
INTERVAL = ("mass", "ci_low", "ci_high")  # finite columns of a mass summary ...
ESTIMATE = ("effect", "ci_low", "ci_high")  # ... and of an effects table


def _bar(x, y, low, high, name: str, color, hover: str, showlegend: bool = True, **kw) -> go.Bar:
    """A bar series with asymmetric interval whiskers from ``low`` to ``high`` (also its
    ``customdata``, which the hover texts show: `_effect_hover`, `_mass_hover`)."""
    y, low, high = (np.asarray(v, dtype=float) for v in (y, low, high))
    return go.Bar(
        x=list(x),
        y=y,
        name=name,
        marker_color=color,
        showlegend=showlegend,
        error_y=dict(type="data", symmetric=False, array=high - y, arrayminus=y - low),
        customdata=np.column_stack([low, high]),  # the interval, for the hover text
        hovertemplate=hover,
        **kw,
    )


# the unit of an effect on each of the library's metrics (`METRICS`), for the hover texts
METRIC_UNITS = {
    "logprob": "nats (log-probability of the answer)",
    "accuracy": "(accuracy, a fraction of the prompts)",
}
_INTERVAL = "interval [%{customdata[0]:.3g}, %{customdata[1]:.3g}]"


def _unit_text(metric: str, unit: str) -> str:
    """What an effect on ``metric`` is measured in, after its number in a hover text:
    ``unit`` (`_scaled`'s: ``"logits"`` or ``"% of the clean logit difference"``) for
    ``logit_diff``, `METRIC_UNITS` for the others, a callable metric's own unit named."""
    if metric == "logit_diff":
        return unit
    return METRIC_UNITS.get(metric, f"(in the unit of {metric})")


def _effect_hover(label: str, name: str, metric: str, unit: str, extra: str = "") -> str:
    """The hover text of an effect bar (`_bar`): ``label`` (the series, ``"seed 0, "``)
    and the x, the effect's name, metric, value and unit (`_unit_text`), and its interval.
    Before audit 227 it was the bare number ("early: -12.3"), in percent or logits or
    accuracy unsaid. ``extra`` is the hover's side box (a seed figure's condition)."""
    return (
        f"{label}%{{x}}<br>{name} on {metric}: %{{y:.3g}} {_unit_text(metric, unit)}"
        f"<br>{_INTERVAL}<extra>{extra}</extra>"
    )


def _mass_hover(label: str, extra: str = "") -> str:
    """The hover text of a routing-mass bar (`_bar`), as `_effect_hover`'s."""
    return (
        f"{label}%{{x}}<br>routing mass: %{{y:.3g}} (a fraction of the router's weight)"
        f"<br>{_INTERVAL}<extra>{extra}</extra>"
    )


def _scaled(effects: pd.DataFrame, relative: bool) -> tuple[pd.DataFrame, str]:
    """``effects`` with ``effect``, ``ci_low`` and ``ci_high`` in the plotted unit (percent of
    each row's clean logit difference, or unchanged), and the unit's name."""
    if not relative:
        return effects, "logits"
    _require_table(effects, ["clean"], "effects", finite=["clean"])
    if (effects.clean <= 0).any():
        raise ValueError(
            "relative=True divides effects by the clean logit difference, which "
            "is <= 0 for some rows; plot with relative=False"
        )
    factor = 100.0 / effects.clean
    return (
        effects.assign(
            effect=effects.effect * factor,
            ci_low=effects.ci_low * factor,
            ci_high=effects.ci_high * factor,
        ),
        "% of the clean logit difference",
    )


def _with_model_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``condition`` ("" ) and ``seed`` (0) columns where it has none."""
    defaults = {"condition": "", "seed": 0}
    return table.assign(**{k: v for k, v in defaults.items() if k not in table.columns})


def _layer_label(layer: int) -> str:
    """A row label: ``"final"`` for the final router (layer ``-1`` in a mass table)."""
    return "final" if layer == -1 else f"layer {layer}"


def _family_mass(mass: pd.DataFrame, router: str, families: Sequence[str]) -> pd.DataFrame:
    """Layer x family mean mass of one router type's rows of a `routing_mass` table (the
    columns ``families``), NaN (a blank cell) where the router reads no source of the family
    (``n_sources`` 0). A (layer, family) without rows is refused: its blank cell would say
    the router does not read the family (`routing_mass` writes a row of every family)."""
    have = set(zip(mass.layer, mass.family, strict=True))
    missing = [(k, f) for k in sorted(set(mass.layer)) for f in families if (k, f) not in have]
    if missing:
        layer, family = missing[0]
        raise ValueError(
            f"mass has no rows of router {router!r} at {len(missing)} (layer, family) "
            f"cell(s) of the figure, first layer {layer}, family {family!r}: its blank cell "
            "would read as 'the router does not read the family'; pass routing_mass's rows "
            "of every family at every layer (it writes n_sources 0 where a family is absent)"
        )
    cells = mass.groupby(["layer", "family"])
    counts = cells.n_sources.agg(["min", "max"])
    varies = counts["min"] != counts["max"]
    if varies.any():
        layer, family = varies.idxmax()
        raise ValueError(
            f"mass rows of router {router!r}, layer {layer}, family {family!r} disagree on "
            f"n_sources ({counts.loc[(layer, family), 'min']} vs "
            f"{counts.loc[(layer, family), 'max']}): they are not one model's routing_mass rows"
        )
    read = family_read(mass, "the routing heatmap").groupby([mass.layer, mass.family]).any()
    # NaN: the family is absent there; in float (a nullable Float64 mass, a CSV read with
    # pandas' nullable dtypes, left <NA> there, on which np.nanmax failed: audit 191)
    table = cells.mass.mean().astype(float).where(read)
    return table.unstack("family").reindex(columns=list(families))


def routing_heatmap(
    mass: pd.DataFrame,
    routers: Optional[Sequence[str]] = None,
    title: str = "Routing mass by family",
) -> go.Figure:
    """Layer x family heatmap of mean routing mass, one panel per router type (one colour
    scale from 0 to the largest mean mass). A family the router does not read
    (``n_sources`` 0, e.g. ``older`` at a router before any older block exists) is a
    blank cell; a family it reads that gets no weight is drawn as 0.00.

    Args:
        mass: `hooked_attnres.analysis.routing_mass` output (per prompt; averaged here;
            the study's ``mass.csv`` of one model works too).
        routers: which router types (default: those in ``mass``, sublayer routers only;
            the final router's row is labelled ``"final"``).

    Raises:
        ValueError: a table without the columns of `routing_mass` (``n_sources`` included:
            without it an absent family's mass 0 reads as "present, no weight"), an empty
            one, a NaN or infinite mass (the mean would skip it) or ``n_sources``, several
            models, a NaN label in ``condition``, ``seed``, ``model``, ``router``,
            ``layer`` or ``family``, or one whose labels mix text and numbers
            (`require_keys`: a second model not counted, rows the means would drop, or
            ``0`` and ``'0'`` drawn as two layers), a (router, layer, family) whose ``n_sources``
            differs between rows, a router type it lacks, or a (layer, family) of a router
            type shown without rows (its blank cell would read "not read"; a family the
            whole table lacks has no column), or a ``family`` label that is no source
            family (`FAMILIES`; it would have no column).
    """
    # a NaN label: a second model that nunique does not count, or rows the means drop;
    # labels mixing 0 and '0': two layers (rows) or models (sorting them fails)
    labels = ("condition", "seed", "model", "router", "layer", "family")
    # no DataFrame (a dict): refused by type, before require_keys reads its columns
    require_columns(mass, (), "mass", "hooked_attnres.analysis.routing_mass(...)")
    require_keys(mass, labels, "the mass table")
    # the layers by summarize_mass's rule: 0.0 (a CSV column with an empty cell) is layer 0,
    # drawn "layer 0" (was "layer 0.0"); 1.5 is refused (was drawn as a row "layer 1.5")
    mass = integer_layers(mass, "the mass table")
    for column in ("condition", "seed", "model"):
        if column in mass.columns and mass[column].nunique() > 1:
            raise ValueError(
                f"routing_heatmap averages one model's prompts; mass has "
                f"{mass[column].nunique()} values of {column!r} "
                f"({sorted(mass[column].unique().tolist())[:4]}): select one model's rows "
                "first (mass[mass.seed == 0])"
            )
    family_read(mass, "the routing heatmap")  # refuses a table without n_sources, or a NaN
    _require_table(mass, ("router", "layer", "family", "n_sources", "mass"), "mass")
    require_finite_mass(mass, "the routing heatmap")  # a NaN would drop out of the mean
    if routers is None:
        routers = [r for r in ("attn_res", "mlp_res") if r in set(mass.router)]
        if not routers:
            raise ValueError(
                f"mass has no sublayer router rows (routers {sorted(set(mass.router))}); pass "
                "routers=[...] to choose the router types to show"
            )
    else:
        routers = require_selection("routers", [routers] if isinstance(routers, str) else routers)
        absent = [r for r in routers if r not in set(mass.router)]
        if absent:
            raise ValueError(
                f"mass has no rows of router(s) {absent} (it has {sorted(set(mass.router))})"
            )
    # the families of the table (a table of some families draws those), in their order; a
    # label that is no family would have no column (left out, or no column at all)
    others = sorted(set(mass.family) - set(FAMILIES), key=str)
    if others:
        raise ValueError(
            f"mass has family label(s) {others} that are no source family (FAMILIES: "
            f"{list(FAMILIES)}): the heatmap has a column per family and would leave them "
            "out; pass routing_mass output, or plot a source's weights with source_heatmap"
        )
    families = [f for f in FAMILIES if f in set(mass.family)]
    tables = {r: _family_mass(mass[mass.router == r], r, families) for r in routers}
    top = max(float(np.nanmax(t.to_numpy())) for t in tables.values())
    fig = make_subplots(
        rows=1,
        cols=len(routers),
        shared_yaxes=True,
        horizontal_spacing=0.08,
        subplot_titles=[ROUTER_TITLES[r] for r in routers],
    )
    for col, (router, table) in enumerate(tables.items(), start=1):
        z = table.to_numpy()
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=families,
                y=[_layer_label(layer) for layer in table.index],
                zmin=0,
                zmax=top,
                colorscale="Viridis",
                showscale=col == len(routers),
                colorbar=dict(title="mass"),
                text=_cell_text(z),
                texttemplate="%{text}",
                hovertemplate="%{y}, %{x}: %{z:.3g}<extra>" + router + "</extra>",
            ),
            row=1,
            col=col,
        )
    fig.update_yaxes(autorange="reversed", title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="source family")
    unread = any(t.isna().to_numpy().any() for t in tables.values())
    return _finish(
        fig,
        title,
        160 + 40 * mass.layer.nunique(),
        categories="xy",
        blanks=_blank_line(((unread, UNREAD_CELL),)),
    )


def _real_tokens(
    cache, names: Sequence[str], positions
) -> tuple[Optional[torch.Tensor], RunRecord, Union[str, int]]:
    """``(real, record, positions)``: ``positions`` ``"all"`` or one position read by the
    package's position rule (`position_index`: an int, a NumPy integer or a 0-d integer
    tensor, the integer it holds) as an ``int``, checked to be in the run; the cache's
    `RunRecord`; and ``real``, ``[batch, pos]`` bool,
    True at the real tokens of the cached run at the positions the cache holds (those a
    ``pos_slice`` kept, `RunRecord.kept`; ``[batch, 1]`` for an int ``Slice``, which drops
    the position axis) where it had padding and ``positions`` is ``"all"`` (``None``: no
    padding, or one position, which every prompt must have as a real token). Refuses a
    cache that records nothing (a plain ``dict``), a cache of a pass after
    key-value-cached positions, one whose ``names`` an earlier pass filled
    (`recorded_run`), and for one position a cache whose ``names`` were cached with a
    ``pos_slice`` that drops or reorders positions: its position ``p`` is not the run's
    position ``p``."""
    at_all = isinstance(positions, str)  # "all" (source_heatmap refuses other strings)
    record = recorded_run(cache, "the cache", names, sliced=not at_all)
    refuse_chunk_cache(record.n_past, "the cache")
    if not at_all:  # a position of the run (it failed in torch: "index 99 is out ...")
        positions = int(position_index(positions, cache[names[0]].shape[-2])[0])
    real = padding_of(record.attention_mask)
    if real is None or at_all:
        real = record.kept(real)
        if real is not None and not record.has_position_axis:
            real = real[..., None]
        return real, record, positions
    padded = (~real[:, int(positions)]).nonzero().flatten().tolist()
    if padded:
        raise ValueError(
            f"prompt(s) {padded[:5]} are padding at position {positions} (the cache's "
            "attention_mask): their weights there are not of a token of theirs; pass a "
            "position every prompt has, or positions='all' (padding is left out)"
        )
    return None, record, positions


def _batch_pos_sources(weights: torch.Tensor, record: RunRecord) -> torch.Tensor:
    """A router's cached ``hook_weights`` as ``[batch, pos, n_sources]``: a cache without
    a position axis (an int ``Slice``) gets one of 1, and one without a batch axis
    (``remove_batch_dim``) a batch of 1."""
    if not record.has_position_axis:
        weights = weights.unsqueeze(-2)
    return weights[None] if weights.ndim == 2 else weights


def source_heatmap(
    model: HookedAttnRes,
    cache,
    router: str = "attn_res",
    positions: Union[str, int, torch.Tensor] = "all",
    title: Optional[str] = None,
) -> go.Figure:
    """Layer x source heatmap of routing weights from a cache (cells of sources a layer
    does not have are blank; colours from 0 to the largest weight).

    Args:
        model, cache: a routed model and ``run_with_cache`` output. The cache's record of
            its pass is read (`hooked_attnres.model.cache.record_of`): padding positions
            of a run with an ``attention_mask`` are left out; a cache that records nothing
            (a plain ``dict``) is refused, as patching refuses it (declare a dict's pass
            with `hooked_attnres.RunCacheDict`).
        router: ``"attn_res"``, ``"mlp_res"`` or ``"final_res"``.
        positions: ``"all"`` (one mean over the real tokens of every prompt, each token
            once, so a prompt with more real tokens weighs more, unlike `routing_mass`'s
            mean of each prompt's mean; the title gives the counts; of a cache made with a
            ``pos_slice``, over the real tokens at the positions it kept,
            `RunRecord.kept`) or one position (mean over prompts): an int or a 0-d
            integer tensor, read as the integer it holds (`position_index`, as the
            interventions read positions). Padding is known from the cache's
            ``attention_mask`` only: a cache of right-padded `TaskBatch` tokens run
            without one counts the padding; run it with ``attention_mask=`` (True up to
            each prompt's ``answer_pos``).

    Raises:
        ValueError: no routers, a ``positions`` other than ``"all"`` or one integer, non-finite
            weights (at real positions), a position where some prompt is padding, a cache
            of a pass after key-value-cached positions (its position 0 is not the
            sequence's) or whose weights were cached by an earlier pass than the recorded
            one (`recorded_run`), and one position of a cache made with a ``pos_slice``
            that drops or reorders positions (its position ``p`` is not the run's); a
            cache of another model (`check_cache_model`; a dict of one by its routers'
            source counts).
    """
    model.routing_layout.require_routers()  # (was: numpy's "zero-size array" error)
    if not isinstance(router, str):  # rows of two types would share the labels "layer k"
        raise ValueError(
            f"router must be one router type ('attn_res', 'mlp_res' or 'final_res'), got "
            f"{router!r}: the rows of two types would be drawn under the same 'layer k' labels"
        )
    # one position: an integer or a 0-d tensor / array (`position_index` checks its dtype
    # and range); not any container without an ndim (a deque of two positions was read as
    # its first)
    one = is_integer(positions) or getattr(positions, "ndim", None) == 0
    if not (one or (isinstance(positions, str) and positions == "all")):
        raise ValueError(
            "positions must be 'all' or one position (an int or a 0-d integer tensor), got "
            f"{positions!r}"
        )
    columns: list[str] = []
    rows = []
    sites = model.sites(router)
    names = [site.hook("weights") for site in sites]
    # a cache of another model: its sources are not this model's (it failed with "zip()
    # argument 2 is shorter than argument 1")
    check_cache_model(model, cache, "the cache")
    real, record, positions = _real_tokens(cache, names, positions)
    for site in sites:
        weights = _batch_pos_sources(cache[site.hook("weights")], record)
        weights_shape = weights.shape  # [batch, pos, n_sources]
        if real is not None:  # [batch, pos, n_sources] -> [n_real, n_sources]
            weights = weights[real.to(weights.device)][:, None]
        if not bool(torch.isfinite(weights).all()):  # blank would read "no such source"
            raise ValueError(
                f"the cached routing weights of {site} hold NaN or infinite values; a "
                "heatmap would show them as blank cells (sources the layer lacks): find "
                "what made the forward pass non-finite (float16 overflow?)"
            )
        at = weights if positions == "all" else weights[:, [int(positions)]]
        weights = at.mean(dim=(0, 1))
        labels = model.source_labels(site)
        if len(labels) != len(weights):  # a dict of another model's run (RunCacheDict)
            raise ValueError(
                f"the cache's {site.hook('weights')} has {len(weights)} sources, but this "
                f"model's {site} reads {len(labels)}: the cache comes from another model; "
                "cache a run of this model (model.run_with_cache(tokens))"
            )
        for label in labels:
            if label not in columns:
                columns.append(label)
        rows.append(dict(zip(labels, weights.tolist(), strict=True)))
    order = [c for c in columns if c != "current"] + (["current"] if "current" in columns else [])
    z = np.array([[row.get(c, np.nan) for c in order] for row in rows])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=order,
            y=["final" if site.is_final else f"layer {site.layer}" for site in sites],
            zmin=0,
            zmax=float(np.nanmax(z)),
            colorscale="Viridis",
            colorbar=dict(title="weight"),
            text=_cell_text(z),
            texttemplate="%{text}",
            hovertemplate="%{y}, %{x}: %{z:.3g}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_xaxes(title_text="source")
    where = f"position {positions}, mean over prompts"
    if positions == "all":  # one mean over the tokens: a longer prompt weighs more
        kept = " at the positions the pos_slice kept" if record.pos_slice is not None else ""
        if real is None:
            n_prompts, n_pos = weights_shape[:2]
            where = f"mean over {n_prompts * n_pos} tokens{kept}: {n_prompts} prompts x {n_pos}"
        else:
            where = (
                f"mean over the {int(real.sum())} real tokens{kept} of "
                f"{int(real.any(dim=1).sum())} prompts, padding left out"
            )
    return _finish(
        fig,
        title or f"Routing weights, {ROUTER_TITLES[router]} ({where})",
        160 + 40 * len(rows),
        categories="xy",
        blanks=_blank_line(((bool(np.isnan(z).any()), NO_SOURCE),)),
    )


def patching_heatmap(
    values,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str,
    value_name: str = "patched metric",
    x_title: str = "position",
    y_title: str = "layer",
) -> go.Figure:
    """A heatmap of a patching result (any ``[rows, columns]`` array or tensor, bfloat16
    included), with a diverging
    colour scale symmetric around 0 up to the largest magnitude (so values of 1e-4 are as
    visible as values of 1), missing cells (NaN) blank. A label that repeats (a token that
    occurs twice in a prompt) is followed by its index, ``"k3 (20)"``: plotly would draw
    both rows or columns in one place.

    Raises:
        ValueError: a shape that does not match the labels, an infinite value (it would
            stretch the colour scale to infinity) or no finite value at all (an empty
            figure)."""
    # read once (a generator has no len); None refused by name (it had no len()); one
    # string is one label, as effect_bands reads one group (it was its characters: rows
    # "layer" of 5 values were labelled 'l', 'a', 'y', 'e', 'r')
    row_labels, column_labels = (
        as_items(name, [labels] if isinstance(labels, str) else labels)
        for name, labels in (("row_labels", row_labels), ("column_labels", column_labels))
    )
    z = as_numpy(values)  # a tensor of any dtype (NumPy has no bfloat16) or device
    if z.ndim != 2 or z.shape != (len(row_labels), len(column_labels)):
        raise ValueError(
            f"values must be [rows, columns] = [{len(row_labels)}, "
            f"{len(column_labels)}], got shape {z.shape}"
        )
    if np.isinf(z).any():
        where = tuple(int(i) for i in np.argwhere(np.isinf(z))[0])
        raise ValueError(f"values hold an infinite value (first at {where}); nothing to scale by")
    if np.isnan(z).all():
        raise ValueError("values are all NaN (missing): the heatmap would be empty")
    bound = float(np.nanmax(np.abs(z))) or 1.0
    # 3 decimals, more where the largest value needs them (1e-4 would read "0.000" on the
    # darkest cell): the largest magnitude keeps 3 significant digits
    digits = max(3, 2 - int(np.floor(np.log10(bound))))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=_distinct_labels(column_labels, "column_labels"),
            y=_distinct_labels(row_labels, "row_labels"),
            zmin=-bound,
            zmax=bound,
            zmid=0,
            colorscale="RdBu",
            colorbar=dict(title=value_name),
            text=_cell_text(z, digits),
            texttemplate="%{text}",
            hovertemplate="%{y}, %{x}: %{z:.4g}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", title_text=y_title)
    fig.update_xaxes(title_text=x_title)
    return _finish(fig, title, 160 + 34 * len(row_labels), categories="xy")


def _require_mass_summary(mass_summary: pd.DataFrame) -> None:
    """Refuse a mass summary without `MASS_COLUMNS`, an empty one, one without
    ``family_read`` (`require_family_read_column`), or one with a missing (NaN, ``None``,
    ``<NA>``) ``router``, ``family`` or ``band`` label (`require_labelled`, as of the
    effects, `_require_effects`): its rows matched no effect, and the effects were refused
    as lacking a mass row (audit 191)."""
    _require_table(mass_summary, MASS_COLUMNS, "mass_summary")
    require_family_read_column(mass_summary, "the mass-effect figures")
    require_labelled(mass_summary, ("router", "family", "band"), "mass_summary")


def _blank_unread(
    table: pd.DataFrame, columns: Sequence[str], where: str, masked: Optional[pd.Series] = None
) -> pd.DataFrame:
    """``table`` (rows of a mass summary indexed by family, effects merged in or not) with
    ``columns`` NaN, drawn as no bar, where ``family_read`` is False: no router of the type
    reads the family, so its mass is 0 and its ablation masks nothing (effect 0) by
    construction. ``masked`` (the effects' ``n_masked_routers`` by family, when the table
    has it) must be 0 there: masked routers mean the effects are of another model."""
    unread = table.family_read.eq(False)
    require_read_agrees(table.family_read, masked, where)
    out = table.copy()
    out.loc[unread, list(columns)] = np.nan
    return out


def _require_effects(effects: pd.DataFrame) -> None:
    """Refuse an effects table without `EFFECT_COLUMNS` or without ``n_masked_routers``
    (`require_masked_column`, the study report's check): without it `_blank_unmasked`
    cannot tell an ablation that masked nothing from a measured 0; and one with a missing
    (NaN, ``None`` or ``<NA>``) ``router``, ``group``, ``family`` or ``metric`` label, by
    the shared refusal of NaN labels (`require_labelled`): a row without one matches no
    panel, bar or metric (``==`` never holds), and a ``<NA>`` family of a nullable column
    failed with pandas' bare "boolean value of NA is ambiguous" (audit 191). Not of their
    kinds: ``family`` and ``group`` may mix names and source indices (`require_keys`)."""
    _require_table(effects, EFFECT_COLUMNS, "effects")
    require_labelled(effects, ("router", "group", "family", "metric"), "effects")
    require_masked_column(effects, "the effect figures")


def _blank_unmasked(effects: pd.DataFrame) -> pd.DataFrame:
    """``effects`` (rows of an effects table, with ``n_masked_routers``: `_require_effects`)
    with ``effect``, ``ci_low`` and ``ci_high`` NaN, drawn as no bar or point, where the
    ablation masked no router (``n_masked_routers`` 0: no router of the group reads the
    family, or each that does was left alone): its effect is 0 by construction, not a
    measured 0, which a bar of 0 with a [0, 0] whisker would state (the report prints "–"
    there)."""
    out = effects.copy()
    out.loc[masked_nothing(effects, "the effect figures"), list(ESTIMATE)] = np.nan
    return out


def _blank_kinds(rows: pd.DataFrame) -> tuple[bool, bool]:
    """Which blanks a figure draws of ``rows`` (effects, with the mass summary's
    ``family_read`` where the figure pairs them): ``(some family no router of the type
    reads, some read family whose ablation masked no router)``, the blanks of
    `_blank_unread` and `_blank_unmasked`, for `_blank_line`."""
    nothing = masked_nothing(rows, "the effect figures").fillna(False).astype(bool)
    unread = nothing & False  # a nullable n_masked_routers read back from a CSV: plain bool
    if "family_read" in rows.columns:
        unread = rows.family_read.eq(False).fillna(False).astype(bool)
    return bool(unread.any()), bool((nothing & ~unread).any())


def _mass_of_group(
    mass_summary: pd.DataFrame, group: str, routers: Sequence[str] = ()
) -> pd.DataFrame:
    """The rows of ``mass_summary`` over the layers of the effects' ``group``: those of band
    ``group`` when the summary has a ``band`` column (`summarize_mass` by ``("router",
    "band", "family")``, or the study's summary, whose band ``"all"`` is every layer); a
    summary without one is of every layer of each router type, so only ``group`` ``"all"``
    pairs with it (its mass was drawn beside a band's effect under the band's title), and
    ``"final"`` when the effects' ``routers`` are the final router's alone (its one group
    in `plan_ablations`: that one router's mass; audit 117, refused since audit 114). The
    band is chosen by name: `_merged` and `mass_effect_by_seed` then check its layers are
    the group's (`require_same_layers`, audit 129)."""
    if "band" in mass_summary.columns:
        rows = mass_summary[mass_summary.band == group]
        if rows.empty:
            raise ValueError(
                f"mass_summary has no rows of band {group!r} (its bands: "
                f"{list(dict.fromkeys(mass_summary.band))}): the mass must be over the layers "
                f"whose ablation the effects of group {group!r} measure; summarise the mass "
                f"by ('router', 'family') for group 'all', or pass the group of a band it has"
            )
        return rows
    final_only = group == "final" and bool(routers) and set(routers) == {"final_res"}
    if group != "all" and not final_only:
        raise ValueError(
            f"mass_summary has no 'band' column: its mass is over every layer of each router "
            f"type, while the effects of group {group!r} mask that group's layers only; "
            "summarise the mass by ('router', 'band', 'family') (routing_mass has the band "
            f"column) to show band {group!r}, or plot group 'all'"
        )
    return mass_summary


def _merged(
    mass_summary: pd.DataFrame, effects: pd.DataFrame, metric: str, group: str, what: str
) -> tuple[pd.DataFrame, str, tuple[pd.DataFrame, pd.DataFrame], Optional[str]]:
    """The mass rows of the effects' ``group`` (`_mass_of_group`) merged with the effects of
    ``metric`` and ``group`` by router and family, a title's note naming the mass rows
    left out (families at the effects' router types without an effect row; ``""`` if
    none), the rows drawn of each table, ``(mass, effects)``, whose columns say what
    the whiskers are (`_whiskers`), and the method of the effects if they are attribution
    estimates (`estimate_method`, refused for ``what``, the figure, if of several kinds).
    An effect without a mass row is refused (audit 117: the merge left it out)."""
    _require_effects(effects)
    _require_mass_summary(mass_summary)
    chosen = effects[(effects.metric == metric) & (effects.group == group)]
    if chosen.empty:
        raise ValueError(f"no effects for metric={metric!r}, group={group!r}")
    method = estimate_method(chosen, what)  # before the one-row check: two methods
    _require_table(chosen, ESTIMATE, "effects", finite=ESTIMATE, intervals=True)
    mass_summary = _mass_of_group(mass_summary, group, list(dict.fromkeys(chosen.router)))
    shown = mass_summary[mass_summary.router.isin(set(chosen.router))]
    # the band is paired with the group by name: its layers must be those the group masked
    require_same_layers(shown, effects, group, "the mass-effect figures")
    _require_table(
        shown,
        INTERVAL,
        "mass_summary (at the effects' routers)",
        finite=INTERVAL,
        intervals=True,
    )
    remedy = (
        "pass one model's tables, with the mass summarised by ('router', 'family') "
        "(for several seeds or conditions use mass_effect_by_seed)"
    )
    require_one_row(mass_summary, ("router", "family"), "mass_summary", remedy)
    require_one_row(chosen, ("router", "family"), "effects", remedy)
    # one row each, merged by router and family: of one model (seed 0's mass was drawn
    # beside seed 1's effects)
    require_same_models((("mass_summary", shown), ("effects", chosen)), "the mass-effect figures")
    note = _pairing_note(shown, chosen)
    paired = pd.MultiIndex.from_frame(chosen[["router", "family"]])
    drawn = shown[pd.MultiIndex.from_frame(shown[["router", "family"]]).isin(paired)]
    merged = mass_summary.merge(chosen, on=["router", "family"], suffixes=("_mass", ""))
    return merged, note, (drawn, chosen), method


def _require_models_of_effects(mass: pd.DataFrame, chosen: pd.DataFrame) -> None:
    """Refuse effects (``chosen``, with ``condition`` and ``seed`` columns) of a model
    (``(condition, seed)``) that no row of ``mass`` is of, naming the models and both
    tables' labels (audit 196: tables of other condition labels, ``a`` beside ``b``, were
    refused as effects "(router, family) rows [...] without a mass_summary row to pair
    with", and told to select families or router types, which both tables had)."""
    have = set(zip(mass.condition, mass.seed, strict=True))
    lacking = [
        m for m in dict.fromkeys(zip(chosen.condition, chosen.seed, strict=True)) if m not in have
    ]
    if not lacking:
        return
    named = "; ".join(
        f"condition={np.asarray(c).tolist()!r}, seed={np.asarray(s).tolist()!r}"
        for c, s in lacking[:3]
    ) + (f" (and {len(lacking) - 3} more)" if len(lacking) > 3 else "")
    labels = distinct_labels
    raise ValueError(
        f"mass_summary has no row for {named}, a model of the effects: the tables hold "
        f"other models (conditions: effects {labels(chosen.condition)}, mass_summary "
        f"{labels(mass.condition)}; seeds: effects {labels(chosen.seed)}, mass_summary "
        f"{labels(mass.seed)}; a table without a condition or seed column is of condition "
        "'' and seed 0); pass the mass summary of the effects' models, labelled as they are"
    )


def _pairing_note(mass: pd.DataFrame, chosen: pd.DataFrame, by_model: bool = False) -> str:
    """Refuse effects (``chosen``, the rows drawn) with a ``(router, family)`` that no row
    of ``mass`` (the mass rows at the effects' router types) has, and return a title's note
    naming the mass the figure leaves out (``""`` if none): of the models without effects
    (with ``by_model``: the ``(condition, seed)`` pairs of ``mass`` that ``chosen`` lacks,
    ``"seed 2 of b"``, ``"seed 2"`` without a condition, `_with_model_columns`) and of
    the families without effects (of the other models). The effects choose the models and
    families shown, as they choose the router types: an effect without a mass row was left
    out without a word (audit 117: a source label's, e.g. attn_0 with the largest effect of
    its router type; in `mass_effect_by_seed` until audit 153), and so was the mass of a
    family without effects in `mass_effect_by_seed`, and of a model without effects until
    audit 191."""
    pieces = []
    if by_model:
        models = ["condition", "seed"]
        drawn = set(zip(chosen.condition, chosen.seed, strict=True))
        _require_models_of_effects(mass, chosen)
        lacking: dict = {}
        for condition, seed in dict.fromkeys(zip(mass.condition, mass.seed, strict=True)):
            if (condition, seed) not in drawn:
                lacking.setdefault(condition, []).append(str(seed))
        pieces += [
            f"seed {', '.join(seeds)}" + (f" of {condition}" if condition != "" else "")
            for condition, seeds in lacking.items()
        ]
        mass = mass[pd.MultiIndex.from_frame(mass[models]).isin(list(drawn))]
    have = set(zip(mass.router, mass.family, strict=True))
    unpaired = list(
        dict.fromkeys(
            (router, family)
            for router, family in zip(chosen.router, chosen.family, strict=True)
            if (router, family) not in have
        )
    )
    if unpaired:
        raise ValueError(
            f"effects has (router, family) rows {unpaired} without a mass_summary row to "
            "pair with: the figure would leave them out. Select the effects to show, e.g. "
            "effects[effects.family.isin(mass_summary.family) & effects.router.isin("
            "mass_summary.router)] (a source label or index of plan_ablations has no family "
            "mass: plot it with effect_bands), or pass the mass summary of the same model "
            "with every router type and family"
        )
    paired = set(zip(chosen.router, chosen.family, strict=True))
    left: dict[str, list[str]] = {}
    for router, family in dict.fromkeys(zip(mass.router, mass.family, strict=True)):
        if (router, family) not in paired:
            left.setdefault(router, []).append(str(family))
    note = "; ".join(
        pieces
        + [
            f"{', '.join(families)} at the {ROUTER_TITLES.get(router, router)}"
            for router, families in left.items()
        ]
    )
    return f" (no effects of {note}: not shown)" if note else ""


def mass_effect_bars(
    mass_summary: pd.DataFrame,
    effects: pd.DataFrame,
    metric: str = "logit_diff",
    group: str = "all",
    title: Optional[str] = None,
    relative: bool = True,
) -> go.Figure:
    """Per router type: routing mass (top row) and ablation effect (bottom row) of each
    family, with bootstrap-interval whiskers; each row shares its y-axis. A family no
    router of the type reads (``family_read`` False) has no bars, and an effect whose
    ablation masked no router (``n_masked_routers`` 0) no effect bar.

    Args:
        mass_summary: `summarize_mass(mass, by=("router", "family"))` (every layer:
            for ``group`` ``"all"``) or by ``("router", "band", "family")`` (its rows of
            band ``group`` are shown: the mass of the layers the effects masked; a summary
            without a ``band`` column and a ``group`` other than ``"all"`` is refused,
            except the final router's ``"final"``), with
            ``family_read`` (a summary without it is refused).
        effects: `ablation_effects` output; rows with ``metric`` and ``group`` are shown.
            They choose the router types and families drawn: one without a mass row (a
            source label such as ``attn_0``) is refused, one with a mass row is drawn after
            the four families, and the mass of a family without effects is not drawn, the
            title naming it.
        relative: effects as a percentage of the clean logit difference (``logit_diff``
            only); ``False``: in the metric's own unit.
    """
    relative = require_bool("relative", relative)
    if relative and metric == "logit_diff":
        _require_table(effects, ["clean"], "effects")
    merged, note, (drawn, chosen), method = _merged(
        mass_summary, effects, metric, group, "mass_effect_bars"
    )
    merged, unit = _scaled(merged, relative and metric == "logit_diff")
    name = effect_name(method)  # the axis's and the hovers' name of the effects
    routers = [r for r in ROUTERS if r in set(merged.router)]
    fig = make_subplots(
        rows=2,
        cols=len(routers),
        shared_xaxes=True,
        shared_yaxes="rows",
        vertical_spacing=0.1,
        subplot_titles=[ROUTER_TITLES[r] for r in routers],
    )
    # the families, then a source label both tables hold (it was left out: audit 221), each
    # in one colour in every panel (review 224: chosen per panel, a label read at one
    # router type only gave another label's colour to a label of the next panel)
    colours = _families(merged.family)
    for col, router in enumerate(routers, start=1):
        part = merged[merged.router == router].set_index("family")
        part = part.reindex([f for f in colours if f in set(part.index)])
        part = _blank_unread(
            part,
            ("mass", "ci_low_mass", "ci_high_mass", "effect", "ci_low", "ci_high"),
            f"router {router!r}",
            part.get("n_masked_routers"),
        )
        part = _blank_unmasked(part)
        colors = [colours[f] for f in part.index]
        fig.add_trace(
            _bar(
                part.index,
                part.mass,
                part.ci_low_mass,
                part.ci_high_mass,
                "mass",
                colors,
                _mass_hover(""),
                showlegend=False,
            ),
            row=1,
            col=col,
        )
        fig.add_trace(
            _bar(
                part.index,
                part.effect,
                part.ci_low,
                part.ci_high,
                name,
                colors,
                _effect_hover("", name, metric, unit),
                showlegend=False,
            ),
            row=2,
            col=col,
        )
    fig.update_yaxes(title_text="routing mass", row=1, col=1)
    fig.update_yaxes(
        title_text=f"{name} ({unit if metric == 'logit_diff' else metric})", row=2, col=1
    )
    fig.update_xaxes(title_text="source family", row=2)
    return _finish(
        fig,
        (title or f"Mass vs {_effect_noun(method, 'causal effect')} ({metric}, group {group})")
        + note,
        650,
        categories="x",
        whiskers=_whiskers(
            (("routing mass", "mass_summary", drawn), ("effect", "effects", chosen))
        ),
        blanks=_effect_blanks(_blank_kinds(merged), PAIRED),
    )


def mass_effect_scatter(
    mass_summary: pd.DataFrame,
    effects: pd.DataFrame,
    metric: str = "logit_diff",
    group: str = "all",
    title: Optional[str] = None,
) -> go.Figure:
    """Routing mass (x) against |ablation effect| (y) per family and router type, with
    both intervals; points far from the diagonal trend are dissociations. A family no
    router of the type reads (``family_read`` False) has no point, nor one whose ablation
    masked no router (``n_masked_routers`` 0); a summary without ``family_read`` is
    refused. ``mass_summary`` as in `mass_effect_bars` (its band ``group`` when it has a
    ``band`` column; without one, ``group`` ``"all"`` only); the effects choose the families
    as there (one without a mass row refused, a family's mass without effects named in the
    title). A point's hover text names its family, router type and group, its mass and
    |effect| with their intervals, the effect's metric and unit, and the signed effect
    (audit 227: the points had plotly's default hover, "(0.31, 1.2)", and the trace name)."""
    merged, note, (drawn_mass, chosen), method = _merged(
        mass_summary, effects, metric, group, "mass_effect_scatter"
    )
    name = effect_name(method)  # the axis's and the hovers' name of the effects
    symbols = {"attn_res": "circle", "mlp_res": "square", "final_res": "diamond"}
    colours = _families(merged.family)  # a source label's too (review 224: all were gray)
    fig = go.Figure()
    for router in dict.fromkeys(merged.router):
        part = merged[merged.router == router].set_index("family")
        _blank_unread(part, (), f"router {router!r}", part.get("n_masked_routers"))
    # a family no router of the type reads: no point (it was drawn at mass 0, effect 0)
    # ... and one whose ablation masked nothing (`_blank_unmasked`) neither
    drawn = _blank_unmasked(merged[merged.family_read.ne(False)]).dropna(subset=["effect"])
    for (router, family), row in drawn.set_index(["router", "family"]).iterrows():
        size = abs(row.effect)
        low, high = sorted((abs(row.ci_low), abs(row.ci_high)))
        if row.ci_low <= 0 <= row.ci_high:
            low = 0.0
        fig.add_trace(
            go.Scatter(
                x=[row.mass],
                y=[size],
                mode="markers",
                name=f"{family} ({ROUTER_TITLES[router]})",
                marker=dict(color=colours[family], symbol=symbols[router], size=12),
                error_x=dict(
                    type="data",
                    symmetric=False,
                    array=[row.ci_high_mass - row.mass],
                    arrayminus=[row.mass - row.ci_low_mass],
                ),
                error_y=dict(  # from low to high, also where size lies outside them
                    type="data",
                    symmetric=False,
                    array=[high - size],
                    arrayminus=[size - low],
                ),
                customdata=[
                    [row.ci_low_mass, row.ci_high_mass, row.effect, row.ci_low, row.ci_high]
                ],
                hovertemplate=(
                    f"{family}, {ROUTER_TITLES[router]}, group {group}<br>routing mass: "
                    "%{x:.3g} (a fraction of the router's weight), interval "
                    "[%{customdata[0]:.3g}, %{customdata[1]:.3g}]<br>"
                    f"|{name}| on {metric}: %{{y:.3g}} {_unit_text(metric, 'logits')}<br>"
                    f"{name}: %{{customdata[2]:.3g}}, interval "
                    "[%{customdata[3]:.3g}, %{customdata[4]:.3g}]<extra></extra>"
                ),
            )
        )
    fig.update_layout(xaxis_title="routing mass", yaxis_title=f"|{name}| ({metric})")
    whiskers = _whiskers(
        (
            ("routing mass (x)", "mass_summary", drawn_mass),
            ("|effect| (y)", "effects", chosen),
        )
    )
    return _finish(
        fig,
        (title or f"Routing mass vs |{_effect_noun(method, 'effect')}| ({metric})") + note,
        500,
        whiskers=whiskers,
        blanks=_effect_blanks(_blank_kinds(merged), ("no point", "no point")),
    )


def _families(column: Union[pd.Series, pd.Index]) -> dict:
    """``{family: colour}`` of the masked families in a table's ``family`` column: the four
    families in their order, then labels or indices (`plan_ablations` masks those too)
    in the table's order, each with a colour of its own."""
    present = list(dict.fromkeys(column))
    others = [f for f in present if f not in FAMILIES]
    out = {f: FAMILY_COLORS[f] for f in FAMILIES if f in present}
    out.update(dict(zip(others, _palette(len(others)), strict=True)))
    return out


def _require_cells(values: pd.Series, what: str, series: str) -> None:
    """Refuse a series that lacks a row at some of its panel's x positions: ``values`` is
    reindexed to them, so NaN marks a missing row (a present row's NaN is refused
    earlier), which plotly would draw as no bar, read as 0."""
    missing = values.index[values.isna()].tolist()
    if missing:
        raise ValueError(
            f"{what} has no row for {series} at {missing} (the other bars of its panel "
            "have one); a missing bar would read as 0: pass the table with every row "
            "(or select the rows to show)"
        )


def _rows_text(index: Sequence) -> str:
    """Row labels for a message: the first ten, ``"[0, 1, ...]"`` beyond."""
    shown = [str(label) for label in list(index)[:10]]
    return "[" + ", ".join(shown) + (", ...]" if len(index) > 10 else "]")


def _in_depth_order(chosen: pd.DataFrame) -> list:
    """The groups of ``chosen`` (rows of an effects table) other than ``"all"``, in depth
    order: by the first, then the last layer each masked (its ``layers``, `layer_tuple`; the
    final router's group, which has none, last), ties in the table's order; in the table's
    order without a ``layers`` column. The rows' order is no depth order: a table sorted by
    its text columns (``sort_values``, a ``groupby``) drew the bands early, late, middle and
    ``groups="layers"`` as layer 0, 1, 10, 11, 2, ... on the axis titled "depth band".

    Every row of a group is read (review 192: the first row's ``layers`` alone placed a
    band whose first cell was NaN last, as the final router's group, drawing middle, late,
    early): a group whose rows hold several layer lists, or none at a router type other
    than the final router (``final_res``, whose group masks no layer list), is refused,
    naming the group and its rows."""
    groups = [g for g in dict.fromkeys(chosen.group) if g != "all"]
    if "layers" not in chosen.columns:
        return groups
    order = {}
    for group in groups:
        rows = chosen[chosen.group == group]
        held: dict[tuple, list] = {}
        for label, cell in zip(rows.index, rows.layers, strict=True):
            held.setdefault(layer_tuple(cell, "effects"), []).append(label)
        if len(held) > 1:
            sets = ", ".join(
                f"{list(layers) if layers else 'none'} at rows {_rows_text(labels)}"
                for layers, labels in held.items()
            )
            raise ValueError(
                f"effects' rows of group {group!r} do not hold one layer list: {sets}; the "
                "group's place in depth order is unknown: pass ablation_effects' rows (each "
                "group's layers in every row), or choose the order with groups=[...]"
            )
        (layers,) = held
        if not layers and not (rows.router == "final_res").all():
            raise ValueError(
                f"effects' rows of group {group!r} hold no layers (rows "
                f"{_rows_text(rows.index)}), which only the final router's group may: the "
                "group's place in depth order is unknown: pass ablation_effects' rows (each "
                "group's layers in every row), or choose the order with groups=[...]"
            )
        order[group] = (0, layers[0], layers[-1]) if layers else (1, 0, 0)
    return sorted(groups, key=order.__getitem__)


def effect_bands(
    effects: pd.DataFrame,
    metric: str = "logit_diff",
    groups: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    relative: bool = True,
) -> go.Figure:
    """Ablation effect of each family per depth group (x) and router type (panel, shared
    y-axis), with bootstrap whiskers: where in depth each family matters (the paper's motifs).
    A band whose ablation masked no router (``n_masked_routers`` 0, e.g. ``older`` in the
    early band) has no bar: its effect is 0 by construction (`_blank_unmasked`).

    Args:
        effects: `ablation_effects` output, or `attribute_routing`'s ``.table`` of one
            method, whose estimates the axis and title name ("attribution estimate
            (linear)", `estimate_method`, as in every effect figure; a table of several
            kinds is refused).
        groups: the groups to show, in order (default: every group except ``"all"``, in
            depth order, by the layers each masked: `_in_depth_order`, which refuses a
            group whose rows hold several layer lists, or none outside the final router).
        relative: effects as a percentage of the clean logit difference.
    """
    relative = require_bool("relative", relative)
    _require_effects(effects)
    chosen = effects[effects.metric == metric]
    if chosen.empty:
        raise ValueError(f"no effects for metric={metric!r}")
    name = effect_name(estimate_method(chosen, "effect_bands"))  # before the one-row check
    require_one_row(
        chosen,
        ("router", "group", "family"),
        "effects",
        "pass one model's effects (for several seeds or conditions use effects_by_seed)",
    )
    chosen, unit = _scaled(chosen, relative and metric == "logit_diff")
    groups = (  # one group by name is that group (a string would be its characters)
        require_selection("groups", [groups] if isinstance(groups, str) else groups)
        if groups is not None
        else _in_depth_order(chosen)
    )
    if not groups:
        raise ValueError(
            f"effects has no {metric} rows of a depth group other than 'all'; compute "
            "ablation_effects with groups='bands' (the default)"
        )
    absent = [g for g in groups if g not in set(chosen.group)]
    if absent:
        raise ValueError(
            f"effects has no {metric} rows of group(s) {absent} (it has "
            f"{list(dict.fromkeys(chosen.group))})"
        )
    chosen = chosen[chosen.group.isin(groups)]
    _require_table(chosen, ESTIMATE, "effects", finite=ESTIMATE, intervals=True)
    routers = [r for r in ROUTERS if r in set(chosen.router)]
    families = _families(chosen.family)
    fig = make_subplots(
        rows=1,
        cols=len(routers),
        shared_yaxes=True,
        subplot_titles=[ROUTER_TITLES[r] for r in routers],
    )
    for col, router in enumerate(routers, start=1):
        part = chosen[chosen.router == router]
        shown = [g for g in groups if g in set(part.group)]  # the final router: "final"
        for family, color in families.items():
            rows = part[part.family == family].set_index("group").reindex(shown)
            _require_cells(rows.effect, "effects", f"router={router!r}, family={family!r}")
            rows = _blank_unmasked(rows)
            fig.add_trace(
                _bar(
                    shown,
                    rows.effect,
                    rows.ci_low,
                    rows.ci_high,
                    str(family),
                    color,
                    _effect_hover(f"{family}, ", name, metric, unit),
                    showlegend=col == 1,
                    legendgroup=str(family),
                ),
                row=1,
                col=col,
            )
    fig.update_yaxes(
        title_text=f"{name} ({unit if metric == 'logit_diff' else metric})", row=1, col=1
    )
    fig.update_xaxes(title_text="depth band")
    fig.update_layout(barmode="group")
    return _finish(
        fig,
        title or f"{name[0].upper()}{name[1:]} per depth group ({metric})",
        450,
        categories="x",
        whiskers=_whiskers((("effect", "effects", chosen),)),
        blanks=_effect_blanks(_blank_kinds(chosen), ("no bar", "no bar")),
    )


def _columns(columns: Optional[Sequence[str]], chosen: pd.DataFrame) -> list[str]:
    """The conditions shown, one panel column each: ``columns`` (each must have rows; an
    unknown one would be an empty panel) or the table's, in order."""
    have = list(dict.fromkeys(chosen.condition))
    if columns is None:
        return have
    columns = require_selection("columns", [columns] if isinstance(columns, str) else columns)
    absent = [c for c in columns if c not in have]
    if absent:
        raise ValueError(f"columns {absent} have no rows in the table (its conditions: {have})")
    return columns


def _absent_seeds(table: pd.DataFrame, columns: Sequence[str], seeds: Sequence[int]) -> dict:
    """``{condition: seeds}``: the figure's seeds that a condition lacks (their slots stay
    empty, which the panel title says: `_seed_note`)."""
    return {
        c: [s for s in seeds if s not in set(table[table.condition == c].seed)] for c in columns
    }


def _seed_note(absent: Sequence[int]) -> str:
    """A panel title's note of the seeds it lacks, ``" (no seed 1, 2)"``."""
    return f" (no seed {', '.join(map(str, absent))})" if absent else ""


def _shown_effects(
    chosen: pd.DataFrame, columns: Sequence[str], relative: bool
) -> tuple[pd.DataFrame, str]:
    """The rows of ``chosen`` (effects of a seed figure) of the conditions shown,
    ``columns``, checked finite and in the plotted unit (`_scaled`): only they decide. A
    condition not shown, e.g. a model at chance with a clean logit difference <= 0 (or a
    NaN one), refused every figure of the table with ``relative=True`` (audit 117)."""
    chosen = chosen[chosen.condition.isin(columns)]
    _require_table(chosen, ESTIMATE, "effects", finite=ESTIMATE, intervals=True)
    return _scaled(chosen, relative)


def effects_by_seed(
    effects: pd.DataFrame,
    family: str,
    routers: Sequence[str],
    groups: Sequence[str] = ("early", "middle", "late"),
    columns: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    relative: bool = True,
) -> go.Figure:
    """One family's ablation effect per depth band (x), seeds side by side (bars), one
    panel per router type (row) and condition (column), every panel on one y-axis: the
    figure of a routing motif across seeds and conditions. A band whose ablation masked no
    router (``n_masked_routers`` 0) has no bar: its effect is 0 by construction, not
    measured (`_blank_unmasked`; the report prints "–").

    Args:
        effects: `ablation_effects` rows with ``seed`` (and ``condition``) columns.
        family: the masked family.
        routers: router types, one row each.
        groups: the bands on the x-axis.
        columns: conditions, one column each (default: the table's, in order).
        relative: effects as a percentage of each model's clean logit difference.
    """
    relative = require_bool("relative", relative)
    _require_effects(effects)
    # a NaN condition or seed matches no panel or slot (== never holds): its bars were
    # left out and its panel titled as lacking the seed; seeds 0 and '1' cannot be sorted
    require_keys(effects, ("condition", "seed"), "effects")
    routers = require_selection("routers", [routers] if isinstance(routers, str) else routers)
    groups = require_selection("groups", [groups] if isinstance(groups, str) else groups)
    chosen = effects[
        (effects.metric == "logit_diff")
        & (effects.family == family)
        & effects.router.isin(routers)
        & effects.group.isin(groups)
    ]
    if chosen.empty:
        raise ValueError(
            f"no logit_diff effects of {family!r} at {list(routers)} in {list(groups)}"
        )
    method = estimate_method(chosen, "effects_by_seed")  # before the one-row check
    chosen = _with_model_columns(chosen)
    require_one_row(
        chosen,
        ("condition", "seed", "router", "group"),
        "effects",
        "give each model a distinct condition or seed",
    )
    for axis, asked in (("router", routers), ("group", groups)):
        lacking = [a for a in asked if a not in set(chosen[axis])]
        if lacking:  # an empty panel, or an empty slot on every panel's x-axis
            raise ValueError(
                f"effects has no logit_diff rows of {family!r} at {axis}(s) {lacking} (it has "
                f"{list(dict.fromkeys(chosen[axis]))})"
            )
    columns = _columns(columns, chosen)
    seeds = sorted(set(chosen.seed))  # every model's seed has a slot (`_absent_seeds`)
    palette = _palette(len(seeds))  # one colour per seed, the same in every panel
    chosen, unit = _shown_effects(chosen, columns, relative)
    absent = _absent_seeds(chosen, columns, seeds)
    titles = [
        # "" is no condition column (`_with_model_columns`); a condition 0 is one
        f"{c}{_seed_note(absent[c])}: {ROUTER_TITLES[r]}" if c != "" else ROUTER_TITLES[r]
        for r in routers
        for c in columns
    ]
    fig = make_subplots(
        rows=len(routers),
        cols=len(columns),
        shared_yaxes="all",
        subplot_titles=titles,
        horizontal_spacing=0.04,
        vertical_spacing=0.12,
    )
    for row, router in enumerate(routers, start=1):
        for col, condition in enumerate(columns, start=1):
            part = chosen[(chosen.router == router) & (chosen.condition == condition)]
            for k, seed in enumerate(seeds):
                rows = part[part.seed == seed].set_index("group").reindex(list(groups))
                if seed not in absent[condition]:  # a seed the condition has: every band
                    where = f"condition={condition!r}, seed={seed}, router={router!r}"
                    _require_cells(rows.effect, "effects", where)
                    # (an absent seed's slots are NaN rows: no bars, nothing to blank)
                    rows = _blank_unmasked(rows)
                fig.add_trace(
                    _bar(
                        groups,
                        rows.effect,
                        rows.ci_low,
                        rows.ci_high,
                        f"seed {seed}",
                        palette[k],
                        _effect_hover(
                            f"seed {seed}, ",
                            effect_name(method),
                            "logit_diff",
                            unit,
                            str(condition),
                        ),
                        showlegend=row == 1 and col == 1,
                        legendgroup=f"seed {seed}",
                    ),
                    row=row,
                    col=col,
                )
    fig.update_yaxes(title_text=f"{effect_name(method)} ({unit})", col=1)
    fig.update_xaxes(title_text="depth band", row=len(routers))
    fig.update_layout(barmode="group")
    return _finish(
        fig,
        title
        or f"Masking {family}: {_effect_noun(method, 'effect')} per depth band, seeds side by side",
        140 + 260 * len(routers),
        categories="x",
        whiskers=_whiskers((("effect", "effects", chosen),)),
        blanks=_effect_blanks(_blank_kinds(chosen), ("no bar", "no bar")),
    )


def mass_effect_by_seed(
    mass_summary: pd.DataFrame,
    effects: pd.DataFrame,
    router: str,
    columns: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    relative: bool = True,
) -> go.Figure:
    """Routing mass (top row) and ablation effect over all layers (bottom row) of every
    family at one router type, seeds side by side, one column per condition; each row on
    one y-axis: the figure of a mass-versus-effect dissociation across seeds.

    Args:
        mass_summary: the study's mass summary (``band == "all"`` rows are used when a
            ``band`` column exists) with ``seed`` (and ``condition``) columns and
            ``family_read`` (a family no router of the type reads has no bars; a summary
            without the column is refused).
        effects: `ablation_effects` rows (group ``"all"``) with the same columns. They
            choose the models (``condition``, ``seed``) and families drawn: an effect
            without a mass row is refused, and the mass of a model or family without
            effects is not drawn, the title naming it (`_pairing_note`: "(no effects of
            seed 2 of b; prev_completed at the MLP routers: not shown)"; with ``columns``,
            of those conditions only).
    """
    relative = require_bool("relative", relative)
    _require_effects(effects)
    _require_mass_summary(mass_summary)
    # a NaN condition or seed matches no panel or slot (`effects_by_seed`)
    require_keys(effects, ("condition", "seed"), "effects")
    require_keys(mass_summary, ("condition", "seed"), "mass_summary")
    # seeds 0 and '0' (a table read back from a CSV): "mass_summary has no row for seed 0"
    require_same_kind((("mass_summary", mass_summary), ("effects", effects)), ("condition", "seed"))
    mass = _mass_of_group(mass_summary, "all")  # every layer, as the effects of group "all"
    mass = mass[mass.router == router]
    require_same_layers(mass, effects, "all", "mass_effect_by_seed")
    chosen = effects[
        (effects.metric == "logit_diff") & (effects.group == "all") & (effects.router == router)
    ]
    if chosen.empty or mass.empty:
        raise ValueError(f"no mass or logit_diff effects (group 'all') at {router!r}")
    method = estimate_method(chosen, "mass_effect_by_seed")  # before the one-row check
    name = effect_name(method)  # the axis's and the hovers' name of the effects
    chosen, mass = _with_model_columns(chosen), _with_model_columns(mass)
    remedy = "give each model a distinct condition or seed (and the mass one band, 'all')"
    require_one_row(chosen, ("condition", "seed", "family"), "effects", remedy)
    require_one_row(mass, ("condition", "seed", "family"), "mass_summary", remedy)
    _require_table(mass, INTERVAL, "mass_summary", finite=INTERVAL, intervals=True)
    asked = columns  # None: every condition of the effects, the mass of others named
    columns = _columns(columns, chosen)
    # the models and families with an effect (each has mass rows; the mass of the others,
    # of the conditions shown or of every condition, is named in the title)
    note = _pairing_note(
        mass if asked is None else mass[mass.condition.isin(columns)],
        chosen[chosen.condition.isin(columns)],
        by_model=True,
    )
    seeds = sorted(set(chosen.seed))  # every model's seed has a slot (`_absent_seeds`)
    palette = _palette(len(seeds))  # one colour per seed, the same in every panel
    families = list(_families(chosen.family))  # a source label too (`mass_effect_bars`)
    chosen, unit = _shown_effects(chosen, columns, relative)
    # the effects choose the models: a seed whose mass alone a condition has is absent
    absent = _absent_seeds(chosen, columns, seeds)
    models = pd.MultiIndex.from_frame(mass[["condition", "seed"]])
    drawn = mass[
        models.isin(list(set(zip(chosen.condition, chosen.seed, strict=True))))
        & mass.family.isin(families)
    ]
    fig = make_subplots(
        rows=2,
        cols=len(columns),
        shared_yaxes="rows",
        shared_xaxes=True,
        subplot_titles=[  # "" is no condition column (`effects_by_seed`'s titles)
            f"{c if c != '' else ROUTER_TITLES[router]}{_seed_note(absent[c])}" for c in columns
        ],
        horizontal_spacing=0.04,
        vertical_spacing=0.1,
    )
    unread = nothing = False  # the blanks drawn (`_blank_kinds`)
    for col, condition in enumerate(columns, start=1):
        for k, seed in enumerate(seeds):
            color = palette[k]
            # the drawn mass rows: a model without effects has none (review 192: seed 2 of
            # a, which b has, was drawn in a's panel titled "(no seed 2)")
            m = drawn[(drawn.condition == condition) & (drawn.seed == seed)].set_index("family")
            m = m.reindex(families)
            e = chosen[(chosen.condition == condition) & (chosen.seed == seed)].set_index("family")
            e = e.reindex(families)
            if seed not in absent[condition]:  # a seed the condition has: every family
                where = f"condition={condition!r}, seed={seed}"
                _require_cells(m.mass, "mass_summary", where)
                _require_cells(e.effect, "effects", where)
                kinds = _blank_kinds(e.assign(family_read=m.family_read))
                unread, nothing = unread or kinds[0], nothing or kinds[1]
                # a family no router of the type reads: no bars (they were drawn as 0)
                e = _blank_unread(
                    e.assign(family_read=m.family_read),
                    ("effect", "ci_low", "ci_high"),
                    where,
                    e.get("n_masked_routers"),
                )
                m = _blank_unread(m, ("mass", "ci_low", "ci_high"), where)
                e = _blank_unmasked(e)
            common = dict(legendgroup=f"seed {seed}")
            fig.add_trace(
                _bar(
                    families,
                    m.mass,
                    m.ci_low,
                    m.ci_high,
                    f"seed {seed}",
                    color,
                    _mass_hover(f"seed {seed}, ", str(condition)),
                    showlegend=col == 1,
                    **common,
                ),
                row=1,
                col=col,
            )
            fig.add_trace(
                _bar(
                    families,
                    e.effect,
                    e.ci_low,
                    e.ci_high,
                    f"seed {seed}",
                    color,
                    _effect_hover(f"seed {seed}, ", name, "logit_diff", unit, str(condition)),
                    showlegend=False,
                    **common,
                ),
                row=2,
                col=col,
            )
    fig.update_yaxes(title_text="routing mass", row=1, col=1)
    fig.update_yaxes(title_text=f"{name} ({unit})", row=2, col=1)
    fig.update_xaxes(title_text="source family", row=2)
    fig.update_layout(barmode="group")
    return _finish(
        fig,
        (
            title
            or f"Mass vs {_effect_noun(method, 'effect')}, {ROUTER_TITLES[router]}, seeds side "
            "by side"
        )
        + note,
        620,
        categories="x",
        whiskers=_whiskers(
            (
                (
                    "routing mass",
                    "mass_summary",
                    # the drawn rows: a model the effects lack is not drawn (review 182)
                    drawn,
                ),
                ("effect", "effects", chosen),
            )
        ),
        blanks=_effect_blanks((unread, nothing), PAIRED),
    )
