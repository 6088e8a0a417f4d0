"""Smoke runs of the scripts in ``benchmarks/`` (not part of the timed suite otherwise), so
that an API change cannot leave one of them broken unnoticed: each runs its own ``main`` at a
tiny shape (the shape constants patched), writes its result file into a temporary directory
(never ``benchmarks/results``), and the ratios it reports are recomputed from the times it
recorded. Timings themselves are not checked. Not run: ``crash_loop.py`` (the catalogue's
crash tests themselves) and ``bench_loading.py``'s child processes (its checkpoint writing
and the load each child times run here, in this process)."""

from __future__ import annotations

import importlib
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# a Qwen3Config of 8 tiny layers in place of the Qwen3-0.6B shape (8 layers: the scripts
# wrap it with 8 blocks); 256 positions for profile_routing_06b's 1 x 256 input
TINY_QWEN3 = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)
TINY_BATCHES = {"1x256": (1, 6), "8x128": (2, 4)}  # the scripts' batch names, tiny shapes
TINY_HOOKED = dict(
    d_model=32, n_layers=4, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=48, n_ctx=64
)


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """``bench(name, *argv)``: the benchmark module ``name`` (imported from ``benchmarks/``,
    without retuning this process's allocator), its result files going to ``tmp_path``;
    ``argv`` becomes its command line. Restores torch's thread count (the scripts set it)."""
    monkeypatch.setenv("HOOKED_ATTNRES_TUNE_MALLOC", "0")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()

    def load(name: str, *argv: str):
        common = importlib.import_module("_common")
        monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
        return importlib.import_module(name)

    yield load
    torch.set_num_threads(threads)


def result(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_bench_model_small(bench, monkeypatch, tmp_path):
    module = bench("bench_model", "--repeats", "1", "--threads", "1")
    shape = {k: v for k, v in TINY_QWEN3.items() if k not in ("rope_theta", "rms_norm_eps")}
    monkeypatch.setattr(module, "SHAPE", shape)
    monkeypatch.setattr(module, "BATCH", 2)
    monkeypatch.setattr(module, "SEQ", 5)
    module.main()
    out = result(tmp_path, "model_forward")
    ms = out["median_ms"]
    assert set(out["ratios"]) == set(out["targets"])
    for layout in ("none", "cumulative", "kimi"):
        assert out["ratios"][f"{layout} / hf"] == pytest.approx(ms[layout] / ms["hf"])
        assert out["ratios"][f"{layout} run_with_cache / {layout} forward"] == pytest.approx(
            ms[f"{layout}+cache"] / ms[layout]
        )
    assert out["cache_tensors"] > 0 and out["cache_distinct_mib"] <= out["cache_mib"]


@pytest.mark.parametrize("paired", [False, True])
def test_bench_model_06b_code_path(bench, monkeypatch, tmp_path, paired):
    argv = ["--shape", "0.6b", "--repeats", "2", "--warmup", "0", "--settle", "0", "--threads", "1"]
    if paired:  # the grid: one dtype and batch (the paired run covers both dtypes and batches)
        argv.append("--paired")
    else:
        argv += ["--dtypes", "bfloat16", "--batches", "8x128"]
    module = bench("bench_model", *argv)
    monkeypatch.setattr(module, "QWEN3_06B", TINY_QWEN3)
    monkeypatch.setattr(module, "BATCHES_06B", TINY_BATCHES)
    # its gc.collect() between models (GBs at the real shape) takes 0.2 s each in pytest
    monkeypatch.setattr(module, "gc", SimpleNamespace(collect=lambda: 0))
    module.main()
    wraps = module.WRAPS_06B
    if not paired:
        cells = result(tmp_path, "model_forward_qwen3_0.6b")["results"]
        assert len(cells) == len(wraps)
        for key, cell in cells.items():
            ms, ratios = cell["median_ms"], cell["ratios"]
            assert ratios["forward / hf"] == pytest.approx(ms["forward"] / ms["hf"])
            assert ratios["full cache / forward"] == pytest.approx(ms["full cache"] / ms["forward"])
            routed = not key.startswith("none ")
            assert ("routing cache / forward" in ratios) == routed, key
            if routed:
                assert ratios["routing cache / forward"] == pytest.approx(
                    ms["routing cache"] / ms["forward"]
                )
        return
    for dtype in ("float32", "bfloat16"):
        cells = result(tmp_path, f"model_forward_qwen3_0.6b_paired_{dtype}")["results"]
        assert len(cells) == len(wraps) * len(TINY_BATCHES)
        for key, cell in cells.items():
            wrap = key.split()[0]
            times = cell["times_ms"]
            assert len(times["hf"]) == len(times[wrap]) == 2
            per_round = [a / b for a, b in zip(times[wrap], times["hf"], strict=True)]
            ratio = cell["forward / hf"]
            assert ratio["median"] == pytest.approx(statistics.median(per_round))
            assert ratio["low"] <= ratio["median"] <= ratio["high"]


def test_bench_kv_check(bench, monkeypatch, capsys):
    module = bench("bench_kv_check", "--calls", "2")
    monkeypatch.setattr(module, "QWEN3_06B", TINY_QWEN3)
    module.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "tiny kimi (4 layers, d_model 32, float32)",
        "Qwen3-0.6B shape, kimi, bfloat16",
        "Qwen3-0.6B shape, none, bfloat16",
    ]
    assert all("us per call" in line and "of it)" in line for line in lines)


