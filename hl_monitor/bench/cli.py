"""`hl-monitor bench`: run the benchmarks and write results.json + results.md."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from hl_monitor.logging import configure_logging

# "e2e" runs the throughput and the latency benches; "latency" the latency bench alone.
BENCH_NAMES = ("decode", "engine", "tape", "memory", "discovery", "e2e", "latency", "curves", "cascade")


def _bench(args: argparse.Namespace) -> int:
    from hl_monitor.bench.runner import DEFAULT_MYSQL_URL, FULL, SMOKE, run_all

    # The service logs at warning here: console/debug logging would be measured along with the pipeline.
    configure_logging("warning", "json")
    only = frozenset(args.only) if args.only else None
    report = asyncio.run(
        run_all(
            args.out,
            SMOKE if args.smoke else FULL,
            mysql_url=args.mysql_url or DEFAULT_MYSQL_URL,
            require_mariadb=args.require_mariadb,
            profile=args.profile,
            only=only,
            progress=lambda name: print(f"bench: {name}", file=sys.stderr, flush=True),
        )
    )
    print(f"bench: wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {report.meta['duration_s']} s")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench", help="run the benchmarks (decode, engine, tape, memory, discovery, end to end, cost curves, cascade)"
    )
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    bench.add_argument("--smoke", action="store_true", help="tiny sizes: checks the bench code in seconds")
    bench.add_argument("--only", nargs="+", choices=BENCH_NAMES, help="run only these benches")
    bench.add_argument("--profile", action="store_true", help="py-spy profile of the first end-to-end run")
    bench.add_argument("--mysql-url", default=None, help="MariaDB admin URL (a database is created and dropped)")
    bench.add_argument("--require-mariadb", action="store_true", help="fail instead of skipping MariaDB cases")
    bench.set_defaults(handler=_bench)
