"""Per-IP budgets: limits hold under many concurrent callers, windows slide, priorities leave headroom.

All timing runs on a `ManualClock`: nothing sleeps, time moves only when a test advances it.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from hl_monitor.clock import ManualClock
from hl_monitor.config import HyperliquidConfig
from hl_monitor.domain.address import Priority
from hl_monitor.errors import BudgetExceededError, ConfigError
from hl_monitor.feeds.budget import LIMIT_WINDOW_S, RELEASE_AFTER_CLOSE_S, Budgets
from hl_monitor.metrics import Metrics
from tests.support.budget import max_in_any_window

WHALE_A = "0xAbC0000000000000000000000000000000000001"
WHALE_B = "0x0000000000000000000000000000000000000002"
WHALE_C = "0x0000000000000000000000000000000000000003"


async def spin(rounds: int = 30) -> None:
    """Let every runnable task run (no real time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def make(clock: ManualClock | None = None, **limits: int | float) -> tuple[Budgets, ManualClock, Metrics]:
    clock = clock or ManualClock()
    metrics = Metrics()
    return Budgets(HyperliquidConfig(**limits), metrics, clock=clock), clock, metrics  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_rest_weight_never_exceeds_capacity_with_many_concurrent_callers(seed: int) -> None:
    budgets, clock, _ = make(rest_weight_per_minute=100)
    rng = random.Random(seed)
    admitted: list[tuple[float, int, Priority]] = []
    in_window_at_low_admission: list[int] = []

    async def caller(weight: int, priority: Priority) -> None:
        await budgets.rest_weight(weight, priority)
        admitted.append((clock.now(), weight, priority))
        if priority == "low":
            in_window_at_low_admission.append(budgets.snapshot()["rest_weight"]["used"])

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(caller(rng.randint(1, 20), rng.choice(["high", "low"]))) for _ in range(300)]
        while not all(t.done() for t in tasks):
            await spin()
            clock.advance(rng.uniform(0.5, 5.0))

    assert len(admitted) == 300, "every caller is eventually served"
    events = sorted((t, w) for t, w, _ in admitted)
    assert max_in_any_window(events, LIMIT_WINDOW_S) <= 100
    # Low priority never takes the reserved quarter: gap recovery always finds room.
    assert max(in_window_at_low_admission) <= 75


async def test_low_priority_leaves_headroom_for_high() -> None:
    budgets, _clock, metrics = make(rest_weight_per_minute=100)
    for _ in range(3):
        await budgets.rest_weight(25, "low")
    low = asyncio.create_task(budgets.rest_weight(1, "low"))
    await spin()
    assert not low.done(), "low priority stops at 75 of 100"
    grant = await budgets.rest_weight(25, "high")  # reconciliation gets in at once
    assert grant.weight == 25
    assert budgets.snapshot()["rest_weight"] == {"used": 100, "capacity": 100, "waiting": 1}
    assert metrics.registry.get_sample_value("hl_monitor_budget_refusals_total", {"budget": "rest_weight"}) == 1
    low.cancel()
    await spin()


async def test_waiting_high_is_served_before_waiting_low() -> None:
    budgets, clock, _ = make(rest_weight_per_minute=100)
    await budgets.rest_weight(100, "high")
    order: list[str] = []

    async def call(name: str, priority: Priority) -> None:
        await budgets.rest_weight(60, priority)
        order.append(name)

    low = asyncio.create_task(call("low", "low"))
    await spin()
    high = asyncio.create_task(call("high", "high"))
    await spin()
    clock.advance(LIMIT_WINDOW_S + 1.0)
    await spin()
    assert order == ["high"], "the high waiter is served first and the low one still does not fit"
    clock.advance(LIMIT_WINDOW_S + 1.0)
    await spin()
    assert order == ["high", "low"]
    await asyncio.gather(low, high)


async def test_large_request_is_not_starved_by_small_ones() -> None:
    budgets, clock, _ = make(rest_weight_per_minute=100)
    await budgets.rest_weight(90, "high")
    order: list[int] = []

    async def call(weight: int) -> None:
        await budgets.rest_weight(weight, "high")
        order.append(weight)

    big = asyncio.create_task(call(100))
    await spin()
    small = asyncio.create_task(call(1))
    await spin()
    clock.advance(LIMIT_WINDOW_S + 1.0)
    await spin()
    assert order == [100], "FIFO: the small request fitted at once but may not jump ahead of the big one"
    clock.advance(LIMIT_WINDOW_S + 1.0)
    await spin()
    assert order == [100, 1]
    await asyncio.gather(big, small)


