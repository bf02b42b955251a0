"""Scenarios (deterministic ground truth), the exchange model's accounting, and the `hl-monitor sim` CLI."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import defaultdict
from decimal import Decimal

import aiohttp
import msgspec
import pytest
from websockets.asyncio.client import connect

from hl_monitor.hyperliquid.protocol import UserFillsFrame, decode_fills, decode_frame
from hl_monitor.sim.exchange import ZERO_HASH, Exchange, LeverageSetting, WireTrade, wire_decimal
from hl_monitor.sim.scenarios import (
    SCENARIOS,
    cascade_plan,
    cascade_setup,
    run_cascade,
    run_scenario,
    scenario_whales,
)
from hl_monitor.sim.server import SimConfig, SimServer
from tests.support.net import free_port

W1 = "0x" + "a1" * 20


async def _digest(name: str, seed: int, **kwargs: object) -> list[tuple[object, ...]]:
    async with SimServer(SimConfig(seed=seed)) as sim:
        await run_scenario(sim, name, seed, step_delay=0, cycles=1, **kwargs)  # type: ignore[arg-type]
        return sim.exchange.ledger.digest()


@pytest.mark.parametrize("name", SCENARIOS)
async def test_same_seed_same_ledger(name: str) -> None:
    """A scenario is a pure function of its seed: same seed → identical ledger, other seed → different."""
    kwargs: dict[str, object] = {}
    if name == "load":
        kwargs = {"max_fills": 200, "rate": 100_000.0}
    if name == "cascade":  # paced on the clock: its ledger must not depend on how the ticks fell
        kwargs = {"cascade": {"wide": 20, "movers": 6, "seconds": 0.3, "calm_tape": 100.0}}
    first = await _digest(name, 11, **kwargs)
    again = await _digest(name, 11, **kwargs)
    other = await _digest(name, 12, **kwargs)
    assert first
    assert first == again
    assert first != other


async def test_demo_covers_every_behaviour_and_ends_flat() -> None:
    """One demo cycle opens, adds, partially fills, cancels, flips, closes, trades spot, liquidates, TWAPs, holds
    an isolated position and pays funding, and every account ends as its cash flows."""
    async with SimServer() as sim:
        whales = await run_scenario(sim, "demo", 3, step_delay=0, cycles=1)
        ledger = sim.exchange.ledger
        dirs = {d for o in ledger.orders.values() for d in o.totals}
        kinds = {o.kind for o in ledger.orders.values()}
        statuses = {o.status for o in ledger.orders.values()}
        coins = {o.coin for o in ledger.orders.values()}
        for addr in whales:
            acct = sim.exchange.accounts[addr]
            assert acct.positions == {}, f"{addr} not flat: {acct.positions}"
            assert all(b.total == 0 for t, b in acct.spot.items() if t != "USDC")
            assert acct.leverage["ETH"] == LeverageSetting("isolated", 3)
            assert acct.funding_all_time["xyz:XYZ100"] != 0
            for dex, cash in acct.dexes.items():
                # Flat again: every isolated margin went back, so the account is its cash flows.
                expected = cash.deposited + cash.realized_pnl - cash.fees - cash.funding
                assert sim.exchange.dex_view(addr, dex).account_value == cash.cash == expected
    assert whales == scenario_whales("demo", 3)
    assert {
        "Open Long",
        "Close Long",
        "Open Short",
        "Close Short",
        "Buy",
        "Sell",
        "Liquidated Cross Long",
    } <= dirs
    assert dirs & {"Long > Short", "Short > Long"}
    assert {"market", "limit", "liquidation", "twap_slice"} <= kinds
    assert {"filled", "canceled"} <= statuses
    assert {"@107", "PURR/USDC", "xyz:XYZ100"} <= coins


async def test_ledger_matches_what_clients_receive() -> None:
    """Ledger totals per (oid, dir) equal the fills a WS client and REST saw; positions agree with the ledger."""
    async with SimServer() as sim:
        whales = scenario_whales("flip", 5, whales=2)
        async with connect(sim.ws_url) as ws:
            for addr in whales:
                await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "userFills", "user": addr}}))
            await ws.send('{"method":"ping"}')
            while json.loads(await ws.recv())["channel"] != "pong":
                pass
            await run_scenario(sim, "flip", 5, whales=2, step_delay=0, cycles=2)
            got: dict[tuple[int, str], list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
            expected_fills = sum(t.fills for o in sim.exchange.ledger.orders.values() for t in o.totals.values())
            seen = 0
            async with asyncio.timeout(5):
                while seen < expected_fills:
                    frame = decode_frame(await ws.recv())
                    if isinstance(frame, UserFillsFrame) and not frame.data.is_snapshot:
                        for f in frame.data.fills:
                            acc = got[(f.oid, f.dir)]
                            acc[0] += f.sz
                            acc[1] += f.sz * f.px
                            seen += 1
        body = {"type": "userFills", "user": whales[0]}
        async with aiohttp.ClientSession() as http, http.post(sim.info_url, json=body) as resp:
            rest = decode_fills(await resp.read())
    ledger = sim.exchange.ledger
    assert {(o.oid, d) for o in ledger.orders.values() for d in o.totals} == set(got)
    for order in ledger.orders.values():
        for d, total in order.totals.items():
            size, notional = got[(order.oid, d)]
            assert (size, notional / size) == (total.size, total.vwap)
    flips = [o for o in ledger.orders.values() if {"Long > Short", "Short > Long"} & set(o.totals)]
    assert len(flips) == 2 * 2 * 2  # two flips per cycle, two cycles, two whales
    for o in flips:
        assert o.position_before is not None
        assert o.position_after is not None
        assert (o.position_before > 0) != (o.position_after > 0)
    assert {f.oid for f in rest} == {o.oid for o in ledger.for_user(whales[0])}


async def test_liquidation_scenario_fills() -> None:
    """Liquidations close the whole position with the liquidation block and Liquidated Cross dirs."""
    async with SimServer() as sim:
        (addr,) = await run_scenario(sim, "liquidation", 1, step_delay=0, cycles=1)
        fills = [f for f in sim.exchange.accounts[addr].fills if f.liquidation is not None]
        assert sim.exchange.accounts[addr].positions == {}
    assert {f.dir for f in fills} == {"Liquidated Cross Long", "Liquidated Cross Short"}
    assert all(f.liquidation is not None and f.liquidation.liquidated_user == addr for f in fills)
    long_side = [f for f in fills if f.dir == "Liquidated Cross Long"]
    assert len(long_side) == 3
    assert all(Decimal(f.closed_pnl) < 0 for f in long_side)


async def test_twap_scenario_slices_share_a_twap_id() -> None:
    """TWAP slices: one oid each, a shared twapId, zero hashes; the ledger sums them per TWAP."""
    async with SimServer() as sim:
        (addr,) = await run_scenario(sim, "twap", 2, step_delay=0, cycles=1)
        fills = list(sim.exchange.accounts[addr].fills)
        ledger = sim.exchange.ledger
        twap_ids = sorted({f.twap_id for f in fills if f.twap_id is not None})
        buy = ledger.twap_totals(twap_ids[0])
        sell = ledger.twap_totals(twap_ids[1])
    assert len(twap_ids) == 2
    assert len(fills) == 9
    assert len({f.oid for f in fills}) == 9
    assert {f.hash for f in fills} == {"0x" + "0" * 64}
    assert list(buy) == ["Open Long"]
    assert buy["Open Long"].fills == 5
    assert list(sell) == ["Close Long"]
    assert sell["Close Long"].size == buy["Open Long"].size


async def test_load_scenario_delivers_exactly_max_fills() -> None:
    """The load generator produces exactly max_fills fills across the whales, all delivered to a subscriber."""
    async with SimServer(SimConfig(record_ledger=False)) as sim, connect(sim.ws_url, max_size=None) as ws:
        whales = scenario_whales("load", 9, whales=3)
        for addr in whales:
            await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "userFills", "user": addr}}))
        await ws.send('{"method":"ping"}')
        while json.loads(await ws.recv())["channel"] != "pong":
            pass
        await run_scenario(sim, "load", 9, whales=3, rate=50_000, max_fills=1000, fills_per_order=4)
        received = 0
        async with asyncio.timeout(5):
            while received < 1000:
                frame = decode_frame(await ws.recv())
                if isinstance(frame, UserFillsFrame) and not frame.data.is_snapshot:
                    received += len(frame.data.fills)
        total = sum(len(sim.exchange.accounts[a].fills) for a in whales)
    assert received == total == 1000
    assert sim.exchange.ledger.orders == {}


async def test_cascade_surges_the_tape_of_every_coin_and_moves_its_movers_once() -> None:
    """A cascade in small: every coin's tape at calm × surge, every mover flipped or liquidated (engine trade, zero
    hash) once, the rest of the wide addresses untouched, the whales' orders at their rate, all on the tape."""
    plan = cascade_plan(3, whales=2, wide=12, movers=4, seconds=0.5, calm_tape=100.0, whale_fills_s=40.0)
    tape: list[WireTrade] = []
    async with SimServer(SimConfig(record_ledger=False)) as sim:
        ex = sim.exchange
        cascade_setup(ex, plan)
        before = {a: {c: p.szi for c, p in ex.accounts[a].positions.items()} for a in plan.wide}

        class Tape:
            def __getattr__(self, name: str) -> object:
                return getattr(sim, name)

            def on_trades(self, coin: str, trades: list[WireTrade]) -> None:
                tape.extend(trades)
                sim.on_trades(coin, trades)

        ex.listener = Tape()  # type: ignore[assignment]
        record = await run_cascade(ex, plan)
        after = {a: ex.accounts[a].positions for a in plan.wide}
    assert record.crowd_trades == 100 * 20 * 0.5
    assert {t.coin for t in tape} == set(ex.mids)  # every coin, spot pairs and the builder dex included
    assert len(record.orders) == 40 * 2 * 0.5 // plan.fills_per_order
    assert record.fills == len(record.orders) * plan.fills_per_order
    assert [(a, kind) for a, _, kind, _ in record.events] == [
        (plan.wide[0], "flip"), (plan.wide[1], "liquidation"), (plan.wide[2], "flip"), (plan.wide[3], "liquidation"),
    ]  # fmt: skip
    for i, address in enumerate(plan.wide):
        coin = plan.coin_of(i)
        held = before[address][coin]
        if i >= plan.movers:
            assert after[address][coin].szi == held
        elif plan.kind_of(i) == "flip":
            assert after[address][coin].szi == -held
        else:
            assert coin not in after[address]
            [liquidation] = [t for t in tape if address in t.users and t.hash == ZERO_HASH]
            assert liquidation.coin == coin


