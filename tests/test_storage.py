"""Storage against real databases: SQLite always, MariaDB when reachable (required under CI)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from hl_monitor.chaos.relay import TcpRelay
from hl_monitor.config import Config, DatabaseConfig, RetentionConfig
from hl_monitor.domain.signal import LiquidationInfo, Signal
from hl_monitor.errors import SchemaOutdatedError, StorageError
from hl_monitor.metrics import Metrics
from hl_monitor.storage import migrate
from hl_monitor.storage import tables as t
from hl_monitor.storage.cleaner import RetentionCleaner
from hl_monitor.storage.repository import (
    SIGNAL_KEYS,
    SIGNAL_UPDATE,
    AddressTable,
    LegacyAddressTable,
    Repository,
    create_engine,
    load_pair_categories,
    signal_row,
    upsert,
)
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.state import AggregationRecord, StateDelta, Watermark
from tests.support.storage import MEME_PRICE, MEME_SIZE, OTHER, T0, WHALE, make_signal, writer_cfg
from tests.support.waiting import wait_until

HOUR_MS = 3_600_000


class Clock:
    """A settable epoch-ms clock (retention tests move time instead of waiting)."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "mariadb_url"))


def service_engine(url: str, **db: Any) -> AsyncEngine:
    return create_engine(Config(database=DatabaseConfig(url=url, **db)))


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    await migrate.upgrade(db_url)
    eng = service_engine(db_url)
    try:
        yield eng
    finally:
        await eng.dispose()


