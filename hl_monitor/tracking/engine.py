"""The tracking engine: fills and order statuses in, one signal per order direction out (pure, no I/O).

Rules (how they add up to exactly-once delivery: docs/architecture.md §3; golden cases in
`tests/test_tracking_engine.py`):

Dedup. Every fill is keyed per address on its `tid` (tid 0 system fills: oid, coin and time) and
dropped when the key was seen, the first fill of an order included; `hash` is never used. Each address
keeps the keys of fills at or after its `floor`; fills older than the floor count as already processed.
The floor trails the newest fill by `aggregation.seen_window` (and rises when an address exceeds
`aggregation.max_seen_per_address` keys), so a snapshot replay or REST backfill inside that window is
absorbed exactly, whatever order frames arrive in.

Snapshots. The first `isSnapshot` frame of a newly added address only seeds the watermark (newest
fill, floor = its time). Later snapshots and `on_backfill` batches are processed like stream fills;
fills they bring that were not seen make signals flagged `backfilled` with `lateness_ms`.

Aggregation. Each fill is split into legs (`fills.py`) and appended to the record of its order (oid) and
leg, or of its TWAP (`twapId`) and leg. A signal is built from the record's fills sorted by
`(time, tid)`, so arrival order never changes it.

Flush, exactly once per record:
- status: a terminal order status (anything but open/triggered) ends the order once the fills it
  accounts for (`origSz - sz`) have arrived, or `aggregation.status_grace` after the status if they
  never do. A status can therefore arrive before, between or after the fills of its order.
- a status for an oid with no fill yet is parked for `aggregation.status_park_ttl` and applied by
  the order's first fill; a terminal status that filled nothing is not parked (no fill will come).
- timeout: no fill of the order for `aggregation.timeout` (since the last fill, by the local clock).
- reconcile: `on_order_status` with a terminal REST status flushes at once (trigger `reconcile`).
A flushed order is remembered for `aggregation.flushed_ttl`. A later fill of it is dropped and counted
when the order was flushed under a terminal status (`final`); when it was flushed by timeout while its
status was open or unknown, the fill starts a continuation record with its own id (`…:c{first_tid}`).
TWAPs end with their `userTwapHistory` status (`on_twap_history`: finished, terminated, error; the expected
size is `executedSz`), which flushes them like a terminal order status; without one they flush by timeout and
continue the same way.

Unknown coins. When the engine has a way to ask for fresh exchange metadata (`on_unknown_coin` is set),
a fill whose coin the symbol map does not know reports the coin at once (once per coin per map), and a
signal of such a coin is held, not emitted with a raw-coin symbol: `tick` emits it as soon as
`set_symbols` brings a map that knows the coin (`held_released`), or after `aggregation.unknown_coin_hold`
with the symbol the rules give without metadata, as the old service did (`held_expired`). A held record
stays `pending` in `take_dirty`/`export_state` until it is emitted, so a restart rebuilds its signal.

Fills as they happen. With `collect_fills` on, every fill that passes dedup and the floor (whatever its dir,
stream or replay) becomes one `FillRecord` with the running size and VWAP of its order (its TWAP for a slice),
in processing order; the owner that drives the engine takes them with `take_fills()` after each call and
publishes them (README "Fills"). A replay is absorbed by the same dedup, so a fill is recorded once. After a
restart an order's running totals resume from its stored records (`order_filled` for the size; the VWAP over
the fills those records hold).

Gap recovery: fills older than the floor are never reprocessed, so a REST backfill recovers a gap only
within `aggregation.seen_window` of the newest fill (default 1 h); older ones are counted as stale.

Memory. Nothing is allocated for a watched address until its first frame. Pending orders (size
bound: the least recently active is flushed early), parked statuses, remembered flushes and per-address
dedup keys expire by TTL or size; every eviction is counted in `stats.evictions_by_kind`. Unknown and
ignored dirs only update dedup state.

Time: `now_ms` is the caller's wall clock; timers assume it does not go backwards.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from itertools import chain
from operator import attrgetter
from typing import Final, Literal

import msgspec

from hl_monitor.config import AggregationConfig
from hl_monitor.domain.publication import FillRecord, fill_msg_id
from hl_monitor.domain.signal import LiquidationInfo, Signal, Trigger
from hl_monitor.hyperliquid.constants import is_terminal_status
from hl_monitor.hyperliquid.protocol import (
    AllDexsClearinghouseStateData,
    ClearinghouseStateData,
    Fill,
    SpotStateData,
    UserFillsData,
    UserTwapHistoryData,
    WsOrder,
)
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.tracking.aggregator import build_signal, new_record
from hl_monitor.tracking.fills import IGNORED_DIRS, TRADE_LEGS, Leg, fill_key, split_fill
from hl_monitor.tracking.positions import PositionBook
from hl_monitor.tracking.state import (
    STATE_VERSION,
    AggregationRecord,
    EngineState,
    EngineStats,
    FlushedOrder,
    ParkedStatus,
    SeenKey,
    StateDelta,
    Watermark,
)

__all__ = ["TrackingEngine", "fill_record"]

# Distinct unknown `dir` strings kept for logs/status; more are only counted (bounded memory).
MAX_UNKNOWN_DIR_NAMES: Final = 32
# REST orderStatus answer for an oid the exchange does not know; not an order status.
UNKNOWN_OID: Final = "unknownOid"
MS: Final = 1000
# Signals held for an unknown coin; past this the oldest is emitted with its metadata-less symbol (bounded memory).
MAX_HELD_SIGNALS: Final = 10_000
# Distinct unknown coins remembered as already reported; beyond that a coin is reported again (the loader debounces).
MAX_REPORTED_COINS: Final = 1024

Via = Literal["status", "reconcile"]
# `userTwapHistory` statuses that end a TWAP (`activated` starts one; the status is an open string).
TWAP_ENDED: Final = frozenset({"finished", "terminated", "error"})
_fill_order: Final = attrgetter("time", "tid")


def _norm(address: str) -> str:
    return address if address.islower() else address.lower()


def fill_record(
    address: str,
    fill: Fill,
    symbols: SymbolMap,
    *,
    backfilled: bool,
    now_ms: int,
    label: str | None = None,
    order_filled_size: Decimal | None = None,
    order_vwap: Decimal | None = None,
) -> FillRecord:
    """The published form of one accepted precise fill; the order totals are the caller's (None: no order)."""
    info = symbols.lookup(fill.coin)
    liq = fill.liquidation
    return FillRecord(
        fill_id=fill_msg_id(address, fill.coin, fill.tid, fill.oid, fill.time),
        address=address,
        source="user_fills",
        coin=fill.coin,
        symbol=info.symbol,
        asset_type=info.asset_type,
        oid=fill.oid,
        tid=fill.tid,
        side=fill.side,
        px=fill.px,
        sz=fill.sz,
        dir=fill.dir,
        start_position=fill.start_position,
        time=fill.time,
        crossed=fill.crossed,
        hash=fill.hash,
        fee=fill.fee,
        fee_token=fill.fee_token,
        closed_pnl=fill.closed_pnl,
        liquidation=None if liq is None else LiquidationInfo(liq.mark_px, liq.method, liq.liquidated_user),
        twap_id=fill.twap_id,
        backfilled=backfilled,
        order_filled_size=order_filled_size,
        order_vwap=order_vwap,
        label=label,
        detected_at=now_ms,
    )


