"""NATS publish health (docs/architecture.md §8): connected but no ack arriving is degraded, the next ack is ok.

On a controlled clock: `PublishHealth` by plain calls, then the relay that owns it with a NATS stand-in whose
publishes fail or are acknowledged on command. The real leader election is in `tests/test_nats_cluster.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nats.js.api import PubAck

from hl_monitor.clock import ManualClock
from hl_monitor.delivery.publish_health import PUBLISH_DEGRADED_AFTER_S, PublishHealth
from hl_monitor.delivery.relay import Relay
from hl_monitor.errors import PublishError
from tests.support.delivery import RelayCounters, nats_cfg
from tests.support.waiting import wait_until

# A step well inside the threshold: several of them pass before it is reached.
STEP_S = PUBLISH_DEGRADED_AFTER_S / 4


def test_a_single_failure_retried_and_acknowledged_never_shows() -> None:
    clock = ManualClock()
    health = PublishHealth(clock)
    health.attempt()
    clock.advance(STEP_S)
    health.failed()
    assert health.state() == "ok"
    clock.advance(STEP_S)  # the retry
    health.attempt()
    health.acked(still_waiting=False)
    assert health.state() == "ok"
    assert health.unacked_for == 0.0
    clock.advance(PUBLISH_DEGRADED_AFTER_S * 10)  # nothing to publish: idle is not degraded
    assert health.state() == "ok"


def test_failing_for_the_threshold_is_degraded_until_the_next_ack() -> None:
    clock = ManualClock()
    health = PublishHealth(clock)
    health.attempt()
    states = []
    for _ in range(3):
        clock.advance(STEP_S)
        health.failed()
        states.append(health.state())
    assert states == ["ok", "ok", "ok"]
    clock.advance(PUBLISH_DEGRADED_AFTER_S - 3 * STEP_S)
    assert health.state() == "degraded"
    assert health.failures == 3
    health.acked(still_waiting=True)  # the new leader answers: ok at once, even with more messages waiting
    assert health.state() == "ok"
    assert health.failures == 0
    clock.advance(PUBLISH_DEGRADED_AFTER_S - STEP_S)
    assert health.state() == "ok"
    clock.advance(STEP_S)  # ...but those others must be acknowledged too
    assert health.state() == "degraded"


def test_a_publish_that_hangs_without_an_error_is_degraded() -> None:
    clock = ManualClock()
    health = PublishHealth(clock)
    health.attempt()
    clock.advance(PUBLISH_DEGRADED_AFTER_S)
    assert health.state() == "degraded"
    assert health.failures == 0


def test_the_wait_starts_again_after_a_reconnect() -> None:
    """A disconnection is reported as disconnected; after it, the messages get the full threshold again."""
    clock = ManualClock()
    health = PublishHealth(clock)
    health.failed()
    clock.advance(PUBLISH_DEGRADED_AFTER_S * 5)
    health.resumed()
    assert health.state() == "ok"
    clock.advance(PUBLISH_DEGRADED_AFTER_S)
    assert health.state() == "degraded"


# ---- the relay that owns it ----


class _Link:
    is_connected = True
    server_id = "server-1"

    async def wait_connected(self) -> None:
        return None

    async def stream_last_seq(self, stream: str) -> int:
        return 0


class _Relay(Relay[str]):
    """Messages are their own ids; a publish fails with a timeout while `failing` is set."""

    def __init__(self, clock: ManualClock) -> None:
        # Retries every few milliseconds of loop time: the test waits on them at quiet points, not on a sleep.
        super().__init__(
            _Link(), RelayCounters(), nats_cfg(retry_initial_delay=0.001, retry_max_delay=0.005), clock=clock
        )
        self.failing = True
        self.sent = 0
        self.acked: list[str] = []

    def _key(self, item: str) -> str:
        return item

    async def _send(self, item: str) -> PubAck:
        self.sent += 1
        if self.failing:
            raise PublishError("timeout", "no stream leader answered", item)
        return PubAck(stream="S", seq=len(self.acked) + 1)

    async def _fetch(self, limit: int, older_than_ms: int | None) -> list[str]:
        return []

    async def _count_unpublished(self) -> int:
        return 0

    async def _mark(self, key: str, at_ms: int) -> None:
        self.acked.append(key)


@contextlib.asynccontextmanager
async def _running(relay: _Relay) -> AsyncIterator[_Relay]:
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        relay.failing = False
        await relay.drain(1.0)
        await task


async def test_the_relay_reports_degraded_while_connected_publishes_fail_and_ok_at_the_first_ack() -> None:
    clock = ManualClock()
    async with _running(_Relay(clock)) as relay:
        for key in ("a", "b", "c"):
            await relay.submit(key)
        await wait_until(lambda: relay.publish_health.failures >= 9, what="three failed rounds")
        assert relay.publish_health.state() == "ok"  # failing, but not for long yet
        clock.advance(PUBLISH_DEGRADED_AFTER_S)
        assert relay.publish_health.state() == "degraded"
        relay.failing = False
        await wait_until(lambda: relay.acked == ["a", "b", "c"], what="all acknowledged")
        assert relay.publish_health.state() == "ok"
        assert relay.publish_health.unacked_for == 0.0


async def test_one_transient_failure_then_acks_stays_ok() -> None:
    clock = ManualClock()
    async with _running(_Relay(clock)) as relay:
        await relay.submit("a")
        await wait_until(lambda: relay.publish_health.failures >= 1, what="the failure")
        states = [relay.publish_health.state()]
        relay.failing = False
        await wait_until(lambda: relay.acked == ["a"], what="the retry acknowledged")
        clock.advance(PUBLISH_DEGRADED_AFTER_S)
        states.append(relay.publish_health.state())
        assert states == ["ok", "ok"]
