"""SymbolMap: the old service's symbol rules, alias table, coin_type classes; lookups never raise."""

from __future__ import annotations

from decimal import Decimal

from hl_monitor.hyperliquid.protocol import SpotMeta, decode_info
from hl_monitor.hyperliquid.symbols import SymbolMap, coin_type_for, is_spot_coin
from tests.support.paths import FIXTURES
from tests.support.symbols import build


def test_perp_symbols_follow_the_old_rule() -> None:
    """Perps: name + USDC; `xyz:` stripped, other dex prefixes verbatim; alias applied (PUMP→PUMP-26)."""
    symbols = build()
    assert symbols.lookup("BTC").symbol == "BTCUSDC"
    assert symbols.lookup("xyz:XYZ100").symbol == "XYZ100USDC"
    assert symbols.lookup("xyz:SILVER").dex == "xyz"
    assert symbols.lookup("cash:NVDA").symbol == "cash:NVDAUSDC"
    assert symbols.lookup("PUMP").symbol == "PUMP-26USDC"
    assert symbols.lookup("UBTC", spot=False).symbol == "BTCUSDC"
    assert symbols.lookup("ETH").asset_type == "futures"


def test_spot_symbols_resolve_at_index_through_spot_meta() -> None:
    """Spot: alias(base) + quote, quote not aliased; `@N` resolved by the pair's token indexes."""
    symbols = build()
    assert symbols.lookup("@107").symbol == "HYPEUSDC"
    assert symbols.lookup("@142").symbol == "BTCUSDC"
    assert symbols.lookup("@142").token == "UBTC"
    assert symbols.lookup("PURR/USDC").symbol == "PURRUSDC"
    assert symbols.lookup("@166").symbol == "USDTUSDC"
    assert symbols.lookup("@181").symbol == "HYPEUSDT0"
    assert symbols.lookup("@188").symbol == "PUMPUSDC"
    assert symbols.lookup("@107").asset_type == "spot"


def test_unknown_coins_never_raise_and_are_reported_unknown() -> None:
    """Unknown perp → rule symbol, unknown spot → raw coin (old fallback); `is_known` drives a reload."""
    symbols = build()
    assert symbols.is_known("BTC")
    assert symbols.is_known("@107")
    assert not symbols.is_known("NEWCOIN")
    assert not symbols.is_known("@999")  # pair whose base token is missing from tokens
    assert not symbols.is_known("flx:GOLD")
    info = symbols.lookup("NEWCOIN")
    assert (info.symbol, info.known, info.asset_type) == ("NEWCOINUSDC", False, "futures")
    spot = symbols.lookup("@4000")
    assert (spot.symbol, spot.known, spot.asset_type) == ("@4000", False, "spot")
    empty = SymbolMap.empty()
    assert empty.lookup("xyz:SILVER").symbol == "SILVERUSDC"
    assert empty.lookup("").symbol == "USDC"
    assert "flx" in symbols.dexes


def test_coin_type_from_pair_categories() -> None:
    """Categories 1→A, 2→B, 3/4→C, 5→D, missing→D; one stable suffix stripped, case-insensitive."""
    symbols = build({"BTC": 1, "eth": 2, "HYPE": 3, "PURR": 4, "ATOM": 5, "XYZ100": 9})
    assert symbols.lookup("BTC").coin_type == "A"
    assert symbols.lookup("ETH").coin_type == "B"
    assert symbols.lookup("@107").coin_type == "C"
    assert symbols.lookup("PURR/USDC").coin_type == "C"
    assert symbols.lookup("ATOM").coin_type == "D"
    assert symbols.lookup("xyz:XYZ100").coin_type == "D"  # unknown category value
    assert symbols.lookup("@142").coin_type == "A"  # UBTC → BTC
    assert coin_type_for("BTCUSDT", {"BTC": 2}) == "B"
    assert coin_type_for("BTCUSDH", {"BTC": 2}) == "B"
    assert coin_type_for("BTCUSD", {"BTC": 2}) == "B"
    assert coin_type_for("USDC", {"USDC": 1}) == "A"  # nothing left to strip: the symbol itself
    reloaded = symbols.with_categories({"BTC": 5})
    assert reloaded.lookup("BTC").coin_type == "D"
    assert reloaded.lookup("@107").symbol == "HYPEUSDC"


def test_spot_valuation_pairs_prefer_usdc() -> None:
    """Token prices for spot valuation come from the token's dollar-stable pair, USDC first."""
    symbols = build()
    assert symbols.stable_pair("HYPE") == "@107"
    assert symbols.stable_pair("UBTC") == "@142"
    prices = symbols.token_prices({"@107": Decimal("40.5"), "@181": Decimal("41"), "@142": Decimal("90000")})
    assert prices == {"HYPE": Decimal("40.5"), "UBTC": Decimal("90000")}


def test_real_spot_meta_fixture_and_coin_shapes() -> None:
    """The captured spotMeta (tokens only) builds; coin shapes decide spot vs perp."""
    meta = decode_info((FIXTURES / "http_spot_meta_non_usdc_collateral.json").read_bytes(), SpotMeta)
    symbols = SymbolMap.build(spot_meta=meta)
    assert len(symbols) == 0
    assert is_spot_coin("@107")
    assert is_spot_coin("PURR/USDC")
    assert is_spot_coin("#10")
    assert not is_spot_coin("xyz:SILVER")
    assert not is_spot_coin("BTC")
