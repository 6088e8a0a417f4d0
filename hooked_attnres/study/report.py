"""The study's report: one document, rendered as a self-contained HTML page
(`study_report_html`) and as Markdown text (`study_report`). Every sentence that states a
result is generated from the tables (`hooked_attnres.analysis.motif_verdicts`).
"""

from __future__ import annotations

import html
import json
import os
from typing import TYPE_CHECKING, Any, Optional, Union

import pandas as pd

from hooked_attnres._validation import (
    first_non_finite,
    require_columns,
    require_decisions,
    require_keys,
    require_same_kind,
)
from hooked_attnres.analysis.bootstrap import level_text, min_resamples, too_few_resamples
from hooked_attnres.analysis.mass import (
    every_layer_mass,
    masked_nothing,
    require_family_read_column,
    require_masked_column,
    require_same_models,
)
from hooked_attnres.analysis.motifs import (
    CLAIMS,
    PREREGISTERED,
    PREREGISTERED_CONFIDENCE,
    claim_text,
    printed_beside,
    same_top_family,
)
from hooked_attnres.interventions.selection import depth_bands
from hooked_attnres.model.depth import FAMILIES
from hooked_attnres.study.conditions import get_condition

if TYPE_CHECKING:
    from hooked_attnres.study.run import StudyResult

# a document is a list of blocks: (kind, payload)
Block = tuple[str, object]

QUESTION = (
    "Block Attention Residuals expose, at every sublayer, how much weight each earlier depth "
    "source gets. Does that routing mass tell which sources matter? The seed paper claims "
    "three localised routing motifs in a trained model (M1: the embedding through early MLP "
    "routers; M2: the current stream through early attention and MLP routers; M3: older "
    "history through late attention routers) and a dissociation of mass from causal effect "
    "(D1: in each router type the family with the most mass is not the one with the largest "
    "effect; D2: in MLP routers the embedding has less than half of current's mass and at "
    "least twice its effect; D3: prev_completed carries mass without effect); and that a "
    "recency-wrapped vanilla model routes exactly as an analytic schedule predicts. This "
    "report tests each claim with the criteria pre-registered in docs/study.md, on every "
    "condition and model seed below, by mask-and-renormalise ablation on held-out prompts."
)


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def require_study_result(result: Any, what: str) -> None:
    """Refuse a ``result`` that is no `StudyResult` (``TypeError`` naming ``what``, the
    call): a table (``result.accuracy``) or an output folder's path failed with
    "'DataFrame' object has no attribute 'settings'" or "'str' object has no attribute
    'accuracy'"."""
    from hooked_attnres.study.run import StudyResult

    if not isinstance(result, StudyResult):
        # a folder: write_study returns its path, which reads as "write_study's" result
        folder = (
            "; a study folder (the path write_study returns) is no StudyResult and nothing "
            "reads one back: its report is the report.md / report.html written there"
            if isinstance(result, (str, os.PathLike))
            else ""
        )
        raise TypeError(
            f"{what} takes the StudyResult that run_study(...) returns, got the "
            f"{type(result).__name__} {result!r:.60}{folder}"
        )


