"""Where the routed forward's extra time goes at the Qwen3-0.6B shape (issue 15).

Two measurements, HF and the wraps round-robin in one process (``docs/benchmarks.md``,
"Session 8"):

1. **Inside the pass**, at the 0.6B shape (random weights, ``--dtype``, 1 x 256): the
   whole pass, and the time spent producing the sublayers' normalised inputs: HF's
   ``Qwen3RMSNorm`` calls on ``d_model`` against HookedAttnRes's `normalized_route`
   (the router, if any, and the norm), and of that the routers' shared committed sums
   (`SharedSums.committed_sum`). Medians over ``--rounds`` rounds, each timed pass
   after one settling pass of itself.
2. **Dispatch**, at width 64 (the 0.6B depth, 28 layers; one token), where the arithmetic
   is negligible: the Python and operator-dispatch cost of a pass.

The timers wrap the functions from outside for this process only (and are removed
afterwards); they add a few microseconds per call to every candidate.

    python benchmarks/profile_routing_06b.py [--rounds 12] [--dtype bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from _common import interleaved_times, write_result
from _shapes import QWEN3_06B
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3 import modeling_qwen3

import hooked_attnres.model.block as block_module
import hooked_attnres.model.hooked_attnres as model_module
from hooked_attnres import HookedAttnRes
from hooked_attnres.model.routing import SharedSums
from hooked_attnres.runtime import tune_from_environment

WRAPS = ("none", "recency", "exact")
WARMUP, SETTLE = 1, 1  # untimed calls of each candidate: at the start, before each timed one
NARROW = {  # width 64, the 0.6B depth
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


@contextmanager
def timed(
    owner: Any,
    name: str,
    seconds: dict[str, float],
    key: str,
    when=None,
    calls: Optional[dict[str, int]] = None,
) -> Iterator[None]:
    """Add the time of every call of ``owner.<name>`` (for which ``when(*args)`` holds, if
    given) to ``seconds[key]`` while the context is open, and count it in ``calls[key]``
    (if given: a timer around a function the model no longer calls would read 0)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        if when is None or when(*args):
            seconds[key] += time.perf_counter() - start
            if calls is not None:
                calls[key] += 1
        return result

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def models(config: Qwen3Config, dtype: torch.dtype) -> tuple[Qwen3ForCausalLM, dict]:
    hf = Qwen3ForCausalLM(config).eval().to(dtype)
    # 8 blocks for the wraps that have blocks ("none" refuses num_blocks)
    wraps = {w: HookedAttnRes.from_hf_qwen3(hf, wrap=w, dtype=dtype) for w in WRAPS}
    return hf, wraps


def in_pass(rounds: int, dtype: torch.dtype) -> dict:
    """``{"ms": medians of the pass and of its parts, "calls_per_pass": timed calls of each
    part in one pass}``, keyed ``"<candidate>: <part>"``."""
    config = Qwen3Config(**QWEN3_06B)
    hf, wraps = models(config, dtype)
    tokens = torch.randint(0, config.vocab_size, (1, 256))
    parts: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    samples: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, int] = {}  # timed calls in one pass, per candidate and part
    d_model = config.hidden_size

    def measured(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> None:
            parts.clear()
            counts.clear()
            start = time.perf_counter()
            fn()
            samples[f"{name}: pass"].append(time.perf_counter() - start)
            for key, value in parts.items():
                samples[f"{name}: {key}"].append(value)
                calls[f"{name}: {key}"] = counts[key]

        return call

    fns = {"hf": measured("hf", lambda: hf(tokens, use_cache=False))}
    fns.update({w: measured(w, lambda m=m: m(tokens)) for w, m in wraps.items()})
    norm_class = modeling_qwen3.Qwen3RMSNorm
    with (
        torch.inference_mode(),
        timed(norm_class, "forward", parts, "inputs", lambda _, x: x.shape[-1] == d_model, counts),
        timed(block_module, "normalized_route", parts, "inputs", calls=counts),
        # before the unembedding
        timed(model_module, "normalized_route", parts, "inputs", calls=counts),
        timed(SharedSums, "committed_sum", parts, "committed sums", calls=counts),
    ):
        interleaved_times(fns, rounds, warmup=WARMUP, settle=SETTLE)
    # every call was recorded: keep the timed ones (after the warm-up, the last of each
    # round's settle + 1 calls)
    timed_calls = slice(WARMUP + SETTLE, None, SETTLE + 1)
    medians = {key: statistics.median(values[timed_calls]) * 1e3 for key, values in samples.items()}
    return {"ms": medians, "calls_per_pass": calls}


def dispatch(rounds: int, dtype: torch.dtype) -> dict:
    """Median ms of a one-token pass at width 64, per candidate."""
    config = Qwen3Config(**{**QWEN3_06B, **NARROW})
    hf, wraps = models(config, dtype)
    tokens = torch.randint(0, config.vocab_size, (1, 1))
    fns = {"hf": lambda: hf(tokens, use_cache=False)}
    fns.update({w: (lambda m=m: m(tokens)) for w, m in wraps.items()})
    with torch.inference_mode():
        times = interleaved_times(fns, rounds, warmup=5, settle=1)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tune_from_environment()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    inside = in_pass(args.rounds, dtype)
    narrow = dispatch(10 * args.rounds, dtype)
    for key, value in inside["ms"].items():
        calls = inside["calls_per_pass"].get(key)
        print(
            f"0.6B 1x256 {args.dtype}, {key}: {value:.2f} ms"
            + ("" if calls is None else f" ({calls} calls)")
        )
    for name, value in narrow.items():
        print(f"width 64, one token, {name}: {value:.2f} ms")
    path = write_result(
        f"profile_routing_qwen3_0.6b_{args.dtype}",
        {
            "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "in_pass_ms": inside["ms"],
            "in_pass_calls": inside["calls_per_pass"],
            "width64_one_token_ms": narrow,
        },
    )
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
