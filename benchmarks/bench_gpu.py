"""The benchmark comparisons on a GPU: forward and cached runs at the Qwen3-0.6B shape,
training throughput, attribution in units of one forward pass, and the exact sweep.

    python benchmarks/bench_gpu.py [--repeats 10] [--quick]

Without CUDA it prints one line and exits with code 0. ``--device cpu --quick`` runs the
same code on the CPU at a small scale (a smoke test of this script, not a measurement).

Each section mirrors a CPU benchmark (same candidates, same targets): ``bench_model.py
--shape 0.6b``, ``bench_training.py``, ``bench_attribution.py``. Timings synchronise the
device after every call; candidates run round-robin in one process.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import interleaved_medians, write_result
from bench_model import BATCHES_06B, QWEN3_06B, TARGETS_06B, WRAPS_06B, candidates, routing_hooks
from bench_training import LAYOUTS, SHAPES, TARGET, models_for, step_fn
from transformers import Qwen3Config, Qwen3ForCausalLM

from hooked_attnres import HookedAttnRes
from hooked_attnres.analysis import attribute_routing, plan_ablations, run_ablations
from hooked_attnres.study import load_condition, probe_prompts, study_task
from hooked_attnres.tasks import task_tokenizer


def synchronised(fns: dict, device: torch.device) -> dict:
    """Each call followed by a device synchronisation (kernels run asynchronously)."""

    def wrap(fn):
        def run():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return run

    return {name: wrap(fn) for name, fn in fns.items()}


def forward_section(args, device: torch.device) -> dict:
    config = dict(QWEN3_06B)
    if args.quick:
        config.update(num_hidden_layers=4, vocab_size=4096)
    results = {}
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        hf = Qwen3ForCausalLM(Qwen3Config(**config)).eval().to(device, dtype)
        for wrap in WRAPS_06B:
            # 8 blocks (the default) for the wraps with blocks; "none" refuses num_blocks
            model = HookedAttnRes.from_hf_qwen3(hf, wrap=wrap, dtype=dtype, device=device)
            for batch_name, (batch, seq) in BATCHES_06B.items():
                tokens = torch.randint(0, config["vocab_size"], (batch, seq), device=device)
                fns = synchronised(candidates(hf, model, tokens, routing_hooks(model)), device)
                with torch.inference_mode():
                    times = interleaved_medians(fns, repeats=args.repeats, warmup=2)
                ratios = {"forward / hf": times["forward"] / times["hf"]}
                ratios["full cache / forward"] = times["full cache"] / times["forward"]
                if "routing cache" in times:
                    ratios["routing cache / forward"] = times["routing cache"] / times["forward"]
                key = f"{wrap} ({WRAPS_06B[wrap]}), {dtype_name}, {batch_name}"
                results[key] = {"median_ms": {k: v * 1e3 for k, v in times.items()}, **ratios}
                print(
                    f"{key}: "
                    + ", ".join(
                        f"{name} {value:.3f}x"
                        + ("" if value <= TARGETS_06B[name] else " (OVER TARGET)")
                        for name, value in ratios.items()
                    ),
                    flush=True,
                )
            del model
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def training_section(args, device: torch.device) -> dict:
    task = study_task()
    tokenizer = task_tokenizer(task)
    batch = task.sample(64, seed=0, split="train", vocab=tokenizer.get_vocab()).to(device)
    results = {}
    for name, (shape, num_blocks) in SHAPES.items():
        if args.quick and name != "study":
            continue
        models = {k: m.to(device) for k, m in models_for(shape, num_blocks, tokenizer).items()}
        fns = synchronised({k: step_fn(m, batch) for k, m in models.items()}, device)
        times = interleaved_medians(fns, repeats=args.repeats, warmup=3)
        ratios = {layout: times["hf"] / times[layout] for layout in LAYOUTS}
        results[name] = {"median_ms": {k: v * 1e3 for k, v in times.items()}, **ratios}
        print(
            f"training {name}: "
            + ", ".join(f"{k} {v:.3f}x HF" for k, v in ratios.items())
            + f" (target >= {TARGET} for cumulative and kimi)",
            flush=True,
        )
        del models
    return results


def attribution_section(args, device: torch.device) -> dict:
    model = load_condition("attnres").to(device)
    batch = probe_prompts(model, 64 if args.quick else 256).to(device)
    plan = plan_ablations(model, groups="layers")

    def forward():
        with torch.inference_mode():
            model(batch.tokens)

    def attribution():
        attribute_routing(model, batch, groups="layers", n_bootstrap=1, progress=False)

    def sweep():
        run_ablations(model, batch, plan, ("logit_diff",), progress=False)

    fns = synchronised(
        {"forward (F)": forward, "attribution": attribution, "exact sweep": sweep}, device
    )
    times = interleaved_medians(fns, repeats=args.repeats, warmup=2)
    in_f = {k: v / times["forward (F)"] for k, v in times.items()}
    print(
        f"attribution {in_f['attribution']:.2f} F (target <= 3 F); exact sweep "
        f"{in_f['exact sweep']:.1f} F",
        flush=True,
    )
    return {"median_ms": {k: v * 1e3 for k, v in times.items()}, "in_units_of_F": in_f}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["forward", "training", "attribution"],
        choices=["forward", "training", "attribution"],
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available (torch.cuda.is_available() is False); skipped")
        sys.exit(0)
    sections = {
        "forward": forward_section,
        "training": training_section,
        "attribution": attribution_section,
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; {args.repeats} interleaved rounds", flush=True)
    results = {section: sections[section](args, device) for section in args.sections}
    if not args.quick:
        path = write_result("gpu", {"device": name, "repeats": args.repeats, **results})
        print(f"written to {path}")


if __name__ == "__main__":
    main()
