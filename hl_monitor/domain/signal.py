"""The signal: one per order (or per flip half, TWAP, tape block), the service's only output.

This is the contract shared by the tracking engine (which builds it), storage (which persists it and
uses it as the outbox) and delivery (which publishes it). JSON keys keep the old service's names and
meanings; decimals are exact JSON numbers, never rounded floats, written one way in every payload
(`plain_decimal`: `0`, `1`, `0.5`, `0.00000012`), so a consumer never sees `1.000000` next to `1`.

`signal_id` forms (deterministic from exchange data, so replays, restarts and a second instance agree):
- precise order:         `{address}:{oid}:{dir_code}`            e.g. `0xab…:535618784464:OL`
- continuation (a late fill after a flush while the order was still open):
                         `{address}:{oid}:{dir_code}:c{first_tid}`
- TWAP:                  `{address}:twap{twap_id}:{dir_code}`
- market tape block:     `{address}:tape:{coin}:{dir_code}:{block_time}` (dir_code, not B/A: the two halves of
                         a flip in one block need different ids); a late trade for a block already sent
                         appends `:c{tid}`
- reconcile drift:       `{address}:recon:{coin}:{time}` (`:open` appended for the open half of a flip found on
                         reconcile); `time` is the REST answer's, so unlike the others it is per instance
`dir_code` is a short stable code of the split direction, see `DIR_CODES`: `OL OS CL CS` (perp
open/close long/short), `B S` (spot buy/sell). Fills whose `dir` is a liquidation, ADL or settlement label
are split by position arithmetic and coded `{family}-{part}`, e.g. `LCL-CL` (Liquidated Cross Long, closing
a long) or `ADL-CS`. A TWAP continuation appends `:c{first_tid}` to the TWAP form as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Final, Literal, Protocol, TypeAlias

import msgspec

SCHEMA_VERSION: Final = 1

Direction: TypeAlias = Literal["open", "close"]
PositionSide: TypeAlias = Literal["LONG", "SHORT"]
AssetType: TypeAlias = Literal["futures", "spot"]
Source: TypeAlias = Literal["user_fills", "market_tape", "reconcile"]
Trigger: TypeAlias = Literal["status", "timeout", "reconcile", "shutdown", "tape_block", "drift"]
# The old service's documented size class, here by notional USD (README "position_size").
PositionSize: TypeAlias = Literal["Small", "Medium", "Large"]
# Why the sink kept a signal off the subjects (README "Filters"); the metric label of `signals_suppressed`.
SuppressReason: TypeAlias = Literal["symbol_denied", "symbol_not_allowed", "min_notional"]
SUPPRESS_REASONS: Final[tuple[SuppressReason, ...]] = ("symbol_denied", "symbol_not_allowed", "min_notional")

# Old payload keys, in the order the Go service emitted them, for the legacy subject.
LEGACY_KEYS: Final = (
    "address",
    "asset_type",
    "symbol",
    "coin_type",
    "direction",
    "side",
    "position_rate",
    "close_rate",
    "size",
    "price",
    "timestamp",
    "position_size",  # documented by the old service; appended so the first 11 keys keep their order
)


# Short stable codes for the Hyperliquid `dir` labels that can start an aggregation. Ids are built from
# these, so they must never change once released.
DIR_CODES: Final[dict[str, str]] = {
    "Open Long": "OL",
    "Open Short": "OS",
    "Close Long": "CL",
    "Close Short": "CS",
    "Buy": "B",
    "Sell": "S",
    "Liquidated Cross Long": "LCL",
    "Liquidated Cross Short": "LCS",
    "Liquidated Isolated Long": "LIL",
    "Liquidated Isolated Short": "LIS",
    "Auto-Deleveraging": "ADL",
    "Partial Borrow Liquidation": "PBL",
    "Backstop Borrow Liquidation": "BBL",
    "Settlement": "SET",
}


def order_signal_id(address: str, oid: int, dir_code: str, continuation_tid: int | None = None) -> str:
    """`{address}:{oid}:{dir_code}`, or the continuation form with `:c{first_tid}`."""
    base = f"{address}:{oid}:{dir_code}"
    return base if continuation_tid is None else f"{base}:c{continuation_tid}"


def twap_signal_id(address: str, twap_id: int, dir_code: str, continuation_tid: int | None = None) -> str:
    """`{address}:twap{twap_id}:{dir_code}`, or the continuation form with `:c{first_tid}`."""
    base = f"{address}:twap{twap_id}:{dir_code}"
    return base if continuation_tid is None else f"{base}:c{continuation_tid}"


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class LiquidationInfo(msgspec.Struct, frozen=True, gc=False):
    """The fill's liquidation block, carried on liquidation/ADL close signals."""

    mark_px: Decimal | None
    method: str | None
    liquidated_user: str | None = None


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class Signal(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One trading signal. Field order is the JSON key order."""

    # --- the old service's keys (same meaning) ---
    address: str
    asset_type: AssetType
    symbol: str
    coin_type: str
    direction: Direction
    side: PositionSide
    position_rate: Decimal
    close_rate: Decimal
    size: Decimal
    price: Decimal
    timestamp: int  # first fill's exchange time, ms
    # --- new keys ---
    signal_id: str
    schema_version: int = SCHEMA_VERSION
    source: Source = "user_fills"
    coin: str
    dir: str  # Hyperliquid `dir` after the flip split (or the liquidation label)
    oid: int | None = None
    twap_id: int | None = None
    status: str | None = None  # terminal order status, when known
    trigger: Trigger
    fill_count: int
    first_fill_time: int
    last_fill_time: int
    notional_usd: Decimal
    position_before: Decimal | None = None
    position_after: Decimal | None = None
    full_close: bool = False
    liquidation: LiquidationInfo | None = None
    backfilled: bool = False
    lateness_ms: int | None = None  # receive time minus last fill time, for backfilled signals
    label: str | None = None
    detected_at: int  # local wall clock when the signal was built, ms
    detected_by: str | None = None  # instance id
    # --- the position after the signal, as far as known when it went out (docs/architecture.md §9) ---
    entry_px: Decimal | None = None
    leverage: int | None = None
    liquidation_px: Decimal | None = None
    # --- stamped by the sink (delivery/sink.py): size class and the filters' decision (README "Filters") ---
    position_size: PositionSize | None = None  # None only on signals stored before the field existed
    suppressed: bool = False  # stored and shown, never published
    suppressed_reason: SuppressReason | None = None

    def legacy_payload(self) -> dict[str, object]:
        """The flat object the old `hl_address_signal` consumers expect."""
        return {key: getattr(self, key) for key in LEGACY_KEYS}


def position_size_of(notional_usd: Decimal, thresholds: tuple[Decimal, Decimal]) -> PositionSize:
    """`Small` below the first threshold, `Medium` below the second, else `Large` (the old service's bounds)."""
    medium, large = thresholds
    if notional_usd < medium:
        return "Small"
    return "Medium" if notional_usd < large else "Large"


def plain_decimal(value: Decimal) -> str:
    """The one text form of a decimal in every signal payload: plain notation (never an exponent), no trailing
    zeros, `0` for any zero. `Decimal("1.000000")`, `Decimal("1E+0")` and `Decimal("1")` all become `1`;
    `Decimal("1.2E-7")` becomes `0.00000012`. Exact: formatting never rounds."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _plain_numbers(data: dict[str, Any]) -> dict[str, Any]:
    """Every Decimal of `data` (and of its nested objects) as its `plain_decimal` JSON number."""
    for key, value in data.items():
        if isinstance(value, Decimal):
            data[key] = msgspec.Raw(plain_decimal(value).encode())
        elif isinstance(value, dict):
            _plain_numbers(value)
    return data


_ENCODER: Final = msgspec.json.Encoder(decimal_format="number")
_DECODER: Final = msgspec.json.Decoder(Signal)


def encode_signal(signal: Signal) -> bytes:
    """Signal JSON: exact decimals as JSON numbers in the `plain_decimal` form, keys in field order."""
    return _ENCODER.encode(_plain_numbers(msgspec.to_builtins(signal, builtin_types=(Decimal,))))


def encode_legacy(signal: Signal) -> bytes:
    """The legacy payload's JSON, decimals in the same form as `encode_signal`."""
    return _ENCODER.encode(_plain_numbers(signal.legacy_payload()))


def decode_signal(raw: bytes | str) -> Signal:
    return _DECODER.decode(raw)


class PositionLookup(Protocol):
    """`(entry_px, leverage, liquidation_px)` of an address's position in a coin, None when flat or unknown."""

    def position_fields(self, address: str, coin: str) -> tuple[Decimal | None, int | None, Decimal | None] | None: ...


class SignalSink(Protocol):
    """Where every tracker hands the signals it built: `delivery.sink.Sink` counts, stamps, persists and submits
    them. Awaiting it is backpressure: it returns once the signals are persisted and queued for publishing."""

    async def __call__(self, signals: Sequence[Signal], /) -> None: ...
