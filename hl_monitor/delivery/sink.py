"""The one signal sink: every tracker of every source hands its signals here, and nothing else counts them.

For each signal, in order: stamp it with this instance's id and the position after it as far as the position
keeper knows it (entry, leverage, liquidation price; not in the legacy payload), persist it (the stored row is
the outbox: docs/architecture.md §3), submit it to the outbox for publishing, count it (`signals_built` by source
and direction, fills per order, receive→signal latency). Awaiting the sink is backpressure: it returns once the
writer and the outbox have taken the signals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.domain.signal import PositionLookup, Signal
from hl_monitor.metrics import Metrics

__all__ = ["Sink"]


class SignalWriter(Protocol):
    """The storage writer's signal intake (`storage.writer.BatchWriter`)."""

    async def put_signal(self, signal: Signal) -> None: ...


class Submitter(Protocol):
    """The outbox's intake (`delivery.outbox.Outbox`)."""

    async def submit(self, signal: Signal) -> None: ...


class Sink:
    """`SignalSink` for the whole service; see the module docstring."""

    def __init__(
        self,
        writer: SignalWriter,
        outbox: Submitter,
        metrics: Metrics,
        *,
        instance_id: str,
        positions: PositionLookup | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self._positions = positions
        self._writer = writer
        self._outbox = outbox
        self._metrics = metrics
        self._instance_id = instance_id
        self._wall_ms = wall_ms

    async def __call__(self, signals: Sequence[Signal], /) -> None:
        metrics = self._metrics
        for signal in signals:
            stamped = self._stamp(signal)
            await self._writer.put_signal(stamped)
            await self._outbox.submit(stamped)
            metrics.signals_built.labels(stamped.source, stamped.direction).inc()
            metrics.order_fills_per_order.observe(stamped.fill_count)
            metrics.receive_to_signal_seconds.labels(stamped.trigger).observe(
                max(0.0, (self._wall_ms() - stamped.detected_at) / 1000)
            )

    def _stamp(self, signal: Signal) -> Signal:
        """This instance's id where the tracker left none; the position after it for a perp signal."""
        detected_by = signal.detected_by or self._instance_id
        fields = self._positions.position_fields(signal.address, signal.coin) if self._positions is not None else None
        if fields is None or signal.asset_type != "futures":
            return (
                signal
                if detected_by is signal.detected_by
                else msgspec.structs.replace(signal, detected_by=detected_by)
            )
        entry_px, leverage, liquidation_px = fields
        return msgspec.structs.replace(
            signal, detected_by=detected_by, entry_px=entry_px, leverage=leverage, liquidation_px=liquidation_px
        )
