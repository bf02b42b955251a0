"""Protocol layer: real captured frames and REST bodies decode to the right types and exact values; bad
input of any shape raises only the typed error; encoders produce exactly the documented JSON."""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl_monitor.errors import FrameDecodeError, ProtocolError
from hl_monitor.hyperliquid.protocol import (
    KNOWN_CHANNELS,
    AllDexsClearinghouseStateFrame,
    AllMids,
    AllMidsFrame,
    BboFrame,
    ClearinghouseState,
    ClearinghouseStateFrame,
    ErrorFrame,
    Fill,
    FrontendOrder,
    HistoricalOrders,
    MetaAndAssetCtxs,
    NonUserCancel,
    OpenOrdersFrame,
    OrderStatusResponse,
    OrderUpdatesFrame,
    PerpDexs,
    PerpMeta,
    PongFrame,
    SpotClearinghouseState,
    SpotMeta,
    SpotStateFrame,
    Subscription,
    SubscriptionResponseFrame,
    TradesFrame,
    UserEventsFrame,
    UserFillsFrame,
    UserTwapHistoryFrame,
    UserTwapSliceFillsFrame,
    WsTrade,
    decode_fills,
    decode_frame,
    decode_info,
    encode_ping,
    encode_subscribe,
    encode_unsubscribe,
    subscription_from_echo,
)
from tests.support.frames import REAL_FRAMES, WS_LINES, assert_decodes_or_typed_error, json_values, mutate
from tests.support.paths import fixture

ZERO_HASH = "0x" + "0" * 64


# ------------------------------------------------------------------------------------- captured WS frames

EXPECTED_LINE_TYPES = [
    UserFillsFrame,
    UserFillsFrame,
    OrderUpdatesFrame,
    OrderUpdatesFrame,
    OrderUpdatesFrame,
    OrderUpdatesFrame,
    OrderUpdatesFrame,
    TradesFrame,
    TradesFrame,
    SubscriptionResponseFrame,
    SubscriptionResponseFrame,
    PongFrame,
    ErrorFrame,
    ErrorFrame,
    ErrorFrame,
]


@pytest.mark.parametrize(("line", "expected"), list(enumerate(EXPECTED_LINE_TYPES, start=1)))
def test_every_captured_frame_decodes_to_its_type(line: int, expected: type) -> None:
    assert len(WS_LINES) == len(EXPECTED_LINE_TYPES)
    assert type(decode_frame(WS_LINES[line - 1])) is expected
    # str input (what a text-mode socket yields) decodes identically.
    assert decode_frame(WS_LINES[line - 1].decode()) == decode_frame(WS_LINES[line - 1])


def test_user_fills_snapshot_values_are_exact() -> None:
    frame = decode_frame(WS_LINES[0])
    assert isinstance(frame, UserFillsFrame)
    assert frame.data.is_snapshot is True
    assert frame.data.user == "0x31ca8395cf837de08b24da3f660e77761dfb974b"
    (fill,) = frame.data.fills
    assert fill.px == Decimal("0.01152")
    assert str(fill.px) == "0.01152"
    assert str(fill.start_position) == "-3695042.8999999999"  # no float rounding anywhere
    assert fill.sz == Decimal("1052.9")
    assert fill.oid == 535618784464 > 2**32
    assert fill.tid == 691079299625582
    assert (fill.side, fill.dir, fill.crossed, fill.fee_token) == ("A", "Open Short", True, "USDC")
    assert fill.twap_id is None
    assert fill.cloid is None
    assert fill.liquidation is None


