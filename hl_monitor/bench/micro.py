"""In-process benches on one core: frame decoding, the tracking engine, and tape matching, each against baselines.

All cases of a bench run on the same pre-generated frames (`frames.Workload`) in the same process, one after
the other, several times; each run is timed with `perf_counter` after an untimed warm-up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

from hl_monitor.bench.frames import TapeWorkload, Workload
from hl_monitor.bench.results import BenchResult, Case, rate_runs, stat
from hl_monitor.config import AggregationConfig
from hl_monitor.hyperliquid.protocol import (
    Frame,
    OrderUpdatesFrame,
    TradesFrame,
    UserFillsFrame,
    decode_frame,
)
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.tape import TapeTracker

__all__ = ["NaiveAggregator", "bench_decode", "bench_engine", "bench_tape", "feed_engine"]

ENGINE_TARGET_FILLS_S: Final = 150_000
TAPE_TARGET_TRADES_S: Final = 200_000
# The app persists engine deltas on the writer's cadence; the bench takes them this often (in frames) so the
# engine's bookkeeping for persistence is part of its measured cost.
DIRTY_EVERY_FRAMES: Final = 200
_NOW_MS: Final = 1_800_000_000_000
# Tape block timing for the bench (a block settles after ~1 s of quiet; held briefly for late trades).
TAPE_SETTLE_MS: Final = 1_000
TAPE_HOLD_MS: Final = 2_000


def _target(value: float, target: float, unit: str) -> str:
    verdict = "met" if value >= target else "missed"
    return f"{verdict} (median {value:,.0f} {unit})"


# ---------------------------------------------------------------------------------------------- decode


def bench_decode(workload: Workload, runs: int) -> BenchResult:
    frames = workload.frames
    started = time.perf_counter()

    def typed() -> None:
        for raw in frames:
            decode_frame(raw)

    def stdlib() -> None:
        loads = json.loads
        for raw in frames:
            loads(raw)

    def raw_msgspec() -> None:
        decode = msgspec.json.decode
        for raw in frames:
            decode(raw)

    result = BenchResult(
        name="decode",
        title="Frame decoding",
        input=(
            f"{len(frames):,} frames ({workload.fills:,} fills in userFills frames, the rest orderUpdates), "
            f"{workload.bytes / len(frames):,.0f} B/frame on average"
        ),
    )
    for name, body, baseline in (
        ("msgspec typed (decode_frame: Structs, Decimal, validation)", typed, False),
        ("json.loads to dicts (what most peers do)", stdlib, True),
        ("msgspec untyped to dicts (no validation: the ceiling)", raw_msgspec, True),
    ):
        rates = rate_runs(runs, len(frames), body)
        result.cases.append(
            Case(
                name=name,
                baseline=baseline,
                metrics={
                    "frames_per_s": stat(rates, "frames/s"),
                    "fills_per_s": stat([r * workload.fills / len(frames) for r in rates], "fills/s"),
                    "mb_per_s": stat([r * workload.bytes / len(frames) / 1e6 for r in rates], "MB/s"),
                },
            )
        )
    result.notes.append("json.loads leaves prices as strings and checks nothing; decode_frame yields typed frames.")
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------- engine


def _typed_events(workload: Workload) -> list[tuple[str, Frame]]:
    events: list[tuple[str, Frame]] = []
    for raw, owner in zip(workload.frames, workload.owners, strict=True):
        if owner is not None:
            events.append((owner, decode_frame(raw)))
    return events


def feed_engine(workload: Workload, events: Sequence[tuple[str, Frame]]) -> tuple[TrackingEngine, int]:
    """Run every event through a fresh engine; returns it and the number of signals built."""
    engine = TrackingEngine(AggregationConfig(), SymbolMap.empty())
    for address in workload.addresses:
        engine.add_address(address)
    signals = 0
    now = _NOW_MS
    for n, (address, frame) in enumerate(events):
        if isinstance(frame, UserFillsFrame):
            signals += len(engine.on_user_fills(address, frame.data, now))
        elif isinstance(frame, OrderUpdatesFrame):
            signals += len(engine.on_order_updates(address, frame.data, now))
        if n % DIRTY_EVERY_FRAMES == 0:
            engine.take_dirty()
            now += 1
    engine.take_dirty()
    return engine, signals


class NaiveAggregator:
    """The old Go service's order processing ported as peers write it: json.loads, dicts, floats.

    Fills are keyed `address-oid-dir` (flips split by startPosition), kept in a list with a seen-tid set;
    total and VWAP are recomputed over the order's fills on every fill (as the Go code did); a non-open order
    status flushes every direction of the oid into a signal dict.
    """

    def __init__(self) -> None:
        self.pending: dict[str, dict[str, Any]] = {}
        self.by_oid: dict[tuple[str, int], list[str]] = {}
        self.signals = 0

    def on_frame(self, raw: bytes, address: str) -> None:
        msg = json.loads(raw)
        channel = msg.get("channel")
        if channel == "userFills":
            for fill in msg["data"]["fills"]:
                self._fill(address, fill)
        elif channel == "orderUpdates":
            for update in msg["data"]:
                status = update["status"]
                if status in ("open", "triggered"):
                    continue
                for key in self.by_oid.pop((address, update["order"]["oid"]), []):
                    agg = self.pending.pop(key, None)
                    if agg is not None:
                        self._signal(agg, status)

    def _fill(self, address: str, fill: dict[str, Any]) -> None:
        dir_ = fill["dir"]
        sz = float(fill["sz"])
        if dir_ in ("Long > Short", "Short > Long"):
            start = abs(float(fill["startPosition"]))
            close_dir, open_dir = (
                ("Close Long", "Open Short") if dir_ == "Long > Short" else ("Close Short", "Open Long")
            )
            parts = [(close_dir, start), (open_dir, sz - start)]
        else:
            parts = [(dir_, sz)]
        for part_dir, part_sz in parts:
            if part_sz <= 0:
                continue
            key = f"{address}-{fill['oid']}-{part_dir}"
            agg = self.pending.get(key)
            if agg is None:
                agg = {"address": address, "oid": fill["oid"], "dir": part_dir, "coin": fill["coin"],
                       "fills": [], "tids": set(), "total": 0.0, "vwap": 0.0}  # fmt: skip
                self.pending[key] = agg
                self.by_oid.setdefault((address, fill["oid"]), []).append(key)
            if fill["tid"] in agg["tids"]:
                continue
            agg["tids"].add(fill["tid"])
            agg["fills"].append((part_sz, float(fill["px"])))
            total = sum(s for s, _ in agg["fills"])
            agg["total"] = total
            agg["vwap"] = sum(s * p for s, p in agg["fills"]) / total if total else 0.0

    def _signal(self, agg: dict[str, Any], status: str) -> None:
        dir_ = agg["dir"]
        _ = {
            "address": agg["address"],
            "symbol": agg["coin"],
            "direction": "open" if dir_.startswith("Open") else "close",
            "side": "LONG" if dir_.endswith("Long") else "SHORT",
            "size": agg["total"],
            "price": agg["vwap"],
            "status": status,
            "timestamp": int(time.time() * 1000),
        }
        self.signals += 1


def bench_engine(workload: Workload, runs: int) -> BenchResult:
    started = time.perf_counter()
    events = _typed_events(workload)
    user_frames = [(raw, owner) for raw, owner in zip(workload.frames, workload.owners, strict=True) if owner]
    fills = workload.fills
    result = BenchResult(
        name="engine",
        title="Tracking engine, in process, one core",
        input=f"{fills:,} fills in {workload.orders:,} orders of {len(workload.addresses)} addresses",
    )
    signals_seen: list[int] = []

    def engine_only() -> None:
        _, n = feed_engine(workload, events)
        signals_seen.append(n)

    def decode_and_engine() -> None:
        typed = [(owner, decode_frame(raw)) for raw, owner in user_frames]
        feed_engine(workload, typed)

    def naive() -> None:
        agg = NaiveAggregator()
        for raw, owner in user_frames:
            assert owner is not None
            agg.on_frame(raw, owner)

    cases: list[tuple[str, Callable[[], None], bool]] = [
        ("TrackingEngine (typed frames in, Signals out)", engine_only, False),
        ("decode_frame + TrackingEngine (bytes in)", decode_and_engine, False),
        ("naive peer port: json.loads + dict/float aggregation (old Go logic)", naive, True),
    ]
    for name, body, baseline in cases:
        rates = rate_runs(runs, fills, body)
        result.cases.append(Case(name=name, baseline=baseline, metrics={"fills_per_s": stat(rates, "fills/s")}))
    subject = result.cases[0].metrics["fills_per_s"].median
    result.cases[0].info["signals_per_run"] = signals_seen[-1] if signals_seen else 0
    result.targets[f"≥ {ENGINE_TARGET_FILLS_S:,} fills/s on one core"] = _target(
        subject, ENGINE_TARGET_FILLS_S, "fills/s"
    )
    result.notes.append(
        "The engine does what the baseline skips: exact Decimal VWAP, tid dedup incl. first fills, parking, "
        "flip split, positions/close_rate, persistence deltas (take_dirty every 200 frames)."
    )
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------- tape


def bench_tape(tape: TapeWorkload, runs: int, naive_frames: int) -> BenchResult:
    """Trades decoded (typed) and matched against the watched set: set lookup vs a per-trade list scan."""
    started = time.perf_counter()
    frames = tape.frames
    addresses = tape.watched
    as_set = frozenset(addresses)
    matched: list[int] = []

    def set_match() -> None:
        hits = 0
        for raw in frames:
            frame = decode_frame(raw)
            assert isinstance(frame, TradesFrame)
            for trade in frame.data:
                users = trade.users
                if users is not None and (users[0] in as_set or users[1] in as_set):
                    hits += 1
        matched.append(hits)

    def tracker_run() -> None:
        tracker = TapeTracker(SymbolMap.empty(), block_settle_ms=TAPE_SETTLE_MS, hold_ms=TAPE_HOLD_MS)
        for address in addresses:
            tracker.add_address(address)
        now = _NOW_MS
        for n, raw in enumerate(frames):
            frame = decode_frame(raw)
            assert isinstance(frame, TradesFrame)
            tracker.on_trades(frame.data[0].coin, frame.data, now)
            if n % DIRTY_EVERY_FRAMES == 0:
                now += TAPE_SETTLE_MS
                tracker.tick(now)
        tracker.tick(now + TAPE_HOLD_MS + TAPE_SETTLE_MS)

    sample = frames[:naive_frames]
    sample_trades = sum(len(json.loads(raw)["data"]) for raw in sample)
    naive_hits: list[int] = []

    def list_scan() -> None:
        hits = 0
        for raw in sample:
            for trade in json.loads(raw)["data"]:
                buyer, seller = trade["users"]
                for address in addresses:
                    if address in (buyer, seller):
                        hits += 1
                        break
        naive_hits.append(hits)

    result = BenchResult(
        name="tape",
        title=f"Market tape: trades decoded and matched against {len(addresses):,} watched addresses",
        input=(
            f"{tape.trades:,} trades in {len(frames):,} trades frames, {tape.hit_rate:.0%} of them by a watched "
            f"address (naive baseline: first {sample_trades:,} trades, it is too slow for all)"
        ),
    )
    result.cases.append(
        Case(
            name="decode_frame + TapeTracker.on_trades (wide tier: match, blocks, signals)",
            metrics={"trades_per_s": stat(rate_runs(runs, tape.trades, tracker_run), "trades/s")},
        )
    )
    rates = rate_runs(runs, tape.trades, set_match)
    result.cases.append(
        Case(
            name="decode_frame + frozenset lookup of users[0], users[1]",
            metrics={"trades_per_s": stat(rates, "trades/s")},
            info={"matched_trades": matched[-1]},
        )
    )
    naive_rates = rate_runs(runs, sample_trades, list_scan, warmup=False)
    result.cases.append(
        Case(
            name="json.loads + per-trade scan of the watched list",
            baseline=True,
            metrics={"trades_per_s": stat(naive_rates, "trades/s")},
            info={"matched_trades": naive_hits[-1]},
        )
    )
    result.targets[f"≥ {TAPE_TARGET_TRADES_S:,} trades/s"] = _target(
        result.cases[0].metrics["trades_per_s"].median, TAPE_TARGET_TRADES_S, "trades/s"
    )
    result.notes.append(
        "TapeTracker addresses are not REST-bootstrapped here (no positions): the case measures matching and block "
        "aggregation; the frozenset case is the matcher's inner loop alone."
    )
    result.seconds = time.perf_counter() - started
    return result
