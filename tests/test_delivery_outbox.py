"""Outbox relay against a real nats-server: nothing lost, nothing twice, across NATS and service restarts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal as os_signal
from collections.abc import AsyncIterator, Callable

import pytest

from hl_monitor.config import Config, DatabaseConfig, NatsConfig, SignalsConfig, WriterConfig
from hl_monitor.delivery.outbox import Outbox
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.delivery.relay import RecentKeys
from hl_monitor.domain.signal import Signal, decode_signal
from hl_monitor.metrics import Metrics
from hl_monitor.storage import migrate
from hl_monitor.storage.repository import Repository, create_engine
from hl_monitor.storage.writer import BatchWriter
from tests.support.delivery import freeze, make_signal, nats_cfg
from tests.support.metrics import metric_value
from tests.support.nats import NatsServer, read_stream
from tests.support.waiting import wait_until


class MemoryStore:
    """The signals table reduced to what the relay needs: rows, a published flag, optional write failures."""

    def __init__(self) -> None:
        self.rows: dict[str, Signal] = {}
        self.published: dict[str, int] = {}
        self.fail_marks = False

    def add(self, signal: Signal) -> None:
        self.rows.setdefault(signal.signal_id, signal)

    async def fetch_unpublished(self, limit: int, older_than_ms: int | None = None) -> list[Signal]:
        rows = [
            s
            for sid, s in self.rows.items()
            if sid not in self.published and (older_than_ms is None or s.detected_at < older_than_ms)
        ]
        return rows[:limit]

    async def count_unpublished(self) -> int:
        return sum(1 for sid in self.rows if sid not in self.published)

    async def mark_published(self, signal_id: str, at_ms: int) -> None:
        if self.fail_marks:
            raise ConnectionError("database down")
        self.published[signal_id] = at_ms

    def all_published(self) -> bool:
        return len(self.published) == len(self.rows)


class Relay:
    """A publisher + outbox pair running in the background, as the service runs them."""

    def __init__(self, url: str, store: MemoryStore, cfg: NatsConfig, submit_wait: float = 1.0) -> None:
        self.store = store
        self.metrics = Metrics()
        self.publisher = Publisher(cfg, SignalsConfig(), self.metrics, url=url)
        self.outbox = Outbox(self.publisher, store, store, self.metrics, cfg, submit_wait=submit_wait)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.publisher.connect(wait=5)
        await self.publisher.ensure_stream()
        self.task = asyncio.create_task(self.outbox.run())

    async def submit(self, signal: Signal) -> None:
        self.store.add(signal)  # persisted first, as the service does
        await self.outbox.submit(signal)

    async def stop(self, grace: float = 5.0) -> int:
        left = await self.outbox.drain(grace)
        assert self.task is not None
        await self.task
        await self.publisher.close()
        return left

    async def crash(self) -> None:
        """Like kill -9 for this process's part: no drain, in-flight publishes abandoned mid-way."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.publisher._nc.close()


@contextlib.asynccontextmanager
async def relay(url: str, store: MemoryStore, cfg: NatsConfig | None = None, **kw: float) -> AsyncIterator[Relay]:
    r = Relay(url, store, cfg or nats_cfg(), **kw)
    await r.start()
    try:
        yield r
    finally:
        if r.task is not None and not r.task.done():
            await r.stop()


def publish_errors(r: Relay, reason: str) -> float:
    return metric_value(r.metrics, "publish_errors_total", reason=reason)


def depth_grows(r: Relay, by: int) -> Callable[[], bool]:
    """True once the outbox holds `by` more signals than now."""
    target = r.outbox.depth + by
    return lambda: r.outbox.depth >= target


async def assert_stream_holds_exactly(url: str, signals: list[Signal]) -> None:
    messages = await read_stream(url)
    ids = [msg_id for _, msg_id, _ in messages]
    assert sorted(ids) == sorted(s.signal_id for s in signals), "each signal_id exactly once"
    by_id = {s.signal_id: s for s in signals}
    for _, msg_id, payload in messages:
        assert decode_signal(payload) == by_id[msg_id]  # exact decimals survive


