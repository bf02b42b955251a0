"""What the garbage collector tracks after a load, by generation and by type, and what a full pass over it costs.

Wall-clock pauses are noisy on a shared machine; the number of objects the collector must walk is not. A full
collection (generation 2) visits every tracked object that is not frozen, so its pause grows with that number
(architecture §10 "Garbage collection"). The census is taken after a load, with the service still running:

1. one `gc.collect()` clears the run's garbage (its duration is reported as `first_collect_ms`);
2. the survivors are counted per generation (`gc.get_objects(generation)`, frozen objects excluded) and by type;
3. a second `gc.collect()` walks exactly those live objects: `full_collect_ms`, the cost of every full pass the
   collector makes in steady state.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

__all__ = ["TOP_TYPES", "GcCensus", "take_census"]

GENERATIONS: Final = (0, 1, 2)  # CPython's generations; frozen objects sit outside them
# The report names this many types, by tracked count: enough to show where the long-lived objects come from.
TOP_TYPES: Final = 12


@dataclass(frozen=True, slots=True)
class GcCensus:
    tracked: list[int]  # live tracked objects per generation 0, 1, 2 (after a collection, all in 2)
    tracked_total: int
    frozen: int  # objects `gc.freeze()` moved out of the collector's reach (start-up objects)
    first_collect_ms: float
    full_collect_ms: float
    top_types: list[tuple[str, int]] = field(default_factory=list)


def _type_name(obj: object) -> str:
    kind = type(obj)
    module = kind.__module__
    return kind.__qualname__ if module in {"builtins", "__main__"} else f"{module}.{kind.__qualname__}"


def take_census(top: int = TOP_TYPES) -> GcCensus:
    started = time.perf_counter_ns()
    gc.collect()
    first = time.perf_counter_ns() - started
    tracked = [len(gc.get_objects(generation)) for generation in GENERATIONS]
    counts = Counter(_type_name(obj) for generation in GENERATIONS for obj in gc.get_objects(generation))
    started = time.perf_counter_ns()
    gc.collect()
    full = time.perf_counter_ns() - started
    return GcCensus(
        tracked=tracked,
        tracked_total=sum(tracked),
        frozen=gc.get_freeze_count(),
        first_collect_ms=round(first / 1e6, 2),
        full_collect_ms=round(full / 1e6, 2),
        top_types=counts.most_common(top),
    )