def test_user_fills_snapshot_with_spot_dust_builder_dex_cloid_and_liquidation() -> None:
    frame = decode_frame(WS_LINES[1])
    assert isinstance(frame, UserFillsFrame)
    fills = frame.data.fills
    assert len(fills) == 11
    dust = fills[1]
    assert (dust.coin, dust.dir, dust.hash, dust.tid) == ("@151", "Spot Dust Conversion", ZERO_HASH, 0)
    assert dust.sz == Decimal("0.000026746")
    assert fills[2].cloid == "0x508000013026000baaf2c90000029605"
    liquidated = fills[6]
    assert liquidated.coin == "xyz:SILVER"
    assert liquidated.liquidation is not None
    assert liquidated.liquidation.liquidated_user == "0x61fb9e7583dc92cc76eb52f93d88addaa0f02265"
    assert liquidated.liquidation.mark_px == Decimal("80.498")
    assert liquidated.liquidation.method == "market"
    assert liquidated.closed_pnl == Decimal("-1.2843")
    assert fills[9].cloid is None


def test_user_fills_stream_frame_is_not_a_snapshot_whether_key_is_absent_or_false() -> None:
    fill = json.loads(WS_LINES[0])["data"]["fills"][0]
    absent = {"channel": "userFills", "data": {"user": "0xabc", "fills": [fill]}}
    false = {"channel": "userFills", "data": {"user": "0xabc", "fills": [fill], "isSnapshot": False}}
    for raw in (absent, false):
        frame = decode_frame(json.dumps(raw))
        assert isinstance(frame, UserFillsFrame)
        assert frame.data.is_snapshot is False


def test_order_updates_open_then_filled_in_one_frame() -> None:
    frame = decode_frame(WS_LINES[3])
    assert isinstance(frame, OrderUpdatesFrame)
    opened, filled = frame.data
    assert (opened.status, filled.status) == ("open", "filled")
    assert opened.order.oid == filled.order.oid == 315452584853
    assert filled.order.sz == Decimal("0.0")
    assert filled.order.orig_sz == Decimal("0.01")
    assert filled.order.cloid == "0x000300511b45504e0000010000000054"
    assert filled.order.reduce_only is None


def test_order_updates_cancel_keeps_placement_time_and_rejections_are_open_strings() -> None:
    cancel = decode_frame(WS_LINES[4])
    assert isinstance(cancel, OrderUpdatesFrame)
    (update,) = cancel.data
    assert update.status == "canceled"
    assert update.order.timestamp == 1770381849546 < update.status_timestamp == 1770381858690
    statuses = []
    for line in (WS_LINES[5], WS_LINES[6]):
        frame = decode_frame(line)
        assert isinstance(frame, OrderUpdatesFrame)
        statuses.append(frame.data[0].status)
    assert statuses == ["minTradeNtlRejected", "perpMarginRejected"]


def test_trades_carry_buyer_and_seller() -> None:
    frame = decode_frame(WS_LINES[7])
    assert isinstance(frame, TradesFrame)
    first, second = frame.data
    assert first.users == ("0xa62b923a112d50d03e1e096bbd53422490dac104", "0x8a544ab75107efd541c9072a0efebb87cc4292f3")
    assert (first.side, first.px, first.sz, first.tid) == (
        "A",
        Decimal("80639.0"),
        Decimal("0.00022"),
        1095884267920331,
    )
    assert first.hash == ZERO_HASH
    assert second.side == "B"


def test_subscription_ack_echo_matches_the_request_sent_mixed_case() -> None:
    frame = decode_frame(WS_LINES[9])
    assert isinstance(frame, SubscriptionResponseFrame)
    assert frame.data.method == "subscribe"
    sent = Subscription("userFills", user="0x31CA8395cf837de08b24da3f660e77761dfb974b", aggregate_by_time=False)
    assert subscription_from_echo(frame.data.subscription).key() == sent.key()
    unsub = decode_frame(WS_LINES[10])
    assert isinstance(unsub, SubscriptionResponseFrame)
    assert unsub.data.method == "unsubscribe"
    assert subscription_from_echo(unsub.data.subscription) == Subscription("bbo", coin="BTC")


def test_subscription_from_echo_without_type_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        subscription_from_echo({"coin": "BTC"})


def test_error_frames_are_classified() -> None:
    kinds = []
    for line in WS_LINES[12:15]:
        frame = decode_frame(line)
        assert isinstance(frame, ErrorFrame)
        kinds.append(frame.kind)
    assert kinds == ["already_unsubscribed", "parse_error", "user_cap"]


