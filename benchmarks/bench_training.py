"""Training throughput of HookedAttnRes (hooks off) against transformers' Qwen3ForCausalLM.

The study's shape and settings (``hooked_attnres.training.STUDY_SHAPE``: d_model 128,
8 layers, 4 heads x 32 (2 KV heads), d_mlp 256; cumulative layout, 4 blocks; batch 64 of
the study's 41-token retrieval prompts; AdamW, clipping). Each candidate runs full
optimiser steps round-robin in one process; the report is the median step time.

    python benchmarks/bench_training.py [--repeats 20]

Target (issue 4): HookedAttnRes throughput >= 0.75x of Qwen3ForCausalLM.
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, write_result

from hooked_attnres.study import build_model, study_task
from hooked_attnres.tasks import task_tokenizer
from hooked_attnres.training import model_logits


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    task = study_task()
    tokenizer = task_tokenizer(task)
    batch = task.sample(args.batch, seed=0, split="train", vocab=tokenizer.get_vocab())
    models = {
        condition: build_model(condition, 0, tokenizer) for condition in ("vanilla", "attnres")
    }
    times = interleaved_medians(
        {name: step_fn(model, batch) for name, model in models.items()},
        repeats=args.repeats,
        warmup=3,
    )
    throughput = times["vanilla"] / times["attnres"]
    payload = {
        "shape": {"batch": args.batch, "seq": int(batch.tokens.shape[1])},
        "median_step_seconds": times,
        "tokens_per_second": {k: args.batch * batch.tokens.shape[1] / v for k, v in times.items()},
        "attnres throughput / hf throughput": throughput,
        "target": ">= 0.75",
    }
    path = write_result("training", payload)
    for name, seconds in times.items():
        print(f"{name:8s} {seconds * 1e3:8.1f} ms/step")
    print(
        f"HookedAttnRes throughput = {throughput:.2f}x of Qwen3ForCausalLM "
        f"(target >= 0.75x); {path}"
    )


if __name__ == "__main__":
    main()
