"""Persistence of the engine state: export/import, incremental deltas as storage rows, restarts, memory."""

from __future__ import annotations

import tracemalloc
from decimal import Decimal

import msgspec
import pytest

from hl_monitor.config import AggregationConfig
from hl_monitor.domain.signal import Signal
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.state import AggregationRecord, EngineState, StateDelta, Watermark
from tests.support.factories import ADDR, NOW, T0, engine, fill, frame, update

TIMEOUT = 300_000
# Generous ceiling for an idle watched address (one dict slot + the label reference); measured ~60-110 B.
IDLE_ADDRESS_BYTES: int = 400


def roundtrip(state: EngineState) -> EngineState:
    return msgspec.json.decode(msgspec.json.encode(state), type=EngineState)


def fresh(state: EngineState) -> TrackingEngine:
    eng = TrackingEngine(AggregationConfig(), SymbolMap.empty(), instance_id="test")
    eng.add_address(ADDR, "whale")
    eng.import_state(state)
    return eng


class Storage:
    """What storage keeps: aggregation rows by (address, oid, direction) and watermark rows by address."""

    def __init__(self) -> None:
        self.aggregations: dict[tuple[str, int, str], bytes] = {}
        self.watermarks: dict[str, bytes] = {}

    def apply(self, delta: StateDelta) -> None:
        for rec in [*delta.upserted, *delta.closed]:
            self.aggregations[(rec.address, rec.oid, rec.direction)] = msgspec.json.encode(rec)
        for wm in delta.watermarks:
            self.watermarks[wm.address] = msgspec.json.encode(wm)

    def load(self) -> EngineState:
        return EngineState(
            aggregations=[msgspec.json.decode(raw, type=AggregationRecord) for raw in self.aggregations.values()],
            watermarks=[msgspec.json.decode(raw, type=Watermark) for raw in self.watermarks.values()],
        )


def test_export_import_resumes_pending_orders_without_loss_or_duplicates() -> None:
    """A pending order (parked status, a flip half) survives a restart; replays after it change nothing."""
    eng = engine()
    first = [fill(1, 11, "1"), fill(2, 21, "3", dir="Long > Short", start="1", side="A")]
    eng.on_user_fills(ADDR, frame(*first), NOW)
    eng.on_order_updates(ADDR, [update(3, "filled", orig="2")], NOW)  # parked: its fills come later
    eng.on_order_updates(ADDR, [update(2, "filled", orig="4")], NOW)  # waits for 1 more
    state = roundtrip(eng.export_state())
    assert {r.signal_id for r in state.aggregations} == {f"{ADDR}:1:OL", f"{ADDR}:2:CL", f"{ADDR}:2:OS"}
    assert [p.oid for p in state.parked] == [3]

    restarted = fresh(state)
    later = [fill(2, 22, "1", dir="Open Short", start="-2", side="A", time=T0 + 5), fill(3, 31, "2", time=T0 + 6)]
    # After the restart the exchange re-sends a snapshot holding the old fills and the new ones.
    out = restarted.on_user_fills(ADDR, frame(*first, *later, snapshot=True), NOW + 1000)
    assert sorted(s.signal_id for s in out) == [f"{ADDR}:2:CL", f"{ADDR}:2:OS", f"{ADDR}:3:OL"]
    by_id = {s.signal_id: s for s in out}
    assert by_id[f"{ADDR}:2:OS"].size == Decimal(3)
    assert by_id[f"{ADDR}:3:OL"].backfilled is True
    assert by_id[f"{ADDR}:2:CL"].backfilled is False  # all its fills arrived live before the restart
    assert restarted.stats.duplicate_fills == 2
    (opened,) = restarted.on_order_updates(ADDR, [update(1, "filled")], NOW + 1001)
    assert opened.signal_id == f"{ADDR}:1:OL"
    assert restarted.tick(NOW + 10 * TIMEOUT) == []


