"""A `WatchSet` around a bare engine, for tests of the components that send it intents."""

from __future__ import annotations

from hl_monitor.domain.signal import SignalSink
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.state import EngineState, StateDelta
from hl_monitor.watch.watchset import WatchSet


class _NoState:
    """Nothing persisted, nothing to load: these tests never restart."""

    async def put_delta(self, delta: StateDelta) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def load_engine_state(self, flushed_since_ms: int) -> EngineState:
        return EngineState()


def watch_of(engine: TrackingEngine, sink: SignalSink) -> WatchSet:
    store = _NoState()
    return WatchSet(engine, sink, store, store, clustered=False, tick_interval=1.0, flushed_ttl=3600.0)
