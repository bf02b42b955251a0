"""Whale discovery as the service runs it: the keeper, automatic watching, its announcements and, in cluster
mode, the `discovery` role lease.

Every instance that reads the tape counts its parties and confirms its top candidates (`watch/discovery.py`),
so each answers `/discovery` alike. Only one writes automatic watch changes (`watch/autowatch.py`): a lone
instance always, in cluster mode the holder of the `discovery` key of the leases bucket (`cluster/roles.py`).
Announcements go through their own stream and outbox (`delivery/discovery.py`). `open_discovery` builds all of
it once (the composition root calls it); `run()` runs the confirmation passes, each followed by an auto-watch
step, beside the outbox and the lease.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from hl_monitor.cluster.roles import RoleLease
from hl_monitor.config import Config
from hl_monitor.delivery.discovery import DiscoveryPublisher, discovery_outbox
from hl_monitor.delivery.publications import PublicationOutbox, PublicationSinkImpl, PublicationStore
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.errors import HlMonitorError
from hl_monitor.feeds.addresses import AddressBook
from hl_monitor.hyperliquid.protocol import WsTrade
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.storage.repository import AddressTable
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.discovery import Label
from hl_monitor.watch.autowatch import AutoWatcher
from hl_monitor.watch.discovery import DiscoveryInfo, DiscoveryKeeper

__all__ = ["DISCOVERY_ROLE", "DiscoveryPart", "open_discovery"]

log = get_logger(__name__)

DISCOVERY_ROLE = "discovery"


class DiscoveryPart:
    """The keeper (tape intake, `/discovery`), and with `discovery.auto_watch` its writer, outbox and lease."""

    def __init__(
        self,
        keeper: DiscoveryKeeper,
        auto: AutoWatcher | None,
        outbox: PublicationOutbox | None,
        lease: RoleLease | None,
    ) -> None:
        self.keeper = keeper
        self.auto = auto
        self.outbox = outbox
        self.lease = lease
        self.passes = 0

    # The tape's intake and `/discovery`'s view (`ops.http.DiscoveryView`), by the keeper.
    def on_trades(self, trades: Sequence[WsTrade], now_ms: int) -> None:
        self.keeper.on_trades(trades, now_ms)

    def window_names(self) -> list[str]:
        return self.keeper.window_names()

    def window_ms(self, name: str) -> int | None:
        return self.keeper.window_ms(name)

    def rows(self, window_ms: int, *, label: Label | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        return self.keeper.rows(window_ms, label=label, limit=limit)

    def label_of(self, address: str) -> Label | None:
        return self.keeper.label_of(address)

    def status(self) -> dict[str, Any]:
        out = self.keeper.status()
        if self.auto is not None:
            out["auto_watch"] = self.auto.status()
        return out

    async def step(self) -> None:
        """One confirmation pass, then one auto-watch step; a storage failure is logged and retried next pass."""
        self.keeper.export()
        await self.keeper.confirm_due()
        if self.auto is not None:
            try:
                await self.auto.step()
            except HlMonitorError as exc:
                log.warning("discovery auto-watch step failed; retrying next pass", error=str(exc))
        self.passes += 1

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            if self.outbox is not None:
                tg.create_task(self.outbox.run(), name="discovery-outbox")
            if self.lease is not None:
                tg.create_task(self.lease.run(), name="discovery-lease")
            while True:
                await self.step()
                await asyncio.sleep(self.keeper.cfg.pass_interval)


def open_discovery(
    cfg: Config,
    tape: bool,
    info: DiscoveryInfo,
    metrics: Metrics,
    book: AddressBook,
    table: object,
    publisher: Publisher,
    store: PublicationStore,
    writer: BatchWriter,
) -> DiscoveryPart | None:
    """Discovery when it is enabled and a tape runs here; automatic watching needs the address table."""
    d = cfg.discovery
    if not tape or not d.enabled:
        return None
    keeper = DiscoveryKeeper(d, cfg.hyperliquid, info=info, metrics=metrics, is_watched=lambda a: a in book.entries())
    if not d.auto_watch:
        return DiscoveryPart(keeper, None, None, None)
    if not isinstance(table, AddressTable):
        log.warning("discovery.auto_watch needs the address table as address source; automatic watching is off")
        return DiscoveryPart(keeper, None, None, None)
    outbox = discovery_outbox(DiscoveryPublisher(publisher, cfg.nats, d, metrics), store, writer, metrics, cfg.nats)
    lease = None
    if cfg.cluster.mode == "nats":
        lease = RoleLease(
            DISCOVERY_ROLE, cfg.cluster, publisher.client, member_id=cfg.instance_id, kv_replicas=cfg.nats.kv_replicas
        )
    auto = AutoWatcher(
        d,
        keeper,
        table,
        sink=PublicationSinkImpl(writer, outbox),
        metrics=metrics,
        instance_id=cfg.instance_id,
        refresh=book.refresh_now,
        is_leader=(lambda: True) if lease is None else lease.held,
    )
    return DiscoveryPart(keeper, auto, outbox, lease)
