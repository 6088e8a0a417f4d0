"""Forward-pass speed of HookedAttnRes against transformers' Qwen3ForCausalLM.

Shape (issue 2): d_model 256, 8 layers, 4 heads of 64 (2 KV heads), d_mlp 768,
vocabulary 4096, batch 8, sequence 128, float32, CPU. Every candidate runs
round-robin in one process; the report is the median of ``--repeats`` runs.

    python benchmarks/bench_model.py [--repeats 15]

Targets: layout "none" <= 1.15x HF; cumulative and kimi (4 blocks) <= 1.35x HF;
``run_with_cache`` with every hook <= 2.0x the same model's plain forward.
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, tensor_bytes, write_result
from transformers import Qwen3Config, Qwen3ForCausalLM

from hooked_attnres import HookedAttnRes

SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
)
BATCH, SEQ = 8, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(**SHAPE)).eval()
    tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ))
    models = {
        "none": HookedAttnRes.from_hf_qwen3(hf, wrap="none"),
        "cumulative": HookedAttnRes.from_hf_qwen3(hf, wrap="recency", num_blocks=4),
        "kimi": HookedAttnRes.from_hf_qwen3(hf, wrap="exact", num_blocks=4),
    }
    fns = {"hf": lambda: hf(tokens).logits}
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
