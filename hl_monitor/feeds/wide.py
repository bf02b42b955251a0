"""The wide tier's REST side: bootstrap and periodic reconcile of every tracked address's positions.

Each tracked address is read with `clearinghouseState` for every perp dex plus `spotClearinghouseState`
(2 weight each): first as soon as it is added (bootstrap), then every `wide.reconcile_interval`, oldest
first. Fair share: all wide reads together never take more than `wide.rest_share` of the per-IP REST
weight a minute (a paced schedule: the next read starts when the previous one's weight has "drained" at
that rate), every read is low priority (the budget keeps `budget_high_priority_reserve` for precise gap
recovery) and the shared `Budgets` window is the hard limit nobody can exceed. With N addresses the
effective interval is max(`reconcile_interval`, N × weight per read ÷ share rate), shown on `/status`.

A REST answer is compared with the tape only when it is safe: `wide.reconcile_settle` after the answer
(for trades still on the network), once the tape has handed every trade up to the answer's window to the
tracker (`MarketTape.caught_up`: under load the service can be seconds behind the socket, and a trade the
answer already includes would otherwise be applied on top of it), and only if the tape has been
continuous since before the request (`MarketTape.continuous_since_ms`); otherwise it is dropped and the
read is retried soon.
The tracker does the arithmetic (`TapeTracker.apply_rest`): trades inside the request's window are
ambiguous and skip their position this round; a drift is corrected, counted (`drift_corrections`) and
reported as a `reconcile` signal.

Engine-trade labels. The tracker parks a tape block that holds an engine trade (all-zero hash: liquidation,
ADL, TWAP slice) for at most `wide.engine_label_wait` and asks for the address's fills from the block's time
on (`take_label_requests`, polled with the answers). Those reads go ahead of reconcile reads, in the same
paced schedule and share, at low priority (`userFillsByTime`, 20 weight + 1 per 20 fills): with the default
share one read every 2 s. Requests of one address are merged into one read, which covers every fill up to
when it is sent, so the later blocks of a burst are labelled from it too. A read that could not start
before the wait ends is skipped, and one still unanswered when it ends is abandoned: the tracker has let the
signal go unlabelled by then. An answer goes back to the tracker (`apply_labels`), which labels and releases
the parked signals.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from hl_monitor.clock import Clock
from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import HyperliquidConfig, WideConfig
from hl_monitor.domain.address import Priority, TrackedBy
from hl_monitor.domain.signal import Signal, SignalSink
from hl_monitor.errors import HlMonitorError
from hl_monitor.feeds.holdings import NO_HOLDINGS, HoldingsIntake
from hl_monitor.hyperliquid.constants import info_weight
from hl_monitor.hyperliquid.info import FillHistory, merge_fill_histories
from hl_monitor.hyperliquid.protocol import ClearinghouseState, Fill, SpotClearinghouseState
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = ["LABEL_READ_WEIGHT", "READ_WEIGHT_PER_DEX", "WideManager"]

log = get_logger(__name__)

# clearinghouseState and spotClearinghouseState both weigh 2 (docs/protocol.md §4).
READ_WEIGHT_PER_DEX: Final = 2
# Exchange time vs our wall clock (NTP skew, block time resolution): trades this close to a request's
# send/receive time may or may not be in its answer.
AMBIGUITY_MARGIN_MS: Final = 500
# A read that failed, or could not be compared (tape gap, ambiguous trades), is retried after this.
RETRY_S: Final = 5.0
# How often pending answers are checked for their settle time (real time, not the budget clock).
EVALUATE_EVERY_S: Final = 0.05
# Answers waiting for their settle time and the tape; beyond this, reads wait (one read is in flight at a time).
MAX_PENDING: Final = 1024
# What a label read is paced at before its answer is known: the base weight of `userFillsByTime`
# (docs/protocol.md §4); the per-20-fills surcharge is settled once the answer is in.
LABEL_READ_WEIGHT: Final = info_weight("userFillsByTime")


class WideInfoApi(Protocol):
    async def clearinghouse_state(
        self, user: str, dex: str = "", *, priority: Priority = ...
    ) -> ClearinghouseState: ...
    async def spot_clearinghouse_state(self, user: str, *, priority: Priority = ...) -> SpotClearinghouseState: ...
    async def user_fills_by_time(
        self, user: str, start_ms: int, end_ms: int | None = None, *, dex: str = "", priority: Priority = ...
    ) -> FillHistory: ...


class LabelRequest(Protocol):
    """A parked tape block's read (`tracking.tape.LabelRequest`)."""

    @property
    def address(self) -> str: ...
    @property
    def dexes(self) -> frozenset[str]: ...
    @property
    def start_ms(self) -> int: ...
    @property
    def deadline_ms(self) -> int: ...


