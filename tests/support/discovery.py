"""Discovery test parts: tape trades, a `clearinghouseState` fake, and the automatic-watch chain on a real
JetStream and a migrated SQLite table (`Announcer`), one `Instance` per simulated service."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import msgspec

from hl_monitor.clock import ManualClock
from hl_monitor.cluster.roles import RoleLease
from hl_monitor.config import ClusterConfig, Config, DatabaseConfig, DiscoveryConfig, HyperliquidConfig, WriterConfig
from hl_monitor.delivery.discovery import DiscoveryPublisher, discovery_outbox
from hl_monitor.delivery.publications import PublicationOutbox, PublicationSinkImpl
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.domain.address import Priority
from hl_monitor.hyperliquid.protocol import ClearinghouseState, WsTrade
from hl_monitor.metrics import Metrics
from hl_monitor.storage import migrate
from hl_monitor.storage.repository import AddressTable, Repository, create_engine
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.watch.autowatch import AutoWatcher
from hl_monitor.watch.discovery import DiscoveryKeeper
from tests.support.delivery import nats_cfg

USER_HASH: Final = "0x" + "ab" * 32
HOUR_MS: Final = 3_600_000
START_S: Final = 1_700_000_000.0  # a wall-clock start for the manual clock (ms values look like real ones)

_tids = itertools.count(1)


def retail(i: int) -> str:
    return "0x" + f"{i:040x}"


def trade(buyer: str, seller: str, *, coin: str = "ETH", usd: int = 100_000, t: int = 0, taker: str = "B") -> WsTrade:
    """One tape trade of `usd` notional (price 1,000)."""
    return WsTrade(
        coin=coin,
        side="B" if taker == "B" else "A",
        px=Decimal(1000),
        sz=Decimal(usd) / 1000,
        time=t,
        tid=next(_tids),
        hash=USER_HASH,
        users=(buyer, seller),
    )


def buys(whale: str, usd: int, *, t: int = 0, pieces: int = 10, first_retail: int = 1) -> list[WsTrade]:
    """`whale` takes `usd` of ETH from retail in `pieces` trades: a directional candidate."""
    return [trade(whale, retail(first_retail + k), usd=usd // pieces, t=t) for k in range(pieces)]


def maker_flow(maker: str, usd: int, *, t: int = 0) -> list[WsTrade]:
    """`maker` quotes both sides of four coins, retail taking: a market maker bigger than any whale."""
    out: list[WsTrade] = []
    for i, coin in enumerate(("BTC", "ETH", "SOL", "HYPE")):
        out.append(trade(retail(900 + i), maker, coin=coin, usd=usd // 8, t=t, taker="B"))
        out.append(trade(maker, retail(950 + i), coin=coin, usd=usd // 8, t=t, taker="A"))
    return out


class FakeInfo:
    """`clearinghouseState` by address (account value in USD, default 0); every read is counted."""

    def __init__(self, values: dict[str, int]) -> None:
        self.values = values
        self.reads: list[str] = []

    async def clearinghouse_state(self, user: str, dex: str = "", *, priority: Priority = "high") -> ClearinghouseState:
        self.reads.append(user)
        body = {"marginSummary": {"accountValue": str(self.values.get(user, 0))}, "assetPositions": []}
        return msgspec.json.decode(msgspec.json.encode(body), type=ClearinghouseState)


class Clock:
    """A `ManualClock` as the keeper reads it: monotonic seconds, wall ms, and sleeps that move it."""

    def __init__(self) -> None:
        self.manual = ManualClock(START_S)

    def now(self) -> float:
        return self.manual.now()

    def wall_ms(self) -> int:
        return round(self.manual.now() * 1000)

    async def sleep(self, seconds: float) -> None:
        self.manual.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.manual.advance(seconds)


@dataclass
class Instance:
    """One service's discovery: its keeper, its automatic watcher and (cluster) its role lease."""

    name: str
    keeper: DiscoveryKeeper
    auto: AutoWatcher
    lease: RoleLease | None
    metrics: Metrics

    def leads(self) -> bool:
        """Holds the `discovery` lease now."""
        return self.lease is not None and self.lease.held()

    async def step(self) -> None:
        await self.keeper.confirm_due()
        await self.auto.step()


