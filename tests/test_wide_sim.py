"""The wide tier end to end against `hl-monitor sim`: real tape sockets, real REST with budgets, real engines.

Every test runs the real chain (MarketTape/Connection → TapeTracker, WideManager → InfoClient → sim REST,
TierPlanner ↔ PreciseManager ↔ TrackingEngine) and compares what comes out with the sim's own fills.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from decimal import Decimal
from typing import Any, Final

import pytest

from hl_monitor.clock import ManualClock
from hl_monitor.domain.address import WatchedAddress
from hl_monitor.domain.signal import Signal
from hl_monitor.sim.server import SimConfig, SimServer
from tests.support.metrics import metric_value
from tests.support.waiting import wait_until
from tests.support.wide_stack import W1, W2, Stack, bootstrapped, stack, tape_live, watch, watched

NOISE = "0x" + "9" * 40  # an unwatched trader keeping the tape busy
# Fills of a quiet-point marker order (the `trade` helper's market orders fill twice).
MARKER_FILLS: Final = 2


def count_calls(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> Callable[[], int]:
    """Count the calls of `obj.name` from now on (it still does its work); returns the count's reader."""
    real = getattr(obj, name)
    calls = 0

    def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args)

    monkeypatch.setattr(obj, name, counted)
    return lambda: calls


@contextlib.asynccontextmanager
async def flipping(s: Stack, address: str, sz: str) -> AsyncIterator[None]:
    """`address` buys and sells `sz` BTC in turn every 0.1 s while the block runs."""
    whale = s.sim.exchange.whale(address)
    stop = asyncio.Event()

    async def trade() -> None:
        buy = True
        while not stop.is_set():
            await whale.market_order("BTC", buy, sz, "80000")
            buy = not buy
            await asyncio.sleep(0.1)

    task = asyncio.create_task(trade())
    try:
        yield
    finally:
        stop.set()
        await task


