"""The seed paper's study as an application of the library: conditions, checkpoints,
the run, the report and its figures.

    from hooked_attnres.study import run_study, load_condition, probe_prompts
    result = run_study("study_out")          # the shipped checkpoints

The library (model, loading, interventions, analysis, patching, plotting, tasks,
training) never imports this package.

The names below are imported on first use, so that a light part of the study (its
condition table, `hooked_attnres.study.recipes`, and `checkpoints`) is read without the
model, torch, pandas and plotly (``hooked-attnres list``, audit 198).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hooked_attnres._lazy import lazy_names

_LAZY = {
    "SHIPPED": "hooked_attnres.study.checkpoints",
    "available": "hooked_attnres.study.checkpoints",
    "checkpoint_dir": "hooked_attnres.study.checkpoints",
    "metrics_path": "hooked_attnres.study.checkpoints",
    "run_dir": "hooked_attnres.study.checkpoints",
    "seeds_found": "hooked_attnres.study.checkpoints",
    "CONDITIONS": "hooked_attnres.study.recipes",
    "CONDITIONS_BY_NAME": "hooked_attnres.study.conditions",
    "Condition": "hooked_attnres.study.conditions",
    "MAX_SEED": "hooked_attnres.study.conditions",
    "STUDY_BLOCKS": "hooked_attnres.study.conditions",
    "STUDY_SHAPE": "hooked_attnres.study.conditions",
    "TASKS": "hooked_attnres.study.conditions",
    "build_model": "hooked_attnres.study.conditions",
    "get_condition": "hooked_attnres.study.conditions",
    "make_task": "hooked_attnres.study.conditions",
    "study_task": "hooked_attnres.study.conditions",
    "study_train_config": "hooked_attnres.study.conditions",
    "train_condition": "hooked_attnres.study.conditions",
    "study_figures": "hooked_attnres.study.figures",
    "accuracy_table": "hooked_attnres.study.report",
    "study_report": "hooked_attnres.study.report",
    "study_report_html": "hooked_attnres.study.report",
    "verdict_matrix": "hooked_attnres.study.report",
    "verdict_sentences": "hooked_attnres.study.report",
    "FRESH_PROBE_SEED": "hooked_attnres.study.run",
    "MAX_BOOTSTRAP": "hooked_attnres.study.run",
    "MAX_PROBE_PROMPTS": "hooked_attnres.study.run",
    "PROBE_SEED": "hooked_attnres.study.run",
    "RECENCY_BIAS": "hooked_attnres.study.run",
    "StudyResult": "hooked_attnres.study.run",
    "check_out_dir": "hooked_attnres.study.run",
    "find_runs": "hooked_attnres.study.run",
    "load_condition": "hooked_attnres.study.run",
    "model_is_zero_query": "hooked_attnres.study.run",
    "probe_prompts": "hooked_attnres.study.run",
    "run_study": "hooked_attnres.study.run",
    "study_condition": "hooked_attnres.study.run",
    "write_study": "hooked_attnres.study.run",
}

if TYPE_CHECKING:
    from hooked_attnres.study.checkpoints import (
        SHIPPED,
        available,
        checkpoint_dir,
        metrics_path,
        run_dir,
        seeds_found,
    )
    from hooked_attnres.study.conditions import (
        CONDITIONS_BY_NAME,
        MAX_SEED,
        STUDY_BLOCKS,
        STUDY_SHAPE,
        TASKS,
        Condition,
        build_model,
        get_condition,
        make_task,
        study_task,
        study_train_config,
        train_condition,
    )
    from hooked_attnres.study.figures import study_figures
    from hooked_attnres.study.recipes import CONDITIONS
    from hooked_attnres.study.report import (
        accuracy_table,
        study_report,
        study_report_html,
        verdict_matrix,
        verdict_sentences,
    )
    from hooked_attnres.study.run import (
        FRESH_PROBE_SEED,
        MAX_BOOTSTRAP,
        MAX_PROBE_PROMPTS,
        PROBE_SEED,
        RECENCY_BIAS,
        StudyResult,
        check_out_dir,
        find_runs,
        load_condition,
        model_is_zero_query,
        probe_prompts,
        run_study,
        study_condition,
        write_study,
    )


if not TYPE_CHECKING:  # hidden from type checkers, so that they flag a misspelt name
    __getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())


__all__ = [
    "CONDITIONS",
    "CONDITIONS_BY_NAME",
    "FRESH_PROBE_SEED",
    "MAX_BOOTSTRAP",
    "MAX_PROBE_PROMPTS",
    "MAX_SEED",
    "PROBE_SEED",
    "RECENCY_BIAS",
    "SHIPPED",
    "STUDY_BLOCKS",
    "STUDY_SHAPE",
    "TASKS",
    "Condition",
    "StudyResult",
    "accuracy_table",
    "available",
    "build_model",
    "check_out_dir",
    "checkpoint_dir",
    "find_runs",
    "get_condition",
    "load_condition",
    "make_task",
    "metrics_path",
    "model_is_zero_query",
    "probe_prompts",
    "run_dir",
    "run_study",
    "seeds_found",
    "study_condition",
    "study_figures",
    "study_report",
    "study_report_html",
    "verdict_matrix",
    "verdict_sentences",
    "study_task",
    "study_train_config",
    "train_condition",
    "write_study",
]
