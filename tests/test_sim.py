"""The simulator's WebSocket side, driven by a plain `websockets` client.

Every JSON frame a test receives goes through `decode_frame` (see `recv`), so each test also proves the
sim speaks what our own client decodes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from hl_monitor.errors import FrameDecodeError
from hl_monitor.hyperliquid import constants as hl
from hl_monitor.hyperliquid.protocol import (
    AllDexsClearinghouseStateFrame,
    ClearinghouseStateFrame,
    Fill,
    OrderUpdatesFrame,
    SpotStateFrame,
    Subscription,
    SubscriptionResponseFrame,
    TradesFrame,
    UserEventsFrame,
    UserFillsFrame,
    UserTwapHistoryFrame,
    decode_frame,
    subscription_from_echo,
)
from hl_monitor.sim.server import SimConfig, SimServer
from tests.support.waiting import wait_until

W1 = "0x" + "a1" * 20
W2 = "0x" + "b2" * 20
W3 = "0x" + "c3" * 20
RECV_TIMEOUT = 3.0


def check(raw: str | bytes) -> dict[str, Any]:
    """Decode with our own client's decoder (must not raise) and return the plain JSON."""
    decode_frame(raw)
    out: dict[str, Any] = msgspec.json.decode(raw)
    return out


async def recv(ws: ClientConnection, within: float = RECV_TIMEOUT) -> dict[str, Any]:
    return check(await asyncio.wait_for(ws.recv(), within))


async def recv_channel(ws: ClientConnection, channel: str, within: float = RECV_TIMEOUT) -> dict[str, Any]:
    """The next frame on `channel`, skipping others."""
    async with asyncio.timeout(within):
        while True:
            frame = check(await ws.recv())
            if frame["channel"] == channel:
                return frame


async def first_of(ws: ClientConnection, channels: set[str], within: float = RECV_TIMEOUT) -> dict[str, Any]:
    """The first frame of each channel in `channels`, whatever order they arrive in."""
    out: dict[str, Any] = {}
    async with asyncio.timeout(within):
        while set(out) != channels:
            frame = check(await ws.recv())
            if frame["channel"] in channels:
                out.setdefault(frame["channel"], frame)
    return out


async def send(ws: ClientConnection, msg: dict[str, Any]) -> None:
    await ws.send(json.dumps(msg))


async def subscribe(ws: ClientConnection, sub: dict[str, Any]) -> dict[str, Any]:
    """Subscribe and return the ack's echo."""
    await send(ws, {"method": "subscribe", "subscription": sub})
    ack = await recv_channel(ws, "subscriptionResponse")
    assert ack["data"]["method"] == "subscribe"
    echo: dict[str, Any] = ack["data"]["subscription"]
    return echo


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig()) as server:
        yield server


# ---------------------------------------------------------------------------------------- acks, snapshots


async def test_userfills_ack_echo_is_normalised(sim: SimServer) -> None:
    """Mixed-case user is echoed lowercase and aggregateByTime:false is added, so the client can match it."""
    mixed = "0x" + "A1" * 20
    async with connect(sim.ws_url) as ws:
        await send(ws, {"method": "subscribe", "subscription": {"type": "userFills", "user": mixed}})
        raw = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
    frame = decode_frame(raw)
    assert isinstance(frame, SubscriptionResponseFrame)
    assert frame.data.subscription == {"type": "userFills", "user": W1, "aggregateByTime": False}
    assert subscription_from_echo(frame.data.subscription).key() == Subscription("userFills", user=mixed).key()


async def test_userfills_snapshot_on_every_subscribe(sim: SimServer) -> None:
    """Every subscribe gets an isSnapshot:true frame (empty for a fresh user), oldest fill first."""
    sub = {"type": "userFills", "user": W1}
    async with connect(sim.ws_url) as ws:
        await subscribe(ws, sub)
        empty = await recv_channel(ws, "userFills")
        assert empty["data"] == {"isSnapshot": True, "user": W1, "fills": []}
        w = sim.exchange.whale(W1)
        await w.market_order("BTC", True, "1", "80000")
        await w.market_order("ETH", False, "2", "2300")
        await recv_channel(ws, "userFills")
        await recv_channel(ws, "userFills")
        await send(ws, {"method": "unsubscribe", "subscription": sub})
        await recv_channel(ws, "subscriptionResponse")
        await subscribe(ws, sub)
        snap = await recv_channel(ws, "userFills")
    assert snap["data"]["isSnapshot"] is True
    assert [f["coin"] for f in snap["data"]["fills"]] == ["BTC", "ETH"]


