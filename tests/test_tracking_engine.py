"""Golden scenarios for the tracking engine: frames in, exact signals out (rules; what the old service got wrong)."""

from __future__ import annotations

import json
from decimal import Decimal

import msgspec

from hl_monitor.config import AggregationConfig
from hl_monitor.domain.publication import FillRecord
from hl_monitor.domain.signal import LiquidationInfo, Signal, encode_signal
from hl_monitor.hyperliquid.protocol import (
    AllDexsClearinghouseStateData,
    ClearinghouseState,
    SpotState,
    SpotStateData,
    UserEventsFrame,
    UserFillsData,
    UserTwapHistoryData,
    UserTwapHistoryFrame,
    decode_frame,
    decode_info,
)
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.state import EngineState
from tests.support.factories import ADDR, NOW, OTHER, T0, engine, fill, fixture_fills, fixture_frame, frame, update
from tests.support.paths import FIXTURES
from tests.support.symbols import build as build_symbols

D = Decimal
MINUTE = 60_000
TIMEOUT = 300_000  # default aggregation.timeout


def ids(signals: list[Signal]) -> list[str]:
    return [s.signal_id for s in signals]


# ------------------------------------------------------------------------------------------ real frames


def test_real_snapshot_of_new_address_only_seeds_then_stream_replay_is_absorbed() -> None:
    """The first snapshot of a new address makes no signal (the old service ignored `isSnapshot` and re-emitted
    old orders); replaying its fills later changes nothing."""
    data = fixture_frame(2)
    eng = TrackingEngine(AggregationConfig(), SymbolMap.empty())
    eng.add_address(data.user)
    assert eng.on_user_fills(data.user, data, NOW) == []
    wm = eng.watermark(data.user)
    assert wm is not None
    assert (wm.time, wm.tid) == (1770318769349, 918942806591746)
    assert eng.on_user_fills(data.user, data, NOW + 1) == []  # snapshot after a reconnect
    replay = msgspec.structs.replace(data, is_snapshot=False)
    assert eng.on_user_fills(data.user, replay, NOW + 2) == []  # duplicate frame
    assert eng.tick(NOW + 10 * TIMEOUT) == []
    assert eng.stats.seeded_fills == 11
    assert eng.stats.duplicate_fills + eng.stats.stale_fills == 22


def test_real_fills_make_the_expected_signals() -> None:
    """ws_frames line 2 (spot, dust, xyz:SILVER, cloids, liquidation) as live fills: exact signal set."""
    data = msgspec.structs.replace(fixture_frame(2), is_snapshot=False)
    eng = TrackingEngine(AggregationConfig(), SymbolMap.empty(), instance_id="i1")
    eng.add_address(data.user, "silver whale")
    assert eng.on_user_fills(data.user, data, NOW) == []
    signals = eng.tick(NOW + TIMEOUT)
    rows = [
        (s.oid, s.dir, s.asset_type, s.symbol, s.size, s.price, s.close_rate, s.position_after, s.full_close)
        for s in signals
    ]
    assert rows == [
        (232375809344, "Sell", "spot", "@151", D("0.0526"), D("3483.6"), D("0.999492"), D("0.000026746"), False),
        (307033479126, "Open Long", "futures", "BTCUSDC", D("0.0003"), D("83959.0"), 0, D("0.0003"), False),
        (307033892448, "Open Long", "futures", "BTCUSDC", D("0.00031"), D("81623.0"), 0, D("0.00061"), False),
        (307033477544, "Open Long", "futures", "SILVERUSDC", D("0.3"), D("82.744"), 0, D("0.3"), False),
        (307033890639, "Open Long", "futures", "SILVERUSDC", D("0.3"), D("82.739"), 0, D("0.6"), False),
        (308800014194, "Close Long", "futures", "SILVERUSDC", D("0.6"), D("80.601"), 1, 0, True),
        (
            311684488193,
            "Close Long",
            "futures",
            "BTCUSDC",
            D("0.00057"),
            D("73639.0"),
            D("0.934426"),
            D("0.00004"),
            False,
        ),
        (313061796702, "Open Long", "futures", "SILVERUSDC", D("1.33"), D("75.322"), 0, D("1.33"), False),
        (313064075850, "Close Long", "futures", "SILVERUSDC", D("1.33"), D("75.978"), 1, 0, True),
        (313111705921, "Open Long", "futures", "SILVERUSDC", D("0.26"), D("75.958"), 0, D("0.26"), False),
    ]
    assert eng.stats.ignored_fills == 1  # the Spot Dust Conversion (tid 0)
    liquidated = signals[5]
    assert liquidated == Signal(
        address=data.user,
        asset_type="futures",
        symbol="SILVERUSDC",
        coin_type="D",
        direction="close",
        side="LONG",
        position_rate=D(100),
        close_rate=D("1.000000"),
        size=D("0.6"),
        price=D("80.601"),
        timestamp=1769986907573,
        signal_id=f"{data.user}:308800014194:CL",
        coin="xyz:SILVER",
        dir="Close Long",
        oid=308800014194,
        trigger="timeout",
        fill_count=1,
        first_fill_time=1769986907573,
        last_fill_time=1769986907573,
        notional_usd=D("48.3606"),
        position_before=D("0.6"),
        position_after=D("0.0"),
        full_close=True,
        liquidation=LiquidationInfo(mark_px=D("80.498"), method="market", liquidated_user=data.user),
        label="silver whale",
        detected_at=NOW + TIMEOUT,
        detected_by="i1",
    )
    encoded = json.loads(encode_signal(liquidated))
    assert encoded["size"] == 0.6
    assert '"price":80.601' in encode_signal(liquidated).decode()