def test_user_events_liquidation_fill() -> None:
    frame = decode_frame(fixture("ws_user_fill_liquidation.json"))
    assert isinstance(frame, UserEventsFrame)
    assert frame.data.fills is not None
    (fill,) = frame.data.fills
    assert fill.cloid == "0xe8d5fd7ebbb4c3cff4d1803472a11463"
    assert fill.liquidation is not None
    assert fill.liquidation.mark_px == Decimal("66607.0")
    assert fill.liquidation.liquidated_user == "0x360878d351f05975e25f1807a27895e1e5e004fb"
    assert frame.data.non_user_cancel is None


def test_user_events_non_user_cancel_funding_and_snake_case_liquidation() -> None:
    cancel = decode_frame(b'{"channel":"user","data":{"nonUserCancel":[{"coin":"BTC","oid":535618784464}]}}')
    assert isinstance(cancel, UserEventsFrame)
    assert cancel.data.fills is None
    assert cancel.data.non_user_cancel == [NonUserCancel("BTC", 535618784464)]
    funding = decode_frame(
        b'{"channel":"user","data":{"funding":{"time":1788490800000,"coin":"ETH","usdc":"-3.625312",'
        b'"szi":"49.1477","fundingRate":"0.0000417","nSamples":null}}}'
    )
    assert isinstance(funding, UserEventsFrame)
    assert funding.data.funding is not None
    assert (funding.data.funding.usdc, funding.data.funding.funding_rate) == (
        Decimal("-3.625312"),
        Decimal("0.0000417"),
    )
    liquidation = decode_frame(
        b'{"channel":"user","data":{"liquidation":{"lid":7,"liquidator":"0xhlp","liquidated_user":"0xwhale",'
        b'"liquidated_ntl_pos":"1000.5","liquidated_account_value":"10.25"}}}'
    )
    assert isinstance(liquidation, UserEventsFrame)
    assert liquidation.data.liquidation is not None
    assert liquidation.data.liquidation.liquidated_user == "0xwhale"
    assert liquidation.data.liquidation.liquidated_ntl_pos == Decimal("1000.5")


def test_twap_slice_fills_carry_the_twap_id_outside_the_fill() -> None:
    frame = decode_frame(fixture("ws_user_twap_slice_fills.json"))
    assert isinstance(frame, UserTwapSliceFillsFrame)
    assert frame.data.is_snapshot is True
    first, second = frame.data.twap_slice_fills
    assert first.twap_id == second.twap_id == 2087225
    assert first.fill.twap_id is None
    assert first.fill.hash == ZERO_HASH
    assert first.fill.oid != second.fill.oid  # one TWAP, many oids: aggregate by twapId


def test_twap_history() -> None:
    frame = decode_frame(fixture("ws_user_twap_history.json"))
    assert isinstance(frame, UserTwapHistoryFrame)
    finished, active = frame.data.history
    assert (finished.twap_id, finished.status.status, finished.state.coin) == (2081397, "finished", "xyz:HOOD")
    assert finished.state.executed_ntl == Decimal("9122.799854")
    assert (active.status.status, active.state.minutes, active.state.executed_sz) == ("activated", 90, Decimal("0.0"))


def test_all_mids_values_are_exact_decimals() -> None:
    frame = decode_frame(fixture("ws_allmids.json"))
    assert isinstance(frame, AllMidsFrame)
    assert frame.data.mids["SOL"] == Decimal("94.8775")
    assert str(frame.data.mids["PURR/USDC"]) == "0.067131"
    assert set(frame.data.mids) == {"@142", "BTC", "ETH", "SOL", "PURR/USDC"}
    assert frame.data.dex is None


# Channels with no genuine capture (tests/fixtures/SOURCES.md): shapes from the docs (docs/protocol.md §2).
FLAT_STATE = {
    "marginSummary": {"accountValue": "0.0", "totalNtlPos": "0.0", "totalRawUsd": "0.0", "totalMarginUsed": "0.0"},
    "crossMarginSummary": {"accountValue": "0.0", "totalNtlPos": "0.0", "totalRawUsd": "0.0", "totalMarginUsed": "0.0"},
    "crossMaintenanceMarginUsed": "0.0",
    "withdrawable": "0.0",
    "assetPositions": [],
    "time": 1785259956738,
}


