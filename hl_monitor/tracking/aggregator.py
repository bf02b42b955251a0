"""One aggregation's arithmetic: add legs, and fold its fills into a `Signal` (pure).

Everything a signal reports is computed from the record's fills sorted by `(time, tid)`, so the result
does not depend on the order fills arrived in:
- `size` = Σsz, `price` = VWAP Σ(sz·px)/Σsz, `notional_usd` = Σ(sz·px) (quote units: dollars for
  USDC/USDT/USDH-quoted pairs and every perp; the pair's quote token otherwise);
- `timestamp` = `first_fill_time` = the first fill's exchange time;
- `position_before` = `startPosition` of the first fill (signed); `position_after` = the last fill's
  `startPosition` ± its size (B adds, A subtracts); `full_close` = a close that ends at 0;
- `close_rate` = size ÷ |position_before| capped at 1 (closes only; 0 when the fill reports no position);
- `position_rate` = notional ÷ balance × 100, balance = account value (futures) or spot total USD (spot),
  100 when the balance is unknown or ≤ 0 (the old service's fallback), uncapped.
"""

from __future__ import annotations

from decimal import Decimal
from operator import attrgetter
from typing import Final

from hl_monitor.domain.signal import LiquidationInfo, Signal, Trigger, order_signal_id, twap_signal_id
from hl_monitor.hyperliquid.protocol import Fill
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.tracking.fills import LIQUIDATION_METHODS, Leg, asset_type_of
from hl_monitor.tracking.state import AggregationRecord

__all__ = ["FALLBACK_POSITION_RATE", "RATE_QUANTUM", "build_signal", "new_record"]

# The old service reported 100 (%) when it did not know the balance; consumers filter on it.
FALLBACK_POSITION_RATE: Final = Decimal(100)
# Rates are percentages/ratios for humans and filters; six places keep JSON short and stable.
RATE_QUANTUM: Final = Decimal("0.000001")
_ZERO: Final = Decimal(0)
_ONE: Final = Decimal(1)
_HUNDRED: Final = Decimal(100)
_fill_order: Final = attrgetter("time", "tid")


def new_record(
    address: str,
    *,
    key: int,
    twap: bool,
    continuation_tid: int | None,
    leg: Leg,
    fill: Fill,
    now_ms: int,
) -> AggregationRecord:
    """An empty record for the leg's direction of one order (`key` = oid) or TWAP (`key` = twap id)."""
    cont = f":c{continuation_tid}" if continuation_tid is not None else ""
    if twap:
        token = f"twap:{leg.code}{cont}"
        signal_id = twap_signal_id(address, key, leg.code, continuation_tid)
    else:
        token = f"{leg.code}{cont}"
        signal_id = order_signal_id(address, key, leg.code, continuation_tid)
    return AggregationRecord(
        address=address,
        oid=key,
        direction=token,
        signal_id=signal_id,
        dir=leg.dir,
        dir_code=leg.code,
        coin=fill.coin,
        asset_type=asset_type_of(leg, fill.coin),
        open_close=leg.direction,
        side=leg.side,
        liquidation_family=leg.liquidation,
        twap_id=key if twap else None,
        continuation_tid=continuation_tid,
        fills=[],
        first_fill_time=fill.time,
        last_fill_time=fill.time,
        last_activity_ms=now_ms,
    )


def _liquidation(record: AggregationRecord, fills: list[Fill]) -> LiquidationInfo | None:
    for fill in fills:
        if fill.liquidation is not None:
            block = fill.liquidation
            return LiquidationInfo(mark_px=block.mark_px, method=block.method, liquidated_user=block.liquidated_user)
    if record.liquidation_family:
        return LiquidationInfo(mark_px=None, method=LIQUIDATION_METHODS.get(record.dir))
    return None


def _rate(numerator: Decimal, denominator: Decimal) -> Decimal:
    return (numerator / denominator).quantize(RATE_QUANTUM)


def build_signal(
    record: AggregationRecord,
    *,
    trigger: Trigger,
    status: str | None,
    symbols: SymbolMap,
    balance: Decimal | None,
    label: str | None,
    now_ms: int,
    instance_id: str | None,
) -> Signal:
    """The signal of a finished aggregation. Sorts `record.fills` in place by `(time, tid)`."""
    fills = record.fills
    fills.sort(key=_fill_order)
    size = _ZERO
    notional = _ZERO
    for fill in fills:
        size += fill.sz
        notional += fill.sz * fill.px
    price = notional / size if size else _ZERO
    first = fills[0]
    last = fills[-1]
    before = first.start_position
    after = last.start_position + last.sz if last.side == "B" else last.start_position - last.sz
    closing = record.open_close == "close"
    if closing and before != 0:
        close_rate = min(_rate(size, abs(before)), _ONE)
    else:
        close_rate = _ZERO
    if balance is None or balance <= 0:
        position_rate = FALLBACK_POSITION_RATE
    else:
        position_rate = _rate(notional * _HUNDRED, balance)
    info = symbols.lookup(record.coin, spot=record.asset_type == "spot")
    return Signal(
        address=record.address,
        asset_type=record.asset_type,
        symbol=info.symbol,
        coin_type=info.coin_type,
        direction=record.open_close,
        side=record.side,
        position_rate=position_rate,
        close_rate=close_rate,
        size=size,
        price=price,
        timestamp=first.time,
        signal_id=record.signal_id,
        coin=record.coin,
        dir=record.dir,
        oid=None if record.twap_id is not None else record.oid,
        twap_id=record.twap_id,
        status=status,
        trigger=trigger,
        fill_count=len(fills),
        first_fill_time=first.time,
        last_fill_time=last.time,
        notional_usd=notional,
        position_before=before,
        position_after=after,
        full_close=closing and after == 0,
        liquidation=_liquidation(record, fills),
        backfilled=record.backfilled,
        lateness_ms=record.lateness_ms,
        label=label,
        detected_at=now_ms,
        detected_by=instance_id,
    )
