"""The simulator's positions: its ledger follows the exchange's rules, and every state frame carries the ledger.

The rules are in the docstring of `hl_monitor.sim.exchange`. Ledger tests drive `Exchange` directly and check
numbers worked out by hand (or by what a rule means: at the liquidation price equity equals maintenance
margin). Wire tests decode the sim's WS and REST answers with `hl_monitor.hyperliquid.protocol` and compare
every field with the ledger (`Exchange.dex_view`). The last test feeds the sim's frames to the service's own
`PositionModel` and expects the sim's numbers back exactly.

The ledger tests are coroutines too although they never await: a plain test ahead of the first async one
leaves the event loop the looptime plugin makes for it unclosed, which fails a later test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect

from hl_monitor.hyperliquid.protocol import (
    AllDexsClearinghouseStateFrame,
    AllMidsFrame,
    ClearinghouseState,
    ClearinghouseStateFrame,
    CumFunding,
    ErrorFrame,
    Frame,
    Leverage,
    MarginSummary,
    PongFrame,
    Position,
    SpotState,
    SpotStateFrame,
    SubscriptionResponseFrame,
    UserEventsFrame,
    UserFillsFrame,
    decode_frame,
    decode_info,
)
from hl_monitor.sim.exchange import (
    DEFAULT_DEX_USDC,
    DexView,
    Exchange,
    PositionView,
    SpotBalanceView,
    wire_decimal,
)
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.tracking.portfolio import PositionChanges, PositionModel
from hl_monitor.tracking.position_events import PerpPosition

W1 = "0x" + "a1" * 20
W2 = "0x" + "b2" * 20
RECV_TIMEOUT = 3.0
NEVER = 3600.0  # a push interval no test reaches: the test pushes state itself
FAST = 0.05  # a push interval short enough to see several pushes within a test
# Liquidation prices are divisions rounded to 28 significant digits: at that price, equity and maintenance
# margin agree to far better than a millionth of a cent.
LIQ_TOLERANCE = Decimal("1e-12")
D = Decimal  # short, for the many exact expectations below


def ledger_value(ex: Exchange, user: str, dex: str = "") -> Decimal:
    """deposit + closed PnL − fees − funding + Σ unrealized PnL: what account value must be."""
    ledger = ex.accounts[user].dexes[dex]
    upnl = sum((p.unrealized_pnl for p in ex.dex_view(user, dex).positions), Decimal(0))
    return ledger.deposited + ledger.realized_pnl - ledger.fees - ledger.funding + upnl


def view(ex: Exchange, user: str, coin: str) -> PositionView:
    position = ex.position_view(user, coin)
    assert position is not None, f"{user} holds no {coin}"
    return position


# ---------------------------------------------------------------------------------------- ledger rules


async def test_entry_price_and_cash_through_open_increase_reduce_flip_close() -> None:
    ex = Exchange(seed=1)
    w = ex.whale(W1, usdc="1000")
    ex.market_order(W1, "ETH", True, "1", "2000")
    opened = view(ex, W1, "ETH")
    assert (opened.szi, opened.entry_px, opened.mark_px, opened.position_value) == (D(1), D(2000), D(2000), D(2000))
    assert (opened.leverage_type, opened.leverage, opened.max_leverage) == ("cross", 10, 25)
    assert opened.margin_used == 200  # 2000 / 10
    assert opened.maintenance_margin == 40  # 2000 / (2 · 25)
    ex.market_order(W1, "ETH", True, "3", "2400")
    assert view(ex, W1, "ETH").entry_px == 2300  # (1·2000 + 3·2400) / 4
    ex.market_order(W1, "ETH", False, "2", "2500")
    assert (view(ex, W1, "ETH").szi, view(ex, W1, "ETH").entry_px) == (D(2), D(2300))  # a reduce keeps the entry
    ex.market_order(W1, "ETH", False, "5", "2200")
    flipped = view(ex, W1, "ETH")
    assert (flipped.szi, flipped.entry_px) == (D(-3), D(2200))  # a flip starts at the fill price
    assert flipped.unrealized_pnl == 0
    ex.market_order(W1, "ETH", True, "3", "2100")
    assert ex.position_view(W1, "ETH") is None
    assert w.position("ETH") == 0
    fills = list(ex.accounts[W1].fills)
    assert [Decimal(f.closed_pnl) for f in fills] == [0, 0, 400, -200, 300]
    fees = sum((Decimal(f.fee) for f in fills), Decimal(0))
    flat = ex.dex_view(W1, "")
    assert flat.account_value == 1000 + 500 - fees
    assert flat.positions == ()
    assert (flat.total_ntl_pos, flat.total_margin_used, flat.cross_maintenance_margin_used) == (D(0), D(0), D(0))
    assert flat.withdrawable == flat.account_value


async def test_cross_liquidation_price_is_where_equity_meets_maintenance_and_a_mark_move_keeps_it() -> None:
    ex = Exchange(seed=1)
    ex.whale(W1, usdc="1000")
    ex.market_order(W1, "ETH", True, "1", "2000")  # fee 0.9: cash 999.1
    before = view(ex, W1, "ETH")
    assert before.liquidation_px == Decimal("1000.9") / Decimal("0.98")  # (2000 − 999.1) / (1 − 1/50)
    assert before.liquidation_distance is not None
    ex.set_mid("ETH", "1500")
    after = view(ex, W1, "ETH")
    assert after.mark_px == 1500
    assert after.unrealized_pnl == -500
    assert after.return_on_equity == Decimal("-2.5")  # −500 / (1·2000 / 10)
    assert after.position_value == 1500
    assert after.margin_used == 150
    assert after.liquidation_px == before.liquidation_px
    assert after.liquidation_distance is not None
    assert after.liquidation_distance < before.liquidation_distance
    assert before.liquidation_px is not None
    ex.set_mid("ETH", before.liquidation_px)
    at_liq = ex.dex_view(W1, "")
    assert abs(at_liq.cross_account_value - at_liq.cross_maintenance_margin_used) < LIQ_TOLERANCE
    assert ex.dex_view(W1, "").account_value == ledger_value(ex, W1)


async def test_short_liquidation_price_is_above_the_mark_and_a_rich_long_has_none() -> None:
    ex = Exchange(seed=1)
    ex.whale(W1, usdc="2000")
    ex.market_order(W1, "BTC", False, "0.1", "80000")
    short = view(ex, W1, "BTC")
    assert short.liquidation_px is not None
    assert short.liquidation_px > short.mark_px
    ex.set_mid("BTC", short.liquidation_px)
    at_liq = ex.dex_view(W1, "")
    assert abs(at_liq.cross_account_value - at_liq.cross_maintenance_margin_used) < LIQ_TOLERANCE
    ex.whale(W2)  # a million dollars behind a 2000-dollar position: the price would have to go below 0
    ex.market_order(W2, "ETH", True, "1", "2000")
    assert view(ex, W2, "ETH").liquidation_px is None


async def test_cross_liquidation_price_counts_the_other_cross_positions() -> None:
    ex = Exchange(seed=1)
    ex.whale(W1, usdc="1500")
    ex.market_order(W1, "ETH", True, "1", "2000")
    alone = view(ex, W1, "ETH").liquidation_px
    ex.market_order(W1, "SOL", True, "10", "95")
    ex.set_mid("SOL", "80")  # the SOL loss eats the cushion of the ETH position
    both = view(ex, W1, "ETH").liquidation_px
    assert alone is not None
    assert both is not None
    assert both > alone
    ex.set_mid("ETH", both)
    at_liq = ex.dex_view(W1, "")
    assert abs(at_liq.cross_account_value - at_liq.cross_maintenance_margin_used) < LIQ_TOLERANCE


async def test_isolated_position_holds_its_own_margin() -> None:
    ex = Exchange(seed=1)
    w = ex.whale(W1, usdc="10000")
    w.set_leverage("ETH", 5, "isolated")
    ex.market_order(W1, "ETH", True, "2", "2000")  # fee 1.8; margin 2·2000/5 = 800
    iso = view(ex, W1, "ETH")
    assert (iso.leverage_type, iso.leverage, iso.isolated_margin) == ("isolated", 5, D(800))
    assert iso.margin_used == 800
    assert iso.raw_usd == 800 - 4000
    assert iso.liquidation_px == Decimal(3200) / Decimal("1.96")  # (2·2000 − 800) / (2 − 2/50)
    dex = ex.dex_view(W1, "")
    assert dex.cross_account_value == Decimal("9198.2")  # 10000 − 800 − 1.8
    assert dex.account_value == Decimal("9998.2")
    assert (dex.cross_ntl_pos, dex.cross_margin_used, dex.cross_maintenance_margin_used) == (D(0), D(0), D(0))
    assert (dex.total_ntl_pos, dex.total_margin_used) == (D(4000), D(800))
    assert dex.withdrawable == Decimal("9198.2")
    ex.set_mid("ETH", "1800")
    moved = view(ex, W1, "ETH")
    assert moved.margin_used == 400  # the margin plus a 400 loss
    assert moved.return_on_equity == Decimal(-400) / 800
    assert moved.liquidation_px == iso.liquidation_px
    assert ex.dex_view(W1, "").account_value == ledger_value(ex, W1)
    assert iso.liquidation_px is not None
    ex.set_mid("ETH", iso.liquidation_px)
    at_liq = view(ex, W1, "ETH")
    assert abs(at_liq.isolated_margin + at_liq.unrealized_pnl - at_liq.maintenance_margin) < LIQ_TOLERANCE
    ex.set_mid("ETH", "2000")
    ex.market_order(W1, "ETH", True, "2", "2200")
    assert view(ex, W1, "ETH").isolated_margin == 800 + 880  # 2·2200/5 more
    ex.market_order(W1, "ETH", False, "1", "2100")
    assert view(ex, W1, "ETH").isolated_margin == 1680 - 420  # a quarter of the size gives back a quarter
    ex.market_order(W1, "ETH", False, "3", "2100")
    assert ex.accounts[W1].dexes[""].cash == ex.dex_view(W1, "").account_value  # all margin back


async def test_isolated_and_cross_side_by_side() -> None:
    """The same trade on two whales, one isolated and one cross: the same PnL, different margin and risk."""
    ex = Exchange(seed=1)
    ex.whale(W1, usdc="5000").set_leverage("SOL", 4, "isolated")
    ex.whale(W2, usdc="5000").set_leverage("SOL", 4)
    for user in (W1, W2):
        ex.market_order(user, "SOL", False, "100", "95")
    ex.set_mid("SOL", "100")
    iso, cross = view(ex, W1, "SOL"), view(ex, W2, "SOL")
    assert iso.unrealized_pnl == cross.unrealized_pnl == -500
    assert iso.return_on_equity == cross.return_on_equity == Decimal(-500) / Decimal(2375)
    assert cross.margin_used == Decimal(10000) / 4
    assert iso.margin_used == Decimal(2375) - 500
    assert cross.raw_usd is None
    assert iso.raw_usd == Decimal(2375) + 9500
    assert iso.liquidation_px is not None
    assert cross.liquidation_px is not None
    assert iso.liquidation_px < cross.liquidation_px  # the cross short has the whole account behind it
    assert ex.dex_view(W1, "").cross_ntl_pos == 0
    assert ex.dex_view(W2, "").cross_ntl_pos == 10000


async def test_leverage_changes() -> None:
    ex = Exchange(seed=1)
    w = ex.whale(W1, usdc="1000")
    ex.market_order(W1, "ETH", True, "1", "2000")
    ex.set_mid("ETH", "2100")
    at10 = view(ex, W1, "ETH")
    w.set_leverage("ETH", 20)
    at20 = view(ex, W1, "ETH")
    assert (at10.leverage, at20.leverage) == (10, 20)
    assert (at10.margin_used, at20.margin_used) == (D(210), D(105))
    assert (at10.return_on_equity, at20.return_on_equity) == (D("0.5"), D(1))
    assert at20.liquidation_px == at10.liquidation_px  # cross: the account, not the leverage, sets it
    with pytest.raises(ValueError, match="open position"):
        w.set_leverage("ETH", 5, "isolated")
    with pytest.raises(ValueError, match=r"1\.\.25"):
        w.set_leverage("ETH", 26)
    with pytest.raises(ValueError, match=r"1\.\.25"):
        w.set_leverage("ETH", 0)
    with pytest.raises(ValueError, match="leverage type"):
        w.set_leverage("BTC", 5, "portfolio")
    with pytest.raises(ValueError, match="unknown perp"):
        w.set_leverage("@107", 5)
    w.set_leverage("BTC", 10, "isolated")
    ex.market_order(W1, "BTC", True, "0.01", "80000")
    assert view(ex, W1, "BTC").isolated_margin == 80
    cash = ex.accounts[W1].dexes[""].cash
    w.set_leverage("BTC", 40, "isolated")
    assert view(ex, W1, "BTC").isolated_margin == 20  # reset to |szi|·entry / 40
    assert ex.accounts[W1].dexes[""].cash == cash + 60
    assert ex.dex_view(W1, "").account_value == ledger_value(ex, W1)


async def test_funding_accrues_into_cum_funding_and_cash() -> None:
    ex = Exchange(seed=1)
    ex.whale(W1, usdc="10000")
    ex.whale(W2, usdc="10000")
    ex.market_order(W1, "ETH", True, "2", "2000")
    ex.market_order(W2, "ETH", False, "2", "2000")
    cash = ex.accounts[W1].dexes[""].cash
    ex.apply_funding("ETH", "0.0001")  # 2 · 2000 · 0.0001 = 0.4
    long, short = view(ex, W1, "ETH"), view(ex, W2, "ETH")
    assert (long.funding_all_time, long.funding_since_open, long.funding_since_change) == (
        Decimal("0.4"),
        Decimal("0.4"),
        Decimal("0.4"),
    )
    assert short.funding_since_open == Decimal("-0.4")  # the short side receives it
    assert ex.accounts[W1].dexes[""].cash == cash - Decimal("0.4")
    ex.market_order(W1, "ETH", True, "1", "2000")
    grown = view(ex, W1, "ETH")
    assert (grown.funding_since_open, grown.funding_since_change) == (D("0.4"), D(0))
    ex.market_order(W1, "ETH", False, "3", "2000")
    ex.market_order(W1, "ETH", True, "1", "2000")
    reopened = view(ex, W1, "ETH")
    assert (reopened.funding_all_time, reopened.funding_since_open) == (D("0.4"), D(0))
    assert ex.dex_view(W1, "").account_value == ledger_value(ex, W1)
    with pytest.raises(ValueError, match="unknown perp"):
        ex.apply_funding("PURR/USDC", "0.0001")


async def test_spot_balances_follow_fills_and_resting_orders() -> None:
    ex = Exchange(seed=1)
    w = ex.whale(W1, spot_usdc="1000")
    ex.market_order(W1, "PURR/USDC", True, "1000", "0.05")
    sell = ex.limit_order(W1, "PURR/USDC", False, "300", "0.06")
    ex.limit_order(W1, "@107", True, "10", "39")
    ex.fill_order(W1, sell, "100")
    balances = {b.coin: b for b in ex.spot_view(W1)}
    fees = sum((Decimal(f.fee) for f in ex.accounts[W1].fills), Decimal(0))
    assert balances["PURR"] == SpotBalanceView("PURR", 1, Decimal(900), Decimal(200), Decimal(45))
    assert balances["USDC"] == SpotBalanceView("USDC", 0, 1000 - 50 + 6 - fees, Decimal(390), Decimal(0))
    assert w.spot_balance("PURR") == 900
    assert "HYPE" not in balances  # nothing bought yet


async def test_state_time_comes_before_every_later_fill() -> None:
    """A fill in the millisecond of a state is stamped after it: a client may take fills at or before a
    state's time as included in it."""
    ex = Exchange(seed=1, clock=lambda: 1_800_000_000.0)
    ex.market_order(W1, "ETH", True, "1", "2000")
    state = ex.clearinghouse_state(W1)
    ex.market_order(W1, "ETH", True, "1", "2000")
    (first, second) = ex.accounts[W1].fills
    assert first.time <= state.time < second.time
    assert ex.clearinghouse_state(W1).time >= second.time


