"""The one signal sink: every tracker of every source hands its signals here, and nothing else counts them.

For each signal, in order: stamp it with this instance's id, the position after it as far as the position
keeper knows it (entry, leverage, liquidation price; not in the legacy payload) and its `position_size`; decide
whether the filters keep it back (README "Filters"); persist it (the stored row is the outbox:
docs/architecture.md §3); submit it to the outbox for publishing unless it is suppressed; count it
(`signals_built` by source and direction, fills per order, receive→signal latency, `signals_suppressed` by
reason). Awaiting the sink is backpressure: it returns once the writer and the outbox have taken the signals.

Filters are decided here and nowhere else. A suppressed signal is stored and shown like any other, with
`suppressed` and its reason, and never handed to the outbox. A close of a position whose open was published is
never suppressed, so a consumer is never left holding a position it was told about: the sink keeps the
(address, coin) pairs whose open went out ("holdings"), writes each change through the writer (FIFO, so a crash
can only lose the newest puts) and reads them back at start (`restore`). A holding is put before the open that
starts it and ended after the close that ends it: whatever a crash cuts off, a restart never knows of a
published open without its holding (it may protect one close too many, never one too few).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Final, Protocol

import msgspec

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import SignalsConfig
from hl_monitor.domain.address import WatchedAddress, symbol_key
from hl_monitor.domain.signal import PositionLookup, Signal, SuppressReason, position_size_of
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = ["HoldingStore", "HoldingWriter", "SignalWriter", "Sink", "Submitter", "filter_reason"]

log = get_logger(__name__)

_ZERO: Final = Decimal(0)  # a floor of 0 filters nothing


class SignalWriter(Protocol):
    """The storage writer's signal intake (`storage.writer.BatchWriter`)."""

    async def put_signal(self, signal: Signal) -> None: ...


class HoldingWriter(Protocol):
    """The storage writer's holdings intake (`storage.writer.BatchWriter`), FIFO with its signals."""

    async def put_holding(self, address: str, coin: str, signal_id: str) -> None: ...

    async def end_holding(self, address: str, coin: str) -> None: ...


class Submitter(Protocol):
    """The outbox's intake (`delivery.outbox.Outbox`)."""

    async def submit(self, signal: Signal) -> None: ...


class HoldingStore(Protocol):
    """Where the holdings are read back at start (`storage.repository.Repository`)."""

    async def load_signal_holdings(self) -> set[tuple[str, str]]: ...


def _no_entry(address: str) -> WatchedAddress | None:
    return None


def filter_reason(signal: Signal, entry: WatchedAddress | None, min_notional_usd: Decimal) -> SuppressReason | None:
    """Why the filters would keep `signal` back, or None. The address's deny list first, then its allow list
    (either names the signal's symbol or its coin, case-insensitively), then the notional floor: the higher of
    the global `min_notional_usd` and the address's own."""
    floor = min_notional_usd
    if entry is not None:
        symbol, coin = symbol_key(signal.symbol), symbol_key(signal.coin)
        if symbol in entry.deny_symbols or coin in entry.deny_symbols:
            return "symbol_denied"
        if entry.allow_symbols and symbol not in entry.allow_symbols and coin not in entry.allow_symbols:
            return "symbol_not_allowed"
        floor = max(floor, entry.min_notional_usd)
    if floor > _ZERO and signal.notional_usd < floor:
        return "min_notional"
    return None


class Sink:
    """`SignalSink` for the whole service; see the module docstring.

    `addresses` looks up an address's book entry (its filters); `signals` holds the global floor and the
    `position_size` thresholds; `holdings` persists the holdings (the service passes its writer; without one
    they live in memory only).
    """

    def __init__(
        self,
        writer: SignalWriter,
        outbox: Submitter,
        metrics: Metrics,
        *,
        instance_id: str,
        positions: PositionLookup | None = None,
        signals: SignalsConfig | None = None,
        addresses: Callable[[str], WatchedAddress | None] = _no_entry,
        holdings: HoldingWriter | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        cfg = signals if signals is not None else SignalsConfig()
        medium, large = (Decimal(str(bound)) for bound in cfg.position_size_thresholds)
        self._positions = positions
        self._writer = writer
        self._outbox = outbox
        self._metrics = metrics
        self._instance_id = instance_id
        self._wall_ms = wall_ms
        self._addresses = addresses
        self._min_notional = Decimal(str(cfg.min_notional_usd))
        self._size_bounds = (medium, large)
        self._holdings: set[tuple[str, str]] = set()
        self._holding_writer = holdings

    @property
    def holdings(self) -> frozenset[tuple[str, str]]:
        """(address, coin) of the positions whose open was published and whose close has not been seen."""
        return frozenset(self._holdings)

    async def restore(self, store: HoldingStore) -> int:
        """Read the holdings back at start (before any signal arrives); how many there are."""
        self._holdings = set(await store.load_signal_holdings())
        log.info("signal holdings restored", holdings=len(self._holdings))
        return len(self._holdings)

    async def __call__(self, signals: Sequence[Signal], /) -> None:
        metrics = self._metrics
        for signal in signals:
            stamped = self._filter(self._stamp(signal))
            key = (stamped.address, stamped.coin)
            if stamped.direction == "open" and not stamped.suppressed and key not in self._holdings:
                self._holdings.add(key)
                if self._holding_writer is not None:
                    await self._holding_writer.put_holding(stamped.address, stamped.coin, stamped.signal_id)
            await self._writer.put_signal(stamped)
            if stamped.direction == "close" and stamped.full_close and key in self._holdings:
                self._holdings.discard(key)  # a flip's close half ends it; its open half starts the next one
                if self._holding_writer is not None:
                    await self._holding_writer.end_holding(stamped.address, stamped.coin)
            if stamped.suppressed_reason is not None:
                metrics.signals_suppressed.labels(stamped.suppressed_reason).inc()
            else:
                await self._outbox.submit(stamped)
            metrics.signals_built.labels(stamped.source, stamped.direction).inc()
            metrics.order_fills_per_order.observe(stamped.fill_count)
            metrics.receive_to_signal_seconds.labels(stamped.trigger).observe(
                max(0.0, (self._wall_ms() - stamped.detected_at) / 1000)
            )

    def _stamp(self, signal: Signal) -> Signal:
        """This instance's id where the tracker left none; the size class; the position after it (perps)."""
        detected_by = signal.detected_by or self._instance_id
        position_size = position_size_of(signal.notional_usd, self._size_bounds)
        fields = self._positions.position_fields(signal.address, signal.coin) if self._positions is not None else None
        if fields is None or signal.asset_type != "futures":
            return msgspec.structs.replace(signal, detected_by=detected_by, position_size=position_size)
        entry_px, leverage, liquidation_px = fields
        return msgspec.structs.replace(
            signal,
            detected_by=detected_by,
            position_size=position_size,
            entry_px=entry_px,
            leverage=leverage,
            liquidation_px=liquidation_px,
        )

    def _filter(self, signal: Signal) -> Signal:
        reason = filter_reason(signal, self._addresses(signal.address), self._min_notional)
        if reason is None:
            return signal
        if signal.direction == "close" and (signal.address, signal.coin) in self._holdings:
            self._metrics.signals_filter_overridden.inc()
            return signal
        return msgspec.structs.replace(signal, suppressed=True, suppressed_reason=reason)
