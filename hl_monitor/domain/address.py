"""Addresses and how they are watched: the one parse function, tiers, priorities, the watched-address record."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Literal, NewType, Protocol, TypeAlias

import msgspec

from hl_monitor.errors import InvalidAddressError

__all__ = [
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
    "rank",
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


class WatchedAddress(msgspec.Struct, frozen=True, kw_only=True):
    """One watched address as the sources describe it. `server_id` None = any instance may track it."""

    address: str
    label: str = ""
    tier: Tier = "auto"
    priority: int = 0
    server_id: int | None = None


def rank(entry: WatchedAddress) -> tuple[int, bool, str]:
    """Who gets a precise user slot first: higher priority, then `precise` before `auto`, then by address."""
    return (-entry.priority, entry.tier != "precise", entry.address)


class AddressView(Protocol):
    """A changing set of watched addresses: the address book, or a cluster member's share of it."""

    @property
    def version(self) -> int: ...

    def entries(self) -> Mapping[str, WatchedAddress]: ...

    async def wait_changed(self, seen_version: int) -> int: ...
