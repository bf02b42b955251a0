"""The schema: one SQLAlchemy Core `MetaData` shared by the writer, the repository and the migrations.

Every table is prefixed `hlm_` so the service can share a database with the old Go service (its
`hl_*` tables differ in shape) and with the tables other services own (`hl_active_addresses`,
`pair_configs`, declared at the bottom as read-only legacy sources, never created here).

Times of exchange events and of our own writes are epoch milliseconds (BIGINT): exact, no time zones.
Sizes and prices are `ExactDecimal`: DECIMAL(65,30) on MySQL/MariaDB (35 integer and 30 fractional
digits: a 1e15 meme-token size times any price, a 1e-10 price and a VWAP quotient all fit; the old
decimal(18,8) overflowed above 1e10), exact decimal text on SQLite (which has no decimal type and
would silently turn numbers into doubles). JSON payloads are stored as text, not as a JSON column,
because MySQL's JSON type parses numbers into doubles and would round exact decimals.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles

ADDRESS_LEN: Final = 42  # 0x + 40 hex digits
LABEL_LEN: Final = 128
# Long enough for every signal_id form (tape ids carry address, coin, side and block time) and still under
# the 767-byte index prefix limit of utf8mb4 on old MySQL row formats (191 * 4 bytes).
SIGNAL_ID_LEN: Final = 191
COIN_LEN: Final = 64  # HIP-3 coins look like `xyz:XYZ100`; spot pairs like `@1234` or `PURR/USDC`
STATUS_LEN: Final = 64  # Hyperliquid statuses such as `openInterestIncreaseRejected` exceed the old varchar(16)
DIR_LEN: Final = 64  # Hyperliquid `dir` after the split, including liquidation labels
SHORT_LEN: Final = 16  # enumerations: direction, side, asset_type, source, trigger, tier
REASON_LEN: Final = 32  # a signal's suppression reason (`symbol_not_allowed` is longer than SHORT_LEN)
INSTANCE_LEN: Final = 255  # instance ids are host name + data directory
# Instance ids as a primary key: 191 utf8mb4 characters stay under old MySQL row formats' 767-byte key limit.
LEASE_KEY_LEN: Final = 191
LEASE_TOKEN_LEN: Final = 32  # uuid4 hex
# Position event and publication ids (`{address}:pos:{coin}:…`, alert ids add `:liq:{level}:{n}`): the same
# 767-byte key limit as signal ids.
MSG_ID_LEN: Final = 191
# A publication's subject: prefix, address, a symbol escaped up to 3 bytes per character, a suffix.
SUBJECT_LEN: Final = 512

DECIMAL_PRECISION: Final = 65  # MySQL's maximum
DECIMAL_SCALE: Final = 30  # MySQL's maximum; the remaining 35 digits are the integer part
_DECIMAL_TEXT_LEN: Final = 80  # exact text on SQLite: sign, 65 digits, point, exponent-free


# Alembic's bookkeeping table, named so it cannot clash with another application's Alembic in the same database.
VERSION_TABLE: Final = "hlm_alembic_version"


class ExactDecimal(sa.types.TypeDecorator[Decimal]):
    """A decimal stored exactly: DECIMAL(65,30) on MySQL/MariaDB, plain text on SQLite.

    Values are bound as fixed-point strings: MySQL parses a string into DECIMAL exactly, whereas a
    scientific literal such as `1E-10` would be read as a DOUBLE first.
    """

    impl = sa.String(_DECIMAL_TEXT_LEN)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DECIMAL(DECIMAL_PRECISION, DECIMAL_SCALE))
        return dialect.type_descriptor(sa.String(_DECIMAL_TEXT_LEN))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return format(Decimal(value), "f")

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return value if isinstance(value, Decimal) else Decimal(str(value))


class JsonText(sa.types.TypeDecorator[str]):
    """JSON kept verbatim as text (MEDIUMTEXT on MySQL: an order with thousands of fills exceeds TEXT's 64 KiB)."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.MEDIUMTEXT())
        return dialect.type_descriptor(sa.Text())


class precise_now(sa.sql.expression.FunctionElement[Any]):
    """The database's current time with sub-second precision, usable as a column default.

    The address table's `updated_at` is part of the change marker other processes poll; a second-resolution
    timestamp would hide two edits within one second.
    """

    type = sa.DateTime()
    inherit_cache = True


@compiles(precise_now)
def _precise_now_default(element: precise_now, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(precise_now, "mysql")
def _precise_now_mysql(element: precise_now, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP(6)"


@compiles(precise_now, "sqlite")
def _precise_now_sqlite(element: precise_now, compiler: Any, **kw: Any) -> str:
    return "(STRFTIME('%Y-%m-%d %H:%M:%f', 'now'))"


PreciseDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

# BIGINT autoincrement keys; SQLite only auto-increments an INTEGER PRIMARY KEY (its rowid alias).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata: Final = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Who to watch. Written by the CLI, the admin API or directly by another service; read every reload interval.
addresses: Final = sa.Table(
    "hlm_addresses",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("address", sa.String(ADDRESS_LEN), nullable=False, unique=True),
    sa.Column("label", sa.String(LABEL_LEN), nullable=False, server_default=""),
    sa.Column("is_active", sa.Boolean(), nullable=False, server_default=sa.true()),
    sa.Column("tier", sa.String(SHORT_LEN), nullable=False, server_default="auto"),
    sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("server_id", sa.Integer(), nullable=True),  # NULL: any instance; else pinned to that instance
    sa.Column("created_at", PreciseDateTime, nullable=False, server_default=precise_now()),
    sa.Column("updated_at", PreciseDateTime, nullable=False, server_default=precise_now()),
    # Filters (README "Filters"): a notional floor beside the global one, and comma-separated symbol lists
    # (NULL or empty: no list), plain text so another program can write them with one UPDATE.
    sa.Column("min_notional_usd", ExactDecimal(), nullable=False, server_default="0"),
    sa.Column("allow_symbols", sa.Text(), nullable=True),
    sa.Column("deny_symbols", sa.Text(), nullable=True),
    sa.CheckConstraint("tier IN ('precise', 'wide', 'auto')", name="tier"),
)

# What each address holds: the whole `AddressPortfolio` document (JSON) plus its account summary summed over
# the perp dexes (NULL until a state frame showed one), for SQL readers that need no JSON.
positions: Final = sa.Table(
    "hlm_positions",
    metadata,
    sa.Column("address", sa.String(ADDRESS_LEN), primary_key=True),
    sa.Column("payload", JsonText(), nullable=False),
    sa.Column("account_value", ExactDecimal(), nullable=True),
    sa.Column("total_ntl_pos", ExactDecimal(), nullable=True),
    sa.Column("total_margin_used", ExactDecimal(), nullable=True),
    sa.Column("withdrawable", ExactDecimal(), nullable=True),
    sa.Column("spot_usd", ExactDecimal(), nullable=True),  # spot balances with a known dollar value
    sa.Column("position_count", sa.Integer(), nullable=True),  # open perp positions over every dex
    sa.Column("as_of", sa.BigInteger(), nullable=True),  # local time of the input that last changed the document
    # The position model's bookkeeping of the address (remembered executions, alert states), for a restart.
    sa.Column("model_state", JsonText(), nullable=True),
    sa.Column("updated_at", sa.BigInteger(), nullable=False),
)

# Every position change (`PositionEvent`), kept `retention.position_events`; the payload is the published JSON.
position_events: Final = sa.Table(
    "hlm_position_events",
    metadata,
    sa.Column("event_id", sa.String(MSG_ID_LEN), primary_key=True),
    sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
    sa.Column("coin", sa.String(COIN_LEN), nullable=False),
    sa.Column("symbol", sa.String(COIN_LEN), nullable=False),
    sa.Column("dex", sa.String(COIN_LEN), nullable=False),
    sa.Column("event", sa.String(SHORT_LEN), nullable=False),
    sa.Column("size_before", ExactDecimal(), nullable=False),
    sa.Column("size_after", ExactDecimal(), nullable=False),
    sa.Column("time", sa.BigInteger(), nullable=False),
    sa.Column("signal_id", sa.String(SIGNAL_ID_LEN), nullable=True),
    sa.Column("payload", JsonText(), nullable=False),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    sa.Index(None, "address", "time"),
    sa.Index(None, "time"),
)

# Account-value samples for the console's address chart: at most one per address per
# `watch.positions.ACCOUNT_VALUE_SAMPLE_S`, kept as long as position events (`retention.position_events`).
account_values: Final = sa.Table(
    "hlm_account_values",
    metadata,
    sa.Column("address", sa.String(ADDRESS_LEN), primary_key=True),
    sa.Column("time", sa.BigInteger(), primary_key=True),  # local wall clock of the sample, ms
    sa.Column("account_value", ExactDecimal(), nullable=False),
    sa.Index(None, "time"),
)

# The outbox of messages other than signals (position events, liquidation alerts): `published_at` stays NULL
# until JetStream acknowledged the message; the payload is the exact JSON, so a re-publish is byte-identical.
publications: Final = sa.Table(
    "hlm_publications",
    metadata,
    sa.Column("msg_id", sa.String(MSG_ID_LEN), primary_key=True),
    sa.Column("kind", sa.String(SHORT_LEN), nullable=False),
    sa.Column("subject", sa.String(SUBJECT_LEN), nullable=False),
    sa.Column("payload", JsonText(), nullable=False),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    sa.Column("published_at", sa.BigInteger(), nullable=True),
    sa.Index(None, "published_at", "created_at"),  # unpublished (NULL) oldest first; retention of published ones
)

# Orders being folded into signals, and for a while after their flush (`closed`), so a restart neither loses
# a pending order nor emits a flushed one again.
aggregations: Final = sa.Table(
    "hlm_aggregations",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
    sa.Column("oid", sa.BigInteger(), nullable=False),
    sa.Column("direction", sa.String(DIR_LEN), nullable=False),
    sa.Column("twap_id", sa.BigInteger(), nullable=True),
    sa.Column("coin", sa.String(COIN_LEN), nullable=False),
    sa.Column("status", sa.String(STATUS_LEN), nullable=False),
    sa.Column("fill_count", sa.Integer(), nullable=False),
    sa.Column("first_fill_time", sa.BigInteger(), nullable=False),
    sa.Column("last_fill_time", sa.BigInteger(), nullable=False),
    sa.Column("record", JsonText(), nullable=False),  # the engine's record: fills and all aggregation state
    sa.Column("closed", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("closed_at", sa.BigInteger(), nullable=True),
    sa.Column("updated_at", sa.BigInteger(), nullable=False),
    sa.UniqueConstraint("address", "oid", "direction"),
    sa.Index(None, "closed", "updated_at"),
)

# Every signal ever emitted (and the outbox: `published` false until JetStream acknowledged it).
signals: Final = sa.Table(
    "hlm_signals",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("signal_id", sa.String(SIGNAL_ID_LEN), nullable=False, unique=True),
    sa.Column("address", sa.String(ADDRESS_LEN), nullable=False, index=True),
    sa.Column("asset_type", sa.String(SHORT_LEN), nullable=False),
    sa.Column("symbol", sa.String(COIN_LEN), nullable=False, index=True),
    sa.Column("coin_type", sa.String(SHORT_LEN), nullable=False),
    sa.Column("direction", sa.String(SHORT_LEN), nullable=False),
    sa.Column("side", sa.String(SHORT_LEN), nullable=False),
    sa.Column("position_rate", ExactDecimal(), nullable=False),
    sa.Column("close_rate", ExactDecimal(), nullable=False),
    sa.Column("size", ExactDecimal(), nullable=False),
    sa.Column("price", ExactDecimal(), nullable=False),
    sa.Column("timestamp", sa.BigInteger(), nullable=False),
    sa.Column("schema_version", sa.Integer(), nullable=False),
    sa.Column("source", sa.String(SHORT_LEN), nullable=False),
    sa.Column("coin", sa.String(COIN_LEN), nullable=False),
    sa.Column("dir", sa.String(DIR_LEN), nullable=False),
    sa.Column("oid", sa.BigInteger(), nullable=True),
    sa.Column("twap_id", sa.BigInteger(), nullable=True),
    sa.Column("status", sa.String(STATUS_LEN), nullable=True),
    sa.Column("trigger", sa.String(SHORT_LEN), nullable=False),
    sa.Column("fill_count", sa.Integer(), nullable=False),
    sa.Column("first_fill_time", sa.BigInteger(), nullable=False),
    sa.Column("last_fill_time", sa.BigInteger(), nullable=False),
    sa.Column("notional_usd", ExactDecimal(), nullable=False),
    sa.Column("position_before", ExactDecimal(), nullable=True),
    sa.Column("position_after", ExactDecimal(), nullable=True),
    sa.Column("full_close", sa.Boolean(), nullable=False),
    sa.Column("liquidation", JsonText(), nullable=True),
    sa.Column("backfilled", sa.Boolean(), nullable=False),
    sa.Column("lateness_ms", sa.BigInteger(), nullable=True),
    sa.Column("label", sa.String(LABEL_LEN), nullable=True),
    sa.Column("detected_at", sa.BigInteger(), nullable=False),
    sa.Column("detected_by", sa.String(INSTANCE_LEN), nullable=True),
    sa.Column("payload", JsonText(), nullable=False),  # the exact JSON published, so a re-publish is byte-identical
    # The outbox's flag: nothing left to send. A suppressed signal is stored with it set (and `published_at`
    # NULL: it never went out), so the store scan never picks it up.
    sa.Column("published", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("published_at", sa.BigInteger(), nullable=True),
    sa.Column("created_at", sa.BigInteger(), nullable=False, index=True),
    sa.Column("suppressed", sa.Boolean(), nullable=False, server_default=sa.false()),  # a filter kept it back
    sa.Column("suppressed_reason", sa.String(REASON_LEN), nullable=True),
    sa.Index(None, "published", "id"),
)

# Positions whose open signal was published, per (address, coin): their closes are never suppressed, so a
# consumer is never left holding a position it was told about. A row appears with the first published open
# and goes with the close that ends the position; written with the signals, in the same transaction.
signal_holdings: Final = sa.Table(
    "hlm_signal_holdings",
    metadata,
    sa.Column("address", sa.String(ADDRESS_LEN), primary_key=True),
    sa.Column("coin", sa.String(COIN_LEN), primary_key=True),
    sa.Column("signal_id", sa.String(SIGNAL_ID_LEN), nullable=False),  # the published open that started it
    sa.Column("updated_at", sa.BigInteger(), nullable=False),
)

# Per-address fill high-water mark (the engine's JSON: time and tid), for gap backfill after a restart.
watermarks: Final = sa.Table(
    "hlm_watermarks",
    metadata,
    sa.Column("address", sa.String(ADDRESS_LEN), primary_key=True),
    sa.Column("payload", JsonText(), nullable=False),
    sa.Column("updated_at", sa.BigInteger(), nullable=False),
)

# Who runs as which instance when several hosts share this database: the holder renews `expires_at` (epoch ms)
# while it runs; a row past it belongs to a crashed holder and may be taken over (hl_monitor/ops/lease.py).
instance_leases: Final = sa.Table(
    "hlm_instance_leases",
    metadata,
    sa.Column("instance_id", sa.String(LEASE_KEY_LEN), primary_key=True),
    sa.Column("holder", sa.String(INSTANCE_LEN), nullable=False),  # "pid N on host": named in the refusal
    sa.Column("token", sa.String(LEASE_TOKEN_LEN), nullable=False),  # random per process: whose lease it is
    sa.Column("acquired_at", sa.BigInteger(), nullable=False),
    sa.Column("renewed_at", sa.BigInteger(), nullable=False),
    sa.Column("expires_at", sa.BigInteger(), nullable=False),
)

# ---- tables owned by other services: read only, never created or migrated here ----

legacy_active_addresses: Final = sa.table(
    "hl_active_addresses",
    sa.column("server_id", sa.Integer()),
    sa.column("address", sa.String()),
)

legacy_pair_configs: Final = sa.table(
    "pair_configs",
    sa.column("symbol", sa.String()),
    sa.column("platform", sa.String()),
    sa.column("category", sa.Integer()),
)

# ---- the old service's tables, kept up to date only with `database.legacy_tables` (README "Legacy tables") ----
# Their own MetaData: created by migration 0005 or `hl-monitor db upgrade` only when the option is on, never
# required otherwise, and not part of the service's schema. Shapes as the old readers know them; where the old
# types overflowed (decimal(18,8) sizes, varchar(16) directions) these are wider, which no reader notices.

LEGACY_TEXT_LEN: Final = 80  # the old varchar(32) money strings, wide enough for exact decimals


class LegacyJson(sa.types.TypeDecorator[str]):
    """Already-encoded JSON text in a JSON column (MySQL/MariaDB), or text (SQLite). Decimals inside are strings, so
    MySQL's JSON type keeps them exact."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.JSON())
        return dialect.type_descriptor(sa.Text())


legacy_metadata: Final = sa.MetaData()

legacy_address_signal: Final = sa.Table(
    "hl_address_signal",
    legacy_metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("address", sa.String(ADDRESS_LEN), nullable=False, index=True),
    sa.Column("symbol", sa.String(COIN_LEN), nullable=False, index=True),
    sa.Column("asset_type", sa.String(SHORT_LEN), nullable=False, index=True),
    sa.Column("direction", sa.String(SHORT_LEN), nullable=False),
    sa.Column("side", sa.String(SHORT_LEN), nullable=False),
    sa.Column("position_size", sa.String(SHORT_LEN), nullable=False),
    sa.Column("size", ExactDecimal(), nullable=False),
    sa.Column("price", ExactDecimal(), nullable=False),
    sa.Column("close_rate", ExactDecimal(), nullable=False),
    sa.Column("created_at", PreciseDateTime, nullable=False, index=True),  # UTC
)

legacy_position_cache: Final = sa.Table(
    "hl_position_cache",
    legacy_metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("address", sa.String(ADDRESS_LEN), nullable=False, unique=True),
    sa.Column("spot_balances", LegacyJson(), nullable=False),
    sa.Column("spot_total_usd", sa.String(LEGACY_TEXT_LEN), nullable=False, server_default="0"),
    sa.Column("futures_positions", LegacyJson(), nullable=False),
    sa.Column("account_value", sa.String(LEGACY_TEXT_LEN), nullable=False, server_default="0"),
    sa.Column("total_margin_used", sa.String(LEGACY_TEXT_LEN), nullable=False, server_default="0"),
    sa.Column("total_ntl_pos", sa.String(LEGACY_TEXT_LEN), nullable=False, server_default="0"),
    sa.Column("withdrawable", sa.String(LEGACY_TEXT_LEN), nullable=False, server_default="0"),
    sa.Column("updated_at", PreciseDateTime, nullable=False, index=True),  # UTC
)

legacy_order_aggregation: Final = sa.Table(
    "hl_order_aggregation",
    legacy_metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("oid", sa.BigInteger(), nullable=False),
    sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
    sa.Column("direction", sa.String(DIR_LEN), nullable=False),
    sa.Column("symbol", sa.String(COIN_LEN), nullable=False),
    sa.Column("fills", LegacyJson(), nullable=False),
    sa.Column("total_size", ExactDecimal(), nullable=False),
    sa.Column("weighted_avg_px", ExactDecimal(), nullable=False),
    sa.Column("order_status", sa.String(STATUS_LEN), nullable=False),
    sa.Column("last_fill_time", sa.BigInteger(), nullable=False, index=True),
    sa.Column("signal_sent", sa.Boolean(), nullable=False, server_default=sa.false(), index=True),
    sa.Column("created_at", PreciseDateTime, nullable=False),  # UTC
    sa.Column("updated_at", PreciseDateTime, nullable=False, index=True),  # UTC
    sa.UniqueConstraint("address", "oid", "direction", name="uidx_addr_oid_dir"),
)

# The old README's address table (read only, never created here): `is_active` rows are watched. Teams that have
# the old service's GORM shape (`nickname`, `deleted_at`) are read too (`storage.repository.LegacyAddressTable`).
LEGACY_WATCH_ADDRESSES: Final = "hl_watch_addresses"
