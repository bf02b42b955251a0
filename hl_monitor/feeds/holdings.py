"""Where the feeds hand what they learn about holdings: the position keeper (`watch.positions.PositionKeeper`).

Every feed that reads an address's state or trades passes it on here as well as to its tracker; `NO_HOLDINGS`
is the intake of a service with `positions.enabled = false` (and of components tested on their own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from hl_monitor.hyperliquid.protocol import AllDexsClearinghouseStateData, ClearinghouseState, Fill, SpotState, WsTrade

__all__ = ["NO_HOLDINGS", "HoldingsIntake"]


class HoldingsIntake(Protocol):
    async def on_fills(self, address: str, fills: Sequence[Fill], now_ms: int) -> None: ...
    async def on_state(self, data: AllDexsClearinghouseStateData, now_ms: int) -> None: ...
    async def on_spot(self, address: str, state: SpotState, now_ms: int) -> None: ...
    async def on_trades(self, trades: Sequence[WsTrade], now_ms: int) -> None: ...
    async def on_rest(
        self, address: str, states: Sequence[tuple[str, ClearinghouseState]], spot: SpotState | None, now_ms: int
    ) -> None: ...


class _NoHoldings:
    async def on_fills(self, address: str, fills: Sequence[Fill], now_ms: int) -> None:
        return None

    async def on_state(self, data: AllDexsClearinghouseStateData, now_ms: int) -> None:
        return None

    async def on_spot(self, address: str, state: SpotState, now_ms: int) -> None:
        return None

    async def on_trades(self, trades: Sequence[WsTrade], now_ms: int) -> None:
        return None

    async def on_rest(
        self, address: str, states: Sequence[tuple[str, ClearinghouseState]], spot: SpotState | None, now_ms: int
    ) -> None:
        return None


NO_HOLDINGS: Final[HoldingsIntake] = _NoHoldings()
