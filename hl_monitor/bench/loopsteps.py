"""Loop step durations, measured from inside the event loop.

One loop step is one callback the loop runs: a task's step up to its next `await` that suspends, a future's
done-callback, a timer, a transport's read. `asyncio.events.Handle._run` runs every one of them (timers are a
subclass), so while a `LoopSteps` is installed the class method is wrapped with clock reads: every step's
wall-clock duration (`perf_counter_ns`) and the loop thread's CPU time in it (`thread_time_ns`) are recorded. A
step that long holds every other task: frames wait in socket buffers, acks wait behind it (the service's latency
tail). Wall time is what the other tasks wait; on a shared machine it also counts the time the process was
descheduled, which the CPU time does not: the two side by side tell the service's own long steps from the
machine's preemption. A step using more than `SLOW_STEP_NS` of CPU is also attributed to what it ran (the task's
coroutine, or the callback's qualified name) so the report can name the longest steps.

Garbage collections run inside whichever step allocates: their pauses are recorded too (`gc.callbacks`), so a
long step can be told apart from a collection that landed in it.

The wrapper costs about 1 µs per step (four clock reads and two list appends); naming is done only for slow steps.
The bench process runs one event loop (the service and the bench driver share it); executor threads do not run
handles, so only that loop's steps are measured. Steps of the bench's own driver (polling, the ack clock) are
included: they are short and few.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from hl_monitor.bench.results import percentile

__all__ = ["SLOW_STEP_NS", "LoopSteps", "StepSummary"]

# A step longer than this is named in the report: the budget for one step of the service's loop.
SLOW_STEP_NS: Final = 1_000_000
OLDEST_GENERATION: Final = 2  # CPython's generations are 0, 1, 2
# The report names this many of the callbacks that ran slow steps (by total time spent in slow steps).
TOP_SLOW: Final = 8


@dataclass(slots=True)
class _Slow:
    count: int = 0
    total_ns: int = 0
    max_ns: int = 0


@dataclass(frozen=True, slots=True)
class StepSummary:
    steps: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    cpu_p99_ms: float
    cpu_p999_ms: float
    cpu_max_ms: float
    over_budget: int  # steps longer than SLOW_STEP_NS (wall)
    cpu_over_budget: int  # steps using more than SLOW_STEP_NS of CPU
    busy_share: float  # wall time inside steps / wall time of the window
    gc_pauses: int  # garbage collections in the window
    gc_pauses_over_budget: int  # of which longer than SLOW_STEP_NS
    gc_max_ms: float
    gc_full: int  # collections of the oldest generation (they walk every tracked object not frozen)
    gc_full_max_ms: float
    slowest: list[dict[str, Any]] = field(default_factory=list)  # name, count, total_ms, max_ms


def _name(callback: Callable[..., Any]) -> str:
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task {getattr(coro, '__qualname__', repr(coro))}"
    return str(getattr(callback, "__qualname__", None) or type(callback).__qualname__)


class LoopSteps:
    """Records every loop step's duration between `install()` and `uninstall()` (one instance at a time)."""

    def __init__(self) -> None:
        self.durations_ns: list[int] = []
        self.cpu_ns: list[int] = []
        self.slow: dict[str, _Slow] = {}
        self._original: Callable[[asyncio.Handle], None] | None = None
        self._started = 0
        self.gc_ns: list[int] = []
        self.gc_full_ns: list[int] = []
        self._gc_started = 0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter_ns()
        elif self._gc_started:
            took = time.perf_counter_ns() - self._gc_started
            self.gc_ns.append(took)
            if info.get("generation") == OLDEST_GENERATION:
                self.gc_full_ns.append(took)
            self._gc_started = 0

    def install(self) -> None:
        if self._original is not None:
            return
        original = asyncio.Handle._run
        durations, cpu, slow = self.durations_ns, self.cpu_ns, self.slow
        clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns

        def timed_run(handle: asyncio.Handle) -> None:
            started, cpu_started = clock(), cpu_clock()
            original(handle)
            used = cpu_clock() - cpu_started
            took = clock() - started
            durations.append(took)
            cpu.append(used)
            if used > SLOW_STEP_NS:
                name = _name(handle._callback)  # type: ignore[attr-defined]  # the handle's own field
                entry = slow.get(name)
                if entry is None:
                    entry = slow[name] = _Slow()
                entry.count += 1
                entry.total_ns += used
                entry.max_ns = max(entry.max_ns, used)

        self._original = original
        self._started = clock()
        gc.callbacks.append(self._on_gc)
        asyncio.Handle._run = timed_run  # type: ignore[method-assign,assignment]  # the bench's instrument, removed after

    def uninstall(self) -> None:
        if self._original is not None:
            asyncio.Handle._run = self._original  # type: ignore[method-assign,assignment]
            self._original = None
            gc.callbacks.remove(self._on_gc)

    def reset(self) -> None:
        """Forget what was recorded (start of the measured window)."""
        self.durations_ns.clear()
        self.cpu_ns.clear()
        self.gc_ns.clear()
        self.gc_full_ns.clear()
        self.slow.clear()
        self._started = time.perf_counter_ns()

    def summary(self) -> StepSummary:
        window = max(1, time.perf_counter_ns() - self._started)
        values = self.durations_ns or [0]
        ms = [v / 1e6 for v in values]
        cpu_values = self.cpu_ns or [0]
        cpu_ms = [v / 1e6 for v in cpu_values]
        ranked = sorted(self.slow.items(), key=lambda kv: kv[1].total_ns, reverse=True)[:TOP_SLOW]
        return StepSummary(
            steps=len(self.durations_ns),
            p50_ms=percentile(ms, 50),
            p99_ms=percentile(ms, 99),
            p999_ms=percentile(ms, 99.9),
            max_ms=max(ms),
            cpu_p99_ms=percentile(cpu_ms, 99),
            cpu_p999_ms=percentile(cpu_ms, 99.9),
            cpu_max_ms=max(cpu_ms),
            over_budget=sum(1 for v in values if v > SLOW_STEP_NS),
            cpu_over_budget=sum(1 for v in cpu_values if v > SLOW_STEP_NS),
            busy_share=round(sum(values) / window, 3),
            gc_pauses=len(self.gc_ns),
            gc_pauses_over_budget=sum(1 for v in self.gc_ns if v > SLOW_STEP_NS),
            gc_max_ms=max(self.gc_ns, default=0) / 1e6,
            gc_full=len(self.gc_full_ns),
            gc_full_max_ms=max(self.gc_full_ns, default=0) / 1e6,
            slowest=[
                {
                    "name": name,
                    "count": s.count,
                    "total_ms": round(s.total_ns / 1e6, 1),
                    "max_ms": round(s.max_ns / 1e6, 2),
                }
                for name, s in ranked
            ],
        )
