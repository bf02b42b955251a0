"""The writer's batched statements: one cached statement per table and chunk, exact data on both databases."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.config import Config, DatabaseConfig
from hl_monitor.metrics import Metrics
from hl_monitor.storage import migrate
from hl_monitor.storage import tables as t
from hl_monitor.storage.repository import MAX_MARKS_PER_STATEMENT, Repository, create_engine, mark_published_call
from hl_monitor.storage.writer import BatchWriter
from tests.support.storage import T0, WHALE, make_signal, writer_cfg

# Every character MySQL's default mode treats specially inside a quoted string.
AWKWARD = "it's a \\ back\\slash, \\' a quote, \\n not a newline, \"double\", \\0, %s %(x)s ' end\\"


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "mariadb_url"))


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    await migrate.upgrade(db_url)
    eng = create_engine(Config(database=DatabaseConfig(url=db_url)))
    try:
        yield eng
    finally:
        await eng.dispose()


@contextlib.contextmanager
def executions() -> Iterator[list[tuple[str, bool]]]:
    """(statement, executemany) of every INSERT/UPDATE any engine (the writer has its own) sends in the block."""
    seen: list[tuple[str, bool]] = []

    def listener(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            seen.append((statement, executemany))

    event.listen(sa.Engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(sa.Engine, "before_cursor_execute", listener)


async def test_upserts_reuse_one_statement_per_table_across_flushes(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(batch_size=50), Metrics())
    with executions() as first:
        for n in range(70):
            await writer.put_signal(make_signal(n))
        await writer.flush()
    with executions() as second:
        for n in range(70, 100):
            await writer.put_signal(make_signal(n))
        await writer.flush()
    assert [many for _, many in first + second] == [True, True, True]  # chunks of 50, 20, then 30 rows
    assert len({sql for sql, _ in first + second}) == 1  # the same SQL text each time: compiled once
    stored = await Repository(engine).list_signals()
    assert [s.signal for s in stored] == [make_signal(n) for n in range(100)]


async def test_strings_with_quotes_and_backslashes_are_stored_exactly(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(), Metrics())
    await writer.put_signal(make_signal(1, label=AWKWARD))
    await writer.put_aggregation(
        WHALE, 7, "Open Long", {"note": AWKWARD},
        coin="BTC", status="open", fill_count=1, first_fill_time=T0, last_fill_time=T0,
    )  # fmt: skip
    await writer.put_watermark(WHALE, AWKWARD)
    await writer.flush()
    repo = Repository(engine)
    [stored] = await repo.list_signals()
    assert stored.signal.label == AWKWARD
    agg = await repo.load_aggregation(WHALE, 7, "Open Long")
    assert agg is not None
    assert msgspec.json.decode(agg.record) == {"note": AWKWARD}
    assert await repo.load_watermarks() == {WHALE: AWKWARD.encode()}


async def test_acks_of_committed_signals_keep_their_own_times_in_one_update(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(batch_size=500), Metrics())
    for n in range(37):
        await writer.put_signal(make_signal(n))
    await writer.put_signal(make_signal(99))  # never acked: must stay unpublished
    await writer.flush()
    for n in range(37):
        await writer.mark_published(make_signal(n).signal_id, T0 + 1000 + n)
    with executions() as sent:
        await writer.flush()
    assert len(sent) == 1
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(t.signals.c.signal_id, t.signals.c.published_at))).all()
    acked = {make_signal(n).signal_id: T0 + 1000 + n for n in range(37)}
    assert dict(rows) == {**acked, make_signal(99).signal_id: None}
    assert await Repository(engine).count_unpublished() == 1


def test_mark_statement_shapes_are_bounded() -> None:
    small, params = mark_published_call([("a", 1), ("b", 2), ("c", 3)])
    assert params == {"id0": "a", "at0": 1, "id1": "b", "at1": 2, "id2": "c", "at2": 3, "id3": "c", "at3": 3}
    assert mark_published_call([("x", 9), ("y", 8), ("z", 7), ("w", 6)])[0] is small  # same size class, cached
    with pytest.raises(ValueError, match="marks per statement"):
        mark_published_call([("x", 1)] * (MAX_MARKS_PER_STATEMENT + 1))
