"""Cluster layer: placement (pure), membership and leases on a real JetStream KV, state handover through a real DB.

Mutual exclusion is checked on a shared ledger of handover calls (the moments an instance starts and stops
tracking an address), not on timings: for every address, each `acquire` must follow the previous holder's
`release` (or crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from hl_monitor.cluster.leases import Cluster
from hl_monitor.cluster.placement import Member, place
from hl_monitor.config import ClusterConfig, load_config
from hl_monitor.domain.address import WatchedAddress
from hl_monitor.domain.signal import Signal
from hl_monitor.errors import ConfigError
from hl_monitor.feeds.addresses import AddressBook, StaticSource
from hl_monitor.metrics import Metrics
from hl_monitor.storage.migrate import upgrade
from hl_monitor.storage.repository import Repository, create_engine
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.watch.watchset import WatchSet
from tests.support.factories import ADDR, NOW, T0, fill, frame
from tests.support.factories import engine as seeded_engine
from tests.support.nats import NatsServer
from tests.support.proxy import Proxy
from tests.support.storage import writer_cfg
from tests.support.waiting import wait_until

ADDRS = [f"0x{i:040x}" for i in range(1, 7)]
# Short enough for fast tests, long enough that a busy CI loop does not fence by accident.
FAST = ClusterConfig(mode="nats", lease_ttl=1.2, heartbeat=0.2, failover=1.6)


def members(*slots: int) -> list[Member]:
    return [Member(id=f"m{i}", incarnation="x", precise_slots=s) for i, s in enumerate(slots)]


def watched(n: int, **kw: object) -> list[WatchedAddress]:
    return [WatchedAddress(address=f"0x{i:040x}", **kw) for i in range(1, n + 1)]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ placement


def test_placement_spreads_evenly_within_capacity() -> None:
    """Equal members get equal shares; a small member gets its proportional share; beyond Σslots → unplaced."""
    spread = place(watched(6), members(8, 8, 8))
    assert sorted(list(spread.values()).count(m) for m in ("m0", "m1", "m2")) == [2, 2, 2]

    mixed = place(watched(10), members(8, 8, 2))
    counts = {m: list(mixed.values()).count(m) for m in ("m0", "m1", "m2")}
    assert len(mixed) == 10
    assert counts["m2"] <= 2
    assert max(counts.values()) <= 5

    full = place(watched(30), members(8, 8, 8))
    assert len(full) == 24
    ranked_out = {f"0x{i:040x}" for i in range(25, 31)}  # equal priority: the address order ranks them
    assert ranked_out.isdisjoint(full)


def test_placement_is_deterministic_and_prefers_priority() -> None:
    entries = watched(12)
    entries[11] = WatchedAddress(address=entries[11].address, priority=5)
    ms = members(2, 2)
    first = place(entries, ms)
    shuffled = entries[:]
    random.Random(1).shuffle(shuffled)
    assert place(shuffled, list(reversed(ms))) == first
    assert entries[11].address in first  # 4 slots for 12 addresses: the priority one is placed


def test_departure_moves_the_departed_members_addresses_and_few_others() -> None:
    """Rendezvous keeps survivors' addresses in place; the load bound re-balances only a handful of them."""
    entries = watched(40)
    before = place(entries, members(50, 50, 50, 50))
    after = place(entries, members(50, 50, 50, 50)[:3])
    departed = {a for a, m in before.items() if m == "m3"}
    moved = {a for a in before if before[a] != after[a]}
    assert departed <= moved
    assert len(moved - departed) <= len(entries) // 10
    assert len(after) == 40
    assert max(list(after.values()).count(m) for m in ("m0", "m1", "m2")) == 14