def test_real_liquidation_counterparty_fill_keeps_its_liquidation_block() -> None:
    """A userEvents fill that absorbed someone's liquidation (Open Short) carries the block on its signal."""
    raw = json.loads((FIXTURES / "ws_user_fill_liquidation.json").read_text())
    user = "0x" + "12" * 20
    eng = TrackingEngine(AggregationConfig(), SymbolMap.empty())
    eng.add_address(user)
    event = decode_frame(json.dumps(raw))
    assert isinstance(event, UserEventsFrame)
    assert event.data.fills is not None
    eng.on_user_fills(user, UserFillsData(user=user, fills=event.data.fills), NOW)
    (signal,) = eng.flush_address(user, NOW)
    assert (signal.direction, signal.side, signal.trigger) == ("open", "SHORT", "shutdown")
    assert signal.liquidation == LiquidationInfo(
        mark_px=D("66607.0"), method="market", liquidated_user="0x360878d351f05975e25f1807a27895e1e5e004fb"
    )
    assert signal.position_before == D("-0.0213")
    assert signal.position_after == D("-0.0223")


def test_real_partial_fills_of_one_order_aggregate_with_vwap() -> None:
    """Two captured partial fills of one cloid order (one with a zero hash) → one signal, exact sums."""
    fills = fixture_fills("http_user_fills_with_cloid.json")
    eng = engine()
    eng.on_user_fills(ADDR, frame(*fills, user=ADDR), NOW)
    (signal,) = eng.on_order_updates(ADDR, [update(544900123760, "filled", orig="0.00551")], NOW)
    assert signal.size == D("0.00551")
    assert signal.price == D("78751.0")
    assert signal.fill_count == 2
    assert signal.timestamp == 1789407361023
    assert signal.position_before == D("4.22602")
    assert signal.position_after == D("4.23153")


