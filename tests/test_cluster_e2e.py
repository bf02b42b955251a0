"""Several `hl-monitor run` processes against one simulator, one NATS and one database (cluster.mode = "nats").

Ground truth is the simulator's ledger: after kill -9, a rolling restart or a NATS partition of one instance,
the stream holds every order's signal exactly once (one stored message per `signal_id`, exact size and VWAP).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import create_async_engine

from hl_monitor.chaos.env import block_of, expected_orders, stream_signals, tape_key
from hl_monitor.ops.http import AddressInput
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.storage.migrate import upgrade
from hl_monitor.storage.repository import AddressTable
from tests.support.ledger import expected_orders as expected_precise_orders
from tests.support.ledger import observed_orders
from tests.support.nats import NatsServer
from tests.support.net import free_port
from tests.support.proxy import Proxy
from tests.support.waiting import wait_until

WHALES = ["0x" + f"{i:02x}" * 20 for i in range(0xA1, 0xA7)]
WIDE = ["0x" + f"{i:02x}" * 20 for i in range(0xB1, 0xB4)]  # tier "wide" in the address table
# Short leases so a kill -9 is taken over in ~3 s; heartbeat ≤ ttl/4 and ttl + 2 beats ≤ failover.
CLUSTER_ENV = {
    "CLUSTER__MODE": "nats",
    "CLUSTER__LEASE_TTL": "2.5",
    "CLUSTER__HEARTBEAT": "0.5",
    "CLUSTER__FAILOVER": "4",
}
# Every process connects from 127.0.0.1, so the simulator's per-IP limits must cover all of them together.
SHARED_IP = SimConfig(
    clearinghouse_push_interval=0.3,
    max_connections=200,
    max_new_connections_per_minute=10_000,
    max_users=200,
    max_subscriptions=10_000,
    max_client_messages_per_minute=100_000,
    rest_weight_per_minute=1_000_000,
)
STATUS_TIMEOUT_S = 2.0
# Status and stream polls are HTTP/NATS round trips to subprocesses: a tenth of a second is often enough.
STATUS_POLL_S = 0.1
# Whole-test bound (the windows of `eventually` alone add up to more): a hung step fails with the nodes' logs and
# the processes are stopped, where pytest-timeout would kill the loop and leak them into later tests.
DEADLINE_S = 120.0
pytestmark = [
    pytest.mark.timeout(DEADLINE_S + 60),
]


class Node:
    """One `python -m hl_monitor run` process."""

    def __init__(
        self, name: str, sim: SimServer, nats_url: str, db_url: str, root: Path, http: aiohttp.ClientSession
    ) -> None:
        self.name = name
        self.http = http
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.listen = f"127.0.0.1:{free_port()}"
        settings = {
            "SERVICE__INSTANCE_ID": name,
            "SERVICE__DATA_DIR": str(self.dir / "data"),
            "SERVICE__SHUTDOWN_TIMEOUT": "10",
            "HTTP__LISTEN": self.listen,
            "HYPERLIQUID__WS_URL": sim.ws_url,
            "HYPERLIQUID__INFO_URL": sim.info_url,
            "HYPERLIQUID__PING_INTERVAL": "1",
            "HYPERLIQUID__ACK_TIMEOUT": "1",
            "HYPERLIQUID__RECONNECT_INITIAL_DELAY": "0.05",
            "HYPERLIQUID__RECONNECT_MAX_DELAY": "0.5",
            "NATS__URL": nats_url,
            "NATS__RECONNECT_WAIT": "0.2",
            "NATS__OUTBOX_SCAN_INTERVAL": "0.5",
            "DATABASE__URL": db_url,
            "ADDRESSES__INITIAL": ",".join(WHALES),
            "WRITER__FLUSH_INTERVAL": "0.05",
            "AGGREGATION__SCAN_INTERVAL": "0.1",
            "LOG__LEVEL": "info",
            **CLUSTER_ENV,
        }
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HL_MONITOR__")}
        self.env.update({f"HL_MONITOR__{k}": v for k, v in settings.items()})
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        log = (self.dir / f"run{self.starts}.log").open("wb")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hl_monitor", "run", env=self.env, cwd=self.dir, stdout=log, stderr=log
            )
        finally:
            log.close()

    async def metric(self, name: str) -> float:
        """A sample of the node's /metrics (0 when absent or the node does not answer)."""
        try:
            timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)
            async with self.http.get(f"http://{self.listen}/metrics", timeout=timeout) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
        return 0.0

    async def status(self) -> dict[str, Any] | None:
        try:
            timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)
            async with self.http.get(f"http://{self.listen}/status", timeout=timeout) as resp:
                body: dict[str, Any] = await resp.json(content_type=None)
                return body
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def owned(self) -> set[str]:
        """Addresses this node holds a lease for and streams live; empty when it does not answer."""
        status = await self.status()
        if status is None:
            return set()
        live = {c["address"] for c in status["connections"].get("assigned", []) if c.get("state") == "live"}
        return set(status["cluster"].get("owned", [])) & live

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def wait_exit(self) -> int | None:
        if self.proc is None:
            return None
        code = await asyncio.wait_for(self.proc.wait(), 30)
        self.proc = None
        return code

    async def stop(self) -> int | None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit()

    def log_tail(self) -> str:
        logs = sorted(self.dir.glob("run*.log"))
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in logs)


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str, nodes: list[Node]) -> float:
    """`wait_until` with the nodes' log tails on a timeout; prints how long each step took (shown with a failure:
    which step was slow)."""
    took = await wait_until(check, within, what, poll=STATUS_POLL_S, details=lambda: log_tails(nodes))
    print(f"{took:5.1f}s  {what}")
    return took