async def test_window_slides_entry_by_entry() -> None:
    budgets, clock, _ = make(rest_weight_per_minute=100)
    await budgets.rest_weight(60, "high")
    clock.advance(30.0)
    await budgets.rest_weight(40, "high")
    waiter = asyncio.create_task(budgets.rest_weight(50, "high"))
    await spin()
    clock.advance(30.5)  # t = 60.5: the exchange's 60 s window has passed, our slack has not
    await spin()
    assert not waiter.done()
    clock.advance(0.5)  # t = 61.0: the first 60 leaves the window, 40 + 50 fit
    await spin()
    assert waiter.done()
    assert budgets.snapshot()["rest_weight"]["used"] == 90


async def test_settle_refunds_a_pessimistic_reservation_and_wakes_waiters() -> None:
    budgets, _clock, _ = make(rest_weight_per_minute=200)
    grant = await budgets.rest_weight(120, "high")  # userFillsByTime reserved for a full 2000-fill page
    waiter = asyncio.create_task(budgets.rest_weight(150, "high"))
    await spin()
    assert not waiter.done()
    grant.settle(21)  # the page held 20 fills: 20 + 1
    await spin()
    assert waiter.done(), "the refund is usable at once, no clock tick needed"
    assert budgets.snapshot()["rest_weight"]["used"] == 171
    grant.settle(30)  # a surcharge after the fact is still accounted
    assert budgets.snapshot()["rest_weight"]["used"] == 180


async def test_block_rest_holds_every_request_until_the_pause_ends() -> None:
    budgets, clock, _ = make()
    budgets.block_rest(5.0)
    waiter = asyncio.create_task(budgets.rest_weight(2, "high"))
    await spin()
    clock.advance(4.9)
    await spin()
    assert not waiter.done()
    clock.advance(0.1)
    await spin()
    assert waiter.done()


async def test_request_larger_than_its_limit_is_refused_at_once() -> None:
    budgets, _clock, _ = make(rest_weight_per_minute=100)
    with pytest.raises(BudgetExceededError) as info:
        await budgets.rest_weight(101, "high")
    assert (info.value.budget, info.value.used, info.value.capacity) == ("rest_weight", 101, 100)
    with pytest.raises(BudgetExceededError):
        await budgets.rest_weight(76, "low")
    assert budgets.rest_limit("low") == 75


async def test_cancelled_head_waiter_lets_the_next_one_in() -> None:
    budgets, _clock, _ = make(rest_weight_per_minute=100)
    grant = await budgets.rest_weight(90, "high")
    big = asyncio.create_task(budgets.rest_weight(100, "high"))
    await spin()
    small = asyncio.create_task(budgets.rest_weight(5, "high"))
    await spin()
    assert not small.done(), "queued behind the big one"
    big.cancel()
    await spin()
    assert small.done()
    assert budgets.snapshot()["rest_weight"]["waiting"] == 0
    grant.settle(90)


async def test_connection_slots_hold_under_concurrency() -> None:
    budgets, clock, metrics = make(max_connections=10)
    held = 0
    peak = 0
    rng = random.Random(7)

    async def connection() -> None:
        nonlocal held, peak
        async with await budgets.acquire_connection():
            held += 1
            peak = max(peak, held)
            await spin(rng.randint(1, 10))
            held -= 1

    async with asyncio.TaskGroup() as tg:
        for _ in range(50):
            tg.create_task(connection())
    assert peak == 10
    assert budgets.snapshot()["connections"]["used"] == 0
    assert metrics.registry.get_sample_value("hl_monitor_budget_capacity", {"budget": "connections"}) == 10
    del clock


async def test_try_acquire_connection_refuses_the_eleventh() -> None:
    budgets, _clock, metrics = make()
    slots = [budgets.try_acquire_connection() for _ in range(10)]
    assert all(slot is not None for slot in slots)
    assert budgets.try_acquire_connection() is None
    assert metrics.registry.get_sample_value("hl_monitor_budget_used", {"budget": "connections"}) == 10
    first = slots[0]
    assert first is not None
    first.release()
    first.release()  # idempotent: a double release must not free a second slot
    assert budgets.snapshot()["connections"]["used"] == 9
    assert budgets.try_acquire_connection() is not None
    assert budgets.try_acquire_connection() is None