def test_real_dust_and_vault_fills_are_recorded_without_signals() -> None:
    """Dust conversions and Net Child Vaults rows make no signal and leave no pending state (the old service kept
    orders of dirs it did not handle pending forever)."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(*fixture_fills("http_user_fills_dust_conversion.json")), NOW)
    assert eng.stats.ignored_fills == 2
    assert eng.stats.pending_orders == 3  # ARB open, JUP close, @156 buy
    signals = eng.tick(NOW + TIMEOUT)
    assert [s.dir for s in signals] == ["Open Long", "Close Short", "Buy"]  # timeouts in arrival order
    close_short = signals[1]
    assert close_short.close_rate == D("0.004931")  # the old service reported 0 for every Close Short
    assert eng.stats.pending_orders == 0


def test_real_twap_slices_aggregate_by_twap_id() -> None:
    """TWAP slice fills (different oids, zero hashes) aggregate into one signal keyed by twapId."""
    raw = json.loads((FIXTURES / "ws_user_twap_slice_fills.json").read_text())
    slices = [
        fill(
            s["fill"]["oid"],
            s["fill"]["tid"],
            s["fill"]["sz"],
            s["fill"]["px"],
            start=s["fill"]["startPosition"],
            time=s["fill"]["time"],
            twap_id=s["twapId"],
        )
        for s in raw["data"]["twapSliceFills"]
    ]
    eng = engine()
    assert eng.on_user_fills(ADDR, frame(slices[0]), NOW) == []
    assert eng.on_order_updates(ADDR, [update(slices[0].oid, "filled", orig="0.02066")], NOW) == []
    assert eng.on_user_fills(ADDR, frame(slices[1]), NOW + 30_000) == []
    assert eng.tick(NOW + 30_000 + TIMEOUT - 1) == []
    (signal,) = eng.tick(NOW + 30_000 + TIMEOUT)
    assert signal.signal_id == f"{ADDR}:twap2087225:OL"
    assert (signal.oid, signal.twap_id, signal.size, signal.fill_count) == (None, 2087225, D("0.04132"), 2)
    assert signal.position_before == D("4.04958")
    assert signal.position_after == D("4.0909")
    assert eng.stats.parked_statuses == 0  # the slice's own status needs no parking


def twap_history(twap_id: int, status: str, executed: str, *, at_s: int = T0 // 1000 + 60) -> UserTwapHistoryData:
    """A `userTwapHistory` update shaped like the captured frame (tests/fixtures/ws_user_twap_history.json)."""
    raw = json.loads((FIXTURES / "ws_user_twap_history.json").read_text())
    entry = raw["data"]["history"][0]
    entry.update(time=at_s, twapId=twap_id, status={"status": status})
    entry["state"].update(user=ADDR, executedSz=executed)
    data = {"channel": "userTwapHistory", "data": {"user": ADDR, "history": [entry]}}
    frame_ = decode_frame(json.dumps(data))
    assert isinstance(frame_, UserTwapHistoryFrame)
    return frame_.data


def test_a_finished_twap_flushes_once_its_slices_add_up_not_after_the_timeout() -> None:
    eng = engine()
    slices = [fill(100 + i, 10 + i, "0.5", "95", start=f"{i / 2}", time=T0 + i * 30_000, twap_id=77) for i in range(3)]
    for i, s in enumerate(slices[:2]):
        assert eng.on_user_fills(ADDR, frame(s), NOW + i * 30_000) == []
    assert eng.on_twap_history(ADDR, twap_history(77, "activated", "0.0"), NOW) == []
    # Finished with 1.5 executed: one slice's fill is still on its way, so the signal waits for it.
    assert eng.on_twap_history(ADDR, twap_history(77, "finished", "1.5"), NOW + 61_000) == []
    (signal,) = eng.on_user_fills(ADDR, frame(slices[2]), NOW + 61_010)
    assert (signal.twap_id, signal.size, signal.fill_count) == (77, D("1.5"), 3)
    assert (signal.trigger, signal.status) == ("status", "finished")
    assert signal.position_after == D("1.5")
    assert eng.tick(NOW + 61_010 + TIMEOUT) == []  # nothing left for the timeout
    # A repeated status (the snapshot after a reconnect) and unknown TWAPs change nothing.
    assert eng.on_twap_history(ADDR, twap_history(77, "finished", "1.5"), NOW + 70_000) == []
    assert eng.on_twap_history(ADDR, twap_history(78, "terminated", "2"), NOW + 70_000) == []


def test_a_terminated_twap_whose_last_fill_never_comes_flushes_after_the_grace() -> None:
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(200, 20, "1", twap_id=88)), NOW)
    assert eng.on_twap_history(ADDR, twap_history(88, "terminated", "2"), NOW + 1000) == []
    grace = round(AggregationConfig().status_grace * 1000)
    assert eng.tick(NOW + 1000 + grace - 1) == []
    (signal,) = eng.tick(NOW + 1000 + grace)
    assert (signal.size, signal.status, signal.trigger) == (D("1"), "terminated", "status")


# ------------------------------------------------------------------------------------------ aggregation


def test_vwap_and_size_over_several_frames_one_signal_on_terminal_status() -> None:
    """Fills of one order in two frames; `filled` flushes once with Σsz and Σ(sz·px)/Σsz."""
    eng = engine()
    assert eng.on_user_fills(ADDR, frame(fill(1, 11, "1.5", "100")), NOW) == []
    assert eng.on_user_fills(ADDR, frame(fill(1, 12, "0.5", "102", start="1.5", time=T0 + 5)), NOW + 5) == []
    (signal,) = eng.on_order_updates(ADDR, [update(1, "filled", orig="2")], NOW + 6)
    assert (signal.signal_id, signal.size, signal.price) == (f"{ADDR}:1:OL", D("2.0"), D("100.5"))
    assert (signal.trigger, signal.status, signal.fill_count) == ("status", "filled", 2)
    assert eng.on_order_updates(ADDR, [update(1, "filled", orig="2")], NOW + 7) == []  # duplicate frame
    assert eng.tick(NOW + 10 * TIMEOUT) == []


def test_bug2_first_fill_redelivered_is_not_counted_twice() -> None:
    """The first fill's tid is recorded (the old service skipped it), so its redelivery does not double size or
    skew VWAP."""
    eng = engine()
    first = fill(1, 11, "1", "100")
    eng.on_user_fills(ADDR, frame(first), NOW)
    eng.on_user_fills(ADDR, frame(first, fill(1, 12, "1", "110", start="1")), NOW + 1)
    eng.on_user_fills(ADDR, frame(first), NOW + 2)
    (signal,) = eng.on_order_updates(ADDR, [update(1, "filled", orig="2")], NOW + 3)
    assert (signal.size, signal.price, signal.fill_count) == (D(2), D(105), 2)
    assert eng.stats.duplicate_fills == 2


def test_same_oid_in_two_directions_makes_two_signals() -> None:
    """A flip order: Close Long |startPosition| and Open Short remainder, two signals, one status."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(5, 51, "1", "100", dir="Close Long", start="3", side="A")), NOW)
    eng.on_user_fills(ADDR, frame(fill(5, 52, "5", "99", dir="Long > Short", start="2", side="A")), NOW + 1)
    signals = eng.on_order_updates(ADDR, [update(5, "filled", orig="6")], NOW + 2)
    assert ids(signals) == [f"{ADDR}:5:CL", f"{ADDR}:5:OS"]
    close, opened = signals
    assert (close.size, close.price, close.close_rate, close.full_close) == (
        D(3),
        D("99.33333333333333333333333333"),
        D(1),
        True,
    )
    assert (close.position_before, close.position_after) == (D(3), D(0))
    assert (opened.size, opened.price, opened.position_before, opened.position_after) == (D(3), D(99), D(0), D(-3))
    assert close.size + opened.size == D(6)