async def test_snapshot_size_is_configurable() -> None:
    """The WS snapshot carries only the newest `fills_snapshot_size` fills."""
    async with SimServer(SimConfig(fills_snapshot_size=2)) as sim, connect(sim.ws_url) as ws:
        await sim.exchange.whale(W1).market_order("BTC", True, "0.5", "80000", fills=5)
        await subscribe(ws, {"type": "userFills", "user": W1})
        snap = await recv_channel(ws, "userFills")
    frame = decode_frame(json.dumps(snap))
    assert isinstance(frame, UserFillsFrame)
    assert len(frame.data.fills) == 2
    assert frame.data.fills[0].tid < frame.data.fills[1].tid


async def test_stream_fill_frames_carry_user_and_exact_fill_fields(sim: SimServer) -> None:
    """Stream frames have `user`, no isSnapshot; fills have decimal strings, twapId null, no null cloid."""
    w = sim.exchange.whale(W1)
    async with connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "userFills", "user": W1})
        await recv_channel(ws, "userFills")
        await w.market_order("BTC", True, "1.5", "80000", fills=3, px_step=1)
        frame = await recv_channel(ws, "userFills")
        await w.market_order("BTC", False, "2.5", "80100", cloid="0x" + "0f" * 16)
        flip = await recv_channel(ws, "userFills")
    data = frame["data"]
    assert set(data) == {"user", "fills"}
    assert data["user"] == W1
    first = data["fills"][0]
    assert first["startPosition"] == "0.0"
    assert first["dir"] == "Open Long"
    assert first["side"] == "B"
    assert isinstance(first["px"], str)
    assert isinstance(first["sz"], str)
    assert isinstance(first["closedPnl"], str)
    assert first["twapId"] is None
    assert "cloid" not in first
    assert "liquidation" not in first
    assert first["oid"] > 2**32
    assert first["crossed"] is True
    assert [f["startPosition"] for f in data["fills"]] == ["0.0", "0.5", "1.0"]
    assert [f["px"] for f in data["fills"]] == ["80000.0", "80001.0", "80002.0"]
    tids = [f["tid"] for f in data["fills"]]
    assert tids == sorted(tids)
    assert len(set(tids)) == 3
    (flip_fill,) = flip["data"]["fills"]
    assert flip_fill["dir"] == "Long > Short"
    assert flip_fill["startPosition"] == "1.5"
    assert flip_fill["cloid"] == "0x" + "0f" * 16
    # closed 1.5 long at entry 80001 → 80100: pnl (80100 - 80001) * 1.5
    assert Decimal(flip_fill["closedPnl"]) == Decimal("148.5")


async def test_order_updates_have_no_user_and_no_null_cloid(sim: SimServer) -> None:
    """orderUpdates: open on placement; canceled keeps the remainder; a market order is open+filled."""
    w = sim.exchange.whale(W1)
    async with connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "orderUpdates", "user": W1})
        oid = await w.limit_order("ETH", True, "3", "2200")
        opened = await recv_channel(ws, "orderUpdates")
        await w.fill(oid, "1")
        await w.cancel(oid)
        canceled = await recv_channel(ws, "orderUpdates")
        await w.market_order("SOL", False, "10", "95", cloid="0x" + "ab" * 16)
        market = await recv_channel(ws, "orderUpdates")
    for frame in (opened, canceled, market):
        assert "user" not in json.dumps(frame)
    (o,) = opened["data"]
    assert o["status"] == "open"
    assert o["order"]["oid"] == oid
    assert "cloid" not in o["order"]
    (c,) = canceled["data"]
    assert c["status"] == "canceled"
    assert c["order"]["sz"] == "2.0"
    assert c["order"]["origSz"] == "3.0"
    assert c["order"]["timestamp"] == o["order"]["timestamp"]
    assert [u["status"] for u in market["data"]] == ["open", "filled"]
    assert market["data"][1]["order"]["sz"] == "0.0"
    assert market["data"][0]["order"]["cloid"] == "0x" + "ab" * 16
    decoded = decode_frame(json.dumps(market))
    assert isinstance(decoded, OrderUpdatesFrame)
    assert decoded.data[0].order.oid > 2**32


async def test_no_order_update_on_partial_fill(sim: SimServer) -> None:
    """A partial maker fill sends the fill but no order update; the last fill sends `filled`."""
    w = sim.exchange.whale(W1)
    async with connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "orderUpdates", "user": W1})
        oid = await w.limit_order("ETH", False, "3", "2400")
        await recv_channel(ws, "orderUpdates")
        await w.fill(oid, "1")
        await w.fill(oid)
        # Frames on one socket arrive in order: an update for the partial fill would come before this one.
        done = await recv_channel(ws, "orderUpdates")
    assert [(u["status"], u["order"]["sz"]) for u in done["data"]] == [("filled", "0.0")]


