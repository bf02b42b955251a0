"""The position model: what a whale holds, built from captured exchange frames, and the events it reports."""

from __future__ import annotations

import copy
import json
import random
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from hl_monitor.errors import PortfolioStateError
from hl_monitor.hyperliquid.protocol import (
    AllDexsClearinghouseStateData,
    AllDexsClearinghouseStateFrame,
    AllMidsFrame,
    ClearinghouseState,
    SpotState,
    SpotStateFrame,
    TradesFrame,
    UserEventsFrame,
    UserFillsFrame,
    WsTrade,
    decode_frame,
    decode_info,
)
from hl_monitor.hyperliquid.symbols import SymbolInfo, SymbolMap
from hl_monitor.tracking.portfolio import MAX_REMEMBERED, CoinLedger, PositionModel
from hl_monitor.tracking.position_events import PerpPosition
from tests.support.factories import ADDR, OTHER, fill
from tests.support.paths import FIXTURES
from tests.support.portfolio import core_state, fixture_json, state_with, wire_position

NOW = 1_784_050_805_000  # local receive time, a few seconds after the fixtures' state time
STATE_TIME = 1_784_050_800_000  # `time` of the clearinghouseState fixtures
D = Decimal


def all_dexs(user: str, states: list[list[Any]]) -> AllDexsClearinghouseStateData:
    frame = decode_frame(
        json.dumps({"channel": "allDexsClearinghouseState", "data": {"user": user, "clearinghouseStates": states}})
    )
    assert isinstance(frame, AllDexsClearinghouseStateFrame)
    return frame.data


# ------------------------------------------------------------------------------------ golden: state frames


def test_rest_state_fixture_gives_the_whole_position_as_the_exchange_reports_it() -> None:
    model = PositionModel()
    state = decode_info((FIXTURES / "http_clearinghouse_state.json").read_bytes(), ClearinghouseState)

    changes = model.on_dex_state(ADDR, "", state, NOW, source="rest")

    assert changes.events == []  # the first state shows what was held before the model looked
    doc = model.get(ADDR)
    assert doc is not None
    assert (doc.source, doc.as_of) == ("rest", NOW)
    dex = doc.dexes[""]
    assert (dex.account_value, dex.total_ntl_pos, dex.total_margin_used) == (D("10246.125"), D("9845.0"), D("1969.0"))
    assert (dex.withdrawable, dex.cross_maintenance_margin_used) == (D("8277.125"), D("492.25"))
    assert dex.state_time == STATE_TIME
    btc = dex.positions["BTC"]
    assert btc == PerpPosition(
        coin="BTC",
        symbol="BTCUSDC",
        dex="",
        size=D("0.1"),
        side="LONG",
        entry_px=D("98450.0"),
        mark_px=D("98450"),  # positionValue ÷ |szi|
        position_value_usd=D("9845.0"),
        unrealized_pnl=D("246.125"),
        return_on_equity=D("0.025"),
        leverage_type="cross",
        leverage=5,
        max_leverage=40,
        liquidation_px=D("80000.0"),
        liquidation_distance=(D("98450") - D("80000.0")) / D("98450"),
        margin_used=D("1969.0"),
        cum_funding_since_open=D("-1.234567"),
        opened_at=STATE_TIME,
        updated_at=NOW,
        source="rest",
    )
    assert model.stats.bad_input == {}


def test_document_encodes_to_json_with_decimals_as_strings() -> None:
    model = PositionModel()
    model.on_dex_state(ADDR, "", decode_info(json.dumps(core_state()).encode(), ClearinghouseState), NOW)

    encoded = json.loads(msgspec.json.encode(model.get(ADDR)))

    position = encoded["dexes"][""]["positions"]["BTC"]
    assert position["size"] == "0.1"
    assert position["entry_px"] == "98450.0"
    assert position["liquidation_px"] == "80000.0"
    assert encoded["address"] == ADDR


