"""A tape of trades with one member of each population discovery labels (market maker, directional whale, wash
pair, self-trader, engine-closed account) over a crowd of retail, shared by the pure and HTTP discovery tests."""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Final

from hl_monitor.hyperliquid.protocol import WsTrade

HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
ENGINE_HASH: Final = "0x" + "0" * 64
USER_HASH: Final = "0x" + "ab" * 32

MM: Final = "0x" + "a1" * 20
WHALE: Final = "0x" + "b2" * 20
WASH_A: Final = "0x" + "c3" * 20
WASH_B: Final = "0x" + "c4" * 20
SELF_WASHER: Final = "0x" + "c5" * 20
LIQUIDATED: Final = "0x" + "d4" * 20
EXCLUDED: Final = "0x" + "e5" * 20

_tids = itertools.count(1)


def retail(i: int) -> str:
    return "0x" + f"{i:040x}"


def trade(
    buyer: str, seller: str, *, coin: str = "BTC", px: str = "100", sz: str = "1", taker: str = "B",
    t: int = 0, hash_: str = USER_HASH,
) -> WsTrade:  # fmt: skip
    return WsTrade(
        coin=coin, side="B" if taker == "B" else "A", px=Decimal(px), sz=Decimal(sz), time=t, tid=next(_tids),
        hash=hash_, users=(buyer, seller),
    )  # fmt: skip


def population(t: int = 1_000) -> list[WsTrade]:
    """A market maker on both sides of many coins, a buying whale, a wash pair, a self-trader, an engine-closed
    account; retail on the other side of everything."""
    trades: list[WsTrade] = []
    for i, coin in enumerate(("BTC", "ETH", "SOL", "HYPE")):
        for k in range(10):
            r = retail(100 + i * 10 + k)
            # Retail takes both ways against the maker's resting quotes.
            trades.append(trade(r, MM, coin=coin, t=t, taker="B"))
            trades.append(trade(MM, r, coin=coin, t=t, taker="A"))
    for k in range(20):
        trades.append(trade(WHALE, retail(500 + k), coin="ETH", sz="50", t=t, taker="B"))
    for _ in range(15):
        trades.append(trade(WASH_A, WASH_B, coin="SOL", sz="20", t=t, taker="B"))
        trades.append(trade(WASH_B, WASH_A, coin="SOL", sz="20", t=t, taker="A"))
    for _ in range(5):
        trades.append(trade(SELF_WASHER, SELF_WASHER, coin="HYPE", sz="10", t=t))
    for k in range(6):
        trades.append(trade(retail(700 + k), LIQUIDATED, coin="BTC", sz="30", t=t, taker="A", hash_=ENGINE_HASH))
    return trades
