"""Tier handover boundaries: the real `TierPlanner`, `TrackingEngine` and `TapeTracker`, no sockets.

Each fill of a whale must be reported by exactly one tier, whichever side of a handover it falls on. The
precise stream is a stand-in whose readiness the test sets, so every ordering is chosen, not raced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from hl_monitor.config import AggregationConfig
from hl_monitor.domain.address import TrackedBy, WatchedAddress
from hl_monitor.domain.signal import Signal
from hl_monitor.feeds.connection import ConnState
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.metrics import Metrics
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.tape import TapeTracker
from hl_monitor.watch.planner import TierPlanner
from tests.support.factories import fill, frame, update
from tests.support.tape import OTHER, T0, WHALE, rest, symbols, trade
from tests.support.watch import watch_of

SETTLE_MS = 500


class Book:
    version = 0

    def entries(self) -> Mapping[str, WatchedAddress]:
        return {WHALE: WatchedAddress(address=WHALE)}

    async def wait_changed(self, seen_version: int) -> int:
        raise AssertionError("the book never changes in these tests")


@dataclass
class Conn:
    state: ConnState = ConnState.CONNECTING


@dataclass
class Stream:
    recoveries: int = 0
    connection: Conn = field(default_factory=Conn)


@dataclass
class Precise:
    slots: dict[str, int] = field(default_factory=dict)
    streams: dict[str, Stream] = field(default_factory=dict)

    def assigned(self) -> Mapping[str, int]:
        return self.slots

    def stream(self, address: str) -> Stream | None:
        return self.streams.get(address)


@dataclass
class Wide:
    owners: dict[str, TrackedBy] = field(default_factory=dict)

    def set_addresses(self, owners: Mapping[str, TrackedBy]) -> None:
        self.owners = dict(owners)


@dataclass
class World:
    tracker: TapeTracker
    engine: TrackingEngine
    precise: Precise
    planner: TierPlanner
    now: int = T0
    signals: list[Signal] = field(default_factory=list)

    def tape(self, tid: int, sz: str, t: int) -> None:
        """A trade of the whale on the tape, its block settled."""
        self.signals += self.tracker.on_trades("BTC", [trade(tid, sz, t=t, buyer=WHALE, seller=OTHER)], self.now)
        self.now += SETTLE_MS + 1
        self.signals += self.tracker.tick(self.now)

    def blocks(self, source: str) -> list[int]:
        return sorted(s.timestamp for s in self.signals if s.source == source)


def world() -> World:
    tracker = TapeTracker(symbols(), block_settle_ms=SETTLE_MS, hold_ms=600_000)
    engine = TrackingEngine(AggregationConfig(), SymbolMap.empty())
    engine.add_address(WHALE)  # the address book's change handler does this in the service
    precise = Precise()
    w: World | None = None

    async def sink(batch: Sequence[Signal]) -> None:
        assert w is not None
        w.signals += batch

    planner = TierPlanner(
        Book(),
        tracker=tracker,
        watch=watch_of(engine, sink),
        wide=Wide(),
        metrics=Metrics(),
        on_signals=sink,
        precise=precise,
        max_addresses=10,
        wall_ms=lambda: T0,
    )
    w = World(tracker, engine, precise, planner)
    return w


async def test_a_never_seen_address_handed_to_precise_is_split_at_its_snapshot_seed() -> None:
    """Wide first; then a slot. Fills before the subscribe are only in the snapshot (it seeds the engine, no
    signal): the tape's held blocks of those are released. Fills after it come on the stream as precise
    signals, even when they are processed before the planner sees the stream ready: the tape keeps quiet."""
    w = world()
    await w.planner.on_unassigned(frozenset({WHALE}))
    await w.planner.replan()
    assert w.planner.tier(WHALE) == "wide"
    assert w.tracker.apply_rest(WHALE, rest({}), w.now) == []  # bootstrapped flat

    w.tape(1, "1", T0 - 3000)  # wide: the tape reports it
    assert w.blocks("market_tape") == [T0 - 3000]

    w.precise.slots[WHALE] = 0  # a slot is granted; the stream is connecting
    stream = w.precise.streams[WHALE] = Stream()
    await w.planner.on_unassigned(frozenset())
    await w.planner.replan()
    assert w.planner.tier(WHALE) == "handover"

    w.tape(2, "1", T0 - 2000)  # before the subscribe: held
    snapshot = fill(oid=2, tid=2, sz="1", start="1", time=T0 - 2000)
    assert w.engine.on_user_fills(WHALE, frame(snapshot, snapshot=True, user=WHALE), w.now) == []  # seeds only
    # After the subscribe: the stream's fill and its final status come before the planner's next look.
    live = fill(oid=3, tid=3, sz="1", start="2", time=T0 - 1000)
    w.signals += w.engine.on_user_fills(WHALE, frame(live, user=WHALE), w.now)
    w.signals += w.engine.on_order_updates(WHALE, [update(3, "filled", orig="1", t=T0 - 1000)], w.now)
    w.tape(3, "1", T0 - 1000)  # the same fill on the tape: held
    assert w.blocks("user_fills") == [T0 - 1000]

    stream.connection.state = ConnState.LIVE
    stream.recoveries = 1
    await w.planner.replan()
    assert w.planner.tier(WHALE) == "precise"
    # Every fill exactly once: the tape reports what came before the seed, the precise tier the rest.
    assert w.blocks("market_tape") == [T0 - 3000, T0 - 2000]
    assert w.blocks("user_fills") == [T0 - 1000]
    assert sum((s.size for s in w.signals), Decimal(0)) == 3


async def test_a_known_address_handed_back_to_precise_is_split_at_its_old_watermark() -> None:
    """The engine knew the address (its watermark survives): what came after the watermark is backfilled as
    precise signals, so only held blocks up to the watermark are released."""
    w = world()
    w.engine.on_user_fills(WHALE, frame(fill(oid=1, tid=1, sz="1", time=T0 - 5000), snapshot=True, user=WHALE), w.now)
    await w.planner.on_unassigned(frozenset({WHALE}))
    w.precise.slots[WHALE] = 0
    stream = w.precise.streams[WHALE] = Stream()
    await w.planner.on_unassigned(frozenset())
    await w.planner.replan()
    assert w.planner.tier(WHALE) == "handover"
    assert w.tracker.apply_rest(WHALE, rest({"BTC": "1"}), w.now) == []

    w.tape(1, "1", T0 - 5000)  # the seeded fill, seen late on the tape: nobody reported it, released
    w.tape(3, "1", T0 - 2000)  # after it: the gap backfill reports it as precise
    backfill = fill(oid=3, tid=3, sz="1", start="1", time=T0 - 2000)
    w.signals += w.engine.on_backfill(WHALE, [backfill], w.now)
    w.signals += w.engine.on_order_updates(WHALE, [update(3, "filled", orig="1", t=T0 - 2000)], w.now)
    stream.connection.state = ConnState.LIVE
    stream.recoveries = 1
    await w.planner.replan()
    assert w.planner.tier(WHALE) == "precise"
    assert w.blocks("market_tape") == [T0 - 5000]
    assert w.blocks("user_fills") == [T0 - 2000]