class TapeView(Protocol):
    def continuous_since_ms(self) -> int | None: ...
    def caught_up(self, t_ms: int) -> bool: ...


class _DriftStats(Protocol):
    @property
    def drifts_perp(self) -> int: ...
    @property
    def drifts_spot(self) -> int: ...
    @property
    def bootstraps(self) -> int: ...


class WideTracker(Protocol):
    """The tape tracker's REST side (`tracking.tape.TapeTracker`)."""

    @property
    def stats(self) -> _DriftStats: ...

    def is_bootstrapped(self, address: str) -> bool: ...

    def apply_read(
        self,
        address: str,
        states: Sequence[tuple[str, ClearinghouseState]],
        spot: SpotClearinghouseState | None,
        *,
        window: tuple[int, int],
        now_ms: int,
    ) -> list[Signal]: ...

    def take_label_requests(self) -> Sequence[LabelRequest]: ...
    def apply_labels(self, address: str, fills: Sequence[Fill], now_ms: int) -> list[Signal]: ...


@dataclass(slots=True)
class _LabelRead:
    """Every label request of one address not read yet, merged: the earliest block, the latest deadline."""

    address: str
    start_ms: int
    deadline_ms: int
    dexes: set[str]

    def merge(self, other: _LabelRead | LabelRequest) -> None:
        self.start_ms = min(self.start_ms, other.start_ms)
        self.deadline_ms = max(self.deadline_ms, other.deadline_ms)
        self.dexes.update(other.dexes)


@dataclass(slots=True)
class _Read:
    """One REST answer waiting until the tape has caught up with its window."""

    address: str
    states: list[tuple[str, ClearinghouseState]]
    spot: SpotClearinghouseState | None
    window: tuple[int, int]  # (sent, received) on the wall clock, widened by `AMBIGUITY_MARGIN_MS`


@dataclass(slots=True)
class _Entry:
    owner: TrackedBy
    due: float
    version: int = 0
    reads: int = 0
    drifts: int = 0
    last_read_ms: int | None = None
    errors: int = 0


