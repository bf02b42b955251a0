"""Composition root: builds every component from the config and runs them under one TaskGroup.

Shutdown order (SIGTERM/SIGINT): stop intake → flush complete aggregations → persist the rest →
drain the writer and the outbox → drain NATS → dispose the engine → stop HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from hl_monitor.config import Config
from hl_monitor.logging import configure_logging, get_logger

log = get_logger(__name__)


async def run_service(cfg: Config, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("service starting", instance_id=cfg.instance_id)
    await stop.wait()
    log.info("service stopped")


def _run(args: argparse.Namespace) -> int:
    from hl_monitor.cli import config_from_args

    cfg = config_from_args(args)
    configure_logging(cfg.log.level, cfg.log.format, cfg.instance_id)
    asyncio.run(run_service(cfg))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hl_monitor.cli import add_config_arg

    run = sub.add_parser("run", help="run the service")
    add_config_arg(run)
    run.set_defaults(handler=_run)
