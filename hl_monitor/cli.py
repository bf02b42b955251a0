"""`hl-monitor` command line. Each area registers its own subcommands (see `_COMMAND_MODULES`)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from hl_monitor import __version__
from hl_monitor.config import Config, load_config, masked
from hl_monitor.errors import ConfigError, HlMonitorError

# Exit codes: 2 = bad configuration or usage (systemd/k8s must not restart-loop on it), 1 = runtime failure.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

Handler = Callable[[argparse.Namespace], int]

# Modules that add subcommands: each has `register(subparsers)`; handlers are set with `set_defaults(handler=...)`.
_COMMAND_MODULES: tuple[str, ...] = (
    "hl_monitor.app",
    "hl_monitor.bench.cli",
    "hl_monitor.chaos.cli",
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
