"""The precise tier's end-to-end harness: the real address book, PreciseManager, UserStream, InfoClient, Budgets
and TrackingEngine against `hl-monitor sim` (tests/test_feeds_precise.py, tests/test_hip3_gap.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hl_monitor.clock import ManualClock
from hl_monitor.config import AggregationConfig, HyperliquidConfig
from hl_monitor.domain.address import WatchedAddress
from hl_monitor.domain.signal import Signal
from hl_monitor.feeds.addresses import AddressBook, AddressDiff
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.connection import ConnState
from hl_monitor.feeds.precise import PreciseManager
from hl_monitor.hyperliquid.info import InfoClient
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.metrics import Metrics
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.tracking.engine import TrackingEngine
from tests.support.precise import MutableSource, fast_cfg
from tests.support.waiting import wait_until


class GatedBudgets(Budgets):
    """The real budgets plus a gate on dialling, to hold a connection in its gap while the whale trades."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.gate.set()

    async def new_connection_permit(self) -> None:
        await self.gate.wait()
        await super().new_connection_permit()


@dataclass
class Harness:
    sim: SimServer
    cfg: HyperliquidConfig
    metrics: Metrics
    budgets: Budgets
    engine: TrackingEngine
    source: MutableSource
    book: AddressBook
    manager: PreciseManager
    signals: list[Signal] = field(default_factory=list)
    unassigned: list[frozenset[str]] = field(default_factory=list)

    def signals_of(self, address: str) -> list[Signal]:
        return [s for s in self.signals if s.address == address]

    async def live(self, address: str) -> None:
        """Until the address's stream is live and its first gap recovery is done."""

        def ready() -> bool:
            stream = self.manager.stream(address)
            return stream is not None and stream.connection.state is ConnState.LIVE and stream.recoveries >= 1

        await wait_until(ready)

    async def cut(self, address: str) -> None:
        """Drop the address's socket and hold its reconnect until `budgets.gate` is set (needs GatedBudgets)."""
        assert isinstance(self.budgets, GatedBudgets)
        stream = self.manager.stream(address)
        assert stream is not None
        self.budgets.gate.clear()
        assert self.sim.faults.abrupt_close_all() == 1
        await wait_until(lambda: stream.connection.state is not ConnState.LIVE)

    async def quiet_point(self, address: str, recoveries: int) -> int:
        """Wait for the address's `recoveries`-th gap recovery to finish, then trade one marker order and wait for
        its signal: whatever the recovery or earlier frames would still emit comes out before it. Returns its oid."""
        stream = self.manager.stream(address)
        assert stream is not None
        await wait_until(lambda: stream.recoveries >= recoveries and stream.connection.state is ConnState.LIVE)
        oid = await self.sim.exchange.whale(address).market_order("HYPE", True, "1", "40")
        await wait_until(lambda: any(s.oid == oid for s in self.signals), what="the marker order's signal")
        return oid

    def reconnect(self) -> None:
        """Let the connection `cut` held back dial again."""
        assert isinstance(self.budgets, GatedBudgets)
        self.budgets.gate.set()


@contextlib.asynccontextmanager
async def harness(
    *entries: WatchedAddress,
    sim_config: SimConfig | None = None,
    remove_grace: float = 0.0,
    budgets_class: type[Budgets] = Budgets,
    manual_clock: ManualClock | None = None,
    book_clock: Callable[[], float] = time.monotonic,
    symbols: SymbolMap | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """`manual_clock` drives the budgets and the simulator; `book_clock` the address book's removal grace."""
    metrics = Metrics()
    sim_kwargs: dict[str, Any] = {} if manual_clock is None else {"clock": manual_clock.now}
    async with SimServer(sim_config or SimConfig(clearinghouse_push_interval=0.2), **sim_kwargs) as sim:
        cfg = fast_cfg(sim, **overrides)
        budgets = budgets_class(cfg, metrics, clock=manual_clock)
        engine = TrackingEngine(AggregationConfig(), SymbolMap.empty() if symbols is None else symbols)
        source = MutableSource(*entries)

        async def on_change(diff: AddressDiff) -> None:
            for address in diff.added:
                engine.add_address(address)
            for address in diff.removed:
                engine.remove_address(address)

        book = AddressBook(
            [source],
            metrics,
            reload_interval=3600,
            remove_grace=remove_grace,
            on_change=on_change,
            poll_interval=0.05,
            clock=book_clock,
        )
        async with InfoClient.from_config(cfg, budgets, metrics) as info:
            h: Harness | None = None

            async def sink(batch: Sequence[Signal]) -> None:
                assert h is not None
                h.signals.extend(batch)

            async def unassigned(addresses: frozenset[str]) -> None:
                assert h is not None
                h.unassigned.append(addresses)

            manager = PreciseManager(
                cfg,
                book,
                tracker=engine,
                info=info,
                budget=budgets,
                metrics=metrics,
                on_signals=sink,
                on_unassigned=unassigned,
            )
            h = Harness(sim, cfg, metrics, budgets, engine, source, book, manager)
            book_task = asyncio.create_task(book.run())
            await book.wait_loaded()
            manager_task = asyncio.create_task(manager.run())
            try:
                yield h
            finally:
                for task in (manager_task, book_task):
                    task.cancel()
                await asyncio.wait([manager_task, book_task])
                for task in (manager_task, book_task):
                    failure = None if task.cancelled() else task.exception()
                    if failure is not None:
                        raise failure
