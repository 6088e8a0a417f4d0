"""The benchmarks' timing helper (``benchmarks/_common.py``): the order in which it calls
the candidates, since a timed call's speed depends on the call just before it."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
PAIRED_RUNS = sorted((BENCHMARKS / "results").glob("model_forward_qwen3_0.6b_paired_*.json"))


@pytest.fixture(scope="module")
def common():
    mp = pytest.MonkeyPatch()
    mp.setenv("HOOKED_ATTNRES_TUNE_MALLOC", "0")  # do not retune this test process
    spec = importlib.util.spec_from_file_location("_bench_common", BENCHMARKS / "_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mp.undo()
    return module


def recorded(order: list[str]) -> dict:
    def make(name: str):
        return lambda: order.append(name)

    return {"a": make("a"), "b": make("b")}


def test_plain_round_robin(common):
    order: list[str] = []
    times = common.interleaved_medians(recorded(order), repeats=2, warmup=1)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_settle_puts_each_timed_call_after_a_call_of_itself(common):
    order: list[str] = []
    marks: list[int] = []  # how many calls had run at each clock read

    def clock() -> float:
        marks.append(len(order))
        return float(len(marks))

    common.CLOCKS["test"] = clock
    try:
        common.interleaved_medians(recorded(order), repeats=2, warmup=1, clock="test", settle=1)
    finally:
        del common.CLOCKS["test"]
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2
    starts, stops = marks[0::2], marks[1::2]
    assert [stop - start for start, stop in zip(starts, stops, strict=True)] == [
        1
    ] * 4  # one call timed
    timed = [order[start] for start in starts]
    assert timed == ["a", "b", "a", "b"]
    assert all(order[start - 1] == order[start] for start in starts)


def test_settle_must_not_be_negative(common):
    with pytest.raises(ValueError, match="settle must be 0 or more, got -1"):
        common.interleaved_medians(recorded([]), repeats=1, settle=-1)


def test_interleaved_times_keeps_every_round(common):
    order: list[str] = []
    times = common.interleaved_times(recorded(order), rounds=3, warmup=0, settle=0)
    assert order == ["a", "b"] * 3
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="rounds must be 1 or more, got 0"):
        common.interleaved_times(recorded([]), rounds=0)


def test_paired_ratio_pairs_rounds(common):
    # a drift that scales both candidates alike leaves every paired ratio at 1.02
    hf = [1.0, 2.0, 1.5, 3.0, 1.2]
    forward = [1.02 * t for t in hf]
    result = common.paired_ratio(forward, hf)
    assert result["median"] == pytest.approx(1.02)
    assert result["low"] == pytest.approx(1.02) and result["high"] == pytest.approx(1.02)
    assert result["rounds"] == 5


def test_paired_ratio_interval(common):
    ratios = [1.0, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06]
    result = common.paired_ratio(ratios, [1.0] * len(ratios), resamples=500, seed=3)
    assert result["median"] == pytest.approx(1.03)
    assert 1.0 <= result["low"] <= result["median"] <= result["high"] <= 1.06
    assert result["low"] < result["high"]  # resampling seven different ratios varies
    # the same seed gives the same interval
    assert common.paired_ratio(ratios, [1.0] * len(ratios), resamples=500, seed=3) == result


def test_paired_ratio_bad_input(common):
    with pytest.raises(ValueError, match="equally long, non-empty lists, got 2 and 1"):
        common.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="got 0 and 0"):
        common.paired_ratio([], [])


def bootstrap_median_quantile(values: list[float], q: float) -> float:
    """The q-quantile of the median of ``len(values)`` (odd) draws with replacement from
    ``values``, with infinitely many resamples: a resample's median is at most the j-th
    smallest value exactly when at least (n + 1) / 2 of its n draws are, a binomial count
    with probability j / n per draw (distinct values)."""
    x = sorted(values)
    n, half = len(x), (len(x) + 1) // 2
    assert n % 2 == 1 and len(set(x)) == n
    for j in range(1, n + 1):
        p = j / n
        cdf = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(half, n + 1))
        if cdf >= q:
            return x[j - 1]
    raise AssertionError("unreachable")


def test_paired_ratio_is_the_percentile_bootstrap_of_the_median(common):
    # many resamples: the interval is the exact bootstrap's 2.5 % and 97.5 % points (for 25
    # rounds the 8th and 18th smallest ratios, the order-statistic interval of a median);
    # the Monte Carlo error of 20000 resamples is a quarter of the gap to the next ratio
    rng = random.Random(11)
    hf = [rng.uniform(400.0, 600.0) for _ in range(25)]
    forward = [t * rng.uniform(0.97, 1.06) for t in hf]
    ratios = [a / b for a, b in zip(forward, hf, strict=True)]
    result = common.paired_ratio(forward, hf, resamples=20000, seed=1)
    assert result["low"] == bootstrap_median_quantile(ratios, 0.025)
    assert result["high"] == bootstrap_median_quantile(ratios, 0.975)
    assert result["median"] == sorted(ratios)[12]


def test_stored_paired_runs_recompute_from_their_rounds(common):
    """Every stored paired run: each cell's ratios are the wrap's time over HF's time of the
    same round (one HF series per batch, shared by the wraps of that round-robin), and the
    stored median and interval recompute from those rounds."""
    assert PAIRED_RUNS
    for path in PAIRED_RUNS:
        run = json.loads(path.read_text())
        hf_by_batch: dict[str, list[float]] = {}
        for key, cell in run["results"].items():
            wrap, batch = key.split()[0], key.rsplit(", ", 1)[1]
            times = cell["times_ms"]
            assert set(times) == {"hf", wrap}, path.name
            assert len(times["hf"]) == len(times[wrap]) == run["rounds"] == 25, path.name
            assert hf_by_batch.setdefault(batch, times["hf"]) == times["hf"], path.name
            ratios = sorted(a / b for a, b in zip(times[wrap], times["hf"], strict=True))
            stored = cell["forward / hf"]
            assert stored["median"] == pytest.approx(ratios[12], rel=1e-12), (path.name, key)
            # 2000 resamples: one order statistic inside the exact bootstrap's ends at most
            # (for 25 rounds those are the 8th and 18th smallest ratios)
            low = min(range(25), key=lambda i: abs(ratios[i] - stored["low"]))
            high = min(range(25), key=lambda i: abs(ratios[i] - stored["high"]))
            assert (low + 1, high + 1) in {(8, 18), (9, 18), (8, 17), (9, 17)}, (path.name, key)
            again = common.paired_ratio(times[wrap], times["hf"])
            assert again == pytest.approx(stored, rel=1e-12), (path.name, key)


def test_docs_quote_the_preregistered_paired_runs():
    """The session 10 and 11 tables of docs/benchmarks.md (the issue-15 verdict): every
    cell's median and 95 % interval, and HF's median times, against the stored rounds."""
    text = DOCS.read_text()
    columns = [(w, b) for b in ("1x256", "8x128") for w in ("none", "recency", "exact")]
    quoted = re.compile(r"([\d.]+)x \[([\d.]+), \**([\d.]+)\**\]")
    for session, heading in (("s10", "**Session 10: in-place"), ("s11", "**Session 11: the")):
        section = text[text.index(heading) :]
        for number in (1, 2, 3):
            row = re.search(rf"^\| paired bf16, {number} \|(.*)$", section, re.M)
            assert row is not None, (session, number)
            cells = [c.strip() for c in row.group(1).split("|") if c.strip()]
            assert len(cells) == 7
            name = f"model_forward_qwen3_0.6b_paired_bfloat16_{session}_run{number}.json"
            run = json.loads((BENCHMARKS / "results" / name).read_text())["results"]
            hf_quoted = [float(v) for v in re.findall(r"\d+", cells[0])]
            for (wrap, batch), cell in zip(columns, cells[1:], strict=True):
                (key,) = [k for k in run if k.startswith(f"{wrap} ") and k.endswith(batch)]
                times = run[key]["times_ms"]
                ratios = sorted(a / b for a, b in zip(times[wrap], times["hf"], strict=True))
                stored = run[key]["forward / hf"]
                match = quoted.search(cell)
                assert match is not None, cell
                doc = [float(v) for v in match.groups()]
                quoted_values = (ratios[12], stored["low"], stored["high"])
                for shown, value in zip(doc, quoted_values, strict=True):
                    assert abs(shown - value) <= 5e-4 + 1e-12, (session, number, wrap, batch)
                hf = sorted(times["hf"])[12]
                assert abs(hf_quoted[columns.index((wrap, batch)) // 3] - hf) <= 0.5 + 1e-9