def test_position_channels_decode_docs_shapes() -> None:
    rest_state = json.loads(fixture("http_clearinghouse_state.json"))
    user = "0x31ca8395cf837de08b24da3f660e77761dfb974b"
    single = decode_frame(
        json.dumps(
            {"channel": "clearinghouseState", "data": {"dex": "", "user": user, "clearinghouseState": rest_state}}
        )
    )
    assert isinstance(single, ClearinghouseStateFrame)
    assert single.data.clearinghouse_state.positions()["BTC"].szi == Decimal("0.1")
    all_dexs = decode_frame(
        json.dumps(
            {
                "channel": "allDexsClearinghouseState",
                "data": {"user": user, "clearinghouseStates": [["", rest_state], ["xyz", FLAT_STATE]]},
            }
        )
    )
    assert isinstance(all_dexs, AllDexsClearinghouseStateFrame)
    (core_dex, core), (builder_dex, builder) = all_dexs.data.clearinghouse_states
    assert (core_dex, builder_dex) == ("", "xyz")
    assert core.margin_summary.account_value == Decimal("10246.125")
    assert builder.positions() == {}
    spot = decode_frame(
        json.dumps(
            {
                "channel": "spotState",
                "data": {"user": user, "spotState": json.loads(fixture("http_spot_clearinghouse_state.json"))},
            }
        )
    )
    assert isinstance(spot, SpotStateFrame)
    assert spot.data.spot_state.balances[1].coin == "PURR"
    orders = decode_frame(
        json.dumps(
            {
                "channel": "openOrders",
                "data": {"dex": "", "user": user, "orders": json.loads(fixture("http_frontend_open_orders.json"))},
            }
        )
    )
    assert isinstance(orders, OpenOrdersFrame)
    assert [o.oid for o in orders.data.orders] == [2001, 2002]


def test_bbo_with_an_empty_side() -> None:
    full = decode_frame(
        b'{"channel":"bbo","data":{"coin":"BTC","time":1788490065008,"bbo":[{"px":"80639.0","sz":"0.00186","n":2},'
        b'{"px":"80640.0","sz":"13.74589","n":46}]}}'
    )
    assert isinstance(full, BboFrame)
    bid, ask = full.data.bbo
    assert bid is not None
    assert ask is not None
    assert (bid.px, ask.n) == (Decimal("80639.0"), 46)
    empty = decode_frame(b'{"channel":"bbo","data":{"coin":"MATIC","time":1788490065008,"bbo":[null,null]}}')
    assert isinstance(empty, BboFrame)
    assert empty.data.bbo == (None, None)


def test_known_channels_are_exactly_the_frame_union() -> None:
    assert {
        "subscriptionResponse",
        "pong",
        "error",
        "userFills",
        "orderUpdates",
        "user",
        "clearinghouseState",
        "allDexsClearinghouseState",
        "spotState",
        "trades",
        "allMids",
    } <= KNOWN_CHANNELS


