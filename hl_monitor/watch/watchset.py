"""The owner of the precise watch set: the one component that changes which addresses the engine watches.

Three parties want to change it, and each only expresses an intent here (docs/architecture.md §2):
- the address book (`on_book_change`): an address added to or removed from the book. In cluster mode the book
  adds nothing: a member watches only what it holds a lease for;
- the tier planner (`hand_to_wide`): an address moves from its precise stream to the tape;
- the cluster (`acquire` / `release`): a lease was won or handed over; the engine state travels through the
  database, so the next holder resumes where the last one stopped.
It is also the one owner that ticks the engine (quiet timeouts, evictions) and persists what changed
(`take_dirty` has a single consumer), and the last flush at shutdown (`finish`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import Config
from hl_monitor.domain.address import WatchedAddress
from hl_monitor.domain.signal import Signal, SignalSink, Trigger
from hl_monitor.feeds.addresses import AddressDiff
from hl_monitor.logging import get_logger
from hl_monitor.tracking.state import EngineState, StateDelta, Watermark

__all__ = ["WatchSet", "state_of"]

log = get_logger(__name__)


class WatchedEngine(Protocol):
    """The tracking engine's watch-set surface (`tracking.engine.TrackingEngine`)."""

    def add_address(self, address: str, label: str | None = None) -> None: ...
    def remove_address(self, address: str) -> None: ...
    def flush_address(self, address: str, now_ms: int, trigger: Trigger = "shutdown") -> list[Signal]: ...
    def import_state(self, state: EngineState) -> None: ...
    def take_dirty(self) -> StateDelta: ...
    def tick(self, now_ms: int) -> list[Signal]: ...
    def watermark(self, address: str) -> Watermark | None: ...
    def seed_time(self, address: str) -> int | None: ...


class StateWriter(Protocol):
    async def put_delta(self, delta: StateDelta) -> None: ...
    async def flush(self) -> None: ...


class StateStore(Protocol):
    async def load_engine_state(self, flushed_since_ms: int) -> EngineState: ...


def state_of(state: EngineState, addresses: Collection[str]) -> EngineState:
    """The part of `state` that belongs to `addresses`."""
    return EngineState(
        version=state.version,
        aggregations=[r for r in state.aggregations if r.address in addresses],
        flushed=[f for f in state.flushed if f.address in addresses],
        parked=[p for p in state.parked if p.address in addresses],
        watermarks=[w for w in state.watermarks if w.address in addresses],
    )


