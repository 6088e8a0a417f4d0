"""Training throughput of HookedAttnRes (hooks off) against transformers' Qwen3ForCausalLM.

Two shapes, each with batches of the study's retrieval prompts (64 prompts, 15 tokens):

* ``study``: the study's shape (``hooked_attnres.study.STUDY_SHAPE``: d_model 128,
  8 layers, 4 heads x 32 (2 KV heads), d_mlp 256), 4 blocks;
* ``0.6b``: Qwen3-0.6B's layer shape with 4 layers (d_model 1024, 16 heads x 128, 8 KV
  heads, d_mlp 3072), 2 blocks (the task's small vocabulary, so that the layers dominate).

Routed layouts: ``cumulative`` (the study's AttnRes condition) and ``kimi``; ``none`` is
the same code without routers. One full optimiser step each (forward, backward, clipping,
AdamW), round-robin in one process; the report is the median step time.

    python benchmarks/bench_training.py [--repeats 20] [--shapes study 0.6b] [--threads 1]

Target (issue 15): every routed layout >= 0.9x the throughput of Qwen3ForCausalLM.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from _common import interleaved_medians, write_result

from hooked_attnres import HookedAttnRes
from hooked_attnres.study import STUDY_SHAPE, build_model, study_task
from hooked_attnres.tasks import task_tokenizer
from hooked_attnres.training import model_logits

SHAPES = {
    "study": (dict(STUDY_SHAPE), 4),
    "0.6b": (
        dict(
            d_model=1024,
            n_layers=4,
            n_heads=16,
            n_key_value_heads=8,
            d_head=128,
            d_mlp=3072,
            n_ctx=64,
            rotary_base=1_000_000.0,
        ),
        2,
    ),
}
LAYOUTS = ("cumulative", "kimi", "none")
TARGET = 0.9


def step_fn(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        loss = batch.loss(model_logits(model, batch.tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def models_for(shape: dict, num_blocks: int, tokenizer) -> dict:
    hf = build_model("vanilla", 0, tokenizer, shape)
    cumulative = build_model("attnres", 0, tokenizer, shape, num_blocks)
    models = {"hf": hf, "cumulative": cumulative}
    for layout in LAYOUTS[1:]:
        cfg = dataclasses.replace(cumulative.cfg, attnres_layout=layout)
        models[layout] = HookedAttnRes(cfg, tokenizer=tokenizer)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: process time (busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = study_task()
    tokenizer = task_tokenizer(task)
    batch = task.sample(args.batch, seed=0, split="train", vocab=tokenizer.get_vocab())
    tokens = args.batch * batch.tokens.shape[1]
    payload: dict = {
        "batch": args.batch,
        "seq": int(batch.tokens.shape[1]),
        "clock": args.clock,
        "shapes": {},
    }
    for name in args.shapes:
        shape, num_blocks = SHAPES[name]
        models = models_for(shape, num_blocks, tokenizer)
        repeats = args.repeats if name == "study" else max(5, args.repeats // 3)
        times = interleaved_medians(
            {key: step_fn(model, batch) for key, model in models.items()},
            repeats=repeats,
            warmup=2,
            clock=args.clock,
        )
        ratios = {key: times["hf"] / times[key] for key in LAYOUTS}
        payload["shapes"][name] = {
            "shape": shape,
            "num_blocks": num_blocks,
            "repeats": repeats,
            "median_step_seconds": times,
            "tokens_per_second": {key: tokens / seconds for key, seconds in times.items()},
            "throughput vs hf": ratios,
            "target": f">= {TARGET} (routed layouts)",
        }
        print(f"{name}: {shape}, {num_blocks} blocks, {repeats} interleaved steps")
        for key, seconds in times.items():
            ratio = "" if key == "hf" else f"  {ratios[key]:.3f}x HF throughput"
            verdict = (
                ""
                if key in ("hf", "none")
                else ("  ok" if ratios[key] >= TARGET else "  BELOW TARGET")
            )
            print(f"  {key:10s} {seconds * 1e3:9.1f} ms/step{ratio}{verdict}")
        del models
    path = write_result("training", payload)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
