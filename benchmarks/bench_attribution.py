"""Attribution over every family x router x layer cell, in units of one forward pass.

On a shipped checkpoint (``--condition``, default ``hard_cumulative_L8``; or
``--checkpoints``) and 256 held-out prompts of its task: the per-layer plan of the sweep
benchmark (4 families x 2 router types x 8 layers = 64 cells),
estimated by `attribute_routing` (one metric, ``method="linear"`` and ``"norm"``), against

* F: one plain forward pass of the same prompts (``model(tokens)`` in inference mode);
* the naive loop: one full ``run_with_hooks`` forward per cell (what a user would write);
* the exact fast sweep: `run_ablations(fast=True)`.

All candidates run round-robin in one process; medians of ``--repeats`` rounds.

    python benchmarks/bench_attribution.py [--repeats 5] [--prompts 256] [--threads 1]

Targets (issue 15): attribution <= 3 F, i.e. >= 20x faster than the naive loop.
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, write_result

from hooked_attnres.analysis import attribute_routing, plan_ablations, run_ablations
from hooked_attnres.study import load_condition, probe_prompts

TARGET_F = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: process time (busy machine)"
    )
    parser.add_argument(
        "--condition", default="hard_cumulative_L8", help="a condition name (hooked-attnres list)"
    )
    parser.add_argument(
        "--checkpoints", default=None, help="directory of {condition}_seed{n}/model"
    )
    parser.add_argument("--no-naive", action="store_true", help="skip the (slow) naive loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_condition(args.condition, 0, args.checkpoints)
    batch = probe_prompts(model, args.prompts)
    plan = plan_ablations(model, groups="layers")

    def forward():
        with torch.inference_mode():
            model(batch.tokens)

    def attribution(method: str):
        def run():
            attribute_routing(
                model,
                batch,
                "logit_diff",
                groups="layers",
                method=method,
                n_bootstrap=1,
                progress=False,
            )

        return run

    def naive():
        with torch.inference_mode():
            for cell in plan:
                model.run_with_hooks(batch.tokens, fwd_hooks=cell.ablation.hooks())

    def fast_sweep():
        run_ablations(model, batch, plan, ("logit_diff",), progress=False)

    fns = {
        "forward (F)": forward,
        "attribution linear": attribution("linear"),
        "attribution norm": attribution("norm"),
        "exact sweep (fast)": fast_sweep,
    }
    if not args.no_naive:
        fns["naive loop"] = naive
    times = interleaved_medians(fns, repeats=args.repeats, warmup=1, clock=args.clock)
    f = times["forward (F)"]
    in_f = {name: seconds / f for name, seconds in times.items()}
    print(
        f"{len(plan)} cells ({sum(not c.is_noop for c in plan)} mask something), "
        f"{args.prompts} prompts, {args.condition}, {torch.get_num_threads()} thread(s)"
    )
    for name, seconds in times.items():
        print(f"  {name:22s} {seconds * 1e3:9.1f} ms = {in_f[name]:6.2f} F")
    linear = in_f["attribution linear"]
    verdict = "ok" if linear <= TARGET_F else "OVER TARGET"
    print(f"attribution (linear) {linear:.2f} F (target <= {TARGET_F} F) {verdict}")
    speedups = {}
    if "naive loop" in times:
        speedups["naive / attribution linear"] = times["naive loop"] / times["attribution linear"]
    speedups["exact fast sweep / attribution linear"] = (
        times["exact sweep (fast)"] / times["attribution linear"]
    )
    for name, value in speedups.items():
        print(f"  {name}: {value:.1f}x" + (" (target >= 20x)" if "naive" in name else ""))
    path = write_result(
        "attribution",
        {
            "condition": args.condition,
            "prompts": args.prompts,
            "cells": len(plan),
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "clock": args.clock,
            "median_seconds": times,
            "in_units_of_F": in_f,
            "speedups": speedups,
            "targets": {"attribution linear": f"<= {TARGET_F} F", "naive / attribution": ">= 20x"},
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
