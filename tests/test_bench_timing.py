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
