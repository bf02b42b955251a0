"""Scale-out on NATS (docs/architecture.md §5): membership, placement and compare-and-set leases in JetStream KV.

Each instance beats its `Member` record (capacity: precise slots, tape role, server_id) into the
`cluster.members_bucket` every `cluster.heartbeat`. Both buckets have a bucket-level TTL of
`cluster.lease_ttl`: NATS itself removes a key that nobody rewrote for that long, so expiry is judged by
one clock (the server's), never by comparing the clocks of two hosts.

Placement (`place`): the precise candidates of the address book (tier precise or auto), highest rank first,
each go to the live member with capacity whose rendezvous score `hash(member, address)` is highest among
those with quota left. Quotas are proportional to precise slots and rounded up (bounded-load rendezvous),
so N addresses spread evenly and a member's departure moves only what it held plus a few for balance. Every
instance computes the same placement from the same book and membership; when they briefly disagree
(reload skew), the leases arbitrate.

Leases (`cluster.leases_bucket`, key = address, value = `LeaseValue`): claimed with `kv.create` (only if
absent), renewed every heartbeat with `kv.update(last=revision)` (compare-and-set), deleted on handover.
An address is tracked only while its lease is held, so at every moment at most one instance tracks it:
- crash: the holder stops renewing, NATS expires the key after `lease_ttl`, the member placed next claims
  it at its next beat (`failover` ≥ `lease_ttl` + 2 heartbeats);
- partition (NATS unreachable): the holder's renewals fail; after `lease_ttl / 2` without a successful
  renewal (counted from when the last good one was *sent*, which precedes the server's timestamp) it
  fences itself: the address leaves the owned view and the tracking engine forgets it. The others wait
  the full `lease_ttl`, so the holder has stopped at least `lease_ttl / 2` before anyone else starts;
- graceful stop and rebalancing: the holder removes the address from the owned view (the precise tier
  stops its stream), persists the engine state of that address, then deletes the lease; the next holder
  claims it within a heartbeat.
The engine state travels through the database (`EngineHandover`): the new holder imports the address's
watermark, pending aggregations and recent flushes before its stream starts, so gap recovery resumes from
where the old holder left off (REST backfill, order status) and identical `signal_id`s let JetStream store
each signal once.

The precise tier reads `owned()`, an `AddressView` holding only the addresses whose lease is held and
whose state is imported; the wide tier reads `placement()` / `precise_elsewhere()` (see `Cluster`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.cluster.placement import LeaseValue, Member, place
from hl_monitor.cluster.views import OwnedView
from hl_monitor.config import ClusterConfig, Config
from hl_monitor.delivery.publisher import ensure_kv_replicas
from hl_monitor.domain.address import AddressView
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = ["Cluster", "StateHandover"]

log = get_logger(__name__)

# Fence checks run this many times per heartbeat: fencing is late by at most a quarter beat.
FENCE_CHECKS_PER_BEAT: Final = 4
# A new member places nothing for this many beats, so its first placement already sees every live member.
JOIN_SETTLE_BEATS: Final = 2
# A handover waits at most this many beats for the precise tier to stop the stream before persisting anyway
# (the engine ignores frames of an address it no longer watches, so this only tidies the order of logs).
RELEASE_WAIT_BEATS: Final = 4
# How long `leave()` may take; NATS expiry covers whatever it could not delete.
LEAVE_TIMEOUT_S: Final = 5.0
# KV writes and reads are retried on the next beat; this caps the log rate while NATS is unreachable.
ERROR_LOG_INTERVAL_S: Final = 10.0

_KV_ERRORS: Final = (nats.errors.Error, OSError, TimeoutError)

T = TypeVar("T")

_MEMBER: Final = msgspec.json.Decoder(Member)
_LEASE: Final = msgspec.json.Decoder(LeaseValue)
_ENCODE: Final = msgspec.json.Encoder()


class StateHandover(Protocol):
    """Moves an address's tracking state between members through the database (`watch.watchset.WatchSet`)."""

    async def acquire(self, addresses: Sequence[str]) -> None:
        """Load the persisted state of `addresses` and start watching them (before their streams start)."""
        ...

    async def release(self, addresses: Sequence[str], *, persist: bool) -> None:
        """Stop watching `addresses`; with `persist`, first commit their latest state for the next holder."""
        ...