def test_liquidation_without_block_is_a_tagged_close() -> None:
    """ADL fills (no liquidation block) become close signals tagged liquidation, side from startPosition."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(9, 91, "2", "50", dir="Auto-Deleveraging", start="-5", side="B")), NOW)
    (signal,) = eng.on_order_updates(ADDR, [update(9, "filled", orig="2")], NOW)
    assert signal.signal_id == f"{ADDR}:9:ADL-CS"
    assert (signal.direction, signal.side, signal.dir, signal.close_rate) == (
        "close",
        "SHORT",
        "Auto-Deleveraging",
        D("0.4"),
    )
    assert signal.liquidation == LiquidationInfo(mark_px=None, method="adl")


def test_unknown_dir_is_counted_and_leaks_nothing() -> None:
    """An unknown dir is counted, named in stats, and never creates a pending order (no state that never ends)."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(3, 31, "1", dir="Outcome Merge")), NOW)
    assert eng.stats.unknown_dirs == 1
    assert eng.stats.unknown_dir_names == {"Outcome Merge": 1}
    assert eng.stats.pending_orders == 0
    assert eng.pending_oids(ADDR) == []
    eng.on_user_fills(ADDR, frame(fill(3, 31, "1", dir="Outcome Merge")), NOW)
    assert eng.stats.unknown_dirs == 1  # deduplicated like any fill


def test_bug23_exact_decimals_for_huge_sizes_and_tiny_prices() -> None:
    """Sizes beyond 10^10 and 1e-8 prices stay exact (no float, no decimal(18,8) overflow as in the old service)."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(4, 41, "123456789012.123456789", "0.00000001234", coin="kPEPE")), NOW)
    (signal,) = eng.on_order_updates(ADDR, [update(4, "filled", orig="123456789012.123456789")], NOW)
    assert signal.size == D("123456789012.123456789")
    assert signal.price == D("0.00000001234")
    assert signal.notional_usd == D("123456789012.123456789") * D("0.00000001234")
    assert b'"size":123456789012.123456789' in encode_signal(signal)


# ------------------------------------------------------------------------------------------ flush triggers


def test_bug5_timeout_runs_from_the_last_fill() -> None:
    """An order filling over 12 minutes is one signal, flushed 5 min after its LAST fill (not its first)."""
    eng = engine()
    for i in range(5):
        now = NOW + i * 3 * MINUTE
        assert eng.on_user_fills(ADDR, frame(fill(6, 60 + i, "1", time=T0 + i * 3 * MINUTE, start=str(i))), now) == []
        assert eng.tick(now) == []
    last = NOW + 12 * MINUTE
    assert eng.tick(last + TIMEOUT - 1) == []
    (signal,) = eng.tick(last + TIMEOUT)
    assert (signal.size, signal.fill_count, signal.trigger, signal.status) == (D(5), 5, "timeout", None)


def test_bug6_status_and_timeout_together_flush_once() -> None:
    """A terminal status and an expired timeout in the same instant give exactly one signal (no double flush)."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(7, 71, "1")), NOW)
    late = NOW + TIMEOUT
    first = eng.on_order_updates(ADDR, [update(7, "filled")], late)
    second = eng.tick(late)
    again = eng.on_order_updates(ADDR, [update(7, "filled")], late)
    assert ids(first + second + again) == [f"{ADDR}:7:OL"]
    delta = eng.take_dirty()
    assert [r.signal_id for r in delta.closed] == [f"{ADDR}:7:OL"]
    assert delta.upserted == []


def test_bug7_status_before_fills_is_parked_and_applied() -> None:
    """`filled` arrives before any fill (the old service lost it); the fills then flush at once with that status."""
    eng = engine()
    assert eng.on_order_updates(ADDR, [update(8, "filled", orig="2")], NOW) == []
    assert eng.stats.parked_statuses == 1
    (signal,) = eng.on_user_fills(ADDR, frame(fill(8, 81, "1"), fill(8, 82, "1", start="1")), NOW + 3)
    assert (signal.size, signal.trigger, signal.status) == (D(2), "status", "filled")
    assert eng.stats.parked_statuses == 0


