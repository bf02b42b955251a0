"""`GET /positions`, `/positions/summary` and `/positions/{address}`: what whales hold over HTTP, 400 naming
the bad parameter, and no routes at all when the service has no position view."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from hl_monitor.config import HttpConfig
from hl_monitor.metrics import Metrics
from hl_monitor.ops.http import HttpServer, create_app
from hl_monitor.ops.positions import list_positions, summary
from hl_monitor.tracking.portfolio import AddressPortfolio, PositionModel
from tests.support.http_fakes import EmptyView
from tests.support.whales import ALPHA, BRAVO, CHARLIE, DELTA, LABELS, NOW, docs, whales

UNWATCHED = "0x" + "ef" * 20


class ModelView:
    """The position view over a real model, as the owner component exposes it."""

    def __init__(self, model: PositionModel) -> None:
        self.model = model

    def portfolios(self) -> Iterable[AddressPortfolio]:
        for address in self.model:
            doc = self.model.get(address)
            if doc is not None:
                yield doc

    def portfolio(self, address: str) -> AddressPortfolio | None:
        return self.model.get(address)

    def label(self, address: str) -> str:
        return LABELS.get(address, "")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    cfg = HttpConfig(listen="127.0.0.1:0")
    app = create_app(EmptyView(), Metrics(), None, cfg, positions=ModelView(whales()))
    async with (
        HttpServer(app, cfg.listen) as server,
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}") as session,
    ):
        yield session


async def get(http: aiohttp.ClientSession, path: str, status: int = 200) -> Any:
    async with http.get(path) as resp:
        body = await resp.json()
        assert resp.status == status, body
        assert resp.content_type == "application/json"
        return body


def coins(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(row["address"], row["coin"]) for row in body["positions"]]


async def test_positions_lists_every_position_biggest_first(http: aiohttp.ClientSession) -> None:
    body = await get(http, "/positions")

    assert body["positions"] == list_positions(docs(), label=ModelView(whales()).label)
    assert (body["count"], body["matched"]) == (8, 8)
    first = body["positions"][0]
    assert (first["address"], first["label"], first["coin"], first["position_value_usd"]) == (
        BRAVO,
        "bravo",
        "BTC",
        "49225.0",
    )
    assert first["as_of"] == NOW + 1


async def test_positions_filters_sort_and_limit(http: aiohttp.ClientSession) -> None:
    btc = await get(http, "/positions?symbol=btc&sort=liquidation_distance")
    assert coins(btc) == [(CHARLIE, "BTC"), (BRAVO, "BTC"), (ALPHA, "BTC")]

    shorts = await get(http, "/positions?side=SHORT&sort=pnl")
    assert coins(shorts) == [(BRAVO, "ETH"), (CHARLIE, "BTC"), (CHARLIE, "cash:NVDA")]

    big = await get(http, "/positions?min_usd=19690.0")  # at least: the boundary is kept
    assert coins(big) == [(BRAVO, "BTC"), (BRAVO, "ETH"), (CHARLIE, "BTC")]

    top = await get(http, "/positions?limit=2&symbol=BTCUSDC")
    assert coins(top) == [(BRAVO, "BTC"), (CHARLIE, "BTC")]
    assert (top["count"], top["matched"]) == (2, 3)

    assert (await get(http, "/positions?symbol=XRP"))["positions"] == []
    assert len((await get(http, "/positions?limit=1000"))["positions"]) == 8
    assert len((await get(http, "/positions?limit=1"))["positions"]) == 1


async def test_summary_gives_the_whale_bias_per_symbol(http: aiohttp.ClientSession) -> None:
    body = await get(http, "/positions/summary")

    assert body == {"symbols": summary(docs(), ModelView(whales()).label)}
    btc = body["symbols"][0]
    assert (btc["symbol"], btc["longs"], btc["shorts"], btc["net_notional_usd"]) == ("BTCUSDC", 2, 1, "39380.0")
    assert btc["long_avg_entry_px"] == str((Decimal("0.1") * 98450 + Decimal("0.5") * 90000) / Decimal("0.6"))
    assert btc["unrealized_pnl_usd"] == "4781.125"
    assert (btc["closest_liquidation"]["address"], btc["closest_liquidation"]["label"]) == (CHARLIE, "charlie")

    eth = await get(http, "/positions/summary?symbol=ETH")
    assert [s["symbol"] for s in eth["symbols"]] == ["ETHUSDC"]
    assert (await get(http, "/positions/summary?symbol=XRP")) == {"symbols": []}


async def test_one_address_document(http: aiohttp.ClientSession) -> None:
    body = await get(http, f"/positions/{ALPHA.upper().replace('0X', '0x')}")
    assert (body["address"], body["label"], body["account_value"]) == (ALPHA, "alpha", "25492.250")
    assert body["dexes"]["xyz"]["positions"]["xyz:TSLA"]["size"] == "10.0"

    unlabelled = await get(http, f"/positions/{DELTA}")
    assert unlabelled["label"] == ""

    missing = await get(http, f"/positions/{UNWATCHED}", 404)
    assert missing == {"error": f"{UNWATCHED} has no position document"}
    invalid = await get(http, "/positions/0x12", 400)
    assert invalid["error"].startswith("address: ")


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("symbol=", "symbol"),
        ("symbol=%20%20", "symbol"),
        ("symbol=" + "X" * 65, "symbol"),
        ("min_usd=abc", "min_usd"),
        ("min_usd=", "min_usd"),
        ("min_usd=-1", "min_usd"),
        ("min_usd=NaN", "min_usd"),
        ("min_usd=Infinity", "min_usd"),
        ("side=both", "side"),
        ("side=", "side"),
        ("sort=size", "sort"),
        ("sort=VALUE", "sort"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-5", "limit"),
        ("limit=%2B5", "limit"),
        ("limit=1.5", "limit"),
        ("limit=1_0", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
        ("limit=99999999999999999999", "limit"),
        ("minUsd=100", "minUsd"),  # a misspelt filter is refused, not ignored
        ("side=long&side=short", "side"),
    ],
)
async def test_bad_positions_query_is_400_naming_the_parameter(
    http: aiohttp.ClientSession, query: str, param: str
) -> None:
    body = await get(http, f"/positions?{query}", 400)
    assert set(body) == {"error"}
    assert body["error"].startswith(f"{param}: "), body


@pytest.mark.parametrize(
    ("query", "param"),
    [("symbol=", "symbol"), ("side=long", "side"), ("symbol=BTC&symbol=ETH", "symbol")],
)
async def test_bad_summary_query_is_400_naming_the_parameter(
    http: aiohttp.ClientSession, query: str, param: str
) -> None:
    body = await get(http, f"/positions/summary?{query}", 400)
    assert body["error"].startswith(f"{param}: "), body


async def test_bad_query_messages_say_what_is_accepted(http: aiohttp.ClientSession) -> None:
    assert (await get(http, "/positions?limit=0", 400))["error"] == "limit: '0' is not an integer from 1 to 1000"
    assert (await get(http, "/positions?sort=size", 400))["error"] == (
        "sort: 'size' is not one of value, pnl, liquidation_distance"
    )
    assert (await get(http, "/positions?side=both", 400))["error"] == "side: 'both' is not long or short"
    assert (await get(http, "/positions?minUsd=1", 400))["error"] == (
        "minUsd: unknown parameter; expected one of symbol, min_usd, side, sort, limit"
    )


async def test_no_position_routes_without_a_view() -> None:
    cfg = HttpConfig(listen="127.0.0.1:0")
    async with (
        HttpServer(create_app(EmptyView(), Metrics(), None, cfg), cfg.listen) as server,
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}") as session,
    ):
        for path in ("/positions", "/positions/summary", f"/positions/{ALPHA}"):
            assert (await get(session, path, 404)) == {"error": "Not Found"}
        async with session.get("/health/live") as resp:
            assert resp.status == 200
