"""Alembic, driven from code: the migrations ship inside the wheel, so `hl-monitor db upgrade` works from any cwd.

Migrations run on a synchronous driver (pymysql / pysqlite) in a worker thread, as Alembic's maintainer
advises; the service itself only checks that the schema is at head and refuses to start otherwise.

The old service's tables (`tables.legacy_metadata`) are created only with `database.legacy_tables`: revision 0005
creates the missing ones when `upgrade(..., legacy_tables=True)` says so, and the same call creates them at head
when the option was turned on after 0005 ran. With the option on, the service refuses to start without them
(`check_legacy_tables`) rather than retry writes into a missing table forever.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Final

import sqlalchemy as sa
from alembic import command, context
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.errors import SchemaOutdatedError, StorageError
from hl_monitor.storage.tables import VERSION_TABLE, legacy_metadata

# The Alembic scripts live in the repository's top-level `migrations/`; the wheel ships them as
# `hl_monitor/migrations` (pyproject's force-include), so an installed service and the Docker image find them
# beside the package, and a source checkout finds them at the top.
_PACKAGED_MIGRATIONS: Final = Path(__file__).parents[1] / "migrations"
MIGRATIONS_DIR: Final = (
    _PACKAGED_MIGRATIONS if _PACKAGED_MIGRATIONS.is_dir() else Path(__file__).parents[2] / "migrations"
)

# The Alembic attribute (and `-x` argument) that asks revision 0005 for the old service's tables.
LEGACY_TABLES_ATTRIBUTE: Final = "legacy_tables"
_TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})

# The async drivers the service uses, and the sync driver Alembic runs the same URL with.
_SYNC_DRIVERS: Final = {"mysql+aiomysql": "mysql+pymysql", "mysql": "mysql+pymysql", "sqlite+aiosqlite": "sqlite"}


def sync_url(url: str) -> str:
    """The same database on a synchronous driver (for Alembic)."""
    parsed = make_url(url)
    driver = _SYNC_DRIVERS.get(parsed.drivername, parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def ensure_sqlite_dir(url: str) -> None:
    """Create the directory of a SQLite file (the default lives in ./data, which may not exist yet)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def alembic_config(url: str) -> AlembicConfig:
    """An in-memory Alembic config pointing at the packaged migrations; the URL travels in `attributes`
    (not in the ini options) so a password with `%` survives ConfigParser interpolation."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = sync_url(url)
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:  # pragma: no cover - the package always ships at least one revision
        raise StorageError("no migrations found in the package")
    return head


def known_revisions() -> set[str]:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return {rev.revision for rev in script.walk_revisions()}


async def upgrade(url: str, revision: str = "head", *, legacy_tables: bool = False) -> None:
    """Apply migrations up to `revision` (default: the newest); with `legacy_tables` also the old service's tables."""
    ensure_sqlite_dir(url)
    cfg = alembic_config(url)
    cfg.attributes[LEGACY_TABLES_ATTRIBUTE] = legacy_tables
    await asyncio.to_thread(command.upgrade, cfg, revision)
    if legacy_tables and revision == "head":
        await asyncio.to_thread(_create_legacy_tables_at, url)


def legacy_tables_wanted() -> bool:
    """Inside a migration: whether this run asked for the old service's tables."""
    if context.config.attributes.get(LEGACY_TABLES_ATTRIBUTE):
        return True
    value = context.get_x_argument(as_dictionary=True).get(LEGACY_TABLES_ATTRIBUTE, "")
    return value.strip().lower() in _TRUE_WORDS


def create_legacy_tables(conn: Connection) -> None:
    """Create the old service's tables that are missing (existing ones, and their rows, are left as they are)."""
    legacy_metadata.create_all(conn, checkfirst=True)


def _create_legacy_tables_at(url: str) -> None:
    engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            create_legacy_tables(conn)
    finally:
        engine.dispose()


async def check_legacy_tables(engine: AsyncEngine) -> None:
    """Raise `StorageError` naming the old service's tables this database lacks (`database.legacy_tables` on)."""
    names = sorted(legacy_metadata.tables)
    async with engine.connect() as conn:
        present = await conn.run_sync(lambda sync: {n for n in names if sa.inspect(sync).has_table(n)})
    missing = [n for n in names if n not in present]
    if missing:
        raise StorageError(
            f"database.legacy_tables is on but {', '.join(missing)} missing: run `hl-monitor db upgrade` "
            "with the same config (or `--legacy-tables`)"
        )


def _current(conn: Connection) -> str | None:
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def check_schema(engine: AsyncEngine) -> None:
    """Raise `SchemaOutdatedError` unless the database is exactly at the code's head revision."""
    head = head_revision()
    current = await current_revision(engine)
    if current == head:
        return
    if current is not None and current not in known_revisions():
        raise StorageError(
            f"database schema is at revision {current}, which this version does not know "
            f"(it expects {head}); a newer hl-monitor has migrated this database: run that version"
        )
    raise SchemaOutdatedError(current, head)
