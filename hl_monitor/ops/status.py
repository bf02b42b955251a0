"""What the service shows of itself over HTTP: readiness, `/status`, `/health` and `/addresses/{address}`.

`StatusView` reads the components the composition root built (all of them exist before the HTTP server
starts, so nothing here waits for a field to be filled in). `DatabaseProbe` owns the database's readiness
state; `Admin` is the address table behind `/admin/addresses`, waking the address book on every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Final

import msgspec

from hl_monitor import __version__
from hl_monitor.cluster.leases import Cluster
from hl_monitor.delivery.outbox import Outbox
from hl_monitor.delivery.publish_health import PublishState
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.delivery.relay import Relay
from hl_monitor.domain.address import Tier, WatchedAddress
from hl_monitor.errors import StorageError
from hl_monitor.feeds.addresses import AddressBook
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.precise import PreciseManager
from hl_monitor.feeds.symbols import SymbolLoader
from hl_monitor.ops.http import AddressInput, Readiness
from hl_monitor.storage.repository import AddressTable, Repository
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.watch.positions import PositionsTier
from hl_monitor.watch.tiers import WideTier

__all__ = ["Admin", "DatabaseProbe", "StatusView"]

# How often the database is probed for readiness.
DB_PROBE_INTERVAL_S: Final = 5.0
# Signals shown by GET /addresses/{address}.
LAST_SIGNALS: Final = 20
# Longest error text kept for /status (a driver can put a whole statement in its message).
ERROR_TEXT_MAX: Final = 200
# Readiness reason while connected but no publish is acknowledged (a stream without a leader, a lost quorum).
NATS_DEGRADED: Final = "degraded: connected, publishes unacknowledged"


class DatabaseProbe:
    """Pings the database every `DB_PROBE_INTERVAL_S`; any failure means not reachable (readiness)."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self.ok = False
        self.error = "not checked yet"

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(DB_PROBE_INTERVAL_S):
                    await self._repo.ping()
                self.ok, self.error = True, ""
            except Exception as exc:  # any failure = not reachable, with its text for /status
                self.ok, self.error = False, f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_MAX]
            await asyncio.sleep(DB_PROBE_INTERVAL_S)