def test_status_between_fills_waits_for_the_fills_it_accounts_for() -> None:
    """`filled` after the first of two fill frames does not flush a partial order."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(9, 91, "1")), NOW)
    assert eng.on_order_updates(ADDR, [update(9, "filled", orig="3")], NOW + 1) == []
    (signal,) = eng.on_user_fills(ADDR, frame(fill(9, 92, "2", start="1", time=T0 + 1)), NOW + 2)
    assert (signal.size, signal.fill_count, signal.trigger) == (D(3), 2, "status")


def test_partial_cancel_flushes_with_the_filled_part() -> None:
    """A `canceled` order with 0.4 of 1 filled flushes once its 0.4 has arrived."""
    eng = engine()
    (signal,) = [
        *eng.on_order_updates(ADDR, [update(10, "canceled", orig="1", sz="0.6")], NOW),
        *eng.on_user_fills(ADDR, frame(fill(10, 101, "0.4")), NOW + 1),
    ]
    assert (signal.size, signal.status) == (D("0.4"), "canceled")


def test_status_grace_flushes_when_promised_fills_never_come() -> None:
    """The fills a terminal status accounts for are missing: flush after `status_grace`, later fills are late."""
    eng = engine(status_grace=10.0)
    eng.on_user_fills(ADDR, frame(fill(11, 111, "1")), NOW)
    eng.on_order_updates(ADDR, [update(11, "filled", orig="2")], NOW + 1)
    assert eng.tick(NOW + 10_000) == []
    (signal,) = eng.tick(NOW + 10_001)
    assert (signal.size, signal.trigger, signal.status) == (D(1), "status", "filled")
    assert eng.on_user_fills(ADDR, frame(fill(11, 112, "1", start="1")), NOW + 20_000) == []
    assert eng.stats.late_fills_dropped == 1
    assert eng.tick(NOW + 10 * TIMEOUT) == []


def test_terminal_status_without_fills_is_not_parked() -> None:
    """Rejected or fully unfilled cancels can never get fills: counted, not parked (no memory cost)."""
    eng = engine()
    eng.on_order_updates(
        ADDR, [update(12, "badAloPxRejected", sz="1"), update(13, "canceled", sz="1"), update(14, "open", sz="1")], NOW
    )
    assert eng.stats.parked_statuses == 0
    assert eng.stats.statuses_without_fills == 2


def test_reconcile_status_from_rest_flushes_now() -> None:
    """REST orderStatus says the order ended during a gap: trigger `reconcile`, the REST status."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(15, 151, "1"), fill(16, 161, "2")), NOW)
    assert eng.pending_oids(ADDR) == [15, 16]
    assert eng.on_order_status(ADDR, 15, "open", T0, NOW) == []
    (signal,) = eng.on_order_status(ADDR, 16, "marginCanceled", T0, NOW + 1)
    assert (signal.trigger, signal.status, signal.size) == ("reconcile", "marginCanceled", D(2))
    assert eng.on_order_status(ADDR, 99, "filled", T0, NOW) == []  # nothing pending: nothing to do
    assert eng.on_order_status(ADDR, 15, "unknownOid", T0, NOW) == []
    assert eng.pending_oids(ADDR) == [15]


def test_late_fill_after_final_flush_is_counted_and_dropped() -> None:
    """A fill of an order flushed under its terminal status extends nothing and reuses no id."""
    eng = engine(status_grace=1.0)
    eng.on_user_fills(ADDR, frame(fill(17, 171, "1")), NOW)
    (signal,) = eng.on_order_updates(ADDR, [update(17, "canceled", orig="1", sz="0")], NOW)
    assert eng.on_user_fills(ADDR, frame(fill(17, 172, "1", start="1")), NOW + 1) == []
    assert eng.tick(NOW + 10 * TIMEOUT) == []
    assert eng.stats.late_fills_dropped == 1
    assert signal.size == 1


def test_fill_after_timeout_flush_of_open_order_starts_a_continuation() -> None:
    """A resting order flushed by timeout then filled again: continuation signal with its own id."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(18, 181, "1")), NOW)
    eng.on_order_updates(ADDR, [update(18, "open", orig="3", sz="2")], NOW)
    (first,) = eng.tick(NOW + TIMEOUT)
    assert (first.signal_id, first.trigger, first.status) == (f"{ADDR}:18:OL", "timeout", None)
    assert eng.on_user_fills(ADDR, frame(fill(18, 182, "1", start="1", time=T0 + 400_000)), NOW + 400_000) == []
    (second,) = eng.on_user_fills(ADDR, frame(fill(18, 183, "1", start="2", time=T0 + 400_001)), NOW + 400_001) or [
        *eng.on_order_updates(ADDR, [update(18, "filled", orig="3")], NOW + 400_002)
    ]
    assert second.signal_id == f"{ADDR}:18:OL:c182"
    assert (second.size, second.trigger, second.status) == (D(2), "status", "filled")
    assert eng.stats.continuations == 1


def test_continuation_completes_when_the_late_status_accounts_for_all_fills() -> None:
    """Timeout flush, then `filled` (3 expected, 1 seen) arrives: the missing 2 form one continuation."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(19, 191, "1")), NOW)
    eng.tick(NOW + TIMEOUT)
    assert eng.on_order_updates(ADDR, [update(19, "filled", orig="3")], NOW + TIMEOUT + 1) == []
    (cont,) = eng.on_user_fills(ADDR, frame(fill(19, 192, "2", start="1", time=T0 + 1)), NOW + TIMEOUT + 2)
    assert (cont.signal_id, cont.size, cont.trigger) == (f"{ADDR}:19:OL:c192", D(2), "status")
    assert eng.on_user_fills(ADDR, frame(fill(19, 193, "1", start="3", time=T0 + 2)), NOW + TIMEOUT + 3) == []
    assert eng.stats.late_fills_dropped == 1