async def test_unknown_scenario_is_a_clear_error() -> None:
    async with SimServer() as sim:
        with pytest.raises(ValueError, match="unknown scenario 'nope'"):
            await run_scenario(sim, "nope", 0)


# ---------------------------------------------------------------------------------------- exchange model


def test_perp_accounting_open_add_reduce_flip() -> None:
    """startPosition, dir, entry price and closedPnl follow Hyperliquid's one-way position rules."""
    ex = Exchange(seed=1)
    ex.market_order(W1, "ETH", True, "1", "2000")
    ex.market_order(W1, "ETH", True, "1", "2200")  # entry → 2100
    ex.market_order(W1, "ETH", False, "0.5", "2300")  # +200 on 0.5
    ex.market_order(W1, "ETH", False, "2.5", "2000")  # closes 1.5 at -100 each, opens 1 short at 2000
    ex.market_order(W1, "ETH", True, "1", "1900")  # covers the short: +100
    fills = list(ex.accounts[W1].fills)
    assert [(f.start_position, f.dir, f.closed_pnl) for f in fills] == [
        ("0.0", "Open Long", "0.0"),
        ("1.0", "Open Long", "0.0"),
        ("2.0", "Close Long", "100.0"),
        ("1.5", "Long > Short", "-150.0"),
        ("-1.0", "Close Short", "100.0"),
    ]
    assert ex.accounts[W1].positions == {}
    oids = [f.oid for f in fills]
    assert oids == sorted(oids)
    assert min(oids) > 2**32
    fees = sum(Decimal(f.fee) for f in fills)
    assert ex.accounts[W1].usdc == Decimal(1_000_000) + Decimal(50) - fees  # 100 - 150 + 100 realised


