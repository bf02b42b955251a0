"""The web console at `/ui/` (README "Console"): static pages, their JSON and the live SSE feed.

The pages are one HTML shell and one vanilla script served from `static/` (no build step, no CDN, no external
fonts). Every response under `/ui/` carries a strict Content-Security-Policy: scripts and styles only from this
origin, nothing inline. The pages read the same JSON as everyone else (`/status`, `/addresses/{a}`,
`/positions…`, `/discovery`) plus `/ui/api/whales` (one row per watched address, composed here) and
`/addresses/{a}/history` (stored position events and account-value samples); administration goes through the
admin API with a bearer header the operator types in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Any, Final

import msgspec
import orjson
from aiohttp import web

from hl_monitor.config import UiConfig
from hl_monitor.domain.address import parse_address
from hl_monitor.domain.signal import Signal
from hl_monitor.logging import get_logger
from hl_monitor.ops.console.feed import CLOSE, FeedEvent, LiveFeed
from hl_monitor.tracking.portfolio import AddressPortfolio
from hl_monitor.tracking.position_events import PositionEvent

__all__ = ["ConsoleDeps", "add_console", "notify_admin_changes"]

log = get_logger(__name__)

# Scripts, styles and fetches from this origin only; nothing inline, no plugins, frames, forms or fonts.
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The only files served from `static/` (anything else is 404, so no path ever reaches the file system).
STATIC_FILES: Final = {
    "console.js": "text/javascript",
    "chart.js": "text/javascript",
    "console.css": "text/css",
}
SSE_KEEPALIVE_S: Final = 15.0  # a comment line this often keeps proxies from closing an idle stream
SSE_RETRY_MS: Final = 1000  # the browser reconnects this soon after a drop (EventSource `retry:`)
HISTORY_EVENTS: Final = 500  # position events read for one address chart; older ones fall off its left edge
RECENT_SIGNALS: Final = 1000  # stored signals read once to know each address's last signal after a restart
# Stored account-value samples read for one address chart: a day at the keeper's fastest rate (one a minute,
# `watch.positions.ACCOUNT_VALUE_SAMPLE_S`); a whale whose value moves less often shows a longer span.
ACCOUNT_VALUE_POINTS: Final = 1440


@dataclass(frozen=True, slots=True)
class ConsoleDeps:
    """What the console reads besides the ops views: stored history and stored signals (None: not available)."""

    feed: LiveFeed
    history: Callable[[str, int], Awaitable[list[PositionEvent]]] | None = None
    account_values: Callable[[str, int], Awaitable[list[tuple[int, Decimal]]]] | None = None
    recent_signals: Callable[[int], Awaitable[list[Signal]]] | None = None
    fills_enabled: bool = False


def _secure(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _json(data: Any) -> web.StreamResponse:
    body = orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS)
    return _secure(web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"}))


@dataclass(slots=True)
class _State:
    seeded: bool = False


class _Console:
    def __init__(
        self,
        deps: ConsoleDeps,
        cfg: UiConfig,
        admin_available: bool,
        status: Callable[[], Mapping[str, Any]],
        portfolios: Callable[[], Iterable[AddressPortfolio]] | None,
        portfolio: Callable[[str], AddressPortfolio | None] | None,
    ) -> None:
        self.deps = deps
        self.cfg = cfg
        self.admin = admin_available and not cfg.read_only
        self._status = status
        self._portfolios = portfolios
        self._portfolio = portfolio
        self._state = _State()
        self._files = resources.files("hl_monitor.ops.console") / "static"

    # ------------------------------------------------------------ pages and files

    async def index(self, request: web.Request) -> web.StreamResponse:
        html = (self._files / "index.html").read_bytes()
        return _secure(web.Response(body=html, content_type="text/html", headers={"Cache-Control": "no-store"}))

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        kind = STATIC_FILES.get(name)
        if kind is None:
            raise web.HTTPNotFound()
        body = (self._files / name).read_bytes()
        return _secure(web.Response(body=body, content_type=kind, headers={"Cache-Control": "no-cache"}))

    async def config(self, request: web.Request) -> web.StreamResponse:
        return _json({"admin": self.admin, "read_only": not self.admin, "fills": self.deps.fills_enabled})

    # ------------------------------------------------------------ data

    async def _seed(self) -> None:
        """Each address's last stored signal, read once (signals after start arrive through `on_signal`)."""
        if self._state.seeded or self.deps.recent_signals is None:
            return
        self._state.seeded = True
        try:
            stored = await self.deps.recent_signals(RECENT_SIGNALS)
        except Exception:
            log.warning("console could not read stored signals", exc_info=True)
            return
        self.deps.feed.seed_last_signals(stored)

    async def whales(self, request: web.Request) -> web.StreamResponse:
        await self._seed()
        status = self._status()
        docs = {d.address: d for d in self._portfolios()} if self._portfolios is not None else {}
        rows = [
            _whale_row(a, docs.get(a["address"]), self.deps.feed.last_signal(a["address"]))
            for a in status.get("addresses", [])
        ]
        return _json({"whales": rows, "now": int(time.time() * 1000)})

    async def history(self, request: web.Request) -> web.StreamResponse:
        try:
            address = parse_address(request.match_info["address"])
        except ValueError as exc:
            raise web.HTTPBadRequest(reason=f"address: {exc}") from None
        events = await self.deps.history(address, HISTORY_EVENTS) if self.deps.history is not None else []
        sizes: dict[str, list[tuple[int, str]]] = {}
        for event in sorted(events, key=lambda e: e.time):
            series = sizes.setdefault(event.symbol or event.coin, [])
            if not series:
                series.append((event.time, str(event.size_before)))
            series.append((event.time, str(event.size_after)))
        stored = []
        if self.deps.account_values is not None:
            stored = await self.deps.account_values(address, ACCOUNT_VALUE_POINTS)
        samples = [(at, str(value)) for at, value in stored]
        # The line runs on to the value now (the store samples only when it moved, at most once a minute).
        doc = self._portfolio(address) if self._portfolio is not None else None
        if doc is not None and doc.account_value is not None:
            samples.append((int(time.time() * 1000), str(doc.account_value)))
        return _json({"address": address, "sizes": sizes, "account_value": samples})

    # ------------------------------------------------------------ live feed

    async def events(self, request: web.Request) -> web.StreamResponse:
        feed = self.deps.feed
        last_seen = _last_event_id(request)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        _secure(response)
        await response.prepare(request)
        queue = feed.subscribe()  # before the replay: nothing published in between is missed
        try:
            await response.write(f"retry: {SSE_RETRY_MS}\n\n".encode())
            for event in feed.since(last_seen):
                await response.write(_sse(event))
                last_seen = event.seq
            while True:
                try:
                    async with asyncio.timeout(SSE_KEEPALIVE_S):
                        event = await queue.get()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event.kind == CLOSE:
                    break
                if event.seq <= last_seen:  # already sent by the replay
                    continue
                await response.write(_sse(event))
                last_seen = event.seq
        except ConnectionResetError:
            pass  # the browser went away; it resumes from its Last-Event-ID when it comes back
        finally:
            feed.unsubscribe(queue)
        return response


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or ""
    return int(raw) if raw.isdigit() and len(raw) <= len(str(2**63)) else 0


