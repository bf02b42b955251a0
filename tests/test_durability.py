"""An ack is not a disk write: messages a real nats-server acknowledged and then lost come back, exactly once.

The server loses acknowledged writes the way an OS crash does: its store is copied, more messages are
acknowledged, the server is killed with SIGKILL and the old copy is put back. The outboxes notice (a new server id,
a stream whose last sequence fell below what they saw) and re-publish what they had acknowledged within
`nats.replay_window` (delivery/relay.py); JetStream absorbs what it still has. Also: retention keeps what a replay
may need, replica settings the server cannot honour are clear errors, the embedded server refuses replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import nats
import pytest
from nats.js.api import KeyValueConfig, StorageType

from hl_monitor.clock import wall_ms
from hl_monitor.config import (
    Config,
    DatabaseConfig,
    FillsConfig,
    NatsConfig,
    RetentionConfig,
    SignalsConfig,
    WriterConfig,
    load_config,
)
from hl_monitor.delivery.fills import FillPublisher, fill_outbox
from hl_monitor.delivery.outbox import Outbox
from hl_monitor.delivery.publications import PublicationOutbox
from hl_monitor.delivery.publisher import Publisher, ensure_kv_replicas, ensure_stream
from hl_monitor.domain.publication import Publication
from hl_monitor.domain.signal import Signal
from hl_monitor.errors import ConfigError, DeliveryError
from hl_monitor.metrics import Metrics
from hl_monitor.storage import migrate
from hl_monitor.storage.cleaner import RetentionCleaner
from hl_monitor.storage.repository import Repository, create_engine
from hl_monitor.storage.writer import BatchWriter
from tests.support.delivery import make_signal, nats_cfg
from tests.support.metrics import metric_value
from tests.support.nats import NatsServer, read_stream
from tests.support.waiting import wait_until

SIGNALS: Final = "HL_SIGNALS"
FILLS: Final = "HL_FILLS"
BATCH: Final = 25  # messages per step of each kind: enough to span several publishes in flight


def make_fill(i: int) -> Publication:
    return Publication(
        msg_id=f"0x{'cd' * 20}:fill:BTC:{1000 + i}",
        kind="fill",
        subject=f"hl.fills.0x{'cd' * 20}.BTCUSDC",
        payload=msgspec.json.encode({"tid": 1000 + i}),
        created_at=1_717_000_000_000 + i,
    )


@dataclass
class Service:
    """The service's delivery half on its own storage: writer, signals outbox and fills outbox."""

    repo: Repository
    writer: BatchWriter
    publisher: Publisher
    signals: Outbox
    fills: PublicationOutbox
    metrics: Metrics

    async def send(self, signals: list[Signal], fills: list[Publication]) -> None:
        for s in signals:
            await self.writer.put_signal(s)  # persisted first, as the sink does
            await self.signals.submit(s)
        for f in fills:
            await self.writer.put_publication(f)
            await self.fills.submit(f)

    async def all_acked(self) -> bool:
        await self.writer.flush()
        return (
            self.signals.held == 0
            and self.fills.held == 0
            and await self.repo.count_unpublished() == 0
            and await self.repo.count_unpublished_publications() == 0
        )


@contextlib.asynccontextmanager
async def service(url: str, sqlite_url: str, cfg: NatsConfig) -> AsyncIterator[Service]:
    await migrate.upgrade(sqlite_url)
    engine = create_engine(Config(database=DatabaseConfig(url=sqlite_url)))
    metrics = Metrics()
    writer = BatchWriter(engine, WriterConfig(flush_interval=0.02), metrics)
    publisher = Publisher(cfg, SignalsConfig(), metrics, url=url)
    await publisher.connect(wait=5)
    await publisher.ensure_stream()
    fills_publisher = FillPublisher(publisher, cfg, FillsConfig(), metrics)
    await fills_publisher.ensure_stream()
    repo = Repository(engine)
    svc = Service(
        repo=repo,
        writer=writer,
        publisher=publisher,
        signals=Outbox(publisher, repo, writer, metrics, cfg),
        fills=fill_outbox(fills_publisher, repo, writer, metrics, cfg),
        metrics=metrics,
    )
    tasks = [asyncio.create_task(c) for c in (writer.run(), svc.signals.run(), svc.fills.run())]
    try:
        yield svc
    finally:
        # The engine's pooled SQLite connections are closed even when the stop is cut short (a failure or a
        # timeout cancels this test): left to the collector, they surface as unclosed in a later test.
        try:
            await svc.signals.drain(5)
            await svc.fills.drain(5)
            await publisher.close()
            await writer.close()
            await asyncio.gather(*tasks)
        finally:
            await engine.dispose()


