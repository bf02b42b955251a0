"""Position events and alerts to JetStream exactly once, against a real nats-server and the SQLite store:
subjects, the positions stream, persist-then-publish, NATS restarts and service restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import pytest
from nats.js.api import RetentionPolicy

from hl_monitor.config import Config, DatabaseConfig, NatsConfig, PositionsConfig, SignalsConfig, WriterConfig
from hl_monitor.delivery.publications import (
    PublicationOutbox,
    PublicationPublisher,
    PublicationSinkImpl,
    alert_subject,
    position_subject,
)
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.domain.publication import Publication
from hl_monitor.errors import ConfigError
from hl_monitor.metrics import Metrics
from hl_monitor.storage import migrate
from hl_monitor.storage.repository import Repository, create_engine
from hl_monitor.storage.writer import BatchWriter
from tests.support.delivery import nats_cfg
from tests.support.nats import NatsServer, read_stream
from tests.support.waiting import wait_until

WHALE = "0x" + "ab" * 20
STREAM = "HL_POSITIONS"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"hl_monitor_{name}", labels or None)
    return value or 0.0


def make_publication(n: int, *, alert: bool = False) -> Publication:
    """An event or alert as the positions owner builds it; the payload's decimals must arrive byte for byte."""
    symbol = "xyz:XYZ100" if n % 3 == 0 else "BTCUSDC"
    if alert:
        msg_id = f"{WHALE}:pos:BTC:f{1_717_000_000_000 + n}:{n}:liq:0.05:1"
        subject = alert_subject("hl.alerts", WHALE, symbol)
        kind: Any = "alert"
    else:
        msg_id = f"{WHALE}:pos:BTC:f{1_717_000_000_000 + n}:{n}"
        subject = position_subject("hl.positions", WHALE, symbol)
        kind = "position_event"
    payload = b'{"event_id":"%s","size_after":"1.000000000000000001"}' % msg_id.encode()
    return Publication(msg_id=msg_id, kind=kind, subject=subject, payload=payload, created_at=int(time.time() * 1000))


class _LostAcks:
    """The writer as the relay sees it while the database records no acks (they fail; the rows stay unpublished)."""

    def __init__(self, writer: BatchWriter) -> None:
        self._writer = writer

    async def put_publication(self, publication: Publication) -> None:
        await self._writer.put_publication(publication)

    async def mark_publication_published(self, msg_id: str, at_ms: int) -> None:
        raise ConnectionError("database gone")


