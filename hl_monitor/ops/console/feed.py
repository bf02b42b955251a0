"""The console's live feed: acknowledged signals, fills and position events, and address-book changes, fanned
out to browsers over SSE.

Producers call `publish` on the event loop and never wait: each subscriber has a bounded queue, and an event
that does not fit is dropped for that subscriber and counted (a slow browser must not hold the outbox). The
newest events are kept in a bounded ring so a browser that reconnects with `Last-Event-ID` gets what it missed
(README "Console").
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import msgspec
import orjson

from hl_monitor.domain.publication import Publication
from hl_monitor.domain.signal import Signal

__all__ = ["CLOSE", "FeedEvent", "LiveFeed"]

CLOSE: Final = "close"  # the kind of the event that ends every open stream at shutdown (never sent)

# Events a reconnecting browser can catch up on; a drop longer than this many events shows a gap marker.
RING_SIZE: Final = 1000
# Events waiting for one browser; beyond this that browser loses events (counted) instead of stalling producers.
SUBSCRIBER_QUEUE: Final = 256
# Addresses whose last signal is remembered for the whales table; well above `wide.max_addresses`' default.
LAST_SIGNALS_KEPT: Final = 20_000
# The SSE event kind of each acknowledged publication kind the console shows (alerts stay on their stream).
LIVE_PUBLICATIONS: Final = {"fill": "fill", "position_event": "position"}


def signal_row(signal: Signal) -> dict[str, Any]:
    """The part of a signal the console shows (decimals as text)."""
    return {
        "signal_id": signal.signal_id,
        "address": signal.address,
        "label": signal.label,
        "symbol": signal.symbol,
        "coin": signal.coin,
        "dir": signal.dir,
        "side": signal.side,
        "size": str(signal.size),
        "price": str(signal.price),
        "notional_usd": str(signal.notional_usd),
        "time": signal.last_fill_time,
        "detected_at": signal.detected_at,
        "source": signal.source,
    }


# A Struct with gc=False, not a dataclass: the replay ring keeps `RING_SIZE` of them for the process's life, and
# an event holds only an int and two strings, so the collector need not track them (architecture §10).
class FeedEvent(msgspec.Struct, frozen=True, gc=False):
    """One event: a process-wide increasing id (the SSE `id`), a kind (the SSE `event`) and JSON text."""

    seq: int
    kind: str
    data: str


class LiveFeed:
    """Bounded fan-out of events to SSE subscribers, with a replay ring for `Last-Event-ID` resume."""

    def __init__(self, on_drop: Callable[[], None] | None = None) -> None:
        self._seq = itertools.count(1)
        self._ring: deque[FeedEvent] = deque(maxlen=RING_SIZE)
        self._subscribers: set[asyncio.Queue[FeedEvent]] = set()
        self._on_drop = on_drop
        self.dropped = 0
        self._last: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def signal(self, signal: Signal) -> None:
        """An acknowledged signal (the outbox's hook): remembered as its address's last and sent live."""
        row = signal_row(signal)
        self._remember(row)
        self.publish("signal", row)

    def publication(self, publication: Publication) -> None:
        """An acknowledged fill or position event (the fills' and positions' outboxes' hook), sent live as the
        JSON it was published with; browsers drop repeats (a re-publish) by its `fill_id` / `event_id`."""
        kind = LIVE_PUBLICATIONS.get(publication.kind)
        if kind is not None:
            self._append(kind, publication.payload.decode())

    def seed_last_signals(self, newest_first: Iterable[Signal]) -> None:
        """Stored signals, newest first: each address's newest becomes its last unless a live one came since."""
        for signal in newest_first:
            if signal.address not in self._last:
                self._remember(signal_row(signal))

    def last_signal(self, address: str) -> dict[str, Any] | None:
        return self._last.get(address)

    def _remember(self, row: dict[str, Any]) -> None:
        self._last[row["address"]] = row
        self._last.move_to_end(row["address"])
        while len(self._last) > LAST_SIGNALS_KEPT:
            self._last.popitem(last=False)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, data: Any) -> None:
        self._append(kind, orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS).decode())

    def _append(self, kind: str, text: str) -> None:
        event = FeedEvent(next(self._seq), kind, text)
        self._ring.append(event)
        for queue in self._subscribers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1
                if self._on_drop is not None:
                    self._on_drop()

    def close(self) -> None:
        """End every open stream (shutdown): each subscriber gets a close event, even a full queue."""
        for queue in self._subscribers:
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(FeedEvent(0, CLOSE, ""))

    def since(self, seq: int) -> Iterator[FeedEvent]:
        """Events after `seq` still in the ring, oldest first."""
        return (e for e in list(self._ring) if e.seq > seq)

    def subscribe(self) -> asyncio.Queue[FeedEvent]:
        queue: asyncio.Queue[FeedEvent] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[FeedEvent]) -> None:
        self._subscribers.discard(queue)
