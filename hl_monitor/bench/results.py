"""Result types shared by every bench and the report: a statistic over several runs, cases, benches, a report."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

__all__ = ["BenchResult", "Case", "Report", "Stat", "percentile", "rate_runs", "stat"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


class Stat(msgspec.Struct, frozen=True, kw_only=True):
    """One measured quantity over `runs`: median and spread (min, max, and (max - min) / median in %)."""

    unit: str
    median: float
    min: float
    max: float
    spread_pct: float
    runs: list[float]


def stat(values: Sequence[float], unit: str) -> Stat:
    if not values:
        raise ValueError("a statistic needs at least one run")
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    spread = 0.0 if med == 0 else 100.0 * (hi - lo) / abs(med)
    return Stat(unit=unit, median=med, min=lo, max=hi, spread_pct=round(spread, 1), runs=list(values))


class Case(msgspec.Struct, kw_only=True):
    """One contender of a bench: the subject (`baseline=False`) or a baseline run on the same input."""

    name: str
    baseline: bool = False
    metrics: dict[str, Stat] = msgspec.field(default_factory=dict)
    info: dict[str, Any] = msgspec.field(default_factory=dict)  # facts of the runs (loss checks, sizes)


class BenchResult(msgspec.Struct, kw_only=True):
    name: str
    title: str
    input: str  # what every case ran on
    cases: list[Case] = msgspec.field(default_factory=list)
    targets: dict[str, str] = msgspec.field(default_factory=dict)  # target text → "met" / "missed (…)"
    notes: list[str] = msgspec.field(default_factory=list)
    seconds: float = 0.0


class Report(msgspec.Struct, kw_only=True):
    meta: dict[str, Any]
    benches: list[BenchResult]


def rate_runs(runs: int, items: int, body: Callable[[], object], *, warmup: bool = True) -> list[float]:
    """Items per second of `body` (which processes `items` items), once per run after an untimed warm-up."""
    if warmup:
        body()
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        body()
        elapsed = time.perf_counter() - started
        rates.append(items / elapsed if elapsed > 0 else float("inf"))
    return rates