@contextlib.contextmanager
def count_statements(verb: str) -> Iterator[list[str]]:
    """Every statement starting with `verb` any engine sends while the block runs (the writer has its own)."""
    seen: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(verb):
            seen.append(statement)

    event.listen(sa.Engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(sa.Engine, "before_cursor_execute", listener)


async def signal_rows(eng: AsyncEngine) -> list[sa.RowMapping]:
    async with eng.connect() as conn:
        return list((await conn.execute(sa.select(t.signals).order_by(t.signals.c.id))).mappings().all())


# ---------------------------------------------------------------- schema


async def test_migrations_create_exactly_the_declared_schema(db_url: str) -> None:
    await migrate.upgrade(db_url)
    await migrate.upgrade(db_url)  # a second run is a no-op, not an error
    eng = create_async_engine(db_url)
    try:
        async with eng.connect() as conn:
            diffs = await conn.run_sync(
                lambda c: compare_metadata(
                    MigrationContext.configure(c, opts={"version_table": t.VERSION_TABLE, "compare_type": True}),
                    t.metadata,
                )
            )
        assert diffs == []
        await migrate.check_schema(eng)
    finally:
        await eng.dispose()


async def test_outdated_or_unknown_schema_is_refused_with_instructions(db_url: str) -> None:
    eng = create_async_engine(db_url)
    try:
        with pytest.raises(SchemaOutdatedError, match="run `hl-monitor db upgrade`") as info:
            await migrate.check_schema(eng)
        assert info.value.current is None
        await migrate.upgrade(db_url)
        await asyncio.to_thread(command.downgrade, migrate.alembic_config(db_url), "base")
        with pytest.raises(SchemaOutdatedError):
            await migrate.check_schema(eng)
        await migrate.upgrade(db_url)
        async with eng.begin() as conn:
            await conn.execute(sa.text(f"UPDATE {t.VERSION_TABLE} SET version_num = 'f00d'"))
        with pytest.raises(StorageError, match="does not know") as unknown:
            await migrate.check_schema(eng)
        assert not isinstance(unknown.value, SchemaOutdatedError)
    finally:
        await eng.dispose()


def mysql_dialect(version: tuple[int, int, int]) -> Any:
    """The aiomysql dialect as initialised against a MySQL server of `version` (no server needed)."""
    from sqlalchemy.dialects.mysql.aiomysql import dialect

    d = dialect()
    d.server_version_info = version
    d._casing = 0
    d._initialize_mysql(None)  # type: ignore[arg-type]  # reads only the version, never the connection
    return d


def test_mysql8_upsert_is_one_multirow_statement_with_row_alias() -> None:
    # On MySQL >= 8.0.20 SQLAlchemy renders `AS new`; aiomysql's executemany would not batch that form,
    # which is why the writer sends one multi-row statement per chunk. Check the rendered SQL.
    from aiomysql.cursors import RE_INSERT_VALUES

    rows = [signal_row(make_signal(n), T0) for n in range(3)]
    sql = str(upsert("mysql", t.signals, rows, SIGNAL_KEYS, SIGNAL_UPDATE).compile(dialect=mysql_dialect((8, 0, 36))))
    assert sql.count("INSERT INTO") == 1
    assert len(re.findall(r"\(%s(?:, %s)+\)", sql)) == 3
    assert ") AS new ON DUPLICATE KEY UPDATE" in sql
    assert "new.published_at" in sql
    assert RE_INSERT_VALUES.match(sql) is None  # executemany would have gone row by row
    old_sql = str(
        upsert("mysql", t.signals, rows, SIGNAL_KEYS, SIGNAL_UPDATE).compile(dialect=mysql_dialect((5, 7, 44)))
    )
    assert "VALUES(published_at)" in old_sql
    assert " AS new" not in old_sql


# ---------------------------------------------------------------- writer


async def test_flush_sends_one_statement_per_chunk_and_stores_exact_decimals(engine: AsyncEngine) -> None:
    metrics = Metrics()
    writer = BatchWriter(engine, writer_cfg(batch_size=50), metrics)
    for n in range(120):
        await writer.put_signal(make_signal(n))
    for n in range(70):
        await writer.put_aggregation(
            WHALE, n, "Open Long", {"fills": [{"tid": n, "px": "0.0000000001234"}]},
            coin="kPEPE", status="open", fill_count=1, first_fill_time=T0, last_fill_time=T0,
        )  # fmt: skip
    for n in range(30):
        await writer.put_watermark(f"0x{n:040x}", {"time": T0 + n, "tid": n})
    with count_statements("INSERT") as inserts:
        await writer.flush()
    assert len(inserts) == 3 + 2 + 1  # ceil(120/50) + ceil(70/50) + ceil(30/50)
    rows = await signal_rows(engine)
    assert [r["signal_id"] for r in rows] == [make_signal(n).signal_id for n in range(120)]
    assert rows[7]["size"] == MEME_SIZE + 7
    assert rows[7]["price"] == MEME_PRICE
    assert rows[7]["notional_usd"] == (MEME_SIZE + 7) * MEME_PRICE
    assert metrics.writer_rows.labels(table="signals")._value.get() == 120
    assert metrics.db_up._value.get() == 1


async def test_signals_table_holds_exactly_the_expected_signals(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(), Metrics())
    liquidation = make_signal(
        5,
        direction="close",
        dir="Liquidated Cross Long",
        liquidation=LiquidationInfo(mark_px=Decimal("0.0000000001"), method="market", liquidated_user=WHALE),
        position_before=Decimal("-1E+15"),
        position_after=Decimal("0"),
        full_close=True,
    )
    expected = [make_signal(n) for n in range(5)] + [liquidation]
    for sig in expected:
        await writer.put_signal(sig)
    await writer.put_signal(make_signal(2, detected_at=1))  # same id again (replay): changes nothing
    await writer.flush()
    await writer.put_signal(make_signal(3))  # replay after it was stored
    await writer.flush()
    stored = await Repository(engine).list_signals()
    assert [s.signal for s in stored] == expected
    rows = await signal_rows(engine)
    assert len(rows) == len(expected)
    row = rows[-1]
    columns = set(row.keys())
    assert {"address", "signal_id", "size", "price", "detected_by"} <= columns
    for field in Signal.__struct_fields__:
        if field in columns and field != "liquidation":
            assert row[field] == getattr(liquidation, field), field
    assert '"liquidated_user"' in row["liquidation"]


async def test_the_last_signals_of_an_address_are_its_newest_ones(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(), Metrics())
    for n in range(6):
        await writer.put_signal(make_signal(n))
        await writer.put_signal(make_signal(100 + n, address=OTHER))
    await writer.flush()
    repo = Repository(engine)
    newest = await repo.list_signals(address=WHALE, limit=3)
    assert [s.signal for s in newest] == [make_signal(n) for n in (3, 4, 5)]  # the newest three, oldest of them first
    overall = await repo.list_signals(limit=2)
    assert [s.signal for s in overall] == [make_signal(5), make_signal(105, address=OTHER)]


async def test_publish_state_merges_into_buffered_insert_and_never_reverts(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(), Metrics())
    repo = Repository(engine)
    await writer.put_signal(make_signal(1))
    await writer.mark_published(make_signal(1).signal_id, T0 + 100)  # ack while the insert is still buffered
    await writer.put_signal(make_signal(2))
    with count_statements("UPDATE") as updates:
        await writer.flush()
    assert updates == []  # merged into the insert
    await writer.mark_published(make_signal(2).signal_id, T0 + 200)  # insert already committed: an UPDATE
    await writer.put_signal(make_signal(1))  # a replayed insert must not re-open the outbox
    await writer.flush()
    assert await repo.count_unpublished() == 0
    by_id = {r["signal_id"]: r for r in await signal_rows(engine)}
    assert by_id[make_signal(1).signal_id]["published_at"] == T0 + 100
    assert by_id[make_signal(2).signal_id]["published_at"] == T0 + 200


async def test_suppressed_rows_leave_the_outbox_and_the_first_decision_stands(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(), Metrics())
    repo = Repository(engine)
    kept = msgspec.structs.replace(make_signal(2), suppressed=True, suppressed_reason="min_notional")
    await writer.put_signal(make_signal(1))
    await writer.put_signal(kept)
    await writer.flush()
    assert (await repo.count_unpublished(), await repo.fetch_unpublished(10)) == (1, [make_signal(1)])
    # Replays decided otherwise (a filter changed before a restart) change neither row.
    await writer.put_signal(msgspec.structs.replace(make_signal(1), suppressed=True, suppressed_reason="min_notional"))
    await writer.put_signal(make_signal(2))
    await writer.flush()
    assert await repo.fetch_unpublished(10) == [make_signal(1)]
    by_id = {r["signal_id"]: r for r in await signal_rows(engine)}
    assert [
        (bool(r["published"]), r["published_at"], bool(r["suppressed"]), r["suppressed_reason"]) for r in by_id.values()
    ] == [(False, None, False, None), (True, None, True, "min_notional")]
    assert await repo.mark_published([kept.signal_id], T0) == 0  # nothing to ack: it never went out


async def test_outbox_fetches_oldest_unpublished_and_marks_them(engine: AsyncEngine) -> None:
    clock = Clock()
    writer = BatchWriter(engine, writer_cfg(), Metrics(), clock=clock)
    for n in range(6):
        clock.now = T0 + n * 1000
        await writer.put_signal(make_signal(n))
    await writer.mark_published(make_signal(0).signal_id, T0)
    await writer.flush()
    repo = Repository(engine)
    assert await repo.count_unpublished() == 5
    assert await repo.fetch_unpublished(2) == [make_signal(1), make_signal(2)]
    assert await repo.fetch_unpublished(10, older_than_ms=T0 + 3000) == [make_signal(1), make_signal(2)]
    assert await repo.mark_published([make_signal(1).signal_id, make_signal(2).signal_id], T0 + 9000) == 2
    assert await repo.mark_published([make_signal(1).signal_id], T0 + 9999) == 0  # already published
    assert await repo.fetch_unpublished(10) == [make_signal(3), make_signal(4), make_signal(5)]


async def test_coalescing_keeps_the_last_state_per_key(engine: AsyncEngine) -> None:
    metrics = Metrics()
    writer = BatchWriter(engine, writer_cfg(), metrics)
    for fills in range(1, 6):
        await writer.put_aggregation(
            WHALE, 7, "Close Short", {"fills": list(range(fills))},
            coin="BTC", status="open", fill_count=fills, first_fill_time=T0, last_fill_time=T0 + fills,
        )  # fmt: skip
    await writer.close_aggregation(WHALE, 7, "Close Short", status="filled")
    for n in range(3):
        await writer.put_watermark(WHALE, {"address": WHALE, "time": T0 + n, "tid": n})
    with count_statements("INSERT") as inserts:
        await writer.flush()
    assert len(inserts) == 2  # one aggregation row, one watermark row
    agg = await Repository(engine).load_aggregation(WHALE, 7, "Close Short")
    assert agg is not None
    assert (agg.fill_count, agg.status, agg.closed, agg.record) == (5, "filled", True, b'{"fills":[0,1,2,3,4]}')
    assert await Repository(engine).load_watermarks() == {
        WHALE: f'{{"address":"{WHALE}","time":{T0 + 2},"tid":2}}'.encode()
    }
    assert metrics.batch_dedup_cache_hit.labels(table="aggregations")._value.get() == 5
    assert metrics.batch_dedup_cache_hit.labels(table="watermarks")._value.get() == 2


def _writer_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("hlm-writer"))


