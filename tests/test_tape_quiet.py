"""A quiet market is not a dead feed: the tape's connections judge their liveness by the `bbo` canary.

Both tests run the real tape (MarketTape → Connection → the simulator over sockets) for simulated hours on
looptime's loop clock: the connections' stale clocks, the budgets, the simulator's pushes and its exchange
clock all read loop time, so an hour passes in seconds and every threshold is measured exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import pytest

from hl_monitor.clock import Timer
from hl_monitor.config import HyperliquidConfig, WideConfig
from hl_monitor.domain.signal import Signal
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.connection import WATCHDOG_TICK_S, Connection, ConnState
from hl_monitor.feeds.market_tape import MarketTape, TapeUniverse
from hl_monitor.hyperliquid.info import InfoClient
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.metrics import Metrics
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.tracking.tape import TapeTracker
from tests.support.metrics import metric_value
from tests.support.waiting import wait_until

# The exchange's clock starts at a realistic epoch; loop time is added to it.
EPOCH_S: Final = 1_780_000_000.0
HOUR_S: Final = 3600.0
# Two tape connections (10 connections, 8 precise slots): one carries BTC, the other only quieter coins.
USER_SLOTS: Final = 8
# A trader who is not watched trades BTC this often: one connection hears a trade now and then, the other none.
TRADE_EVERY_S: Final = 600.0
TRADER: Final = "0x" + "7" * 40
# Loop time is fake, the work is not: a simulated hour is thousands of canary pushes over real sockets, ~20 s of
# CPU, and 92 s of wall time with a CPU hog on each of two busy cores. Past the default 60 s, pytest-timeout's
# SIGALRM lands in the simulator's socket write, asyncio takes it for a fatal write error and drops the
# connection: the test then fails as a tape reconnect (reason `dropped`) instead of as a timeout.
QUIET_HOURS_TIMEOUT_S: Final = 300

pytestmark = pytest.mark.timeout(QUIET_HOURS_TIMEOUT_S)


class LoopClock:
    """The budgets' clock on loop time (looptime's fake time in these tests)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def now(self) -> float:
        return self._loop.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self._loop.call_later(max(delay, 0.0), callback)


@dataclass
class QuietTape:
    sim: SimServer
    tape: MarketTape
    wide: WideConfig
    metrics: Metrics
    signals: list[Signal] = field(default_factory=list)

    def connections(self) -> list[Connection]:
        return self.tape.connections()

    def tape_reconnects(self) -> int:
        return sum(c.reconnect_count for c in self.connections())


@contextlib.asynccontextmanager
async def quiet_tape() -> AsyncIterator[QuietTape]:
    """The tape with the service's default timings against a simulator that trades only when told to."""
    loop = asyncio.get_running_loop()

    def wall() -> float:
        return EPOCH_S + loop.time()

    def wall_ms() -> int:
        return round(wall() * 1000)

    metrics = Metrics()
    async with SimServer(SimConfig(), clock=loop.time, wall_clock=wall) as sim:
        cfg = HyperliquidConfig(ws_url=sim.ws_url, info_url=sim.info_url, user_slots=USER_SLOTS)
        wide = WideConfig()
        budgets = Budgets(cfg, metrics, clock=LoopClock(loop))
        tracker = TapeTracker(SymbolMap.empty(), block_settle_ms=round(wide.block_settle * 1000), hold_ms=0)

        def on_universe(universe: TapeUniverse) -> None:
            tracker.set_symbols(universe.symbols())

        async with InfoClient.from_config(cfg, budgets, metrics) as info:
            quiet: QuietTape | None = None

            async def on_signals(signals: Sequence[Signal]) -> None:
                assert quiet is not None
                quiet.signals.extend(signals)

            tape = MarketTape(
                cfg, wide, tracker=tracker, info=info, budget=budgets, metrics=metrics, on_signals=on_signals,
                on_universe=on_universe, wall_ms=wall_ms, clock=loop.time,
            )  # fmt: skip
            quiet = QuietTape(sim, tape, wide, metrics)
            task = asyncio.create_task(tape.run())
            try:
                await wait_until(
                    lambda: len(tape.connections()) == 2 and all(c.state is ConnState.LIVE for c in tape.connections())
                )
                yield quiet
            finally:
                task.cancel()
                await asyncio.wait([task])


@pytest.mark.looptime
async def test_an_hour_of_quiet_market_costs_the_tape_no_reconnect() -> None:
    loop = asyncio.get_running_loop()
    async with quiet_tape() as q:
        busy, quiet = q.connections()
        assert "BTC" in q.tape.covered()[:1]  # the busiest coin, dealt to the first connection
        trader = q.sim.exchange.whale(TRADER)
        started = loop.time()
        trades = 0
        while loop.time() - started < HOUR_S:
            await asyncio.sleep(TRADE_EVERY_S)
            await trader.market_order("BTC", trades % 2 == 0, "0.01", "80000")
            trades += 1
        # Every trade came through the tape, once.
        await wait_until(lambda: metric_value(q.metrics, "trades_processed_total", type="tape") == trades)
        assert loop.time() - started >= HOUR_S
        # The second connection heard no trade in the whole hour; stale after 10 s of trade silence, it would have
        # reconnected hundreds of times. Its canary kept coming, so neither connection reconnected at all.
        assert q.tape_reconnects() == 0
        assert (busy.epoch, quiet.epoch) == (1, 1)
        assert quiet.feed_age() <= q.sim.config.bbo_interval + WATCHDOG_TICK_S


@pytest.mark.looptime
async def test_a_stalled_canary_still_reconnects_within_the_threshold() -> None:
    async with quiet_tape() as q:
        await asyncio.sleep(HOUR_S / 4)  # a quiet quarter of an hour first: no reconnect
        assert q.tape_reconnects() == 0
        q.sim.faults.stall("bbo")  # the sockets stay open and answer pings; the canary stops
        took = await wait_until(lambda: all(c.reconnect_count >= 1 for c in q.connections()), within=HOUR_S)
        threshold = q.wide.stale_after
        # The last canary came at most one push interval before the stall; the watchdog looks every tick.
        assert threshold - q.sim.config.bbo_interval <= took <= threshold + WATCHDOG_TICK_S
        reasons = {
            reason: metric_value(q.metrics, "reconnects_total", kind="tape", reason=reason)
            for reason in ("stale_canary", "stale_connection", "pong_timeout")
        }
        assert reasons == {"stale_canary": 0, "stale_connection": 2, "pong_timeout": 0}  # nothing else flowed
        # A resubscribe heals the stall (as on the exchange): live again, and quiet again.
        await wait_until(lambda: all(c.state is ConnState.LIVE for c in q.connections()))
        await asyncio.sleep(HOUR_S / 4)
        assert q.tape_reconnects() == 2
