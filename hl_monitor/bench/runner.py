"""Runs every bench with its baselines and writes `results.json` and `results.md` (see `report`).

`FULL` is what `make bench` runs (a few minutes on 2 cores); `SMOKE` runs the same code on tiny sizes in
seconds, for the test suite. The end-to-end bench needs MariaDB for its MariaDB cases: when it is unreachable
those cases are reported as not run (the SQLite cases still run) unless `require_mariadb`.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from hl_monitor import __version__
from hl_monitor.bench.cascade import CASCADE_FULL, CASCADE_SMOKE, bench_cascade
from hl_monitor.bench.curves import CURVES_FULL, CURVES_SMOKE, bench_curves
from hl_monitor.bench.discovery import bench_discovery
from hl_monitor.bench.e2e import LoadRun, Pipeline, PipelineOptions
from hl_monitor.bench.frames import make_tape, make_workload
from hl_monitor.bench.gccensus import GcCensus, take_census
from hl_monitor.bench.loopsteps import LoopSteps
from hl_monitor.bench.micro import bench_decode, bench_engine, bench_tape
from hl_monitor.bench.profile import Profiler, require_py_spy, summarise
from hl_monitor.bench.report import write_report
from hl_monitor.bench.results import BenchResult, Case, Report, percentile, stat
from hl_monitor.delivery.embedded_nats import find_nats_server
from hl_monitor.errors import BenchError
from hl_monitor.logging import get_logger

__all__ = ["FULL", "SMOKE", "Sizes", "run_all"]

log = get_logger(__name__)

E2E_TARGET_FILLS_S: Final = 20_000
LATENCY_TARGET_P99_MS: Final = 25.0
LATENCY_RATE_FILLS_S: Final = 2_000
# Acknowledged publishes of the bare-publish probe per latency run: enough for a stable p99 in about a second.
PROBE_PUBLISHES: Final = 2_000
DEFAULT_MYSQL_URL: Final = "mysql+aiomysql://root@127.0.0.1:3306/test"
PACKAGES: Final = ("msgspec", "websockets", "aiohttp", "nats-py", "sqlalchemy", "aiomysql", "aiosqlite", "alembic")


@dataclass(frozen=True, slots=True)
class Sizes:
    runs: int  # repetitions of every measurement (median and spread are over these)
    whales: int
    orders: int  # decode/engine workload
    fills_per_order: int
    tape_trades: int
    tape_watched: int
    tape_hit_rate: float
    tape_naive_frames: int
    e2e_runs: int
    e2e_orders: int  # per throughput run (unpaced)
    e2e_fills_per_order: int
    latency_orders: int  # per latency run, paced at LATENCY_RATE_FILLS_S
    latency_fills_per_order: int
    memory_sizes: tuple[int, ...]
    memory_runs: int
    discovery_trades: int
    discovery_addresses: int  # distinct traders: several times the counters, so the tables are full and evict
    discovery_capacity: int  # discovery.max_tracked
    discovery_runs: int
    probe_publishes: int = PROBE_PUBLISHES  # bare acknowledged publishes after each latency run


FULL: Final = Sizes(
    runs=5,
    whales=8,
    orders=6_000,
    fills_per_order=10,
    tape_trades=300_000,
    tape_watched=10_000,
    tape_hit_rate=0.02,
    tape_naive_frames=40,
    e2e_runs=3,
    e2e_orders=6_000,
    e2e_fills_per_order=10,
    latency_orders=5_000,
    latency_fills_per_order=4,
    memory_sizes=(10_000, 100_000),
    memory_runs=3,
    discovery_trades=300_000,
    discovery_addresses=200_000,
    discovery_capacity=50_000,
    discovery_runs=3,
)

SMOKE: Final = Sizes(
    runs=2,
    whales=2,
    orders=40,
    fills_per_order=3,
    tape_trades=2_000,
    tape_watched=500,
    tape_hit_rate=0.05,
    tape_naive_frames=5,
    e2e_runs=1,
    e2e_orders=30,
    e2e_fills_per_order=3,
    latency_orders=20,
    latency_fills_per_order=2,
    # RSS grows in pages and arenas: a few hundred addresses can fit in memory already mapped (0 B/address).
    memory_sizes=(5_000,),
    memory_runs=1,
    discovery_trades=4_000,
    discovery_addresses=3_000,
    discovery_capacity=2_500,
    discovery_runs=1,
    probe_publishes=50,
)


# ---------------------------------------------------------------------------------------------- meta


def _run_text(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


async def _mariadb_version(url: str) -> str | None:
    engine = create_async_engine(url)
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            return str((await conn.execute(sa.text("SELECT VERSION()"))).scalar_one())
    except Exception:
        return None
    finally:
        await engine.dispose()


def _meta(sizes: Sizes, mariadb: str | None) -> dict[str, Any]:
    import sqlite3

    repo = Path(__file__).resolve().parents[2]
    commit = _run_text(["git", "rev-parse", "--short", "HEAD"], repo)
    dirty = bool(_run_text(["git", "status", "--porcelain", "--untracked-files=no"], repo))
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    try:
        nats_version = _run_text([find_nats_server(), "--version"])
    except Exception:
        nats_version = "missing"
    return {
        "hl_monitor": __version__,
        "commit": (commit + ("-dirty" if dirty else "")) if commit else "unknown",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_gib": _mem_total_gib(),
            "os": f"{platform.system()} {platform.release()}",
        },
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "nats_server": nats_version,
        "mariadb": mariadb or "unreachable",
        "sqlite": sqlite3.sqlite_version,
        "sizes": asdict(sizes),
    }


# ---------------------------------------------------------------------------------------------- e2e


def _loss_info(runs: list[LoadRun]) -> dict[str, Any]:
    return {
        "zero_loss_all_runs": all(r.zero_loss for r in runs),
        "orders_per_run": runs[0].orders,
        "fills_per_run": runs[0].fills,
        "signals_per_run": [r.signals for r in runs],
        "loss_checks": [r.loss for r in runs],
    }


async def _e2e_case(
    name: str, opts: PipelineOptions, sizes: Sizes, *, baseline: bool, profiler: Profiler | None
) -> tuple[Case, list[LoadRun]]:
    runs: list[LoadRun] = []
    startups: list[float] = []
    for i in range(sizes.e2e_runs):
        async with Pipeline(opts) as pipe:
            startups.append(pipe.startup_s)
            if profiler is not None and i == 0:
                profiler.start()
            try:
                runs.append(
                    await pipe.load(
                        orders=sizes.e2e_orders, fills_per_order=sizes.e2e_fills_per_order, rate=None, seed=100 + i
                    )
                )
            finally:
                if profiler is not None and i == 0:
                    profiler.stop()
    case = Case(
        name=name,
        baseline=baseline,
        metrics={
            "fills_per_s": stat([r.fills_per_s for r in runs], "fills/s"),
            "signals_per_s": stat([r.signals / (r.last_ack - r.first_send) for r in runs], "signals/s"),
            "startup_s": stat(startups, "s"),
        },
        info=_loss_info(runs),
    )
    return case, runs


async def _latency_case(opts: PipelineOptions, sizes: Sizes) -> tuple[Case, list[LoadRun]]:
    runs: list[LoadRun] = []
    bare_p99: list[float] = []
    censuses: list[GcCensus] = []
    for i in range(sizes.e2e_runs):
        async with Pipeline(opts) as pipe:
            runs.append(
                await pipe.load(
                    orders=sizes.latency_orders,
                    fills_per_order=sizes.latency_fills_per_order,
                    rate=LATENCY_RATE_FILLS_S,
                    seed=200 + i,
                    steps=LoopSteps(),
                )
            )
            censuses.append(take_census())  # the service still runs: what the run left for the collector
            bare_p99.append(percentile(await pipe.bare_publish_ms(sizes.probe_publishes), 99))
    metrics = {}
    for q in (50, 90, 99):
        metrics[f"p{q}_ms"] = stat([percentile(r.latencies_ms, q) for r in runs], "ms")
    metrics["max_ms"] = stat([max(r.latencies_ms) for r in runs], "ms")
    metrics["p99_sent_to_signal_ms"] = stat([percentile(r.detect_ms, 99) for r in runs], "ms")
    metrics["p99_signal_to_ack_ms"] = stat([percentile(r.deliver_ms, 99) for r in runs], "ms")
    metrics["achieved_fills_per_s"] = stat([r.fills_per_s for r in runs], "fills/s")
    metrics["bare_publish_p99_ms"] = stat(bare_p99, "ms")
    metrics["p99_over_bare_publish_p99"] = stat(
        [percentile(r.latencies_ms, 99) / bare for r, bare in zip(runs, bare_p99, strict=True)], "×"
    )
    steps = [r.steps for r in runs if r.steps is not None]
    metrics["loop_step_p99_ms"] = stat([s.p99_ms for s in steps], "ms")
    metrics["loop_step_p999_ms"] = stat([s.p999_ms for s in steps], "ms")
    metrics["loop_step_max_ms"] = stat([s.max_ms for s in steps], "ms")
    metrics["loop_step_cpu_p99_ms"] = stat([s.cpu_p99_ms for s in steps], "ms")
    metrics["loop_step_cpu_p999_ms"] = stat([s.cpu_p999_ms for s in steps], "ms")
    metrics["loop_step_cpu_max_ms"] = stat([s.cpu_max_ms for s in steps], "ms")
    metrics["loop_busy_share"] = stat([s.busy_share for s in steps], "share")
    metrics["gc_tracked_after_run"] = stat([c.tracked_total for c in censuses], "objects")
    metrics["gc_full_collect_after_run_ms"] = stat([c.full_collect_ms for c in censuses], "ms")
    info = _loss_info(runs)
    info["loop_steps"] = [asdict(s) for s in steps]
    info["gc_census"] = [asdict(c) for c in censuses]
    return Case(name=f"{opts.db}, JetStream ack", metrics=metrics, info=info), runs


async def bench_e2e(sizes: Sizes, mysql_url: str, mariadb: bool, profiler: Profiler | None) -> list[BenchResult]:
    started = time.perf_counter()
    throughput = BenchResult(
        name="e2e_throughput",
        title="End to end: sim → WebSockets → the service (`app.Service`) → database + JetStream, sustained (unpaced)",
        input=(
            f"{sizes.e2e_orders:,} market orders × {sizes.e2e_fills_per_order} fills over {sizes.whales} precise "
            "whales per run, placed as fast as the simulator (own process) can; a fresh service (default config, "
            "embedded nats-server, new database) per run"
        ),
    )
    whales = sizes.whales
    specs: list[tuple[str, PipelineOptions, bool]] = []
    if mariadb:
        specs.append(
            ("MariaDB, JetStream publish with ack", PipelineOptions("mariadb", mysql_url, True, whales), False)
        )
    specs.append(("SQLite, JetStream publish with ack", PipelineOptions("sqlite", mysql_url, True, whales), mariadb))
    if mariadb:
        specs.append(
            ("MariaDB, core NATS publish (no ack)", PipelineOptions("mariadb", mysql_url, False, whales), True)
        )
    for i, (name, opts, baseline) in enumerate(specs):
        case, _ = await _e2e_case(name, opts, sizes, baseline=baseline, profiler=profiler if i == 0 else None)
        throughput.cases.append(case)
    if not mariadb:
        throughput.notes.append("MariaDB unreachable: its cases were not run.")
    subject = throughput.cases[0]
    rate = subject.metrics["fills_per_s"].median
    ok = subject.info["zero_loss_all_runs"]
    verdict = "met" if rate >= E2E_TARGET_FILLS_S and ok else "missed"
    throughput.targets[f"≥ {E2E_TARGET_FILLS_S:,} fills/s with zero loss ({subject.name})"] = (
        f"{verdict} (median {rate:,.0f} fills/s, zero loss {'held' if ok else 'FAILED'})"
    )
    throughput.seconds = time.perf_counter() - started
    return [throughput, await bench_latency(sizes, mysql_url, mariadb)]


async def bench_latency(sizes: Sizes, mysql_url: str, mariadb: bool) -> BenchResult:
    whales = sizes.whales
    started = time.perf_counter()
    latency = BenchResult(
        name="e2e_latency",
        title=f"End to end latency, frame sent by the sim → JetStream ack, at {LATENCY_RATE_FILLS_S:,} fills/s",
        input=(
            f"{sizes.latency_orders:,} market orders × {sizes.latency_fills_per_order} fills paced at "
            f"{LATENCY_RATE_FILLS_S:,} fills/s over {whales} whales; latency per order (the later ack of a flip)"
        ),
    )
    case, _ = await _latency_case(PipelineOptions("mariadb" if mariadb else "sqlite", mysql_url, True, whales), sizes)
    latency.cases.append(case)
    p99 = case.metrics["p99_ms"].median
    latency.targets[f"p99 < {LATENCY_TARGET_P99_MS:g} ms at {LATENCY_RATE_FILLS_S:,} fills/s"] = (
        f"{'met' if p99 < LATENCY_TARGET_P99_MS else 'missed'} (median p99 {p99:,.1f} ms)"
    )
    latency.notes.append(
        "Send time is when the sim queued the order's frames (its write loop sends them next); ack time is when the "
        "publisher's JetStream PubAck returned. Both are wall clocks of the same machine."
    )
    latency.notes.append(
        "Loop steps: every callback the event loop runs (`asyncio.Handle._run`, timers included) is timed from the "
        "load request to the last ack (`bench/loopsteps.py`): wall time with `perf_counter_ns` (what other tasks "
        "wait, preemption included) and the loop thread's CPU time with `thread_time_ns` (the step's own work); "
        "the bench's own driver shares the loop. Bare publish: after each run, acknowledged JetStream publishes "
        "one at a time on the service's server and connection to a stream of their own; the ratio is the run's "
        "p99 over that p99."
    )
    latency.notes.append(
        "Garbage collector (`bench/gccensus.py`): after each run, with the service still running, one collection "
        "clears the run's garbage, the live objects the collector tracks are counted (frozen start-up objects "
        "apart) and by type, and a second full collection is timed: it walks exactly those objects, as every "
        "full collection in steady state does. The counts are deterministic; the pause is wall time."
    )
    latency.seconds = time.perf_counter() - started
    return latency


# ---------------------------------------------------------------------------------------------- memory


def bench_memory(sizes: Sizes) -> BenchResult:
    started = time.perf_counter()
    result = BenchResult(
        name="memory",
        title="Memory per watched wide-tier address (fresh interpreter per size)",
        input="address book entry + engine watch entry + tape match set + one cached position per address",
    )
    for n in sizes.memory_sizes:
        per: list[float] = []
        for _ in range(sizes.memory_runs):
            out = subprocess.run(
                [sys.executable, "-m", "hl_monitor.bench.memory", str(n)],
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
            per.append(float(msgspec.json.decode(out.stdout.strip().splitlines()[-1])["bytes_per_address"]))
        result.cases.append(
            Case(name=f"{n:,} wide addresses", metrics={"rss_bytes_per_address": stat(per, "B/address")})
        )
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------- all


async def run_all(
    out_dir: Path,
    sizes: Sizes = FULL,
    *,
    mysql_url: str = DEFAULT_MYSQL_URL,
    require_mariadb: bool = False,
    profile: bool = False,
    only: frozenset[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run the benches (all, or those named in `only`) and write the report files into `out_dir`."""
    say = progress or (lambda _: None)
    if profile:
        require_py_spy()  # before minutes of benches, not after them
    started = time.perf_counter()
    load_start = _load_average()
    mariadb_version = await _mariadb_version(mysql_url)
    if mariadb_version is None and require_mariadb:
        raise BenchError(f"MariaDB required but unreachable at {mysql_url}")
    benches: list[BenchResult] = []

    def wanted(name: str) -> bool:
        return only is None or name in only

    if wanted("decode") or wanted("engine"):
        workload = make_workload(whales=sizes.whales, orders=sizes.orders, fills_per_order=sizes.fills_per_order)
        if wanted("decode"):
            say("decode")
            benches.append(bench_decode(workload, sizes.runs))
        if wanted("engine"):
            say("engine")
            benches.append(bench_engine(workload, sizes.runs))
    if wanted("tape"):
        say("tape")
        tape = make_tape(trades=sizes.tape_trades, watched=sizes.tape_watched, hit_rate=sizes.tape_hit_rate)
        benches.append(bench_tape(tape, sizes.runs, sizes.tape_naive_frames))
    if wanted("memory"):
        say("memory")
        benches.append(bench_memory(sizes))
    if wanted("discovery"):
        say("discovery")
        benches.append(
            bench_discovery(
                sizes.discovery_trades, sizes.discovery_addresses, sizes.discovery_capacity, sizes.discovery_runs
            )
        )
    profile_summary: dict[str, Any] | None = None
    if wanted("e2e"):
        say("e2e")
        profiler = Profiler(out_dir / "profile-e2e.txt") if profile else None
        benches.extend(await bench_e2e(sizes, mysql_url, mariadb_version is not None, profiler))
        if profiler is not None and profiler.path.exists():
            profile_summary = summarise(profiler.path)
    elif wanted("latency"):
        say("latency")
        benches.append(await bench_latency(sizes, mysql_url, mariadb_version is not None))
    smoke = sizes == SMOKE
    if wanted("curves"):
        say("curves")
        benches.extend(await bench_curves(CURVES_SMOKE if smoke else CURVES_FULL))
    if wanted("cascade"):
        say("cascade")
        cascade = CASCADE_SMOKE if smoke else CASCADE_FULL
        benches.append(await bench_cascade(cascade, mysql_url, mariadb_version is not None))
    meta = _meta(sizes, mariadb_version)
    meta["duration_s"] = round(time.perf_counter() - started, 1)
    # Other processes on the machine skew every number: the 1/5/15-minute load averages before and after.
    meta["load_avg"] = {"start": load_start, "end": _load_average()}
    if profile_summary is not None:
        meta["profile"] = profile_summary
    report = Report(meta=meta, benches=benches)
    write_report(report, out_dir)
    return report
