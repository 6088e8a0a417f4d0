"""Loading a Qwen3-0.6B-shaped checkpoint: ``from_hf_qwen3`` vs ``transformers``.

The benchmark writes a randomly initialised checkpoint of the Qwen3-0.6B shape once
(``benchmarks/.cache/qwen3-0.6b-random``, bfloat16, one safetensors file, about 1.2 GB),
then loads it in fresh child processes, alternating:

* ``transformers``: ``Qwen3ForCausalLM.from_pretrained(dir, dtype=...)``;
* ``hooked_attnres``: ``HookedAttnRes.from_hf_qwen3(dir, wrap=..., dtype=...)`` (the
  default: weights copied, so later changes to the file cannot reach the model);
* ``hooked_attnres_mmap``: the same with ``mmap=True`` (weights memory-mapped, as
  ``transformers`` does).

Each child reports the wall time of the load call and its peak RSS above the RSS it had
after imports. Targets: time <= 1.0x of transformers in bfloat16 (the file's dtype) and
<= 1.2x in float32; peak RSS <= 1.3x. ``--scale small`` uses a 4-layer, 32k-vocabulary
checkpoint of the same width (for a quick check on a busy machine).

    python benchmarks/bench_loading.py [--repeats 3] [--dtype bfloat16] [--wrap recency]
        [--scale full|small] [--dir DIR] [--threads 2]

A ``--dir`` that already holds a checkpoint of another shape is refused (it was reused
silently before, and its loads reported under the asked-for scale).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _shapes import QWEN3_06B as SHAPE

CACHE = Path(__file__).parent / ".cache" / "qwen3-0.6b-random"
SMALL = dict(num_hidden_layers=4, vocab_size=32_000)
KINDS = ("transformers", "hooked_attnres", "hooked_attnres_mmap")


def write_checkpoint(directory: Path, shape: dict) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if (directory / "config.json").exists():  # written before: reuse it if it has this shape
        written = json.loads((directory / "config.json").read_text())
        differ = {k: (written[k], v) for k, v in shape.items() if k in written and written[k] != v}
        if differ:
            raise SystemExit(
                f"{directory} holds a checkpoint of another shape (written, wanted: {differ}); "
                "pass another --dir or remove it"
            )
        return
    print(f"writing a random Qwen3-0.6B-shaped checkpoint to {directory} (once)")
    config = Qwen3Config(**shape)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.tie_weights()  # to_empty unties the embedding and lm_head
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(directory)


def child(kind: str, directory: str, dtype: str, wrap: str, threads: int = 2) -> None:
    import resource

    import torch

    def rss_mb() -> float:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    torch.set_num_threads(threads)
    if kind == "transformers":
        from transformers import Qwen3ForCausalLM

        def load():
            return Qwen3ForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    else:
        from hooked_attnres import HookedAttnRes

        mmap = kind == "hooked_attnres_mmap"

        def load():
            return HookedAttnRes.from_hf_qwen3(directory, wrap=wrap, dtype=dtype, mmap=mmap)

    before = rss_mb()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_params = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_before_mb": before,
                "peak_rss_mb": peak,
                "peak_above_imports_mb": peak - before,
                "params": n_params,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--wrap", default="recency", choices=["recency", "exact", "none"])
    parser.add_argument("--scale", default="full", choices=["full", "small"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each load")
    parser.add_argument("--child", choices=list(KINDS))
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    for name in ("repeats", "threads"):  # (each child failed in torch.set_num_threads(0))
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be 1 or more, got {getattr(args, name)}")
    shape = SHAPE if args.scale == "full" else {**SHAPE, **SMALL}
    directory = args.dir or str(CACHE if args.scale == "full" else CACHE.with_name("qwen3-small"))
    if args.child:
        child(args.child, directory, args.dtype, args.wrap, args.threads)
        return
    write_checkpoint(Path(directory), shape)
    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for run in range(args.repeats + 1):  # the first round warms the page cache
        for kind in results:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    kind,
                    "--dir",
                    directory,
                    "--dtype",
                    args.dtype,
                    "--wrap",
                    args.wrap,
                    "--threads",
                    str(args.threads),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            if run > 0:
                results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    for kind, runs in results.items():
        summary[kind] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "peak_above_imports_mb": statistics.median(r["peak_above_imports_mb"] for r in runs),
            "params": runs[0]["params"],
        }
        print(
            f"  {kind:15s} load {summary[kind]['seconds']:6.2f} s, peak RSS above imports "
            f"{summary[kind]['peak_above_imports_mb']:7.0f} MiB, "
            f"{summary[kind]['params'] / 1e6:.0f}M params"
        )
    ratios = {}
    for kind in KINDS[1:]:
        ratios[kind] = {
            "time": summary[kind]["seconds"] / summary["transformers"]["seconds"],
            "rss": summary[kind]["peak_above_imports_mb"]
            / summary["transformers"]["peak_above_imports_mb"],
        }
        print(
            f"  {kind}: time ratio {ratios[kind]['time']:.2f}x, peak RSS ratio "
            f"{ratios[kind]['rss']:.2f}x"
        )
    print(
        f"  (targets: time <= {1.0 if args.dtype == 'bfloat16' else 1.2}x, RSS <= 1.3x); "
        f"dtype {args.dtype}, wrap {args.wrap}, scale {args.scale}, {args.repeats} repeats"
    )
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_result

    write_result(
        f"loading_{args.dtype}" + ("" if args.scale == "full" else f"_{args.scale}"),
        {
            "shape": shape,
            "dtype": args.dtype,
            "wrap": args.wrap,
            "repeats": args.repeats,
            "threads": args.threads,
            "summary": summary,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
