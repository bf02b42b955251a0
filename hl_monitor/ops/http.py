"""The operations surface: health, readiness, status, address details, Prometheus metrics and the admin API.

One aiohttp application. Health and status read a `ServiceView` (the composition root implements it
over the live components); the admin routes call an `AddressAdmin` and exist only when an admin token
is configured; the `/positions` routes read a `PositionsView` (`ops.positions`) and exist only when one is
given. Every error answer is JSON `{"error": "..."}`; health endpoints never answer 500.
"""

from __future__ import annotations

import builtins
import contextlib
import hmac
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Final, Protocol, TypeVar, cast

import msgspec
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.aiohttp import make_aiohttp_handler

from hl_monitor.config import HttpConfig, UiConfig, parse_listen
from hl_monitor.domain.address import Tier, parse_address, parse_min_notional, parse_symbol_list
from hl_monitor.errors import ConfigError, StorageError
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.ops.console import ConsoleDeps, LiveFeed, add_console, notify_admin_changes
from hl_monitor.ops.positions import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    SORT_KEYS,
    PositionsView,
    SideFilter,
    SortKey,
    document_json,
    position_row,
    select_positions,
    summary,
)
from hl_monitor.tracking.discovery import LABELS, Label
from hl_monitor.watch.autowatch import is_auto_label

__all__ = [
    "AddressAdmin",
    "AddressInput",
    "AuthFailureLimiter",
    "HttpServer",
    "Readiness",
    "ServiceView",
    "create_app",
    "register_runtime_collectors",
]

log = get_logger(__name__)

LABEL_MAX_CHARS: Final = 64  # width of the label column
# Control characters in a label would forge log lines and break terminal output.
LABEL_FORBIDDEN_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
PRIORITY_MIN: Final = 0
PRIORITY_MAX: Final = 1_000_000  # fits a signed INT column with room; the planner only compares them
MAX_ENTRIES_PER_REQUEST: Final = 10_000  # one bulk import; larger lists go in several requests
AUTH_WINDOW_S: Final = 60.0  # failed logins are counted over a sliding minute
# Clients whose failures are remembered; beyond this the oldest entry is forgotten (and counted), so a
# flood from many addresses costs bounded memory.
AUTH_MAX_TRACKED_CLIENTS: Final = 4096
AUDIT_MAX_LISTED: Final = 100  # addresses named in one audit line; the count is always exact
DISCOVERY_DEFAULT_LIMIT: Final = 50  # a screenful of candidates; `limit` asks for more
DISCOVERY_MAX_LIMIT: Final = 1_000  # one answer stays small; the ranking beyond this is noise for an operator
DISCOVERED_LABEL_PREFIX: Final = "discovered:"  # watched from discovery: listed and removed in bulk by this
# Health probes and admin calls are short; a stuck keep-alive client must not hold shutdown for long.
SHUTDOWN_TIMEOUT_S: Final = 5.0
BEARER_REALM: Final = 'Bearer realm="hl-monitor"'
# Longer than any wire coin (`dex:NAME`) or symbol the exchange lists; bounds what a filter echoes back.
SYMBOL_MAX_CHARS: Final = 64
_LIMIT_RE: Final = re.compile(r"[0-9]{1,7}")  # digits only: int() would also take "+5", " 5" and "1_0"
_SIDES: Final[tuple[SideFilter, ...]] = ("long", "short")


# ---------------------------------------------------------------- the contracts the service implements


@dataclass(frozen=True, slots=True)
class Readiness:
    """Why the service is not ready, one entry per failed check (e.g. `{"nats": "disconnected"}`)."""

    reasons: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.reasons


class ServiceView(Protocol):
    """Read-only view of the running service; every method is cheap and called on the event loop."""

    def readiness(self) -> Readiness:
        """Ready only when NATS and the database are reachable and no assigned feed is stale."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON-able: connections, watched addresses, budgets, outbox depth."""
        ...

    def health_summary(self) -> dict[str, Any]:
        """JSON-able short summary merged into `/health` (uptime, counts, component states)."""
        ...

    async def address_detail(self, address: str) -> dict[str, Any] | None:
        """One watched address (normalised lowercase) as JSON-able data: tier, connection, positions and
        balances as last seen, pending orders, watermark, last signals. None when it is not watched (404)."""
        ...


