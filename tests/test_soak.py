"""Issue 10: the soak — a busy day at 20x with the service's memory and queues watched (`hl_monitor.chaos.soak`).

CI runs the real thing for 50 s (service subprocess, MariaDB, nats-server, precise + wide tier, 600 tape
trades/s): warm-up 25 s, then the second half is judged with the short-window bounds (RSS rise ≤ 3 MB over
the 25 s, i.e. a slope bound of 432 MB/h, final RSS ≤ median + 5 %; queues ≤ 1,000 and rising ≤ 20 items; no
backpressure; ≤ 1 loop stall; no reconnect) and exactly once over both tiers. `make soak` runs the hour with
the 10 MB/h bound. The judging functions are tested on synthetic series so each criterion is known to fail
on what it is meant to catch.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hl_monitor.chaos.env import ChaosOptions
from hl_monitor.chaos.scenarios import SCENARIOS, run_scenario
from hl_monitor.chaos.soak import (
    BACKPRESSURE,
    MAX_RSS_SLOPE_MB_H,
    QUEUE_GAUGES,
    QUICK_S,
    SoakSample,
    bounds_for,
    fit_slope,
    judge_memory,
    judge_queues,
)

HOUR = bounds_for(3600)


def series(
    rss: float = 120.0,
    leak_mb_h: float = 0.0,
    queue: dict[str, float] | None = None,
    queue_growth_per_s: dict[str, float] | None = None,
    counters_growth_per_s: dict[str, float] | None = None,
    duration: float = 3600,
    every: float = 5,
) -> list[SoakSample]:
    """A sampled run: RSS with ±1 MB noise plus an optional leak, gauges with noise plus optional growth."""
    rng = random.Random(3)
    out = []
    for i in range(int(duration / every) + 1):
        t = i * every
        gauges = {name: max(0.0, (queue or {}).get(name, 5.0) + rng.uniform(-3, 3)) for name in QUEUE_GAUGES}
        for name, rate in (queue_growth_per_s or {}).items():
            gauges[name] += rate * t
        counters = {name: rate * t for name, rate in (counters_growth_per_s or {}).items()}
        out.append(SoakSample(t, rss + leak_mb_h * t / 3600 + rng.uniform(-1, 1), gauges, counters))
    return out


def test_fit_slope_is_least_squares() -> None:
    assert fit_slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert fit_slope([(0, 5)]) == 0.0


def test_flat_noisy_memory_passes_and_a_slow_leak_fails() -> None:
    assert judge_memory(series(), HOUR).ok
    leak = judge_memory(series(leak_mb_h=3 * MAX_RSS_SLOPE_MB_H), HOUR)
    assert not leak.ok
    assert "MB/h" in leak.detail


def test_final_rss_above_the_median_margin_fails() -> None:
    samples = series()
    samples[-1].rss_mb = 140.0  # +17 % at the end: memory still climbing when the run stopped
    assert not judge_memory(samples, HOUR).ok


def test_short_runs_allow_rss_noise_but_not_a_fast_leak() -> None:
    short = bounds_for(QUICK_S)
    assert short.rss_slope_mb_h > HOUR.rss_slope_mb_h == MAX_RSS_SLOPE_MB_H
    assert judge_memory(series(duration=QUICK_S, every=1), short).ok
    # 10 MB over the 25 s judged: a per-trade leak of ~700 bytes at 600 trades/s.
    assert not judge_memory(series(duration=QUICK_S, every=1, leak_mb_h=1440), short).ok


def test_steady_queues_pass_and_a_growing_outbox_fails() -> None:
    assert all(c.ok for c in judge_queues(series(), HOUR))
    # One signal a minute more than acknowledged: 60 over the judged half hour, far below the 1,000 bound.
    growing = judge_queues(series(queue_growth_per_s={"hl_monitor_outbox_depth": 1 / 60}), HOUR)
    assert not growing[0].ok
    assert "outbox_depth" in growing[0].detail


def test_a_queue_above_its_bound_fails_even_when_flat() -> None:
    assert not judge_queues(series(queue={"hl_monitor_writer_queue_depth": 5_000}), HOUR)[0].ok


def test_backpressure_and_stalls_after_warmup_fail() -> None:
    pressure = judge_queues(series(counters_growth_per_s={BACKPRESSURE[1]: 0.01}), HOUR)
    assert [c.what for c in pressure if not c.ok] == ["no backpressure after warm-up"]
    stalls = judge_queues(series(counters_growth_per_s={"hl_monitor_loop_stalls_total": 0.01}), HOUR)
    assert [c.what for c in stalls if not c.ok] == ["event-loop stalls"]


def test_soak_is_a_registered_chaos_scenario() -> None:
    assert "soak" in SCENARIOS


@pytest.mark.slow
@pytest.mark.mariadb
@pytest.mark.timeout(180)
async def test_busy_day_at_20x_keeps_memory_flat_queues_bounded_and_delivers_exactly_once(
    mariadb_url: str, tmp_path: Path
) -> None:
    opts = ChaosOptions(quick=True, db="mariadb", mysql_url=mariadb_url, soak_s=QUICK_S)
    result = await run_scenario("soak", opts, tmp_path)
    assert result.passed, "\n".join(result.problems())
    assert result.verdict is not None
    assert result.verdict.expected > 0
    judged = {c.what for c in result.checks}
    assert {"memory flat after warm-up", "no growing queue", "both tiers compared"} <= judged
