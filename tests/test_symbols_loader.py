"""SymbolLoader against the simulator's REST /info (and a proxy in front of it that can fail): the map covers
every perp dex and spot pair, failures keep the last good map and are retried, an unknown coin in a fill
reloads at once and its held signal leaves with the right symbol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import web

from hl_monitor.config import AggregationConfig, Config, DatabaseConfig, HyperliquidConfig, SymbolsConfig
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.symbols import SymbolLoader
from hl_monitor.hyperliquid.info import InfoClient
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.metrics import Metrics
from hl_monitor.sim import exchange as sim_exchange
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.storage.repository import create_engine, load_pair_categories
from hl_monitor.tracking.engine import TrackingEngine
from tests.support.factories import ADDR, NOW, fill, frame, update
from tests.support.net import free_port

# Fast retries; scheduled refreshes far away so only failures and requests cause loads in a test.
CFG = SymbolsConfig(refresh_interval=3600.0, retry_initial_delay=0.05, retry_max_delay=0.2, reload_min_interval=0.05)
# perpDexs, meta of the first dex, meta of xyz, spotMeta.
REQUESTS_PER_LOAD = 4
WAIT_S = 5.0


class FlakyInfo:
    """A /info proxy in front of the simulator that answers 503 while `broken`."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.broken = False
        self.refused = 0
        self._refusal = asyncio.Event()
        self.port = free_port()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/info"

    async def _handle(self, request: web.Request) -> web.Response:
        if self.broken:
            self.refused += 1
            self._refusal.set()
            return web.Response(status=503, text="upstream unavailable")
        assert self._session is not None
        async with self._session.post(self.upstream, data=await request.read()) as resp:
            return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")

    async def wait_refused(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while self.refused < count:
                self._refusal.clear()
                await self._refusal.wait()

    async def __aenter__(self) -> FlakyInfo:
        app = web.Application()
        app.router.add_post("/info", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        assert self._runner is not None
        await self._session.close()
        await self._runner.cleanup()


class Updates:
    """Records every map the loader publishes and lets a test wait for the next one."""

    def __init__(self, then: Callable[[SymbolMap], None] | None = None) -> None:
        self.maps: list[SymbolMap] = []
        self._then = then
        self._event = asyncio.Event()

    def __call__(self, symbols: SymbolMap) -> None:
        self.maps.append(symbols)
        if self._then is not None:
            self._then(symbols)
        self._event.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.maps) < count:
                self._event.clear()
                await self._event.wait()


@asynccontextmanager
async def info_client(url: str, metrics: Metrics) -> AsyncIterator[InfoClient]:
    budgets = Budgets(HyperliquidConfig(), metrics)
    async with InfoClient(url, budgets, metrics, timeout=2.0, max_attempts=1) as info:
        yield info


def loads(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("hl_monitor_symbol_reloads_total", {"outcome": outcome}) or 0.0


async def test_one_load_covers_every_perp_dex_spot_pairs_and_pair_categories(sqlite_url: str) -> None:
    db = create_engine(Config(database=DatabaseConfig(url=sqlite_url)))
    async with db.begin() as conn:  # the old service's pair_configs table, owned by another service
        await conn.execute(sa.text("CREATE TABLE pair_configs (symbol TEXT, platform TEXT, category INTEGER)"))
        await conn.execute(sa.text("INSERT INTO pair_configs VALUES ('BTC', 'hl', 1), ('HYPE', 'hl', 2)"))
    metrics = Metrics()
    updates = Updates()
    try:
        async with SimServer(SimConfig(port=0)) as sim, info_client(sim.info_url, metrics) as info:
            loader = SymbolLoader(info, CFG, metrics, categories=lambda: load_pair_categories(db), on_update=updates)
            assert not loader.loaded
            assert await loader.load()
    finally:
        await db.dispose()
    symbols = loader.symbols
    assert updates.maps == [symbols]
    assert symbols.dexes == {"", "xyz"}
    for coin in ("BTC", "ETH", "SOL", "HYPE", "xyz:XYZ100", "xyz:TSLA", "PURR/USDC", "@107", "@142"):
        assert symbols.is_known(coin), coin
    assert [(symbols.lookup(c).symbol, symbols.lookup(c).coin_type) for c in ("@142", "@107", "xyz:XYZ100")] == [
        ("BTCUSDC", "A"),  # UBTC aliased to BTC, category 1 from pair_configs
        ("HYPEUSDC", "B"),
        ("XYZ100USDC", "D"),
    ]
    assert (loader.loaded, loader.failures, loads(metrics, "ok")) == (True, 0, 1)


async def test_first_load_failure_starts_with_an_empty_map_and_retries_until_it_succeeds() -> None:
    """The service starts without metadata: load() reports the failure instead of raising; run() retries."""
    metrics = Metrics()
    updates = Updates()
    async with SimServer(SimConfig(port=0)) as sim, FlakyInfo(sim.info_url) as proxy:
        proxy.broken = True
        async with info_client(proxy.url, metrics) as info:
            loader = SymbolLoader(info, CFG, metrics, on_update=updates)
            assert await loader.load() is False
            assert (len(loader.symbols), loader.failures, loader.loaded) == (0, 1, False)
            assert "503" in str(loader.last_error)
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(loader.run())
                await proxy.wait_refused(3)  # retried with backoff while the exchange is down
                proxy.broken = False
                await updates.wait(1)
                task.cancel()
    assert loader.loaded
    assert loader.failures == 0
    assert loader.symbols.is_known("BTC")
    assert loads(metrics, "failed") >= 3
    assert loads(metrics, "ok") == 1


async def test_a_failed_reload_keeps_the_last_good_map() -> None:
    metrics = Metrics()
    updates = Updates()
    async with (
        SimServer(SimConfig(port=0)) as sim,
        FlakyInfo(sim.info_url) as proxy,
        info_client(proxy.url, metrics) as info,
    ):
        loader = SymbolLoader(info, CFG, metrics, on_update=updates)
        assert await loader.load()
        good = loader.symbols
        proxy.broken = True
        assert await loader.load() is False
    assert loader.symbols is good
    assert good.is_known("@107")
    assert updates.maps == [good]  # nobody was handed an empty or partial map
    assert (loader.failures, loads(metrics, "failed"), loads(metrics, "ok")) == (1, 1, 1)


async def test_an_unknown_coin_in_a_fill_reloads_at_once_and_its_signal_gets_the_right_symbol(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pair listed after our last load: the engine holds its signal, the loader reloads, the signal leaves
    labelled from the new metadata (not as the raw `@300`)."""
    metrics = Metrics()
    async with SimServer(SimConfig(port=0)) as sim, info_client(sim.info_url, metrics) as info:
        engine = TrackingEngine(AggregationConfig(), SymbolMap.empty())
        updates = Updates(then=engine.set_symbols)
        loader = SymbolLoader(info, CFG, metrics, on_update=updates)
        engine.on_unknown_coin = loader.request_reload
        assert await loader.load()
        engine.set_symbols(loader.symbols)
        engine.add_address(ADDR)
        engine.on_user_fills(ADDR, frame(snapshot=True), NOW)

        # The exchange lists a new token and its USDC pair.
        token = sim_exchange.SpotToken("NEWT", 300, 2, 8)
        monkeypatch.setattr(sim_exchange, "SPOT_TOKENS", (*sim_exchange.SPOT_TOKENS, token))
        pair = sim_exchange.SpotPair("@300", 300, token, sim_exchange.SPOT_TOKENS[0], Decimal("2.5"))
        monkeypatch.setattr(sim_exchange, "SPOT_PAIRS", (*sim_exchange.SPOT_PAIRS, pair))

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(loader.run())
            assert engine.on_user_fills(ADDR, frame(fill(5, 50, "10", "2.5", dir="Buy", coin="@300")), NOW + 1) == []
            assert loader.pending_requests == {"@300"}
            held = engine.on_order_updates(ADDR, [update(5, "filled", orig="10", coin="@300")], NOW + 2)
            assert held == []  # due, but its coin is not in the map yet
            await updates.wait(2)
            task.cancel()
    (signal,) = engine.tick(NOW + 3)
    assert (signal.coin, signal.symbol, signal.asset_type, signal.size) == ("@300", "NEWTUSDC", "spot", Decimal(10))
    assert engine.stats.held_released == 1
    assert loader.pending_requests == frozenset()


async def test_reload_requests_are_debounced_and_a_coin_the_exchange_does_not_list_cannot_loop() -> None:
    metrics = Metrics()
    updates = Updates()
    async with SimServer(SimConfig(port=0)) as sim, info_client(sim.info_url, metrics) as info:
        loader = SymbolLoader(info, CFG, metrics, on_update=updates)
        assert await loader.load()
        assert sim.stats.rest_requests == REQUESTS_PER_LOAD
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(loader.run())
            for coin in ("GHOST1", "GHOST2", "GHOST1", "BTC"):  # BTC is known: no request
                loader.request_reload(coin)
            assert loader.pending_requests == {"GHOST1", "GHOST2"}
            await updates.wait(2)
            assert sim.stats.rest_requests == 2 * REQUESTS_PER_LOAD  # one reload answered both
            loader.request_reload("GHOST1")  # still unlisted after that reload: not asked again
            assert loader.pending_requests == frozenset()
            task.cancel()
    assert len(updates.maps) == 2
