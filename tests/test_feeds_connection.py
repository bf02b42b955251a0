"""Connection behaviour against a small scripted WebSocket server (real sockets, real frames).

The scripted server speaks just enough of the protocol (normalised ack echoes, pong, error texts) to
force the cases the simulator cannot easily produce on demand: a lost ack, a silent pong, a canary
that stops while the socket keeps flowing, garbage frames, a handler that crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import msgspec
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from hl_monitor.config import HyperliquidConfig
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.connection import (
    Connected,
    Connection,
    ConnEvent,
    ConnState,
    Live,
    Received,
    StaleDetector,
    SubscriptionFailed,
    embedded_subscription,
)
from hl_monitor.feeds.supervisor import Backoff, Supervisor
from hl_monitor.hyperliquid.protocol import AllDexsClearinghouseStateFrame, BboFrame, Subscription
from hl_monitor.metrics import Metrics

USER = "0x31ca8395cf837de08b24da3f660e77761dfb974b"
MIXED_USER = "0x31CA8395cf837de08b24da3f660e77761dfb974B"
_JSON = msgspec.json.Encoder()


def _echo(sub: dict[str, Any]) -> dict[str, Any]:
    out = dict(sub)
    if "user" in out:
        out["user"] = out["user"].lower()
    if out.get("type") == "userFills":
        out.setdefault("aggregateByTime", False)
    return out


def _state_frame(user: str) -> bytes:
    state = {"marginSummary": {"accountValue": "1.0"}, "assetPositions": [], "time": 1}
    return _JSON.encode(
        {"channel": "allDexsClearinghouseState", "data": {"user": user, "clearinghouseStates": [["", state]]}}
    )


def _bbo_frame() -> bytes:
    return _JSON.encode({"channel": "bbo", "data": {"coin": "BTC", "time": 1, "bbo": [None, None]}})


class ScriptedServer:
    """A tiny Hyperliquid look-alike; each knob scripts one misbehaviour."""

    def __init__(self) -> None:
        self.drop_first_ack: set[str] = set()  # subscription types whose first ack is swallowed
        self.answer_pings = True
        self.canary_pushes: int | None = None  # None: push the canary forever; n: only n pushes per connection
        self.push_interval = 0.05
        self.reject_types: set[str] = set()
        self.connections = 0
        self.subscribes: list[dict[str, Any]] = []
        self.extra_frames: list[bytes] = []  # sent right after every ack
        self.held_acks: set[str] = set()  # subscription types whose ack waits for `acks_released`
        self.acks_released = asyncio.Event()
        self._server: Server | None = None
        self._active: dict[str, set[str]] = {}

    @property
    def url(self) -> str:
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def __aenter__(self) -> ScriptedServer:
        self._server = await serve(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, ws: ServerConnection) -> None:
        self.connections += 1
        active: set[str] = set()
        pushes = 0
        push_task: asyncio.Task[None] | None = None
        held: list[asyncio.Task[None]] = []

        async def ack_when_released(ack: bytes) -> None:
            await self.acks_released.wait()
            await ws.send(ack)

        async def pusher(user: str) -> None:
            nonlocal pushes
            while self.canary_pushes is None or pushes < self.canary_pushes:
                await ws.send(_state_frame(user))
                pushes += 1
                await asyncio.sleep(self.push_interval)
            while True:  # the socket keeps flowing on the public channel
                await ws.send(_bbo_frame())
                await asyncio.sleep(self.push_interval)

        try:
            async for message in ws:
                raw = message if isinstance(message, str) else message.decode()
                msg = msgspec.json.decode(raw)
                if msg.get("method") == "ping":
                    if self.answer_pings:
                        await ws.send('{"channel":"pong"}')
                    continue
                sub = msg["subscription"]
                self.subscribes.append(sub)
                key = _JSON.encode(_echo(sub)).decode()
                if sub["type"] in self.reject_types:
                    await ws.send(
                        _JSON.encode(
                            {"channel": "error", "data": f"Error parsing JSON into valid websocket request: {raw}"}
                        )
                    )
                    continue
                if key in active:
                    await ws.send(_JSON.encode({"channel": "error", "data": f"Already subscribed: {key}"}))
                    continue
                active.add(key)
                ack = _JSON.encode(
                    {"channel": "subscriptionResponse", "data": {"method": "subscribe", "subscription": _echo(sub)}}
                )
                if sub["type"] in self.drop_first_ack:
                    self.drop_first_ack.discard(sub["type"])
                elif sub["type"] in self.held_acks:
                    held.append(asyncio.create_task(ack_when_released(ack)))
                else:
                    await ws.send(ack)
                for frame in self.extra_frames:
                    await ws.send(frame)
                if sub["type"] == "allDexsClearinghouseState" and push_task is None:
                    push_task = asyncio.create_task(pusher(sub["user"].lower()))
        finally:
            for task in [*held, *([push_task] if push_task is not None else [])]:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _cfg(url: str, **overrides: Any) -> HyperliquidConfig:
    base: dict[str, Any] = {
        "ws_url": url,
        "ping_interval": 0.2,
        "pong_timeout": 0.3,
        "ack_timeout": 0.2,
        "ack_retries": 2,
        "stale_after": 0.4,
        "reconnect_initial_delay": 0.05,
        "reconnect_max_delay": 0.2,
        "healthy_after": 5.0,
        "request_timeout": 2.0,
    }
    base.update(overrides)
    return HyperliquidConfig(**base)


USER_SUBS = (
    Subscription("userFills", user=MIXED_USER, aggregate_by_time=False),
    Subscription("allDexsClearinghouseState", user=USER),
    Subscription("bbo", coin="BTC"),
)


class Recorder:
    def __init__(self, fail_on: Callable[[ConnEvent], bool] | None = None) -> None:
        self.events: list[ConnEvent] = []
        self.fail_on = fail_on

    async def __call__(self, event: ConnEvent) -> None:
        self.events.append(event)
        if self.fail_on is not None and self.fail_on(event):
            raise RuntimeError("handler bug")

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


async def wait_until(predicate: Callable[[], object], within: float = 5.0) -> None:
    """Poll a condition on live components (there is no event to wait on for "the sim saw N things")."""
    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(conn: Connection) -> AsyncIterator[Connection]:
    task = asyncio.create_task(conn.run())
    try:
        yield conn
    finally:
        conn.stop()
        async with asyncio.timeout(5):
            await task


def _connection(
    cfg: HyperliquidConfig, metrics: Metrics, handler: Recorder, *, name: str = "user-0", subs: Any = USER_SUBS
) -> Connection:
    return Connection(
        name=name,
        kind="user",
        subscriptions=subs,
        handler=handler,
        cfg=cfg,
        budget=Budgets(cfg, metrics),
        metrics=metrics,
        canary_channel="allDexsClearinghouseState",
        rng=random.Random(1),
    )


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"hl_monitor_{name}", labels or None)
    return 0.0 if value is None else value


async def test_subscriptions_are_acked_then_live_and_frames_flow() -> None:
    metrics = Metrics()
    handler = Recorder()
    async with ScriptedServer() as server:
        conn = _connection(_cfg(server.url), metrics, handler)
        async with running(conn):
            await wait_until(lambda: conn.state is ConnState.LIVE and handler.of(Received))
            assert _value(metrics, "connection_state", kind="user", state="live") == 1
            assert _value(metrics, "websocket_connected") == 1
        # The mixed-case address is matched against the lowercase echo.
        assert [type(e) for e in handler.events[:2]] == [Connected, Live]
        assert isinstance(handler.of(Received)[0].frame, AllDexsClearinghouseStateFrame)
    assert conn.state is ConnState.CLOSED
    assert _value(metrics, "connection_state", kind="user", state="live") == 0
    assert _value(metrics, "websocket_connected") == 0


async def test_lost_ack_is_resent_and_already_subscribed_counts_as_the_ack() -> None:
    metrics = Metrics()
    handler = Recorder()
    async with ScriptedServer() as server:
        server.drop_first_ack = {"userFills"}
        conn = _connection(_cfg(server.url), metrics, handler)
        async with running(conn):
            await wait_until(lambda: conn.state is ConnState.LIVE)
        assert _value(metrics, "subscribe_retries_total") == 1
        assert _value(metrics, "error_frames_total", kind="already_subscribed") == 1
        assert server.connections == 1  # recovered without a reconnect
        assert [s["type"] for s in server.subscribes].count("userFills") == 2


async def test_rejected_subscription_is_reported_and_the_rest_goes_live() -> None:
    metrics = Metrics()
    handler = Recorder()
    subs = (*USER_SUBS, Subscription("webData2", user=USER))
    async with ScriptedServer() as server:
        server.reject_types = {"webData2"}
        conn = _connection(_cfg(server.url), metrics, handler, subs=subs)
        async with running(conn):
            # Live is a socket state; the refusal reaches the handler through the event queue, so wait for it too.
            await wait_until(lambda: conn.state is ConnState.LIVE and conn.backlog == 0)
            failed = handler.of(SubscriptionFailed)
            assert len(failed) == 1
            assert failed[0].kind == "parse_error"
            assert failed[0].subscription == Subscription("webData2", user=USER)
        assert _value(metrics, "error_frames_total", kind="parse_error") == 1
        assert server.connections == 1


async def test_unanswered_ack_rebuilds_the_connection() -> None:
    metrics = Metrics()
    handler = Recorder()

    async def never_ack_bbo(ws: ServerConnection) -> None:
        async for raw in ws:
            sub = msgspec.json.decode(raw).get("subscription")
            if sub and sub["type"] != "bbo":
                ack = {"method": "subscribe", "subscription": _echo(sub)}
                await ws.send(_JSON.encode({"channel": "subscriptionResponse", "data": ack}))

    async with serve(never_ack_bbo, "127.0.0.1", 0) as silent:
        port = next(iter(silent.sockets)).getsockname()[1]
        conn = _connection(_cfg(f"ws://127.0.0.1:{port}", ack_retries=1), metrics, handler)
        async with running(conn):
            await wait_until(lambda: _value(metrics, "reconnects_total", kind="user", reason="ack_timeout") >= 1)
            assert not handler.of(Live)
    # One re-send per epoch, then the socket is rebuilt.
    assert _value(metrics, "subscribe_retries_total") >= 1


async def test_each_reconnect_is_a_fresh_session_that_needs_its_own_acks() -> None:
    """A reconnect starts over: a new epoch whose subscriptions are all pending again until the new socket acks
    them (the old socket's acks count for nothing), and a late request naming the old epoch leaves it alone."""
    metrics = Metrics()
    handler = Recorder()
    async with ScriptedServer() as server:
        # No ack re-sends and no stale reconnects: only the held ack decides when the new session goes live.
        conn = _connection(_cfg(server.url, ack_timeout=30.0, stale_after=30.0), metrics, handler)
        async with running(conn):
            await wait_until(lambda: conn.state is ConnState.LIVE)
            assert conn.epoch == 1
            server.held_acks = {"bbo"}  # acked on the first socket, held on the next
            conn.request_reconnect("test", epoch=1)
            # The new socket acked everything but bbo; bbo's ack from epoch 1 does not complete epoch 2.
            await wait_until(lambda: conn.epoch == 2 and conn.status()["pending_acks"] == 1)
            assert conn.state is ConnState.SUBSCRIBING
            conn.request_reconnect("late", epoch=1)  # e.g. a recovery of epoch 1 that just finished
            server.acks_released.set()
            await wait_until(lambda: conn.state is ConnState.LIVE and conn.backlog == 0)
            assert [e.epoch for e in handler.of(Live)] == [1, 2]
            conn.request_reconnect("current", epoch=2)
            await wait_until(lambda: _value(metrics, "reconnects_total", kind="user", reason="current") == 1)
        assert _value(metrics, "reconnects_total", kind="user", reason="late") == 0
        assert _value(metrics, "reconnects_total", kind="user", reason="test") == 1
        assert server.connections == 3


async def test_missing_pong_means_dead_socket() -> None:
    metrics = Metrics()
    handler = Recorder()
    async with ScriptedServer() as server:
        server.answer_pings = False
        conn = _connection(_cfg(server.url, stale_after=30.0), metrics, handler)
        async with running(conn):
            await wait_until(lambda: server.connections >= 2)
            assert _value(metrics, "reconnects_total", kind="user", reason="pong_timeout") >= 1
            await wait_until(lambda: len(handler.of(Live)) >= 2)
        # Every subscription was restored on the new socket.
        assert [s["type"] for s in server.subscribes].count("allDexsClearinghouseState") >= 2


async def test_a_session_ended_by_its_own_tasks_leaves_no_cancel_request_on_the_loop() -> None:
    """A TaskGroup child ending the session leaves a cancel request on the loop's task (Python 3.11). On
    3.11.0-3.11.2 the next backoff's timeout then raised CancelledError and the connection died after its
    first pong timeout; checked directly so every 3.11 patch release catches a regression."""
    metrics = Metrics()
    handler = Recorder()
    async with ScriptedServer() as server:
        server.answer_pings = False
        conn = _connection(_cfg(server.url, stale_after=30.0), metrics, handler)
        task = asyncio.create_task(conn.run())
        try:
            await wait_until(lambda: server.connections >= 3)
            assert task.cancelling() == 0
            assert not task.done()
        finally:
            conn.stop()
            async with asyncio.timeout(5):
                await task


def _is_live(conn: Connection) -> bool:
    return conn.state is ConnState.LIVE


# Enough loop turns after the kick to cross every step of the session's end (TaskGroup abort, socket close).
SESSION_END_TURNS = 40


async def test_a_cancel_while_the_session_is_ending_stops_the_connection() -> None:
    """Cancelled at any point of a session's end (here after 0..N loop turns), `run()` ends. A 3.11/3.12 TaskGroup
    that is already aborting swallows the CancelledError; the connection then reconnected forever and the
    service's shutdown hung on it."""
    async with ScriptedServer() as server:
        for turns in range(SESSION_END_TURNS):
            metrics = Metrics()
            conn = _connection(_cfg(server.url), metrics, Recorder())
            task = asyncio.create_task(conn.run())
            await wait_until(partial(_is_live, conn))
            conn.request_reconnect("test")
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2)  # unlike a timeout around `await`, cancels nothing
            if not done:
                conn.stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                pytest.fail(f"a cancel {turns} loop turns after the kick was lost; the connection kept reconnecting")
            assert task.cancelled()
            assert conn.state is ConnState.CLOSED


