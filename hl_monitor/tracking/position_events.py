"""One perp position, the exchange's arithmetic on it, and the events its changes produce (pure).

Arithmetic (the exchange's rules, exact `Decimal`s; a division rounds in the current decimal context):
- size after a fill: `start + sz` for a buy, `start − sz` for a sell (signed, positive = long);
- entry price: on an open the fill price; on an increase the size-weighted average
  `(|old_size|·old_entry + |fill_sz|·px) ÷ |new_size|`; unchanged on a reduce; the fill price after a flip;
- valuation at a mark: `position_value = |size|·mark`, `unrealized_pnl = size·(mark − entry)`,
  `return_on_equity = unrealized_pnl ÷ (|size|·entry ÷ leverage)` (the exchange's definition: PnL over the
  margin the entry notional needed at the position's leverage, not over `marginUsed`).

Events (`opened increased reduced closed flipped liquidated leverage_changed`) are classified from the size
before and after one input; a reduce or close by a fill whose liquidation block names the address (or names
nobody, on a `Liquidated …` fill) is `liquidated`. A leverage change is only an event when the size did not
change in the same input (a size event already carries both leverages).

`event_id` forms (deterministic from exchange data, so a replay, a restart and a second instance agree;
`coin` carries the dex prefix of builder-dex coins, so the dex is part of every id):
- fill or tape trade:   `{address}:pos:{coin}:f{time}:{tid}` (one execution changes one position once; the
                        userFills fill and the tape trade of the same execution share `(time, tid)`, so they
                        are the same change and get one event);
- state frame:          `{address}:pos:{coin}:s{state_time}:{size_after}` for a size the model had not seen
                        (a missed fill, a liquidation the fills did not report, a drift);
                        `{address}:pos:{coin}:s{state_time}:lev:{type}:{value}` for a leverage change;
                        `{address}:pos:{coin}:s{state_time}:seen` names a position a state showed first
                        (no event; it anchors alert ids, see `tracking.risk`).
`s{state_time}` is the state's own exchange `time`; a state without one (`time` 0) is named `h{digest}`
instead, a digest of its whole wire content. Two different changes never share an id: fills differ in
`(time, tid)`, states in time or content, and the `f`/`s` prefixes keep the two forms apart. A change confirmed twice (a
fill and then a state frame showing the size it produced) is one event: see `tracking.portfolio`. That
event is named by whichever input showed the change first, so two instances agree on its id when they saw
the fills and state channels in the same order (the usual case: a fill reaches the stream well before the
next state push); an instance that saw the state first names it by the state form.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Final, Literal, TypeAlias

import msgspec

from hl_monitor.domain.signal import PositionSide
from hl_monitor.hyperliquid.protocol import ClearinghouseState

__all__ = [
    "EventKind",
    "LeverageType",
    "PerpPosition",
    "PositionEvent",
    "Source",
    "classify",
    "fill_event_id",
    "format_decimal",
    "leverage_event_id",
    "new_entry_px",
    "return_on_equity",
    "seen_id",
    "side_of",
    "state_event_id",
    "state_stamp",
    "valued",
]

EventKind: TypeAlias = Literal["opened", "increased", "reduced", "closed", "flipped", "liquidated", "leverage_changed"]
LeverageType: TypeAlias = Literal["cross", "isolated"]
# Where a document or an event came from: a WS state channel, a REST read, the public tape or userFills.
Source: TypeAlias = Literal["ws_state", "rest", "tape", "fills"]

_ZERO: Final = Decimal(0)
# Bytes of blake2b digest naming a state that carries no exchange time (64 bits: no collisions among the
# states one address goes through).
_DIGEST_BYTES: Final = 8
_STATE_ENCODER: Final = msgspec.json.Encoder()


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class PerpPosition(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What an address holds on one perp coin. None means unknown (not yet shown by a state frame)."""

    coin: str
    symbol: str
    dex: str
    size: Decimal  # signed szi, never 0
    side: PositionSide
    entry_px: Decimal | None
    mark_px: Decimal | None = None
    position_value_usd: Decimal | None = None
    unrealized_pnl: Decimal | None = None
    return_on_equity: Decimal | None = None
    leverage_type: LeverageType | None = None
    leverage: int | None = None
    max_leverage: int | None = None
    liquidation_px: Decimal | None = None
    liquidation_distance: Decimal | None = None
    margin_used: Decimal | None = None
    cum_funding_since_open: Decimal | None = None
    opened_at: int  # ms: the opening fill's time, else when a state first showed the position
    updated_at: int  # local wall clock of the last input that touched it, ms
    source: Source


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class PositionEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A change of one position (never a mark move). `before`/`after` are None when flat."""

    event_id: str
    event: EventKind
    address: str
    coin: str
    symbol: str
    dex: str
    size_before: Decimal
    size_after: Decimal
    before: PerpPosition | None
    after: PerpPosition | None
    time: int  # exchange time of the fill or state, ms (local time for a state without one)
    detected_at: int  # local wall clock, ms
    source: Source
    signal_id: str | None = None


def format_decimal(value: Decimal) -> str:
    """Plain notation without trailing zeros (`1.50` → `1.5`, `1E+2` → `100`), stable for ids."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def side_of(size: Decimal) -> PositionSide:
    return "LONG" if size > 0 else "SHORT"