def test_storage_rows_restore_flush_memory_so_late_fills_reuse_no_id() -> None:
    """Rows from take_dirty (flushed ones included) restore which orders already made signals."""
    storage = Storage()
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(5, 51, "1"), fill(6, 61, "1")), NOW)
    (final,) = eng.on_order_updates(ADDR, [update(5, "filled")], NOW)
    storage.apply(eng.take_dirty())
    (timed_out,) = eng.tick(NOW + TIMEOUT)
    storage.apply(eng.take_dirty())
    assert (final.signal_id, timed_out.signal_id) == (f"{ADDR}:5:OL", f"{ADDR}:6:OL")
    assert {key[2] for key in storage.aggregations} == {"OL"}

    restarted = fresh(storage.load())
    assert restarted.on_user_fills(ADDR, frame(fill(5, 52, "1", time=T0 + 10)), NOW + TIMEOUT + 1) == []
    assert restarted.stats.late_fills_dropped == 1
    restarted.on_user_fills(ADDR, frame(fill(6, 62, "1", start="1", time=T0 + 11)), NOW + TIMEOUT + 2)
    (cont,) = restarted.tick(NOW + 2 * TIMEOUT + 2)
    assert cont.signal_id == f"{ADDR}:6:OL:c62"
    storage.apply(restarted.take_dirty())
    assert (ADDR, 6, "OL:c62") in storage.aggregations


def test_crash_between_writes_fills_in_rows_count_as_seen() -> None:
    """Aggregation rows newer than the stored watermark: their fills are not re-aggregated on replay."""
    storage = Storage()
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(7, 71, "1")), NOW)
    storage.apply(eng.take_dirty())
    eng.on_user_fills(ADDR, frame(fill(7, 72, "1", start="1", time=T0 + 1)), NOW + 1)
    delta = eng.take_dirty()
    storage.apply(StateDelta(upserted=delta.upserted))  # the watermark write is lost in the crash

    restarted = fresh(storage.load())
    snapshot = frame(fill(7, 71, "1"), fill(7, 72, "1", start="1", time=T0 + 1), snapshot=True)
    assert restarted.on_user_fills(ADDR, snapshot, NOW + 2) == []
    (signal,) = restarted.on_order_updates(ADDR, [update(7, "filled", orig="2")], NOW + 3)
    assert (signal.size, signal.fill_count) == (Decimal(2), 2)


def test_take_dirty_reports_each_change_once() -> None:
    eng = engine()
    first = eng.take_dirty()
    assert [w.address for w in first.watermarks] == [ADDR]  # the seeding snapshot
    assert not eng.take_dirty()
    eng.on_user_fills(ADDR, frame(fill(8, 0, "0.5", dir="Spot Dust Conversion", coin="@1"), fill(8, 81, "1")), NOW)
    delta = eng.take_dirty()
    assert [r.signal_id for r in delta.upserted] == [f"{ADDR}:8:OL"]
    (wm,) = delta.watermarks
    assert (wm.time, wm.tid) == (T0, 81)
    assert wm.seen == []  # persisted watermarks stay small: the seen keys are rebuilt from the stored records
    assert {key for key, _ in eng.watermark(ADDR).seen} == {f"0:8:@1:{T0}", 81}  # type: ignore[union-attr]
    assert msgspec.json.decode(msgspec.json.encode(wm), type=Watermark) == wm
    eng.on_order_updates(ADDR, [update(8, "open")], NOW)
    assert [r.status for r in eng.take_dirty().upserted] == ["open"]
    eng.on_order_updates(ADDR, [update(8, "filled")], NOW)
    closed = eng.take_dirty().closed
    assert [(r.state, r.trigger, r.final, r.status) for r in closed] == [("flushed", "status", True, "filled")]


def test_import_rejects_unknown_state_version() -> None:
    eng = TrackingEngine(AggregationConfig(), SymbolMap.empty())
    with pytest.raises(ValueError, match="version 99"):
        eng.import_state(EngineState(version=99))


def test_idle_watched_addresses_cost_almost_nothing() -> None:
    """100k watched addresses without activity: one dict slot each; measured with tracemalloc."""
    addresses = [f"0x{i:040x}" for i in range(100_000)]
    eng = TrackingEngine(AggregationConfig(), SymbolMap.empty())
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for address in addresses:
        eng.add_address(address)
    signals: list[Signal] = eng.tick(NOW)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_address = (after - before) / len(addresses)
    print(f"idle watched address: {per_address:.1f} bytes")
    assert signals == []
    assert per_address < IDLE_ADDRESS_BYTES
    assert eng.stats.watched_addresses == 100_000
    assert eng.stats.active_addresses == 0