def test_all_dexs_frame_keeps_each_dex_apart_with_builder_coins() -> None:
    builder = fixture_json("http_clearinghouse_state_builder_perp.json")
    by_coin = {ap["position"]["coin"]: ap for ap in builder["assetPositions"]}
    xyz = dict(builder, assetPositions=[by_coin["xyz:TSLA"]])
    cash = dict(builder, assetPositions=[by_coin["cash:NVDA"]])
    model = PositionModel()

    changes = model.on_all_dexs_state(all_dexs(ADDR, [["", core_state()], ["xyz", xyz], ["cash", cash]]), NOW)

    assert changes.events == []
    doc = model.get(ADDR)
    assert doc is not None
    assert sorted(doc.dexes) == ["", "cash", "xyz"]
    assert doc.source == "ws_state"
    tsla = doc.dexes["xyz"].positions["xyz:TSLA"]
    assert (tsla.dex, tsla.symbol, tsla.side, tsla.size, tsla.leverage) == ("xyz", "TSLAUSDC", "LONG", D("10.0"), 3)
    nvda = doc.dexes["cash"].positions["cash:NVDA"]
    assert (nvda.symbol, nvda.side, nvda.size, nvda.entry_px) == ("cash:NVDAUSDC", "SHORT", D("-5.0"), D("135.20"))
    assert nvda.mark_px == D("676.0") / D("5.0")
    assert nvda.liquidation_distance == abs(D("135.2") - D("50.0")) / D("135.2")
    assert doc.account_value == D("10246.125") + 2 * D("15246.125")
    assert model.stats.bad_input == {}


def test_builder_fixture_as_one_state_counts_coins_of_other_dexes_and_keeps_them() -> None:
    model = PositionModel()
    state = decode_info((FIXTURES / "http_clearinghouse_state_builder_perp.json").read_bytes(), ClearinghouseState)

    model.on_dex_state(ADDR, "", state, NOW)

    doc = model.get(ADDR)
    assert doc is not None
    assert sorted(doc.dexes[""].positions) == ["BTC", "cash:NVDA", "xyz:TSLA"]
    assert model.stats.bad_input == {"coin_outside_dex": 2}
    # A fill of such a coin finds the position where the exchange put it.
    model.on_fill(ADDR, fill(1, 1, "1", "280", coin="xyz:TSLA", start="10.0", time=STATE_TIME + 1), NOW)
    assert doc.dexes[""].positions["xyz:TSLA"].size == D("10.0")  # documents handed out never change
    new_doc = model.get(ADDR)
    assert new_doc is not None
    assert new_doc.dexes[""].positions["xyz:TSLA"].size == D("11.0")
    assert "xyz" not in new_doc.dexes


def test_spot_state_frame_and_mids_value_the_balances() -> None:
    frame = decode_frame(
        json.dumps(
            {
                "channel": "spotState",
                "data": {"user": ADDR, "spotState": fixture_json("http_spot_clearinghouse_state.json")},
            }
        )
    )
    assert isinstance(frame, SpotStateFrame)
    purr = SymbolInfo(coin="PURR/USDC", symbol="PURRUSDC", asset_type="spot", base="PURR", quote="USDC", token="PURR")
    model = PositionModel(symbols=SymbolMap({}, {"PURR/USDC": purr}))

    model.on_spot_state(frame.data.user, frame.data.spot_state, NOW)

    doc = model.get(ADDR)
    assert doc is not None
    assert doc.spot_as_of == NOW
    usdc, purr_balance = doc.spot["USDC"], doc.spot["PURR"]
    assert (usdc.total, usdc.usd_value) == (D("14.625485"), D("14.625485"))
    assert (purr_balance.total, purr_balance.hold, purr_balance.entry_ntl) == (D("2000"), D("100"), D("1234.56"))
    assert purr_balance.usd_value is None  # no price yet: unknown, not zero
    assert doc.spot["+10"].token == 100000010

    mids = decode_frame((FIXTURES / "ws_allmids.json").read_bytes())
    assert isinstance(mids, AllMidsFrame)
    model.on_marks(mids.data.mids, NOW + 1)

    doc = model.get(ADDR)
    assert doc is not None
    assert doc.spot["PURR"].usd_value == D("2000") * D("0.067131")
    assert doc.spot["HYPE"].usd_value is None