def fills_by_block(sim: SimServer, address: str) -> dict[tuple[str, str, int], tuple[Decimal, Decimal]]:
    """Ground truth per (coin, split dir, time): (size, notional), flips split as the precise tier does."""
    out: dict[tuple[str, str, int], list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    for f in sim.exchange.accounts[address].fills:
        sz, px, start = Decimal(f.sz), Decimal(f.px), Decimal(f.start_position)
        parts = [(f.dir, sz)]
        if f.dir in ("Long > Short", "Short > Long"):
            close, open_ = ("Close Long", "Open Short") if f.dir == "Long > Short" else ("Close Short", "Open Long")
            parts = [(close, abs(start)), (open_, sz - abs(start))]
        for dir_, part in parts:
            acc = out[(f.coin, dir_, f.time)]
            acc[0] += part
            acc[1] += part * px
    return {k: (v[0], v[1]) for k, v in out.items()}


def signals_by_block(signals: Iterable[Signal]) -> dict[tuple[str, str, int], tuple[Decimal, Decimal]]:
    out: dict[tuple[str, str, int], list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    for s in signals:
        acc = out[(s.coin, s.dir, s.timestamp)]
        acc[0] += s.size
        acc[1] += s.size * s.price
    return {k: (v[0], v[1]) for k, v in out.items()}


async def test_precise_and_wide_views_of_one_whale_agree_on_direction_size_and_vwap() -> None:
    """Perps on two dexes, a flip and spot: the tape's blocks equal the precise tier's orders, fill for fill."""
    async with stack(WatchedAddress(address=W1, tier="precise"), planner=False, user_slots=1) as s:
        await watched(s, W1)
        precise = s.precise
        assert precise is not None
        await wait_until(lambda: (stream := precise.stream(W1)) is not None and stream.recoveries >= 1)
        whale = s.sim.exchange.whale(W1)
        script = [
            ("BTC", True, "1.5", "80000", 3),
            ("ETH", False, "4", "2300", 2),
            ("BTC", False, "4", "80100", 2),  # flip: close 1.5 long, open 2.5 short
            ("xyz:XYZ100", True, "0.4", "25000", 1),
            ("@107", True, "10", "40", 2),  # spot buy HYPE
            ("@107", False, "4", "41", 1),  # spot sell part of it
        ]
        for coin, buy, sz, px, fills in script:
            await whale.market_order(coin, buy, sz, px, fills=fills, px_step="1")
            await asyncio.sleep(0.005)  # distinct block times
        truth = fills_by_block(s.sim, W1)
        await wait_until(lambda: signals_by_block(s.of(W1, "market_tape")) == truth)
        await wait_until(lambda: signals_by_block(s.of(W1, "user_fills")) == truth)
        tape = {(x.coin, x.dir, x.timestamp): x for x in s.of(W1, "market_tape")}
        exact = {(x.coin, x.dir, x.timestamp): x for x in s.of(W1, "user_fills")}
        for key, t in tape.items():
            p = exact[key]
            assert (t.direction, t.side, t.asset_type, t.symbol) == (p.direction, p.side, p.asset_type, p.symbol)
            assert (t.position_before, t.position_after, t.close_rate, t.full_close) == (
                p.position_before, p.position_after, p.close_rate, p.full_close,
            )  # fmt: skip
            assert t.oid is None
            assert t.status is None
            assert p.oid is not None
        assert len({x.signal_id for x in s.of(W1, "market_tape")}) == len(tape) == len(truth)
        assert metric_value(s.metrics, "trades_processed_total", type="tape") >= 11


async def test_stalled_tape_reconnects_and_recovers_the_missed_block_once() -> None:
    async with stack(planner=False, precise=False, user_slots=9, wide={"stale_after": 0.6}) as s:
        await watched(s, W1)
        async with flipping(s, NOISE, "0.01"):
            await wait_until(lambda: metric_value(s.metrics, "trades_processed_total", type="tape") >= 2)
            s.sim.faults.stall("trades")  # the socket stays open, nothing arrives: trades and the canary stop
            s.sim.faults.stall("bbo")
            whale = s.sim.exchange.whale(W1)
            await whale.market_order("ETH", True, "2", "2300", fills=2)
            await wait_until(
                lambda: metric_value(s.metrics, "reconnects_total", kind="tape", reason="stale_connection") >= 1,
                within=5,
            )
            await wait_until(lambda: len(s.of(W1)) == 1)
            await wait_until(lambda: s.tape.continuous_since_ms() is not None)
            # Quiet point: a marker order after the recovery comes out; a second copy of the recovered block
            # (replayed twice, or seen live and replayed) would have come out before it.
            await whale.market_order("BTC", True, "1", "80000")
            await wait_until(lambda: any(x.coin == "BTC" for x in s.of(W1)), what="the marker order's signal")
        [signal] = [x for x in s.of(W1) if x.coin == "ETH"]
        assert (signal.coin, signal.direction, signal.side, signal.size) == ("ETH", "open", "LONG", Decimal(2))
        assert signal.backfilled
        assert signal.lateness_ms is not None
        assert metric_value(s.metrics, "tape_events_total", kind="backfill_request") >= 1
        assert metric_value(s.metrics, "trades_deduplicated_total") >= 1  # the replay overlapped what was seen


async def test_a_rest_answer_waits_for_tape_the_service_has_not_read_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow signal consumer holds the tape handler; trades queue behind it. A bootstrap answer that already
    includes a queued trade is applied only once the tape has handed it over, so it is counted once.

    The wall-time windows (the ambiguity margin, `reconcile_settle`) pass by moving the shared wall clock."""
    async with stack(planner=False, precise=False, user_slots=9) as s:  # one tape connection
        await watched(s, W2)
        [conn] = s.tape.connections()
        s.accepting.clear()
        other = s.sim.exchange.whale(W2)
        await other.market_order("BTC", True, "0.1", "80000")
        await asyncio.sleep(0.005)
        await other.market_order("BTC", True, "0.1", "80000")  # BTC moves on: the first block's signal blocks
        whale = s.sim.exchange.whale(W1)
        await whale.market_order("ETH", True, "1", "2300")  # queued behind the blocked handler
        await wait_until(lambda: conn.backlog >= 2)
        s.wall.jump(0.6)  # the trade is now older than the bootstrap request (outside its ambiguity margin)
        watch(s, W1)
        await wait_until(lambda: s.wide.status()["reads"] >= 2)  # answered: REST already holds the long
        asked = count_calls(monkeypatch, s.tape, "caught_up")
        s.wall.jump(1.0)  # well past reconcile_settle
        # Quiet point: the manager has judged the answer past its settle twice, asking the tape each time (or it
        # applied the answer, which the assertion below reports).
        await wait_until(lambda: asked() >= 2 or s.tracker.is_bootstrapped(W1), what="the settled answer judged")
        assert not s.tracker.is_bootstrapped(W1)  # the queued trade is not handed over yet: the answer waits
        s.accepting.set()
        await bootstrapped(s, W1)
        await whale.market_order("ETH", False, "1", "2300")  # a full close
        await asyncio.sleep(0.005)
        await whale.market_order("ETH", False, "0.5", "2300")  # then a new short
        truth = fills_by_block(s.sim, W1)
        await wait_until(lambda: signals_by_block(s.of(W1)) == truth)
        assert [(x.dir, x.position_before, x.position_after) for x in s.of(W1)] == [
            ("Open Long", Decimal(0), Decimal(1)),
            ("Close Long", Decimal(1), Decimal(0)),
            ("Open Short", Decimal(0), Decimal("-0.5")),
        ]
        assert s.tracker.position(W1, "ETH") == Decimal("-0.5")


async def test_a_bootstrap_postponed_by_an_ambiguous_trade_is_retried_while_the_reader_sleeps() -> None:
    """The read loop sleeps until the next reconcile (an hour here); a bootstrap answer with trades inside its
    window is retried a second later all the same, and the trades it buffered meanwhile come out exactly."""
    async with stack(planner=False, precise=False, user_slots=9) as s:
        await watched(s, W2)
        async with flipping(s, W1, "0.1"):
            watch(s, W1)
            await wait_until(lambda: s.wide.status()["reads"] >= 2)  # W1 read while it trades: ambiguous
            await wait_until(lambda: s.tracker.stats.reconcile_skipped >= 1, what="the ambiguous answer skipped")
            buffered = s.tracker.stats.buffered
            # Past the answer's window: the trades go on and are buffered until a bootstrap succeeds.
            await wait_until(lambda: s.tracker.stats.buffered >= buffered + 2, what="two more trades buffered")
        assert not s.tracker.is_bootstrapped(W1)
        await bootstrapped(s, W1)
        assert s.wide.status()["reads"] >= 3
        truth = fills_by_block(s.sim, W1)
        await wait_until(lambda: signals_by_block(s.of(W1)) == truth)
        assert len(truth) >= 5


def built_by_source(s: Stack) -> dict[str, int]:
    """`hl_monitor_signals_built_total` summed over directions, per source (sources never seen: absent)."""
    out: dict[str, int] = {}
    for metric in s.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "hl_monitor_signals_built_total" and sample.value:
                out[sample.labels["source"]] = out.get(sample.labels["source"], 0) + int(sample.value)
    return out


async def test_drift_on_an_uncovered_coin_is_corrected_and_reported() -> None:
    """With a 4-subscription budget (3 coins and the canary) the builder-dex coins are not on the tape; REST
    reconcile still sees the trade."""
    wide = {"subscription_budget": 4, "reconcile_interval": 0.3}
    async with stack(planner=False, precise=False, user_slots=9, wide=wide) as s:
        await watched(s, W1)
        assert "xyz:XYZ100" in s.tape.uncovered()
        assert metric_value(s.metrics, "tape_uncovered_coins") == 6
        whale = s.sim.exchange.whale(W1)
        await whale.market_order("xyz:XYZ100", False, "0.5", "25000")
        await whale.market_order("BTC", True, "1", "80000")  # covered: a tape signal, no drift
        await wait_until(lambda: len(s.of(W1)) == 2)
        # Quiet point: two more reconciles applied (the first of them has emitted whatever it found once the
        # second starts); the corrected position does not drift again.
        reconciles = s.tracker.stats.reconciles
        await wait_until(lambda: s.tracker.stats.reconciles >= reconciles + 2, what="two more reconciles")
        recon = s.of(W1, "reconcile")
        assert len(recon) == 1
        [r] = recon
        assert (r.coin, r.direction, r.side, r.size, r.trigger) == (
            "xyz:XYZ100",
            "open",
            "SHORT",
            Decimal("0.5"),
            "reconcile",
        )
        assert r.signal_id.startswith(f"{W1}:recon:xyz:XYZ100:")
        assert r.price == Decimal(25000)  # the position's mark price from the REST answer
        assert [x.coin for x in s.of(W1, "market_tape")] == ["BTC"]
        assert metric_value(s.metrics, "drift_corrections_total", asset_type="futures") == 1
        assert s.tracker.position(W1, "xyz:XYZ100") == Decimal("-0.5")
        assert built_by_source(s) == {"reconcile": 1, "market_tape": 1}


async def test_a_spot_pair_that_gets_busy_is_moved_onto_a_short_tape() -> None:
    """Spot and perps are ranked on one volume scale (`spotMetaAndAssetCtxs`): with a 4-subscription budget the quiet
    HYPE spot pair starts uncovered (3 coins and the canary); once it out-trades the covered perps, the next
    refresh puts it on the tape and a whale's spot trade there comes out as a tape signal."""
    wide = {"subscription_budget": 4, "universe_refresh": 0.3}
    async with stack(planner=False, precise=False, user_slots=9, wide=wide) as s:
        await watched(s, W1)
        assert "@107" in s.tape.uncovered()
        mover = s.sim.exchange.whale(W2)  # not watched: only makes the pair the busiest market
        await mover.market_order("@107", True, "100000", "40")
        await wait_until(lambda: "@107" not in s.tape.uncovered(), within=10)
        assert metric_value(s.metrics, "tape_uncovered_coins") == 6
        await tape_live(s)
        await s.sim.exchange.whale(W1).market_order("@107", True, "10", "40")
        await wait_until(lambda: [x.coin for x in s.of(W1, "market_tape")] == ["@107"])
        [sig] = s.of(W1, "market_tape")
        assert (sig.asset_type, sig.direction, sig.side, sig.size, sig.price) == (
            "spot",
            "open",
            "LONG",
            Decimal(10),
            Decimal(40),
        )


async def test_reconciling_a_thousand_addresses_never_exceeds_the_rest_budget() -> None:
    """1000 wide addresses asking for reads at full speed: the window holds, and precise recovery still gets in."""
    clock = ManualClock()
    addresses = [f"0x{i:040x}" for i in range(1, 1001)]
    # No tape connections (user_slots = max_connections): this is about the REST side only.
    wide = {"rest_share": 1.0, "reconcile_interval": 30.0, "reconcile_settle": 0.01}
    # A quarter of the real REST budget (both sides agree) keeps the test fast; the arithmetic is the same.
    limit = 300
    sim_config = SimConfig(rest_weight_per_minute=limit)
    async with stack(
        planner=False, precise=False, user_slots=10, wide=wide, clock=clock, sim_config=sim_config,
        rest_weight_per_minute=limit,
    ) as s:  # fmt: skip
        watch(s, *addresses)
        s.sim.exchange.whale(addresses[0])  # one account with balances; the rest are empty
        capacity = s.cfg.rest_weight_per_minute
        for step in range(140):  # 70 s in half-second steps
            clock.advance(0.5)
            await asyncio.sleep(0.001)
            # Until the manager waits for the clock again (its pacing, or the budget window).
            await wait_until(lambda: s.wide.sleeping or s.budgets.snapshot()["rest_weight"]["waiting"] > 0)
            assert s.budgets.snapshot()["rest_weight"]["used"] <= capacity
            if step == 100:
                # Gap recovery of a precise whale (high priority) is served at once, without the clock moving.
                async with asyncio.timeout(1.0):
                    await s.info.clearinghouse_state(addresses[0], priority="high")
        assert s.sim.stats.rest_429s == 0
        # Low priority may fill 3/4 of the window: 225 weight a minute (80 went to the coin list) → ~24 reads.
        low = limit * 3 // 4
        assert (low - 80) // s.wide.read_weight() - 1 <= s.wide.reads <= 2 * low // s.wide.read_weight()
        await wait_until(lambda: sum(s.tracker.is_bootstrapped(a) for a in addresses) == s.wide.reads)
        assert s.wide.effective_interval() == 1000 * s.wide.read_weight() / (limit / 60)
        assert s.wide.status()["addresses"] == 1000


async def test_tier_moves_lose_and_duplicate_no_signal() -> None:
    """W1 starts precise, is pushed to wide by a higher-priority W2, then comes back; every fill once."""
    async with stack(WatchedAddress(address=W1, priority=1), user_slots=1) as s:
        assert s.precise is not None
        await tape_live(s)
        await wait_until(lambda: s.planner.tier(W1) == "precise")
        await bootstrapped(s, W1)
        whale = s.sim.exchange.whale(W1)

        async def trade(coin: str, buy: bool, sz: str, px: str) -> None:
            await whale.market_order(coin, buy, sz, px, fills=2)
            await asyncio.sleep(0.01)

        await trade("BTC", True, "1", "80000")  # precise
        s.source.entries = [WatchedAddress(address=W1, priority=1), WatchedAddress(address=W2, priority=5)]
        s.book.refresh_now()
        await trade("ETH", True, "2", "2300")  # during the handover to wide
        await wait_until(lambda: s.planner.tier(W1) == "wide")
        await trade("ETH", False, "1", "2310")  # wide
        await trade("BTC", True, "0.5", "80050")
        s.source.entries = [WatchedAddress(address=W1, priority=1)]
        s.book.refresh_now()
        await trade("SOL", False, "3", "95")  # during the handover back to precise
        await wait_until(lambda: s.planner.tier(W1) == "precise")
        await trade("SOL", True, "1", "94")  # precise again
        await trade("ETH", False, "1", "2320")
        await wait_until(lambda: signals_by_block(s.of(W1)) == fills_by_block(s.sim, W1), within=8)
        # Quiet point: a marker order that both the user stream and the tape see after everything above. Once
        # its signal is out, the tape has read past it and no block is still settling, a duplicate of any
        # earlier block would already be among the signals.
        tape_before = metric_value(s.metrics, "trades_processed_total", type="tape")
        await trade("BTC", True, "0.1", "80060")
        truth = fills_by_block(s.sim, W1)

        def quiet() -> bool:
            tape_read = metric_value(s.metrics, "trades_processed_total", type="tape") >= tape_before + MARKER_FILLS
            return tape_read and s.tracker.open_blocks() == 0 and len(signals_by_block(s.of(W1))) >= len(truth)

        await wait_until(quiet, what="the marker order through both tiers")
        assert signals_by_block(s.of(W1)) == truth
        ids = [x.signal_id for x in s.of(W1)]
        assert len(ids) == len(set(ids))
        sources = {x.source for x in s.of(W1)}
        assert sources == {"user_fills", "market_tape"}
        # Every signal is counted once, by the one sink, whichever tier built it.
        assert built_by_source(s) == Counter(x.source for x in s.signals)
        assert s.planner.handovers == {"to_precise": 2, "to_wide": 1}  # the first one at start
        assert s.planner.tiers() == {W1: "precise"}
