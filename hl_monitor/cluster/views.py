"""What each tier of this member sees of the address book in cluster mode (see docs/architecture.md §5).

- `OwnedView`: the addresses whose lease this member holds and whose state is imported; the precise tier
  reads it.
- `ExcludingView`: the book without the addresses the cluster places precise on any member; the tier
  planner (and so the tape) reads it, because an address tracked precisely elsewhere must not be reported
  here too (its tape ids differ from the precise ids, so dedup cannot help).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from hl_monitor.domain.address import AddressView, WatchedAddress

__all__ = ["ExcludingView", "OwnedView", "Placement"]


class Placement(Protocol):
    """The cluster's placement as the views read it (`cluster.leases.Cluster`)."""

    @property
    def placement_version(self) -> int: ...

    def placement(self) -> Mapping[str, str]: ...

    async def wait_placement_changed(self, seen_version: int) -> int: ...


class OwnedView:
    """The `AddressView` the precise tier reads: book entries of the addresses this instance holds."""

    def __init__(self, book: AddressView) -> None:
        self._book = book
        self._owned: frozenset[str] = frozenset()
        self._changed = asyncio.Condition()
        self.version = 0

    def entries(self) -> Mapping[str, WatchedAddress]:
        entries = self._book.entries()
        return {a: entries[a] for a in self._owned if a in entries}

    def addresses(self) -> frozenset[str]:
        return self._owned

    async def wait_changed(self, seen_version: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen_version)
            return self.version

    async def set(self, owned: frozenset[str]) -> None:
        if owned != self._owned:
            self._owned = owned
            await self.bump()

    async def bump(self) -> None:
        async with self._changed:
            self.version += 1
            self._changed.notify_all()


class ExcludingView:
    """The address book without the addresses the cluster places precise on any member.

    Until the first placement exists every non-`wide` address counts as placed: a starting member must not
    report an address on the tape that another member already tracks precisely (different ids, no dedup).
    """

    def __init__(self, book: AddressView, cluster: Placement) -> None:
        self._book = book
        self._cluster = cluster

    @property
    def version(self) -> int:
        return self._book.version * 1_000_003 + self._cluster.placement_version

    def _excluded(self) -> frozenset[str]:
        if self._cluster.placement_version == 0:
            return frozenset(a for a, e in self._book.entries().items() if e.tier != "wide")
        return frozenset(self._cluster.placement())

    def entries(self) -> Mapping[str, WatchedAddress]:
        excluded = self._excluded()
        return {a: e for a, e in self._book.entries().items() if a not in excluded}

    async def wait_changed(self, seen_version: int) -> int:
        book_v, placement_v = self._book.version, self._cluster.placement_version
        if self.version != seen_version:
            return self.version
        async with asyncio.TaskGroup() as tg:
            waiters = [
                tg.create_task(self._book.wait_changed(book_v)),
                tg.create_task(self._cluster.wait_placement_changed(placement_v)),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        return self.version