async def test_silent_canary_with_flowing_socket_is_stale() -> None:
    metrics = Metrics()
    handler = Recorder()
    async with ScriptedServer() as server:
        server.canary_pushes = 1  # the initial state push, then only bbo frames and pongs
        conn = _connection(_cfg(server.url), metrics, handler)
        async with running(conn):
            await wait_until(lambda: server.connections >= 2)
            assert _value(metrics, "reconnects_total", kind="user", reason="stale_canary") >= 1
            await wait_until(lambda: len(handler.of(Live)) >= 2)
        assert _value(metrics, "reconnects_total", kind="user", reason="pong_timeout") == 0
        assert any(isinstance(e.frame, BboFrame) for e in handler.of(Received))


async def test_garbage_frames_are_counted_and_ignored() -> None:
    metrics = Metrics()
    handler = Recorder()
    async with ScriptedServer() as server:
        server.extra_frames = [
            b"Websocket connection established.",
            b'{"channel":"brandNew","data":{}}',
            b'{"channel":"bbo","data":{"coin":1}}',
            b"[" * 100_000,
        ]
        conn = _connection(_cfg(server.url, stale_after=30.0), metrics, handler)
        async with running(conn):
            await wait_until(lambda: conn.state is ConnState.LIVE and handler.of(Received))
        assert _value(metrics, "frame_decode_errors_total", kind="not_json") >= 1
        assert _value(metrics, "frame_decode_errors_total", kind="unknown_channel") >= 1
        assert _value(metrics, "frame_decode_errors_total", kind="invalid") >= 1
        assert server.connections == 1


