"""Jittered exponential backoff and a supervisor that restarts crashed tasks with it.

`Backoff` is shared by everything that retries (reconnects, gap recovery, supervised tasks) so the
retry shape is the same everywhere: exponential growth, "equal jitter" (half fixed, half random, so
a storm of clients spreads out but nobody retries instantly), reset after a healthy period.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final

from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = ["Backoff", "Supervisor"]

log = get_logger(__name__)

# Doubling is the usual compromise between recovering fast and not hammering a sick peer.
BACKOFF_FACTOR: Final = 2.0


class Backoff:
    """Delays `initial · 2^n` capped at `maximum`; each delay is drawn from [d/2, d] (equal jitter)."""

    def __init__(self, initial: float, maximum: float, *, rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"bad backoff bounds: initial={initial}, maximum={maximum}")
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * BACKOFF_FACTOR**self.attempts)
        self.attempts += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempts = 0


TaskFactory = Callable[[], Awaitable[None]]


class Supervisor:
    """Owns a TaskGroup of named tasks; a task that raises is logged, counted and restarted with backoff.

    A task that returns normally is done and not restarted. Cancellation (stop, shutdown) is never
    treated as a crash. Usage: `async with Supervisor(metrics) as sup: sup.spawn("name", factory)`.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
        healthy_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._metrics = metrics
        self._initial = initial_delay
        self._max = max_delay
        self._healthy_after = healthy_after
        self._clock = clock
        self._rng = rng or random.Random()
        self._group = asyncio.TaskGroup()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def __aenter__(self) -> Supervisor:
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            for task in self._tasks.values():
                task.cancel()
        await self._group.__aexit__(exc_type, exc, tb)

    def spawn(self, name: str, factory: TaskFactory) -> asyncio.Task[None]:
        """Start `factory()` under supervision; `name` must be unique among running tasks."""
        existing = self._tasks.get(name)
        # A finished task whose done-callback has not run yet (it is scheduled, not immediate) frees its name.
        if existing is not None and not existing.done():
            raise ValueError(f"task {name!r} is already running")
        task = self._group.create_task(self._supervise(name, factory), name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._forget(name, t))
        return task

    def _forget(self, name: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]

    def running(self) -> frozenset[str]:
        return frozenset(self._tasks)

    async def stop(self, name: str) -> None:
        """Cancel one task and wait until it has finished."""
        task = self._tasks.get(name)
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])

    async def stop_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _supervise(self, name: str, factory: TaskFactory) -> None:
        backoff = Backoff(self._initial, self._max, rng=self._rng)
        while True:
            started = self._clock()
            try:
                await factory()
                return
            except Exception:
                if self._clock() - started >= self._healthy_after:
                    backoff.reset()
                delay = backoff.next_delay()
                self._metrics.task_restarts.labels(task=name.split(":", 1)[0]).inc()
                log.exception("supervised task crashed; restarting", task=name, delay=round(delay, 3))
                await asyncio.sleep(delay)