def test_mids_revalue_positions_without_events_and_alert_when_close_to_liquidation() -> None:
    model = PositionModel()
    model.on_dex_state(ADDR, "", decode_info(json.dumps(core_state()).encode(), ClearinghouseState), NOW)
    mids = decode_frame((FIXTURES / "ws_allmids.json").read_bytes())
    assert isinstance(mids, AllMidsFrame)

    alerts = model.on_marks(mids.data.mids, NOW + 1)

    doc = model.get(ADDR)
    assert doc is not None
    btc = doc.dexes[""].positions["BTC"]
    mark = D("80868.5")
    assert btc.mark_px == mark
    assert btc.position_value_usd == D("0.1") * mark
    assert btc.unrealized_pnl == D("0.1") * (mark - D("98450.0"))
    # The exchange's return on equity: PnL over the entry notional at the position's leverage.
    assert btc.return_on_equity == btc.unrealized_pnl / (D("0.1") * D("98450.0") / 5)
    assert btc.liquidation_distance == (mark - D("80000.0")) / mark  # about 1.07 %
    assert [(a.level, a.coin, a.liquidation_distance) for a in alerts] == [(D("0.02"), "BTC", btc.liquidation_distance)]
    assert alerts[0].alert_id == f"{ADDR}:pos:BTC:s{STATE_TIME}:seen:liq:0.02:1"
    assert model.stats.events == 0


def test_return_on_equity_follows_the_exchange_example() -> None:
    """The exchange's own example position: ROE −0.0026789 is upnl over entry notional ÷ leverage, not margin."""
    position = wire_position(
        "ETH",
        "0.0335",
        "2986.3",
        leverage={"rawUsd": "-95.059824", "type": "isolated", "value": 20},
        liquidationPx="2866.26936529",
        marginUsed="4.967826",
        positionValue="100.02765",
        returnOnEquity="-0.0026789",
        unrealizedPnl="-0.0134",
    )
    model = PositionModel()
    model.on_dex_state(ADDR, "", state_with([position], STATE_TIME), NOW)
    model.on_marks({"ETH": D("100.02765") / D("0.0335")}, NOW + 1)

    doc = model.get(ADDR)
    assert doc is not None
    eth = doc.dexes[""].positions["ETH"]
    assert eth.leverage_type == "isolated"
    assert eth.return_on_equity is not None
    assert eth.return_on_equity.quantize(D("0.0000001")) == D("-0.0026789")


# ------------------------------------------------------------------------------------ golden: fills and the tape


def test_captured_fills_snapshot_replays_into_positions_and_events() -> None:
    raw = (FIXTURES / "ws_frames.jsonl").read_text().splitlines()[1]
    frame = decode_frame(raw)
    assert isinstance(frame, UserFillsFrame)
    user = frame.data.user
    model = PositionModel()

    events = [e for f in frame.data.fills for e in model.on_fill(user, f, NOW, signal_id=f"sig{f.tid}").events]

    assert [(e.coin, e.event) for e in events] == [
        ("BTC", "opened"),
        ("BTC", "increased"),
        ("xyz:SILVER", "opened"),
        ("xyz:SILVER", "increased"),
        ("xyz:SILVER", "liquidated"),  # the fill's liquidation block names this user
        ("BTC", "reduced"),
        ("xyz:SILVER", "opened"),
        ("xyz:SILVER", "closed"),
        ("xyz:SILVER", "opened"),
    ]
    assert model.stats.bad_input == {"spot_execution": 2}
    assert model.stats.start_mismatches == 0  # every fill's startPosition matched the model
    doc = model.get(user)
    assert doc is not None
    btc = doc.dexes[""].positions["BTC"]
    assert btc.size == D("0.00004")
    assert btc.entry_px == (D("0.0003") * D("83959.0") + D("0.00031") * D("81623.0")) / D("0.00061")
    assert btc.opened_at == 1769814589170
    silver = doc.dexes["xyz"].positions["xyz:SILVER"]
    assert (silver.size, silver.entry_px, silver.symbol, silver.opened_at) == (
        D("0.26"),
        D("75.958"),
        "SILVERUSDC",
        1770318769349,
    )
    liquidated = events[4]
    assert (liquidated.size_before, liquidated.size_after, liquidated.after) == (D("0.6"), D("0"), None)
    assert liquidated.event_id == f"{user}:pos:xyz:SILVER:f1769986907573:1031003079291799"
    assert liquidated.signal_id == "sig1031003079291799"
    assert liquidated.before is not None
    assert liquidated.before.entry_px == (D("0.3") * D("82.744") + D("0.3") * D("82.739")) / D("0.6")


def test_liquidation_fill_of_the_absorbing_side_is_an_ordinary_increase() -> None:
    frame = decode_frame((FIXTURES / "ws_user_fill_liquidation.json").read_bytes())
    assert isinstance(frame, UserEventsFrame)
    assert frame.data.fills is not None
    (liq_fill,) = frame.data.fills
    model = PositionModel()
    model.on_dex_state(
        OTHER, "", state_with([wire_position("BTC", "-0.0213", "66000")], liq_fill.time - 1_000), liq_fill.time
    )

    (event,) = model.on_fill(OTHER, liq_fill, NOW).events

    assert (event.event, event.size_before, event.size_after) == ("increased", D("-0.0213"), D("-0.0223"))
    assert event.after is not None
    assert event.after.entry_px == (D("0.0213") * D("66000") + D("0.001") * D("66653.0")) / D("0.0223")


