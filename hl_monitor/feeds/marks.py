"""Mark prices between state frames: one public `allMids` subscription per perp dex on one connection.

A whale's state frame carries the exchange's own mark (position value ÷ size), but only every few seconds for a
precise address and every `wide.reconcile_interval` for a wide one. Between them the mid price of each coin stands
in for the mark (docs/protocol.md §2), so unrealized PnL and the distance to liquidation stay current to within
one `allMids` push. The channel is public: it takes a subscription, never a user slot.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import HyperliquidConfig
from hl_monitor.feeds.connection import Connection, ConnectionBudget, ConnEvent, Received
from hl_monitor.hyperliquid.protocol import AllMidsFrame, Subscription
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = ["MarkFeed", "MarkIntake"]

log = get_logger(__name__)


class MarkIntake(Protocol):
    """Where mids go (`watch.positions.PositionKeeper`)."""

    async def on_marks(self, mids: Mapping[str, Decimal], now_ms: int) -> None: ...


class MarkBudget(ConnectionBudget, Protocol):
    def try_add_subscriptions(self, n: int = 1) -> bool: ...
    def release_subscriptions(self, n: int = 1, *, after_close: bool = False) -> None: ...


class MarkFeed:
    """Runs the `allMids` connection until cancelled; `status()` for `/status`."""

    def __init__(
        self,
        cfg: HyperliquidConfig,
        *,
        intake: MarkIntake,
        budget: MarkBudget,
        metrics: Metrics,
        dexes: Sequence[str] = ("",),
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _wall_ms,
        rng: random.Random | None = None,
    ) -> None:
        self._intake = intake
        self._budget = budget
        self._metrics = metrics
        self._last_push_ms: int | None = None
        self._pushes = 0
        subscriptions = [Subscription("allMids", dex=dex or None) for dex in dexes]
        self.connection = Connection(
            name="marks",
            kind="marks",
            subscriptions=subscriptions,
            handler=self._handle,
            cfg=cfg,
            budget=budget,
            metrics=metrics,
            canary_channel="allMids",
            clock=clock,
            wall_ms=wall_ms,
            rng=rng,
        )

    def status(self) -> dict[str, Any]:
        return {**self.connection.status(), "pushes": self._pushes, "last_push_ms": self._last_push_ms}

    async def run(self) -> None:
        wanted = len(self.connection.subscriptions)
        if not self._budget.try_add_subscriptions(wanted):
            log.error("no subscription budget left for allMids: marks move only with state frames", wanted=wanted)
            self._metrics.tape_events.labels(kind="marks_refused").inc()
            return
        try:
            await self.connection.run()
        finally:
            self._budget.release_subscriptions(wanted, after_close=True)

    async def _handle(self, event: ConnEvent) -> None:
        match event:
            case Received(frame=AllMidsFrame(data=data)):
                self._pushes += 1
                self._last_push_ms = event.received_ms
                await self._intake.on_marks(data.mids, event.received_ms)
            case _:
                pass  # connection lifecycle: the marks simply resume with the next push