def test_placement_honours_pins_wide_tier_and_zero_capacity() -> None:
    ms = [
        Member(id="a", incarnation="x", precise_slots=8, server_id=1),
        Member(id="b", incarnation="x", precise_slots=8, server_id=2),
        Member(id="tape-only", incarnation="x", precise_slots=0),
    ]
    entries = [
        WatchedAddress(address=ADDRS[0], server_id=2),
        WatchedAddress(address=ADDRS[1], server_id=2),
        WatchedAddress(address=ADDRS[2], tier="wide"),
        WatchedAddress(address=ADDRS[3], server_id=9),  # pinned to an instance that is not running
    ]
    assert place(entries, ms) == {ADDRS[0]: "b", ADDRS[1]: "b"}


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"CLUSTER__MODE": "static"}, "cluster.mode"),
        ({"CLUSTER__MODE": "nats"}, "cluster.mode"),  # embedded NATS cannot be shared
        ({"CLUSTER__HEARTBEAT": "5"}, "cluster.heartbeat"),
        ({"CLUSTER__LEASE_TTL": "14"}, "cluster.failover"),
        ({"CLUSTER__LEASES_BUCKET": "a.b"}, "cluster.leases_bucket"),
        ({"CLUSTER__MODE": "sharded"}, "cluster.mode"),
    ],
)
def test_bad_cluster_config_names_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={f"HL_MONITOR__{k}": v for k, v in env.items()})
    assert info.value.key == key


def test_cluster_modes_that_are_valid() -> None:
    static = load_config(None, environ={"HL_MONITOR__CLUSTER__MODE": "static", "HL_MONITOR__ADDRESSES__SERVER_ID": "2"})
    assert static.cluster.mode == "static"
    nats_mode = load_config(
        None, environ={"HL_MONITOR__CLUSTER__MODE": "nats", "HL_MONITOR__NATS__URL": "nats://127.0.0.1:4222"}
    )
    assert nats_mode.cluster.failover >= nats_mode.cluster.lease_ttl + 2 * nats_mode.cluster.heartbeat


# ------------------------------------------------------------------------------------------------ live cluster


@dataclass
class Ledger:
    """Every handover call of every member, in the order they happened."""

    events: list[tuple[str, str, str]] = field(default_factory=list)

    def holders(self) -> dict[str, str]:
        """Address → member currently tracking it, replaying the ledger; fails on an overlap."""
        holding: dict[str, str] = {}
        for member, op, address in self.events:
            if op == "acquire":
                assert address not in holding, f"{member} started {address} while {holding.get(address)} tracked it"
                holding[address] = member
            elif holding.get(address) == member:
                del holding[address]
        return holding

    def ops(self, member: str, op: str) -> list[str]:
        return [a for m, o, a in self.events if m == member and o == op]


class RecordingHandover:
    def __init__(self, name: str, ledger: Ledger) -> None:
        self.name = name
        self.ledger = ledger

    async def acquire(self, addresses: Sequence[str]) -> None:
        self.ledger.events.extend((self.name, "acquire", a) for a in addresses)

    async def release(self, addresses: Sequence[str], *, persist: bool) -> None:
        self.ledger.events.extend((self.name, "release" if persist else "drop", a) for a in addresses)


@dataclass
class Node:
    name: str
    cluster: Cluster
    nc: Client
    metrics: Metrics
    task: asyncio.Task[None]

    def owned(self) -> frozenset[str]:
        return self.cluster.owned().addresses()

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(f"hl_monitor_{name}", labels) or 0.0

    async def crash(self) -> None:
        """Stop without leaving (as kill -9): no release, no delete; NATS has to expire everything."""
        self.task.cancel()
        await asyncio.wait([self.task])
        await self.nc.close()


async def make_book(addresses: Sequence[str]) -> AddressBook:
    book = AddressBook([StaticSource(list(addresses))], Metrics(), reload_interval=60, remove_grace=0)
    await book.reload()
    return book


@contextlib.asynccontextmanager
async def node(
    name: str, url: str, book: AddressBook, ledger: Ledger, cfg: ClusterConfig = FAST, slots: int = 8
) -> AsyncIterator[Node]:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, connect_timeout=0.5)
    metrics = Metrics()
    cluster = Cluster(cfg, book, nc, RecordingHandover(name, ledger), metrics, member_id=name, precise_slots=slots)
    n = Node(name, cluster, nc, metrics, asyncio.create_task(cluster.run(), name=f"cluster-{name}"))
    try:
        yield n
    finally:
        if not n.task.done():
            n.task.cancel()
            await asyncio.wait([n.task])
            await cluster.leave()
        if not nc.is_closed:
            await nc.close()


