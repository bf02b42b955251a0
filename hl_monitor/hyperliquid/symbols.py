"""Coin names → old-service symbols, asset type and coin_type (pure; every lookup answers, none raises).

Built from decoded exchange metadata: `meta` per perp dex (`PerpMeta`), `perpDexs`, `spotMeta`, plus the
old service's alias table (`ALIASES`) and the `pair_configs` categories. The rules are the old
service's, so symbols on the legacy subject do not change:

- perp: strip a leading `xyz:` (other dex prefixes stay verbatim), alias, append `USDC`
  (`BTC` → `BTCUSDC`, `xyz:XYZ100` → `XYZ100USDC`, `PUMP` → `PUMP-26USDC`);
- spot: alias(base token) + quote token name, no separator, quote not aliased
  (`@107` HYPE/USDC → `HYPEUSDC`, `@142` UBTC/USDC → `BTCUSDC`, `PURR/USDC` → `PURRUSDC`);
- coin_type: upper-case the symbol, strip one of USDT/USDC/USDH/USD, look the rest up in
  `pair_configs` (1→A, 2→B, 3/4→C, 5→D), default D.

An unknown perp coin still gets the rule's symbol (the rule needs no metadata); an unknown spot coin keeps
its raw name, as the old service did. `is_known` lets feeds reload metadata when a new coin shows up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from types import MappingProxyType
from typing import Final, Literal, TypeAlias

import msgspec

from hl_monitor.hyperliquid.protocol import PerpDex, PerpMeta, SpotMeta

__all__ = [
    "ALIASES",
    "STABLE_QUOTES",
    "SymbolInfo",
    "SymbolMap",
    "coin_type_for",
    "is_spot_coin",
]

# Same values as `domain.signal.AssetType`; protocol knowledge imports no other part of the service.
AssetType: TypeAlias = Literal["futures", "spot"]

# Mainnet token renames of the old service (UI name for wrapped/bridged tokens); PUMP→PUMP-26 is deliberate.
ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "UBTC": "BTC",
        "UETH": "ETH",
        "USOL": "SOL",
        "UFART": "FARTCOIN",
        "USDT0": "USDT",
        "HPENGU": "PENGU",
        "XAUT0": "XAUT",
        "UPUMP": "PUMP",
        "PUMP": "PUMP-26",
        "UUUSPX": "SPX",
        "UBONK": "BONK",
        "WMNT": "MNT",
        "UXPL": "XPL",
        "UDZ": "2Z",
    }
)
# The only dex prefix the old service stripped from perp symbols; kept so `xyz:` symbols do not change.
STRIPPED_DEX_PREFIX: Final = "xyz:"
PERP_QUOTE: Final = "USDC"
# Quote tokens worth one US dollar, in preference order for valuing a token through its spot pair.
STABLE_QUOTES: Final = ("USDC", "USDT0", "USDT", "USDH")
# Longest first so `…USDT` never loses only `USD`.
COIN_TYPE_SUFFIXES: Final = ("USDT", "USDC", "USDH", "USD")
CATEGORY_COIN_TYPES: Final[Mapping[int, str]] = MappingProxyType({1: "A", 2: "B", 3: "C", 4: "C", 5: "D"})
DEFAULT_COIN_TYPE: Final = "D"


class SymbolInfo(msgspec.Struct, frozen=True, gc=False):
    """What one wire coin means. `token` is the raw base token name for spot (balances use it)."""

    coin: str
    symbol: str
    asset_type: AssetType
    base: str
    quote: str
    coin_type: str = DEFAULT_COIN_TYPE
    dex: str = ""
    token: str = ""
    known: bool = True


def is_spot_coin(coin: str) -> bool:
    """Spot pairs are `@N`, `BASE/QUOTE` or HIP-4 outcome `#N`; everything else is a perp."""
    return coin.startswith(("@", "#")) or "/" in coin


def coin_type_for(symbol: str, categories: Mapping[str, int]) -> str:
    """The old service's A-D class: strip one stable suffix, look up `pair_configs.category`."""
    key = symbol.upper()
    for suffix in COIN_TYPE_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            key = key[: -len(suffix)]
            break
    category = categories.get(key)
    return CATEGORY_COIN_TYPES.get(category, DEFAULT_COIN_TYPE) if category is not None else DEFAULT_COIN_TYPE


def _perp_info(coin: str, aliases: Mapping[str, str], categories: Mapping[str, int], *, known: bool) -> SymbolInfo:
    name = coin[len(STRIPPED_DEX_PREFIX) :] if coin.startswith(STRIPPED_DEX_PREFIX) else coin
    base = aliases.get(name, name)
    symbol = base + PERP_QUOTE
    dex = coin.split(":", 1)[0] if ":" in coin else ""
    return SymbolInfo(
        coin=coin,
        symbol=symbol,
        asset_type="futures",
        base=base,
        quote=PERP_QUOTE,
        coin_type=coin_type_for(symbol, categories),
        dex=dex,
        known=known,
    )


