"""Forward-pass speed of HookedAttnRes against transformers' Qwen3ForCausalLM.

``--shape small`` (issue 2, the default): d_model 256, 8 layers, 4 heads of 64 (2 KV
heads), d_mlp 768, vocabulary 4096, batch 8, sequence 128, float32, CPU. Targets: layout
"none" <= 1.15x HF; cumulative and kimi (4 blocks) <= 1.35x HF; ``run_with_cache`` with
every hook <= 2.0x the same model's plain forward.

``--shape 0.6b`` (issue 15): the real Qwen3-0.6B configuration (28 layers, d_model 1024,
16 heads x 128, 8 KV heads, d_mlp 3072, vocabulary 151936, tied embeddings) with random
weights; the three wraps of `from_hf_qwen3` (``none``; ``recency`` = cumulative, 8 blocks;
``exact`` = kimi, 8 blocks) against ``Qwen3ForCausalLM`` on the same weights, in float32
and bfloat16, at batch 1 x 256 and 8 x 128: the plain forward, ``run_with_cache`` with
every hook, and ``run_with_cache`` with the routing hooks only (every router's
``hook_logits`` and ``hook_weights``). Targets: forward <= 1.03x HF in every wrap;
routing-only cache <= 1.2x and every-hook cache <= 1.5x the same model's forward. Heavy
(about 4 GB of float32 weights per model, seconds per pass): run it on an idle machine,
one wrap at a time is kept in memory next to the HF model.

Every candidate runs round-robin in one process; the report is the median of
``--repeats`` runs. At the 0.6B shape every timed call follows ``--settle`` (default 1)
untimed calls of itself: the time of a pass there depends on which call ran just before
it (the allocator and page state it leaves), by up to 3 % of a forward / HF ratio, and
settling makes each candidate inherit only its own state (``docs/benchmarks.md``).

    python benchmarks/bench_model.py [--repeats 15]
    python benchmarks/bench_model.py --shape 0.6b [--repeats 3] [--dtypes float32]
        [--batches 1x256] [--wraps recency] [--threads 2]
    python benchmarks/bench_model.py --shape 0.6b --paired --dtypes bfloat16 [--repeats 25]

``--paired`` times the forwards only (HF and every wrap in one round-robin, settled) and
reports, per cell, the median of the per-round ratios forward / HF with a 95 % bootstrap
interval (`paired_ratio`), in ``results/model_forward_qwen3_0.6b_paired_<dtype>.json``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from functools import partial

import torch
from _common import (
    interleaved_medians,
    interleaved_times,
    paired_ratio,
    tensor_bytes,
    write_result,
)
from _shapes import BENCH_BATCH as BATCH
from _shapes import BENCH_SEQ as SEQ
from _shapes import BENCH_SHAPE as SHAPE
from _shapes import QWEN3_06B
from transformers import Qwen3Config, Qwen3ForCausalLM

from hooked_attnres import HookedAttnRes

WRAPS_06B = {"none": "none", "recency": "cumulative, 8 blocks", "exact": "kimi, 8 blocks"}
BATCHES_06B = {"1x256": (1, 256), "8x128": (8, 128)}
TARGETS_06B = {"forward / hf": 1.03, "routing cache / forward": 1.2, "full cache / forward": 1.5}


def routing_hooks(model: HookedAttnRes) -> set[str]:
    """Every router's ``hook_logits`` and ``hook_weights``."""
    return {site.hook(name) for site in model.sites() for name in ("logits", "weights")}


def candidates(hf, model: HookedAttnRes, tokens: torch.Tensor, names: set[str]) -> dict:
    """The timed calls of one wrap: HF, our forward, the two cached runs."""

    def full_cache():
        model.run_with_cache(tokens)[1].cache_dict.clear()

    def routing_cache():
        model.run_with_cache(tokens, names_filter=lambda name: name in names)

    fns = {
        "hf": lambda: hf(tokens, use_cache=False).logits,
        "forward": lambda: model(tokens),
        "full cache": full_cache,
    }
    if names:
        fns["routing cache"] = routing_cache
    return fns