async def test_submitted_signals_are_published_once_and_marked(nats_server: NatsServer) -> None:
    store = MemoryStore()
    signals = [make_signal(i) for i in range(50)]
    async with relay(nats_server.url, store) as r:
        for s in signals:
            await r.submit(s)
        await r.submit(signals[0])  # a second submit of a held or acked signal changes nothing
        await wait_until(store.all_published, what="all marked published")
        assert r.outbox.depth == 0
        assert metric_value(r.metrics, "outbox_depth") == 0
    await assert_stream_holds_exactly(nats_server.url, signals)


@pytest.mark.parametrize("outage", ["stop", "kill", "freeze"])
async def test_exactly_once_when_nats_goes_away_mid_stream(nats_server: NatsServer, outage: str) -> None:
    """NATS stopped, killed -9 or frozen (slow) while signals flow: afterwards every id is in the stream once."""
    store = MemoryStore()
    signals = [make_signal(i) for i in range(300)]
    async with relay(nats_server.url, store, nats_cfg(publish_timeout=0.3)) as r:

        async def produce() -> None:
            for s in signals:
                await r.submit(s)
                await asyncio.sleep(0.003)

        producer = asyncio.create_task(produce())
        await wait_until(lambda: len(store.published) >= 60, what="publishing under way")
        assert nats_server.proc is not None
        pid = nats_server.proc.pid
        if outage == "stop":
            await asyncio.to_thread(nats_server.stop)
        elif outage == "kill":
            nats_server.proc.kill()
            await asyncio.to_thread(nats_server.proc.wait)
            nats_server.proc = None
        else:
            freeze(pid)
        # Quiet point: the outage is noticed (disconnected, or a publish to the frozen server timed out) and the
        # producer has queued more since; then, while it queues more still, no signal may be marked published.
        await wait_until(
            lambda: not r.publisher.is_connected or publish_errors(r, "timeout") > 0, what="the outage noticed"
        )
        await wait_until(depth_grows(r, 20), what="signals held during the outage")
        published_during_outage, timeouts = len(store.published), publish_errors(r, "timeout")
        await wait_until(depth_grows(r, 20), what="more signals held during the outage")
        if outage == "freeze":  # and the outbox tried again, and failed again
            await wait_until(lambda: publish_errors(r, "timeout") > timeouts, what="a retry timing out")
        assert r.outbox.depth > 0
        assert len(store.published) == published_during_outage
        if outage == "freeze":
            os.kill(pid, os_signal.SIGCONT)
        else:
            await asyncio.to_thread(nats_server.start)
        await producer
        await wait_until(store.all_published, what="all marked published")
        assert r.outbox.depth == 0
    await assert_stream_holds_exactly(nats_server.url, signals)


async def test_service_crash_then_restart_republishes_from_the_store_once(nats_server: NatsServer) -> None:
    """A crash with acks not yet recorded (and publishes in flight) is healed by the next start's store scan."""
    store = MemoryStore()
    signals = [make_signal(i) for i in range(200)]
    first = Relay(nats_server.url, store, nats_cfg())
    await first.start()
    store.fail_marks = True  # the database is not recording acks: the rows stay unpublished
    for s in signals[:150]:
        await first.submit(s)
    await wait_until(lambda: len(first.outbox._held) < 100, what="some acks")
    for s in signals[150:]:
        store.add(s)  # persisted, then the process died before handing them to the outbox
    await first.crash()
    assert not store.published
    store.fail_marks = False
    async with relay(nats_server.url, store) as second:
        await wait_until(store.all_published, what="all marked published after restart")
        assert metric_value(second.metrics, "publish_duplicates_total") > 0  # the first run's acks, absorbed by dedup
    await assert_stream_holds_exactly(nats_server.url, signals)


