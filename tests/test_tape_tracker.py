"""The wide tier's pure parts: tape blocks → signals, positions, reconcile drift, ownership, dedup, coverage."""

from __future__ import annotations

from decimal import Decimal

import msgspec

from hl_monitor.domain.signal import LiquidationInfo
from hl_monitor.feeds.market_tape import MemorySampler, TapeCoin, TradeDedup, plan_coverage, shard, split_budget
from hl_monitor.hyperliquid.protocol import WsTrade
from hl_monitor.tracking.tape import MAX_BUFFERED, MAX_HISTORY, TapeTracker, is_engine_trade
from tests.support.factories import fill
from tests.support.tape import NOW, OTHER, T0, WHALE, rest, symbols, trade

D = Decimal


# How long a block with an engine trade waits for its label in these tests (the default `wide.engine_label_wait`).
LABEL_WAIT_MS = 2000
ENGINE_HASH = "0x" + "0" * 64


def engine(t: WsTrade) -> WsTrade:
    """The same trade as the engine executes it: all-zero hash."""
    return msgspec.structs.replace(t, hash=ENGINE_HASH)


def tracker(label_wait_ms: int = 0, **positions: str) -> TapeTracker:
    """A tracker watching WHALE, bootstrapped with the given perp positions (coin=szi)."""
    tr = TapeTracker(symbols(), block_settle_ms=500, hold_ms=60_000, instance_id="t", label_wait_ms=label_wait_ms)
    tr.add_address(WHALE, "whale")
    tr.apply_rest(WHALE, rest(dict(positions.items())), NOW)
    return tr


def test_a_flip_in_one_block_is_a_close_and_an_open_with_exact_vwap_and_ratios() -> None:
    tr = tracker(BTC="-1")
    out = tr.on_trades("BTC", [trade(1, "1", "100"), trade(2, "2", "103")], NOW)
    assert out == []  # the block may go on
    out = tr.on_trades("BTC", [trade(3, "0.1", buyer=OTHER, seller="0x" + "ef" * 20, t=T0 + 1)], NOW)
    assert [(s.direction, s.side, s.dir) for s in out] == [
        ("close", "SHORT", "Close Short"),
        ("open", "LONG", "Open Long"),
    ]
    close, open_ = out
    assert close.signal_id == f"{WHALE}:tape:BTC:CS:{T0}"
    assert open_.signal_id == f"{WHALE}:tape:BTC:OL:{T0}"
    assert close.size == Decimal(1)
    assert close.price == Decimal(100)
    assert close.close_rate == 1
    assert close.full_close
    assert close.position_before == -1
    assert close.position_after == 0
    assert open_.size == Decimal(2)
    assert open_.price == Decimal(103)
    assert open_.position_before == 0
    assert open_.position_after == 2
    assert all(s.source == "market_tape" and s.trigger == "tape_block" for s in out)
    assert all(s.oid is None and s.status is None and s.liquidation is None and s.twap_id is None for s in out)
    assert close.symbol == "BTCUSDC"
    assert close.label == "whale"
    assert tr.position(WHALE, "BTC") == 2


def test_a_quiet_block_flushes_after_the_settle_time_and_sells_match_the_seller() -> None:
    tr = tracker(ETH="3")
    trades = [trade(5, "1", "2000", buyer=OTHER, seller=WHALE, coin="ETH", side="A"),
              trade(6, "0.5", "1990", buyer=OTHER, seller=WHALE, coin="ETH", side="A")]  # fmt: skip
    assert tr.on_trades("ETH", trades, NOW) == []
    assert tr.tick(NOW + 499) == []
    [signal] = tr.tick(NOW + 500)
    assert (signal.direction, signal.side, signal.size) == ("close", "LONG", Decimal("1.5"))
    assert signal.price == (Decimal(2000) + Decimal("0.5") * 1990) / Decimal("1.5")
    assert signal.close_rate == Decimal("0.5")
    assert not signal.full_close
    assert signal.fill_count == 2


