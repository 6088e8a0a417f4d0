"""The seed paper's study as an application of the library: conditions, checkpoints,
the run, the report and its figures.

    from hooked_attnres.study import run_study, load_condition, probe_prompts
    result = run_study("study_out")          # the shipped checkpoints

The library (model, loading, interventions, analysis, patching, plotting, tasks,
training) never imports this package.
"""

from hooked_attnres.study.checkpoints import (
    SHIPPED,
    available,
    checkpoint_dir,
    metrics_path,
    run_dir,
    seeds_found,
)
from hooked_attnres.study.conditions import (
    CONDITIONS,
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