class AddressInput(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One address to add or update. `None` means "default for a new address, unchanged for a known one".

    Filters (README "Filters"): `min_notional_usd` a dollar amount ≥ 0 (number or text), `allow_symbols` and
    `deny_symbols` lists of symbols or coins (an empty list removes the list). Validated by `_validated_entries`.
    """

    address: str
    label: str | None = None
    tier: Tier | None = None
    priority: Annotated[int, msgspec.Meta(ge=PRIORITY_MIN, le=PRIORITY_MAX)] | None = None
    is_active: bool | None = None
    min_notional_usd: Decimal | None = None
    allow_symbols: tuple[str, ...] | None = None
    deny_symbols: tuple[str, ...] | None = None


class AddressAdmin(Protocol):
    """Address book changes behind `/admin/addresses`; changes must take effect within a second."""

    async def list(self) -> builtins.list[dict[str, Any]]:
        """Every watched address as JSON-able rows."""
        ...

    async def add(self, entries: Sequence[AddressInput]) -> int:
        """Insert or update (addresses are normalised and unique); return how many were written."""
        ...

    async def remove(self, addresses: Sequence[str]) -> int:
        """Stop watching these addresses; return how many were watched."""
        ...

    async def update(
        self,
        address: str,
        *,
        label: str | None = None,
        tier: Tier | None = None,
        priority: int | None = None,
        is_active: bool | None = None,
        min_notional_usd: Decimal | None = None,
        allow_symbols: Sequence[str] | None = None,
        deny_symbols: Sequence[str] | None = None,
    ) -> dict[str, Any] | None:
        """Change the given fields (None = unchanged); the updated row, or None when not watched."""
        ...


class DiscoveryView(Protocol):
    """What `/discovery` reads (`watch.discovery.DiscoveryKeeper`)."""

    def window_names(self) -> builtins.list[str]: ...
    def window_ms(self, name: str) -> int | None: ...
    def rows(
        self, window_ms: int, *, label: Label | None = None, limit: int | None = None
    ) -> builtins.list[dict[str, Any]]: ...
    def label_of(self, address: str) -> Label | None: ...


# ---------------------------------------------------------------- request bodies


class _Patch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    label: str | None = None
    tier: Tier | None = None
    priority: Annotated[int, msgspec.Meta(ge=PRIORITY_MIN, le=PRIORITY_MAX)] | None = None
    is_active: bool | None = None
    min_notional_usd: Decimal | None = None
    allow_symbols: tuple[str, ...] | None = None
    deny_symbols: tuple[str, ...] | None = None


class _BulkRemove(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    addresses: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_ENTRIES_PER_REQUEST)]


_AddBody = AddressInput | Annotated[list[AddressInput], msgspec.Meta(min_length=1, max_length=MAX_ENTRIES_PER_REQUEST)]


class _ApiError(Exception):
    """An error answer: status, message and extra headers (WWW-Authenticate, Retry-After)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def _check_label(label: str | None, where: str) -> None:
    if label is None:
        return
    if len(label) > LABEL_MAX_CHARS:
        raise _ApiError(400, f"{where}.label: longer than {LABEL_MAX_CHARS} characters")
    if LABEL_FORBIDDEN_RE.search(label):
        raise _ApiError(400, f"{where}.label: control characters are not allowed")


_PatchOrInput = TypeVar("_PatchOrInput", AddressInput, _Patch)


def _checked_filters(entry: _PatchOrInput, where: str) -> _PatchOrInput:
    """The entry with its filter fields validated and normalised (`400` naming the field otherwise)."""
    changes: dict[str, Any] = {}
    if entry.min_notional_usd is not None:
        try:
            changes["min_notional_usd"] = parse_min_notional(entry.min_notional_usd)
        except ValueError as exc:
            raise _ApiError(400, f"{where}.min_notional_usd: {exc}") from None
    for name in ("allow_symbols", "deny_symbols"):
        if (symbols := getattr(entry, name)) is not None:
            try:
                changes[name] = parse_symbol_list(symbols)
            except ValueError as exc:
                raise _ApiError(400, f"{where}.{name}: {exc}") from None
    return msgspec.structs.replace(entry, **changes) if changes else entry


def _validated_entries(entries: Sequence[AddressInput], single: bool) -> list[AddressInput]:
    seen: set[str] = set()
    out: list[AddressInput] = []
    for i, entry in enumerate(entries):
        where = "$" if single else f"$[{i}]"
        try:
            address = parse_address(entry.address)
        except ValueError as exc:
            raise _ApiError(400, f"{where}.address: {exc}") from None
        _check_label(entry.label, where)
        entry = _checked_filters(entry, where)
        if address in seen:
            raise _ApiError(400, f"{where}.address: {address} appears more than once in this request")
        seen.add(address)
        out.append(msgspec.structs.replace(entry, address=address))
    return out


def _path_address(request: web.Request) -> str:
    try:
        return parse_address(request.match_info["address"])
    except ValueError as exc:
        raise _ApiError(400, f"address: {exc}") from None


def _dumps(obj: Any) -> str:
    # default=str covers Decimal (exact text) and any other value a view hands over.
    return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


# ---------------------------------------------------------------- failed-login limiter


class AuthFailureLimiter:
    """Counts failed admin logins per client over a sliding window; memory is bounded."""

    def __init__(
        self,
        limit: int,
        window: float = AUTH_WINDOW_S,
        max_clients: int = AUTH_MAX_TRACKED_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[], None] | None = None,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._clock = clock
        self._on_evict = on_evict
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, client: str) -> float | None:
        """Seconds until `client` may try again, or None when it is not blocked."""
        stamps = self._failures.get(client)
        if stamps is None or len(stamps) < self.limit:
            return None
        wait = self.window - (self._clock() - stamps[0])
        if wait <= 0:
            return None
        return wait

    def record_failure(self, client: str) -> None:
        stamps = self._failures.get(client)
        if stamps is None:
            while len(self._failures) >= self.max_clients:
                self._failures.popitem(last=False)
                if self._on_evict is not None:
                    self._on_evict()
            # Only the newest `limit` stamps matter: the oldest of them decides when the block ends.
            stamps = self._failures[client] = deque(maxlen=self.limit)
        else:
            self._failures.move_to_end(client)
        stamps.append(self._clock())