def _conclusion(result: StudyResult) -> list[str]:
    """Sentences that summarise the verdicts (generated from the numbers), in the
    pre-registered words (replicated, majority, minority, absent; single seed)."""
    verdicts = result.verdicts
    if verdicts.empty:
        return []
    names = list(dict.fromkeys(verdicts.condition))
    trained = [c for c in names if get_condition(c).kind == "attnres"]
    lines = []
    for claim in CLAIMS:
        rows = verdicts[verdicts.claim == claim]
        if rows.empty:
            continue
        ours = rows[rows.condition.isin(trained)]
        parts = []
        seeded = ours[ours.n > 1]  # one seed replicates nothing (amendment 3)
        if not seeded.empty:
            held = [
                f"{r.condition} {r.k}/{r.n} {r.verdict}"
                for r in seeded.itertuples()
                if r.verdict in ("replicated", "majority")
            ]
            parts.append(
                f"replicated or majority in {len(held)} of {len(seeded)} Block AttnRes "
                "conditions with several seeds" + (f" ({', '.join(held)})" if held else "")
            )
            minority = [
                f"{r.condition} {r.k}/{r.n}" for r in seeded.itertuples() if r.verdict == "minority"
            ]
            if minority:
                parts.append(f"minority in {', '.join(minority)}")
        for r in ours[ours.n == 1].itertuples():
            parts.append(f"{'present' if r.k else 'absent'} in the single seed of {r.condition}")
        if ours.empty:  # a study of baselines only: their verdicts are still reported
            parts.append("no Block AttnRes condition was studied")
        elif (ours.k == 0).all():  # docs/study.md: "reported as not replicated"
            parts.append("absent in every seed of every Block AttnRes condition: not replicated")
        baselines = rows[~rows.condition.isin(trained)]
        if not baselines.empty:
            parts.append(
                "recency-wrapped vanilla baselines: "
                + ", ".join(
                    f"{r.condition} {r.k}/{r.n} {r.verdict}" for r in baselines.itertuples()
                )
            )
        line = f"{claim}: " + "; ".join(parts)
        lines.append(line + ".")
    lines += _as_written_lines(result)
    d1 = result.motifs[
        result.motifs.claim.str.startswith("D1") & result.motifs.condition.isin(trained)
    ]
    if not d1.empty:
        # counted as booleans, after the one check of a column of decisions: an object
        # column of NumPy booleans summed as NumPy's logical or (k read 1), a NaN as present
        require_decisions(d1, "present", ("condition", "seed", "claim"), "the study's motifs")
        lines.append(
            f"Across Block AttnRes conditions, seeds and router types, the top-mass family was "
            f"not the top-effect family with separated intervals (D1) in "
            f"{int(d1.present.to_numpy(dtype=bool).sum())} of {len(d1)} cases; the same "
            f"family was on top of both in "
            f"{sum(map(same_top_family, d1.top_mass, d1.top_effect))}."
        )
    if not result.robustness.empty or not result.fresh_motifs.empty:
        n = len(result.motifs)
        changed = "".join(
            f"{'; ' if i else ': '}{r.condition} seed {r.seed} {r.claim} "
            f"{'present' if r.present_first else 'absent'} -> "
            f"{'present' if r.present_second else 'absent'}"
            for i, r in enumerate(result.robustness.itertuples())
        )
        lines.append(
            f"On a second, disjoint set of {result.settings.get('n_prompts', '?')} "
            f"held-out prompts per model (data seed "
            f"{result.settings.get('fresh_probe_seed', '?')}), {len(result.robustness)} of {n} "
            f"per-seed verdicts changed{changed}."
        )
    elif not result.motifs.empty:  # docs/study.md pre-registers the check: say it is missing
        lines.append(
            "The verdicts were not recomputed on a second, disjoint set of held-out prompts: "
            "this run skipped the robustness check of docs/study.md."
        )
    return lines


def _as_written_lines(result: StudyResult) -> list[str]:
    """The per-seed verdicts that criterion 2 as first written (without amendment 1's
    positive clean logit difference) decides differently (generated from the numbers)."""
    motifs = result.motifs
    if motifs.empty or "present_as_written" not in motifs.columns:
        return []
    differ = motifs[motifs.present != motifs.present_as_written]
    if differ.empty:
        return [
            "Criterion 2 as first written (amendment 1 in docs/study.md) gives every per-seed "
            "verdict the same."
        ]
    cases = "; ".join(
        f"{r.condition} seed {r.seed} {r.claim}: "
        f"{'present' if r.present_as_written else 'absent'} as written, "
        f"{'present' if r.present else 'absent'} as amended"
        for r in differ.itertuples()
    )
    return [
        f"Criterion 2 as first written (amendment 1 in docs/study.md) decides "
        f"{len(differ)} per-seed verdict(s) differently: {cases}."
    ]


MODEL_LABELS = ("condition", "seed")  # the columns that name a model of the study


def _deviation_text(largest: float, threshold: float) -> str:
    """``largest`` in 2 significant digits, or in as many as it takes for the printed
    number to fall on the same side of ``threshold`` as the number itself (1.0000001e-6
    printed "1.0e-06" next to "does not hold (criterion <= 1e-6)")."""
    return printed_beside(largest, threshold, 1, "e")


