"""Noise filters: what the sink keeps back, what it never keeps back, and that a suppressed signal is stored and
shown but reaches neither JetStream nor the legacy subject (real nats-server, real SQLite writer and store)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any, Final

import aiohttp
import msgspec
import nats
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.config import Config, DatabaseConfig, HttpConfig, Secret, SignalsConfig
from hl_monitor.delivery.outbox import Outbox
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.delivery.sink import Sink, filter_reason
from hl_monitor.domain.address import WatchedAddress, symbol_keys
from hl_monitor.domain.signal import Signal, SuppressReason
from hl_monitor.feeds.addresses import AddressBook
from hl_monitor.metrics import Metrics
from hl_monitor.ops.http import HttpServer, Readiness, create_app
from hl_monitor.ops.status import Admin
from hl_monitor.storage import migrate
from hl_monitor.storage import tables as t
from hl_monitor.storage.cli import address_details
from hl_monitor.storage.repository import AddressTable, Repository, create_engine
from hl_monitor.storage.writer import BatchWriter
from tests.support.delivery import nats_cfg
from tests.support.metrics import metric_value
from tests.support.nats import NatsServer, read_stream
from tests.support.storage import writer_cfg
from tests.support.waiting import wait_until

WHALE: Final = "0x" + "ab" * 20
OTHER: Final = "0x" + "cd" * 20
T0: Final = 1_717_000_000_000
TOKEN: Final = "s3cret-token"
AUTH: Final = {"Authorization": f"Bearer {TOKEN}"}
SENTINEL: Final = b"sentinel"


def sig(
    address: str,
    n: int,
    direction: str,
    coin: str,
    notional: str,
    *,
    full_close: bool = False,
    symbol: str | None = None,
) -> Signal:
    """A perp signal of `notional` USD at price 100 (so its size is notional / 100)."""
    opening = direction == "open"
    return Signal(
        address=address,
        asset_type="futures",
        symbol=symbol or f"{coin}USDC",
        coin_type="D",
        direction="open" if opening else "close",
        side="LONG",
        position_rate=Decimal("1.5"),
        close_rate=Decimal(0) if opening else Decimal("0.5"),
        size=Decimal(notional) / 100,
        price=Decimal(100),
        timestamp=T0 + n,
        signal_id=f"{address}:{n}:{'OL' if opening else 'CL'}",
        coin=coin,
        dir="Open Long" if opening else "Close Long",
        oid=n,
        trigger="status",
        fill_count=1,
        first_fill_time=T0 + n,
        last_fill_time=T0 + n,
        notional_usd=Decimal(notional),
        full_close=full_close,
        detected_at=T0 + n,
    )


# ---------------------------------------------------------------- the decision


def book_entry(floor: str = "0", allow: Sequence[str] = (), deny: Sequence[str] = ()) -> WatchedAddress:
    """WHALE's book entry with these filters, as the address book builds it."""
    return WatchedAddress(
        address=WHALE, min_notional_usd=Decimal(floor), allow_symbols=symbol_keys(allow), deny_symbols=symbol_keys(deny)
    )


@pytest.mark.parametrize(
    ("entry", "symbol", "coin", "notional", "global_min", "reason"),
    [
        (None, "BTCUSDC", "BTC", "5", "0", None),  # no filter at all: everything goes out
        (None, "BTCUSDC", "BTC", "999.99", "1000", "min_notional"),
        (None, "BTCUSDC", "BTC", "1000", "1000", None),  # the floor itself passes
        (book_entry(floor="5000"), "BTCUSDC", "BTC", "4000", "1000", "min_notional"),
        (book_entry(floor="10"), "BTCUSDC", "BTC", "500", "1000", "min_notional"),
        (book_entry(deny=["btc"]), "BTCUSDC", "BTC", "9e9", "0", "symbol_denied"),
        (book_entry(deny=["btcusdc"]), "BTCUSDC", "BTC", "1", "0", "symbol_denied"),
        (book_entry(allow=["ETH"]), "BTCUSDC", "BTC", "9e9", "0", "symbol_not_allowed"),
        (book_entry(allow=["XYZ:xyz100"]), "XYZ100", "xyz:XYZ100", "1", "0", None),
        (
            book_entry(allow=["BTC"], deny=["BTC"]),
            "BTCUSDC", "BTC", "9e9", "0", "symbol_denied",
        ),
        (book_entry(allow=["BTC"]), "BTCUSDC", "BTC", "1", "2", "min_notional"),
    ],
    ids=[
        "no-filter", "below-global", "at-global", "address-floor-above-global", "global-above-address-floor",
        "deny-by-coin-any-case", "deny-by-symbol", "not-in-allow-list", "allow-by-hip3-coin", "deny-wins-over-allow",
        "allowed-but-too-small",
    ],
)  # fmt: skip
def test_filter_reason(
    entry: WatchedAddress | None, symbol: str, coin: str, notional: str, global_min: str, reason: SuppressReason | None
) -> None:
    signal = sig(WHALE, 1, "open", coin, notional, symbol=symbol)
    assert filter_reason(signal, entry, Decimal(global_min)) == reason


