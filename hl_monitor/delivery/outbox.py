"""The signal outbox: the relay (`delivery.relay`) for signals, whose store is the signals table.

Callers hand a signal to the storage writer first (`put_signal`) and then `submit()` it here; the relay
publishes it with `Nats-Msg-Id = signal_id`, marks it published on the ack (`mark_published`), and re-reads
unpublished rows at start and every `nats.outbox_scan_interval` (docs/architecture.md §3). A suppressed signal
(README "Filters") is never published: the sink does not submit it, its row is stored as needing no publish, and
this relay refuses one all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from nats.js.api import PubAck
from prometheus_client import Counter, Gauge

from hl_monitor.config import NatsConfig
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.delivery.relay import SUBMIT_WAIT_S, Relay
from hl_monitor.domain.signal import Signal
from hl_monitor.metrics import Metrics

__all__ = ["AckedSignalStore", "Outbox", "OutboxStore", "PublishedMarker"]


class OutboxStore(Protocol):
    """What the relay reads from storage (implemented by `storage.repository`)."""

    async def fetch_unpublished(self, limit: int, older_than_ms: int | None = None) -> list[Signal]:
        """Stored signals not yet marked published, oldest first; with `older_than_ms`, only rows stored before it."""
        ...

    async def count_unpublished(self) -> int: ...


@runtime_checkable
class AckedSignalStore(Protocol):
    """A store that keeps acknowledged signals for the replay window (`storage.repository`)."""

    async def fetch_published_since(self, since_ms: int, limit: int, after_id: int = 0) -> list[tuple[int, Signal]]:
        """Signals acknowledged at or after `since_ms` with a row id above `after_id`, by row id: (id, signal)."""
        ...


class PublishedMarker(Protocol):
    """Where acks go (the storage writer, which batches the published flag)."""

    async def mark_published(self, signal_id: str, at_ms: int) -> None: ...


@dataclass(frozen=True, slots=True)
class _SignalCounters:
    """The signal relay's instruments (names kept from the first release: dashboards and alerts use them)."""

    metrics: Metrics

    @property
    def depth(self) -> Gauge:
        return self.metrics.outbox_depth

    @property
    def spilled(self) -> Counter:
        return self.metrics.outbox_spilled

    def fault(self, kind: str) -> None:
        if kind == "unexpected":
            self.metrics.publish_errors.labels(reason=kind).inc()
        else:
            self.metrics.signal_errors.labels(type=kind).inc()

    def replayed(self, reason: str, count: int) -> None:
        self.metrics.replays.labels(kind="signal", reason=reason).inc()
        self.metrics.replayed.labels(kind="signal").inc(count)


class Outbox(Relay[Signal]):
    """Holds signals until JetStream acknowledges them. Run `run()` in a task; `drain()` at shutdown."""

    noun = "signal"

    def __init__(
        self,
        publisher: Publisher,
        store: OutboxStore,
        writer: PublishedMarker,
        metrics: Metrics,
        cfg: NatsConfig,
        *,
        submit_wait: float = SUBMIT_WAIT_S,
        on_published: Callable[[Signal], None] | None = None,
    ) -> None:
        """`on_published` sees each signal JetStream acknowledged (a re-publish again); it must not block."""
        super().__init__(publisher, _SignalCounters(metrics), cfg, submit_wait=submit_wait)
        self._publisher = publisher
        self._on_published = on_published
        self._store = store
        self._writer = writer

    def _key(self, item: Signal) -> str:
        return item.signal_id

    async def submit(self, item: Signal) -> None:
        if item.suppressed:
            return
        await super().submit(item)

    async def _send(self, item: Signal) -> PubAck:
        ack = await self._publisher.publish(item)
        if self._on_published is not None:
            self._on_published(item)
        return ack

    async def _fetch(self, limit: int, older_than_ms: int | None) -> list[Signal]:
        return [s for s in await self._store.fetch_unpublished(limit, older_than_ms) if not s.suppressed]

    async def _count_unpublished(self) -> int:
        return await self._store.count_unpublished()

    async def _mark(self, key: str, at_ms: int) -> None:
        await self._writer.mark_published(key, at_ms)

    async def _fetch_acked(self, since_ms: int, limit: int, after: object | None) -> tuple[list[Signal], object | None]:
        if not isinstance(self._store, AckedSignalStore):
            return [], None
        rows = await self._store.fetch_published_since(since_ms, limit, after if isinstance(after, int) else 0)
        return [s for _, s in rows], (rows[-1][0] if rows else after)
