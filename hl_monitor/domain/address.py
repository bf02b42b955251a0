"""Addresses and how they are watched: the one parse function, tiers, priorities, the watched-address record."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Final, Literal, NewType, Protocol, TypeAlias

import msgspec

from hl_monitor.errors import InvalidAddressError

__all__ = [
    "FILTER_MAX_SYMBOLS",
    "FILTER_SYMBOL_MAX_CHARS",
    "PRIORITIES",
    "TIERS",
    "Address",
    "AddressView",
    "Priority",
    "Tier",
    "TrackedBy",
    "WatchedAddress",
    "is_valid_address",
    "parse_address",
    "parse_min_notional",
    "parse_symbol_list",
    "rank",
    "symbol_key",
    "symbol_keys",
]

# A Hyperliquid user: `0x` and 40 hex digits, stored and compared lowercase everywhere.
Address = NewType("Address", str)

# How an operator asks for an address to be watched: its own user stream (`precise`), the shared trade tape
# (`wide`), or whichever the planner can give it (`auto`: precise while user slots last, by priority).
Tier: TypeAlias = Literal["precise", "wide", "auto"]
TIERS: Final[tuple[Tier, ...]] = ("precise", "wide", "auto")

# Which tier tracks an address right now; the tape tracker reports only addresses it tracks as `wide`.
TrackedBy: TypeAlias = Literal["wide", "precise"]

# REST requests: `high` may use the reserve kept back for gap recovery; `low` waits behind it.
Priority: TypeAlias = Literal["high", "low"]
PRIORITIES: Final[tuple[Priority, ...]] = ("high", "low")

_ADDRESS_RE: Final = re.compile(r"0x[0-9a-fA-F]{40}")


def is_valid_address(value: object) -> bool:
    return isinstance(value, str) and _ADDRESS_RE.fullmatch(value.strip()) is not None


def parse_address(value: object) -> Address:
    """The canonical form (stripped, lowercase) of an address; `InvalidAddressError` for anything else."""
    if not isinstance(value, str) or not is_valid_address(value):
        raise InvalidAddressError(value)
    return Address(value.strip().lower())


# A filter list entry names a symbol (`BTCUSDC`) or a coin (`BTC`, `xyz:XYZ100`, `@107`): never longer than the
# widest coin column, never a comma (lists are stored comma-separated).
FILTER_SYMBOL_MAX_CHARS: Final = 64
# Symbols per list: more than the exchange lists per dex would be a mistake, not a filter.
FILTER_MAX_SYMBOLS: Final = 1000


def parse_min_notional(value: object) -> Decimal:
    """A per-address notional floor: a finite decimal ≥ 0 (a number or its text); `ValueError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except ArithmeticError:
        raise ValueError(f"{value!r} is not a number") from None
    if not number.is_finite() or number < 0:
        raise ValueError(f"{value} is not a dollar amount of 0 or more")
    return number


def parse_symbol_list(value: str | Iterable[str]) -> tuple[str, ...]:
    """A filter list from `BTC,ETH` or `["BTC", "ETH"]`: entries stripped, blanks dropped, the first spelling of
    each `symbol_key` kept, in order; `ValueError` for an entry with a comma or too long, or too many."""
    items = value.split(",") if isinstance(value, str) else list(value)
    kept: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a symbol")
        text = item.strip()
        if not text:
            continue
        if "," in text or len(text) > FILTER_SYMBOL_MAX_CHARS:
            raise ValueError(f"{text!r} is not a symbol or coin (1 to {FILTER_SYMBOL_MAX_CHARS} characters, no comma)")
        kept.setdefault(symbol_key(text), text)
    if len(kept) > FILTER_MAX_SYMBOLS:
        raise ValueError(f"{len(kept)} symbols; at most {FILTER_MAX_SYMBOLS}")
    return tuple(kept.values())


def symbol_key(symbol: str) -> str:
    """How a symbol or coin of a filter list is compared with a signal's: stripped, case-insensitive."""
    return symbol.strip().upper()


def symbol_keys(symbols: Iterable[str]) -> frozenset[str]:
    """A filter list as compared (`symbol_key` of each non-blank entry)."""
    return frozenset(key for s in symbols if (key := symbol_key(s)))


class WatchedAddress(msgspec.Struct, frozen=True, kw_only=True):
    """One watched address as the sources describe it. `server_id` None = any instance may track it.

    The filter fields say which of its signals are published (README "Filters"): `min_notional_usd` is a
    floor beside the global `signals.min_notional_usd` (the higher applies); `allow_symbols` (empty = every
    symbol) and `deny_symbols` hold `symbol_key`s matched against a signal's symbol or coin.
    """

    address: str
    label: str = ""
    tier: Tier = "auto"
    priority: int = 0
    server_id: int | None = None
    min_notional_usd: Decimal = Decimal(0)
    allow_symbols: frozenset[str] = frozenset()
    deny_symbols: frozenset[str] = frozenset()


def rank(entry: WatchedAddress) -> tuple[int, bool, str]:
    """Who gets a precise user slot first: higher priority, then `precise` before `auto`, then by address."""
    return (-entry.priority, entry.tier != "precise", entry.address)


class AddressView(Protocol):
    """A changing set of watched addresses: the address book, or a cluster member's share of it."""

    @property
    def version(self) -> int: ...

    def entries(self) -> Mapping[str, WatchedAddress]: ...

    async def wait_changed(self, seen_version: int) -> int: ...
