"""The precise tier end to end against `hl-monitor sim` over real WebSockets and REST, with the real engine.

Every test runs the real chain: address book → PreciseManager → UserStream/Connection → sim, and the
sim's REST `/info` through the real InfoClient and Budgets; signals come out of the real TrackingEngine
and are compared with the sim's ledger (ground truth per order).
"""

from __future__ import annotations

from decimal import Decimal

from hl_monitor.clock import ManualClock
from hl_monitor.domain.address import WatchedAddress
from hl_monitor.feeds.connection import Connection, ConnState
from hl_monitor.sim.server import SimConfig
from tests.support.ledger import expected_orders, observed_orders
from tests.support.metrics import metric_value
from tests.support.precise_harness import GatedBudgets, Harness, harness
from tests.support.waiting import wait_until

W1 = "0x" + "1" * 40
W2 = "0x" + "2" * 40
W3 = "0x" + "3" * 40
W4 = "0x" + "4" * 40


async def test_live_orders_come_out_once_with_exact_size_and_vwap() -> None:
    async with harness(WatchedAddress(address=W1, tier="precise")) as h:
        await h.live(W1)
        whale = h.sim.exchange.whale(W1)
        await whale.market_order("BTC", True, "1.5", "80000", fills=3, px_step="5")
        oid = await whale.limit_order("ETH", False, "4", "2400")
        await whale.fill(oid, "1")
        await whale.fill(oid, "1.5", px="2401")
        await whale.cancel(oid)
        await wait_until(lambda: len(h.signals) == 2)
        assert observed_orders(h.signals) == expected_orders(h.sim, W1)
        assert not any(s.backfilled for s in h.signals)
        assert metric_value(h.metrics, "addresses_by_tier", tier="precise", state="assigned") == 1
        assert metric_value(h.metrics, "connection_state", kind="user", state="live") == 1


async def test_abrupt_close_mid_order_loses_nothing_and_duplicates_nothing() -> None:
    # A 2-fill snapshot cannot cover the gap: the older gap fills must come from userFillsByTime.
    sim_config = SimConfig(clearinghouse_push_interval=0.2, fills_snapshot_size=2)
    async with harness(
        WatchedAddress(address=W1, tier="precise"), sim_config=sim_config, budgets_class=GatedBudgets
    ) as h:
        await h.live(W1)
        whale = h.sim.exchange.whale(W1)
        before = await whale.market_order("ETH", True, "2", "2400", fills=2)
        resting = await whale.limit_order("BTC", True, "1", "80000")
        await whale.fill(resting, "0.3")
        partly = await whale.limit_order("SOL", False, "10", "100")
        await whale.fill(partly, "4")
        await wait_until(lambda: len(h.signals) == 1)  # the first order completed live
        assert h.signals[0].oid == before

        await h.cut(W1)
        assert h.manager.not_live() == [W1]  # readiness sees the gap

        # While disconnected: the resting order fills up, a new order runs start to end, one is cancelled.
        await whale.fill(resting, "0.7", px="80010")
        during = await whale.market_order("ETH", True, "3", "2410", fills=3, px_step="1")
        await whale.cancel(partly)

        h.reconnect()
        await wait_until(lambda: len(h.signals) == 4)
        marker = await h.quiet_point(W1, recoveries=2)  # the first at subscribe, the second after the cut
        assert len(h.signals) == 5, "a gap order came out twice"
        assert h.signals[-1].oid == marker

        assert observed_orders(h.signals) == expected_orders(h.sim, W1)
        by_oid = {s.oid: s for s in h.signals}
        assert by_oid[resting].fill_count == 2
        assert by_oid[during].backfilled
        assert by_oid[partly].status == "canceled"
        assert by_oid[partly].size == Decimal("4")
        assert len({s.signal_id for s in h.signals}) == 5
        assert metric_value(h.metrics, "reconnects_total", kind="user", reason="dropped") == 1
        assert metric_value(h.metrics, "backfilled_fills_total", via="rest") >= 2
        assert metric_value(h.metrics, "gap_recoveries_total", outcome="ok") == 2