def _schedule_sentences(result: StudyResult) -> list[str]:
    if result.schedule.empty:
        return []
    # a NaN condition or seed: groupby would leave that model's deviation out of the claim
    require_keys(result.schedule, MODEL_LABELS, "the study result's schedule table")
    deviations = result.schedule.max_abs_deviation
    found = first_non_finite(deviations)
    if found is not None:  # pandas' max skips NaN: the claim would hold on the other rows
        row = result.schedule.iloc[found[0]]
        raise ValueError(
            f"the schedule comparison of {row.condition} seed {row.seed} holds a non-finite "
            f"deviation ({row.max_abs_deviation}); the schedule claim cannot be decided from "
            "it: recompute schedule_comparison (it refuses non-finite routing masses)"
        )
    worst = result.schedule.groupby(["condition", "seed"]).max_abs_deviation.max()
    out = []
    for condition, part in worst.groupby(level=0):
        largest = float(part.max())
        threshold = PREREGISTERED.schedule_max_deviation
        ok = "holds" if largest <= threshold else "does not hold"
        written = _written(threshold)
        out.append(
            f"Recency-wrapped {condition}: the routing equals the analytic schedule to "
            f"{_deviation_text(largest, threshold)} (largest |measured - predicted| family "
            "mass over routers, "
            f"layers, prompts and {len(part)} seed(s)); the claim {ok} (criterion "
            f"<= {written}, amendment 2)."
        )
    return out


def _claim_legend() -> pd.DataFrame:
    """One row per claim id: what it says."""
    return pd.DataFrame(
        {
            "id": list(CLAIMS),
            "claim": [claim_text(c) for c in CLAIMS],
        }
    )


def _setting(result: StudyResult, name: str):
    """A study setting from ``result.settings``, or `run_study`'s value where a result
    built by hand lacks it."""
    from hooked_attnres.study import run

    defaults = {
        "probe_seed": run.PROBE_SEED,
        "fresh_probe_seed": run.FRESH_PROBE_SEED,
        "recency_bias": run.RECENCY_BIAS,
        "confidence": PREREGISTERED_CONFIDENCE,
    }
    return result.settings.get(name, defaults.get(name, "?"))


def model_text(condition: str, recency_bias: Optional[float]) -> str:
    """What model a condition's numbers were measured on: a Block AttnRes checkpoint as
    trained, or a vanilla Qwen3 checkpoint through the recency wrap (`load_condition`),
    whose function is not the plain model's, with ``recency_bias`` (the study's setting,
    ``None`` in a study without a vanilla condition, read by a vanilla one only)."""
    recipe = get_condition(condition)
    if recipe.kind == "attnres":
        return f"Block AttnRes, {recipe.layout}, as trained"
    if recency_bias is None:
        raise ValueError(
            f"{condition!r} is read through the recency wrap, but the settings record no "
            "recency_bias (None: a study without a vanilla condition)"
        )
    return (
        f"vanilla Qwen3 through the recency wrap ({recipe.num_blocks} blocks, recency bias "
        f"{float(recency_bias):g}), not the plain model"
    )


def _written(threshold: float) -> str:
    """A small threshold as docs/study.md writes it: 1e-6, not 1e-06."""
    return f"{threshold:.0e}".replace("e-0", "e-")