def test_spot_buy_sell_and_oversell_is_refused() -> None:
    """Spot fills are Buy/Sell with the balance as startPosition; selling more than held raises."""
    ex = Exchange()
    ex.market_order(W1, "PURR/USDC", True, "1000", "0.05")
    ex.market_order(W1, "PURR/USDC", False, "400", "0.06")
    fills = list(ex.accounts[W1].fills)
    assert [(f.dir, f.start_position, f.closed_pnl) for f in fills] == [
        ("Buy", "0.0", "0.0"),
        ("Sell", "1000.0", "4.0"),
    ]
    with pytest.raises(ValueError, match="holds 600"):
        ex.market_order(W1, "PURR/USDC", False, "601", "0.06")
    with pytest.raises(ValueError, match="unknown coin"):
        ex.market_order(W1, "DOGE", True, "1", "0.1")


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ("0", "0.0"),
        ("0E-8", "0.0"),
        ("-0.000", "0.0"),
        ("1E-8", "0.00000001"),
        ("1052.900", "1052.9"),
        ("2000", "2000.0"),
        ("-3695042.8999999999", "-3695042.8999999999"),
        ("1E+3", "1000.0"),
    ],
)
def test_wire_decimal_never_uses_exponents(value: str, wire: str) -> None:
    assert wire_decimal(Decimal(value)) == wire