async def test_stalled_channels_on_a_live_socket_are_detected_and_recovered() -> None:
    async with harness(WatchedAddress(address=W1, tier="precise"), stale_after=0.6) as h:
        await h.live(W1)
        whale = h.sim.exchange.whale(W1)
        # The user's channels go silent while the socket, pongs and orderUpdates keep flowing.
        h.sim.faults.stall("allDexsClearinghouseState", user=W1)
        h.sim.faults.stall("userFills", user=W1)
        oid = await whale.market_order("BTC", False, "0.25", "80000", fills=2)
        await wait_until(lambda: len(h.signals) == 1)
        stale = metric_value(h.metrics, "reconnects_total", kind="user", reason="stale_canary") + metric_value(
            h.metrics, "reconnects_total", kind="user", reason="stale_connection"
        )
        assert stale == 1
        assert metric_value(h.metrics, "reconnects_total", kind="user", reason="pong_timeout") == 0
        assert observed_orders(h.signals) == expected_orders(h.sim, W1)
        assert h.signals[0].oid == oid
        assert h.signals[0].backfilled
        stream = h.manager.stream(W1)
        assert stream is not None
        await wait_until(lambda: stream.connection.feed_age() < 0.5)  # the canary flows again


async def test_fill_audit_recovers_fills_a_silent_subscription_missed_and_rebuilds_it() -> None:
    """Only userFills goes quiet: the canary, bbo and orderUpdates still flow, so nothing looks stale. The
    periodic REST audit finds the missing fills, emits them once and rebuilds the subscription."""
    async with harness(WatchedAddress(address=W1, tier="precise"), fill_audit_interval=1.0) as h:
        await h.live(W1)
        whale = h.sim.exchange.whale(W1)
        stream = h.manager.stream(W1)
        assert stream is not None
        first = await whale.market_order("ETH", True, "2", "2400", fills=2)
        await wait_until(lambda: len(h.signals) == 1)
        # Healthy: audits covering a traded stretch find nothing and change nothing.
        await wait_until(lambda: metric_value(h.metrics, "fill_audits_total", outcome="ok") >= 2, within=15)
        assert len(h.signals) == 1

        h.sim.faults.stall("userFills", user=W1)
        missed = await whale.market_order("BTC", False, "0.5", "80000", fills=3, px_step="5")
        await wait_until(lambda: len(h.signals) == 2, within=20)  # after the audit lag (5 s) and one interval
        assert h.signals[1].oid == missed
        assert h.signals[1].backfilled
        # The audit counts once the connection's handler has applied its fills: just after the signal went out.
        await wait_until(lambda: stream.fills_missed == 3)
        assert metric_value(h.metrics, "fill_audits_total", outcome="missed") == 1
        assert metric_value(h.metrics, "backfilled_fills_total", via="audit") == 3
        await wait_until(lambda: metric_value(h.metrics, "reconnects_total", kind="user", reason="fills_missed") == 1)
        assert stale_reconnects(h) == 0  # nothing else noticed the fault

        await h.live(W1)
        await wait_until(lambda: stream.recoveries >= 2)
        after = await whale.market_order("SOL", True, "3", "100")  # the resubscribe healed the stall
        await wait_until(lambda: len(h.signals) == 3)
        assert h.signals[2].oid == after
        assert not h.signals[2].backfilled
        assert observed_orders(h.signals) == expected_orders(h.sim, W1)
        assert [s.oid for s in h.signals] == [first, missed, after]


async def test_a_twap_comes_out_when_it_finishes_not_after_the_quiet_timeout() -> None:
    """Slices aggregate by twapId; `userTwapHistory` says `finished`: one signal at once (timeout is 300 s)."""
    async with harness(WatchedAddress(address=W1, tier="precise")) as h:
        await h.live(W1)
        whale = h.sim.exchange.whale(W1)
        twap_id = await whale.twap("SOL", True, "9", slices=3, px="95", px_step="0.1", interval=0.05)
        await wait_until(lambda: len(h.signals) == 1)
        [signal] = h.signals
        assert (signal.twap_id, signal.oid, signal.size, signal.fill_count) == (twap_id, None, Decimal(9), 3)
        assert (signal.trigger, signal.status) == ("status", "finished")
        assert signal.price == Decimal("95.1")  # the VWAP of 95, 95.1, 95.2 in equal slices