class WideManager:
    """Schedules REST reads of tracked addresses and applies them; `run()` until cancelled."""

    def __init__(
        self,
        cfg: WideConfig,
        hl: HyperliquidConfig,
        *,
        tracker: WideTracker,
        info: WideInfoApi,
        tape: TapeView,
        clock: Clock,
        metrics: Metrics,
        on_signals: SignalSink,
        dexes: Callable[[], Sequence[str]],
        holdings: HoldingsIntake = NO_HOLDINGS,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self._cfg = cfg
        self._holdings = holdings
        self._tracker = tracker
        self._info = info
        self._tape = tape
        self._clock = clock
        self._metrics = metrics
        self._on_signals = on_signals
        self._dexes = dexes
        self._wall_ms = wall_ms
        # Weight per second the wide tier may spend.
        self._rate = cfg.rest_share * hl.rest_weight_per_minute / 60.0
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = itertools.count()
        self._next_slot = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._pending: deque[_Read] = deque()
        self._labels: dict[str, _LabelRead] = {}  # by address, oldest first
        self.reads = 0
        self.label_reads = 0
        self.weight_spent = 0

    # ------------------------------------------------------------------ addresses

    def set_addresses(self, owners: Mapping[str, TrackedBy]) -> None:
        """Every address the tracker follows and which tier owns it (the planner calls this on each change)."""
        now = self._clock.now()
        for address in self._entries.keys() - owners.keys():
            del self._entries[address]
        for address, owner in owners.items():
            entry = self._entries.get(address)
            if entry is None:
                self._entries[address] = entry = _Entry(owner, now)
                self._push(address, entry)
            entry.owner = owner
        self._wake()

    def _push(self, address: str, entry: _Entry) -> None:
        entry.version += 1
        heapq.heappush(self._heap, (entry.due, next(self._seq), address, entry.version))

    def _schedule(self, address: str, delay: float) -> None:
        entry = self._entries.get(address)
        if entry is not None:
            entry.due = self._clock.now() + delay
            self._push(address, entry)
            self._wake()  # the read loop may be asleep until a later due time (a retry from `_apply`)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ reading

    @property
    def sleeping(self) -> bool:
        """Waiting for the clock (its pacing or the next due read), not for a reply."""
        return self._waiter is not None and not self._waiter.done()

    def read_weight(self) -> int:
        return READ_WEIGHT_PER_DEX * (len(self._dexes()) + 1)

    def effective_interval(self) -> float:
        """Seconds between two reads of one address with the current address count and share."""
        if self._rate <= 0:
            return math.inf
        return max(self._cfg.reconcile_interval, len(self._entries) * self.read_weight() / self._rate)

    def address_status(self, address: str) -> dict[str, Any] | None:
        entry = self._entries.get(address)
        if entry is None:
            return None
        return {
            "owner": entry.owner,
            "bootstrapped": self._tracker.is_bootstrapped(address),
            "reads": entry.reads,
            "drifts": entry.drifts,
            "last_read_ms": entry.last_read_ms,
            "read_errors": entry.errors,
        }

    def status(self) -> dict[str, Any]:
        bootstrapped = sum(1 for a in self._entries if self._tracker.is_bootstrapped(a))
        return {
            "addresses": len(self._entries),
            "bootstrapped": bootstrapped,
            "reads": self.reads,
            "weight_spent": self.weight_spent,
            "weight_per_read": self.read_weight(),
            "rest_share_per_minute": round(self._rate * 60),
            "effective_interval_s": round(self.effective_interval(), 1),
            "pending_answers": len(self._pending),
            "label_reads": self.label_reads,
            "labels_waiting": len(self._labels),
        }

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._evaluate_loop(), name="wide:evaluate")
            while True:
                address = await self._next_due()
                if isinstance(address, _LabelRead):
                    await self._start_label_read(address, tg)
                    continue
                if not self._dexes():
                    self._schedule(address, RETRY_S / 5)  # a read must cover every dex: the coin list is not loaded
                    continue
                await self._pace(self.read_weight())
                if address in self._entries:
                    await self._read(address)

    async def _sleep(self, delay: float | None) -> None:
        """Sleep on the budget clock (tests drive it by hand), None = until woken; `set_addresses` cuts it short."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()

        def done() -> None:
            if not waiter.done():
                waiter.set_result(None)

        timer = None if delay is None else self._clock.call_later(delay, done)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    async def _next_due(self) -> str | _LabelRead:
        """The next read: a label read if one is waiting (a signal is held for it), else the next due address."""
        while True:
            if self._labels:
                address = next(iter(self._labels))
                return self._labels.pop(address)
            while self._heap:
                due, _, address, version = self._heap[0]
                entry = self._entries.get(address)
                if entry is None or entry.version != version:
                    heapq.heappop(self._heap)
                    continue
                now = self._clock.now()
                if due <= now:
                    heapq.heappop(self._heap)
                    return address
                await self._sleep(due - now)
                break
            else:
                await self._sleep(None)

    async def _pace(self, weight: int) -> None:
        now = self._clock.now()
        start = max(now, self._next_slot)
        self._next_slot = start + weight / self._rate
        while (now := self._clock.now()) < start:
            await self._sleep(start - now)  # a wake-up from `set_addresses` must not skip the pacing

    async def _read(self, address: str) -> None:
        entry = self._entries[address]
        if len(self._pending) >= MAX_PENDING:
            # Answers are waiting for the tape to catch up: another read now would only be dropped.
            self._metrics.tape_events.labels(kind="answer_dropped").inc()
            self._schedule(address, RETRY_S)
            return
        dexes = list(self._dexes())
        sent = self._wall_ms()
        try:
            perps, spot = await asyncio.gather(
                asyncio.gather(*(self._info.clearinghouse_state(address, dex, priority="low") for dex in dexes)),
                self._info.spot_clearinghouse_state(address, priority="low"),
            )
        except (HlMonitorError, OSError) as exc:
            entry.errors += 1
            self._metrics.tape_events.labels(kind="read_error").inc()
            log.warning("wide position read failed; retrying", address=address, error=repr(exc), retry_in=RETRY_S)
            self._schedule(address, RETRY_S)
            return
        received = self._wall_ms()
        self.reads += 1
        self.weight_spent += self.read_weight()
        states = list(zip(dexes, perps, strict=True))
        window = (sent - AMBIGUITY_MARGIN_MS, received + AMBIGUITY_MARGIN_MS)
        self._pending.append(_Read(address, states, spot, window))
        entry.reads += 1
        entry.last_read_ms = received
        self._schedule(address, self._cfg.reconcile_interval)

    def _take_label_requests(self) -> None:
        for req in self._tracker.take_label_requests():
            job = self._labels.get(req.address)
            if job is None:
                self._labels[req.address] = _LabelRead(req.address, req.start_ms, req.deadline_ms, set(req.dexes))
            else:
                job.merge(req)
            self._wake()

    async def _start_label_read(self, job: _LabelRead, tg: asyncio.TaskGroup) -> None:
        """Pace one label read and start it, unless it could not begin before its signals stop waiting."""
        left = (job.deadline_ms - self._wall_ms()) / 1000
        if max(0.0, self._next_slot - self._clock.now()) >= left:
            self._metrics.tape_events.labels(kind="label_read_skipped").inc()
            return
        await self._pace(LABEL_READ_WEIGHT)
        # Blocks parked while this read waited for its slot ride along: the read covers every fill up to now.
        self._take_label_requests()
        later = self._labels.pop(job.address, None)
        if later is not None:
            job.merge(later)
        left = (job.deadline_ms - self._wall_ms()) / 1000
        if left <= 0:
            self._metrics.tape_events.labels(kind="label_read_skipped").inc()
            return
        tg.create_task(self._label_read(job, left), name=f"wide:label:{job.address}")

    async def _label_read(self, job: _LabelRead, within: float) -> None:
        try:
            async with asyncio.timeout(within):
                history = merge_fill_histories(
                    await asyncio.gather(
                        *(
                            self._info.user_fills_by_time(job.address, job.start_ms, dex=dex, priority="low")
                            for dex in sorted(job.dexes)
                        )
                    )
                )
        except TimeoutError:
            # The signals went out unlabelled at the deadline (the tracker counts them); nothing left to do.
            self._metrics.tape_events.labels(kind="label_read_late").inc()
            return
        except (HlMonitorError, OSError) as exc:
            self._metrics.tape_events.labels(kind="label_read_error").inc()
            log.warning("engine-trade label read failed", address=job.address, error=repr(exc))
            return
        weight = info_weight("userFillsByTime", len(history.fills)) + LABEL_READ_WEIGHT * (history.requests - 1)
        if self._rate > 0:
            self._next_slot += (weight - LABEL_READ_WEIGHT) / self._rate  # the surcharge, paid by later reads
        self.weight_spent += weight
        self.label_reads += 1
        self._metrics.tape_events.labels(kind="label_read").inc()
        await self._emit(self._tracker.apply_labels(job.address, history.fills, self._wall_ms()))

    async def _evaluate_loop(self) -> None:
        settle_ms = round(self._cfg.reconcile_settle * 1000)
        while True:
            await asyncio.sleep(EVALUATE_EVERY_S)
            self._take_label_requests()
            now = self._wall_ms()
            while self._pending:
                hi = self._pending[0].window[1]
                if hi + settle_ms > now or not self._tape.caught_up(hi):
                    break
                await self._apply(self._pending.popleft(), now)

    async def _apply(self, read: _Read, now: int) -> None:
        address = read.address
        entry = self._entries.get(address)
        if entry is None:
            return
        bootstrapped = self._tracker.is_bootstrapped(address)
        since = self._tape.continuous_since_ms()
        if bootstrapped and (since is None or since > read.window[0]):
            # The tape may have missed trades the answer includes: comparing now would invent a drift.
            self._metrics.tape_events.labels(kind="reconcile_deferred").inc()
            self._schedule(address, RETRY_S)
            return
        stats = self._tracker.stats
        before = (stats.drifts_perp, stats.drifts_spot, stats.bootstraps)
        await self._holdings.on_rest(address, read.states, read.spot, now)
        signals = self._tracker.apply_read(address, read.states, read.spot, window=read.window, now_ms=now)
        perp, spot, boots = stats.drifts_perp - before[0], stats.drifts_spot - before[1], stats.bootstraps - before[2]
        if perp:
            self._metrics.drift_corrections.labels(asset_type="futures").inc(perp)
        if spot:
            self._metrics.drift_corrections.labels(asset_type="spot").inc(spot)
        entry.drifts += perp + spot
        if perp or spot:
            log.info("wide position drift corrected", address=address, perp=perp, spot=spot, signals=len(signals))
        if not bootstrapped and not boots:
            self._schedule(address, RETRY_S / 5)  # trades inside the window: read again shortly
        await self._emit(signals)

    async def _emit(self, signals: list[Signal]) -> None:
        if signals:
            await self._on_signals(signals)
