"""Fake Hyperliquid: WebSocket at `/ws` and REST `POST /info` on one aiohttp port (the protocol: docs/protocol.md).

In-process API (stable; tests of other components use it):

    async with SimServer(SimConfig(max_users=3, idle_timeout=2.0)) as sim:
        sim.ws_url, sim.info_url        # "ws://127.0.0.1:PORT/ws", "http://127.0.0.1:PORT/info"
        w = sim.exchange.whale(addr)    # script orders and fills (hl_monitor.sim.exchange)
        await w.market_order("BTC", True, "1.5", "80000", fills=3)
        sim.exchange.ledger             # ground truth per order: oid, dirs, sizes, VWAPs
        sim.faults.stall("allDexsClearinghouseState", user=addr)   # fault injection (class Faults)
        sim.stats.subscribe_requests    # counters (class SimStats)
        sim.connections                 # [ConnectionInfo(id, remote, subscriptions, client_messages)]
        sim.push_state()                # the periodic clearinghouse/spot/allMids push, right now
        sim.exchange.set_mid("ETH", "2100")   # a mark move: allMids pushed within 0.1 s (positions: exchange.py)

What is modelled: acks with the normalised echo, the real error texts, per-IP limits (connections, new
connections per minute, subscriptions, distinct users, client messages per minute), `userFills` snapshot
(`isSnapshot: true`, oldest first) on every subscribe, stream frames without `isSnapshot`, `orderUpdates`
without `user`, `user` (userEvents) frames with fills and liquidations, `clearinghouseState`,
`allDexsClearinghouseState` and `spotState` (state on subscribe, then every `clearinghouse_push_interval`;
every field a position carries, from the exchange's ledger: see `hl_monitor.sim.exchange`), `trades` with
`users` (replay of the last `trades_replay` on subscribe), `allMids` (optional `dex`; the map on subscribe,
then whenever a mid of that dex moves, by a trade or `Exchange.set_mid`, coalesced to one frame per 0.1 s,
and every `all_mids_interval`), `bbo` (on every trade of its coin and every `bbo_interval`: a live
book's best quotes move nearly every block even when nothing trades), `user` funding events
(`Exchange.apply_funding`), ping/pong, idle timeout, `post` info requests, REST weights and 429.

Choices where the real server's behaviour is UNVERIFIED (docs/protocol.md §10):
- Over the connection count or the new-connection rate: the upgrade is refused with HTTP 429.
- Over the client message rate: an error frame (`MESSAGE_RATE_ERROR`), then a close frame with 1008.
- Over the subscription cap: an error frame (`SUBSCRIPTION_CAP_ERROR`), no echo; the socket stays open.
- A subscription on an unknown coin: `Invalid subscription {...}` (testnet reportedly closed the socket).
- Idle timeout counts client messages only (the documented contract); the close is abrupt (1006).
- Accepted but silent (ack only, no data): subscription types the client does not model (`l2Book`,
  `candle`, `openOrders`, `userFundings`, `webData3`, ...). `webData2` is always rejected.
- `aggregateByTime: true` is echoed but fills are not aggregated. A partial maker fill emits no `open`
  update. Distinct-user slots are freed at once on close (the live server takes ~2 s).
- REST: bad JSON → 400, unknown type or bad field → 422 (axum's extractor texts); 429 body is JSON
  `{"code":429,"msg":...,"data":null}`; a refused or invalid request costs no weight; `userFillsByTime`
  is oldest first unless `reversed: true`. WS `post` info requests cost no REST weight.
- REST `userFills` / `userFillsByTime` are dex-scoped as on the live server (docs/protocol.md §4): without
  `dex` (or with `""`) the first perp dex and spot, with `dex` that builder dex's coins only. The WS
  `userFills` snapshot holds every dex (unverified on the live server).
- Slow consumers: a connection whose send queue exceeds `send_queue_size` frames is closed abruptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import string
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

import msgspec
from aiohttp import WSMsgType, web

from hl_monitor.hyperliquid import constants as hl
from hl_monitor.hyperliquid.protocol import ErrorFrame, PongFrame, SubAck, SubscriptionResponseFrame
from hl_monitor.logging import get_logger
from hl_monitor.sim.exchange import (
    Exchange,
    Universe,
    WireClearinghouseState,
    WireFill,
    WireLiquidationEvent,
    WireOrderUpdate,
    WireSpotState,
    WireTrade,
    WireTwapHistoryEntry,
    WireUserFunding,
    wire_decimal,
)

__all__ = ["ConnectionInfo", "Faults", "SimConfig", "SimServer", "SimStats"]

log = get_logger(__name__)

WINDOW_S: Final = 60.0  # every per-IP rate limit is "per minute"
DEFAULT_PUSH_INTERVAL_S: Final = 5.0  # allDexsClearinghouseState cadence on idle accounts (docs/protocol.md §8)
# The live exchange pushes allMids about once per block; a busy sim market moving mids on every fill would
# otherwise push the whole map hundreds of times a second.
MIDS_COALESCE_S: Final = 0.1
DEFAULT_ALL_MIDS_INTERVAL_S: Final = 1.0  # live mids move every block; this is the sim's idle cadence
DEFAULT_BBO_INTERVAL_S: Final = 1.0  # live BTC quotes move nearly every block (docs/protocol.md §8); sim's idle pace
DEFAULT_TRADES_REPLAY: Final = 30  # trades replayed on subscribe (30 observed on testnet, docs/protocol.md §8)
DEFAULT_FILLS_SNAPSHOT: Final = 2000  # userFills snapshot size (UNVERIFIED; matches the REST cap)
DEFAULT_SEND_QUEUE: Final = 50_000  # frames queued per connection before it counts as a slow consumer
CLOSE_TIMEOUT_S: Final = 1.0  # how long a close handshake may take before the socket is dropped
MAX_CLIENT_FRAME: Final = 1 << 20  # client messages are small JSON commands
RECENT_TRADES_REST: Final = 30  # REST recentTrades length (newest first)
BBO_HALF_SPREAD: Final = Decimal("0.0001")  # fake book: bid/ask 1 bp either side of the last trade
BBO_SIG_FIGS: Final = 5  # prices have at most 5 significant figures on Hyperliquid
BBO_LEVEL_SZ: Final = "1.0"  # the fake book shows one order of size 1 on each side
ADDRESS_LEN: Final = 42  # "0x" + 40 hex digits
_HEX_DIGITS: Final = frozenset(string.hexdigits)
HTTP_TOO_MANY: Final = 429
HTTP_UNPROCESSABLE: Final = 422  # axum's status for a body that parses but does not fit the request type
HTTP_BAD_REQUEST: Final = 400
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_GOING_AWAY: Final = 1001

PARSE_ERROR: Final = hl.PARSE_ERROR_PREFIX + ": "
MESSAGE_RATE_ERROR: Final = "Too many messages: more than {n} messages sent in one minute."  # UNVERIFIED text
SUBSCRIPTION_CAP_ERROR: Final = "Cannot subscribe to more than {n} total subscriptions."  # UNVERIFIED text
USER_CAP_ERROR: Final = hl.USER_CAP_ERROR_PREFIX + " {n} total users."

# Subscription types: which fields they take and which channel carries their data.
_USER_TYPES: Final = frozenset(
    {
        "userFills",
        "orderUpdates",
        "userEvents",
        "userFundings",
        "userNonFundingLedgerUpdates",
        "userTwapSliceFills",
        "userTwapHistory",
        "userHistoricalOrders",
        "allDexsClearinghouseState",
        "spotState",
        "webData3",
        "notification",
    }
)
_USER_DEX_TYPES: Final = frozenset({"clearinghouseState", "openOrders", "twapStates"})
_COIN_TYPES: Final = frozenset({"trades", "bbo", "activeAssetCtx"})
_MODELLED: Final = frozenset(
    {
        "userFills",
        "orderUpdates",
        "userEvents",
        "clearinghouseState",
        "allDexsClearinghouseState",
        "spotState",
        "trades",
        "allMids",
        "bbo",
        "userTwapHistory",
    }
)
_STATE_CHANNELS: Final = ("allDexsClearinghouseState", "clearinghouseState", "spotState", "allMids")
_ACCOUNT_CHANNELS: Final = _STATE_CHANNELS[:3]  # pushed every `clearinghouse_push_interval`
_CHANNEL_OF: Final = {"userEvents": "user"}  # data channels named differently from their subscription type


# --------------------------------------------------------------------------------------- outbound frames


class _Data(msgspec.Struct, rename="camel", omit_defaults=True, frozen=True, gc=False, kw_only=True):
    pass


class _FillsSnapshot(_Data, frozen=True, kw_only=True):
    is_snapshot: bool
    user: str
    fills: Sequence[WireFill]


class _FillsStream(_Data, frozen=True, kw_only=True):
    user: str
    fills: Sequence[WireFill]


class _TwapHistory(_Data, frozen=True, kw_only=True):
    is_snapshot: bool | None = None  # stream frames omit the key (live data), snapshots carry true
    user: str
    history: Sequence[WireTwapHistoryEntry]


class _EventFills(_Data, frozen=True, kw_only=True):
    fills: Sequence[WireFill]


class _EventLiquidation(_Data, frozen=True, kw_only=True):
    liquidation: WireLiquidationEvent


class _EventFunding(_Data, frozen=True, kw_only=True):
    funding: WireUserFunding


class _ChState(_Data, frozen=True, kw_only=True):
    dex: str
    user: str
    clearinghouse_state: WireClearinghouseState


class _AllDexs(_Data, frozen=True, kw_only=True):
    user: str
    clearinghouse_states: Sequence[tuple[str, WireClearinghouseState]]


class _Spot(_Data, frozen=True, kw_only=True):
    user: str
    spot_state: WireSpotState


class _Mids(_Data, frozen=True, kw_only=True):
    mids: Mapping[str, str]
    dex: str | None = None


class _Level(_Data, frozen=True, kw_only=True):
    px: str
    sz: str
    n: int


class _Bbo(_Data, frozen=True, kw_only=True):
    coin: str
    time: int
    bbo: tuple[_Level | None, _Level | None]


class _Out(msgspec.Struct, tag_field="channel", frozen=True, gc=False):
    """`{"channel": <tag>, "data": ...}`, channel first as the exchange writes it."""


class _UserFillsOut(_Out, tag="userFills", frozen=True):
    data: _FillsSnapshot | _FillsStream


class _TwapHistoryOut(_Out, tag="userTwapHistory", frozen=True):
    data: _TwapHistory


class _OrderUpdatesOut(_Out, tag="orderUpdates", frozen=True):
    data: Sequence[WireOrderUpdate]


class _UserEventsOut(_Out, tag="user", frozen=True):
    data: _EventFills | _EventLiquidation | _EventFunding


class _TradesOut(_Out, tag="trades", frozen=True):
    data: Sequence[WireTrade]


class _ChStateOut(_Out, tag="clearinghouseState", frozen=True):
    data: _ChState


class _AllDexsOut(_Out, tag="allDexsClearinghouseState", frozen=True):
    data: _AllDexs


class _SpotOut(_Out, tag="spotState", frozen=True):
    data: _Spot


class _MidsOut(_Out, tag="allMids", frozen=True):
    data: _Mids


class _BboOut(_Out, tag="bbo", frozen=True):
    data: _Bbo


class _PostOut(_Out, tag="post", frozen=True):
    data: dict[str, Any]


_ENC: Final = msgspec.json.Encoder()
_PONG: Final = _ENC.encode(PongFrame())


# --------------------------------------------------------------------------------------- config, stats


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """Knobs of the fake server. Limits are per client IP; defaults are the documented Hyperliquid values."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port (read it back from `SimServer.port`)
    max_connections: int = hl.MAX_CONNECTIONS
    max_new_connections_per_minute: int = hl.MAX_NEW_CONNECTIONS_PER_MINUTE
    max_subscriptions: int = hl.MAX_SUBSCRIPTIONS
    max_users: int = hl.MAX_USERS
    max_client_messages_per_minute: int = hl.MAX_CLIENT_MESSAGES_PER_MINUTE
    rest_weight_per_minute: int = hl.REST_WEIGHT_PER_MINUTE
    idle_timeout: float = hl.SERVER_IDLE_TIMEOUT_S
    clearinghouse_push_interval: float = DEFAULT_PUSH_INTERVAL_S
    all_mids_interval: float = DEFAULT_ALL_MIDS_INTERVAL_S  # allMids cadence besides the push on every move
    bbo_interval: float = DEFAULT_BBO_INTERVAL_S  # bbo cadence besides the push on every trade
    send_greeting: bool = False
    trades_replay: int = DEFAULT_TRADES_REPLAY
    fills_snapshot_size: int = DEFAULT_FILLS_SNAPSHOT
    fill_history_limit: int = hl.MAX_REACHABLE_FILLS
    record_ledger: bool = True  # off for long load runs: the ledger keeps one entry per order
    send_queue_size: int = DEFAULT_SEND_QUEUE
    compression: bool = False  # permessage-deflate costs CPU per frame; the load benchmark wants it off
    seed: int = 0