# ------------------------------------------------------------------------------------------ snapshots


def test_reconnect_snapshot_processes_only_new_fills_as_backfilled() -> None:
    """After a reconnect, the snapshot's unseen fills are processed and flagged with lateness."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(20, 201, "1")), NOW)
    eng.on_order_updates(ADDR, [update(20, "filled")], NOW)
    gap = fill(21, 211, "2", time=T0 + 1000)
    signals = eng.on_user_fills(ADDR, frame(fill(20, 201, "1"), gap, snapshot=True), NOW + 5000)
    assert signals == []
    (signal,) = eng.on_order_status(ADDR, 21, "filled", T0 + 1000, NOW + 5001)
    assert (signal.backfilled, signal.lateness_ms, signal.size) == (True, NOW + 5000 - (T0 + 1000), D(2))
    assert eng.stats.backfilled_fills == 1
    assert eng.stats.duplicate_fills == 1


def test_rest_backfill_of_a_gap_is_deduplicated_against_the_stream() -> None:
    """REST userFillsByTime overlapping what the stream delivered: only the missed fill counts."""
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(22, 221, "1", time=T0)), NOW)
    eng.on_user_fills(ADDR, frame(fill(22, 223, "1", start="2", time=T0 + 20)), NOW + 20)
    missed = fill(22, 222, "1", start="1", time=T0 + 10)
    assert eng.on_backfill(ADDR, [fill(22, 223, "1", start="2", time=T0 + 20), missed], NOW + 30) == []
    (signal,) = eng.on_order_updates(ADDR, [update(22, "filled", orig="3")], NOW + 31)
    assert (signal.size, signal.fill_count, signal.backfilled) == (D(3), 3, True)
    assert signal.position_before == 0
    assert signal.position_after == D(3)


def test_fills_older_than_the_seen_window_are_stale() -> None:
    """Keys older than `seen_window` behind the newest fill are dropped; replays of them stay ignored."""
    eng = engine(seen_window=60.0)
    old = fill(23, 231, "1", time=T0)
    eng.on_user_fills(ADDR, frame(old), NOW)
    eng.on_user_fills(ADDR, frame(fill(24, 241, "1", time=T0 + 61_000)), NOW + 61_000)
    wm = eng.watermark(ADDR)
    assert wm is not None
    assert wm.floor == T0 + 1000
    assert [k for k, _ in wm.seen] == [241]
    assert eng.on_user_fills(ADDR, frame(old, snapshot=True), NOW + 62_000) == []
    assert eng.stats.stale_fills == 1


def test_seen_keys_are_bounded_per_address_and_evictions_counted() -> None:
    """Past `max_seen_per_address` the oldest keys go, the floor rises past them, nothing is reprocessed."""
    eng = engine(max_seen_per_address=3)
    fills = [fill(30 + i, 300 + i, "1", time=T0 + i) for i in range(5)]
    eng.on_user_fills(ADDR, frame(*fills), NOW)
    assert eng.stats.evictions_by_kind["seen_keys"] == 2
    eng.on_user_fills(ADDR, frame(*fills, snapshot=True), NOW + 1)
    assert eng.stats.stale_fills + eng.stats.duplicate_fills == 5
    assert len(eng.tick(NOW + TIMEOUT)) == 5


# ------------------------------------------------------------------------------------------ addresses


def test_bug19_mixed_case_address_matches_lowercase_user() -> None:
    """An address stored mixed-case still receives Hyperliquid's lowercase frames (the old service dropped them)."""
    mixed = "0x" + "AbCdEf" * 6 + "ABCD"
    eng = TrackingEngine(AggregationConfig(), SymbolMap.empty())
    eng.add_address(mixed)
    lower = mixed.lower()
    eng.on_user_fills(lower, frame(snapshot=True, user=lower), NOW)
    eng.on_user_fills(mixed, frame(fill(1, 1, "1"), user=lower), NOW)
    (signal,) = eng.on_order_updates(mixed, [update(1, "filled")], NOW)
    assert signal.address == lower


