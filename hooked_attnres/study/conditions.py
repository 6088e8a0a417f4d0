"""The study's conditions: named, reproducible recipes for every model the study trains.

A `Condition` fixes everything a trained checkpoint depends on: the model kind (a Block
AttnRes ``HookedAttnRes`` or a vanilla ``transformers.Qwen3ForCausalLM``), the layout and
depth, the probe task, and the optimiser settings. ``hooked-attnres train --condition NAME
--seeds 0 1 2`` recreates its checkpoints; `load_condition` loads one for the study (a
vanilla model through the recency wrap, the seed paper's baseline).

Conditions (``docs/study.md`` explains the grid):

* ``{task}_{layout}_L{n}``: Block AttnRes, ``layout`` ``cumulative`` (the paper's) or
  ``kimi``, ``n`` = 8 or 16 layers, two layers per block;
* ``{task}_vanilla_L{n}``: the vanilla Qwen3 baseline of the same shape and task;
* tasks: ``hard`` (key-value retrieval, 9 pairs), ``saturated`` (the original 6-pair
  probe), ``induction``, and ``paperlike`` (the 6-pair probe trained only until held-out
  accuracy first reaches 0.50, `recipes.PAPERLIKE_STOP`: a partly capable model like the
  paper's);
* ``attnres`` and ``vanilla``: the original two conditions (saturated probe, 8 layers,
  trained with the machine's default threads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch

from hooked_attnres._study_limits import GRID_TASKS, MAX_SEED, WHY_MAX_SEED
from hooked_attnres._validation import is_integer, require_bool, require_choice, require_integer
from hooked_attnres.config import HookedAttnResConfig
from hooked_attnres.model.hooked_attnres import HookedAttnRes
from hooked_attnres.study.recipes import (
    BASE_STEPS,
    BASE_WARMUP,
    CONDITIONS,
    Recipe,
    grid,
)
from hooked_attnres.tasks import InductionCopy, KeyValueRetrieval, Task, task_tokenizer
from hooked_attnres.training.trainer import TrainConfig, TrainResult, train

STUDY_SHAPE = dict(
    d_model=128,
    n_layers=8,
    n_heads=4,
    n_key_value_heads=2,
    d_head=32,
    d_mlp=256,
    n_ctx=64,
    rotary_base=10_000.0,
)
STUDY_BLOCKS = 4

# the probe tasks of the grid, by name (the arguments are part of every recipe)
TASKS: dict[str, tuple[type, dict[str, Any]]] = {
    "saturated": (
        KeyValueRetrieval,
        dict(n_pairs=6, n_keys=16, n_values=16, n_distractors=0, n_filler_words=8, n_queries=1),
    ),
    "hard": (
        KeyValueRetrieval,
        dict(n_pairs=9, n_keys=16, n_values=16, n_distractors=0, n_filler_words=8, n_queries=1),
    ),
    "induction": (InductionCopy, dict(seq_len=12, copy_len=4, n_tokens=32)),
}
# ``paperlike`` reads the ``saturated`` prompts; its recipe stops training early
TASKS["paperlike"] = TASKS["saturated"]
assert tuple(TASKS) == GRID_TASKS, "the grid's tasks are named once, in _study_limits"


def study_task(**overrides) -> KeyValueRetrieval:
    """The original study's retrieval probe (6 pairs, one query per prompt, nothing leaks)."""
    cls, values = TASKS["saturated"]
    return cls(**{**values, **overrides})


def make_task(name: str) -> Task:
    """A grid task by name (``"saturated"``, ``"hard"``, ``"induction"``, ``"paperlike"``,
    which is the ``saturated`` probe)."""
    cls, values = TASKS[require_choice("task", name, tuple(TASKS))]
    return cls(**values)


def study_train_config(**overrides) -> TrainConfig:
    """The study's optimiser settings: 1200 steps of 64 prompts, peak lr 5e-4 (the vanilla
    model does not learn the probe at 1e-3), 100 warm-up steps."""
    values: dict[str, Any] = dict(
        steps=BASE_STEPS,
        batch_size=64,
        lr=5e-4,
        warmup_steps=BASE_WARMUP,
        eval_every=200,
        eval_size=512,
        checkpoint_every=200,
    )
    values.update(overrides)
    return TrainConfig(**values)


