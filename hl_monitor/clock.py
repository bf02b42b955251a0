"""Time: the wall clock every component stamps events with (epoch milliseconds, the exchange's unit), and
the injectable monotonic `Clock` that budgets and windows run on (`ManualClock` in tests and simulations)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "ManualClock", "MonotonicClock", "Timer", "wall_ms"]


def wall_ms() -> int:
    """Now, in epoch milliseconds (integer arithmetic: no float rounding)."""
    return time.time_ns() // 1_000_000


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds plus a way to be called back later (relative delays only)."""

    def now(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class MonotonicClock:
    """The real clock: `time.monotonic()` and the running loop's timers."""

    def now(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(delay, 0.0), callback)


class _ManualTimer:
    __slots__ = ("callback", "cancelled", "due")

    def __init__(self, due: float, callback: Callable[[], None]) -> None:
        self.due = due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when `advance` is called: tests and simulations never really sleep."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._timers: list[_ManualTimer] = []

    def now(self) -> float:
        return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer(self._now + max(delay, 0.0), callback)
        self._timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward, firing due callbacks in due order (each sees `now()` at its due time)."""
        target = self._now + seconds
        while True:
            due = [t for t in self._timers if not t.cancelled and t.due <= target]
            if not due:
                break
            first = min(due, key=lambda t: t.due)
            self._timers.remove(first)
            self._now = max(self._now, first.due)
            first.callback()
        self._timers = [t for t in self._timers if not t.cancelled]
        self._now = target
