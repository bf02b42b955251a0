"""Position events and liquidation alerts out to JetStream exactly once: the positions stream, its outbox
relay and the `PublicationSink` (docs/architecture.md §3, the same chain as signals).

Subjects: `{positions.subject_prefix}.{address}.{symbol}` for a position event, e.g.
`hl.positions.0xabc….BTCUSDC`, and `{positions.alerts_prefix}.{address}.{symbol}.liquidation_risk` for an
alert; address and symbol are escaped with `delivery.publisher.subject_token`, as in signal subjects. Both
prefixes belong to one stream, `positions.stream`, kept `positions.max_age`, with the signals stream's
`nats.duplicate_window` and `nats.replicas`. Every message carries `Nats-Msg-Id: msg_id` (the event or alert
id), so a re-publish after an outage or a restart is stored once.

The chain, as for signals: `PublicationSinkImpl` persists each publication (`hlm_publications`, unpublished)
and then submits it to `PublicationOutbox`, which publishes it, marks it published on the ack, and re-reads
unpublished rows at start and every `nats.outbox_scan_interval`. One table holds every kind; each outbox
re-reads only its own kinds (`kinds`), so the fills' outbox (`delivery.fills`, its own stream) and this one
never publish each other's rows.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from nats.js.api import DiscardPolicy, PubAck, RetentionPolicy, StorageType, StreamConfig, StreamInfo
from prometheus_client import Counter, Gauge

from hl_monitor.config import NatsConfig, PositionsConfig
from hl_monitor.delivery.publisher import (
    Publisher,
    check_subject,
    ensure_stream,
    publish_with_id,
    subject_token,
)
from hl_monitor.delivery.relay import SUBMIT_WAIT_S, Relay, RelayMetrics
from hl_monitor.domain.publication import Publication, PublicationKind
from hl_monitor.errors import ConfigError, DeliveryError, PublishError
from hl_monitor.metrics import Metrics

__all__ = [
    "ALERT_SUFFIX",
    "POSITION_KINDS",
    "AckedPublicationStore",
    "PublicationOutbox",
    "PublicationPublisher",
    "PublicationSender",
    "PublicationSinkImpl",
    "StreamPublisher",
    "alert_subject",
    "position_subject",
]

ALERT_SUFFIX: Final = "liquidation_risk"
# What the positions stream carries (and so what its outbox re-reads from the shared table).
POSITION_KINDS: Final[tuple[PublicationKind, ...]] = ("position_event", "alert")


def position_subject(prefix: str, address: str, symbol: str) -> str:
    """The subject of a position event of `address` on `symbol`."""
    return f"{prefix}.{subject_token(address)}.{subject_token(symbol)}"


def alert_subject(prefix: str, address: str, symbol: str) -> str:
    """The subject of a liquidation alert of `address` on `symbol`."""
    return f"{prefix}.{subject_token(address)}.{subject_token(symbol)}.{ALERT_SUFFIX}"


def check_max_age(key: str, max_age: float, nats_cfg: NatsConfig) -> None:
    """A stream's max age (0 = unlimited) must cover the duplicate window, or JetStream refuses the stream."""
    if 0 < max_age < nats_cfg.duplicate_window:
        raise ConfigError(key, "must not be below nats.duplicate_window (JetStream refuses it)")


