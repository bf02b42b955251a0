"""Composition root: the wiring diagram. Build every component once, in order; run them; shut down in order.

Build order (each step may use only what was built before it; docs/architecture.md §6):
instance lock → database (schema must be current) and instance lease → NATS (embedded or external) and the
stream → writer, outbox and the one signal sink (with `fills.enabled` the fills stream, its outbox and the
fills sink) → budgets and the REST client → symbols → tracking engine
and the owner of its watch set → address book → cluster (nats mode) → wide tier → precise tier → HTTP.

Every resource is entered on one `AsyncExitStack`, so its release runs in reverse order whatever fails.
The run's shutdown (SIGTERM/SIGINT), within `service.shutdown_timeout`: stop intake (feeds, address book,
planner, cluster) → hand leases over → the tape's and the engine's last flush, every pending aggregation and
watermark persisted → drain the outbox (publish what is held) → drain the writer → then the stack: HTTP,
REST client, NATS, embedded server, lease, database, lock. Anything unacknowledged stays in the outbox table
and is re-published (deduplicated by JetStream) at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from hl_monitor import __version__
from hl_monitor.cluster.discovery import DiscoveryPart, open_discovery
from hl_monitor.cluster.leases import Cluster
from hl_monitor.cluster.views import ExcludingView
from hl_monitor.config import Config
from hl_monitor.delivery.embedded_nats import EmbeddedNats
from hl_monitor.delivery.fills import FillSinkImpl, open_fills
from hl_monitor.delivery.outbox import Outbox
from hl_monitor.delivery.publications import PublicationOutbox
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.delivery.sink import Sink
from hl_monitor.domain.address import AddressView
from hl_monitor.domain.signal import Signal
from hl_monitor.errors import DeliveryError, StorageError
from hl_monitor.feeds.addresses import AddressBook, AddressDiff, StaticSource
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.holdings import NO_HOLDINGS, HoldingsIntake
from hl_monitor.feeds.marks import MarkFeed
from hl_monitor.feeds.precise import PreciseManager
from hl_monitor.feeds.symbols import SymbolLoader
from hl_monitor.hyperliquid.info import InfoClient
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.ops.console import ConsoleDeps, LiveFeed
from hl_monitor.ops.http import HttpServer, create_app
from hl_monitor.ops.metrics import StatsExporter, service_exporter
from hl_monitor.ops.process import InstanceLock, LoopWatchdog
from hl_monitor.ops.status import Admin, DatabaseProbe, StatusView
from hl_monitor.storage.cleaner import RetentionCleaner
from hl_monitor.storage.lease import InstanceLease
from hl_monitor.storage.migrate import check_legacy_tables, check_schema
from hl_monitor.storage.repository import (
    AddressTable,
    Repository,
    address_source,
    create_engine,
    load_pair_categories,
)
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tasks import cancel_and_wait, first_of
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.tape import TapeTracker
from hl_monitor.watch.planner import TierPlanner
from hl_monitor.watch.positions import PositionKeeper, PositionsTier, open_positions
from hl_monitor.watch.tiers import WideTier, build_wide_tier
from hl_monitor.watch.watchset import WatchSet

__all__ = ["Components", "Service", "build", "serve"]

log = get_logger(__name__)

# Share of the shutdown deadline given to publishing what the outbox holds; the rest is for the writer/NATS.
OUTBOX_DRAIN_SHARE: Final = 0.5
# How long `run` waits for an external NATS at start before giving up with a clear error.
NATS_CONNECT_WAIT_S: Final = 30.0


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


class Service:
    """The running service. `run(stop)` returns after an orderly shutdown; `components` once it is built."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.metrics.build_info.labels(__version__).set(1)
        self.ready_event = asyncio.Event()
        self._components: Components | None = None

    @property
    def components(self) -> Components:
        if self._components is None:
            raise RuntimeError("the service is not built yet: wait for `ready_event`")
        return self._components

    async def run(self, stop: asyncio.Event) -> None:
        async with AsyncExitStack() as stack:
            c = self._components = await build(self.cfg, self.metrics, stack)
            await serve(c, stop, self.ready_event)


