"""Cost of the key-value cache's model-and-weights check (``KeyValueCache.check_filled_by``).

Every pass given a ``past_kv_cache`` first checks that the model with its current weights
filled it (`WeightsSignature`: one walk over the modules, each parameter's dtype, device,
address and version counter, a weak reference per storage). Timed alone (``--calls``
calls, median of 5 rounds, one thread), next to one one-token cached step (median of 5)
for scale, on a tiny model (4 layers, d_model 32) and at the Qwen3-0.6B shape (random
weights, bfloat16, batch 1, 32 cached positions) in the ``kimi`` (8 blocks) and ``none``
layouts. The first pass on an empty cache records the signature (``mark_filled_by``).

    python benchmarks/bench_kv_check.py [--calls 1000] [--layouts kimi none]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _shapes import QWEN3_06B

from hooked_attnres import HookedAttnRes, HookedAttnResConfig, KeyValueCache
from hooked_attnres.loading.hf_qwen3 import config_from_hf


def per_call(fn, calls: int, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def measure(name: str, model: HookedAttnRes, calls: int) -> None:
    vocab = model.cfg.d_vocab
    cache = KeyValueCache.init_cache(model.cfg)
    with torch.inference_mode():
        model(torch.randint(0, vocab, (1, 32)), past_kv_cache=cache)
        check = per_call(lambda: cache.check_filled_by(model), calls)
        record = per_call(lambda: cache.mark_filled_by(model), max(calls // 5, 1))
        steps = []
        for _ in range(7):
            start = time.perf_counter()
            model(torch.randint(0, vocab, (1, 1)), past_kv_cache=cache)
            steps.append(time.perf_counter() - start)
    step = statistics.median(steps[2:])
    n_params = len(list(model.parameters()))
    print(
        f"{name}: {n_params} parameters; check {check * 1e6:.0f} us per call, "
        f"record {record * 1e6:.0f} us; one-token step {step * 1e3:.1f} ms "
        f"(check = {check / step:.2%} of it)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--layouts", nargs="+", default=["kimi", "none"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tiny = HookedAttnResConfig(
        d_model=32, n_layers=4, n_heads=4, n_key_value_heads=2, d_vocab=50, d_mlp=48, n_ctx=64
    )
    measure("tiny kimi (4 layers, d_model 32, float32)", HookedAttnRes(tiny).eval(), args.calls)
    for layout in args.layouts:
        cfg = config_from_hf(QWEN3_06B, attnres_layout=layout, attnres_num_blocks=8)
        model = HookedAttnRes(cfg).to(torch.bfloat16).eval()
        measure(f"Qwen3-0.6B shape, {layout}, bfloat16", model, args.calls)
        del model


if __name__ == "__main__":
    main()
