"""Validate attribution over routing against the exact per-layer ablation sweep.

For every model: the per-layer family-ablation sweep (`ablation_effects(groups="layers")`,
4 families x 2 router types x every layer, plus the final router where there is one) run
exactly and estimated by `attribute_routing` (methods "linear" and "norm"); reported per
method and metric: the Spearman rank correlation of estimate and exact effect over all
cells and over the cells that mask something, the absolute error on the 10 cells with the
largest exact effect, how many of those 10 the estimate also ranks in its top 10, the
cells where the estimate is furthest off, and whether `verify_top(10)` re-runs the cell
with the largest exact effect. Costs are in units of F, one plain forward pass of the same
prompts measured in the same run.

    python benchmarks/validate_attribution.py                       # the shipped checkpoints
    python benchmarks/validate_attribution.py --checkpoints runs    # every runs/*/model
    python benchmarks/validate_attribution.py --model runs/kimi_l16_seed0/model --task induction

A directory whose ``config.json`` is a vanilla Qwen3 (``model_type == "qwen3"``) is loaded
with ``from_hf_qwen3(wrap=--wrap, num_blocks=--num-blocks, recency_bias=--recency-bias)``
(the study's vanilla condition: default the recency wrap with the blocks of the condition
its folder names, ``{condition}_seed{n}/model``, ``n_layers // 2``, else 4;
``--recency-bias`` only with the recency wrap, default 3.0); others with
``from_pretrained`` (``--wrap``, ``--num-blocks`` and ``--recency-bias`` refused when every
model given is one: they would be ignored). The probe prompts come from the task recorded
in the run's ``metrics.json`` (``eval_tasks``), else ``--task``, else the study's retrieval
task: held-out split, data seed 1, like the study.

Writes ``benchmarks/results/attribution_validation.json`` (``--out NAME`` for another name
there, ``--out path.json`` for a file elsewhere) and prints a markdown table for
docs/analysis.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from _common import write_result

from hooked_attnres import HookedAttnRes
from hooked_attnres.analysis import (
    ablation_effects,
    attribute_routing,
    attribution_patch_routing_weights,
    metric_values,
)
from hooked_attnres.analysis.dissociation import _spearman
from hooked_attnres.patching import get_act_patch_routing_weights
from hooked_attnres.study import (
    PROBE_SEED,
    SHIPPED,
    available,
    get_condition,
    run_dir,
    study_task,
)
from hooked_attnres.tasks import TASKS, Task

TOP = 10
MASKED_MASS = 0.9  # verify_top(..., min_masked_mass=) also verifies all-or-nothing cells
# how a vanilla Qwen3 is wrapped when --wrap / --num-blocks are left out (the study's
# vanilla condition: its recipe's blocks, `vanilla_blocks`; 4 for a directory of no
# condition); the flags default to None, so that one given can be told apart
VANILLA_WRAP = "recency"
VANILLA_BLOCKS = 4
# the flags that apply to a vanilla Qwen3 only (from_hf_qwen3's arguments), by attribute
VANILLA_FLAGS = {"wrap": "--wrap", "num_blocks": "--num-blocks", "recency_bias": "--recency-bias"}


def parse_task(text: str) -> Optional[Task]:
    """A task from its repr in metrics.json, e.g. ``KeyValueRetrieval(n_pairs=6, ...)``."""
    try:
        call = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        return None
    classes = {cls.__name__: cls for cls in TASKS.values()}
    if call.func.id not in classes:
        return None
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
    kwargs.pop("name", None)
    return classes[call.func.id](**kwargs)


def task_of(model_dir: Path, task_name: Optional[str]) -> tuple[Task, str]:
    metrics = model_dir.parent / "metrics.json"
    if metrics.exists():
        recorded = json.loads(metrics.read_text()).get("eval_tasks") or []
        if recorded:
            task = parse_task(recorded[0])
            if task is not None:
                return task, f"metrics.json: {recorded[0]}"
    if task_name is not None:
        return TASKS[task_name](), f"--task {task_name} (default knobs)"
    return study_task(), "the study's retrieval task"


def is_vanilla(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a vanilla Qwen3 (loaded with ``from_hf_qwen3``)."""
    return json.loads((model_dir / "config.json").read_text()).get("model_type") == "qwen3"