def test_bench_generate(bench, monkeypatch, tmp_path):
    module = bench("bench_generate", "--prompt", "3", "--new", "2", "--repeats", "1")
    shape = {k: v for k, v in TINY_QWEN3.items() if k not in ("rope_theta", "rms_norm_eps")}
    monkeypatch.setattr(module, "SHAPE", {**shape, "num_hidden_layers": 4})
    module.main()  # asserts that cached and uncached generation give the same tokens
    out = result(tmp_path, "generate")
    for layout, speedup in out["speedup"].items():
        ms = out["median_ms"]
        assert speedup == pytest.approx(ms[f"{layout} uncached"] / ms[f"{layout} cached"])


def test_bench_training(bench, monkeypatch, tmp_path):
    module = bench("bench_training", "--repeats", "1", "--batch", "2", "--threads", "1")
    monkeypatch.setattr(module, "SHAPES", {"study": (TINY_HOOKED, 2), "0.6b": (TINY_HOOKED, 2)})
    module.main()
    for shape in ("study", "0.6b"):
        out = result(tmp_path, "training")["shapes"][shape]
        seconds = out["median_step_seconds"]
        for layout in module.LAYOUTS:
            assert out["throughput vs hf"][layout] == pytest.approx(seconds["hf"] / seconds[layout])