class SymbolMap:
    """Immutable coin → `SymbolInfo` tables; build a new one on every metadata reload."""

    __slots__ = ("_aliases", "_categories", "_dexes", "_perp", "_spot", "_token_pairs")

    def __init__(
        self,
        perp: Mapping[str, SymbolInfo],
        spot: Mapping[str, SymbolInfo],
        *,
        dexes: Iterable[str] = ("",),
        categories: Mapping[str, int] | None = None,
        aliases: Mapping[str, str] = ALIASES,
    ) -> None:
        self._perp = dict(perp)
        self._spot = dict(spot)
        self._dexes = frozenset(dexes)
        self._categories = {k.upper(): v for k, v in (categories or {}).items()}
        self._aliases = aliases
        self._token_pairs = self._stable_pairs(self._spot.values())

    @classmethod
    def empty(cls) -> SymbolMap:
        """No metadata yet: perps still follow the rule, spot `@N` stays raw."""
        return cls({}, {})

    @classmethod
    def build(
        cls,
        *,
        perp_metas: Mapping[str, PerpMeta] | None = None,
        spot_meta: SpotMeta | None = None,
        perp_dexs: Sequence[PerpDex | None] | None = None,
        pair_categories: Mapping[str, int] | None = None,
        aliases: Mapping[str, str] = ALIASES,
    ) -> SymbolMap:
        """From `meta` per dex (key `""` = first dex), `spotMeta`, `perpDexs` (first element null) and categories."""
        categories = {k.upper(): v for k, v in (pair_categories or {}).items()}
        perp: dict[str, SymbolInfo] = {}
        for meta in (perp_metas or {}).values():
            for entry in meta.universe:
                perp[entry.name] = _perp_info(entry.name, aliases, categories, known=True)
        spot: dict[str, SymbolInfo] = {}
        if spot_meta is not None:
            tokens = {token.index: token.name for token in spot_meta.tokens}
            for pair in spot_meta.universe:
                base_token = tokens.get(pair.tokens[0])
                quote = tokens.get(pair.tokens[1])
                if base_token is None or quote is None:
                    continue
                base = aliases.get(base_token, base_token)
                symbol = base + quote
                spot[pair.name] = SymbolInfo(
                    coin=pair.name,
                    symbol=symbol,
                    asset_type="spot",
                    base=base,
                    quote=quote,
                    coin_type=coin_type_for(symbol, categories),
                    token=base_token,
                )
        dexes = {""} | set((perp_metas or {}).keys())
        dexes.update(dex.name for dex in (perp_dexs or ()) if dex is not None)
        return cls(perp, spot, dexes=dexes, categories=categories, aliases=aliases)

    def with_categories(self, pair_categories: Mapping[str, int]) -> SymbolMap:
        """The same coins with a reloaded `pair_configs` table."""
        categories = {k.upper(): v for k, v in pair_categories.items()}

        def recoded(infos: Mapping[str, SymbolInfo]) -> dict[str, SymbolInfo]:
            return {
                coin: msgspec.structs.replace(info, coin_type=coin_type_for(info.symbol, categories))
                for coin, info in infos.items()
            }

        return SymbolMap(
            recoded(self._perp), recoded(self._spot), dexes=self._dexes, categories=categories, aliases=self._aliases
        )

    @staticmethod
    def _stable_pairs(spot: Iterable[SymbolInfo]) -> dict[str, str]:
        best: dict[str, tuple[int, str]] = {}
        for info in spot:
            if info.quote in STABLE_QUOTES:
                rank = STABLE_QUOTES.index(info.quote)
                if info.token not in best or rank < best[info.token][0]:
                    best[info.token] = (rank, info.coin)
        return {token: coin for token, (_, coin) in best.items()}

    @property
    def dexes(self) -> frozenset[str]:
        return self._dexes

    def __len__(self) -> int:
        return len(self._perp) + len(self._spot)

    def lookup(self, coin: str, *, spot: bool | None = None) -> SymbolInfo:
        """Resolve a wire coin; `spot=None` decides by the coin's shape. Never raises."""
        if spot is None:
            spot = is_spot_coin(coin)
        if spot:
            info = self._spot.get(coin)
            if info is not None:
                return info
            return SymbolInfo(
                coin=coin,
                symbol=coin,
                asset_type="spot",
                base=coin,
                quote="",
                coin_type=coin_type_for(coin, self._categories),
                token=coin,
                known=False,
            )
        info = self._perp.get(coin)
        if info is not None:
            return info
        return _perp_info(coin, self._aliases, self._categories, known=False)

    def is_known(self, coin: str) -> bool:
        """False for a coin missing from the loaded metadata (time to reload `meta`/`spotMeta`/`perpDexs`)."""
        return coin in self._spot if is_spot_coin(coin) else coin in self._perp

    def coin_type(self, symbol: str) -> str:
        return coin_type_for(symbol, self._categories)

    def stable_pair(self, token: str) -> str | None:
        """The spot coin (`@N`) that prices `token` in a dollar stablecoin, preferring USDC."""
        return self._token_pairs.get(token)

    def token_prices(self, mids: Mapping[str, Decimal]) -> dict[str, Decimal]:
        """Dollar price per spot token from an `allMids` map (coin → mid), for spot valuation."""
        prices: dict[str, Decimal] = {}
        for token, coin in self._token_pairs.items():
            px = mids.get(coin)
            if px is not None:
                prices[token] = px
        return prices