def vanilla_blocks(model_dir: Path) -> int:
    """The blocks the study's recency wrap reads the vanilla run ``model_dir`` with
    (`load_condition`: its condition's recipe, ``n_layers // 2``, 8 for an
    ``*_vanilla_L16``), the condition named by its folder as the study finds runs
    (``{condition}_seed{n}/model``, `available`); `VANILLA_BLOCKS` for a directory of
    no condition (4 was taken for every run, audit 102)."""
    run = model_dir.parent
    for condition, seeds in available(run.parent).items():
        if any(run_dir(run.parent, condition, seed) == run for seed in seeds):
            return get_condition(condition).num_blocks
    return VANILLA_BLOCKS


def load(model_dir: Path, args) -> tuple[HookedAttnRes, str]:
    if is_vanilla(model_dir):
        # --recency-bias left out: None, the recency wrap's default; given with the exact
        # wrap, which has no bias, from_hf_qwen3 refuses it (it was dropped silently)
        wrap = VANILLA_WRAP if args.wrap is None else args.wrap
        blocks = vanilla_blocks(model_dir) if args.num_blocks is None else args.num_blocks
        model = HookedAttnRes.from_hf_qwen3(
            model_dir, wrap=wrap, num_blocks=blocks, recency_bias=args.recency_bias
        )
        bias = "" if args.recency_bias is None else f", recency_bias={args.recency_bias}"
        how = f"from_hf_qwen3(wrap={wrap!r}, num_blocks={blocks}{bias})"
    else:
        model = HookedAttnRes.from_pretrained(model_dir)
        how = "from_pretrained"
    return model.eval(), how


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def validate(model_dir: Path, args) -> dict:
    model, how = load(model_dir, args)
    task, task_source = task_of(model_dir, args.task)
    batch = task.sample(args.prompts, PROBE_SEED, "test", model.tokenizer.get_vocab())
    routers = ["attn_res", "mlp_res"]
    if model.routing_layout.has_final_router:
        routers.append("final_res")
    metrics = list(args.metrics)
    with torch.inference_mode():
        forward = median_seconds(lambda: model(batch.tokens), 3)
    start = time.perf_counter()
    exact = ablation_effects(
        model,
        batch,
        routers=routers,
        groups="layers",
        metrics=metrics,
        n_bootstrap=200,
        progress=False,
    )
    exact_seconds = time.perf_counter() - start
    results: dict = {
        "model": str(model_dir),
        "loaded_with": how,
        "layout": model.cfg.attnres_layout,
        "n_layers": model.cfg.n_layers,
        "task": task_source,
        "prompts": args.prompts,
        "cells": int(len(exact) / len(metrics)),
        "forward_seconds": forward,
        "exact_sweep_F": exact_seconds / forward,
        "methods": {},
    }
    for method in ("linear", "norm"):
        attribution = None
        seconds = []
        for _ in range(2):  # two runs, the faster counts (the first warms the allocator)
            start = time.perf_counter()
            attribution = attribute_routing(
                model,
                batch,
                metrics,
                routers=routers,
                groups="layers",
                method=method,
                n_bootstrap=200,
                progress=False,
            )
            seconds.append(time.perf_counter() - start)
        assert attribution is not None
        per_metric = {}
        for metric in metrics:
            est = attribution.table[attribution.table.metric == metric].reset_index(drop=True)
            ex = exact[exact.metric == metric].reset_index(drop=True)
            e, x = est.estimate.to_numpy(), ex.effect.to_numpy()
            masking = (ex.n_masked_routers > 0).to_numpy()
            top_exact = np.argsort(-np.abs(x), kind="stable")[:TOP]
            top_est = set(np.argsort(-np.abs(e), kind="stable")[:TOP].tolist())
            verified = attribution.verify_top(TOP, metric=metric)
            guarded = attribution.verify_top(TOP, metric=metric, min_masked_mass=MASKED_MASS)
            worst = np.argsort(-np.abs(e - x), kind="stable")[:3]
            per_metric[metric] = {
                "spearman_all_cells": _spearman(e, x),
                "spearman_masking_cells": _spearman(e[masking], x[masking]),
                "top10_abs_error_mean": float(np.abs(e - x)[top_exact].mean()),
                "top10_abs_error_max": float(np.abs(e - x)[top_exact].max()),
                "top10_recall": len(top_est & set(top_exact.tolist())) / TOP,
                "largest_exact_effect": float(x[top_exact[0]]),
                "verify_top10_catches_largest": bool(
                    np.isclose(np.abs(verified.effect).max(), np.abs(x).max(), rtol=0, atol=1e-9)
                ),
                "verify_top10_max_abs_effect": float(np.abs(verified.effect).max()),
                "verify_top10_masked_mass_catches_largest": bool(
                    np.isclose(np.abs(guarded.effect).max(), np.abs(x).max(), rtol=0, atol=1e-9)
                ),
                "verify_top10_masked_mass_cells": len(guarded),
                "worst_cells": [
                    {
                        "cell": f"{ex.router[i]} {ex.group[i]} {ex.family[i]}",
                        "exact": float(x[i]),
                        "estimate": float(e[i]),
                        "masked_mass": float(attribution.masked_mass[i]),
                    }
                    for i in worst
                ],
            }
        results["methods"][method] = {
            "attribution_F": min(seconds) / forward,
            "metrics": per_metric,
        }
    results["patching"] = validate_patching(model, batch, routers)
    return results


