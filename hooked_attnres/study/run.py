"""The seed paper's study in one call: routing mass versus causal effect, on every condition.

For each condition (`hooked_attnres.study.conditions`) and model seed, on held-out probe
prompts of the condition's task: answer accuracy; routing mass per family, router type,
layer and depth band at the answer position (bootstrap intervals over prompts); the effect
of mask-and-renormalise ablation of each family per router type and depth band (and over
all layers) on logit difference, log-probability and accuracy (bootstrap intervals); the
pre-registered motif and dissociation verdicts (`hooked_attnres.analysis.motif_report`),
recomputed on a second, disjoint set of prompts; and for a recency-wrapped model the
measured routing next to the analytic schedule.

    from hooked_attnres.study import run_study
    result = run_study("study_out")          # every shipped condition and seed
    result.verdicts                           # "present in k of n seeds", per claim

Everything is written to ``out_dir`` atomically: ``report.html`` (one self-contained
page), ``report.md`` (the same in text), CSV tables.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import pickle
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from hooked_attnres._atomic import (
    LOCK_FILE,
    PARTIAL_INFIX,
    RUN_LOCK,
    SIBLING_ID,
    CheckpointConflictError,
    atomic_directory,
    check_outside_package,
    check_replaceable,
    exclusive_job,
    other_save,
    reading,
    write_bytes_atomic,
)
from hooked_attnres._environment import numerics_environment
from hooked_attnres._study_limits import (
    MAX_BOOTSTRAP,
    MAX_PROBE_PROMPTS,
    MAX_SEED,
    WHY_MAX_BOOTSTRAP,
    WHY_MAX_PROBE_PROMPTS,
    WHY_MAX_SEED,
)
from hooked_attnres._validation import (
    first_non_finite,
    is_integer,
    require_bool,
    require_finite_number,
    require_integer,
    require_selection,
    some_names,
)
from hooked_attnres.analysis import (
    METRICS,
    ablation_effects,
    dissociation_report,
    metric_values,
    motif_report,
    motif_verdicts,
    recency_schedule,
    routing_mass,
    schedule_comparison,
    summarize_mass,
    verdict_changes,
)
from hooked_attnres.analysis.bootstrap import check_bootstrap
from hooked_attnres.analysis.mass import every_layer_mass
from hooked_attnres.interventions.selection import depth_bands
from hooked_attnres.loading.io import verify_saved_files
from hooked_attnres.model.hooked_attnres import HookedAttnRes
from hooked_attnres.study.checkpoints import (
    SEED_DIGITS,
    available,
    checkpoint_dir,
    finish_command,
    metrics_path,
    run_dir,
    train_command,
    unfinished_runs,
    verify_shipped,
)
from hooked_attnres.study.conditions import CONDITIONS, TASKS, Condition, get_condition, make_task
from hooked_attnres.study.figures import study_figures
from hooked_attnres.study.report import study_report, study_report_html
from hooked_attnres.tasks.base import Task, TaskBatch, require_task_batch
from hooked_attnres.training.trainer import checkpoint_run_differs, read_run_metrics

RECENCY_BIAS = 3.0
PROBE_SEED = 1  # the probe prompts: test split, data seed 1 (training evaluated on seed 0)
FRESH_PROBE_SEED = 2  # a second, disjoint draw for the robustness of the verdicts
# why the study needs two prompts or more (`run_study`'s n_prompts, `study_condition`'s batch)
_WHY_TWO_PROMPTS = "the verdicts need bootstrap intervals over prompts, and one prompt has none"


def load_condition(
    condition: str,
    seed: int = 0,
    checkpoints: Union[str, Path, None] = None,
    num_blocks: Optional[int] = None,
    recency_bias: Optional[float] = None,
) -> HookedAttnRes:
    """The model of one condition and seed, in eval mode: a Block AttnRes condition as
    trained; a vanilla one through ``wrap="recency"`` (``num_blocks`` blocks, default the
    condition's ``n_layers // 2``; bias ``recency_bias``, default `RECENCY_BIAS`), the seed
    paper's baseline.

    Args:
        checkpoints: a directory of ``{condition}_seed{seed}/model`` runs (what
            ``hooked-attnres train --out DIR`` writes); default: the shipped checkpoints.
        num_blocks, recency_bias: of the recency wrap, so for a vanilla condition only (a
            Block AttnRes condition's blocks and routing are trained: refused there).

    Raises:
        ValueError: a ``num_blocks`` that is no integer >= 1, a ``recency_bias`` that is
            no finite number, or either for a Block AttnRes condition, before the
            checkpoint is looked for.
    """
    recipe = get_condition(condition)
    num_blocks = require_integer("num_blocks", num_blocks, 1, optional=True)
    recency_bias = require_finite_number("recency_bias", recency_bias, optional=True)
    if recipe.kind == "attnres" and (num_blocks is not None or recency_bias is not None):
        given = "num_blocks" if num_blocks is not None else "recency_bias"
        raise ValueError(
            f"{given} applies to the recency wrap of a vanilla condition; {condition!r} is a "
            "trained Block AttnRes model (its blocks and routing are its own): leave "
            f"{given} out, or load {recipe.baseline!r}"
        )
    path = checkpoint_dir(condition, seed, checkpoints)
    _check_trained_task(recipe, seed, checkpoints)
    with reading(path):  # checked and loaded under one read lock (the loaders' take it again)
        # the shipped checkpoints: their SHA256SUMS, with the remedy to reinstall; a run
        # of one's own: its marker (or a digest manifest listing it, e.g. in a copy of the
        # shipped tree), with the study's remedy (verify=False is no argument of the study's)
        if not verify_shipped(path):
            verify_saved_files(
                path,
                remedy="restore it from a backup, or train the run again with the settings "
                "it was trained with (on the command line: "
                f"{train_command([condition], [seed], path.parent.parent, ['--no-resume'])})",
            )
        if recipe.kind == "attnres":
            model = HookedAttnRes.from_pretrained(path, verify=False)
        else:
            blocks = recipe.num_blocks if num_blocks is None else num_blocks
            bias = RECENCY_BIAS if recency_bias is None else recency_bias
            model = HookedAttnRes.from_hf_qwen3(
                path, wrap="recency", num_blocks=blocks, recency_bias=bias, verify=False
            )
    setattr(model, _CONDITION_ATTRIBUTE, condition)  # kept by deepcopy, read by probe_prompts
    setattr(model, _SEED_ATTRIBUTE, seed)  # its refusals name the model (`_model_name`)
    return model.eval()


# the condition `load_condition` loaded a model for (so `probe_prompts` knows its task)
_CONDITION_ATTRIBUTE = "_study_condition"
_SEED_ATTRIBUTE = "_study_seed"  # and the model seed


def _model_name(model: HookedAttnRes) -> str:
    """The model in a refusal: ``"the model of condition 'x' seed s"`` for a model
    `load_condition` loaded, else ``"the model"``."""
    condition = getattr(model, _CONDITION_ATTRIBUTE, None)
    if condition is None:
        return "the model"
    return f"the model of condition {condition!r} seed {getattr(model, _SEED_ATTRIBUTE, '?')}"


def require_finite_clean(
    model: HookedAttnRes, batch: TaskBatch, logits: Float[Tensor, "batch pos d_vocab"]
) -> None:
    """Refuse clean ``logits`` ``[batch, pos, d_vocab]`` (of ``batch.tokens``) that leave a
    prompt's metric not finite: a NaN or infinite logit at its answer position makes every
    metric the study reads (`METRICS`: logit difference, log-probability, accuracy) NaN
    there, so each effect of the sweep and each interval is NaN, and `dissociation_report`
    and `motif_report` refused only after the mass tables and the whole ablation sweep.

    Raises:
        ValueError: naming the model (`_model_name`), how many of the prompts are not
            finite, and the first one.
    """
    with torch.no_grad():
        values = torch.stack([metric_values(batch, logits, m) for m in METRICS])
    found = first_non_finite(values.T.cpu().numpy())  # [batch, metrics]: the first prompt
    if found is None:
        return
    count = int((~values.isfinite().all(0)).sum())
    prompt, metric = found
    raise ValueError(
        f"the clean logits of {_model_name(model)} are not finite at the answer position of "
        f"{count} of {len(batch)} probe prompts (first: prompt {prompt}, whose "
        f"{METRICS[metric]} is {float(values[metric, prompt])}), so their metrics and every "
        "effect and interval would be NaN and no verdict could be decided (refused before "
        "the mass tables and the ablation sweep): find what overflowed (a float16 model: "
        "run it in float32, model.to(torch.float32)) or what made the weights produce it"
    )


def _check_trained_task(recipe: Condition, seed: int, checkpoints) -> None:
    """Refuse a run whose ``metrics.json`` records another evaluation task than the
    condition's recipe (e.g. trained with ``--task-arg``): probing it with the recipe's
    prompts would measure the wrong task."""
    path = metrics_path(recipe.name, seed, checkpoints)
    if not path.exists():
        state = path.parent / "checkpoint" / "trainer_state.json"
        if state.is_file():  # a training run's folder: its last two writes never both ended
            raise ValueError(
                f"{path.parent} has a training checkpoint but no metrics.json: the run was "
                "stopped in its final writes (the model and metrics.json; a run started "
                "over removes the earlier metrics.json first), so its model/ may be an "
                "earlier run's, and which task it was trained on cannot be checked; finish "
                f"the run ({finish_command(recipe.name, seed, path.parent.parent)}) and "
                "study it then"
            )
        return
    resume = finish_command(recipe.name, seed, path.parent.parent)
    other = checkpoint_run_differs(path.parent, resume=resume)
    if other is not None:  # its model/ may be an earlier run's, read as this run's
        raise ValueError(f"{path.parent} is not studied as it is: {other}; then study it")
    metrics = read_run_metrics(path.parent, resume=resume)
    recorded = metrics.get("eval_tasks")
    expected = [repr(recipe.make_task())]
    if recorded is not None and recorded != expected:
        raise ValueError(
            f"{path.parent} was trained and evaluated on {recorded}, not on the task of "
            f"condition {recipe.name!r} ({expected}); load it with HookedAttnRes.from_pretrained "
            "(or from_hf_qwen3) and pass its task to probe_prompts(model, task=...)"
        )
    # a run folder copied or renamed to another seed's or condition's name (audit 150: seed
    # 0's copied to ``_seed1`` was studied as a second seed, "replicated in 2 of 2 seeds")
    recorded, expected_run = metrics.get("description"), recipe.description(seed)
    # the original two conditions also train with other shapes and blocks (`train_condition`)
    compared = ("condition", "model_seed") if recipe.legacy else tuple(expected_run)
    if isinstance(recorded, dict):
        differ = [k for k in compared if k in recorded and recorded[k] != expected_run[k]]
        if differ:
            shown = ", ".join(f"{k}={recorded[k]!r}" for k in differ)
            wanted = ", ".join(f"{k}={expected_run[k]!r}" for k in differ)
            raise ValueError(
                f"{path.parent} holds another run than its name says: its metrics.json records "
                f"{shown}, but condition {recipe.name!r} seed {seed} is {wanted} (a run folder "
                "copied or renamed?); studied under this name it would be counted as another "
                "model: put it under its own {condition}_seed{n} name, or train this one"
            )
    # `paperlike` reads the `saturated` prompts: what tells them apart is the stopping rule
    stop = metrics.get("train_config", {}).get("stop_accuracy")
    if "train_config" in metrics and stop != recipe.stop_accuracy:
        raise ValueError(
            f"{path.parent} was trained with stop_accuracy={stop}, but condition "
            f"{recipe.name!r} stops at {recipe.stop_accuracy}; it is another condition's run "
            "(e.g. saturated vs paperlike): put it under that condition's name"
        )


def probe_prompts(
    model: HookedAttnRes,
    n_prompts: int = 256,
    seed: int = PROBE_SEED,
    task: Union[str, Task, None] = None,
    exclude: Optional[TaskBatch] = None,
) -> TaskBatch:
    """``n_prompts`` held-out (test split) prompts in the model's vocabulary.

    Args:
        n_prompts: an integer from 1 to `MAX_PROBE_PROMPTS` (16384).
        seed: the prompt seed (the study uses `PROBE_SEED`, and `FRESH_PROBE_SEED` for the
            robustness check; training evaluated on seed 0).
        task: a task or a study task name (``"hard"``, ``"saturated"``, ``"induction"``,
            ``"paperlike"``);
            default: the task of the condition `load_condition` loaded ``model`` for. Other
            models must name it (a wrong task would give numbers about the wrong prompts).
        exclude: prompts none of which may be drawn again (the robustness check's second
            set is disjoint from the first): a `TaskBatch`, or ``None``.

    Raises:
        TypeError: an ``exclude`` that is neither a `TaskBatch` nor ``None``, a ``task``
            that is neither a `Task`, a name nor ``None``.
    """
    if exclude is not None and not isinstance(exclude, TaskBatch):  # it read exclude.tokens
        raise TypeError(
            "exclude must be a TaskBatch (prompts drawn before, e.g. probe_prompts(model, "
            f"...)) or None, got {type(exclude).__name__} {exclude!r}"
        )
    if task is not None and not isinstance(task, (str, Task)):  # it read task.sample
        raise TypeError(
            f"task must be a Task, a study task name ({', '.join(TASKS)}) or None, got "
            f"{type(task).__name__} {task!r}"
        )
    # not the sampler's "n"; at most MAX_PROBE_PROMPTS, before any is drawn
    n_prompts = require_integer(
        "n_prompts", n_prompts, 1, maximum=MAX_PROBE_PROMPTS, why_maximum=WHY_MAX_PROBE_PROMPTS
    )
    if model.tokenizer is None:
        raise ValueError("the study needs a model with its tokenizer attached")
    if task is None:
        condition = getattr(model, _CONDITION_ATTRIBUTE, None)
        if condition is None:
            raise ValueError(
                "probe_prompts cannot tell which task this model was trained on (it was not "
                "loaded by load_condition, nor copied from such a model): pass task= (a "
                f"study task name: {', '.join(TASKS)}, or a Task)"
            )
        task = get_condition(condition).task
    if isinstance(task, str):
        task = make_task(task)
    vocab = model.tokenizer.get_vocab()
    if exclude is None:
        return task.sample(n_prompts, seed, "test", vocab)
    seen = {tuple(row) for row in exclude.tokens.tolist()}
    drawn = task.sample(2 * n_prompts + len(seen), seed, "test", vocab)
    keep = [i for i, row in enumerate(drawn.tokens.tolist()) if tuple(row) not in seen]
    if len(keep) < n_prompts:
        raise ValueError(
            f"the task's test split has too few prompts outside the {len(seen)} "
            f"excluded ones for {n_prompts} more; ask for fewer prompts"
        )
    return drawn[torch.tensor(keep[:n_prompts])]


@dataclass
class StudyResult:
    """Tables of a study run (also written to ``out_dir`` as CSV; columns in
    ``docs/analysis.md``).

    Attributes:
        accuracy: ``condition, seed, accuracy, logit_diff, n_prompts``.
        mass: per-prompt routing mass (`routing_mass` columns + ``condition, seed``).
        mass_summary: mean mass per ``condition, seed, router, band, family`` (band
            ``"all"`` = every layer) with bootstrap intervals, ``family_read`` and each
            band's ``layers``.
        effects: `ablation_effects` rows + ``condition, seed`` (groups: bands and ``"all"``).
        dissociation: `dissociation_report` rows + ``condition, seed``.
        schedule: for recency-wrapped conditions, `schedule_comparison` + ``condition, seed``.
        seeds_summary: per ``condition, router, family``: mean over seeds of mass and
            logit-difference effect (group ``"all"``), their spread over seeds, and how many
            seeds' effect intervals exclude zero.
        motifs: `motif_report` per ``condition, seed`` (every pre-registered claim).
        verdicts: `motif_verdicts` per condition: ``claim, k, n, verdict, sentence``.
        fresh_motifs: `motif_report` on the second prompt set (`FRESH_PROBE_SEED`).
        robustness: `verdict_changes` between the two prompt sets (empty: no verdict changed).
        settings: what was run (conditions, seeds, prompts, versions).
    """

    out_dir: Path
    accuracy: pd.DataFrame
    mass: pd.DataFrame
    mass_summary: pd.DataFrame
    effects: pd.DataFrame
    dissociation: pd.DataFrame
    schedule: pd.DataFrame
    seeds_summary: pd.DataFrame
    motifs: pd.DataFrame = field(default_factory=pd.DataFrame)
    verdicts: pd.DataFrame = field(default_factory=pd.DataFrame)
    fresh_motifs: pd.DataFrame = field(default_factory=pd.DataFrame)
    robustness: pd.DataFrame = field(default_factory=pd.DataFrame)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


def study_condition(
    model: HookedAttnRes,
    batch: TaskBatch,
    n_bootstrap: int = 1000,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Every table of the study for one model on one batch of probe prompts.

    Raises:
        ValueError: before any work, a ``batch`` of fewer than 2 prompts (one prompt has no
            bootstrap interval: it failed after the whole sweep) or more than
            `MAX_PROBE_PROMPTS`, and an ``n_bootstrap`` or ``seed`` the bootstrap refuses;
            after the clean forward pass, before the mass tables and the ablation sweep,
            clean logits that are not finite at some prompt (`require_finite_clean`).
        TypeError: before any work, a ``batch`` that is no `TaskBatch` (its tokens alone
            failed with "'Tensor' object has no attribute 'tokens'", ``[batch]`` was "1
            prompt") and ``progress`` that is not True or False.
    """
    require_task_batch(batch, "study_condition", "probe prompts, e.g. probe_prompts(model, 256)")
    if len(batch) < 2:
        raise ValueError(
            f"batch holds {len(batch)} prompt; study_condition needs at least 2 "
            f"({_WHY_TWO_PROMPTS})"
        )
    if len(batch) > MAX_PROBE_PROMPTS:
        raise ValueError(
            f"batch holds {len(batch)} prompts; study_condition takes at most "
            f"{MAX_PROBE_PROMPTS} ({WHY_MAX_PROBE_PROMPTS})"
        )
    check_bootstrap(n_bootstrap, 0.95, seed, "n_bootstrap")  # not after the forward pass
    progress = require_bool("progress", progress)  # was checked after the mass tables
    with torch.no_grad():
        logits = model(batch.tokens)
    require_finite_clean(model, batch, logits)  # not after the whole sweep
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
    """True when every pseudo-query is zero (a recency-wrapped model). ``TypeError`` for
    what is no `HookedAttnRes`."""
    if not isinstance(model, HookedAttnRes):
        raise TypeError(
            f"model_is_zero_query takes a HookedAttnRes, got {type(model).__name__}; load a "
            "path first (HookedAttnRes.from_pretrained(path))"
        )
    queries = [p for name, p in model.named_parameters() if name.endswith("query")]
    return bool(queries) and all(bool((q == 0).all()) for q in queries)


def _seeds_summary(mass_summary: pd.DataFrame, effects: pd.DataFrame) -> pd.DataFrame:
    """`StudyResult.seeds_summary`: the mass over every layer (band ``"all"``) beside the
    logit-difference effects of group ``"all"``, of the same layers (`every_layer_mass`)."""
    mass = every_layer_mass(mass_summary, effects, "the seeds summary")
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


def check_study_arguments(
    out_dir: Union[str, Path],
    checkpoints: Union[str, Path, None],
    seeds: Optional[Sequence[int]],
    conditions: Optional[Sequence[str]],
    n_prompts: int,
    n_bootstrap: int,
    progress: bool,
    plots: bool,
    robustness: bool,
    bootstrap_seed: int,
) -> tuple[_RunSettings, list[tuple[str, int]], bool, bool]:
    """`run_study`'s checks of its arguments, before any work (the same arguments; the
    errors it raises): the settings every model is measured with, the ``(condition,
    seed)`` runs and ``progress`` and ``plots`` as Python bools. The command line runs
    them before it says anything about its arguments (``--bootstrap`` under 40 was
    warned of before a missing checkpoints folder was refused, until audit 115)."""
    if not is_integer(n_prompts) or n_prompts < 2:  # the minimum's reason, then the maximum's
        raise ValueError(
            f"n_prompts must be an integer >= 2 ({_WHY_TWO_PROMPTS}), got {n_prompts!r}"
        )
    n_prompts = require_integer(  # a Python int: written to the settings (JSON)
        "n_prompts", n_prompts, 2, maximum=MAX_PROBE_PROMPTS, why_maximum=WHY_MAX_PROBE_PROMPTS
    )
    # before any model is loaded, not after the first; by the names of this call (the
    # bootstrap's own "seed" would read as the model seeds)
    n_bootstrap = require_integer(
        "n_bootstrap", n_bootstrap, 1, maximum=MAX_BOOTSTRAP, why_maximum=WHY_MAX_BOOTSTRAP
    )
    bootstrap_seed = require_integer("bootstrap_seed", bootstrap_seed, 0)
    # read by truthiness, "no" was True; robustness is written to every kept run's key too
    progress = require_bool("progress", progress)
    plots = require_bool("plots", plots)
    robustness = require_bool("robustness", robustness)  # written to every kept run's key
    check_out_dir(out_dir)
    runs = find_runs(checkpoints, conditions, seeds)
    for condition, seed in runs:  # every run's recorded task, not when its turn comes
        _check_trained_task(get_condition(condition), seed, checkpoints)
    settings = _RunSettings(checkpoints, n_prompts, n_bootstrap, robustness, bootstrap_seed)
    return settings, runs, progress, plots


def run_study(
    out_dir: Union[str, Path] = "study_out",
    checkpoints: Union[str, Path, None] = None,
    seeds: Optional[Sequence[int]] = None,
    conditions: Optional[Sequence[str]] = None,
    n_prompts: int = 256,
    n_bootstrap: int = 1000,
    progress: bool = True,
    plots: bool = True,
    robustness: bool = True,
    bootstrap_seed: int = 0,
) -> StudyResult:
    """Run the study on trained checkpoints and write every table, the figures and a report.

    Args:
        out_dir: where results go (replaced atomically: a failed run leaves the previous
            results in place; a folder that does not look like study output is refused
            before any work). Each finished model's tables are kept in `partial_dir`
            (``{out_dir}.partial``) until the study is written: after a crash or Ctrl-C,
            the same call resumes, recomputing only the models not finished (or whose
            checkpoint, settings or library code changed since).
        checkpoints: a directory with ``{condition}_seed{seed}/model`` (what
            ``hooked-attnres train --out DIR`` writes); default: the shipped checkpoints.
        seeds: model seeds, a list (default: every seed found for each condition).
        conditions: condition names, or one name (default: every condition found).
        n_prompts: held-out probe prompts per model (the same prompts for every model of a
            task; from 2 to `MAX_PROBE_PROMPTS`, 16384, checked before any work, as is
            ``n_bootstrap``).
        n_bootstrap: bootstrap resamples for every interval.
            (Every run's ``metrics.json`` is checked against its condition's task and
            stopping rule before any work, too, as `load_condition` checks one.)
        progress, plots: progress lines and bars; figures (each ``True`` or ``False``).
        robustness: recompute the verdicts on a second, disjoint prompt set (``True`` or
            ``False``; the three flags are checked before any work, ``TypeError``).
        bootstrap_seed: the seed of every bootstrap (the resampled prompts; recorded in
            ``run.json``). Another seed draws other intervals around the same estimates.

    Returns:
        A `StudyResult`.
    """
    started = time.perf_counter()
    settings, runs, progress, plots = check_study_arguments(
        out_dir,
        checkpoints,
        seeds,
        conditions,
        n_prompts,
        n_bootstrap,
        progress,
        plots,
        robustness,
        bootstrap_seed,
    )
    partial = partial_dir(out_dir)
    with _one_study_at_a_time(partial):
        tables: dict[str, list[pd.DataFrame]] = {}
        for condition, seed in runs:
            key = _run_key(condition, seed, settings)
            found_before = _read_partial(partial, condition, seed, key)
            if found_before is not None:
                run_tables = found_before
                if progress:
                    print(f"[study] {condition} seed {seed}: finished earlier, read from {partial}")
            else:
                if progress:
                    print(
                        f"[study] {condition} seed {seed}: {settings.n_prompts} probe prompts",
                        flush=True,
                    )
                run_tables = _study_run(condition, seed, settings)
                _write_partial(partial, condition, seed, key, run_tables)
            for name, table in run_tables.items():
                tables.setdefault(name, []).append(table)
        joined = {
            name: _front(pd.concat(parts, ignore_index=True)) for name, parts in tables.items()
        }
        result = StudyResult(
            out_dir=Path(out_dir),
            accuracy=joined["accuracy"],
            mass=joined["mass"],
            mass_summary=joined["mass_summary"],
            effects=joined["effects"],
            dissociation=joined["dissociation"],
            schedule=joined.get("schedule", pd.DataFrame()),
            seeds_summary=_seeds_summary(joined["mass_summary"], joined["effects"]),
            motifs=joined["motifs"],
            verdicts=motif_verdicts(joined["motifs"]),
            fresh_motifs=joined.get("fresh_motifs", pd.DataFrame()),
            settings=_settings(settings, runs),
        )
        if settings.robustness:
            result.robustness = verdict_changes(result.motifs, result.fresh_motifs)
        if plots:
            result.figures = study_figures(result)
        result.seconds = time.perf_counter() - started
        result.settings["seconds"] = round(result.seconds, 1)
        write_study(result)
        others = _remove_kept(partial, runs)  # every model's tables are in out_dir now
    if progress:
        print(f"[study] wrote {result.out_dir} in {result.seconds:.0f} s", flush=True)
        if others:
            print(
                f"[study] {partial} still keeps {len(others)} finished model(s) of another "
                f"study into this out_dir ({some_names(others)}): run that study again to "
                "resume it, or delete the folder to discard them",
                flush=True,
            )
    return result


@contextlib.contextmanager
def _one_study_at_a_time(partial: Path) -> Iterator[None]:
    """Hold `partial_dir` for this study (`hooked_attnres._atomic.exclusive_job`): two
    studies into one ``out_dir`` share the kept tables, which the first one to finish
    deletes (the other then failed writing its next model's, or lost them). The folder is
    removed afterwards if no model finished."""
    try:
        with exclusive_job(partial, "study"):
            yield
    finally:
        with contextlib.suppress(OSError):
            partial.rmdir()  # only if empty


@dataclass(frozen=True)
class _RunSettings:
    """What `run_study` measures every model with."""

    checkpoints: Union[str, Path, None]
    n_prompts: int
    n_bootstrap: int
    robustness: bool
    bootstrap_seed: int = 0


def _study_run(condition: str, seed: int, settings: _RunSettings) -> dict[str, pd.DataFrame]:
    """Every table `run_study` reads from one model, tagged with its condition and seed:
    `study_condition`'s tables and the motifs on the probe prompts (and ``fresh_motifs``
    on a second, disjoint prompt set when ``settings.robustness``)."""
    recipe = get_condition(condition)
    model = load_condition(condition, seed, settings.checkpoints)
    n_prompts, robustness = settings.n_prompts, settings.robustness
    tag = {"condition": condition, "seed": seed}
    out: dict[str, pd.DataFrame] = {}
    first: Optional[TaskBatch] = None
    for prompt_seed in [PROBE_SEED, FRESH_PROBE_SEED] if robustness else [PROBE_SEED]:
        batch = probe_prompts(model, n_prompts, prompt_seed, recipe.task, exclude=first)
        first = batch if first is None else first
        found = study_condition(
            model, batch, settings.n_bootstrap, progress=False, seed=settings.bootstrap_seed
        )
        motifs = motif_report(found["mass_summary"], found["effects"])
        if prompt_seed == FRESH_PROBE_SEED:
            out["fresh_motifs"] = motifs.assign(**tag)
            continue
        found["motifs"] = motifs
        out.update({name: table.assign(**tag) for name, table in found.items()})
    return out


# --- resuming: every finished model's tables are kept until the whole study is written ----
# The format of a kept run (bump it when what a run's tables hold changes).
# 2: the mass table has n_sources (audit 51); 3: mass_summary family_read; 4: and layers;
# 5: the tables pickled apart, with their SHA-256 (audit 150)
_PARTIAL_FORMAT = 5


def partial_dir(out_dir: Union[str, Path], name: str = "out_dir") -> Path:
    """Where `run_study` keeps each finished model's tables while it runs: the sibling
    ``{out_dir}.partial`` (its own files removed once the study is written: `_remove_kept`).
    An interrupted or failed study is resumed by running it again with the same settings:
    models whose checkpoint, settings and library code are unchanged are read from there,
    not recomputed.

    Raises:
        ValueError: ``out_dir`` is the file-system root (no name to extend), naming it as
            ``name`` (the command line passes ``"--out"``).
    """
    out_dir = Path(out_dir).absolute()  # "." has no name to extend
    if not out_dir.name:
        raise ValueError(
            f"{name} {out_dir} is the file-system root: the study keeps its finished models "
            "beside its output folder, in a sibling named after it (the name + '.partial'), "
            "and the root has no name; choose a folder"
        )
    return out_dir.with_name(out_dir.name + ".partial")


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """SHA-256 of the package's Python source: any change to the code invalidates the kept
    runs (they might have been computed differently)."""
    root = Path(__file__).resolve().parents[1]
    return _files_fingerprint([root], pattern="*.py", names_relative_to=root)


def _files_fingerprint(
    paths: Sequence[Path], pattern: str = "*", names_relative_to: Optional[Path] = None
) -> str:
    """SHA-256 of the files matching ``pattern`` under ``paths`` (names, relative to
    ``names_relative_to`` if given, and contents; a missing path counts)."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(root.rglob(pattern)) if root.is_dir() else [root]
        for path in files:
            named = path if names_relative_to is None else path.relative_to(names_relative_to)
            name = named.as_posix().encode()
            if path.is_file():
                digest.update(name + b"\0" + path.read_bytes())
            elif not path.exists():
                digest.update(b"missing " + name)
    return digest.hexdigest()


def _run_key(condition: str, seed: int, settings: _RunSettings) -> dict:
    """What a kept run must match to be reused: its settings, its checkpoint's files
    (weights, config, ``metrics.json``), the library's code, and what else moves the
    numbers: the thread count (1 and 2 threads differ by ~1e-8 in the effects) and the
    versions of torch, NumPy and pandas (``run.json`` records one value of each for every
    model)."""
    checkpoints = settings.checkpoints
    model = checkpoint_dir(condition, seed, checkpoints)
    return {
        "format": _PARTIAL_FORMAT,
        "condition": condition,
        "seed": seed,
        "n_prompts": settings.n_prompts,
        "n_bootstrap": settings.n_bootstrap,
        "robustness": settings.robustness,
        "bootstrap_seed": settings.bootstrap_seed,
        "checkpoint": _files_fingerprint([model, metrics_path(condition, seed, checkpoints)]),
        "code": _code_fingerprint(),
        **numerics_environment(pd),  # "threads", "versions" (torch, NumPy, pandas)
    }


def _partial_file(partial: Path, condition: str, seed: int) -> Path:
    return partial / f"{run_dir('.', condition, seed).name}.pkl"


# what `_write_partial` writes into `partial_dir`: ``{condition}_seed{n}.pkl``, and the
# temporary sibling ``.{condition}_seed{n}.pkl.partial-<id>`` a killed write leaves (and,
# where the folder cannot be locked, the lock file `LOCK_FILE`; the study's `RUN_LOCK`)
_KEPT_FILE = re.compile(
    rf"(\.)?(?:{'|'.join(map(re.escape, CONDITIONS))})_seed(?:{SEED_DIGITS})\.pkl"
    rf"(?(1){re.escape(PARTIAL_INFIX)}{SIBLING_ID})"
)


def _foreign_kept(partial: Path) -> list[str]:
    """What in ``partial`` (`partial_dir`) the study did not write: everything if it is not
    a directory (``[name]``), else every entry but kept runs and their temporary siblings
    (folders end with ``/``)."""
    if partial.is_symlink() or not partial.is_dir():
        return [partial.name]
    return sorted(
        path.name + ("/" if path.is_dir() else "")
        for path in partial.iterdir()
        if path.is_dir()
        or path.is_symlink()
        or not (_KEPT_FILE.fullmatch(path.name) or path.name in (LOCK_FILE, RUN_LOCK))
    )


def _remove_kept(partial: Path, runs: Sequence[tuple[str, int]]) -> list[str]:
    """Remove the kept runs of ``runs`` (this study's ``(condition, seed)`` pairs) from
    ``partial`` (`partial_dir`) once the study is written, with the temporary files of
    killed writes; the whole folder if nothing else is in it. Returns the names of the
    kept runs of other models, which stay: they are another study's into the same
    ``out_dir`` that failed or was interrupted, and running it again resumes from them
    (until audit 62 they were deleted with the folder). Anything else put there meanwhile
    stays too."""
    if not partial.is_dir():
        return []
    mine = {_partial_file(partial, condition, seed).name for condition, seed in runs}
    others = sorted(
        path.name
        for path in partial.iterdir()
        if _KEPT_FILE.fullmatch(path.name)
        and not path.name.startswith(".")  # a killed write's temporary file: no kept run
        and path.name not in mine
    )
    if not others and not _foreign_kept(partial):
        shutil.rmtree(partial, ignore_errors=True)
        return []
    for path in partial.iterdir():
        if (
            _KEPT_FILE.fullmatch(path.name)
            and path.name not in others
            and path.is_file()
            and not path.is_symlink()
        ):
            path.unlink(missing_ok=True)
    return others


def _write_partial(
    partial: Path, condition: str, seed: int, key: dict, run_tables: dict[str, pd.DataFrame]
) -> None:
    """Keep one finished model's tables (written atomically: a crash leaves the whole
    file or none), pickled apart with their SHA-256: `_read_partial` recomputes a kept
    run whose tables changed since (a changed float still unpickles)."""
    partial.mkdir(parents=True, exist_ok=True)
    tables = pickle.dumps(run_tables, protocol=pickle.HIGHEST_PROTOCOL)
    kept = {"key": key, "sha256": hashlib.sha256(tables).hexdigest(), "tables": tables}
    data = pickle.dumps(kept, protocol=pickle.HIGHEST_PROTOCOL)
    write_bytes_atomic(_partial_file(partial, condition, seed), data)


def _read_partial(
    partial: Path, condition: str, seed: int, key: dict
) -> Optional[dict[str, pd.DataFrame]]:
    """A kept run's tables if it was made with exactly ``key``; ``None`` (recompute) if
    there is none, it is unreadable, anything in the key differs, or its tables differ
    from their SHA-256 (`_write_partial`)."""
    path = _partial_file(partial, condition, seed)
    if not path.is_file():
        return None
    try:
        kept = pickle.loads(path.read_bytes())  # written by `_write_partial` only
        if not isinstance(kept, dict) or kept.get("key") != key:
            return None
        tables = kept.get("tables")
        if not isinstance(tables, bytes) or hashlib.sha256(tables).hexdigest() != kept.get(
            "sha256"
        ):
            return None
        run_tables = pickle.loads(tables)
    except Exception:  # a damaged file: recompute the run
        return None
    if not isinstance(run_tables, dict) or not all(
        isinstance(table, pd.DataFrame) for table in run_tables.values()
    ):
        return None
    return run_tables


def find_runs(
    checkpoints: Union[str, Path, None],
    conditions: Optional[Sequence[str]],
    seeds: Optional[Sequence[int]],
) -> list[tuple[str, int]]:
    """``(condition, seed)`` pairs to study, conditions in the order given (default: every
    condition with a checkpoint, in `CONDITIONS` order), each with the seeds asked for
    (default: every seed found for it). One condition may be given as its name; seeds
    must be a list (``seeds=3`` could mean seed 3 or three seeds: refused), each at most
    `MAX_SEED` (a run found of a larger seed is refused too: its study failed after the work).
    A run folder under ``checkpoints`` of the conditions and seeds asked for (by default,
    of any) whose training was not finished (no ``model/``: `unfinished_runs`) is refused
    (``ValueError``): the selection by what is found left it out silently (audit 178)."""
    if isinstance(conditions, str):  # one name: it was read as its letters ("repeats 'u'")
        conditions = [conditions]
    if conditions is not None and not isinstance(conditions, Iterable):
        raise ValueError(
            f"conditions must be a condition name or a list of them, got {conditions!r}"
        )
    # (a 0-d NumPy array or tensor, an Iterable that cannot be iterated, is refused by
    # require_selection below: `as_items`, the one check of every selection)
    if seeds is not None and (isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable)):
        example = f"seeds=[{int(seeds)}] for that one seed" if is_integer(seeds) else "seeds=[0, 1]"
        raise ValueError(f"seeds must be a list of model seeds, e.g. {example}; got {seeds!r}")
    # (each selection is read once, into a list: a generator read twice was empty)
    if conditions is not None:
        # a condition or seed given twice would study one model twice: its rows would be
        # counted twice in every mean over seeds (the verdicts refuse them, after the work)
        conditions = require_selection("conditions", conditions, why="no model would be studied")
        for condition in conditions:
            get_condition(condition)
    if seeds is not None:
        seeds = require_selection("seeds", seeds, why="no model would be studied")
        seeds = [  # Python ints (JSON)
            require_integer("seeds", seed, 0, maximum=MAX_SEED, why_maximum=WHY_MAX_SEED)
            for seed in seeds
        ]
    if checkpoints is not None and not Path(checkpoints).is_dir():
        if not Path(checkpoints).exists():
            raise FileNotFoundError(f"no checkpoints folder at {checkpoints}")
        raise NotADirectoryError(
            f"checkpoints {checkpoints} is a file, not a folder of "
            "{condition}_seed{n}/model runs (what `hooked-attnres train --out DIR` writes)"
        )
    found = available(checkpoints)
    if checkpoints is not None:
        _refuse_unfinished(checkpoints, conditions, seeds)
    names = list(conditions) if conditions is not None else list(found)
    holds = f"{checkpoints} holds" if checkpoints is not None else "the shipped checkpoints hold"
    if not names:
        raise FileNotFoundError(
            f"{holds} no {{condition}}_seed{{n}}/model run of a known condition"
        )
    runs = []
    for name in names:
        chosen = list(seeds) if seeds is not None else found.get(name, [])
        if not chosen:
            raise FileNotFoundError(
                f"{holds} no {name}_seed{{n}}/model; "
                f"train it with `hooked-attnres train --condition {name} --seeds 0 --out DIR`"
            )
        runs += [(name, seed) for seed in chosen]
    for name, seed in runs:
        path = checkpoint_dir(name, seed, checkpoints)  # every one exists, before any work
        if seed > MAX_SEED:  # a run found (train wrote one until audit 122); seeds= is checked
            raise ValueError(
                f"{path.parent} holds seed {seed}, above {MAX_SEED} ({WHY_MAX_SEED}: its "
                "study would fail after the model's work); choose the seeds to study "
                "(seeds=[...], --seeds)"
            )
    return runs


def _refuse_unfinished(
    checkpoints: Union[str, Path], conditions: Optional[Sequence[str]], seeds
) -> None:
    """Refuse a training run started and not finished among the runs asked for (every
    condition and seed by default; `unfinished_runs`): the selection by what is found
    skipped it without a word, so a study of the seeds trained was silently one of fewer
    (audit 178), and a condition whose every run was unfinished was left out."""
    asked = CONDITIONS if conditions is None else conditions
    unfinished = unfinished_runs(checkpoints, asked, seeds)
    if not unfinished:
        return
    condition, seed, progress = unfinished[0]
    others = f" (and {len(unfinished) - 1} more)" if len(unfinished) > 1 else ""
    raise ValueError(
        f"{run_dir(checkpoints, condition, seed)} holds an unfinished training run "
        f"({progress}, no model/){others}: the study would leave it out; finish it "
        f"({finish_command(condition, seed, checkpoints)}), or name the conditions and "
        "seeds to study without it (--conditions / --seeds; conditions=, seeds=)"
    )


def check_out_dir(out_dir: Union[str, Path], name: str = "out_dir") -> None:
    """Refuse, before any work, an ``out_dir`` whose files a save would delete: anything but
    an earlier study written by this library (the check of every atomic save,
    `hooked_attnres._atomic.check_replaceable`), and a `partial_dir` holding anything but
    kept runs (the study deletes it when it is done). ``name``: what the caller calls
    ``out_dir`` in the messages (the command line: ``"--out"``).

    Raises:
        CheckpointConflictError: a ``FileExistsError`` naming the files.
        ValueError: ``out_dir`` is the file-system root (`partial_dir`), or the package's
            folder or inside it (`hooked_attnres._atomic.check_outside_package`).
    """
    partial = partial_dir(out_dir, name)  # first: the root is refused before it is scanned
    check_outside_package(out_dir, name)  # and the package before it is scanned
    _check_study_folder(out_dir, name)
    if partial.exists() or partial.is_symlink():
        foreign = _foreign_kept(partial)
        if foreign == [partial.name]:
            what = "it is a file or a link"
        else:
            what = f"it holds files the study did not write ({some_names(foreign)})"
        if foreign:
            raise CheckpointConflictError(
                f"refusing to use {partial} for the finished models' tables: {what}, and the "
                f"study deletes that folder when it is done; move it away or choose another "
                f"{name}"
            )


def _check_study_folder(out_dir: Union[str, Path], name: str = "out_dir") -> None:
    """Refuse an ``out_dir`` that is not new, empty or an earlier study of this library
    (``name``: as `check_out_dir`). Holding only files a save of this library wrote is not
    enough: a model checkpoint or a training run's checkpoint is one too, and the study's
    save would delete it (``--out runs/{condition}_seed0/model`` replaced the model just
    studied with the report)."""
    check_replaceable(
        out_dir,
        remedy="it does not hold an earlier study written by this "
        f"library; choose a new or empty folder for the study (another {name})",
    )
    saved = other_save(out_dir, keeps=STUDY_FILES)
    if saved is not None:
        raise CheckpointConflictError(
            f"refusing to replace {out_dir}: it is not an earlier study but another save of "
            f"this library ({saved}), which the study's save "
            f"would delete; choose another {name} (a new or empty folder, or an earlier study)"
        )


def _settings(settings: _RunSettings, runs) -> dict:
    import platform

    from hooked_attnres._version import __version__

    def version(package: str) -> str:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as metadata_version

        try:
            return metadata_version(package)
        except PackageNotFoundError:
            return "unknown"

    checkpoints = settings.checkpoints
    return {
        "runs": [f"{c} seed {s}" for c, s in runs],
        "checkpoints": str(checkpoints) if checkpoints is not None else "shipped",
        "n_prompts": settings.n_prompts,
        "probe_seed": PROBE_SEED,
        "fresh_probe_seed": FRESH_PROBE_SEED if settings.robustness else None,
        "n_bootstrap": settings.n_bootstrap,
        "bootstrap_seed": settings.bootstrap_seed,
        "confidence": 0.95,
        # the bias of the recency wrap, which only a vanilla condition is loaded through
        # (`load_condition`); None when no run is one (3.0 read as the trained models')
        "recency_bias": RECENCY_BIAS if any(_wrapped(c) for c, _ in runs) else None,
        "versions": {
            "hooked_attnres": __version__,
            "torch": torch.__version__,
            "transformer-lens": version("transformer-lens"),
            "transformers": version("transformers"),
            "python": platform.python_version(),
        },
        "threads": torch.get_num_threads(),
    }


def _wrapped(condition: str) -> bool:
    """Whether `load_condition` reads ``condition`` through the recency wrap (a vanilla
    condition), with `RECENCY_BIAS`."""
    return get_condition(condition).kind == "vanilla"


def _front(table: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in ("condition", "seed") if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def mass_by_layer(mass: pd.DataFrame) -> pd.DataFrame:
    """The per-prompt mass table averaged over prompts: one row per ``condition, seed,
    router, layer, band, family`` with ``n_sources`` (0: the family is absent at that
    router), ``mass`` (mean) and ``n_prompts`` (what ``mass.csv`` holds; the per-prompt
    table stays in memory, ``StudyResult.mass``)."""
    columns = ("condition", "seed", "router", "layer", "band", "family", "n_sources")
    keys = [c for c in columns if c in mass]
    return (
        mass.groupby(keys, sort=False)
        .mass.agg(["mean", "count"])
        .rename(columns={"mean": "mass", "count": "n_prompts"})
        .reset_index()
    )


STUDY_FILES = ("run.json", "report.md")  # what every study writes (`write_study`)


def write_study(result: StudyResult) -> Path:
    """Write ``report.html`` (one self-contained page, plotly.js inlined once), ``report.md``
    (the same content in text) and the tables as CSV (columns in ``docs/analysis.md``)."""
    _check_study_folder(result.out_dir)  # `partial_dir` was checked before the work
    with atomic_directory(result.out_dir) as tmp:
        for name in (
            "accuracy",
            "mass_summary",
            "effects",
            "schedule",
            "seeds_summary",
            "motifs",
            "verdicts",
            "fresh_motifs",
            "robustness",
        ):
            table = getattr(result, name)
            if not table.empty:
                table.to_csv(tmp / f"{name}.csv", index=False)
        mass_by_layer(result.mass).to_csv(tmp / "mass.csv", index=False)
        result.dissociation.to_json(tmp / "dissociation.json", orient="records", indent=2)
        # UTF-8 whatever the locale: the page says charset utf-8, and the tables print "–"
        # (NOT_MEASURED), which an ASCII locale could not write (after the whole study)
        (tmp / "report.md").write_text(study_report(result), encoding="utf-8")
        (tmp / "report.html").write_text(study_report_html(result), encoding="utf-8")
        (tmp / "run.json").write_text(
            json.dumps(result.settings, indent=2) + "\n", encoding="utf-8"
        )
    return result.out_dir