# ---------------------------------------------------------------------------------------- the wire


def assert_position(wire: Position, ledger: PositionView) -> None:
    assert wire.coin == ledger.coin
    assert wire.szi == ledger.szi
    assert wire.entry_px == ledger.entry_px
    assert wire.leverage == Leverage(type=ledger.leverage_type, value=ledger.leverage, raw_usd=ledger.raw_usd)
    assert wire.liquidation_px == ledger.liquidation_px
    assert wire.margin_used == ledger.margin_used
    assert wire.max_leverage == ledger.max_leverage
    assert wire.position_value == ledger.position_value
    assert wire.return_on_equity == ledger.return_on_equity
    assert wire.unrealized_pnl == ledger.unrealized_pnl
    assert wire.cum_funding == CumFunding(
        all_time=ledger.funding_all_time,
        since_open=ledger.funding_since_open,
        since_change=ledger.funding_since_change,
    )


def assert_state(state: ClearinghouseState, ledger: DexView) -> None:
    assert state.margin_summary == MarginSummary(
        account_value=ledger.account_value,
        total_ntl_pos=ledger.total_ntl_pos,
        total_raw_usd=ledger.total_raw_usd,
        total_margin_used=ledger.total_margin_used,
    )
    assert state.cross_margin_summary == MarginSummary(
        account_value=ledger.cross_account_value,
        total_ntl_pos=ledger.cross_ntl_pos,
        total_raw_usd=ledger.cross_raw_usd,
        total_margin_used=ledger.cross_margin_used,
    )
    assert state.cross_maintenance_margin_used == ledger.cross_maintenance_margin_used
    assert state.withdrawable == ledger.withdrawable
    assert state.time > 0
    assert [a.position.coin for a in state.asset_positions] == [p.coin for p in ledger.positions]
    for asset, position in zip(state.asset_positions, ledger.positions, strict=True):
        assert asset.type == "oneWay"
        assert_position(asset.position, position)


