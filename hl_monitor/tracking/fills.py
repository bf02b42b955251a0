"""The `dir` table: which fills make signals, and how one fill splits into aggregation legs (pure).

| Hyperliquid `dir`                          | legs                                                        |
|--------------------------------------------|-------------------------------------------------------------|
| Open/Close Long/Short                      | one futures leg, as labelled (OL OS CL CS)                  |
| Buy / Sell                                 | spot open LONG (B) / spot close LONG (S)                    |
| Long > Short / Short > Long (flip)         | close of min(sz, |startPosition|) + open of the rest;        |
|                                            | no open leg when nothing is left (no zero-size signal)      |
| Liquidated {Cross,Isolated} {Long,Short},  | split by position arithmetic: the part that reduces         |
| Auto-Deleveraging, Partial/Backstop Borrow | `startPosition` is a close of that side, any remainder an   |
| Liquidation                                | open by the fill's side; signals carry `liquidation`        |
| Settlement                                 | same arithmetic, no liquidation tag: a HIP-3 dex settled    |
|                                            | the position, so consumers tracking it must see the close   |
| Spot Dust Conversion, Net Child Vaults     | recorded (dedup, watermark) and counted, no signal          |
| anything else                              | recorded and counted as unknown, no signal, no state        |

Split halves keep every field of the fill except `dir` (flips) and `sz`; the open half of a split has
`startPosition` 0 (the position after the close half) and carries no `closedPnl` or fee, so sums over
halves equal the original fill.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

import msgspec

from hl_monitor.domain.signal import DIR_CODES, AssetType, Direction, PositionSide
from hl_monitor.hyperliquid.protocol import Fill
from hl_monitor.hyperliquid.symbols import is_spot_coin

__all__ = [
    "FAMILY_LEGS",
    "FLIP_LEGS",
    "IGNORED_DIRS",
    "LIQUIDATION_METHODS",
    "TRADE_LEGS",
    "Leg",
    "fill_key",
    "split_fill",
]

_ZERO: Final = Decimal(0)


class Leg(msgspec.Struct, frozen=True, gc=False):
    """One aggregation direction: the signal's dir label, id code, open/close, side and asset type.

    `asset_type` None means "decided by the coin" (liquidation/settlement legs can be spot or perp).
    """

    dir: str
    code: str
    direction: Direction
    side: PositionSide
    asset_type: AssetType | None
    liquidation: bool = False


def _trade(dir_: str, direction: Direction, side: PositionSide, asset_type: AssetType) -> Leg:
    return Leg(dir_, DIR_CODES[dir_], direction, side, asset_type)


TRADE_LEGS: Final[dict[str, Leg]] = {
    "Open Long": _trade("Open Long", "open", "LONG", "futures"),
    "Open Short": _trade("Open Short", "open", "SHORT", "futures"),
    "Close Long": _trade("Close Long", "close", "LONG", "futures"),
    "Close Short": _trade("Close Short", "close", "SHORT", "futures"),
    "Buy": _trade("Buy", "open", "LONG", "spot"),
    "Sell": _trade("Sell", "close", "LONG", "spot"),
}
FLIP_LEGS: Final[dict[str, tuple[Leg, Leg]]] = {
    "Long > Short": (TRADE_LEGS["Close Long"], TRADE_LEGS["Open Short"]),
    "Short > Long": (TRADE_LEGS["Close Short"], TRADE_LEGS["Open Long"]),
}
# `liquidation.method` for liquidation-family signals whose fill carries no liquidation block (ADL does not).
LIQUIDATION_METHODS: Final[dict[str, str | None]] = {
    "Liquidated Cross Long": None,
    "Liquidated Cross Short": None,
    "Liquidated Isolated Long": None,
    "Liquidated Isolated Short": None,
    "Auto-Deleveraging": "adl",
    "Partial Borrow Liquidation": "borrow",
    "Backstop Borrow Liquidation": "borrow",
}
_PARTS: Final[dict[str, tuple[Direction, PositionSide]]] = {
    "CL": ("close", "LONG"),
    "CS": ("close", "SHORT"),
    "OL": ("open", "LONG"),
    "OS": ("open", "SHORT"),
}
FAMILY_LEGS: Final[dict[str, dict[str, Leg]]] = {
    dir_: {
        part: Leg(dir_, f"{DIR_CODES[dir_]}-{part}", direction, side, None, liquidation=dir_ != "Settlement")
        for part, (direction, side) in _PARTS.items()
    }
    for dir_ in (*LIQUIDATION_METHODS, "Settlement")
}
IGNORED_DIRS: Final = frozenset({"Spot Dust Conversion", "Net Child Vaults"})

Part = tuple[Leg, Fill]


def fill_key(fill: Fill) -> int | str:
    """Dedup key within one address: the tid, or for system fills with tid 0 a key from oid, coin and time."""
    return fill.tid if fill.tid else f"0:{fill.oid}:{fill.coin}:{fill.time}"


def asset_type_of(leg: Leg, coin: str) -> AssetType:
    if leg.asset_type is not None:
        return leg.asset_type
    return "spot" if is_spot_coin(coin) else "futures"


def _open_half(fill: Fill, dir_: str, size: Decimal) -> Fill:
    return msgspec.structs.replace(
        fill, dir=dir_, sz=size, start_position=_ZERO, closed_pnl=_ZERO, fee=_ZERO, builder_fee=None
    )


def _split_flip(fill: Fill, close: Leg, open_: Leg) -> list[Part]:
    close_sz = min(abs(fill.start_position), fill.sz)
    open_sz = fill.sz - close_sz
    if close_sz == 0:
        return [(open_, msgspec.structs.replace(fill, dir=open_.dir))]
    parts: list[Part] = [(close, msgspec.structs.replace(fill, dir=close.dir, sz=close_sz))]
    if open_sz > 0:
        parts.append((open_, _open_half(fill, open_.dir, open_sz)))
    return parts


def _split_family(fill: Fill, legs: dict[str, Leg]) -> list[Part]:
    start = fill.start_position
    buy = fill.side == "B"
    opened = legs["OL" if buy else "OS"]
    if start == 0 or (start > 0) == buy:
        return [(opened, fill)]
    close = legs["CL" if start > 0 else "CS"]
    close_sz = min(abs(start), fill.sz)
    rest = fill.sz - close_sz
    if rest == 0:
        return [(close, fill)]
    return [(close, msgspec.structs.replace(fill, sz=close_sz)), (opened, _open_half(fill, fill.dir, rest))]


def split_fill(fill: Fill) -> list[Part] | None:
    """The legs of one fill, or None when its `dir` makes no signal (ignored or unknown)."""
    leg = TRADE_LEGS.get(fill.dir)
    if leg is not None:
        return [(leg, fill)]
    flip = FLIP_LEGS.get(fill.dir)
    if flip is not None:
        return _split_flip(fill, *flip)
    family = FAMILY_LEGS.get(fill.dir)
    if family is not None:
        return _split_family(fill, family)
    return None