async def test_handler_crash_reconnects_only_its_own_connection() -> None:
    metrics = Metrics()
    crashed: list[int] = []

    def crash_once(event: ConnEvent) -> bool:
        if isinstance(event, Received) and not crashed:
            crashed.append(event.epoch)
            return True
        return False

    bad = Recorder(fail_on=crash_once)
    good = Recorder()
    async with ScriptedServer() as server:
        cfg = _cfg(server.url, stale_after=30.0)
        budget = Budgets(cfg, metrics)
        conns = [
            Connection(
                name=name,
                kind="user",
                subscriptions=USER_SUBS,
                handler=handler,
                cfg=cfg,
                budget=budget,
                metrics=metrics,
                canary_channel="allDexsClearinghouseState",
            )
            for name, handler in (("user-0", bad), ("user-1", good))
        ]
        async with running(conns[0]), running(conns[1]):
            await wait_until(lambda: len(bad.of(Live)) >= 2)
            await asyncio.sleep(0.1)
        assert _value(metrics, "handler_errors_total", kind="user") == 1
        assert conns[0].epoch >= 2
        assert conns[1].epoch == 1


def test_embedded_subscription_parses_both_error_forms() -> None:
    sub = embedded_subscription('Already subscribed: {"type":"trades","coin":"ETH"}')
    assert sub == Subscription("trades", coin="ETH")
    text = (
        "Error parsing JSON into valid websocket request: "
        '{"method":"subscribe","subscription":{"type":"webData2","user":"0xAb"}}'
    )
    parsed = embedded_subscription(text)
    assert parsed is not None
    assert parsed.key() == ("webData2", "0xab", None, "")
    assert embedded_subscription("Cannot track more than 15 total users.") is None
    assert embedded_subscription("Already subscribed: {not json") is None