# ---------------------------------------------------------------------------------------- errors and limits


async def test_error_texts_and_socket_stays_open(sim: SimServer) -> None:
    """Duplicate subscribe, stray unsubscribe, unknown type/method and webData2 answer with the real texts."""
    async with connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "trades", "coin": "BTC"})
        await send(ws, {"method": "subscribe", "subscription": {"type": "trades", "coin": "BTC"}})
        dup = await recv_channel(ws, "error")
        await send(ws, {"method": "unsubscribe", "subscription": {"type": "trades", "coin": "ETH"}})
        unsub = await recv_channel(ws, "error")
        raw_web = f'{{"method":"subscribe","subscription":{{"type":"webData2","user":"{W1}"}}}}'
        await ws.send(raw_web)
        web = await recv_channel(ws, "error")
        raw_bad = '{"method":"subscribe","xsubscription":{"type":"bbo","coin":"SOL"}}'
        await ws.send(raw_bad)
        bad = await recv_channel(ws, "error")
        await ws.send('{"method":"dance"}')
        method = await recv_channel(ws, "error")
        await ws.send("not json")
        garbage = await recv_channel(ws, "error")
        await send(ws, {"method": "subscribe", "subscription": {"type": "trades", "coin": "NOPE"}})
        unknown_coin = await recv_channel(ws, "error")
        await send(ws, {"method": "ping"})
        pong = await recv_channel(ws, "pong")
    assert dup["data"] == 'Already subscribed: {"type":"trades","coin":"BTC"}'
    assert unsub["data"] == 'Already unsubscribed: {"type":"trades","coin":"ETH"}'
    assert web["data"] == f"{hl.PARSE_ERROR_PREFIX}: {raw_web}"
    assert bad["data"] == f"{hl.PARSE_ERROR_PREFIX}: {raw_bad}"
    assert method["data"] == f'{hl.PARSE_ERROR_PREFIX}: {{"method":"dance"}}'
    assert garbage["data"] == f"{hl.PARSE_ERROR_PREFIX}: not json"
    assert unknown_coin["data"].startswith(hl.INVALID_SUBSCRIPTION_PREFIX)
    assert pong == {"channel": "pong"}
    assert hl.classify_error_text(dup["data"]) == "already_subscribed"
    assert hl.classify_error_text(web["data"]) == "parse_error"


async def test_user_cap_counts_distinct_users_per_ip() -> None:
    """max_users distinct addresses across connections; more types or another socket for one user are free."""
    async with SimServer(SimConfig(max_users=2)) as sim:
        async with connect(sim.ws_url) as a, connect(sim.ws_url) as b:
            await subscribe(a, {"type": "userFills", "user": W1})
            await subscribe(a, {"type": "orderUpdates", "user": W1})
            await subscribe(b, {"type": "orderUpdates", "user": W2})
            await subscribe(b, {"type": "allDexsClearinghouseState", "user": W1})
            await send(b, {"method": "subscribe", "subscription": {"type": "userFills", "user": W3}})
            err = await recv_channel(b, "error")
            assert err == {"channel": "error", "data": "Cannot track more than 2 total users."}
            assert hl.classify_error_text(err["data"]) == "user_cap"
            await subscribe(b, {"type": "trades", "coin": "BTC"})  # user-less subscriptions are not capped
            # unsubscribe frees W2's slot at once
            await send(b, {"method": "unsubscribe", "subscription": {"type": "orderUpdates", "user": W2}})
            await recv_channel(b, "subscriptionResponse")
            await subscribe(b, {"type": "userFills", "user": W3})
        # closing both connections frees every slot
        async with connect(sim.ws_url) as c:
            await subscribe(c, {"type": "userFills", "user": W2})
            await subscribe(c, {"type": "userFills", "user": W3})


async def test_connection_limit_refuses_upgrade_with_429() -> None:
    """The connection past max_connections is refused with HTTP 429; closing one makes room."""
    async with SimServer(SimConfig(max_connections=2)) as sim:
        async with connect(sim.ws_url), connect(sim.ws_url) as second:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(sim.ws_url):
                    pass
            assert refused.value.response.status_code == 429
            await second.close()
            await wait_until(lambda: len(sim.connections) == 1, RECV_TIMEOUT, "one connection left")
            async with connect(sim.ws_url) as third:
                await send(third, {"method": "ping"})
                assert await recv(third) == {"channel": "pong"}
        assert sim.stats.connections_refused == 1


