"""Tier planning: which tier reports each watched address, and loss-free, duplicate-free handovers.

Who is precise is the `PreciseManager`'s decision (`precise` and `auto` addresses by priority into the
`user_slots`, over-budget ones left out); everything else — `wide` addresses, candidates beyond the
slots, refused ones — is wide. The planner follows both and tells the tape tracker and the wide manager.
The tape tracker follows every watched address (up to `wide.max_addresses`, by priority), precise ones
included, so a handover never starts from an unknown position; only the owning tier emits.

Handover rule — the precise engine's watermark is the boundary, so no fill is reported twice or never:
- wide → precise (a slot was granted): the tape keeps tracking but *holds* its blocks. When the precise
  stream is live and its first gap recovery is done: if the engine had never seen the address, its first
  `userFills` snapshot only seeded it (no precise signal for anything in it), so held blocks up to the seed
  (its newest fill; fills the stream delivered after it are precise signals) are emitted; if it knew the
  address, everything after its watermark at the start of the handover was backfilled as precise signals, so
  held blocks up to that time are emitted. Later held blocks are dropped from the hold when they age out (the
  precise tier reports those fills). If the precise stream never gets there, the address falls back to wide
  and every held block is emitted.
- precise → wide (outranked, over budget, tier changed): once the stream is stopped (reported by
  `on_unassigned`, or `HANDOVER_GRACE_S` after the slot went away), the engine's pending aggregations of
  the address are flushed now (trigger `shutdown`: the order may go on, its later fills come from the
  tape), the engine forgets the address (a later precise stint seeds afresh instead of backfilling fills
  the tape already reported) and the tape emits blocks strictly newer than the engine's last fill time,
  held ones included.
Limit: a watermark persisted by a previous run for an address that was wide in between is still used by
the precise tier after a restart; fills the tape reported during that stint within the engine's
`seen_window` would be reported again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, Protocol

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.domain.address import AddressView, TrackedBy, WatchedAddress, rank
from hl_monitor.domain.signal import Signal, SignalSink
from hl_monitor.feeds.connection import ConnState
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.tracking.state import Watermark
from hl_monitor.tracking.tape import TapeTracker

__all__ = ["HANDOVER_GRACE_S", "TierPlanner"]

log = get_logger(__name__)

# How often a pending handover re-checks the precise stream (live? recovered?).
POLL_S: Final = 0.2
# A stream leaving its slot is stopped by the precise manager within one loop turn; waiting this long
# after the slot disappeared guarantees no frame of it is still being applied when the engine is reset.
HANDOVER_GRACE_S: Final = 0.5

TierName = Literal["precise", "wide", "handover"]


class _ConnView(Protocol):
    @property
    def state(self) -> ConnState: ...


class _StreamView(Protocol):
    @property
    def recoveries(self) -> int: ...
    @property
    def connection(self) -> _ConnView: ...


class PreciseView(Protocol):
    """The part of `PreciseManager` the planner reads."""

    def assigned(self) -> Mapping[str, int]: ...
    def stream(self, address: str) -> _StreamView | None: ...


class PreciseWatch(Protocol):
    """The owner of the precise watch set (`watch.watchset.WatchSet`), as the planner uses it."""

    def watermark(self, address: str) -> Watermark | None: ...
    def seed_time(self, address: str) -> int | None: ...
    def hand_to_wide(self, address: str, now_ms: int) -> tuple[list[Signal], int | None]: ...


class WideView(Protocol):
    def set_addresses(self, owners: Mapping[str, TrackedBy]) -> None: ...


class TierPlanner:
    """See the module docstring. `run()` until cancelled; wire `on_unassigned` into the `PreciseManager`."""

    def __init__(
        self,
        book: AddressView,
        *,
        tracker: TapeTracker,
        watch: PreciseWatch,
        wide: WideView,
        metrics: Metrics,
        on_signals: SignalSink,
        precise: PreciseView | None = None,
        max_addresses: int,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self._book = book
        self._tracker = tracker
        self._watch = watch
        self._wide = wide
        self._metrics = metrics
        self._on_signals = on_signals
        self.precise = precise
        self._max = max_addresses
        self._clock = clock
        self._wall_ms = wall_ms
        self._tiers: dict[str, TierName] = {}
        # Engine watermark time when a wide → precise handover started (None: the engine had never seen the address).
        self._handover_base: dict[str, int | None] = {}
        self._leaving: dict[str, float] = {}  # precise addresses whose slot went away → when
        self._stopped: frozenset[str] = frozenset()  # last `on_unassigned`: their streams are stopped
        self._over_limit: list[str] = []
        # Until the precise manager has planned once, "not assigned" means "not decided yet": a restart must
        # not hand every precise address to the wide tier (and wipe its persisted engine state).
        self._precise_planned = False
        self._wake = asyncio.Event()
        self.handovers = {"to_precise": 0, "to_wide": 0}

    # ------------------------------------------------------------------ reading

    def tier(self, address: str) -> TierName | None:
        return self._tiers.get(address)

    def tiers(self) -> dict[str, TierName]:
        """Address → `precise`, `wide` or `handover` (a slot was granted, the precise stream is not ready yet)."""
        return dict(self._tiers)

    def status(self) -> dict[str, Any]:
        counts: dict[str, int] = {"precise": 0, "wide": 0, "handover": 0}
        for tier in self._tiers.values():
            counts[tier] += 1
        return {
            **counts,
            "over_limit": len(self._over_limit),
            "over_limit_addresses": self._over_limit[:50],
            "handovers": dict(self.handovers),
        }

    # ------------------------------------------------------------------ events

    async def on_unassigned(self, addresses: frozenset[str]) -> None:
        """`PreciseManager` callback: these candidates have no precise stream (any old one is stopped)."""
        self._stopped = addresses
        self._precise_planned = True
        self._wake.set()

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_book(), name="planner:book")
            while True:
                self._wake.clear()
                await self.replan()
                waiting = bool(self._leaving) or any(t == "handover" for t in self._tiers.values())
                try:
                    async with asyncio.timeout(POLL_S if waiting else None):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _watch_book(self) -> None:
        version = self._book.version
        while True:
            version = await self._book.wait_changed(version)
            self._wake.set()

    async def replan(self) -> None:
        """Bring tracker, engine and wide manager in line with the book and the precise assignments."""
        if self.precise is not None and not self._precise_planned:
            return
        now = self._wall_ms()
        out: list[Signal] = []
        entries = self._book.entries()
        ranked = sorted(entries.values(), key=rank)
        tracked = ranked[: self._max]
        self._over_limit = [e.address for e in ranked[self._max :]]
        wanted = {e.address for e in tracked}
        for address in [a for a in self._tiers if a not in wanted]:
            out.extend(self._tracker.remove_address(address, now))
            del self._tiers[address]
            self._leaving.pop(address, None)
            self._handover_base.pop(address, None)
        assigned = self.precise.assigned() if self.precise is not None else {}
        for entry in tracked:
            out.extend(self._plan_one(entry, entry.address in assigned, now))
        self._wide.set_addresses({a: ("precise" if t != "wide" else "wide") for a, t in self._tiers.items()})
        self._export()
        if out:
            await self._emit(out)

    def _plan_one(self, entry: WatchedAddress, assigned: bool, now: int) -> list[Signal]:
        address = entry.address
        self._tracker.add_address(address, entry.label or None)
        current = self._tiers.get(address)
        if assigned:
            self._leaving.pop(address, None)
            if current is None or current == "wide":
                self._tracker.set_owner(address, "precise", now)
                self._tiers[address] = "handover"
                base = self._watch.watermark(address)
                self._handover_base[address] = base.time if base is not None else None
                log.info("handover to precise started", address=address)
            if self._tiers[address] == "handover" and self._precise_ready(address):
                return self._finish_to_precise(address)
            return []
        if current == "wide":
            return []
        if current is not None:  # precise or handover: make sure its stream is really gone
            left = self._leaving.setdefault(address, self._clock())
            if address not in self._stopped and self._clock() - left < HANDOVER_GRACE_S:
                return []
            self._leaving.pop(address, None)
        return self._to_wide(entry, now, first=current is None)

    def _precise_ready(self, address: str) -> bool:
        stream = self.precise.stream(address) if self.precise is not None else None
        return stream is not None and stream.connection.state is ConnState.LIVE and stream.recoveries >= 1

    def _finish_to_precise(self, address: str) -> list[Signal]:
        watermark = self._watch.watermark(address)
        base = self._handover_base.pop(address, None)
        if watermark is None:
            upto = 2**63 - 1  # the precise tier has processed nothing yet: nothing held is covered by it
        elif base is None:
            # A first snapshot only seeds the engine (no signals for anything in it): the tape's held blocks up to
            # the seed are reported by nobody else. Later fills arrive on the stream and are the precise tier's,
            # also those processed before this look: the seed, not the current watermark (nor the dedup floor, which
            # a very active address can raise past it).
            seed = self._watch.seed_time(address)
            upto = seed if seed is not None else watermark.floor
        else:
            # The engine knew the address: everything after its old watermark is backfilled as precise signals.
            upto = base
        self._tiers[address] = "precise"
        self.handovers["to_precise"] += 1
        released = self._tracker.release_held(address, upto)
        log.info("handover to precise done", address=address, floor=upto, released=len(released))
        return released

    def _to_wide(self, entry: WatchedAddress, now: int, *, first: bool) -> list[Signal]:
        address = entry.address
        self._handover_base.pop(address, None)
        out: list[Signal] = []
        flushed, cut = self._watch.hand_to_wide(address, now)
        out.extend(flushed)
        out.extend(self._tracker.set_owner(address, "wide", now, cut=cut))
        self._tiers[address] = "wide"
        if not first:
            self.handovers["to_wide"] += 1
            log.info("handover to wide done", address=address, cut=cut, signals=len(out))
        return out

    def _export(self) -> None:
        gauge = self._metrics.addresses_by_tier
        counts = {"precise": 0, "wide": 0, "handover": 0}
        for tier in self._tiers.values():
            counts[tier] += 1
        gauge.labels(tier="wide", state="tracked").set(counts["wide"])
        gauge.labels(tier="wide", state="handover").set(counts["handover"])
        gauge.labels(tier="wide", state="shadow").set(counts["precise"])
        gauge.labels(tier="wide", state="over_limit").set(len(self._over_limit))

    async def _emit(self, signals: list[Signal]) -> None:
        await self._on_signals(signals)