# ------------------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize(
    ("raw", "kind", "channel"),
    [
        (b"Websocket connection established.", "not_json", None),
        (b"", "not_json", None),
        (b"\xff\xfe{", "not_json", None),
        ("\ud800", "not_json", None),
        (b'{"channel":"l2Book","data":{"coin":"BTC","time":1,"levels":[[],[]]}}', "unknown_channel", "l2Book"),
        (b'{"channel":"userFills","data":{"user":"0xabc","fills":"nope"}}', "invalid", "userFills"),
        (
            b'{"channel":"trades","data":[{"coin":"BTC","side":"A","px":"NaN","sz":"1","time":1,"tid":1}]}',
            "invalid",
            "trades",
        ),
        (
            b'{"channel":"trades","data":[{"coin":"BTC","side":"X","px":"1","sz":"1","time":1,"tid":1}]}',
            "invalid",
            "trades",
        ),
        (
            b'{"channel":"trades","data":[{"coin":"BTC","side":"A","px":"1","sz":"1","time":1,"tid":-1}]}',
            "invalid",
            "trades",
        ),
        (
            b'{"channel":"trades","data":[{"coin":"BTC","side":"A","px":"1","sz":"1","time":1,"tid":'
            + b"9" * 400
            + b"}]}",
            "invalid",
            "trades",
        ),
        (
            b'{"channel":"orderUpdates","data":[{"order":{},"status":"open","statusTimestamp":1}]}',
            "invalid",
            "orderUpdates",
        ),
        (b'{"channel":"error"}', "invalid", "error"),
        (b'{"data":"x"}', "invalid", None),
        (b"[1,2,3]", "invalid", None),
        (b'{"channel":42}', "invalid", None),
    ],
)
def test_bad_frames_raise_the_typed_error(raw: bytes | str, kind: str, channel: str | None) -> None:
    with pytest.raises(FrameDecodeError) as info:
        decode_frame(raw)
    assert (info.value.kind, info.value.channel) == (kind, channel)


def test_pathological_nesting_is_a_decode_error() -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    raw = b'{"channel":"subscriptionResponse","data":{"method":"subscribe","subscription":{"x":' + deep + b"}}}"
    with pytest.raises(FrameDecodeError):
        decode_frame(raw)


# ------------------------------------------------------------------------------------- property tests


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_the_typed_error(raw: bytes) -> None:
    assert_decodes_or_typed_error(raw)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([*sorted(KNOWN_CHANNELS), "l2Book", "", "pong "]), json_values)
def test_arbitrary_json_under_any_channel_never_raises_anything_else(channel: str, data: Any) -> None:
    assert_decodes_or_typed_error(json.dumps({"channel": channel, "data": data}))
    assert_decodes_or_typed_error(json.dumps(data))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(REAL_FRAMES), st.lists(st.integers(min_value=0, max_value=50), max_size=6), json_values)
def test_real_frames_with_one_node_replaced_never_raise_anything_else(
    frame: dict[str, Any], path: list[int], replacement: Any
) -> None:
    assert_decodes_or_typed_error(json.dumps(mutate(frame, path, replacement)))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_rest_decoders_raise_only_protocol_error(raw: bytes) -> None:
    for decode in (
        decode_fills,
        lambda r: decode_info(r, ClearinghouseState),
        lambda r: decode_info(r, MetaAndAssetCtxs),
    ):
        with contextlib.suppress(ProtocolError):
            decode(raw)


# ------------------------------------------------------------------------------------- REST bodies


def test_rest_clearinghouse_state() -> None:
    state = decode_info(fixture("http_clearinghouse_state.json"), ClearinghouseState)
    btc = state.positions()["BTC"]
    assert btc.szi == Decimal("0.1")
    assert btc.entry_px == Decimal("98450.0")
    assert btc.leverage is not None
    assert (btc.leverage.type, btc.leverage.value) == ("cross", 5)
    assert btc.cum_funding is not None
    assert btc.cum_funding.all_time == Decimal("-12.345678")
    assert btc.max_leverage == 40
    assert state.withdrawable == Decimal("8277.125")
    assert state.time == 1784050800000


def test_rest_clearinghouse_state_with_builder_dex_coins() -> None:
    state = decode_info(fixture("http_clearinghouse_state_builder_perp.json"), ClearinghouseState)
    positions = state.positions()
    assert set(positions) == {"BTC", "xyz:TSLA", "cash:NVDA"}
    assert positions["cash:NVDA"].szi == Decimal("-5.0")  # short


def test_rest_spot_clearinghouse_state_with_outcome_token() -> None:
    spot = decode_info(fixture("http_spot_clearinghouse_state.json"), SpotClearinghouseState)
    by_coin = {b.coin: b for b in spot.balances}
    assert by_coin["USDC"].total == Decimal("14.625485")
    assert by_coin["PURR"].hold == Decimal("100")
    assert by_coin["PURR"].entry_ntl == Decimal("1234.56")
    assert by_coin["+10"].token == 100000010


