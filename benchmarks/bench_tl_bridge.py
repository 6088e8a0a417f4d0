"""``run_with_cache`` with every hook: HookedAttnRes (layout ``none``) against
TransformerLens 4.x ``TransformerBridge`` on the same weights.

Both load the same random Qwen3 directory (written once to a temporary directory,
booted offline); each caches every hook it has (the default ``run_with_cache``). The
candidates run round-robin in one process; the report is the median of ``--repeats``
rounds. Model shape (as ``bench_model.py``): d_model 256, 8 layers, 4 heads of 64 (2 KV
heads), d_mlp 768, vocabulary 4096, float32, CPU. Inputs (fixed before measuring): one
32-token prompt (an interpretability prompt such as IOI's), 1 x 128, 8 x 32 and the
forward benchmark's 8 x 128.

    python benchmarks/bench_tl_bridge.py [--repeats 15] [--threads 2] [--small]

Target (issue 12): HookedAttnRes <= 0.8x the Bridge's time. ``--small`` (2 layers,
two input shapes) is for checking the script, not for numbers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _common import interleaved_medians, write_result
from _shapes import BENCH_BATCH as BATCH
from _shapes import BENCH_SEQ as SEQ
from _shapes import BENCH_SHAPE as SHAPE
from transformers import Qwen3Config, Qwen3ForCausalLM

from hooked_attnres import HookedAttnRes

TARGET = 0.8


# (batch, sequence) of every measured input, fixed before any measurement
INPUTS = ((1, 32), (1, 128), (8, 32), (BATCH, SEQ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--small", action="store_true", help="a tiny shape to debug the script")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from transformer_lens.model_bridge import TransformerBridge

    shape, inputs = dict(SHAPE), INPUTS
    if args.small:
        shape.update(num_hidden_layers=2, vocab_size=512)
        inputs = ((1, 8), (2, 32))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        Qwen3ForCausalLM(Qwen3Config(**shape)).eval().save_pretrained(directory)
        bridge = TransformerBridge.boot_transformers(directory, device="cpu")
        model = HookedAttnRes.from_hf_qwen3(directory, wrap="none")
    bridge.eval()
    print(f"shape: {shape}, float32, {args.repeats} rounds")
    rows = []
    for batch, seq in inputs:
        tokens = torch.randint(0, shape["vocab_size"], (batch, seq))
        with torch.no_grad():
            bridge_logits, bridge_cache = bridge.run_with_cache(tokens)
            logits, cache = model.run_with_cache(tokens)
            max_diff = (bridge_logits - logits).abs().max().item()
            n_bridge, n_ours = len(bridge_cache), len(cache)
            del bridge_cache, cache
            times = interleaved_medians(
                {
                    "bridge run_with_cache": partial(bridge.run_with_cache, tokens),
                    "hooked_attnres run_with_cache": partial(model.run_with_cache, tokens),
                },
                repeats=args.repeats,
            )
        ratio = times["hooked_attnres run_with_cache"] / times["bridge run_with_cache"]
        verdict = "ok" if ratio <= TARGET else "OVER TARGET"
        print(
            f"  input {batch} x {seq}: logits agree to {max_diff:.1e}; cached tensors: "
            f"bridge {n_bridge}, ours {n_ours}"
        )
        for name, seconds in times.items():
            print(f"    {name:32s} {seconds * 1e3:8.1f} ms")
        print(f"    hooked_attnres / bridge: {ratio:.2f}x (target <= {TARGET}x) {verdict}")
        rows.append(
            {
                "batch": batch,
                "seq": seq,
                "median_ms": {k: v * 1e3 for k, v in times.items()},
                "ratio": ratio,
                "max_logit_difference": max_diff,
                "cached_tensors": {"bridge": n_bridge, "hooked_attnres": n_ours},
            }
        )
    if args.small:
        return  # a debugging run: no result file
    path = write_result(
        "tl_bridge",
        {"shape": shape, "repeats": args.repeats, "target": TARGET, "inputs": rows},
    )
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
