"""The per-layer family-ablation sweep: fast path against one full forward per ablation.

4 families x 2 router types x every layer (mask-and-renormalise), on 256 held-out
prompts of its task, on a shipped checkpoint (``--condition``, default the original
``attnres``; or ``--checkpoints``).
The fast path (`hooked_attnres.analysis.run_ablations(fast=True)`) starts each ablated
pass at its first masked sublayer from the clean run's cached depth state; the naive loop
runs ``model.run_with_hooks`` from the tokens for each ablation (also timed over only the
ablations that mask something, a stricter reference). Both run in this process, alternately,
and their results
are compared.

    python benchmarks/bench_sweep.py [--repeats 3] [--prompts 256]

Targets (issue 5): fast >= 3x faster than naive; results equal to <= 1e-5.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import interleaved_medians, write_result

from hooked_attnres.analysis import plan_ablations, run_ablations
from hooked_attnres.study import load_condition, probe_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument(
        "--checkpoints", default=None, help="directory of {condition}_seed{n}/model"
    )
    parser.add_argument(
        "--condition", default="attnres", help="a condition name (hooked-attnres list)"
    )
    args = parser.parse_args()
    model = load_condition(args.condition, 0, args.checkpoints)
    batch = probe_prompts(model, args.prompts)
    plan = plan_ablations(model, groups="layers")
    masking = [a for a in plan if not a.is_noop]
    active = len(masking)
    results = {}

    def sweep(key: str, fast: bool, ablations):
        def run():
            results[key] = run_ablations(
                model,
                batch,
                ablations,
                metrics=("logit_diff", "logprob"),
                fast=fast,
                progress=False,
            )

        return run

    # "naive" runs every ablation of the sweep; "naive_masking_only" (a stricter reference)
    # skips those that mask nothing, which the fast path also skips
    with torch.inference_mode():
        times = interleaved_medians(
            {
                key: sweep(key, fast, ablations)
                for key, fast, ablations in (
                    ("naive", False, plan),
                    ("naive_masking_only", False, masking),
                    ("fast", True, plan),
                )
            },
            repeats=args.repeats,
            warmup=1,
        )
    # (clean, ablated) per-prompt metrics of both paths: the fast path computes its clean
    # run differently too (depth states, logits at the answer position only)
    worst = max(
        float(np.abs(results["fast"][part][m] - results["naive"][part][m]).max())
        for part in (0, 1)
        for m in ("logit_diff", "logprob")
    )
    speedup = times["naive"] / times["fast"]
    strict = times["naive_masking_only"] / times["fast"]
    payload = {
        "prompts": args.prompts,
        "ablations": len(plan),
        "ablations_that_mask_something": active,
        "median_seconds": times,
        "speedup (naive / fast)": speedup,
        "speedup (naive_masking_only / fast)": strict,
        "max_abs_difference": worst,
        "targets": {"speedup": ">= 3", "max_abs_difference": "<= 1e-5"},
    }
    path = write_result("sweep", payload)
    print(f"{len(plan)} ablations ({active} mask something), {args.prompts} prompts")
    print(
        f"naive {times['naive']:.2f} s, fast {times['fast']:.2f} s: {speedup:.2f}x (target >= 3x)"
    )
    print(
        f"naive over the {active} masking ablations only "
        f"{times['naive_masking_only']:.2f} s: {strict:.2f}x"
    )
    print(f"max |fast - naive| = {worst:.2e} (target <= 1e-5); {path}")


if __name__ == "__main__":
    main()
