"""The seed paper's study in one call: routing mass versus causal effect, two conditions.

Conditions (``../shared/design/paper.md``):

* ``attnres``: a cumulative-layout Block AttnRes Qwen3 trained from scratch;
* ``vanilla``: a vanilla Qwen3 of the same shape, trained on the same task, loaded
  through the recency wrap (zero pseudo-queries, bias 3) -- routing that is
  content-independent and equals `recency_schedule`.

For each condition and seed, on the same held-out probe prompts: answer accuracy; routing
mass per family, router type, layer and depth band at the answer position (bootstrap
intervals over prompts); the effect of mask-and-renormalise ablation of each family per
router type and depth band (and over all layers) on logit difference, log-probability and
accuracy (bootstrap intervals); the dissociation report; and for the wrapped model the
measured routing next to the analytic schedule.

    from hooked_attnres.study import run_study
    result = run_study("study_out")          # the shipped seed-0 checkpoints, ~1 minute
    result.dissociation                       # one row per condition, seed and router type

Everything is written to ``out_dir`` atomically (CSV, JSON, ``report.md``, HTML plots).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pandas as pd
import torch

from hooked_attnres._atomic import atomic_directory
from hooked_attnres.analysis import (
    ablation_effects,
    dissociation_report,
    recency_schedule,
    routing_mass,
    schedule_comparison,
    summarize_mass,
)
from hooked_attnres.interventions.selection import depth_bands
from hooked_attnres.model.hooked_attnres import HookedAttnRes
from hooked_attnres.plotting import save_html
from hooked_attnres.study.checkpoints import checkpoint_dir, seeds_found
from hooked_attnres.study.conditions import STUDY_BLOCKS, check_conditions, study_task
from hooked_attnres.study.figures import study_figures
from hooked_attnres.study.report import study_report
from hooked_attnres.tasks.base import TaskBatch

RECENCY_BIAS = 3.0
PROBE_SEED = 1  # the probe prompts: test split, data seed 1 (training evaluated on seed 0)


def load_condition(
    condition: str,
    seed: int = 0,
    checkpoints: Union[str, Path, None] = None,
    num_blocks: int = STUDY_BLOCKS,
    recency_bias: float = RECENCY_BIAS,
) -> HookedAttnRes:
    """The model of one condition, in eval mode: ``attnres`` as trained, ``vanilla``
    wrapped with ``wrap="recency"`` (``num_blocks`` blocks, bias ``recency_bias``)."""
    check_conditions([condition])
    path = checkpoint_dir(condition, seed, checkpoints)
    if condition == "attnres":
        model = HookedAttnRes.from_pretrained(path)
    else:
        model = HookedAttnRes.from_hf_qwen3(
            path, wrap="recency", num_blocks=num_blocks, recency_bias=recency_bias
        )
    return model.eval()


def probe_prompts(model: HookedAttnRes, n_prompts: int = 256, seed: int = PROBE_SEED) -> TaskBatch:
    """``n_prompts`` held-out (test split) prompts of the study task in the model's vocabulary."""
    if model.tokenizer is None:
        raise ValueError("the study needs a model with its tokenizer attached")
    return study_task().sample(n_prompts, seed, "test", model.tokenizer.get_vocab())


@dataclass
class StudyResult:
    """Tables of a study run (also written to ``out_dir`` as CSV).

    Attributes:
        accuracy: ``condition, seed, accuracy, logit_diff, n_prompts``.
        mass: per-prompt routing mass (`routing_mass` columns + ``condition, seed``).
        mass_summary: mean mass per ``condition, seed, router, band, family`` (band
            ``"all"`` = every layer) with bootstrap intervals.
        effects: `ablation_effects` rows + ``condition, seed`` (groups: bands and ``"all"``).
        dissociation: `dissociation_report` rows + ``condition, seed``.
        schedule: for the wrapped condition, `schedule_comparison` + ``seed``.
        seeds_summary: per ``condition, router, family``: mean over seeds of mass and
            logit-difference effect (group ``"all"``), their spread over seeds, and how many
            seeds' effect intervals exclude zero.
    """

    out_dir: Path
    accuracy: pd.DataFrame
    mass: pd.DataFrame
    mass_summary: pd.DataFrame
    effects: pd.DataFrame
    dissociation: pd.DataFrame
    schedule: pd.DataFrame
    seeds_summary: pd.DataFrame
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