def test_liquidated_label_without_a_named_user_is_a_liquidation() -> None:
    model = PositionModel()
    model.on_fill(ADDR, fill(1, 1, "2", "100", time=1000), NOW)
    no_user = fill(
        2,
        2,
        "2",
        "90",
        dir="Liquidated Isolated Long",
        start="2",
        time=2000,
        liquidation={"markPx": "90", "method": "market"},
    )

    (event,) = model.on_fill(ADDR, no_user, NOW).events

    assert (event.event, event.after) == ("liquidated", None)


def test_captured_tape_trades_move_both_counterparties() -> None:
    frame = decode_frame((FIXTURES / "ws_frames.jsonl").read_text().splitlines()[7])
    assert isinstance(frame, TradesFrame)
    first = frame.data[0]
    assert first.users is not None
    buyer, seller = first.users
    model = PositionModel()

    (bought,) = model.on_trade(buyer, first, NOW).events
    (sold,) = model.on_trade(seller, first, NOW).events

    assert (bought.event, bought.size_after, bought.source) == ("opened", D("0.00022"), "tape")
    assert (sold.event, sold.size_after) == ("opened", D("-0.00022"))
    assert bought.event_id == f"{buyer}:pos:BTC:f1788490042052:1095884267920331"
    assert model.on_trade(ADDR, first, NOW).events == []
    assert model.stats.bad_input == {"foreign_trade": 1}
    doc = model.get(seller)
    assert doc is not None
    assert doc.source == "tape"
    assert doc.dexes[""].account_value is None  # the tape says nothing about the account


# ------------------------------------------------------------------------------------ arithmetic and events


def test_entry_averages_on_increase_holds_on_reduce_and_resets_on_flip() -> None:
    model = PositionModel()
    kinds: list[str] = []
    script = [
        fill(1, 1, "1", "100", time=1),
        fill(2, 2, "3", "120", start="1", time=2),
        fill(3, 3, "2", "130", dir="Close Long", start="4", time=3),
        fill(4, 4, "5", "90", dir="Long > Short", start="2", time=4),
        fill(5, 5, "3", "80", dir="Close Short", start="-3", time=5),
    ]
    entries: list[Decimal | None] = []
    for f in script:
        (event,) = model.on_fill(ADDR, f, NOW).events
        kinds.append(event.event)
        entries.append(event.after.entry_px if event.after is not None else None)

    assert kinds == ["opened", "increased", "reduced", "flipped", "closed"]
    assert entries == [D("100"), (1 * D("100") + 3 * D("120")) / 4, D("115"), D("90"), None]
    doc = model.get(ADDR)
    assert doc is not None
    assert doc.dexes[""].positions == {}


def test_position_opened_by_a_fill_has_no_liquidation_fields_until_a_state_shows_them() -> None:
    model = PositionModel()
    model.on_dex_state(ADDR, "", state_with([wire_position("ETH", "1", "100", liquidationPx="50")], 1000), NOW)

    model.on_fill(ADDR, fill(1, 1, "1", "110", coin="ETH", start="1", time=2000), NOW)

    doc = model.get(ADDR)
    assert doc is not None
    eth = doc.dexes[""].positions["ETH"]
    assert (eth.liquidation_px, eth.liquidation_distance, eth.margin_used) == (None, None, None)
    assert (eth.leverage_type, eth.leverage) == ("cross", 10)  # the coin's leverage setting persists


def test_same_fill_twice_and_the_tape_trade_of_it_give_one_event() -> None:
    model = PositionModel()
    f = fill(1, 77, "1", "100", time=5000)
    trade = WsTrade(coin="BTC", side="B", px=D("100"), sz=D("1"), time=5000, tid=77, users=(ADDR, OTHER))

    first = model.on_fill(ADDR, f, NOW).events
    again = model.on_fill(ADDR, f, NOW + 1).events
    tape = model.on_trade(ADDR, trade, NOW + 2).events

    assert len(first) == 1
    assert (again, tape) == ([], [])
    assert model.stats.duplicates == 2
    doc = model.get(ADDR)
    assert doc is not None
    assert doc.dexes[""].positions["BTC"].size == D("1")