@dataclass
class Announcer:
    """A migrated SQLite database (address table, publications), a writer, and one NATS connection with the
    discovery stream and its running outbox: what the service runs for announcements."""

    url: str
    table: AddressTable
    repo: Repository
    writer: BatchWriter
    nats: Publisher
    outbox: PublicationOutbox
    sink: PublicationSinkImpl
    metrics: Metrics
    outbox_task: asyncio.Task[None]
    lease_tasks: dict[int, asyncio.Task[None]]

    def instance(
        self,
        clock: Clock,
        info: FakeInfo,
        cfg: DiscoveryConfig,
        *,
        instance_id: str = "one",
        cluster: ClusterConfig | None = None,
    ) -> Instance:
        metrics = Metrics()
        keeper = DiscoveryKeeper(
            cfg,
            HyperliquidConfig(),
            info=info,
            metrics=metrics,
            is_watched=lambda _a: False,
            wall_ms=clock.wall_ms,
            clock=clock.now,
            sleep=clock.sleep,
        )
        lease = None
        is_leader: Callable[[], bool] = lambda: True  # noqa: E731
        if cluster is not None:
            lease = RoleLease("discovery", cluster, self.nats.client, member_id=instance_id)
            self.lease_tasks[id(lease)] = asyncio.create_task(lease.run())
            is_leader = lease.held
        auto = AutoWatcher(
            cfg,
            keeper,
            self.table,
            sink=self.sink,
            metrics=metrics,
            instance_id=instance_id,
            is_leader=is_leader,
            wall_ms=clock.wall_ms,
        )
        return Instance(instance_id, keeper, auto, lease, metrics)

    async def stop_lease(self, lease: RoleLease) -> None:
        """The instance stops: its lease is released on the way out."""
        task = self.lease_tasks.pop(id(lease))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def restart_outbox(self) -> None:
        """A new outbox, as after a restart: it re-reads every unacknowledged announcement at start."""
        self.outbox_task.cancel()
        await asyncio.gather(self.outbox_task, return_exceptions=True)
        cfg = nats_cfg()
        publisher = DiscoveryPublisher(self.nats, cfg, DiscoveryConfig(), self.metrics)
        self.outbox = discovery_outbox(publisher, self.repo, self.writer, self.metrics, cfg)
        self.sink = PublicationSinkImpl(self.writer, self.outbox)
        self.outbox_task = asyncio.create_task(self.outbox.run())

    async def all_acknowledged(self) -> bool:
        await self.writer.flush()
        return await self.repo.count_unpublished_publications(kinds=("discovery",)) == 0

    async def rows(self) -> dict[str, dict[str, Any]]:
        return {row["address"]: row for row in await self.table.list()}


@asynccontextmanager
async def announcer(nats_url: str, db_url: str, discovery: DiscoveryConfig) -> AsyncIterator[Announcer]:
    await migrate.upgrade(db_url)
    metrics = Metrics()
    async with AsyncExitStack() as stack:
        engine = create_engine(Config(database=DatabaseConfig(url=db_url)))
        stack.push_async_callback(engine.dispose)
        writer = BatchWriter(engine, WriterConfig(flush_interval=0.02), metrics)
        cfg = nats_cfg()
        nats = Publisher(cfg, Config().signals, metrics, url=nats_url)
        await nats.connect(wait=5)
        stack.push_async_callback(nats.close)
        repo = Repository(engine)
        outbox = discovery_outbox(DiscoveryPublisher(nats, cfg, discovery, metrics), repo, writer, metrics, cfg)
        writer_task = asyncio.create_task(writer.run())
        stack.push_async_callback(_stop_writer, writer, writer_task)
        a = Announcer(
            db_url,
            AddressTable(engine),
            repo,
            writer,
            nats,
            outbox,
            PublicationSinkImpl(writer, outbox),
            metrics,
            asyncio.create_task(outbox.run()),
            {},
        )
        try:
            yield a
        finally:
            tasks = [a.outbox_task, *a.lease_tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _stop_writer(writer: BatchWriter, task: asyncio.Task[None]) -> None:
    await writer.close()
    await task
