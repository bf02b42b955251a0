"""The tracking engine's persistable state and counters (msgspec Structs, JSON-friendly).

Storage keeps two tables from these:
- order aggregations, unique on `(address, oid, direction)`: one `AggregationRecord` per row. `direction`
  is the key token: the dir code (`OL`), `OL:c<tid>` for a continuation, `twap:OL` for a TWAP (whose `oid`
  column then holds the TWAP id). `state` is `pending` until the record's signal is built, then `flushed`.
- fill watermarks, unique on `address`: one `Watermark` per row.

`TrackingEngine.take_dirty()` hands out what changed; `import_state()` accepts rows loaded back (flushed
rows there tell the engine which orders already produced signals, so late fills do not reuse their ids).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final, Literal, TypeAlias

import msgspec

from hl_monitor.domain.signal import AssetType, Direction, PositionSide, Trigger
from hl_monitor.hyperliquid.protocol import Fill

__all__ = [
    "STATE_VERSION",
    "AggregationRecord",
    "EngineState",
    "EngineStats",
    "FlushedOrder",
    "ParkedStatus",
    "RecordState",
    "SeenKey",
    "StateDelta",
    "Watermark",
]

STATE_VERSION: Final = 1

RecordState: TypeAlias = Literal["pending", "flushed"]
SeenKey: TypeAlias = int | str


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class AggregationRecord(msgspec.Struct, kw_only=True, gc=False):
    """One aggregation (one future signal): the fills of one order (or TWAP) in one direction.

    The order-level fields (`status`, `expected_size`, `order_filled`) repeat the order's state on each of
    its records so a row alone is enough to resume. Engine-owned: treat instances as read-only.
    """

    address: str
    oid: int  # the order id; for TWAP records the TWAP id
    direction: str  # key token, unique within (address, oid); see the module docstring
    signal_id: str
    dir: str  # Hyperliquid dir after the split (or the liquidation/settlement label)
    dir_code: str
    coin: str
    asset_type: AssetType
    open_close: Direction
    side: PositionSide
    liquidation_family: bool = False
    twap_id: int | None = None
    continuation_tid: int | None = None
    fills: list[Fill] = msgspec.field(default_factory=list)
    size: Decimal = Decimal(0)
    first_fill_time: int = 0
    last_fill_time: int = 0
    last_activity_ms: int = 0  # local clock of the last fill's arrival; the quiet timeout runs from here
    backfilled: bool = False
    lateness_ms: int | None = None
    status: str | None = None  # latest order status known (open, triggered or terminal)
    status_time: int | None = None
    status_via: Literal["status", "reconcile"] = "status"
    terminal: bool = False
    expected_size: Decimal | None = None  # size the terminal status accounts for (origSz - sz)
    order_filled: Decimal = Decimal(0)  # every fill of the order so far, all directions and continuations
    state: RecordState = "pending"
    trigger: Trigger | None = None
    flushed_at: int | None = None
    final: bool = False  # flushed under a terminal status: later fills are late, not a continuation


class Watermark(msgspec.Struct, kw_only=True):
    """Per-address fill high-water mark plus the recent dedup keys that make replays exact.

    `time`/`tid`: the newest fill processed. `floor`: fills older than this count as already processed.
    `seen`: `[key, fill time]` of processed fills at or after `floor` (key = tid, or a string for tid 0).
    """

    address: str
    time: int = 0
    tid: int = 0
    floor: int = 0
    seeded: bool = True
    seen: list[tuple[SeenKey, int]] = msgspec.field(default_factory=list)


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class FlushedOrder(msgspec.Struct, kw_only=True, gc=False):
    """An order (or TWAP) whose signal was built; remembered for `aggregation.flushed_ttl`."""

    address: str
    oid: int
    twap: bool = False
    final: bool
    status: str | None = None
    expected_size: Decimal | None = None
    order_filled: Decimal = Decimal(0)
    flushed_at: int


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class ParkedStatus(msgspec.Struct, kw_only=True, gc=False):
    """A terminal status that arrived before any fill of its order."""

    address: str
    oid: int
    status: str
    status_time: int
    expected_size: Decimal | None
    parked_at: int


class EngineState(msgspec.Struct, kw_only=True):
    """Everything needed to resume: pending aggregations, remembered flushes, parked statuses, watermarks."""

    version: int = STATE_VERSION
    aggregations: list[AggregationRecord] = msgspec.field(default_factory=list)
    flushed: list[FlushedOrder] = msgspec.field(default_factory=list)
    parked: list[ParkedStatus] = msgspec.field(default_factory=list)
    watermarks: list[Watermark] = msgspec.field(default_factory=list)


class StateDelta(msgspec.Struct, kw_only=True):
    """Changes since the previous `take_dirty()`: upsert `upserted` and `closed` rows, replace watermarks."""

    upserted: list[AggregationRecord] = msgspec.field(default_factory=list)  # pending, changed
    closed: list[AggregationRecord] = msgspec.field(default_factory=list)  # flushed since the last call
    watermarks: list[Watermark] = msgspec.field(default_factory=list)
    removed_addresses: list[str] = msgspec.field(default_factory=list)  # their pending rows are void

    def __bool__(self) -> bool:
        return bool(self.upserted or self.closed or self.watermarks or self.removed_addresses)


class EngineStats(msgspec.Struct, kw_only=True):
    """Plain counters (monotonic) and gauges (current values) for ops to export."""

    # counters
    fills_received: int = 0
    fills_processed: int = 0
    duplicate_fills: int = 0  # key already seen (replay, duplicate frame)
    stale_fills: int = 0  # older than the address's floor: processed before, or before we watched
    seeded_fills: int = 0  # first snapshot of a new address
    backfilled_fills: int = 0
    late_fills_dropped: int = 0
    continuations: int = 0
    unknown_dirs: int = 0
    ignored_fills: int = 0  # dust conversions, vault netting
    statuses_received: int = 0
    statuses_without_fills: int = 0  # terminal with nothing filled: no signal will ever need them
    statuses_unmatched: int = 0  # REST status for an oid with no aggregation
    unwatched_frames: int = 0
    user_mismatch: int = 0
    unknown_coins: int = 0  # coins reported to `on_unknown_coin` (metadata reload requests)
    held_released: int = 0  # held signals emitted once the reloaded metadata knew their coin
    held_expired: int = 0  # held signals emitted without metadata after `unknown_coin_hold`
    signals_built: int = 0
    position_frames: int = 0  # clearinghouse states applied to the position book
    spot_frames: int = 0  # spot balance states applied
    flushes_by_trigger: dict[str, int] = msgspec.field(default_factory=dict)
    evictions_by_kind: dict[str, int] = msgspec.field(default_factory=dict)
    unknown_dir_names: dict[str, int] = msgspec.field(default_factory=dict)  # bounded sample for logs
    # gauges
    pending_orders: int = 0
    parked_statuses: int = 0
    flushed_orders: int = 0
    watched_addresses: int = 0
    active_addresses: int = 0
    held_signals: int = 0  # signals waiting for metadata of their coin