def log_tails(nodes: list[Node]) -> str:
    return "\n".join(f"===== {n.name}\n{n.log_tail()}" for n in nodes)


@contextlib.asynccontextmanager
async def cluster_of(
    names: list[str], sim: SimServer, nats_urls: dict[str, str], db_url: str, root: Path
) -> AsyncIterator[list[Node]]:
    # One session for every status poll: building one per request (TLS context included) would stall the loop.
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False))
    nodes = [Node(name, sim, nats_urls[name], db_url, root, http) for name in names]
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        try:
            async with asyncio.timeout(DEADLINE_S):
                yield nodes
        except TimeoutError:
            pytest.fail(f"test still running after {DEADLINE_S}s\n{log_tails(nodes)}")
    finally:
        for n in nodes:
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await n.stop()
        await http.close()


async def spread(nodes: list[Node]) -> dict[str, set[str]]:
    owned = await asyncio.gather(*(n.owned() for n in nodes))
    return {n.name: o for n, o in zip(nodes, owned, strict=True)}


def covers_all(shares: dict[str, set[str]]) -> bool:
    seen = [a for share in shares.values() for a in share]
    return sorted(seen) == sorted(WHALES)


async def trade(sim: SimServer, whales: list[str], round_: int) -> None:
    """One order per whale; odd rounds buy BTC in two fills, even rounds sell ETH."""
    for i, address in enumerate(whales):
        whale = sim.exchange.whale(address)
        if round_ % 2:
            await whale.market_order("BTC", True, f"0.{i + 1}", "80000", fills=2, px_step="5")
        else:
            await whale.market_order("ETH", False, f"{i + 1}", "2400", fills=2, px_step="1")


async def assert_exactly_once(sim: SimServer, nats_url: str, nodes: list[Node]) -> None:
    """Every order in the stream once, checked at a quiet point: a marker order per whale traded after
    everything else is in the stream, and every running node has an empty outbox and writer queue. A late
    duplicate (a second holder, a replay) is made from fills that came before the markers, so by then it is
    stored, or at least still queued in some node."""
    for address in WHALES:
        await sim.exchange.whale(address).market_order("SOL", True, "1", "150")
    want = {k: v for address in WHALES for k, v in expected_precise_orders(sim, address).items()}

    async def complete() -> bool:
        stored = await stream_signals(nats_url)
        return len({msg_id for msg_id, _ in stored}) >= len(want)

    async def drained() -> bool:
        statuses = await asyncio.gather(*(n.status() for n in nodes if n.proc is not None))
        if any(status is None for status in statuses):
            return False  # a running node that does not answer may still hold signals
        return all(s is not None and s["outbox_depth"] == 0 and s["writer_queue_depth"] == 0 for s in statuses)

    await eventually(complete, 30, f"{len(want)} signals in the stream", nodes)
    await eventually(drained, 30, "every node's outbox and writer queue empty", nodes)
    stored = await stream_signals(nats_url)
    ids = [msg_id for msg_id, _ in stored]
    assert len(ids) == len(set(ids)), "a signal_id was stored twice in the stream"
    assert all(msg_id == sig.signal_id for msg_id, sig in stored)
    assert observed_orders([sig for _, sig in stored]) == want


