"""The precise tier: which watched addresses get one of the `user_slots` connections, and what became of the rest.

Candidates are the book's `precise` and `auto` addresses, ranked by priority (higher first), `precise`
before `auto` on a tie, then by address for a stable order. The top `user_slots` get a `UserStream`;
a higher-priority address added later takes the slot of the lowest-ranked one.

Per-IP budgets are asked first (distinct users, subscriptions): a local refusal, or the exchange's
own `Cannot track more than N total users.`, marks the address *over budget*: its slot is freed, the
address is retried after `hyperliquid.over_budget_retry` (it then only takes a free slot, it does
not push a running stream out), and meanwhile it is reported, never silently dropped. Everything not
on a precise connection (beyond the slots, or over budget) is *unassigned*: visible in `status()` and
the `addresses_by_tier` metric, and handed to `on_unassigned` (the wide tier, once it exists).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import HyperliquidConfig
from hl_monitor.domain.address import WatchedAddress
from hl_monitor.domain.publication import FillSink
from hl_monitor.domain.signal import SignalSink
from hl_monitor.feeds.connection import ConnectionBudget, ConnState
from hl_monitor.feeds.holdings import NO_HOLDINGS, HoldingsIntake
from hl_monitor.feeds.supervisor import Supervisor
from hl_monitor.feeds.user_stream import FLOW_COIN, InfoApi, Tracker, UserStream, user_subscriptions
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = ["AddressView", "OverBudget", "PreciseBudget", "PreciseManager", "rank"]

log = get_logger(__name__)


class AddressView(Protocol):
    """The part of `AddressBook` the planner reads."""

    @property
    def version(self) -> int: ...

    def entries(self) -> Mapping[str, WatchedAddress]: ...

    async def wait_changed(self, seen_version: int) -> int: ...


class PreciseBudget(ConnectionBudget, Protocol):
    """The part of `feeds.budget.Budgets` the precise tier uses."""

    def try_add_user(self, address: str) -> bool: ...

    def release_user(self, address: str, *, after_close: bool = False) -> None: ...

    def try_add_subscriptions(self, n: int = 1) -> bool: ...

    def release_subscriptions(self, n: int = 1, *, after_close: bool = False) -> None: ...


@dataclass(slots=True)
class OverBudget:
    reason: str  # user_cap (the exchange said so) | local_user_cap | local_subscription_cap
    since: float
    retry_at: float
    refusals: int = 1  # since the address was added to the book


@dataclass(slots=True)
class _Assignment:
    entry: WatchedAddress
    slot: int
    subscriptions: int
    stream: UserStream
    task: asyncio.Task[None] | None = None
    started: bool = False


def rank(entry: WatchedAddress) -> tuple[int, bool, str]:
    return (-entry.priority, entry.tier != "precise", entry.address)


class PreciseManager:
    """Plans and runs the precise tier; `run()` until cancelled. See the module docstring."""

    def __init__(
        self,
        cfg: HyperliquidConfig,
        book: AddressView,
        *,
        tracker: Tracker,
        info: InfoApi,
        budget: PreciseBudget,
        metrics: Metrics,
        on_signals: SignalSink,
        on_unassigned: Callable[[frozenset[str]], Awaitable[None]] | None = None,
        holdings: HoldingsIntake = NO_HOLDINGS,
        on_fills: FillSink | None = None,
        flow_coin: str = FLOW_COIN,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _wall_ms,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = cfg
        self._book = book
        self._tracker = tracker
        self._info = info
        self._budget = budget
        self._metrics = metrics
        self._on_signals = on_signals
        self._on_unassigned = on_unassigned
        self._flow_coin = flow_coin
        self._clock = clock
        self._wall_ms = wall_ms
        self._holdings = holdings
        self._on_fills = on_fills  # handed to every stream: where the fills its engine accepted go
        self._rng = rng or random.Random()
        self._assigned: dict[str, _Assignment] = {}
        self._over_budget: dict[str, OverBudget] = {}
        self._refusals: dict[str, int] = {}  # refusals per address while it is watched (a retry keeps the count)
        self._unassigned: frozenset[str] = frozenset()
        self._reported: frozenset[str] | None = None
        self._wake = asyncio.Event()
        self._sup: Supervisor | None = None

    # ------------------------------------------------------------------ reading

    def assigned(self) -> Mapping[str, int]:
        """Address → slot index."""
        return {address: a.slot for address, a in self._assigned.items()}

    def over_budget(self) -> Mapping[str, OverBudget]:
        return dict(self._over_budget)

    def unassigned(self) -> frozenset[str]:
        """Candidates without a precise connection (beyond the slots or over budget)."""
        return self._unassigned

    def stream(self, address: str) -> UserStream | None:
        assignment = self._assigned.get(address.lower())
        return None if assignment is None else assignment.stream

    def not_live(self) -> list[str]:
        """Assigned addresses whose connection is not live right now (stale, reconnecting): for readiness."""
        return sorted(a for a, x in self._assigned.items() if x.stream.connection.state is not ConnState.LIVE)

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "slots": self._cfg.user_slots,
            "assigned": [a.stream.status() for a in sorted(self._assigned.values(), key=lambda a: a.slot)],
            "over_budget": [
                {
                    "address": address,
                    "reason": ob.reason,
                    "refusals": ob.refusals,
                    "since_s": round(now - ob.since, 1),
                    "retry_in_s": round(max(0.0, ob.retry_at - now), 1),
                }
                for address, ob in sorted(self._over_budget.items())
            ],
            "unassigned": sorted(self._unassigned - self._over_budget.keys()),
        }

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        cfg = self._cfg
        async with Supervisor(
            self._metrics,
            initial_delay=cfg.reconnect_initial_delay,
            max_delay=cfg.reconnect_max_delay,
            healthy_after=cfg.healthy_after,
            clock=self._clock,
            rng=self._rng,
        ) as sup:
            self._sup = sup
            sup.spawn("precise_book_watch", self._watch_book)
            try:
                while True:
                    self._wake.clear()
                    await self._reconcile()
                    await self._sleep()
            finally:
                await sup.stop_all()
                for address in list(self._assigned):
                    self._release(self._assigned.pop(address))
                self._sup = None

    async def _watch_book(self) -> None:
        version = self._book.version
        while True:
            version = await self._book.wait_changed(version)
            self._wake.set()

    async def _sleep(self) -> None:
        deadlines = [ob.retry_at for ob in self._over_budget.values()]
        timeout = None if not deadlines else max(0.0, min(deadlines) - self._clock())
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _report_over_budget(self, address: str, reason: str) -> None:
        """Called by a stream refused by the exchange, and for local refusals."""
        now = self._clock()
        refusals = self._refusals[address] = self._refusals.get(address, 0) + 1
        self._over_budget[address] = OverBudget(reason, now, now + self._cfg.over_budget_retry, refusals)
        self._metrics.budget_refusals.labels(budget=f"precise_{reason}").inc()
        self._export()  # the gauges agree with over_budget() at once, not only after the next reconcile pass
        log.warning(
            "address over budget; retrying later", address=address, reason=reason, retry_in=self._cfg.over_budget_retry
        )
        self._wake.set()

    async def _reconcile(self) -> None:
        assert self._sup is not None
        now = self._clock()
        for address, assignment in list(self._assigned.items()):
            if assignment.task is not None and assignment.task.done():
                del self._assigned[address]
                self._release(assignment)
        entries = self._book.entries()
        for address in self._over_budget.keys() - entries.keys():
            del self._over_budget[address]
        for address in self._refusals.keys() - entries.keys():
            del self._refusals[address]
        candidates = [e for e in entries.values() if e.tier != "wide"]
        fresh = sorted((e for e in candidates if e.address not in self._over_budget), key=rank)
        due = sorted(
            (e for e in candidates if e.address in self._over_budget and self._over_budget[e.address].retry_at <= now),
            key=rank,
        )
        top = {e.address for e in fresh[: self._cfg.user_slots]}
        for address in list(self._assigned):
            if address not in top:
                # Removed (after the book's grace), moved to the wide tier, refused by the exchange, or
                # outranked: a running address is fresh, so `slots` fresh addresses rank above it.
                await self._stop(address)
        for entry in (*fresh, *due):
            if len(self._assigned) >= self._cfg.user_slots:
                break
            if entry.address not in self._assigned and (entry.address not in self._over_budget or entry in due):
                self._start(entry)
        self._unassigned = frozenset(e.address for e in candidates if e.address not in self._assigned)
        self._export()
        if self._on_unassigned is not None and self._unassigned != self._reported:
            self._reported = self._unassigned
            await self._on_unassigned(self._unassigned)

    def _start(self, entry: WatchedAddress) -> None:
        assert self._sup is not None
        address = entry.address
        used = {a.slot for a in self._assigned.values()}
        slot = min(set(range(self._cfg.user_slots)) - used)
        subscriptions = len(user_subscriptions(address, self._flow_coin))
        if not self._budget.try_add_user(address):
            self._report_over_budget(address, "local_user_cap")
            return
        if not self._budget.try_add_subscriptions(subscriptions):
            self._budget.release_user(address)
            self._report_over_budget(address, "local_subscription_cap")
            return
        self._over_budget.pop(address, None)  # a retry: if the exchange refuses again, the stream says so
        assignment = _Assignment(entry, slot, subscriptions, self._new_stream(address, slot))

        async def run_stream() -> None:
            # A crashed stream is rebuilt (fresh connection, then gap recovery) when the supervisor restarts it.
            if assignment.started:
                assignment.stream = self._new_stream(address, slot)
            assignment.started = True
            await assignment.stream.run()

        self._assigned[address] = assignment
        assignment.task = self._sup.spawn(f"user_stream:{address}", run_stream)
        assignment.task.add_done_callback(lambda _: self._wake.set())
        log.info("precise stream assigned", address=address, slot=slot, priority=entry.priority, tier=entry.tier)

    def _new_stream(self, address: str, slot: int) -> UserStream:
        return UserStream(
            address,
            slot,
            cfg=self._cfg,
            tracker=self._tracker,
            info=self._info,
            budget=self._budget,
            metrics=self._metrics,
            on_signals=self._on_signals,
            on_over_budget=self._report_over_budget,
            holdings=self._holdings,
            on_fills=self._on_fills,
            flow_coin=self._flow_coin,
            wall_ms=self._wall_ms,
            rng=self._rng,
        )

    async def _stop(self, address: str) -> None:
        assert self._sup is not None
        assignment = self._assigned.pop(address)
        await self._sup.stop(f"user_stream:{address}")
        self._release(assignment)
        log.info("precise stream released", address=address, slot=assignment.slot)

    def _release(self, assignment: _Assignment) -> None:
        # The server frees a closed socket's users and subscriptions a moment after the close.
        self._budget.release_subscriptions(assignment.subscriptions, after_close=True)
        self._budget.release_user(assignment.entry.address, after_close=True)

    def _export(self) -> None:
        gauge = self._metrics.addresses_by_tier
        gauge.labels(tier="precise", state="assigned").set(len(self._assigned))
        gauge.labels(tier="precise", state="over_budget").set(len(self._over_budget))
        gauge.labels(tier="precise", state="unassigned").set(len(self._unassigned - self._over_budget.keys()))
