"""One process per instance identity across hosts that share one database: a lease row with a TTL.

The data-dir `InstanceLock` stops two processes on one host; this stops two hosts configured with the same
`service.instance_id` and one MySQL. `acquire()` inserts the row `hlm_instance_leases[instance_id]`, or takes
it over when its `expires_at` has passed (its holder crashed or lost the database) or when its holder was a
process on this host that no longer runs (a `kill -9` restart must not wait out the TTL: pid gone, or the same
pid with another start time, as for a restarted container's pid 1); a live holder's row is refused with
`InstanceLockedError`. `run()` renews the row every `lease_renew_interval`. When the row is no longer ours,
`run()` raises `LeaseLostError`: another process owns the identity now, so this one must stop (it is fatal for
the service's TaskGroup). While the database is unreachable renewals fail and are retried, and the service keeps
running: no other process can take the row then either, and the first renewal after the outage tells whether
the row is still ours.

Times in the row are epoch milliseconds of the writer's clock; hosts sharing the database need clocks within a
fraction of `lease_ttl` of each other (NTP). Takeover and renewal are compare-and-set updates on the token, so
two contenders for an expired row cannot both win.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import Config
from hl_monitor.errors import ConfigError, InstanceLockedError, LeaseLostError
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.storage import tables as t

__all__ = ["InstanceLease", "LeaseLostError"]

log = get_logger(__name__)

MS: Final = 1000


_HOLDER_RE: Final = re.compile(r"pid (\d+) on (\S+)(?: started (\d+))?")


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_label() -> str:
    pid = os.getpid()
    started = _start_ticks(pid)
    return f"pid {pid} on {socket.gethostname()}" + (f" started {started}" if started else "")


def local_holder_is_gone(holder: str) -> bool:
    """True when `holder` names a process on this host that is no longer running (never for other hosts)."""
    match = _HOLDER_RE.fullmatch(holder)
    if match is None or match.group(2) != socket.gethostname():
        return False
    pid, started = int(match.group(1)), match.group(3)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    return started is not None and _start_ticks(pid) != started


class InstanceLease:
    """The lease row of one instance id. `acquire()`, then `run()` in the TaskGroup, `release()` on shutdown."""

    def __init__(
        self,
        engine: AsyncEngine,
        instance_id: str,
        ttl: float,
        metrics: Metrics,
        *,
        renew_interval: float | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if len(instance_id) > t.LEASE_KEY_LEN:
            raise ConfigError(
                "service.instance_id",
                f"{len(instance_id)} characters; at most {t.LEASE_KEY_LEN} with a shared database",
            )
        self.instance_id = instance_id
        self.ttl = ttl
        self.renew_interval = renew_interval if renew_interval is not None else ttl / 3
        if not 0 < self.renew_interval < ttl:
            raise ValueError("renew_interval must be > 0 and shorter than ttl")
        self.holder = holder_label()
        self.token = uuid.uuid4().hex
        self._engine = engine
        self._metrics = metrics
        self._wall_ms = wall_ms
        self._monotonic = monotonic
        self._valid_until: float | None = None  # monotonic time our lease surely lasts until

    @classmethod
    def from_config(cls, engine: AsyncEngine, cfg: Config, metrics: Metrics) -> InstanceLease:
        service = cfg.service
        return cls(engine, cfg.instance_id, service.lease_ttl, metrics, renew_interval=service.lease_renew_interval)

    @property
    def held(self) -> bool:
        return self._valid_until is not None and self._monotonic() < self._valid_until

    def _where(self) -> sa.ColumnElement[bool]:
        return t.instance_leases.c.instance_id == self.instance_id

    async def acquire(self) -> None:
        """Take the lease; `InstanceLockedError` names the live holder when another process has it."""
        started = self._monotonic()
        now = self._wall_ms()
        ttl_ms = round(self.ttl * MS)
        mine = {"holder": self.holder, "token": self.token, "acquired_at": now, "renewed_at": now}
        c = t.instance_leases.c
        async with self._engine.begin() as conn:
            row = (await conn.execute(sa.select(t.instance_leases).where(self._where()))).mappings().first()
            if row is not None:
                gone = local_holder_is_gone(row["holder"])
                if row["token"] != self.token and row["expires_at"] > now and not gone:
                    left = (row["expires_at"] - now) / MS
                    self._metrics.lease_renewals.labels(outcome="refused").inc()
                    raise InstanceLockedError(
                        self.instance_id,
                        f"lease held by {row['holder']} in the shared database, valid {left:.0f} s more",
                    )
                taken = await conn.execute(
                    sa.update(t.instance_leases)
                    .where(self._where(), c.token == row["token"], c.expires_at == row["expires_at"])
                    .values(**mine, expires_at=now + ttl_ms)
                )
                if taken.rowcount != 1:
                    raise InstanceLockedError(
                        self.instance_id, "another process took the expired lease at the same time"
                    )
                if row["token"] != self.token:
                    log.warning(
                        "took over the instance lease of a process that is gone"
                        if gone
                        else "took over an expired instance lease",
                        instance_id=self.instance_id,
                        previous_holder=row["holder"],
                        expired_s_ago=round((now - row["expires_at"]) / MS, 1),
                    )
        if row is None:
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(
                        sa.insert(t.instance_leases).values(
                            instance_id=self.instance_id, **mine, expires_at=now + ttl_ms
                        )
                    )
            except sa.exc.IntegrityError:
                raise InstanceLockedError(
                    self.instance_id, "another process acquired the lease at the same time"
                ) from None
        self._valid_until = started + self.ttl
        self._metrics.lease_renewals.labels(outcome="acquired").inc()
        log.info("instance lease acquired", instance_id=self.instance_id, ttl_s=self.ttl)

    async def renew(self) -> None:
        """Extend the lease once; `LeaseLostError` when the row is no longer ours."""
        started = self._monotonic()
        now = self._wall_ms()
        async with self._engine.begin() as conn:
            result = await conn.execute(
                sa.update(t.instance_leases)
                .where(self._where(), t.instance_leases.c.token == self.token)
                .values(renewed_at=now, expires_at=now + round(self.ttl * MS))
            )
        if result.rowcount != 1:
            self._valid_until = None
            self._metrics.lease_renewals.labels(outcome="lost").inc()
            raise LeaseLostError(self.instance_id, "the lease row now belongs to another process")
        self._valid_until = started + self.ttl
        self._metrics.lease_renewals.labels(outcome="ok").inc()

    async def run(self) -> None:
        """Renew until cancelled; raise `LeaseLostError` once the row belongs to another process."""
        if self._valid_until is None:
            raise RuntimeError("acquire() the lease before run()")
        while True:
            await asyncio.sleep(self.renew_interval)
            try:
                async with asyncio.timeout(self.renew_interval * 2):
                    await self.renew()
            except LeaseLostError:
                raise
            except (TimeoutError, sa.exc.SQLAlchemyError, OSError) as exc:
                self._metrics.lease_renewals.labels(outcome="error").inc()
                with contextlib.suppress(Exception):
                    log.warning(
                        "instance lease renewal failed; retrying (no other process can take it while the "
                        "database is unreachable)",
                        instance_id=self.instance_id,
                        error=f"{type(exc).__name__}: {exc}",
                        held=self.held,
                    )

    async def release(self) -> None:
        """Delete our row so a successor starts at once (best effort: an expired row is taken over anyway)."""
        self._valid_until = None
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    sa.delete(t.instance_leases).where(self._where(), t.instance_leases.c.token == self.token)
                )
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            log.warning("instance lease release failed; it expires by itself", error=f"{type(exc).__name__}: {exc}")
            return
        log.info("instance lease released", instance_id=self.instance_id)