class StreamPublisher(abc.ABC):
    """Publishes publications on the service's one NATS connection (`Publisher`) into one stream of their own.

    `ensure_stream()` at start (after `Publisher.connect()`); `publish()` per message. A subclass says which
    stream (`stream_config`).
    """

    def __init__(self, publisher: Publisher, nats_cfg: NatsConfig, metrics: Metrics, *, stream: str) -> None:
        self._publisher = publisher
        self._nats = nats_cfg
        self._metrics = metrics
        self._stream = stream
        self._stream_ready = False

    @property
    def is_connected(self) -> bool:
        return self._publisher.is_connected

    async def wait_connected(self) -> None:
        await self._publisher.wait_connected()

    @property
    def server_id(self) -> str | None:
        return self._publisher.server_id

    async def stream_last_seq(self, stream: str) -> int:
        return await self._publisher.stream_last_seq(stream)

    @abc.abstractmethod
    def stream_config(self) -> StreamConfig:
        """The stream these publications go to, as the config wants it."""

    def limits_stream(
        self, *, description: str, subjects: list[str], max_age: float, max_bytes: int | None = None
    ) -> StreamConfig:
        """This publisher's stream as the service creates them: on file, kept by age (and size), oldest out first."""
        return StreamConfig(
            name=self._stream,
            description=description,
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            max_age=max_age,
            max_bytes=max_bytes,
            storage=StorageType.FILE,
            num_replicas=self._nats.replicas,
            duplicate_window=self._nats.duplicate_window,
            discard=DiscardPolicy.OLD,
        )

    async def ensure_stream(self) -> StreamInfo:
        """Create the stream, or update it when its settings differ from the config."""
        info = await ensure_stream(self._publisher.jetstream(), self.stream_config())
        self._stream_ready = True
        return info

    async def publish(self, publication: Publication) -> PubAck:
        """Publish once; returns the ack (`duplicate` when the stream already had it).

        Raises `PublishError` (counted in `publication_errors{reason}`); the caller keeps it pending.
        """
        msg_id = publication.msg_id
        try:
            if not self.is_connected:
                raise PublishError("disconnected", "not connected to NATS", msg_id)
            if not self._stream_ready:
                try:
                    await self.ensure_stream()
                except DeliveryError as exc:
                    raise PublishError("no_stream", str(exc), msg_id) from None
            ack = await publish_with_id(
                self._publisher.jetstream(),
                publication.subject,
                publication.payload,
                msg_id=msg_id,
                stream=self._stream,
                ack_wait=self._nats.publish_timeout,
            )
        except PublishError as exc:
            if exc.reason == "no_stream":
                self._stream_ready = False  # stream gone (server reset) or JetStream not up yet: re-check next time
            self._metrics.publication_errors.labels(reason=exc.reason).inc()
            raise
        if ack.duplicate:
            self._metrics.publication_duplicates.labels(kind=publication.kind).inc()
        else:
            self._metrics.publications_published.labels(kind=publication.kind).inc()
        return ack


class PublicationPublisher(StreamPublisher):
    """Position events and liquidation alerts into `positions.stream`."""

    def __init__(
        self, publisher: Publisher, nats_cfg: NatsConfig, positions_cfg: PositionsConfig, metrics: Metrics
    ) -> None:
        check_subject("positions.subject_prefix", positions_cfg.subject_prefix)
        check_subject("positions.alerts_prefix", positions_cfg.alerts_prefix)
        if positions_cfg.subject_prefix == positions_cfg.alerts_prefix:
            raise ConfigError("positions.alerts_prefix", "must differ from positions.subject_prefix")
        check_max_age("positions.max_age", positions_cfg.max_age, nats_cfg)
        super().__init__(publisher, nats_cfg, metrics, stream=positions_cfg.stream)
        self._cfg = positions_cfg

    def stream_config(self) -> StreamConfig:
        cfg = self._cfg
        return self.limits_stream(
            description="hl-monitor position events and liquidation alerts, one message per msg_id",
            subjects=[f"{cfg.subject_prefix}.>", f"{cfg.alerts_prefix}.>"],
            max_age=cfg.max_age,
        )


class PublicationSender(Protocol):
    """What an outbox publishes through (`StreamPublisher`)."""

    @property
    def is_connected(self) -> bool: ...

    async def wait_connected(self) -> None: ...

    @property
    def server_id(self) -> str | None: ...

    async def stream_last_seq(self, stream: str) -> int: ...

    async def publish(self, publication: Publication) -> PubAck: ...


class PublicationStore(Protocol):
    """What the relay reads from storage (`storage.repository.Repository`)."""

    async def fetch_unpublished_publications(
        self, limit: int, older_than_ms: int | None = None, *, kinds: Collection[str] | None = None
    ) -> list[Publication]:
        """Publications (of `kinds`, default all) not yet marked published, oldest first; with `older_than_ms`
        only those created before."""
        ...

    async def count_unpublished_publications(self, *, kinds: Collection[str] | None = None) -> int: ...


