"""Running the built service: every component's task in its group (background, intake), readiness, and the
ordered shutdown within `service.shutdown_timeout` (docs/architecture.md §6).

`Components` is what the composition root (`hl_monitor.app.build`) made, each exactly once; `serve` runs it until
`stop` and then: stop intake → hand leases over → the tape's and the engine's last flush → drain the outboxes →
close the writer → stop the background tasks. The caller's exit stack releases the rest.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final

from hl_monitor.cluster.discovery import DiscoveryPart
from hl_monitor.cluster.leases import Cluster
from hl_monitor.config import Config
from hl_monitor.delivery.embedded_nats import EmbeddedNats
from hl_monitor.delivery.outbox import Outbox
from hl_monitor.delivery.publications import PublicationOutbox
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.delivery.sink import Sink
from hl_monitor.feeds.addresses import AddressBook
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.precise import PreciseManager
from hl_monitor.feeds.symbols import SymbolLoader
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.ops.http import HttpServer
from hl_monitor.ops.metrics import StatsExporter
from hl_monitor.ops.process import LoopWatchdog
from hl_monitor.ops.status import DatabaseProbe, StatusView
from hl_monitor.storage.cleaner import RetentionCleaner
from hl_monitor.storage.lease import InstanceLease
from hl_monitor.storage.repository import Repository
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tasks import cancel_and_wait, first_of
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.watch.positions import PositionsTier
from hl_monitor.watch.tiers import WideTier
from hl_monitor.watch.watchset import WatchSet

__all__ = ["OUTBOX_DRAIN_SHARE", "Components", "serve"]

log = get_logger(__name__)

# Share of the shutdown deadline given to publishing what the outbox holds; the rest is for the writer/NATS.
OUTBOX_DRAIN_SHARE: Final = 0.5


@dataclass(frozen=True, slots=True)
class Components:
    """Everything `build` made, each exactly once. `None` only where the config turns a whole part off."""

    cfg: Config
    metrics: Metrics
    repo: Repository
    publisher: Publisher
    writer: BatchWriter
    outbox: Outbox
    sink: Sink
    budgets: Budgets
    engine: TrackingEngine
    watch: WatchSet
    book: AddressBook
    symbols: SymbolLoader
    precise: PreciseManager
    status: StatusView
    database: DatabaseProbe
    exporter: StatsExporter
    cleaner: RetentionCleaner
    http: HttpServer
    wide_tier: WideTier | None  # wide.enabled, and the tape role in cluster mode
    positions: PositionsTier | None  # positions.enabled
    fills_outbox: PublicationOutbox | None  # fills.enabled
    cluster: Cluster | None  # cluster.mode = "nats"
    lease: InstanceLease | None  # a shared database (not SQLite)
    embedded: EmbeddedNats | None  # nats.url = "embedded"
    discovery: DiscoveryPart | None = None  # discovery.enabled, with a tape


async def serve(c: Components, stop: asyncio.Event, ready: asyncio.Event) -> None:
    """Run every component until `stop`, then the ordered shutdown (see the module docstring)."""
    async with asyncio.TaskGroup() as tg:

        def start(name: str, aw: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
            return tg.create_task(aw, name=name)

        background = [
            start("writer", c.writer.run()),
            start("outbox", c.outbox.run()),
            start("watchdog", LoopWatchdog(c.metrics).run()),
            start("cleaner", c.cleaner.run()),
            start("db-probe", c.database.run()),
            start("stats", c.exporter.run()),
        ]
        if c.positions is not None:
            background += [
                start("positions-outbox", c.positions.outbox.run()),
                start("positions-kv", c.positions.kv.run()),
                start("positions", c.positions.keeper.run()),
            ]
        if c.fills_outbox is not None:
            background.append(start("fills-outbox", c.fills_outbox.run()))
        if c.embedded is not None:
            background.append(start("embedded-nats", c.embedded.run()))
        if c.lease is not None:
            background.append(start("instance-lease", c.lease.run()))
        intake = [start("address-book", c.book.run()), start("symbols", c.symbols.run())]
        await first_of(c.book.wait_loaded(), stop.wait())
        intake.append(start("precise", c.precise.run()))
        if c.wide_tier is not None:
            intake += [
                start("planner", c.wide_tier.planner.run()),
                start("tape", c.wide_tier.tape.run()),
                start("wide", c.wide_tier.wide.run()),
            ]
        if c.cluster is not None:
            intake.append(start("cluster", c.cluster.run()))
        if c.discovery is not None:
            intake.append(start("discovery", c.discovery.run()))
        if c.positions is not None and c.positions.marks is not None:
            intake.append(start("marks", c.positions.marks.run()))
        intake.append(start("tick", c.watch.run()))
        # Start-up objects (modules, SQLAlchemy, config, restored state) live as long as the process; frozen, the
        # collector's full passes no longer walk them (50-100 ms of event loop each, the latency tail). No
        # `gc.collect()` first: in a big process it is itself such a pause.
        gc.freeze()
        ready.set()
        c.status.ready.set()
        log.info("service ready", listen=c.cfg.http.listen, addresses=len(c.book.entries()))
        await stop.wait()
        log.info("shutdown: stopping intake")
        ready.clear()
        c.status.ready.clear()
        await cancel_and_wait(intake)
        if c.cluster is not None:  # hand leases over (state persisted) before draining
            await c.cluster.leave()
        await _drain(c)
        await cancel_and_wait(background)


async def _drain(c: Components) -> None:
    """Everything after intake stopped; bounded by service.shutdown_timeout."""
    deadline = c.cfg.service.shutdown_timeout
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline):
            if c.wide_tier is not None:
                await c.wide_tier.tape.finish()
            await c.watch.finish()
            if c.positions is not None:
                await c.positions.keeper.flush_documents()
            left = await c.outbox.drain(deadline * OUTBOX_DRAIN_SHARE)
            if c.positions is not None:
                left += await c.positions.outbox.drain(deadline * OUTBOX_DRAIN_SHARE)
                await c.positions.kv.drain(deadline * OUTBOX_DRAIN_SHARE)
            if c.fills_outbox is not None:
                left += await c.fills_outbox.drain(deadline * OUTBOX_DRAIN_SHARE)
            await c.writer.close()
            log.info("shutdown: drained", unacknowledged=left, seconds=round(time.monotonic() - started, 2))
    except TimeoutError:
        log.error("shutdown deadline reached; unflushed rows are recovered at next start", deadline_s=deadline)