async def subscribe(ws: ClientConnection, sub: dict[str, Any], beside: tuple[type[Frame], ...] = ()) -> Frame:
    """Subscribe; return the initial state frame after the ack. `beside`: frame types of subscriptions already open
    on `ws`, whose pushes may arrive before the ack or between it and the initial frame (skipped)."""

    async def recv() -> Frame:
        while True:
            frame = decode_frame(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT))
            if not isinstance(frame, beside):
                return frame

    await ws.send(json.dumps({"method": "subscribe", "subscription": sub}))
    ack = await recv()
    assert isinstance(ack, SubscriptionResponseFrame), ack
    return await recv()


async def next_frame(ws: ClientConnection, kind: type[Frame]) -> Any:
    """The next frame of type `kind`, skipping others."""
    async with asyncio.timeout(RECV_TIMEOUT):
        while True:
            frame = decode_frame(await ws.recv())
            if isinstance(frame, kind):
                return frame


async def rest(http: aiohttp.ClientSession, sim: SimServer, body: dict[str, Any]) -> bytes:
    async with http.post(sim.info_url, json=body) as resp:
        assert resp.status == 200
        return await resp.read()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


Step = Callable[[], Awaitable[object]]


async def test_every_state_answer_carries_the_ledger(http: aiohttp.ClientSession) -> None:
    """allDexsClearinghouseState and clearinghouseState (WS, both dexes) and REST clearinghouseState carry
    every field of the ledger after an open, an increase, a reduce, a flip, a close, a leverage change, a
    funding payment, a mark move, on cross and isolated positions."""
    config = SimConfig(clearinghouse_push_interval=NEVER, all_mids_interval=NEVER)
    async with SimServer(config) as sim, connect(sim.ws_url) as ws:
        ex = sim.exchange
        w = ex.whale(W1, usdc="20000")
        first = await subscribe(ws, {"type": "allDexsClearinghouseState", "user": W1})
        core = await subscribe(ws, {"type": "clearinghouseState", "user": W1})
        xyz = await subscribe(ws, {"type": "clearinghouseState", "user": W1, "dex": "xyz"})
        assert isinstance(first, AllDexsClearinghouseStateFrame)
        assert isinstance(core, ClearinghouseStateFrame)
        assert isinstance(xyz, ClearinghouseStateFrame)
        assert first.data.clearinghouse_states[1][1].margin_summary.account_value == DEFAULT_DEX_USDC
        steps: list[tuple[str, Step]] = [
            ("open", lambda: w.market_order("ETH", True, "2", "2000", fills=2)),
            ("increase", lambda: w.market_order("ETH", True, "1", "2300")),
            ("reduce", lambda: w.market_order("ETH", False, "1", "2200")),
            ("isolated", lambda: _isolated_short(w)),
            ("builder dex", lambda: w.market_order("xyz:TSLA", True, "3", "420")),
            ("leverage", lambda: _set_leverage(w, "ETH", 3)),
            ("funding", lambda: _funding(ex, "BTC", "0.0002")),
            ("mark move", lambda: _set_mid(ex, "ETH", "1700")),
            ("flip", lambda: w.market_order("ETH", False, "5", "1750")),
            ("close", lambda: w.close("ETH", "1800")),
            ("close all", lambda: _close_all(w)),
        ]
        for name, step in steps:
            await step()
            sim.push_state()
            frame: AllDexsClearinghouseStateFrame = await next_frame(ws, AllDexsClearinghouseStateFrame)
            one: ClearinghouseStateFrame = await next_frame(ws, ClearinghouseStateFrame)
            other: ClearinghouseStateFrame = await next_frame(ws, ClearinghouseStateFrame)
            states = dict(frame.data.clearinghouse_states)
            assert list(states) == ["", "xyz"], name
            by_dex = {one.data.dex: one.data.clearinghouse_state, other.data.dex: other.data.clearinghouse_state}
            for dex in ("", "xyz"):
                ledger = ex.dex_view(W1, dex)
                assert ledger.account_value == ledger_value(ex, W1, dex), name
                assert_state(states[dex], ledger)
                assert_state(by_dex[dex], ledger)
                body = {"type": "clearinghouseState", "user": W1, "dex": dex}
                assert_state(decode_info(await rest(http, sim, body), ClearinghouseState), ledger)
        assert ex.accounts[W1].positions == {}
        raw = msgspec.json.decode(await rest(http, sim, {"type": "clearinghouseState", "user": W1}))
    assert raw["assetPositions"] == []
    assert raw["marginSummary"] == raw["crossMarginSummary"]