def test_spot_buys_and_sells_follow_the_token_balance() -> None:
    tr = TapeTracker(symbols(), block_settle_ms=500, hold_ms=60_000)
    tr.add_address(WHALE)
    tr.apply_rest(WHALE, rest({}, {"HYPE": "10", "USDC": "1000"}), NOW)
    tr.on_trades("@107", [trade(1, "4", "40", coin="@107")], NOW)
    [buy] = tr.tick(NOW + 1000)
    assert (buy.asset_type, buy.direction, buy.side, buy.dir, buy.symbol) == ("spot", "open", "LONG", "Buy", "HYPEUSDC")
    tr.on_trades("@107", [trade(2, "7", "41", buyer=OTHER, seller=WHALE, coin="@107", t=T0 + 5)], NOW)
    [sell] = tr.tick(NOW + 2000)
    assert (sell.direction, sell.dir, sell.position_before, sell.position_after) == ("close", "Sell", D(14), D(7))
    assert sell.close_rate == Decimal(7) / 14
    assert tr.position(WHALE, "HYPE") == 7


def test_trades_before_the_bootstrap_are_replayed_from_the_rest_answer() -> None:
    tr = TapeTracker(symbols(), block_settle_ms=500, hold_ms=60_000)
    tr.add_address(WHALE)
    early = trade(1, "2", "100", t=T0 - 9000)  # before the REST request: already in the answer
    late = trade(2, "1", "100", buyer=OTHER, seller=WHALE, t=T0 - 1000)  # after the answer
    assert tr.on_trades("BTC", [early], NOW) == []
    assert tr.on_trades("BTC", [late], NOW) == []
    out = tr.apply_rest(WHALE, rest({"BTC": "5"}), NOW)  # 5 = 3 before the first trade + 2 bought
    out += tr.tick(NOW + 1000)
    assert [(s.direction, s.side, s.position_before, s.position_after) for s in out] == [
        ("open", "LONG", D(3), D(5)),
        ("close", "LONG", D(5), D(4)),
    ]
    assert tr.position(WHALE, "BTC") == 4


def test_a_trade_inside_the_rest_window_postpones_the_bootstrap() -> None:
    tr = TapeTracker(symbols(), block_settle_ms=500, hold_ms=60_000)
    tr.add_address(WHALE)
    tr.on_trades("BTC", [trade(1, "2", t=T0 - 4500)], NOW)
    assert tr.apply_rest(WHALE, rest({"BTC": "2"}), NOW) == []
    assert not tr.is_bootstrapped(WHALE)
    assert tr.stats.reconcile_skipped == 1


def test_reconcile_reports_a_change_the_tape_never_saw_and_corrects_the_position() -> None:
    tr = tracker(BTC="1")
    # xyz:XYZ100 is not covered by the tape: it appears only in the REST answer.
    out = tr.apply_rest(WHALE, rest({"BTC": "1", "xyz:XYZ100": "-2"}, marks={"xyz:XYZ100": "25000"}, time=T0), NOW)
    [signal] = out
    assert signal.signal_id == f"{WHALE}:recon:xyz:XYZ100:{T0}"
    assert (signal.source, signal.trigger, signal.direction, signal.side) == ("reconcile", "reconcile", "open", "SHORT")
    assert signal.size == 2
    assert signal.price == 25000
    assert signal.fill_count == 0
    assert signal.oid is None
    assert tr.position(WHALE, "xyz:XYZ100") == -2
    assert tr.stats.drifts_perp == 1
    # A flip found on reconcile: close the short, open the long (second half has its own id).
    flip = tr.apply_rest(WHALE, rest({"BTC": "1", "xyz:XYZ100": "3"}, time=T0 + 10), NOW)
    assert [(s.direction, s.side, s.size) for s in flip] == [("close", "SHORT", D(2)), ("open", "LONG", D(3))]
    assert flip[1].signal_id == f"{WHALE}:recon:xyz:XYZ100:{T0 + 10}:open"


def test_reconcile_accounts_for_trades_after_the_answer_and_skips_ambiguous_ones() -> None:
    tr = tracker(BTC="1")
    tr.on_trades("BTC", [trade(1, "2", t=T0)], NOW)  # after the answer's window
    assert tr.apply_rest(WHALE, rest({"BTC": "1"}, window=(T0 - 3000, T0 - 2000)), NOW) == []
    assert tr.position(WHALE, "BTC") == 3
    # Now an answer whose window contains that trade: BTC is not compared (it could go either way).
    assert tr.apply_rest(WHALE, rest({"BTC": "7"}, window=(T0 - 100, T0 + 100)), NOW) == []
    assert tr.stats.reconcile_skipped == 1
    assert tr.position(WHALE, "BTC") == 3