@dataclass(frozen=True)
class Condition(Recipe):
    """A named training recipe (`Recipe`: its attributes, defined with the light table of
    `hooked_attnres.study.recipes`) with the methods that build, describe and train its
    model."""

    def make_task(self) -> Task:
        return make_task(self.task)

    def shape(self) -> dict[str, Any]:
        task = self.make_task()
        return {
            **STUDY_SHAPE,
            "n_layers": self.n_layers,
            "n_ctx": max(STUDY_SHAPE["n_ctx"], task.prompt_length),
        }

    def train_config(self) -> TrainConfig:
        warmup = round(BASE_WARMUP * self.steps / BASE_STEPS)
        return study_train_config(
            steps=self.steps,
            warmup_steps=warmup,
            eval_every=self.eval_every,
            eval_size=self.eval_size,
            stop_accuracy=self.stop_accuracy,
            threads=self.threads,
        )

    def build(
        self, seed: int, tokenizer, shape: Optional[dict] = None, num_blocks: Optional[int] = None
    ) -> Union[HookedAttnRes, torch.nn.Module]:
        """The freshly initialised model (weights a function of ``seed``); ``shape`` and
        ``num_blocks`` replace the recipe's (variants of the original two conditions). A
        vanilla model has no blocks: ``num_blocks`` given for one raises ``ValueError``
        (`refuse_vanilla_blocks`)."""
        shape = self.shape() if shape is None else dict(shape)
        if self.kind != "attnres":
            refuse_vanilla_blocks(self.name, num_blocks)
        if self.kind == "attnres":
            cfg = HookedAttnResConfig(
                d_vocab=len(tokenizer),
                attnres_layout=self.layout,  # type: ignore[arg-type]
                attnres_num_blocks=self.num_blocks if num_blocks is None else num_blocks,
                attnres_recency_bias=0.0,
                seed=seed,
                **shape,
            )
            return HookedAttnRes(cfg, tokenizer=tokenizer)
        return build_vanilla(seed, tokenizer, shape)

    def description(self, seed: int) -> dict[str, Any]:
        """What the trainer stores with the checkpoint (and checks on resume). A vanilla
        model has no blocks: the grid's vanilla conditions record ``num_blocks`` ``None``;
        the original ``"vanilla"`` records `STUDY_BLOCKS`, as its shipped checkpoints do
        (a run resumes only with the description it started with), which is the block
        count the study's recency wrap reads it with (`load_condition`: the recipe's
        ``n_layers // 2``), not a property of the trained model."""
        if self.legacy:
            return {
                "condition": self.kind,
                "model_seed": seed,
                "shape": STUDY_SHAPE,
                "num_blocks": STUDY_BLOCKS,
            }
        return {
            "kind": self.kind,
            "layout": self.layout,
            "n_layers": self.n_layers,
            "num_blocks": self.num_blocks if self.kind == "attnres" else None,
            "model_seed": seed,
            "shape": self.shape(),
        }


# every condition's recipe, from the one table of `hooked_attnres.study.recipes` (which
# names them in the same order, `CONDITIONS`)
CONDITIONS_BY_NAME: dict[str, Condition] = grid(Condition)


def get_condition(name: Union[str, Condition]) -> Condition:
    """The `Condition` of a name (``ValueError`` listing the names otherwise)."""
    if isinstance(name, Condition):
        return name
    return CONDITIONS_BY_NAME[require_choice("condition", name, CONDITIONS)]


# the HookedAttnResConfig fields a vanilla Qwen3ForCausalLM is built from (`build_vanilla`)
_VANILLA_FIELDS = (
    "d_model",
    "n_layers",
    "n_heads",
    "d_head",
    "d_mlp",
    "n_key_value_heads",
    "n_ctx",
    "eps",
    "rotary_base",
)
# the fields that say where the vanilla model lives and in which dtype, not what it is
_PLACEMENT = ("device", "dtype")