async def test_a_closed_writer_leaves_no_thread_behind(db_url: str) -> None:
    """The writer's own thread ends with `close()`: a process that opens and closes writers does not gather them."""
    await migrate.upgrade(db_url)
    engine = service_engine(db_url)
    before = _writer_threads()
    try:
        for _ in range(3):
            writer = BatchWriter(engine, writer_cfg(), Metrics())
            await writer.put_watermark(WHALE, b'{"time":1700000000005,"tid":42}')
            await writer.flush()  # the thread exists once it has written
            assert _writer_threads() == before + 1
            await writer.close()
            await wait_until(lambda: _writer_threads() == before, what="the writer's thread ended")
    finally:
        await engine.dispose()


async def test_pending_state_is_reloaded_after_restart(db_url: str) -> None:
    await migrate.upgrade(db_url)
    first = service_engine(db_url)
    writer = BatchWriter(first, writer_cfg(), Metrics())
    for oid in (1, 2, 3):
        await writer.put_aggregation(
            WHALE, oid, "Open Long", b'{"oid":%d}' % oid,
            coin="ETH", status="open", fill_count=1, first_fill_time=T0 + oid, last_fill_time=T0 + oid,
        )  # fmt: skip
    await writer.close_aggregation(WHALE, 2, "Open Long", status="filled")
    await writer.put_watermark(WHALE, b'{"time":1700000000005,"tid":42}')
    await writer.close()
    await first.dispose()
    with pytest.raises(StorageError, match="closed"):
        await writer.put_watermark(WHALE, b"{}")

    second = service_engine(db_url)
    try:
        repo = Repository(second)
        pending = await repo.load_pending_aggregations()
        assert [(a.oid, a.record, a.closed) for a in pending] == [(1, b'{"oid":1}', False), (3, b'{"oid":3}', False)]
        assert await repo.load_closed_keys(since_ms=0) == {(WHALE, 2, "Open Long")}
        assert await repo.load_watermarks() == {WHALE: b'{"time":1700000000005,"tid":42}'}
    finally:
        await second.dispose()


