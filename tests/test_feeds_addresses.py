"""Address book: validation, grace on removal, fast refresh paths, a real database as the source."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

import pytest

from hl_monitor.config import Config, DatabaseConfig
from hl_monitor.domain.address import WatchedAddress, is_valid_address, parse_address
from hl_monitor.errors import InvalidAddressError
from hl_monitor.feeds.addresses import AddressBook, AddressDiff, AddressRow, CallableSource, StaticSource
from hl_monitor.metrics import Metrics
from hl_monitor.storage.migrate import upgrade
from hl_monitor.storage.repository import AddressTable, create_engine
from tests.support.metrics import metric_value
from tests.support.waiting import wait_until

A = "0x" + "a" * 40
B = "0x" + "b" * 40
C = "0x" + "c" * 40
# A realistic removal grace; on looptime's loop clock waiting it out costs no real time.
GRACE_S: Final = 60.0
# Change-marker polls that make a quiet point: the poll before the last has certainly been compared and acted on.
QUIET_POLLS: Final = 3


@dataclass(frozen=True)
class Change:
    """What `hl-monitor addresses add` hands to the table."""

    address: str
    label: str | None = None
    tier: str | None = None
    priority: int | None = None
    is_active: bool | None = None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MutableSource:
    def __init__(self, *entries: WatchedAddress) -> None:
        self.entries = list(entries)
        self.fail = False

    async def load(self) -> Sequence[AddressRow]:
        if self.fail:
            raise ConnectionError("database unreachable")
        return list(self.entries)


def test_addresses_are_validated_and_lowercased() -> None:
    assert parse_address("  0x" + "AbC" * 13 + "d ") == "0x" + "abc" * 13 + "d"
    for bad in ("0x123", "abc", "0x" + "g" * 40, None, 42, "0x" + "a" * 41):
        assert not is_valid_address(bad)
        with pytest.raises(InvalidAddressError, match="0x followed by 40 hex digits"):
            parse_address(bad)


async def test_reload_normalises_rows_and_skips_invalid_ones() -> None:
    metrics = Metrics()
    source = StaticSource(
        [
            WatchedAddress(address=A.upper().replace("0X", "0x"), label="whale", tier="precise", priority=5),
            WatchedAddress(address="0xnot-an-address"),
            WatchedAddress(address=B, tier="nonsense"),  # type: ignore[arg-type]  # as a foreign table may hold
            WatchedAddress(address=C, tier="wide", label="tape"),
        ]
    )
    book = AddressBook([source], metrics, reload_interval=60, remove_grace=300)
    diff = await book.reload()
    assert diff == AddressDiff(added=(A, C))
    assert book.entries()[A] == WatchedAddress(address=A, label="whale", tier="precise", priority=5)
    assert book.entries()[C].tier == "wide"
    assert metric_value(metrics, "address_reloads_total", outcome="invalid_address") == 2


@dataclass(frozen=True)
class ForeignRow:
    """A row as another program's table may hold it: a filter floor of any type."""

    address: str
    min_notional_usd: object
    label: str = ""
    tier: str = "auto"
    priority: int = 0
    server_id: int | None = None


async def test_filters_are_normalised_and_a_bad_floor_skips_the_row() -> None:
    metrics = Metrics()
    source = StaticSource(
        [
            WatchedAddress(address=A, allow_symbols=frozenset({"btc", " eth "}), min_notional_usd=Decimal("5e3")),
        ]
    )
    foreign = CallableSource(
        AsyncValue([ForeignRow(address=B, min_notional_usd=Decimal(-1)), ForeignRow(address=C, min_notional_usd="7")])
    )
    book = AddressBook([source, foreign], metrics, reload_interval=60, remove_grace=300)
    assert await book.reload() == AddressDiff(added=(A, C))
    entry = book.entry(A)
    assert entry is not None
    assert (entry.allow_symbols, entry.deny_symbols, entry.min_notional_usd) == (
        frozenset({"BTC", "ETH"}),
        frozenset(),
        Decimal(5000),
    )
    assert book.entry(C) == WatchedAddress(address=C, min_notional_usd=Decimal(7))
    assert book.entry(B) is None
    assert metric_value(metrics, "address_reloads_total", outcome="invalid_address") == 1

    source.entries = [WatchedAddress(address=A, deny_symbols=frozenset({"SOL"}))]
    assert await book.reload() == AddressDiff(updated=(A,))  # a filter change is an update, applied at once
    entry = book.entry(A)
    assert entry is not None
    assert (entry.allow_symbols, entry.deny_symbols) == (frozenset(), frozenset({"SOL"}))


class AsyncValue:
    def __init__(self, rows: Sequence[AddressRow]) -> None:
        self.rows = rows

    async def __call__(self) -> Sequence[AddressRow]:
        return self.rows