LeaseState = Literal["importing", "owned", "releasing"]


@dataclass(slots=True)
class _Lease:
    address: str
    revision: int
    last_ok: float  # monotonic time the last successful write was sent (the server's timestamp is later)
    acquired: float
    state: LeaseState = "importing"
    release_started: float = 0.0


class _Throttle:
    """Logs one line per kind per interval (NATS down = one failure per beat per lease)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}

    def due(self, kind: str) -> bool:
        now = self._clock()
        if now - self._last.get(kind, -math.inf) < ERROR_LOG_INTERVAL_S:
            return False
        self._last[kind] = now
        return True


class Cluster:
    """Membership + placement + leases for one instance; `run()` until cancelled, then `leave()`.

    Public reading API: `owned()` (AddressView for the precise tier), `placement()`, `precise_elsewhere()`,
    `members()`, `status()`. `is_running(address)` tells whether the precise tier still streams an address
    (handover waits for it to stop).
    """

    def __init__(
        self,
        cfg: ClusterConfig,
        book: AddressView,
        nc: Client,
        handover: StateHandover,
        metrics: Metrics,
        *,
        member_id: str,
        precise_slots: int,
        server_id: int | None = None,
        http: str = "",
        is_running: Callable[[str], bool] = lambda _address: False,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _wall_ms,
        kv_replicas: int = 1,
    ) -> None:
        """`kv_replicas`: the buckets' replica count (`nats.kv_replicas`)."""
        self._cfg = cfg
        self._kv_replicas = kv_replicas
        self._book = book
        self._nc = nc
        self._handover = handover
        self._metrics = metrics
        self._is_running = is_running
        self._clock = clock
        self._wall_ms = wall_ms
        self.me = Member(
            id=member_id,
            incarnation=os.urandom(8).hex(),
            precise_slots=precise_slots,
            tape_role=cfg.tape_role,
            server_id=server_id,
            started_ms=wall_ms(),
            http=http,
        )
        self._view = OwnedView(book)
        self._ttl = cfg.lease_ttl  # replaced by the buckets' real TTL once they are open
        self._beat = cfg.heartbeat
        self._js: JetStreamContext = nc.jetstream(timeout=cfg.heartbeat)
        self._members_kv: KeyValue | None = None
        self._leases_kv: KeyValue | None = None
        self._members: dict[str, Member] = {}
        self._members_ok_at: float | None = None
        self._joined_at: float | None = None
        self._beats = 0
        self._placement: dict[str, str] = {}
        self._leases: dict[str, _Lease] = {}
        self._waiting: dict[str, str] = {}  # address → member seen holding it when our claim failed
        self._takeovers = 0
        self._losses: dict[str, int] = {}
        self._last_fence: tuple[str, float] | None = None
        self._throttle = _Throttle(clock)
        self._placement_changed = asyncio.Condition()
        self.placement_version = 0

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        book: AddressView,
        nc: Client,
        handover: StateHandover,
        metrics: Metrics,
        *,
        is_running: Callable[[str], bool],
    ) -> Cluster:
        """This member of the configured cluster (`cluster`, `instance_id`, the precise slots, the KV replicas)."""
        return cls(
            cfg.cluster,
            book,
            nc,
            handover,
            metrics,
            member_id=cfg.instance_id,
            precise_slots=cfg.hyperliquid.user_slots,
            server_id=cfg.addresses.server_id,
            http=cfg.http.listen,
            is_running=is_running,
            kv_replicas=cfg.nats.kv_replicas,
        )

    def owned(self) -> OwnedView:
        """The precise tier's address view: only addresses this instance holds a lease for (state imported)."""
        return self._view

    def placement(self) -> Mapping[str, str]:
        """Address → member id for every precise candidate the cluster places; candidates missing are unplaced."""
        return dict(self._placement)

    def precise_elsewhere(self) -> frozenset[str]:
        """Addresses placed on another live member: neither tier tracks them here."""
        return frozenset(a for a, m in self._placement.items() if m != self.me.id)

    def members(self) -> Mapping[str, Member]:
        return dict(self._members)

    async def wait_placement_changed(self, seen_version: int) -> int:
        async with self._placement_changed:
            await self._placement_changed.wait_for(lambda: self.placement_version != seen_version)
            return self.placement_version

    def status(self) -> dict[str, Any]:
        now = self._clock()
        per_member: dict[str, int] = {}
        for member in self._placement.values():
            per_member[member] = per_member.get(member, 0) + 1
        return {
            "mode": "nats",
            "member_id": self.me.id,
            "incarnation": self.me.incarnation,
            "lease_ttl_s": self._ttl,
            "heartbeat_s": self._beat,
            "members": [
                {
                    "id": m.id,
                    "precise_slots": m.precise_slots,
                    "tape_role": m.tape_role,
                    "server_id": m.server_id,
                    "http": m.http,
                    "self": m.id == self.me.id,
                    "placed": per_member.get(m.id, 0),
                }
                for m in sorted(self._members.values(), key=lambda m: m.id)
            ],
            "membership_age_s": None if self._members_ok_at is None else round(now - self._members_ok_at, 1),
            "owned": sorted(self._view.addresses()),
            "leases": [
                {
                    "address": lease.address,
                    "state": lease.state,
                    "revision": lease.revision,
                    "held_s": round(now - lease.acquired, 1),
                    "renewed_ago_s": round(now - lease.last_ok, 1),
                    "fences_in_s": round(max(0.0, lease.last_ok + self._ttl / 2 - now), 1),
                }
                for lease in sorted(self._leases.values(), key=lambda lease: lease.address)
            ],
            "waiting": dict(sorted(self._waiting.items())),
            "placement": dict(sorted(self._placement.items())),
            "unplaced": sorted(self._unplaced()),
            "takeovers": self._takeovers,
            "losses": dict(self._losses),
            "last_fence": None
            if self._last_fence is None
            else {"address": self._last_fence[0], "ago_s": round(now - self._last_fence[1], 1)},
        }

    def _unplaced(self) -> set[str]:
        return {a for a, e in self._book.entries().items() if e.tier != "wide" and a not in self._placement}

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        await self._open_buckets()
        self._joined_at = self._clock()
        log.info("cluster member joining", member=self.me.id, lease_ttl=self._ttl, heartbeat=self._beat)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._fence_loop(), name="cluster-fence")
            tg.create_task(self._book_watch(), name="cluster-book")
            while True:
                started = self._clock()
                try:
                    await self._cycle()
                except Exception:
                    # A bug or a storage error in one beat must not take the service down; the next beat retries.
                    self._metrics.cluster_kv_errors.labels(op="cycle").inc()
                    log.exception("cluster beat failed")
                await asyncio.sleep(max(0.0, self._beat - (self._clock() - started)))

    async def leave(self) -> None:
        """Graceful stop (after the precise tier stopped): hand every lease over and deregister."""
        try:
            async with asyncio.timeout(LEAVE_TIMEOUT_S):
                if self._members_kv is not None:
                    with contextlib.suppress(*_KV_ERRORS):
                        await self._kv(self._members_kv.delete(self.me.id))
                leases = list(self._leases.values())
                await self._view.set(frozenset())
                if leases:
                    await self._handover.release([lease.address for lease in leases], persist=True)
                    await asyncio.gather(*(self._delete_lease(lease, "shutdown") for lease in leases))
                log.info("cluster member left", member=self.me.id, handed_over=len(leases))
        except TimeoutError:
            log.warning("cluster leave timed out; NATS expires the rest", member=self.me.id)
        self._export()

    async def _open_buckets(self) -> None:
        delay = self._beat
        while True:
            try:
                self._members_kv, _ = await self._bucket(self._cfg.members_bucket, "instances of hl-monitor")
                # Fencing must follow the TTL NATS really applies to leases, whatever this instance was told.
                self._leases_kv, self._ttl = await self._bucket(self._cfg.leases_bucket, "precise address leases")
                return
            except _KV_ERRORS as exc:
                self._kv_error("open", exc)
                await asyncio.sleep(delay)

    async def _bucket(self, name: str, description: str) -> tuple[KeyValue, float]:
        config = KeyValueConfig(
            bucket=name,
            description=description,
            history=1,
            ttl=self._cfg.lease_ttl,
            storage=StorageType.FILE,
            replicas=self._kv_replicas,
        )
        try:
            kv = await self._js.create_key_value(config)
        except nats.js.errors.BadRequestError:
            # Exists with another configuration (another instance configured a different TTL): use it as it is,
            # except for the replica count, which follows `nats.kv_replicas` (or a clear error says why not).
            await ensure_kv_replicas(self._js, name, self._kv_replicas)
            kv = await self._js.key_value(name)
        ttl = (await kv.status()).ttl
        if ttl is None or ttl <= 0:
            raise nats.errors.Error(f"KeyValue bucket {name!r} has no TTL; leases would never expire")
        if ttl != self._cfg.lease_ttl:
            log.warning("bucket TTL differs from cluster.lease_ttl; using the bucket's", bucket=name, ttl=ttl)
        return kv, ttl

    async def _book_watch(self) -> None:
        version = self._book.version
        while True:
            version = await self._book.wait_changed(version)
            await self._view.bump()  # labels/priorities of owned entries changed; placement follows next beat

    async def _fence_loop(self) -> None:
        while True:
            await asyncio.sleep(self._beat / FENCE_CHECKS_PER_BEAT)
            now = self._clock()
            due = [lease for lease in self._leases.values() if now - lease.last_ok >= self._ttl / 2]
            if due:
                try:
                    await self._fence(due)
                except Exception:
                    self._metrics.cluster_kv_errors.labels(op="fence").inc()
                    log.exception("fencing failed to persist state (the addresses are no longer tracked)")

    async def _fence(self, leases: list[_Lease]) -> None:
        now = self._clock()
        for lease in leases:
            self._leases.pop(lease.address, None)
            self._lost("fenced")
            self._last_fence = (lease.address, now)
            log.warning(
                "lease not renewed for half its TTL; stopped tracking (self-fence)",
                address=lease.address,
                since_renewal_s=round(now - lease.last_ok, 2),
            )
        await self._view.set(self._owned_now())
        await self._persist_release([lease.address for lease in leases])
        self._export()

    async def _persist_release(self, addresses: list[str]) -> bool:
        """Release with the state committed; False if the database did not confirm within a quarter TTL.

        The engine forgets the addresses at once either way (that part does not wait); only the commit is
        bounded, so a slow database cannot hold up fencing or renewals.
        """
        try:
            async with asyncio.timeout(self._ttl / 4):
                await self._handover.release(addresses, persist=True)
            return True
        except TimeoutError:
            log.warning("handover state not committed in time; letting the leases expire", addresses=len(addresses))
            return False

    async def _cycle(self) -> None:
        self._beats += 1
        await self._beat_membership()
        await self._renew()
        await self._finish_releases()
        if self._settled():
            await self._plan()
        self._export()

    def _settled(self) -> bool:
        return self._beats > JOIN_SETTLE_BEATS and self._members_ok_at is not None

    # ------------------------------------------------------------------ membership

    async def _beat_membership(self) -> None:
        kv = self._members_kv
        assert kv is not None
        try:
            await self._kv(kv.put(self.me.id, _ENCODE.encode(self.me)))
            info = await self._kv(self._js.stream_info(f"KV_{self._cfg.members_bucket}", subjects_filter=">"))
            prefix = f"$KV.{self._cfg.members_bucket}."
            keys = [s[len(prefix) :] for s in (info.state.subjects or {}) if s.startswith(prefix)]
            found = await asyncio.gather(*(self._read_member(kv, key) for key in keys))
        except _KV_ERRORS as exc:
            self._kv_error("membership", exc)
            return
        members = {m.id: m for m in found if m is not None}
        twin = members.get(self.me.id)
        if twin is not None and twin.incarnation != self.me.incarnation and self._throttle.due("twin"):
            # Leases stay safe (they carry the incarnation), but placement would count one member for two.
            log.error("another process registers with this instance id; give each instance its own", member=self.me.id)
        members[self.me.id] = self.me
        if members.keys() != self._members.keys():
            log.info(
                "cluster membership changed",
                members=sorted(members),
                joined=sorted(members.keys() - self._members.keys()),
                left=sorted(self._members.keys() - members.keys()),
            )
        self._members = members
        self._members_ok_at = self._clock()

    async def _read_member(self, kv: KeyValue, key: str) -> Member | None:
        try:
            entry = await self._kv(kv.get(key))
        except nats.js.errors.KeyNotFoundError:
            return None  # left (deleted) or expired between the listing and the read
        try:
            return _MEMBER.decode(entry.value or b"")
        except msgspec.ValidationError:
            self._metrics.cluster_kv_errors.labels(op="bad_member").inc()
            return None

    # ------------------------------------------------------------------ leases

    def _lease_value(self) -> bytes:
        return _ENCODE.encode(
            LeaseValue(member=self.me.id, incarnation=self.me.incarnation, renewed_ms=self._wall_ms())
        )

    async def _renew(self) -> None:
        leases = list(self._leases.values())
        if leases:
            await asyncio.gather(*(self._renew_one(lease) for lease in leases))

    async def _renew_one(self, lease: _Lease) -> bool:
        kv = self._leases_kv
        assert kv is not None
        sent = self._clock()
        try:
            revision = await self._kv(kv.update(lease.address, self._lease_value(), last=lease.revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            if self._leases.get(lease.address) is lease:
                # Someone else wrote the key: it expired (we should have fenced first) or was taken over.
                self._leases.pop(lease.address)
                self._lost("lost")
                log.error("lease lost: the key changed under us; stopped tracking", address=lease.address)
                await self._view.set(self._owned_now())
                await self._handover.release([lease.address], persist=False)
            return False
        except _KV_ERRORS as exc:
            self._kv_error("renew", exc)
            return False
        if self._leases.get(lease.address) is not lease:
            return False
        lease.revision = revision
        lease.last_ok = sent
        return True

    async def _plan(self) -> None:
        before = self._placement
        placement = place(self._book.entries().values(), self._members.values())
        if placement != self._placement:
            self._placement = placement
            async with self._placement_changed:
                self.placement_version += 1
                self._placement_changed.notify_all()
        mine = {a for a, m in placement.items() if m == self.me.id}
        now = self._clock()
        for lease in list(self._leases.values()):
            if lease.address not in mine and lease.state != "releasing":
                lease.state, lease.release_started = "releasing", now
                log.info("handing address over", address=lease.address, to=placement.get(lease.address))
            elif lease.address in mine and lease.state == "releasing":
                lease.state = "owned"  # placed back before the handover finished: keep it
        for address in list(self._waiting):
            if address not in mine:
                del self._waiting[address]
        claims = sorted(mine - self._leases.keys())
        if claims:
            await asyncio.gather(*(self._claim(address, before.get(address)) for address in claims))
        await self._import()
        await self._view.set(self._owned_now())

    async def _claim(self, address: str, placed_before: str | None) -> None:
        kv = self._leases_kv
        assert kv is not None
        sent = self._clock()
        try:
            revision = await self._kv(kv.create(address, self._lease_value()))
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._claim_held(kv, address, sent)
            return
        except _KV_ERRORS as exc:
            self._kv_error("claim", exc)
            return
        self._leases[address] = _Lease(address, revision, last_ok=sent, acquired=sent)
        previous = self._waiting.pop(address, None) or (placed_before if placed_before != self.me.id else None)
        if previous is not None:
            self._takeovers += 1
            self._metrics.cluster_lease_takeovers.inc()
        log.info("lease acquired", address=address, takeover_from=previous)

    async def _claim_held(self, kv: KeyValue, address: str, sent: float) -> None:
        try:
            entry = await self._kv(kv.get(address))
            holder = _LEASE.decode(entry.value or b"")
        except nats.js.errors.KeyNotFoundError:
            return  # expired between the two calls: the next beat claims it
        except (msgspec.ValidationError, *_KV_ERRORS) as exc:
            self._kv_error("claim_read", exc)
            return
        if holder.member == self.me.id and holder.incarnation == self.me.incarnation and entry.revision:
            # Ours: an earlier claim whose reply was lost (timeout) still reached the server. Renew to adopt it.
            lease = _Lease(address, entry.revision, last_ok=sent, acquired=sent)
            self._leases[address] = lease
            if await self._renew_one(lease):
                log.info("lease adopted after a lost reply", address=address)
            elif self._leases.get(address) is lease:
                self._leases.pop(address)
            return
        self._waiting[address] = holder.member

    async def _import(self) -> None:
        pending = [lease for lease in self._leases.values() if lease.state == "importing"]
        if not pending:
            return
        try:
            await self._handover.acquire([lease.address for lease in pending])
        except Exception as exc:
            # Tracking without the persisted watermark would skip the gap: hold the lease, retry next beat.
            self._metrics.cluster_kv_errors.labels(op="import").inc()
            if self._throttle.due("import"):
                log.warning("cannot load tracking state of claimed addresses; retrying", error=repr(exc))
            return
        for lease in pending:
            if self._leases.get(lease.address) is lease and lease.state == "importing":
                lease.state = "owned"

    async def _finish_releases(self) -> None:
        now = self._clock()
        ready = [
            lease
            for lease in self._leases.values()
            if lease.state == "releasing"
            and (not self._is_running(lease.address) or now - lease.release_started >= RELEASE_WAIT_BEATS * self._beat)
        ]
        if not ready:
            return
        if await self._persist_release([lease.address for lease in ready]):
            await asyncio.gather(*(self._delete_lease(lease, "handover") for lease in ready))
            return
        for lease in ready:  # not deleted: the next holder waits for NATS to expire it, by then the rows are in
            if self._leases.get(lease.address) is lease:
                self._leases.pop(lease.address)
                self._lost("handover")

    async def _delete_lease(self, lease: _Lease, reason: str) -> None:
        kv = self._leases_kv
        assert kv is not None
        if self._leases.get(lease.address) is not lease:
            return
        self._leases.pop(lease.address)
        self._lost(reason)
        try:
            await self._kv(kv.delete(lease.address, last=lease.revision))
        except _KV_ERRORS as exc:
            # Not deleted (or already rewritten): NATS expires it; nobody renews it any more.
            self._kv_error("release", exc)
        log.info("lease released", address=lease.address, reason=reason)

    def _owned_now(self) -> frozenset[str]:
        return frozenset(a for a, lease in self._leases.items() if lease.state == "owned")

    # ------------------------------------------------------------------ helpers

    async def _kv(self, aw: Awaitable[T]) -> T:
        async with asyncio.timeout(self._beat):
            return await aw

    def _kv_error(self, op: str, exc: BaseException) -> None:
        self._metrics.cluster_kv_errors.labels(op=op).inc()
        if self._throttle.due(op):
            log.warning("cluster KeyValue operation failed", op=op, error=repr(exc))

    def _lost(self, reason: str) -> None:
        self._losses[reason] = self._losses.get(reason, 0) + 1
        self._metrics.cluster_lease_losses.labels(reason=reason).inc()

    def _export(self) -> None:
        self._metrics.cluster_members.set(len(self._members))
        self._metrics.cluster_owned_addresses.set(len(self._view.addresses()))
