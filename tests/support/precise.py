"""The precise tier's test plumbing: a mutable address source and a config with short timeouts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hl_monitor.config import HyperliquidConfig
from hl_monitor.domain.address import WatchedAddress
from hl_monitor.feeds.addresses import AddressRow
from hl_monitor.sim.server import SimServer


class MutableSource:
    def __init__(self, *entries: WatchedAddress) -> None:
        self.entries = list(entries)

    async def load(self) -> Sequence[AddressRow]:
        return list(self.entries)


def fast_cfg(sim: SimServer, **overrides: Any) -> HyperliquidConfig:
    values: dict[str, Any] = {
        "ws_url": sim.ws_url,
        "info_url": sim.info_url,
        "ping_interval": 0.5,
        "pong_timeout": 1.0,
        "ack_timeout": 0.5,
        "stale_after": 5.0,
        "reconnect_initial_delay": 0.05,
        "reconnect_max_delay": 0.2,
        "over_budget_retry": 0.3,
        "request_timeout": 2.0,
    }
    values.update(overrides)
    return HyperliquidConfig(**values)
