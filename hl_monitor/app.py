"""Composition root: builds every component from the config and runs them under one TaskGroup.

Start order: instance lock → database (schema must be current) → NATS (embedded or external) and
the stream → writer and outbox → REST client and budgets → symbols → tracking engine (persisted
state re-imported) → address book → precise tier → HTTP.

Shutdown order (SIGTERM/SIGINT), within `service.shutdown_timeout`: stop intake (feeds, address
book) → flush aggregations that are due and persist the rest → drain the outbox (publish what is
held) → drain the writer → drain NATS → stop the embedded server → dispose the database engine →
stop HTTP → release the lock. Anything unacknowledged stays in the outbox table and is re-published
(deduplicated by JetStream) at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor import __version__
from hl_monitor.clock import wall_ms as now_ms
from hl_monitor.config import Config
from hl_monitor.delivery.embedded_nats import EmbeddedNats
from hl_monitor.delivery.outbox import Outbox
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.errors import DeliveryError, StorageError
from hl_monitor.feeds.addresses import AddressBook, AddressDiff, StaticSource, WatchedAddress
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.cluster import Cluster, EngineHandover
from hl_monitor.feeds.market_tape import MarketTape
from hl_monitor.feeds.planner import TierPlanner
from hl_monitor.feeds.precise import AddressView, PreciseManager
from hl_monitor.feeds.symbols import SymbolLoader
from hl_monitor.feeds.wide import WideManager
from hl_monitor.hyperliquid.info import InfoClient
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.logging import configure_logging, get_logger
from hl_monitor.ops.http import AddressInput, HttpServer, Readiness, create_app
from hl_monitor.ops.lease import InstanceLease
from hl_monitor.ops.metrics import Metrics
from hl_monitor.ops.process import InstanceLock, LoopWatchdog
from hl_monitor.storage.cleaner import RetentionCleaner
from hl_monitor.storage.migrate import check_schema
from hl_monitor.storage.repository import AddressTable, Repository, address_source, create_engine
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.signals import Signal
from hl_monitor.tracking.tape import TapeTracker

log = get_logger(__name__)

# How often the database is probed for readiness; a failed writer flush also marks it down at once.
DB_PROBE_INTERVAL_S: Final = 5.0
# Engine counters are copied into Prometheus this often (cheap: a few dozen integers).
STATS_SYNC_INTERVAL_S: Final = 1.0
# Share of the shutdown deadline given to publishing what the outbox holds; the rest is for the writer/NATS.
OUTBOX_DRAIN_SHARE: Final = 0.5
# Signals shown by GET /addresses/{address}.
LAST_SIGNALS: Final = 20
# How long `run` waits for an external NATS at start before giving up with a clear error.
NATS_CONNECT_WAIT_S: Final = 30.0


class _CounterSync:
    """Copies the engine's plain monotonic counters into Prometheus counters by delta."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], int] = {}

    def inc(self, counter: Any, key: tuple[str, str], value: int, *labels: str) -> None:
        delta = value - self._last.get(key, 0)
        if delta > 0:
            (counter.labels(*labels) if labels else counter).inc(delta)
        self._last[key] = value