async def test_a_twap_that_ends_during_a_gap_comes_out_once_with_every_slice() -> None:
    """The TWAP runs and finishes while the socket is down. On the resubscribe its `finished` state comes at
    once, its slices only with the gap recovery (the 1-fill snapshot holds the last one): the end is held
    until the recovery is in, and the TWAP comes out once, complete."""
    sim_config = SimConfig(clearinghouse_push_interval=0.2, fills_snapshot_size=1)
    async with harness(
        WatchedAddress(address=W1, tier="precise"), sim_config=sim_config, budgets_class=GatedBudgets
    ) as h:
        await h.live(W1)
        whale = h.sim.exchange.whale(W1)
        await whale.market_order("ETH", True, "1", "2400")  # something for the watermark to start from
        await wait_until(lambda: len(h.signals) == 1)
        await h.cut(W1)
        twap_id = await whale.twap("SOL", True, "9", slices=3, px="95")
        h.reconnect()
        await wait_until(lambda: len(h.signals) == 2)
        marker = await h.quiet_point(W1, recoveries=2)  # the first at subscribe, the second after the cut
        assert [s.oid for s in h.signals[2:]] == [marker], "a second (continuation) TWAP signal came out"
        twap = h.signals[1]
        assert (twap.twap_id, twap.size, twap.fill_count, twap.status) == (twap_id, Decimal(9), 3, "finished")
        assert twap.backfilled


def stale_reconnects(h: Harness) -> float:
    return sum(
        metric_value(h.metrics, "reconnects_total", kind="user", reason=reason)
        for reason in ("stale_canary", "stale_connection", "pong_timeout")
    )


async def test_user_cap_refusal_marks_over_budget_and_retries_until_a_slot_frees() -> None:
    sim_config = SimConfig(clearinghouse_push_interval=0.2, max_users=2)
    entries = [
        WatchedAddress(address=W1, tier="precise", priority=3),
        WatchedAddress(address=W2, tier="precise", priority=2),
        WatchedAddress(address=W3, tier="auto", priority=1),
    ]
    async with harness(*entries, sim_config=sim_config) as h:
        await h.live(W1)
        await h.live(W2)
        # The refusal is recorded at once; the slot is given up on the manager's next pass.
        await wait_until(lambda: W3 in h.manager.over_budget() and W3 in h.manager.unassigned())
        assert h.manager.over_budget()[W3].reason == "user_cap"
        assert metric_value(h.metrics, "error_frames_total", kind="user_cap") >= 1
        assert metric_value(h.metrics, "addresses_by_tier", tier="precise", state="over_budget") == 1
        status = h.manager.status()
        assert [o["address"] for o in status["over_budget"]] == [W3]
        assert W3 in h.manager.unassigned()
        await wait_until(
            lambda: h.manager.over_budget().get(W3) is not None and h.manager.over_budget()[W3].refusals >= 2
        )

        h.source.entries = entries[:1] + entries[2:]  # W2 leaves the book: the exchange frees its user
        h.book.refresh_now()
        await h.live(W3)
        assert W3 not in h.manager.over_budget()
        assert set(h.manager.assigned()) == {W1, W3}
        assert frozenset() in h.unassigned  # the wide tier was told nobody is left over


async def test_slots_go_by_priority_and_the_rest_are_reported_unassigned() -> None:
    entries = [
        WatchedAddress(address=W1, priority=1),
        WatchedAddress(address=W2, priority=2),
        WatchedAddress(address=W3, priority=3, tier="wide"),  # never precise
    ]
    async with harness(*entries, user_slots=1) as h:
        await h.live(W2)
        assert h.manager.unassigned() == {W1}
        assert h.unassigned[-1] == {W1}
        assert metric_value(h.metrics, "addresses_by_tier", tier="precise", state="unassigned") == 1

        h.source.entries = [*entries, WatchedAddress(address=W4, priority=9, tier="precise")]
        h.book.refresh_now()
        await h.live(W4)  # the new higher-priority address takes the slot
        await wait_until(lambda: h.manager.unassigned() == {W1, W2})
        assert h.manager.assigned() == {W4: 0}
        await wait_until(lambda: metric_value(h.metrics, "connection_state", kind="user", state="live") == 1)


