"""Alembic, driven from code: the migrations ship inside the wheel, so `hl-monitor db upgrade` works from any cwd.

Migrations run on a synchronous driver (pymysql / pysqlite) in a worker thread, as Alembic's maintainer
advises; the service itself only checks that the schema is at head and refuses to start otherwise.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Final

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.errors import SchemaOutdatedError, StorageError
from hl_monitor.storage.tables import VERSION_TABLE

# The Alembic scripts live in the repository's top-level `migrations/`; the wheel ships them as
# `hl_monitor/migrations` (pyproject's force-include), so an installed service and the Docker image find them
# beside the package, and a source checkout finds them at the top.
_PACKAGED_MIGRATIONS: Final = Path(__file__).parents[1] / "migrations"
MIGRATIONS_DIR: Final = (
    _PACKAGED_MIGRATIONS if _PACKAGED_MIGRATIONS.is_dir() else Path(__file__).parents[2] / "migrations"
)

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


async def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (default: the newest)."""
    ensure_sqlite_dir(url)
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)


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