async def test_relay_stops_when_cancelled_just_as_a_store_scan_is_requested(nats_server: NatsServer) -> None:
    """A cancel landing in the same loop step as a scan request still stops `run()` (the service's TaskGroup
    cancels it when another component fails); Python 3.11's `asyncio.wait_for` swallowed such a cancel."""
    r = Relay(nats_server.url, MemoryStore(), nats_cfg(outbox_scan_interval=30))
    await r.start()
    for _ in range(5):
        await asyncio.sleep(0)  # the start scan (an empty store) is done: the scanner waits for a request
    assert r.task is not None
    r.outbox._scan_now.set()  # what an ack that finishes a store batch does
    r.task.cancel()
    done, _ = await asyncio.wait({r.task}, timeout=5)
    await r.publisher.close()
    assert r.task in done, "the relay ignored its cancellation"


async def test_full_outbox_leaves_signals_to_the_store_scan(nats_server: NatsServer) -> None:
    """With NATS down and memory full, submit() does not stall the tracker; the store carries the rest."""
    store = MemoryStore()
    signals = [make_signal(i) for i in range(40)]
    async with relay(nats_server.url, store, nats_cfg(outbox_size=10), submit_wait=0.01) as r:
        await asyncio.to_thread(nats_server.stop)
        await wait_until(lambda: not r.publisher.is_connected, what="disconnect")
        for s in signals:
            await r.submit(s)
        assert r.outbox.held == 10
        assert metric_value(r.metrics, "outbox_spilled_total") == 30
        assert r.outbox.depth == 40
        await asyncio.to_thread(nats_server.start)
        await wait_until(store.all_published, what="all marked published")
        assert r.outbox.depth == 0
    await assert_stream_holds_exactly(nats_server.url, signals)


async def test_slow_nats_applies_backpressure_instead_of_spilling(nats_server: NatsServer) -> None:
    """NATS up but not answering and memory full: submit() waits for room rather than dropping to the store."""
    store = MemoryStore()
    signals = [make_signal(i) for i in range(6)]
    async with relay(nats_server.url, store, nats_cfg(outbox_size=5), submit_wait=30) as r:
        assert nats_server.proc is not None
        freeze(nats_server.proc.pid)
        try:
            for s in signals[:5]:
                await r.submit(s)
            blocked = asyncio.create_task(r.submit(signals[5]))
            # Quiet point: a whole round of publishes to the frozen server has failed and the outbox is still
            # full; a submit that spilled or dropped instead of waiting would be done by now.
            await wait_until(lambda: publish_errors(r, "timeout") >= 1, what="a publish timing out")
            assert not blocked.done()
        finally:
            os.kill(nats_server.proc.pid, os_signal.SIGCONT)
        await blocked
        await wait_until(store.all_published, what="all marked published")
        assert metric_value(r.metrics, "outbox_spilled_total") == 0
    await assert_stream_holds_exactly(nats_server.url, signals)


async def test_unpublished_rows_from_before_are_published_at_start(nats_server: NatsServer) -> None:
    store = MemoryStore()
    signals = [make_signal(i) for i in range(20)]
    for s in signals:
        store.add(s)
    async with relay(nats_server.url, store):
        await wait_until(store.all_published, what="backlog published")
    await assert_stream_holds_exactly(nats_server.url, signals)


async def test_drain_publishes_what_is_held_then_stops(nats_server: NatsServer) -> None:
    store = MemoryStore()
    signals = [make_signal(i) for i in range(100)]
    r = Relay(nats_server.url, store, nats_cfg())
    await r.start()
    for s in signals:
        await r.submit(s)
    assert await r.stop(grace=10) == 0
    assert store.all_published()
    assert r.task is not None
    assert r.task.done()
    await assert_stream_holds_exactly(nats_server.url, signals)


async def test_drain_with_nats_down_returns_and_leaves_signals_in_the_store(nats_server: NatsServer) -> None:
    store = MemoryStore()
    r = Relay(nats_server.url, store, nats_cfg())
    await r.start()
    await asyncio.to_thread(nats_server.stop)
    await wait_until(lambda: not r.publisher.is_connected, what="disconnect")
    for i in range(5):
        await r.submit(make_signal(i))
    assert await r.stop(grace=30) == 5  # returns at once: waiting cannot help while NATS is down
    assert await store.count_unpublished() == 5


