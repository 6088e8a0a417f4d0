"""The benchmarks' timing helper (``benchmarks/_common.py``): the order in which it calls
the candidates, since a timed call's speed depends on the call just before it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


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
