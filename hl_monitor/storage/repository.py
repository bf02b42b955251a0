"""Engine creation, dialect-aware statements and every read/direct write the service makes.

The hot path (signals, aggregations, watermarks, position documents and events, publications) is written by
`BatchWriter`; this module holds the statements it uses (so their shape is defined once) and the queries for
everything else: the address book (new table or the old `hl_active_addresses`), `pair_configs`, the signal
and publication outboxes, position documents and events, and the state reloaded at start.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Protocol

import msgspec
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert

from hl_monitor.config import Config, DatabaseConfig
from hl_monitor.domain.address import WatchedAddress, parse_address, symbol_key, symbol_keys
from hl_monitor.domain.publication import Publication
from hl_monitor.domain.signal import Signal, decode_signal, encode_signal, plain_decimal
from hl_monitor.errors import StorageError
from hl_monitor.storage import tables as t
from hl_monitor.storage.migrate import ensure_sqlite_dir
from hl_monitor.tracking.portfolio import AddressPortfolio
from hl_monitor.tracking.position_events import PerpPosition, PositionEvent
from hl_monitor.tracking.state import AggregationRecord, EngineState, Watermark

# SQLite binds at most 32766 parameters per statement (its default since 3.32); stay below with headroom.
SQLITE_MAX_PARAMS: Final = 30_000
# MySQL binds at most 65535 placeholders per prepared statement; aiomysql interpolates client-side, but
# keeping the same ceiling keeps each statement well under max_allowed_packet.
MYSQL_MAX_PARAMS: Final = 60_000

# Quotes are then the only character to escape: pymysql/aiomysql escape a string with `str.replace` instead of
# a per-character `str.translate` (about 70x faster; the fills JSON of every aggregation row goes through it).
NO_BACKSLASH_ESCAPES_INIT: Final = (
    "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), 'NO_BACKSLASH_ESCAPES')"
)

AggKey = tuple[str, int, str]  # (address, oid, direction)

_JSON: Final = msgspec.json.Encoder()
_RECORD: Final = msgspec.json.Decoder(AggregationRecord)
_WATERMARK: Final = msgspec.json.Decoder(Watermark)
_PORTFOLIO: Final = msgspec.json.Decoder(AddressPortfolio)
_EVENT: Final = msgspec.json.Decoder(PositionEvent)


def encode_json(payload: bytes | str | Mapping[str, Any] | msgspec.Struct | Sequence[Any]) -> str:
    """Engine payloads (msgspec Structs, dicts, or already-encoded JSON) as JSON text for a text column."""
    if isinstance(payload, bytes):
        return payload.decode()
    if isinstance(payload, str):
        return payload
    return _JSON.encode(payload).decode()


# ---------------------------------------------------------------- engine


def create_engine(cfg: Config) -> AsyncEngine:
    """The service's engine: pre-ping and recycle for MySQL's idle disconnects, WAL and a busy timeout for SQLite."""
    url = cfg.database_url()
    db = cfg.database
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        ensure_sqlite_dir(url)
        engine = create_async_engine(
            url,
            pool_pre_ping=True,
            pool_size=db.pool_size,
            max_overflow=db.max_overflow,
            connect_args={"timeout": db.sqlite_busy_timeout},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = _mysql_connect_args(parsed, db)
    if db.tls_ca and parsed.get_driver_name() == "aiomysql":
        connect_args["async_creator_fn"] = _connect_requiring_tls
    return create_async_engine(
        url,
        pool_pre_ping=True,
        pool_recycle=db.pool_recycle,
        pool_size=db.pool_size,
        max_overflow=db.max_overflow,
        connect_args=connect_args,
    )


# The blocking drivers of the same databases, for the writer's thread (`storage/writer.py`): pymysql is what
# aiomysql wraps (same escaping, same executemany rewrite), sqlite3 is what aiosqlite wraps.
_BLOCKING_DRIVERS: Final = {"mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql", "sqlite": "sqlite+pysqlite"}
# The writer's thread runs one transaction at a time: one connection, and none beyond it.
WRITER_POOL_SIZE: Final = 1


def create_blocking_engine(url: sa.URL, db: DatabaseConfig) -> sa.Engine:
    """A blocking engine on the database of `url` (an async engine's URL) with the service's session settings
    (`create_engine`), holding one connection: the batch writer's own, used only from its thread."""
    backend = url.get_backend_name()
    if backend not in _BLOCKING_DRIVERS:
        raise StorageError(f"no blocking driver for database backend {backend!r}")
    sync_url = url.set(drivername=_BLOCKING_DRIVERS[backend])
    if backend == "sqlite":
        engine = sa.create_engine(
            sync_url,
            pool_pre_ping=True,
            pool_size=WRITER_POOL_SIZE,
            max_overflow=0,
            connect_args={"timeout": db.sqlite_busy_timeout, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = sa.create_engine(
        sync_url,
        pool_pre_ping=True,
        pool_recycle=db.pool_recycle,
        pool_size=WRITER_POOL_SIZE,
        max_overflow=0,
        connect_args=_mysql_connect_args(url, db),
    )
    if db.tls_ca:
        event.listen(engine, "do_connect", _connect_requiring_tls_blocking)
    return engine


def _mysql_connect_args(url: sa.URL, db: DatabaseConfig) -> dict[str, Any]:
    connect_args: dict[str, Any] = {"connect_timeout": db.connect_timeout}
    if "charset" not in url.query:
        connect_args["charset"] = "utf8mb4"  # the server default may be latin1; labels are unicode
    if "init_command" not in url.query:
        connect_args["init_command"] = NO_BACKSLASH_ESCAPES_INIT
    if db.tls_ca:
        connect_args["ssl"] = ssl.create_default_context(cafile=db.tls_ca)
    return connect_args


async def _connect_requiring_tls(**kwargs: Any) -> Any:
    """aiomysql silently skips TLS when the server does not offer it; with `database.tls_ca` set that must fail
    before any credential is sent (a stripped TLS flag would otherwise downgrade the connection to plain text)."""
    import aiomysql
    from aiomysql.connection import CLIENT

    class _TlsRequired(aiomysql.Connection):  # type: ignore[misc]
        async def _request_authentication(self) -> None:
            if not self.server_capabilities & CLIENT.SSL:
                raise StorageError(
                    "database.tls_ca is set but the MySQL server does not offer TLS; refusing to log in in plain text"
                )
            await super()._request_authentication()

    conn = _TlsRequired(**kwargs)
    try:
        await conn._connect()
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_requiring_tls_blocking(_dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    """pymysql skips TLS the same way aiomysql does (`_connect_requiring_tls`); the same refusal for it."""
    import pymysql
    from pymysql.constants import CLIENT

    class _TlsRequired(pymysql.connections.Connection):  # type: ignore[misc]
        def _request_authentication(self) -> None:
            if not self.server_capabilities & CLIENT.SSL:
                raise StorageError(
                    "database.tls_ca is set but the MySQL server does not offer TLS; refusing to log in in plain text"
                )
            super()._request_authentication()

    return _TlsRequired(*cargs, **cparams)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (status, outbox scan) run while the writer commits; NORMAL sync is still crash-safe
    # for a killed process (only an OS crash can lose the last commits).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the server went away, a lock or deadlock, a timeout. Not: a row the database refuses."""
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError):
        return False
    return isinstance(exc, sa.exc.SQLAlchemyError | OSError | TimeoutError)


# ---------------------------------------------------------------- statements


Updater = Callable[[Any], Any]  # given the "inserted row" namespace, the new value of one column


def max_rows_per_statement(dialect: str, table: sa.Table, wanted: int) -> int:
    """Rows per multi-row statement: `wanted`, lowered so the bound parameters stay under the dialect's limit."""
    limit = SQLITE_MAX_PARAMS if dialect == "sqlite" else MYSQL_MAX_PARAMS
    return max(1, min(wanted, limit // len(table.columns)))


def upsert(
    dialect: str, table: sa.Table, rows: list[dict[str, Any]], keys: Sequence[str], update: Mapping[str, Updater]
) -> Insert:
    """One multi-row `INSERT … ON DUPLICATE KEY UPDATE` (MySQL/MariaDB) or `… ON CONFLICT DO UPDATE` (SQLite).

    A single statement on purpose: on MySQL >= 8.0.20 SQLAlchemy renders the row alias `AS new`, and
    aiomysql's executemany does not recognise that form and would send one statement per row.
    """
    if dialect in ("mysql", "mariadb"):
        my = mysql.insert(table).values(rows)
        return my.on_duplicate_key_update({col: fn(my.inserted) for col, fn in update.items()})
    if dialect == "sqlite":
        lite = sqlite.insert(table).values(rows)
        return lite.on_conflict_do_update(
            index_elements=list(keys), set_={col: fn(lite.excluded) for col, fn in update.items()}
        )
    raise ValueError(f"unsupported database dialect {dialect!r}")


def upsert_statement(dialect: str, table: sa.Table, keys: Sequence[str], update: Mapping[str, Updater]) -> Insert:
    """`upsert` without rows, to execute with a list of rows (executemany): built and compiled once, cached."""
    if dialect in ("mysql", "mariadb"):
        my = mysql.insert(table)
        return my.on_duplicate_key_update({col: fn(my.inserted) for col, fn in update.items()})
    if dialect == "sqlite":
        lite = sqlite.insert(table)
        return lite.on_conflict_do_update(
            index_elements=list(keys), set_={col: fn(lite.excluded) for col, fn in update.items()}
        )
    raise ValueError(f"unsupported database dialect {dialect!r}")


def _take(col: str) -> Updater:
    return lambda new: getattr(new, col)


def replace_all(table: sa.Table, keys: Sequence[str]) -> dict[str, Updater]:
    """Upsert that overwrites every non-key column with the new row (last write wins)."""
    return {c.name: _take(c.name) for c in table.columns if c.name not in keys and not c.primary_key}


AGG_KEYS: Final = ("address", "oid", "direction")
SIGNAL_KEYS: Final = ("signal_id",)
ADDRESS_KEYS: Final = ("address",)
EVENT_KEYS: Final = ("event_id",)
PUBLICATION_KEYS: Final = ("msg_id",)
ACCOUNT_VALUE_KEYS: Final = ("address", "time")
HOLDING_KEYS: Final = ("address", "coin")

# A signal's content never changes once stored (same id = same exchange data), its suppression included: the
# first stored decision stands. Only its publish state may advance, and never back, and only by an ack: a
# replayed insert (unpublished, or suppressed) must neither re-open the outbox nor close it without a publish.
SIGNAL_UPDATE: Final[dict[str, Updater]] = {
    "published": lambda new: sa.case((new.published_at.is_not(None), sa.true()), else_=t.signals.c.published),
    "published_at": lambda new: sa.func.coalesce(t.signals.c.published_at, new.published_at),
}
# The open that started a holding; a repeated put only refreshes the time.
HOLDING_UPDATE: Final[dict[str, Updater]] = {"updated_at": _take("updated_at")}
AGG_UPDATE: Final = replace_all(t.aggregations, AGG_KEYS)
BY_ADDRESS_UPDATE: Final = {"payload": _take("payload"), "updated_at": _take("updated_at")}
POSITION_UPDATE: Final = replace_all(t.positions, ADDRESS_KEYS)  # the newest document replaces the row
# An event's content never changes once stored (same id = same change); a replay only touches nothing.
EVENT_UPDATE: Final[dict[str, Updater]] = {"created_at": lambda new: t.position_events.c.created_at}
# A sample is what the account was worth at its time: a repeated put of the same (address, time) keeps the value.
ACCOUNT_VALUE_UPDATE: Final[dict[str, Updater]] = {"account_value": _take("account_value")}
# Like signals: a replayed insert (unpublished) must not re-open a publication already acknowledged.
PUBLICATION_UPDATE: Final[dict[str, Updater]] = {
    "published_at": lambda new: sa.func.coalesce(t.publications.c.published_at, new.published_at),
}
# The old service's tables (`storage.legacy`): an aggregation row keeps its id and first `created_at`, a position
# row its id; everything else is the newest put's.
LEGACY_AGG_KEYS: Final = ("address", "oid", "direction")
LEGACY_AGG_UPDATE: Final = {
    k: v for k, v in replace_all(t.legacy_order_aggregation, LEGACY_AGG_KEYS).items() if k != "created_at"
}
LEGACY_POSITION_UPDATE: Final = replace_all(t.legacy_position_cache, ADDRESS_KEYS)
ADDRESS_UPDATE: Final = {
    col: _take(col)
    for col in (
        "label",
        "is_active",
        "tier",
        "priority",
        "server_id",
        "min_notional_usd",
        "allow_symbols",
        "deny_symbols",
        "updated_at",
    )
}


def mark_published_statement(marks: Mapping[str, int]) -> sa.Update:
    """Set published for these signal ids (each with its own ack time) in one statement."""
    times = set(marks.values())
    at: Any = next(iter(times)) if len(times) == 1 else sa.case(marks, value=t.signals.c.signal_id)
    return (
        sa.update(t.signals)
        .where(t.signals.c.signal_id.in_(list(marks)), t.signals.c.published == sa.false())
        .values(published=True, published_at=at)
    )


# Publish marks per UPDATE in the writer. Chunks are padded to a power of two, so at most log2 of this many
# statement shapes exist per outbox table; each is built and compiled once.
MAX_MARKS_PER_STATEMENT: Final = 512
_OUTBOX_TABLES: Final = ("hlm_signals", "hlm_publications")


@functools.lru_cache(maxsize=len(_OUTBOX_TABLES) * MAX_MARKS_PER_STATEMENT.bit_length())
def _mark_published_slots(table: str, slots: int) -> sa.Update:
    if table == t.signals.name:
        key, at_col = t.signals.c.signal_id, t.signals.c.published_at
        unpublished: sa.ColumnElement[bool] = t.signals.c.published == sa.false()
        extra: dict[str, Any] = {"published": True}
    else:
        key, at_col = t.publications.c.msg_id, t.publications.c.published_at
        unpublished = t.publications.c.published_at.is_(None)
        extra = {}
    ids = [sa.bindparam(f"id{i}", type_=key.type) for i in range(slots)]
    at = sa.case(*((key == ids[i], sa.bindparam(f"at{i}", type_=at_col.type)) for i in range(slots)))
    return sa.update(key.table).where(key.in_(ids), unpublished).values(**extra, published_at=at)


def _marks_call(table: str, marks: Sequence[tuple[str, int]]) -> tuple[sa.Update, dict[str, Any]]:
    if not 0 < len(marks) <= MAX_MARKS_PER_STATEMENT:
        raise ValueError(f"1 to {MAX_MARKS_PER_STATEMENT} marks per statement, got {len(marks)}")
    slots = 1 << (len(marks) - 1).bit_length()
    params: dict[str, Any] = {}
    last = marks[-1]
    for i in range(slots):
        key, at = marks[i] if i < len(marks) else last
        params[f"id{i}"] = key
        params[f"at{i}"] = at
    return _mark_published_slots(table, slots), params


def mark_published_call(marks: Sequence[tuple[str, int]]) -> tuple[sa.Update, dict[str, Any]]:
    """`mark_published_statement` for the writer's hot path: a cached statement and its parameters.

    Up to `MAX_MARKS_PER_STATEMENT` (signal_id, ack ms) pairs; the chunk is padded with its last pair
    (a repeated id changes nothing) to the statement's power-of-two size.
    """
    return _marks_call(t.signals.name, marks)


def mark_publications_call(marks: Sequence[tuple[str, int]]) -> tuple[sa.Update, dict[str, Any]]:
    """Like `mark_published_call`, for (msg_id, ack ms) pairs of `hlm_publications` (only unpublished rows move)."""
    return _marks_call(t.publications.name, marks)


def close_aggregations_statement(keys: Sequence[AggKey], status: str | None, at_ms: int) -> sa.Update:
    """Mark flushed aggregations closed (kept until retention so a restart knows they were emitted)."""
    values: dict[str, Any] = {"closed": True, "closed_at": at_ms, "updated_at": at_ms}
    if status is not None:
        values["status"] = status
    cols = t.aggregations.c
    return sa.update(t.aggregations).where(sa.tuple_(cols.address, cols.oid, cols.direction).in_(keys)).values(values)


def delete_holdings_statement(keys: Sequence[tuple[str, str]]) -> sa.Delete:
    """Forget positions whose close went out: their later closes may be filtered again."""
    h = t.signal_holdings.c
    return sa.delete(t.signal_holdings).where(sa.tuple_(h.address, h.coin).in_(list(keys)))


def void_pending_statement(addresses: list[str]) -> sa.Delete:
    """Drop the pending (never flushed) aggregations of addresses no longer tracked."""
    a = t.aggregations.c
    return sa.delete(t.aggregations).where(a.address.in_(addresses), a.closed == sa.false())


# Signal fields kept as their own columns (for queries); every field, these and the newer ones, is in `payload`.
_SIGNAL_COLUMNS: Final = frozenset(t.signals.c.keys())


def signal_row(signal: Signal, created_at: int, published_at: int | None = None) -> dict[str, Any]:
    """The signals-table row of one signal: its columns plus the exact JSON."""
    row: dict[str, Any] = {
        f: getattr(signal, f) for f in signal.__struct_fields__ if f in _SIGNAL_COLUMNS and f != "liquidation"
    }
    row["liquidation"] = encode_json(signal.liquidation) if signal.liquidation is not None else None
    row["payload"] = encode_signal(signal).decode()
    row["published"] = published_at is not None or signal.suppressed  # nothing to send for a suppressed one
    row["published_at"] = published_at
    row["created_at"] = created_at
    return row


def void_legacy_statement(addresses: list[str]) -> sa.Delete:
    """`void_pending_statement` for `hl_order_aggregation`: the unsent rows of addresses no longer tracked."""
    a = t.legacy_order_aggregation.c
    return sa.delete(t.legacy_order_aggregation).where(a.address.in_(addresses), a.signal_sent == sa.false())


def delete_legacy_positions_statement(addresses: list[str]) -> sa.Delete:
    """`delete_positions_statement` for `hl_position_cache`."""
    return sa.delete(t.legacy_position_cache).where(t.legacy_position_cache.c.address.in_(addresses))


def delete_positions_statement(addresses: list[str]) -> sa.Delete:
    """Forget the documents of addresses no longer watched."""
    return sa.delete(t.positions).where(t.positions.c.address.in_(addresses))


def _total(values: Sequence[Decimal | None]) -> Decimal | None:
    known = [v for v in values if v is not None]
    return sum(known, Decimal(0)) if known else None


def portfolio_row(
    address: str, doc: AddressPortfolio, payload: str, updated_at: int, model_state: str | None = None
) -> dict[str, Any]:
    """The positions-table row of one document: its JSON, the account summary over its dexes, the model's state."""
    dexes = list(doc.dexes.values())
    return {
        "address": address,
        "payload": payload,
        "account_value": _total([d.account_value for d in dexes]),
        "total_ntl_pos": _total([d.total_ntl_pos for d in dexes]),
        "total_margin_used": _total([d.total_margin_used for d in dexes]),
        "withdrawable": _total([d.withdrawable for d in dexes]),
        "spot_usd": _total([h.usd_value for h in doc.spot.values()]),
        "position_count": sum(len(d.positions) for d in dexes),
        "as_of": doc.as_of,
        "model_state": model_state,
        "updated_at": updated_at,
    }


def position_event_row(event: PositionEvent, created_at: int) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "address": event.address,
        "coin": event.coin,
        "symbol": event.symbol,
        "dex": event.dex,
        "event": event.event,
        "size_before": event.size_before,
        "size_after": event.size_after,
        "time": event.time,
        "signal_id": event.signal_id,
        "payload": encode_json(event),
        "created_at": created_at,
    }


def publication_row(publication: Publication, published_at: int | None = None) -> dict[str, Any]:
    return {
        "msg_id": publication.msg_id,
        "kind": publication.kind,
        "subject": publication.subject,
        "payload": publication.payload.decode(),
        "created_at": publication.created_at,
        "published_at": published_at,
    }


def perp_positions(doc: AddressPortfolio) -> list[tuple[str, PerpPosition]]:
    """Every open perp position of a document with its dex, in dex then coin order."""
    return [
        (name, doc.dexes[name].positions[coin])
        for name in sorted(doc.dexes)
        for coin in sorted(doc.dexes[name].positions)
    ]


def position_matches(position: PerpPosition, symbol: str | None, min_usd: Decimal | None) -> bool:
    """`symbol` (case-insensitive) names the position's symbol or coin; its value is at least `min_usd`."""
    if symbol is not None and symbol.upper() not in (position.symbol.upper(), position.coin.upper()):
        return False
    value = position.position_value_usd
    return min_usd is None or (value is not None and value >= min_usd)


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class StoredAggregation:
    """A persisted aggregation; `record` is the engine's JSON as it was written."""

    address: str
    oid: int
    direction: str
    twap_id: int | None
    coin: str
    status: str
    fill_count: int
    first_fill_time: int
    last_fill_time: int
    record: bytes
    closed: bool
    updated_at: int


@dataclass(frozen=True, slots=True)
class StoredSignal:
    signal: Signal
    published: bool
    published_at: int | None
    created_at: int


# ---------------------------------------------------------------- repository


class Repository:
    """Queries and small direct writes; one short transaction each."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    # ---- outbox ----

    async def fetch_unpublished(self, limit: int, older_than_ms: int | None = None) -> list[Signal]:
        """Oldest unpublished signals first; with `older_than_ms` (epoch ms) only those stored before it."""
        s = t.signals.c
        query = (
            sa.select(s.payload)
            .where(s.published == sa.false(), s.suppressed == sa.false())
            .order_by(s.id)
            .limit(limit)
        )
        if older_than_ms is not None:
            query = query.where(s.created_at < older_than_ms)
        async with self.engine.connect() as conn:
            payloads = (await conn.execute(query)).scalars().all()
        return [decode_signal(p) for p in payloads]

    async def fetch_published_since(self, since_ms: int, limit: int, after_id: int = 0) -> list[tuple[int, Signal]]:
        """Signals acknowledged at or after `since_ms` (epoch ms) with a row id above `after_id`, by row id, as
        (row id, signal): what the outbox re-publishes when NATS may have lost acknowledged writes."""
        s = t.signals.c
        query = (
            sa.select(s.id, s.payload)
            .where(s.published == sa.true(), s.suppressed == sa.false(), s.published_at >= since_ms, s.id > after_id)
            .order_by(s.id)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [(int(row_id), decode_signal(payload)) for row_id, payload in rows]

    async def mark_published(self, signal_ids: Sequence[str], at_ms: int) -> int:
        """Record JetStream acks for signals already stored; returns how many changed state."""
        if not signal_ids:
            return 0
        async with self.engine.begin() as conn:
            result = await conn.execute(mark_published_statement(dict.fromkeys(signal_ids, at_ms)))
        return int(result.rowcount)

    async def count_unpublished(self) -> int:
        s = t.signals.c
        query = sa.select(sa.func.count()).where(s.published == sa.false(), s.suppressed == sa.false())
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def fetch_unpublished_publications(
        self, limit: int, older_than_ms: int | None = None, *, kinds: Collection[str] | None = None
    ) -> list[Publication]:
        """Publications not yet acknowledged, oldest first; with `older_than_ms`, only those created before it;
        with `kinds`, only those kinds (each outbox re-reads its own)."""
        p = t.publications.c
        query = (
            sa.select(p.msg_id, p.kind, p.subject, p.payload, p.created_at)
            .where(p.published_at.is_(None))
            .order_by(p.created_at, p.msg_id)
            .limit(limit)
        )
        if older_than_ms is not None:
            query = query.where(p.created_at < older_than_ms)
        if kinds is not None:
            query = query.where(p.kind.in_(list(kinds)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            Publication(msg_id=msg_id, kind=kind, subject=subject, payload=payload.encode(), created_at=created)
            for msg_id, kind, subject, payload, created in rows
        ]

    async def fetch_published_publications_since(
        self,
        since_ms: int,
        limit: int,
        after: tuple[int, str] | None = None,
        *,
        kinds: Collection[str] | None = None,
    ) -> list[tuple[int, Publication]]:
        """Publications acknowledged at or after `since_ms` as (ack ms, publication), by (ack ms, msg_id),
        continuing after `after`; with `kinds`, only those kinds."""
        p = t.publications.c
        query = (
            sa.select(p.published_at, p.msg_id, p.kind, p.subject, p.payload, p.created_at)
            .where(p.published_at >= since_ms)
            .order_by(p.published_at, p.msg_id)
            .limit(limit)
        )
        if after is not None:
            at, msg_id = after
            query = query.where(sa.or_(p.published_at > at, sa.and_(p.published_at == at, p.msg_id > msg_id)))
        if kinds is not None:
            query = query.where(p.kind.in_(list(kinds)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            (
                int(acked),
                Publication(msg_id=msg_id, kind=kind, subject=subject, payload=payload.encode(), created_at=created),
            )
            for acked, msg_id, kind, subject, payload, created in rows
        ]

    async def count_unpublished_publications(self, *, kinds: Collection[str] | None = None) -> int:
        p = t.publications
        query = sa.select(sa.func.count()).select_from(p).where(p.c.published_at.is_(None))
        if kinds is not None:
            query = query.where(p.c.kind.in_(list(kinds)))
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def list_signals(self, *, address: str | None = None, limit: int = 1000) -> list[StoredSignal]:
        """The newest `limit` stored signals (of `address`), in insertion order: oldest of them first."""
        s = t.signals.c
        query = sa.select(s.payload, s.published, s.published_at, s.created_at).order_by(s.id.desc()).limit(limit)
        if address is not None:
            query = query.where(s.address == address)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [StoredSignal(decode_signal(p), bool(pub), at, created) for p, pub, at, created in reversed(rows)]

    async def load_signal_ids(self, since_ms: int) -> set[str]:
        """Ids of signals stored since `since_ms`: what a restarted engine must not emit again."""
        query = sa.select(t.signals.c.signal_id).where(t.signals.c.created_at >= since_ms)
        async with self.engine.connect() as conn:
            return set((await conn.execute(query)).scalars().all())

    # ---- state reloaded at start ----

    async def load_signal_holdings(self) -> set[tuple[str, str]]:
        """(address, coin) of every position whose open signal was published and not yet closed."""
        h = t.signal_holdings.c
        async with self.engine.connect() as conn:
            return {(address, coin) for address, coin in (await conn.execute(sa.select(h.address, h.coin))).all()}

    async def load_pending_aggregations(self) -> list[StoredAggregation]:
        """Aggregations not yet flushed into a signal, oldest first."""
        return await self._aggregations(t.aggregations.c.closed == sa.false())

    async def load_closed_keys(self, since_ms: int) -> set[AggKey]:
        """Keys flushed since `since_ms` (a late snapshot fill of these must not start a second signal)."""
        a = t.aggregations.c
        query = sa.select(a.address, a.oid, a.direction).where(a.closed == sa.true(), a.updated_at >= since_ms)
        async with self.engine.connect() as conn:
            return {(addr, oid, d) for addr, oid, d in (await conn.execute(query)).all()}

    async def load_aggregation(self, address: str, oid: int, direction: str) -> StoredAggregation | None:
        a = t.aggregations.c
        found = await self._aggregations(sa.and_(a.address == address, a.oid == oid, a.direction == direction))
        return found[0] if found else None

    async def _aggregations(self, where: sa.ColumnElement[bool]) -> list[StoredAggregation]:
        a = t.aggregations.c
        query = sa.select(t.aggregations).where(where).order_by(a.first_fill_time, a.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [
            StoredAggregation(
                address=r["address"],
                oid=r["oid"],
                direction=r["direction"],
                twap_id=r["twap_id"],
                coin=r["coin"],
                status=r["status"],
                fill_count=r["fill_count"],
                first_fill_time=r["first_fill_time"],
                last_fill_time=r["last_fill_time"],
                record=r["record"].encode(),
                closed=bool(r["closed"]),
                updated_at=r["updated_at"],
            )
            for r in rows
        ]

    async def load_engine_state(self, flushed_since_ms: int) -> EngineState:
        """What `TrackingEngine.import_state` needs after a restart: pending records, records flushed since
        `flushed_since_ms` (so their orders do not emit again) and every watermark."""
        a = t.aggregations.c
        rows = await self._aggregations(sa.or_(a.closed == sa.false(), a.updated_at >= flushed_since_ms))
        return EngineState(
            aggregations=[_RECORD.decode(row.record) for row in rows],
            watermarks=[_WATERMARK.decode(raw) for raw in (await self.load_watermarks()).values()],
        )

    async def load_watermarks(self) -> dict[str, bytes]:
        return await self._by_address(t.watermarks)

    async def load_positions(self) -> dict[str, bytes]:
        return await self._by_address(t.positions)

    async def load_portfolios(self) -> dict[str, AddressPortfolio]:
        """Every stored position document by address (what a restarted position model starts from)."""
        p = t.positions.c
        query = sa.select(p.address, p.payload).where(p.as_of.is_not(None))  # rows without `as_of` hold no document
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {address: _PORTFOLIO.decode(payload) for address, payload in rows}

    async def load_position_states(self) -> list[bytes]:
        """The position model's stored bookkeeping of every address that has one (`PositionModel.restore_account`)."""
        p = t.positions.c
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(p.model_state).where(p.model_state.is_not(None)))).all()
        return [state.encode() if isinstance(state, str) else bytes(state) for (state,) in rows]

    async def list_positions(self, symbol: str | None = None, min_usd: Decimal | None = None) -> list[AddressPortfolio]:
        """Documents holding at least one perp position that `position_matches`, by address (all with no filter)."""
        docs = sorted((await self.load_portfolios()).values(), key=lambda doc: doc.address)
        if symbol is None and min_usd is None:
            return docs
        return [
            doc
            for doc in docs
            if any(
                position_matches(pos, symbol, min_usd) for dex in doc.dexes.values() for pos in dex.positions.values()
            )
        ]

    async def list_position_events(self, address: str, limit: int = 100) -> list[PositionEvent]:
        """The address's newest position events first (by exchange time)."""
        e = t.position_events.c
        query = (
            sa.select(e.payload)
            .where(e.address == address.lower())
            .order_by(e.time.desc(), e.event_id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            payloads = (await conn.execute(query)).scalars().all()
        return [_EVENT.decode(payload) for payload in payloads]

    async def list_account_values(self, address: str, limit: int) -> list[tuple[int, Decimal]]:
        """The address's newest `limit` account-value samples as (ms, value), oldest of them first."""
        v = t.account_values.c
        query = (
            sa.select(v.time, v.account_value).where(v.address == address.lower()).order_by(v.time.desc()).limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [(int(at), Decimal(value)) for at, value in reversed(rows)]

    async def _by_address(self, table: sa.Table) -> dict[str, bytes]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(table.c.address, table.c.payload))).all()
        return {address: payload.encode() for address, payload in rows}

    async def ping(self) -> None:
        """One round trip (readiness)."""
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))


# ---------------------------------------------------------------- address book


class AddressChange(Protocol):
    """One address to add or update; None fields keep the stored value (or the default for a new row)."""

    @property
    def address(self) -> str: ...
    @property
    def label(self) -> str | None: ...
    @property
    def tier(self) -> str | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def is_active(self) -> bool | None: ...


# Optional fields of an `AddressChange` (read with getattr: older callers' change objects lack them).
_OPTIONAL_CHANGES: Final = ("server_id", "min_notional_usd", "allow_symbols", "deny_symbols")


def symbol_list_text(symbols: Sequence[str]) -> str | None:
    """A filter list as stored: comma-separated, NULL when empty."""
    return ",".join(symbols) or None


def stored_symbol_list(text: str | None) -> tuple[str, ...]:
    """A stored filter list, read leniently (another program may have written it): entries stripped, blanks and
    repeats dropped; an entry the CLI would refuse (too long) is kept and simply never matches."""
    kept: dict[str, str] = {}
    for item in (text or "").split(","):
        if entry := item.strip():
            kept.setdefault(symbol_key(entry), entry)
    return tuple(kept.values())


def _column_values(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Address fields as columns: filter lists as stored text."""
    return {
        key: symbol_list_text(value) if key in ("allow_symbols", "deny_symbols") else value
        for key, value in changes.items()
    }


def _address_dict(row: sa.RowMapping) -> dict[str, Any]:
    return {
        "address": row["address"],
        "label": row["label"] or "",
        "tier": row["tier"],
        "priority": row["priority"],
        "is_active": bool(row["is_active"]),
        "server_id": row["server_id"],
        "min_notional_usd": plain_decimal(row["min_notional_usd"]),
        "allow_symbols": list(stored_symbol_list(row["allow_symbols"])),
        "deny_symbols": list(stored_symbol_list(row["deny_symbols"])),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
    }


def _iso(value: Any) -> str | None:
    return value.isoformat(sep=" ") if value is not None else None


class AddressTable:
    """`hlm_addresses`: the address-book source (`load`, `change_marker`) and its admin operations.

    Every write sets `updated_at` with sub-second precision, so `change_marker` (row count, highest
    id, newest `updated_at`) moves on each change and a running service picks it up within its poll.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    async def load(self) -> list[WatchedAddress]:
        """Active rows, highest priority first, as stored (the address book validates and lower-cases them)."""
        return [
            WatchedAddress(
                address=row["address"],
                label=row["label"] or "",
                tier=row["tier"],
                priority=row["priority"],
                server_id=row["server_id"],
                min_notional_usd=row["min_notional_usd"],
                allow_symbols=symbol_keys(stored_symbol_list(row["allow_symbols"])),
                deny_symbols=symbol_keys(stored_symbol_list(row["deny_symbols"])),
            )
            for row in await self._rows(active_only=True)
        ]

    async def change_marker(self) -> object:
        a = t.addresses.c
        query = sa.select(sa.func.count(), sa.func.max(a.id), sa.func.max(a.updated_at))
        async with self.engine.connect() as conn:
            return tuple((await conn.execute(query)).one())

    async def list(self, *, include_inactive: bool = True) -> list[dict[str, Any]]:
        """Rows as JSON-able dicts (CLI `addresses list`, `/admin/addresses`)."""
        return [_address_dict(row) for row in await self._rows(active_only=not include_inactive)]

    async def get(self, address: str) -> dict[str, Any] | None:
        query = sa.select(t.addresses).where(t.addresses.c.address == parse_address(address))
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return _address_dict(row) if row is not None else None

    async def _rows(self, *, active_only: bool) -> Sequence[sa.RowMapping]:
        a = t.addresses.c
        query = sa.select(t.addresses).order_by(a.priority.desc(), a.address)
        if active_only:
            query = query.where(a.is_active == sa.true())
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).mappings().all()

    async def add(self, entries: Sequence[AddressChange]) -> int:
        """Insert new addresses, update the given fields of known ones (an add re-activates unless told otherwise).

        One transaction: either every entry is written or none. Returns how many were written.
        """
        if not entries:
            return 0
        now = t.precise_now()
        async with self.engine.begin() as conn:
            for entry in entries:
                address = parse_address(entry.address)
                changes: dict[str, Any] = {
                    k: v for k in ("label", "tier", "priority", "is_active") if (v := getattr(entry, k)) is not None
                }
                changes.setdefault("is_active", True)
                for key in _OPTIONAL_CHANGES:
                    if (value := getattr(entry, key, None)) is not None:
                        changes[key] = value
                changes = _column_values(changes)
                updated = await conn.execute(
                    sa.update(t.addresses).where(t.addresses.c.address == address).values(**changes, updated_at=now)
                )
                if updated.rowcount == 0:
                    await conn.execute(
                        sa.insert(t.addresses).values(address=address, **changes, created_at=now, updated_at=now)
                    )
        return len(entries)

    async def remove(self, addresses: Sequence[str], *, purge: bool = False) -> int:
        """Stop watching (is_active=false, or with `purge` delete the rows); returns how many were watched."""
        normalized = [parse_address(a) for a in addresses]
        a = t.addresses.c
        async with self.engine.begin() as conn:
            watched = (
                await conn.execute(
                    sa.select(sa.func.count()).where(a.address.in_(normalized), a.is_active == sa.true())
                )
            ).scalar_one()
            if purge:
                await conn.execute(sa.delete(t.addresses).where(a.address.in_(normalized)))
            else:
                await conn.execute(
                    sa.update(t.addresses)
                    .where(a.address.in_(normalized), a.is_active == sa.true())
                    .values(is_active=False, updated_at=t.precise_now())
                )
        return int(watched)

    async def update(
        self,
        address: str,
        *,
        label: str | None = None,
        tier: str | None = None,
        priority: int | None = None,
        is_active: bool | None = None,
        server_id: int | None = None,
        min_notional_usd: Decimal | None = None,
        allow_symbols: Sequence[str] | None = None,
        deny_symbols: Sequence[str] | None = None,
    ) -> dict[str, Any] | None:
        """Change the given fields (None = unchanged; an empty symbol list removes the list); the updated row, or
        None when the address is unknown."""
        given = {
            "label": label,
            "tier": tier,
            "priority": priority,
            "is_active": is_active,
            "server_id": server_id,
            "min_notional_usd": min_notional_usd,
            "allow_symbols": allow_symbols,
            "deny_symbols": deny_symbols,
        }
        changes = _column_values({k: v for k, v in given.items() if v is not None})
        normalized = parse_address(address)
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.update(t.addresses)
                .where(t.addresses.c.address == normalized)
                .values(**changes, updated_at=t.precise_now())
            )
        return await self.get(normalized)


