"""The simulator in its own process for the end-to-end bench, so it does not share a core's event loop with the service.

Protocol: one JSON object per line. The child prints `{"port": N}` once listening, then answers each command
read from stdin:
- `{"cmd": "load", "whales": [...], "orders": N, "fills_per_order": F, "rate": fills_per_s | null, "seed": S}`
  places N market orders round-robin over the whales, paced at `rate` fills/s (null: as fast as the model
  goes) and answers `{"sent": [[oid, sent_at_s, fills], ...], "fills": n, "elapsed_s": s}` once the last order
  is placed. `sent_at_s` is the wall clock when the order's frames were queued for sending.
- `{"cmd": "cascade_setup", "plan": {...}}` opens the wide positions of `scenarios.cascade_plan(**plan)`
  (before the service starts, so its bootstrap reads them) and answers `{"positions": n}`.
- `{"cmd": "cascade", "plan": {...}}` runs that plan's cascade (`scenarios.run_cascade`; a plan without whales
  or wide addresses is a crowd tape alone) and answers the `CascadeRecord` as an object.
- `{"cmd": "quit"}` stops the server and exits.

The optional first argument is a JSON object of `SimConfig` fields over the bench's defaults (the per-IP limits
a bench raises to stand in for several IPs).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Final

import msgspec

from hl_monitor.bench.frames import BENCH_COINS, order_size, px_step
from hl_monitor.sim.exchange import WireFill, WireLiquidationEvent, WireOrderUpdate, WireTrade, WireTwapHistoryEntry
from hl_monitor.sim.scenarios import cascade_plan, cascade_setup, run_cascade
from hl_monitor.sim.server import SimConfig, SimServer

# Orders placed between two yields in unpaced mode: big enough to amortise the yield, small enough that the
# write loops keep the sockets busy while the model produces.
UNPACED_CHUNK: Final = 20
# Frames a connection may queue: the load run must never be cut as a slow consumer.
BENCH_SEND_QUEUE: Final = 10_000_000


class _FillCounter:
    """Passes every event to the server and remembers how many fills the last order produced."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.last = 0

    def on_fills(self, user: str, fills: Sequence[WireFill]) -> None:
        self.last += len(fills)
        self.server.on_fills(user, fills)

    def on_order_updates(self, user: str, updates: Sequence[WireOrderUpdate]) -> None:
        self.server.on_order_updates(user, updates)

    def on_trades(self, coin: str, trades: Sequence[WireTrade]) -> None:
        self.server.on_trades(coin, trades)

    def on_liquidation(self, user: str, event: WireLiquidationEvent) -> None:
        self.server.on_liquidation(user, event)

    def on_twap_history(self, user: str, entries: Sequence[WireTwapHistoryEntry]) -> None:
        self.server.on_twap_history(user, entries)


async def _load(sim: SimServer, cmd: dict[str, Any]) -> dict[str, Any]:
    ex = sim.exchange
    whales: list[str] = cmd["whales"]
    orders: int = cmd["orders"]
    per_order: int = cmd["fills_per_order"]
    rate: float | None = cmd.get("rate")
    rng = random.Random(cmd.get("seed", 1))
    counter = _FillCounter(sim)
    ex.listener = counter
    sent: list[tuple[int, float, int]] = []
    fills = 0
    started = time.perf_counter()
    interval = per_order / rate if rate else 0.0
    for n in range(orders):
        if rate:
            due = started + n * interval
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
        elif n % UNPACED_CHUNK == 0:
            await asyncio.sleep(0)
        coin = rng.choice(BENCH_COINS)
        counter.last = 0
        oid = ex.market_order(
            whales[n % len(whales)],
            coin,
            rng.random() < 0.5,
            order_size(ex, coin, rng),
            ex.mids[coin],
            fills=per_order,
            px_step=px_step(ex.mids[coin]),
        )
        sent.append((oid, time.time(), counter.last))
        fills += counter.last
    ex.listener = sim
    return {"sent": sent, "fills": fills, "elapsed_s": time.perf_counter() - started}


async def _main() -> None:
    # Answers go to a private copy of stdout; fd 1 becomes stderr so no log line can corrupt the protocol.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    loop = asyncio.get_running_loop()
    overrides: dict[str, Any] = msgspec.json.decode(sys.argv[1]) if len(sys.argv) > 1 else {}
    base = {"record_ledger": False, "send_queue_size": BENCH_SEND_QUEUE, "fills_snapshot_size": 100}
    cfg = SimConfig(**(base | overrides))
    async with SimServer(cfg) as sim:
        out.write(msgspec.json.encode({"port": sim.port}).decode() + "\n")
        out.flush()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = msgspec.json.decode(line)
            if cmd.get("cmd") == "quit":
                return
            answer: dict[str, Any] | None = None
            if cmd.get("cmd") == "load":
                answer = await _load(sim, cmd)
            elif cmd.get("cmd") == "cascade_setup":
                plan = cascade_plan(**cmd["plan"])
                cascade_setup(sim.exchange, plan)
                answer = {"positions": len(plan.wide)}
            elif cmd.get("cmd") == "cascade":
                answer = asdict(await run_cascade(sim.exchange, cascade_plan(**cmd["plan"])))
            if answer is not None:
                out.write(msgspec.json.encode(answer).decode() + "\n")
                out.flush()


if __name__ == "__main__":
    asyncio.run(_main())
