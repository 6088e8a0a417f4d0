"""``hooked-attnres``: the command line.

    hooked-attnres train --condition both --seeds 0 1 2 --out runs/
    hooked-attnres study [--checkpoints DIR] --out study/
    hooked-attnres info CHECKPOINT_DIR

``train`` writes ``OUT/{condition}_seed{seed}/`` (see `hooked_attnres.training.train`),
resuming any interrupted run in place.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(pairs: Sequence[str], what: str) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--{what} takes key=value pairs, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.replace("-", "_")] = _parse_value(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from hooked_attnres.study import (
        CONDITIONS,
        run_dir,
        study_task,
        study_train_config,
        train_condition,
    )

    conditions = CONDITIONS if args.condition == "both" else (args.condition,)
    config_values = _key_values(args.set, "set")
    if args.steps is not None:
        config_values["steps"] = args.steps
    config = study_train_config(**config_values)
    task = study_task(**_key_values(args.task_arg, "task-arg"))
    results = []
    for seed in args.seeds:
        for condition in conditions:
            out_dir = run_dir(args.out, condition, seed)
            print(f"[hooked-attnres] training {condition} seed {seed} -> {out_dir}", flush=True)
            result = train_condition(
                condition,
                seed,
                out_dir,
                task=task,
                config=config,
                progress=not args.no_progress,
                resume=not args.no_resume,
            )
            results.append(
                {
                    "condition": condition,
                    "seed": seed,
                    "out_dir": str(out_dir),
                    "accuracy": result.final_accuracy,
                    "seconds": round(result.seconds, 1),
                }
            )
            print(
                f"[hooked-attnres] {condition} seed {seed}: held-out accuracy "
                f"{result.final_accuracy} in {result.seconds:.0f} s",
                flush=True,
            )
    summary = Path(args.out) / "train_summary.json"
    summary.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[hooked-attnres] summary: {summary}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from hooked_attnres import HookedAttnRes

    model = HookedAttnRes.from_pretrained(args.checkpoint)
    cfg = model.cfg
    print(
        f"{args.checkpoint}: layout {cfg.attnres_layout}, {cfg.n_layers} layers, "
        f"d_model {cfg.d_model}, {cfg.attnres_num_blocks} blocks, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, "
        f"tokenizer {'yes' if model.tokenizer is not None else 'no'}"
    )
    for layer, router in model.routers():
        print(f"  {router:9s} layer {layer}: {model.source_labels(layer, router)}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from hooked_attnres.study import run_study

    run_study(
        out_dir=args.out,
        checkpoints=args.checkpoints,
        seeds=args.seeds,
        n_prompts=args.prompts,
        n_bootstrap=args.bootstrap,
        progress=not args.no_progress,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooked-attnres", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the study's conditions (or your variant of them)")
    train.add_argument("--condition", choices=["attnres", "vanilla", "both"], default="both")
    train.add_argument("--seeds", type=int, nargs="+", default=[0])
    train.add_argument("--out", default="runs")
    train.add_argument("--steps", type=int, default=None, help="override TrainConfig.steps")
    train.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="TrainConfig fields, e.g. lr=1e-3 batch_size=32",
    )
    train.add_argument(
        "--task-arg",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="KeyValueRetrieval knobs of the task (trained and evaluated), e.g. n_pairs=8",
    )
    train.add_argument("--no-progress", action="store_true")
    train.add_argument(
        "--no-resume", action="store_true", help="start over even if a checkpoint exists"
    )
    train.set_defaults(func=cmd_train)

    study = sub.add_parser("study", help="routing mass vs causal effect on trained checkpoints")
    study.add_argument(
        "--checkpoints",
        default=None,
        help="directory with {condition}_seed{seed}/model (default: the shipped ones)",
    )
    study.add_argument("--seeds", type=int, nargs="+", default=None)
    study.add_argument("--prompts", type=int, default=256)
    study.add_argument("--bootstrap", type=int, default=1000)
    study.add_argument("--out", default="study_out")
    study.add_argument("--no-progress", action="store_true")
    study.set_defaults(func=cmd_study)

    info = sub.add_parser("info", help="describe a checkpoint directory")
    info.add_argument("checkpoint")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from hooked_attnres.runtime import tune_from_environment

    tune_from_environment()  # reuse freed activation memory (HOOKED_ATTNRES_TUNE_MALLOC=0: don't)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
