"""The old service's tables as a drop-in for its database readers (`database.legacy_tables`).

Created only when asked (existing ones and their rows are kept), refused at start when asked for but missing, kept
up to date by the batch writer (one `hl_address_signal` row per signal even when a signal is stored again, one
`hl_order_aggregation` row per order that follows it to its signal, one `hl_position_cache` row per address),
cleaned by the retention rules, and the old address tables read as a source.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.app import Service
from hl_monitor.config import Config, DatabaseConfig, RetentionConfig, load_config
from hl_monitor.errors import StorageError
from hl_monitor.metrics import Metrics
from hl_monitor.storage import migrate
from hl_monitor.storage import tables as t
from hl_monitor.storage.cleaner import RetentionCleaner
from hl_monitor.storage.legacy import utc
from hl_monitor.storage.repository import LegacyAddressTable, create_engine
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.portfolio import AddressPortfolio, DexAccount, SpotHolding
from hl_monitor.tracking.position_events import PerpPosition
from hl_monitor.tracking.state import AggregationRecord
from tests.support.factories import fill
from tests.support.storage import T0, WHALE, make_signal, writer_cfg

D = Decimal
LEGACY = ("hl_address_signal", "hl_order_aggregation", "hl_position_cache")
DAY_MS = 86_400_000


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "mariadb_url"))


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    await migrate.upgrade(db_url, legacy_tables=True)
    eng = create_engine(Config(database=DatabaseConfig(url=db_url)))
    try:
        yield eng
    finally:
        await eng.dispose()


async def tables(eng: AsyncEngine) -> set[str]:
    async with eng.connect() as conn:
        return set(await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names()))


async def rows(eng: AsyncEngine, table: sa.Table) -> list[dict[str, Any]]:
    async with eng.connect() as conn:
        result = await conn.execute(sa.select(table).order_by(table.c.id))
        return [dict(row) for row in result.mappings().all()]


def writer(eng: AsyncEngine, clock: int = T0) -> BatchWriter:
    return BatchWriter(
        eng, writer_cfg(), Metrics(), clock=lambda: clock, legacy_tables=True, symbol_of=lambda coin: f"{coin}USDC"
    )


async def test_tables_are_created_only_when_asked_and_existing_ones_keep_their_rows(db_url: str) -> None:
    await migrate.upgrade(db_url)
    eng = create_engine(Config(database=DatabaseConfig(url=db_url)))
    try:
        assert not set(LEGACY) & await tables(eng)  # never required: without the option nothing is created
        with pytest.raises(StorageError, match="hl_address_signal, hl_order_aggregation, hl_position_cache"):
            await migrate.check_legacy_tables(eng)
        # A database the old service used already has some of them, with rows.
        async with eng.begin() as conn:
            await conn.run_sync(lambda sync: t.legacy_position_cache.create(sync))
            await conn.execute(
                sa.insert(t.legacy_position_cache).values(
                    address=WHALE, spot_balances="[]", futures_positions="[]", updated_at=utc(T0)
                )
            )
        await migrate.upgrade(db_url, legacy_tables=True)  # the option turned on after the revision ran
        await migrate.upgrade(db_url, legacy_tables=True)
        assert set(LEGACY) <= await tables(eng)
        await migrate.check_legacy_tables(eng)
        assert [r["address"] for r in await rows(eng, t.legacy_position_cache)] == [WHALE]
    finally:
        await eng.dispose()


def record(oid: int, *fills: Any, state: str = "pending", status: str | None = None) -> AggregationRecord:
    return AggregationRecord(
        address=WHALE,
        oid=oid,
        direction="OL",
        signal_id=f"{WHALE}:{oid}:OL",
        dir="Open Long",
        dir_code="OL",
        coin="BTC",
        asset_type="futures",
        open_close="open",
        side="LONG",
        fills=list(fills),
        size=sum((f.sz for f in fills), D(0)),
        first_fill_time=fills[0].time,
        last_fill_time=fills[-1].time,
        state=state,  # type: ignore[arg-type]
        status=status,
        terminal=status is not None,
    )


def portfolio() -> AddressPortfolio:
    btc = PerpPosition(
        coin="BTC",
        symbol="BTCUSDC",
        dex="",
        size=D("-1.5"),
        side="SHORT",
        entry_px=D("90000.0"),
        mark_px=D("80000"),
        position_value_usd=D("120000.0"),
        unrealized_pnl=D("15000.0"),
        return_on_equity=D("1.1"),
        leverage_type="cross",
        leverage=10,
        margin_used=D("12000.0"),
        opened_at=T0,
        updated_at=T0,
        source="ws_state",
    )
    dex = DexAccount(
        dex="",
        account_value=D("250000.5"),
        total_ntl_pos=D("120000.0"),
        total_margin_used=D("12000.0"),
        withdrawable=D("238000.5"),
        positions={"BTC": btc},
        source="ws_state",
        as_of=T0,
    )
    usdc = SpotHolding(coin="USDC", token=0, total=D("1000.25"), hold=D("0"), entry_ntl=None, usd_value=D("1000.25"))
    return AddressPortfolio(address=WHALE, dexes={"": dex}, spot={"USDC": usdc}, source="ws_state", as_of=T0)


async def test_writer_keeps_the_old_shapes_up_to_date(engine: AsyncEngine) -> None:
    small = make_signal(1, notional_usd=D("9999.99"))
    medium = make_signal(2, notional_usd=D("10000"))
    large = make_signal(3, notional_usd=D("250000"), direction="close", close_rate=D("0.5"))
    first = writer(engine)
    for signal in (small, medium, large):
        await first.put_signal(signal)
    await first.put_record(record(77, fill(77, 1, "1", "100", time=T0)))
    await first.put_portfolio(WHALE, portfolio())
    await first.flush()
    # A restarted instance stores one of them again (same id): the old table gets no second row.
    again = writer(engine, clock=T0 + 1000)
    await again.put_signal(small)
    fills = (fill(77, 1, "1", "100", time=T0), fill(77, 2, "3", "104", time=T0 + 5))
    await again.put_record(record(77, *fills, state="flushed", status="filled"))
    await again.flush()

    signals = await rows(engine, t.legacy_address_signal)
    assert [(r["address"], r["symbol"], r["direction"], r["side"], r["position_size"]) for r in signals] == [
        (WHALE, "KPEPEUSDC", "open", "LONG", "Small"),
        (WHALE, "KPEPEUSDC", "open", "LONG", "Medium"),
        (WHALE, "KPEPEUSDC", "close", "LONG", "Large"),
    ]
    assert [(r["size"], r["price"], r["close_rate"]) for r in signals] == [
        (s.size, s.price, s.close_rate) for s in (small, medium, large)
    ]
    assert signals[0]["created_at"] == utc(small.detected_at)

    [order] = await rows(engine, t.legacy_order_aggregation)
    assert (order["oid"], order["address"], order["direction"], order["symbol"]) == (77, WHALE, "Open Long", "BTCUSDC")
    assert (order["total_size"], order["weighted_avg_px"], order["order_status"], order["signal_sent"]) == (
        D(4),
        D(103),
        "filled",
        True,
    )
    assert (order["last_fill_time"], order["created_at"], order["updated_at"]) == (T0 + 5, utc(T0), utc(T0 + 1000))
    assert [f["tid"] for f in json.loads(order["fills"])] == [1, 2]

    [cache] = await rows(engine, t.legacy_position_cache)
    assert json.loads(cache["futures_positions"]) == [
        {
            "coin": "BTCUSDC",
            "szi": "-1.5",
            "entry_px": "90000.0",
            "unrealized_pnl": "15000.0",
            "leverage": {"type": "cross", "value": 10},
            "margin_used": "12000.0",
            "position_value": "120000.0",
            "return_on_equity": "1.1",
        }
    ]
    assert json.loads(cache["spot_balances"]) == [{"coin": "USDC", "total": "1000.25", "hold": "0", "entry_ntl": "0"}]
    assert (cache["account_value"], cache["withdrawable"], cache["spot_total_usd"]) == (
        "250000.5",
        "238000.5",
        "1000.25",
    )

    await again.delete_portfolio(WHALE)
    await again.flush()
    assert await rows(engine, t.legacy_position_cache) == []

    # Retention: the old rules on the old tables (signals 7 d, aggregations 2 h).
    cleaner = RetentionCleaner(engine, RetentionConfig(), Metrics(), clock=lambda: T0 + 8 * DAY_MS, legacy_tables=True)
    deleted = await cleaner.run_once()
    assert (deleted["hl_address_signal"], deleted["hl_order_aggregation"]) == (3, 1)


async def test_the_old_address_tables_are_both_sources(engine: AsyncEngine) -> None:
    a, b, c, d = ("0x" + ch * 40 for ch in "abcd")
    source = LegacyAddressTable(engine, server_id=1)
    with pytest.raises(StorageError, match="neither hl_active_addresses nor hl_watch_addresses"):
        await source.load()
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE hl_active_addresses (server_id INT NOT NULL, address VARCHAR(64))"))
        await conn.execute(sa.text(f"INSERT INTO hl_active_addresses VALUES (1, '{a}'), (2, '{b}')"))
        await conn.execute(
            sa.text("CREATE TABLE hl_watch_addresses (address VARCHAR(42), label VARCHAR(64), is_active BOOLEAN)")
        )
        watched = f"('{a}', 'alpha', TRUE), ('{c}', 'gamma', TRUE), ('{d}', 'x', FALSE)"
        await conn.execute(sa.text(f"INSERT INTO hl_watch_addresses VALUES {watched}"))
    found = {(w.address, w.label, w.server_id) for w in await source.load()}
    assert found == {(a, "alpha", 1), (c, "gamma", None)}
    # The old service's own shape of the table: `nickname`, soft-deleted rows.
    async with engine.begin() as conn:
        await conn.execute(sa.text("DROP TABLE hl_watch_addresses"))
        await conn.execute(
            sa.text("CREATE TABLE hl_watch_addresses (address VARCHAR(42), nickname VARCHAR(64), deleted_at DATETIME)")
        )
        await conn.execute(
            sa.text(f"INSERT INTO hl_watch_addresses VALUES ('{c}', 'gamma', NULL), ('{d}', 'gone', '2026-01-01')")
        )
    found = {(w.address, w.label, w.server_id) for w in await source.load()}
    assert found == {(a, "", 1), (c, "gamma", None)}
    assert msgspec.structs.asdict((await LegacyAddressTable(engine, server_id=None).load())[0])["address"] == a


async def test_service_refuses_to_start_when_asked_for_missing_tables(sqlite_url: str, tmp_path: Path) -> None:
    """Rather than retry writes into a missing table forever, the start fails naming the command that fixes it."""
    await migrate.upgrade(sqlite_url)
    cfg = load_config(
        None,
        environ={
            "HL_MONITOR__DATABASE__URL": sqlite_url,
            "HL_MONITOR__DATABASE__LEGACY_TABLES": "true",
            "HL_MONITOR__SERVICE__DATA_DIR": str(tmp_path / "data"),
        },
    )
    with pytest.raises(StorageError, match="run `hl-monitor db upgrade`"):
        await Service(cfg).run(asyncio.Event())