async def test_members_see_each_other_and_split_the_addresses(nats_server: NatsServer) -> None:
    """Two members register with their capacity, each owns half, never the same address; status says so."""
    book = await make_book(ADDRS)
    ledger = Ledger()
    async with node("a", nats_server.url, book, ledger) as a, node("b", nats_server.url, book, ledger) as b:
        await wait_until(lambda: len(a.owned()) == 3 and len(b.owned()) == 3, within=10)
        assert a.owned() | b.owned() == set(ADDRS)
        assert ledger.holders() == {**dict.fromkeys(a.owned(), "a"), **dict.fromkeys(b.owned(), "b")}
        status = a.cluster.status()
        assert [(m["id"], m["precise_slots"], m["placed"]) for m in status["members"]] == [("a", 8, 3), ("b", 8, 3)]
        assert status["owned"] == sorted(a.owned())
        assert {lease["address"] for lease in status["leases"]} == a.owned()
        assert a.metric("cluster_members") == 2
        assert a.metric("cluster_owned_addresses") == 3
        assert a.cluster.precise_elsewhere() == b.owned()
        owned_view = a.cluster.owned()
        assert set(owned_view.entries()) == a.owned()


async def test_crashed_member_is_taken_over_only_after_its_leases_expire(nats_server: NatsServer) -> None:
    """kill -9 equivalent: the survivor owns everything within failover, and never overlapped the dead holder."""
    book = await make_book(ADDRS)
    ledger = Ledger()
    async with node("a", nats_server.url, book, ledger) as a, node("b", nats_server.url, book, ledger) as b:
        await wait_until(lambda: len(a.owned()) == 3 and len(b.owned()) == 3, within=10)
        lost = a.owned()
        await a.crash()
        crashed_at = len(ledger.events)
        ledger.events.extend(("a", "crash", address) for address in lost)
        await wait_until(lambda: b.owned() == set(ADDRS), within=FAST.failover + 3)
        assert set(ledger.ops("b", "acquire")[3:]) == lost
        assert all(m == "b" for m, _, _ in ledger.events[crashed_at + len(lost) :])
        ledger.holders()  # no overlap
        assert b.metric("cluster_lease_takeovers_total") == 3
        await wait_until(lambda: b.metric("cluster_members") == 1, within=5)


async def test_graceful_leave_hands_over_without_waiting_for_expiry(nats_server: NatsServer) -> None:
    """With a 20 s lease TTL, a leaving member's addresses still move within seconds: released, not expired."""
    slow = ClusterConfig(mode="nats", lease_ttl=20.0, heartbeat=0.2, failover=21.0)
    book = await make_book(ADDRS)
    ledger = Ledger()
    async with node("a", nats_server.url, book, ledger, slow) as a, node("b", nats_server.url, book, ledger, slow) as b:
        await wait_until(lambda: len(a.owned()) == 3 and len(b.owned()) == 3, within=10)
        handed = a.owned()
        a.task.cancel()
        await asyncio.wait([a.task])
        await a.cluster.leave()
        assert set(ledger.ops("a", "release")) == handed  # state persisted before the leases were deleted
        await wait_until(lambda: b.owned() == set(ADDRS), within=5)
        ledger.holders()
        assert a.metric("cluster_lease_losses_total", reason="shutdown") == 3


