"""Builders for the wide tier (market tape) tests: a small symbol map, trades, REST positions."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec

from hl_monitor.hyperliquid.protocol import PerpMeta, SpotMeta, WsTrade
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.tracking.tape import RestPositions

WHALE = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20


T0 = 1_780_000_000_000
NOW = T0 + 100
_TRADE = msgspec.json.Decoder(WsTrade)


def symbols() -> SymbolMap:
    perp = msgspec.convert({"universe": [{"name": "BTC"}, {"name": "ETH"}]}, PerpMeta)
    xyz = msgspec.convert({"universe": [{"name": "xyz:XYZ100"}]}, PerpMeta)
    spot = msgspec.convert(
        {
            "tokens": [{"name": "USDC", "index": 0}, {"name": "HYPE", "index": 150}],
            "universe": [{"name": "@107", "tokens": [150, 0], "index": 107}],
        },
        SpotMeta,
    )
    return SymbolMap.build(perp_metas={"": perp, "xyz": xyz}, spot_meta=spot)


def trade(
    tid: int, sz: str, px: str = "100", *, buyer: str = WHALE, seller: str = OTHER, t: int = T0, coin: str = "BTC",
    side: str = "B",
) -> WsTrade:  # fmt: skip
    raw: dict[str, Any] = {"coin": coin, "side": side, "px": px, "sz": sz, "time": t, "hash": "0x" + "1" * 64,
                           "tid": tid, "users": [buyer, seller]}  # fmt: skip
    return _TRADE.decode(json.dumps(raw))


def rest(perp: dict[str, str], spot: dict[str, str] | None = None, *, window: tuple[int, int] = (T0 - 5000, T0 - 4000),
         marks: dict[str, str] | None = None, time: int = T0 - 4000) -> RestPositions:  # fmt: skip
    return RestPositions(
        perp={c: Decimal(v) for c, v in perp.items()},
        dexes=frozenset({"", "xyz"}),
        spot=None if spot is None else {t: Decimal(v) for t, v in spot.items()},
        account_value=Decimal(100_000),
        spot_usd=Decimal(50_000),
        marks={c: Decimal(v) for c, v in (marks or {}).items()},
        window=window,
        state_time=time,
    )
