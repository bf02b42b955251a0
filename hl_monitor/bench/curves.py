"""Cost curves of the real service (README "Benchmarks"): how CPU and memory grow with the load, point by point.

- tape rate: CPU share and RSS of the service against the tape's rate (crowd trades of every coin from the sim,
  `Exchange.crowd_trades`) with 10,000 watched wide addresses;
- wide addresses: RSS against the number of watched wide addresses (their rows in `hlm_addresses`, taken by
  the planner and the tape tracker), under a calm tape;
- precise streams: the precise tier's frame sent → signal built p99 against the number of precise streams,
  at one total fill rate spread over them.

Every point is a fresh process (`python -m hl_monitor.bench.curves '<point JSON>'`, printing one JSON line), so
RSS is the service's alone and no point inherits another's heap. Each runs `bench.scaled.ScaledPipeline` (the
service with its default config on SQLite, embedded NATS, the sim in its own process); CPU is the service
process's own (event loop and writer thread; not nats-server's, not the sim's), over a window after a warm-up.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from hl_monitor.bench.e2e import PipelineOptions
from hl_monitor.bench.results import BenchResult, Case, Stat, percentile, stat
from hl_monitor.bench.scaled import ScaledPipeline, cpu_seconds
from hl_monitor.config import Config
from hl_monitor.logging import configure_logging

__all__ = ["CURVES_FULL", "CURVES_SMOKE", "CurveSizes", "bench_curves", "measure_point"]

MIB: Final = 1024 * 1024
POINT_TIMEOUT_S: Final = 600.0  # a point that takes this long has hung (300k addresses start in well under it)
# Per-IP limits of the sim and the service for the precise-streams curve: 32 user streams need 4 of the
# exchange's IPs (10 users each); one sim with raised limits stands in for several, each stream its own
# connection either way.
MANY_STREAMS_LIMITS: Final = {"max_connections": 64, "max_users": 40, "max_new_connections_per_minute": 200}
FILLS_PER_ORDER: Final = 4  # as the latency bench
WIDE_ADDRESS_BASE: Final = 0xD1DE << 144  # wide addresses of the curves: apart from whales and counterparties


@dataclass(frozen=True, slots=True)
class CurveSizes:
    tape_rates: tuple[int, ...]  # trades/s
    tape_watched: int
    tape_warm_s: float
    tape_seconds: float  # measured window per point
    address_counts: tuple[int, ...]
    address_tape_rate: float  # trades/s while the RSS is read
    address_seconds: float
    precise_streams: tuple[int, ...]
    precise_rate: float  # fills/s over all streams
    precise_seconds: float


CURVES_FULL: Final = CurveSizes(
    tape_rates=(500, 2_000, 10_000, 30_000),
    tape_watched=10_000,
    tape_warm_s=2.0,
    tape_seconds=6.0,
    address_counts=(1_000, 10_000, 100_000, 300_000),
    address_tape_rate=500.0,
    address_seconds=3.0,
    precise_streams=(1, 8, 32),
    precise_rate=2_000.0,
    precise_seconds=6.0,
)

CURVES_SMOKE: Final = CurveSizes(
    tape_rates=(200, 1_000),
    tape_watched=300,
    tape_warm_s=0.3,
    tape_seconds=0.7,
    address_counts=(300, 3_000),
    address_tape_rate=100.0,
    address_seconds=0.3,
    precise_streams=(1, 2),
    precise_rate=200.0,
    precise_seconds=0.5,
)


def wide_addresses(n: int) -> list[str]:
    return [f"0x{WIDE_ADDRESS_BASE + i:040x}" for i in range(n)]


def _with_max_addresses(n: int) -> Callable[[Config], Config]:
    def tune(cfg: Config) -> Config:
        wide = msgspec.structs.replace(cfg.wide, max_addresses=max(cfg.wide.max_addresses, n))
        return msgspec.structs.replace(cfg, wide=wide)

    return tune


def _with_streams(n: int) -> Callable[[Config], Config]:
    def tune(cfg: Config) -> Config:
        hl = msgspec.structs.replace(
            cfg.hyperliquid,
            user_slots=n,
            max_connections=MANY_STREAMS_LIMITS["max_connections"],
            max_users=MANY_STREAMS_LIMITS["max_users"],
            max_new_connections_per_minute=MANY_STREAMS_LIMITS["max_new_connections_per_minute"],
        )
        return msgspec.structs.replace(cfg, hyperliquid=hl)

    return tune


def _crowd(rate: float, seconds: float) -> dict[str, Any]:
    """A sim `cascade` command with nobody but the crowd: the tape of every coin at `rate` trades/s."""
    plan = {"whales": 0, "wide": 0, "movers": 0, "seconds": seconds, "surge": 1, "calm_tape": rate}
    return {"cmd": "cascade", "plan": plan}


async def _tape_point(watched: int, rate: float, warm_s: float, seconds: float) -> dict[str, Any]:
    """CPU share and RSS with `watched` wide addresses while the tape runs at `rate` trades/s."""
    pipe = ScaledPipeline(
        PipelineOptions("sqlite", "", True, 0), wide=wide_addresses(watched), tune=_with_max_addresses(watched)
    )
    async with pipe:
        tape = asyncio.create_task(pipe.request(_crowd(rate, warm_s + seconds)))
        await asyncio.sleep(warm_s)
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1, wall1 = cpu_seconds(), time.perf_counter()
        rss = pipe.rss()
        record = await tape
        return {
            "cpu_share": (cpu1 - cpu0) / (wall1 - wall0),
            "rss_bytes": rss,
            "achieved_trades_per_s": record["crowd_trades"] / record["elapsed_s"],
            "startup_s": pipe.startup_s,
        }


async def _precise_point(streams: int, rate: float, seconds: float) -> dict[str, Any]:
    """Frame sent → signal built with `streams` precise streams sharing `rate` fills/s."""
    sim_limits = dict(MANY_STREAMS_LIMITS)
    pipe = ScaledPipeline(PipelineOptions("sqlite", "", True, streams), sim=sim_limits, tune=_with_streams(streams))
    async with pipe:
        orders = max(streams, round(rate * seconds / FILLS_PER_ORDER))
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        run = await pipe.load(orders=orders, fills_per_order=FILLS_PER_ORDER, rate=rate, seed=streams)
        cpu1, wall1 = cpu_seconds(), time.perf_counter()
        return {
            "p50_sent_to_signal_ms": percentile(run.detect_ms, 50),
            "p99_sent_to_signal_ms": percentile(run.detect_ms, 99),
            "p99_sent_to_ack_ms": percentile(run.latencies_ms, 99),
            "achieved_fills_per_s": run.fills_per_s,
            "cpu_share": (cpu1 - cpu0) / (wall1 - wall0),
            "rss_bytes": pipe.rss(),
            "zero_loss": run.zero_loss,
            "startup_s": pipe.startup_s,
        }


async def measure_point(point: dict[str, Any]) -> dict[str, Any]:
    kind = point["kind"]
    if kind == "tape":
        return await _tape_point(point["watched"], point["rate"], point["warm_s"], point["seconds"])
    if kind == "precise":
        return await _precise_point(point["streams"], point["rate"], point["seconds"])
    raise ValueError(f"unknown curve point kind {kind!r}")


def _run_point(point: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "hl_monitor.bench.curves", msgspec.json.encode(point).decode()],
        capture_output=True,
        text=True,
        check=False,
        timeout=POINT_TIMEOUT_S,
    )
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"curve point {point} failed (exit {out.returncode}): {out.stderr[-2000:]}")
    answer: dict[str, Any] = msgspec.json.decode(lines[-1])
    return answer


def _one(value: float, unit: str) -> Stat:
    return stat([value], unit)


def _slopes(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """The rise per unit of x between neighbouring points."""
    return [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]


def _tape_curve(sizes: CurveSizes) -> BenchResult:
    started = time.perf_counter()
    result = BenchResult(
        name="curve_tape_rate",
        title=f"Cost curve: CPU and RSS of the service against the tape's rate ({sizes.tape_watched:,} wide addresses)",
        input=(
            f"crowd trades of every coin at each rate for {sizes.tape_warm_s:g} s of warm-up + {sizes.tape_seconds:g} "
            f"s measured; {sizes.tape_watched:,} watched wide addresses (none of them trading); a fresh service "
            "process per point, SQLite"
        ),
    )
    xs, cpu = [], []
    for rate in sizes.tape_rates:
        p = _run_point(
            {
                "kind": "tape",
                "watched": sizes.tape_watched,
                "rate": rate,
                "warm_s": sizes.tape_warm_s,
                "seconds": sizes.tape_seconds,
            }
        )
        xs.append(p["achieved_trades_per_s"])
        cpu.append(p["cpu_share"])
        result.cases.append(
            Case(
                name=f"{rate:,} trades/s",
                metrics={
                    "cpu_share": _one(p["cpu_share"], "share"),
                    "rss_mib": _one(p["rss_bytes"] / MIB, "MiB"),
                    "achieved_trades_per_s": _one(p["achieved_trades_per_s"], "trades/s"),
                },
                info=p,
            )
        )
    per_k = [1000 * s for s in _slopes(xs, cpu)]
    result.notes.append(
        "CPU share is the service process's CPU seconds per wall second (1.0 = one core). Marginal CPU per 1,000 "
        "trades/s between neighbouring points: " + ", ".join(f"{s:.3f}" for s in per_k) + " (a rising value is "
        "the curve bending up; a falling one, per-frame costs amortised over more trades per frame)."
    )
    result.seconds = time.perf_counter() - started
    return result


def _address_curve(sizes: CurveSizes) -> BenchResult:
    started = time.perf_counter()
    result = BenchResult(
        name="curve_wide_addresses",
        title="Cost curve: RSS of the service against the number of watched wide addresses",
        input=(
            f"N rows in `hlm_addresses` (tier wide, `wide.max_addresses` raised to N), every one taken by the planner "
            f"and the tape tracker, then a calm tape ({sizes.address_tape_rate:,.0f} trades/s) for "
            f"{sizes.address_seconds:g} s; a fresh service process per point, SQLite"
        ),
    )
    xs, rss = [], []
    for n in sizes.address_counts:
        p = _run_point(
            {
                "kind": "tape",
                "watched": n,
                "rate": sizes.address_tape_rate,
                "warm_s": 0.0,
                "seconds": sizes.address_seconds,
            }
        )
        xs.append(float(n))
        rss.append(float(p["rss_bytes"]))
        result.cases.append(
            Case(
                name=f"{n:,} wide addresses",
                metrics={
                    "rss_mib": _one(p["rss_bytes"] / MIB, "MiB"),
                    "startup_s": _one(p["startup_s"], "s"),
                    "cpu_share": _one(p["cpu_share"], "share"),
                },
                info=p,
            )
        )
    result.notes.append(
        "Marginal RSS per address between neighbouring points: "
        + ", ".join(f"{s:,.0f} B" for s in _slopes(xs, rss))
        + '. Wide addresses bootstrap from REST at the wide tier\'s paced share (README "Two tiers"), so within a '
        "point few of them hold positions yet: the per-position cost is the memory bench's (one position each)."
    )
    result.seconds = time.perf_counter() - started
    return result


def _precise_curve(sizes: CurveSizes) -> BenchResult:
    started = time.perf_counter()
    result = BenchResult(
        name="curve_precise_streams",
        title=f"Cost curve: precise tier frame sent → signal built against the number of precise streams "
        f"({sizes.precise_rate:,.0f} fills/s in all)",
        input=(
            f"market orders of {FILLS_PER_ORDER} fills round-robin over N precise whales, paced at "
            f"{sizes.precise_rate:,.0f} fills/s for {sizes.precise_seconds:g} s; per-IP limits of sim and service "
            f"raised ({MANY_STREAMS_LIMITS}) so one sim stands in for the several IPs 32 user streams need; a fresh "
            "service process per point, SQLite, JetStream acks"
        ),
    )
    for n in sizes.precise_streams:
        p = _run_point({"kind": "precise", "streams": n, "rate": sizes.precise_rate, "seconds": sizes.precise_seconds})
        result.cases.append(
            Case(
                name=f"{n} precise stream{'s' if n != 1 else ''}",
                metrics={
                    "p99_sent_to_signal_ms": _one(p["p99_sent_to_signal_ms"], "ms"),
                    "p99_sent_to_ack_ms": _one(p["p99_sent_to_ack_ms"], "ms"),
                    "cpu_share": _one(p["cpu_share"], "share"),
                    "rss_mib": _one(p["rss_bytes"] / MIB, "MiB"),
                },
                info=p,
            )
        )
    result.notes.append(
        "Sent → signal built: from the sim queueing the order's frames to the engine building its signal "
        "(WebSocket, the connection's intake queue, decode, engine); `detected_at` has ms resolution, so the median "
        "(in results.json) can read just below zero. CPU share here includes the bench's own bookkeeping of the load."
    )
    result.seconds = time.perf_counter() - started
    return result


async def bench_curves(sizes: CurveSizes) -> list[BenchResult]:
    """The three curves; each point runs in its own process (this loop only waits for them)."""
    results = []
    for curve in (_tape_curve, _address_curve, _precise_curve):
        results.append(await asyncio.to_thread(curve, sizes))
    return results


if __name__ == "__main__":
    configure_logging("warning", "json")
    answer = asyncio.run(measure_point(msgspec.json.decode(sys.argv[1])))
    sys.stdout.write(msgspec.json.encode(answer).decode() + "\n")
