"""The outbox relay stops after `drain()` even when its stream check misses the cancel (delivery/relay.py).

nats-py waits for a request's reply in `asyncio.wait_for`; on Python 3.11 that returns the reply instead of
raising when the reply and a cancel arrive together. The service drains its relays and then closes the NATS
connection, so a scan loop that lost its cancel that way must not wait for a connection that never comes back.
"""

from __future__ import annotations

import asyncio

from nats.js.api import PubAck

from hl_monitor.delivery.relay import Relay
from tests.support.delivery import RelayCounters, nats_cfg
from tests.support.waiting import wait_until


class _ClosingLink:
    """A NATS connection that `close()` ends for good; its stream check returns the reply when cancelled."""

    def __init__(self) -> None:
        self.is_connected = True
        self.server_id = "server-1"
        self.checking = False  # a stream check is waiting for its reply
        self.cancels_missed = 0
        self._never = asyncio.Event()

    def close(self) -> None:
        self.is_connected = False

    async def wait_connected(self) -> None:
        await self._never.wait()

    async def stream_last_seq(self, stream: str) -> int:
        self.checking = True
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # What `asyncio.wait_for` does on Python 3.11 when the reply is already there: the reply wins.
            self.cancels_missed += 1
            return 1
        finally:
            self.checking = False
        raise AssertionError("unreachable: only a cancel ends the wait")


class _Relay(Relay[str]):
    """Messages are their own ids and are acknowledged at once into stream S."""

    def __init__(self, link: _ClosingLink) -> None:
        super().__init__(link, RelayCounters(), nats_cfg(outbox_scan_interval=0.01))
        self.acked: list[str] = []

    def _key(self, item: str) -> str:
        return item

    async def _send(self, item: str) -> PubAck:
        return PubAck(stream="S", seq=len(self.acked) + 1)

    async def _fetch(self, limit: int, older_than_ms: int | None) -> list[str]:
        return []

    async def _count_unpublished(self) -> int:
        return 0

    async def _mark(self, key: str, at_ms: int) -> None:
        self.acked.append(key)


async def test_a_relay_whose_stream_check_misses_the_cancel_still_stops_after_drain() -> None:
    link = _ClosingLink()
    relay = _Relay(link)
    task = asyncio.create_task(relay.run())
    await relay.submit("a")
    await wait_until(lambda: relay.acked == ["a"], what="the ack that makes the scan check stream S")
    await wait_until(lambda: link.checking, what="a stream check waiting for its reply")
    assert await relay.drain(1.0) == 0
    link.close()  # as the service does after draining: the connection is gone for good
    await wait_until(task.done, what="run() ended")
    await task
    assert link.cancels_missed == 1  # the scan loop really lost its cancel, and stopped all the same
