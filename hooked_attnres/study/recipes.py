"""The study's conditions as data: every condition's name and recipe, without torch.

`Recipe` says what a condition is (model kind, task, layout, depth, steps, threads);
`hooked_attnres.study.conditions.Condition` is the same recipe with the methods that build
and train its model, and `CONDITIONS_BY_NAME` there is built by `grid` here from the same
table. This module imports no model, task or trainer, so that ``hooked-attnres list`` and
the command line's reading of a condition name load no torch (audit 198: they took about
5 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from hooked_attnres._study_limits import GRID_DEPTHS, GRID_LAYOUTS, GRID_TASKS

BASE_STEPS, BASE_WARMUP = 1200, 100
# the ``paperlike`` stopping rule (docs/study.md, "Addendum"): the first evaluation, every
# 10 steps on 256 held-out prompts, at which accuracy is >= 0.50
PAPERLIKE_STOP = dict(stop_accuracy=0.5, eval_every=10, eval_size=256)


@dataclass(frozen=True)
class Recipe:
    """A named training recipe.

    Attributes:
        name: the condition's name (also the checkpoint folder prefix).
        kind: ``"attnres"`` (a ``HookedAttnRes``) or ``"vanilla"`` (a HF Qwen3).
        task: a key of `TASKS`.
        layout: the AttnRes layout (``None`` for vanilla).
        n_layers: depth; AttnRes models have ``n_layers // 2`` blocks.
        steps: optimiser steps (the warm-up scales with them: ``round(100 * steps / 1200)``).
        threads: ``torch.set_num_threads`` while training (part of the recipe: the order of
            float reductions depends on it); ``None`` leaves the machine's default.
        eval_every: held-out evaluation interval (does not change the weights).
        legacy: the original two conditions' recipe (their ``train`` description).
        eval_size: held-out prompts per evaluation.
        stop_accuracy: `TrainConfig.stop_accuracy` (``None``: train every step).
    """

    name: str
    kind: str
    task: str
    layout: Optional[str] = None
    n_layers: int = 8
    steps: int = BASE_STEPS
    threads: Optional[int] = 1
    eval_every: int = 100
    legacy: bool = False
    eval_size: int = 512
    stop_accuracy: Optional[float] = None

    @property
    def num_blocks(self) -> int:
        return self.n_layers // 2

    @property
    def baseline(self) -> str:
        """The vanilla condition of the same task and depth (the wrapped baseline)."""
        return "vanilla" if self.legacy else f"{self.task}_vanilla_L{self.n_layers}"


# optimiser steps per (task, depth): 8-layer models train the study's 1200 steps; a
# 16-layer model cannot do that in the 5-minute budget on one thread, so it gets the
# largest multiple of 50 whose estimated time fits 240 s (docs/study.md, "The grid")
GRID_STEPS = {
    ("hard", 8): 1200,
    ("saturated", 8): 1200,
    ("induction", 8): 1200,
    ("hard", 16): 650,
    ("saturated", 16): 900,
    ("induction", 16): 750,
}
for _depth in (8, 16):  # ``paperlike`` has the ``saturated`` steps (and usually stops earlier)
    GRID_STEPS[("paperlike", _depth)] = GRID_STEPS[("saturated", _depth)]

R = TypeVar("R", bound=Recipe)


def grid(kind: type[R]) -> dict[str, R]:
    """Every condition by name, in the study's order, as a ``kind`` (`Recipe` or its
    subclass `Condition`): the original two, then the grid by depth and task, each
    task's routed layouts before its vanilla baseline."""
    out: dict[str, R] = {
        "attnres": kind(
            "attnres",
            "attnres",
            "saturated",
            "cumulative",
            threads=None,
            eval_every=200,
            legacy=True,
        ),
        "vanilla": kind(
            "vanilla", "vanilla", "saturated", threads=None, eval_every=200, legacy=True
        ),
    }
    for n_layers in GRID_DEPTHS:
        for task in GRID_TASKS:
            steps = GRID_STEPS[(task, n_layers)]
            stop: dict[str, Any] = PAPERLIKE_STOP if task == "paperlike" else {}
            for layout in GRID_LAYOUTS[:-1]:  # the routed layouts, then "vanilla"
                name = f"{task}_{layout}_L{n_layers}"
                out[name] = kind(name, "attnres", task, layout, n_layers, steps, **stop)
            name = f"{task}_{GRID_LAYOUTS[-1]}_L{n_layers}"
            out[name] = kind(name, "vanilla", task, None, n_layers, steps, **stop)
    return out


RECIPES: dict[str, Recipe] = grid(Recipe)
CONDITIONS = tuple(RECIPES)
