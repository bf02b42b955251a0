"""The wide tier's real chain against `hl-monitor sim`, shared by the wide-tier test modules.

`stack` runs MarketTape/Connection → TapeTracker, WideManager → InfoClient → sim REST and
TierPlanner ↔ PreciseManager ↔ TrackingEngine behind the service's real sink; `watched` puts one address on the
tape and waits for its bootstrap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hl_monitor.clock import ManualClock, wall_ms
from hl_monitor.config import AggregationConfig, HyperliquidConfig, WideConfig
from hl_monitor.delivery.sink import Sink
from hl_monitor.domain.address import WatchedAddress
from hl_monitor.domain.signal import Signal
from hl_monitor.feeds.addresses import AddressBook, AddressDiff
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.market_tape import MarketTape, TapeUniverse
from hl_monitor.feeds.precise import PreciseManager
from hl_monitor.feeds.wide import WideManager
from hl_monitor.hyperliquid.info import InfoClient
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.metrics import Metrics
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.tape import TapeTracker
from hl_monitor.watch.planner import TierPlanner
from tests.support.precise import MutableSource, fast_cfg
from tests.support.waiting import wait_until
from tests.support.watch import watch_of

W1 = "0x" + "1" * 40
W2 = "0x" + "2" * 40


class ShiftedWall:
    """The real wall clock plus an offset a test moves forward: a wall-time window passes at once, and the
    simulator's exchange times, the tape and the wide reads all agree on the time (offset 0: the real clock)."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def ms(self) -> int:
        return wall_ms() + self.offset_ms

    def seconds(self) -> float:
        return time.time() + self.offset_ms / 1000

    def jump(self, seconds: float) -> None:
        self.offset_ms += round(seconds * 1000)


@dataclass
class Stack:
    sim: SimServer
    cfg: HyperliquidConfig
    wide_cfg: WideConfig
    metrics: Metrics
    budgets: Budgets
    engine: TrackingEngine
    tracker: TapeTracker
    source: MutableSource
    book: AddressBook
    tape: MarketTape
    wide: WideManager
    planner: TierPlanner
    precise: PreciseManager | None
    info: InfoClient
    signals: list[Signal] = field(default_factory=list)
    # Cleared, the signal consumer stops taking signals (a slow database or NATS): whoever emits waits.
    accepting: asyncio.Event = field(default_factory=asyncio.Event)
    wall: ShiftedWall = field(default_factory=ShiftedWall)

    def of(self, address: str, source: str | None = None) -> list[Signal]:
        return [s for s in self.signals if s.address == address and (source is None or s.source == source)]


