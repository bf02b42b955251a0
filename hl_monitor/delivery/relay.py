"""The outbox relay shared by signals and publications: every persisted message reaches JetStream, with the
same id, however often NATS goes away (docs/architecture.md §3).

The store (a table with a published mark) is the truth; memory is only the fast path. Callers hand a message
to the storage writer first and then `submit()` it here. The relay publishes held messages concurrently (at
most `nats.max_inflight` un-acked), tells the writer on each ack, and on a failure keeps the message and
retries after a jittered exponential backoff, oldest first. Every `nats.outbox_scan_interval` (and at start) it
re-reads messages the store still has unpublished: those a crash or restart left behind, and those that did
not fit in memory. When memory is full (`nats.outbox_size`), `submit()` waits briefly if NATS is up but slow
(backpressure), and otherwise leaves the message to the store scan instead of stalling the tracker during an
outage (counted as spilled). JetStream dedup by `Nats-Msg-Id` turns every re-publish into one stored message.

An ack is not a disk write: JetStream acknowledges before it writes, and a server that restarts after an OS crash
or a restore (or a cluster leader that never got the write) may lack messages it acknowledged. The relay watches
for that — the server's id changed (a restart or another node), the stream's last sequence fell below one it
acknowledged, or a new ack re-used a sequence it already gave another id — and then re-publishes every message
acknowledged within `nats.replay_window` from the store, with its id: JetStream absorbs what it still has,
the rest comes back (counted in `replays_total` and `replayed_total`; README "Durability").

Connected is not publishing: during a stream leader election the connection stays up and no publish is
answered. The relay records its attempts, failures and acks in `publish_health`
(`delivery.publish_health.PublishHealth`), which readiness reads (docs/architecture.md §8).

`Relay` is the mechanism; a subclass says what a message is: its id, how it is published, where unpublished
ones are read and acks recorded, and which metrics count it (`delivery.outbox.Outbox` for signals,
`delivery.publications.PublicationOutbox` for position events and alerts).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Final, Generic, Protocol, TypeVar

from cachetools import LRUCache
from nats.js.api import PubAck
from prometheus_client import Counter, Gauge

from hl_monitor.clock import Clock, MonotonicClock
from hl_monitor.clock import wall_ms as _now_ms
from hl_monitor.config import NatsConfig
from hl_monitor.delivery.publish_health import PublishHealth
from hl_monitor.errors import PublishError
from hl_monitor.logging import get_logger

__all__ = ["Link", "RecentKeys", "Relay", "RelayMetrics", "ReplayReason"]

log = get_logger(__name__)

# A burst on a slow (connected) NATS is absorbed by waiting this long for room; past it the store carries it.
SUBMIT_WAIT_S: Final = 1.0
# Acked ids are skipped by the store scan for this long: the writer persists the published mark in batches,
# so a scan right after an ack could still see the row unpublished (it would only cost a duplicate ack).
RECENT_ACK_TTL_S: Final = 60.0
RETRY_JITTER: Final = 0.2  # ±20 % spreads retries of several instances after a shared NATS outage
DRAIN_POLL_S: Final = 0.05  # how often drain() re-checks that NATS is still up while it waits
# Rows re-read per scan: decoding and publishing them must not hold the loop; the next batch is read as soon
# as this one is acknowledged.
SCAN_BATCH: Final = 1000
# Publishes started per loop step at most: ~1 ms of work, and one NATS socket write carries them all.
DISPATCH_BURST: Final = 32
# Stream sequences remembered with the id they were acknowledged for: a regression re-uses the newest ones, and
# this covers minutes of a busy stream.
SEQ_MEMORY: Final = 100_000
MS_PER_S: Final = 1000
_MONOTONIC: Final = MonotonicClock()  # stateless: one instance serves every relay

# Why a replay ran (the `reason` label of `replays_total`).
ReplayReason = str
SERVER_CHANGED: Final[ReplayReason] = "server_changed"  # the connection is on another server (or a restarted one)
STREAM_REGRESSED: Final[ReplayReason] = "stream_regressed"  # last sequence below one we had acknowledged
SEQUENCE_REUSED: Final[ReplayReason] = "sequence_reused"  # a new ack re-used a sequence given to another id

T = TypeVar("T")


class Link(Protocol):
    """The NATS connection state the relay waits on (`delivery.publisher.Publisher`)."""

    @property
    def is_connected(self) -> bool: ...

    async def wait_connected(self) -> None: ...

    @property
    def server_id(self) -> str | None:
        """The id of the server the connection is on (a restarted server has a new one); None before connecting."""
        ...

    async def stream_last_seq(self, stream: str) -> int:
        """The stream's last sequence now (0 when the stream is gone)."""
        ...