def test_rest_user_fills_fixtures() -> None:
    plain = decode_fills(fixture("http_user_fills.json"))
    assert [f.coin for f in plain] == ["BTC", "ETH", "@107"]
    assert plain[1].closed_pnl == Decimal("106.875")
    dust = decode_info(fixture("http_user_fills_dust_conversion.json"), list[Fill])
    assert [f.dir for f in dust][-2:] == ["Spot Dust Conversion", "Net Child Vaults"]
    assert dust[2].fee_token == "USOL"
    assert dust[2].fee == Decimal("0.00088689")
    assert dust[3].tid == 0
    assert dust[3].sz == Decimal("0.0000086141")
    cloid = decode_fills(fixture("http_user_fills_with_cloid.json"))
    assert {f.cloid for f in cloid} == {"0x5bdd47600dea461f36c8378cd7b4150c"}
    assert cloid[0].fee == Decimal("-0.012639")  # rebate
    assert sorted(cloid, key=lambda f: f.sort_key)[0].tid == 780373658822388
    assert cloid[0].identity == ("BTC", 544900123760, 1109765720343214)


def test_rest_frontend_open_orders() -> None:
    orders = decode_info(fixture("http_frontend_open_orders.json"), list[FrontendOrder])
    resting, stop = orders
    assert (resting.tif, resting.cloid, resting.sz, resting.orig_sz) == (
        "Alo",
        "0xaabbccdd00112233aabbccdd00112233",
        Decimal("0.05"),
        Decimal("0.10"),
    )
    assert (stop.order_type, stop.is_trigger, stop.trigger_px, stop.reduce_only) == (
        "Stop Market",
        True,
        Decimal("2450.0"),
        True,
    )
    assert stop.trigger_condition == "Mark Px <= 2450.0"
    assert stop.cloid is None


def test_rest_order_status_known_and_unknown() -> None:
    status = decode_info(fixture("http_order_status_frontend_market.json"), OrderStatusResponse)
    assert status.known
    assert status.order is not None
    assert (status.order.status, status.order.order.tif, status.order.order.orig_sz) == (
        "filled",
        "FrontendMarket",
        Decimal("0.0076"),
    )
    unknown = decode_info(b'{"status":"unknownOid"}', OrderStatusResponse)
    assert not unknown.known


def test_rest_historical_orders() -> None:
    body = b"[" + fixture("http_historical_order_liquidation_market.json") + b"]"
    (entry,) = decode_info(body, HistoricalOrders)
    assert (entry.status, entry.order.tif, entry.order.reduce_only) == ("filled", "LiquidationMarket", True)
    assert entry.order.children == []


def test_rest_meta_and_meta_and_asset_ctxs() -> None:
    meta = decode_info(fixture("http_meta_perp_sample.json"), PerpMeta)
    assert [(u.name, u.sz_decimals, u.max_leverage, u.margin_table_id) for u in meta.universe] == [
        ("BTC", 5, 40, 56),
        ("ETH", 4, 25, 55),
        ("ATOM", 2, 5, 5),
    ]
    assert meta.universe[0].is_delisted is None
    ctx = {
        "dayNtlVlm": "4490636699.3287734985",
        "funding": "0.0000052974",
        "impactPxs": ["80637.2", "80640.0"],
        "markPx": "80640.0",
        "midPx": "80639.5",
        "openInterest": "36295.80812",
        "oraclePx": "80684.7",
        "premium": "-0.0005540084",
        "prevDayPx": "77759.0",
        "dayBaseVlm": "56265.69068",
    }
    bookless = {**ctx, "midPx": None, "premium": None, "impactPxs": None}
    pair = json.dumps([json.loads(fixture("http_meta_perp_sample.json")), [ctx, ctx, bookless]])
    decoded = decode_info(pair, MetaAndAssetCtxs)
    by_coin = decoded.by_coin()
    assert by_coin["BTC"].impact_pxs == (Decimal("80637.2"), Decimal("80640.0"))
    assert by_coin["ATOM"].mid_px is None
    assert by_coin["ATOM"].mark_px == Decimal("80640.0")
    misaligned = json.dumps([json.loads(fixture("http_meta_perp_sample.json")), [ctx]])
    with pytest.raises(ProtocolError, match="asset contexts"):
        decode_info(misaligned, MetaAndAssetCtxs)


