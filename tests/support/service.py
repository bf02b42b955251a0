"""The whole service in-process for end-to-end tests: its config against a sim, NATS and a database, and waits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from hl_monitor.app import Service
from hl_monitor.config import Config, load_config
from hl_monitor.sim.server import SimServer
from tests.support.net import free_port
from tests.support.waiting import wait_until

W1 = "0x" + "a1" * 20


W2 = "0x" + "b2" * 20


def service_config(sim: SimServer, nats_url: str, db_url: str, data_dir: Path, **extra: str) -> Config:
    env = {
        "HL_MONITOR__HYPERLIQUID__WS_URL": sim.ws_url,
        "HL_MONITOR__HYPERLIQUID__INFO_URL": sim.info_url,
        "HL_MONITOR__HYPERLIQUID__PING_INTERVAL": "1",
        "HL_MONITOR__HYPERLIQUID__ACK_TIMEOUT": "1",
        "HL_MONITOR__HYPERLIQUID__RECONNECT_INITIAL_DELAY": "0.05",
        "HL_MONITOR__HYPERLIQUID__RECONNECT_MAX_DELAY": "0.5",
        "HL_MONITOR__NATS__URL": nats_url,
        "HL_MONITOR__DATABASE__URL": db_url,
        "HL_MONITOR__HTTP__LISTEN": f"127.0.0.1:{free_port()}",
        "HL_MONITOR__SERVICE__DATA_DIR": str(data_dir),
        "HL_MONITOR__SERVICE__SHUTDOWN_TIMEOUT": "10",
        "HL_MONITOR__ADDRESSES__INITIAL": f"{W1},{W2}",
        "HL_MONITOR__WRITER__FLUSH_INTERVAL": "0.05",
        "HL_MONITOR__AGGREGATION__SCAN_INTERVAL": "0.1",
    }
    env.update({f"HL_MONITOR__{k}": v for k, v in extra.items()})
    return load_config(None, environ=env)


@contextlib.asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Service]:
    service = Service(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await wait_until(lambda: service.ready_event.is_set() or task.done(), within=20)
        if task.done():
            task.result()
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def live(service: Service, *addresses: str) -> None:
    def ok() -> bool:
        precise = service.components.precise
        if precise.not_live() or not set(addresses) <= set(precise.assigned()):
            return False
        # Live and its first gap recovery done: a trade from now on arrives on the stream, not in a backfill.
        return all((stream := precise.stream(a)) is not None and stream.recoveries >= 1 for a in addresses)

    await wait_until(ok, within=20)


def precise_signals_built(service: Service) -> int:
    """Signals the service built from its precise streams (user fills), opens and closes."""
    total = 0.0
    for direction in ("open", "close"):
        value = service.metrics.registry.get_sample_value(
            "hl_monitor_signals_built_total", {"source": "user_fills", "direction": direction}
        )
        total += value or 0.0
    return int(total)
