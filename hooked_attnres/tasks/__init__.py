"""Synthetic probe tasks with answers, contrasts and clean / corrupted pairs."""

from hooked_attnres._validation import require_choice
from hooked_attnres.tasks.base import Task, TaskBatch
from hooked_attnres.tasks.induction import InductionCopy
from hooked_attnres.tasks.retrieval import KeyValueRetrieval
from hooked_attnres.tasks.vocabulary import build_tokenizer, task_tokenizer

TASKS = {"retrieval": KeyValueRetrieval, "induction": InductionCopy}


def make_task(name: str, **kwargs) -> Task:
    """A task by name (``"retrieval"`` or ``"induction"``) with its knobs."""
    return TASKS[require_choice("task", name, tuple(TASKS))](**kwargs)


__all__ = [
    "InductionCopy",
    "KeyValueRetrieval",
    "TASKS",
    "Task",
    "TaskBatch",
    "build_tokenizer",
    "make_task",
    "task_tokenizer",
]