@runtime_checkable
class AckedPublicationStore(Protocol):
    """A store that keeps acknowledged publications for the replay window (`storage.repository`)."""

    async def fetch_published_publications_since(
        self,
        since_ms: int,
        limit: int,
        after: tuple[int, str] | None = None,
        *,
        kinds: Collection[str] | None = None,
    ) -> list[tuple[int, Publication]]:
        """Publications (of `kinds`) acknowledged at or after `since_ms` as (ack ms, publication), by (ack ms,
        msg_id), continuing after `after`."""
        ...


class PublicationWriter(Protocol):
    """The storage writer's publication intake and ack marks (`storage.writer.BatchWriter`)."""

    async def put_publication(self, publication: Publication) -> None: ...

    async def mark_publication_published(self, msg_id: str, at_ms: int) -> None: ...


@dataclass(frozen=True, slots=True)
class PublicationCounters:
    """A publication relay's instruments: its own depth and spill counters; errors and replays by its kind."""

    metrics: Metrics
    kind: str  # the `kind` label of the replay counters: position, fill, discovery
    depth: Gauge
    spilled: Counter

    @classmethod
    def positions(cls, metrics: Metrics) -> PublicationCounters:
        return cls(metrics, "position", metrics.publications_depth, metrics.publications_spilled)

    def fault(self, kind: str) -> None:
        self.metrics.publication_errors.labels(reason=kind).inc()

    def replayed(self, reason: str, count: int) -> None:
        self.metrics.replays.labels(kind=self.kind, reason=reason).inc()
        self.metrics.replayed.labels(kind=self.kind).inc(count)


class PublicationOutbox(Relay[Publication]):
    """Holds publications until JetStream acknowledges them. Run `run()` in a task; `drain(grace)` at shutdown.

    `kinds`: the publications this outbox owns in the shared table (default: position events and alerts);
    `counters`: where it counts its depth and spills (default: the `publications_*` instruments);
    `on_published`: sees each publication JetStream acknowledged (a re-publish again); it must not block.
    """

    noun = "publication"

    def __init__(
        self,
        publisher: PublicationSender,
        store: PublicationStore,
        writer: PublicationWriter,
        metrics: Metrics,
        cfg: NatsConfig,
        *,
        submit_wait: float = SUBMIT_WAIT_S,
        kinds: Collection[PublicationKind] = POSITION_KINDS,
        counters: RelayMetrics | None = None,
        on_published: Callable[[Publication], None] | None = None,
    ) -> None:
        super().__init__(publisher, counters or PublicationCounters.positions(metrics), cfg, submit_wait=submit_wait)
        self._publisher = publisher
        self._on_published = on_published
        self._store = store
        self._writer = writer
        self._kinds = tuple(kinds)

    def _key(self, item: Publication) -> str:
        return item.msg_id

    async def _send(self, item: Publication) -> PubAck:
        ack = await self._publisher.publish(item)
        if self._on_published is not None:
            self._on_published(item)
        return ack

    async def _fetch(self, limit: int, older_than_ms: int | None) -> list[Publication]:
        return await self._store.fetch_unpublished_publications(limit, older_than_ms, kinds=self._kinds)

    async def _count_unpublished(self) -> int:
        return await self._store.count_unpublished_publications(kinds=self._kinds)

    async def _mark(self, key: str, at_ms: int) -> None:
        await self._writer.mark_publication_published(key, at_ms)

    async def _fetch_acked(
        self, since_ms: int, limit: int, after: object | None
    ) -> tuple[list[Publication], object | None]:
        if not isinstance(self._store, AckedPublicationStore):
            return [], None
        cursor = after if isinstance(after, tuple) else None
        rows = await self._store.fetch_published_publications_since(since_ms, limit, cursor, kinds=self._kinds)
        return [p for _, p in rows], ((rows[-1][0], rows[-1][1].msg_id) if rows else after)


class PublicationSubmitter(Protocol):
    """The outbox's intake (`PublicationOutbox`)."""

    async def submit(self, item: Publication) -> None: ...


class PublicationSinkImpl:
    """The `PublicationSink` of the service: persist each publication, then submit it to its outbox.

    Awaiting it is backpressure: it returns once the writer and the outbox have taken every publication.
    """

    def __init__(self, writer: PublicationWriter, outbox: PublicationSubmitter) -> None:
        self._writer = writer
        self._outbox = outbox

    async def __call__(self, publications: Sequence[Publication], /) -> None:
        for publication in publications:
            await self._writer.put_publication(publication)
            await self._outbox.submit(publication)