async def _isolated_short(w: Any) -> None:
    w.set_leverage("BTC", 8, "isolated")
    await w.market_order("BTC", False, "0.05", "80000")


async def _set_leverage(w: Any, coin: str, value: int) -> None:
    w.set_leverage(coin, value)


async def _funding(ex: Exchange, coin: str, rate: str) -> None:
    ex.apply_funding(coin, rate)


async def _set_mid(ex: Exchange, coin: str, px: str) -> None:
    ex.set_mid(coin, px)


async def _close_all(w: Any) -> None:
    for coin in ("BTC", "xyz:TSLA"):
        await w.close(coin, "80000" if coin == "BTC" else "400")


async def test_wire_shapes_match_the_exchange(http: aiohttp.ClientSession) -> None:
    """liquidationPx is present and null when there is none; isolated leverage carries rawUsd, cross does
    not; numbers are plain decimal strings; spot balances carry hold and entryNtl."""
    async with SimServer(SimConfig(clearinghouse_push_interval=NEVER)) as sim:
        ex = sim.exchange
        w = ex.whale(W1)
        await w.market_order("ETH", True, "1", "2000")  # a million behind it: no liquidation price
        w.set_leverage("SOL", 5, "isolated")
        await w.market_order("SOL", True, "10", "95")
        await w.market_order("PURR/USDC", True, "1000", "0.05")
        await w.limit_order("PURR/USDC", False, "250", "0.07")
        state = msgspec.json.decode(await rest(http, sim, {"type": "clearinghouseState", "user": W1}))
        spot_raw = await rest(http, sim, {"type": "spotClearinghouseState", "user": W1})
        async with connect(sim.ws_url) as ws:
            pushed = await subscribe(ws, {"type": "spotState", "user": W1})
    positions = {a["position"]["coin"]: a["position"] for a in state["assetPositions"]}
    assert positions["ETH"]["liquidationPx"] is None
    assert positions["ETH"]["leverage"] == {"type": "cross", "value": 10}
    assert positions["SOL"]["leverage"] == {"type": "isolated", "value": 5, "rawUsd": "-760.0"}  # 190 − 950
    assert isinstance(positions["SOL"]["liquidationPx"], str)
    assert positions["SOL"]["cumFunding"] == {"allTime": "0.0", "sinceOpen": "0.0", "sinceChange": "0.0"}
    assert set(state) == {
        "marginSummary",
        "crossMarginSummary",
        "crossMaintenanceMarginUsed",
        "withdrawable",
        "assetPositions",
        "time",
    }
    assert state["marginSummary"]["accountValue"] == wire_decimal(ex.dex_view(W1, "").account_value)
    spot = decode_info(spot_raw, SpotState)
    assert isinstance(pushed, SpotStateFrame)
    assert pushed.data.spot_state == spot
    ledger = {b.coin: b for b in ex.spot_view(W1)}
    for balance in spot.balances:
        expected = ledger[balance.coin]
        assert (balance.token, balance.total, balance.hold, balance.entry_ntl) == (
            expected.token,
            expected.total,
            expected.hold,
            expected.entry_ntl,
        )
    assert ledger["PURR"].hold == 250