# ---------------------------------------------------------------- the whole path


async def _store(url: str) -> AsyncEngine:
    await migrate.upgrade(url)
    return create_engine(Config(database=DatabaseConfig(url=url)))


async def _stored(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    s = t.signals.c
    query = sa.select(s.signal_id, s.suppressed, s.suppressed_reason, s.published, s.published_at)
    async with engine.connect() as conn:
        return {row.signal_id: dict(row._mapping) for row in (await conn.execute(query)).all()}


async def _holdings(engine: AsyncEngine) -> set[tuple[str, str]]:
    return await Repository(engine).load_signal_holdings()


async def test_suppressed_signals_are_stored_and_shown_but_never_published(
    nats_server: NatsServer, sqlite_url: str
) -> None:
    engine = await _store(sqlite_url)
    repo = Repository(engine)
    metrics = Metrics()
    cfg = nats_cfg()
    writer = BatchWriter(engine, writer_cfg(), metrics)
    publisher = Publisher(cfg, SignalsConfig(), metrics, url=nats_server.url)
    await publisher.connect(wait=5)
    await publisher.ensure_stream()
    outbox = Outbox(publisher, repo, writer, metrics, cfg)
    entries = {
        WHALE: book_entry(deny=["eth"]),
        OTHER: WatchedAddress(address=OTHER, min_notional_usd=Decimal(50_000)),
    }
    sink = Sink(
        writer,
        outbox,
        metrics,
        instance_id="test",
        signals=SignalsConfig(min_notional_usd=1000.0),
        addresses=entries.get,
        holdings=writer,
    )
    listener = await nats.connect(nats_server.url)
    legacy = await listener.subscribe("hl_address_signal")
    await listener.flush()
    big_open = sig(WHALE, 1, "open", "BTC", "200000")
    small_add = sig(WHALE, 2, "open", "BTC", "500")  # below the global floor, the position is already out
    small_close = sig(WHALE, 3, "close", "BTC", "400")  # below the floor, but its open was published
    eth_open = sig(WHALE, 4, "open", "ETH", "300000")  # denied symbol
    eth_close = sig(WHALE, 5, "close", "ETH", "300000", full_close=True)  # its open never went out
    other_open = sig(OTHER, 6, "open", "BTC", "20000")  # above the global floor, below the address's own
    tasks = [asyncio.create_task(writer.run()), asyncio.create_task(outbox.run())]
    try:
        await sink([big_open, small_add, small_close, eth_open, eth_close, other_open])

        async def settled() -> bool:
            await writer.flush()
            return outbox.held == 0 and await repo.count_unpublished() == 0

        await wait_until(settled, what="published signals acknowledged and marked")
        # Quiet point for the core subject: the sentinel leaves the publisher's connection after every legacy copy.
        await publisher.client.publish("hl_address_signal", SENTINEL)
        copies: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while (msg := await legacy.next_msg(timeout=5)).data != SENTINEL:
                copies.append(json.loads(msg.data, parse_float=Decimal))

        published = {big_open.signal_id, small_close.signal_id}
        assert {msg_id for _, msg_id, _ in await read_stream(nats_server.url)} == published
        assert sorted(c["timestamp"] for c in copies) == [big_open.timestamp, small_close.timestamp]
        assert [c["position_size"] for c in copies] == ["Large", "Small"]

        rows = await _stored(engine)
        assert {sid: (bool(r["suppressed"]), r["suppressed_reason"]) for sid, r in rows.items()} == {
            big_open.signal_id: (False, None),
            small_add.signal_id: (True, "min_notional"),
            small_close.signal_id: (False, None),
            eth_open.signal_id: (True, "symbol_denied"),
            eth_close.signal_id: (True, "symbol_denied"),
            other_open.signal_id: (True, "min_notional"),
        }
        assert {sid for sid, r in rows.items() if r["published_at"] is not None} == published
        assert await repo.fetch_unpublished(100) == []  # the store scan never picks a suppressed row
        stored = {s.signal.signal_id: s.signal for s in await repo.list_signals()}
        assert (stored[small_add.signal_id].suppressed, stored[small_add.signal_id].suppressed_reason) == (
            True,
            "min_notional",
        )
        shown = await address_details(engine, WHALE, 10, initial=[WHALE])  # `addresses show`, newest first
        assert shown is not None
        assert [(s["published"], s["suppressed"]) for s in shown["last_signals"]] == [
            (False, True),
            (False, True),
            (True, False),
            (False, True),
            (True, False),
        ]

        assert metric_value(metrics, "signals_suppressed_total", reason="min_notional") == 2
        assert metric_value(metrics, "signals_suppressed_total", reason="symbol_denied") == 2
        assert metric_value(metrics, "signals_filter_overridden_total") == 1
        assert await _holdings(engine) == {(WHALE, "BTC")}
    finally:
        await outbox.drain(5)
        await writer.close()
        for task in tasks:
            await task
        await listener.close()
        await publisher.close()
        await engine.dispose()


class Submitted:
    """The outbox's intake, recording what the sink handed over for publishing."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def submit(self, signal: Signal) -> None:
        self.ids.append(signal.signal_id)


@contextlib.asynccontextmanager
async def running_sink(engine: AsyncEngine, min_notional: float) -> AsyncIterator[tuple[Sink, Submitted]]:
    """A sink on the real writer, restored from the store as the service starts it."""
    writer = BatchWriter(engine, writer_cfg(), Metrics())
    submitted = Submitted()
    sink = Sink(
        writer,
        submitted,
        Metrics(),
        instance_id="test",
        signals=SignalsConfig(min_notional_usd=min_notional),
        holdings=writer,
    )
    await sink.restore(Repository(engine))
    task = asyncio.create_task(writer.run())
    try:
        yield sink, submitted
    finally:
        await writer.close()
        await task


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "mariadb_url"))


async def test_a_published_open_protects_its_closes_across_a_restart(db_url: str) -> None:
    engine = await _store(db_url)
    try:
        async with running_sink(engine, 1000.0) as (sink, submitted):
            await sink([sig(WHALE, 1, "open", "BTC", "50000"), sig(WHALE, 2, "open", "SOL", "10")])
            assert submitted.ids == [f"{WHALE}:1:OL"]
        assert await _holdings(engine) == {(WHALE, "BTC")}

        async with running_sink(engine, 1000.0) as (sink, submitted):  # a restart: the sink starts from the store
            assert sink.holdings == {(WHALE, "BTC")}
            await sink(
                [
                    sig(WHALE, 3, "close", "BTC", "200"),  # partial, tiny: still published
                    sig(WHALE, 4, "close", "SOL", "5", full_close=True),  # its open was suppressed: stays quiet
                    sig(WHALE, 5, "close", "BTC", "300", full_close=True),  # ends the position
                    sig(WHALE, 6, "open", "BTC", "100"),  # a new tiny position: nobody is told
                    sig(WHALE, 7, "close", "BTC", "100", full_close=True),
                ]
            )
            assert submitted.ids == [f"{WHALE}:3:CL", f"{WHALE}:5:CL"]
            assert sink.holdings == set()
        assert await _holdings(engine) == set()
        rows = await _stored(engine)
        assert {sid for sid, r in rows.items() if r["suppressed"]} == {
            f"{WHALE}:2:OL",
            f"{WHALE}:4:CL",
            f"{WHALE}:6:OL",
            f"{WHALE}:7:CL",
        }
    finally:
        await engine.dispose()


async def test_a_flip_hands_the_holding_to_the_new_side(sqlite_url: str) -> None:
    """The close half of a flip ends the published position; the open half starts the next one only if it is
    published itself."""
    engine = await _store(sqlite_url)
    try:
        async with running_sink(engine, 1000.0) as (sink, submitted):
            await sink([sig(WHALE, 1, "open", "BTC", "50000")])
            await sink([sig(WHALE, 2, "close", "BTC", "50000", full_close=True), sig(WHALE, 2, "open", "BTC", "10")])
            assert sink.holdings == set()
            await sink([sig(WHALE, 3, "close", "BTC", "10", full_close=True)])
            assert submitted.ids == [f"{WHALE}:1:OL", f"{WHALE}:2:CL"]
    finally:
        await engine.dispose()


async def test_the_outbox_refuses_a_suppressed_signal() -> None:
    metrics = Metrics()
    cfg = nats_cfg()
    publisher = Publisher(cfg, SignalsConfig(), metrics, url="nats://127.0.0.1:1")  # never connected

    class NoStore:
        async def fetch_unpublished(self, limit: int, older_than_ms: int | None = None) -> list[Signal]:
            return []

        async def count_unpublished(self) -> int:
            return 0

        async def mark_published(self, signal_id: str, at_ms: int) -> None:
            return None

    outbox = Outbox(publisher, NoStore(), NoStore(), metrics, cfg)
    kept = msgspec.structs.replace(sig(WHALE, 1, "open", "BTC", "1"), suppressed=True, suppressed_reason="min_notional")
    await outbox.submit(kept)
    assert outbox.held == 0
    await outbox.submit(sig(WHALE, 2, "open", "BTC", "1"))
    assert outbox.held == 1


# ---------------------------------------------------------------- the admin API writes what the sink reads


class NoView:
    def readiness(self) -> Readiness:
        return Readiness()

    def status(self) -> dict[str, Any]:
        return {}

    def health_summary(self) -> dict[str, Any]:
        return {}

    async def address_detail(self, address: str) -> dict[str, Any] | None:
        return None


async def test_filters_set_over_the_admin_api_reach_the_address_book(sqlite_url: str) -> None:
    engine = await _store(sqlite_url)
    table = AddressTable(engine)
    metrics = Metrics()
    book = AddressBook([table], metrics, reload_interval=3600, remove_grace=0)
    cfg = HttpConfig(listen="127.0.0.1:0", admin_token=Secret(TOKEN))
    app = create_app(NoView(), metrics, Admin(table, book), cfg)
    try:
        async with (
            HttpServer(app, cfg.listen) as server,
            aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}") as http,
        ):
            body = {"address": WHALE, "min_notional_usd": "2500.50", "deny_symbols": [" eth", "ETH", "xyz:XYZ100"]}
            async with http.post("/admin/addresses", json=body, headers=AUTH) as resp:
                assert resp.status == 200
            await book.reload()
            entry = book.entry(WHALE)
            assert entry is not None
            assert (entry.min_notional_usd, entry.deny_symbols) == (
                Decimal("2500.50"),
                frozenset({"ETH", "XYZ:XYZ100"}),
            )
            assert filter_reason(sig(WHALE, 1, "open", "ETH", "1e9"), entry, Decimal(0)) == "symbol_denied"

            patch = {"deny_symbols": [], "allow_symbols": ["BTC"], "min_notional_usd": 0}
            async with http.patch(f"/admin/addresses/{WHALE}", json=patch, headers=AUTH) as resp:
                assert resp.status == 200
                row = await resp.json()
            assert (row["min_notional_usd"], row["allow_symbols"], row["deny_symbols"]) == ("0", ["BTC"], [])
            await book.reload()
            entry = book.entry(WHALE)
            assert entry is not None
            assert (entry.min_notional_usd, entry.allow_symbols, entry.deny_symbols) == (
                Decimal(0),
                frozenset({"BTC"}),
                frozenset(),
            )

            async with http.patch(f"/admin/addresses/{WHALE}", json={"min_notional_usd": -1}, headers=AUTH) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"] == "$.min_notional_usd: -1 is not a dollar amount of 0 or more"
    finally:
        await engine.dispose()