class Service:
    """The running service. `run(stop)` returns after an orderly shutdown."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.metrics.build_info.labels(__version__).set(1)
        self.started_at = time.monotonic()
        self.instance_id = cfg.instance_id
        self.db_ok = False
        self.db_error = "not checked yet"
        self._sync = _CounterSync()
        self._position_stamps: dict[str, tuple[int | None, int | None]] = {}
        # Filled in by run(); the HTTP view reads them.
        self.publisher: Publisher | None = None
        self.outbox: Outbox | None = None
        self.writer: BatchWriter | None = None
        self.engine: TrackingEngine | None = None
        self.book: AddressBook | None = None
        self.precise: PreciseManager | None = None
        self.cluster: Cluster | None = None  # cluster.mode = "nats" only
        self.budgets: Budgets | None = None
        self.tape: MarketTape | None = None
        self.tape_tracker: TapeTracker | None = None
        self.wide: WideManager | None = None
        self.planner: TierPlanner | None = None
        self.repo: Repository | None = None
        self.symbols: SymbolLoader | None = None
        self.lease: InstanceLease | None = None
        self.http: HttpServer | None = None
        self.ready_event = asyncio.Event()

    # ------------------------------------------------------------------ signal path

    async def on_signals(self, signals: Sequence[Signal]) -> None:
        """The one sink: persist first (the outbox row), then hand to the publisher; awaiting = backpressure."""
        assert self.writer is not None
        assert self.outbox is not None
        for sig in signals:
            stamped = sig if sig.detected_by else _with_instance(sig, self.instance_id)
            await self.writer.put_signal(stamped)
            await self.outbox.submit(stamped)
            self.metrics.signals_built.labels(stamped.source, stamped.direction).inc()
            self.metrics.order_fills_per_order.observe(stamped.fill_count)
            self.metrics.receive_to_signal_seconds.labels(stamped.trigger).observe(
                max(0.0, (now_ms() - stamped.detected_at) / 1000)
            )

    def _set_symbols(self, symbols: SymbolMap) -> None:
        if self.engine is not None:
            self.engine.set_symbols(symbols)
        if self.tape_tracker is not None:
            self.tape_tracker.set_symbols(symbols)

    async def _on_address_change(self, diff: AddressDiff) -> None:
        assert self.engine is not None
        entries = self.book.entries() if self.book is not None else {}
        for address in diff.added:
            entry = entries.get(address)
            self.engine.add_address(address, entry.label if entry is not None and entry.label else None)
        for address in diff.removed:
            # Pending orders of a removed address are flushed, not dropped: the whale really traded them.
            await self.on_signals(self.engine.flush_address(address, now_ms(), trigger="shutdown"))
            self.engine.remove_address(address)
        self.metrics.addresses_subscribed.set(len(entries))

    # ------------------------------------------------------------------ periodic tasks

    async def _tick_loop(self) -> None:
        """Timeouts since the last fill, TTL evictions, and persisting the engine's changed state."""
        assert self.engine is not None
        assert self.writer is not None
        interval = min(self.cfg.aggregation.scan_interval, self.cfg.writer.flush_interval)
        while True:
            await asyncio.sleep(interval)
            await self._tick_once()

    async def _tick_once(self) -> None:
        assert self.engine is not None
        assert self.writer is not None
        now = now_ms()
        signals = self.engine.tick(now)
        if self.tape_tracker is not None:
            signals.extend(self.tape_tracker.tick(now))
        if signals:
            await self.on_signals(signals)
        delta = self.engine.take_dirty()
        await self.writer.put_delta(delta)

    async def _db_probe_loop(self, repo: Repository) -> None:
        while True:
            try:
                async with asyncio.timeout(DB_PROBE_INTERVAL_S):
                    await repo.ping()
                self.db_ok, self.db_error = True, ""
            except (StorageError, OSError, TimeoutError, Exception) as exc:  # any failure = not reachable
                self.db_ok, self.db_error = False, f"{type(exc).__name__}: {exc}"[:200]
            await asyncio.sleep(DB_PROBE_INTERVAL_S)

    async def _stats_loop(self) -> None:
        while True:
            self._sync_stats()
            await self._persist_positions()
            await asyncio.sleep(STATS_SYNC_INTERVAL_S)

    async def _persist_positions(self) -> None:
        """Write the position cache row of every address whose perp or spot state changed since the last write."""
        if self.engine is None or self.writer is None:
            return
        book = self.engine.positions
        for address in list(book):
            entry = book.get(address)
            if entry is None:
                continue
            stamp = (entry.perp_updated_at, entry.spot_updated_at)
            if self._position_stamps.get(address) != stamp:
                self._position_stamps[address] = stamp
                await self.writer.put_position(address, entry)
        for gone in self._position_stamps.keys() - set(book):
            del self._position_stamps[gone]

    def _sync_stats(self) -> None:
        if self.engine is None:
            return
        s, m, sync = self.engine.stats, self.metrics, self._sync
        sync.inc(m.trades_processed, ("fills", ""), s.fills_processed, "fill")
        sync.inc(m.trades_deduplicated, ("dup", ""), s.duplicate_fills)
        sync.inc(m.backfilled_fills, ("backfill", ""), s.backfilled_fills, "snapshot_or_rest")
        sync.inc(m.late_fills, ("late", "dropped"), s.late_fills_dropped, "dropped")
        sync.inc(m.late_fills, ("late", "continuation"), s.continuations, "continuation")
        sync.inc(m.unknown_dirs, ("unknown_dirs", ""), s.unknown_dirs)
        sync.inc(m.order_updates_received, ("statuses", ""), s.statuses_received)
        sync.inc(m.position_updates, ("positions", ""), s.position_frames, "applied")
        sync.inc(m.margin_updates, ("margin", ""), s.position_frames, "applied")
        sync.inc(m.position_updates, ("spot", ""), s.spot_frames, "spot")
        sync.inc(m.cache_hit, ("dedup_hit", ""), s.duplicate_fills, "dedup")
        sync.inc(m.cache_miss, ("dedup_miss", ""), s.fills_processed, "dedup")
        for trigger, count in s.flushes_by_trigger.items():
            sync.inc(m.order_flush, ("flush", trigger), count, trigger)
        sync.inc(m.held_signals, ("held", "released"), s.held_released, "released")
        sync.inc(m.held_signals, ("held", "expired"), s.held_expired, "expired")
        for kind, count in s.evictions_by_kind.items():
            sync.inc(m.evictions, ("evict", kind), count, kind)
        m.order_aggregation_active.set(s.pending_orders)
        m.parked_statuses.set(s.parked_statuses)
        m.positions_total.set(self.engine.positions.open_positions())
        if self.book is not None:
            m.addresses_subscribed.set(len(self.book.entries()))
        if self.writer is not None:
            m.writer_queue_depth.set(self.writer.depth)

    # ------------------------------------------------------------------ HTTP view

    def readiness(self) -> Readiness:
        reasons: dict[str, str] = {}
        if self.publisher is None or not self.publisher.is_connected:
            reasons["nats"] = "disconnected"
        if not self.db_ok:
            reasons["database"] = self.db_error or "unreachable"
        if self.precise is not None:
            for address in self.precise.not_live():
                reasons[f"feed:{address}"] = "not live (stale or reconnecting)"
        wide_in_use = self.planner is not None and "wide" in self.planner.tiers().values()
        if self.tape is not None and wide_in_use and self.tape.continuous_since_ms() is None:
            reasons["tape"] = "in a gap (stale or reconnecting)"
        if not self.ready_event.is_set():
            reasons["service"] = "starting"
        return Readiness(reasons)

    def health_summary(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "watched_addresses": len(self.book.entries()) if self.book is not None else 0,
            "nats_connected": bool(self.publisher is not None and self.publisher.is_connected),
            "database_ok": self.db_ok,
            "outbox_depth": self.outbox.depth if self.outbox is not None else 0,
        }

    def _address_row(self, address: str, entry: WatchedAddress) -> dict[str, Any]:
        engine = self.engine
        assert engine is not None
        assigned = self.precise.assigned() if self.precise is not None else {}
        over = self.precise.over_budget() if self.precise is not None else {}
        tier = self.planner.tier(address) if self.planner is not None else None
        if address in assigned:
            state = "precise"
        elif address in over:
            state = "over_budget"
        elif tier is not None:
            state = tier
        elif self.cluster is not None and address in self.cluster.precise_elsewhere():
            state = "precise_elsewhere"
        else:
            state = "unassigned"
        watermark = engine.watermark(address)
        return {
            "address": address,
            "label": entry.label,
            "tier": entry.tier,
            "priority": entry.priority,
            "state": state,
            "connection": assigned.get(address),
            "removing": address in (self.book.removing() if self.book is not None else {}),
            "watermark": None
            if watermark is None
            else {"time": watermark.time, "tid": watermark.tid, "floor": watermark.floor},
            "pending_orders": engine.pending_oids(address),
        }

    def status(self) -> dict[str, Any]:
        addresses: list[dict[str, Any]] = []
        if self.book is not None and self.engine is not None:
            addresses = [self._address_row(a, e) for a, e in sorted(self.book.entries().items())]
        readiness = self.readiness()
        return {
            "instance_id": self.instance_id,
            "version": __version__,
            "ready": readiness.ok,
            "readiness": dict(readiness.reasons),
            "connections": self.precise.status() if self.precise is not None else {},
            "tape": self.tape.status() if self.tape is not None else None,
            "wide": self.wide.status() if self.wide is not None else None,
            "tiers": self.planner.status() if self.planner is not None else None,
            "addresses": addresses,
            "budgets": self.budgets.snapshot() if self.budgets is not None else {},
            "outbox_depth": self.outbox.depth if self.outbox is not None else 0,
            "writer_queue_depth": self.writer.depth if self.writer is not None else 0,
            "engine": _engine_stats(self.engine),
            "symbols": None
            if self.symbols is None
            else {
                "loaded": self.symbols.loaded,
                "failures": self.symbols.failures,
                "last_error": self.symbols.last_error,
                "held_coins": self.engine.held_coins() if self.engine is not None else [],
            },
            "cluster": self.cluster.status() if self.cluster is not None else {"mode": self.cfg.cluster.mode},
        }

    async def address_detail(self, address: str) -> dict[str, Any] | None:
        """`GET /addresses/{address}`: tier, connection, positions, pending orders, watermark, last signals."""
        if self.book is None or self.engine is None:
            return None
        entry = self.book.entries().get(address)
        if entry is None:
            return None
        row = self._address_row(address, entry)
        positions = self.engine.positions.get(address)
        row["positions"] = msgspec.to_builtins(positions) if positions is not None else None
        row["wide"] = self.wide.address_status(address) if self.wide is not None else None
        row["last_signals"] = []
        if self.repo is not None:
            with contextlib.suppress(StorageError, OSError):
                stored = await self.repo.list_signals(address=address, limit=LAST_SIGNALS)
                row["last_signals"] = [msgspec.to_builtins(s.signal) for s in stored]
        return row

    # ------------------------------------------------------------------ run

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        data_dir = Path(cfg.service.data_dir)
        with InstanceLock(data_dir, self.instance_id):
            db = create_engine(cfg)
            try:
                await check_schema(db)
                if db.dialect.name != "sqlite":  # a shared database: the data-dir lock alone cannot see other hosts
                    self.lease = InstanceLease.from_config(db, cfg, self.metrics)
                    await self.lease.acquire()
                try:
                    await self._run_with_db(db, stop)
                finally:
                    if self.lease is not None:
                        with contextlib.suppress(StorageError, OSError):
                            await self.lease.release()
            finally:
                await db.dispose()

    async def _run_with_db(self, db: AsyncEngine, stop: asyncio.Event) -> None:
        cfg, metrics = self.cfg, self.metrics
        self.repo = repo = Repository(db)
        embedded: EmbeddedNats | None = None
        if cfg.nats.url == "embedded":
            embedded = EmbeddedNats(cfg.nats, metrics)
            await embedded.start()
        try:
            self.publisher = Publisher(
                cfg.nats, cfg.signals, metrics, url=embedded.url if embedded is not None else None
            )
            await self.publisher.connect(wait=NATS_CONNECT_WAIT_S)
            try:
                await self.publisher.ensure_stream()
                await self._run_pipeline(db, repo, embedded, stop)
            finally:
                with contextlib.suppress(DeliveryError):
                    await self.publisher.close()
        finally:
            if embedded is not None:
                await embedded.stop()

    async def _run_pipeline(
        self, db: AsyncEngine, repo: Repository, embedded: EmbeddedNats | None, stop: asyncio.Event
    ) -> None:
        cfg, metrics = self.cfg, self.metrics
        assert self.publisher is not None
        self.writer = writer = BatchWriter(db, cfg.writer, metrics)
        self.outbox = outbox = Outbox(self.publisher, repo, writer, metrics, cfg.nats)
        self.budgets = budgets = Budgets(cfg.hyperliquid, metrics)
        self.engine = engine = TrackingEngine(cfg.aggregation, SymbolMap.empty(), instance_id=self.instance_id)
        if cfg.cluster.mode != "nats":  # cluster: with leases, each address's state is imported when it is claimed
            state = await repo.load_engine_state(flushed_since_ms=now_ms() - int(cfg.aggregation.flushed_ttl * 1000))
            engine.import_state(state)
            log.info("engine state restored", aggregations=len(state.aggregations), watermarks=len(state.watermarks))
        table = address_source(db, cfg)
        self.book = book = AddressBook(
            [table, StaticSource(cfg.addresses.initial)],
            metrics,
            reload_interval=cfg.addresses.reload_interval,
            remove_grace=cfg.addresses.remove_grace,
            server_id=cfg.addresses.server_id,
            on_change=self._on_address_change,
        )
        admin = _Admin(AddressTable(db), book) if isinstance(table, AddressTable) else None
        # ---- cluster (begin): in nats mode the precise tier sees only the addresses this instance holds a lease for
        precise_book: AddressView = book
        if cfg.cluster.mode == "nats":
            handover = EngineHandover(
                engine, writer, repo, flushed_ttl=cfg.aggregation.flushed_ttl, label=lambda a: _label(book, a)
            )
            self.cluster = Cluster(
                cfg.cluster,
                book,
                self.publisher.client,
                handover,
                metrics,
                member_id=self.instance_id,
                precise_slots=cfg.hyperliquid.user_slots,
                server_id=cfg.addresses.server_id,
                http=cfg.http.listen,
                is_running=lambda a: self.precise is not None and a in self.precise.assigned(),
            )
            precise_book = self.cluster.owned()
        # ---- cluster (end)
        watchdog = LoopWatchdog(metrics)
        cleaner = RetentionCleaner(db, cfg.retention, metrics)
        async with InfoClient.from_config(cfg.hyperliquid, budgets, metrics) as info:
            # ---- symbols: loaded before the feeds start; a failed load keeps going (retried, counted)
            self.symbols = symbols = SymbolLoader(info, cfg.symbols, metrics, db=db, on_update=self._set_symbols)
            engine.on_unknown_coin = symbols.request_reload
            await symbols.load()
            # ---- wide tier: the trades tape of every coin for addresses without a precise stream (issue 7)
            wide_enabled = cfg.wide.enabled and (cfg.cluster.mode != "nats" or cfg.cluster.tape_role == "active")
            if wide_enabled:
                self.tape_tracker = tracker = TapeTracker(
                    engine.symbols,
                    block_settle_ms=round(cfg.wide.block_settle * 1000),
                    hold_ms=round(cfg.wide.handover_hold * 1000),
                    instance_id=self.instance_id,
                )
                self.tape = tape = MarketTape(
                    cfg.hyperliquid,
                    cfg.wide,
                    tracker=tracker,
                    info=info,
                    budget=budgets,
                    metrics=metrics,
                    on_signals=self.on_signals,
                )
                self.wide = WideManager(
                    cfg.wide,
                    cfg.hyperliquid,
                    tracker=tracker,
                    info=info,
                    tape=tape,
                    clock=budgets.clock,
                    metrics=metrics,
                    on_signals=self.on_signals,
                    dexes=lambda: tape.universe.dexes if tape.universe else [],
                )
                # In cluster mode an address placed precise on another instance is that instance's: the tape
                # here must not report it too (its tape ids differ from the precise ids, so dedup cannot help).
                planner_book: AddressView = book
                if self.cluster is not None:
                    cluster = self.cluster
                    planner_book = _ExcludingView(book, lambda: _placed_precise(cluster, book), cluster)
                self.planner = TierPlanner(
                    planner_book,
                    tracker=tracker,
                    engine=engine,
                    wide=self.wide,
                    metrics=metrics,
                    on_signals=self.on_signals,
                    max_addresses=cfg.wide.max_addresses,
                )
            self.precise = precise = PreciseManager(
                cfg.hyperliquid,
                precise_book,
                tracker=engine,
                info=info,
                budget=budgets,
                metrics=metrics,
                on_signals=self.on_signals,
                on_unassigned=self.planner.on_unassigned if self.planner is not None else None,
            )
            if self.planner is not None:
                self.planner.precise = precise
            self.http = http = HttpServer(create_app(self, metrics, admin, cfg.http), cfg.http.listen)
            await http.start()
            try:
                async with asyncio.TaskGroup() as tg:
                    background = [
                        tg.create_task(writer.run(), name="writer"),
                        tg.create_task(outbox.run(), name="outbox"),
                        tg.create_task(watchdog.run(), name="watchdog"),
                        tg.create_task(cleaner.run(), name="cleaner"),
                        tg.create_task(self._db_probe_loop(repo), name="db-probe"),
                        tg.create_task(self._stats_loop(), name="stats"),
                    ]
                    if embedded is not None:
                        background.append(tg.create_task(embedded.run(), name="embedded-nats"))
                    if self.lease is not None:
                        background.append(tg.create_task(self.lease.run(), name="instance-lease"))
                    intake = [
                        tg.create_task(book.run(), name="address-book"),
                        tg.create_task(symbols.run(), name="symbols"),
                    ]
                    await _first(book.wait_loaded(), stop.wait())
                    intake.append(tg.create_task(precise.run(), name="precise"))
                    if self.planner is not None and self.tape is not None and self.wide is not None:
                        intake.append(tg.create_task(self.planner.run(), name="planner"))
                        intake.append(tg.create_task(self.tape.run(), name="tape"))
                        intake.append(tg.create_task(self.wide.run(), name="wide"))
                    if self.cluster is not None:  # cluster
                        intake.append(tg.create_task(self.cluster.run(), name="cluster"))
                    intake.append(tg.create_task(self._tick_loop(), name="tick"))
                    # ---- latency (begin): startup objects (modules, SQLAlchemy, config, restored state) are
                    # long-lived; frozen, the collector's full passes no longer walk them (they cost 50-100 ms
                    # of event loop each, the p99 tail at 2k fills/s). No `gc.collect()` first: in a big process
                    # it is itself such a pause, and the few cyclic leftovers of startup it would free are
                    # bounded (kept for the process's life).
                    gc.freeze()
                    # ---- latency (end)
                    self.ready_event.set()
                    log.info("service ready", listen=cfg.http.listen, addresses=len(book.entries()))
                    await stop.wait()
                    log.info("shutdown: stopping intake")
                    self.ready_event.clear()
                    await cancel_and_wait(intake)
                    if self.cluster is not None:  # cluster: hand leases over (state persisted) before draining
                        await self.cluster.leave()
                    await self._shutdown(background)
            finally:
                await http.stop()

    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        """Everything after intake stopped; bounded by service.shutdown_timeout."""
        assert self.engine is not None
        assert self.writer is not None
        assert self.outbox is not None
        deadline = self.cfg.service.shutdown_timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline):
                if self.tape_tracker is not None:  # open tape blocks are complete once intake stopped
                    await self.on_signals(self.tape_tracker.tick(now_ms() + round(self.cfg.wide.block_settle * 1000)))
                await self._tick_once()  # due flushes, then persist every pending aggregation and watermark
                await self._persist_positions()
                left = await self.outbox.drain(deadline * OUTBOX_DRAIN_SHARE)
                await self.writer.close()
                log.info(
                    "shutdown: drained",
                    unacknowledged=left,
                    seconds=round(time.monotonic() - started, 2),
                )
        except TimeoutError:
            log.error("shutdown deadline reached; unflushed rows are recovered at next start", deadline_s=deadline)
        await cancel_and_wait(background)


