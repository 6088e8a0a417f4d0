"""``generate`` with and without the key-value cache (``use_past_kv_cache``).

Greedy decoding of ``--new`` tokens after a ``--prompt``-token prompt, batch 4, on the
``bench_model.py`` shape (d_model 256, 8 layers, 4 heads of 64, 2 KV heads, d_mlp 768,
vocabulary 4096), layouts ``none`` and ``kimi`` (4 blocks). Without the cache every step
re-runs the whole sequence; with it a step runs the new token only. Both must produce the
same tokens (checked). Medians of ``--repeats`` interleaved rounds.

    python benchmarks/bench_generate.py [--prompt 32] [--new 32] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, write_result
from _shapes import BENCH_SHAPE as SHAPE
from transformers import Qwen3Config, Qwen3ForCausalLM

from hooked_attnres import HookedAttnRes

BATCH = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(**SHAPE)).eval()
    models = {
        "none": HookedAttnRes.from_hf_qwen3(hf, wrap="none"),
        "kimi": HookedAttnRes.from_hf_qwen3(hf, wrap="exact", num_blocks=4),
    }
    prompt = torch.randint(0, SHAPE["vocab_size"], (BATCH, args.prompt))
    options = dict(max_new_tokens=args.new, do_sample=False, stop_at_eos=False, verbose=False)
    fns = {}
    for name, model in models.items():
        cached = model.generate(prompt, use_past_kv_cache=True, **options)
        uncached = model.generate(prompt, use_past_kv_cache=False, **options)
        assert torch.equal(cached, uncached), f"{name}: cached and uncached tokens differ"
        fns[f"{name} cached"] = lambda m=model: m.generate(
            prompt, use_past_kv_cache=True, **options
        )
        fns[f"{name} uncached"] = lambda m=model: m.generate(
            prompt, use_past_kv_cache=False, **options
        )
    times = interleaved_medians(fns, repeats=args.repeats, warmup=1)
    speedups = {name: times[f"{name} uncached"] / times[f"{name} cached"] for name in models}
    print(f"batch {BATCH}, prompt {args.prompt}, {args.new} new tokens, {args.repeats} rounds")
    for name, seconds in times.items():
        print(f"  {name:16s} {seconds * 1e3:8.1f} ms")
    for name, speedup in speedups.items():
        print(f"  {name}: the cache is {speedup:.1f}x faster (same tokens)")
    path = write_result(
        "generate",
        {
            "shape": SHAPE,
            "batch": BATCH,
            "prompt": args.prompt,
            "new_tokens": args.new,
            "repeats": args.repeats,
            "median_ms": {k: v * 1e3 for k, v in times.items()},
            "speedup": speedups,
        },
    )
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