async def stream_ids(url: str, stream: str) -> list[str]:
    return [msg_id for _, msg_id, _ in await read_stream(url, stream)]


async def holds_exactly(url: str, stream: str, ids: list[str]) -> bool:
    return sorted(await stream_ids(url, stream)) == sorted(ids)


def kill9(server: NatsServer) -> None:
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait()
    server.proc = None


async def test_acknowledged_messages_the_server_lost_come_back_exactly_once(
    nats_server: NatsServer, sqlite_url: str, tmp_path: Path
) -> None:
    """Store copied, more signals and fills acknowledged, kill -9, old copy back: every one is there once."""
    signals = [make_signal(i) for i in range(2 * BATCH)]
    fills = [make_fill(i) for i in range(2 * BATCH)]
    backup = tmp_path / "nats-copy"
    async with service(nats_server.url, sqlite_url, nats_cfg()) as svc:
        await svc.send(signals[:BATCH], fills[:BATCH])
        await wait_until(svc.all_acked, what="first half acknowledged and marked")
        # A consistent copy of the store as it is on disk now (a stopped server has written everything).
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(shutil.copytree, nats_server.store, backup)
        await asyncio.to_thread(nats_server.start)
        await wait_until(lambda: svc.signals.replays >= 1 and svc.fills.replays >= 1, what="restart noticed")

        await svc.send(signals[BATCH:], fills[BATCH:])
        await wait_until(svc.all_acked, what="second half acknowledged and marked")
        assert await holds_exactly(nats_server.url, SIGNALS, [s.signal_id for s in signals])
        replays_before = svc.signals.replays

        # The server dies before its store has the second half: what it acknowledged is gone.
        await asyncio.to_thread(kill9, nats_server)
        await asyncio.to_thread(shutil.rmtree, nats_server.store)
        await asyncio.to_thread(shutil.copytree, backup, nats_server.store)
        await asyncio.to_thread(nats_server.start)
        assert await holds_exactly(nats_server.url, SIGNALS, [s.signal_id for s in signals[:BATCH]])

        await wait_until(
            lambda: holds_exactly(nats_server.url, SIGNALS, [s.signal_id for s in signals]), what="signals back"
        )
        await wait_until(lambda: holds_exactly(nats_server.url, FILLS, [f.msg_id for f in fills]), what="fills back")
        assert svc.signals.replays > replays_before
        assert metric_value(svc.metrics, "replays_total", kind="signal", reason="server_changed") >= 2
        assert metric_value(svc.metrics, "replayed_total", kind="signal") >= BATCH  # the lost half at least
        assert metric_value(svc.metrics, "replayed_total", kind="fill") >= BATCH
        assert await svc.all_acked()
    # The replay did not re-open or re-mark rows: the table still says every one was acknowledged once.
    assert await holds_exactly(nats_server.url, SIGNALS, [s.signal_id for s in signals])


async def test_a_stream_that_lost_messages_on_the_same_server_is_refilled(
    nats_server: NatsServer, sqlite_url: str
) -> None:
    """No restart: the stream is recreated empty under the service (same server id); its last sequence is now
    below what was acknowledged, so the replay window comes back."""
    signals = [make_signal(i) for i in range(BATCH)]
    async with service(nats_server.url, sqlite_url, nats_cfg()) as svc:
        await svc.send(signals, [])
        await wait_until(svc.all_acked, what="acknowledged and marked")
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.delete_stream(SIGNALS)
            await js.add_stream(svc.publisher.stream_config())
        finally:
            await nc.close()
        await wait_until(
            lambda: holds_exactly(nats_server.url, SIGNALS, [s.signal_id for s in signals]), what="signals back"
        )
        assert metric_value(svc.metrics, "replays_total", kind="signal", reason="stream_regressed") == 1
        assert metric_value(svc.metrics, "replays_total", kind="signal", reason="server_changed") == 0