def main_06b(args) -> None:
    """The Qwen3-0.6B shape: three wraps x two dtypes x two batch shapes."""
    torch.manual_seed(0)
    config = Qwen3Config(**QWEN3_06B)
    results: dict = {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        hf = Qwen3ForCausalLM(config).eval().to(dtype)
        for wrap in args.wraps:
            # 8 blocks (the default) for the wraps with blocks; "none" refuses num_blocks
            model = HookedAttnRes.from_hf_qwen3(hf, wrap=wrap, dtype=dtype)
            names = routing_hooks(model)
            for batch_name in args.batches:
                batch, seq = BATCHES_06B[batch_name]
                tokens = torch.randint(0, config.vocab_size, (batch, seq))
                fns = candidates(hf, model, tokens, names)
                with torch.inference_mode():
                    if wrap in ("none", "exact"):  # the function-preserving wraps: same logits
                        gap = model(tokens).float() - hf(tokens, use_cache=False).logits.float()
                        scale = float(hf(tokens, use_cache=False).logits.float().abs().max())
                        print(
                            f"  check {wrap} {dtype_name}: max |logits - HF| = "
                            f"{float(gap.abs().max()):.2e} (max |logit| {scale:.1f})"
                        )
                    times = interleaved_medians(
                        fns, repeats=args.repeats, warmup=args.warmup, settle=args.settle
                    )
                ratios = {"forward / hf": times["forward"] / times["hf"]}
                ratios["full cache / forward"] = times["full cache"] / times["forward"]
                if "routing cache" in times:
                    ratios["routing cache / forward"] = times["routing cache"] / times["forward"]
                key = f"{wrap} ({WRAPS_06B[wrap]}), {dtype_name}, {batch_name}"
                results[key] = {
                    "median_ms": {k: v * 1e3 for k, v in times.items()},
                    "ratios": ratios,
                }
                line = ", ".join(
                    f"{name} {ratio:.3f}x"
                    + ("" if ratio <= TARGETS_06B[name] else f" (OVER {TARGETS_06B[name]}x)")
                    for name, ratio in ratios.items()
                )
                print(f"{key}: HF {times['hf'] * 1e3:.0f} ms; {line}", flush=True)
            del model
            gc.collect()
        del hf
        gc.collect()
    path = write_result(
        "model_forward_qwen3_0.6b",
        {
            "config": QWEN3_06B,
            "repeats": args.repeats,
            "settle": args.settle,
            "threads": torch.get_num_threads(),
            "results": results,
            "targets": TARGETS_06B,
        },
    )
    print(f"  written to {path}")


def main_06b_paired(args) -> None:
    """The Qwen3-0.6B shape, forwards only: per dtype and batch, HF and every wrap's
    forward in one round-robin; per round the ratio forward / HF of that round
    (`paired_ratio`: median and 95 % bootstrap interval). One file per dtype."""
    torch.manual_seed(0)
    config = Qwen3Config(**QWEN3_06B)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        hf = Qwen3ForCausalLM(config).eval().to(dtype)
        models = {
            wrap: HookedAttnRes.from_hf_qwen3(hf, wrap=wrap, dtype=dtype)  # 8 blocks
            for wrap in args.wraps
        }
        results: dict = {}
        for batch_name in args.batches:
            batch, seq = BATCHES_06B[batch_name]
            tokens = torch.randint(0, config.vocab_size, (batch, seq))
            fns = {"hf": partial(hf, tokens, use_cache=False)}
            fns.update({wrap: partial(model, tokens) for wrap, model in models.items()})
            with torch.inference_mode():
                times = interleaved_times(fns, args.repeats, warmup=args.warmup, settle=args.settle)
            for wrap in models:
                ratio = paired_ratio(times[wrap], times["hf"])
                key = f"{wrap} ({WRAPS_06B[wrap]}), {dtype_name}, {batch_name}"
                results[key] = {
                    "forward / hf": ratio,
                    "times_ms": {name: [t * 1e3 for t in times[name]] for name in ("hf", wrap)},
                }
                verdict = "" if ratio["high"] <= TARGETS_06B["forward / hf"] else " (OVER)"
                print(
                    f"{key}: HF median {statistics.median(times['hf']) * 1e3:.0f} ms; "
                    f"forward / HF {ratio['median']:.3f}x "
                    f"[{ratio['low']:.3f}, {ratio['high']:.3f}]{verdict}",
                    flush=True,
                )
        path = write_result(
            f"model_forward_qwen3_0.6b_paired_{dtype_name}",
            {
                "config": QWEN3_06B,
                "rounds": args.repeats,
                "settle": args.settle,
                "threads": torch.get_num_threads(),
                "results": results,
                "target": "95 % interval's upper end <= 1.03x in every cell",
            },
        )
        print(f"  written to {path}")
        del hf, models
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("small", "0.6b"), default="small")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1, help="0.6b: warm-up calls")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="0.6b: forwards only, ratios paired per round with a bootstrap interval",
    )
    parser.add_argument(
        "--settle",
        type=int,
        default=1,
        help="0.6b: untimed calls of a candidate right before each of its timed calls",
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batches", nargs="+", default=list(BATCHES_06B), choices=BATCHES_06B)
    parser.add_argument("--wraps", nargs="+", default=list(WRAPS_06B), choices=WRAPS_06B)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.paired and args.shape != "0.6b":
        parser.error("--paired needs --shape 0.6b")
    if args.shape == "0.6b":
        if args.paired:
            args.repeats = 25 if args.repeats is None else args.repeats
            main_06b_paired(args)
        else:
            args.repeats = 3 if args.repeats is None else args.repeats
            main_06b(args)
        return
    args.repeats = 15 if args.repeats is None else args.repeats
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(**SHAPE)).eval()
    tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ))
    models = {
        "none": HookedAttnRes.from_hf_qwen3(hf, wrap="none"),
        "cumulative": HookedAttnRes.from_hf_qwen3(hf, wrap="recency", num_blocks=4),
        "kimi": HookedAttnRes.from_hf_qwen3(hf, wrap="exact", num_blocks=4),
    }
    fns = {"hf": lambda: hf(tokens, use_cache=False).logits}  # as at the 0.6B shape
    for name, model in models.items():
        fns[name] = lambda model=model: model(tokens)
        fns[f"{name}+cache"] = lambda model=model: model.run_with_cache(tokens)
    with torch.inference_mode():
        times = interleaved_medians(fns, repeats=args.repeats)
        _, cache = models["cumulative"].run_with_cache(tokens)
    total, distinct = tensor_bytes(cache.values())

    ratios = {
        "none / hf": times["none"] / times["hf"],
        "cumulative / hf": times["cumulative"] / times["hf"],
        "kimi / hf": times["kimi"] / times["hf"],
        "none run_with_cache / none forward": times["none+cache"] / times["none"],
        "cumulative run_with_cache / cumulative forward": times["cumulative+cache"]
        / times["cumulative"],
        "kimi run_with_cache / kimi forward": times["kimi+cache"] / times["kimi"],
    }
    targets = {
        "none / hf": 1.15,
        "cumulative / hf": 1.35,
        "kimi / hf": 1.35,
        "none run_with_cache / none forward": 2.0,
        "cumulative run_with_cache / cumulative forward": 2.0,
        "kimi run_with_cache / kimi forward": 2.0,
    }
    print(f"shape: {SHAPE}, batch {BATCH}, seq {SEQ}, float32, {args.repeats} repeats")
    for name, seconds in times.items():
        print(f"  {name:18s} {seconds * 1e3:8.1f} ms")
    for name, ratio in ratios.items():
        verdict = "ok" if ratio <= targets[name] else "OVER TARGET"
        print(f"  {name:48s} {ratio:5.2f}x (target <= {targets[name]}x) {verdict}")
    print(
        f"  full cache (cumulative): {len(cache)} tensors, {total / 2**20:.1f} MiB "
        f"({distinct / 2**20:.1f} MiB distinct storage)"
    )
    path = write_result(
        "model_forward",
        {
            "shape": SHAPE,
            "batch": BATCH,
            "seq": SEQ,
            "repeats": args.repeats,
            "median_ms": {k: v * 1e3 for k, v in times.items()},
            "ratios": ratios,
            "targets": targets,
            "cache_tensors": len(cache),
            "cache_mib": total / 2**20,
            "cache_distinct_mib": distinct / 2**20,
        },
    )
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