class StatusView:
    """`ops.http.ServiceView` over the built components."""

    def __init__(
        self,
        *,
        instance_id: str,
        cluster_mode: str,
        publisher: Publisher,
        database: DatabaseProbe,
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
        relays: Sequence[Relay[Any]],
    ) -> None:
        self._positions = positions
        self._relays = tuple(relays)
        self._instance_id = instance_id
        self._cluster_mode = cluster_mode
        self._publisher = publisher
        self._database = database
        self._repo = repo
        self._outbox = outbox
        self._writer = writer
        self._budgets = budgets
        self._engine = engine
        self._book = book
        self._symbols = symbols
        self._precise = precise
        self._wide_tier = wide_tier
        self._cluster = cluster
        self._started_at = time.monotonic()
        self.ready = asyncio.Event()

    def readiness(self) -> Readiness:
        reasons: dict[str, str] = {}
        if not self._publisher.is_connected:
            reasons["nats"] = "disconnected"
        elif self._publishing() == "degraded":
            reasons["nats"] = NATS_DEGRADED
        if not self._database.ok:
            reasons["database"] = self._database.error or "unreachable"
        for address in self._precise.not_live():
            reasons[f"feed:{address}"] = "not live (stale or reconnecting)"
        w = self._wide_tier
        if w is not None and "wide" in w.planner.tiers().values() and w.tape.continuous_since_ms() is None:
            reasons["tape"] = "in a gap (stale or reconnecting)"
        if not self.ready.is_set():
            reasons["service"] = "starting"
        return Readiness(reasons)

    def _publishing(self) -> PublishState:
        """Degraded while any relay waits for acks that do not come (connected, but no server stores)."""
        degraded = any(r.publish_health.state() == "degraded" for r in self._relays)
        return "degraded" if degraded else "ok"

    def _nats(self) -> dict[str, Any]:
        return {
            "connected": self._publisher.is_connected,
            "connected_url": self._publisher.connected_url,
            "publishing": self._publishing(),
            "unacked_for_s": round(max(r.publish_health.unacked_for for r in self._relays), 2),
            "failures_since_ack": sum(r.publish_health.failures for r in self._relays),
        }

    def health_summary(self) -> dict[str, Any]:
        return {
            "instance_id": self._instance_id,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "watched_addresses": len(self._book.entries()),
            "nats_connected": self._publisher.is_connected,
            "nats_publishing": self._publishing(),
            "database_ok": self._database.ok,
            "outbox_depth": self._outbox.depth,
        }

    def status(self) -> dict[str, Any]:
        readiness = self.readiness()
        w = self._wide_tier
        return {
            "instance_id": self._instance_id,
            "version": __version__,
            "ready": readiness.ok,
            "readiness": dict(readiness.reasons),
            "nats": self._nats(),
            "connections": self._precise.status(),
            "tape": w.tape.status() if w is not None else None,
            "wide": w.wide.status() if w is not None else None,
            "tiers": w.planner.status() if w is not None else None,
            "addresses": [self._address_row(a, e) for a, e in sorted(self._book.entries().items())],
            "budgets": self._budgets.snapshot(),
            "outbox_depth": self._outbox.depth,
            "writer_queue_depth": self._writer.depth,
            "engine": msgspec.to_builtins(self._engine.stats),
            "symbols": {
                "loaded": self._symbols.loaded,
                "failures": self._symbols.failures,
                "last_error": self._symbols.last_error,
                "held_coins": self._engine.held_coins(),
            },
            "cluster": self._cluster.status() if self._cluster is not None else {"mode": self._cluster_mode},
            "positions": None
            if self._positions is None
            else {
                "documents": len(self._positions.keeper.model),
                "marks": self._positions.marks.status() if self._positions.marks is not None else None,
                "outbox_depth": self._positions.outbox.depth,
                "kv_queue_depth": self._positions.kv.depth,
                "model": msgspec.to_builtins(self._positions.keeper.model.stats),
            },
        }

    async def address_detail(self, address: str) -> dict[str, Any] | None:
        entry = self._book.entries().get(address)
        if entry is None:
            return None
        row = self._address_row(address, entry)
        document = self._positions.keeper.portfolio(address) if self._positions is not None else None
        row["positions"] = msgspec.to_builtins(document) if document is not None else None
        row["wide"] = self._wide_tier.wide.address_status(address) if self._wide_tier is not None else None
        row["last_signals"] = []
        with contextlib.suppress(StorageError, OSError):
            stored = await self._repo.list_signals(address=address, limit=LAST_SIGNALS)
            row["last_signals"] = [msgspec.to_builtins(s.signal) for s in stored]
        return row

    def _address_row(self, address: str, entry: WatchedAddress) -> dict[str, Any]:
        assigned = self._precise.assigned()
        tier = self._wide_tier.planner.tier(address) if self._wide_tier is not None else None
        if address in assigned:
            state = "precise"
        elif address in self._precise.over_budget():
            state = "over_budget"
        elif tier is not None:
            state = tier
        elif self._cluster is not None and address in self._cluster.precise_elsewhere():
            state = "precise_elsewhere"
        else:
            state = "unassigned"
        watermark = self._engine.watermark(address)
        return {
            "address": address,
            "label": entry.label,
            "tier": entry.tier,
            "priority": entry.priority,
            "state": state,
            "connection": assigned.get(address),
            "removing": address in self._book.removing(),
            "watermark": None
            if watermark is None
            else {"time": watermark.time, "tid": watermark.tid, "floor": watermark.floor},
            "pending_orders": self._engine.pending_oids(address),
        }


class Admin:
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
        tier: Tier | None = None,
        priority: int | None = None,
        is_active: bool | None = None,
        min_notional_usd: Decimal | None = None,
        allow_symbols: Sequence[str] | None = None,
        deny_symbols: Sequence[str] | None = None,
    ) -> dict[str, Any] | None:
        row = await self._table.update(
            address,
            label=label,
            tier=tier,
            priority=priority,
            is_active=is_active,
            min_notional_usd=min_notional_usd,
            allow_symbols=allow_symbols,
            deny_symbols=deny_symbols,
        )
        self._book.refresh_now()
        return row