def test_bench_gpu_without_cuda(bench, monkeypatch, capsys):
    module = bench("bench_gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("bench_gpu: no CUDA device available")


def test_bench_gpu_quick_on_cpu(bench, monkeypatch, capsys):
    argv = ["--device", "cpu", "--quick", "--repeats", "1", "--sections", "forward", "training"]
    module = bench("bench_gpu", *argv)
    monkeypatch.setattr(module, "QWEN3_06B", TINY_QWEN3)
    monkeypatch.setattr(module, "BATCHES_06B", TINY_BATCHES)
    monkeypatch.setattr(module, "SHAPES", {"study": (TINY_HOOKED, 2)})
    module.main()
    out = capsys.readouterr().out
    assert out.count("forward / hf") == len(module.WRAPS_06B) * 2 * len(TINY_BATCHES)
    assert "training study: cumulative" in out


def test_profile_routing_times_the_parts(bench, monkeypatch, tmp_path):
    """The profile wraps library functions by name (`normalized_route`, `SharedSums.
    committed_sum`): if the model stopped calling them, their parts would be missing."""
    module = bench("profile_routing_06b", "--rounds", "1", "--threads", "1")
    monkeypatch.setattr(module, "QWEN3_06B", TINY_QWEN3)
    module.main()
    out = result(tmp_path, "profile_routing_qwen3_0.6b_bfloat16")
    parts, calls = out["in_pass_ms"], out["in_pass_calls"]
    n_inputs = 2 * TINY_QWEN3["num_hidden_layers"] + 1  # ln1, ln2 per layer; ln_final
    for name in ("hf", "none", "recency", "exact"):
        assert calls[f"{name}: inputs"] == n_inputs, name
        assert 0 < parts[f"{name}: inputs"] < parts[f"{name}: pass"]
    for name in ("recency", "exact"):
        assert calls[f"{name}: committed sums"] > 0
        assert 0 < parts[f"{name}: committed sums"] < parts[f"{name}: inputs"]
    assert set(out["width64_one_token_ms"]) == {"hf", "none", "recency", "exact"}


def test_bench_sweep(bench, monkeypatch, tmp_path):
    module = bench("bench_sweep", "--prompts", "2", "--repeats", "1")
    plan_ablations = module.plan_ablations  # the first 12 of 64 cells (8 mask something)
    monkeypatch.setattr(module, "plan_ablations", lambda *a, **k: plan_ablations(*a, **k)[:12])
    module.main()
    out = result(tmp_path, "sweep")
    assert out["ablations"] == 12 and 0 < out["ablations_that_mask_something"] < 12
    seconds = out["median_seconds"]
    assert out["speedup (naive / fast)"] == pytest.approx(seconds["naive"] / seconds["fast"])
    assert out["max_abs_difference"] <= 1e-5


def test_bench_sweep_compares_the_clean_runs_too(bench, monkeypatch, tmp_path):
    """The fast path computes its clean metrics in another way than the naive loop (from
    depth states, logits at the answer only); a difference there was not reported (only the
    ablated rows were compared)."""
    module = bench("bench_sweep", "--prompts", "2", "--repeats", "1")
    plan_ablations, run_ablations = module.plan_ablations, module.run_ablations
    monkeypatch.setattr(module, "plan_ablations", lambda *a, **k: plan_ablations(*a, **k)[:4])

    def clean_off_by_half(*args, fast, **kwargs):
        clean, ablated = run_ablations(*args, fast=fast, **kwargs)
        return ({m: v + 0.5 * fast for m, v in clean.items()}, ablated)

    monkeypatch.setattr(module, "run_ablations", clean_off_by_half)
    module.main()
    # the fast and naive runs also differ by about 1e-6 (float32) on their own
    assert result(tmp_path, "sweep")["max_abs_difference"] == pytest.approx(0.5, abs=1e-4)


def test_bench_attribution(bench, tmp_path):
    bench("bench_attribution", "--prompts", "2", "--repeats", "1", "--no-naive").main()
    out = result(tmp_path, "attribution")
    seconds = out["median_seconds"]
    for name, in_f in out["in_units_of_F"].items():
        assert in_f == pytest.approx(seconds[name] / seconds["forward (F)"])
    assert out["cells"] == 64


def test_bench_tl_bridge_small(bench, tmp_path, capsys):
    bench("bench_tl_bridge", "--small", "--repeats", "1", "--threads", "1").main()
    out = capsys.readouterr().out
    assert out.count("hooked_attnres / bridge:") == 2  # the two --small inputs
    assert not list(tmp_path.iterdir())  # a debugging run writes no result file


def test_validate_attribution(bench, tmp_path, capsys):
    from hooked_attnres.study import SHIPPED

    path = tmp_path / "validation.json"
    model = SHIPPED / "attnres_seed0" / "model"
    argv = ["--model", str(model), "--prompts", "2", "--metrics", "logit_diff"]
    bench("validate_attribution", *argv, "--out", str(path)).main()
    out = json.loads(path.read_text())
    (validated,) = out["results"]
    assert set(validated["methods"]) == {"linear", "norm"} and validated["cells"] == 64
    header, rule, *rows = out["markdown"].splitlines()
    assert len(rows) == 2  # one per method and metric
    for line in (rule, *rows):  # every row has the header's columns
        assert line.count("|") == header.count("|"), line


def test_validate_attribution_refuses_a_bias_the_exact_wrap_would_drop(bench, tmp_path):
    """Audit 84: a vanilla model validated with ``--wrap exact --recency-bias 5`` dropped
    the bias silently (the exact wrap has none; the result named no bias), as
    ``from_hf_qwen3`` did before audit 76; it is passed on now, and refused there."""
    from hooked_attnres.study import SHIPPED

    model = SHIPPED / "vanilla_seed0" / "model"
    argv = ["--model", str(model), "--prompts", "2", "--metrics", "logit_diff"]
    module = bench(
        "validate_attribution", *argv, "--wrap", "exact", "--recency-bias", "5",
        "--out", str(tmp_path / "v.json"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"^recency_bias applies to the recency wrap only; "):
        module.main()
    assert not (tmp_path / "v.json").exists()


def test_validate_attribution_refuses_a_bias_a_checkpoint_would_drop(bench, tmp_path):
    """Audit 88: after f73b542 (``--recency-bias`` default None) a bias given for a
    HookedAttnRes checkpoint, loaded with ``from_pretrained``, was still dropped silently
    (the result said ``from_pretrained``); it is refused, naming the flag, when no model
    given is a vanilla Qwen3 that would use it."""
    from hooked_attnres.study import SHIPPED

    model = SHIPPED / "attnres_seed0" / "model"
    argv = ["--model", str(model), "--prompts", "2", "--metrics", "logit_diff"]
    module = bench(
        "validate_attribution", *argv, "--recency-bias", "5", "--out", str(tmp_path / "v.json")
    )
    with pytest.raises(ValueError, match=r"^--recency-bias applies to a vanilla Qwen3 .* ignore"):
        module.main()
    assert not (tmp_path / "v.json").exists()


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--wrap", "exact"], "--wrap applies"),
        (["--num-blocks", "2"], "--num-blocks applies"),
        (["--wrap", "exact", "--num-blocks", "2"], "--wrap and --num-blocks apply"),
    ],
)
def test_validate_attribution_refuses_a_wrap_a_checkpoint_would_drop(bench, tmp_path, flags, named):
    """Audit 95: ``--wrap`` and ``--num-blocks`` (defaults ``recency`` and 4) given for
    HookedAttnRes checkpoints only were dropped silently (``--wrap exact --num-blocks 2``
    validated the shipped cumulative model of 4 blocks, loaded with ``from_pretrained``);
    refused by name now, as ``--recency-bias`` is (before any model is loaded)."""
    from hooked_attnres.study import SHIPPED

    model = SHIPPED / "attnres_seed0" / "model"
    argv = ["--model", str(model), "--prompts", "2", "--metrics", "logit_diff", *flags]
    module = bench("validate_attribution", *argv, "--out", str(tmp_path / "v.json"))
    with pytest.raises(ValueError, match=rf"^{named} to a vanilla Qwen3 .* from_pretrained"):
        module.main()
    assert not (tmp_path / "v.json").exists()


