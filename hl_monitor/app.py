"""Composition root: the wiring diagram. Build every component once, in order; run them; shut down in order.

Build order (each step may use only what was built before it; docs/architecture.md §6):
instance lock → database (schema must be current) and instance lease → NATS (embedded or external) and the
stream → writer, outbox and the one signal sink (with `fills.enabled` the fills stream, its outbox and the
fills sink) → budgets and the REST client → symbols → tracking engine
and the owner of its watch set → address book → cluster (nats mode) → wide tier → precise tier → HTTP.

Every resource is entered on one `AsyncExitStack`, so its release runs in reverse order whatever fails.
The run (`ops/runner.py`) and its shutdown (SIGTERM/SIGINT), within `service.shutdown_timeout`: stop intake
(feeds, address book, planner, cluster) → hand leases over → the tape's and the engine's last flush, every
pending aggregation and watermark persisted → drain the outbox (publish what is held) → drain the writer → then
the stack: HTTP, REST client, NATS, embedded server, lease, database, lock. Anything unacknowledged stays in the
outbox table and is re-published (deduplicated by JetStream) at the next start.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

from hl_monitor import __version__
from hl_monitor.cluster.discovery import open_discovery
from hl_monitor.cluster.leases import Cluster
from hl_monitor.cluster.views import ExcludingView
from hl_monitor.config import Config
from hl_monitor.delivery.fills import FillSinkImpl, open_fills
from hl_monitor.delivery.outbox import Outbox
from hl_monitor.delivery.publications import PublicationOutbox
from hl_monitor.delivery.publisher import open_publisher
from hl_monitor.delivery.sink import Sink
from hl_monitor.domain.address import AddressView
from hl_monitor.feeds.addresses import AddressBook, AddressDiff, StaticSource
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.holdings import NO_HOLDINGS, HoldingsIntake
from hl_monitor.feeds.precise import PreciseManager
from hl_monitor.feeds.symbols import SymbolLoader
from hl_monitor.hyperliquid.info import InfoClient
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.metrics import Metrics
from hl_monitor.ops.console import LiveFeed
from hl_monitor.ops.metrics import service_exporter
from hl_monitor.ops.process import InstanceLock
from hl_monitor.ops.runner import Components, serve
from hl_monitor.ops.surface import open_surface
from hl_monitor.storage.cleaner import RetentionCleaner
from hl_monitor.storage.database import open_database
from hl_monitor.storage.repository import Repository, address_source, load_pair_categories
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.watch.planner import TierPlanner
from hl_monitor.watch.positions import PositionKeeper, PositionsTier, open_positions, positions_tier
from hl_monitor.watch.tiers import WideTier, build_tape_tracker, build_wide_tier
from hl_monitor.watch.watchset import WatchSet

__all__ = ["Components", "Service", "build", "serve"]


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
    db, lease = await stack.enter_async_context(open_database(cfg, metrics))
    repo = Repository(db)

    publisher, embedded = await stack.enter_async_context(open_publisher(cfg.nats, cfg.signals, metrics))

    writer = BatchWriter(
        db,
        cfg.writer,
        metrics,
        legacy_tables=cfg.database.legacy_tables,
        symbol_of=lambda coin: engine.symbols.lookup(coin).symbol,
        database=cfg.database,
    )
    # The console's live feed: acknowledged signals fan out to open browsers; a slow one loses events (counted).
    feed = LiveFeed(on_drop=metrics.evictions.labels(kind="console_event").inc)
    outbox = Outbox(publisher, repo, writer, metrics, cfg.nats, on_published=feed.signal)
    fills_outbox: PublicationOutbox | None = None
    fill_sink: FillSinkImpl | None = None
    if cfg.fills.enabled:
        fills_outbox, fill_sink = await open_fills(
            publisher, cfg.nats, cfg.fills, repo, writer, metrics, on_published=feed.publication
        )
    keeper: PositionKeeper | None = None
    if cfg.positions.enabled:
        keeper, positions_outbox, kv = await open_positions(
            cfg,
            publisher,
            repo,
            writer,
            metrics,
            tracked_wide=lambda address: tape_tracker is not None and tape_tracker.owner(address) == "wide",
            labels=lambda address: book.label(address),
            on_published=feed.publication,
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
    watch = WatchSet.from_config(cfg, engine, sink, writer, repo)
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
        cluster = Cluster.from_config(
            cfg, book, publisher.client, watch, metrics, is_running=lambda address: address in precise.assigned()
        )
        precise_view = cluster.owned()
        planner_view = ExcludingView(book, cluster)

    tape_tracker = build_tape_tracker(cfg, engine.symbols, collect_fills=fill_sink is not None)

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
        positions = positions_tier(
            cfg,
            keeper,
            positions_outbox,
            kv,
            with_tape=tape_tracker is not None,
            budget=budgets,
            metrics=metrics,
            mark_dexes=mark_dexes,
        )

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

    surface = await stack.enter_async_context(
        open_surface(
            cfg,
            metrics,
            feed=feed,
            table=table,
            publisher=publisher,
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
            discovery=discovery,
            fills_outbox=fills_outbox,
        )
    )
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
        status=surface.status,
        database=surface.database,
        exporter=service_exporter(metrics, engine, tape_tracker, book, writer, keeper),
        cleaner=RetentionCleaner.from_config(db, cfg, metrics),
        http=surface.http,
        wide_tier=wide_tier,
        positions=positions,
        fills_outbox=fills_outbox,
        cluster=cluster,
        lease=lease,
        embedded=embedded,
        discovery=discovery,
    )


async def _on_book_change(
    watch: WatchSet, keeper: PositionKeeper | None, book: AddressBook, metrics: Metrics, diff: AddressDiff
) -> None:
    await watch.on_book_change(diff, book.entries())
    if keeper is not None:
        await keeper.forget(diff.removed)
    metrics.addresses_subscribed.set(len(book.entries()))


async def _unassigned(planner: TierPlanner | None, addresses: frozenset[str]) -> None:
    if planner is not None:
        await planner.on_unassigned(addresses)