def _criteria(result: StudyResult) -> list[str]:
    """The pre-registered criteria in the words and formulas of docs/study.md, with the
    thresholds the verdicts were decided by (`PREREGISTERED`) and the bands of the
    studied depths."""
    c = PREREGISTERED
    names = dict.fromkeys(result.verdicts.condition)
    depths = sorted({get_condition(name).n_layers for name in names})
    bands = "; ".join(
        f"{n} layers: "
        + ", ".join(f"{b} {layers[0]}-{layers[-1]}" for b, layers in depth_bands(n).items())
        for n in depths
    )
    level = level_text(_setting(result, "confidence"))
    return [
        "Criteria (pre-registered in docs/study.md on 2026-11-28, with its amendments 1-4), "
        f"on {level} percentile-bootstrap intervals over prompts. effect(f, r, g) is the mean "
        "change of the logit difference when family f is masked (mask-and-renormalise) at the "
        "routers of type r in group g (a depth band, thirds of the layers: "
        f"{bands}; or all, every layer); harm = -effect; clean is the mean clean logit "
        "difference; mass(f, r) is the mean routing mass of family f over every router of "
        "type r (band all).",
        "A motif (f, r, band) is present in a seed when all three hold: (1) harmful: "
        "ci_high < 0 for effect(f, r, band) (the interval excludes 0); (2) large: harm >= "
        f"{c.min_effect_fraction:g} * clean (applied only when clean > 0, amendment 1), or the "
        "accuracy effect of the same ablation is at most "
        f"-{c.min_accuracy_drop:g} ({100 * c.min_accuracy_drop:g} points); (3) localised: band "
        "is the band where family f at router type r does the most harm (largest harm of "
        "early, middle, late; a tie counts as localised). M2 must hold at attention routers "
        "and at MLP routers (M2-attn and M2-mlp).",
        "Dissociations (group all). D1, per router type: the top-mass family (largest "
        "mass(f, r)) is not the top-effect family (largest harm), and their effect intervals "
        "are separated (the top-effect family's ci_high is below the top-mass family's "
        "ci_low); every family tied for a top must satisfy this (amendment 4). D2, MLP "
        f"routers: mass(embedding) < {c.d2_mass_ratio:g} * mass(current), and "
        f"harm(embedding) >= {c.d2_effect_ratio:g} * max(harm(current), 0) with the embedding "
        "effect's interval excluding 0 (ci_high < 0). D3, per router type: "
        f"mass(prev_completed) >= {c.d3_min_mass:.2f}, and its effect interval contains 0 or "
        f"|effect(prev_completed)| < {c.d3_max_effect_fraction:.2f} * harm(top-effect "
        "family). The schedule claim holds when the largest |measured - predicted| family "
        f"mass is at most {_written(c.schedule_max_deviation)} (amendment 2).",
    ]


def verdict_sentences(result: StudyResult) -> list[str]:
    """The report's verdicts, one sentence per line, generated from the numbers (first, where
    the intervals had fewer bootstrap resamples than their level needs, a line that says
    so: `_resample_lines`): per claim,
    in the pre-registered words (replicated or majority in h of N Block AttnRes conditions
    with several seeds, minority, the single-seed conditions, the recency-wrapped vanilla
    baselines), then criterion 2 as first written, D1's top families, the robustness check
    (or that it was not run) and the schedule claim. The "Verdicts" list of `study_report`.

    Args:
        result: a `run_study` result.
    """
    require_study_result(result, "verdict_sentences")
    return _resample_lines(result) + _conclusion(result) + _schedule_sentences(result)


def _resample_lines(result: StudyResult) -> list[str]:
    """A first line when the intervals had fewer bootstrap resamples than their level
    needs (`hooked_attnres.analysis.bootstrap.min_resamples`): every verdict that reads an
    interval was then decided by intervals narrower than "95 %" (with 1 resample, a point
    that need not contain the mean), which the console warning alone left unsaid in the
    report. Nothing for a result without ``settings["n_bootstrap"]`` (built by hand). The
    remedy names the argument and the command line's ``--bootstrap`` (the result does not
    record which the study was run from)."""
    n_bootstrap = result.settings.get("n_bootstrap")
    if n_bootstrap is None or result.verdicts.empty:
        return []
    confidence = float(_setting(result, "confidence"))
    if not too_few_resamples(n_bootstrap, confidence):
        return []
    level = level_text(confidence)
    # the result does not record whether it ran from Python or the command line: both named
    need = min_resamples(confidence)
    return [
        f"The intervals were computed from {n_bootstrap} bootstrap resample"
        f"{'s' if n_bootstrap != 1 else ''}, fewer than the {need} that a "
        f"{level} interval needs (one resampled mean per tail it cuts off): they cover "
        f"the mean less often than {level}, so every verdict that reads an interval "
        "(criterion 1 of the motifs, D1, D2, D3) was not decided as docs/study.md "
        f"pre-registers; rerun with n_bootstrap >= {need} (hooked-attnres study --bootstrap "
        f"{need} or more on the command line; the study's default is 1000)."
    ]