def test_bench_loading_child_loads(bench, tmp_path, capsys):
    """The timed load of each kind, in this process (the script runs it in children)."""
    module = bench("bench_loading")
    module.write_checkpoint(tmp_path, TINY_QWEN3)
    for kind in module.KINDS:
        module.child(kind, str(tmp_path), "float32", "none", threads=1)
    loads = [json.loads(line) for line in capsys.readouterr().out.splitlines()[-3:]]
    hf = sum(p.numel() for p in Qwen3ForCausalLM(Qwen3Config(**TINY_QWEN3)).parameters())
    assert [load["params"] for load in loads] == [hf] * 3


def test_bench_loading_refuses_a_checkpoint_of_another_shape(bench, tmp_path):
    """A --dir written before at another shape (e.g. by ``--scale small``) was reused
    silently, and its loads reported under the scale asked for."""
    module = bench("bench_loading")
    module.write_checkpoint(tmp_path, TINY_QWEN3)
    module.write_checkpoint(tmp_path, TINY_QWEN3)  # the same shape: reused
    with pytest.raises(SystemExit, match=r"another shape .*'num_hidden_layers': \(8, 4\)"):
        module.write_checkpoint(tmp_path, {**TINY_QWEN3, "num_hidden_layers": 4})


@pytest.mark.parametrize(
    "argv, message",
    [
        # crashed in statistics.median after every load had run
        (["--repeats", "0"], "--repeats must be 1 or more, got 0"),
        # each child failed in torch.set_num_threads(0), its reason in captured stderr
        (["--threads", "0"], "--threads must be 1 or more, got 0"),
    ],
)
def test_bench_loading_refuses_counts_below_one(
    bench, monkeypatch, tmp_path, capsys, argv, message
):
    module = bench("bench_loading", "--dir", str(tmp_path / "never"), *argv)
    monkeypatch.setattr(module, "SHAPE", TINY_QWEN3)  # were it not refused: a tiny file
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # refused before the checkpoint is written


@pytest.mark.parametrize("condition", ["hard_vanilla_L16", "hard_vanilla_L8", "vanilla", None])
def test_validate_attribution_reads_a_vanilla_run_with_the_studys_blocks(
    bench, condition, tmp_path
):
    """Audit 102: a vanilla Qwen3 run was read through the recency wrap with 4 blocks
    whatever its condition, said to be "the study's vanilla condition"; the study reads an
    ``*_vanilla_L16`` run with its recipe's ``n_layers // 2`` = 8 blocks (`load_condition`),
    so the script validated another routing than the study's (16 layers: 4 blocks of 4
    layers, where the study has 8 of 2; here 6 layers, 3 blocks of 2 against 6 of 1). The
    condition its folder names decides now, as in the study; a directory of no condition
    keeps 4 blocks; a flag given still decides."""
    from helpers import hf_qwen3

    from hooked_attnres import HookedAttnRes
    from hooked_attnres.study import get_condition, load_condition

    runs = tmp_path / "runs"
    model_dir = runs / (f"{condition}_seed0" if condition else "mine") / "model"
    hf_qwen3(num_hidden_layers=6).save_pretrained(model_dir)
    module = bench("validate_attribution", "--model", str(model_dir))
    args = SimpleNamespace(wrap=None, num_blocks=None, recency_bias=None)
    model, how = module.load(model_dir, args)
    if condition is None:
        blocks = 4
        study = HookedAttnRes.from_hf_qwen3(model_dir, wrap="recency", num_blocks=4)
    else:
        blocks = get_condition(condition).n_layers // 2
        study = load_condition(condition, 0, checkpoints=runs)
    assert model.routing_layout == study.routing_layout
    assert model.cfg.attnres_num_blocks == study.cfg.attnres_num_blocks == min(blocks, 6)
    assert f"num_blocks={blocks})" in how
    given = SimpleNamespace(wrap=None, num_blocks=3, recency_bias=None)
    assert module.load(model_dir, given)[0].cfg.attnres_num_blocks == 3