def _sse(event: FeedEvent) -> bytes:
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {event.data}\n\n".encode()


def _whale_row(
    address: Mapping[str, Any], doc: AddressPortfolio | None, last_signal: Mapping[str, Any] | None
) -> dict[str, Any]:
    positions = [p for dex in doc.dexes.values() for p in dex.positions.values()] if doc is not None else []
    net = sum((p.position_value_usd * (1 if p.size > 0 else -1) for p in positions if p.position_value_usd), Decimal(0))
    biggest = max(positions, key=lambda p: p.position_value_usd or Decimal(0), default=None)
    return {
        "address": address["address"],
        "label": address.get("label") or "",
        "tier": address.get("tier"),
        "state": address.get("state"),
        "connection": address.get("connection"),
        "watermark": address.get("watermark"),
        "account_value": str(doc.account_value) if doc is not None and doc.account_value is not None else None,
        "net_exposure": str(net) if positions else None,
        "symbols": sorted({p.symbol or p.coin for p in positions}),
        "biggest": None if biggest is None else msgspec.to_builtins(biggest),
        "last_signal": dict(last_signal) if last_signal is not None else None,
    }


def add_console(
    app: web.Application,
    deps: ConsoleDeps,
    cfg: UiConfig,
    *,
    admin_available: bool,
    status: Callable[[], Mapping[str, Any]],
    portfolios: Callable[[], Iterable[AddressPortfolio]] | None = None,
    portfolio: Callable[[str], AddressPortfolio | None] | None = None,
) -> None:
    """Mount the console on `app` (acknowledged signals reach it through `deps.feed.signal`)."""
    console = _Console(deps, cfg, admin_available, status, portfolios, portfolio)
    app.router.add_get("/ui", console.redirect)
    app.router.add_get("/ui/", console.index)
    app.router.add_get("/ui/static/{name}", console.static)
    app.router.add_get("/ui/config.json", console.config)
    app.router.add_get("/ui/api/whales", console.whales)
    app.router.add_get("/ui/events", console.events)
    app.router.add_get("/addresses/{address}/history", console.history)

    async def stop(_: web.Application) -> None:
        deps.feed.close()  # open streams end now instead of holding the server's shutdown

    app.on_shutdown.append(stop)


def notify_admin_changes(feed: LiveFeed, addresses: Sequence[str], action: str) -> None:
    """Tell every open console that the address book changed (the pages reload their tables)."""
    feed.publish("addresses", {"action": action, "addresses": list(addresses)})