@dataclass(slots=True)
class SimStats:
    """Counters for tests and benchmarks. `messages_per_connection` maps connection id → client messages."""

    connections_opened: int = 0
    connections_refused: int = 0
    subscribe_requests: int = 0
    unsubscribe_requests: int = 0
    client_messages: int = 0
    messages_per_connection: dict[int, int] = field(default_factory=dict)
    frames_sent: int = 0
    frames_withheld: int = 0
    frames_duplicated: int = 0
    acks_dropped: int = 0
    error_frames: int = 0
    idle_closes: int = 0
    rate_limit_closes: int = 0
    slow_consumer_closes: int = 0
    rest_requests: int = 0
    rest_weight_used: int = 0
    rest_429s: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    id: int
    remote: str
    subscriptions: list[dict[str, Any]]
    client_messages: int


# --------------------------------------------------------------------------------------- limits


class _Window:
    """Sliding one-minute sum of weights (count when every weight is 1)."""

    __slots__ = ("_events", "total")

    def __init__(self) -> None:
        self._events: deque[tuple[float, int]] = deque()
        self.total = 0

    def used(self, now: float) -> int:
        events = self._events
        while events and events[0][0] <= now - WINDOW_S:
            self.total -= events.popleft()[1]
        return self.total

    def try_take(self, now: float, weight: int, limit: int) -> bool:
        if self.used(now) + weight > limit:
            return False
        self._events.append((now, weight))
        self.total += weight
        return True


