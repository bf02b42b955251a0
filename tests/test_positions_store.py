"""Position documents, position events and publications in the database: SQLite always, MariaDB when reachable.

Migration 0003, writer round trips (coalescing, delete superseding a put, idempotent events and publications,
publish marks that never revert), the reads the owner and the CLI use, retention, and `hl-monitor positions`.
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
from alembic import command
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.cli import main
from hl_monitor.config import Config, DatabaseConfig, RetentionConfig, WriterConfig
from hl_monitor.domain.publication import Publication
from hl_monitor.errors import SchemaOutdatedError
from hl_monitor.hyperliquid.protocol import ClearinghouseState, SpotState, decode_info
from hl_monitor.metrics import Metrics
from hl_monitor.storage import migrate
from hl_monitor.storage import tables as t
from hl_monitor.storage.cleaner import RetentionCleaner
from hl_monitor.storage.repository import Repository, create_engine
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.portfolio import AddressPortfolio, DexAccount, PositionModel
from hl_monitor.tracking.position_events import PerpPosition, PositionEvent
from tests.support.paths import FIXTURES

WHALE = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20
T0 = 1_784_050_805_000
DAY_MS = 86_400_000
D = Decimal


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def real_portfolio(address: str = WHALE) -> AddressPortfolio:
    """The document the position model builds from captured REST answers (a BTC long, four spot balances)."""
    model = PositionModel()
    state = decode_info((FIXTURES / "http_clearinghouse_state.json").read_bytes(), ClearinghouseState)
    model.on_dex_state(address, "", state, T0)
    spot = decode_info((FIXTURES / "http_spot_clearinghouse_state.json").read_bytes(), SpotState)
    model.on_spot_state(address, spot, T0)
    doc = model.get(address)
    assert doc is not None
    return doc


def position(coin: str, size: str, value: str | None, **fields: Any) -> PerpPosition:
    values: dict[str, Any] = {
        "coin": coin,
        "symbol": f"{coin}USDC",
        "dex": "",
        "size": D(size),
        "side": "LONG" if D(size) > 0 else "SHORT",
        "entry_px": D("100.5"),
        "mark_px": D("101.123456789"),
        "position_value_usd": None if value is None else D(value),
        "unrealized_pnl": D("-12.5"),
        "leverage_type": "cross",
        "leverage": 10,
        "liquidation_px": D("90.25"),
        "liquidation_distance": D("0.10750"),
        "opened_at": T0,
        "updated_at": T0,
        "source": "ws_state",
    }
    values.update(fields)
    return PerpPosition(**values)


def portfolio(address: str, *positions: PerpPosition, as_of: int = T0) -> AddressPortfolio:
    dex = DexAccount(
        dex="",
        account_value=D("5000"),
        total_ntl_pos=D("1234.5"),
        positions={p.coin: p for p in positions},
        source="ws_state",
        as_of=as_of,
    )
    return AddressPortfolio(address=address, dexes={"": dex}, source="ws_state", as_of=as_of)


def event(n: int, address: str = WHALE, time: int = T0, **fields: Any) -> PositionEvent:
    after = position("BTC", f"0.{n + 1}", "1000")
    values: dict[str, Any] = {
        "event_id": f"{address}:pos:BTC:f{time}:{n}",
        "event": "increased",
        "address": address,
        "coin": "BTC",
        "symbol": "BTCUSDC",
        "dex": "",
        "size_before": D("0.000000000000000001"),
        "size_after": after.size,
        "before": None,
        "after": after,
        "time": time,
        "detected_at": time + 5,
        "source": "fills",
        "signal_id": f"{address}:{n}:OL",
    }
    values.update(fields)
    return PositionEvent(**values)


def publication(n: int, created_at: int = T0, kind: str = "position_event") -> Publication:
    return Publication(
        msg_id=f"{WHALE}:pos:BTC:f{T0}:{n}",
        kind=kind,  # type: ignore[arg-type]
        subject=f"hl.positions.{WHALE}.BTCUSDC",
        payload=b'{"size":"1.000000000000000001","n":%d}' % n,
        created_at=created_at,
    )


def writer_cfg(**changes: Any) -> WriterConfig:
    values: dict[str, Any] = {"batch_size": 50, "flush_interval": 0.05, "retry_initial_delay": 0.02}
    values.update(changes)
    return WriterConfig(**values)


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


async def rows(eng: AsyncEngine, table: sa.Table) -> list[sa.RowMapping]:
    async with eng.connect() as conn:
        return list((await conn.execute(sa.select(table))).mappings().all())


# ---------------------------------------------------------------- migration


async def test_upgrade_from_0002_replaces_old_snapshots_and_creates_the_new_tables(db_url: str) -> None:
    await migrate.upgrade(db_url, "0002")
    eng = create_engine(Config(database=DatabaseConfig(url=db_url)))
    try:
        async with eng.begin() as conn:
            await conn.execute(
                sa.text("INSERT INTO hlm_positions (address, payload, updated_at) VALUES (:a, :p, :u)"),
                {"a": WHALE, "p": '{"dexes":{}}', "u": T0},
            )
        with pytest.raises(SchemaOutdatedError):
            await migrate.check_schema(eng)  # `run` refuses the outdated schema
        await migrate.upgrade(db_url)
        await migrate.check_schema(eng)
        assert await rows(eng, t.positions) == []  # the older snapshot is not a document: rebuilt from the exchange
        assert await rows(eng, t.position_events) == []
        assert await rows(eng, t.publications) == []
        await asyncio.to_thread(command.downgrade, migrate.alembic_config(db_url), "0002")
        async with eng.connect() as conn:
            tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
        assert "hlm_publications" not in tables
        assert "hlm_positions" in tables
    finally:
        await eng.dispose()


# ---------------------------------------------------------------- documents


async def test_documents_round_trip_exactly_with_their_account_summary(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(), Metrics(), clock=Clock())
    doc = real_portfolio()
    meme = portfolio(OTHER, position("kPEPE", "-1234567890123456.123456789", "1.5", entry_px=D("0.0000000001234")))
    await writer.put_portfolio(WHALE, doc)
    await writer.put_portfolio(OTHER, meme, msgspec.json.encode(meme))
    await writer.flush()

    repo = Repository(engine)
    assert await repo.load_portfolios() == {WHALE: doc, OTHER: meme}
    stored = {r["address"]: r for r in await rows(engine, t.positions)}
    whale = stored[WHALE]
    # What the old position cache held, now plain columns (summed over dexes) or inside the document.
    dex = doc.dexes[""]
    assert (whale["account_value"], whale["total_ntl_pos"]) == (dex.account_value, dex.total_ntl_pos)
    assert (whale["total_margin_used"], whale["withdrawable"]) == (dex.total_margin_used, dex.withdrawable)
    assert whale["spot_usd"] == D("14.625485")  # only USDC has a known dollar value
    assert (whale["position_count"], whale["as_of"], whale["updated_at"]) == (1, T0, T0)
    btc = doc.dexes[""].positions["BTC"]
    cache_fields = ("entry_px", "unrealized_pnl", "leverage", "margin_used", "position_value_usd", "return_on_equity")
    assert [f for f in cache_fields if getattr(btc, f) is None] == []
    assert (btc.size, btc.leverage) == (D("0.1"), 5)
    assert {h.coin for h in doc.spot.values()} >= {"USDC", "PURR"}


async def test_latest_put_wins_and_a_delete_supersedes_a_buffered_put(engine: AsyncEngine) -> None:
    metrics = Metrics()
    writer = BatchWriter(engine, writer_cfg(), metrics, clock=Clock())
    first, second = portfolio(WHALE, position("BTC", "1", "100")), portfolio(WHALE, position("BTC", "2", "200"))
    await writer.put_portfolio(WHALE, first)
    await writer.put_portfolio(WHALE, second)
    await writer.put_portfolio(OTHER, portfolio(OTHER))
    await writer.delete_portfolio(OTHER)  # in the same buffer: the row is never written
    await writer.flush()
    repo = Repository(engine)
    assert await repo.load_portfolios() == {WHALE: second}
    assert metrics.batch_dedup_cache_hit.labels(table="positions")._value.get() == 2

    await writer.delete_portfolio(WHALE)  # committed row: deleted
    await writer.flush()
    assert await repo.load_portfolios() == {}
    await writer.delete_portfolio(OTHER)
    await writer.put_portfolio(OTHER, first)  # a put after a delete in one buffer: the put stands
    await writer.flush()
    assert await repo.load_portfolios() == {OTHER: first}


async def test_list_positions_filters_by_symbol_or_coin_and_value(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(), Metrics(), clock=Clock())
    big_btc = portfolio(WHALE, position("BTC", "2", "200000"), position("ETH", "-3", "9000"))
    small_btc = portfolio(OTHER, position("BTC", "0.01", "1000"), position("SOL", "5", None))
    await writer.put_portfolio(WHALE, big_btc)
    await writer.put_portfolio(OTHER, small_btc)
    await writer.flush()
    repo = Repository(engine)
    assert await repo.list_positions() == [big_btc, small_btc]
    assert await repo.list_positions(symbol="btc") == [big_btc, small_btc]
    assert await repo.list_positions(symbol="ETHUSDC") == [big_btc]
    assert await repo.list_positions(symbol="BTC", min_usd=D("5000")) == [big_btc]
    assert await repo.list_positions(min_usd=D("1000")) == [big_btc, small_btc]
    assert await repo.list_positions(symbol="SOL", min_usd=D("0")) == []  # an unknown value is not "at least 0"


# ---------------------------------------------------------------- events and publications


async def test_position_events_are_stored_once_and_listed_newest_first(engine: AsyncEngine) -> None:
    metrics = Metrics()
    writer = BatchWriter(engine, writer_cfg(), metrics, clock=Clock())
    events = [event(n, time=T0 + n) for n in range(5)]
    for e in events:
        await writer.put_position_event(e)
    await writer.put_position_event(events[0])  # buffered: coalesced
    await writer.flush()
    await writer.put_position_event(events[1])  # committed: the replay changes nothing
    await writer.put_position_event(event(0, address=OTHER))
    await writer.flush()
    repo = Repository(engine)
    assert await repo.list_position_events(WHALE, limit=3) == events[::-1][:3]
    assert await repo.list_position_events(OTHER.upper().replace("0X", "0x")) == [event(0, address=OTHER)]
    stored = {r["event_id"]: r for r in await rows(engine, t.position_events)}
    assert len(stored) == 6
    row = stored[events[2].event_id]
    assert (row["size_before"], row["size_after"], row["event"]) == (D("0.000000000000000001"), D("0.3"), "increased")
    assert (row["signal_id"], row["created_at"]) == (f"{WHALE}:2:OL", T0)


async def test_publications_are_marked_once_and_a_replay_never_reopens_them(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(), Metrics(), clock=Clock())
    pubs = [publication(n, created_at=T0 + n) for n in range(6)]
    for p in pubs:
        await writer.put_publication(p)
    await writer.mark_publication_published(pubs[0].msg_id, T0 + 100)  # merged into the buffered insert
    await writer.flush()
    await writer.mark_publication_published(pubs[1].msg_id, T0 + 200)  # an UPDATE of the committed row
    await writer.mark_publication_published(pubs[2].msg_id, T0 + 300)
    await writer.flush()
    await writer.put_publication(pubs[0])  # a replay of an acknowledged publication
    await writer.mark_publication_published(pubs[1].msg_id, T0 + 999)  # a second ack keeps the first time
    await writer.flush()

    repo = Repository(engine)
    assert await repo.count_unpublished_publications() == 3
    assert await repo.fetch_unpublished_publications(2) == pubs[3:5]
    assert await repo.fetch_unpublished_publications(10, older_than_ms=T0 + 5) == pubs[3:5]
    marks = {r["msg_id"]: r["published_at"] for r in await rows(engine, t.publications)}
    assert [marks[p.msg_id] for p in pubs] == [T0 + 100, T0 + 200, T0 + 300, None, None, None]


# ---------------------------------------------------------------- retention


async def test_retention_deletes_old_events_and_old_published_publications_in_batches(engine: AsyncEngine) -> None:
    clock = Clock(T0)
    writer = BatchWriter(engine, writer_cfg(), Metrics(), clock=clock)
    for n in range(7):  # 8 days old
        await writer.put_position_event(event(n, time=T0 + n))
        await writer.put_publication(publication(n, created_at=T0 + n))
        if n < 4:
            await writer.mark_publication_published(publication(n).msg_id, T0 + 10)
    young = T0 + 7 * DAY_MS
    await writer.put_position_event(event(100, time=young))
    await writer.put_publication(publication(100, created_at=young))
    await writer.mark_publication_published(publication(100).msg_id, young)
    await writer.flush()

    metrics = Metrics()
    cfg = RetentionConfig(batch_size=3, position_events=6 * DAY_MS / 1000)
    cleaner = RetentionCleaner(engine, cfg, metrics, clock=lambda: T0 + 8 * DAY_MS)
    deleted = await cleaner.run_once()
    assert (deleted["position_events"], deleted["publications"]) == (7, 4)
    assert [r["event_id"] for r in await rows(engine, t.position_events)] == [event(100, time=young).event_id]
    left = {r["msg_id"]: r["published_at"] for r in await rows(engine, t.publications)}
    assert left == {publication(n).msg_id: None for n in range(4, 7)} | {publication(100).msg_id: young}
    assert metrics.retention_deleted.labels(table="publications")._value.get() == 4


async def test_account_values_are_read_newest_first_and_deleted_with_old_position_events(engine: AsyncEngine) -> None:
    writer = BatchWriter(engine, writer_cfg(), Metrics(), clock=Clock(T0))
    for n in range(5):
        await writer.put_account_value(WHALE, T0 + n * DAY_MS, D(1000 + n))
    await writer.put_account_value(WHALE, T0 + 4 * DAY_MS, D("1004.5"))  # the same sample again: the last value
    await writer.put_account_value(OTHER, T0, D(7))
    await writer.flush()
    repo = Repository(engine)
    assert await repo.list_account_values(WHALE, 3) == [
        (T0 + 2 * DAY_MS, D(1002)),
        (T0 + 3 * DAY_MS, D(1003)),
        (T0 + 4 * DAY_MS, D("1004.5")),
    ]

    cfg = RetentionConfig(batch_size=2, position_events=2 * DAY_MS / 1000)
    deleted = await RetentionCleaner(engine, cfg, Metrics(), clock=lambda: T0 + 4 * DAY_MS).run_once()
    assert deleted["account_values"] == 3  # both addresses' samples older than two days, in batches of two
    assert [at for at, _ in await repo.list_account_values(WHALE, 10)] == [T0 + n * DAY_MS for n in (2, 3, 4)]
    assert await repo.list_account_values(OTHER, 10) == []


# ---------------------------------------------------------------- CLI


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cfg.toml"
    path.write_text('[database]\nurl = "sqlite+aiosqlite:///./data/hl.db"\n')
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


async def store_documents(url: str, *docs: AddressPortfolio) -> None:
    eng = create_engine(Config(database=DatabaseConfig(url=url)))
    writer = BatchWriter(eng, writer_cfg(), Metrics())
    try:
        for doc in docs:
            await writer.put_portfolio(doc.address, doc)
        await writer.flush()
    finally:
        await eng.dispose()


def test_positions_command_prints_a_table_and_exact_json(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    assert run(capsys, "db", "upgrade", "--config", str(config))[0] == 0
    whale = portfolio(WHALE, position("BTC", "2", "202246.9"), position("ETH", "-3", "9000", leverage=None))
    other = portfolio(OTHER, position("BTC", "0.01", "1011.2", mark_px=D("0.0000000001234567891")))
    asyncio.run(store_documents(f"sqlite+aiosqlite:///{config.parent / 'data' / 'hl.db'}", whale, other))

    code, out, err = run(capsys, "positions", "--config", str(config))
    assert code == 0
    lines = out.splitlines()
    header = ["ADDRESS", "COIN", "SIDE", "SIZE", "ENTRY", "MARK", "VALUE", "USD", "UPNL", "LEV", "LIQ", "PX", "DIST"]
    assert lines[0].split() == header
    btc = [WHALE, "BTC", "LONG", "2", "100.5", "101.123", "202,246.90", "-12.50", "10x", "cross", "90.25", "10.75%"]
    assert lines[1].split() == btc
    assert lines[2].split()[:4] == [WHALE, "ETH", "SHORT", "-3"]
    assert lines[2].split()[8] == "-"  # leverage unknown
    assert lines[3].split()[5] == "0.000000000123457"  # six significant digits, no exponent
    assert err.strip() == "3 positions of 2 addresses"

    code, out, _ = run(
        capsys, "positions", "--symbol", "btcusdc", "--min-usd", "2000", "--json", "--config", str(config)
    )
    assert code == 0
    listed = json.loads(out)
    assert [(p["address"], p["coin"]) for p in listed] == [(WHALE, "BTC")]
    assert (listed[0]["mark_px"], listed[0]["liquidation_distance"]) == ("101.123456789", "0.1075")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min-usd", "lots"], "'lots' is not a number"),
        (["--min-usd", "-5"], "must be a dollar amount of 0 or more"),
        (["--min-usd", "nan"], "must be a dollar amount of 0 or more"),
        (["--symbol", " "], "is not a symbol or coin"),
    ],
)
def test_positions_command_rejects_bad_values_with_exit_2(
    capsys: pytest.CaptureFixture[str], config: Path, argv: list[str], message: str
) -> None:
    code, _, err = run(capsys, "positions", *argv, "--config", str(config))
    assert code == 2
    assert message in err


def test_positions_command_refuses_an_unmigrated_database(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, _, err = run(capsys, "positions", "--config", str(config))
    assert code == 1
    assert "run `hl-monitor db upgrade`" in err