async def test_mark_move_toward_liquidation_over_the_wire() -> None:
    """A script drives the mark toward the liquidation price without trading: allMids moves, the next state
    shows the new PnL and ROE, the same liquidation price and a smaller distance."""
    config = SimConfig(clearinghouse_push_interval=NEVER, all_mids_interval=NEVER)
    async with SimServer(config) as sim, connect(sim.ws_url) as ws:
        ex = sim.exchange
        w = ex.whale(W1, usdc="1500")
        await w.market_order("ETH", True, "1", "2000")
        await subscribe(ws, {"type": "allMids"})
        first = await subscribe(ws, {"type": "allDexsClearinghouseState", "user": W1})
        assert isinstance(first, AllDexsClearinghouseStateFrame)
        before = dict(first.data.clearinghouse_states)[""].positions()["ETH"]
        assert before.liquidation_px is not None
        marks = []
        for px in ("1800", "1500"):
            ex.set_mid("ETH", px)
            mids: AllMidsFrame = await next_frame(ws, AllMidsFrame)
            marks.append(mids.data.mids["ETH"])
            sim.push_state()
            state: AllDexsClearinghouseStateFrame = await next_frame(ws, AllDexsClearinghouseStateFrame)
            after = dict(state.data.clearinghouse_states)[""].positions()["ETH"]
            assert after.unrealized_pnl == Decimal(px) - 2000
            assert after.return_on_equity == (Decimal(px) - 2000) / 200
            assert after.liquidation_px == before.liquidation_px
            assert after.position_value == Decimal(px)
        distance = [abs(m - before.liquidation_px) / m for m in (Decimal(2000), *marks)]
    assert marks == [1800, 1500]
    assert distance == sorted(distance, reverse=True)