class _ExcludingView:
    """The address book without the addresses `exclude()` names; changes when either side changes."""

    def __init__(self, book: AddressView, exclude: Callable[[], frozenset[str]], cluster: Cluster) -> None:
        self._book = book
        self._exclude = exclude
        self._cluster = cluster

    @property
    def version(self) -> int:
        return self._book.version * 1_000_003 + self._cluster.placement_version

    def entries(self) -> Mapping[str, WatchedAddress]:
        excluded = self._exclude()
        return {a: e for a, e in self._book.entries().items() if a not in excluded}

    async def wait_changed(self, seen_version: int) -> int:
        book_v, placement_v = self._book.version, self._cluster.placement_version
        if self.version != seen_version:
            return self.version
        waiters = [
            asyncio.ensure_future(self._book.wait_changed(book_v)),
            asyncio.ensure_future(self._cluster.wait_placement_changed(placement_v)),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(waiters)
        return self.version


def _placed_precise(cluster: Cluster, book: AddressBook) -> frozenset[str]:
    """Cluster mode: addresses the cluster places precise on any member, which the tape must leave alone.

    Until the first placement exists every non-`wide` address counts as placed: a starting member must not
    report an address on the tape that another member already tracks precisely (different ids, no dedup).
    """
    if cluster.placement_version == 0:
        return frozenset(a for a, e in book.entries().items() if e.tier != "wide")
    return frozenset(cluster.placement())


def _label(book: AddressBook, address: str) -> str | None:
    entry = book.entries().get(address)
    return entry.label or None if entry is not None else None


def _with_instance(sig: Signal, instance_id: str) -> Signal:
    return msgspec.structs.replace(sig, detected_by=instance_id)


def _engine_stats(engine: TrackingEngine | None) -> dict[str, Any]:
    if engine is None:
        return {}
    data: dict[str, Any] = msgspec.to_builtins(engine.stats)
    return data


class _Admin:
    """`/admin/addresses` on the address table; each change wakes the address book so it applies within a second."""

    def __init__(self, table: AddressTable, book: AddressBook) -> None:
        self._table = table
        self._book = book

    async def list(self) -> list[dict[str, Any]]:
        return await self._table.list()

    async def add(self, entries: Sequence[AddressInput]) -> int:
        count = await self._table.add(entries)
        self._book.refresh_now()
        return count

    async def remove(self, addresses: Sequence[str]) -> int:
        count = await self._table.remove(addresses)
        self._book.refresh_now()
        return count

    async def update(
        self,
        address: str,
        *,
        label: str | None = None,
        tier: str | None = None,
        priority: int | None = None,
        is_active: bool | None = None,
    ) -> dict[str, Any] | None:
        row = await self._table.update(address, label=label, tier=tier, priority=priority, is_active=is_active)
        self._book.refresh_now()
        return row


async def _first(*aws: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of `aws` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(tasks)


async def cancel_and_wait(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until they are done; a task's own error is raised.

    A cancel of the caller while it waits propagates: awaiting each task under `suppress(CancelledError)` would
    swallow it too, and the caller (the service's shutdown) would carry on as if never cancelled.
    """
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc


async def run_service(cfg: Config, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        log.info("service starting", instance_id=cfg.instance_id, version=__version__)
        await Service(cfg).run(stop)
        log.info("service stopped")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _run(args: argparse.Namespace) -> int:
    from hl_monitor.cli import config_from_args

    cfg = config_from_args(args)
    configure_logging(cfg.log.level, cfg.log.format, cfg.instance_id)
    asyncio.run(run_service(cfg))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hl_monitor.cli import add_config_arg

    run = sub.add_parser("run", help="run the service")
    add_config_arg(run)
    run.set_defaults(handler=_run)


__all__ = ["Service", "run_service"]
