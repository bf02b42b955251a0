"""Command line of the chaos suite and the Markdown results table it writes.

    python -m hl_monitor.chaos                        # every scenario, full length, MariaDB
    python -m hl_monitor.chaos --quick --db sqlite    # the CI lengths (db_outage then needs --db mariadb)
    python -m hl_monitor.chaos -s kill9 -s nats_restart --out results.md
    python -m hl_monitor.chaos -s soak --soak-duration 3600      # the hour-long soak (`make soak`)

Exit code 0 when every scenario passed, 1 otherwise. Scenario names: see `SCENARIOS`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import platform
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from hl_monitor.chaos.env import DEFAULT_MYSQL_URL, ChaosOptions
from hl_monitor.chaos.scenarios import SCENARIOS, ScenarioResult, run_scenario

__all__ = ["main", "results_table", "run_all"]

DEFAULT_OUT: Final = Path("chaos-results.md")
QUICK_DB_OUTAGE_S: Final = 8.0  # CI: long enough for the 5 s database probe to report it


def results_table(results: Sequence[ScenarioResult], opts: ChaosOptions) -> str:
    """The README's Reliability table: one row per scenario with what was injected and what came out."""
    mode = "quick (CI lengths)" if opts.quick else "full"
    head = [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {mode}, database {opts.db}, seed {opts.seed}, "
        f"Python {platform.python_version()} on {platform.machine()}.",
        "",
        "| scenario | result | expected signals | in stream | in table | fault reported by | what was done | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for r in results:
        v = r.verdict
        reported = "; ".join(f"{c.what}: {c.detail}" if c.detail else c.what for c in r.checks if c.ok) or "-"
        failed = [p.splitlines()[0] for p in r.problems()]
        result = "pass" if r.passed else "FAIL: " + "; ".join(failed)[:300]
        rows.append(
            f"| {r.title} | {_cell(result)} | {v.expected if v else '-'} | {v.in_stream if v else '-'} | "
            f"{v.in_table if v else '-'} | {_cell(reported)} | {_cell('; '.join(r.notes))} | {r.seconds:.0f} s |"
        )
    return "\n".join(head + rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


async def run_all(names: Sequence[str], opts: ChaosOptions, workdir: Path) -> list[ScenarioResult]:
    results = []
    for name in names:
        result = await run_scenario(name, opts, workdir)
        status = "pass" if result.passed else "FAIL"
        print(f"{status:4} {name:16} {result.seconds:6.1f} s", flush=True)
        for problem in result.problems():
            print(f"     {problem}", flush=True)
        results.append(result)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hl-monitor chaos", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return parser


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chaos = sub.add_parser("chaos", help="fault scenarios against the real service, NATS and database")
    _add_arguments(chaos)
    chaos.set_defaults(handler=_run)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-s", "--scenario", action="append", choices=sorted(SCENARIOS), help="run only these (repeatable)"
    )
    parser.add_argument("--db", choices=("mariadb", "sqlite"), default="mariadb")
    parser.add_argument("--mysql-url", default=DEFAULT_MYSQL_URL, help="server on which a fresh database is made")
    parser.add_argument("--quick", action="store_true", help=f"CI lengths (database outage {QUICK_DB_OUTAGE_S:g} s)")
    parser.add_argument("--kill-points", type=int, default=20, help="kill -9 points (default 20)")
    parser.add_argument("--db-outage", type=float, default=None, help="seconds the database is down (default 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--soak-duration", type=float, default=None, help="seconds of soak load (default 180, --quick 50)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown results table")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and stores here (default: temp)")


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    outage = args.db_outage if args.db_outage is not None else (QUICK_DB_OUTAGE_S if args.quick else 60.0)
    opts = ChaosOptions(
        db=args.db,
        mysql_url=args.mysql_url,
        quick=args.quick,
        kill_points=args.kill_points,
        db_outage_s=outage,
        seed=args.seed,
        soak_s=args.soak_duration,
    )
    names = args.scenario or list(SCENARIOS)
    if args.db != "mariadb":
        names = [n for n in names if not SCENARIOS[n].needs_mariadb or args.scenario]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hl-chaos-"))
    results = asyncio.run(run_all(names, opts, workdir))
    args.out.write_text(results_table(results, opts), encoding="utf-8")
    passed = all(r.passed for r in results)
    if passed and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)  # logs are kept only when something failed
        workdir = Path("(removed)")
    print(f"results: {args.out}  logs: {workdir}", file=sys.stderr)
    return 0 if passed else 1
