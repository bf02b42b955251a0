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

from hl_monitor.feeds.addresses import AddressBook
from hl_monitor.metrics import Metrics
from hl_monitor.ops.positions import export_gauges
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.tape import TapeTracker
from hl_monitor.watch.positions import PositionKeeper

__all__ = ["CounterField", "FieldsAsLabel", "GaugeValue", "StatsExporter", "service_exporter"]

# The whale gauges walk every position document: every 5th export (5 s) keeps that walk off most loop turns.
POSITION_GAUGES_EVERY: Final = 5
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
        self._hooks: list[tuple[int, Callable[[], None]]] = []
        self._exports = 0

    def counters(self, read: Callable[[], msgspec.Struct], *rules: Rule) -> None:
        self._sources.append((read, rules))

    def gauges(self, *values: GaugeValue) -> None:
        self._gauges.extend(values)

    def every(self, exports: int, export: Callable[[], None]) -> None:
        """Run `export` on every `exports`-th export: for bridges that walk much state (position documents)."""
        self._hooks.append((exports, export))

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
        for every, hook in self._hooks:
            if self._exports % every == 0:
                hook()
        self._exports += 1

    async def run(self) -> None:
        while True:
            self.export()
            await asyncio.sleep(EXPORT_INTERVAL_S)

    def _move(self, counter: Counter, key: tuple[int, int, str], value: int, labels: tuple[str, ...]) -> None:
        delta = value - self._last.get(key, 0)
        if delta > 0:
            (counter.labels(*labels) if labels else counter).inc(delta)
        self._last[key] = value


def service_exporter(
    metrics: Metrics,
    engine: TrackingEngine,
    tape: TapeTracker | None,
    book: AddressBook,
    writer: BatchWriter,
    positions: PositionKeeper | None,
) -> StatsExporter:
    """Which component stat feeds which Prometheus series (names unchanged from the first build)."""
    m = metrics
    exporter = StatsExporter()
    exporter.counters(
        lambda: engine.stats,
        CounterField("fills_processed", m.trades_processed, ("fill",)),
        CounterField("duplicate_fills", m.trades_deduplicated),
        CounterField("backfilled_fills", m.backfilled_fills, ("snapshot_or_rest",)),
        CounterField("late_fills_dropped", m.late_fills, ("dropped",)),
        CounterField("continuations", m.late_fills, ("continuation",)),
        CounterField("unknown_dirs", m.unknown_dirs),
        CounterField("statuses_received", m.order_updates_received),
        CounterField("position_frames", m.position_updates, ("applied",)),
        CounterField("position_frames", m.margin_updates, ("applied",)),
        CounterField("spot_frames", m.position_updates, ("spot",)),
        CounterField("duplicate_fills", m.cache_hit, ("dedup",)),
        CounterField("fills_processed", m.cache_miss, ("dedup",)),
        CounterField("flushes_by_trigger", m.order_flush),
        CounterField("held_released", m.held_signals, ("released",)),
        CounterField("held_expired", m.held_signals, ("expired",)),
        CounterField("evictions_by_kind", m.evictions),
    )
    if tape is not None:
        exporter.counters(lambda: tape.stats, FieldsAsLabel(m.tape_events))
    exporter.gauges(
        GaugeValue(m.order_aggregation_active, lambda: engine.stats.pending_orders),
        GaugeValue(m.parked_statuses, lambda: engine.stats.parked_statuses),
        GaugeValue(m.positions_total, engine.positions.open_positions),
        GaugeValue(m.addresses_subscribed, lambda: len(book.entries())),
        GaugeValue(m.writer_queue_depth, lambda: writer.depth),
    )
    if positions is not None:
        exporter.counters(lambda: positions.model.stats, CounterField("bad_input", m.position_bad_input))
        levels = positions.model.alert_levels
        exporter.every(POSITION_GAUGES_EVERY, lambda: export_gauges(m, positions.portfolios(), levels))
    return exporter