@dataclass(slots=True)
class _IpState:
    conns: set[_Conn] = field(default_factory=set)
    new_conns: _Window = field(default_factory=_Window)
    messages: _Window = field(default_factory=_Window)
    rest: _Window = field(default_factory=_Window)
    users: Counter[str] = field(default_factory=Counter)  # user → live subscriptions naming it
    subscriptions: int = 0


# --------------------------------------------------------------------------------------- connections


@dataclass(slots=True, eq=False)
class _Sub:
    conn: _Conn
    key: str  # compact JSON of the normalised echo: identity and the text of "Already subscribed"
    echo: dict[str, Any]
    route: tuple[str, str]  # (data channel, discriminator)
    user: str | None
    stalled: bool = False


class _Conn:
    """One client socket: subscriptions, a bounded send queue and its writer task."""

    def __init__(self, cid: int, ip: str, ws: web.WebSocketResponse, request: web.Request, server: SimServer) -> None:
        self.id = cid
        self.ip = ip
        self.ws = ws
        self._transport = request.transport
        self._server = server
        self.subs: dict[str, _Sub] = {}
        self.queue: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()  # set while the send queue is empty
        self.drained.set()
        self.closed = False
        self.close_code: int | None = None

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if len(self.queue) >= self._server.config.send_queue_size:
            self._server.stats.slow_consumer_closes += 1
            self.abort()
            return
        self.queue.append(data)
        self.drained.clear()
        self.wake.set()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame: the client sees 1006."""
        self.closed = True
        self.queue.clear()
        self.wake.set()
        if self._transport is not None:
            self._transport.abort()

    async def write_loop(self) -> None:
        stats = self._server.stats
        ws = self.ws
        queue = self.queue
        try:
            while not self.closed:
                await self.wake.wait()
                self.wake.clear()
                while queue and not self.closed:
                    await ws.send_frame(queue.popleft(), WSMsgType.TEXT)
                    stats.frames_sent += 1
                if not queue:
                    self.drained.set()
        except ConnectionError:
            self.closed = True


class _ParseError(Exception):
    """The request does not parse: answered with `Error parsing JSON ...` and the raw text."""


class _InvalidSubscription(Exception):
    """Parses but names something that does not exist (unknown coin)."""


class _BadRequest(Exception):
    """REST body with a missing or wrongly typed field: 422."""


def _address(value: Any) -> str:
    if not isinstance(value, str) or len(value) != ADDRESS_LEN or not value.startswith("0x"):
        raise _ParseError
    if not set(value[2:]) <= _HEX_DIGITS:
        raise _ParseError
    return value.lower()


def _normalise(sub: Any, known_coin: Callable[[str], bool]) -> tuple[dict[str, Any], tuple[str, str], str | None]:
    """The server's echo of a subscription, its route and its user (raises `_ParseError` like the server)."""
    if not isinstance(sub, dict):
        raise _ParseError
    kind = sub.get("type")
    if not isinstance(kind, str):
        raise _ParseError
    echo: dict[str, Any] = {"type": kind}
    user: str | None = None
    channel = _CHANNEL_OF.get(kind, kind)
    if kind in _USER_TYPES or kind in _USER_DEX_TYPES:
        user = echo["user"] = _address(sub.get("user"))
        disc = user
        if kind == "userFills":
            agg = sub.get("aggregateByTime", False)
            if not isinstance(agg, bool):
                raise _ParseError
            echo["aggregateByTime"] = agg
        if kind in _USER_DEX_TYPES and "dex" in sub:
            dex = sub["dex"]
            if not isinstance(dex, str):
                raise _ParseError
            echo["dex"] = dex
        if kind in _USER_DEX_TYPES:
            disc = f"{user}|{echo.get('dex', '')}"
    elif kind in _COIN_TYPES or kind in ("l2Book", "candle", "activeAssetData"):
        coin = sub.get("coin")
        if not isinstance(coin, str):
            raise _ParseError
        if kind == "activeAssetData":
            user = echo["user"] = _address(sub.get("user"))
        echo["coin"] = coin
        if kind == "l2Book":
            echo["nSigFigs"] = sub.get("nSigFigs")
            echo["mantissa"] = sub.get("mantissa")
            if sub.get("fast") is True:
                echo["fast"] = True
        if kind == "candle":
            interval = sub.get("interval")
            if not isinstance(interval, str):
                raise _ParseError
            echo["interval"] = interval
        if not known_coin(coin):
            raise _InvalidSubscription
        disc = coin
    elif kind == "allMids":
        dex = sub.get("dex")
        if dex is not None:
            if not isinstance(dex, str):
                raise _ParseError
            echo["dex"] = dex
        disc = dex or ""
    else:
        # Unknown types, and webData2 which the live server stopped accepting in mid-2026.
        raise _ParseError
    if kind not in _MODELLED:
        channel = f"silent:{kind}"
        disc = _ENC.encode(echo).decode()
    return echo, (channel, disc), user


