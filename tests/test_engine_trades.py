"""Engine-executed trades on the wide tier: a liquidation or a TWAP slice reaches the tape with an all-zero hash and
nothing else; the wide tier reads the whale's own fills over REST and labels the tape signal as the precise tier
would, within `wide.engine_label_wait`, or lets it go unlabelled.

The real chain against `hl-monitor sim` (the `stack` of `tests/support/wide_stack.py`): tape sockets, tracker, the wide
manager's paced REST reads, the service's sink.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

from hl_monitor.domain.signal import LiquidationInfo, Signal
from hl_monitor.sim.exchange import ZERO_HASH
from hl_monitor.tracking.tape import tape_signal_id
from tests.support.metrics import metric_value
from tests.support.waiting import wait_until
from tests.support.wide_stack import W1, Stack, stack, watched


def tape_signals(s: Stack) -> list[Signal]:
    return s.of(W1, "market_tape")


async def long_btc(s: Stack, sz: str = "2") -> None:
    """W1 opens a BTC long and the tape has reported it (an ordinary trade: no label, no wait)."""
    await s.sim.exchange.whale(W1).market_order("BTC", True, sz, "80000")
    await wait_until(lambda: len(tape_signals(s)) == 1)
    [opened] = tape_signals(s)
    assert (opened.direction, opened.liquidation, opened.twap_id) == ("open", None, None)


async def test_a_liquidated_wide_whale_gets_a_tape_signal_with_the_liquidation() -> None:
    async with stack(planner=False, precise=False, user_slots=9) as s:
        await watched(s, W1)
        await long_btc(s)
        await s.sim.exchange.whale(W1).liquidate("BTC", mark_px="70000", px="69900")
        fill = s.sim.exchange.accounts[W1].fills[-1]
        assert fill.hash == ZERO_HASH  # all the tape shows of an engine trade
        await wait_until(lambda: len(tape_signals(s)) == 2)
        closed = tape_signals(s)[1]
        assert (closed.direction, closed.side, closed.size, closed.full_close) == ("close", "LONG", Decimal(2), True)
        assert closed.liquidation == LiquidationInfo(mark_px=Decimal(70000), method="market", liquidated_user=W1)
        assert closed.twap_id is None
        assert closed.signal_id == tape_signal_id(W1, "BTC", "CL", fill.time)  # the label leaves the id alone
        assert s.tracker.stats.labelled_liquidation == 1
        assert s.wide.status()["label_reads"] == 1
        assert metric_value(s.metrics, "rest_requests_total", request="userFillsByTime", outcome="ok") == 1


async def test_twap_slices_on_the_tape_carry_their_twap_id() -> None:
    """Three slices 0.3 s apart, each its own tape block: the first block's read covers what happened before it was
    sent, the next read (paced: a full share makes it one a second) covers the rest."""
    async with stack(planner=False, precise=False, user_slots=9, wide={"rest_share": 1.0}) as s:
        await watched(s, W1)
        twap_id = await s.sim.exchange.whale(W1).twap("ETH", True, "3", slices=3, px="2300", interval=0.3)
        await wait_until(lambda: len(tape_signals(s)) == 3)
        slices = [f for f in s.sim.exchange.accounts[W1].fills if f.twap_id == twap_id]
        assert len(slices) == 3
        assert [(x.twap_id, x.size, x.liquidation) for x in tape_signals(s)] == [(twap_id, Decimal(1), None)] * 3
        codes = ["OL", "OL", "OL"]
        assert [x.signal_id for x in tape_signals(s)] == [
            tape_signal_id(W1, "ETH", code, f.time) for code, f in zip(codes, slices, strict=True)
        ]
        assert s.tracker.stats.labelled_twap == 3


async def test_a_label_read_that_never_answers_releases_the_signal_unlabelled_after_the_wait() -> None:
    wait = 0.5
    async with stack(planner=False, precise=False, user_slots=9, wide={"engine_label_wait": wait}) as s:
        await watched(s, W1)
        await long_btc(s)
        s.sim.faults.hold_rest("userFillsByTime")
        loop = asyncio.get_running_loop()
        liquidated_at = loop.time()
        await s.sim.exchange.whale(W1).liquidate("BTC", mark_px="70000")
        took = await wait_until(lambda: len(tape_signals(s)) == 2)
        assert loop.time() - liquidated_at >= wait  # it did wait for the label
        assert took < wait + 2.0  # and no longer than the wait (plus the block's settle and scheduling)
        closed = tape_signals(s)[1]
        fill = s.sim.exchange.accounts[W1].fills[-1]
        assert (closed.direction, closed.liquidation, closed.twap_id) == ("close", None, None)
        assert closed.signal_id == tape_signal_id(W1, "BTC", "CL", fill.time)
        assert s.tracker.stats.label_timeouts == 1
        await wait_until(lambda: metric_value(s.metrics, "tape_events_total", kind="label_read_late") == 1)
        # The exchange answers again: the abandoned read changes nothing. A later trade's signal is the quiet point.
        s.sim.faults.release_rest()
        await s.sim.exchange.whale(W1).market_order("BTC", False, "1", "70000")
        await wait_until(lambda: len(tape_signals(s)) == 3)
        assert [x.signal_id for x in tape_signals(s)].count(closed.signal_id) == 1
        assert s.tracker.stats.labelled_liquidation == 0