class RelayMetrics(Protocol):
    """Where one relay counts: its depth gauge, its spill counter, and its own faults by kind."""

    @property
    def depth(self) -> Gauge: ...

    @property
    def spilled(self) -> Counter: ...

    def fault(self, kind: str) -> None:
        """One failure outside the publish itself: `mark_published`, `outbox_scan`, `replay` or `unexpected`."""
        ...

    def replayed(self, reason: ReplayReason, count: int) -> None:
        """One replay for `reason` that re-published `count` acknowledged messages."""
        ...


async def _wait_event(event: asyncio.Event, within: float) -> None:
    """Wait for `event` at most `within` s.

    Not `asyncio.wait_for`: on Python 3.11 it swallows a cancel that arrives just as the event is set (it
    returns the result instead), and a loop around it then never stops — `run()`'s TaskGroup waits forever.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            await event.wait()


@dataclasses.dataclass(slots=True)
class _Replay:
    reason: ReplayReason
    since_ms: int
    cursor: object | None = None
    rescanned: bool = False
    count: int = 0


class RecentKeys:
    """Keys remembered for at least `ttl` seconds and at most twice as long; at most `capacity` keys per half.

    Two generations, each a plain dict of `str` → None: a dict of atoms is not tracked by the garbage collector,
    so however many acks are remembered, no full collection walks them (a TTL cache keeps a linked object per key,
    tens of thousands at 2,000 signals/s: architecture §10 "Garbage collection"). Keys go into the newer
    generation; once it is `ttl` old it becomes the older one and the older is dropped whole. When the newer one
    holds `capacity` keys it is turned over early (the oldest keys are forgotten early, as a full cache evicts).
    """

    def __init__(self, capacity: int, ttl: float, timer: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._timer = timer
        self._new: dict[str, None] = {}
        self._old: dict[str, None] = {}
        self._since = timer()  # when the newer generation started taking keys

    def _turn(self) -> None:
        now = self._timer()
        age = now - self._since
        if age >= 2 * self._ttl:  # nothing was added for a whole generation: both are past their time
            self._old, self._new, self._since = {}, {}, now
        elif age >= self._ttl:
            self._old, self._new, self._since = self._new, {}, now

    def add(self, key: str) -> None:
        self._turn()
        self._new[key] = None
        if len(self._new) >= self._capacity:
            self._old, self._new, self._since = self._new, {}, self._timer()

    def __contains__(self, key: str) -> bool:
        self._turn()
        return key in self._new or key in self._old

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    def clear(self) -> None:
        self._new.clear()
        self._old.clear()


class Relay(abc.ABC, Generic[T]):
    """Holds messages until JetStream acknowledges them. Run `run()` in a task; `drain()` at shutdown."""

    # What a message is called in logs ("signal", "publication").
    noun: str = "message"

    def __init__(
        self,
        link: Link,
        counters: RelayMetrics,
        cfg: NatsConfig,
        *,
        submit_wait: float = SUBMIT_WAIT_S,
        clock: Clock = _MONOTONIC,
    ) -> None:
        """`clock` times the publish health (`publish_health`): whether acks still arrive (readiness)."""
        self._link = link
        self.publish_health = PublishHealth(clock)
        self._counters = counters
        self._capacity = cfg.outbox_size
        self._submit_wait = submit_wait
        self._scan_interval = cfg.outbox_scan_interval
        self._retry_initial = cfg.retry_initial_delay
        self._retry_max = cfg.retry_max_delay
        self._slots = asyncio.Semaphore(cfg.max_inflight)
        self._held: dict[str, tuple[int, T]] = {}  # id -> (submission order, message): queued or in flight
        self._ready: deque[str] = deque()
        self._retry: list[tuple[int, str]] = []  # heap by submission order: oldest failure goes first
        self._order = itertools.count()
        self._recent = RecentKeys(max(1, self._capacity), RECENT_ACK_TTL_S)
        self._work = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._scan_now = asyncio.Event()
        self._stop = asyncio.Event()
        self._closing = False
        self._delay = 0.0
        self._retry_at = 0.0
        self._marks_failing = False
        self._backlog = 0  # unpublished rows the last scan saw beyond what memory holds
        self._tg: asyncio.TaskGroup | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._scanned: set[str] = set()  # ids the last store scan handed over that are not acked yet
        self._replay_window_ms = int(cfg.replay_window * MS_PER_S)
        self._server_id: str | None = None  # the server of the last ack or stream check
        self._last_seq: dict[str, int] = {}  # stream -> highest sequence acknowledged to us
        self._seq_ids: LRUCache[tuple[str, int], str] = LRUCache(maxsize=SEQ_MEMORY)  # (stream, seq) -> id
        self._replay: _Replay | None = None  # a replay asked for and not finished
        self._replayed: set[str] = set()  # held for a replay: already marked published in the store
        self.replays = 0  # replays finished (tests, status)

    # ---- what a subclass defines ----

    @abc.abstractmethod
    def _key(self, item: T) -> str:
        """The message's id (`Nats-Msg-Id`)."""

    @abc.abstractmethod
    async def _send(self, item: T) -> PubAck:
        """Publish once and return the ack; raise `PublishError` on a failure (the message stays held)."""

    @abc.abstractmethod
    async def _fetch(self, limit: int, older_than_ms: int | None) -> list[T]:
        """Stored messages not yet marked published, oldest first (only those stored before `older_than_ms`)."""

    @abc.abstractmethod
    async def _count_unpublished(self) -> int: ...

    @abc.abstractmethod
    async def _mark(self, key: str, at_ms: int) -> None:
        """Record the ack (the storage writer batches it)."""

    async def _fetch_acked(self, since_ms: int, limit: int, after: object | None) -> tuple[list[T], object | None]:
        """Stored messages acknowledged at or after `since_ms`, in a stable order, at most `limit`, continuing
        after the cursor `after`; returns them and the cursor of the last one. A store that keeps no
        acknowledged messages has none: nothing to replay."""
        return [], None

    # ---- state ----

    @property
    def depth(self) -> int:
        """Messages waiting for an ack: held in memory plus the store backlog seen by the last scan."""
        return len(self._held) + self._backlog

    @property
    def held(self) -> int:
        return len(self._held)

    # ---- intake ----

    async def submit(self, item: T) -> None:
        """Hand over a message the storage writer already has; returns once it is held or left to the store."""
        key = self._key(item)
        if key in self._held:
            return
        if self._closing:
            self._spill(key, "closing")
            return
        if len(self._held) >= self._capacity:
            if not self._link.is_connected:  # an outage: waiting would only stall the tracker
                self._spill(key, "full")
                return
            try:
                async with asyncio.timeout(self._submit_wait):
                    while len(self._held) >= self._capacity:
                        self._room.clear()
                        await self._room.wait()
            except TimeoutError:
                self._spill(key, "full")
                return
        if key not in self._held:
            self._hold(key, item)

    def _spill(self, key: str, why: str) -> None:
        self._counters.spilled.inc()
        self._backlog += 1
        self._set_depth()
        log.debug(f"{self.noun} left to the store scan", id=key, why=why)

    def _hold(self, key: str, item: T) -> None:
        self._held[key] = (next(self._order), item)
        self._ready.append(key)
        self._empty.clear()
        self._work.set()
        self._set_depth()

    def _set_depth(self) -> None:
        self._counters.depth.set(self.depth)

    # ---- relay ----

    async def run(self) -> None:
        """Publish held messages and re-read the store until `drain()`."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            dispatcher = tg.create_task(self._dispatch(), name=f"{self.noun}-outbox-dispatch")
            scanner = tg.create_task(self._scan_loop(), name=f"{self.noun}-outbox-scan")
            await self._stop.wait()
            dispatcher.cancel()
            scanner.cancel()
            # drain() already gave them their grace; an abandoned publish is re-sent (deduplicated) next start.
            for task in self._inflight:
                task.cancel()
        self._tg = None

    async def drain(self, grace: float) -> int:
        """Stop taking work, publish what is held for up to `grace` s (while NATS is up), stop `run()`.

        Returns how many messages were still unacknowledged; they stay in the store for the next start.
        """
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._held and self._link.is_connected and (left := deadline - loop.time()) > 0:
            await _wait_event(self._empty, min(DRAIN_POLL_S, left))
        left_over = len(self._held)
        self._stop.set()
        self._scan_now.set()  # a scan loop that missed its cancel (`_scan_loop`) wakes and sees the stop
        if left_over:
            log.warning(
                f"{self.noun} outbox drained with messages unacknowledged; they are re-published at next start",
                count=left_over,
            )
        else:
            log.info(f"{self.noun} outbox drained")
        return left_over

    async def _dispatch(self) -> None:
        assert self._tg is not None
        loop = asyncio.get_running_loop()
        dispatched = 0
        while True:
            while not (self._ready or self._retry):
                self._work.clear()
                await self._work.wait()
            if not self._link.is_connected:
                await self._link.wait_connected()
                self.publish_health.resumed()
            if (pause := self._retry_at - loop.time()) > 0:
                await asyncio.sleep(pause)
            await self._slots.acquire()
            key = heapq.heappop(self._retry)[1] if self._retry else self._ready.popleft()
            held = self._held.get(key)
            if held is None:
                self._slots.release()
                continue
            self.publish_health.attempt()
            task = self._tg.create_task(self._publish_one(key, held[1]))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            # Yield every few: with a backlog nothing else here awaits, and thousands of dispatches in one step
            # would hold the loop (and every feed) for tens of milliseconds. Not after each one: the publishes
            # started between two yields leave in one socket write of the NATS client instead of one each.
            dispatched += 1
            if dispatched % DISPATCH_BURST == 0:  # an empty queue suspends on `_work` above anyway
                await asyncio.sleep(0)

    async def _publish_one(self, key: str, item: T) -> None:
        try:
            try:
                ack = await self._send(item)
            finally:
                self._slots.release()
        except PublishError as exc:
            self._failed(key, exc.reason, exc.detail)
            return
        except Exception as exc:
            # Not a NATS answer (a bug or an unexpected library error): keep the message and retry all the same.
            self._counters.fault("unexpected")
            log.exception(f"unexpected {self.noun} publish error", id=key)
            self._failed(key, "unexpected", repr(exc))
            return
        self._watch_ack(key, ack)
        await self._acked(key)

    def _failed(self, key: str, reason: str, detail: str) -> None:
        entry = self._held.get(key)
        if entry is None:
            return
        self.publish_health.failed()
        heapq.heappush(self._retry, (entry[0], key))
        self._work.set()
        now = asyncio.get_running_loop().time()
        # Publishes that were in flight together fail together: back off once per round, not once per message.
        if now >= self._retry_at:
            if self._delay == 0:
                log.warning(
                    f"{self.noun} publish failing; messages stay pending and are retried", reason=reason, detail=detail
                )
            self._delay = min(self._delay * 2, self._retry_max) if self._delay else self._retry_initial
            self._retry_at = now + self._delay * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)

    async def _acked(self, key: str) -> None:
        if self._delay:
            log.info(f"{self.noun} publishing again", pending=len(self._held))
            self._delay = 0.0
            self._retry_at = 0.0
        self._held.pop(key, None)
        self.publish_health.acked(still_waiting=bool(self._held))
        self._recent.add(key)
        if len(self._held) < self._capacity:
            self._room.set()
        if not self._held:
            self._empty.set()
        batch_done = False
        if key in self._scanned:
            self._scanned.discard(key)
            batch_done = not self._scanned
        if self._backlog and (batch_done or not self._held):
            self._scan_now.set()  # the last store batch (or everything) is through: read the next one now
        self._set_depth()
        if key in self._replayed:
            self._replayed.discard(key)
            return  # its row is marked already; the replay only made sure the stream has it
        try:
            await self._mark(key, _now_ms())
        except Exception:
            # The row stays unpublished; a later scan re-publishes it, JetStream answers duplicate, we mark again.
            self._counters.fault("mark_published")
            if not self._marks_failing:  # one traceback per streak, not one per ack during a database outage
                log.exception(f"{self.noun} mark_published failed; rows stay unpublished and are re-sent", id=key)
            self._marks_failing = True
        else:
            if self._marks_failing:
                log.info(f"{self.noun} mark_published works again")
            self._marks_failing = False

    async def _scan_loop(self) -> None:
        # Ends on `_stop` as well as on `run()`'s cancel: the cancel can be lost. A NATS request (the stream
        # check) waits in nats-py's `asyncio.wait_for`, which on Python 3.11 returns the reply instead of raising
        # when the reply and the cancel arrive together; the loop would then wait for a connection that
        # `Publisher.close()` ended for good, and `run()`'s TaskGroup with it (tests/test_relay_stop.py).
        first = True
        while not self._stop.is_set():
            if not self._link.is_connected:
                await self._connected_or_stopped()
            if not self._closing:
                await self._check_streams()
                if self._replay is not None:
                    await self._run_replay(self._replay)
                # At start nothing is in flight, so everything unpublished is ours; later, young rows are
                # still on the live path and are left alone.
                older_than = None if first else _now_ms() - int(self._scan_interval * 1000)
                if await self._scan(older_than):
                    first = False
            await _wait_event(self._scan_now, self._scan_interval)
            self._scan_now.clear()

    async def _connected_or_stopped(self) -> None:
        """Wait until NATS is connected again or `drain()` stopped the relay."""
        connected = asyncio.ensure_future(self._link.wait_connected())
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((connected, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
            stopped.cancel()

    # ---- lost acknowledged writes ----

    def _watch_ack(self, key: str, ack: PubAck) -> None:
        """Look at one ack for signs that the server lost acknowledged messages."""
        self._see_server()
        if ack.duplicate or not ack.stream:
            return
        seq_key = (ack.stream, ack.seq)
        earlier = self._seq_ids.get(seq_key)
        self._seq_ids[seq_key] = key
        if earlier is not None and earlier != key:
            self._ask_replay(SEQUENCE_REUSED, stream=ack.stream, seq=ack.seq)
            self._seq_ids[seq_key] = key  # the memory was reset: this ack is the first of the new history
        self._last_seq[ack.stream] = max(self._last_seq.get(ack.stream, 0), ack.seq)

    def _see_server(self) -> None:
        server = self._link.server_id
        if server is None:
            return
        if self._server_id is not None and server != self._server_id:
            self._ask_replay(SERVER_CHANGED, server_before=self._server_id, server=server)
        self._server_id = server

    async def _check_streams(self) -> None:
        """Compare each stream we published into with what it acknowledged to us."""
        self._see_server()
        for stream, seen in list(self._last_seq.items()):
            try:
                last = await self._link.stream_last_seq(stream)
            except Exception as exc:  # NATS went away meanwhile: the next round checks again
                log.debug(f"{self.noun} stream check failed", stream=stream, error=f"{type(exc).__name__}: {exc}")
                return
            if last < seen:
                self._ask_replay(STREAM_REGRESSED, stream=stream, last_seq=last, acked_seq=seen)
                return

    def _ask_replay(self, reason: ReplayReason, **facts: object) -> None:
        """Re-publish what was acknowledged within the replay window (once per detection; a pending replay
        that has not started reading yet just keeps its reason)."""
        if self._replay_window_ms <= 0:
            return
        # What we knew of the streams is history now: new acks start a new one.
        self._last_seq.clear()
        self._seq_ids.clear()
        since = _now_ms() - self._replay_window_ms
        if self._replay is not None:
            self._replay.since_ms = min(self._replay.since_ms, since)
            self._replay.cursor = None  # restart from the window's start: it is cheap, and nothing is missed
            return
        log.warning(
            f"NATS may have lost acknowledged {self.noun}s; re-publishing the replay window",
            reason=reason,
            window_s=self._replay_window_ms / MS_PER_S,
            **facts,
        )
        self._replay = _Replay(reason=reason, since_ms=since)
        self._scan_now.set()

    async def _run_replay(self, replay: _Replay) -> None:
        """Hold every message acknowledged since `replay.since_ms` again, page by page as memory frees up."""
        if not replay.rescanned:
            # Acks whose published mark is not written yet are unpublished rows the scan normally skips for a
            # while; read them now. Before the acknowledged rows: a row's mark can land between the two reads.
            self._recent.clear()
            if not await self._scan(None):
                return
            replay.rescanned = True
        while not self._closing:
            room = min(self._capacity - len(self._held), SCAN_BATCH)
            if room <= 0:
                self._room.clear()
                await _wait_event(self._room, self._scan_interval)
                if not self._link.is_connected:
                    return  # the scan loop waits for NATS and resumes from the cursor
                continue
            try:
                items, cursor = await self._fetch_acked(replay.since_ms, room, replay.cursor)
            except Exception:
                self._counters.fault("replay")
                log.exception(f"{self.noun} replay read failed; retrying next interval")
                return
            for item in items:
                key = self._key(item)
                if key not in self._held:
                    self._hold(key, item)
                    self._replayed.add(key)
                    replay.count += 1
            if cursor is not None:
                replay.cursor = cursor
            if len(items) < room:
                break
        if self._closing:
            return
        self._replay = None
        self.replays += 1
        self._counters.replayed(replay.reason, replay.count)
        log.warning(f"re-published acknowledged {self.noun}s", reason=replay.reason, count=replay.count)

    async def _scan(self, older_than_ms: int | None) -> bool:
        room = min(self._capacity - len(self._held), SCAN_BATCH)
        if room <= 0:
            return False
        try:
            items = await self._fetch(room, older_than_ms)
            unpublished = await self._count_unpublished()
        except Exception:
            self._counters.fault("outbox_scan")
            log.exception(f"{self.noun} outbox scan failed; retrying next interval")
            return False
        taken = 0
        for item in items:
            key = self._key(item)
            if key not in self._held and key not in self._recent:
                self._hold(key, item)
                self._scanned.add(key)
                taken += 1
        self._backlog = max(0, unpublished - len(self._held))
        self._set_depth()
        if taken:
            log.info(f"re-publishing persisted {self.noun}s", count=taken, backlog=self._backlog)
        return True