def verdict_matrix(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Conditions x claims: ``"k/n verdict"`` per cell (one row per condition, in order).

    Args:
        verdicts: `motif_verdicts` output (columns condition, claim, k, n, verdict); a
            table without them is refused (`require_columns`).
    """
    require_columns(
        verdicts, ("condition", "claim", "k", "n", "verdict"), "verdicts", "motif_verdicts(...)"
    )
    table = {
        c: {r.claim: f"{r.k}/{r.n} {r.verdict}" for r in part.itertuples()}
        for c, part in verdicts.groupby("condition", sort=False)
    }
    frame = pd.DataFrame(table).reindex(list(CLAIMS)).T
    return frame.reset_index(names="condition")


# what the report's tables print where nothing was measured: a cell whose ablation masked no
# router (`ablation_effects`' ``n_masked_routers`` 0; its effect is 0 by construction, not a
# measured 0), or a mass no router of the type reads (``family_read`` False)
NOT_MEASURED = "–"


def _effect_cell(effects: pd.DataFrame, group: str, interval: bool = False) -> str:
    """One effect cell of the report's tables (``effects`` indexed by group): the effect in
    2 decimals (with its interval if ``interval``), or `NOT_MEASURED` where the ablation
    masked no router."""
    if masked_nothing(effects, "the study report's tables").loc[group]:
        return NOT_MEASURED
    row = effects.loc[group]
    text = _fmt(row.effect, 2)
    return f"{text} [{_fmt(row.ci_low, 2)}, {_fmt(row.ci_high, 2)}]" if interval else text


def _skipped_text(effects: pd.DataFrame, n_models: int) -> str:
    """The routers the ablations left alone, read from the effects' ``skipped`` column
    (`hooked_attnres.interventions.Ablation.compile` with ``on_full="skip"`` lists them):
    ``"embedding at attn_res layer 0 (groups early, all; 2 of 2 models)"``, or ``"none"``."""
    cells: dict[tuple[str, str], tuple[dict, set]] = {}
    for row in effects.itertuples():
        if not isinstance(row.skipped, str) or not row.skipped:
            continue  # "" in memory, NaN in a CSV read back
        for site in row.skipped.split(";"):
            groups, models = cells.setdefault((row.family, site), ({}, set()))
            groups[row.group] = None
            models.add((row.condition, row.seed))
    return (
        "; ".join(
            f"{family} at {site} (group{'s' if len(groups) > 1 else ''} {', '.join(groups)}; "
            f"{len(models)} of {n_models} model{'s' if n_models != 1 else ''})"
            for (family, site), (groups, models) in cells.items()
        )
        or "none"
    )


def _tables_text(result: StudyResult) -> list[str]:
    """What the tables hold: the mass, the effects (masked where, left alone where) and
    the legend of `NOT_MEASURED`."""
    effects = result.effects[result.effects.metric == "logit_diff"]
    require_keys(result.accuracy, MODEL_LABELS, "the study result's accuracy table")
    n_models = len(result.accuracy.groupby(["condition", "seed"]))
    return [
        "Mass: mean routing weight of each family at the answer position over every router "
        "of a type. Effects: mean change of the logit difference when the family is masked "
        "(mask-and-renormalise) at every router of a type in the group that reads it, "
        "except a router of which it is every source (masking it there would leave nothing "
        "to renormalise: such a router is left alone and listed in effects.csv's skipped "
        f"column; in this study: {_skipped_text(effects, n_models)}).",
        f"{NOT_MEASURED}: nothing was masked (no router of the type in the group reads the "
        "family, or each that does was left alone); effects.csv holds effect 0 there, by "
        "construction.",
    ]


def _effect_tables(result: StudyResult) -> list[Block]:
    blocks: list[Block] = []
    effects = result.effects[result.effects.metric == "logit_diff"]
    require_masked_column(effects, "the study report's tables")
    require_family_read_column(result.mass_summary, "the study report")
    # a model with a NaN condition or seed matches no row (==): its table would be left out
    for name in ("accuracy", "mass_summary", "effects"):
        require_keys(getattr(result, name), MODEL_LABELS, f"the study result's {name} table")
    # a seed 0 in one table beside '0' in another matches no row (==): every model's table
    # was printed empty, without a word (review 157; `require_same_models` reads such a
    # column as one the tables do not share)
    require_same_kind(
        [
            (f"the study result's {name} table", getattr(result, name))
            for name in ("accuracy", "mass_summary", "effects")
        ],
        MODEL_LABELS,
    )
    bands = [g for g in ("early", "middle", "late") if g in set(effects.group)]
    # one table per model of the accuracy, of its mass and effects: a model one of them
    # lacks was printed as an empty table (or without its rows)
    what = "the study report's tables"
    require_same_models((("accuracy", result.accuracy), ("effects", effects)), what)
    # the mass over every layer, printed beside the effects of group "all": of the same
    # models and layers
    every = every_layer_mass(result.mass_summary, effects, what)
    # the level of the study's intervals (it was the fixed text "95% CI")
    interval = f"{level_text(_setting(result, 'confidence'))} CI"
    for (condition, seed), _ in result.accuracy.groupby(["condition", "seed"], sort=False):
        mass = every[(every.condition == condition) & (every.seed == seed)]
        eff = effects[(effects.condition == condition) & (effects.seed == seed)]
        rows = []
        for router in ("attn_res", "mlp_res"):
            for family in FAMILIES:
                m = mass[(mass.router == router) & (mass.family == family)]
                e = eff[(eff.router == router) & (eff.family == family)].set_index("group")
                if m.empty or e.empty:
                    continue
                m = m.iloc[0]
                read = m.family_read  # True / False (checked above)
                row = {
                    "router": router,
                    "family": family,
                    f"mass [{interval}]": (
                        f"{_fmt(m.mass)} [{_fmt(m.ci_low)}, {_fmt(m.ci_high)}]"
                        if read
                        else NOT_MEASURED
                    ),
                    f"effect, all layers [{interval}]": _effect_cell(e, "all", interval=True),
                }
                row.update({f"effect, {b}": _effect_cell(e, b) for b in bands})
                rows.append(row)
        blocks += [("h3", f"{condition}, seed {seed}"), ("table", pd.DataFrame(rows))]
    return blocks


def accuracy_table(result: StudyResult) -> pd.DataFrame:
    """``result.accuracy`` with each row saying which model it scored on which prompts:
    columns condition, seed, model (`model_text`: a vanilla condition's rows score its
    checkpoint through the recency wrap, not the plain Qwen3), prompts, n_prompts, accuracy,
    logit_diff (unrounded; the report prints them in its digits). A condition or seed
    column with a NaN label or mixing text and numbers is refused, as by the report
    (`require_keys`)."""
    require_study_result(result, "accuracy_table")
    require_keys(result.accuracy, MODEL_LABELS, "the study result's accuracy table")
    bias = _setting(result, "recency_bias")
    prompts = f"test split, data seed {_setting(result, 'probe_seed')}"
    table = result.accuracy[["condition", "seed", "n_prompts", "accuracy", "logit_diff"]].copy()
    table.insert(2, "model", [model_text(c, bias) for c in table.condition])
    table.insert(3, "prompts", prompts)
    return table


def _accuracy_blocks(result: StudyResult) -> list[Block]:
    """The accuracy table, each row saying which model it scored on which prompts."""
    prompts = f"test split, data seed {_setting(result, 'probe_seed')}"
    table = accuracy_table(result)
    text = (
        "Each row scores the model named in its model column, the one every mass and ablation "
        "of this report was measured on, on n_prompts held-out probe prompts of its "
        f"condition's task ({prompts}; not the prompts the trainer evaluated on, data seed 0): "
        "accuracy is the fraction of those prompts whose largest logit at the answer position "
        "is the answer (an answer tied with k - 1 other tokens for the largest scores 1/k); "
        "logit_diff is the mean logit difference there, answer minus contrast "
        "(the clean logit difference every effect is compared with)."
    )
    if any(get_condition(c).kind == "vanilla" for c in dict.fromkeys(table.condition)):
        text += (
            " A vanilla condition's rows are not the trained Qwen3's own accuracy: its "
            "checkpoint is loaded through the recency wrap, which computes another function "
            "(docs/loading.md); the accuracies in each checkpoint's metrics.json are the plain "
            "model's on the trainer's held-out prompts."
        )
    return [
        ("h2", "Accuracy on the held-out probe prompts"),
        ("p", text),
        # as text, so that report.md and report.html print the same digits (pandas' HTML
        # pads a float column to common digits: 0.18 read "0.180" there)
        (
            "table",
            table.assign(
                accuracy=[_fmt(v) for v in table.accuracy],
                logit_diff=[_fmt(v, 2) for v in table.logit_diff],
            ),
        ),
    ]


def document(result: StudyResult) -> list[Block]:
    """The report's content, top to bottom: the question, the verdicts, accuracy, the
    figures, the tables, the settings."""
    blocks: list[Block] = [
        ("h1", "Does routing mass tell which depth sources matter?"),
        ("p", QUESTION),
        ("h2", "Verdicts"),
    ]
    blocks += [("li", line) for line in verdict_sentences(result)]
    if not result.verdicts.empty:
        blocks += [
            (
                "p",
                "Per condition and claim, the seeds in which the claim holds, k of n, in the "
                "pre-registered words: replicated (k = n), majority (n/2 < k < n), minority "
                "(0 < k <= n/2), absent (k = 0); single seed (k = n = 1, amendment 3: one seed "
                "replicates nothing). The claims:",
            ),
            ("table", _claim_legend()),
            *[("p", text) for text in _criteria(result)],
            ("table", verdict_matrix(result.verdicts)),
        ]
        for condition in dict.fromkeys(result.verdicts.condition):
            recipe = get_condition(condition)
            kind = model_text(condition, _setting(result, "recency_bias"))
            blocks.append(
                ("h3", f"{condition} ({kind}, {recipe.n_layers} layers, task {recipe.task})")
            )
            rows = result.verdicts[result.verdicts.condition == condition]
            blocks += [("li", sentence) for sentence in rows.sentence]
    blocks += _accuracy_blocks(result)
    if result.figures:
        blocks += [
            ("h2", "Figures"),
            (
                "p",
                "Effects are in percent of each model's clean logit difference "
                "(answer minus contrast), or in logits for a task where some model's clean "
                "difference is under 1 logit (its titles say which); whiskers are "
                f"{level_text(_setting(result, 'confidence'))} bootstrap intervals over prompts "
                "(each figure says so under its title); panels that are compared share their "
                "y-axis.",
            ),
        ]
        blocks += [("figure", name) for name in result.figures]
    blocks += [
        ("h2", "Tables"),
    ]
    blocks += [("p", text) for text in _tables_text(result)]
    blocks += _effect_tables(result)
    blocks += [
        ("h2", "Settings and versions"),
        ("pre", json.dumps(result.settings, indent=2, default=str)),
    ]
    return blocks


def _md_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = [
        "| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def study_report(result: StudyResult) -> str:
    """The report as Markdown (the same content as ``report.html``; figures are named)."""
    require_study_result(result, "study_report")
    out: list[str] = []
    for kind, payload in document(result):
        if out and out[-1].startswith("* ") and kind != "li":
            out.append("")
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + str(payload), ""]
        elif kind == "p":
            out += [str(payload), ""]
        elif kind == "li":
            out.append(f"* {payload}")
        elif kind == "table":
            out += ["", _md_table(payload), ""]  # type: ignore[arg-type]
        elif kind == "figure":
            out.append(f"* figure `{payload}` (in report.html)")
        elif kind == "pre":
            out += ["```json", str(payload), "```", ""]
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
li { margin: 0.3em 0; }
.figure { margin: 1em 0 2em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def study_report_html(result: StudyResult) -> str:
    """The report as one self-contained HTML page (plotly.js inlined once, so it opens
    offline); every figure is interactive and sizes to the page."""
    require_study_result(result, "study_report_html")
    from hooked_attnres import plotting

    parts: list[str] = []
    in_list = False
    for kind, payload in document(result):
        if kind == "li" and not in_list:
            parts.append("<ul>")
            in_list = True
        elif kind != "li" and in_list:
            parts.append("</ul>")
            in_list = False
        text = html.escape(str(payload))
        if kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{kind}>{text}</{kind}>")
        elif kind == "li":
            parts.append(f'<li class="verdict">{text}</li>')
        elif kind == "table":
            frame: Union[pd.DataFrame, object] = payload
            assert isinstance(frame, pd.DataFrame)
            parts.append(frame.to_html(index=False, border=0, na_rep="", escape=True))
        elif kind == "figure":
            figure = plotting.figure_div(result.figures[str(payload)])
            parts.append(f'<div class="figure">{figure}</div>')
        elif kind == "pre":
            parts.append(f"<pre>{text}</pre>")
    if in_list:
        parts.append("</ul>")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        "<title>Routing mass versus causal effect</title>"
        f'<style>{STYLE}</style><script type="text/javascript">{plotting.plotly_js()}</script>'
        "</head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
