"""The metrics bridge: one generic exporter that copies components' plain stats into Prometheus.

Pure components (the tracking engine, the tape tracker) keep monotonic integer counters in msgspec Structs and
know nothing of Prometheus. The exporter reads them on a timer and moves each Prometheus counter by the
delta since the last read; gauges are set to the current value. What goes where is a declarative table
built in `app.py`, not code per field.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import msgspec
from prometheus_client import Counter, Gauge

__all__ = ["CounterField", "FieldsAsLabel", "GaugeValue", "StatsExporter"]

# Component counters are copied this often: a few dozen integers, cheap; dashboards scrape every 15 s.
EXPORT_INTERVAL_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class CounterField:
    """`field` of the stats struct (an int, or a dict of label value → int) moves `counter` with `labels`.

    For a dict field, each key becomes the value of the counter's single label and `labels` is ignored.
    """

    field: str
    counter: Counter
    labels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FieldsAsLabel:
    """Every int field of the stats struct moves `counter`, the field's name as the value of its one label."""

    counter: Counter


@dataclass(frozen=True, slots=True)
class GaugeValue:
    gauge: Gauge
    read: Callable[[], float]


Rule = CounterField | FieldsAsLabel


class StatsExporter:
    """Copies registered component stats into Prometheus; `export()` once, or `run()` on a timer."""

    def __init__(self) -> None:
        self._sources: list[tuple[Callable[[], msgspec.Struct], tuple[Rule, ...]]] = []
        self._gauges: list[GaugeValue] = []
        self._last: dict[tuple[int, int, str], int] = {}

    def counters(self, read: Callable[[], msgspec.Struct], *rules: Rule) -> None:
        self._sources.append((read, rules))

    def gauges(self, *values: GaugeValue) -> None:
        self._gauges.extend(values)

    def export(self) -> None:
        for index, (read, rules) in enumerate(self._sources):
            stats = read()
            for r, rule in enumerate(rules):
                if isinstance(rule, FieldsAsLabel):
                    for name in type(stats).__struct_fields__:
                        value = getattr(stats, name)
                        if isinstance(value, int):
                            self._move(rule.counter, (index, r, name), value, (name,))
                    continue
                value = getattr(stats, rule.field)
                if isinstance(value, Mapping):
                    for key, count in value.items():
                        self._move(rule.counter, (index, r, str(key)), count, (str(key),))
                else:
                    self._move(rule.counter, (index, r, ""), value, rule.labels)
        for g in self._gauges:
            g.gauge.set(g.read())

    async def run(self) -> None:
        while True:
            self.export()
            await asyncio.sleep(EXPORT_INTERVAL_S)

    def _move(self, counter: Counter, key: tuple[int, int, str], value: int, labels: tuple[str, ...]) -> None:
        delta = value - self._last.get(key, 0)
        if delta > 0:
            (counter.labels(*labels) if labels else counter).inc(delta)
        self._last[key] = value