async def test_with_the_real_sqlite_store_and_writer(nats_server: NatsServer, sqlite_url: str) -> None:
    """The service's own storage: BatchWriter persists then marks, Repository feeds the scan. NATS restarts
    mid-stream, then the process dies (writer buffer lost, no drain); the next start publishes what is left."""
    await migrate.upgrade(sqlite_url)
    cfg = nats_cfg(publish_timeout=0.3)
    signals = [make_signal(i) for i in range(120)]

    engine = create_engine(Config(database=DatabaseConfig(url=sqlite_url)))
    writer = BatchWriter(engine, WriterConfig(flush_interval=0.02), Metrics())
    writer_task = asyncio.create_task(writer.run())
    publisher = Publisher(cfg, SignalsConfig(), Metrics(), url=nats_server.url)
    await publisher.connect(wait=5)
    await publisher.ensure_stream()
    outbox = Outbox(publisher, Repository(engine), writer, Metrics(), cfg)
    run = asyncio.create_task(outbox.run())
    for s in signals[:50]:
        await writer.put_signal(s)
        await outbox.submit(s)
    await asyncio.to_thread(nats_server.stop)
    for s in signals[50:100]:
        await writer.put_signal(s)
        await outbox.submit(s)
    await asyncio.to_thread(nats_server.start)
    await wait_until(lambda: outbox.held == 0, what="held signals acked")
    for s in signals[100:]:
        await writer.put_signal(s)  # persisted, then the process dies before handing them over
    await writer.flush()
    for task in (run, writer_task):  # kill -9: nothing drains, buffered acks are lost
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await publisher._nc.close()
    await engine.dispose()

    engine = create_engine(Config(database=DatabaseConfig(url=sqlite_url)))
    repo = Repository(engine)
    assert await repo.count_unpublished() >= 20
    writer = BatchWriter(engine, WriterConfig(flush_interval=0.02), Metrics())
    writer_task = asyncio.create_task(writer.run())
    try:
        publisher = Publisher(cfg, SignalsConfig(), Metrics(), url=nats_server.url)
        await publisher.connect(wait=5)
        outbox = Outbox(publisher, repo, writer, Metrics(), cfg)
        run = asyncio.create_task(outbox.run())

        async def all_marked() -> bool:
            await writer.flush()
            return await repo.count_unpublished() == 0

        await wait_until(all_marked, what="leftovers published and marked")
        assert await outbox.drain(5) == 0
        await run
        await publisher.close()
    finally:
        await writer.close()
        await writer_task
        await engine.dispose()
    await assert_stream_holds_exactly(nats_server.url, signals)


class _Ticks:
    """A timer the test moves by hand (`RecentKeys` reads it at every call)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_recent_acks_are_remembered_for_at_least_the_ttl_and_forgotten_after_twice_it() -> None:
    ticks = _Ticks()
    recent = RecentKeys(capacity=100, ttl=60.0, timer=ticks)
    recent.add("a")
    ticks.now = 59.0
    recent.add("b")
    ticks.now = 118.9  # "a" is 118.9 s old, "b" 59.9 s: both within their ttl or the generation after it
    assert "a" in recent
    assert "b" in recent
    recent.add("c")
    ticks.now = 178.0  # "b" was added 119 s ago, "c" 59.1 s ago
    assert "b" in recent
    assert "c" in recent
    ticks.now = 400.0  # nothing added for longer than two generations
    assert "c" not in recent
    assert len(recent) == 0


def test_recent_acks_are_bounded_by_capacity_per_generation() -> None:
    recent = RecentKeys(capacity=3, ttl=60.0, timer=_Ticks())
    for n in range(7):
        recent.add(f"s{n}")
    assert len(recent) <= 2 * 3
    assert "s6" in recent
    assert "s0" not in recent  # the oldest are forgotten first, as a full cache evicts


def test_remembered_acks_are_no_work_for_the_garbage_collector() -> None:
    recent = RecentKeys(capacity=10_000, ttl=60.0, timer=_Ticks())
    before = len(gc.get_objects())
    for n in range(5_000):
        recent.add(f"signal-{n}")
    assert len(gc.get_objects()) - before < 10  # no object per key (architecture §10 "Garbage collection")
    assert not gc.is_tracked(recent._new)