# ---------------------------------------------------------------- the application


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except _ApiError as exc:
        return _json({"error": exc.message}, status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return _json({"error": exc.reason}, status=exc.status, headers=headers)
    except Exception:
        log.exception("http handler failed", path=request.path, method=request.method)
        return _json({"error": "internal error"}, status=500)


class _Ops:
    """Health, readiness, status and metrics handlers."""

    def __init__(self, view: ServiceView, metrics: Metrics) -> None:
        self.view = view
        self.metrics = metrics
        self._prometheus = make_aiohttp_handler(metrics.registry)

    def readiness(self) -> Readiness:
        """The view's readiness, mirrored into the `ready` gauge; a failing check counts as not ready."""
        try:
            ready = self.view.readiness()
        except Exception as exc:
            log.exception("readiness check failed")
            ready = Readiness({"service": f"readiness check failed: {type(exc).__name__}"})
        self.metrics.ready.set(1 if ready.ok else 0)
        return ready

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.readiness()
        return _json({"ready": ready.ok, "reasons": dict(ready.reasons)}, status=200 if ready.ok else 503)

    async def health(self, request: web.Request) -> web.Response:
        ready = self.readiness()
        try:
            summary = self.view.health_summary()
        except Exception as exc:
            log.exception("health summary failed")
            summary = {"summary_error": type(exc).__name__}
        body = {
            **summary,
            "status": "ok" if ready.ok else "unavailable",
            "ready": ready.ok,
            "reasons": dict(ready.reasons),
        }
        return _json(body, status=200 if ready.ok else 503)

    async def status(self, request: web.Request) -> web.Response:
        return _json(self.view.status())

    async def address(self, request: web.Request) -> web.Response:
        address = _path_address(request)
        detail = await self.view.address_detail(address)
        if detail is None:
            raise _ApiError(404, f"{address} is not watched")
        return _json(detail)

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        self.readiness()  # keep `hl_monitor_ready` true at scrape time even when nobody probes /health/ready
        return await self._prometheus(request)


class _Admin:
    """`/admin/addresses`: bearer-token auth, failed-login limiting, validation, audit log."""

    def __init__(self, admin: AddressAdmin, metrics: Metrics, cfg: HttpConfig, token: str) -> None:
        self.admin = admin
        self.metrics = metrics
        self.max_body = cfg.max_body_bytes
        self._token = token.encode()
        self.limiter = AuthFailureLimiter(
            cfg.auth_failures_per_minute,
            on_evict=metrics.evictions.labels(kind="auth_failure_client").inc,
        )

    def _outcome(self, outcome: str) -> None:
        self.metrics.admin_requests.labels(outcome=outcome).inc()

    def _authorize(self, request: web.Request) -> str:
        client = request.remote or "unknown"
        wait = self.limiter.retry_after(client)
        if wait is not None:
            self._outcome("rate_limited")
            raise _ApiError(
                429,
                "too many failed authentication attempts; try again later",
                {"Retry-After": str(math.ceil(wait))},
            )
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            self.limiter.record_failure(client)
            self._outcome("unauthorized")
            log.warning("admin authentication failed", client=client, method=request.method, path=request.path)
            challenge = BEARER_REALM + (', error="invalid_token"' if header else "")
            raise _ApiError(401, "missing or invalid bearer token", {"WWW-Authenticate": challenge})
        return client

    async def _body(self, request: web.Request, type_: Any) -> Any:
        if request.content_length is not None and request.content_length > self.max_body:
            raise _ApiError(413, f"request body larger than {self.max_body} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _ApiError(413, f"request body larger than {self.max_body} bytes") from None
        if not raw.strip():
            raise _ApiError(400, "request body is empty; expected JSON")
        try:
            return msgspec.json.decode(raw, type=type_)
        except msgspec.ValidationError as exc:
            raise _ApiError(400, f"invalid request: {exc}") from None
        except msgspec.DecodeError as exc:
            raise _ApiError(400, f"request body is not valid JSON: {exc}") from None

    async def _call(self, request: web.Request, action: Callable[[str], Awaitable[web.Response]]) -> web.Response:
        """Authorize, run, and turn validation/storage failures into counted JSON errors."""
        client = self._authorize(request)
        try:
            response = await action(client)
        except _ApiError as exc:
            self._outcome("not_found" if exc.status == 404 else "invalid")
            raise
        except StorageError as exc:
            self._outcome("unavailable")
            log.warning("admin change failed: database unavailable", client=client, error=str(exc))
            raise _ApiError(503, f"database unavailable: {exc}") from None
        self._outcome("ok")
        return response

    @staticmethod
    def _audit(action: str, client: str, addresses: Sequence[str], **changes: Any) -> None:
        log.info(
            "admin change",
            action=action,
            client=client,
            count=len(addresses),
            addresses=list(addresses[:AUDIT_MAX_LISTED]),
            truncated=len(addresses) > AUDIT_MAX_LISTED,
            **changes,
        )

    async def list(self, request: web.Request) -> web.Response:
        async def run(client: str) -> web.Response:
            return _json({"addresses": await self.admin.list()})

        return await self._call(request, run)

    async def add(self, request: web.Request) -> web.Response:
        async def run(client: str) -> web.Response:
            body = await self._body(request, _AddBody)
            single = isinstance(body, AddressInput)
            entries = _validated_entries([body] if single else body, single)
            written = await self.admin.add(entries)
            self._audit("add", client, [e.address for e in entries])
            return _json({"written": written, "addresses": [e.address for e in entries[:AUDIT_MAX_LISTED]]})

        return await self._call(request, run)

    async def remove_one(self, request: web.Request) -> web.Response:
        async def run(client: str) -> web.Response:
            address = _path_address(request)
            removed = await self.admin.remove([address])
            if removed == 0:
                raise _ApiError(404, f"{address} is not watched")
            self._audit("remove", client, [address])
            return _json({"removed": removed})

        return await self._call(request, run)

    async def remove_many(self, request: web.Request) -> web.Response:
        async def run(client: str) -> web.Response:
            body: _BulkRemove = await self._body(request, _BulkRemove)
            addresses: list[str] = []
            for i, value in enumerate(body.addresses):
                try:
                    addresses.append(parse_address(value))
                except ValueError as exc:
                    raise _ApiError(400, f"$.addresses[{i}]: {exc}") from None
            addresses = builtins.list(dict.fromkeys(addresses))
            removed = await self.admin.remove(addresses)
            self._audit("remove", client, addresses, removed=removed)
            return _json({"removed": removed})

        return await self._call(request, run)

    async def update(self, request: web.Request) -> web.Response:
        async def run(client: str) -> web.Response:
            address = _path_address(request)
            patch: _Patch = await self._body(request, _Patch)
            _check_label(patch.label, "$")
            patch = _checked_filters(patch, "$")
            changes = {k: v for k, v in msgspec.structs.asdict(patch).items() if v is not None}
            if not changes:
                raise _ApiError(
                    400,
                    "nothing to change: give label, tier, priority, is_active, min_notional_usd, allow_symbols "
                    "or deny_symbols",
                )
            row = await self.admin.update(
                address,
                label=patch.label,
                tier=patch.tier,
                priority=patch.priority,
                is_active=patch.is_active,
                min_notional_usd=patch.min_notional_usd,
                allow_symbols=patch.allow_symbols,
                deny_symbols=patch.deny_symbols,
            )
            if row is None:
                raise _ApiError(404, f"{address} is not watched")
            self._audit(
                "update", client, [address], **{k: str(v) if isinstance(v, Decimal) else v for k, v in changes.items()}
            )
            return _json(row)

        return await self._call(request, run)


class _DiscoveryAdmin(_Admin):
    """`POST /admin/discovery/{address}/watch`: a candidate joins the watch list as tier wide."""

    def __init__(
        self, admin: AddressAdmin, metrics: Metrics, cfg: HttpConfig, token: str, discovery: DiscoveryView
    ) -> None:
        super().__init__(admin, metrics, cfg, token)
        self.discovery = discovery

    async def watch(self, request: web.Request) -> web.Response:
        async def run(client: str) -> web.Response:
            address = _path_address(request)
            label = self.discovery.label_of(address)
            if label is None:
                raise _ApiError(404, f"{address} is not a discovery candidate in any window")
            if any(row["address"] == address for row in await self.admin.list()):
                # Adding would overwrite the operator's own tier and label (a precise whale would go wide).
                raise _ApiError(409, f"{address} is already watched")
            entry = AddressInput(address=address, label=f"{DISCOVERED_LABEL_PREFIX}{label}", tier="wide")
            written = await self.admin.add([entry])
            self._audit("discovery_watch", client, [address], label=entry.label, tier="wide")
            return _json({"written": written, "address": address, "label": entry.label, "tier": "wide"})

        return await self._call(request, run)

    async def _auto_rows(self) -> builtins.list[dict[str, Any]]:
        return [r for r in await self.admin.list() if r["is_active"] and is_auto_label(r["label"])]

    async def auto_list(self, request: web.Request) -> web.Response:
        """`GET /admin/discovery/auto`: the addresses automatic discovery watches now."""

        async def run(client: str) -> web.Response:
            return _json({"addresses": await self._auto_rows()})

        return await self._call(request, run)

    async def auto_remove(self, request: web.Request) -> web.Response:
        """`DELETE /admin/discovery/auto`: stop watching all of them (they stay removed: inactive rows)."""

        async def run(client: str) -> web.Response:
            addresses = [r["address"] for r in await self._auto_rows()]
            removed = await self.admin.remove(addresses) if addresses else 0
            self._audit("discovery_auto_remove", client, addresses, removed=removed)
            return _json({"removed": removed})

        return await self._call(request, run)


class _Discovery:
    """`GET /discovery`: the ranked candidates of one window, optionally one label."""

    PARAMS: Final = ("window", "label", "limit")

    def __init__(self, view: DiscoveryView) -> None:
        self.view = view

    def _window(self, query: Mapping[str, str]) -> int:
        names = self.view.window_names()
        raw = query.get("window")
        if raw is None:
            window = self.view.window_ms(names[-1])
        else:
            window = self.view.window_ms(raw)
        if window is None:
            raise _ApiError(400, f"window: {raw!r} is not a configured window; expected one of {', '.join(names)}")
        return window

    @staticmethod
    def _label(query: Mapping[str, str]) -> Label | None:
        raw = query.get("label")
        if raw is None:
            return None
        for known in LABELS:
            if raw.strip() == known:
                return known
        raise _ApiError(400, f"label: {raw!r} is not one of {', '.join(LABELS)}")

    @staticmethod
    def _limit(query: Mapping[str, str]) -> int:
        raw = query.get("limit")
        if raw is None:
            return DISCOVERY_DEFAULT_LIMIT
        if not _LIMIT_RE.fullmatch(raw) or not 1 <= int(raw) <= DISCOVERY_MAX_LIMIT:
            raise _ApiError(400, f"limit: {raw!r} is not an integer from 1 to {DISCOVERY_MAX_LIMIT}")
        return int(raw)

    async def list(self, request: web.Request) -> web.Response:
        query = _Positions._query(request, self.PARAMS)
        window, label, limit = self._window(query), self._label(query), self._limit(query)
        rows = self.view.rows(window, label=label, limit=limit)
        names = {self.view.window_ms(n): n for n in self.view.window_names()}
        return _json({"window": names[window], "label": label, "candidates": rows, "count": len(rows)})


class _Positions:
    """`/positions`: what the watched addresses hold, filtered and sorted, and the whale bias per symbol."""

    LIST_PARAMS: Final = ("symbol", "min_usd", "side", "sort", "limit")
    SUMMARY_PARAMS: Final = ("symbol",)

    def __init__(self, view: PositionsView) -> None:
        self.view = view

    @staticmethod
    def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
        """The query parameters, each at most once, all of them known (a misspelt filter must not be ignored)."""
        query: dict[str, str] = {}
        for name, value in request.query.items():
            if name not in allowed:
                expected = f"expected one of {', '.join(allowed)}" if allowed else "this path takes none"
                raise _ApiError(400, f"{name}: unknown parameter; {expected}")
            if name in query:
                raise _ApiError(400, f"{name}: given more than once")
            query[name] = value
        return query

    @staticmethod
    def _symbol(query: Mapping[str, str]) -> str | None:
        raw = query.get("symbol")
        if raw is None:
            return None
        symbol = raw.strip()
        if not symbol:
            raise _ApiError(400, "symbol: empty; give a symbol (BTCUSDC) or a coin (BTC, xyz:TSLA)")
        if len(symbol) > SYMBOL_MAX_CHARS:
            raise _ApiError(400, f"symbol: longer than {SYMBOL_MAX_CHARS} characters")
        return symbol

    @staticmethod
    def _min_usd(query: Mapping[str, str]) -> Decimal | None:
        raw = query.get("min_usd")
        if raw is None:
            return None
        try:
            value = Decimal(raw)
        except InvalidOperation:
            raise _ApiError(400, f"min_usd: {raw!r} is not a number") from None
        if not value.is_finite():
            raise _ApiError(400, f"min_usd: {raw!r} is not a finite number")
        if value < 0:
            raise _ApiError(400, f"min_usd: {raw!r} is negative; give 0 or more")
        return value

    @staticmethod
    def _side(query: Mapping[str, str]) -> SideFilter | None:
        raw = query.get("side")
        if raw is None:
            return None
        side = raw.strip().lower()
        for known in _SIDES:
            if side == known:
                return known
        raise _ApiError(400, f"side: {raw!r} is not long or short")

    @staticmethod
    def _sort(query: Mapping[str, str]) -> SortKey:
        raw = query.get("sort")
        if raw is None:
            return "value"
        if raw not in SORT_KEYS:
            raise _ApiError(400, f"sort: {raw!r} is not one of {', '.join(SORT_KEYS)}")
        return cast(SortKey, raw)

    @staticmethod
    def _limit(query: Mapping[str, str]) -> int:
        raw = query.get("limit")
        if raw is None:
            return DEFAULT_LIMIT
        if not _LIMIT_RE.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
            raise _ApiError(400, f"limit: {raw!r} is not an integer from 1 to {MAX_LIMIT}")
        return int(raw)

    async def list(self, request: web.Request) -> web.Response:
        query = self._query(request, self.LIST_PARAMS)
        symbol, min_usd, side = self._symbol(query), self._min_usd(query), self._side(query)
        sort, limit = self._sort(query), self._limit(query)
        selected = select_positions(self.view.portfolios(), symbol=symbol, min_usd=min_usd, side=side, sort=sort)
        rows = [position_row(holding, self.view.label) for holding in selected[:limit]]
        return _json({"positions": rows, "count": len(rows), "matched": len(selected)})

    async def summary(self, request: web.Request) -> web.Response:
        symbol = self._symbol(self._query(request, self.SUMMARY_PARAMS))
        return _json({"symbols": summary(self.view.portfolios(), self.view.label, symbol=symbol)})

    async def address(self, request: web.Request) -> web.Response:
        self._query(request, ())
        address = _path_address(request)
        doc = self.view.portfolio(address)
        if doc is None:
            raise _ApiError(404, f"{address} has no position document")
        return _json(document_json(doc, self.view.label))


def register_runtime_collectors(registry: CollectorRegistry) -> None:
    """Process, platform and GC metrics on the service registry (idempotent: skips ones already there)."""
    for make in (ProcessCollector, PlatformCollector, GCCollector):
        # ValueError: already registered on this registry by an earlier create_app.
        with contextlib.suppress(ValueError):
            make(registry=registry)


class _AnnouncedAdmin:
    """An `AddressAdmin` that tells the console's live feed about every change (open pages update themselves)."""

    def __init__(self, admin: AddressAdmin, feed: LiveFeed) -> None:
        self._admin = admin
        self._feed = feed

    async def list(self) -> builtins.list[dict[str, Any]]:
        return await self._admin.list()

    async def add(self, entries: Sequence[AddressInput]) -> int:
        written = await self._admin.add(entries)
        notify_admin_changes(self._feed, [e.address for e in entries[:AUDIT_MAX_LISTED]], "add")
        return written

    async def remove(self, addresses: Sequence[str]) -> int:
        removed = await self._admin.remove(addresses)
        notify_admin_changes(self._feed, addresses[:AUDIT_MAX_LISTED], "remove")
        return removed

    async def update(self, address: str, **changes: Any) -> dict[str, Any] | None:
        row = await self._admin.update(address, **changes)
        if row is not None:
            notify_admin_changes(self._feed, [address], "update")
        return row


def create_app(
    state: ServiceView,
    metrics: Metrics,
    admin: AddressAdmin | None,
    http_cfg: HttpConfig,
    positions: PositionsView | None = None,
    discovery: DiscoveryView | None = None,
    *,
    console: ConsoleDeps | None = None,
    ui: UiConfig | None = None,
) -> web.Application:
    """The HTTP app; the admin routes exist only when both `admin` and `http_cfg.admin_token` are set, the
    `/positions` routes only when `positions` is given, `/discovery` (and its admin route) only with `discovery`,
    the console (`/ui/`) only when `console` is given and `ui.enabled`."""
    app = web.Application(middlewares=[_json_errors], client_max_size=http_cfg.max_body_bytes)
    register_runtime_collectors(metrics.registry)
    ops = _Ops(state, metrics)
    app.router.add_get("/health/live", ops.live)
    app.router.add_get("/health/ready", ops.ready)
    app.router.add_get("/health", ops.health)
    app.router.add_get("/status", ops.status)
    app.router.add_get("/addresses/{address}", ops.address)
    app.router.add_get("/metrics", ops.prometheus)
    if positions is not None:
        holdings = _Positions(positions)
        app.router.add_get("/positions", holdings.list)
        app.router.add_get("/positions/summary", holdings.summary)  # before {address}: "summary" is no address
        app.router.add_get("/positions/{address}", holdings.address)
    if discovery is not None:
        app.router.add_get("/discovery", _Discovery(discovery).list)
    token = http_cfg.admin_token
    ui = ui or UiConfig()
    if console is not None and ui.enabled:
        add_console(
            app,
            console,
            ui,
            admin_available=admin is not None and bool(token),
            status=state.status,
            portfolios=positions.portfolios if positions is not None else None,
            portfolio=positions.portfolio if positions is not None else None,
        )
        if admin is not None:
            admin = _AnnouncedAdmin(admin, console.feed)
    if admin is not None and token:
        routes = _Admin(admin, metrics, http_cfg, token)
        app.router.add_get("/admin/addresses", routes.list)
        app.router.add_post("/admin/addresses", routes.add)
        app.router.add_delete("/admin/addresses", routes.remove_many)
        app.router.add_delete("/admin/addresses/{address}", routes.remove_one)
        app.router.add_patch("/admin/addresses/{address}", routes.update)
        if discovery is not None:
            found = _DiscoveryAdmin(admin, metrics, http_cfg, token, discovery)
            app.router.add_post("/admin/discovery/{address}/watch", found.watch)
            app.router.add_get("/admin/discovery/auto", found.auto_list)
            app.router.add_delete("/admin/discovery/auto", found.auto_remove)
    elif token and admin is None:
        log.warning("admin token set but no address admin wired; admin API disabled")
    return app


class HttpServer:
    """Serves an app on `host:port` inside the running loop; `port` is the bound one (listen port 0 works)."""

    def __init__(self, app: web.Application, listen: str) -> None:
        self.app = app
        self.listen = listen
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("HTTP server is not running")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        """Bind and serve; a port that cannot be bound is a `ConfigError` on `http.listen`."""
        host, port = parse_listen(self.listen)
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError("http.listen", f"cannot listen on {self.listen}: {exc.strerror or exc}") from None
        self._runner = runner
        log.info("http listening", listen=self.listen, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
