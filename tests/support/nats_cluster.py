"""A three-node NATS cluster for tests (`hl_monitor/bench/nats_cluster.py`), its stream leader, and a probe that
samples the service while nodes die: outbox depth, readiness, the node the service is connected to."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import nats
import nats.errors
import nats.js.errors

from hl_monitor.app import Service
from hl_monitor.bench.nats_cluster import NatsCluster
from tests.support.waiting import wait_until

__all__ = ["NatsCluster", "Probe", "cluster_running", "stream_leader", "wait_stream_leader"]

# A stream leader election after a kill -9 takes a few raft election timeouts (4–9 s each on nats-server 2.x).
ELECTION_WAIT_S: Final = 30.0
# One stream-info request while a node may be down; the client then tries the next seed.
INFO_TIMEOUT_S: Final = 1.0
# How often the probe samples the service: fine against an election (seconds), cheap for the loop.
PROBE_POLL_S: Final = 0.02


@contextlib.asynccontextmanager
async def cluster_running(root: Path) -> AsyncIterator[NatsCluster]:
    cluster = NatsCluster(root)
    try:
        await cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def stream_leader(cluster: NatsCluster, stream: str) -> str | None:
    """The `server_name` of `stream`'s raft leader as the cluster reports it; None while there is none."""
    servers = [node.url for node in cluster.nodes if node.running]
    if not servers:
        return None
    try:
        nc = await nats.connect(servers=servers, allow_reconnect=False, connect_timeout=INFO_TIMEOUT_S)
    except (nats.errors.Error, OSError, TimeoutError):
        return None
    try:
        info = await nc.jetstream(timeout=INFO_TIMEOUT_S).stream_info(stream)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
        return None
    finally:
        await nc.close()
    leader = info.cluster.leader if info.cluster is not None else None
    return leader if leader and cluster.node(leader).running else None


async def wait_stream_leader(cluster: NatsCluster, stream: str, *, other_than: str | None = None) -> tuple[str, float]:
    """Wait for a running leader of `stream` (not `other_than`); its name and the seconds the wait took."""
    found: list[str] = []

    async def elected() -> bool:
        leader = await stream_leader(cluster, stream)
        if leader is None or leader == other_than:
            return False
        found.append(leader)
        return True

    took = await wait_until(elected, within=ELECTION_WAIT_S, what=f"a leader of {stream}", poll=0.05)
    return found[-1], took


@dataclass
class Probe:
    """Samples the running service: outbox depth spans, readiness reasons, the connected node."""

    service: Service
    held_spans: list[float] = field(default_factory=list)  # seconds the outbox held signals, per span
    nats_not_ready: float = 0.0  # seconds readiness named NATS
    reasons: set[str] = field(default_factory=set)  # readiness values of the "nats" reason seen
    connected_urls: set[str] = field(default_factory=set)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        held_since: float | None = None
        last = loop.time()
        outbox = self.service.components.outbox
        publisher = self.service.components.publisher
        status = self.service.components.status
        while True:
            await asyncio.sleep(PROBE_POLL_S)
            now = loop.time()
            if outbox.depth > 0 and held_since is None:
                held_since = now
            elif outbox.depth == 0 and held_since is not None:
                self.held_spans.append(now - held_since)
                held_since = None
            reason = status.readiness().reasons.get("nats")
            if reason is not None:
                self.reasons.add(reason)
                self.nats_not_ready += now - last
            if (url := publisher.connected_url) is not None:
                self.connected_urls.add(url)
            last = now

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def longest_hold(self) -> float:
        return max(self.held_spans, default=0.0)