class _Addr:
    """Tracking state of one address, created on its first frame."""

    __slots__ = (
        "address",
        "floor",
        "live",
        "orders",
        "parked",
        "seed_time",
        "seeded",
        "seen",
        "slices",
        "twaps",
        "wm_tid",
        "wm_time",
    )

    def __init__(self, address: str) -> None:
        self.address = address
        self.live = True
        self.seeded = False
        self.seed_time: int | None = None  # newest fill time of the snapshot that seeded it, in this process
        self.wm_time = 0
        self.wm_tid = 0
        self.floor = 0
        self.seen: OrderedDict[SeenKey, int] = OrderedDict()
        self.orders: dict[int, _Order] = {}
        self.twaps: dict[int, _Order] = {}
        self.slices: dict[int, int] = {}  # TWAP slice oid → twap id: their statuses need no action
        self.parked: dict[int, ParkedStatus] = {}


class _Held:
    """A built signal waiting for metadata of its coin, with what its record needs once it is emitted."""

    __slots__ = ("deadline", "final", "flushed_at", "record", "signal", "trigger")

    def __init__(self, deadline: int, signal: Signal, record: AggregationRecord, trigger: Trigger, final: bool) -> None:
        self.deadline = deadline
        self.signal = signal
        self.record = record
        self.trigger = trigger
        self.final = final
        self.flushed_at = signal.detected_at


class _Order:
    """One order (or TWAP): its pending records per leg code and its status; kept after the flush."""

    __slots__ = (
        "addr",
        "cont_tid",
        "done",
        "expected",
        "filled",
        "final",
        "flushed_at",
        "grace_deadline",
        "key",
        "last_activity",
        "notional",
        "notional_sz",
        "records",
        "slice_oids",
        "status",
        "status_time",
        "terminal",
        "twap",
        "via",
    )

    def __init__(self, addr: _Addr, key: int, twap: bool) -> None:
        self.addr = addr
        self.key = key
        self.twap = twap
        self.records: dict[str, AggregationRecord] = {}
        self.status: str | None = None
        self.status_time: int | None = None
        self.via: Via = "status"
        self.terminal = False
        self.expected: Decimal | None = None
        self.filled = Decimal(0)
        # Σ px·sz and Σ sz of the fills whose prices this process knows (for the published running VWAP).
        self.notional = Decimal(0)
        self.notional_sz = Decimal(0)
        self.last_activity = 0
        self.done = False
        self.final = False
        self.flushed_at = 0
        self.cont_tid: int | None = None
        self.grace_deadline = 0
        # A tuple, not a list: only TWAPs take slices, and a tuple of ints is not tracked by the garbage collector
        # while a list is, one per order kept after its flush (architecture §10 "Garbage collection").
        self.slice_oids: tuple[int, ...] = ()

    @property
    def complete(self) -> bool:
        return self.terminal and (self.expected is None or self.filled >= self.expected)


def _record_order(record: AggregationRecord) -> tuple[int, int, str]:
    return (record.first_fill_time, 0 if record.open_close == "close" else 1, record.dir_code)