async def test_all_mids_subscription(http: aiohttp.ClientSession) -> None:
    """allMids is acked with its echo, sends the map at once, again on every mid move of its dex and at the
    configured interval; it takes a subscription slot but no user slot; REST allMids agrees."""
    config = SimConfig(clearinghouse_push_interval=NEVER, all_mids_interval=FAST, max_users=1)
    async with SimServer(config) as sim, connect(sim.ws_url) as ws, connect(sim.ws_url) as ws2:
        ex = sim.exchange
        await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "allMids"}}))
        ack = decode_frame(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT))
        assert isinstance(ack, SubscriptionResponseFrame)
        assert ack.data.subscription == {"type": "allMids"}
        initial = decode_frame(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT))
        assert isinstance(initial, AllMidsFrame)
        assert initial.data.dex is None
        assert initial.data.mids["ETH"] == 2300
        assert "xyz:TSLA" not in initial.data.mids
        assert "@107" in initial.data.mids
        builder = await subscribe(ws2, {"type": "allMids", "dex": "xyz"})
        assert isinstance(builder, AllMidsFrame)
        assert builder.data.dex == "xyz"
        assert set(builder.data.mids) == {"xyz:XYZ100", "xyz:TSLA"}
        # The builder dex's allMids keeps pushing every FAST seconds on ws2 meanwhile.
        user_state = await subscribe(ws2, {"type": "allDexsClearinghouseState", "user": W1}, beside=(AllMidsFrame,))
        assert isinstance(user_state, AllDexsClearinghouseStateFrame)  # allMids took no user slot
        ex.set_mid("xyz:TSLA", "433.5")
        async with asyncio.timeout(RECV_TIMEOUT):
            moved: AllMidsFrame = await next_frame(ws2, AllMidsFrame)
            while moved.data.mids["xyz:TSLA"] != Decimal("433.5"):  # pushes sent before the move come first
                moved = await next_frame(ws2, AllMidsFrame)
        assert moved.data.dex == "xyz"
        ex.set_mid("ETH", "2345.6")
        await ex.whale(W2).market_order("SOL", True, "1", "96.5", fills=3)
        seen: AllMidsFrame = await next_frame(ws, AllMidsFrame)
        while seen.data.mids["SOL"] != Decimal("96.5"):
            seen = await next_frame(ws, AllMidsFrame)
        assert seen.data.mids["ETH"] == Decimal("2345.6")
        assert sim.connections[0].subscriptions == [{"type": "allMids"}]
        mids = msgspec.json.decode(await rest(http, sim, {"type": "allMids"}))
        builder_mids = msgspec.json.decode(await rest(http, sim, {"type": "allMids", "dex": "xyz"}))
        await ws2.send(json.dumps({"method": "subscribe", "subscription": {"type": "userFills", "user": W2}}))
        refused: ErrorFrame = await next_frame(ws2, ErrorFrame)
    assert mids["ETH"] == "2345.6"
    assert mids["SOL"] == "96.5"
    assert builder_mids == {"xyz:XYZ100": "25000.0", "xyz:TSLA": "433.5"}
    assert refused.kind == "user_cap"


