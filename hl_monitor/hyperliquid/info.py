"""REST `/info` client: typed requests that never exceed the per-IP weight budget.

Every request first takes its weight from the shared `Budgets` (waiting if the window is full). Requests
whose cost grows with the reply (`userFills`, `userFillsByTime`, `historicalOrders`, `recentTrades`)
reserve the cost of a full reply and settle to the real cost once the reply is counted, so a surcharge
can never push the window over its limit. HTTP 429 pauses every REST caller with a jittered exponential
backoff (or the server's Retry-After, if longer) and retries a bounded number of times.

Answers are decoded entry by entry where they are pages (`hyperliquid.protocol.Decoded`): an odd entry is
counted (`rest_items_odd_total{request, kind}`) and skipped or read with substitutes, never the whole page.

Fills over REST are dex-scoped (docs/protocol.md §4): `user_fills` and `user_fills_by_time` read one perp dex
(`dex=""`, the default, is the first one and sends no `dex` field); a caller that needs every dex an address
trades on asks each and merges the answers with `merge_fill_histories`.

Failures raise `InfoError` (HTTP status, timeout, transport, undecodable body) or `RateLimitedError`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from decimal import Decimal
from types import TracebackType
from typing import Any, Final, Literal, Protocol, TypeVar

import aiohttp
import msgspec

from hl_monitor.config import HyperliquidConfig
from hl_monitor.domain.address import Priority
from hl_monitor.errors import InfoError, ProtocolError, RateLimitedError
from hl_monitor.hyperliquid.constants import (
    INFO_ITEM_WEIGHTED,
    MAX_FILLS_PER_RESPONSE,
    MAX_REACHABLE_FILLS,
    info_weight,
)
from hl_monitor.hyperliquid.protocol import (
    AllMids,
    ClearinghouseState,
    Decoded,
    Fill,
    FrontendOrder,
    HistoricalOrders,
    MetaAndAssetCtxs,
    OrderStatusResponse,
    PerpDexs,
    PerpMeta,
    SpotClearinghouseState,
    SpotMeta,
    SpotMetaAndAssetCtxs,
    WsTrade,
    decode_clearinghouse_state,
    decode_fills_page,
    decode_frontend_orders_page,
    decode_historical_orders_page,
    decode_info,
    decode_trades_page,
)
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = ["FillHistory", "InfoClient", "merge_fill_histories"]

_T = TypeVar("_T")
_log = get_logger(__name__)

# Retries after HTTP 429 before giving up with RateLimitedError (the first attempt included).
DEFAULT_MAX_ATTEMPTS: Final = 5
# First 429 pause; doubles per attempt. Short because the budget normally keeps us under the limit:
# a 429 means another client shares the IP, and a few seconds usually clears it.
DEFAULT_BACKOFF_INITIAL_S: Final = 1.0
# Longest single 429 pause (also the cap on a server-sent Retry-After): the weight window is one minute.
DEFAULT_BACKOFF_MAX_S: Final = 60.0
# userFillsByTime paging: 10000 reachable fills / 2000 per page is 5 pages; inclusive boundaries add a
# little overlap. Anything past this means the server is not paging the way we expect.
MAX_FILL_PAGES: Final = 12
# Enough of an error body for a log line.
_ERROR_BODY_CHARS: Final = 200

_Outcome = Literal["ok", "http_429", "http_error", "timeout", "transport_error", "bad_body"]


class FillHistory(msgspec.Struct, frozen=True):
    """`userFillsByTime` paged to the end: fills sorted by (time, tid), deduped by (coin, oid, tid).

    `truncated` is True when older fills may be missing: the 10000-fill horizon was reached, or the
    server's pages could not be advanced without skipping fills.
    """

    fills: list[Fill]
    truncated: bool
    requests: int


def merge_fill_histories(histories: Iterable[FillHistory]) -> FillHistory:
    """One history from the answers of several perp dexes: deduped by `Fill.identity` (coin, oid, tid), sorted
    by (time, tid), truncated if any part was."""
    seen: dict[tuple[str, int, int], Fill] = {}
    truncated = False
    requests = 0
    for history in histories:
        truncated = truncated or history.truncated
        requests += history.requests
        for fill in history.fills:
            seen.setdefault(fill.identity, fill)
    return FillHistory(sorted(seen.values(), key=lambda f: f.sort_key), truncated, requests)


class WeightGrant(Protocol):
    def settle(self, actual: int) -> None:
        """The request's real weight, once known (the budget returns or takes the difference)."""
        ...


class RestBudget(Protocol):
    """The per-IP REST weight budget (`feeds.budget.Budgets`), as the client uses it."""

    def rest_limit(self, priority: Priority) -> int: ...

    async def rest_weight(self, weight: int, priority: Priority = "low") -> WeightGrant: ...

    def block_rest(self, seconds: float) -> None: ...


