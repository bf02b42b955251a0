"""A role only one instance of the cluster plays at a time (e.g. `discovery`: writing automatic watch changes).

The role is a key in the cluster's leases bucket (`cluster.leases_bucket`, whose keys are otherwise addresses,
so a role name cannot collide), held by the same compare-and-set rules as an address lease (docs/architecture.md
§5, `cluster/leases.py`): claimed with `kv.create` (only if absent), renewed every `cluster.heartbeat` with
`kv.update(last=revision)`, deleted on a graceful stop. The bucket's TTL expires the key of a holder that died.
A holder that could not renew for half the TTL stops playing the role (`held()` turns false) before anyone
else can claim it (they wait for the full TTL), so at most one instance plays it at every moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.cluster.placement import LeaseValue
from hl_monitor.config import ClusterConfig
from hl_monitor.logging import get_logger

__all__ = ["RoleLease"]

log = get_logger(__name__)

_KV_ERRORS: Final = (nats.errors.Error, OSError, TimeoutError)
_LEASE: Final = msgspec.json.Decoder(LeaseValue)
_ENCODE: Final = msgspec.json.Encoder()
# How long a graceful release may take; the bucket's TTL covers whatever it could not delete.
RELEASE_TIMEOUT_S: Final = 2.0

T = TypeVar("T")


class RoleLease:
    """Holds `role` in the leases bucket whenever it can; `run()` until cancelled (it releases on the way out)."""

    def __init__(
        self,
        role: str,
        cfg: ClusterConfig,
        nc: Client,
        *,
        member_id: str,
        kv_replicas: int = 1,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.role = role
        self._cfg = cfg
        self._nc = nc
        self._member_id = member_id
        self._incarnation = os.urandom(8).hex()
        self._kv_replicas = kv_replicas
        self._clock = clock
        self._wall_ms = wall_ms
        self._beat = cfg.heartbeat
        self._ttl = cfg.lease_ttl
        self._revision: int | None = None
        self._last_ok = -float("inf")  # monotonic time the last successful write was sent
        self.holder: str | None = None  # the member seen holding it (this one included)
        self.acquired = 0  # times this instance took the role

    def held(self) -> bool:
        """True while this instance holds the role and renewed it within half the TTL."""
        return self._revision is not None and self._clock() - self._last_ok < self._ttl / 2

    async def run(self) -> None:
        kv = await self._open()
        try:
            while True:
                await self._beat_once(kv)
                await asyncio.sleep(self._beat)
        finally:
            await self._release(kv)

    async def _open(self) -> KeyValue:
        js = self._nc.jetstream(timeout=self._beat)
        config = KeyValueConfig(
            bucket=self._cfg.leases_bucket,
            description="precise address leases",
            history=1,
            ttl=self._cfg.lease_ttl,
            storage=StorageType.FILE,
            replicas=self._kv_replicas,
        )
        while True:
            try:
                try:
                    kv = await js.create_key_value(config)
                except nats.js.errors.BadRequestError:
                    kv = await js.key_value(self._cfg.leases_bucket)  # exists as the cluster configured it
                ttl = (await kv.status()).ttl
                if ttl:
                    self._ttl = ttl  # fencing follows the TTL NATS really applies
                return kv
            except _KV_ERRORS as exc:
                log.warning("role lease bucket unavailable; retrying", role=self.role, error=repr(exc))
                await asyncio.sleep(self._beat)

    def _value(self) -> bytes:
        return _ENCODE.encode(
            LeaseValue(member=self._member_id, incarnation=self._incarnation, renewed_ms=self._wall_ms())
        )

    async def _beat_once(self, kv: KeyValue) -> None:
        sent = self._clock()
        was_held = self.held()
        try:
            if self._revision is None:
                self._revision = await self._kv(kv.create(self.role, self._value()))
                self.acquired += 1
            else:
                self._revision = await self._kv(kv.update(self.role, self._value(), last=self._revision))
            self._last_ok = sent
            self.holder = self._member_id
        except nats.js.errors.KeyWrongLastSequenceError:
            self._revision = None  # held by another (or taken over after we lost it)
            await self._read_holder(kv)
        except _KV_ERRORS as exc:
            log.warning("role lease write failed", role=self.role, error=repr(exc))
        if self.held() != was_held:
            log.info("role lease changed", role=self.role, held=self.held(), holder=self.holder)

    async def _read_holder(self, kv: KeyValue) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError, msgspec.ValidationError, *_KV_ERRORS):
            entry = await self._kv(kv.get(self.role))
            self.holder = _LEASE.decode(entry.value or b"").member

    async def _release(self, kv: KeyValue) -> None:
        revision, self._revision = self._revision, None
        if revision is None:
            return
        with contextlib.suppress(*_KV_ERRORS):
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                await kv.delete(self.role, last=revision)
                log.info("role lease released", role=self.role)

    async def _kv(self, aw: Awaitable[T]) -> T:
        async with asyncio.timeout(self._beat):
            return await aw