async def test_new_connection_rate_refuses_with_429() -> None:
    """More than max_new_connections_per_minute upgrades in a minute are refused, until the minute passes."""
    now = [1000.0]
    async with SimServer(SimConfig(max_new_connections_per_minute=2), clock=lambda: now[0]) as sim:
        for _ in range(2):
            async with connect(sim.ws_url):
                pass
        with pytest.raises(InvalidStatus) as refused:
            async with connect(sim.ws_url):
                pass
        assert refused.value.response.status_code == 429
        now[0] += 61
        async with connect(sim.ws_url) as ws:
            await send(ws, {"method": "ping"})
            assert await recv(ws) == {"channel": "pong"}


async def test_message_rate_limit_sends_error_then_closes() -> None:
    """The message past max_client_messages_per_minute gets an error frame, then a 1008 close."""
    async with SimServer(SimConfig(max_client_messages_per_minute=3)) as sim, connect(sim.ws_url) as ws:
        for _ in range(3):
            await send(ws, {"method": "ping"})
            assert await recv(ws) == {"channel": "pong"}
        await send(ws, {"method": "ping"})
        err = await recv(ws)
        with pytest.raises(ConnectionClosed):
            await recv(ws)
    assert err["channel"] == "error"
    assert "3 messages" in err["data"]
    assert ws.close_code == 1008
    assert sim.stats.rate_limit_closes == 1


async def test_subscription_cap() -> None:
    """Subscriptions past max_subscriptions are refused with an error frame; the socket stays usable."""
    async with SimServer(SimConfig(max_subscriptions=2)) as sim, connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "trades", "coin": "BTC"})
        await subscribe(ws, {"type": "trades", "coin": "ETH"})
        await send(ws, {"method": "subscribe", "subscription": {"type": "trades", "coin": "SOL"}})
        err = await recv_channel(ws, "error")
        await send(ws, {"method": "unsubscribe", "subscription": {"type": "trades", "coin": "ETH"}})
        await recv_channel(ws, "subscriptionResponse")
        await subscribe(ws, {"type": "trades", "coin": "SOL"})
    assert "2 total subscriptions" in err["data"]


@pytest.mark.looptime
async def test_ping_pong_and_idle_timeout_closes_abruptly() -> None:
    """Pings keep a socket alive past the idle timeout; a silent socket is dropped without a close frame.

    On looptime's loop clock (the simulator's idle timer is a loop-time receive timeout): the windows are exact.
    """
    async with SimServer(SimConfig(idle_timeout=0.3)) as sim:
        async with connect(sim.ws_url, ping_interval=None) as pinging:
            for _ in range(6):  # 0.6 s of pings every 0.1 s: twice the idle timeout
                await send(pinging, {"method": "ping"})
                assert await recv(pinging) == {"channel": "pong"}
                await asyncio.sleep(0.1)
        async with connect(sim.ws_url, ping_interval=None) as silent:
            with pytest.raises(ConnectionClosedError):
                await recv(silent, within=5)
        assert silent.close_code == 1006
        assert sim.stats.idle_closes == 1


async def test_greeting_text_frame_is_not_json() -> None:
    """With send_greeting the first frame is the plain-text greeting, which decodes as `not_json`."""
    async with SimServer(SimConfig(send_greeting=True)) as sim, connect(sim.ws_url) as ws:
        first = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
    assert first == hl.GREETING_TEXT
    with pytest.raises(FrameDecodeError) as err:
        decode_frame(first)
    assert err.value.kind == "not_json"


# ---------------------------------------------------------------------------------------- state and public feeds


async def test_all_dexs_clearinghouse_state_pushed_periodically() -> None:
    """State on subscribe, then again every push interval even when nothing changes; both dexs listed."""
    async with SimServer(SimConfig(clearinghouse_push_interval=0.05)) as sim, connect(sim.ws_url) as ws:
        w = sim.exchange.whale(W1)
        await w.market_order("BTC", False, "0.25", "80000")
        await w.market_order("xyz:XYZ100", True, "0.1", "25000")
        await subscribe(ws, {"type": "allDexsClearinghouseState", "user": W1})
        frames = [await recv_channel(ws, "allDexsClearinghouseState") for _ in range(3)]
    decoded = decode_frame(json.dumps(frames[-1]))
    assert isinstance(decoded, AllDexsClearinghouseStateFrame)
    states = dict(decoded.data.clearinghouse_states)
    assert set(states) == {"", "xyz"}
    assert [(p.position.coin, p.position.szi) for p in states[""].asset_positions] == [("BTC", Decimal("-0.25"))]
    assert [(p.position.coin, p.position.szi) for p in states["xyz"].asset_positions] == [
        ("xyz:XYZ100", Decimal("0.1"))
    ]
    assert states[""].margin_summary.account_value > 0


