"""The simulator's REST `POST /info`: bodies decode with our protocol types, weights, 429, caps and paging."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
import pytest

from hl_monitor.hyperliquid import constants as hl
from hl_monitor.hyperliquid.protocol import (
    ClearinghouseState,
    FrontendOrder,
    OrderStatusResponse,
    PerpAssetCtx,
    PerpMeta,
    SpotMeta,
    SpotMetaAndAssetCtxs,
    SpotState,
    WsTrade,
    decode_fills,
    decode_info,
)
from hl_monitor.sim.server import SimConfig, SimServer

W1 = "0x" + "a1" * 20
W2 = "0x" + "b2" * 20


class FakeClock:
    """Wall clock in seconds that tests move by hand (fills get distinct, known times)."""

    def __init__(self, start: float = 1_780_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def info(http: aiohttp.ClientSession, sim: SimServer, body: dict[str, Any], status: int = 200) -> bytes:
    async with http.post(sim.info_url, json=body) as resp:
        raw = await resp.read()
        assert resp.status == status, raw
        return raw


async def test_positions_balances_and_open_orders_decode(http: aiohttp.ClientSession) -> None:
    """clearinghouseState per dex, spotClearinghouseState and frontendOpenOrders match what the whale did."""
    async with SimServer() as sim:
        w = sim.exchange.whale(W1)
        await w.market_order("BTC", True, "0.5", "80000", fills=2)
        await w.market_order("xyz:TSLA", False, "3", "420")
        await w.market_order("@107", True, "20", "40")
        oid = await w.limit_order("ETH", True, "2", "2000", cloid="0x" + "cd" * 16)
        core = decode_info(await info(http, sim, {"type": "clearinghouseState", "user": W1}), ClearinghouseState)
        xyz = decode_info(
            await info(http, sim, {"type": "clearinghouseState", "user": W1, "dex": "xyz"}), ClearinghouseState
        )
        empty = decode_info(await info(http, sim, {"type": "clearinghouseState", "user": W2}), ClearinghouseState)
        spot = decode_info(await info(http, sim, {"type": "spotClearinghouseState", "user": W1}), SpotState)
        orders = decode_info(
            await info(http, sim, {"type": "frontendOpenOrders", "user": W1, "dex": ""}), list[FrontendOrder]
        )
        raw_orders = msgspec.json.decode(await info(http, sim, {"type": "frontendOpenOrders", "user": W1}))
    assert [(p.position.coin, p.position.szi, p.position.entry_px) for p in core.asset_positions] == [
        ("BTC", Decimal("0.5"), Decimal(80000))
    ]
    assert [(p.position.coin, p.position.szi) for p in xyz.asset_positions] == [("xyz:TSLA", Decimal(-3))]
    assert empty.asset_positions == []
    assert empty.margin_summary.account_value == 0
    assert {b.coin: b.total for b in spot.balances}["HYPE"] == 20
    assert [(o.oid, o.coin, o.sz, o.order_type, o.tif) for o in orders] == [(oid, "ETH", Decimal(2), "Limit", "Gtc")]
    assert orders[0].cloid == "0x" + "cd" * 16
    assert raw_orders[0]["isTrigger"] is False
    assert raw_orders[0]["children"] == []


async def test_order_status_by_oid_and_cloid(http: aiohttp.ClientSession) -> None:
    """orderStatus returns the latest status by oid or cloid, and `unknownOid` otherwise."""
    async with SimServer() as sim:
        w = sim.exchange.whale(W1)
        filled = await w.market_order("ETH", True, "1", "2300")
        resting = await w.limit_order("ETH", False, "1", "2500", cloid="0x" + "ee" * 16)
        canceled = await w.limit_order("SOL", True, "5", "90")
        await w.cancel(canceled)

        async def status(oid: int | str, user: str = W1) -> OrderStatusResponse:
            body = {"type": "orderStatus", "user": user, "oid": oid}
            result: OrderStatusResponse = decode_info(await info(http, sim, body), OrderStatusResponse)
            return result

        results = [await status(filled), await status("0x" + "EE" * 16), await status(canceled)]
        unknown = await status(12345)
        other_user = await status(filled, W2)
    assert [(r.status, r.order.status if r.order else None) for r in results] == [
        ("order", "filled"),
        ("order", "open"),
        ("order", "canceled"),
    ]
    assert results[1].order is not None
    assert results[1].order.order.oid == resting
    assert results[0].order is not None
    assert results[0].order.order.tif == "FrontendMarket"
    assert unknown.status == "unknownOid"
    assert unknown.order is None
    assert other_user.status == "unknownOid"


async def test_user_fills_newest_first_capped_at_2000(http: aiohttp.ClientSession) -> None:
    """userFills returns the newest 2000 fills, newest first, and costs 20 + 1 per 20 fills."""
    async with SimServer() as sim:
        w = sim.exchange.whale(W1)
        await w.market_order("BTC", True, "0.021", "80000", fills=2100)
        raw = await info(http, sim, {"type": "userFills", "user": W1})
        fills = decode_fills(raw)
    assert len(fills) == hl.MAX_FILLS_PER_RESPONSE
    tids = [f.tid for f in fills]
    assert tids == sorted(tids, reverse=True)
    assert tids[0] == max(f.tid for f in sim.exchange.accounts[W1].fills)
    assert sim.stats.rest_weight_used == hl.info_weight("userFills", 2000) == 20 + 100


async def test_rest_fills_are_dex_scoped_like_the_exchange(http: aiohttp.ClientSession) -> None:
    """Without `dex` (or with `""`) REST fills are the first perp dex's and spot's; with `dex` that builder dex's
    only (docs/protocol.md §4). The `userFills` snapshot over the socket keeps every dex."""
    async with SimServer() as sim:
        w = sim.exchange.whale(W1)
        await w.market_order("BTC", True, "0.5", "80000")
        await w.market_order("xyz:XYZ100", True, "0.2", "25000", fills=2)
        await w.market_order("@107", True, "3", "40")
        plain = decode_fills(await info(http, sim, {"type": "userFills", "user": W1}))
        first = decode_fills(await info(http, sim, {"type": "userFills", "user": W1, "dex": ""}))
        builder = decode_fills(await info(http, sim, {"type": "userFills", "user": W1, "dex": "xyz"}))
        by_time = {"type": "userFillsByTime", "user": W1, "startTime": 0}
        first_by_time = decode_fills(await info(http, sim, by_time))
        builder_by_time = decode_fills(await info(http, sim, {**by_time, "dex": "xyz"}))
        unknown = decode_fills(await info(http, sim, {"type": "userFills", "user": W1, "dex": "nope"}))
        snapshot = sim.exchange.fills_snapshot(W1, 100)
    assert sorted(f.coin for f in plain) == sorted(f.coin for f in first) == ["@107", "BTC"]
    assert [f.coin for f in builder] == ["xyz:XYZ100", "xyz:XYZ100"]
    assert sorted(f.coin for f in first_by_time) == ["@107", "BTC"]
    assert [f.coin for f in builder_by_time] == ["xyz:XYZ100", "xyz:XYZ100"]
    assert unknown == []
    assert sorted({f.coin for f in snapshot}) == ["@107", "BTC", "xyz:XYZ100"]


async def test_user_fills_by_time_inclusive_paging_and_reach() -> None:
    """userFillsByTime: inclusive bounds, oldest first, ≤2000 per page, only the newest N fills reachable."""
    clock = FakeClock()
    cfg = SimConfig(fill_history_limit=2500, rest_weight_per_minute=100_000)
    async with SimServer(cfg, wall_clock=clock) as sim, aiohttp.ClientSession() as http:
        w = sim.exchange.whale(W1)
        times = []
        for i in range(3000):
            clock.now += 0.001
            times.append(int(clock.now * 1000))
            await w.market_order("ETH", i % 2 == 0, "0.01", "2300")
        reachable = times[-2500:]
        page1 = decode_fills(await info(http, sim, {"type": "userFillsByTime", "user": W1, "startTime": 0}))
        page2_body = {"type": "userFillsByTime", "user": W1, "startTime": page1[-1].time + 1, "endTime": times[-1]}
        page2 = decode_fills(await info(http, sim, page2_body))
        window = decode_fills(
            await info(
                http,
                sim,
                {"type": "userFillsByTime", "user": W1, "startTime": times[-10], "endTime": times[-8]},
            )
        )
        newest = decode_fills(
            await info(http, sim, {"type": "userFillsByTime", "user": W1, "startTime": 0, "reversed": True})
        )
    assert len(page1) == 2000
    assert len(page2) == 500
    assert [f.time for f in page1 + page2] == reachable  # oldest first, nothing lost, nothing older
    assert [f.time for f in window] == times[-10:-7]  # both bounds inclusive
    assert newest[0].time == times[-1]


async def test_rest_weight_budget_returns_429_then_recovers(http: aiohttp.ClientSession) -> None:
    """Over rest_weight_per_minute in a sliding minute → 429 with a JSON body; the minute passing restores it."""
    now = [500.0]
    async with SimServer(SimConfig(rest_weight_per_minute=25), clock=lambda: now[0]) as sim:
        await info(http, sim, {"type": "meta"})  # 20
        await info(http, sim, {"type": "allMids"})  # 2
        await info(http, sim, {"type": "orderStatus", "user": W1, "oid": 1})  # 2 → 24
        raw = await info(http, sim, {"type": "clearinghouseState", "user": W1}, status=429)
        now[0] += 30
        await info(http, sim, {"type": "clearinghouseState", "user": W1}, status=429)
        now[0] += 31
        await info(http, sim, {"type": "clearinghouseState", "user": W1})
    assert msgspec.json.decode(raw)["code"] == 429
    assert sim.stats.rest_429s == 2
    assert sim.stats.rest_weight_used == 26
    assert sim.stats.rest_requests == 4


async def test_bad_requests(http: aiohttp.ClientSession) -> None:
    """Not JSON → 400; unknown type, missing user or bad field → 422; none of them costs weight."""
    async with SimServer() as sim:
        async with http.post(sim.info_url, data=b"{nope") as resp:
            assert resp.status == 400
        await info(http, sim, {"type": "userRoleX", "user": W1}, status=422)
        await info(http, sim, {"type": "clearinghouseState"}, status=422)
        await info(http, sim, {"type": "clearinghouseState", "user": "0x12"}, status=422)
        await info(http, sim, {"type": "userFillsByTime", "user": W1}, status=422)
        await info(http, sim, {"user": W1}, status=422)
    assert sim.stats.rest_weight_used == 0


async def test_market_data_endpoints(http: aiohttp.ClientSession) -> None:
    """meta, spotMeta, perpDexs, metaAndAssetCtxs and spotMetaAndAssetCtxs (with dayNtlVlm), allMids, recentTrades."""
    async with SimServer() as sim:
        w = sim.exchange.whale(W1)
        await w.market_order("BTC", True, "1", "80000", fills=3)
        await w.market_order("@107", True, "20", "40")
        meta = decode_info(await info(http, sim, {"type": "meta"}), PerpMeta)
        xyz = decode_info(await info(http, sim, {"type": "meta", "dex": "xyz"}), PerpMeta)
        spot = decode_info(await info(http, sim, {"type": "spotMeta"}), SpotMeta)
        dexs = msgspec.json.decode(await info(http, sim, {"type": "perpDexs"}))
        meta_ctx = msgspec.json.decode(await info(http, sim, {"type": "metaAndAssetCtxs"}))
        spot_ctx = decode_info(await info(http, sim, {"type": "spotMetaAndAssetCtxs"}), SpotMetaAndAssetCtxs)
        mids = msgspec.json.decode(await info(http, sim, {"type": "allMids"}))
        trades = decode_info(await info(http, sim, {"type": "recentTrades", "coin": "BTC"}), list[WsTrade])
    names = [u.name for u in meta.universe]
    assert names[:2] == ["BTC", "ETH"]
    assert all(":" not in n for n in names)
    assert [u.name for u in xyz.universe] == ["xyz:XYZ100", "xyz:TSLA"]
    pairs = {p.name: p.tokens for p in spot.universe}
    tokens = {t.index: t.name for t in spot.tokens}
    assert tokens[pairs["@107"][0]] == "HYPE"
    assert pairs["PURR/USDC"] == (1, 0)
    assert dexs[0] is None
    assert dexs[1]["name"] == "xyz"
    ctxs = msgspec.convert(meta_ctx[1], list[PerpAssetCtx])
    btc = ctxs[names.index("BTC")]
    assert btc.day_ntl_vlm == 80000
    assert btc.mark_px is not None
    assert spot_ctx.meta == spot
    assert spot_ctx.volumes() == {"PURR/USDC": 0, "@107": 800, "@142": 0}
    assert mids["BTC"] == "80000.0"
    assert "@107" in mids
    assert "xyz:TSLA" not in mids
    assert len(trades) == 3
    assert trades[0].tid > trades[-1].tid
    assert all(t.users is not None and t.users[0] == W1 for t in trades)


async def test_historical_orders_newest_first(http: aiohttp.ClientSession) -> None:
    """historicalOrders lists every order with its latest status, newest first, `cloid: null` present."""
    async with SimServer() as sim:
        w = sim.exchange.whale(W1)
        a = await w.market_order("ETH", True, "1", "2300")
        b = await w.limit_order("ETH", True, "1", "2000")
        await w.cancel(b)
        c = await w.reject_order("SOL", True, "1000", "50", status="perpMarginRejected")
        raw = msgspec.json.decode(await info(http, sim, {"type": "historicalOrders", "user": W1}))
    assert [(e["order"]["oid"], e["status"]) for e in raw] == [
        (c, "perpMarginRejected"),
        (b, "canceled"),
        (a, "filled"),
    ]
    assert all("cloid" in e["order"] and e["order"]["cloid"] is None for e in raw)