@contextlib.asynccontextmanager
async def stack(
    *entries: WatchedAddress,
    sim_config: SimConfig | None = None,
    wide: dict[str, Any] | None = None,
    precise: bool = True,
    planner: bool = True,
    clock: ManualClock | None = None,
    **hl: Any,
) -> AsyncIterator[Stack]:
    metrics = Metrics()
    sim_kwargs: dict[str, Any] = {} if clock is None else {"clock": clock.now}
    # The tape's canary (`bbo`) comes every 0.1 s, so a short `stale_after` in a test still means a stuck socket.
    sim_config = sim_config or SimConfig(clearinghouse_push_interval=0.2, bbo_interval=0.1)
    wall = ShiftedWall()
    async with SimServer(sim_config, wall_clock=wall.seconds, **sim_kwargs) as sim:
        cfg = fast_cfg(sim, **hl)
        wide_values: dict[str, Any] = {
            "stale_after": 30.0,
            "block_settle": 0.1,
            "reconcile_settle": 0.2,
            "reconcile_interval": 3600.0,
            "universe_refresh": 3600.0,
        }
        wide_values.update(wide or {})
        wide_cfg = WideConfig(**wide_values)
        budgets = Budgets(cfg, metrics, clock=clock)
        engine = TrackingEngine(AggregationConfig(timeout=0.5), SymbolMap.empty())
        tracker = TapeTracker(SymbolMap.empty(), block_settle_ms=100, hold_ms=600_000)
        source = MutableSource(*entries)

        async def on_change(diff: AddressDiff) -> None:
            for address in diff.added:
                engine.add_address(address)
            for address in diff.removed:
                engine.remove_address(address)

        book = AddressBook(
            [source], metrics, reload_interval=3600, remove_grace=0, on_change=on_change, poll_interval=0.05
        )
        async with InfoClient.from_config(cfg, budgets, metrics) as info:
            st: Stack | None = None

            class Recorder:
                """The writer and the outbox behind the service's real sink: what reached them, in order."""

                async def put_signal(self, signal: Signal) -> None:
                    assert st is not None
                    await st.accepting.wait()
                    st.signals.append(signal)

                async def submit(self, signal: Signal) -> None:
                    return None

            sink = Sink(Recorder(), Recorder(), metrics, instance_id="test")

            def on_universe(universe: TapeUniverse) -> None:
                engine.set_symbols(universe.symbols())
                tracker.set_symbols(universe.symbols())

            tape = MarketTape(
                cfg, wide_cfg, tracker=tracker, info=info, budget=budgets, metrics=metrics, on_signals=sink,
                on_universe=on_universe, wall_ms=wall.ms,
            )  # fmt: skip
            manager = WideManager(
                wide_cfg, cfg, tracker=tracker, info=info, tape=tape, clock=budgets.clock, metrics=metrics,
                on_signals=sink, dexes=lambda: tape.universe.dexes if tape.universe else [], wall_ms=wall.ms,
            )  # fmt: skip
            tiers = TierPlanner(
                book, tracker=tracker, watch=watch_of(engine, sink), wide=manager, metrics=metrics, on_signals=sink,
                max_addresses=wide_cfg.max_addresses,
            )  # fmt: skip
            pm = None
            if precise:
                pm = PreciseManager(
                    cfg, book, tracker=engine, info=info, budget=budgets, metrics=metrics, on_signals=sink,
                    on_unassigned=tiers.on_unassigned,
                )  # fmt: skip
                tiers.precise = pm
            st = Stack(
                sim, cfg, wide_cfg, metrics, budgets, engine, tracker, source, book, tape, manager, tiers, pm, info,
                wall=wall,
            )  # fmt: skip
            st.accepting.set()

            async def engine_ticks() -> None:
                while True:
                    await asyncio.sleep(0.05)
                    await sink(engine.tick(sim.exchange.now_ms()))

            tasks = [asyncio.create_task(book.run())]
            await book.wait_loaded()
            tasks += [asyncio.create_task(c()) for c in (tape.run, manager.run, engine_ticks)]
            if planner:
                tasks.append(asyncio.create_task(tiers.run()))
            if pm is not None:
                tasks.append(asyncio.create_task(pm.run()))
            try:
                yield st
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
                for task in tasks:
                    failure = None if task.cancelled() else task.exception()
                    if failure is not None:
                        raise failure


async def tape_live(s: Stack) -> None:
    await wait_until(lambda: s.tape.continuous_since_ms() is not None)


def watch(s: Stack, *addresses: str) -> None:
    """The tape tracker and the wide manager follow `addresses` as well, wide-owned (tests without a planner)."""
    for address in addresses:
        s.tracker.add_address(address)
    s.wide.set_addresses(dict.fromkeys(s.tracker.addresses(), "wide"))


async def watched(s: Stack, address: str) -> None:
    """`watch` one address and wait until the tape is live and the address bootstrapped."""
    watch(s, address)
    await tape_live(s)
    await bootstrapped(s, address)


async def bootstrapped(s: Stack, *addresses: str) -> None:
    await wait_until(lambda: all(s.tracker.is_bootstrapped(a) for a in addresses))
