"""Opening the database for a running service: the engine, the schema check and, on a shared database, the
instance lease (docs/architecture.md §6, start-up step 2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.config import Config
from hl_monitor.errors import StorageError
from hl_monitor.metrics import Metrics
from hl_monitor.storage.lease import InstanceLease
from hl_monitor.storage.migrate import check_legacy_tables, check_schema
from hl_monitor.storage.repository import create_engine
from hl_monitor.tasks import quietly

__all__ = ["open_database"]


@asynccontextmanager
async def open_database(cfg: Config, metrics: Metrics) -> AsyncIterator[tuple[AsyncEngine, InstanceLease | None]]:
    """The engine (the schema must be current) and the instance lease when the database is shared (not SQLite);
    on exit the lease is released, then the engine disposed."""
    async with AsyncExitStack() as stack:
        db = create_engine(cfg)
        stack.push_async_callback(db.dispose)
        await check_schema(db)
        if cfg.database.legacy_tables:
            await check_legacy_tables(db)
        lease: InstanceLease | None = None
        if db.dialect.name != "sqlite":  # a shared database: the data-dir lock alone cannot see other hosts
            lease = InstanceLease.from_config(db, cfg, metrics)
            await lease.acquire()
            stack.push_async_callback(quietly(lease.release, StorageError, OSError))
        yield db, lease
