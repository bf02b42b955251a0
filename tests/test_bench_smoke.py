"""The benchmark code runs end to end on tiny sizes and writes well-formed results. Never asserts timings."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import msgspec
import pytest

from hl_monitor.bench.e2e import percentile
from hl_monitor.bench.loopsteps import SLOW_STEP_NS, LoopSteps
from hl_monitor.bench.report import JSON_NAME, MARKDOWN_NAME
from hl_monitor.bench.results import Report, stat
from hl_monitor.bench.runner import SMOKE, run_all
from hl_monitor.cli import build_parser

EXPECTED_BENCHES = {"decode", "engine", "tape", "memory", "discovery", "e2e_throughput", "e2e_latency"}
# The curves and the cascade start a service process per point: their own smoke test, with a longer timeout.
CORE = frozenset({"decode", "engine", "tape", "memory", "discovery", "e2e"})
CURVES = {"curve_tape_rate", "curve_wide_addresses", "curve_precise_streams"}


async def test_smoke_run_writes_every_bench_with_baselines_and_zero_loss(tmp_path: Path, mariadb_url: str) -> None:
    await run_all(tmp_path, SMOKE, mysql_url=mariadb_url, require_mariadb=True, only=CORE)

    report = msgspec.json.decode((tmp_path / JSON_NAME).read_bytes(), type=Report)
    assert {b.name for b in report.benches} == EXPECTED_BENCHES
    for key in ("commit", "machine", "packages", "nats_server", "mariadb", "sqlite", "python"):
        assert report.meta[key], key
    assert report.meta["mariadb"] != "unreachable"
    for bench in report.benches:
        assert bench.cases, bench.name
        if bench.name not in ("memory", "e2e_latency"):
            assert any(c.baseline for c in bench.cases), f"{bench.name} has no baseline"
            assert not bench.cases[0].baseline, f"{bench.name}: the first case is the subject"
        for case in bench.cases:
            assert case.metrics, case.name
            for name, s in case.metrics.items():
                assert math.isfinite(s.median), (bench.name, case.name, name)
                assert s.median > 0, (bench.name, case.name, name)
                assert s.min <= s.median <= s.max
                assert len(s.runs) >= 1
    by_name = {b.name: b for b in report.benches}
    e2e = by_name["e2e_throughput"]
    assert [c.name for c in e2e.cases] == [
        "MariaDB, JetStream publish with ack",
        "SQLite, JetStream publish with ack",
        "MariaDB, core NATS publish (no ack)",
    ]
    for case in [*e2e.cases, *by_name["e2e_latency"].cases]:
        assert case.info["zero_loss_all_runs"] is True, case.info["loss_checks"]
        for check in case.info["loss_checks"]:
            assert check["orders_without_signal"] == 0
            assert check["fills_processed"] == check["fills_sent"] > 0
            assert check["duplicate_fills"] == 0
    latency = by_name["e2e_latency"].cases[0]
    for key in ("loop_step_p99_ms", "loop_step_p999_ms", "loop_step_max_ms", "loop_step_cpu_p99_ms",
                "loop_step_cpu_max_ms", "bare_publish_p99_ms", "p99_over_bare_publish_p99", "gc_tracked_after_run",
                "gc_full_collect_after_run_ms"):  # fmt: skip
        assert key in latency.metrics, key
    [steps] = latency.info["loop_steps"]
    assert steps["steps"] > 0
    assert steps["p99_ms"] <= steps["p999_ms"] <= steps["max_ms"]
    [census] = latency.info["gc_census"]
    assert census["tracked_total"] == sum(census["tracked"]) > 0
    assert census["frozen"] > 0  # the service froze its start-up objects
    assert census["top_types"]
    assert all(count > 0 for _, count in census["top_types"])
    tape = by_name["tape"]
    assert [c.info["matched_trades"] > 0 for c in tape.cases if "matched_trades" in c.info] == [True, True]
    assert e2e.targets
    assert by_name["engine"].targets
    assert tape.targets
    assert by_name["e2e_latency"].targets

    markdown = (tmp_path / MARKDOWN_NAME).read_text()
    assert report.meta["commit"] in markdown
    for bench in report.benches:
        assert bench.title in markdown
        for case in bench.cases:
            assert case.name in markdown


@pytest.mark.timeout(180)
async def test_smoke_curves_have_every_point_and_the_cascade_every_signal_once(
    tmp_path: Path, mariadb_url: str
) -> None:
    await run_all(tmp_path, SMOKE, mysql_url=mariadb_url, require_mariadb=True, only=frozenset({"curves", "cascade"}))

    report = msgspec.json.decode((tmp_path / JSON_NAME).read_bytes(), type=Report)
    by_name = {b.name: b for b in report.benches}
    assert set(by_name) == {*CURVES, "cascade"}
    for name in CURVES:
        curve = by_name[name]
        assert len(curve.cases) == 2, name  # SMOKE's two points
        for case in curve.cases:
            for key, s in case.metrics.items():
                assert math.isfinite(s.median), (name, case.name, key)
                assert s.median > 0, (name, case.name, key)
        assert curve.notes, name
    rates = [c.metrics["achieved_trades_per_s"].median for c in by_name["curve_tape_rate"].cases]
    assert rates[0] < rates[1]
    assert all(c.info["zero_loss"] for c in by_name["curve_precise_streams"].cases)
    [cascade] = by_name["cascade"].cases
    assert cascade.info["exactly_once"]["ok"], cascade.info["exactly_once"]
    assert cascade.info["not_ready_samples"] == 0
    assert cascade.info["backpressure_after"] == cascade.info["backpressure_before"]
    assert "precise_p99_ms" in cascade.metrics
    assert "tape_p99_ms" in cascade.metrics
    markdown = (tmp_path / MARKDOWN_NAME).read_text()
    for bench in report.benches:
        assert bench.title in markdown


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0


async def test_loop_steps_time_every_callback_and_name_the_task_of_a_long_one() -> None:
    steps = LoopSteps()

    async def hog() -> None:
        started = time.thread_time_ns()
        while time.thread_time_ns() - started <= 2 * SLOW_STEP_NS:  # one step that uses CPU past the budget
            pass

    original = asyncio.Handle._run
    steps.install()
    try:
        await asyncio.create_task(hog())
    finally:
        steps.uninstall()
    summary = steps.summary()
    assert summary.steps >= 1
    assert summary.cpu_over_budget >= 1
    assert [entry["name"] for entry in summary.slowest] == [f"task {hog.__qualname__}"]
    assert asyncio.Handle._run is original
    await asyncio.sleep(0)  # the step that uninstalled is still recorded when it ends
    count = len(steps.durations_ns)
    await asyncio.sleep(0)
    assert len(steps.durations_ns) == count  # nothing recorded once uninstalled


def test_stat_reports_median_and_spread_of_the_runs() -> None:
    s = stat([90.0, 100.0, 110.0], "fills/s")
    assert (s.median, s.min, s.max, s.spread_pct) == (100.0, 90.0, 110.0, 20.0)
    with pytest.raises(ValueError, match="at least one run"):
        stat([], "fills/s")


def test_bench_subcommand_is_registered() -> None:
    args = build_parser().parse_args(["bench", "--smoke", "--out", "x", "--only", "decode", "engine", "cascade"])
    assert args.smoke
    assert args.only == ["decode", "engine", "cascade"]
    assert args.out == Path("x")
    assert callable(args.handler)
