"""What the service keeps for a long time is not walked by the garbage collector's full passes.

A full collection visits every tracked object that is not frozen, so its pause (one event-loop step) grows with
what the service holds: pending aggregations, built signals and fills, the console's replay ring, discovery
counters, recent acks (architecture §10 "Garbage collection"). These records hold values and other records, never
a cycle, and are declared untracked; a field added later that holds a container must not bring them back.
"""

from __future__ import annotations

import gc

from hl_monitor.config import AggregationConfig
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.ops.console.feed import LiveFeed
from hl_monitor.tracking.discovery import HeavyHitters
from hl_monitor.tracking.engine import TrackingEngine
from tests.support.factories import ADDR, NOW, T0, fill, frame

TIMEOUT = 300_000  # default aggregation.timeout, ms
HOUR_MS = 3_600_000  # one discovery window


def test_pending_records_signals_and_fills_of_the_engine_are_untracked() -> None:
    eng = TrackingEngine(AggregationConfig(), SymbolMap.empty(), collect_fills=True)
    eng.add_address(ADDR)
    eng.on_user_fills(ADDR, frame(fill(1, 11, "0.5"), fill(1, 12, "0.25", time=T0 + 1)), NOW)

    pending = eng.take_dirty().upserted
    assert [len(record.fills) for record in pending] == [2]
    assert not gc.is_tracked(pending[0])  # it holds a list of fills, yet the collector does not walk it
    fills = eng.take_fills()
    assert len(fills) == 2
    assert not any(gc.is_tracked(record) for record in fills)

    [signal] = eng.tick(NOW + TIMEOUT)
    assert signal.fill_count == 2
    assert not gc.is_tracked(signal)
    assert not any(gc.is_tracked(record) for record in eng.take_dirty().closed)


def test_console_replay_ring_and_discovery_counters_are_untracked() -> None:
    feed = LiveFeed()
    feed.publish("status", {"ready": True})
    [event] = feed.since(0)
    assert event.kind == "status"
    assert not gc.is_tracked(event)

    gc.collect()
    before = len(gc.get_objects())
    hitters = HeavyHitters(HOUR_MS, 1_000)
    for n in range(500):
        address = f"0x{n:040x}"
        hitters.add(
            address, "BTC", 1_000.0, buy=True, taker=True, engine=False, counterparty="0xpeer", self_trade=False
        )
    assert len(hitters) == 500
    gc.collect()  # the ranking heap's (number, address) tuples are untracked by the first pass that sees them
    assert len(gc.get_objects()) - before < 20  # no object per counter, nor per slice