def test_precise_owned_blocks_are_held_and_released_by_the_handover_boundary() -> None:
    tr = tracker()
    tr.set_owner(WHALE, "precise", NOW)
    tr.on_trades("BTC", [trade(1, "1", t=T0)], NOW)
    tr.on_trades("BTC", [trade(2, "1", t=T0 + 10)], NOW)
    assert tr.tick(NOW + 1000) == []  # held, not emitted
    released = tr.release_held(WHALE, T0)  # the precise tier's floor: it covers what came later
    assert [s.timestamp for s in released] == [T0]
    tr.on_trades("BTC", [trade(3, "1", t=T0 + 20)], NOW)
    tr.tick(NOW + 2000)
    # Back to wide: the precise tier processed fills up to T0 + 10; only the newer held block comes out.
    back = tr.set_owner(WHALE, "wide", NOW, cut=T0 + 10)
    assert [s.timestamp for s in back] == [T0 + 20]
    tr.on_trades("BTC", [trade(4, "1", t=T0 + 30)], NOW)
    assert [s.timestamp for s in tr.tick(NOW + 3000)] == [T0 + 30]


def test_held_blocks_older_than_the_hold_are_dropped_each_time_an_address_holds_again() -> None:
    tr = tracker()
    tr.set_owner(WHALE, "precise", NOW)
    tr.on_trades("BTC", [trade(1, "1", t=T0)], NOW)
    assert tr.tick(NOW + 1000) == []  # held
    tr.tick(NOW + 1000 + 60_001)  # older than hold_ms (60 s): dropped
    assert tr.stats.held_dropped == 1
    assert tr.release_held(WHALE, T0 + 1) == []
    tr.on_trades("BTC", [trade(2, "1", t=T0 + 5)], NOW + 70_000)  # holds again after it was emptied
    tr.tick(NOW + 71_000)
    tr.tick(NOW + 71_000 + 60_001)
    assert tr.stats.held_dropped == 2
    assert tr.release_held(WHALE, T0 + 10) == []