async def test_full_buffer_applies_backpressure_instead_of_dropping(engine: AsyncEngine) -> None:
    metrics = Metrics()
    writer = BatchWriter(engine, writer_cfg(queue_size=3, batch_size=100), metrics)
    for n in range(3):
        await writer.put_signal(make_signal(n))
    blocked = asyncio.create_task(writer.put_signal(make_signal(3)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not blocked.done()  # nothing frees space until a flush
    await writer.mark_published(make_signal(0).signal_id, T0)  # merging into a buffered row needs no space
    assert metrics.writer_queue_full._value.get() == 1
    await writer.flush()
    await blocked
    await writer.flush()
    assert len(await signal_rows(engine)) == 4


async def test_refused_row_is_isolated_and_counted_while_the_rest_is_written(engine: AsyncEngine) -> None:
    metrics = Metrics()
    writer = BatchWriter(engine, writer_cfg(batch_size=4), metrics)
    for oid in range(10):
        coin: Any = None if oid == 6 else "SOL"  # NOT NULL violation: can never succeed by retrying
        await writer.put_aggregation(
            WHALE,
            oid,
            "Open Long",
            b"{}",
            coin=coin,
            status="open",
            fill_count=1,
            first_fill_time=T0,
            last_fill_time=T0,
        )
    await writer.put_signal(make_signal(1))
    await writer.flush()
    pending = await Repository(engine).load_pending_aggregations()
    assert sorted(a.oid for a in pending) == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert len(await signal_rows(engine)) == 1
    assert metrics.writer_rejected.labels(table="aggregations")._value.get() == 1


def total(counter: Any) -> float:
    """A labelled counter summed over its labels."""
    return float(sum(s.value for s in counter.collect()[0].samples if s.name.endswith("_total")))


async def test_sqlite_locked_for_a_while_writer_retries_and_loses_nothing(sqlite_url: str) -> None:
    await migrate.upgrade(sqlite_url)
    eng = service_engine(sqlite_url, sqlite_busy_timeout=0.05)
    metrics = Metrics()
    writer = BatchWriter(eng, writer_cfg(batch_size=10), metrics)
    path = sqlite_url.split("///", 1)[1]
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock: the database is unavailable
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(writer.run())
            for n in range(25):
                await writer.put_signal(make_signal(n))
            await wait_until(lambda: total(metrics.writer_retries) >= 2, what="two writer retries")
            assert metrics.db_up._value.get() == 0
            for n in range(25, 40):  # intake goes on during the outage
                await writer.put_signal(make_signal(n))
            blocker.execute("COMMIT")
            await writer.close()
            await run
    finally:
        blocker.close()
    assert [r["signal_id"] for r in await signal_rows(eng)] == [make_signal(n).signal_id for n in range(40)]
    assert metrics.db_up._value.get() == 1
    await eng.dispose()


@pytest.mark.mariadb
async def test_mariadb_outage_writer_retries_and_loses_nothing(mariadb_url: str) -> None:
    await migrate.upgrade(mariadb_url)
    url = sa.make_url(mariadb_url)
    proxy = TcpRelay(url.port or 3306, url.host or "127.0.0.1")
    await proxy.start()
    eng = service_engine(url.set(port=proxy.port).render_as_string(hide_password=False), connect_timeout=1.0)
    metrics = Metrics()
    writer = BatchWriter(eng, writer_cfg(batch_size=10), metrics)
    try:
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(writer.run())
            for n in range(15):
                await writer.put_signal(make_signal(n))
            await writer.flush()  # the pool now holds live connections through the proxy
            await proxy.stop()  # outage: every connection dropped, new ones refused
            for n in range(15, 40):
                await writer.put_signal(make_signal(n))
            await wait_until(lambda: total(metrics.writer_retries) >= 2, what="two writer retries")
            assert metrics.db_up._value.get() == 0
            await proxy.start()
            await writer.close()
            await run
        assert [r["signal_id"] for r in await signal_rows(eng)] == [make_signal(n).signal_id for n in range(40)]
        assert metrics.db_up._value.get() == 1
    finally:
        await proxy.stop()
        await eng.dispose()


# ---------------------------------------------------------------- retention


async def test_retention_deletes_in_bounded_batches_and_keeps_unpublished_signals(engine: AsyncEngine) -> None:
    clock = Clock(T0)
    writer = BatchWriter(engine, writer_cfg(), Metrics(), clock=clock)
    for n in range(10):  # 8 days old: 7 published, 3 unpublished (outbox)
        await writer.put_signal(make_signal(n))
        if n < 7:
            await writer.mark_published(make_signal(n).signal_id, T0)
    for oid in range(4):  # 3 h old: two closed, two still open
        await writer.put_aggregation(
            WHALE,
            oid,
            "Open Long",
            b"{}",
            coin="BTC",
            status="open",
            fill_count=1,
            first_fill_time=T0,
            last_fill_time=T0,
        )
        if oid < 2:
            await writer.close_aggregation(WHALE, oid, "Open Long", status="filled")
    await writer.flush()
    clock.now = T0 + 8 * 24 * HOUR_MS - 5 * HOUR_MS
    for n in range(10, 16):  # recent and published; the cap keeps only 7 rows in total
        await writer.put_signal(make_signal(n))
        await writer.mark_published(make_signal(n).signal_id, clock.now)
    await writer.flush()

    clock.now = T0 + 8 * 24 * HOUR_MS
    metrics = Metrics()
    cfg = RetentionConfig(batch_size=3, max_signals=7, open_aggregations=4 * HOUR_MS / 1000)
    early = msgspec.structs.replace(cfg, max_signals=100)
    cleaner = RetentionCleaner(engine, early, metrics, clock=lambda: T0 + 3 * HOUR_MS)
    with count_statements("DELETE") as deletes:
        assert await cleaner.run_once() == {
            "aggregations": 2,
            "signals": 0,
            "position_events": 0,
            "account_values": 0,
            "publications": 0,
        }
    assert len(deletes) == 1
    pending = await Repository(engine).load_pending_aggregations()
    assert [a.oid for a in pending] == [2, 3]

    cleaner = RetentionCleaner(engine, cfg, metrics, clock=clock)
    with count_statements("DELETE") as deletes:
        deleted = await cleaner.run_once()
        assert deleted == {
            "aggregations": 2,
            "signals": 7 + 2,
            "position_events": 0,
            "account_values": 0,
            "publications": 0,
        }
    assert len(deletes) == 1 + 3 + 1  # open aggregations; 7 old published signals in 3+3+1; the cap's 2 oldest
    remaining = {r["signal_id"]: bool(r["published"]) for r in await signal_rows(engine)}
    unpublished = {make_signal(n).signal_id for n in range(7, 10)}
    assert {sid for sid, published in remaining.items() if not published} == unpublished  # 8 days old, kept
    assert set(remaining) == unpublished | {make_signal(n).signal_id for n in range(12, 16)}
    assert metrics.retention_deleted.labels(table="signals")._value.get() == 9


# ---------------------------------------------------------------- addresses and legacy tables


async def test_address_table_add_update_remove_and_change_marker(engine: AsyncEngine) -> None:
    table = AddressTable(engine)
    marker = await table.change_marker()

    class Entry:
        def __init__(self, address: str, **fields: Any) -> None:
            self.address = address
            self.label: str | None = fields.get("label")
            self.tier: str | None = fields.get("tier")
            self.priority: int | None = fields.get("priority")
            self.is_active: bool | None = fields.get("is_active")

    await table.add([Entry(WHALE.upper().replace("0X", "0x"), label="whale", tier="precise", priority=5)])
    assert await table.change_marker() != marker
    marker = await table.change_marker()
    loaded = await table.load()
    assert [(e.address, e.label, e.tier, e.priority) for e in loaded] == [(WHALE, "whale", "precise", 5)]
    updated = await table.update(WHALE, label="renamed")  # same second, same row count: the marker still moves
    assert updated is not None
    assert (updated["label"], updated["tier"]) == ("renamed", "precise")
    assert await table.change_marker() != marker
    await table.add([Entry(OTHER)])
    assert await table.remove([WHALE, "0x" + "ee" * 20]) == 1
    assert [e.address for e in await table.load()] == [OTHER]
    assert [r["address"] for r in await table.list()] == [WHALE, OTHER]  # inactive rows are listed
    await table.add([Entry(WHALE)])  # adding again re-activates and keeps the label
    assert {(e.address, e.label) for e in await table.load()} == {(WHALE, "renamed"), (OTHER, "")}
    assert await table.remove([OTHER], purge=True) == 1
    assert [r["address"] for r in await table.list()] == [WHALE]
    assert await table.update(OTHER, label="x") is None


async def test_address_filters_round_trip_and_foreign_lists_are_read_leniently(engine: AsyncEngine) -> None:
    table = AddressTable(engine)

    @dataclass(frozen=True)
    class Change:
        address: str
        label: str | None = None
        tier: str | None = None
        priority: int | None = None
        is_active: bool | None = None
        min_notional_usd: Decimal | None = None
        allow_symbols: tuple[str, ...] | None = None
        deny_symbols: tuple[str, ...] | None = None

    await table.add([Change(WHALE, min_notional_usd=Decimal("0.000000000001"), deny_symbols=("BTC", "xyz:XYZ100"))])
    await table.add([Change(OTHER)])
    by_address = {e.address: e for e in await table.load()}
    assert (by_address[WHALE].min_notional_usd, by_address[WHALE].deny_symbols) == (
        Decimal("1E-12"),
        frozenset({"BTC", "XYZ:XYZ100"}),
    )
    assert (by_address[OTHER].min_notional_usd, by_address[OTHER].allow_symbols) == (Decimal(0), frozenset())
    row = await table.get(WHALE)
    assert row is not None
    assert (row["min_notional_usd"], row["deny_symbols"], row["allow_symbols"]) == (
        "0.000000000001",
        ["BTC", "xyz:XYZ100"],
        [],
    )
    await table.add([Change(WHALE, label="kept", deny_symbols=())])  # an empty list removes the list
    row = await table.get(WHALE)
    assert row is not None
    assert (row["label"], row["deny_symbols"], row["min_notional_usd"]) == ("kept", [], "0.000000000001")

    async with engine.begin() as conn:  # another program writes the columns directly
        await conn.execute(
            sa.update(t.addresses).where(t.addresses.c.address == OTHER).values(allow_symbols=" eth,,ETH, sol ")
        )
    by_address = {e.address: e for e in await table.load()}
    assert by_address[OTHER].allow_symbols == {"ETH", "SOL"}


async def test_legacy_tables_are_read_when_present(engine: AsyncEngine) -> None:
    assert await load_pair_categories(engine) is None
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "CREATE TABLE hl_active_addresses (id INTEGER PRIMARY KEY, server_id INT NOT NULL, address VARCHAR(64))"
            )
        )
        await conn.execute(
            sa.text(
                "INSERT INTO hl_active_addresses (id, server_id, address) VALUES (1, 1, :a), (2, 2, :b), (3, 1, 'junk')"
            ),
            {"a": WHALE.upper().replace("0X", "0x"), "b": OTHER},
        )
        await conn.execute(
            sa.text("CREATE TABLE pair_configs (id INTEGER PRIMARY KEY, symbol VARCHAR(32), category INT)")
        )
        await conn.execute(
            sa.text("INSERT INTO pair_configs (id, symbol, category) VALUES (1, 'btc', 1), (2, 'KPEPE', 5)")
        )
    mine = await LegacyAddressTable(engine, server_id=1).load()
    assert [(e.address.lower(), e.server_id) for e in mine] == [(WHALE, 1), ("junk", 1)]  # the book drops junk
    everyone = await LegacyAddressTable(engine, server_id=None).load()
    assert {e.address.lower() for e in everyone} == {WHALE, OTHER, "junk"}
    assert await load_pair_categories(engine) == {"BTC": 1, "KPEPE": 5}