class InfoClient:
    """Hyperliquid `POST /info` with a weight budget. One life: `async with InfoClient(...) as info:`."""

    def __init__(
        self,
        url: str,
        budgets: RestBudget,
        metrics: Metrics,
        *,
        timeout: float = 10.0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL_S,
        backoff_max: float = DEFAULT_BACKOFF_MAX_S,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.url = url
        self._budgets = budgets
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_attempts = max_attempts
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._used = False

    @classmethod
    def from_config(cls, cfg: HyperliquidConfig, budgets: RestBudget, metrics: Metrics) -> InfoClient:
        return cls(cfg.info_url, budgets, metrics, timeout=cfg.request_timeout)

    async def __aenter__(self) -> InfoClient:
        if self._used:
            raise RuntimeError("InfoClient is single-use: build a new one")
        self._used = True
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers={"Content-Type": "application/json"})
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ------------------------------------------------------------------------------ typed requests

    async def clearinghouse_state(self, user: str, dex: str = "", *, priority: Priority = "low") -> ClearinghouseState:
        body = {"type": "clearinghouseState", "user": user, "dex": dex}
        return (await self._request(body, decode_clearinghouse_state, priority)).value

    async def spot_clearinghouse_state(self, user: str, *, priority: Priority = "low") -> SpotClearinghouseState:
        body = {"type": "spotClearinghouseState", "user": user}
        return (await self._request(body, _decoder(SpotClearinghouseState), priority)).value

    async def order_status(self, user: str, oid: int | str, *, priority: Priority = "high") -> OrderStatusResponse:
        """`oid` is the numeric order id or a `0x` cloid. Unknown orders give `status == "unknownOid"`."""
        body = {"type": "orderStatus", "user": user, "oid": oid}
        return (await self._request(body, _decoder(OrderStatusResponse), priority)).value

    async def user_fills(self, user: str, *, dex: str = "", priority: Priority = "low") -> list[Fill]:
        """The 2000 most recent fills of one perp dex, in the server's order (newest first observed)."""
        body: dict[str, Any] = {"type": "userFills", "user": user, "aggregateByTime": False}
        if dex:
            body["dex"] = dex
        return (await self._request(body, decode_fills_page, priority)).value

    async def user_fills_by_time(
        self, user: str, start_ms: int, end_ms: int | None = None, *, dex: str = "", priority: Priority = "high"
    ) -> FillHistory:
        """Every fill of one perp dex in `[start_ms, end_ms]` (end defaults to now), paged until caught up.

        The server returns at most 2000 fills per reply, inclusive at both ends, in an order the docs
        leave open: a full page is continued after its newest fill (oldest-first pages) or before its
        oldest one (newest-first pages). A page counts as full by the entries the server sent, including
        any that could not be read.
        """
        seen: dict[tuple[str, int, int], Fill] = {}
        start, end = start_ms, end_ms
        truncated = False
        requests = 0
        while True:
            body: dict[str, Any] = {"type": "userFillsByTime", "user": user, "startTime": start}
            if end is not None:
                body["endTime"] = end
            body["aggregateByTime"] = False
            if dex:
                body["dex"] = dex
            answer = await self._request(body, decode_fills_page, priority)
            page = answer.value
            requests += 1
            for fill in page:
                seen.setdefault(fill.identity, fill)
            if answer.received < MAX_FILLS_PER_RESPONSE:
                break
            if len(seen) >= MAX_REACHABLE_FILLS or requests >= MAX_FILL_PAGES or not page:
                truncated = True  # (a full page of nothing readable gives no time to continue from)
                break
            if page[0].sort_key > page[-1].sort_key:  # newest first: the gap is below the page
                boundary = min(fill.time for fill in page)
                if end is not None and boundary >= end:  # 2000+ fills in one millisecond: cannot split
                    boundary, truncated = end - 1, True
                end = boundary
            else:
                boundary = max(fill.time for fill in page)
                if boundary <= start:
                    boundary, truncated = start + 1, True
                start = boundary
            if end is not None and start > end:
                break
        # Only the newest 10000 fills exist: with that many in hand, older ones may be beyond reach.
        truncated = truncated or len(seen) >= MAX_REACHABLE_FILLS
        if truncated:
            _log.warning("user_fills_by_time_truncated", user=user, dex=dex, start_ms=start_ms, fills=len(seen))
        return FillHistory(sorted(seen.values(), key=lambda f: f.sort_key), truncated, requests)

    async def frontend_open_orders(
        self, user: str, dex: str = "", *, priority: Priority = "low"
    ) -> list[FrontendOrder]:
        body = {"type": "frontendOpenOrders", "user": user, "dex": dex}
        return (await self._request(body, decode_frontend_orders_page, priority)).value

    async def historical_orders(self, user: str, *, priority: Priority = "low") -> HistoricalOrders:
        """At most the 2000 most recent orders with their final or current status."""
        body = {"type": "historicalOrders", "user": user}
        return (await self._request(body, decode_historical_orders_page, priority)).value

    async def meta(self, dex: str = "", *, priority: Priority = "low") -> PerpMeta:
        return (await self._request({"type": "meta", "dex": dex}, _decoder(PerpMeta), priority)).value

    async def meta_and_asset_ctxs(self, dex: str = "", *, priority: Priority = "low") -> MetaAndAssetCtxs:
        body = {"type": "metaAndAssetCtxs", "dex": dex}
        return (await self._request(body, _decoder(MetaAndAssetCtxs), priority)).value

    async def spot_meta(self, *, priority: Priority = "low") -> SpotMeta:
        return (await self._request({"type": "spotMeta"}, _decoder(SpotMeta), priority)).value

    async def spot_meta_and_asset_ctxs(self, *, priority: Priority = "low") -> SpotMetaAndAssetCtxs:
        body = {"type": "spotMetaAndAssetCtxs"}
        return (await self._request(body, _decoder(SpotMetaAndAssetCtxs), priority)).value

    async def perp_dexs(self, *, priority: Priority = "low") -> PerpDexs:
        """`[None, PerpDex, ...]`: the first dex is null."""
        return (await self._request({"type": "perpDexs"}, _decoder(PerpDexs), priority)).value

    async def all_mids(self, dex: str = "", *, priority: Priority = "low") -> dict[str, Decimal]:
        return (await self._request({"type": "allMids", "dex": dex}, _decoder(AllMids), priority)).value

    async def recent_trades(self, coin: str, *, priority: Priority = "low") -> list[WsTrade]:
        return (await self._request({"type": "recentTrades", "coin": coin}, decode_trades_page, priority)).value

    # ------------------------------------------------------------------------------ transport

    async def _request(
        self, body: dict[str, Any], decode: Callable[[bytes], Decoded[_T]], priority: Priority
    ) -> Decoded[_T]:
        session = self._session
        if session is None:
            raise RuntimeError("InfoClient used outside `async with`")
        request_type = str(body["type"])
        payload = msgspec.json.encode(body)
        base = info_weight(request_type)
        reserve = base
        if request_type in INFO_ITEM_WEIGHTED:
            # Pay for a full reply up front (never below the base weight, never above what can be granted).
            reserve = max(
                base, min(info_weight(request_type, MAX_FILLS_PER_RESPONSE), self._budgets.rest_limit(priority))
            )
        for attempt in range(1, self._max_attempts + 1):
            grant = await self._budgets.rest_weight(reserve, priority)
            try:
                async with session.post(self.url, data=payload) as resp:
                    status = resp.status
                    raw = await resp.read()
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
            except TimeoutError:
                self._charge(grant.settle, request_type, base, "timeout")
                raise InfoError(request_type, None, f"no reply within {self._timeout.total} s") from None
            except aiohttp.ClientError as exc:
                self._charge(grant.settle, request_type, base, "transport_error")
                raise InfoError(request_type, None, f"{type(exc).__name__}: {exc}") from exc
            if status == 429:
                self._charge(grant.settle, request_type, base, "http_429")
                if attempt == self._max_attempts:
                    raise RateLimitedError(request_type, 429, f"still rate limited after {attempt} attempts")
                pause = self._backoff(attempt, retry_after)
                _log.warning("info_rate_limited", request=request_type, attempt=attempt, pause_s=round(pause, 3))
                self._budgets.block_rest(pause)
                continue
            if status != 200:
                self._charge(grant.settle, request_type, base, "http_error")
                text = raw[:_ERROR_BODY_CHARS].decode("utf-8", "replace")
                raise InfoError(request_type, status, text)
            try:
                result = decode(raw)
            except ProtocolError as exc:
                self._charge(grant.settle, request_type, base, "bad_body")
                raise InfoError(request_type, status, str(exc)) from exc
            self._charge(grant.settle, request_type, info_weight(request_type, result.received), "ok")
            if result.odd:
                self._count_odd(request_type, result.odd)
            return result
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _charge(self, settle: Callable[[int], None], request_type: str, weight: int, outcome: _Outcome) -> None:
        settle(weight)
        self._metrics.rest_weight_used.labels(request=request_type).inc(weight)
        self._metrics.rest_requests.labels(request=request_type, outcome=outcome).inc()

    def _count_odd(self, request_type: str, odd: dict[str, int]) -> None:
        counter = self._metrics.rest_items_odd
        for kind, count in odd.items():
            counter.labels(request=request_type, kind=kind).inc(count)
        # Unknown fields alone are the exchange adding something: worth a count, not a warning on every page.
        log = _log.info if odd.keys() == {"unknown_field"} else _log.warning
        log("odd entries in a REST answer", request=request_type, **odd)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Jittered exponential: half fixed, half random, so clients sharing the IP spread out."""
        ceiling: float = min(self._backoff_max, self._backoff_initial * 2.0 ** (attempt - 1))
        pause = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if retry_after is not None:
            pause = max(pause, min(retry_after, self._backoff_max))
        return pause


def _decoder(type_: type[_T]) -> Callable[[bytes], Decoded[_T]]:
    """An answer decoded whole (not a page): nothing in it to count."""

    def decode(raw: bytes) -> Decoded[_T]:
        value = decode_info(raw, type_)
        return Decoded(value, len(value) if isinstance(value, list) else 0)

    return decode


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored: the exchange is not known to send it)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