async def test_replay_window_zero_turns_replays_off(nats_server: NatsServer, sqlite_url: str) -> None:
    signals = [make_signal(i) for i in range(5)]
    async with service(nats_server.url, sqlite_url, nats_cfg(replay_window=0.0)) as svc:
        await svc.send(signals, [])
        await wait_until(svc.all_acked, what="acknowledged")
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(nats_server.start)
        more = [make_signal(i) for i in range(5, 8)]
        await svc.send(more, [])  # acked only once the outbox saw the restarted server
        await wait_until(svc.all_acked, what="acknowledged after the restart")
        assert svc.signals.replays == 0
        assert metric_value(svc.metrics, "replayed_total", kind="signal") == 0


# ------------------------------------------------------------------------------------------ retention

WINDOW_S: Final = 180.0


async def test_retention_keeps_what_was_acknowledged_within_the_replay_window(sqlite_url: str) -> None:
    """The signal cap and the fills' early deletion both wait until an ack is older than the replay window."""
    await migrate.upgrade(sqlite_url)
    engine = create_engine(Config(database=DatabaseConfig(url=sqlite_url)))
    writer = BatchWriter(engine, WriterConfig(flush_interval=0.02), Metrics())
    t0 = wall_ms()  # rows are stored now: only the cap and the fills' retention can match them
    try:
        for i in range(4):
            await writer.put_signal(make_signal(i))
            await writer.mark_published(make_signal(i).signal_id, t0)
            await writer.put_publication(make_fill(i))
            await writer.mark_publication_published(make_fill(i).msg_id, t0)
        await writer.flush()
        cfg = RetentionConfig(max_signals=1)

        def cleaner(now_ms: int) -> RetentionCleaner:
            return RetentionCleaner(
                engine, cfg, Metrics(), clock=lambda: now_ms, fills_retention=1.0, replay_window=WINDOW_S
            )

        inside = await cleaner(t0 + int(WINDOW_S * 1000) - 1).run_once()
        assert inside["signals"] == 0
        assert inside["publications"] == 0
        after = await cleaner(t0 + int(WINDOW_S * 1000) + 1).run_once()
        assert after["signals"] == 3  # down to the cap
        assert after["publications"] == 4  # fills past their own retention
    finally:
        await writer.close()
        await engine.dispose()


# ------------------------------------------------------------------------------------------ replicas


def test_the_embedded_server_refuses_replicas(tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text("")  # every default: nats.url = "embedded"
    for key in ("REPLICAS", "KV_REPLICAS"):
        with pytest.raises(ConfigError) as err:
            load_config(path, {f"HL_MONITOR__NATS__{key}": "3"})
        assert err.value.key == f"nats.{key.lower()}"
        assert "embedded" in str(err.value)
    cfg = load_config(path, {"HL_MONITOR__NATS__URL": "nats://127.0.0.1:4222", "HL_MONITOR__NATS__KV_REPLICAS": "3"})
    assert cfg.nats.kv_replicas == 3
    assert cfg.nats.replay_window == WINDOW_S


async def test_a_replica_count_the_server_cannot_give_is_a_clear_error_and_keeps_data(
    nats_server: NatsServer,
) -> None:
    """A single server cannot hold 3 replicas: the stream and the bucket are named with both counts, and the
    messages and keys they hold are still there."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        publisher = Publisher(nats_cfg(), SignalsConfig(), Metrics(), url=nats_server.url)
        wanted = publisher.stream_config()
        await ensure_stream(js, wanted)
        await js.publish("hl.signals.a.b.close.SHORT", b"{}", headers={"Nats-Msg-Id": "kept"})
        with pytest.raises(DeliveryError) as err:
            await ensure_stream(js, dataclasses.replace(wanted, num_replicas=3))
        text = str(err.value)
        assert "'HL_SIGNALS' has 1 replica(s) but nats.replicas = 3" in text
        assert await stream_ids(nats_server.url, SIGNALS) == ["kept"]

        kv = await js.create_key_value(KeyValueConfig(bucket="hl_members", history=1, storage=StorageType.FILE))
        await kv.put("member", b"alive")
        await ensure_kv_replicas(js, "hl_members", 1)  # already right: nothing to do
        with pytest.raises(DeliveryError) as err:
            await ensure_kv_replicas(js, "hl_members", 3)
        text = str(err.value)
        assert "'hl_members' has 1 replica(s) but nats.kv_replicas = 3" in text
        assert (await kv.get("member")).value == b"alive"
    finally:
        await nc.close()
