"""Whale discovery's cost: CPU per 1,000 tape trades/s, memory of full tables, and the longest event-loop pause.

Input: tape trades between many more distinct addresses than counters (so the tables are full and evict), in
batches the size of a tape frame, stamped so the run crosses slice boundaries of both default windows' tables
(1 h and 24 h, `discovery.max_tracked` counters each). Between batches the bench asks what the service asks: the
top candidates of a window and the top `directional` ones.

- subject: `Discovery` as the service runs it, expiry and ranking in bounded steps (`tracking/discovery.py`);
- baseline: the same tables doing everything at once, as before: whole-table expiry at a slice boundary and an
  exact ranking of every counter at each query (`settle()` + a full label scan).

Every duration is the thread's CPU time (`time.thread_time`), not wall time: on a loaded machine a call also waits
for a core, which is no cost of the structure. CPU per 1,000 trades/s is the share of one core the intake takes
at that rate (queries and expiry included). The tape is compressed (hours in seconds), so it runs more slice
boundaries per trade than a real tape: an upper bound. The garbage collector is off while the calls are timed;
its full pass over the full tables (the longest pause left, proportional to the counters) is measured on its
own, with the tables' memory (`tracemalloc`), in a separate pass.
"""

from __future__ import annotations

import gc
import heapq
import random
import time
import tracemalloc
from collections.abc import Callable
from decimal import Decimal
from typing import Final

from hl_monitor.bench.results import BenchResult, Case, stat
from hl_monitor.hyperliquid.protocol import WsTrade
from hl_monitor.tracking.discovery import LABEL_SCAN, Discovery

__all__ = ["bench_discovery", "make_discovery_tape"]

WINDOWS_MS: Final = (3_600_000, 86_400_000)
BATCH: Final = 20  # trades per tape frame
QUERY_EVERY: Final = 50  # batches between two queries (a page of the console, a confirmation pass)
COINS: Final = ("BTC", "ETH", "SOL", "HYPE", "DOGE", "XRP", "AVAX", "LINK")
USER_HASH: Final = "0x" + "ab" * 32
START_MS: Final = 1_800_000_000_000
# The run spans this much tape time: more than two slices of the 24 h window, many of the 1 h window.
SPAN_MS: Final = 5 * 3_600_000


def make_discovery_tape(trades: int, addresses: int, seed: int = 18) -> list[list[WsTrade]]:
    """Batches of tape trades over `SPAN_MS`; sizes are heavy-tailed (a few whales, a crowd of small traders)."""
    rng = random.Random(seed)
    names = [f"0x{rng.getrandbits(160):040x}" for _ in range(addresses)]
    out: list[list[WsTrade]] = []
    step = SPAN_MS / max(1, trades)
    for start in range(0, trades, BATCH):
        batch = []
        for i in range(start, min(trades, start + BATCH)):
            a = names[min(addresses - 1, int(rng.paretovariate(1.2)) - 1)] if rng.random() < 0.3 else rng.choice(names)
            b = rng.choice(names)
            usd = round(rng.paretovariate(1.5) * 500, 2)
            batch.append(
                WsTrade(
                    coin=COINS[i % len(COINS)],
                    side="B" if rng.random() < 0.5 else "A",
                    px=Decimal(100),
                    sz=Decimal(str(usd)) / 100,
                    time=START_MS + int(i * step),
                    tid=i + 1,
                    hash=USER_HASH,
                    users=(a, b),
                )
            )
        out.append(batch)
    return out


def _run(
    tape: list[list[WsTrade]],
    capacity: int,
    query: Callable[[Discovery, int], None],
    before: Callable[[Discovery, int], None],
) -> tuple[float, list[float]]:
    """Seconds for the whole tape and every call's duration (batches and queries)."""
    d = Discovery(WINDOWS_MS, capacity, start_ms=START_MS)
    pauses: list[float] = []
    # The collector's full passes are measured on their own (`_memory`): here each call's own work.
    gc.disable()
    try:
        return _timed(d, tape, query, before, pauses)
    finally:
        gc.enable()


