"""One Hyperliquid WebSocket connection: explicit states, acked subscriptions, heartbeat, stale watchdog.

A `Connection` owns its subscriptions for its whole life and restores all of them on every reconnect.
Each (re)connect is an *epoch* and runs one `_Session`: the socket with its pending acks, reader,
pinger and watchdog, built fresh on every connect and dropped with the socket, so nothing of an old
socket (an ack, an end request, a live time) can leak into the next. Everything the connection learns
is turned into an event (`Connected`, `Live`, `Received`, `SubscriptionFailed`, `Disconnected`, or a
`Posted` event a component injects) and put on one bounded queue that a single processor task drains
in order into the handler. So frames of one connection are handled strictly in arrival order, a slow
handler applies backpressure to the socket instead of growing memory, and a handler crash costs only
this connection a reconnect (the owner's gap recovery then re-fetches what the crash may have lost).

Liveness, three layers:
- `{"method":"ping"}` every `ping_interval`; no pong within `pong_timeout` → dead socket → reconnect.
- Every subscribe waits for its ack; a missing ack is re-sent (`subscribe_retries`), after
  `ack_retries` re-sends the connection is rebuilt. `Already subscribed: {..}` counts as an ack (the
  first ack was lost, the subscription is in place).
- `StaleDetector`: a canary channel (on user connections `allDexsClearinghouseState`, pushed about
  every 5 s; on tape connections `bbo` of the busiest coin, because trades may pause for minutes) must keep
  arriving even when pongs do; every other data frame only proves the socket flows. See its docstring for
  the adaptive threshold.

Dialling goes through the per-IP budget: a connection slot for as long as the socket is open, a
new-connection permit (30 a minute) for every dial, and a message permit for every frame sent.
Reconnects back off exponentially with jitter; the backoff resets after `healthy_after` live seconds.
A reconnect that was asked for (`request_reconnect`, a failing handler) redials without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeAlias

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.frames import CloseCode

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import HyperliquidConfig
from hl_monitor.domain.address import Priority
from hl_monitor.errors import FrameDecodeError, ProtocolError
from hl_monitor.feeds.supervisor import Backoff
from hl_monitor.hyperliquid.constants import classify_error_text
from hl_monitor.hyperliquid.protocol import (
    ErrorFrame,
    Frame,
    PongFrame,
    SubAck,
    Subscription,
    SubscriptionResponseFrame,
    decode_frame,
    encode_ping,
    encode_subscribe,
    subscription_from_echo,
)
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = [
    "ConnEvent",
    "ConnState",
    "Connected",
    "Connection",
    "ConnectionBudget",
    "Disconnected",
    "Live",
    "Posted",
    "Received",
    "StaleDetector",
    "SubscriptionFailed",
]

log = get_logger(__name__)

# Frames a connection may hold for its handler: the `orderUpdates` of one active market maker alone came to
# 442 frames in a minute, so this absorbs minutes of a slow handler or a long gap recovery before backpressure.
QUEUE_SIZE: Final = 10_000
# Closing handshake budget: a dead peer must not hold up the reconnect.
CLOSE_TIMEOUT_S: Final = 1.0
# Upper bound of the watchdog period (ack timeouts, stale checks, feed-age gauge); shorter when the
# configured timeouts are shorter (tests).
WATCHDOG_TICK_S: Final = 0.5
# The canary is stale after this many expected pushes went missing (observed cadence × factor).
STALE_CADENCE_FACTOR: Final = 3.0
# Weight of the newest inter-arrival time in the cadence estimate: follows a change within ~5 pushes.
STALE_EWMA_ALPHA: Final = 0.2
# The adaptive threshold never exceeds base × this (15 s → 5 min), so a real stall is still caught.
STALE_CEILING_FACTOR: Final = 20.0
# After this many stale reconnects in a row where the socket itself kept flowing, the server evidently
# does not push idle state: double the threshold instead of reconnecting in a loop.
QUIET_STREAK_TO_ADAPT: Final = 2


class ConnState(enum.StrEnum):
    CONNECTING = "connecting"
    SUBSCRIBING = "subscribing"
    LIVE = "live"
    STALE = "stale"
    BACKING_OFF = "backing_off"
    CLOSED = "closed"


class ConnectionBudget(Protocol):
    """The part of `feeds.budget.Budgets` a connection uses."""

    async def acquire_connection(self) -> _Slot: ...

    async def new_connection_permit(self) -> None: ...

    async def message_permit(self, n: int = 1, priority: Priority = "low") -> None: ...


class _Slot(Protocol):
    def release(self) -> None: ...


# ---------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Connected:
    """A socket is open (before any subscribe was sent)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Live:
    """Every subscription of this epoch is acknowledged (or definitively rejected)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Disconnected:
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class Received:
    """A data frame (acks, pongs and errors are handled by the connection itself)."""

    epoch: int
    frame: Frame
    received_ms: int  # local wall clock


@dataclass(frozen=True, slots=True)
class SubscriptionFailed:
    """An error frame refused a subscription. `subscription` is None when the text does not echo it (user cap)."""

    epoch: int
    kind: str
    text: str
    subscription: Subscription | None


class Posted:
    """Base for events a component injects with `Connection.post` to have them handled in frame order."""


ConnEvent: TypeAlias = Connected | Live | Disconnected | Received | SubscriptionFailed | Posted
Handler: TypeAlias = Callable[[ConnEvent], Awaitable[None]]


# ---------------------------------------------------------------------------------------- staleness


class StaleDetector:
    """Decides when a connection whose socket is alive has stopped delivering its canary channel.

    Threshold = max(floor, STALE_CADENCE_FACTOR × observed canary interval), capped at
    STALE_CEILING_FACTOR × base. `floor` starts at the configured `stale_after`. When the canary went
    silent while other frames kept flowing (the socket is fine, the server just is not pushing) for
    QUIET_STREAK_TO_ADAPT reconnects in a row, the floor doubles, so a server that stops pushing idle
    state costs a few reconnects and then none; as soon as pushes arrive at the base cadence again the
    floor returns to `stale_after`. Pure: the caller passes the time.
    """

    def __init__(self, base: float) -> None:
        if base <= 0:
            raise ValueError(f"stale threshold must be > 0, got {base}")
        self.base = base
        self.ceiling = base * STALE_CEILING_FACTOR
        self.floor = base
        self.interval: float | None = None
        self.quiet_streak = 0
        self._last_canary = 0.0
        self._last_flow = 0.0
        self._fresh = True

    @property
    def threshold(self) -> float:
        value = self.floor
        if self.interval is not None:
            value = max(value, STALE_CADENCE_FACTOR * self.interval)
        return min(value, self.ceiling)

    def reset(self, now: float) -> None:
        """A new epoch went live: the clock starts now and the first push is not an interval."""
        self._last_canary = now
        self._last_flow = now
        self._fresh = True

    def on_canary(self, now: float) -> None:
        if not self._fresh:
            gap = now - self._last_canary
            self.interval = (
                gap if self.interval is None else STALE_EWMA_ALPHA * gap + (1 - STALE_EWMA_ALPHA) * self.interval
            )
            if gap <= self.base:
                self.quiet_streak = 0
                self.floor = self.base
        self._fresh = False
        self._last_canary = now

    def on_flow(self, now: float) -> None:
        self._last_flow = now

    def age(self, now: float) -> float:
        return max(0.0, now - self._last_canary)

    def check(self, now: float) -> str | None:
        """None while fresh; else `stale_canary` (other frames still flow) or `stale_connection`."""
        threshold = self.threshold
        if now - self._last_canary <= threshold:
            return None
        return "stale_canary" if now - self._last_flow <= threshold else "stale_connection"

    def on_stale(self, verdict: str) -> None:
        """Record a stale reconnect; adapt when the server is quiet rather than the socket broken."""
        if verdict != "stale_canary":
            self.quiet_streak = 0
            return
        self.quiet_streak += 1
        if self.quiet_streak >= QUIET_STREAK_TO_ADAPT:
            self.floor = min(self.ceiling, self.floor * 2)


# ---------------------------------------------------------------------------------------- connection

# The reason a session ends with when `stop()` ended it: the connection does not reconnect after it.
STOPPED: Final = "stopped"


class _SessionEnd(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(slots=True)
class _PendingAck:
    subscription: Subscription
    sent_at: float
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class _Drained:
    """Queued last by `run()`: every event before it has been handled, so the processor ends."""


_QueueItem: TypeAlias = ConnEvent | _Drained
_AckKey: TypeAlias = tuple[str, str | None, str | None, str]


_ECHO_DECODER: Final = msgspec.json.Decoder(dict[str, Any])


def embedded_subscription(text: str) -> Subscription | None:
    """The subscription an error text echoes (`Already subscribed: {..}`, `Error parsing ...: {"method":..}`)."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj = _ECHO_DECODER.decode(text[start:].encode())
        if isinstance(obj.get("subscription"), dict):
            obj = obj["subscription"]
        return subscription_from_echo(obj)
    except (msgspec.DecodeError, ProtocolError, ValueError, TypeError):
        return None


