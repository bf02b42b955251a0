"""The KV view of position documents: JetStream KeyValue bucket `positions.kv_bucket`, key = lowercase address,
value = the address's whole position document (JSON), history 1 (only the latest document matters).

A consumer reads the current document of any address with one `get`, or watches the bucket. The view is a
copy: the database (`hlm_positions`) is the truth and the caller rebuilds the view from it after a restart
if it wants to.

`put()` and `delete()` only queue: one pending entry per address, the latest value wins, and a delete
supersedes a pending put (and the reverse). `run()` writes the queue oldest address first, several addresses
at once but never two writes of one address at once, so the bucket ends at the latest value of each
address. A failed write (NATS down, a timeout) is counted and retried after a jittered exponential backoff,
unless a newer value of the address was queued meanwhile: the latest value is never lost while the service
runs. The queue is bounded: a new address waits for room (backpressure). How often mark-driven refreshes are
queued is the caller's business (`positions.kv_refresh`); this only coalesces.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Final

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from hl_monitor.config import NatsConfig, PositionsConfig
from hl_monitor.delivery.publisher import Publisher, ensure_kv_replicas
from hl_monitor.errors import DeliveryError
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = ["KvView"]

log = get_logger(__name__)

# Addresses waiting for a write at most: every watched address has one key, so twice the default
# `wide.max_addresses` holds all of them with room to spare.
QUEUE_SIZE: Final = 20_000
# Writes in flight at once: a KV put is a JetStream publish round trip; 64 of them keep a remote server busy
# (thousands of documents a second) without piling up unacknowledged requests.
MAX_INFLIGHT: Final = 64
RETRY_JITTER: Final = 0.2  # ±20 %: several instances retrying against one recovering NATS spread out
DRAIN_POLL_S: Final = 0.05  # how often drain() re-checks that NATS is still up while it waits


class KvView:
    """Latest position document per address in a KeyValue bucket. `open()` at start, `run()` in a task."""

    def __init__(
        self,
        publisher: Publisher,
        nats_cfg: NatsConfig,
        positions_cfg: PositionsConfig,
        metrics: Metrics,
        *,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self._publisher = publisher
        self._nats = nats_cfg
        self._bucket = positions_cfg.kv_bucket
        self._metrics = metrics
        self._capacity = max(1, queue_size)
        self._kv: KeyValue | None = None
        self._pending: dict[str, bytes | None] = {}  # address -> latest document (None: delete), oldest first
        self._writing: set[str] = set()  # addresses with a write in flight
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self._work = asyncio.Event()
        self._room = asyncio.Condition()
        self._idle = asyncio.Event()
        self._idle.set()
        self._delay = 0.0
        self._retry_at = 0.0

    @property
    def depth(self) -> int:
        """Addresses whose latest value is not in the bucket yet (queued or being written)."""
        return len(self._pending.keys() | self._writing)

    # ---- bucket ----

    def bucket_config(self) -> KeyValueConfig:
        return KeyValueConfig(
            bucket=self._bucket,
            description="hl-monitor: latest position document per address",
            history=1,
            storage=StorageType.FILE,
            replicas=self._nats.kv_replicas,
        )

    async def open(self) -> None:
        """Create the bucket (or bind to an existing one); `DeliveryError` when NATS refuses."""
        js = self._publisher.jetstream()
        try:
            try:
                self._kv = await js.create_key_value(self.bucket_config())
                log.info("kv bucket ready", bucket=self._bucket)
            except nats.js.errors.BadRequestError:
                # Exists with another configuration (made by hand, or another replica count): keep its data and
                # settings; only the replica count follows `nats.kv_replicas` (or a clear error says why not).
                await ensure_kv_replicas(js, self._bucket, self._nats.kv_replicas)
                self._kv = await js.key_value(self._bucket)
                log.warning("kv bucket exists with other settings; using it as it is", bucket=self._bucket)
        except (nats.errors.Error, TimeoutError) as exc:
            raise DeliveryError(f"cannot create or open KeyValue bucket {self._bucket!r}: {exc!r}") from None

    # ---- intake ----

    async def put(self, address: str, doc_json: bytes) -> None:
        """Queue `doc_json` as the address's value (replacing whatever is queued for it)."""
        await self._queue(address.lower(), doc_json)

    async def delete(self, address: str) -> None:
        """Queue the removal of the address's key (replacing a queued put)."""
        await self._queue(address.lower(), None)

    async def _queue(self, key: str, value: bytes | None) -> None:
        if key not in self._pending and len(self._pending) >= self._capacity:
            async with self._room:
                await self._room.wait_for(lambda: key in self._pending or len(self._pending) < self._capacity)
        self._pending[key] = value
        self._idle.clear()
        self._work.set()
        self._metrics.kv_queue_depth.set(self.depth)

    # ---- writing ----

    async def run(self) -> None:
        """Write queued values until cancelled (opening the bucket first when `open()` was not called)."""
        while self._kv is None:
            try:
                await self.open()
            except DeliveryError as exc:
                self._metrics.kv_errors.labels(op="open").inc()
                self._backoff("open", str(exc))
                await asyncio.sleep(max(0.0, self._retry_at - asyncio.get_running_loop().time()))
        self._delay = 0.0
        async with asyncio.TaskGroup() as tg:
            while True:
                key = self._next_key()
                if key is None:
                    if not self._writing:
                        self._idle.set()
                    self._work.clear()
                    await self._work.wait()
                    continue
                if not self._publisher.is_connected:
                    await self._publisher.wait_connected()
                if (pause := self._retry_at - asyncio.get_running_loop().time()) > 0:
                    await asyncio.sleep(pause)
                await self._slots.acquire()
                key = self._next_key()  # the queue may have changed while waiting
                if key is None:
                    self._slots.release()
                    continue
                value = self._pending.pop(key)
                self._writing.add(key)
                tg.create_task(self._write(key, value))
                async with self._room:
                    self._room.notify_all()

    def _next_key(self) -> str | None:
        """The oldest queued address without a write in flight (at most `MAX_INFLIGHT` are skipped)."""
        for key in self._pending:
            if key not in self._writing:
                return key
        return None

    async def _write(self, key: str, value: bytes | None) -> None:
        assert self._kv is not None
        op = "put" if value is not None else "delete"
        try:
            if value is not None:
                await self._kv.put(key, value)
            else:
                await self._kv.delete(key)
        except (nats.errors.Error, TimeoutError) as exc:
            self._metrics.kv_errors.labels(op=op).inc()
            self._pending.setdefault(key, value)  # unless a newer value arrived meanwhile: that one wins
            self._backoff(op, repr(exc))
        except Exception as exc:
            # Not a NATS answer (a bug or an unexpected library error): keep the value all the same.
            self._metrics.kv_errors.labels(op=op).inc()
            log.exception("unexpected kv view error", key=key)
            self._pending.setdefault(key, value)
            self._backoff(op, repr(exc))
        else:
            self._metrics.kv_writes.labels(op=op).inc()
            if self._delay:
                log.info("kv view writes again", bucket=self._bucket, pending=len(self._pending))
                self._delay = 0.0
                self._retry_at = 0.0
        finally:
            self._writing.discard(key)
            self._slots.release()
            self._metrics.kv_queue_depth.set(self.depth)
            self._work.set()

    def _backoff(self, op: str, detail: str) -> None:
        """Push the next write back (once per round: writes in flight together fail together)."""
        now = asyncio.get_running_loop().time()
        if now < self._retry_at:
            return
        if self._delay == 0:
            log.warning("kv view write failing; latest values are kept and retried", op=op, error=detail)
        self._delay = (
            min(self._delay * 2, self._nats.retry_max_delay) if self._delay else self._nats.retry_initial_delay
        )
        self._retry_at = now + self._delay * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)

    async def drain(self, grace: float) -> int:
        """Wait up to `grace` s (while NATS is up) for the queue to be written; returns addresses left unwritten.

        The view is a copy of the database, so what is left is rebuilt from there, not lost.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.depth and self._publisher.is_connected and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(DRAIN_POLL_S, left)):
                    await self._idle.wait()
        if self.depth:
            log.warning("kv view stopped with documents unwritten; the database has them", count=self.depth)
        return self.depth
