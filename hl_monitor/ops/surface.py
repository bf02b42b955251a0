"""The service's HTTP surface, built in one step: the status/readiness view, the database probe behind it, the
address admin (when the addresses live in a table), the console's sources, and the server itself.

`open_surface` starts the server and stops it on exit; every component it reads was built before it
(docs/architecture.md §6: HTTP is the last step of start-up and the first thing the stack releases).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from hl_monitor.cluster.discovery import DiscoveryPart
from hl_monitor.cluster.leases import Cluster
from hl_monitor.config import Config
from hl_monitor.delivery.outbox import Outbox
from hl_monitor.delivery.publications import PublicationOutbox
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.domain.signal import Signal
from hl_monitor.feeds.addresses import AddressBook, AddressSource
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.precise import PreciseManager
from hl_monitor.feeds.symbols import SymbolLoader
from hl_monitor.metrics import Metrics
from hl_monitor.ops.console import ConsoleDeps, LiveFeed
from hl_monitor.ops.http import HttpServer, create_app
from hl_monitor.ops.status import Admin, DatabaseProbe, StatusView
from hl_monitor.storage.repository import AddressTable, Repository
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.watch.positions import PositionsTier
from hl_monitor.watch.tiers import WideTier

__all__ = ["Surface", "open_surface"]


@dataclass(frozen=True, slots=True)
class Surface:
    """What the HTTP surface is made of; the service runs `database` and reports readiness through `status`."""

    status: StatusView
    database: DatabaseProbe
    http: HttpServer


@asynccontextmanager
async def open_surface(
    cfg: Config,
    metrics: Metrics,
    *,
    feed: LiveFeed,
    table: AddressSource,
    publisher: Publisher,
    repo: Repository,
    outbox: Outbox,
    writer: BatchWriter,
    budgets: Budgets,
    engine: TrackingEngine,
    book: AddressBook,
    symbols: SymbolLoader,
    precise: PreciseManager,
    wide_tier: WideTier | None,
    positions: PositionsTier | None,
    cluster: Cluster | None,
    discovery: DiscoveryPart | None,
    fills_outbox: PublicationOutbox | None,
) -> AsyncIterator[Surface]:
    """Build the status view and the HTTP app over the built components, serve it, and stop it on exit."""
    database = DatabaseProbe(repo)
    # Every relay that publishes: NATS is degraded when any of them waits for acks that do not come.
    optional_relays = (
        fills_outbox,
        positions.outbox if positions is not None else None,
        discovery.outbox if discovery is not None else None,
    )
    status = StatusView(
        instance_id=cfg.instance_id,
        cluster_mode=cfg.cluster.mode,
        publisher=publisher,
        database=database,
        repo=repo,
        outbox=outbox,
        writer=writer,
        budgets=budgets,
        engine=engine,
        book=book,
        symbols=symbols,
        precise=precise,
        wide_tier=wide_tier,
        positions=positions,
        cluster=cluster,
        relays=[outbox, *(r for r in optional_relays if r is not None)],
    )
    admin = Admin(table, book) if isinstance(table, AddressTable) else None
    console = ConsoleDeps(
        feed=feed,
        history=lambda address, limit: repo.list_position_events(address, limit),
        account_values=repo.list_account_values,
        recent_signals=lambda limit: _newest_signals(repo, limit),
        fills_enabled=cfg.fills.enabled,
    )
    http = HttpServer(
        create_app(
            status,
            metrics,
            admin,
            cfg.http,
            positions=positions.keeper if positions is not None else None,
            discovery=discovery,
            console=console,
            ui=cfg.ui,
        ),
        cfg.http.listen,
    )
    async with http:
        yield Surface(status=status, database=database, http=http)


async def _newest_signals(repo: Repository, limit: int) -> list[Signal]:
    """Stored signals newest first (the console's last signal per address after a restart)."""
    return [stored.signal for stored in reversed(await repo.list_signals(limit=limit))]