def test_state_frame_confirming_a_fill_is_not_a_second_event() -> None:
    model = PositionModel()
    model.on_dex_state(ADDR, "", state_with([], 1000), NOW)
    (opened,) = model.on_fill(ADDR, fill(1, 1, "2", "100", time=2000), NOW).events

    confirm = model.on_dex_state(
        ADDR, "", state_with([wire_position("BTC", "2", "100", liquidationPx="60")], 2500), NOW
    )

    assert confirm.events == []
    assert opened.event == "opened"
    doc = model.get(ADDR)
    assert doc is not None
    btc = doc.dexes[""].positions["BTC"]
    assert (btc.liquidation_px, btc.opened_at) == (D("60"), 2000)  # the exchange's fields, the fill's open time


def test_state_frame_first_then_the_fill_is_one_event() -> None:
    model = PositionModel()
    model.on_dex_state(ADDR, "", state_with([], 1000), NOW)

    shown = model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "2", "100")], 2500), NOW).events
    late_fill = model.on_fill(ADDR, fill(1, 1, "2", "100", time=2000), NOW).events

    assert [(e.event, e.event_id, e.source) for e in shown] == [("opened", f"{ADDR}:pos:BTC:s2500:2", "rest")]
    assert late_fill == []
    assert model.stats.covered_by_state == 1


def test_state_without_time_first_then_the_fill_is_one_event() -> None:
    model = PositionModel()
    model.on_dex_state(ADDR, "", state_with([], 1000), NOW)

    shown = model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "2", "100")], 0), NOW).events
    late_fill = model.on_fill(ADDR, fill(1, 1, "2", "100", time=2000), NOW).events

    assert [e.event for e in shown] == ["opened"]
    assert shown[0].event_id.startswith(f"{ADDR}:pos:BTC:h")
    assert late_fill == []


def test_state_older_than_applied_fills_changes_nothing() -> None:
    model = PositionModel()
    model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "1", "100")], 1000), NOW)
    model.on_fill(ADDR, fill(1, 1, "1", "110", start="1", time=3000), NOW)

    # A REST answer from before that fill (it was in flight while the fill arrived).
    stale = model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "1", "100")], 2000), NOW)

    assert stale.events == []
    assert model.stats.states_behind == 1
    doc = model.get(ADDR)
    assert doc is not None
    assert doc.dexes[""].positions["BTC"].size == D("2")


def test_rest_answers_arriving_out_of_order_do_not_move_the_position_back() -> None:
    model = PositionModel()
    model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "1", "100")], 1000), NOW)
    model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "3", "100")], 3000), NOW)

    older = model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "2", "100")], 2000), NOW)

    assert older.events == []
    assert model.stats.states_out_of_order == 1
    doc = model.get(ADDR)
    assert doc is not None
    assert doc.dexes[""].positions["BTC"].size == D("3")


def test_state_showing_a_change_no_fill_reported_is_a_drift_event() -> None:
    model = PositionModel()
    model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "3", "100")], 1000), NOW)

    changes = model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "-1", "95")], 2000), NOW, signal_id="s1")

    (event,) = changes.events
    assert (event.event, event.size_before, event.size_after, event.signal_id) == ("flipped", D("3"), D("-1"), "s1")
    assert event.event_id == f"{ADDR}:pos:BTC:s2000:-1"
    assert event.after is not None
    assert (event.after.entry_px, event.after.opened_at) == (D("95"), 2000)
    assert model.stats.drifts == 1


def test_leverage_change_is_an_event_only_when_the_size_stayed() -> None:
    model = PositionModel()
    model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "1", "100")], 1000), NOW)

    same_size = model.on_dex_state(
        ADDR, "", state_with([wire_position("BTC", "1", "100", leverage={"type": "isolated", "value": 3})], 2000), NOW
    )
    with_size = model.on_dex_state(
        ADDR, "", state_with([wire_position("BTC", "2", "100", leverage={"type": "cross", "value": 5})], 3000), NOW
    )

    assert [(e.event, e.event_id) for e in same_size.events] == [
        ("leverage_changed", f"{ADDR}:pos:BTC:s2000:lev:isolated:3")
    ]
    before, after = same_size.events[0].before, same_size.events[0].after
    assert before is not None
    assert after is not None
    assert (before.leverage, after.leverage, after.leverage_type) == (10, 3, "isolated")
    assert [e.event for e in with_size.events] == ["increased"]