async def test_removal_waits_for_the_grace_and_a_readd_cancels_it() -> None:
    clock = Clock()
    source = MutableSource(WatchedAddress(address=A), WatchedAddress(address=B))
    changes: list[AddressDiff] = []

    async def on_change(diff: AddressDiff) -> None:
        changes.append(diff)

    book = AddressBook([source], Metrics(), reload_interval=60, remove_grace=300, on_change=on_change, clock=clock)
    await book.reload()
    source.entries = [WatchedAddress(address=A)]
    assert not await book.reload()
    assert B in book.entries()  # still tracked during the grace
    assert book.removing() == {B: 1300.0}

    clock.now += 299
    assert not await book.reload()
    clock.now += 1
    assert await book.reload() == AddressDiff(removed=(B,))
    assert B not in book.entries()

    # Removed and re-added within the grace: nothing happens at all.
    source.entries = []
    await book.reload()
    clock.now += 100
    source.entries = [WatchedAddress(address=A, priority=3)]
    assert await book.reload() == AddressDiff(updated=(A,))
    clock.now += 1000
    assert not await book.reload()
    assert list(book.entries()) == [A]
    assert changes == [AddressDiff(added=(A, B)), AddressDiff(removed=(B,)), AddressDiff(updated=(A,))]


@pytest.mark.looptime
async def test_run_applies_refresh_now_and_expires_graces_without_a_reload() -> None:
    """On loop time under looptime: the grace is a minute, and the test sees it end at exactly that minute."""
    loop = asyncio.get_running_loop()
    source = MutableSource(WatchedAddress(address=A))
    book = AddressBook(
        [source], Metrics(), reload_interval=3600, remove_grace=GRACE_S, poll_interval=0.05, clock=loop.time
    )
    task = asyncio.create_task(book.run())
    try:
        await asyncio.wait_for(book.wait_loaded(), 2)
        version = book.version
        source.entries = [WatchedAddress(address=A), WatchedAddress(address=B)]
        book.refresh_now()  # the admin API path
        version = await asyncio.wait_for(book.wait_changed(version), 1)
        assert set(book.entries()) == {A, B}
        source.entries = [WatchedAddress(address=B)]
        removed_at = loop.time()
        book.refresh_now()
        await asyncio.sleep(GRACE_S - 1)
        assert set(book.entries()) == {A, B}  # A in grace
        await asyncio.wait_for(book.wait_changed(book.version), 2)  # the grace ran out on its own
        assert set(book.entries()) == {B}
        assert loop.time() - removed_at >= GRACE_S
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_a_failing_source_keeps_the_last_good_set() -> None:
    metrics = Metrics()
    source = MutableSource(WatchedAddress(address=A))
    book = AddressBook([source], metrics, reload_interval=0.05, remove_grace=0.0, poll_interval=0.05)
    task = asyncio.create_task(book.run())
    try:
        await asyncio.wait_for(book.wait_loaded(), 2)
        source.fail = True
        await wait_until(lambda: metric_value(metrics, "address_reloads_total", outcome="error") >= 2)
        assert list(book.entries()) == [A]
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_server_id_pins_rows_to_one_instance() -> None:
    source = StaticSource(
        [
            WatchedAddress(address=A, server_id=1),
            WatchedAddress(address=B, server_id=2),
            WatchedAddress(address=C),
        ]
    )
    pinned = AddressBook([source], Metrics(), reload_interval=60, remove_grace=0, server_id=1)
    await pinned.reload()
    assert set(pinned.entries()) == {A, C}
    unpinned = AddressBook([source], Metrics(), reload_interval=60, remove_grace=0)
    await unpinned.reload()
    assert set(unpinned.entries()) == {A, B, C}


async def test_cli_writes_to_the_table_take_effect_within_a_second(sqlite_url: str) -> None:
    """The CLI is another process: it only writes the table; the change marker makes that visible fast."""
    await upgrade(sqlite_url)
    engine = create_engine(Config(database=DatabaseConfig(url=sqlite_url)))
    table = AddressTable(engine)
    loads = 0

    polls = 0

    async def load() -> Sequence[AddressRow]:
        nonlocal loads
        loads += 1
        return await table.load()

    async def change_marker() -> object:
        nonlocal polls
        polls += 1
        return await table.change_marker()

    book = AddressBook(
        [CallableSource(load, change_marker)],
        Metrics(),
        reload_interval=3600,
        remove_grace=0.0,
        poll_interval=0.05,
    )
    task = asyncio.create_task(book.run())
    try:
        await asyncio.wait_for(book.wait_loaded(), 2)
        assert not book.entries()
        quiet_loads, polled = loads, polls
        # Quiet point: the book has read the unchanged marker a few more times and decided each time.
        await wait_until(lambda: polls >= polled + QUIET_POLLS, what="more change-marker polls")
        assert loads == quiet_loads  # an unchanged marker costs no reload
        version = book.version
        await table.add([Change(A.upper().replace("0X", "0x"), label="cli", tier="precise", priority=2)])
        await asyncio.wait_for(book.wait_changed(version), 1)
        assert book.entries()[A] == WatchedAddress(address=A, label="cli", tier="precise", priority=2)
        version = book.version
        await table.remove([A])
        await asyncio.wait_for(book.wait_changed(version), 1)
        assert not book.entries()
    finally:
        task.cancel()
        await asyncio.wait([task])
        await engine.dispose()
