"""In-memory stand-ins for the service behind the HTTP surface, shared by the HTTP and console test modules.

`FakeView` is a ServiceView whose readiness follows three switches; `EmptyView` one with nothing to report, for
routes that read other views; `MemoryAdmin` is an AddressAdmin in a dict that
can act like a database outage.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from hl_monitor.errors import StorageError
from hl_monitor.ops.http import AddressInput, Readiness

WHALE = "0x" + "ab" * 20


class FakeView:
    """Readiness from three switches, like the real view derives it from NATS, the DB and feed ages."""

    def __init__(self) -> None:
        self.nats_up = True
        self.db_up = True
        self.stale: dict[str, float] = {}
        self.broken = False

    def readiness(self) -> Readiness:
        if self.broken:
            raise RuntimeError("view crashed")
        reasons: dict[str, str] = {}
        if not self.nats_up:
            reasons["nats"] = "disconnected"
        if not self.db_up:
            reasons["database"] = "unreachable"
        for conn, age in self.stale.items():
            reasons[f"feed:{conn}"] = f"stale for {age:.0f}s"
        return Readiness(reasons)

    def status(self) -> dict[str, Any]:
        return {
            "connections": [{"id": "user-1", "state": "live", "subscriptions": 4, "feed_age": 1.5}],
            "addresses": [{"address": WHALE, "tier": "precise", "watermark": {"time": 1, "tid": 7}}],
            "budgets": {"users": {"used": 1, "capacity": 10}},
            "outbox_depth": 0,
            "notional": Decimal("12.3400"),
        }

    def health_summary(self) -> dict[str, Any]:
        return {"uptime": 12.5, "addresses": {"count": 1}}

    async def address_detail(self, address: str) -> dict[str, Any] | None:
        return None


class EmptyView:
    """Always ready, nothing to report: for tests of routes served by other views (positions, discovery)."""

    def readiness(self) -> Readiness:
        return Readiness()

    def status(self) -> dict[str, Any]:
        return {}

    def health_summary(self) -> dict[str, Any]:
        return {}

    async def address_detail(self, address: str) -> dict[str, Any] | None:
        return None


class MemoryAdmin:
    """An address book in a dict, with a switch that makes it behave like a database outage."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.db_down = False

    def _check(self) -> None:
        if self.db_down:
            raise StorageError("connection refused")

    async def list(self) -> builtins.list[dict[str, Any]]:
        self._check()
        return [dict(self.rows[a]) for a in sorted(self.rows)]

    async def add(self, entries: Sequence[AddressInput]) -> int:
        self._check()
        for entry in entries:
            row = self.rows.setdefault(
                entry.address, {"address": entry.address, "label": "", "tier": "auto", "priority": 0, "is_active": True}
            )
            for key in ("label", "tier", "priority", "is_active", "min_notional_usd", "allow_symbols", "deny_symbols"):
                if getattr(entry, key) is not None:
                    row[key] = getattr(entry, key)
        return len(entries)

    async def remove(self, addresses: Sequence[str]) -> int:
        self._check()
        return sum(self.rows.pop(a, None) is not None for a in addresses)

    async def update(self, address: str, **changes: Any) -> dict[str, Any] | None:
        self._check()
        row = self.rows.get(address)
        if row is None:
            return None
        row.update({k: v for k, v in changes.items() if v is not None})
        return dict(row)
