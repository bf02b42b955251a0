"""`hl-monitor healthcheck`: exit 0/1 from the running service's endpoints, for Docker, cron and systemd."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Final

from hl_monitor.config import parse_listen

# Docker's default healthcheck timeout is 30 s; answer well within it even when the service hangs.
DEFAULT_TIMEOUT_S: Final = 5.0


def default_url(listen: str, ready: bool) -> str:
    host, port = parse_listen(listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health/{'ready' if ready else 'live'}"


def check(url: str, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, one-line reason)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200, f"{resp.status} from {url}"
    except urllib.error.HTTPError as exc:
        body = exc.read(2048).decode("utf-8", "replace")
        reason = body
        try:
            parsed = json.loads(body)
            reason = json.dumps(parsed.get("reasons", parsed), separators=(",", ":"))
        except (ValueError, AttributeError):
            pass
        return False, f"{exc.code} from {url}: {reason.strip()[:300]}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return False, f"unreachable {url}: {cause}"


def _healthcheck(args: argparse.Namespace) -> int:
    from hl_monitor.cli import config_from_args

    url = args.url
    if url is None:
        url = default_url(config_from_args(args).http.listen, args.ready)
    ok, reason = check(url, args.timeout)
    print(("ok: " if ok else "unhealthy: ") + reason)
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hl_monitor.cli import add_config_arg

    parser = sub.add_parser(
        "healthcheck", help="exit 0 when the running service is live (or ready with --ready), else 1"
    )
    add_config_arg(parser)
    parser.add_argument("--url", default=None, help="endpoint to check (default: from [http] listen)")
    parser.add_argument("--ready", action="store_true", help="check /health/ready instead of /health/live")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds (default 5)")
    parser.set_defaults(handler=_healthcheck)
