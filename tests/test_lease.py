"""Shared-database instance lease: one process per instance id across hosts, takeover after the TTL, and a
lost lease stops the holder. On SQLite and MariaDB (the migration creates the table)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.config import Config, DatabaseConfig, ServiceConfig
from hl_monitor.errors import ConfigError, InstanceLockedError, LeaseLostError
from hl_monitor.metrics import Metrics
from hl_monitor.storage import migrate
from hl_monitor.storage import tables as t
from hl_monitor.storage.lease import InstanceLease
from hl_monitor.storage.repository import create_engine
from tests.support.waiting import wait_until

ID = "whale-monitor-1"
# The lease's TTL on the tests' manual clocks (seconds); no test waits it out in real time.
TTL = 30.0
# Real seconds between renewals in `run()`: short, so a test reaches the next renewal quickly.
RENEW = 0.02
# Where the manual wall clock starts (epoch ms).
T0_MS = 1_780_000_000_000


class Clocks:
    """The lease's wall clock (epoch ms, as stored in the row) and monotonic clock, moved only by `advance`."""

    def __init__(self) -> None:
        self.wall = T0_MS
        self.mono = 0.0

    def wall_ms(self) -> int:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += round(seconds * 1000)
        self.mono += seconds


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "mariadb_url"))


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    url = db_url
    await migrate.upgrade(url)
    eng = create_engine(Config(database=DatabaseConfig(url=url)))
    try:
        yield eng
    finally:
        await eng.dispose()


def lease(
    engine: AsyncEngine, metrics: Metrics | None = None, ttl: float = TTL, clocks: Clocks | None = None
) -> InstanceLease:
    """A lease on `clocks`, or on the real clocks without them."""
    metrics, renew = metrics or Metrics(), min(RENEW, ttl / 3)
    if clocks is None:
        return InstanceLease(engine, ID, ttl, metrics, renew_interval=renew)
    return InstanceLease(
        engine, ID, ttl, metrics, renew_interval=renew, wall_ms=clocks.wall_ms, monotonic=clocks.monotonic
    )


def outcome(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value("hl_monitor_lease_renewals_total", {"outcome": name}) or 0.0


def renewals_after(metrics: Metrics, count: int) -> Callable[[], bool]:
    """True once `count` more renewals succeeded (the second one surely read the clock after the call)."""
    target = outcome(metrics, "ok") + count
    return lambda: outcome(metrics, "ok") >= target


async def rows(engine: AsyncEngine) -> list[sa.RowMapping]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.select(t.instance_leases))).mappings().all())


async def test_a_live_holder_is_refused_and_a_released_lease_is_free_at_once(engine: AsyncEngine) -> None:
    """Second process with the same id (another host) is refused naming the holder; release frees it."""
    first = lease(engine, ttl=30.0)
    await first.acquire()
    held_after_acquire = first.held
    assert held_after_acquire
    metrics = Metrics()
    with pytest.raises(InstanceLockedError) as info:
        await lease(engine, metrics, ttl=30.0).acquire()
    assert first.holder in info.value.holder
    assert outcome(metrics, "refused") == 1
    other_id = InstanceLease(engine, "whale-monitor-2", 30.0, Metrics())
    await other_id.acquire()  # a different identity is unaffected
    await first.release()
    assert not first.held
    second = lease(engine, ttl=30.0)
    await second.acquire()
    assert {(r["instance_id"], r["token"]) for r in await rows(engine)} == {
        (ID, second.token),
        ("whale-monitor-2", other_id.token),
    }


async def test_a_crashed_holders_lease_is_taken_over_after_its_ttl(engine: AsyncEngine) -> None:
    """A holder that stops renewing (kill -9, lost host) blocks a successor only until its TTL has passed."""
    clocks = Clocks()
    crashed = lease(engine, clocks=clocks)
    await crashed.acquire()  # and never renews
    clocks.advance(TTL - 0.1)
    with pytest.raises(InstanceLockedError):
        await lease(engine, clocks=clocks).acquire()
    clocks.advance(0.2)
    successor = lease(engine, clocks=clocks)
    await successor.acquire()
    assert [r["token"] for r in await rows(engine)] == [successor.token]
    with pytest.raises(LeaseLostError):
        await crashed.renew()  # the old holder, if it comes back, learns it lost the identity


