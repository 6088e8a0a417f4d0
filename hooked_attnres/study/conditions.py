"""The study's two conditions, ready to train: a Block AttnRes Qwen3 and a vanilla Qwen3.

Both have the same shape (``STUDY_SHAPE``) and are trained on the same task
(``study_task()``) with the same optimiser settings (``study_train_config()``); the
AttnRes model uses the cumulative layout with ``STUDY_BLOCKS`` blocks (the layout of the
public checkpoints and of the seed paper's wrapped baseline). The vanilla model is a
``transformers.Qwen3ForCausalLM`` saved with ``save_pretrained``, so the recency wrap
loads it like any Hugging Face checkpoint::

    HookedAttnRes.from_hf_qwen3(out_dir / "model", wrap="recency", num_blocks=STUDY_BLOCKS)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import torch

from hooked_attnres.config import HookedAttnResConfig
from hooked_attnres.model.hooked_attnres import HookedAttnRes
from hooked_attnres.tasks import KeyValueRetrieval, Task, task_tokenizer
from hooked_attnres.training.trainer import TrainConfig, TrainResult, train

CONDITIONS = ("attnres", "vanilla")
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


def check_conditions(conditions) -> None:
    """Raise ``ValueError`` for a condition name that is not one of `CONDITIONS`."""
    for condition in conditions:
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")


def study_task(**overrides) -> KeyValueRetrieval:
    """The study's retrieval probe (one query per prompt, nothing leaks)."""
    values: dict[str, Any] = dict(
        n_pairs=6, n_keys=16, n_values=16, n_distractors=0, n_filler_words=8, n_queries=1
    )
    values.update(overrides)
    return KeyValueRetrieval(**values)


def study_train_config(**overrides) -> TrainConfig:
    """The study's optimiser settings: 1200 steps of 64 prompts, peak lr 5e-4 (the vanilla
    model does not learn the probe at 1e-3), 100 warm-up steps."""
    values: dict[str, Any] = dict(
        steps=1200,
        batch_size=64,
        lr=5e-4,
        warmup_steps=100,
        eval_every=200,
        eval_size=512,
        checkpoint_every=200,
    )
    values.update(overrides)
    return TrainConfig(**values)


def build_model(
    condition: str,
    seed: int,
    tokenizer,
    shape: Optional[dict] = None,
    num_blocks: int = STUDY_BLOCKS,
):
    """A freshly initialised model of a condition (weights a function of ``seed``)."""
    check_conditions([condition])
    shape = dict(STUDY_SHAPE if shape is None else shape)
    vocab = len(tokenizer)
    if condition == "attnres":
        cfg = HookedAttnResConfig(
            d_vocab=vocab,
            attnres_layout="cumulative",
            attnres_num_blocks=num_blocks,
            attnres_recency_bias=0.0,
            seed=seed,
            **shape,
        )
        return HookedAttnRes(cfg, tokenizer=tokenizer)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=shape["d_model"],
        intermediate_size=shape["d_mlp"],
        num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_key_value_heads"],
        head_dim=shape["d_head"],
        max_position_embeddings=shape["n_ctx"],
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": shape["rotary_base"]},
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
        # the same scheme as HookedAttnRes.init_weights: stream writers get a smaller std
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    param.normal_(
                        0.0, config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
                    )
    return model


def train_condition(
    condition: str,
    seed: int,
    out_dir: Union[str, Path],
    task: Optional[Task] = None,
    eval_task: Optional[Task] = None,
    config: Optional[TrainConfig] = None,
    shape: Optional[dict] = None,
    num_blocks: int = STUDY_BLOCKS,
    progress: bool = True,
    resume: bool = True,
) -> TrainResult:
    """Train one condition with one model seed (the data seed is ``config.data_seed``).

    The default arguments produce the study's checkpoints (trained and evaluated on
    `study_task`, single-query prompts: multi-query training lets a model answer by
    exclusion); ``out_dir/model`` holds the trained model and
    ``out_dir/metrics.json`` its held-out accuracy and history.
    """
    task = study_task() if task is None else task
    config = study_train_config() if config is None else config
    tokenizer = task_tokenizer(task, *(() if eval_task is None else (eval_task,)))
    model = build_model(condition, seed, tokenizer, shape, num_blocks)
    description = {
        "condition": condition,
        "model_seed": seed,
        "shape": shape or STUDY_SHAPE,
        "num_blocks": num_blocks,
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