async def test_three_instances_spread_evenly_and_survive_kill_9(
    mariadb_url: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    """6 whales on 3 instances: 2 each. kill -9 of one mid-stream: its whales move within failover, trades made
    while nobody tracked them are recovered, and every order is in the stream exactly once."""
    await upgrade(mariadb_url)
    names = ["node-0", "node-1", "node-2"]
    async with (
        SimServer(SHARED_IP) as sim,
        cluster_of(names, sim, dict.fromkeys(names, nats_server.url), mariadb_url, tmp_path) as nodes,
    ):

        async def even() -> bool:
            shares = await spread(nodes)
            return covers_all(shares) and all(len(s) == 2 for s in shares.values())

        await eventually(even, 40, "2 live whales per instance", nodes)
        await trade(sim, WHALES, 1)
        victim, survivors = nodes[0], nodes[1:]
        orphaned = (await spread([victim]))[victim.name]
        await asyncio.sleep(0.3)  # mid-stream: the victim is processing round 1
        victim.kill9()
        assert await victim.wait_exit() == -signal.SIGKILL
        await trade(sim, sorted(orphaned), 2)  # nobody tracks these right now: gap recovery must find them

        async def taken_over() -> bool:
            return covers_all(await spread(survivors))

        took = await eventually(taken_over, 20, "survivors own every whale", nodes)
        await trade(sim, WHALES, 3)
        await assert_exactly_once(sim, nats_server.url, nodes)
        statuses = [await n.status() for n in survivors]
        assert sum(s["cluster"]["takeovers"] for s in statuses if s) >= len(orphaned)
        assert all(s and [m["id"] for m in s["cluster"]["members"]] == ["node-1", "node-2"] for s in statuses)
        print(f"kill -9 takeover: {took:.1f}s after the process died (failover {CLUSTER_ENV['CLUSTER__FAILOVER']}s)")


async def test_rolling_restart_hands_over_without_losing_or_repeating_a_signal(
    mariadb_url: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Each instance in turn gets SIGTERM (exit 0, leases handed over at once) and comes back; trades go on."""
    await upgrade(mariadb_url)
    names = ["node-0", "node-1"]
    async with (
        SimServer(SHARED_IP) as sim,
        cluster_of(names, sim, dict.fromkeys(names, nats_server.url), mariadb_url, tmp_path) as nodes,
    ):

        async def even() -> bool:
            shares = await spread(nodes)
            return covers_all(shares) and all(len(s) == 3 for s in shares.values())

        await eventually(even, 40, "3 live whales per instance", nodes)
        round_ = 0
        for leaving in nodes:
            staying = [n for n in nodes if n is not leaving]
            round_ += 1
            await trade(sim, WHALES, round_)
            assert await leaving.stop() == 0
            round_ += 1
            await trade(sim, WHALES, round_)  # while the other instance takes its whales over

            async def others_own_all(staying: list[Node] = staying) -> bool:
                return covers_all(await spread(staying))

            # A handover, not an expiry: well within the failover bound even though the restart is graceful.
            await eventually(others_own_all, 15, f"{leaving.name}'s whales handed over", nodes)
            await leaving.start()
            await eventually(even, 40, f"{leaving.name} back with its share", nodes)
        round_ += 1
        await trade(sim, WHALES, round_)
        await assert_exactly_once(sim, nats_server.url, nodes)
        for n in nodes:
            status = await n.status()
            assert status is not None
            assert status["cluster"]["losses"].get("fenced", 0) == 0


async def test_partitioned_instance_gives_up_its_leases(nats_server: NatsServer, tmp_path: Path) -> None:
    """NATS unreachable from one instance (SQLite variant): it stops tracking its whales, the other takes them
    over, trades during the partition come out once, and the instance rejoins when NATS is reachable again."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(db_url)
    proxy = Proxy(nats_server.port)
    await proxy.start()
    names = ["node-0", "node-1"]
    urls = {"node-0": proxy.url, "node-1": nats_server.url}
    try:
        async with SimServer(SHARED_IP) as sim, cluster_of(names, sim, urls, db_url, tmp_path) as nodes:
            cut, healthy = nodes

            async def even() -> bool:
                shares = await spread(nodes)
                return covers_all(shares) and all(len(s) == 3 for s in shares.values())

            await eventually(even, 40, "3 live whales per instance", nodes)
            await trade(sim, WHALES, 1)
            proxy.partition()

            async def fenced() -> bool:
                status = await cut.status()
                return status is not None and not status["cluster"]["owned"] and not status["cluster"]["leases"]

            await eventually(fenced, 10, f"{cut.name} fenced", nodes)
            await trade(sim, WHALES, 2)

            async def healthy_owns_all() -> bool:
                return covers_all(await spread([healthy]))

            await eventually(healthy_owns_all, 20, f"{healthy.name} owns every whale", nodes)
            status = await cut.status()
            assert status is not None
            assert status["cluster"]["losses"]["fenced"] == 3
            proxy.heal()
            await eventually(even, 40, f"{cut.name} rejoined with its share", nodes)
            await trade(sim, WHALES, 3)
            await assert_exactly_once(sim, nats_server.url, nodes)
    finally:
        await proxy.close()


async def test_both_instances_read_the_tape_and_each_wide_block_is_stored_once(
    mariadb_url: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Active-active wide tier (docs/architecture.md §5): every instance reads the whole tape and reports each
    block of a wide address under the same `signal_id`; JetStream stores it once, with the ledger's size and
    VWAP, and answers the second instance's publish as a duplicate."""
    await upgrade(mariadb_url)
    db = create_async_engine(mariadb_url)
    try:
        await AddressTable(db).add([AddressInput(address=a, tier="wide") for a in WIDE])
    finally:
        await db.dispose()
    names = ["node-0", "node-1"]
    async with (
        SimServer(SHARED_IP) as sim,
        cluster_of(names, sim, dict.fromkeys(names, nats_server.url), mariadb_url, tmp_path) as nodes,
    ):

        async def tape_ready() -> bool:
            statuses = await asyncio.gather(*(n.status() for n in nodes))
            return all(
                s is not None
                and s["wide"] is not None
                and s["wide"]["bootstrapped"] == len(WIDE)
                and s["tape"]["continuous_since_ms"] is not None
                for s in statuses
            )

        await eventually(tape_ready, 40, "both tapes live, every wide address bootstrapped", nodes)
        for round_ in (1, 2):
            await trade(sim, WIDE, round_)
        want = {k: v for a in WIDE for k, v in expected_orders(sim, a, by=block_of(a)).items()}

        async def complete() -> bool:
            stored = await stream_signals(nats_server.url)
            return len({msg_id for msg_id, sig in stored if sig.source == "market_tape"}) >= len(want)

        await eventually(complete, 30, f"{len(want)} tape signals in the stream", nodes)

        async def both_published() -> bool:
            duplicates = await asyncio.gather(*(n.metric("hl_monitor_publish_duplicates_total") for n in nodes))
            return sum(duplicates) >= len(want)

        # Each block's second publish (whichever instance is later) is answered as a duplicate.
        await eventually(both_published, 10, "the other instance's publish of every block answered duplicate", nodes)
        stored = [(msg_id, sig) for msg_id, sig in await stream_signals(nats_server.url) if sig.address in WIDE]
        ids = [msg_id for msg_id, _ in stored]
        assert len(ids) == len(set(ids)), "a tape block was stored twice"
        assert all(sig.source == "market_tape" for _, sig in stored)
        got = {tape_key(sig): (sig.size, sig.price, sig.fill_count) for _, sig in stored}
        assert got == want