def test_new_position_in_a_later_state_is_opened_and_a_missing_dex_is_flat() -> None:
    xyz = state_with([wire_position("xyz:TSLA", "4", "250")], 1000)
    model = PositionModel()
    model.on_all_dexs_state(
        AllDexsClearinghouseStateData(user=ADDR, clearinghouse_states=[("", state_with([], 1000)), ("xyz", xyz)]), NOW
    )

    later = model.on_all_dexs_state(
        AllDexsClearinghouseStateData(
            user=ADDR, clearinghouse_states=[("", state_with([wire_position("ETH", "-2", "3000")], 2000))]
        ),
        NOW + 5_000,
    )

    assert [(e.coin, e.dex, e.event) for e in later.events] == [("ETH", "", "opened"), ("xyz:TSLA", "xyz", "closed")]
    doc = model.get(ADDR)
    assert doc is not None
    assert sorted(doc.dexes) == [""]


def test_event_ids_are_reproduced_by_a_second_model_and_never_shared() -> None:
    def run() -> list[str]:
        model = PositionModel()
        ids: list[str] = []
        ids += [e.event_id for e in model.on_dex_state(ADDR, "", state_with([], 1000), NOW).events]
        ids += [e.event_id for e in model.on_fill(ADDR, fill(1, 1, "1", "100", time=2000), NOW).events]
        ids += [e.event_id for e in model.on_fill(ADDR, fill(2, 2, "1", "100", start="1", time=2000), NOW).events]
        state = state_with([wire_position("BTC", "5", "100")], 3000)
        ids += [e.event_id for e in model.on_dex_state(ADDR, "", state, NOW).events]
        state = state_with([wire_position("BTC", "5", "100", leverage={"type": "cross", "value": 2})], 4000)
        ids += [e.event_id for e in model.on_dex_state(ADDR, "", state, NOW).events]
        return ids

    first, second = run(), run()

    assert first == second
    assert len(first) == 4
    assert len(set(first)) == 4


def test_removing_an_address_forgets_it_and_its_marks() -> None:
    model = PositionModel()
    model.on_fill(ADDR, fill(1, 1, "1", "100", time=1000), NOW)

    assert model.remove(ADDR.upper().replace("0X", "0x"))
    assert model.get(ADDR) is None
    assert len(model) == 0
    assert model.on_marks({"BTC": D("101")}, NOW) == []
    assert model.remove(ADDR) is False


# ------------------------------------------------------------------------------------ bad input


def test_bad_fields_are_counted_and_never_stored() -> None:
    model = PositionModel()
    positions = [
        wire_position("BTC", "1", "100", liquidationPx="0.0"),
        wire_position("ETH", "2", "10", positionValue="0.0"),
        wire_position("SOL", "3", "5", leverage=None),
        wire_position("BTC", "9", "1"),
    ]
    body = core_state()
    body["assetPositions"] = [{"position": p, "type": "oneWay"} for p in positions]
    body["assetPositions"][2]["position"].pop("entryPx")
    state = decode_info(json.dumps(body).encode(), ClearinghouseState)

    changes = model.on_dex_state(ADDR, "", state, NOW)

    assert changes.events == []
    doc = model.get(ADDR)
    assert doc is not None
    positions_by_coin = doc.dexes[""].positions
    assert positions_by_coin["BTC"].size == D("1")  # the duplicate entry did not replace the first
    assert (positions_by_coin["BTC"].liquidation_px, positions_by_coin["BTC"].liquidation_distance) == (None, None)
    assert (positions_by_coin["ETH"].mark_px, positions_by_coin["ETH"].position_value_usd) == (None, None)
    assert (positions_by_coin["SOL"].entry_px, positions_by_coin["SOL"].leverage) == (None, None)
    assert model.stats.bad_input == {
        "bad_liquidation_px": 1,
        "missing_position_value": 1,
        "missing_leverage": 1,
        "missing_entry_px": 1,
        "duplicate_coin": 1,
    }