# ---------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
async def test_cli_serves_ws_and_rest_and_stops_on_sigint() -> None:
    """`hl-monitor sim --scenario flip` serves both endpoints; SIGINT stops it with exit code 0."""
    port = free_port()
    argv = ["-m", "hl_monitor", "sim", "--port", str(port), "--scenario", "flip", "--step-delay", "0.01"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        (whale,) = scenario_whales("flip", 0)
        async with asyncio.timeout(20), aiohttp.ClientSession() as http:
            while True:
                try:
                    body = {"type": "userFills", "user": whale}
                    async with http.post(f"http://127.0.0.1:{port}/info", json=body) as resp:
                        fills = msgspec.json.decode(await resp.read())
                    if len(fills) >= 4:
                        break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "userFills", "user": whale}}))
                await ws.recv()
                snapshot = decode_frame(await ws.recv())
        assert isinstance(snapshot, UserFillsFrame)
        assert snapshot.data.is_snapshot
        # The scenario keeps looping, so the later snapshot holds at least every fill REST returned earlier.
        assert {f["tid"] for f in fills} <= {f.tid for f in snapshot.data.fills}
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()


@pytest.mark.slow
async def test_cli_prints_the_scenario_whales_when_it_starts() -> None:
    """`hl-monitor sim --scenario demo` names its whales (and how to watch them) while the scenario still runs:
    with an hour between steps it cannot have ended, which is when they used to be printed."""
    port = free_port()
    argv = ["-m", "hl_monitor", "sim", "--port", str(port), "--scenario", "demo", "--seed", "4", "--step-delay", "3600"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    whales = scenario_whales("demo", 4)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while not any(line.startswith("  HL_MONITOR__ADDRESSES__INITIAL=") for line in lines):
                raw = await proc.stdout.readline()
                assert raw, f"sim exited before naming its whales: {lines}"
                lines.append(raw.decode().rstrip("\n"))
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    assert lines[0] == "scenario demo: 3 whales"
    assert lines[1:4] == [f"  {w}" for w in whales]
    assert f"HL_MONITOR__HYPERLIQUID__WS_URL=ws://127.0.0.1:{port}/ws \\" in lines[5]
    assert lines[-1] == f"  HL_MONITOR__ADDRESSES__INITIAL={','.join(whales)} make run"