class WatchSet:
    """See the module docstring. `run()` ticks until cancelled; `finish()` is the last tick at shutdown."""

    def __init__(
        self,
        engine: WatchedEngine,
        sink: SignalSink,
        writer: StateWriter,
        store: StateStore,
        *,
        clustered: bool,
        tick_interval: float,
        flushed_ttl: float,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self._engine = engine
        self._sink = sink
        self._writer = writer
        self._store = store
        self._clustered = clustered
        self._tick_interval = tick_interval
        self._flushed_ttl_ms = round(flushed_ttl * 1000)
        self._wall_ms = wall_ms
        self._labels: dict[str, str | None] = {}
        self._held: set[str] = set()  # cluster mode: addresses whose lease this member holds

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_config(
        cls, cfg: Config, engine: WatchedEngine, sink: SignalSink, writer: StateWriter, store: StateStore
    ) -> WatchSet:
        """The watch set of the configured service: clustered in nats mode, ticking as often as the engine's scan
        or the writer's flush asks, whichever is sooner."""
        return cls(
            engine,
            sink,
            writer,
            store,
            clustered=cfg.cluster.mode == "nats",
            tick_interval=min(cfg.aggregation.scan_interval, cfg.writer.flush_interval),
            flushed_ttl=cfg.aggregation.flushed_ttl,
        )

    def watermark(self, address: str) -> Watermark | None:
        return self._engine.watermark(address)

    def seed_time(self, address: str) -> int | None:
        return self._engine.seed_time(address)

    # ------------------------------------------------------------------ intents

    async def restore(self) -> int:
        """Single-instance start: re-import everything the last run persisted; the number of pending orders."""
        state = await self._load()
        self._engine.import_state(state)
        log.info("engine state restored", aggregations=len(state.aggregations), watermarks=len(state.watermarks))
        return len(state.aggregations)

    async def on_book_change(self, diff: AddressDiff, entries: Mapping[str, WatchedAddress]) -> None:
        """The address book changed. Pending orders of a removed address are flushed: the whale really traded them."""
        for address in (*diff.added, *diff.updated):
            entry = entries.get(address)
            self._labels[address] = entry.label or None if entry is not None else None
            if not self._clustered or address in self._held:
                self._engine.add_address(address, self._labels[address])
        for address in diff.removed:
            self._labels.pop(address, None)
            if not self._clustered:
                await self._forget(address, "shutdown")

    def hand_to_wide(self, address: str, now_ms: int) -> tuple[list[Signal], int | None]:
        """The precise stream of `address` stopped: flush its pending orders now and start it afresh.

        Returns the flushed signals (the planner emits them with the tape's) and the cut: the engine's last fill
        time, after which the tape reports the address (None when the engine never saw it).
        """
        watermark = self._engine.watermark(address)
        if watermark is None:
            return [], None
        signals = self._engine.flush_address(address, now_ms, "shutdown")
        # Forgotten and watched again: a later precise stint seeds afresh instead of backfilling what the tape reported.
        self._engine.remove_address(address)
        self._engine.add_address(address, self._labels.get(address))
        return signals, watermark.time

    async def acquire(self, addresses: Sequence[str]) -> None:
        """Cluster: this member won the leases of `addresses`; import their persisted state before streams start."""
        state = await self._load()
        wanted = set(addresses)
        for address in wanted:
            self._engine.remove_address(address)  # a stale copy from an earlier ownership must not mix in
        await self._writer.put_delta(self._strip_removals(wanted))
        self._engine.import_state(state_of(state, wanted))
        for address in addresses:
            self._engine.add_address(address, self._labels.get(address))
        self._held.update(wanted)

    async def release(self, addresses: Sequence[str], *, persist: bool) -> None:
        """Cluster: stop watching `addresses`; with `persist`, first commit their latest state for the next holder.

        The stored pending aggregations are never voided (the engine reports a removed address that way): they
        are exactly what the next holder resumes from.
        """
        gone = set(addresses)
        before = self._engine.take_dirty()  # everything up to now, these addresses' latest state included
        for address in addresses:
            self._engine.remove_address(address)  # from here on its frames are ignored
        self._held.difference_update(gone)
        after = self._strip_removals(gone)
        if not persist:
            # The lease is already someone else's: only the flushed rows (signals we emitted) are still ours to write.
            before = StateDelta(
                upserted=[r for r in before.upserted if r.address not in gone],
                closed=before.closed,
                watermarks=[w for w in before.watermarks if w.address not in gone],
                removed_addresses=before.removed_addresses,
            )
        await self._writer.put_delta(before)
        await self._writer.put_delta(after)
        if persist:
            await self._writer.flush()

    # ------------------------------------------------------------------ ticking

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval)
            await self.tick()

    async def tick(self, now_ms: int | None = None) -> None:
        """Quiet timeouts and evictions, then persist everything that changed since the last tick."""
        signals = self._engine.tick(self._wall_ms() if now_ms is None else now_ms)
        if signals:
            await self._sink(signals)
        await self._writer.put_delta(self._engine.take_dirty())

    async def finish(self) -> None:
        """Shutdown, intake stopped: due flushes, then every pending aggregation and watermark persisted."""
        await self.tick()

    # ------------------------------------------------------------------ internals

    async def _forget(self, address: str, trigger: Trigger) -> None:
        signals = self._engine.flush_address(address, self._wall_ms(), trigger)
        if signals:
            await self._sink(signals)
        self._engine.remove_address(address)

    async def _load(self) -> EngineState:
        return await self._store.load_engine_state(flushed_since_ms=self._wall_ms() - self._flushed_ttl_ms)

    def _strip_removals(self, addresses: Collection[str]) -> StateDelta:
        """Take what `remove_address` just reported, minus the void of `addresses`' pending rows."""
        delta = self._engine.take_dirty()
        delta.removed_addresses = [a for a in delta.removed_addresses if a not in addresses]
        return delta
