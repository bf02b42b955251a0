"""`hl-monitor` command line. Each area registers its own subcommands (see `_COMMAND_MODULES`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from hl_monitor import __version__
from hl_monitor.config import Config, load_config, masked
from hl_monitor.errors import ConfigError, HlMonitorError
from hl_monitor.logging import configure_logging, get_logger

log = get_logger(__name__)

# Exit codes: 2 = bad configuration or usage (systemd/k8s must not restart-loop on it), 1 = runtime failure.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

Handler = Callable[[argparse.Namespace], int]

# Modules that add subcommands: each has `register(subparsers)`; handlers are set with `set_defaults(handler=...)`.
_COMMAND_MODULES: tuple[str, ...] = (
    "hl_monitor.bench.cli",
    "hl_monitor.chaos.cli",
    "hl_monitor.ops.discover",
    "hl_monitor.ops.healthcheck",
    "hl_monitor.storage.cli",
    "hl_monitor.sim.cli",
)


class _Subparsers(Protocol):
    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser: ...


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="config file (default: ./cfg.toml if present)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    path: Path | None = getattr(args, "config", None)
    return load_config(path)


def _check_config(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(json.dumps(masked(cfg), indent=2, sort_keys=False))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hl-monitor",
        description="Hyperliquid whale monitor: fills in, one signal per order out to NATS.",
    )
    parser.add_argument("--version", action="version", version=f"hl-monitor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    check = sub.add_parser("check-config", help="validate the config and print it with secrets masked")
    add_config_arg(check)
    check.set_defaults(handler=_check_config)
    run = sub.add_parser("run", help="run the service")
    add_config_arg(run)
    run.set_defaults(handler=_run)
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"hl-monitor: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except HlMonitorError as exc:
        print(f"hl-monitor: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


async def run_service(cfg: Config, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        log.info("service starting", instance_id=cfg.instance_id, version=__version__)
        from hl_monitor.app import Service  # the whole service: imported only by the command that runs it

        await Service(cfg).run(stop)
        log.info("service stopped")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    configure_logging(cfg.log.level, cfg.log.format, cfg.instance_id)
    asyncio.run(run_service(cfg))
    return 0