async def test_clearinghouse_and_spot_state_subscriptions() -> None:
    """clearinghouseState (one dex) and spotState send state on subscribe and on every push."""
    async with SimServer(SimConfig(clearinghouse_push_interval=60)) as sim, connect(sim.ws_url) as ws:
        w = sim.exchange.whale(W1)
        await w.market_order("@107", True, "12.5", "40")
        await w.market_order("ETH", True, "1", "2300")
        await subscribe(ws, {"type": "clearinghouseState", "user": W1, "dex": ""})
        ch = decode_frame(json.dumps(await recv_channel(ws, "clearinghouseState")))
        await subscribe(ws, {"type": "spotState", "user": W1})
        spot = decode_frame(json.dumps(await recv_channel(ws, "spotState")))
        await w.market_order("ETH", True, "1", "2300")
        sim.push_state()
        again = decode_frame(json.dumps(await recv_channel(ws, "clearinghouseState")))
    assert isinstance(ch, ClearinghouseStateFrame)
    assert isinstance(again, ClearinghouseStateFrame)
    assert ch.data.dex == ""
    assert ch.data.user == W1
    assert ch.data.clearinghouse_state.asset_positions[0].position.szi == 1
    assert again.data.clearinghouse_state.asset_positions[0].position.szi == 2
    assert isinstance(spot, SpotStateFrame)
    balances = {b.coin: b.total for b in spot.data.spot_state.balances}
    assert balances["HYPE"] == Decimal("12.5")
    assert balances["USDC"] < Decimal(250_000)


async def test_trades_replay_and_users_match_whale_fills() -> None:
    """trades replays the last N on subscribe; each trade has [buyer, seller] and the aggressor side."""
    async with SimServer(SimConfig(trades_replay=2)) as sim, connect(sim.ws_url) as ws:
        w = sim.exchange.whale(W1)
        await w.market_order("SOL", True, "3", "95", fills=3)
        await subscribe(ws, {"type": "userFills", "user": W1})
        await recv_channel(ws, "userFills")
        await subscribe(ws, {"type": "trades", "coin": "SOL"})
        replay = await recv_channel(ws, "trades")
        oid = await w.limit_order("SOL", False, "2", "96")
        await w.fill(oid, "2")
        got = await first_of(ws, {"trades", "userFills"})
        live, fill = got["trades"], got["userFills"]
    assert len(replay["data"]) == 2
    assert all(t["users"][0] == W1 and t["side"] == "B" for t in replay["data"])
    (trade,) = live["data"]
    (f,) = fill["data"]["fills"]
    # The whale sold as maker: the buyer (a non-whale) was the aggressor.
    assert trade["side"] == "B"
    assert trade["users"][1] == W1
    assert trade["users"][0] != W1
    assert (trade["px"], trade["sz"], trade["time"], trade["tid"], trade["hash"]) == (
        f["px"],
        f["sz"],
        f["time"],
        f["tid"],
        f["hash"],
    )
    assert f["crossed"] is False
    assert f["side"] == "A"
    decoded = decode_frame(json.dumps(live))
    assert isinstance(decoded, TradesFrame)
    assert decoded.data[0].users == (trade["users"][0], W1)


async def test_user_events_channel_carries_fills_and_liquidation() -> None:
    """userEvents arrives on channel `user` without a user: fills, then the liquidation event."""
    async with SimServer() as sim, connect(sim.ws_url) as ws:
        w = sim.exchange.whale(W1)
        await subscribe(ws, {"type": "userEvents", "user": W1})
        await w.market_order("BTC", True, "0.2", "80000")
        opened = await recv_channel(ws, "user")
        await w.liquidate("BTC", mark_px="70000")
        liq_fill = await recv_channel(ws, "user")
        event = await recv_channel(ws, "user")
    assert opened["data"]["fills"][0]["dir"] == "Open Long"
    decoded = decode_frame(json.dumps(liq_fill))
    assert isinstance(decoded, UserEventsFrame)
    assert decoded.data.fills is not None
    (fill,) = decoded.data.fills
    assert fill.dir == "Liquidated Cross Long"
    assert fill.liquidation is not None
    assert fill.liquidation.liquidated_user == W1
    assert fill.liquidation.mark_px == Decimal(70000)
    assert fill.liquidation.method == "market"
    assert event["data"]["liquidation"]["liquidated_user"] == W1