class LegacyAddressTable:
    """The old service's address tables as an address-book source.

    `hl_active_addresses`, honouring `server_id` (the old loader ignored it, so instances could not share the
    table), and next to it the old README's `hl_watch_addresses` (`address`, `label`, `is_active`; the old
    service's own shape, `nickname` for the label and a `deleted_at` soft delete, is read as well). Either may be
    missing; with neither the load fails (the address book keeps its last set and retries).
    """

    def __init__(self, engine: AsyncEngine, server_id: int | None) -> None:
        self.engine = engine
        self.server_id = server_id

    async def load(self) -> list[WatchedAddress]:
        async with self.engine.connect() as conn:
            shapes = await conn.run_sync(_legacy_address_shapes)
            if not shapes:
                raise StorageError(
                    f"database.legacy_addresses_table is on but neither {t.legacy_active_addresses.name} "
                    f"nor {t.LEGACY_WATCH_ADDRESSES} exists"
                )
            found: dict[str, WatchedAddress] = {}
            if t.legacy_active_addresses.name in shapes:
                legacy = t.legacy_active_addresses
                query = sa.select(legacy.c.address, legacy.c.server_id).distinct()
                if self.server_id is not None:
                    query = query.where(legacy.c.server_id == self.server_id)
                for address, server_id in (await conn.execute(query)).all():
                    found.setdefault(str(address).lower(), WatchedAddress(address=address, server_id=server_id))
            columns = shapes.get(t.LEGACY_WATCH_ADDRESSES)
            if columns is not None:
                for address, label in (await conn.execute(_watch_addresses_query(columns))).all():
                    if address is None:
                        continue
                    key = str(address).lower()
                    entry = found.get(key)
                    if entry is None or not entry.label:
                        server_id = entry.server_id if entry is not None else None
                        found[key] = WatchedAddress(address=address, label=label or "", server_id=server_id)
        # Owned elsewhere: rows are passed as stored; the address book validates and counts malformed ones.
        return list(found.values())


