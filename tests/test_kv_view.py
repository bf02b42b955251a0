"""The KV view of position documents against a real nats-server: the bucket ends at the latest value of each
address (bursts coalesce, a delete wins over a queued put), outages are retried, the queue is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import nats.js.errors
import pytest
from nats.js.api import StorageType

from hl_monitor.config import NatsConfig, PositionsConfig, SignalsConfig
from hl_monitor.delivery.kv_view import KvView
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.metrics import Metrics
from tests.support.delivery import nats_cfg
from tests.support.nats import NatsServer
from tests.support.waiting import wait_until

BUCKET = "hl_positions"
ADDRESSES = ["0x" + f"{n:02x}" * 20 for n in range(1, 6)]


def doc(address: str, n: int) -> bytes:
    return b'{"address":"%s","as_of":%d,"size":"1.000000000000000001"}' % (address.encode(), n)


class View:
    def __init__(self, url: str, cfg: NatsConfig, **kw: int) -> None:
        self.metrics = Metrics()
        self.nats = Publisher(cfg, SignalsConfig(), self.metrics, url=url)
        self.view = KvView(self.nats, cfg, PositionsConfig(), self.metrics, **kw)
        self.task: asyncio.Task[None] | None = None

    async def start(self, *, run: bool = True) -> None:
        await self.nats.connect(wait=5)
        await self.view.open()
        if run:
            self.task = asyncio.create_task(self.view.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.nats.close()

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(f"hl_monitor_{name}", labels or None) or 0.0


@pytest.fixture
async def view(nats_server: NatsServer) -> AsyncIterator[View]:
    v = View(nats_server.url, nats_cfg(publish_timeout=0.3))
    await v.start()
    try:
        yield v
    finally:
        await v.stop()


async def bucket_contents(url: str) -> dict[str, bytes]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return {}
        return {key: (await kv.get(key)).value or b"" for key in keys}
    finally:
        await nc.close()


async def test_bucket_is_created_with_history_one(view: View, nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        assert (await (await js.key_value(BUCKET)).status()).history == 1
        config = (await js.stream_info(f"KV_{BUCKET}")).config
        assert (config.storage, config.num_replicas) == (StorageType.FILE, 1)
    finally:
        await nc.close()


async def test_a_burst_ends_at_the_last_value_and_a_delete_wins(view: View, nats_server: NatsServer) -> None:
    for n in range(200):
        for address in ADDRESSES:
            await view.view.put(address.upper().replace("0X", "0x"), doc(address, n))
    await view.view.delete(ADDRESSES[0])  # after its puts were queued
    await view.view.put(ADDRESSES[1], doc(ADDRESSES[1], 999))
    await wait_until(lambda: view.view.depth == 0, what="queue written")
    want = {a: doc(a, 199) for a in ADDRESSES[2:]} | {ADDRESSES[1]: doc(ADDRESSES[1], 999)}
    assert await bucket_contents(nats_server.url) == want
    writes = view.sample("kv_writes_total", op="put")
    assert writes < 200 * len(ADDRESSES)  # coalesced: the bucket never saw most intermediate values
    assert view.sample("kv_queue_depth") == 0


async def test_latest_values_survive_a_nats_outage(view: View, nats_server: NatsServer) -> None:
    await view.view.put(ADDRESSES[0], doc(ADDRESSES[0], 1))
    await view.view.put(ADDRESSES[1], doc(ADDRESSES[1], 1))
    await wait_until(lambda: view.view.depth == 0, what="first values written")
    await asyncio.to_thread(nats_server.stop)
    await wait_until(lambda: not view.nats.is_connected, what="disconnect")
    for n in range(2, 50):
        await view.view.put(ADDRESSES[0], doc(ADDRESSES[0], n))
    await view.view.delete(ADDRESSES[1])
    assert view.view.depth == 2
    await asyncio.to_thread(nats_server.start)
    await wait_until(lambda: view.view.depth == 0, what="queue written after the outage")
    assert await bucket_contents(nats_server.url) == {ADDRESSES[0]: doc(ADDRESSES[0], 49)}


async def test_failed_writes_are_counted_and_retried(nats_server: NatsServer) -> None:
    """NATS up but the bucket gone (a server reset): writes fail, are counted, and land once it is back."""
    v = View(nats_server.url, nats_cfg(publish_timeout=0.3))
    await v.start()
    try:
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().delete_key_value(BUCKET)
            await v.view.put(ADDRESSES[0], doc(ADDRESSES[0], 1))
            await v.view.put(ADDRESSES[0], doc(ADDRESSES[0], 2))
            await wait_until(lambda: v.sample("kv_errors_total", op="put") > 0, what="a failed write")
            assert v.view.depth == 1
            await v.view.open()  # what a restart of the view does: the bucket is created again
        finally:
            await nc.close()
        await wait_until(lambda: v.view.depth == 0, what="the latest value written")
        assert await bucket_contents(nats_server.url) == {ADDRESSES[0]: doc(ADDRESSES[0], 2)}
    finally:
        await v.stop()


async def test_the_queue_is_bounded_per_address(nats_server: NatsServer) -> None:
    v = View(nats_server.url, nats_cfg(), queue_size=2)
    await v.start(run=False)  # nothing drains yet
    try:
        await v.view.put(ADDRESSES[0], doc(ADDRESSES[0], 1))
        await v.view.put(ADDRESSES[1], doc(ADDRESSES[1], 1))
        blocked = asyncio.create_task(v.view.put(ADDRESSES[2], doc(ADDRESSES[2], 1)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not blocked.done()  # a third address waits for room
        await v.view.put(ADDRESSES[0], doc(ADDRESSES[0], 2))  # a queued address only replaces its value
        await v.view.delete(ADDRESSES[1])
        assert v.view.depth == 2
        v.task = asyncio.create_task(v.view.run())
        await blocked
        await wait_until(lambda: v.view.depth == 0, what="queue written")
        assert await bucket_contents(nats_server.url) == {
            ADDRESSES[0]: doc(ADDRESSES[0], 2),
            ADDRESSES[2]: doc(ADDRESSES[2], 1),
        }
    finally:
        await v.stop()


async def test_drain_writes_what_is_queued(nats_server: NatsServer) -> None:
    v = View(nats_server.url, nats_cfg())
    await v.start()
    try:
        for address in ADDRESSES:
            await v.view.put(address, doc(address, 7))
        assert await v.view.drain(10) == 0
        assert await bucket_contents(nats_server.url) == {a: doc(a, 7) for a in ADDRESSES}
    finally:
        await v.stop()