def test_unknown_dex_bad_marks_and_odd_executions_are_counted_not_applied() -> None:
    model = PositionModel(dexes=["", "xyz"])
    model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "1", "100", liquidationPx="50")], 1000), NOW)
    before = model.get(ADDR)

    assert model.on_dex_state(ADDR, "flx", state_with([wire_position("flx:OIL", "1", "70")], 2000), NOW).events == []
    assert model.on_fill(ADDR, fill(1, 1, "1", "70", coin="flx:OIL", time=2000), NOW).events == []
    assert model.on_marks({"BTC": D("0"), "ETH": D("-1")}, NOW) == []
    assert model.on_fill(ADDR, fill(2, 2, "1", "1", coin="@107", time=2000), NOW).events == []
    assert model.on_fill(ADDR, fill(3, 3, "0", "100", time=2000), NOW).events == []
    self_trade = WsTrade(coin="BTC", side="B", px=D("1"), sz=D("1"), time=2000, tid=9, users=(ADDR, ADDR))
    assert model.on_trade(ADDR, self_trade, NOW).events == []
    model.on_spot_state(ADDR, msgspec.json.decode(b'{"balances":[{"coin":"X","total":"-1"}]}', type=SpotState), NOW)

    doc = model.get(ADDR)
    assert doc is not None
    assert before is not None
    assert doc.dexes == before.dexes
    assert model.stats.bad_input == {
        "unknown_dex": 2,
        "bad_mark": 2,
        "spot_execution": 1,
        "bad_fill": 1,
        "self_trade": 1,
        "bad_spot_balance": 1,
    }


# ------------------------------------------------------------------------------------ liquidation alerts


def near_liquidation_model() -> PositionModel:
    """A long of 1 BTC at 100 with liquidation at 90."""
    model = PositionModel()
    model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "1", "100", liquidationPx="90")], 1000), NOW)
    return model


def test_wobbling_mark_around_a_level_alerts_once_and_recovery_rearms() -> None:
    model = near_liquidation_model()
    # 5 % level: distance (mark − 90) ÷ mark crosses 0.05 at mark ≈ 94.74; rearms at 7.5 %, mark ≈ 97.30.
    wobble = [D("94.7"), D("94.8"), D("94.6"), D("95.5"), D("94.0"), D("96.0")]
    alerts = [a for i, mark in enumerate(wobble) for a in model.on_marks({"BTC": mark}, NOW + i)]

    assert [a.level for a in alerts] == [D("0.05")]
    assert alerts[0].alert_id == f"{ADDR}:pos:BTC:s1000:seen:liq:0.05:1"

    model.on_marks({"BTC": D("98")}, NOW + 10)  # recovered past 7.5 %: rearmed
    again = model.on_marks({"BTC": D("94.5")}, NOW + 11)

    assert [(a.level, a.alert_id) for a in again] == [(D("0.05"), f"{ADDR}:pos:BTC:s1000:seen:liq:0.05:2")]
    assert model.stats.alerts == 2


def test_a_mid_received_before_a_newer_state_frame_does_not_rearm_an_alert() -> None:
    # allMids and state frames come on different connections; the keeper applies mids a while after they came.
    model = near_liquidation_model()
    assert [a.level for a in model.on_marks({"BTC": D("99")}, NOW + 1)] == [D("0.10")]  # 9.1 % away

    def state_marked(mark: str, time: int, received: int) -> list[D]:
        position = wire_position("BTC", "1", "100", liquidationPx="90", positionValue=mark)
        return [a.level for a in model.on_dex_state(ADDR, "", state_with([position], time), received).alerts]

    # The exchange's mark moved 99 → 94 once; a mid of 99 received at NOW + 2 is applied after the state
    # frame received at NOW + 3 showed 94 (4.3 % away), then the next frame shows 94 again.
    assert state_marked("94", 2000, NOW + 3) == [D("0.05")]
    assert model.on_marks({"BTC": D("99")}, NOW + 2) == []
    assert state_marked("94", 2200, NOW + 4) == []  # the same crossing: no second 5 % alert

    doc = model.get(ADDR)
    position = doc.position("BTC") if doc is not None else None
    assert position is not None
    assert position.mark_px == D("94")  # the stale mid did not move the mark back
    assert model.stats.stale_marks == 1
    # A mid received after the frame applies.
    assert [a.level for a in model.on_marks({"BTC": D("91")}, NOW + 5)] == [D("0.02")]
    assert model.stats.alerts == 3


def test_a_jump_past_several_levels_is_one_alert_for_the_tightest() -> None:
    model = near_liquidation_model()

    alerts = model.on_marks({"BTC": D("91")}, NOW)  # 1.1 % from liquidation
    back_up = model.on_marks({"BTC": D("95")}, NOW + 1)  # 5.3 %: inside 10 % and 2 % × 1.5 is passed

    assert [a.level for a in alerts] == [D("0.02")]
    assert back_up == []