def test_two_trackers_on_the_same_tape_build_the_same_ids() -> None:
    tape = [
        trade(i, "1", str(100 + i), t=T0 + i // 2, buyer=WHALE if i % 3 else OTHER, seller=OTHER if i % 3 else WHALE)
        for i in range(1, 12)
    ]
    ids = []
    for _ in range(2):
        tr = tracker(BTC="2")
        out = [s for t in tape for s in tr.on_trades("BTC", [t], NOW)] + tr.tick(NOW + 10_000)
        ids.append([s.signal_id for s in out])
    assert ids[0] == ids[1]
    assert len(set(ids[0])) == len(ids[0]) > 3


def test_memory_sampler_measures_over_several_small_steps_what_one_full_walk_measures() -> None:
    tr = tracker()
    for i in range(300):
        tr.on_trades("BTC", [trade(i + 1, "1", t=T0 + i)], NOW + i)
    [full] = tr.memory_bytes()
    sampler = MemorySampler(tr, sample=10)
    steps = 0
    while WHALE not in sampler.sizes:
        sampler.step(50)
        steps += 1
    assert steps > 1  # the walk was spread over several calls
    assert sampler.sizes == {WHALE: full}
    tr.remove_address(WHALE, NOW + 400)
    sampler.step(50)
    assert sampler.sizes == {}  # an address no longer watched leaves the sample


def test_memory_per_address_is_bounded() -> None:
    tr = tracker()
    for i in range(2000):
        tr.on_trades("BTC", [trade(i + 1, "1", t=T0 + i)], NOW + i)
    tr.tick(NOW + 10_000)
    [small] = tr.memory_bytes()
    for i in range(2000, 6000):
        tr.on_trades("BTC", [trade(i + 1, "1", t=T0 + i)], NOW + i)
    tr.tick(NOW + 20_000)
    [after] = tr.memory_bytes()
    assert after <= small * 1.2  # history, flushed keys and buffers are capped
    unbooted = TapeTracker(symbols(), block_settle_ms=500, hold_ms=60_000)
    unbooted.add_address(WHALE)
    for i in range(MAX_BUFFERED * 3):
        unbooted.on_trades("BTC", [trade(i + 1, "1", t=T0 + i)], NOW)
    assert unbooted.stats.buffer_dropped == MAX_BUFFERED * 2
    assert MAX_HISTORY < 2000


def test_dedup_drops_replays_and_history_and_stays_bounded() -> None:
    dedup = TradeDedup(window_ms=1000, start_ms=T0, max_per_coin=100)
    assert dedup.fresh("BTC", [trade(1, "1", t=T0 - 5)]) == []  # before the tape started
    first = [trade(i, "1", t=T0 + i) for i in range(1, 31)]
    assert dedup.fresh("BTC", first) == first
    replay = [*first[-10:], trade(99, "1", t=T0 + 40)]  # a resubscribe replays the last trades plus one new
    assert [t.tid for t in dedup.fresh("BTC", replay)] == [99]
    assert dedup.fresh("ETH", [trade(5, "1", t=T0 + 5, coin="ETH")])  # coins are independent
    assert dedup.fresh("BTC", [trade(7, "1", t=T0 + 7)]) == []
    many = [trade(1000 + i, "1", t=T0 + 100 + i) for i in range(500)]
    assert len(dedup.fresh("BTC", many)) == 500
    assert dedup.keys() <= 100 + 1
    assert dedup.fresh("BTC", many[:50]) == []  # evicted keys still count as seen


def test_coverage_takes_the_busiest_coins_and_shards_spread_them() -> None:
    coins = [TapeCoin(f"C{i}", Decimal(i), spot=False) for i in range(10)] + [TapeCoin("@1", Decimal(0), spot=True)]
    plan = plan_coverage(coins, 4)
    assert [c.coin for c in plan.covered] == ["C9", "C8", "C7", "C6"]
    assert len(plan.uncovered) == 7
    assert plan.uncovered[-1].coin == "@1"
    assert shard(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert shard(["a"], 3) == [["a"]]
    assert shard(["a"], 0) == []


def test_split_budget_gives_every_connection_a_canary_and_a_coin() -> None:
    assert split_budget(900, 2, 1000) == (2, 898)
    assert split_budget(900, 2, 10) == (2, 10)
    assert split_budget(4, 1, 9) == (1, 3)
    assert split_budget(3, 2, 9) == (1, 2)  # two connections would leave one of them without a coin
    assert split_budget(1, 2, 9) == (0, 0)
    assert split_budget(10, 5, 1) == (1, 1)


def test_an_engine_block_waits_for_its_label_and_keeps_its_id() -> None:
    """A liquidation's tape block is held until the whale's fills say what it was; the signal then carries the
    liquidation block, and its id is the one it would have had unlabelled. A later block of the same whale
    queues behind it, so the whale's signals keep their order."""
    liquidated = engine(trade(7, "2", "99", buyer=OTHER, seller=WHALE, side="A"))
    assert is_engine_trade(liquidated)
    assert not is_engine_trade(trade(8, "1"))
    plain = tracker(BTC="2")
    [expected] = plain.on_trades("BTC", [liquidated], NOW) + plain.tick(NOW + 500)
    tr = tracker(LABEL_WAIT_MS, BTC="2")
    assert tr.on_trades("BTC", [liquidated], NOW) == []
    assert tr.tick(NOW + 500) == []  # complete, but parked
    [request] = tr.take_label_requests()
    assert (request.address, request.start_ms, request.deadline_ms) == (WHALE, T0, NOW + 500 + LABEL_WAIT_MS)
    assert tr.on_trades("BTC", [trade(8, "1", "98", t=T0 + 1000)], NOW + 600) == []
    assert tr.tick(NOW + 1100) == []  # the reopen is complete too, and waits behind the liquidation
    assert tr.waiting_labels() == 2
    block = {"markPx": "98.5", "method": "market", "liquidatedUser": WHALE}
    fills = [fill(50, 7, "2", "99", dir="Liquidated Cross Long", start="2", side="A", liquidation=block)]
    closed, reopened = tr.apply_labels(WHALE, fills, NOW + 1200)
    assert closed == msgspec.structs.replace(
        expected, liquidation=LiquidationInfo(mark_px=Decimal("98.5"), method="market", liquidated_user=WHALE)
    )
    assert (reopened.direction, reopened.timestamp, reopened.liquidation) == ("open", T0 + 1000, None)
    assert tr.take_label_requests() == []  # an ordinary block needs no read
    assert (tr.stats.label_waits, tr.stats.labelled_liquidation, tr.stats.label_timeouts) == (1, 1, 0)


def test_an_unanswered_label_lets_the_signal_go_unlabelled_at_the_deadline() -> None:
    tr = tracker(LABEL_WAIT_MS, BTC="2")
    tr.on_trades("BTC", [engine(trade(7, "2", "99", buyer=OTHER, seller=WHALE, side="A"))], NOW)
    assert tr.tick(NOW + 500) == []
    assert tr.tick(NOW + 500 + LABEL_WAIT_MS - 1) == []
    [signal] = tr.tick(NOW + 500 + LABEL_WAIT_MS)
    assert (signal.signal_id, signal.liquidation, signal.twap_id) == (f"{WHALE}:tape:BTC:CL:{T0}", None, None)
    assert tr.stats.label_timeouts == 1
    late = [fill(50, 7, "2", "99", dir="Liquidated Cross Long", start="2", side="A")]
    assert tr.apply_labels(WHALE, late, NOW + 5000) == []  # a late answer sends nothing again


def test_one_answer_labels_the_later_slices_of_a_twap_without_another_read() -> None:
    tr = tracker(LABEL_WAIT_MS)
    slices = [engine(trade(tid, "1", "100", t=T0 + 1000 * i)) for i, tid in enumerate((11, 12, 13))]
    answer = [fill(60 + i, tid, "1", time=T0 + 1000 * i, twap_id=42) for i, tid in enumerate((11, 12, 13))]
    assert tr.on_trades("BTC", slices[:1], NOW) == []
    assert tr.tick(NOW + 500) == []
    assert len(tr.take_label_requests()) == 1
    [first] = tr.apply_labels(WHALE, answer, NOW + 600)  # the read was sent after every slice had happened
    assert tr.on_trades("BTC", slices[1:2], NOW + 1000) == []
    [second] = tr.on_trades("BTC", slices[2:], NOW + 2000)  # the coin moved on: the second slice's block is done
    assert [s.twap_id for s in (first, second)] == [42, 42]
    assert tr.take_label_requests() == []
    [third] = tr.tick(NOW + 2500)
    assert (third.twap_id, third.size, third.signal_id) == (42, Decimal(1), f"{WHALE}:tape:BTC:OL:{T0 + 2000}")
    assert (tr.stats.label_waits, tr.stats.labelled_twap) == (3, 3)


def test_an_engine_trade_against_an_ordinary_fill_is_released_as_it_is() -> None:
    """The whale's resting order took the other side of a liquidation: its fill has no label, nothing is added."""
    tr = tracker(LABEL_WAIT_MS)
    tr.on_trades("BTC", [engine(trade(9, "1", "100"))], NOW)
    assert tr.tick(NOW + 500) == []
    [signal] = tr.apply_labels(WHALE, [fill(70, 9, "1")], NOW + 700)
    assert (signal.liquidation, signal.twap_id) == (None, None)
    assert (tr.stats.label_none, tr.stats.label_timeouts) == (1, 0)


def test_labels_are_off_with_a_zero_wait_and_a_removed_address_lets_its_signals_go() -> None:
    off = tracker()
    off.on_trades("BTC", [engine(trade(9, "1", "100"))], NOW)
    assert len(off.tick(NOW + 500)) == 1
    assert off.take_label_requests() == []
    tr = tracker(LABEL_WAIT_MS)
    tr.on_trades("BTC", [engine(trade(9, "1", "100"))], NOW)
    assert tr.tick(NOW + 500) == []
    [signal] = tr.remove_address(WHALE, NOW + 600)
    assert signal.liquidation is None
    assert tr.release_waiting() == []