async def test_twap_history_snapshot_then_activated_and_finished_with_executed_size(sim: SimServer) -> None:
    """`userTwapHistory` as captured: snapshot (`isSnapshot: true`), then one entry per state change; `time` in
    seconds, `executedSz` growing with the slices."""
    w = sim.exchange.whale(W1)
    async with connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "userTwapHistory", "user": W1})
        snap = await recv_channel(ws, "userTwapHistory")
        twap_id = await w.twap("SOL", True, "9", slices=3, px="95")
        activated = await recv_channel(ws, "userTwapHistory")
        finished = await recv_channel(ws, "userTwapHistory")
        await subscribe(ws, {"type": "userTwapHistory", "user": W2})
        await recv_channel(ws, "userTwapHistory")  # W2's own (empty) snapshot
        await unsubscribe_and_resubscribe(ws, W1)
        again = await recv_channel(ws, "userTwapHistory")
    assert snap["data"] == {"isSnapshot": True, "user": W1, "history": []}
    frames = [decode_frame(json.dumps(f)) for f in (activated, finished, again)]
    assert all(isinstance(f, UserTwapHistoryFrame) for f in frames)
    assert "isSnapshot" not in activated["data"]
    [start] = activated["data"]["history"]
    [end] = finished["data"]["history"]
    assert (start["twapId"], start["status"], start["state"]["executedSz"]) == (twap_id, {"status": "activated"}, "0.0")
    assert (end["twapId"], end["status"], end["state"]["executedSz"]) == (twap_id, {"status": "finished"}, "9.0")
    assert end["state"]["sz"] == "9.0"
    assert start["time"] < 10**11  # seconds, unlike every other timestamp
    assert again["data"]["isSnapshot"] is True
    assert again["data"]["history"] == [end]


async def unsubscribe_and_resubscribe(ws: ClientConnection, user: str) -> None:
    await send(ws, {"method": "unsubscribe", "subscription": {"type": "userTwapHistory", "user": user}})
    await recv_channel(ws, "subscriptionResponse")
    await subscribe(ws, {"type": "userTwapHistory", "user": user})


async def test_post_info_request(sim: SimServer) -> None:
    """A `post` info request is answered on the `post` channel with the REST result."""
    await sim.exchange.whale(W1).market_order("ETH", True, "1", "2300")
    async with connect(sim.ws_url) as ws:
        payload = {"type": "clearinghouseState", "user": W1}
        await send(ws, {"method": "post", "id": 7, "request": {"type": "info", "payload": payload}})
        reply = msgspec.json.decode(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT))
    assert reply["channel"] == "post"
    assert reply["data"]["id"] == 7
    response = reply["data"]["response"]
    assert response["type"] == "info"
    assert response["payload"]["type"] == "clearinghouseState"
    assert response["payload"]["data"]["assetPositions"][0]["position"]["szi"] == "1.0"