def _legacy_address_shapes(sync: sa.Connection) -> dict[str, set[str]]:
    """The old address tables present in this database, each with its column names."""
    inspector = sa.inspect(sync)
    return {
        name: {column["name"] for column in inspector.get_columns(name)}
        for name in (t.legacy_active_addresses.name, t.LEGACY_WATCH_ADDRESSES)
        if inspector.has_table(name)
    }


def _watch_addresses_query(columns: set[str]) -> sa.Select[tuple[Any, Any]]:
    table = sa.table(t.LEGACY_WATCH_ADDRESSES, *(sa.column(name) for name in columns))
    label_column = "label" if "label" in columns else "nickname" if "nickname" in columns else None
    label: sa.ColumnElement[Any] = table.c[label_column] if label_column else sa.literal("")
    query = sa.select(table.c.address, label)
    if "is_active" in columns:
        query = query.where(table.c.is_active == sa.true())
    if "deleted_at" in columns:
        query = query.where(table.c.deleted_at.is_(None))
    return query


def address_source(engine: AsyncEngine, cfg: Config) -> AddressTable | LegacyAddressTable:
    """The configured source: `hlm_addresses`, or the old tables (`hl_active_addresses`, `hl_watch_addresses`) with
    `database.legacy_addresses_table`."""
    if cfg.database.legacy_addresses_table:
        return LegacyAddressTable(engine, cfg.addresses.server_id)
    return AddressTable(engine)


async def load_pair_categories(engine: AsyncEngine) -> dict[str, int] | None:
    """`pair_configs` symbol (upper case) → category 1-5, or None when the table does not exist in this database."""
    p = t.legacy_pair_configs
    async with engine.connect() as conn:
        exists = await conn.run_sync(lambda sync: sa.inspect(sync).has_table(p.name))
        if not exists:
            return None
        rows = (await conn.execute(sa.select(p.c.symbol, p.c.category))).all()
    return {str(symbol).upper(): int(category) for symbol, category in rows if symbol and category is not None}
