"""The old service's tables as its readers know them, written by the batch writer with `database.legacy_tables`.

- `hl_address_signal`: one row per signal, once (the writer adds the row only for signals its flush stored for
  the first time, so a replayed signal is not a second row), with the old `position_size` class.
- `hl_position_cache`: one row per address from its position document (the old `webData2` cache): spot balances
  and perp positions as JSON, the account summary summed over the perp dexes as strings; deleted with the
  document.
- `hl_order_aggregation`: one row per engine aggregation record, keyed by address, oid (the TWAP id for a TWAP)
  and the Hyperliquid `dir` after the split (`:c{tid}` appended for a continuation); `order_status` is `open`
  until the signal is built, then the terminal status or `filled` (the old service's word for a timeout flush);
  `last_fill_time` is the last fill's exchange time in ms (the old service wrote local receive seconds into a
  column its schema called milliseconds).

Times in `created_at` / `updated_at` are UTC `DATETIME`s, as the old rows held.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import msgspec

from hl_monitor.domain.signal import PositionSize, Signal, position_size_of
from hl_monitor.tracking.portfolio import AddressPortfolio
from hl_monitor.tracking.state import AggregationRecord

__all__ = [
    "LEGACY_SIGNAL_KEYS",
    "POSITION_SIZE_THRESHOLDS",
    "legacy_aggregation_row",
    "legacy_direction",
    "legacy_position_row",
    "legacy_signal_row",
    "position_size",
    "utc",
]

# A signal stored before signals carried `position_size` is classed with the default bounds of
# `signals.position_size_thresholds` (README "position_size").
POSITION_SIZE_THRESHOLDS: Final = (Decimal(10_000), Decimal(100_000))
# The written columns of a legacy signal row, in the table's order (without the autoincrement id).
LEGACY_SIGNAL_KEYS: Final = (
    "address",
    "symbol",
    "asset_type",
    "direction",
    "side",
    "position_size",
    "size",
    "price",
    "close_rate",
    "created_at",
)
_JSON: Final = msgspec.json.Encoder()  # Decimals as strings: exact inside a MySQL JSON column
_ZERO: Final = Decimal(0)


def position_size(signal: Signal) -> PositionSize:
    """The signal's own class; a signal stored before signals carried one is classed by its notional USD."""
    return signal.position_size or position_size_of(abs(signal.notional_usd), POSITION_SIZE_THRESHOLDS)


def utc(ms: int) -> datetime:
    """Epoch ms as the naive UTC datetime a `DATETIME` column stores."""
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def legacy_signal_row(signal: Signal) -> dict[str, Any]:
    return {
        "address": signal.address,
        "symbol": signal.symbol,
        "asset_type": signal.asset_type,
        "direction": signal.direction,
        "side": signal.side,
        "position_size": position_size(signal),
        "size": signal.size,
        "price": signal.price,
        "close_rate": signal.close_rate,
        "created_at": utc(signal.detected_at),
    }


def _text(value: Decimal | None) -> str:
    return format(value, "f") if value is not None else "0"


def _total(values: list[Decimal | None]) -> Decimal:
    return sum((v for v in values if v is not None), _ZERO)


def legacy_position_row(doc: AddressPortfolio, updated_at_ms: int) -> dict[str, Any]:
    """The `hl_position_cache` row of a position document (perp coins by their symbol, as the old rows had them)."""
    dexes = [doc.dexes[name] for name in sorted(doc.dexes)]
    futures = [
        {
            "coin": position.symbol,
            "szi": _text(position.size),
            "entry_px": _text(position.entry_px),
            "unrealized_pnl": _text(position.unrealized_pnl),
            "leverage": {"type": position.leverage_type or "", "value": position.leverage or 0},
            "margin_used": _text(position.margin_used),
            "position_value": _text(position.position_value_usd),
            "return_on_equity": _text(position.return_on_equity),
        }
        for dex in dexes
        for _, position in sorted(dex.positions.items())
    ]
    spot = [
        {"coin": name, "total": _text(h.total), "hold": _text(h.hold), "entry_ntl": _text(h.entry_ntl)}
        for name, h in sorted(doc.spot.items())
        if h.total
    ]
    return {
        "address": doc.address,
        "spot_balances": _JSON.encode(spot).decode(),
        "spot_total_usd": _text(_total([h.usd_value for h in doc.spot.values()])),
        "futures_positions": _JSON.encode(futures).decode(),
        "account_value": _text(_total([d.account_value for d in dexes])),
        "total_margin_used": _text(_total([d.total_margin_used for d in dexes])),
        "total_ntl_pos": _text(_total([d.total_ntl_pos for d in dexes])),
        "withdrawable": _text(_total([d.withdrawable for d in dexes])),
        "updated_at": utc(updated_at_ms),
    }


def legacy_direction(record: AggregationRecord) -> str:
    """The old key's direction: the split `dir`, and a continuation's first tid after it."""
    if record.continuation_tid is None:
        return record.dir
    return f"{record.dir}:c{record.continuation_tid}"


def legacy_aggregation_row(record: AggregationRecord, symbol: str, now_ms: int) -> dict[str, Any]:
    """The `hl_order_aggregation` row of one engine record."""
    fills = record.fills
    size = sum((f.sz for f in fills), _ZERO)
    vwap = sum((f.px * f.sz for f in fills), _ZERO) / size if size else _ZERO
    if record.state == "pending":
        status = "open"
    else:
        status = record.status if record.terminal and record.status else "filled"
    at = utc(now_ms)
    return {
        "oid": record.oid,
        "address": record.address,
        "direction": legacy_direction(record),
        "symbol": symbol,
        "fills": _JSON.encode(fills).decode(),
        "total_size": record.size,
        "weighted_avg_px": vwap,
        "order_status": status,
        "last_fill_time": record.last_fill_time,
        "signal_sent": record.state == "flushed",
        "created_at": at,
        "updated_at": at,
    }