async def test_every_frame_the_sim_emits_decodes() -> None:
    """All channels and flows at once; every frame decodes and fills round-trip exactly."""
    seen: set[str] = set()
    async with SimServer(SimConfig(clearinghouse_push_interval=0.05)) as sim, connect(sim.ws_url) as ws:
        w = sim.exchange.whale(W1)
        for sub in (
            {"type": "userFills", "user": W1},
            {"type": "orderUpdates", "user": W1},
            {"type": "userEvents", "user": W1},
            {"type": "allDexsClearinghouseState", "user": W1},
            {"type": "clearinghouseState", "user": W1},
            {"type": "spotState", "user": W1},
            {"type": "allMids"},
            {"type": "allMids", "dex": "xyz"},
            {"type": "bbo", "coin": "ETH"},
            {"type": "l2Book", "coin": "ETH"},
            *({"type": "trades", "coin": c} for c in ("ETH", "@107", "PURR/USDC", "xyz:TSLA", "SOL")),
        ):
            await send(ws, {"method": "subscribe", "subscription": sub})
        await send(ws, {"method": "subscribe", "subscription": {"type": "webData2", "user": W1}})
        await send(ws, {"method": "ping"})
        async with asyncio.timeout(RECV_TIMEOUT):  # the server handles messages in order: all subscribed
            while "PongFrame" not in seen:
                seen.add(type(decode_frame(await ws.recv())).__name__)
        await w.market_order("ETH", True, "2", "2300", fills=2, cloid="0x" + "12" * 16)
        oid = await w.limit_order("ETH", False, "4", "2350")
        await w.fill(oid, "1")
        await w.cancel(oid)
        await w.reject_order("ETH", True, "1000", "1")
        await w.market_order("@107", True, "5", "40")
        await w.market_order("PURR/USDC", True, "1000", "0.067")
        await w.market_order("PURR/USDC", False, "400", "0.07")
        await w.market_order("xyz:TSLA", False, "3", "420")
        await w.liquidate("ETH", mark_px="2000")
        await w.twap("SOL", True, "9", slices=3, px="95", order_updates=True)
        fills: list[Fill] = []
        async with asyncio.timeout(RECV_TIMEOUT):
            while len(seen) < 12 or len(fills) < 11:
                raw = await ws.recv()
                frame = decode_frame(raw)  # raises on anything our client cannot decode
                seen.add(type(frame).__name__)
                if isinstance(frame, UserFillsFrame) and not frame.data.is_snapshot:
                    fills.extend(frame.data.fills)
    assert {
        "SubscriptionResponseFrame",
        "UserFillsFrame",
        "OrderUpdatesFrame",
        "UserEventsFrame",
        "AllDexsClearinghouseStateFrame",
        "ClearinghouseStateFrame",
        "SpotStateFrame",
        "AllMidsFrame",
        "BboFrame",
        "TradesFrame",
        "PongFrame",
        "ErrorFrame",
    } <= seen
    history = sim.exchange.user_fills(W1, 100)[::-1]
    assert fills == [msgspec.json.decode(msgspec.json.encode(f), type=Fill) for f in history]
    dirs = [f.dir for f in fills]
    assert dirs[:4] == ["Open Long", "Open Long", "Close Long", "Buy"]
    assert "Sell" in dirs
    assert "Open Short" in dirs
    assert "Liquidated Cross Long" in dirs
    twap = [f for f in fills if f.twap_id is not None]
    assert len(twap) == 3
    assert {f.hash for f in twap} == {"0x" + "0" * 64}


# ---------------------------------------------------------------------------------------- faults


async def test_fault_drop_next_ack_still_subscribes(sim: SimServer) -> None:
    """A dropped ack: no subscriptionResponse, but the subscription is live (snapshot and data arrive)."""
    sim.faults.drop_next_ack("userFills")
    async with connect(sim.ws_url) as ws:
        await send(ws, {"method": "subscribe", "subscription": {"type": "userFills", "user": W1}})
        first = await recv(ws)
        await subscribe(ws, {"type": "trades", "coin": "BTC"})  # the next ack is not dropped
    assert first["channel"] == "userFills"
    assert first["data"]["isSnapshot"] is True
    assert sim.stats.acks_dropped == 1


async def test_fault_stall_withholds_one_channel_and_never_delivers_it(sim: SimServer) -> None:
    """Stalled channel: silence while pongs and other channels flow; nothing arrives late; resubscribe heals."""
    w = sim.exchange.whale(W1)
    async with connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "userFills", "user": W1})
        await recv_channel(ws, "userFills")
        await subscribe(ws, {"type": "orderUpdates", "user": W1})
        sim.faults.stall("userFills", user=W1)
        await w.market_order("BTC", True, "1", "80000")
        updates = await recv_channel(ws, "orderUpdates")  # the other channel still flows
        await send(ws, {"method": "ping"})
        assert await recv_channel(ws, "pong") == {"channel": "pong"}
        sim.faults.unstall("userFills")
        await w.market_order("BTC", True, "2", "80000")
        after = await recv_channel(ws, "userFills")
        # A new subscription is not stalled by a non-sticky stall.
        sim.faults.stall("userFills")
        await send(ws, {"method": "unsubscribe", "subscription": {"type": "userFills", "user": W1}})
        await recv_channel(ws, "subscriptionResponse")
        await subscribe(ws, {"type": "userFills", "user": W1})
        snap = await recv_channel(ws, "userFills")
    assert updates["data"][0]["status"] == "open"
    assert after["data"]["fills"][0]["sz"] == "2.0"  # the withheld 1.0 fill never shows up on the stream
    assert len(snap["data"]["fills"]) == 2  # ...but the snapshot and REST still have it
    assert sim.stats.frames_withheld == 1