def test_stale_threshold_follows_the_observed_cadence() -> None:
    detector = StaleDetector(15.0)
    detector.reset(0.0)
    for t in range(0, 200, 10):  # the server pushes every 10 s
        detector.on_canary(float(t))
    assert detector.threshold == pytest.approx(30.0)  # 3 missed pushes, not the 15 s default
    assert detector.check(190.0 + 29.0) is None
    assert detector.check(190.0 + 31.0) == "stale_connection"


def test_quiet_server_raises_the_threshold_instead_of_looping() -> None:
    detector = StaleDetector(15.0)
    thresholds = []
    for epoch in range(4):
        start = epoch * 1000.0
        detector.reset(start)
        detector.on_canary(start)  # the initial push after subscribing, then silence
        silent_until = start + detector.threshold + 1
        detector.on_flow(silent_until)  # bbo proves the socket itself flows
        verdict = detector.check(silent_until)
        assert verdict == "stale_canary"
        detector.on_stale(verdict)
        thresholds.append(detector.threshold)
    # Reconnects get exponentially rarer (capped at 20 × base) instead of looping every 15 s.
    assert thresholds == [15.0, 30.0, 60.0, 120.0]
    # Pushes at the normal cadence bring the default back.
    detector.reset(5000.0)
    detector.on_canary(5000.0)
    detector.on_canary(5005.0)
    assert detector.threshold == 15.0


