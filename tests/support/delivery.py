"""Builders for the delivery tests: a realistic signal, a fast NATS config, and freezing a process."""

from __future__ import annotations

import os
import signal as os_signal
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from hl_monitor.config import NatsConfig
from hl_monitor.domain.signal import Signal

ADDRESS: Final = "0x" + "ab" * 20
# A SIGSTOP is delivered asynchronously; a process not stopped after this long never will be.
FREEZE_TIMEOUT_S: Final = 5


def make_signal(i: int = 0, *, address: str = ADDRESS, symbol: str = "BTCUSDC", **changes: Any) -> Signal:
    """A realistic close signal whose decimals would not survive a float round trip."""
    signal = Signal(
        address=address,
        asset_type="futures",
        symbol=symbol,
        coin_type="A",
        direction="close",
        side="SHORT",
        position_rate=Decimal("12.345678901234567890"),
        close_rate=Decimal("0.5"),
        size=Decimal("1.000000000000000001") + i,
        price=Decimal("65000.123456789012345"),
        timestamp=1_717_000_000_000 + i,
        signal_id=f"{address}:{535618784464 + i}:CS",
        coin="BTC",
        dir="Close Short",
        oid=535618784464 + i,
        status="filled",
        trigger="status",
        fill_count=3,
        first_fill_time=1_717_000_000_000 + i,
        last_fill_time=1_717_000_000_500 + i,
        notional_usd=Decimal("65000.1234567890123450001"),
        position_before=Decimal("-2.5"),
        position_after=Decimal("-1.25"),
        detected_at=int(time.time() * 1000),
    )
    return msgspec.structs.replace(signal, **changes) if changes else signal


def nats_cfg(**changes: Any) -> NatsConfig:
    """Config tuned for fast tests: quick reconnects, short timeouts and scans."""
    values: dict[str, Any] = {
        "reconnect_wait": 0.05,
        "publish_timeout": 1.0,
        "outbox_scan_interval": 0.1,
        "retry_initial_delay": 0.02,
        "retry_max_delay": 0.2,
    }
    values.update(changes)
    return NatsConfig(**values)


def freeze(pid: int) -> None:
    """SIGSTOP a process and wait until it is really stopped (signal delivery is asynchronous)."""
    os.kill(pid, os_signal.SIGSTOP)
    deadline = time.monotonic() + FREEZE_TIMEOUT_S
    while Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "T":
        assert time.monotonic() < deadline, "process did not stop"
        time.sleep(0.001)


@dataclass
class RelayCounters:
    """A relay's instruments on a registry of their own, with the faults it reported."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    faults: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._depth = Gauge("depth", "held", registry=self.registry)
        self._spilled = Counter("spilled", "spilled", registry=self.registry)

    @property
    def depth(self) -> Gauge:
        return self._depth

    @property
    def spilled(self) -> Counter:
        return self._spilled

    def fault(self, kind: str) -> None:
        self.faults.append(kind)

    def replayed(self, reason: str, count: int) -> None:
        return None
