"""Fills out to JetStream exactly once, as they happen: their stream, their outbox and the `FillSink`.

Subject `{fills.subject_prefix}.{address}.{symbol}`, e.g. `hl.fills.0xabc….BTCUSDC` (address and symbol escaped
with `delivery.publisher.subject_token`, as in signal subjects), in the stream `fills.stream` (`HL_FILLS`), kept
`fills.max_age` and at most `fills.max_bytes`, with the signals stream's `nats.duplicate_window` and
`nats.replicas`. A stream of their own, so their volume and retention never touch signals or positions.

Every fill takes the chain of docs/architecture.md §3: `FillSinkImpl` turns each `FillRecord` into a
`Publication` of kind `fill` (`Nats-Msg-Id` = its `fill_id`, `{address}:fill:{coin}:{tid}`), persists it in
`hlm_publications` and submits it to its own `PublicationOutbox` (re-reading only `fill` rows), which
publishes it, marks it on the ack and re-publishes what an outage or a restart left unacknowledged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import msgspec
from nats.js.api import StreamConfig

from hl_monitor.config import FillsConfig, NatsConfig
from hl_monitor.delivery.publications import (
    PublicationCounters,
    PublicationOutbox,
    PublicationStore,
    PublicationSubmitter,
    PublicationWriter,
    StreamPublisher,
    check_max_age,
)
from hl_monitor.delivery.publisher import Publisher, check_subject, subject_token
from hl_monitor.domain.publication import FillRecord, Publication, PublicationKind
from hl_monitor.metrics import Metrics

__all__ = [
    "FILL_KINDS",
    "FillPublisher",
    "FillSinkImpl",
    "encode_fill",
    "fill_outbox",
    "fill_publication",
    "fill_subject",
    "open_fills",
]

FILL_KINDS: Final[tuple[PublicationKind, ...]] = ("fill",)
# Exact decimals as JSON numbers, as in signals (consumers parse them with `parse_float=str` or Decimal).
_ENCODER: Final = msgspec.json.Encoder(decimal_format="number")


def fill_subject(prefix: str, address: str, symbol: str) -> str:
    """The subject of a fill of `address` on `symbol`."""
    return f"{prefix}.{subject_token(address)}.{subject_token(symbol)}"


def encode_fill(record: FillRecord) -> bytes:
    return _ENCODER.encode(record)


def fill_publication(record: FillRecord, prefix: str) -> Publication:
    """The publication of one fill: its id, its subject, its JSON."""
    return Publication(
        msg_id=record.fill_id,
        kind="fill",
        subject=fill_subject(prefix, record.address, record.symbol),
        payload=encode_fill(record),
        created_at=record.detected_at,
    )


class FillPublisher(StreamPublisher):
    """Fills into `fills.stream`."""

    def __init__(self, publisher: Publisher, nats_cfg: NatsConfig, fills_cfg: FillsConfig, metrics: Metrics) -> None:
        check_subject("fills.subject_prefix", fills_cfg.subject_prefix)
        check_max_age("fills.max_age", fills_cfg.max_age, nats_cfg)
        super().__init__(publisher, nats_cfg, metrics, stream=fills_cfg.stream)
        self._cfg = fills_cfg

    def stream_config(self) -> StreamConfig:
        cfg = self._cfg
        return self.limits_stream(
            description="hl-monitor fills of watched addresses as they happen, one message per fill_id",
            subjects=[f"{cfg.subject_prefix}.>"],
            max_age=cfg.max_age,
            max_bytes=cfg.max_bytes,
        )


def fill_outbox(
    publisher: FillPublisher,
    store: PublicationStore,
    writer: PublicationWriter,
    metrics: Metrics,
    cfg: NatsConfig,
    *,
    on_published: Callable[[Publication], None] | None = None,
) -> PublicationOutbox:
    """The fills' own outbox: it re-reads only `fill` rows and counts in the `fills_*` instruments."""
    return PublicationOutbox(
        publisher,
        store,
        writer,
        metrics,
        cfg,
        kinds=FILL_KINDS,
        counters=PublicationCounters(metrics, "fill", metrics.fills_outbox_depth, metrics.fills_spilled),
        on_published=on_published,
    )


class FillSinkImpl:
    """The `FillSink` of the service: each fill persisted (`hlm_publications`), then submitted to its outbox.

    Awaiting it is backpressure: it returns once the writer and the outbox have taken every fill.
    """

    def __init__(
        self, writer: PublicationWriter, outbox: PublicationSubmitter, metrics: Metrics, *, subject_prefix: str
    ) -> None:
        self._writer = writer
        self._outbox = outbox
        self._prefix = subject_prefix
        self._emitted = {
            "user_fills": metrics.fills_emitted.labels(source="user_fills"),
            "market_tape": metrics.fills_emitted.labels(source="market_tape"),
        }

    async def __call__(self, fills: Sequence[FillRecord], /) -> None:
        for record in fills:
            publication = fill_publication(record, self._prefix)
            await self._writer.put_publication(publication)
            await self._outbox.submit(publication)
            self._emitted[record.source].inc()


async def open_fills(
    publisher: Publisher,
    nats_cfg: NatsConfig,
    fills_cfg: FillsConfig,
    store: PublicationStore,
    writer: PublicationWriter,
    metrics: Metrics,
    *,
    on_published: Callable[[Publication], None] | None = None,
) -> tuple[PublicationOutbox, FillSinkImpl]:
    """The fills' stream (created or updated), their outbox and the sink the feeds hand fills to
    (`on_published`: sees each acknowledged fill, must not block)."""
    fills_publisher = FillPublisher(publisher, nats_cfg, fills_cfg, metrics)
    await fills_publisher.ensure_stream()
    outbox = fill_outbox(fills_publisher, store, writer, metrics, nats_cfg, on_published=on_published)
    return outbox, FillSinkImpl(writer, outbox, metrics, subject_prefix=fills_cfg.subject_prefix)