def test_backoff_grows_with_jitter_and_resets() -> None:
    backoff = Backoff(0.5, 4.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(6)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 0.5


async def test_supervisor_restarts_a_crashed_task_and_counts_it() -> None:
    metrics = Metrics()
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")

    async with Supervisor(metrics, initial_delay=0.01, max_delay=0.02) as sup:
        sup.spawn("flaky:1", flaky)
    assert len(runs) == 3
    assert _value(metrics, "task_restarts_total", task="flaky") == 2


async def test_supervisor_name_is_free_once_its_task_finished() -> None:
    """A finished task's name can be spawned again at once, before its done-callback ran (precise restarts)."""
    done = asyncio.Event()

    async def quick() -> None:
        done.set()

    async def forever() -> None:
        await asyncio.Event().wait()

    async with Supervisor(Metrics()) as sup:
        first = sup.spawn("stream:a", quick)
        while not first.done():  # noqa: ASYNC110 - must wake in the pass the task finished in, before its callbacks
            await asyncio.sleep(0)
        assert "stream:a" in sup.running()  # the callback that forgets the name has not run yet
        second = sup.spawn("stream:a", forever)  # the precise manager restarts the stream in the same pass
        with pytest.raises(ValueError, match="already running"):
            sup.spawn("stream:a", forever)
        second.cancel()