async def test_partitioned_member_fences_itself_before_anyone_takes_over(nats_server: NatsServer) -> None:
    """NATS unreachable for one member: it stops tracking at half the TTL; the other takes over after the TTL;
    when the partition heals it rejoins and the addresses are rebalanced."""
    proxy = Proxy(nats_server.port)
    await proxy.start()
    book = await make_book(ADDRS)
    ledger = Ledger()
    try:
        async with node("a", proxy.url, book, ledger) as a, node("b", nats_server.url, book, ledger) as b:
            await wait_until(lambda: len(a.owned()) == 3 and len(b.owned()) == 3, within=10)
            fenced = a.owned()
            proxy.partition()
            await wait_until(lambda: b.owned() == set(ADDRS), within=FAST.failover + 3)
            assert a.owned() == frozenset()
            assert set(ledger.ops("a", "release")) == fenced
            ledger.holders()  # every acquire by b came after a's fence
            assert a.metric("cluster_lease_losses_total", reason="fenced") == 3
            assert a.cluster.status()["last_fence"] is not None
            proxy.heal()
            await wait_until(lambda: len(a.owned()) == 3 and len(b.owned()) == 3, within=10)
            ledger.holders()
    finally:
        await proxy.close()


async def test_a_lease_rewritten_by_someone_else_is_dropped_at_once(nats_server: NatsServer) -> None:
    """Compare-and-set renewal: if the key changed under the holder, it stops tracking (without persisting)."""
    book = await make_book(ADDRS[:1])
    ledger = Ledger()
    async with node("a", nats_server.url, book, ledger) as a:
        await wait_until(lambda: a.owned() == {ADDRS[0]}, within=10)
        intruder = await nats.connect(nats_server.url)
        try:
            kv = await intruder.jetstream().key_value(FAST.leases_bucket)
            await kv.put(ADDRS[0], b'{"member":"z","incarnation":"z","renewed_ms":0}')
            await wait_until(lambda: a.owned() == frozenset(), within=5)
            assert ledger.ops("a", "drop") == [ADDRS[0]]
            assert a.metric("cluster_lease_losses_total", reason="lost") == 1
            await wait_until(lambda: a.cluster.status()["waiting"] == {ADDRS[0]: "z"}, within=5)
        finally:
            await intruder.close()


# ------------------------------------------------------------------------------------------------ state handover


def handover(engine: TrackingEngine, writer: BatchWriter, repo: Repository) -> WatchSet:
    async def no_signals(signals: Sequence[Signal]) -> None:
        raise AssertionError(f"a handover emitted {signals}")

    return WatchSet(engine, no_signals, writer, repo, clustered=True, tick_interval=1.0, flushed_ttl=3600)


async def test_engine_handover_moves_an_address_state_through_the_database(tmp_path: Path) -> None:
    """The old holder persists pending orders and the watermark; the new one resumes them; nothing is voided."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(url)
    cfg = load_config(None, environ={"HL_MONITOR__DATABASE__URL": url})
    db = create_engine(cfg)
    writer = BatchWriter(db, writer_cfg(), Metrics())
    run = asyncio.create_task(writer.run())
    try:
        repo = Repository(db)
        old = seeded_engine()
        old.on_user_fills(ADDR, frame(fill(7, 101, "1.5", time=T0 + 1), fill(8, 102, "2", time=T0 + 2)), NOW)
        await writer.put_delta(old.take_dirty())
        old.on_user_fills(ADDR, frame(fill(7, 103, "0.5", time=T0 + 3)), NOW)  # not yet persisted by a tick
        await handover(old, writer, repo).release([ADDR], persist=True)
        assert not old.is_watched(ADDR)
        assert old.pending_oids(ADDR) == []

        new = seeded_engine()
        new.remove_address(ADDR)
        new.take_dirty()
        await handover(new, writer, repo).acquire([ADDR])
        assert new.is_watched(ADDR)
        assert new.pending_oids(ADDR) == [7, 8]
        watermark = new.watermark(ADDR)
        assert watermark is not None
        assert (watermark.time, watermark.tid) == (T0 + 3, 103)
        signals = new.flush_address(ADDR, NOW + 10)
        assert {s.oid: s.size for s in signals} == {7: Decimal("2.0"), 8: Decimal("2")}
        # The replayed fill (a snapshot after the takeover) is recognised, not counted twice.
        assert new.on_user_fills(ADDR, frame(fill(7, 103, "0.5", time=T0 + 3)), NOW + 20) == []
    finally:
        await writer.close()
        await run
        await db.dispose()
