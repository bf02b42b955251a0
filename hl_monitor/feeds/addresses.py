"""The address book: who to watch, merged from its sources, with a grace period on removal.

Sources are anything with `async load()` returning address rows (the database table, or the legacy
`hl_active_addresses` table filtered by `server_id`, via `Repository.load_address_book`; the
`addresses.initial` config list). The book reloads them every
`addresses.reload_interval` (catches writes by other programs) and on `refresh_now()` (the admin API,
same process). Changes by the `hl-monitor addresses` CLI, a different process, take effect within a
second through a cheap change probe: a source that also has `async change_marker() -> object` (for
the table: row count and `MAX(updated_at)`, which the CLI bumps on every write) is polled every
`CHANGE_POLL_INTERVAL_S` and a full reload runs only when the marker moves. A DB probe was chosen
over a NATS notification because it works for every deployment the CLI can reach (the CLI needs the
database anyway, NATS may be embedded in the service or unreachable from an operator's shell) and
costs one indexed query per second.

Removal waits `addresses.remove_grace`: a flapping row (a script that deletes and re-inserts) does not
churn subscriptions, and an address re-added during the grace simply stays. Addresses are validated
(0x + 40 hex) and lowercased everywhere; invalid rows are skipped, logged and counted, never fatal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final, Protocol, runtime_checkable

import msgspec

from hl_monitor.domain.address import TIERS, Tier, WatchedAddress, parse_address, parse_min_notional, symbol_keys
from hl_monitor.errors import InvalidAddressError
from hl_monitor.feeds.supervisor import Backoff
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = [
    "AddressBook",
    "AddressDiff",
    "AddressRow",
    "AddressSource",
    "CallableSource",
    "ChangeAwareSource",
    "StaticSource",
    "for_instance",
    "parse_address",
    "to_watched",
]

log = get_logger(__name__)

# The CLI and admin API promise "within a second"; polling the change marker at this rate keeps that promise.
CHANGE_POLL_INTERVAL_S: Final = 1.0
# A failed first load is retried quickly (the service cannot do anything useful without addresses)...
LOAD_RETRY_INITIAL_S: Final = 1.0
# ...but never more often than this once the database stays down.
LOAD_RETRY_MAX_S: Final = 30.0


class AddressRow(Protocol):
    """What a source returns per address (the repository's `AddressEntry` fits); validated by the book."""

    @property
    def address(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def tier(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def server_id(self) -> int | None: ...


@runtime_checkable
class AddressSource(Protocol):
    async def load(self) -> Sequence[AddressRow]: ...


@runtime_checkable
class ChangeAwareSource(AddressSource, Protocol):
    async def change_marker(self) -> object:
        """A cheap value that changes whenever `load()` would return something different."""
        ...


class StaticSource:
    """A fixed list (the `addresses.initial` config key, tests)."""

    def __init__(self, entries: Iterable[WatchedAddress | str]) -> None:
        self.entries = [WatchedAddress(address=e) if isinstance(e, str) else e for e in entries]

    async def load(self) -> Sequence[AddressRow]:
        return list(self.entries)


class CallableSource:
    """Adapts plain coroutines, e.g. `Repository.load_address_book` plus a change-marker query."""

    def __init__(
        self,
        load: Callable[[], Awaitable[Sequence[AddressRow]]],
        change_marker: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._load = load
        self._marker = change_marker

    async def load(self) -> Sequence[AddressRow]:
        return await self._load()

    async def change_marker(self) -> object:
        return None if self._marker is None else await self._marker()


def to_watched(row: AddressRow) -> WatchedAddress:
    """Validate and normalise one source row (`InvalidAddressError` on a bad address, tier or notional floor).

    The filter fields (`min_notional_usd`, `allow_symbols`, `deny_symbols`) are optional on a row: a source
    without them watches the address unfiltered.
    """
    if row.tier not in TIERS:
        raise InvalidAddressError(f"{row.address} (tier {row.tier!r})")
    tier: Tier = row.tier  # narrowed by the membership test above
    floor = getattr(row, "min_notional_usd", None)
    try:
        min_notional = parse_min_notional(floor or 0)
    except ValueError:
        raise InvalidAddressError(f"{row.address} (min_notional_usd {floor!r})") from None
    return WatchedAddress(
        address=parse_address(row.address),
        label=row.label or "",
        tier=tier,
        priority=int(row.priority),
        server_id=row.server_id,
        min_notional_usd=min_notional,
        allow_symbols=symbol_keys(getattr(row, "allow_symbols", ())),
        deny_symbols=symbol_keys(getattr(row, "deny_symbols", ())),
    )


class AddressDiff(msgspec.Struct, frozen=True):
    """What one reload changed in the effective set (removals only once their grace has run out)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()  # label, tier, priority or filters changed

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.updated)


def for_instance(entries: Iterable[WatchedAddress], server_id: int | None) -> list[WatchedAddress]:
    """Rows pinned to another instance are not ours; one without a server_id takes every row (as the old service)."""
    if server_id is None:
        return list(entries)
    return [e for e in entries if e.server_id is None or e.server_id == server_id]


class AddressBook:
    """The effective watched set, kept in sync with the sources; see the module docstring.

    `entries()` includes addresses in their removal grace (they are still tracked until it ends).
    `on_change` is awaited with every non-empty diff, in order (wire it to the tracking engine's
    add/remove). Readers that need to react wait on `wait_changed(version)`.
    """

    def __init__(
        self,
        sources: Sequence[AddressSource],
        metrics: Metrics,
        *,
        reload_interval: float,
        remove_grace: float,
        server_id: int | None = None,
        on_change: Callable[[AddressDiff], Awaitable[None]] | None = None,
        poll_interval: float = CHANGE_POLL_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sources = list(sources)
        self._metrics = metrics
        self._reload_interval = reload_interval
        self._remove_grace = remove_grace
        self._server_id = server_id
        self._on_change = on_change
        self._poll_interval = poll_interval
        self._clock = clock
        self._entries: dict[str, WatchedAddress] = {}
        self._removing: dict[str, float] = {}  # address → monotonic deadline
        self._markers: dict[int, object] = {}
        self._refresh = asyncio.Event()
        self._changed = asyncio.Condition()
        self._loaded = asyncio.Event()
        self.version = 0

    # ------------------------------------------------------------------ reading

    def entries(self) -> Mapping[str, WatchedAddress]:
        return dict(self._entries)

    def entry(self, address: str) -> WatchedAddress | None:
        """One address's entry (its label and filters), without copying the book: the signal sink asks per signal."""
        return self._entries.get(address)

    def label(self, address: str) -> str:
        """One address's label; "" when it is not in the book."""
        entry = self._entries.get(address)
        return entry.label if entry is not None else ""

    def removing(self) -> Mapping[str, float]:
        """Addresses gone from every source, still tracked until their deadline (monotonic seconds)."""
        return dict(self._removing)

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    async def wait_changed(self, seen_version: int) -> int:
        """Return the current version once it differs from `seen_version`."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen_version)
            return self.version

    # ------------------------------------------------------------------ writing

    def refresh_now(self) -> None:
        """Reload at once (the admin API calls this after it wrote the table)."""
        self._refresh.set()

    async def reload(self) -> AddressDiff:
        """Load every source, apply the diff (with grace) and notify; raises if a source fails."""
        loaded: dict[str, WatchedAddress] = {}
        for source in self._sources:
            for raw in await source.load():
                try:
                    entry = to_watched(raw)
                except InvalidAddressError as exc:
                    self._metrics.address_reloads.labels(outcome="invalid_address").inc()
                    log.warning("skipping invalid address row", error=str(exc))
                    continue
                loaded.setdefault(entry.address, entry)  # earlier sources win on conflicts
        self._metrics.address_reloads.labels(outcome="ok").inc()
        return await self._apply({e.address: e for e in for_instance(loaded.values(), self._server_id)})

    async def _apply(self, wanted: dict[str, WatchedAddress]) -> AddressDiff:
        now = self._clock()
        added: list[str] = []
        updated: list[str] = []
        for address, entry in wanted.items():
            self._removing.pop(address, None)  # back before its grace ran out: it just stays
            old = self._entries.get(address)
            if old is None:
                added.append(address)
            elif old != entry:
                updated.append(address)
            self._entries[address] = entry
        for address in self._entries.keys() - wanted.keys():
            self._removing.setdefault(address, now + self._remove_grace)
        removed = [a for a, deadline in self._removing.items() if deadline <= now]
        for address in removed:
            del self._removing[address]
            del self._entries[address]
        diff = AddressDiff(tuple(sorted(added)), tuple(sorted(removed)), tuple(sorted(updated)))
        if diff:
            log.info("address book changed", added=len(added), removed=len(removed), updated=len(updated))
            if self._on_change is not None:
                await self._on_change(diff)
            async with self._changed:
                self.version += 1
                self._changed.notify_all()
        self._metrics.addresses_by_tier.labels(tier="all", state="watched").set(len(self._entries))
        self._metrics.addresses_by_tier.labels(tier="all", state="removing").set(len(self._removing))
        return diff

    async def _markers_moved(self) -> bool:
        moved = False
        for index, source in enumerate(self._sources):
            if isinstance(source, ChangeAwareSource):
                marker = await source.change_marker()
                if self._markers.get(index, marker) != marker:
                    moved = True
                self._markers[index] = marker
        return moved

    async def run(self) -> None:
        """Reload on start, on `refresh_now()`, when a change marker moves, every reload interval; expire graces."""
        backoff = Backoff(LOAD_RETRY_INITIAL_S, LOAD_RETRY_MAX_S)
        next_reload = self._clock()
        while True:
            now = self._clock()
            reload_due = self._refresh.is_set() or now >= next_reload
            try:
                if not reload_due:
                    reload_due = await self._markers_moved()
                if reload_due:
                    self._refresh.clear()
                    await self._markers_moved()  # remember the marker the reload corresponds to
                    await self.reload()
                    self._loaded.set()
                    next_reload = self._clock() + self._reload_interval
                    backoff.reset()
                elif any(deadline <= now for deadline in self._removing.values()):
                    await self._apply({a: e for a, e in self._entries.items() if a not in self._removing})
                wait = self._poll_interval
            except Exception as exc:
                # Keep the last good set: a database hiccup must not unsubscribe every whale.
                self._metrics.address_reloads.labels(outcome="error").inc()
                wait = backoff.next_delay()
                next_reload = self._clock() + wait
                log.warning("address reload failed; keeping the current set", error=repr(exc), retry_in=wait)
            deadlines = [next_reload, *self._removing.values()]
            try:
                async with asyncio.timeout(max(0.0, min(wait, min(deadlines) - self._clock()))):
                    await self._refresh.wait()
            except TimeoutError:
                pass