async def test_fault_sticky_stall_covers_new_subscriptions(sim: SimServer) -> None:
    """A sticky stall also silences subscriptions made after it, until unstall."""
    sim.faults.stall("allDexsClearinghouseState", user=W1, sticky=True)
    async with connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "allDexsClearinghouseState", "user": W1})
        withheld = sim.stats.frames_withheld
        sim.push_state()
        assert sim.stats.frames_withheld == withheld + 1  # the push was held back, not sent
        sim.faults.unstall()
        sim.push_state()
        frame = await recv_channel(ws, "allDexsClearinghouseState")
    assert frame["data"]["user"] == W1


async def test_fault_abrupt_close_all_is_1006(sim: SimServer) -> None:
    """abrupt_close_all drops every TCP connection without a close frame."""
    async with connect(sim.ws_url) as a, connect(sim.ws_url) as b:
        await subscribe(a, {"type": "trades", "coin": "BTC"})
        await subscribe(b, {"type": "trades", "coin": "ETH"})
        assert sim.faults.abrupt_close_all() == 2
        for ws in (a, b):
            with pytest.raises(ConnectionClosedError):
                await recv(ws)
            assert ws.close_code == 1006
    await wait_until(lambda: not sim.connections, RECV_TIMEOUT, "every connection gone")


async def test_fault_close_connection_with_code(sim: SimServer) -> None:
    """close_connection closes one socket with the given code and leaves the other open."""
    async with connect(sim.ws_url) as a, connect(sim.ws_url) as b:
        await subscribe(a, {"type": "userFills", "user": W1})
        await subscribe(b, {"type": "trades", "coin": "BTC"})
        (target,) = [c for c in sim.connections if c.subscriptions[0]["type"] == "userFills"]
        sim.faults.close_connection(target.id, code=4000)
        with pytest.raises(ConnectionClosed):
            await read_until_closed(a)
        await send(b, {"method": "ping"})
        assert await recv_channel(b, "pong") == {"channel": "pong"}
    assert a.close_code == 4000


async def test_fault_duplicate_next_frame(sim: SimServer) -> None:
    """duplicate_next sends the next frame of a channel twice, byte for byte."""
    w = sim.exchange.whale(W1)
    async with connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "userFills", "user": W1})
        await recv_channel(ws, "userFills")
        sim.faults.duplicate_next("userFills")
        await w.market_order("BTC", True, "1", "80000")
        await w.market_order("BTC", True, "2", "80000")
        frames = [await recv_channel(ws, "userFills") for _ in range(3)]
    assert frames[0] == frames[1]
    assert frames[2]["data"]["fills"][0]["sz"] == "2.0"


async def test_fault_status_before_fills(sim: SimServer) -> None:
    """With status_before_fills the `filled` update arrives before the fills it reports."""
    w = sim.exchange.whale(W1)
    async with connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "userFills", "user": W1})
        await recv_channel(ws, "userFills")
        await subscribe(ws, {"type": "orderUpdates", "user": W1})
        sim.faults.status_before_fills()
        await w.market_order("BTC", True, "1", "80000")
        first = await recv(ws)
        second = await recv(ws)
        sim.faults.status_before_fills(False)
        await w.market_order("BTC", True, "1", "80000")
        third = await recv(ws)
    assert first["channel"] == "orderUpdates"
    assert first["data"][-1]["status"] == "filled"
    assert second["channel"] == "userFills"
    assert third["channel"] == "userFills"


async def test_slow_consumer_is_dropped() -> None:
    """A connection whose send queue overflows is closed abruptly and counted."""
    async with SimServer(SimConfig(send_queue_size=3)) as sim, connect(sim.ws_url) as ws:
        await subscribe(ws, {"type": "userFills", "user": W1})
        await recv_channel(ws, "userFills")
        w = sim.exchange.whale(W1)
        for _ in range(10):  # no await that suspends: the writer cannot drain in between
            await w.market_order("BTC", True, "0.1", "80000")
        with pytest.raises(ConnectionClosedError):
            await read_until_closed(ws)
    assert sim.stats.slow_consumer_closes == 1


async def read_until_closed(ws: ClientConnection) -> None:
    """Read (and check) frames until the connection closes; raises the close exception."""
    async with asyncio.timeout(RECV_TIMEOUT):
        while True:
            check(await ws.recv())


async def test_stop_closes_connected_clients_with_going_away() -> None:
    """Leaving `async with SimServer` closes live sockets with 1001 and frees everything."""
    sim = SimServer()
    await sim.start()
    ws = await connect(sim.ws_url)
    try:
        await subscribe(ws, {"type": "userFills", "user": W1})
        await sim.stop()
        with pytest.raises(ConnectionClosed):
            await read_until_closed(ws)
    finally:
        await ws.close()
    assert ws.close_code == 1001
    assert sim.connections == []