def validate_patching(model: HookedAttnRes, batch, routers: list[str]) -> dict:
    """Clean routing weights patched into the corrupted run, one router at a time:
    `attribution_patch_routing_weights` against `get_act_patch_routing_weights`."""
    with torch.inference_mode():
        _, clean_cache = model.run_with_cache(
            batch.tokens, names_filter=lambda name: name.endswith("hook_weights")
        )
        corrupted = model(batch.corrupted_tokens)

    def patching_metric(logits):  # answer minus contrast: low on the corrupted run
        return metric_values(batch, logits, "logit_diff").mean()

    base = float(patching_metric(corrupted))
    out: dict = {"corrupted_metric": base, "clean_metric": float(clean_metric(model, batch))}
    with torch.inference_mode():
        exact = get_act_patch_routing_weights(
            model, batch.corrupted_tokens, clean_cache, patching_metric, routers
        )
    for method in ("linear", "norm"):
        estimate = attribution_patch_routing_weights(
            model, batch.corrupted_tokens, clean_cache, patching_metric, routers, method=method
        )
        keep = ~exact.isnan()
        x, e = (exact[keep] - base).numpy(), (estimate[keep] - base).numpy()
        top = np.argsort(-np.abs(x), kind="stable")[:TOP]
        out[method] = {
            "spearman": _spearman(e, x),
            "top10_abs_error_max": float(np.abs(e - x)[top].max()),
            "largest_exact_change": float(x[top[0]]),
            "its_estimate": float(e[top[0]]),
        }
    return out


def clean_metric(model: HookedAttnRes, batch) -> float:
    with torch.inference_mode():
        return float(metric_values(batch, model(batch.tokens), "logit_diff").mean())