async def test_renewal_keeps_the_lease_past_its_ttl(engine: AsyncEngine) -> None:
    """Time moves half a TTL between renewals, four times: without `run()` renewing, the row would have expired
    after the second step and a successor would take it."""
    metrics, clocks = Metrics(), Clocks()
    holder = lease(engine, metrics, clocks=clocks)
    await holder.acquire()
    async with asyncio.TaskGroup() as tg:
        renewing = tg.create_task(holder.run())
        for _ in range(4):
            clocks.advance(TTL / 2)
            await wait_until(renewals_after(metrics, 2), what="two renewals after the clock moved")
        with pytest.raises(InstanceLockedError):
            await lease(engine, clocks=clocks).acquire()
        assert holder.held
        renewing.cancel()


async def test_losing_the_lease_stops_the_holder(engine: AsyncEngine) -> None:
    """When another process owns the row (an operator deleted it, a takeover after a long pause), run() raises."""
    metrics = Metrics()
    holder = lease(engine, metrics)
    await holder.acquire()
    async with engine.begin() as conn:
        await conn.execute(sa.update(t.instance_leases).values(token="f" * 32, holder="pid 1 on elsewhere"))
    with pytest.raises(LeaseLostError, match="belongs to another process"):
        async with asyncio.timeout(5):
            await holder.run()
    assert not holder.held
    assert outcome(metrics, "lost") == 1


async def test_an_unreachable_database_does_not_stop_the_holder(sqlite_url: str) -> None:
    """Renewals fail while the database is gone and the service keeps running; once the database answers again
    a row that now belongs to someone else stops the holder."""
    await migrate.upgrade(sqlite_url)
    eng = create_engine(Config(database=DatabaseConfig(url=sqlite_url)))
    metrics, clocks = Metrics(), Clocks()
    holder = lease(eng, metrics, clocks=clocks)
    try:
        await holder.acquire()
        async with eng.begin() as conn:
            await conn.execute(sa.text("DROP TABLE hlm_instance_leases"))  # every renewal now errors
        running = asyncio.create_task(holder.run())
        clocks.advance(TTL * 3)  # well past the TTL: the holder keeps retrying, it does not give up
        await wait_until(lambda: outcome(metrics, "error") >= 2, what="two failed renewals past the TTL")
        assert not running.done()
        assert not holder.held
        async with eng.begin() as conn:  # the database is back, and another process holds the identity
            await conn.run_sync(t.instance_leases.create)
            await conn.execute(
                sa.insert(t.instance_leases).values(
                    instance_id=ID,
                    holder="pid 1 on elsewhere",
                    token="other",
                    acquired_at=0,
                    renewed_at=0,
                    expires_at=2**62,
                )
            )
        with pytest.raises(LeaseLostError, match="belongs to another process"):
            async with asyncio.timeout(5):
                await running
    finally:
        await eng.dispose()


HOLD_AND_WAIT = """
import asyncio, sys
from hl_monitor.config import Config, DatabaseConfig
from hl_monitor.storage.lease import InstanceLease
from hl_monitor.metrics import Metrics
from hl_monitor.storage.repository import create_engine

async def main() -> None:
    eng = create_engine(Config(database=DatabaseConfig(url=sys.argv[1])))
    await InstanceLease(eng, sys.argv[2], 30.0, Metrics()).acquire()
    print("held", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_lease_of_a_killed_local_process_is_taken_over_at_once(sqlite_url: str) -> None:
    """kill -9 of the holder on this host: the restart takes the lease at once instead of waiting out the TTL."""
    await migrate.upgrade(sqlite_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_AND_WAIT, sqlite_url, ID, stdout=asyncio.subprocess.PIPE
    )
    eng = create_engine(Config(database=DatabaseConfig(url=sqlite_url)))
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while (line := await proc.stdout.readline()).strip() != b"held":  # skip its log lines
                assert line, f"the holder exited before holding the lease (code {await proc.wait()})"
        with pytest.raises(InstanceLockedError):  # alive: refused even though it is on this host
            await lease(eng, ttl=30.0).acquire()
        proc.kill()
        await proc.wait()
        successor = lease(eng, ttl=30.0)
        await successor.acquire()  # the 30 s TTL has not passed
        assert [r["token"] for r in await rows(eng)] == [successor.token]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await eng.dispose()


def test_config_keys_and_validation() -> None:
    cfg = Config(service=ServiceConfig(instance_id=ID, lease_ttl=12.0, lease_renew_interval=4.0))
    built = InstanceLease.from_config(create_engine(Config()), cfg, Metrics())
    assert (built.instance_id, built.ttl, built.renew_interval) == (ID, 12.0, 4.0)
    with pytest.raises(ConfigError, match=r"service\.instance_id"):
        InstanceLease(create_engine(Config()), "x" * (t.LEASE_KEY_LEN + 1), 30.0, Metrics())
