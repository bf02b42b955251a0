"""`hl-monitor sim`: run the fake Hyperliquid (and optionally a scenario) until Ctrl-C.

With a scenario, its whale addresses are printed on stdout as soon as the server is ready (before the first
trade), with the environment line that points the service at them, so the README's two-terminal walk-through
can be followed while the scenario runs.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from hl_monitor.hyperliquid import constants as hl
from hl_monitor.logging import configure_logging, get_logger

log = get_logger(__name__)

DEFAULT_PORT = 8765  # the Makefile's `make sim` port


def whales_banner(scenario: str, whales: Sequence[str], ws_url: str, info_url: str) -> str:
    """What `sim --scenario` prints at start: the whales, and the variables that point the service at them."""
    lines = [f"scenario {scenario}: {len(whales)} whale{'s' if len(whales) != 1 else ''}", *(f"  {w}" for w in whales)]
    lines += [
        "watch them with:",
        f"  HL_MONITOR__HYPERLIQUID__WS_URL={ws_url} \\",
        f"  HL_MONITOR__HYPERLIQUID__INFO_URL={info_url} \\",
        f"  HL_MONITOR__ADDRESSES__INITIAL={','.join(whales)} make run",
    ]
    return "\n".join(lines)


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None, out: TextIO | None = None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM); the scenario runs alongside and may end first."""
    from hl_monitor.sim.scenarios import run_scenario, scenario_whales
    from hl_monitor.sim.server import SimConfig, SimServer

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    config = SimConfig(
        host=args.host,
        port=args.port,
        seed=args.seed,
        max_users=args.max_users,
        idle_timeout=args.idle_timeout,
        clearinghouse_push_interval=args.push_interval,
        all_mids_interval=args.all_mids_interval,
        send_greeting=args.greeting,
        record_ledger=args.scenario != "load",
    )
    async with SimServer(config) as sim:
        log.info("sim ready", ws_url=sim.ws_url, info_url=sim.info_url, scenario=args.scenario)
        if args.scenario:
            whales = scenario_whales(args.scenario, args.seed, args.whales)
            print(whales_banner(args.scenario, whales, sim.ws_url, sim.info_url), file=out or sys.stdout, flush=True)
        async with asyncio.TaskGroup() as tg:
            if args.scenario:
                scenario = tg.create_task(
                    run_scenario(sim, args.scenario, args.seed, rate=args.rate, whales=args.whales,
                                 step_delay=args.step_delay),
                    name=f"scenario-{args.scenario}",
                )  # fmt: skip
                scenario.add_done_callback(_log_scenario_end)
            await stop.wait()
            if args.scenario:
                scenario.cancel()
    log.info("sim stopped", stats=str(sim.stats))


def _log_scenario_end(task: asyncio.Task[list[str]]) -> None:
    if not task.cancelled() and task.exception() is None:
        log.info("scenario ended; the server keeps running until Ctrl-C", whales=task.result())


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, "console")
    asyncio.run(serve(args))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hl_monitor.sim.scenarios import SCENARIOS
    from hl_monitor.sim.server import DEFAULT_ALL_MIDS_INTERVAL_S, DEFAULT_PUSH_INTERVAL_S

    p = sub.add_parser("sim", help="run the fake Hyperliquid (WebSocket /ws + REST /info on one port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 = a free port")
    p.add_argument("--scenario", choices=SCENARIOS, default=None, help="scripted whale behaviour to run")
    p.add_argument("--seed", type=int, default=0, help="makes the scenario and ids reproducible")
    p.add_argument("--rate", type=float, default=1000.0, help="load scenario: fills per second")
    p.add_argument("--whales", type=int, default=None, help="number of whales (scenario default if omitted)")
    p.add_argument("--step-delay", type=float, default=1.0, help="seconds between scripted steps")
    p.add_argument("--max-users", type=int, default=hl.MAX_USERS, help="distinct-user cap per IP")
    p.add_argument("--idle-timeout", type=float, default=hl.SERVER_IDLE_TIMEOUT_S)
    p.add_argument(
        "--push-interval", type=float, default=DEFAULT_PUSH_INTERVAL_S, help="allDexsClearinghouseState cadence (s)"
    )
    p.add_argument(
        "--all-mids-interval",
        type=float,
        default=DEFAULT_ALL_MIDS_INTERVAL_S,
        help="allMids cadence (s), besides a push on every move",
    )
    p.add_argument("--greeting", action="store_true", help="send 'Websocket connection established.' first")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=_run)