@dataclass
class Service:
    """What the service runs for publications: the writer, the relay and the sink on one NATS connection."""

    url: str
    db_url: str
    cfg: NatsConfig
    metrics: Metrics
    lose_acks: bool = False

    async def __aenter__(self) -> Service:
        self.engine = create_engine(Config(database=DatabaseConfig(url=self.db_url)))
        self.repo = Repository(self.engine)
        self.writer = BatchWriter(self.engine, WriterConfig(flush_interval=0.02), self.metrics)
        self.writer_task = asyncio.create_task(self.writer.run())
        self.nats = Publisher(self.cfg, SignalsConfig(), self.metrics, url=self.url)
        await self.nats.connect(wait=5)
        self.publisher = PublicationPublisher(self.nats, self.cfg, PositionsConfig(), self.metrics)
        await self.publisher.ensure_stream()
        marks = _LostAcks(self.writer) if self.lose_acks else self.writer
        self.outbox = PublicationOutbox(self.publisher, self.repo, marks, self.metrics, self.cfg)
        self.outbox_task = asyncio.create_task(self.outbox.run())
        self.sink = PublicationSinkImpl(self.writer, self.outbox)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.outbox_task.done():
            await self.stop()

    async def all_marked(self) -> bool:
        await self.writer.flush()
        return await self.repo.count_unpublished_publications() == 0

    async def stop(self) -> int:
        left = await self.outbox.drain(5)
        await self.outbox_task
        await self.nats.close()
        await self.writer.close()
        await self.writer_task
        await self.engine.dispose()
        return left

    async def crash(self) -> None:
        """kill -9: no drain, buffered acks lost."""
        for task in (self.outbox_task, self.writer_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.nats.client.close()
        await self.engine.dispose()


@pytest.fixture
async def db_url(sqlite_url: str) -> str:
    await migrate.upgrade(sqlite_url)
    return sqlite_url


async def assert_stream_holds_exactly(url: str, publications: list[Publication]) -> None:
    messages = await read_stream(url, STREAM)
    assert sorted(msg_id for _, msg_id, _ in messages) == sorted(p.msg_id for p in publications), "each id once"
    by_id = {p.msg_id: p for p in publications}
    for subject, msg_id, payload in messages:
        assert (subject, payload) == (by_id[msg_id].subject, by_id[msg_id].payload)


# Async although nothing awaits: for a sync test the looptime plugin opens an event loop it never closes, and
# the next test that collects garbage fails on the ResourceWarning.
async def test_subjects_escape_address_and_symbol_like_signal_subjects() -> None:
    assert position_subject("hl.positions", WHALE, "BTCUSDC") == f"hl.positions.{WHALE}.BTCUSDC"
    assert position_subject("hl.positions", WHALE, "xyz:XYZ100") == f"hl.positions.{WHALE}.xyz:XYZ100"
    assert alert_subject("hl.alerts", WHALE, "A.B *>") == f"hl.alerts.{WHALE}.A%2EB%20%2A%3E.liquidation_risk"


async def test_bad_prefixes_are_config_errors() -> None:
    publisher = Publisher(NatsConfig(), SignalsConfig(), Metrics(), url="nats://127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"positions\.alerts_prefix"):
        PublicationPublisher(publisher, NatsConfig(), PositionsConfig(alerts_prefix="hl.*"), Metrics())
    with pytest.raises(ConfigError, match=r"positions\.alerts_prefix"):
        PublicationPublisher(publisher, NatsConfig(), PositionsConfig(alerts_prefix="hl.positions"), Metrics())
    with pytest.raises(ConfigError, match=r"positions\.max_age"):
        PublicationPublisher(publisher, NatsConfig(), PositionsConfig(max_age=60), Metrics())


async def test_stream_covers_both_prefixes_and_follows_the_config(nats_server: NatsServer) -> None:
    cfg = nats_cfg(duplicate_window=600.0)
    nc = Publisher(cfg, SignalsConfig(), Metrics(), url=nats_server.url)
    await nc.connect(wait=5)
    try:
        info = await PublicationPublisher(nc, cfg, PositionsConfig(), Metrics()).ensure_stream()
        assert sorted(info.config.subjects or []) == ["hl.alerts.>", "hl.positions.>"]
        assert (info.config.max_age, info.config.duplicate_window) == (604800.0, 600.0)
        assert (info.config.retention, info.config.num_replicas) == (RetentionPolicy.LIMITS, 1)
        changed = PositionsConfig(max_age=86400.0, alerts_prefix="hl.risk")
        info = await PublicationPublisher(nc, cfg, changed, Metrics()).ensure_stream()
        assert sorted(info.config.subjects or []) == ["hl.positions.>", "hl.risk.>"]
        assert info.config.max_age == 86400.0
    finally:
        await nc.close()


async def test_sink_persists_then_publishes_each_once(nats_server: NatsServer, db_url: str) -> None:
    pubs = [make_publication(n, alert=n % 2 == 1) for n in range(40)]
    metrics = Metrics()
    async with Service(nats_server.url, db_url, nats_cfg(), metrics) as service:
        await service.sink(pubs)
        await service.sink(pubs[:5])  # the owner re-emits after a restart: same ids
        await wait_until(service.all_marked, what="all marked published")
        # Until the next store scan the depth may still count rows whose marks were being written.
        await wait_until(lambda: service.outbox.depth == 0, what="depth back to 0")
        assert sample(metrics, "publications_published_total", kind="alert") == 20
        assert sample(metrics, "publications_published_total", kind="position_event") == 20
        assert sample(metrics, "publications_depth") == 0
    await assert_stream_holds_exactly(nats_server.url, pubs)


async def test_exactly_once_across_a_nats_restart(nats_server: NatsServer, db_url: str) -> None:
    pubs = [make_publication(n) for n in range(150)]
    async with Service(nats_server.url, db_url, nats_cfg(publish_timeout=0.3), Metrics()) as service:

        async def produce() -> None:
            for p in pubs:
                await service.sink([p])
                await asyncio.sleep(0.002)

        producer = asyncio.create_task(produce())
        await wait_until(
            lambda: sample(service.metrics, "publications_published_total", kind="position_event") >= 30,
            what="publishing under way",
        )
        await asyncio.to_thread(nats_server.stop)
        await wait_until(lambda: service.outbox.depth > 0 and not service.nats.is_connected, what="an outage")
        await asyncio.to_thread(nats_server.start)
        await producer
        await wait_until(service.all_marked, what="all marked published after the outage")
    await assert_stream_holds_exactly(nats_server.url, pubs)


async def test_service_crash_then_restart_republishes_unacked_rows_once(nats_server: NatsServer, db_url: str) -> None:
    """Acks not recorded (the process died first) and rows persisted but never submitted: the next start
    re-publishes both from the table; JetStream answers the first run's ones as duplicates."""
    pubs = [make_publication(n, alert=n % 4 == 0) for n in range(60)]
    first = await Service(nats_server.url, db_url, nats_cfg(), Metrics(), lose_acks=True).__aenter__()
    await first.sink(pubs[:40])
    await wait_until(lambda: first.outbox.held == 0, what="acks of the first run")
    assert sample(first.metrics, "publication_errors_total", reason="mark_published") == 40
    for p in pubs[40:]:
        await first.writer.put_publication(p)  # persisted, then the process died before handing them over
    await first.writer.flush()
    await first.crash()

    engine = create_engine(Config(database=DatabaseConfig(url=db_url)))
    try:
        assert await Repository(engine).count_unpublished_publications() == 60
    finally:
        await engine.dispose()
    metrics = Metrics()
    async with Service(nats_server.url, db_url, nats_cfg(), metrics) as second:
        await wait_until(second.all_marked, what="leftovers published and marked")
        assert sample(metrics, "publication_duplicates_total", kind="position_event") == 30  # the first run's
        assert sample(metrics, "publication_duplicates_total", kind="alert") == 10
        assert await second.stop() == 0
    await assert_stream_holds_exactly(nats_server.url, pubs)


async def test_drain_with_nats_down_leaves_publications_for_the_next_start(
    nats_server: NatsServer, db_url: str
) -> None:
    pubs = [make_publication(n) for n in range(5)]
    service = await Service(nats_server.url, db_url, nats_cfg(), Metrics()).__aenter__()
    await asyncio.to_thread(nats_server.stop)
    await wait_until(lambda: not service.nats.is_connected, what="disconnect")
    await service.sink(pubs)
    assert await service.outbox.drain(30) == 5  # returns at once: waiting cannot help while NATS is down
    await service.outbox_task
    await service.writer.close()
    await service.writer_task
    assert await service.repo.count_unpublished_publications() == 5
    await service.nats.close()
    await service.engine.dispose()

    await asyncio.to_thread(nats_server.start)
    async with Service(nats_server.url, db_url, nats_cfg(), Metrics()) as again:
        await wait_until(again.all_marked, what="published at the next start")
    await assert_stream_holds_exactly(nats_server.url, pubs)