def classify(before: Decimal, after: Decimal, *, liquidated: bool = False) -> EventKind | None:
    """The event of a size change, or None when the size did not change."""
    if before == after:
        return None
    if before == 0:
        return "opened"
    if (before > 0) != (after > 0) and after != 0:
        return "flipped"
    if after == 0:
        return "liquidated" if liquidated else "closed"
    if abs(after) > abs(before):
        return "increased"
    return "liquidated" if liquidated else "reduced"


def new_entry_px(before: Decimal, entry: Decimal | None, after: Decimal, px: Decimal) -> Decimal | None:
    """Entry price after a fill at `px` that moved the size from `before` to `after` (module docstring rules)."""
    if after == 0:
        return None
    if before == 0 or (before > 0) != (after > 0):
        return px
    if abs(after) <= abs(before):
        return entry
    if entry is None:
        return None  # an increase of a position whose entry nobody told us cannot be averaged
    return (abs(before) * entry + abs(after - before) * px) / abs(after)


def return_on_equity(
    size: Decimal, entry_px: Decimal | None, leverage: int | None, unrealized_pnl: Decimal | None
) -> Decimal | None:
    if entry_px is None or not leverage or unrealized_pnl is None or entry_px <= 0:
        return None
    return unrealized_pnl / (abs(size) * entry_px / leverage)


def valued(position: PerpPosition, mark: Decimal, now_ms: int) -> PerpPosition:
    """`position` revalued at `mark` (> 0): value, PnL, return on equity and liquidation distance."""
    upnl = None if position.entry_px is None else position.size * (mark - position.entry_px)
    distance = None
    if position.liquidation_px is not None:
        distance = abs(mark - position.liquidation_px) / mark
    return msgspec.structs.replace(
        position,
        mark_px=mark,
        position_value_usd=abs(position.size) * mark,
        unrealized_pnl=upnl,
        return_on_equity=return_on_equity(position.size, position.entry_px, position.leverage, upnl),
        liquidation_distance=distance,
        updated_at=now_ms,
    )


def fill_event_id(address: str, coin: str, time: int, tid: int) -> str:
    return f"{address}:pos:{coin}:f{time}:{tid}"


def state_stamp(state: ClearinghouseState) -> str:
    """`s{time}`, or `h{digest}` of the state's whole content when it carries no time."""
    if state.time > 0:
        return f"s{state.time}"
    return "h" + hashlib.blake2b(_STATE_ENCODER.encode(state), digest_size=_DIGEST_BYTES).hexdigest()


def state_event_id(address: str, coin: str, stamp: str, size_after: Decimal) -> str:
    return f"{address}:pos:{coin}:{stamp}:{format_decimal(size_after)}"


def leverage_event_id(address: str, coin: str, stamp: str, leverage_type: str | None, leverage: int | None) -> str:
    return f"{address}:pos:{coin}:{stamp}:lev:{leverage_type}:{leverage}"


def seen_id(address: str, coin: str, stamp: str) -> str:
    return f"{address}:pos:{coin}:{stamp}:seen"
