"""Per-address perp positions, account values and spot balances (pure; fed by the position channels).

Used for `position_rate` denominators and exposed on `/status`. State frames are absolute, so each one
replaces what it covers: a `clearinghouseState` frame replaces one dex, an `allDexsClearinghouseState`
frame replaces every dex, a `spotState` frame replaces the balances.

Account value is `marginSummary.accountValue` (cross + isolated; the old service preferred the cross
summary and lost isolated margin) summed over every perp dex. Spot total USD counts dollar
stablecoins at 1, other tokens at the latest known token price (`set_token_prices`, e.g. from `allMids`
through `SymbolMap.token_prices`) and, without a price, at their `entryNtl` (cost basis) rather than 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Final

import msgspec

from hl_monitor.hyperliquid.protocol import ClearinghouseState, SpotBalance

__all__ = ["STABLE_TOKENS", "AddressPositions", "DexPositions", "PositionBook"]

# Valued at exactly one dollar, as the old service did (USDT0 is the token it aliased to USDT).
STABLE_TOKENS: Final = frozenset({"USDC", "USDT", "USDT0", "USDH"})
_ZERO: Final = Decimal(0)


class DexPositions(msgspec.Struct, kw_only=True):
    """One perp dex of one address; `positions` holds signed `szi` of non-flat coins."""

    account_value: Decimal
    total_ntl_pos: Decimal
    positions: dict[str, Decimal]
    time: int


class AddressPositions(msgspec.Struct, kw_only=True):
    dexes: dict[str, DexPositions] = msgspec.field(default_factory=dict)
    spot_balances: dict[str, Decimal] = msgspec.field(default_factory=dict)
    spot_total_usd: Decimal | None = None
    perp_updated_at: int | None = None
    spot_updated_at: int | None = None

    @property
    def account_value(self) -> Decimal | None:
        if not self.dexes:
            return None
        return sum((dex.account_value for dex in self.dexes.values()), _ZERO)


def _dex_positions(state: ClearinghouseState) -> DexPositions:
    return DexPositions(
        account_value=state.margin_summary.account_value,
        total_ntl_pos=state.margin_summary.total_ntl_pos,
        positions={ap.position.coin: ap.position.szi for ap in state.asset_positions if ap.position.szi != 0},
        time=state.time,
    )


class PositionBook:
    """Latest position state per address (lowercase), created on the first state frame."""

    __slots__ = ("_by_address", "_token_px")

    def __init__(self) -> None:
        self._by_address: dict[str, AddressPositions] = {}
        self._token_px: dict[str, Decimal] = {}

    def __len__(self) -> int:
        return len(self._by_address)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_address)

    def _entry(self, address: str) -> AddressPositions:
        entry = self._by_address.get(address)
        if entry is None:
            entry = self._by_address[address] = AddressPositions()
        return entry

    def apply_dex(self, address: str, dex: str, state: ClearinghouseState, now_ms: int) -> None:
        """One dex's absolute state (WS `clearinghouseState` or REST `clearinghouseState`)."""
        entry = self._entry(address)
        entry.dexes[dex] = _dex_positions(state)
        entry.perp_updated_at = now_ms

    def apply_all_dexs(self, address: str, states: Sequence[tuple[str, ClearinghouseState]], now_ms: int) -> None:
        """Every dex at once (`allDexsClearinghouseState`): dexes missing from the frame are dropped."""
        entry = self._entry(address)
        entry.dexes = {dex: _dex_positions(state) for dex, state in states}
        entry.perp_updated_at = now_ms

    def apply_spot(self, address: str, balances: Iterable[SpotBalance], now_ms: int) -> None:
        entry = self._entry(address)
        totals: dict[str, Decimal] = {}
        usd = _ZERO
        for balance in balances:
            if balance.total == 0:
                continue
            totals[balance.coin] = balance.total
            usd += self._value(balance)
        entry.spot_balances = totals
        entry.spot_total_usd = usd
        entry.spot_updated_at = now_ms

    def _value(self, balance: SpotBalance) -> Decimal:
        if balance.coin in STABLE_TOKENS:
            return balance.total
        px = self._token_px.get(balance.coin)
        if px is not None:
            return balance.total * px
        return balance.entry_ntl if balance.entry_ntl is not None else _ZERO

    def set_token_prices(self, prices: Mapping[str, Decimal]) -> None:
        """Dollar prices per spot token name; used from the next `spotState` on."""
        self._token_px.update(prices)

    def get(self, address: str) -> AddressPositions | None:
        return self._by_address.get(address)

    def account_value(self, address: str) -> Decimal | None:
        entry = self._by_address.get(address)
        return None if entry is None else entry.account_value

    def spot_total_usd(self, address: str) -> Decimal | None:
        entry = self._by_address.get(address)
        return None if entry is None else entry.spot_total_usd

    def szi(self, address: str, coin: str) -> Decimal | None:
        """Signed size of `coin` (`dex:COIN` for builder dexes); 0 when the dex is known and the coin flat."""
        entry = self._by_address.get(address)
        if entry is None:
            return None
        dex_name = coin.split(":", 1)[0] if ":" in coin else ""
        dex = entry.dexes.get(dex_name)
        if dex is None:
            return None
        return dex.positions.get(coin, _ZERO)

    def open_positions(self) -> int:
        """Non-flat perp positions across every address and dex (the positions_total gauge)."""
        return sum(len(dex.positions) for entry in self._by_address.values() for dex in entry.dexes.values())

    def remove(self, address: str) -> None:
        self._by_address.pop(address, None)