def _timed(
    d: Discovery,
    tape: list[list[WsTrade]],
    query: Callable[[Discovery, int], None],
    before: Callable[[Discovery, int], None],
    pauses: list[float],
) -> tuple[float, list[float]]:
    clock = time.thread_time  # CPU time: on a shared machine, wall time also counts the waits for a core
    started = clock()
    for k, batch in enumerate(tape):
        now = batch[-1].time
        t0 = clock()
        before(d, now)
        d.on_trades(batch, now)
        pauses.append(clock() - t0)
        if k % QUERY_EVERY == 0:
            t0 = clock()
            query(d, now)
            pauses.append(clock() - t0)
    return clock() - started, pauses


def _incremental_query(d: Discovery, now: int) -> None:
    d.candidates(WINDOWS_MS[0], limit=50)
    d.candidates(WINDOWS_MS[1], label="directional", limit=50)


def _nothing(d: Discovery, now: int) -> None:
    return None


def _whole_table_expiry(d: Discovery, now: int) -> None:
    for table in d.tables.values():
        before = table._current
        table.advance(now)
        if table._current != before:
            table.settle(now)


def _exact_query(d: Discovery, now: int) -> None:
    for window, label in ((WINDOWS_MS[0], None), (WINDOWS_MS[1], "directional")):
        table = d.tables[window]
        counters = table._counters
        top = heapq.nlargest(LABEL_SCAN if label else 50, ((c.total.gross, a) for a, c in counters.items()))
        found = 0
        for _, address in top:
            if label is None or table.label_of(address) == label:
                table.get(address)
                found += 1
                if found == 50:
                    break


def _memory(tape: list[list[WsTrade]], capacity: int) -> tuple[float, int, float]:
    """Bytes the full tables hold, their counters, and the CPU seconds of one full garbage collection with them
    (the collector walks every tracked object: with full tables, its gen-2 passes are the longest pause left)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        d = Discovery(WINDOWS_MS, capacity, start_ms=START_MS)
        for batch in tape:
            d.on_trades(batch, batch[-1].time)
        d.settle(tape[-1][-1].time)
        held = float(tracemalloc.get_traced_memory()[0] - base)
    finally:
        tracemalloc.stop()
    gc.collect()
    started = time.thread_time()
    gc.collect()
    return held, sum(len(t) for t in d.tables.values()), time.thread_time() - started


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_discovery(trades: int, addresses: int, capacity: int, runs: int) -> BenchResult:
    started = time.perf_counter()
    tape = make_discovery_tape(trades, addresses)
    result = BenchResult(
        name="discovery",
        title="Whale discovery: CPU per 1,000 tape trades/s, memory of full tables, longest pause",
        input=(
            f"{trades:,} tape trades in batches of {BATCH} between {addresses:,} addresses, 2 windows (1 h, 24 h) of "
            f"{capacity:,} counters, queries every {QUERY_EVERY} batches"
        ),
    )
    cases = (
        ("bounded steps (expiry and ranking per call)", False, _nothing, _incremental_query),
        ("whole-table expiry and exact ranking per query (before)", True, _whole_table_expiry, _exact_query),
    )
    for name, baseline, before, query in cases:
        cpu, longest, p999 = [], [], []
        for _ in range(runs):
            seconds, pauses = _run(tape, capacity, query, before)
            cpu.append(100.0 * seconds / trades * 1000)  # % of one core at 1,000 trades/s
            longest.append(max(pauses) * 1000)
            p999.append(_pct(pauses, 0.999) * 1000)
        result.cases.append(
            Case(
                name=name,
                baseline=baseline,
                metrics={
                    "cpu_pct_per_1000_trades_s": stat(cpu, "% of a core"),
                    "longest_pause_ms": stat(longest, "ms"),
                    "p99_9_pause_ms": stat(p999, "ms"),
                },
            )
        )
    memory, counters, collect_s = _memory(tape, capacity)
    result.cases[0].metrics["memory_mb"] = stat([memory / 1e6], "MB")
    result.cases[0].metrics["full_gc_pause_ms"] = stat([collect_s * 1000], "ms")
    result.cases[0].info["counters"] = counters
    result.cases[0].info["bytes_per_counter"] = round(memory / max(1, counters))
    result.notes.append(
        "CPU includes expiry and queries; the tape is compressed (hours in seconds), so it is an upper bound."
    )
    result.seconds = time.perf_counter() - started
    return result