def build_vanilla(seed: int, tokenizer, shape: dict) -> torch.nn.Module:
    """A vanilla ``Qwen3ForCausalLM`` initialised like ``HookedAttnRes.init_weights`` (the
    two matrices that write to the stream get std ``0.02 / sqrt(2 * n_layers)``). ``shape``
    holds `HookedAttnResConfig` fields; the ones it leaves out take that config's defaults,
    so a vanilla and an AttnRes model of one ``shape`` have one shape. ``device`` and
    ``dtype`` place and convert it as they do the AttnRes model (initialised in float32 on
    the CPU, then converted and moved: the same weights, rounded to ``dtype``, on any
    device; a dtype the config refuses is refused with its message). Any other field given
    a value other than its default (``tie_word_embeddings``, ``initializer_range``, ...) is
    refused: the vanilla model would not have it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    full = HookedAttnResConfig(d_vocab=len(tokenizer), **shape)
    default = {field.name: field.default for field in fields(HookedAttnResConfig)}
    ignored = [
        k for k in shape if k not in (*_VANILLA_FIELDS, *_PLACEMENT) and shape[k] != default[k]
    ]
    if ignored:  # the AttnRes model of this shape would differ in them
        raise ValueError(
            f"the vanilla Qwen3ForCausalLM is built from the shape's {', '.join(_VANILLA_FIELDS)}; "
            f"it would ignore {', '.join(f'{k}={shape[k]!r}' for k in ignored)} (not the "
            "HookedAttnResConfig default), so it would not be of the AttnRes model's shape; "
            "leave them out, or build and convert the model yourself"
        )
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=full.d_model,
        intermediate_size=full.d_mlp,
        num_hidden_layers=full.n_layers,
        num_attention_heads=full.n_heads,
        num_key_value_heads=full.n_key_value_heads,
        head_dim=full.d_head,
        max_position_embeddings=full.n_ctx,
        rms_norm_eps=full.eps,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": full.rotary_base},
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model: torch.nn.Module = Qwen3ForCausalLM(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    param.normal_(
                        0.0, config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
                    )
    # as HookedAttnRes converts and places itself (cfg.dtype, cfg.device: "cpu" if None)
    return model.to(device=full.device, dtype=full.dtype)


def refuse_vanilla_blocks(condition: str, num_blocks: Optional[int]) -> None:
    """Refuse a ``num_blocks`` given for a vanilla condition: its model is a plain Qwen3
    without blocks, so it would be ignored (and, by `train_condition`, recorded as if
    used); the study reads a vanilla model through the recency wrap, whose blocks
    `hooked_attnres.study.run.load_condition` takes."""
    if num_blocks is not None:
        raise ValueError(
            f"num_blocks applies to Block AttnRes models; {condition!r} is a vanilla Qwen3, "
            "which has no blocks, and would ignore it: leave num_blocks out (the study "
            "wraps a vanilla model with load_condition(..., num_blocks=...))"
        )


def build_model(
    condition: str,
    seed: int,
    tokenizer,
    shape: Optional[dict] = None,
    num_blocks: Optional[int] = None,
) -> Union[HookedAttnRes, torch.nn.Module]:
    """A freshly initialised model of the original two conditions, ``"attnres"``
    (cumulative, ``num_blocks`` blocks, default `STUDY_BLOCKS`) or ``"vanilla"`` (no
    blocks: ``num_blocks`` given raises ``ValueError``), of ``shape`` (default
    `STUDY_SHAPE`); weights a function of ``seed``."""
    if condition not in ("attnres", "vanilla"):
        get_condition(condition)  # a known name: say to use Condition.build
        raise ValueError(
            f"build_model builds 'attnres' or 'vanilla'; for {condition!r} use "
            "get_condition(name).build(seed, tokenizer)"
        )
    if condition == "attnres" and num_blocks is None:
        num_blocks = STUDY_BLOCKS
    return get_condition(condition).build(
        seed, tokenizer, STUDY_SHAPE if shape is None else shape, num_blocks
    )


def _shape_for(shape: Optional[dict], task: Task, eval_task: Optional[Task]) -> dict:
    """The shape of a variation of the original two: ``shape`` if its context holds the
    prompts of ``task`` and ``eval_task``; by default `STUDY_SHAPE` with ``n_ctx`` grown
    to the longest of them, as a grid recipe's (`Condition.shape`). Before audit 127 it
    was `STUDY_SHAPE` whatever the task: prompts of 83 tokens were refused by the AttnRes
    model at its first training step and trained the vanilla one past its
    ``max_position_embeddings`` of 64, silently.

    Raises:
        ValueError: a ``shape`` whose ``n_ctx`` (default that of `HookedAttnResConfig`) is
            shorter than a task's prompts, naming the task and the length it needs.
        TypeError: a ``shape`` that is neither a dict nor ``None``.
    """
    if shape is not None and not isinstance(shape, dict):  # it failed in the model's config
        raise TypeError(
            "shape must be a dict of HookedAttnResConfig fields (e.g. dict(STUDY_SHAPE, "
            f"n_layers=4)) or None, got {type(shape).__name__} {shape!r}"
        )
    named = [("task", task), *([] if eval_task is None else [("eval_task", eval_task)])]
    name, longest = max(((n, t.prompt_length) for n, t in named), key=lambda pair: pair[1])
    if shape is None:
        return {**STUDY_SHAPE, "n_ctx": max(STUDY_SHAPE["n_ctx"], longest)}
    default = next(f.default for f in fields(HookedAttnResConfig) if f.name == "n_ctx")
    n_ctx = shape.get("n_ctx", default)
    if is_integer(n_ctx) and n_ctx < longest:  # any other n_ctx: the config's refusal
        raise ValueError(
            f"shape's n_ctx={n_ctx} is shorter than the prompts of {name} ({longest} tokens): "
            f"give n_ctx >= {longest}, or leave shape out (the study's shape with a context "
            "that holds them)"
        )
    return shape


def train_condition(
    condition: str,
    seed: int,
    out_dir: Union[str, Path],
    task: Optional[Task] = None,
    eval_task: Optional[Task] = None,
    config: Optional[TrainConfig] = None,
    shape: Optional[dict] = None,
    num_blocks: Optional[int] = None,
    progress: bool = True,
    resume: bool = True,
) -> TrainResult:
    """Train one condition with one model seed into ``out_dir`` (``out_dir/model`` holds the
    trained model, ``out_dir/metrics.json`` its held-out accuracy and history).

    With only ``condition``, ``seed`` and ``out_dir`` this is the condition's recipe
    (what the shipped checkpoints were trained with). The other arguments vary the
    original two conditions (``"attnres"``, ``"vanilla"``): the task, the evaluation task,
    the optimiser settings, the shape and the number of blocks (``"attnres"`` only, default
    `STUDY_BLOCKS`: a vanilla model has no blocks, and ``num_blocks`` given for one raises
    ``ValueError``, as it would be ignored and recorded as if used). A grid condition is a
    fixed recipe: a variation of it raises ``ValueError``, a ``num_blocks`` other than its
    own (``n_layers // 2``) too.
    """
    recipe = get_condition(condition)
    # run_dir would be {condition}_seed-1, which the study's checkpoint search never finds
    seed = require_integer("seed", seed, 0, maximum=MAX_SEED, why_maximum=WHY_MAX_SEED)
    # before the model is built (train checks them too)
    progress = require_bool("progress", progress)
    resume = require_bool("resume", resume)
    # by the name the caller wrote (the config refused "attnres_num_blocks=0")
    num_blocks = require_integer("num_blocks", num_blocks, 1, optional=True)
    if recipe.kind != "attnres":
        refuse_vanilla_blocks(condition, num_blocks)
    for name, value in (("task", task), ("eval_task", eval_task)):
        if value is not None and not isinstance(value, Task):
            raise TypeError(
                f"{name} must be a Task (e.g. KeyValueRetrieval(n_pairs=4)) or None, got "
                f"{type(value).__name__} {value!r}"
            )
    # a recipe's own block count is no variation; any other is (a grid L16 recipe has 8
    # blocks: num_blocks=4, STUDY_BLOCKS, was taken for "left out" and ignored)
    custom = any(v is not None for v in (task, eval_task, config, shape)) or (
        num_blocks is not None and num_blocks != recipe.num_blocks
    )
    if custom and not recipe.legacy:
        raise ValueError(
            f"{condition!r} is a fixed recipe; to vary it, train 'attnres' or "
            "'vanilla' with task=, config=, shape=, num_blocks="
        )
    if not custom:
        task = recipe.make_task()
        tokenizer = task_tokenizer(task)
        return train(
            recipe.build(seed, tokenizer),
            task,
            recipe.train_config(),
            out_dir,
            tokenizer=tokenizer,
            progress=progress,
            resume=resume,
            description=recipe.description(seed),
        )
    task = study_task() if task is None else task
    config = study_train_config() if config is None else config
    leak = None if eval_task is None else eval_task.leaks_into(task)
    if leak is not None:  # before the model is built; train would name its eval_tasks
        raise ValueError(f"eval_task: {leak}")
    shape = _shape_for(shape, task, eval_task)  # before the model is built
    tokenizer = task_tokenizer(task, *(() if eval_task is None else (eval_task,)))
    model = build_model(recipe.kind, seed, tokenizer, shape, num_blocks)
    description = {
        "condition": recipe.kind,
        "model_seed": seed,
        "shape": shape,
        # a vanilla run's is the recipe's (see Condition.description), never a caller's
        "num_blocks": STUDY_BLOCKS if num_blocks is None else num_blocks,
    }
    return train(
        model,
        task,
        config,
        out_dir,
        tokenizer=tokenizer,
        progress=progress,
        resume=resume,
        description=description,
        eval_tasks=eval_task,
    )