async def build(cfg: Config, metrics: Metrics, stack: AsyncExitStack) -> Components:
    """Build every component, in order; each resource's release is pushed on `stack`."""
    stack.enter_context(InstanceLock(Path(cfg.service.data_dir), cfg.instance_id))
    db = create_engine(cfg)
    stack.push_async_callback(db.dispose)
    await check_schema(db)
    if cfg.database.legacy_tables:
        await check_legacy_tables(db)
    lease: InstanceLease | None = None
    if db.dialect.name != "sqlite":  # a shared database: the data-dir lock alone cannot see other hosts
        lease = InstanceLease.from_config(db, cfg, metrics)
        await lease.acquire()
        stack.push_async_callback(_quietly(lease.release, StorageError, OSError))
    repo = Repository(db)

    embedded: EmbeddedNats | None = None
    if cfg.nats.url == "embedded":
        embedded = EmbeddedNats(cfg.nats, metrics)
        await embedded.start()
        stack.push_async_callback(embedded.stop)
    publisher = Publisher(cfg.nats, cfg.signals, metrics, url=embedded.url if embedded is not None else None)
    await publisher.connect(wait=NATS_CONNECT_WAIT_S)
    stack.push_async_callback(_quietly(publisher.close, DeliveryError))
    await publisher.ensure_stream()

    writer = BatchWriter(
        db,
        cfg.writer,
        metrics,
        legacy_tables=cfg.database.legacy_tables,
        symbol_of=lambda coin: engine.symbols.lookup(coin).symbol,
    )
    # The console's live feed: acknowledged signals fan out to open browsers; a slow one loses events (counted).
    feed = LiveFeed(on_drop=metrics.evictions.labels(kind="console_event").inc)
    outbox = Outbox(publisher, repo, writer, metrics, cfg.nats, on_published=feed.signal)
    fills_outbox: PublicationOutbox | None = None
    fill_sink: FillSinkImpl | None = None
    if cfg.fills.enabled:
        fills_outbox, fill_sink = await open_fills(publisher, cfg.nats, cfg.fills, repo, writer, metrics)
    keeper: PositionKeeper | None = None
    if cfg.positions.enabled:
        keeper, positions_outbox, kv = await open_positions(
            cfg,
            publisher,
            repo,
            writer,
            metrics,
            tracked_wide=lambda address: tape_tracker is not None and tape_tracker.owner(address) == "wide",
            labels=lambda address: _label(book, address),
        )
    holdings: HoldingsIntake = keeper if keeper is not None else NO_HOLDINGS
    sink = Sink(
        writer,
        outbox,
        metrics,
        instance_id=cfg.instance_id,
        positions=keeper,
        signals=cfg.signals,
        addresses=lambda address: book.entry(address),
        holdings=writer,
    )
    await sink.restore(repo)
    budgets = Budgets(cfg.hyperliquid, metrics)
    info = await stack.enter_async_context(InfoClient.from_config(cfg.hyperliquid, budgets, metrics))

    engine = TrackingEngine(
        cfg.aggregation, SymbolMap.empty(), instance_id=cfg.instance_id, collect_fills=fill_sink is not None
    )
    clustered = cfg.cluster.mode == "nats"
    watch = WatchSet(
        engine,
        sink,
        writer,
        repo,
        clustered=clustered,
        tick_interval=min(cfg.aggregation.scan_interval, cfg.writer.flush_interval),
        flushed_ttl=cfg.aggregation.flushed_ttl,
    )
    if not clustered:  # cluster: each address's state is imported when its lease is won
        await watch.restore()

    table = address_source(db, cfg)
    book = AddressBook(
        [table, StaticSource(cfg.addresses.initial)],
        metrics,
        reload_interval=cfg.addresses.reload_interval,
        remove_grace=cfg.addresses.remove_grace,
        server_id=cfg.addresses.server_id,
        on_change=lambda diff: _on_book_change(watch, keeper, book, metrics, diff),
    )

    precise_view: AddressView = book
    planner_view: AddressView = book
    cluster: Cluster | None = None
    if clustered:
        cluster = Cluster(
            cfg.cluster,
            book,
            publisher.client,
            watch,
            metrics,
            member_id=cfg.instance_id,
            precise_slots=cfg.hyperliquid.user_slots,
            server_id=cfg.addresses.server_id,
            http=cfg.http.listen,
            is_running=lambda address: address in precise.assigned(),
            kv_replicas=cfg.nats.kv_replicas,
        )
        precise_view = cluster.owned()
        planner_view = ExcludingView(book, cluster)

    tape_tracker: TapeTracker | None = None
    if cfg.wide.enabled and (not clustered or cfg.cluster.tape_role == "active"):
        tape_tracker = TapeTracker(
            engine.symbols,
            block_settle_ms=round(cfg.wide.block_settle * 1000),
            hold_ms=round(cfg.wide.handover_hold * 1000),
            instance_id=cfg.instance_id,
            collect_fills=fill_sink is not None,
        )

    def set_symbols(symbols: SymbolMap) -> None:
        engine.set_symbols(symbols)
        if tape_tracker is not None:
            tape_tracker.set_symbols(symbols)
        if keeper is not None:
            keeper.model.set_symbols(symbols)

    symbols = SymbolLoader(
        info, cfg.symbols, metrics, categories=lambda: load_pair_categories(db), on_update=set_symbols
    )
    engine.on_unknown_coin = symbols.request_reload
    await symbols.load()  # a failed load keeps going (retried, counted)
    mark_dexes = sorted(engine.symbols.dexes)
    positions: PositionsTier | None = None
    if keeper is not None:
        # Marks ride on the tape's first connection; without a tape they need a connection of their own.
        marks: MarkFeed | None = None
        if tape_tracker is None and cfg.hyperliquid.user_slots < cfg.hyperliquid.max_connections:
            marks = MarkFeed(cfg.hyperliquid, intake=keeper, budget=budgets, metrics=metrics, dexes=mark_dexes)
        elif tape_tracker is None:
            log.warning("every connection is a precise slot: marks move only with state frames")
        positions = PositionsTier(keeper=keeper, marks=marks, outbox=positions_outbox, kv=kv)

    planner: TierPlanner | None = None
    precise = PreciseManager(
        cfg.hyperliquid,
        precise_view,
        tracker=engine,
        info=info,
        budget=budgets,
        metrics=metrics,
        on_signals=sink,
        on_unassigned=None if tape_tracker is None else lambda addresses: _unassigned(planner, addresses),
        holdings=holdings,
        on_fills=fill_sink,
    )
    wide_tier: WideTier | None = None
    discovery = open_discovery(cfg, tape_tracker is not None, info, metrics, book, table, publisher, repo, writer)
    if tape_tracker is not None:
        wide_tier = build_wide_tier(
            cfg,
            tape_tracker,
            info=info,
            budgets=budgets,
            metrics=metrics,
            sink=sink,
            holdings=holdings,
            fills=fill_sink,
            discovery=discovery,
            marks=keeper,
            mark_dexes=mark_dexes,
            view=planner_view,
            watch=watch,
            precise=precise,
        )
        planner = wide_tier.planner

    database = DatabaseProbe(repo)
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
    )
    admin = Admin(AddressTable(db), book) if isinstance(table, AddressTable) else None
    console = ConsoleDeps(
        feed=feed,
        history=lambda address, limit: repo.list_position_events(address, limit),
        recent_signals=lambda limit: _newest_signals(repo, limit),
        fills_enabled=cfg.fills.enabled,
    )
    http = HttpServer(
        create_app(
            status,
            metrics,
            admin,
            cfg.http,
            positions=keeper,
            discovery=discovery,
            console=console,
            ui=cfg.ui,
        ),
        cfg.http.listen,
    )
    await http.start()
    stack.push_async_callback(http.stop)
    return Components(
        cfg=cfg,
        metrics=metrics,
        repo=repo,
        publisher=publisher,
        writer=writer,
        outbox=outbox,
        sink=sink,
        budgets=budgets,
        engine=engine,
        watch=watch,
        book=book,
        symbols=symbols,
        precise=precise,
        status=status,
        database=database,
        exporter=service_exporter(metrics, engine, tape_tracker, book, writer, keeper),
        cleaner=RetentionCleaner(
            db,
            cfg.retention,
            metrics,
            fills_retention=cfg.nats.duplicate_window,
            legacy_tables=cfg.database.legacy_tables,
            replay_window=cfg.nats.replay_window,
        ),
        http=http,
        wide_tier=wide_tier,
        positions=positions,
        fills_outbox=fills_outbox,
        cluster=cluster,
        lease=lease,
        embedded=embedded,
        discovery=discovery,
    )


async def _newest_signals(repo: Repository, limit: int) -> list[Signal]:
    """Stored signals newest first (the console's last signal per address after a restart)."""
    return [stored.signal for stored in reversed(await repo.list_signals(limit=limit))]


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


async def _on_book_change(
    watch: WatchSet, keeper: PositionKeeper | None, book: AddressBook, metrics: Metrics, diff: AddressDiff
) -> None:
    await watch.on_book_change(diff, book.entries())
    if keeper is not None:
        await keeper.forget(diff.removed)
    metrics.addresses_subscribed.set(len(book.entries()))


def _label(book: AddressBook, address: str) -> str:
    entry = book.entries().get(address)
    return entry.label if entry is not None else ""


async def _unassigned(planner: TierPlanner | None, addresses: frozenset[str]) -> None:
    if planner is not None:
        await planner.on_unassigned(addresses)


def _quietly(close: Callable[[], Awaitable[None]], *errors: type[BaseException]) -> Callable[[], Awaitable[None]]:
    """A release step whose expected failures (the peer is already gone) must not mask the real exit reason."""

    async def run() -> None:
        with contextlib.suppress(*errors):
            await close()

    return run