def test_rest_spot_meta_perp_dexs_all_mids_recent_trades() -> None:
    spot = decode_info(fixture("http_spot_meta_non_usdc_collateral.json"), SpotMeta)
    assert [(t.name, t.index) for t in spot.tokens] == [("USDC", 0), ("USDH", 360), ("USDE", 235)]
    assert spot.universe == []
    dexs = decode_info(b'[null,{"name":"xyz","fullName":"XYZ","deployer":"0x1234"}]', PerpDexs)
    assert dexs[0] is None
    assert dexs[1] is not None
    assert dexs[1].name == "xyz"
    mids = decode_info(b'{"APE":"4.33245","ARB":"1.21695"}', AllMids)
    assert mids == {"APE": Decimal("4.33245"), "ARB": Decimal("1.21695")}
    trades = decode_info(fixture("http_recent_trades_btc.json"), list[WsTrade])
    assert [t.tid for t in trades] == [300003, 300002, 300001]
    assert trades[0].users == ("0xbuyer3", "0xseller3")


def test_rest_bad_body_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="ClearinghouseState"):
        decode_info(b'{"assetPositions":[]}', ClearinghouseState)
    with pytest.raises(ProtocolError):
        decode_fills(b"<html>502 Bad Gateway</html>")


# ------------------------------------------------------------------------------------- encoders


def test_encoders_produce_the_documented_json() -> None:
    trades = Subscription("trades", coin="SOL")
    assert encode_subscribe(trades) == b'{"method":"subscribe","subscription":{"type":"trades","coin":"SOL"}}'
    assert encode_unsubscribe(trades) == b'{"method":"unsubscribe","subscription":{"type":"trades","coin":"SOL"}}'
    assert encode_ping() == b'{"method":"ping"}'
    user = "0x31ca8395cf837de08b24da3f660e77761dfb974b"
    fills = Subscription("userFills", user=user, aggregate_by_time=False)
    assert encode_subscribe(fills) == (
        b'{"method":"subscribe","subscription":{"type":"userFills","user":"'
        + user.encode()
        + b'","aggregateByTime":false}}'
    )
    all_dexs = Subscription("allDexsClearinghouseState", user=user)
    assert json.loads(encode_subscribe(all_dexs)) == {
        "method": "subscribe",
        "subscription": {"type": "allDexsClearinghouseState", "user": user},
    }
    positions = Subscription("clearinghouseState", user=user, dex="")
    assert json.loads(encode_subscribe(positions))["subscription"] == {
        "type": "clearinghouseState",
        "user": user,
        "dex": "",
    }
    assert all_dexs.is_user_specific
    assert not trades.is_user_specific


def test_unsubscribe_is_the_exact_mirror_of_subscribe() -> None:
    sub = Subscription("userFills", user="0xABC", aggregate_by_time=False)
    subscribe, unsubscribe = json.loads(encode_subscribe(sub)), json.loads(encode_unsubscribe(sub))
    assert subscribe["subscription"] == unsubscribe["subscription"]
    assert (subscribe["method"], unsubscribe["method"]) == ("subscribe", "unsubscribe")


def test_decoded_frames_are_immutable() -> None:
    frame = decode_frame(WS_LINES[0])
    assert isinstance(frame, UserFillsFrame)
    with pytest.raises(AttributeError):
        frame.data.fills[0].px = Decimal(1)  # type: ignore[misc]
    assert msgspec.json.decode(msgspec.json.encode(frame.data.fills[0]), type=Fill) == frame.data.fills[0]