def test_bug8_removing_one_address_keeps_the_others_orders() -> None:
    """Unsubscribing address A does not disturb address B's in-flight order matching (the old service wiped the
    oid map of every address)."""
    eng = engine()
    eng.add_address(OTHER)
    eng.on_user_fills(OTHER, frame(snapshot=True, user=OTHER), NOW)
    eng.on_user_fills(ADDR, frame(fill(40, 401, "1")), NOW)
    eng.on_user_fills(OTHER, frame(fill(41, 411, "1"), user=OTHER), NOW)
    eng.remove_address(OTHER)
    (signal,) = eng.on_order_updates(ADDR, [update(40, "filled")], NOW + 1)
    assert signal.oid == 40
    assert eng.on_user_fills(OTHER, frame(fill(41, 412, "1"), user=OTHER), NOW) == []
    assert eng.stats.unwatched_frames == 1
    assert eng.stats.pending_orders == 0
    assert eng.take_dirty().removed_addresses == [OTHER]


def test_frame_for_another_user_is_ignored() -> None:
    eng = engine()
    assert eng.on_user_fills(ADDR, frame(fill(1, 1, "1"), user=OTHER), NOW) == []
    assert eng.stats.user_mismatch == 1
    assert eng.stats.pending_orders == 0


# ------------------------------------------------------------------------------------------ rates


def test_position_rate_uses_account_value_across_dexes_and_spot_total() -> None:
    """position_rate = notional / balance × 100 (futures: Σ dex account values; spot: spot USD total)."""
    state = decode_info((FIXTURES / "http_clearinghouse_state.json").read_bytes(), ClearinghouseState)
    xyz = msgspec.structs.replace(
        state, margin_summary=msgspec.structs.replace(state.margin_summary, account_value=D(0))
    )
    eng = engine(symbols=build_symbols({"BTC": 1}))
    eng.on_clearinghouse(
        ADDR, AllDexsClearinghouseStateData(user=ADDR, clearinghouse_states=[("", state), ("xyz", xyz)]), NOW
    )
    spot = decode_info((FIXTURES / "http_spot_clearinghouse_state.json").read_bytes(), SpotState)
    eng.positions.set_token_prices({"HYPE": D(40)})
    eng.on_spot_state(ADDR, SpotStateData(user=ADDR, spot_state=spot), NOW)
    assert eng.positions.spot_total_usd(ADDR) == D("14.625485") + D("1234.56") + D(208) + D("12.5")
    eng.on_user_fills(
        ADDR, frame(fill(50, 501, "0.1", "100000"), fill(51, 511, "1", "40", dir="Buy", coin="@107")), NOW
    )
    futures, spot_signal = eng.flush_address(ADDR, NOW)
    account = state.margin_summary.account_value
    assert futures.position_rate == (D(10000) * 100 / account).quantize(D("0.000001"))
    assert (futures.symbol, futures.coin_type) == ("BTCUSDC", "A")
    assert spot_signal.position_rate == (D(4000) / eng.positions.spot_total_usd(ADDR)).quantize(D("0.000001"))  # type: ignore[operator]
    assert (spot_signal.symbol, spot_signal.asset_type) == ("HYPEUSDC", "spot")


def test_position_rate_falls_back_to_100_when_balance_unknown() -> None:
    eng = engine()
    eng.on_user_fills(ADDR, frame(fill(52, 521, "1", "5")), NOW)
    (signal,) = eng.flush_address(ADDR, NOW)
    assert signal.position_rate == 100


def test_spot_sell_of_non_usdc_pair_gets_a_close_rate() -> None:
    """close_rate of a spot sell on a USDT0-quoted pair comes from startPosition, not a cache miss."""
    eng = engine(symbols=build_symbols())
    eng.on_user_fills(ADDR, frame(fill(53, 531, "2", "40", dir="Sell", start="8", coin="@181")), NOW)
    (signal,) = eng.flush_address(ADDR, NOW)
    assert (signal.symbol, signal.close_rate, signal.full_close) == ("HYPEUSDT0", D("0.25"), False)


# ------------------------------------------------------------------------------------------ memory bounds


def test_parked_statuses_expire_by_ttl_and_size() -> None:
    eng = engine(status_park_ttl=60.0, max_parked_statuses=2)
    eng.on_order_updates(ADDR, [update(60, "filled"), update(61, "filled"), update(62, "filled")], NOW)
    assert eng.stats.parked_statuses == 2
    assert eng.stats.evictions_by_kind == {"parked_statuses": 1}
    eng.tick(NOW + 60_000)
    assert eng.stats.parked_statuses == 0
    assert eng.stats.evictions_by_kind["parked_statuses_ttl"] == 2


def test_pending_orders_bounded_by_early_flush() -> None:
    """Past `max_pending_orders` the least recently active order is flushed early, never dropped."""
    eng = engine(max_pending_orders=2)
    out = eng.on_user_fills(ADDR, frame(fill(70, 701, "1"), fill(71, 711, "1"), fill(72, 721, "1")), NOW)
    assert ids(out) == [f"{ADDR}:70:OL"]
    assert eng.stats.evictions_by_kind == {"pending_orders": 1}
    assert eng.stats.pending_orders == 2


