"""REST /info client against a real local aiohttp server: typed replies, exact request bodies, weight
accounting that matches what the server charged, 429 backoff, paging of userFillsByTime, error mapping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from aiohttp import web

from hl_monitor.clock import ManualClock
from hl_monitor.config import HyperliquidConfig
from hl_monitor.errors import InfoError, ProtocolError, RateLimitedError
from hl_monitor.feeds.budget import Budgets
from hl_monitor.hyperliquid.constants import INFO_ITEM_WEIGHTED, info_weight
from hl_monitor.hyperliquid.info import FillHistory, InfoClient, merge_fill_histories
from hl_monitor.hyperliquid.protocol import decode_fills
from hl_monitor.metrics import Metrics
from hl_monitor.sim.server import SimConfig, SimServer
from tests.support.budget import max_in_any_window
from tests.support.metrics import metric_value
from tests.support.net import free_port
from tests.support.paths import FIXTURES
from tests.support.waiting import wait_until

USER = "0x31ca8395cf837de08b24da3f660e77761dfb974b"
# A scripted slow reply: longer than the client's 0.3 s timeout in the error tests.
SLOW_REPLY_S = 1.0


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def canned_bodies() -> dict[str, bytes]:
    meta = json.loads(fixture("http_meta_perp_sample.json"))
    ctx = {"dayNtlVlm": "1.0", "markPx": "80640.0", "midPx": None, "funding": "0.0000052974"}
    spot_ctx = {
        "prevDayPx": "39.1",
        "dayNtlVlm": "401234567.5",
        "markPx": "40.2",
        "midPx": None,
        "circulatingSupply": "333000000.0",
        "coin": "@107",
        "totalSupply": "999990000.0",
        "dayBaseVlm": "10000000.0",
    }
    return {
        "clearinghouseState": fixture("http_clearinghouse_state.json"),
        "spotClearinghouseState": fixture("http_spot_clearinghouse_state.json"),
        "orderStatus": fixture("http_order_status_frontend_market.json"),
        "userFills": fixture("http_user_fills_with_cloid.json"),
        "frontendOpenOrders": fixture("http_frontend_open_orders.json"),
        "historicalOrders": b"[" + fixture("http_historical_order_liquidation_market.json") + b"]",
        "meta": fixture("http_meta_perp_sample.json"),
        "metaAndAssetCtxs": json.dumps([meta, [ctx, ctx, ctx]]).encode(),
        "spotMeta": fixture("http_spot_meta_non_usdc_collateral.json"),
        # The captured spotMeta has no pairs; one context in the documented shape (field set of the API docs).
        "spotMetaAndAssetCtxs": json.dumps(
            [json.loads(fixture("http_spot_meta_non_usdc_collateral.json")), [spot_ctx]]
        ).encode(),
        "perpDexs": b'[null,{"name":"xyz","fullName":"XYZ","deployer":"0x1234"}]',
        "allMids": b'{"BTC":"80868.5","ETH":"2296.45"}',
        "recentTrades": fixture("http_recent_trades_btc.json"),
    }


def make_fills(count: int) -> list[dict[str, Any]]:
    """`count` fills, oldest first, two per millisecond (so page boundaries split a millisecond)."""
    return [
        {
            "coin": "BTC",
            "px": "80000.5",
            "sz": "0.01",
            "side": "B",
            "time": 1_700_000_000_000 + i // 2,
            "startPosition": "0.0",
            "dir": "Open Long",
            "closedPnl": "0.0",
            "hash": "0x" + "0" * 64,
            "oid": 500_000_000_000 + i,
            "crossed": True,
            "fee": "0.1",
            "tid": 10_000 + i,
            "feeToken": "USDC",
            "twapId": None,
        }
        for i in range(count)
    ]


class FakeInfo:
    """A small /info server: canned bodies, scripted failures, a fill store paged like the exchange."""

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.clock = clock
        self.url = ""
        self.bodies = canned_bodies()
        self.script: dict[str, list[int | str]] = {}  # request type -> statuses to answer first
        self.requests: list[dict[str, Any]] = []
        self.charged: list[tuple[float, int]] = []  # (clock time, weight the server counted)
        self.fills: list[dict[str, Any]] = []
        self.newest_first = False
        self.reachable = 10_000

    def _charge(self, request_type: str, items: int = 0) -> None:
        now = self.clock.now() if self.clock is not None else 0.0
        self.charged.append((now, info_weight(request_type, items)))

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        request_type = body["type"]
        script = self.script.get(request_type)
        if script:
            step = script.pop(0)
            self._charge(request_type)
            if step == "slow":
                await asyncio.sleep(SLOW_REPLY_S)
            if step == "garbage":
                return web.Response(body=b'{"not":"what you asked for"}', content_type="application/json")
            headers = {"Retry-After": "0.01"} if step == 429 else {}
            return web.Response(status=int(step), text=f"scripted {step}", headers=headers)
        if request_type == "userFillsByTime":
            page = self._fills_page(body)
            self._charge(request_type, len(page))
            return web.json_response(page)
        raw = self.bodies[request_type]
        items = len(json.loads(raw)) if request_type in INFO_ITEM_WEIGHTED else 0
        self._charge(request_type, items)
        return web.Response(body=raw, content_type="application/json")

    def _fills_page(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        end = body.get("endTime", 2**62)
        reachable = self.fills[-self.reachable :]
        in_range = [f for f in reachable if body["startTime"] <= f["time"] <= end]
        return in_range[::-1][:2000] if self.newest_first else in_range[:2000]


@pytest.fixture
async def server() -> AsyncIterator[FakeInfo]:
    fake = FakeInfo()
    async with serve(fake):
        yield fake


class serve:
    def __init__(self, fake: FakeInfo) -> None:
        self.fake = fake
        self.runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeInfo:
        app = web.Application()
        app.router.add_post("/info", self.fake.handle)
        # Do not wait for a scripted slow handler at teardown.
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.fake.url = f"http://127.0.0.1:{port}/info"
        return self.fake

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def client(url: str, budgets: Budgets, metrics: Metrics, **kwargs: Any) -> InfoClient:
    kwargs.setdefault("backoff_initial", 0.01)
    kwargs.setdefault("backoff_max", 0.05)
    return InfoClient(url, budgets, metrics, **kwargs)


def outcome(metrics: Metrics, request: str, result: str) -> float:
    value = metrics.registry.get_sample_value("hl_monitor_rest_requests_total", {"request": request, "outcome": result})
    return value or 0.0


def weight_used(metrics: Metrics) -> float:
    return sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "hl_monitor_rest_weight_used"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


async def test_every_typed_method_sends_the_documented_body_and_decodes_the_reply(server: FakeInfo) -> None:
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    async with client(server.url, budgets, metrics) as info:
        state = await info.clearinghouse_state(USER)
        spot = await info.spot_clearinghouse_state(USER)
        status = await info.order_status(USER, 1)
        by_cloid = await info.order_status(USER, "0x5bdd47600dea461f36c8378cd7b4150c")
        fills = await info.user_fills(USER)
        orders = await info.frontend_open_orders(USER, dex="xyz")
        history = await info.historical_orders(USER)
        meta = await info.meta()
        ctxs = await info.meta_and_asset_ctxs()
        spot_meta = await info.spot_meta()
        spot_ctxs = await info.spot_meta_and_asset_ctxs()
        dexs = await info.perp_dexs()
        mids = await info.all_mids()
        trades = await info.recent_trades("BTC")

    assert state.positions()["BTC"].szi == Decimal("0.1")
    assert spot.balances[0].total == Decimal("14.625485")
    assert status.order is not None
    assert status.order.status == "filled"
    assert by_cloid.known
    assert [f.tid for f in fills] == [1109765720343214, 780373658822388]
    assert [o.oid for o in orders] == [2001, 2002]
    assert history[0].order.tif == "LiquidationMarket"
    assert [u.name for u in meta.universe] == ["BTC", "ETH", "ATOM"]
    assert ctxs.by_coin()["ETH"].mark_px == Decimal("80640.0")
    assert spot_meta.tokens[1].name == "USDH"
    assert spot_ctxs.meta.tokens[1].name == "USDH"
    assert spot_ctxs.volumes() == {"@107": Decimal("401234567.5")}
    assert dexs[0] is None
    assert mids["BTC"] == Decimal("80868.5")
    assert trades[0].users == ("0xbuyer3", "0xseller3")

    assert server.requests == [
        {"type": "clearinghouseState", "user": USER, "dex": ""},
        {"type": "spotClearinghouseState", "user": USER},
        {"type": "orderStatus", "user": USER, "oid": 1},
        {"type": "orderStatus", "user": USER, "oid": "0x5bdd47600dea461f36c8378cd7b4150c"},
        {"type": "userFills", "user": USER, "aggregateByTime": False},
        {"type": "frontendOpenOrders", "user": USER, "dex": "xyz"},
        {"type": "historicalOrders", "user": USER},
        {"type": "meta", "dex": ""},
        {"type": "metaAndAssetCtxs", "dex": ""},
        {"type": "spotMeta"},
        {"type": "spotMetaAndAssetCtxs"},
        {"type": "perpDexs"},
        {"type": "allMids", "dex": ""},
        {"type": "recentTrades", "coin": "BTC"},
    ]
    server_total = sum(weight for _, weight in server.charged)
    assert server_total == 2 + 2 + 2 + 2 + 20 + 20 + 20 + 20 + 20 + 20 + 20 + 20 + 2 + 20
    # Pessimistic reservations were refunded: the budget holds exactly what the server counted.
    assert budgets.snapshot()["rest_weight"]["used"] == server_total
    assert weight_used(metrics) == server_total
    assert outcome(metrics, "orderStatus", "ok") == 2


async def test_429_backs_off_and_retries_then_succeeds(server: FakeInfo) -> None:
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    server.script["meta"] = [429, 429]
    async with client(server.url, budgets, metrics) as info:
        meta = await info.meta()
    assert len(meta.universe) == 3
    assert len(server.requests) == 3
    assert outcome(metrics, "meta", "http_429") == 2
    assert outcome(metrics, "meta", "ok") == 1
    assert budgets.snapshot()["rest_weight"]["used"] == 60 == sum(w for _, w in server.charged)


async def test_429_until_attempts_run_out_raises_rate_limited(server: FakeInfo) -> None:
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    server.script["clearinghouseState"] = [429] * 10
    async with client(server.url, budgets, metrics, max_attempts=3) as info:
        with pytest.raises(RateLimitedError) as err:
            await info.clearinghouse_state(USER)
    assert (err.value.status, err.value.request_type) == (429, "clearinghouseState")
    assert len(server.requests) == 3
    assert outcome(metrics, "clearinghouseState", "http_429") == 3


@pytest.mark.parametrize(
    ("script", "status", "result"),
    [
        (500, 500, "http_error"),
        (422, 422, "http_error"),
        ("garbage", 200, "bad_body"),
        ("slow", None, "timeout"),
    ],
)
async def test_errors_map_to_info_error_with_status(
    server: FakeInfo, script: int | str, status: int | None, result: str
) -> None:
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    server.script["clearinghouseState"] = [script]
    async with client(server.url, budgets, metrics, timeout=0.3) as info:
        with pytest.raises(InfoError) as err:
            await info.clearinghouse_state(USER)
        assert not isinstance(err.value, RateLimitedError)
        assert err.value.status == status
        assert outcome(metrics, "clearinghouseState", result) == 1
        if script == "garbage":
            assert isinstance(err.value.__cause__, ProtocolError)
        if isinstance(script, int):
            assert err.value.detail == f"scripted {script}"
        # The client stays usable after an error.
        assert (await info.clearinghouse_state(USER)).withdrawable == Decimal("8277.125")


async def test_unreachable_server_is_an_info_error_without_status() -> None:
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    async with client(f"http://127.0.0.1:{free_port()}/info", budgets, metrics) as info:
        with pytest.raises(InfoError) as err:
            await info.meta()
    assert err.value.status is None
    assert outcome(metrics, "meta", "transport_error") == 1


async def drive(clock: ManualClock, budgets: Budgets, tasks: list[asyncio.Task[Any]]) -> None:
    """Advance the manual clock whenever every unfinished task waits in the budget (nothing in flight)."""
    while not all(t.done() for t in tasks):
        pending = sum(not t.done() for t in tasks)
        if budgets.snapshot()["rest_weight"]["waiting"] == pending:
            clock.advance(10.0)
        await asyncio.sleep(0.001)
    await asyncio.gather(*tasks)


async def test_budget_is_never_exceeded_and_reconciliation_is_not_starved() -> None:
    """30 low-priority polls (weight 20) against a 100/min budget; 5 orderStatus checks jump the queue."""
    clock = ManualClock()
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(rest_weight_per_minute=100), metrics, clock=clock)
    fake = FakeInfo(clock)
    async with serve(fake), client(fake.url, budgets, metrics) as info:
        polls = [asyncio.create_task(info.meta()) for _ in range(30)]
        await wait_until(lambda: budgets.snapshot()["rest_weight"]["waiting"] >= 27, what="27 polls queued")
        checks = [asyncio.create_task(info.order_status(USER, 1)) for _ in range(5)]
        await asyncio.wait_for(asyncio.gather(*checks), 5)
        assert clock.now() == 0.0, "high priority went through without waiting for the window"
        await drive(clock, budgets, polls + checks)
    events = sorted(fake.charged)
    assert len(events) == 35
    assert max_in_any_window(events, 60.0) <= 100
    low_events = sorted((t, w) for t, w in fake.charged if w == 20)
    assert max_in_any_window(low_events, 60.0) <= 75  # polling leaves a quarter for reconciliation
    assert weight_used(metrics) == sum(w for _, w in events)


@pytest.mark.parametrize("newest_first", [False, True])
async def test_user_fills_by_time_pages_until_caught_up(server: FakeInfo, newest_first: bool) -> None:
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    server.fills = make_fills(4500)
    server.newest_first = newest_first
    async with client(server.url, budgets, metrics) as info:
        history = await info.user_fills_by_time(USER, start_ms=1_700_000_000_000)
    assert not history.truncated
    assert [f.tid for f in history.fills] == [10_000 + i for i in range(4500)], "all fills, in (time, tid) order, once"
    assert history.requests == len(server.requests) == 3
    first = server.requests[0]
    assert first == {"type": "userFillsByTime", "user": USER, "startTime": 1_700_000_000_000, "aggregateByTime": False}
    assert budgets.snapshot()["rest_weight"]["used"] == sum(w for _, w in server.charged)
    assert weight_used(metrics) == sum(w for _, w in server.charged) == 3 * 20 + (2000 + 2000 + 502) // 20


async def test_fills_of_a_builder_dex_are_asked_with_its_name(server: FakeInfo) -> None:
    """REST fills are dex-scoped (docs/protocol.md §4): a builder dex is named, the first dex is the default."""
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    server.fills = make_fills(3)
    async with client(server.url, budgets, metrics) as info:
        await info.user_fills_by_time(USER, 1_700_000_000_000, dex="xyz")
        await info.user_fills(USER, dex="xyz")
        await info.user_fills_by_time(USER, 1_700_000_000_000, dex="")
    assert server.requests == [
        {
            "type": "userFillsByTime",
            "user": USER,
            "startTime": 1_700_000_000_000,
            "aggregateByTime": False,
            "dex": "xyz",
        },
        {"type": "userFills", "user": USER, "aggregateByTime": False, "dex": "xyz"},
        {"type": "userFillsByTime", "user": USER, "startTime": 1_700_000_000_000, "aggregateByTime": False},
    ]


def test_histories_of_several_dexes_merge_once_in_time_order() -> None:
    first = decode_fills(json.dumps(make_fills(4)).encode())
    builder = [msgspec.structs.replace(f, coin="xyz:XYZ100", tid=f.tid + 100) for f in first[:2]]
    merged = merge_fill_histories(
        [FillHistory(first, False, 1), FillHistory([*builder, first[3]], True, 2), FillHistory([], False, 1)]
    )
    assert [f.tid for f in merged.fills] == [10_000, 10_001, 10_100, 10_101, 10_002, 10_003]
    assert (merged.truncated, merged.requests) == (True, 4)


async def test_odd_entries_cost_neither_the_page_nor_the_paging(server: FakeInfo) -> None:
    """An unreadable entry in a full page is skipped and counted; the page still counts as full, so paging goes
    on; tid-less fills keep their substitute key on every read (docs/protocol.md §3)."""
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    rows: list[dict[str, Any]] = make_fills(2100)
    rows[5] = {"time": rows[5]["time"], "coin": "BTC", "px": "not a price"}
    del rows[7]["tid"]
    del rows[8]["fee"], rows[8]["feeToken"]
    rows[9]["someNewField"] = [1, 2]
    server.fills = rows
    async with client(server.url, budgets, metrics) as info:
        history = await info.user_fills_by_time(USER, 1_700_000_000_000)
        again = await info.user_fills_by_time(USER, 1_700_000_000_000)
    assert len(history.fills) == 2099
    assert history.fills == again.fills
    assert not history.truncated
    (substituted,) = [f for f in history.fills if f.tid_substituted]
    assert substituted.oid == 500_000_000_007
    assert {f.oid: f.fee for f in history.fills}[500_000_000_008] == 0
    assert all(f.tid == 10_000 + f.oid - 500_000_000_000 for f in history.fills if f.oid != 500_000_000_007)

    def odd(kind: str) -> float:
        return metric_value(metrics, "rest_items_odd_total", request="userFillsByTime", kind=kind)

    assert [odd(k) for k in ("invalid_item", "missing_tid", "missing_fee", "missing_fee_token", "unknown_field")] == [
        2,
        2,
        2,
        2,
        2,
    ]
    # Weight goes by what the server sent, the unreadable entry included.
    assert weight_used(metrics) == sum(w for _, w in server.charged)


async def test_user_fills_by_time_with_end_and_few_fills_is_one_request(server: FakeInfo) -> None:
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    server.fills = make_fills(100)
    async with client(server.url, budgets, metrics) as info:
        history = await info.user_fills_by_time(USER, 1_700_000_000_010, 1_700_000_000_019)
    assert [f.time for f in history.fills] == [1_700_000_000_010 + i // 2 for i in range(20)]
    assert (history.requests, history.truncated) == (1, False)
    assert server.requests[0]["endTime"] == 1_700_000_000_019
    assert weight_used(metrics) == 21


async def test_user_fills_by_time_reports_the_10000_fill_horizon(server: FakeInfo) -> None:
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    server.fills = make_fills(12_000)  # only the newest 10000 are reachable
    async with client(server.url, budgets, metrics) as info:
        history = await info.user_fills_by_time(USER, start_ms=1_700_000_000_000)
    assert history.truncated
    assert len(history.fills) == 10_000
    assert history.fills[0].tid == 10_000 + 2_000
    assert history.fills[-1].tid == 10_000 + 11_999


async def test_client_has_one_life(server: FakeInfo) -> None:
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(), metrics)
    info = client(server.url, budgets, metrics)
    with pytest.raises(RuntimeError, match="outside"):
        await info.meta()
    async with info:
        await info.meta()
    with pytest.raises(RuntimeError, match="outside"):
        await info.meta()
    with pytest.raises(RuntimeError, match="single-use"):
        async with info:
            pass


async def test_item_surcharge_is_reserved_up_front_so_full_pages_cannot_overrun_the_window() -> None:
    """Four concurrent backfills of 2000-fill pages (120 weight each) against a 300/min budget."""
    clock = ManualClock()
    metrics = Metrics()
    budgets = Budgets(HyperliquidConfig(rest_weight_per_minute=300), metrics, clock=clock)
    fake = FakeInfo(clock)
    fake.fills = make_fills(2000)
    async with serve(fake), client(fake.url, budgets, metrics) as info:
        backfills = [asyncio.create_task(info.user_fills_by_time(USER, 1_700_000_000_000)) for _ in range(4)]
        await drive(clock, budgets, backfills)
    assert all(len(task.result().fills) == 2000 for task in backfills)
    events = sorted(fake.charged)
    assert sorted(w for _, w in events) == [20] * 4 + [120] * 4  # a full page, then the boundary millisecond
    assert max_in_any_window(events, 60.0) <= 300


async def test_against_the_simulator_budget_matches_its_accounting_and_never_trips_its_limit() -> None:
    """The simulator enforces its own 300/min window on the same clock: the client must never see a 429."""
    clock = ManualClock(start=1000.0)
    async with SimServer(SimConfig(rest_weight_per_minute=300), clock=clock.now) as sim:
        whale = sim.exchange.whale(USER)
        oid = await whale.market_order("BTC", True, "1.5", "80000", fills=3)
        metrics = Metrics()
        budgets = Budgets(HyperliquidConfig(rest_weight_per_minute=300), metrics, clock=clock)
        async with client(sim.info_url, budgets, metrics) as info:
            state = await info.clearinghouse_state(USER)
            history = await info.user_fills_by_time(USER, 0)
            status = await info.order_status(USER, oid)
            polls = [asyncio.create_task(info.meta()) for _ in range(24)]
            await drive(clock, budgets, polls)
        assert state.positions()["BTC"].szi == Decimal("1.5")
        assert [f.oid for f in history.fills] == [oid] * 3
        assert sum(f.sz for f in history.fills) == Decimal("1.5")
        assert status.order is not None
        assert status.order.status == "filled"
        assert all(len(p.result().universe) > 0 for p in polls)
        rate_limited = sum(
            s.value
            for fam in metrics.registry.collect()
            for s in fam.samples
            if fam.name == "hl_monitor_rest_requests" and s.labels.get("outcome") == "http_429"
        )
        assert rate_limited == 0
        assert sim.stats.rest_weight_used == weight_used(metrics) == 2 + 20 + 2 + 24 * 20
        assert clock.now() > 1000.0 + 60.0, "the polls really needed more than one window"
