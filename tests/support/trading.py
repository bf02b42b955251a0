"""Whales of the simulator trading in turn until stopped, for the cluster scenarios that kill nodes meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from hl_monitor.sim.server import SimServer

# Each whale alternates coins, and opens then closes: every order makes a signal, two fills each.
COINS = (("BTC", "80000"), ("ETH", "2400"))


@dataclass
class TakingTurns:
    """Every whale trades in turn, one market order each `pause_s`, until `stop`."""

    sim: SimServer
    whales: Sequence[str]
    pause_s: float
    orders: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def _run(self) -> None:
        n = len(self.whales)
        step = 0
        while True:
            whale = self.sim.exchange.whale(self.whales[step % n])
            coin, px = COINS[(step // n) % len(COINS)]
            buy = (step // (len(COINS) * n)) % 2 == 0
            await whale.market_order(coin, buy, "1", px, fills=2, px_step="1")
            self.orders += 1
            step += 1
            await asyncio.sleep(self.pause_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="whales-trading")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