def _channel(frame: Frame) -> str:
    tag = type(frame).__struct_config__.tag
    return str(tag)


class Connection:
    """See the module docstring. Run with `await run()`; end with `stop()`.

    The connection keeps what outlives a socket: the reconnect loop with its backoff, the event queue
    and its processor, the state machine, the epoch counter and the stale detector (its adaptive
    threshold learns across reconnects). Everything that belongs to one socket lives in its `_Session`.
    """

    def __init__(
        self,
        *,
        name: str,
        kind: str,
        subscriptions: Sequence[Subscription],
        handler: Handler,
        cfg: HyperliquidConfig,
        budget: ConnectionBudget,
        metrics: Metrics,
        canary_channel: str | None = None,
        queue_size: int = QUEUE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _wall_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.subscriptions = list(subscriptions)
        self._handler = handler
        self._cfg = cfg
        self._budget = budget
        self._metrics = metrics
        self._canary_channel = canary_channel
        self._stale = StaleDetector(cfg.stale_after) if canary_channel else None
        self._clock = clock
        self._wall_ms = wall_ms
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue(maxsize=queue_size)
        self._state = ConnState.CLOSED
        metrics.connection_state.labels(kind=kind, state=ConnState.CLOSED.value).inc()
        self.epoch = 0
        self.reconnect_count = 0
        self.last_disconnect: str | None = None
        self._session: _Session | None = None
        self._stopped = asyncio.Event()
        self._last_frame = clock()
        self._handling = False

    # ------------------------------------------------------------------ public

    @property
    def state(self) -> ConnState:
        return self._state

    @property
    def stale_threshold(self) -> float | None:
        return None if self._stale is None else self._stale.threshold

    def feed_age(self, now: float | None = None) -> float:
        """Seconds since the canary (or, without one, any data frame) last arrived."""
        now = self._clock() if now is None else now
        if self._stale is not None:
            return self._stale.age(now)
        return max(0.0, now - self._last_frame)

    @property
    def backlog(self) -> int:
        """Events received or posted but not yet fully handled (the one in the handler counts)."""
        return self._queue.qsize() + self._handling

    def status(self) -> dict[str, Any]:
        session = self._session
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self._state.value,
            "epoch": self.epoch,
            "feed_age_s": round(self.feed_age(), 3),
            "stale_threshold_s": self.stale_threshold,
            "pending_acks": 0 if session is None else len(session.pending),
            "reconnects": self.reconnect_count,
            "last_disconnect": self.last_disconnect,
        }

    def stop(self) -> None:
        """End the connection for good; `run()` returns once the queue is drained."""
        self._stopped.set()
        if self._session is not None:
            self._session.end(STOPPED)

    def request_reconnect(self, reason: str, epoch: int | None = None) -> None:
        """Drop the current socket and reconnect (ignored if `epoch` is given and already over)."""
        session = self._session
        if session is None or (epoch is not None and epoch != session.epoch):
            return
        if self._state not in (ConnState.SUBSCRIBING, ConnState.LIVE, ConnState.STALE):
            return  # a socket still opening or already closing is left to finish; only a subscribed one is dropped
        session.end(reason)

    async def post(self, event: Posted) -> None:
        """Have `event` handled after every frame received so far (bounded: waits when the queue is full)."""
        await self._emit(event)

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._process(), name=f"{self.name}:process")
                await self._connect_loop()
                await self._queue.put(_Drained())
        finally:
            self._set_state(ConnState.CLOSED)
            self._metrics.connection_state.labels(kind=self.kind, state=ConnState.CLOSED.value).dec()
            with contextlib.suppress(KeyError):
                self._metrics.feed_age_seconds.remove(self.name)

    # ------------------------------------------------------------------ internals

    def _set_state(self, new: ConnState) -> None:
        old = self._state
        if old is new:
            return
        gauge = self._metrics.connection_state
        gauge.labels(kind=self.kind, state=old.value).dec()
        gauge.labels(kind=self.kind, state=new.value).inc()
        if old is ConnState.LIVE:
            self._metrics.websocket_connected.dec()
        if new is ConnState.LIVE:
            self._metrics.websocket_connected.inc()
        self._state = new
        log.debug("connection state", connection=self.name, state=new.value, previous=old.value)

    async def _emit(self, event: ConnEvent) -> None:
        if self._queue.full():
            self._metrics.message_queue_full.inc()
        await self._queue.put(event)
        self._metrics.message_queue_size.inc()

    async def _process(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, _Drained):
                return
            self._metrics.message_queue_size.dec()
            self._handling = True
            try:
                await self._handler(item)
            except Exception:
                self._metrics.handler_errors.labels(kind=self.kind).inc()
                log.exception(
                    "frame handler failed; reconnecting", connection=self.name, event_type=type(item).__name__
                )
                # Posted events name the epoch they belong to when they have one, like the connection's own.
                self.request_reconnect("handler_error", getattr(item, "epoch", None))
            finally:
                self._handling = False
            if not self._queue.empty():
                # A backlog never suspends `get()`: without this yield the whole backlog is one loop step, and
                # every other socket, ack and timer waits behind it (docs/architecture.md §10, one event per step).
                await asyncio.sleep(0)

    def _saw_data(self, channel: str, now: float) -> None:
        """A data frame arrived: feeds the feed age and the stale detector (both span sessions)."""
        self._last_frame = now
        if self._stale is not None:
            if channel == self._canary_channel:
                self._stale.on_canary(now)
            else:
                self._stale.on_flow(now)

    async def _sleep_or_stop(self, delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                await self._stopped.wait()
        except TimeoutError:
            pass

    async def _connect_loop(self) -> None:
        backoff = Backoff(self._cfg.reconnect_initial_delay, self._cfg.reconnect_max_delay, rng=self._rng)
        first = True
        wait = True
        while not self._stopped.is_set():
            if not first:
                delay = backoff.next_delay()
                self._set_state(ConnState.BACKING_OFF)
                if wait:
                    await self._sleep_or_stop(delay)
                if self._stopped.is_set():
                    return
            first = False
            self._set_state(ConnState.CONNECTING)
            slot = await self._budget.acquire_connection()
            try:
                await self._budget.new_connection_permit()
                if self._stopped.is_set():
                    return
                reason, live_for, requested = await self._connect_once()
            finally:
                slot.release()
            # A reconnect someone asked for (handler error, missed fills) redials at once: the socket was not
            # failing, so there is nothing to back off from; the budget's new-connection permits still bound it.
            wait = not requested
            if live_for >= self._cfg.healthy_after:
                backoff.reset()
            self.last_disconnect = reason
            if reason != STOPPED:
                self.reconnect_count += 1
                self._metrics.reconnects.labels(kind=self.kind, reason=reason).inc()
                log.info("connection lost; reconnecting", connection=self.name, reason=reason)

    async def _connect_once(self) -> tuple[str, float, bool]:
        """Dial and run one session: (why it ended, seconds it was live, whether `end` was asked of it)."""
        try:
            ws = await connect(
                self._cfg.ws_url,
                open_timeout=self._cfg.request_timeout,
                ping_interval=None,  # Hyperliquid wants data-frame pings; the session's pinger does them
                close_timeout=CLOSE_TIMEOUT_S,
                max_size=self._cfg.max_frame_bytes,
                proxy=None,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            log.warning("connect failed", connection=self.name, error=repr(exc))
            return "connect_failed", 0.0, False
        self.epoch += 1
        session = _Session(self, ws, self.epoch)
        self._session = session
        if self._stopped.is_set():
            session.end(STOPPED)  # `stop()` landed while dialling, before there was a session to end
        try:
            reason = await session.run()
        finally:
            self._session = None
        return reason, session.live_for(self._clock()), session.end_requested


class _Session:
    """One socket's life, from the open socket to its close; a reconnect builds a new one.

    Owns the socket, its epoch, the acks it still waits for, the time it went live and its reader,
    pinger and watchdog tasks. It drives the connection's state (SUBSCRIBING → LIVE, or STALE) and
    emits `Connected`, `Live`, `Received`, `SubscriptionFailed` and `Disconnected` for its epoch.
    """

    def __init__(self, conn: Connection, ws: ClientConnection, epoch: int) -> None:
        self._conn = conn
        self._cfg = conn._cfg
        self._metrics = conn._metrics
        self._clock = conn._clock
        self._ws = ws
        self.epoch = epoch
        self.pending: dict[_AckKey, _PendingAck] = {}
        self.live_since: float | None = None
        self._pong = asyncio.Event()
        self._ended = asyncio.Event()
        self._end_reason = "kicked"

    @property
    def end_requested(self) -> bool:
        """Whether `end` was called (by `stop()`, `request_reconnect` or a failing handler)."""
        return self._ended.is_set()

    def live_for(self, now: float) -> float:
        return 0.0 if self.live_since is None else now - self.live_since

    def end(self, reason: str) -> None:
        """Close this session soon with `reason`: the first one wins, except that stopping always does."""
        if reason == STOPPED or not self._ended.is_set():
            self._end_reason = reason
        self._ended.set()

    async def run(self) -> str:
        """Subscribe, stay live until something ends the session, close the socket: why it ended."""
        conn = self._conn
        self._metrics.pool_manager_connection_count.inc()
        reason = "closed"
        task = asyncio.current_task()
        cancel_requests = task.cancelling() if task is not None else 0
        try:
            await conn._emit(Connected(self.epoch))
            conn._set_state(ConnState.SUBSCRIBING)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._reader())
                tg.create_task(self._pinger())
                tg.create_task(self._watchdog())
                await self._subscribe_all()
                # The body lasts as long as the session, so a child that ends it always cancels a running body and
                # the TaskGroup takes that request back; on 3.11/3.12 it does not when the body already waits in
                # `__aexit__` (left over, the request broke every later `asyncio.timeout` on 3.11.0-3.11.2).
                await self._wait_end()
        except* _SessionEnd as group:
            reason = next(e.reason for e in group.exceptions if isinstance(e, _SessionEnd))
        except* ConnectionClosed as group:
            reason = self._closed_reason(group.exceptions[0])
        except* (OSError, TimeoutError):
            reason = "io_error"
        finally:
            await self._ws.close()
            self._metrics.pool_manager_connection_count.dec()
            if conn.state is ConnState.LIVE or conn.state is ConnState.SUBSCRIBING:
                conn._set_state(ConnState.CONNECTING)
        if task is not None and task.cancelling() > cancel_requests:
            # Cancelled while the TaskGroup was already ending the session: before 3.13 it swallows that
            # CancelledError (the children's errors win) and the loop would reconnect forever; `stop()` by
            # cancellation must end it.
            raise asyncio.CancelledError
        await conn._emit(Disconnected(self.epoch, reason))
        return reason

    def _closed_reason(self, closed: BaseException) -> str:
        if not isinstance(closed, ConnectionClosed):
            return "dropped"
        if closed.sent is not None and closed.sent.code == CloseCode.MESSAGE_TOO_BIG:
            # websockets refused a frame above max_frame_bytes and failed the connection with 1009.
            self._metrics.frame_decode_errors.labels(kind="too_big").inc()
            log.warning(
                "frame larger than hyperliquid.max_frame_bytes refused; reconnecting",
                connection=self._conn.name,
                max_frame_bytes=self._cfg.max_frame_bytes,
            )
            return "frame_too_big"
        return "server_closed" if closed.rcvd is not None else "dropped"

    async def _wait_end(self) -> None:
        await self._ended.wait()
        raise _SessionEnd(self._end_reason)

    async def _send(self, data: bytes) -> None:
        # Subscribes and pings are what keeps a feed alive: they take the high-priority share.
        await self._conn._budget.message_permit(1, "high")
        await self._ws.send(data, text=True)

    async def _subscribe_all(self) -> None:
        # All pending before the first send: an early ack must not make the session live too soon.
        now = self._clock()
        subscriptions = self._conn.subscriptions
        for sub in subscriptions:
            self.pending[sub.key()] = _PendingAck(sub, now)
        for sub in subscriptions:
            await self._send(encode_subscribe(sub))
        await self._maybe_live()

    async def _maybe_live(self) -> None:
        conn = self._conn
        if self.pending or self.live_since is not None or conn.state is not ConnState.SUBSCRIBING:
            return
        now = self._clock()
        self.live_since = now
        if conn._stale is not None:
            conn._stale.reset(now)
        conn._set_state(ConnState.LIVE)
        await conn._emit(Live(self.epoch))

    async def _reader(self) -> None:
        conn = self._conn
        while True:
            raw = await self._ws.recv(decode=False)
            now = self._clock()
            try:
                frame = decode_frame(raw)
            except FrameDecodeError as exc:
                self._metrics.frame_decode_errors.labels(kind=exc.kind).inc()
                if exc.kind == "not_json":
                    log.debug("ignoring non-JSON frame", connection=conn.name, detail=exc.detail[:200])
                else:
                    log.warning("undecodable frame", connection=conn.name, kind=exc.kind, detail=exc.detail[:300])
                continue
            channel = _channel(frame)
            self._metrics.frames_received.labels(channel=channel).inc()
            match frame:
                case PongFrame():
                    self._pong.set()
                case SubscriptionResponseFrame(data=ack):
                    await self._on_ack(ack)
                case ErrorFrame(data=text):
                    await self._on_error(text)
                case _:  # every other channel carries data for the handler
                    conn._saw_data(channel, now)
                    await conn._emit(Received(self.epoch, frame, conn._wall_ms()))

    async def _on_ack(self, ack: SubAck) -> None:
        if ack.method != "subscribe":
            return
        try:
            key = subscription_from_echo(ack.subscription).key()
        except ProtocolError as exc:
            self._metrics.frame_decode_errors.labels(kind="invalid").inc()
            log.warning("ack without a usable echo", connection=self._conn.name, error=str(exc))
            return
        if self.pending.pop(key, None) is not None:
            await self._maybe_live()

    async def _on_error(self, text: str) -> None:
        kind = classify_error_text(text)
        self._metrics.error_frames.labels(kind=kind).inc()
        sub = embedded_subscription(text)
        log.warning("error frame", connection=self._conn.name, kind=kind, text=text[:300])
        if kind == "already_subscribed":
            # The first ack was lost and our re-send hit the live subscription: that is an ack.
            if sub is not None and self.pending.pop(sub.key(), None) is not None:
                await self._maybe_live()
            return
        if kind in ("invalid_subscription", "parse_error") and sub is not None:
            # Re-sending a request the server cannot parse is pointless: give it up and say so.
            self.pending.pop(sub.key(), None)
            await self._conn._emit(SubscriptionFailed(self.epoch, kind, text, sub))
            await self._maybe_live()
        elif kind == "user_cap":
            await self._conn._emit(SubscriptionFailed(self.epoch, kind, text, None))

    async def _pinger(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.ping_interval)
            self._pong.clear()
            await self._send(encode_ping())
            try:
                async with asyncio.timeout(self._cfg.pong_timeout):
                    await self._pong.wait()
            except TimeoutError:
                raise _SessionEnd("pong_timeout") from None

    async def _watchdog(self) -> None:
        conn = self._conn
        cfg = self._cfg
        tick = min(WATCHDOG_TICK_S, cfg.ack_timeout / 4, cfg.stale_after / 4)
        gauge = self._metrics.feed_age_seconds.labels(connection=conn.name)
        while True:
            await asyncio.sleep(tick)
            now = self._clock()
            await self._resend_unacked(now)
            gauge.set(conn.feed_age(now))
            stale = conn._stale
            if stale is not None and conn.state is ConnState.LIVE:
                verdict = stale.check(now)
                if verdict is not None:
                    threshold = stale.threshold
                    stale.on_stale(verdict)
                    conn._set_state(ConnState.STALE)
                    log.warning(
                        "feed stale; reconnecting",
                        connection=conn.name,
                        verdict=verdict,
                        age=round(stale.age(now), 3),
                        threshold=threshold,
                    )
                    raise _SessionEnd(verdict)

    async def _resend_unacked(self, now: float) -> None:
        for pending in list(self.pending.values()):
            if now - pending.sent_at < self._cfg.ack_timeout:
                continue
            if pending.attempts > self._cfg.ack_retries:
                raise _SessionEnd("ack_timeout")
            pending.attempts += 1
            pending.sent_at = now
            self._metrics.subscribe_retries.inc()
            log.info(
                "ack timed out; re-subscribing", connection=self._conn.name, subscription=pending.subscription.type
            )
            await self._send(encode_subscribe(pending.subscription))
