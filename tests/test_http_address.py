"""`GET /addresses/{address}`: one watched address as the service last saw it; 400 invalid, 404 unknown."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest

from hl_monitor.config import AggregationConfig, HttpConfig
from hl_monitor.hyperliquid.protocol import ClearinghouseState, ClearinghouseStateData, decode_info
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.metrics import Metrics
from hl_monitor.ops.http import HttpServer, Readiness, create_app
from hl_monitor.tracking.engine import TrackingEngine
from tests.support.factories import ADDR, NOW, T0, fill, frame
from tests.support.paths import FIXTURES

UNWATCHED = "0x" + "ef" * 20


class EngineView:
    """A view over a real tracking engine, composed the way the service composes it."""

    def __init__(self, engine: TrackingEngine) -> None:
        self.engine = engine
        self.asked: list[str] = []

    def readiness(self) -> Readiness:
        return Readiness()

    def status(self) -> dict[str, Any]:
        return {}

    def health_summary(self) -> dict[str, Any]:
        return {}

    async def address_detail(self, address: str) -> dict[str, Any] | None:
        self.asked.append(address)
        if not self.engine.is_watched(address):
            return None
        positions = self.engine.positions.get(address)
        watermark = self.engine.watermark(address)
        return {
            "address": address,
            "tier": "precise",
            "connection": "user-0",
            "positions": msgspec.to_builtins(positions) if positions is not None else None,
            "pending_orders": self.engine.pending_orders(address),
            "watermark": {"time": watermark.time, "tid": watermark.tid} if watermark is not None else None,
            "last_signals": [],
        }


@pytest.fixture
async def served() -> AsyncIterator[tuple[aiohttp.ClientSession, EngineView]]:
    engine = TrackingEngine(AggregationConfig(), SymbolMap.empty())
    engine.add_address(ADDR, "whale")
    engine.on_user_fills(ADDR, frame(snapshot=True), NOW)
    engine.on_user_fills(ADDR, frame(fill(42, 420, "0.000000001", "80000.5")), NOW + 1)
    state = decode_info((FIXTURES / "http_clearinghouse_state.json").read_bytes(), ClearinghouseState)
    engine.on_clearinghouse(ADDR, ClearinghouseStateData(dex="", user=ADDR, clearinghouse_state=state), NOW + 2)
    view = EngineView(engine)
    cfg = HttpConfig(listen="127.0.0.1:0")
    async with (
        HttpServer(create_app(view, Metrics(), None, cfg), cfg.listen) as server,
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}") as session,
    ):
        yield session, view


async def test_watched_address_shows_positions_pending_orders_and_watermark(
    served: tuple[aiohttp.ClientSession, EngineView],
) -> None:
    session, view = served
    async with session.get(f"/addresses/{ADDR.upper().replace('0X', '0x')}") as resp:
        assert resp.status == 200
        raw = await resp.read()
    assert view.asked == [ADDR]  # normalised before the view sees it
    body = json.loads(raw, parse_float=str)
    assert (body["address"], body["tier"], body["connection"]) == (ADDR, "precise", "user-0")
    (pending,) = body["pending_orders"]
    assert (pending["oid"], pending["coin"], pending["fill_count"], pending["status"]) == (42, "BTC", 1, None)
    assert b'"size":"1E-9"' in raw  # exact decimal text (str of the Decimal), never a rounded float
    assert body["watermark"] == {"time": T0, "tid": 420}
    assert body["positions"]["dexes"][""]["account_value"]


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        (f"/addresses/{UNWATCHED}", 404, f"{UNWATCHED} is not watched"),
        ("/addresses/0x1234", 400, "address: '0x1234' is not 0x followed by 40 hex digits"),
        ("/addresses/whale", 400, "address: 'whale' is not 0x followed by 40 hex digits"),
    ],
)
async def test_unknown_address_is_404_and_invalid_is_400(
    served: tuple[aiohttp.ClientSession, EngineView], path: str, status: int, error: str
) -> None:
    session, view = served
    async with session.get(path) as resp:
        assert resp.status == status
        assert await resp.json() == {"error": error}
    assert view.asked == ([UNWATCHED] if status == 404 else [])  # invalid input never reaches the service