# --------------------------------------------------------------------------------------- faults


class Faults:
    """Fault injection. All methods are synchronous and take effect for the next matching frame/event."""

    def __init__(self, server: SimServer) -> None:
        self._server = server
        self._drop_acks: list[str | None] = []
        self._duplicates: Counter[str] = Counter()
        self._sticky_stalls: set[tuple[str, str | None]] = set()
        self._held_rest: set[str] = set()
        self._rest_released = asyncio.Event()

    @property
    def reject_webdata2(self) -> bool:
        """Always on: the live server answers a webData2 subscription with a parse error."""
        return True

    def drop_next_ack(self, type: str | None = None) -> None:
        """Do not send the next ack (of this subscription type, or any); the (un)subscribe still happens."""
        self._drop_acks.append(type)

    def stall(self, channel: str, user: str | None = None, *, sticky: bool = False) -> None:
        """Silently withhold data frames of `channel` (optionally for one user) on live subscriptions.

        The socket stays open and pongs/acks still flow; withheld frames are never delivered later. Only
        subscriptions that exist now are stalled (a resubscribe heals, like on the real exchange) unless
        `sticky`, which stalls later subscriptions too until `unstall`.
        """
        channel = _CHANNEL_OF.get(channel, channel)
        wanted = user.lower() if user else None
        for sub in self._server._all_subs():
            if sub.route[0] == channel and (wanted is None or sub.user == wanted):
                sub.stalled = True
        if sticky:
            self._sticky_stalls.add((channel, wanted))

    def unstall(self, channel: str | None = None, user: str | None = None) -> None:
        """Resume delivery (everything when called without arguments)."""
        channel = _CHANNEL_OF.get(channel, channel) if channel else None
        wanted = user.lower() if user else None
        for sub in self._server._all_subs():
            if (channel is None or sub.route[0] == channel) and (wanted is None or sub.user == wanted):
                sub.stalled = False
        self._sticky_stalls = {
            (c, u) for c, u in self._sticky_stalls if not ((channel is None or c == channel) and (wanted in (None, u)))
        }

    def hold_rest(self, request_type: str) -> None:
        """Leave REST requests of `request_type` unanswered (the connection stays open) until `release_rest`."""
        self._held_rest.add(request_type)
        self._rest_released.clear()

    def release_rest(self) -> None:
        """Answer every held REST request now, and later ones at once."""
        self._held_rest.clear()
        self._rest_released.set()

    def abrupt_close_all(self) -> int:
        """TCP-close every connection without a close frame (1006). Returns how many were closed."""
        conns = list(self._server._conns.values())
        for conn in conns:
            conn.abort()
        return len(conns)

    def close_connection(self, conn_id: int, *, code: int | None = None) -> None:
        """Close one connection: abruptly (1006) when `code` is None, else with a close frame."""
        conn = self._server._conns.get(conn_id)
        if conn is None:
            raise KeyError(f"no open connection {conn_id}")
        if code is None:
            conn.abort()
        else:
            conn.close_code = code
            conn.wake.set()
            self._server._close_soon(conn)

    def duplicate_next(self, channel: str, count: int = 1) -> None:
        """Send the next `count` data frames of `channel` twice to every recipient."""
        self._duplicates[_CHANNEL_OF.get(channel, channel)] += count

    def status_before_fills(self, enabled: bool = True) -> None:
        """Push each order status update before the fills it reports on."""
        self._server.exchange.status_before_fills = enabled

    # internal hooks

    def _take_drop_ack(self, kind: str) -> bool:
        for i, wanted in enumerate(self._drop_acks):
            if wanted is None or wanted == kind:
                del self._drop_acks[i]
                return True
        return False

    def _take_duplicate(self, channel: str) -> bool:
        if self._duplicates[channel] > 0:
            self._duplicates[channel] -= 1
            return True
        return False

    async def _hold(self, request_type: str) -> None:
        while request_type in self._held_rest:
            await self._rest_released.wait()

    def _sticky(self, channel: str, user: str | None) -> bool:
        return (channel, None) in self._sticky_stalls or (user is not None and (channel, user) in self._sticky_stalls)


