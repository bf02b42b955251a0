"""Discovery announcements out to JetStream exactly once: their stream, their outbox and the encoding.

Subject `{discovery.subject_prefix}.{address}`, e.g. `hl.discovery.0xabc…` (escaped with
`delivery.publisher.subject_token`, as in signal subjects), in the stream `discovery.stream` (`HL_DISCOVERY`),
kept `discovery.max_age`, with the signals stream's `nats.duplicate_window` and `nats.replicas`. A stream of its
own: a handful of messages a day whose retention (why an address is watched) is longer than that of fills.

The chain is docs/architecture.md §3's: each `DiscoveryAnnouncement` becomes a `Publication` of kind `discovery`
(`Nats-Msg-Id` = its `event_id`), persisted in `hlm_publications`, then submitted to its own `PublicationOutbox`
(re-reading only `discovery` rows), which publishes it, marks it on the ack and re-publishes what an outage or a
restart left unacknowledged.
"""

from __future__ import annotations

from typing import Final

import msgspec
from nats.js.api import StreamConfig

from hl_monitor.config import DiscoveryConfig, NatsConfig
from hl_monitor.delivery.publications import (
    PublicationCounters,
    PublicationOutbox,
    PublicationStore,
    PublicationWriter,
    StreamPublisher,
    check_max_age,
)
from hl_monitor.delivery.publisher import Publisher, check_subject, subject_token
from hl_monitor.domain.publication import DiscoveryAnnouncement, Publication, PublicationKind
from hl_monitor.metrics import Metrics

__all__ = [
    "DISCOVERY_KINDS",
    "DiscoveryPublisher",
    "announcement_publication",
    "discovery_outbox",
    "discovery_subject",
]

DISCOVERY_KINDS: Final[tuple[PublicationKind, ...]] = ("discovery",)
_ENCODER: Final = msgspec.json.Encoder()


def discovery_subject(prefix: str, address: str) -> str:
    """The subject of an announcement about `address`."""
    return f"{prefix}.{subject_token(address)}"


def announcement_publication(announcement: DiscoveryAnnouncement, prefix: str) -> Publication:
    """The publication of one announcement: its id, its subject, its JSON."""
    return Publication(
        msg_id=announcement.event_id,
        kind="discovery",
        subject=discovery_subject(prefix, announcement.address),
        payload=_ENCODER.encode(announcement),
        created_at=announcement.at_ms,
    )


class DiscoveryPublisher(StreamPublisher):
    """Announcements into `discovery.stream`."""

    def __init__(self, publisher: Publisher, nats_cfg: NatsConfig, cfg: DiscoveryConfig, metrics: Metrics) -> None:
        check_subject("discovery.subject_prefix", cfg.subject_prefix)
        check_max_age("discovery.max_age", cfg.max_age, nats_cfg)
        super().__init__(publisher, nats_cfg, metrics, stream=cfg.stream)
        self._cfg = cfg

    def stream_config(self) -> StreamConfig:
        cfg = self._cfg
        return self.limits_stream(
            description="hl-monitor automatic discovery: addresses watched and unwatched, one message per event_id",
            subjects=[f"{cfg.subject_prefix}.>"],
            max_age=cfg.max_age,
        )


def discovery_outbox(
    publisher: DiscoveryPublisher,
    store: PublicationStore,
    writer: PublicationWriter,
    metrics: Metrics,
    cfg: NatsConfig,
) -> PublicationOutbox:
    """The announcements' own outbox: it re-reads only `discovery` rows and counts in the `discovery_*` gauges."""
    return PublicationOutbox(
        publisher,
        store,
        writer,
        metrics,
        cfg,
        kinds=DISCOVERY_KINDS,
        counters=PublicationCounters(metrics, "discovery", metrics.discovery_outbox_depth, metrics.discovery_spilled),
    )
