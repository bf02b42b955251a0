"""`hl-monitor discover`: the running service's discovery candidates (`GET /discovery`), as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Final

from hl_monitor.ops.healthcheck import DEFAULT_TIMEOUT_S, default_url

# The service's 400 is a usage error (a window it does not keep, an unknown label): exit like bad arguments.
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 1
# The evidence reasons column is cut to this width so one candidate stays on one line.
REASON_WIDTH: Final = 60


def discovery_url(base: str, window: str | None, label: str | None, limit: int | None) -> str:
    """`{base}/discovery` with the given filters; `base` is the service's URL, e.g. http://127.0.0.1:8080."""
    query = {k: str(v) for k, v in (("window", window), ("label", label), ("limit", limit)) if v is not None}
    return f"{base.rstrip('/')}/discovery" + (f"?{urllib.parse.urlencode(query)}" if query else "")


def fetch(url: str, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """(HTTP status, decoded body); an unreachable service raises `OSError`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read(4096).decode("utf-8", "replace")
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, {"error": body.strip()[:300]}


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def table(body: dict[str, Any]) -> str:
    lines = [f"window {body['window']}, {body['count']} candidates"]
    lines.append(f"{'address':<42}  {'label':<12}  {'notional $':>15}  {'account $':>13}  {'watched':<7}  evidence")
    for row in body["candidates"]:
        reasons = "; ".join(row["evidence"]["reasons"])[:REASON_WIDTH]
        lines.append(
            f"{row['address']:<42}  {row['label']:<12}  {_usd(row['notional_usd']):>15}  "
            f"{_usd(row['account_value_usd']):>13}  {'yes' if row['watched'] else 'no':<7}  {reasons}"
        )
    return "\n".join(lines)


def _discover(args: argparse.Namespace) -> int:
    from hl_monitor.cli import config_from_args

    base = args.url or default_url(config_from_args(args).http.listen, ready=False).removesuffix("/health/live")
    url = discovery_url(base, args.window, args.label, args.limit)
    try:
        status, body = fetch(url, args.timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"hl-monitor: unreachable {url}: {cause}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if status != 200:
        print(f"hl-monitor: {status} from {url}: {body.get('error', body)}", file=sys.stderr)
        return EXIT_USAGE if status == 400 else EXIT_UNREACHABLE
    print(json.dumps(body, indent=2) if args.json else table(body))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hl_monitor.cli import add_config_arg

    parser = sub.add_parser("discover", help="whale candidates found on the tape by the running service")
    add_config_arg(parser)
    parser.add_argument("--url", default=None, help="the service's base URL (default: from [http] listen)")
    parser.add_argument("--window", default=None, help="a configured window, e.g. 1h or 24h (default: the longest)")
    parser.add_argument(
        "--label", default=None, help="market_maker, directional, wash_suspect, engine or mixed (default: all)"
    )
    parser.add_argument("--limit", type=int, default=None, help="candidates at most (default 50)")
    parser.add_argument("--json", action="store_true", help="print the service's JSON answer")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds (default 5)")
    parser.set_defaults(handler=_discover)