# --------------------------------------------------------------------------------------- server


class SimServer:
    """The fake exchange: one aiohttp app serving `/ws` and `/info`; use as `async with SimServer(cfg) as sim`."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` drives the per-minute limits, `wall_clock` the exchange's timestamps (tests inject both)."""
        self.config = config or SimConfig()
        self.exchange = Exchange(
            seed=self.config.seed,
            fill_history_limit=self.config.fill_history_limit,
            record_ledger=self.config.record_ledger,
            clock=wall_clock,
        )
        self.exchange.listener = self
        self.exchange.mark_listener = self
        self.faults = Faults(self)
        self.stats = SimStats()
        self._clock = clock
        self._ips: dict[str, _IpState] = {}
        self._conns: dict[int, _Conn] = {}
        self._routes: dict[tuple[str, str], dict[_Sub, None]] = {}
        self._next_conn = 0
        self._runner: web.AppRunner | None = None
        self._push_task: asyncio.Task[None] | None = None
        self._mids_task: asyncio.Task[None] | None = None
        self._bbo_task: asyncio.Task[None] | None = None
        self._moved_dexes: set[str] = set()  # dexes whose mids moved since the last allMids flush
        self._mids_flush: asyncio.Handle | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closers: set[asyncio.Task[None]] = set()
        self.port = 0

    # ---------------------------------------------------------------- lifecycle

    @property
    def ws_url(self) -> str:
        return f"ws://{self._url_host}:{self.port}/ws"

    @property
    def info_url(self) -> str:
        return f"http://{self._url_host}:{self.port}/info"

    @property
    def _url_host(self) -> str:
        host = self.config.host
        return f"[{host}]" if ":" in host else host

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._ws_handler)
        app.router.add_post("/info", self._info_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.create_server((self.config.host, self.config.port))
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()
        self._push_task = asyncio.create_task(self._push_loop(), name="sim-state-push")
        self._mids_task = asyncio.create_task(self._mids_loop(), name="sim-mids-push")
        self._bbo_task = asyncio.create_task(self._bbo_loop(), name="sim-bbo-push")
        log.info("sim listening", ws_url=self.ws_url, info_url=self.info_url)

    async def stop(self) -> None:
        """Stop pushing, close every socket (1001), wait for the handlers, then stop the listener."""
        self.faults.release_rest()
        for task in (self._push_task, self._mids_task, self._bbo_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._push_task = self._mids_task = self._bbo_task = None
        if self._mids_flush is not None:
            self._mids_flush.cancel()
            self._mids_flush = None
        for conn in list(self._conns.values()):
            conn.close_code = CLOSE_GOING_AWAY
            self._close_soon(conn)
        pending = self._handlers | self._closers
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S * 2)
        for conn in list(self._conns.values()):
            conn.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _close_soon(self, conn: _Conn) -> None:
        task = asyncio.create_task(self._close(conn))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _close(self, conn: _Conn) -> None:
        code = conn.close_code or CLOSE_GOING_AWAY
        conn.closed = True
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await conn.ws.close(code=code)
        except (TimeoutError, ConnectionError):
            conn.abort()

    @property
    def connections(self) -> list[ConnectionInfo]:
        return [
            ConnectionInfo(c.id, c.ip, [s.echo for s in c.subs.values()], self.stats.messages_per_connection[c.id])
            for c in self._conns.values()
        ]

    def _all_subs(self) -> Iterable[_Sub]:
        for conn in self._conns.values():
            yield from conn.subs.values()

    def _ip(self, ip: str) -> _IpState:
        state = self._ips.get(ip)
        if state is None:
            state = self._ips[ip] = _IpState()
        return state

    # ---------------------------------------------------------------- websocket

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        ip = request.remote or "unknown"
        state = self._ip(ip)
        cfg = self.config
        if len(state.conns) >= cfg.max_connections or not state.new_conns.try_take(
            self._clock(), 1, cfg.max_new_connections_per_minute
        ):
            self.stats.connections_refused += 1
            return web.json_response({"error": "Too many connections"}, status=HTTP_TOO_MANY)
        ws = web.WebSocketResponse(
            compress=cfg.compression, autoping=True, max_msg_size=MAX_CLIENT_FRAME, decode_text=False,
            timeout=CLOSE_TIMEOUT_S,
        )  # fmt: skip
        await ws.prepare(request)
        self._next_conn += 1
        conn = _Conn(self._next_conn, ip, ws, request, self)
        self._conns[conn.id] = conn
        state.conns.add(conn)
        self.stats.connections_opened += 1
        self.stats.messages_per_connection[conn.id] = 0
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        writer = asyncio.create_task(conn.write_loop(), name=f"sim-writer-{conn.id}")
        try:
            if cfg.send_greeting:
                conn.send(hl.GREETING_TEXT.encode())
            await self._read_loop(conn, state)
        finally:
            self._drop_connection(conn, state)
            conn.closed = True
            conn.wake.set()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            if task is not None:
                self._handlers.discard(task)
        return ws

    async def _read_loop(self, conn: _Conn, state: _IpState) -> None:
        ws = conn.ws
        cfg = self.config
        while not conn.closed:
            try:
                msg = await ws.receive(timeout=cfg.idle_timeout)
            except TimeoutError:
                self.stats.idle_closes += 1
                conn.abort()
                return
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                return
            self.stats.client_messages += 1
            self.stats.messages_per_connection[conn.id] += 1
            if not state.messages.try_take(self._clock(), 1, cfg.max_client_messages_per_minute):
                self.stats.rate_limit_closes += 1
                self._error(conn, MESSAGE_RATE_ERROR.format(n=cfg.max_client_messages_per_minute))
                conn.close_code = CLOSE_POLICY_VIOLATION
                # Let the writer flush the error frame, then close with a close frame.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await conn.drained.wait()
                await self._close(conn)
                return
            raw: bytes = msg.data if isinstance(msg.data, bytes) else str(msg.data).encode()
            self._on_message(conn, state, raw)

    def _on_message(self, conn: _Conn, state: _IpState, raw: bytes) -> None:
        try:
            msg = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            self._parse_error(conn, raw)
            return
        method = msg.get("method") if isinstance(msg, dict) else None
        if method == "ping":
            if self._mids_flush is not None:  # a pong follows every mid move made before the ping
                self._mids_flush.cancel()
                self._flush_mids()
            conn.send(_PONG)
        elif method == "subscribe":
            self.stats.subscribe_requests += 1
            self._subscribe(conn, state, raw, msg.get("subscription"))
        elif method == "unsubscribe":
            self.stats.unsubscribe_requests += 1
            self._unsubscribe(conn, state, raw, msg.get("subscription"))
        elif method == "post":
            self._post(conn, raw, msg)
        else:
            self._parse_error(conn, raw)

    def _error(self, conn: _Conn, text: str) -> None:
        self.stats.error_frames += 1
        conn.send(_ENC.encode(ErrorFrame(data=text)))

    def _parse_error(self, conn: _Conn, raw: bytes) -> None:
        self._error(conn, PARSE_ERROR + raw.decode("utf-8", "replace"))

    def _ack(self, conn: _Conn, method: str, echo: dict[str, Any]) -> None:
        if self.faults._take_drop_ack(echo["type"]):
            self.stats.acks_dropped += 1
            return
        conn.send(_ENC.encode(SubscriptionResponseFrame(data=SubAck(method=method, subscription=echo))))

    def _subscribe(self, conn: _Conn, state: _IpState, raw: bytes, sub: Any) -> None:
        try:
            echo, route, user = _normalise(sub, self.exchange.universe.is_coin)
        except _ParseError:
            self._parse_error(conn, raw)
            return
        except _InvalidSubscription:
            self._error(conn, f"{hl.INVALID_SUBSCRIPTION_PREFIX} {_ENC.encode(sub).decode()}")
            return
        key = _ENC.encode(echo).decode()
        if key in conn.subs:
            self._error(conn, f"{hl.ALREADY_SUBSCRIBED_PREFIX}: {key}")
            return
        cfg = self.config
        if user is not None and user not in state.users and len(state.users) >= cfg.max_users:
            self._error(conn, USER_CAP_ERROR.format(n=cfg.max_users))
            return
        if state.subscriptions >= cfg.max_subscriptions:
            self._error(conn, SUBSCRIPTION_CAP_ERROR.format(n=cfg.max_subscriptions))
            return
        record = _Sub(conn, key, echo, route, user, stalled=self.faults._sticky(route[0], user))
        conn.subs[key] = record
        self._routes.setdefault(route, {})[record] = None
        state.subscriptions += 1
        if user is not None:
            state.users[user] += 1
        self._ack(conn, "subscribe", echo)
        self._initial_frames(record)

    def _unsubscribe(self, conn: _Conn, state: _IpState, raw: bytes, sub: Any) -> None:
        try:
            echo, _route, _user = _normalise(sub, self.exchange.universe.is_coin)
        except (_ParseError, _InvalidSubscription):
            self._parse_error(conn, raw)
            return
        key = _ENC.encode(echo).decode()
        record = conn.subs.get(key)
        if record is None:
            self._error(conn, f"{hl.ALREADY_UNSUBSCRIBED_PREFIX}: {key}")
            return
        self._remove_sub(state, record)
        self._ack(conn, "unsubscribe", echo)

    def _remove_sub(self, state: _IpState, record: _Sub) -> None:
        del record.conn.subs[record.key]
        subs = self._routes.get(record.route)
        if subs is not None:
            subs.pop(record, None)
            if not subs:
                del self._routes[record.route]
        state.subscriptions -= 1
        if record.user is not None:
            state.users[record.user] -= 1
            if state.users[record.user] <= 0:
                del state.users[record.user]

    def _drop_connection(self, conn: _Conn, state: _IpState) -> None:
        for record in list(conn.subs.values()):
            self._remove_sub(state, record)
        state.conns.discard(conn)
        self._conns.pop(conn.id, None)

    def _post(self, conn: _Conn, raw: bytes, msg: dict[str, Any]) -> None:
        req_id = msg.get("id")
        request = msg.get("request")
        if not isinstance(req_id, int) or not isinstance(request, dict):
            self._parse_error(conn, raw)
            return
        payload = request.get("payload")
        response: dict[str, Any]
        if request.get("type") != "info" or not isinstance(payload, dict):
            response = {"type": "error", "payload": "only info requests are supported by the simulator"}
        else:
            try:
                result, _items = self._info(payload)
                response = {"type": "info", "payload": {"type": payload.get("type"), "data": result}}
            except _BadRequest as exc:
                response = {"type": "error", "payload": f"422 Unprocessable Entity: {exc}"}
        conn.send(_ENC.encode(_PostOut(data={"id": req_id, "response": response})))

    # ---------------------------------------------------------------- data frames

    def _fanout(self, channel: str, subs: Iterable[_Sub], data: bytes) -> None:
        twice = self.faults._take_duplicate(channel)
        for sub in subs:
            if sub.stalled:
                self.stats.frames_withheld += 1
                continue
            sub.conn.send(data)
            if twice:
                self.stats.frames_duplicated += 1
                sub.conn.send(data)

    def _send_one(self, record: _Sub, data: bytes) -> None:
        self._fanout(record.route[0], (record,), data)

    def _initial_frames(self, record: _Sub) -> None:
        channel, disc = record.route
        ex = self.exchange
        user = record.user or ""
        if channel == "userFills":
            fills = ex.fills_snapshot(user, self.config.fills_snapshot_size)
            snap = _FillsSnapshot(is_snapshot=True, user=user, fills=fills)
            self._send_one(record, _ENC.encode(_UserFillsOut(snap)))
        elif channel == "trades":
            replay = list(ex.recent_trades[disc])[-self.config.trades_replay :] if self.config.trades_replay else []
            if replay:
                self._send_one(record, _ENC.encode(_TradesOut(replay)))
        elif channel == "bbo":
            self._send_one(record, self._bbo_frame(disc))
        elif channel == "userTwapHistory":
            history = _TwapHistory(user=user, history=ex.twap_history(user), is_snapshot=True)
            self._send_one(record, _ENC.encode(_TwapHistoryOut(history)))
        elif channel in _STATE_CHANNELS:
            self._send_one(record, self._state_frame(record.route, record.echo))

    def _state_frame(self, route: tuple[str, str], echo: Mapping[str, Any]) -> bytes:
        channel, disc = route
        ex = self.exchange
        if channel == "allDexsClearinghouseState":
            return _ENC.encode(_AllDexsOut(_AllDexs(user=disc, clearinghouse_states=ex.all_dexs_state(disc))))
        if channel == "clearinghouseState":
            user, dex = disc.split("|", 1)
            state = ex.clearinghouse_state(user, dex)
            return _ENC.encode(_ChStateOut(_ChState(dex=dex, user=user, clearinghouse_state=state)))
        if channel == "spotState":
            return _ENC.encode(_SpotOut(_Spot(user=disc, spot_state=ex.spot_state(disc))))
        return _ENC.encode(_MidsOut(_Mids(mids=ex.mids_of(disc), dex=echo.get("dex"))))

    def _bbo_frame(self, coin: str) -> bytes:
        mid = self.exchange.mids[coin]
        bid = (mid * (1 - BBO_HALF_SPREAD)).quantize(Decimal(1).scaleb(mid.adjusted() - BBO_SIG_FIGS + 1))
        ask = (mid * (1 + BBO_HALF_SPREAD)).quantize(Decimal(1).scaleb(mid.adjusted() - BBO_SIG_FIGS + 1))
        levels = (
            _Level(px=wire_decimal(bid), sz=BBO_LEVEL_SZ, n=1),
            _Level(px=wire_decimal(ask), sz=BBO_LEVEL_SZ, n=1),
        )
        return _ENC.encode(_BboOut(_Bbo(coin=coin, time=self.exchange.now_ms(), bbo=levels)))

    def push_state(self, channels: Collection[str] = _STATE_CHANNELS) -> None:
        """Push clearinghouse, spot and allMids state to every subscriber now (what the periodic tasks do)."""
        for route, subs in list(self._routes.items()):
            if route[0] in channels and subs:
                first = next(iter(subs))
                self._fanout(route[0], list(subs), self._state_frame(route, first.echo))

    def push_mids(self, dexes: Collection[str] | None = None) -> None:
        """Push the allMids map now to its subscribers (of `dexes` only, when given)."""
        if dexes is None:
            routes = [route for route in self._routes if route[0] == "allMids"]
        else:
            routes = [("allMids", dex) for dex in sorted(dexes)]
        for route in routes:
            subs = self._routes.get(route)
            if subs:
                first = next(iter(subs))
                self._fanout("allMids", list(subs), self._state_frame(route, first.echo))

    async def _push_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.clearinghouse_push_interval)
            self.push_state(_ACCOUNT_CHANNELS)

    async def _mids_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.all_mids_interval)
            self.push_mids()

    def push_bbo(self) -> None:
        """Push every subscribed coin's best bid/offer now (what the periodic task does)."""
        for route, subs in list(self._routes.items()):
            if route[0] == "bbo" and subs:
                self._fanout("bbo", list(subs), self._bbo_frame(route[1]))

    async def _bbo_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.bbo_interval)
            self.push_bbo()

    # MarkListener: moved mids are pushed together at most every `MIDS_COALESCE_S`, however many fills moved them.

    def on_mids(self, coins: Collection[str]) -> None:
        self._moved_dexes.update(_mids_dex(coin, self.exchange.universe) for coin in coins)
        if self._mids_flush is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven synchronously (no server loop running): push at once
            self._flush_mids()
            return
        self._mids_flush = loop.call_later(MIDS_COALESCE_S, self._flush_mids)

    def _flush_mids(self) -> None:
        self._mids_flush = None
        dexes, self._moved_dexes = self._moved_dexes, set()
        self.push_mids(dexes)

    def on_funding(self, user: str, event: WireUserFunding) -> None:
        subs = self._routes.get(("user", user))
        if subs:
            self._fanout("user", list(subs), _ENC.encode(_UserEventsOut(_EventFunding(funding=event))))

    # ExchangeListener: encode each batch once, then fan it out.

    def on_fills(self, user: str, fills: Sequence[WireFill]) -> None:
        subs = self._routes.get(("userFills", user))
        if subs:
            self._fanout("userFills", list(subs), _ENC.encode(_UserFillsOut(_FillsStream(user=user, fills=fills))))
        subs = self._routes.get(("user", user))
        if subs:
            self._fanout("user", list(subs), _ENC.encode(_UserEventsOut(_EventFills(fills=fills))))

    def on_order_updates(self, user: str, updates: Sequence[WireOrderUpdate]) -> None:
        subs = self._routes.get(("orderUpdates", user))
        if subs:
            self._fanout("orderUpdates", list(subs), _ENC.encode(_OrderUpdatesOut(updates)))

    def on_trades(self, coin: str, trades: Sequence[WireTrade]) -> None:
        subs = self._routes.get(("trades", coin))
        if subs:
            self._fanout("trades", list(subs), _ENC.encode(_TradesOut(trades)))
        subs = self._routes.get(("bbo", coin))
        if subs:
            self._fanout("bbo", list(subs), self._bbo_frame(coin))

    def on_liquidation(self, user: str, event: WireLiquidationEvent) -> None:
        subs = self._routes.get(("user", user))
        if subs:
            self._fanout("user", list(subs), _ENC.encode(_UserEventsOut(_EventLiquidation(liquidation=event))))

    def on_twap_history(self, user: str, entries: Sequence[WireTwapHistoryEntry]) -> None:
        subs = self._routes.get(("userTwapHistory", user))
        if subs:
            frame = _TwapHistoryOut(_TwapHistory(user=user, history=entries))
            self._fanout("userTwapHistory", list(subs), _ENC.encode(frame))

    # ---------------------------------------------------------------- REST /info

    async def _info_handler(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            req = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            return web.Response(status=HTTP_BAD_REQUEST, text=f"Failed to parse the request body as JSON: {exc}")
        kind = req.get("type") if isinstance(req, dict) else None
        if not isinstance(req, dict) or not isinstance(kind, str):
            return web.Response(
                status=HTTP_UNPROCESSABLE,
                text="Failed to deserialize the JSON body into the target type: missing field `type`",
            )
        await self.faults._hold(kind)
        try:
            result, items = self._info(req)
        except _BadRequest as exc:
            return web.Response(
                status=HTTP_UNPROCESSABLE, text=f"Failed to deserialize the JSON body into the target type: {exc}"
            )
        weight = hl.info_weight(kind, items)
        state = self._ip(request.remote or "unknown")
        if not state.rest.try_take(self._clock(), weight, self.config.rest_weight_per_minute):
            self.stats.rest_429s += 1
            refusal = {"code": HTTP_TOO_MANY, "msg": "Too many requests", "data": None}
            return web.json_response(refusal, status=HTTP_TOO_MANY)
        self.stats.rest_requests += 1
        self.stats.rest_weight_used += weight
        return web.Response(body=_ENC.encode(result), content_type="application/json")

    def _info(self, req: dict[str, Any]) -> tuple[Any, int]:
        """Result of one info request and how many items it returned (for the per-20-items weight)."""
        kind = req.get("type")
        ex = self.exchange
        if kind == "clearinghouseState":
            return ex.clearinghouse_state(_req_user(req), _req_dex(req)), 0
        if kind == "spotClearinghouseState":
            return ex.spot_state(_req_user(req)), 0
        if kind == "orderStatus":
            oid = req.get("oid")
            if not isinstance(oid, int | str) or isinstance(oid, bool):
                raise _BadRequest("invalid type for field `oid`")
            entry = ex.order_status(_req_user(req), oid)
            return ({"status": "order", "order": entry} if entry is not None else {"status": "unknownOid"}), 0
        if kind == "userFills":
            fills = ex.user_fills(_req_user(req), hl.MAX_FILLS_PER_RESPONSE, dex=_req_dex(req))
            return fills, len(fills)
        if kind == "userFillsByTime":
            user = _req_user(req)
            start = _req_int(req, "startTime")
            end = req.get("endTime")
            if end is not None and (not isinstance(end, int) or isinstance(end, bool)):
                raise _BadRequest("invalid type for field `endTime`")
            newest_first = req.get("reversed") is True
            fills = ex.user_fills_by_time(
                user, start, end, hl.MAX_FILLS_PER_RESPONSE, newest_first=newest_first, dex=_req_dex(req)
            )
            return fills, len(fills)
        if kind == "frontendOpenOrders":
            return [o.frontend() for o in ex.open_orders(_req_user(req), _req_dex(req))], 0
        if kind == "openOrders":
            return [o.basic() for o in ex.open_orders(_req_user(req), _req_dex(req))], 0
        if kind == "historicalOrders":
            orders = ex.historical_orders(_req_user(req), hl.MAX_FILLS_PER_RESPONSE)
            return orders, len(orders)
        if kind == "meta":
            return ex.universe.meta(_req_dex(req)), 0
        if kind == "spotMeta":
            return ex.universe.spot_meta(), 0
        if kind == "spotMetaAndAssetCtxs":
            return [ex.universe.spot_meta(), ex.spot_asset_ctxs()], 0
        if kind == "perpDexs":
            return ex.universe.perp_dexs(), 0
        if kind == "metaAndAssetCtxs":
            dex = _req_dex(req)
            return [ex.universe.meta(dex), ex.asset_ctxs(dex)], 0
        if kind == "allMids":
            return ex.mids_of(_req_dex(req)), 0
        if kind == "recentTrades":
            coin = req.get("coin")
            if not isinstance(coin, str) or not ex.universe.is_coin(coin):
                raise _BadRequest("invalid field `coin`")
            trades = list(ex.recent_trades[coin])[-RECENT_TRADES_REST:][::-1]
            return trades, len(trades)
        raise _BadRequest(f"unknown variant `{kind}`")


def _mids_dex(coin: str, universe: Universe) -> str:
    """The dex whose allMids map lists `coin` (spot pairs are listed with the first dex)."""
    perp = universe.perps.get(coin)
    return perp.dex if perp is not None else ""


def _req_user(req: Mapping[str, Any]) -> str:
    try:
        return _address(req.get("user"))
    except _ParseError:
        raise _BadRequest("invalid or missing field `user`") from None


def _req_dex(req: Mapping[str, Any]) -> str:
    dex = req.get("dex", "")
    if dex is None:
        return ""
    if not isinstance(dex, str):
        raise _BadRequest("invalid type for field `dex`")
    return dex


def _req_int(req: Mapping[str, Any], name: str) -> int:
    value = req.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _BadRequest(f"invalid or missing field `{name}`")
    return value