async def test_all_mids_takes_a_subscription_slot() -> None:
    async with SimServer(SimConfig(max_subscriptions=1)) as sim, connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "allMids"})
        await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "trades", "coin": "ETH"}}))
        refused: ErrorFrame = await next_frame(ws, ErrorFrame)
    assert refused.data == "Cannot subscribe to more than 1 total subscriptions."


async def test_all_mids_pushed_at_the_interval_without_moves() -> None:
    async with (
        SimServer(SimConfig(clearinghouse_push_interval=NEVER, all_mids_interval=FAST)) as sim,
        connect(sim.ws_url) as ws,
    ):
        initial = await subscribe(ws, {"type": "allMids"})
        repeats = [await next_frame(ws, AllMidsFrame) for _ in range(2)]
    assert isinstance(initial, AllMidsFrame)
    assert [r.data for r in repeats] == [initial.data, initial.data]


async def test_funding_payment_reaches_the_user_channel() -> None:
    async with SimServer(SimConfig(clearinghouse_push_interval=NEVER)) as sim, connect(sim.ws_url) as ws:
        w = sim.exchange.whale(W1)
        await w.market_order("ETH", False, "2", "2000")
        await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "userEvents", "user": W1}}))
        await next_frame(ws, SubscriptionResponseFrame)
        sim.exchange.apply_funding("ETH", "0.0001")
        event: UserEventsFrame = await next_frame(ws, UserEventsFrame)
    funding = event.data.funding
    assert funding is not None
    assert (funding.coin, funding.usdc, funding.szi, funding.funding_rate) == (
        "ETH",
        Decimal("0.4"),  # a short receives positive funding
        Decimal(-2),
        Decimal("0.0001"),
    )


# ---------------------------------------------------------------------------------------- the service's model


class ModelFeed:
    """Applies every frame of one connection, in arrival order, to a `PositionModel` (as the service does)."""

    def __init__(self, ws: ClientConnection, model: PositionModel) -> None:
        self.ws = ws
        self.model = model
        self.events: list[tuple[str, str]] = []  # (event, coin) in the order the model produced them
        self._clock = itertools.count(1)

    async def settle(self) -> None:
        """Apply everything the server sent before our ping (it answers in order)."""
        await self.ws.send('{"method":"ping"}')
        async with asyncio.timeout(RECV_TIMEOUT):
            while not isinstance(frame := decode_frame(await self.ws.recv()), PongFrame):
                self.apply(frame)

    def apply(self, frame: Frame) -> None:
        now = next(self._clock)
        changes: list[PositionChanges] = []
        match frame:
            case AllDexsClearinghouseStateFrame(data=data):
                changes.append(self.model.on_all_dexs_state(data, now))
            case AllMidsFrame(data=data):
                self.model.on_marks(data.mids, now)
            case UserFillsFrame(data=data) if not data.is_snapshot:
                changes.extend(self.model.on_fill(data.user, fill, now) for fill in data.fills)
            case _:
                pass
        self.events.extend((e.event, e.coin) for change in changes for e in change.events)


def model_position(model: PositionModel, coin: str) -> PerpPosition | None:
    portfolio = model.get(W1)
    assert portfolio is not None
    return portfolio.position(coin)