def study_condition(
    model: HookedAttnRes,
    batch: TaskBatch,
    n_bootstrap: int = 1000,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Every table of the study for one model on one batch of probe prompts."""
    with torch.no_grad():
        logits = model(batch.tokens)
    accuracy = pd.DataFrame(
        [
            {
                "accuracy": batch.accuracy(logits),
                "logit_diff": batch.logit_diff(logits).mean().item(),
                "n_prompts": len(batch),
            }
        ]
    )
    mass = routing_mass(model, batch, positions="answer")
    everywhere = mass.assign(band="all")
    summary = summarize_mass(
        pd.concat([mass, everywhere]),
        by=("router", "band", "family"),
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    groups = {**depth_bands(model.cfg.n_layers), "all": list(range(model.cfg.n_layers))}
    effects = ablation_effects(
        model, batch, groups=groups, n_bootstrap=n_bootstrap, seed=seed, progress=progress
    )
    overall = summary[summary.band == "all"].drop(columns="band")
    dissociation = dissociation_report(overall, effects, metric="logit_diff", group="all")
    tables = {
        "accuracy": accuracy,
        "mass": mass,
        "mass_summary": summary,
        "effects": effects,
        "dissociation": dissociation,
    }
    cfg = model.cfg
    if (
        cfg.attnres_layout == "cumulative"
        and cfg.attnres_recency_bias is not None
        and model_is_zero_query(model)
    ):
        schedule = recency_schedule(
            cfg.n_layers, cfg.attnres_num_blocks, cfg.attnres_recency_bias, cfg.attnres_mode
        )
        tables["schedule"] = schedule_comparison(mass, schedule)
    return tables


def model_is_zero_query(model: HookedAttnRes) -> bool:
    """True when every pseudo-query is zero (a recency-wrapped model)."""
    queries = [p for name, p in model.named_parameters() if name.endswith("query")]
    return bool(queries) and all(bool((q == 0).all()) for q in queries)


def _seeds_summary(mass_summary: pd.DataFrame, effects: pd.DataFrame) -> pd.DataFrame:
    mass = mass_summary[mass_summary.band == "all"]
    effect = effects[(effects.group == "all") & (effects.metric == "logit_diff")].copy()
    effect["excludes_zero"] = (effect.ci_low > 0) | (effect.ci_high < 0)
    merged = mass.merge(
        effect, on=["condition", "seed", "router", "family"], suffixes=("_mass", "")
    )
    return (
        merged.groupby(["condition", "router", "family"], sort=False)
        .agg(
            n_seeds=("seed", "nunique"),
            mass=("mass", "mean"),
            mass_sd=("mass", "std"),
            effect=("effect", "mean"),
            effect_sd=("effect", "std"),
            effect_min=("effect", "min"),
            effect_max=("effect", "max"),
            seeds_excluding_zero=("excludes_zero", "sum"),
        )
        .reset_index()
    )


def run_study(
    out_dir: Union[str, Path] = "study_out",
    checkpoints: Union[str, Path, None] = None,
    seeds: Optional[Sequence[int]] = None,
    conditions: Sequence[str] = ("attnres", "vanilla"),
    n_prompts: int = 256,
    n_bootstrap: int = 1000,
    progress: bool = True,
    plots: bool = True,
) -> StudyResult:
    """Run the study on trained checkpoints and write every table, plot and a report.

    Args:
        out_dir: where results go (replaced atomically: a failed run leaves the previous
            results in place).
        checkpoints: a directory with ``{condition}_seed{seed}/model`` (what
            ``hooked-attnres train --out DIR`` writes); default: the shipped checkpoints.
        seeds: model seeds (default: ``[0]``, the shipped ones; with ``checkpoints``,
            every seed found for all conditions).
        conditions: subset of ``("attnres", "vanilla")``.
        n_prompts: held-out probe prompts (the same prompts for every model).
        n_bootstrap: bootstrap resamples for every interval.
        progress, plots: tqdm bars; HTML figures.

    Returns:
        A `StudyResult`.
    """
    started = time.perf_counter()
    check_conditions(conditions)
    if seeds is None:
        seeds = [0] if checkpoints is None else seeds_found(checkpoints, conditions)
    tables: dict[str, list[pd.DataFrame]] = {}
    for seed in seeds:
        for condition in conditions:
            model = load_condition(condition, seed, checkpoints)
            batch = probe_prompts(model, n_prompts)
            if progress:
                print(f"[study] {condition} seed {seed}: {len(batch)} probe prompts", flush=True)
            for name, table in study_condition(model, batch, n_bootstrap, progress, seed=0).items():
                tables.setdefault(name, []).append(table.assign(condition=condition, seed=seed))
    joined = {name: _front(pd.concat(parts, ignore_index=True)) for name, parts in tables.items()}
    result = StudyResult(
        out_dir=Path(out_dir),
        accuracy=joined["accuracy"],
        mass=joined["mass"],
        mass_summary=joined["mass_summary"],
        effects=joined["effects"],
        dissociation=joined["dissociation"],
        schedule=joined.get("schedule", pd.DataFrame()),
        seeds_summary=_seeds_summary(joined["mass_summary"], joined["effects"]),
    )
    if plots:
        result.figures = study_figures(result)
    result.seconds = time.perf_counter() - started
    write_study(result)
    if progress:
        print(f"[study] wrote {result.out_dir} in {result.seconds:.0f} s", flush=True)
    return result


def _front(table: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in ("condition", "seed") if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def write_study(result: StudyResult) -> Path:
    """Write the tables (CSV), the dissociation (JSON), figures (HTML) and ``report.md``."""
    with atomic_directory(result.out_dir) as tmp:
        for name in ("accuracy", "mass", "mass_summary", "effects", "schedule", "seeds_summary"):
            table = getattr(result, name)
            if not table.empty:
                table.to_csv(tmp / f"{name}.csv", index=False)
        result.dissociation.to_json(tmp / "dissociation.json", orient="records", indent=2)
        for name, fig in result.figures.items():
            save_html(fig, tmp / "plots" / f"{name}.html")
        (tmp / "report.md").write_text(study_report(result))
        (tmp / "run.json").write_text(
            json.dumps({"seconds": round(result.seconds, 1)}, indent=2) + "\n"
        )
    return result.out_dir