def test_flushed_orders_forgotten_by_ttl_and_size() -> None:
    eng = engine(flushed_ttl=60.0, max_flushed_keys=1)
    eng.on_user_fills(ADDR, frame(fill(80, 801, "1"), fill(81, 811, "1")), NOW)
    eng.on_order_updates(ADDR, [update(80, "filled"), update(81, "filled")], NOW)
    assert eng.stats.flushed_orders == 1
    assert eng.stats.evictions_by_kind == {"flushed_orders": 1}
    eng.tick(NOW + 60_000)
    assert eng.stats.flushed_orders == 0
    assert eng.stats.evictions_by_kind["flushed_orders_ttl"] == 1


# ------------------------------------------------------------------------------------------ fills as they happen


def collecting() -> TrackingEngine:
    eng = engine()
    eng.collect_fills = True
    return eng


def totals(records: list[FillRecord]) -> list[tuple[str, Decimal | None, Decimal | None]]:
    return [(r.fill_id, r.order_filled_size, r.order_vwap) for r in records]


def test_each_accepted_fill_is_recorded_once_with_its_orders_running_totals() -> None:
    """A resting order's fills are handed out as they arrive (long before its signal), each with the size and VWAP of
    the order so far; a stream replay, a snapshot after a reconnect and a REST backfill record nothing again."""
    eng = collecting()
    first, second = fill(7, 101, "1", "100", time=T0), fill(7, 102, "3", "104", time=T0 + 1)
    assert eng.on_user_fills(ADDR, frame(first), NOW) == []
    assert totals(eng.take_fills()) == [(f"{ADDR}:fill:BTC:101", D(1), D(100))]
    assert eng.on_user_fills(ADDR, frame(second), NOW + 1) == []
    [record] = eng.take_fills()
    assert (record.order_filled_size, record.order_vwap) == (D(4), D(103))  # (100 + 3 × 104) ÷ 4
    assert (record.oid, record.tid, record.symbol, record.side) == (7, 102, "BTCUSDC", "B")
    assert (record.px, record.sz) == (D(104), D(3))
    assert (record.dir, record.start_position, record.source, record.backfilled, record.label) == (
        "Open Long",
        D(0),
        "user_fills",
        False,
        "whale",
    )
    assert eng.take_fills() == []

    eng.on_user_fills(ADDR, frame(first, second), NOW + 2)
    eng.on_user_fills(ADDR, frame(first, second, snapshot=True), NOW + 3)
    eng.on_backfill(ADDR, [second, first], NOW + 4)
    assert eng.take_fills() == []

    missed = fill(7, 103, "1", "108", time=T0 + 2)  # lost by the stream, found by the gap recovery
    eng.on_backfill(ADDR, [first, missed], NOW + 5)
    [late] = eng.take_fills()
    assert (late.tid, late.backfilled, late.order_filled_size, late.order_vwap) == (103, True, D(5), D("104"))


def test_fills_that_make_no_signal_are_recorded_without_order_totals_and_tid_zero_has_a_stable_id() -> None:
    eng = collecting()
    dust = fill(8, 0, "0.5", "1", dir="Spot Dust Conversion", coin="@1", time=T0 + 5)
    eng.on_user_fills(ADDR, frame(dust), NOW)
    eng.on_user_fills(ADDR, frame(dust), NOW + 1)
    [record] = eng.take_fills()
    assert record.fill_id == f"{ADDR}:fill:@1:o8:t{T0 + 5}"
    assert (record.order_filled_size, record.order_vwap) == (None, None)


def test_first_snapshot_only_seeds_and_collection_off_keeps_nothing() -> None:
    eng = TrackingEngine(AggregationConfig(), SymbolMap.empty(), collect_fills=True)
    eng.add_address(ADDR)
    eng.on_user_fills(ADDR, frame(fill(1, 1, "1"), snapshot=True), NOW)
    assert eng.take_fills() == []  # history before we watched: not "as it happens"
    quiet = engine()
    quiet.on_user_fills(ADDR, frame(fill(1, 1, "1")), NOW)
    assert quiet.take_fills() == []


def test_running_totals_resume_after_a_restart_from_the_stored_records() -> None:
    eng = collecting()
    eng.on_user_fills(ADDR, frame(fill(9, 201, "2", "100")), NOW)
    eng.take_fills()
    restored = msgspec.json.decode(msgspec.json.encode(eng.export_state()), type=EngineState)
    again = TrackingEngine(AggregationConfig(), SymbolMap.empty(), collect_fills=True)
    again.add_address(ADDR, "whale")
    again.import_state(restored)
    again.on_user_fills(ADDR, frame(fill(9, 201, "2", "100"), fill(9, 202, "2", "110", time=T0 + 1)), NOW + 1)
    assert totals(again.take_fills()) == [(f"{ADDR}:fill:BTC:202", D(4), D(105))]