def test_a_position_change_rearms_the_alerts() -> None:
    model = near_liquidation_model()
    assert [a.level for a in model.on_marks({"BTC": D("94")}, NOW)] == [D("0.05")]

    model.on_fill(ADDR, fill(1, 1, "1", "94", start="1", time=2000), NOW)
    shown = model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "2", "97", liquidationPx="90")], 3000), NOW)
    later = model.on_marks({"BTC": D("94")}, NOW + 1)

    # Rearmed by the fill: the confirming state's own mark (97) is 7.2 % away, inside 10 % again.
    assert [(a.level, a.alert_id) for a in shown.alerts] == [(D("0.10"), f"{ADDR}:pos:BTC:f2000:1:liq:0.10:1")]
    assert [(a.level, a.alert_id) for a in later] == [(D("0.05"), f"{ADDR}:pos:BTC:f2000:1:liq:0.05:2")]


def test_custom_levels() -> None:
    model = PositionModel(alert_levels=(D("0.2"),))
    state = state_with([wire_position("BTC", "1", "100", liquidationPx="90")], 1000)

    assert [a.level for a in model.on_dex_state(ADDR, "", state, NOW).alerts] == [D("0.2")]  # 10 % away
    assert model.on_marks({"BTC": D("94")}, NOW) == []  # the default levels are not in force


# ------------------------------------------------------------------------------------ export / restore


def test_export_restore_keeps_documents_dedup_memory_and_alert_state() -> None:
    model = near_liquidation_model()
    f = fill(1, 1, "1", "100", start="1", time=2000)
    model.on_fill(ADDR, f, NOW)
    model.on_dex_state(ADDR, "", state_with([wire_position("BTC", "2", "100", liquidationPx="90")], 2500), NOW)
    assert [a.level for a in model.on_marks({"BTC": D("94")}, NOW)] == [D("0.05")]

    restored = PositionModel.restore(model.export())

    assert restored.get(ADDR) == model.get(ADDR)
    assert restored.on_fill(ADDR, f, NOW + 1).events == []  # remembered across the restart
    assert restored.on_marks({"BTC": D("94.1")}, NOW + 2) == []  # already alerted for this crossing
    assert [a.level for a in restored.on_marks({"BTC": D("91")}, NOW + 3)] == [D("0.02")]


def test_restore_refuses_garbage_and_other_versions() -> None:
    exported = json.loads(PositionModel().export())

    with pytest.raises(PortfolioStateError) as garbage:
        PositionModel.restore(b"{not json")
    with pytest.raises(PortfolioStateError) as version:
        PositionModel.restore(json.dumps(dict(exported, version=99)))

    assert "undecodable" in garbage.value.reason
    assert "99" in version.value.reason


def test_documents_handed_out_do_not_change_later() -> None:
    model = PositionModel()
    model.on_fill(ADDR, fill(1, 1, "1", "100", time=1000), NOW)
    snapshot = model.get(ADDR)
    frozen_copy = copy.deepcopy(snapshot)

    model.on_fill(ADDR, fill(2, 2, "1", "100", start="1", time=2000), NOW)
    model.on_marks({"BTC": D("120")}, NOW)

    assert snapshot == frozen_copy


def test_remembered_executions_are_found_in_any_arrival_order_and_the_oldest_is_forgotten_first() -> None:
    ledger = CoinLedger()
    times = list(range(MAX_REMEMBERED + 10))
    random.Random(7).shuffle(times)  # fills of several connections and REST reads arrive out of order
    for t in times:
        ledger.remember(t, t * 10, D(1))
    assert [entry[0] for entry in ledger.applied] == list(range(10, MAX_REMEMBERED + 10))  # the newest kept
    assert ledger.floor == 9  # what was forgotten can no longer be told from a duplicate: refused as too old
    assert ledger.has(500, 5000)
    assert not ledger.has(500, 5001)  # same time, another trade
    assert not ledger.has(5, 50)  # forgotten
    # State saved by a version that kept arrival order is put in order when it is restored.
    restored = msgspec.json.decode(b'{"applied":[[3,1,"1"],[1,1,"2"]]}', type=CoinLedger)
    assert restored.applied == [(1, 1, D(2)), (3, 1, D(1))]
    assert restored.has(3, 1)