async def test_engine_delta_round_trips_through_the_database(engine: AsyncEngine) -> None:
    def record(address: str, oid: int, **changes: Any) -> AggregationRecord:
        base: dict[str, Any] = {
            "address": address, "oid": oid, "direction": "OL", "signal_id": f"{address}:{oid}:OL",
            "dir": "Open Long", "dir_code": "OL", "coin": "kPEPE", "asset_type": "futures",
            "open_close": "open", "side": "LONG", "size": MEME_SIZE, "first_fill_time": T0, "last_fill_time": T0 + 1,
        }  # fmt: skip
        base.update(changes)
        return AggregationRecord(**base)

    pending = record(WHALE, 1, status="open")
    flushed = record(WHALE, 2, state="flushed", status="filled", flushed_at=T0 + 9, final=True)
    gone = record(OTHER, 3)
    watermark = Watermark(address=WHALE, time=T0 + 1, tid=77, floor=T0, seen=[(77, T0 + 1)])
    writer = BatchWriter(engine, writer_cfg(), Metrics())
    await writer.put_delta(StateDelta(upserted=[pending, gone], closed=[flushed], watermarks=[watermark]))
    await writer.flush()
    await writer.put_delta(StateDelta(removed_addresses=[OTHER]))  # OTHER stopped being tracked
    await writer.flush()

    state = await Repository(engine).load_engine_state(flushed_since_ms=0)
    assert sorted(state.aggregations, key=lambda r: r.oid) == [pending, flushed]
    assert state.watermarks == [watermark]
    assert await Repository(engine).load_closed_keys(since_ms=0) == {(WHALE, 2, "OL")}