def markdown(all_results: list[dict]) -> str:
    lines = [
        "| model | method | metric | Spearman (all / masking cells) | top-10 abs error "
        "(mean / max) | top-10 recall | largest exact effect | verify_top(10) catches it | "
        f"also with min_masked_mass={MASKED_MASS} (cells verified) | cost, all metrics |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in all_results:
        name = Path(result["model"]).parent.name
        for method, block in result["methods"].items():
            for metric, m in block["metrics"].items():
                lines.append(
                    f"| {name} | {method} | {metric} | {m['spearman_all_cells']:.2f} / "
                    f"{m['spearman_masking_cells']:.2f} | {m['top10_abs_error_mean']:.3f} / "
                    f"{m['top10_abs_error_max']:.3f} | {m['top10_recall']:.1f} | "
                    f"{m['largest_exact_effect']:.3f} | "
                    f"{'yes' if m['verify_top10_catches_largest'] else '**no**'} | "
                    f"{'yes' if m['verify_top10_masked_mass_catches_largest'] else '**no**'} "
                    f"({m['verify_top10_masked_mass_cells']}) | "
                    f"{block['attribution_F']:.2f} F (exact sweep "
                    f"{result['exact_sweep_F']:.1f} F) |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="*", default=None, help="model directories")
    parser.add_argument("--checkpoints", default=None, help="validate every CHECKPOINTS/*/model")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--metrics", nargs="+", default=["logit_diff", "logprob"])
    parser.add_argument("--task", choices=sorted(TASKS), default=None)
    parser.add_argument(
        "--wrap",
        default=None,
        choices=["recency", "exact"],
        help=f"a vanilla Qwen3's wrap (default {VANILLA_WRAP})",
    )
    parser.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help=(
            "a vanilla Qwen3's AttnRes blocks (default: those the study reads its "
            f"{{condition}}_seed{{n}} run with, n_layers // 2; else {VANILLA_BLOCKS})"
        ),
    )
    parser.add_argument(
        "--recency-bias",
        type=float,
        default=None,
        help="the recency wrap's bias (default 3.0); refused with --wrap exact",
    )
    parser.add_argument(
        "--out",
        default="attribution_validation",
        help="a name under benchmarks/results, or a path ending in .json",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model:
        dirs = [Path(d) for d in args.model]
    elif args.checkpoints:
        dirs = sorted(p.parent for p in Path(args.checkpoints).glob("*/model/config.json"))
    else:
        dirs = [SHIPPED / "attnres_seed0" / "model", SHIPPED / "vanilla_seed0" / "model"]
    if not dirs:
        raise SystemExit(f"no model directories found (looked for {args.checkpoints}/*/model)")
    given = [flag for name, flag in VANILLA_FLAGS.items() if getattr(args, name) is not None]
    if given and not any(is_vanilla(d) for d in dirs):
        # every model is loaded with from_pretrained: the flags would be dropped silently
        flags, one = " and ".join(given), len(given) == 1
        raise ValueError(
            f"{flags} appl{'ies' if one else 'y'} to a vanilla Qwen3 (config.json model_type "
            "'qwen3') loaded with from_hf_qwen3; every model given is a HookedAttnRes "
            "checkpoint, loaded with from_pretrained and the blocks and routers it was saved "
            f"with, which would ignore {'it' if one else 'them'}: leave {flags} out"
        )
    all_results = []
    for model_dir in dirs:
        print(f"validating {model_dir} ...", flush=True)
        all_results.append(validate(model_dir, args))
    table = markdown(all_results)
    print(table)
    for result in all_results:
        for method, block in result["methods"].items():
            for metric, m in block["metrics"].items():
                worst = "; ".join(
                    f"{w['cell']}: exact {w['exact']:.3f}, estimate {w['estimate']:.3f}, "
                    f"masked mass {w['masked_mass']:.2f}"
                    for w in m["worst_cells"]
                )
                print(f"{Path(result['model']).parent.name} {method} {metric} worst: {worst}")
        patching = result["patching"]
        for method in ("linear", "norm"):
            m = patching[method]
            print(
                f"{Path(result['model']).parent.name} patching clean weights into the corrupted "
                f"run (logit_diff {patching['corrupted_metric']:.2f} -> clean "
                f"{patching['clean_metric']:.2f}), {method}: Spearman {m['spearman']:.2f}, "
                f"top-10 max abs error {m['top10_abs_error_max']:.3f}, largest exact change "
                f"{m['largest_exact_change']:.3f} (estimate {m['its_estimate']:.3f})"
            )
    payload = {"results": all_results, "markdown": table}
    if args.out.endswith(".json"):  # a path of its own
        path = Path(args.out)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    else:  # a name under benchmarks/results
        path = write_result(args.out, payload)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
