"""Automatic watching (`discovery.auto_watch`): the owner of the addresses discovery added to the watch list.

Each `step()` (after a confirmation pass of `watch.discovery.DiscoveryKeeper`), while this instance may write
(`is_leader`: always alone, the `discovery` lease in cluster mode, `cluster/discovery.py`):

- **watch**: a `directional` candidate of any window with at least `discovery.auto_min_notional_usd` of notional,
  confirmed at or above `discovery.min_account_usd`, that has no row in the address table (active or not: an
  address the operator removed stays removed), joins it as `tier = wide` with label
  `discovered:auto:directional` — at most `discovery.auto_max` such rows at a time, best notional first;
- **activity**: an auto-watched address that still qualifies (directional, notional at or above the minimum in
  some window) is active now;
- **unwatch**: one without qualifying activity for `discovery.auto_expire` is deleted from the table (so it can
  qualify again later). Expiry waits until the service has seen one full shortest window since its start, so a
  restart (empty windows) removes nothing; the activity clock of an address restarts with the service.

The label is the marker: rows whose label starts with `discovered:auto:` are this owner's, listed and removed in
bulk by it (`hl-monitor addresses list|remove --label-prefix discovered:auto:`, `GET|DELETE
/admin/discovery/auto`). An operator who relabels one takes it over; one who removes one keeps it removed (an
inactive row). Tier `wide` is never changed here: the planner promotes only `precise`/`auto` tiers.

Every watch and unwatch is logged and announced once (`DiscoveryAnnouncement`, `delivery/discovery.py`): the
address-table change is committed first, then the announcement is persisted and handed to its outbox; its id
is the decision's address, action and time, so a re-publish is stored once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import DiscoveryConfig
from hl_monitor.delivery.discovery import announcement_publication
from hl_monitor.domain.address import Tier
from hl_monitor.domain.publication import DiscoveryAction, DiscoveryAnnouncement, PublicationSink
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.storage.repository import AddressChange
from hl_monitor.tracking.discovery import Candidate, Label
from hl_monitor.watch.discovery import Confirmation, window_name

__all__ = ["AUTO_LABEL", "AUTO_LABEL_PREFIX", "AddressRows", "AutoWatcher", "CandidateSource", "is_auto_label"]

log = get_logger(__name__)

AUTO_LABEL_PREFIX: Final = "discovered:auto:"
AUTO_LABEL: Final = AUTO_LABEL_PREFIX + "directional"
AUTO_TIER: Final[Tier] = "wide"
# Directional candidates looked at per window and step: far more than `auto_max` (20), and a bounded label scan.
SCAN_LIMIT: Final = 200
# Announcements kept in memory for `/status` and tests; the stream is the record.
MAX_REMEMBERED: Final = 100


def is_auto_label(label: str) -> bool:
    return label.startswith(AUTO_LABEL_PREFIX)


class CandidateSource(Protocol):
    """What automatic watching reads (`watch.discovery.DiscoveryKeeper`)."""

    @property
    def windows_ms(self) -> list[int]: ...

    def candidates(
        self, window_ms: int, *, label: Label | None = None, limit: int | None = None
    ) -> list[Candidate]: ...

    def candidate(self, window_ms: int, address: str) -> Candidate | None: ...

    def confirmation(self, address: str) -> Confirmation | None: ...


class AddressRows(Protocol):
    """The address table (`storage.repository.AddressTable`) with a wake-up of the address book."""

    async def list(self) -> list[dict[str, Any]]: ...

    async def add(self, entries: Sequence[AddressChange]) -> int: ...

    async def remove(self, addresses: Sequence[str], *, purge: bool = False) -> int: ...


@dataclass(frozen=True, slots=True)
class _Row:
    """One address-table change (`AddressChange`)."""

    address: str
    label: str | None = AUTO_LABEL
    tier: str | None = AUTO_TIER
    priority: int | None = None
    is_active: bool | None = True


class AutoWatcher:
    """See the module docstring. `step()` once per confirmation pass; `auto_watched()` for the status."""

    def __init__(
        self,
        cfg: DiscoveryConfig,
        source: CandidateSource,
        rows: AddressRows,
        *,
        sink: PublicationSink,
        metrics: Metrics,
        instance_id: str,
        refresh: Callable[[], None] = lambda: None,
        is_leader: Callable[[], bool] = lambda: True,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.cfg = cfg
        self._source = source
        self._rows = rows
        self._sink = sink
        self._metrics = metrics
        self._instance_id = instance_id
        self._refresh = refresh
        self._is_leader = is_leader
        self._wall_ms = wall_ms
        self._started_ms = wall_ms()
        self._settle_ms = min(source.windows_ms)
        self._expire_ms = round(cfg.auto_expire * 1000)
        self._last_active: dict[str, int] = {}  # auto-watched address → last time it qualified (ms)
        self.announced: list[DiscoveryAnnouncement] = []  # this process's, newest last (bounded: see `_announce`)

    def auto_watched(self) -> dict[str, int]:
        """Auto-watched address → last qualifying activity (ms), as of the last step."""
        return dict(self._last_active)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.cfg.auto_watch,
            "leader": self._is_leader(),
            "watched": len(self._last_active),
            "max": self.cfg.auto_max,
        }

    def qualifying(self, address: str) -> Candidate | None:
        """The address's best qualifying candidate (directional, enough notional) over the windows, or None."""
        best: Candidate | None = None
        for window in self._source.windows_ms:
            c = self._source.candidate(window, address)
            if c is not None and self._qualifies(c) and (best is None or c.notional_usd > best.notional_usd):
                best = c
        return best

    def _qualifies(self, c: Candidate) -> bool:
        return c.label == "directional" and c.notional_usd >= self.cfg.auto_min_notional_usd

    def _promotable(self, address: str) -> Confirmation | None:
        confirmed = self._source.confirmation(address)
        if confirmed is None or confirmed.account_value_usd < self.cfg.min_account_usd:
            return None
        return confirmed

    async def step(self) -> list[DiscoveryAnnouncement]:
        """One pass (module docstring); returns the announcements it made."""
        leader = self.cfg.auto_watch and self._is_leader()
        self._metrics.discovery_leader.set(1 if leader else 0)
        if not leader:
            return []
        now = self._wall_ms()
        known = {row["address"]: row for row in await self._rows.list()}
        auto = {a for a, row in known.items() if row["is_active"] and is_auto_label(row["label"])}
        for address in self._last_active.keys() - auto:
            del self._last_active[address]  # removed or relabelled by the operator: no longer ours
        for address in auto - self._last_active.keys():
            self._last_active[address] = now  # seen for the first time (added before a restart)
        out: list[DiscoveryAnnouncement] = []
        settled = now - self._started_ms >= self._settle_ms
        for address in sorted(auto):
            if self.qualifying(address) is not None:
                self._last_active[address] = now
            elif settled and now - self._last_active[address] >= self._expire_ms:
                out.append(await self._unwatch(address, known[address]["label"], now))
        room = self.cfg.auto_max - len(self._last_active)
        if room > 0:
            for c, confirmed in self._eligible(known):
                out.append(await self._watch(c, confirmed, now))
                room -= 1
                if room == 0:
                    break
        self._metrics.discovery_auto_watched.set(len(self._last_active))
        return out

    def _eligible(self, known: dict[str, dict[str, Any]]) -> list[tuple[Candidate, Confirmation]]:
        """Qualifying, confirmed candidates with no row in the table, best notional first, each once."""
        best: dict[str, tuple[Candidate, Confirmation]] = {}
        for window in self._source.windows_ms:
            for c in self._source.candidates(window, label="directional", limit=SCAN_LIMIT):
                if not self._qualifies(c):
                    break  # largest notional first: the rest are smaller
                if c.address in known or (confirmed := self._promotable(c.address)) is None:
                    continue
                held = best.get(c.address)
                if held is None or c.notional_usd > held[0].notional_usd:
                    best[c.address] = (c, confirmed)
        return sorted(best.values(), key=lambda cc: (-cc[0].notional_usd, cc[0].address))

    async def _watch(self, c: Candidate, confirmed: Confirmation, now: int) -> DiscoveryAnnouncement:
        await self._rows.add([_Row(address=c.address)])
        self._refresh()
        self._last_active[c.address] = now
        reason = (
            f"confirmed directional candidate: {c.notional_usd:,.0f} USD in {window_name(c.window_s * 1000)}, "
            f"account {confirmed.account_value_usd:,.0f} USD"
        )
        return await self._announce(
            "watch",
            c.address,
            now,
            reason=reason,
            label=AUTO_LABEL,
            window=window_name(c.window_s * 1000),
            notional_usd=c.notional_usd,
            net_usd_by_coin=c.net_usd_by_coin,
            account_value_usd=confirmed.account_value_usd,
            evidence=c.evidence.reasons,
        )

    async def _unwatch(self, address: str, label: str, now: int) -> DiscoveryAnnouncement:
        last = self._last_active.pop(address)
        await self._rows.remove([address], purge=True)
        self._refresh()
        return await self._announce(
            "unwatch",
            address,
            now,
            reason=f"no qualifying activity for {self.cfg.auto_expire:g} s",
            label=label,
            last_active_ms=last,
        )

    async def _announce(
        self,
        action: DiscoveryAction,
        address: str,
        now: int,
        *,
        reason: str,
        label: str,
        window: str | None = None,
        notional_usd: float | None = None,
        net_usd_by_coin: dict[str, float] | None = None,
        account_value_usd: float | None = None,
        evidence: tuple[str, ...] = (),
        last_active_ms: int | None = None,
    ) -> DiscoveryAnnouncement:
        announcement = DiscoveryAnnouncement(
            event_id=f"{address}:discovery:{action}:{now}",
            address=address,
            action=action,
            reason=reason,
            label=label,
            window=window,
            notional_usd=notional_usd,
            net_usd_by_coin=net_usd_by_coin or {},
            account_value_usd=account_value_usd,
            evidence=evidence,
            last_active_ms=last_active_ms,
            at_ms=now,
            instance_id=self._instance_id,
        )
        await self._sink([announcement_publication(announcement, self.cfg.subject_prefix)])
        self._metrics.discovery_auto_changes.labels(action=action).inc()
        log.info(
            "discovery auto-watch change",
            action=action,
            address=address,
            reason=reason,
            label=label,
            event_id=announcement.event_id,
        )
        self.announced.append(announcement)
        del self.announced[:-MAX_REMEMBERED]
        return announcement