async def test_new_connections_per_minute() -> None:
    budgets, clock, _ = make()
    for _ in range(30):
        await budgets.new_connection_permit()
    dial = asyncio.create_task(budgets.new_connection_permit())
    await spin()
    clock.advance(LIMIT_WINDOW_S)
    await spin()
    assert not dial.done(), "the 31st dial waits out the whole window (plus slack)"
    clock.advance(1.0)
    await spin()
    assert dial.done()


async def test_user_counts_once_across_subscriptions_and_frees_with_the_last() -> None:
    budgets, _clock, metrics = make(max_users=2)
    assert budgets.try_add_user(WHALE_A)
    assert budgets.try_add_user(WHALE_A.lower())  # second subscription of the same address: free
    assert budgets.try_add_user(WHALE_B)
    assert not budgets.try_add_user(WHALE_C)
    assert metrics.registry.get_sample_value("hl_monitor_budget_used", {"budget": "users"}) == 2
    budgets.release_user(WHALE_A)
    assert not budgets.try_add_user(WHALE_C), "WHALE_A still has one subscription"
    budgets.release_user(WHALE_A)
    assert not budgets.tracks_user(WHALE_A)
    assert budgets.try_add_user(WHALE_C)
    assert metrics.registry.get_sample_value("hl_monitor_budget_refusals_total", {"budget": "users"}) == 2
    with pytest.raises(ValueError, match="holds no subscription"):
        budgets.release_user(WHALE_A)


async def test_user_released_by_a_closed_socket_frees_only_after_the_server_does() -> None:
    budgets, clock, _ = make(max_users=1)
    assert budgets.try_add_user(WHALE_A)
    budgets.release_user(WHALE_A, after_close=True)
    assert not budgets.try_add_user(WHALE_B), "the server still counts the closed socket's user for ~2 s"
    clock.advance(RELEASE_AFTER_CLOSE_S)
    assert budgets.try_add_user(WHALE_B)


async def test_subscriptions_are_counted_in_bulk() -> None:
    budgets, clock, _ = make(max_subscriptions=1000)
    assert budgets.try_add_subscriptions(900)
    assert not budgets.try_add_subscriptions(101)
    assert budgets.try_add_subscriptions(100)
    budgets.release_subscriptions(50, after_close=True)
    assert not budgets.try_add_subscriptions(1)
    clock.advance(RELEASE_AFTER_CLOSE_S)
    assert budgets.try_add_subscriptions(50)
    with pytest.raises(ValueError, match="releasing"):
        budgets.release_subscriptions(1001)


async def test_pings_get_through_when_bulk_messages_used_their_share() -> None:
    budgets, _clock, _ = make(max_client_messages_per_minute=2000)
    await budgets.message_permit(1500)  # a resubscribe storm, low priority
    resubscribe = asyncio.create_task(budgets.message_permit(1))
    await spin()
    assert not resubscribe.done()
    await budgets.message_permit(1, "high")  # the ping still goes out: no idle-timeout disconnect
    resubscribe.cancel()
    await spin()


async def test_snapshot_and_gauges_cover_every_budget() -> None:
    budgets, _clock, metrics = make()
    await budgets.rest_weight(20)
    snap = budgets.snapshot()
    assert set(snap) == {"connections", "new_connections", "subscriptions", "users", "client_messages", "rest_weight"}
    assert snap["rest_weight"] == {"used": 20, "capacity": 1200, "waiting": 0}
    assert snap["users"]["capacity"] == 10
    for name, row in snap.items():
        assert metrics.registry.get_sample_value("hl_monitor_budget_used", {"budget": name}) == row["used"]
        assert metrics.registry.get_sample_value("hl_monitor_budget_capacity", {"budget": name}) == row["capacity"]


def test_bad_reserve_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        Budgets(HyperliquidConfig(budget_high_priority_reserve=1.0), Metrics(), clock=ManualClock())
    assert info.value.key == "hyperliquid.budget_high_priority_reserve"


def test_manual_clock_fires_timers_in_order_at_their_due_time() -> None:
    clock = ManualClock()
    seen: list[tuple[str, float]] = []
    clock.call_later(2.0, lambda: seen.append(("b", clock.now())))
    clock.call_later(1.0, lambda: seen.append(("a", clock.now())))
    cancelled = clock.call_later(1.5, lambda: seen.append(("x", clock.now())))
    cancelled.cancel()
    clock.advance(5.0)
    assert seen == [("a", 1.0), ("b", 2.0)]
    assert clock.now() == 5.0