async def test_removed_address_keeps_its_stream_for_the_grace_then_frees_the_slot() -> None:
    """The grace runs on the book's manual clock: a reload just short of it keeps W1; just past it, W1 goes."""
    clock = ManualClock()
    grace = 30.0
    whales = (WatchedAddress(address=W1), WatchedAddress(address=W2))
    async with harness(*whales, remove_grace=grace, book_clock=clock.now) as h:
        await h.live(W1)
        await h.live(W2)
        h.source.entries = [WatchedAddress(address=W2)]
        h.book.refresh_now()
        await wait_until(lambda: W1 in h.book.removing(), what="W1 in its removal grace")
        version = h.book.version
        clock.advance(grace - 1)
        await reloaded(h)  # quiet point: a whole reload ran with the clock a second short of the grace
        assert W1 in h.book.entries()
        assert h.book.version == version  # no change for the manager to act on
        assert W1 in h.manager.assigned()  # still tracked during the grace
        clock.advance(2)
        await wait_until(lambda: W1 not in h.manager.assigned())
        users = {sub.get("user") for conn in h.sim.connections for sub in conn.subscriptions}
        await wait_until(
            lambda: W1 not in {sub.get("user") for conn in h.sim.connections for sub in conn.subscriptions}
        )
        assert W2 in users
        assert not h.engine.is_watched(W1)
        assert h.manager.assigned() == {W2: 1}


async def reloaded(h: Harness) -> None:
    """Until the address book has finished one more reload of its sources."""
    done = metric_value(h.metrics, "address_reloads_total", outcome="ok")
    h.book.refresh_now()
    await wait_until(lambda: metric_value(h.metrics, "address_reloads_total", outcome="ok") > done, what="a reload")


async def storm(h: Harness, connections: list[Connection]) -> None:
    """Drop every socket, then reach the quiet point: each dropped connection noticed, and every connection is
    live again on a new socket or waits for a new-connection permit (none is dialling)."""
    dropped = {id(c): (c.epoch, c.reconnect_count) for c in connections if c.state is ConnState.LIVE}
    h.sim.faults.abrupt_close_all()

    def settled() -> bool:
        if any(c.reconnect_count == dropped[id(c)][1] for c in connections if id(c) in dropped):
            return False
        live = [c for c in connections if c.state is ConnState.LIVE]
        if any(id(c) in dropped and c.epoch == dropped[id(c)][0] for c in live):
            return False  # still the old socket
        return len(live) + h.budgets.snapshot()["new_connections"]["waiting"] == len(connections)

    await wait_until(settled, what="every dropped connection live again or waiting for a permit")


async def test_reconnect_storm_stays_within_the_new_connection_budget() -> None:
    clock = ManualClock()
    per_minute = 6
    sim_config = SimConfig(clearinghouse_push_interval=0.2, max_new_connections_per_minute=per_minute)
    whales = [WatchedAddress(address=a) for a in (W1, W2, W3, W4)]
    async with harness(
        *whales, sim_config=sim_config, manual_clock=clock, max_new_connections_per_minute=per_minute
    ) as h:
        for whale in whales:
            await h.live(whale.address)
        streams = [h.manager.stream(w.address) for w in whales]
        connections = list({id(s.connection): s.connection for s in streams if s is not None}.values())
        for _ in range(3):  # three storms in the same minute
            await storm(h, connections)
        assert h.sim.stats.connections_opened == per_minute
        assert h.sim.stats.connections_refused == 0  # we never even asked the server for a 7th
        assert metric_value(h.metrics, "budget_refusals_total", budget="new_connections") >= 1
        streams = [h.manager.stream(w.address) for w in whales]
        waiting = [s for s in streams if s is not None and s.connection.state is not ConnState.LIVE]
        assert waiting  # held back by the budget, not by the server

        clock.advance(61.0)  # the next minute: the waiting connections get their permits
        for whale in whales:
            await h.live(whale.address)
        assert h.sim.stats.connections_opened <= 2 * per_minute
        assert h.sim.stats.connections_refused == 0