def assert_model_matches(model: PositionModel, ex: Exchange, *, after_state: bool, mark_move: bool = False) -> None:
    """The model's numbers equal the ledger's exactly: after a state frame all of them; before it the ones the
    model computes itself (leverage, margin used and the liquidation price wait for the state, except that a
    pure mark move keeps the liquidation price, so the model's distance must already be right)."""
    portfolio = model.get(W1)
    assert portfolio is not None
    for dex in ("", "xyz"):
        ledger = ex.dex_view(W1, dex)
        held = portfolio.dexes.get(dex)
        shown = held.positions if held is not None else {}
        assert set(shown) == {p.coin for p in ledger.positions}
        for expected in ledger.positions:
            got = shown[expected.coin]
            assert (got.size, got.entry_px, got.mark_px) == (expected.szi, expected.entry_px, expected.mark_px)
            assert (got.position_value_usd, got.unrealized_pnl) == (expected.position_value, expected.unrealized_pnl)
            if got.leverage == expected.leverage:  # a leverage change shows with the next state
                assert got.return_on_equity == expected.return_on_equity
            if mark_move:
                assert got.liquidation_px == expected.liquidation_px
            if got.liquidation_px is not None and got.liquidation_px == expected.liquidation_px:
                assert got.liquidation_distance == expected.liquidation_distance
            if after_state:
                assert (got.leverage_type, got.leverage, got.max_leverage) == (
                    expected.leverage_type,
                    expected.leverage,
                    expected.max_leverage,
                )
                assert got.return_on_equity == expected.return_on_equity
                assert got.liquidation_px == expected.liquidation_px
                assert got.liquidation_distance == expected.liquidation_distance
                assert got.margin_used == expected.margin_used
                assert got.cum_funding_since_open == expected.funding_since_open
        if after_state:
            assert held is not None
            assert (held.account_value, held.total_ntl_pos, held.total_margin_used) == (
                ledger.account_value,
                ledger.total_ntl_pos,
                ledger.total_margin_used,
            )
            assert (held.withdrawable, held.cross_maintenance_margin_used) == (
                ledger.withdrawable,
                ledger.cross_maintenance_margin_used,
            )


async def test_position_model_fed_with_sim_frames_reproduces_the_ledger() -> None:
    """userFills, allMids and allDexsClearinghouseState into `PositionModel`: after every step its
    positions and accounts equal the sim's ledger exactly (Decimal equality), and it saw each change once."""
    config = SimConfig(clearinghouse_push_interval=NEVER, all_mids_interval=NEVER)
    async with SimServer(config) as sim, connect(sim.ws_url) as ws:
        ex = sim.exchange
        w = ex.whale(W1, usdc="5000")
        model = PositionModel()
        feed = ModelFeed(ws, model)
        for sub in (
            {"type": "userFills", "user": W1},
            {"type": "allDexsClearinghouseState", "user": W1},
            {"type": "allMids"},
            {"type": "allMids", "dex": "xyz"},
        ):
            await ws.send(json.dumps({"method": "subscribe", "subscription": sub}))
        await feed.settle()
        # (step, whether it only moves a mark: then even the liquidation distance is right before the state)
        steps: list[tuple[Step, bool]] = [
            (lambda: w.market_order("ETH", True, "2", "2000", fills=2), False),
            (lambda: w.market_order("ETH", True, "1", "2300"), False),  # entry (2·2000 + 2300) / 3 = 2100
            (lambda: _set_mid(ex, "ETH", "1900"), True),
            (lambda: _set_leverage(w, "ETH", 20), False),
            (lambda: _funding(ex, "ETH", "0.0001"), False),
            (lambda: w.market_order("ETH", False, "1", "1950"), False),
            (lambda: _isolated_short(w), False),
            (lambda: w.market_order("xyz:XYZ100", True, "0.5", "25000", fills=2), False),
            (lambda: _set_mid(ex, "BTC", "82000"), True),
            (lambda: _set_mid(ex, "xyz:XYZ100", "24000"), True),
            (lambda: w.market_order("ETH", False, "5", "1900"), False),  # flip to a 3 ETH short
            (lambda: w.market_order("ETH", True, "1", "1800"), False),
            (lambda: w.close("ETH", "1850"), False),
            (lambda: w.close("BTC", "81000"), False),
        ]
        for step, mark_move in steps:
            await step()
            await feed.settle()
            assert_model_matches(model, ex, after_state=False, mark_move=mark_move)
            sim.push_state()
            await feed.settle()
            assert_model_matches(model, ex, after_state=True)
    assert feed.events == [
        ("opened", "ETH"),
        ("increased", "ETH"),
        ("increased", "ETH"),
        ("leverage_changed", "ETH"),
        ("reduced", "ETH"),
        ("opened", "BTC"),
        ("opened", "xyz:XYZ100"),
        ("increased", "xyz:XYZ100"),
        ("flipped", "ETH"),
        ("reduced", "ETH"),
        ("closed", "ETH"),
        ("closed", "BTC"),
    ]
    assert model.stats.drifts == 0  # every size change came from a fill the model applied before the state
    assert model.stats.covered_by_state == 0
    assert model.stats.bad_input == {}
    assert model_position(model, "ETH") is None
    assert model_position(model, "xyz:XYZ100") is not None