class TrackingEngine:
    """Pure state machine; the feeds call `on_*`, the app calls `tick` every `aggregation.scan_interval`."""

    def __init__(
        self,
        config: AggregationConfig,
        symbols: SymbolMap,
        *,
        instance_id: str | None = None,
        on_unknown_coin: Callable[[str], None] | None = None,
        collect_fills: bool = False,
    ) -> None:
        self._config = config
        # Record every accepted fill for `take_fills` (off: nothing is kept, as before).
        self.collect_fills = collect_fills
        self._fills: list[FillRecord] = []
        self._symbols = symbols
        self._instance_id = instance_id
        # Called (must not raise) with a coin the map does not know; setting it enables holding such signals.
        self.on_unknown_coin = on_unknown_coin
        self._hold_ms = round(config.unknown_coin_hold * MS)
        self._held: deque[_Held] = deque()
        self._held_new: dict[int, AggregationRecord] = {}  # id → held record not yet handed out as pending
        self._reported: set[str] = set()
        self._symbols_changed = False
        self._timeout_ms = round(config.timeout * MS)
        self._grace_ms = round(config.status_grace * MS)
        self._park_ttl_ms = round(config.status_park_ttl * MS)
        self._flushed_ttl_ms = round(config.flushed_ttl * MS)
        self._seen_window_ms = round(config.seen_window * MS)
        self.stats = EngineStats()
        self.positions = PositionBook()
        self._watched: dict[str, str | None] = {}
        self._addrs: dict[str, _Addr] = {}
        # Pending orders by last fill arrival (oldest first) and terminal orders waiting for their fills.
        self._activity: OrderedDict[_Order, None] = OrderedDict()
        self._awaiting: OrderedDict[_Order, None] = OrderedDict()
        # TTL queues in expiry order; entries whose target changed since are skipped when popped.
        self._parked_q: deque[tuple[int, _Addr, ParkedStatus]] = deque()
        # Flushed orders in flush order, and their flush times: two deques in step rather than one of tuples, as a
        # tuple holding an order stays tracked by the collector (architecture §10 "Garbage collection").
        self._done_q: deque[_Order] = deque()
        self._done_at: deque[int] = deque()
        self._n_parked = 0
        self._n_done = 0
        self._dirty: dict[_Order, None] = {}  # orders whose pending records changed
        self._closed: list[AggregationRecord] = []
        self._dirty_addrs: dict[str, _Addr] = {}
        self._removed: list[str] = []

    # ------------------------------------------------------------------------------------ addresses

    def add_address(self, address: str, label: str | None = None) -> None:
        """Watch an address (or relabel it). Costs one dict entry until its first frame."""
        self._watched[_norm(address)] = label
        self.stats.watched_addresses = len(self._watched)

    def remove_address(self, address: str) -> None:
        """Forget an address: its pending aggregations are dropped (flush them first with `flush_address`)."""
        addr = _norm(address)
        self._watched.pop(addr, None)
        st = self._addrs.pop(addr, None)
        self.positions.remove(addr)
        if st is not None:
            st.live = False
            for order in chain(st.orders.values(), st.twaps.values()):
                if order.done:
                    self._n_done -= 1
                    continue
                self._activity.pop(order, None)
                self._awaiting.pop(order, None)
                self._dirty.pop(order, None)
            self._n_parked -= len(st.parked)
            self._dirty_addrs.pop(addr, None)
            self._removed.append(addr)
        self._update_gauges()

    def is_watched(self, address: str) -> bool:
        return _norm(address) in self._watched

    def set_symbols(self, symbols: SymbolMap) -> None:
        """Use a reloaded map; held signals whose coin it knows are emitted by the next `tick`."""
        self._symbols = symbols
        self._reported.clear()
        self._symbols_changed = True

    def held_coins(self) -> list[str]:
        """Coins with signals held for metadata (for `/status` and the loader)."""
        return sorted({held.record.coin for held in self._held})

    def _holding(self) -> bool:
        return self.on_unknown_coin is not None and self._hold_ms > 0

    def _report_unknown(self, coin: str) -> None:
        callback = self.on_unknown_coin
        if callback is None or coin in self._reported:
            return
        if len(self._reported) < MAX_REPORTED_COINS:
            self._reported.add(coin)
        self.stats.unknown_coins += 1
        callback(coin)

    @property
    def symbols(self) -> SymbolMap:
        return self._symbols

    def _state(self, addr: str) -> _Addr:
        st = self._addrs.get(addr)
        if st is None:
            st = self._addrs[addr] = _Addr(addr)
        return st

    # ------------------------------------------------------------------------------------ fills

    def on_user_fills(self, address: str, data: UserFillsData, now_ms: int) -> list[Signal]:
        """A `userFills` frame (snapshot or stream) of a watched address."""
        addr = _norm(address)
        if addr not in self._watched:
            self.stats.unwatched_frames += 1
            return []
        if data.user != addr and data.user.lower() != addr:
            self.stats.user_mismatch += 1
            return []
        fills = data.fills
        self.stats.fills_received += len(fills)
        st = self._state(addr)
        if data.is_snapshot:
            if not st.seeded:
                self._seed(st, fills)
                self._update_gauges()
                return []
            out = self._ingest(st, sorted(fills, key=_fill_order), now_ms, backfilled=True)
        else:
            out = self._ingest(st, fills, now_ms, backfilled=False)
        self._update_gauges()
        return out

    def on_backfill(self, address: str, fills: Sequence[Fill], now_ms: int) -> list[Signal]:
        """REST `userFillsByTime` after a gap: unseen fills are processed and flagged backfilled."""
        addr = _norm(address)
        if addr not in self._watched:
            self.stats.unwatched_frames += 1
            return []
        self.stats.fills_received += len(fills)
        st = self._state(addr)
        if not st.seeded:
            self._seed(st, fills)
            out: list[Signal] = []
        else:
            out = self._ingest(st, sorted(fills, key=_fill_order), now_ms, backfilled=True)
        self._update_gauges()
        return out

    def _seed(self, st: _Addr, fills: Sequence[Fill]) -> None:
        st.seeded = True
        self._dirty_addrs[st.address] = st
        if fills:
            newest = max(fills, key=_fill_order)
            if (newest.time, newest.tid) > (st.wm_time, st.wm_tid):
                st.wm_time, st.wm_tid = newest.time, newest.tid
        st.seed_time = st.wm_time
        if not fills:
            return
        st.floor = max(st.floor, st.wm_time)
        for fill in fills:
            if fill.time >= st.floor:
                st.seen[fill_key(fill)] = fill.time
        self.stats.seeded_fills += len(fills)
        self._bound_seen(st)

    def _ingest(self, st: _Addr, fills: Iterable[Fill], now: int, *, backfilled: bool) -> list[Signal]:
        out: list[Signal] = []
        touched: list[_Order] = []
        seen = st.seen
        orders = st.orders
        stats = self.stats
        activity = self._activity
        dirty = self._dirty
        processed = 0
        for fill in fills:
            tid = fill.tid
            key: SeenKey = tid if tid else fill_key(fill)
            if key in seen:
                stats.duplicate_fills += 1
                continue
            t = fill.time
            if t < st.floor:
                stats.stale_fills += 1
                continue
            seen[key] = t
            processed += 1
            if t > st.wm_time or (t == st.wm_time and tid > st.wm_tid):
                st.wm_time = t
                st.wm_tid = tid
            leg = TRADE_LEGS.get(fill.dir)
            parts = None
            if leg is None:
                parts = split_fill(fill)
                if parts is None:
                    self._not_a_signal(fill.dir)
                    if self.collect_fills:
                        self._record_fill(st, fill, None, now, backfilled)
                    continue
            order = orders.get(fill.oid) if fill.twap_id is None else None
            if order is None or order.done:
                order = self._order_for(st, fill, now, out)
                if order is None:
                    if self.collect_fills:
                        self._record_fill(st, fill, None, now, backfilled)
                    continue
            if leg is not None:
                self._add(order, leg, fill, now, backfilled)
            elif parts is not None:
                for part_leg, part in parts:
                    self._add(order, part_leg, part, now, backfilled)
            order.filled += fill.sz
            order.notional += fill.px * fill.sz
            order.notional_sz += fill.sz
            if self.collect_fills:
                self._record_fill(st, fill, order, now, backfilled)
            order.last_activity = now
            dirty[order] = None
            if order in activity:
                activity.move_to_end(order)
            else:
                activity[order] = None
            if order.terminal:
                touched.append(order)
        if processed:
            stats.fills_processed += processed
            if backfilled:
                stats.backfilled_fills += processed
            self._dirty_addrs[st.address] = st
            if st.wm_time - self._seen_window_ms > st.floor or len(seen) > self._config.max_seen_per_address:
                self._prune_seen(st)
        for order in touched:
            if not order.done and order.complete:
                out.extend(self._flush(order, order.via, now))
        return out

    def _record_fill(self, st: _Addr, fill: Fill, order: _Order | None, now: int, backfilled: bool) -> None:
        self._fills.append(
            fill_record(
                st.address,
                fill,
                self._symbols,
                backfilled=backfilled,
                now_ms=now,
                label=self._watched.get(st.address),
                order_filled_size=None if order is None else order.filled,
                order_vwap=order.notional / order.notional_sz if order is not None and order.notional_sz else None,
            )
        )

    def take_fills(self) -> list[FillRecord]:
        """The fills accepted since the last call, in processing order (empty unless `collect_fills`)."""
        fills, self._fills = self._fills, []
        return fills

    def _not_a_signal(self, dir_: str) -> None:
        if dir_ in IGNORED_DIRS:
            self.stats.ignored_fills += 1
            return
        self.stats.unknown_dirs += 1
        names = self.stats.unknown_dir_names
        if dir_ in names or len(names) < MAX_UNKNOWN_DIR_NAMES:
            names[dir_] = names.get(dir_, 0) + 1

    def _order_for(self, st: _Addr, fill: Fill, now: int, out: list[Signal]) -> _Order | None:
        twap_id = fill.twap_id
        if twap_id is not None:
            order = st.twaps.get(twap_id)
            if order is None:
                order = self._new_order(st, twap_id, True, now, out)
            elif order.done:
                self._reopen(order, fill.tid, now, out)
            if fill.oid not in st.slices:
                st.slices[fill.oid] = twap_id
                order.slice_oids += (fill.oid,)
                if st.parked.pop(fill.oid, None) is not None:
                    self._n_parked -= 1
            return order
        order = st.orders.get(fill.oid)
        if order is None:
            order = self._new_order(st, fill.oid, False, now, out)
            parked = st.parked.pop(fill.oid, None)
            if parked is not None:
                self._n_parked -= 1
                self._apply_terminal(order, parked.status, parked.status_time, parked.expected_size, "status", now)
            return order
        if order.done:
            if order.final:
                self.stats.late_fills_dropped += 1
                return None
            self._reopen(order, fill.tid, now, out)
        return order

    def _make_room(self, now: int, out: list[Signal]) -> None:
        while len(self._activity) >= self._config.max_pending_orders:
            victim = next(iter(self._activity))
            self._evict("pending_orders")
            out.extend(self._flush(victim, self._trigger_of(victim), now))

    def _new_order(self, st: _Addr, key: int, twap: bool, now: int, out: list[Signal]) -> _Order:
        self._make_room(now, out)
        order = _Order(st, key, twap)
        (st.twaps if twap else st.orders)[key] = order
        return order

    def _reopen(self, order: _Order, tid: int, now: int, out: list[Signal]) -> None:
        """A fill after a non-final flush: the same order continues under a new id."""
        self._make_room(now, out)
        order.done = False
        order.cont_tid = tid
        self._n_done -= 1
        self.stats.continuations += 1
        if order.terminal:  # the status came after the timeout flush: wait for its fills as usual
            order.grace_deadline = now + self._grace_ms
            self._awaiting[order] = None

    def _add(self, order: _Order, leg: Leg, fill: Fill, now: int, backfilled: bool) -> None:
        rec = order.records.get(leg.code)
        if rec is None:
            rec = order.records[leg.code] = new_record(
                order.addr.address,
                key=order.key,
                twap=order.twap,
                continuation_tid=order.cont_tid,
                leg=leg,
                fill=fill,
                now_ms=now,
            )
            if self.on_unknown_coin is not None and not self._symbols.is_known(fill.coin):
                self._report_unknown(fill.coin)
        rec.fills.append(fill)
        rec.size += fill.sz
        t = fill.time
        if t < rec.first_fill_time:
            rec.first_fill_time = t
        elif t > rec.last_fill_time:
            rec.last_fill_time = t
        rec.last_activity_ms = now
        if backfilled:
            rec.backfilled = True
            rec.lateness_ms = now - rec.last_fill_time

    def _prune_seen(self, st: _Addr) -> None:
        cutoff = st.wm_time - self._seen_window_ms
        if cutoff > st.floor:
            st.floor = cutoff
            seen = st.seen
            while seen:
                first = next(iter(seen))
                if seen[first] >= cutoff:
                    break
                del seen[first]
        self._bound_seen(st)

    def _bound_seen(self, st: _Addr) -> None:
        seen = st.seen
        limit = self._config.max_seen_per_address
        while len(seen) > limit:
            _, t = seen.popitem(last=False)
            # Everything at or before the evicted key's time now counts as processed (never reprocessed).
            st.floor = max(st.floor, t + 1)
            self._evict("seen_keys")

    # ------------------------------------------------------------------------------------ statuses

    def on_order_updates(self, address: str, updates: Sequence[WsOrder], now_ms: int) -> list[Signal]:
        """An `orderUpdates` frame of a precisely tracked address (the frame itself carries no user)."""
        addr = _norm(address)
        if addr not in self._watched:
            self.stats.unwatched_frames += 1
            return []
        out: list[Signal] = []
        for update in updates:
            self.stats.statuses_received += 1
            order = update.order
            filled = order.orig_sz - order.sz
            # A `filled` status with nothing apparently filled is a whole-position TP/SL (origSz 0): size unknown.
            expected = filled if filled > 0 else None
            nothing_filled = filled <= 0 and update.status != "filled"
            out.extend(
                self._on_status(
                    addr, order.oid, update.status, update.status_timestamp, expected, nothing_filled, "status", now_ms
                )
            )
        self._update_gauges()
        return out

    def on_twap_history(self, address: str, data: UserTwapHistoryData, now_ms: int) -> list[Signal]:
        """`userTwapHistory` (snapshot or update): a TWAP that ended ends its aggregation like a terminal order
        status — flushed once its slices' fills add up to `executedSz`, or `status_grace` later — instead of
        `aggregation.timeout` after its last slice. Entries of TWAPs without an open aggregation change nothing."""
        addr = _norm(address)
        if addr not in self._watched:
            self.stats.unwatched_frames += 1
            return []
        st = self._addrs.get(addr)
        if st is None:
            return []
        out: list[Signal] = []
        for entry in data.history:
            if entry.twap_id is None or entry.status.status not in TWAP_ENDED:
                continue
            order = st.twaps.get(entry.twap_id)
            if order is None or order.terminal or order.done:
                continue
            self.stats.statuses_received += 1
            self._apply_terminal(order, entry.status.status, entry.time * MS, entry.state.executed_sz, "status", now_ms)
            if order.complete:
                out.extend(self._flush(order, "status", now_ms))
        self._update_gauges()
        return out

    def on_order_status(self, address: str, oid: int, status: str, status_time: int, now_ms: int) -> list[Signal]:
        """REST `orderStatus` after a gap: a terminal status ends the order now (trigger `reconcile`)."""
        addr = _norm(address)
        if addr not in self._watched:
            self.stats.unwatched_frames += 1
            return []
        self.stats.statuses_received += 1
        if status == UNKNOWN_OID:
            self.stats.statuses_unmatched += 1
            return []
        out = self._on_status(addr, oid, status, status_time, None, False, "reconcile", now_ms)
        self._update_gauges()
        return out

    def _on_status(
        self,
        addr: str,
        oid: int,
        status: str,
        status_time: int,
        expected: Decimal | None,
        nothing_filled: bool,
        via: Via,
        now: int,
    ) -> list[Signal]:
        terminal = is_terminal_status(status)
        st = self._addrs.get(addr)
        order = st.orders.get(oid) if st is not None else None
        if order is None:
            if st is not None and oid in st.slices:
                return []
            if not terminal:
                return []
            if via == "reconcile":
                self.stats.statuses_unmatched += 1
                return []
            if nothing_filled:
                self.stats.statuses_without_fills += 1
                return []
            self._park(
                self._state(addr),
                ParkedStatus(
                    address=addr, oid=oid, status=status, status_time=status_time, expected_size=expected, parked_at=now
                ),
            )
            return []
        if order.terminal:
            return []  # terminal is final; a repeated or late update changes nothing
        if not terminal:
            order.status = status
            order.status_time = status_time
            self._touch(order)
            return []
        if order.done:
            order.status, order.status_time, order.terminal, order.via = status, status_time, True, via
            order.expected = expected
            # Flushed by timeout: fills still missing will form a continuation; otherwise nothing follows.
            order.final = order.complete
            return []
        self._apply_terminal(order, status, status_time, expected, via, now)
        if order.complete:
            return self._flush(order, via, now)
        return []

    def _apply_terminal(
        self, order: _Order, status: str, status_time: int, expected: Decimal | None, via: Via, now: int
    ) -> None:
        order.status = status
        order.status_time = status_time
        order.terminal = True
        order.via = via
        order.expected = expected
        order.grace_deadline = now + self._grace_ms
        self._awaiting[order] = None
        self._touch(order)

    def _park(self, st: _Addr, parked: ParkedStatus) -> None:
        old = st.parked.get(parked.oid)
        if old is not None:
            if old.status_time > parked.status_time:
                return
        else:
            self._n_parked += 1
        st.parked[parked.oid] = parked
        self._parked_q.append((parked.parked_at + self._park_ttl_ms, st, parked))
        while self._n_parked > self._config.max_parked_statuses and self._parked_q:
            _, victim_st, victim = self._parked_q.popleft()
            if victim_st.live and victim_st.parked.get(victim.oid) is victim:
                del victim_st.parked[victim.oid]
                self._n_parked -= 1
                self._evict("parked_statuses")

    # ------------------------------------------------------------------------------------ flush

    def _trigger_of(self, order: _Order) -> Trigger:
        return order.via if order.terminal else "timeout"

    def _flush(self, order: _Order, trigger: Trigger, now: int) -> list[Signal]:
        st = order.addr
        label = self._watched.get(st.address)
        status = order.status if order.terminal else None
        signals: list[Signal] = []
        records = order.records.values()
        holding = self._holding()
        for rec in sorted(records, key=_record_order) if len(records) > 1 else records:
            if rec.asset_type == "spot":
                balance = self.positions.spot_total_usd(st.address)
            else:
                balance = self.positions.account_value(st.address)
            signal = build_signal(
                rec,
                trigger=trigger,
                status=status,
                symbols=self._symbols,
                balance=balance,
                label=label,
                now_ms=now,
                instance_id=self._instance_id,
            )
            self._sync(rec, order)
            if holding and not self._symbols.is_known(rec.coin):
                self._hold(_Held(now + self._hold_ms, signal, rec, trigger, order.terminal), signals)
                continue
            signals.append(signal)
            rec.state = "flushed"
            rec.trigger = trigger
            rec.flushed_at = now
            rec.final = order.terminal
            self._closed.append(rec)
        self._dirty.pop(order, None)
        order.records = {}
        order.done = True
        order.final = order.terminal
        order.flushed_at = now
        order.cont_tid = None
        self._activity.pop(order, None)
        self._awaiting.pop(order, None)
        self._remember(order, now)
        self.stats.signals_built += len(signals)
        flushes = self.stats.flushes_by_trigger
        flushes[trigger] = flushes.get(trigger, 0) + 1
        return signals

    def _hold(self, held: _Held, out: list[Signal]) -> None:
        while len(self._held) >= MAX_HELD_SIGNALS:
            self._evict("held_signals")
            out.append(self._release(self._held.popleft(), known=False))
        self._held.append(held)
        self._held_new[id(held.record)] = held.record
        self._report_unknown(held.record.coin)

    def _release(self, held: _Held, *, known: bool) -> Signal:
        """Emit a held signal with the symbol the current map gives its coin."""
        rec = held.record
        rec.state = "flushed"
        rec.trigger = held.trigger
        rec.flushed_at = held.flushed_at
        rec.final = held.final
        self._closed.append(rec)
        self._held_new.pop(id(rec), None)
        if known:
            self.stats.held_released += 1
        else:
            self.stats.held_expired += 1
        info = self._symbols.lookup(rec.coin, spot=rec.asset_type == "spot")
        return msgspec.structs.replace(held.signal, symbol=info.symbol, coin_type=info.coin_type)

    def _release_held(self, now: int, out: list[Signal]) -> None:
        held = self._held
        if not held:
            return
        if self._symbols_changed:
            waiting: deque[_Held] = deque()
            for entry in held:
                if self._symbols.is_known(entry.record.coin):
                    out.append(self._release(entry, known=True))
                    self.stats.signals_built += 1
                else:
                    waiting.append(entry)
            self._held = held = waiting
        while held and held[0].deadline <= now:
            out.append(self._release(held.popleft(), known=False))
            self.stats.signals_built += 1

    def _remember(self, order: _Order, flushed_at: int) -> None:
        self._n_done += 1
        self._done_q.append(order)
        self._done_at.append(flushed_at)
        while self._n_done > self._config.max_flushed_keys and self._done_q:
            victim, at = self._done_q.popleft(), self._done_at.popleft()
            if self._done_live(victim, at):
                self._forget(victim)
                self._evict("flushed_orders")

    def _done_live(self, order: _Order, flushed_at: int) -> bool:
        if not (order.addr.live and order.done and order.flushed_at == flushed_at):
            return False
        return (order.addr.twaps if order.twap else order.addr.orders).get(order.key) is order

    def _forget(self, order: _Order) -> None:
        st = order.addr
        (st.twaps if order.twap else st.orders).pop(order.key, None)
        for oid in order.slice_oids:
            st.slices.pop(oid, None)
        self._n_done -= 1

    def flush_address(self, address: str, now_ms: int, trigger: Trigger = "shutdown") -> list[Signal]:
        """Build the signals of every pending aggregation of one address now (e.g. before removing it)."""
        st = self._addrs.get(_norm(address))
        if st is None:
            return []
        pending = [o for o in chain(st.orders.values(), st.twaps.values()) if not o.done]
        out: list[Signal] = []
        for order in pending:
            out.extend(self._flush(order, trigger, now_ms))
        self._update_gauges()
        return out

    def tick(self, now_ms: int) -> list[Signal]:
        """Timeouts since the last fill, status grace expiries, held signals now emittable, TTL evictions."""
        out: list[Signal] = []
        self._release_held(now_ms, out)
        self._symbols_changed = False
        activity = self._activity
        while activity:
            order = next(iter(activity))
            if order.last_activity + self._timeout_ms > now_ms:
                break
            out.extend(self._flush(order, self._trigger_of(order), now_ms))
        awaiting = self._awaiting
        while awaiting:
            order = next(iter(awaiting))
            if order.grace_deadline > now_ms:
                break
            out.extend(self._flush(order, order.via, now_ms))
        parked_q = self._parked_q
        while parked_q and parked_q[0][0] <= now_ms:
            _, st, parked = parked_q.popleft()
            if st.live and st.parked.get(parked.oid) is parked:
                del st.parked[parked.oid]
                self._n_parked -= 1
                self._evict("parked_statuses_ttl")
        done_q, done_at = self._done_q, self._done_at
        while done_at and done_at[0] + self._flushed_ttl_ms <= now_ms:
            order, at = done_q.popleft(), done_at.popleft()
            if self._done_live(order, at):
                self._forget(order)
                self._evict("flushed_orders_ttl")
        self._update_gauges()
        return out

    # ------------------------------------------------------------------------------------ positions

    def on_clearinghouse(
        self, address: str, data: AllDexsClearinghouseStateData | ClearinghouseStateData, now_ms: int
    ) -> None:
        addr = _norm(address)
        self.stats.position_frames += 1
        if isinstance(data, AllDexsClearinghouseStateData):
            self.positions.apply_all_dexs(addr, data.clearinghouse_states, now_ms)
        else:
            self.positions.apply_dex(addr, data.dex, data.clearinghouse_state, now_ms)

    def on_spot_state(self, address: str, data: SpotStateData, now_ms: int) -> None:
        self.stats.spot_frames += 1
        self.positions.apply_spot(_norm(address), data.spot_state.balances, now_ms)

    # ------------------------------------------------------------------------------------ queries

    def pending_oids(self, address: str) -> list[int]:
        """Oids with an unflushed aggregation (for REST `orderStatus` after a reconnect)."""
        st = self._addrs.get(_norm(address))
        if st is None:
            return []
        return sorted(oid for oid, order in st.orders.items() if not order.done)

    def unseen_fills(self, address: str, fills: Sequence[Fill]) -> int:
        """How many of `fills` `on_backfill` would process now: not yet seen and not older than the floor."""
        addr = _norm(address)
        st = self._addrs.get(addr)
        if addr not in self._watched or st is None or not st.seeded:
            return 0
        seen = st.seen
        return sum(1 for f in fills if f.time >= st.floor and fill_key(f) not in seen)

    def pending_orders(self, address: str) -> list[dict[str, object]]:
        """Unflushed aggregations of one address, oldest first, as JSON-able rows (address detail views)."""
        st = self._addrs.get(_norm(address))
        if st is None:
            return []
        rows: list[tuple[int, str, dict[str, object]]] = []
        for order in chain(st.orders.values(), st.twaps.values()):
            if order.done:
                continue
            for rec in order.records.values():
                row: dict[str, object] = {
                    "oid": None if order.twap else order.key,
                    "twap_id": order.key if order.twap else None,
                    "coin": rec.coin,
                    "dir": rec.dir,
                    "direction": rec.open_close,
                    "side": rec.side,
                    "size": rec.size,
                    "fill_count": len(rec.fills),
                    "first_fill_time": rec.first_fill_time,
                    "last_fill_time": rec.last_fill_time,
                    "status": order.status,
                    "signal_id": rec.signal_id,
                }
                rows.append((rec.first_fill_time, rec.signal_id, row))
        rows.sort(key=lambda item: item[:2])
        return [row for _, _, row in rows]

    def seed_time(self, address: str) -> int | None:
        """Newest fill time of the first snapshot that seeded the address (None: not seeded in this process)."""
        st = self._addrs.get(_norm(address))
        return None if st is None else st.seed_time

    def watermark(self, address: str) -> Watermark | None:
        st = self._addrs.get(_norm(address))
        if st is None or not (st.seeded or st.seen):
            return None
        return self._watermark_of(st)

    @staticmethod
    def _watermark_of(st: _Addr, *, with_seen: bool = True) -> Watermark:
        return Watermark(
            address=st.address,
            time=st.wm_time,
            tid=st.wm_tid,
            floor=st.floor,
            seeded=st.seeded,
            seen=list(st.seen.items()) if with_seen else [],
        )

    # ------------------------------------------------------------------------------------ persistence

    @staticmethod
    def _sync(rec: AggregationRecord, order: _Order) -> None:
        rec.status = order.status
        rec.status_time = order.status_time
        rec.status_via = order.via
        rec.terminal = order.terminal
        rec.expected_size = order.expected
        rec.order_filled = order.filled

    def _touch(self, order: _Order) -> None:
        if order.records:
            self._dirty[order] = None

    def take_dirty(self) -> StateDelta:
        """What changed since the last call: pending records to upsert, flushed records, watermarks."""
        upserted = []
        for order in self._dirty:
            for rec in order.records.values():
                self._sync(rec, order)
                upserted.append(rec)
        self._dirty = {}
        upserted.extend(self._held_new.values())
        self._held_new = {}
        closed, self._closed = self._closed, []
        # Persisted watermarks leave out the seen keys (up to max_seen_per_address each, rewritten on every
        # flush): `import_state` rebuilds them from the stored aggregation records, which hold every fill
        # that can make a signal; a replayed fill outside any record (dust, vault netting, a dropped late
        # fill) makes no signal again.
        watermarks = [self._watermark_of(st, with_seen=False) for st in self._dirty_addrs.values() if st.live]
        self._dirty_addrs = {}
        removed, self._removed = self._removed, []
        return StateDelta(upserted=upserted, closed=closed, watermarks=watermarks, removed_addresses=removed)

    def export_state(self) -> EngineState:
        """A full snapshot (pending records are live objects: encode it before the next engine call)."""
        state = EngineState()
        for st in self._addrs.values():
            for order in chain(st.orders.values(), st.twaps.values()):
                if order.done:
                    state.flushed.append(
                        FlushedOrder(
                            address=st.address,
                            oid=order.key,
                            twap=order.twap,
                            final=order.final,
                            status=order.status,
                            expected_size=order.expected,
                            order_filled=order.filled,
                            flushed_at=order.flushed_at,
                        )
                    )
                    continue
                for rec in order.records.values():
                    self._sync(rec, order)
                    state.aggregations.append(rec)
            state.parked.extend(st.parked.values())
            if st.seeded or st.seen:
                state.watermarks.append(self._watermark_of(st))
        state.aggregations.extend(held.record for held in self._held)  # still pending: emitted after a restart
        return state

    def import_state(self, state: EngineState) -> None:
        """Resume from persisted state (normally into a fresh engine, before any frame).

        Accepts flushed aggregation rows in `state.aggregations` as well as `state.flushed`: both tell the
        engine an order already produced its signal. Fills inside imported records count as seen even
        when the stored watermark is older than them (a crash between the two writes).
        """
        if state.version != STATE_VERSION:
            raise ValueError(f"engine state version {state.version} is not supported (expected {STATE_VERSION})")
        for wm in state.watermarks:
            self._import_watermark(wm)
        pending = sorted((r for r in state.aggregations if r.state == "pending"), key=attrgetter("last_activity_ms"))
        for rec in pending:
            self._import_pending(rec)
        flushed = [
            FlushedOrder(
                address=r.address,
                oid=r.oid,
                twap=r.twap_id is not None,
                final=r.final,
                status=r.status,
                expected_size=r.expected_size,
                order_filled=r.order_filled,
                flushed_at=r.flushed_at or 0,
            )
            for r in state.aggregations
            if r.state == "flushed"
        ]
        for rec in state.aggregations:
            if rec.state == "flushed":
                self._mark_seen(self._state(_norm(rec.address)), rec.fills)
        for done in sorted(chain(state.flushed, flushed), key=attrgetter("flushed_at")):
            self._import_flushed(done)
        for parked in sorted(state.parked, key=attrgetter("parked_at")):
            st = self._state(_norm(parked.address))
            if parked.oid not in st.orders:
                self._park(st, parked)
        for st in self._addrs.values():
            self._bound_seen(st)
        self._update_gauges()

    def _import_watermark(self, wm: Watermark) -> None:
        st = self._state(_norm(wm.address))
        if (wm.time, wm.tid) > (st.wm_time, st.wm_tid):
            st.wm_time, st.wm_tid = wm.time, wm.tid
        st.floor = max(st.floor, wm.floor)
        st.seeded = st.seeded or wm.seeded
        for key, t in sorted(wm.seen, key=lambda item: item[1]):
            if t >= st.floor:
                st.seen[key] = t

    def _mark_seen(self, st: _Addr, fills: Iterable[Fill]) -> None:
        for fill in fills:
            st.seen.setdefault(fill_key(fill), fill.time)
            if (fill.time, fill.tid) > (st.wm_time, st.wm_tid):
                st.wm_time, st.wm_tid = fill.time, fill.tid
            st.seeded = True

    def _import_pending(self, rec: AggregationRecord) -> None:
        st = self._state(_norm(rec.address))
        twap = rec.twap_id is not None
        container = st.twaps if twap else st.orders
        order = container.get(rec.oid)
        if order is None:
            order = container[rec.oid] = _Order(st, rec.oid, twap)
        order.records[rec.dir_code] = rec
        order.cont_tid = rec.continuation_tid
        if rec.terminal and not order.terminal:
            order.terminal = True
            order.status, order.status_time, order.via = rec.status, rec.status_time, rec.status_via
            order.expected = rec.expected_size
        elif not order.terminal and rec.status is not None:
            order.status, order.status_time = rec.status, rec.status_time
        order.filled = max(order.filled, rec.order_filled, rec.size)
        for fill in rec.fills:
            order.notional += fill.px * fill.sz
            order.notional_sz += fill.sz
        order.last_activity = max(order.last_activity, rec.last_activity_ms)
        self._activity[order] = None
        self._activity.move_to_end(order)
        if order.terminal:
            order.grace_deadline = order.last_activity + self._grace_ms
            self._awaiting[order] = None
        if twap:
            for fill in rec.fills:
                if fill.oid not in st.slices:
                    st.slices[fill.oid] = rec.oid
                    order.slice_oids += (fill.oid,)
        self._mark_seen(st, rec.fills)

    def _import_flushed(self, done: FlushedOrder) -> None:
        st = self._state(_norm(done.address))
        container = st.twaps if done.twap else st.orders
        order = container.get(done.oid)
        if order is not None:
            if not order.done or order.flushed_at >= done.flushed_at:
                return  # a pending continuation or a newer flush already describes this order
            order.final, order.flushed_at = done.final, done.flushed_at
            return
        order = container[done.oid] = _Order(st, done.oid, done.twap)
        order.done = True
        order.final = done.final
        order.status = done.status
        order.terminal = done.status is not None and is_terminal_status(done.status)
        order.expected = done.expected_size
        order.filled = done.order_filled
        order.flushed_at = done.flushed_at
        self._remember(order, done.flushed_at)

    # ------------------------------------------------------------------------------------ counters

    def _evict(self, kind: str) -> None:
        evictions = self.stats.evictions_by_kind
        evictions[kind] = evictions.get(kind, 0) + 1

    def _update_gauges(self) -> None:
        stats = self.stats
        stats.pending_orders = len(self._activity)
        stats.parked_statuses = self._n_parked
        stats.flushed_orders = self._n_done
        stats.watched_addresses = len(self._watched)
        stats.active_addresses = len(self._addrs)
        stats.held_signals = len(self._held)
