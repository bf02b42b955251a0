"""The wide tier's tracking: public trades of watched addresses in, one signal per tape block out (pure, no I/O).

A tape block is what one address did on one coin in one exchange block: its trades share `time`. Each
trade is turned into a fill the precise tier would have seen: side from `users` (`[buyer, seller]`),
`startPosition` from the position this tracker keeps, `dir` derived from that position exactly as the
exchange labels it (open, close, or a flip `Long > Short`), then split into legs by `fills.split_fill`
and folded by `aggregator.build_signal`, so size, VWAP, close ratio, position before/after and
`position_rate` follow the precise tier's rules. What the tape cannot know stays null: `oid`, `status`; `liquidation`
and `twap_id` are filled only for engine trades whose fills could be read in time (below).

`signal_id` = `{address}:tape:{coin}:{code}:{block_time}` where `code` is the leg's dir code
(`OL OS CL CS B S`): it refines the trade side (every code has one side) and keeps the two halves of
a flip apart. Two instances reading the same tape build the same ids. A block is complete when the
coin's tape moves to a later block, or `block_settle` after its last trade.

Positions (perps per coin on every dex, spot per token) are bootstrapped and reconciled from REST by
`feeds.wide`; trades seen before the bootstrap are buffered and replayed from the REST answer, so even
they get exact start positions. Each applied trade is remembered for a short while, so a REST answer can
be compared with the tracked position as it stood when the exchange answered. A difference is a drift:
the position is corrected and a signal with `source`/`trigger` `reconcile` and id
`{address}:recon:{coin}:{time}` (the open half of a flip: `…:{time}:open`) reports it; its price is the
position's mark price from the REST answer, else the last tape price of the coin, else 0.

Engine trades (`docs/protocol.md` §7): liquidations, ADL and TWAP slices reach the tape with an all-zero
`hash`, and the tape says nothing more about them. A block of a wide-owned address holding such a trade is
*parked*: its signals wait up to `label_wait_ms` (`wide.engine_label_wait`, set by the market tape; 0 turns
this off) for the address's own fills from the block's time on, which `take_label_requests` hands to the
wide manager (a REST read) and `apply_labels` brings back: matched by `tid`, a fill's `liquidation` block (or
its liquidation-family `dir`) and `twapId` label the signal as the precise tier would. The answer's fills are
kept (bounded) for blocks parked after it. Past the wait the signals
go out unlabelled (`tick`, counted `label_timeouts`). A label never changes `signal_id`. While an address has
parked signals its later blocks queue behind them, so one address's signals keep their order.

Ownership (tier handover, see `feeds.planner`): the tracker follows every watched address, but emits a
block only when the address is `wide`-owned and the block is newer than its `cut`; blocks of a
`precise`-owned address are held (bounded by count and age) so a handover can release exactly the
blocks the other tier did not cover.

Fills. With `collect_fills` on, every applied trade of a watched address also becomes one `FillRecord`
(`source` `market_tape`, the exchange's tid, the derived `dir` and start position, the running size and VWAP of
its tape block), handed out by `take_fills()`. They follow the blocks' ownership rule: recorded at once for a
wide-owned address (when newer than its cut), held for a precise-owned one and released or dropped with its
held blocks. A fill id is built from the exchange's tid exactly as the precise tier builds it, so a trade both
tiers report around a handover is stored once by JetStream.

Memory per address is bounded: positions (one entry per held coin), at most MAX_HISTORY applied trades
per position, MAX_BUFFERED trades before the bootstrap, MAX_HELD held signals, open blocks.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from itertools import islice
from typing import Final

import msgspec

from hl_monitor.domain.address import TrackedBy
from hl_monitor.domain.publication import FillRecord, fill_msg_id
from hl_monitor.domain.signal import LiquidationInfo, Signal, Source, Trigger
from hl_monitor.hyperliquid.protocol import ClearinghouseState, Fill, Side, SpotClearinghouseState, WsTrade
from hl_monitor.hyperliquid.symbols import SymbolInfo, SymbolMap
from hl_monitor.tracking.aggregator import build_signal, new_record
from hl_monitor.tracking.fills import LIQUIDATION_METHODS, Leg, split_fill
from hl_monitor.tracking.positions import STABLE_TOKENS, PositionBook
from hl_monitor.tracking.state import AggregationRecord

__all__ = [
    "MAX_BUFFERED",
    "MAX_HELD",
    "MAX_HISTORY",
    "MAX_PARKED",
    "LabelRequest",
    "RestPositions",
    "TapeStats",
    "TapeTracker",
    "is_engine_trade",
    "perp_dir",
    "recon_signal_id",
    "rest_positions",
    "tape_signal_id",
]

# Trades of one address seen before its REST bootstrap; a whale trading hundreds of times in the few
# seconds a bootstrap takes is rare, and beyond this the oldest are dropped (counted; positions stay exact).
MAX_BUFFERED: Final = 256
# Applied trades remembered per position for reconcile arithmetic: a reconcile needs the trades of the
# last few seconds only; an address trading faster than this on one coin skips that coin's reconcile.
MAX_HISTORY: Final = 128
# How long an applied trade is remembered (ms): the REST round trip plus `reconcile_settle` with room.
HISTORY_MS: Final = 120_000
# Held signals per precise-owned address (its tape blocks, released if it moves back to wide).
MAX_HELD: Final = 256
# Fill records held per precise-owned address (several per held block: one per trade).
MAX_HELD_FILLS: Final = 1024
# Flushed block keys remembered per address, so a late trade of a flushed block gets a continuation id.
MAX_FLUSHED_KEYS: Final = 64
# Signal batches parked per address waiting for an engine-trade label; a longer queue means the labels are not
# coming (no reader), so the oldest batch goes out unlabelled rather than holding memory.
MAX_PARKED: Final = 64
# Fills of label answers kept per address: a read covers every fill up to when it was sent, so a burst's later
# engine blocks (TWAP slices, a cascade) usually find their fills here without a read of their own.
MAX_LABEL_FILLS: Final = 256
_ZERO: Final = Decimal(0)
_NO_HASH: Final = "0x" + "0" * 64


def is_engine_trade(trade: WsTrade) -> bool:
    """An all-zero `hash`: the exchange's engine executed it (liquidation, ADL, TWAP slice; docs/protocol.md §7)."""
    h = trade.hash
    return len(h) > 2 and h.startswith("0x") and not h[2:].strip("0")


def tape_signal_id(address: str, coin: str, code: str, block_time: int, continuation_tid: int | None = None) -> str:
    base = f"{address}:tape:{coin}:{code}:{block_time}"
    return base if continuation_tid is None else f"{base}:c{continuation_tid}"


def recon_signal_id(address: str, coin: str, time: int, *, second_half: bool = False) -> str:
    base = f"{address}:recon:{coin}:{time}"
    return f"{base}:open" if second_half else base


def perp_dir(start: Decimal, buy: bool, sz: Decimal) -> str:
    """The exchange's `dir` label of a perp fill from the position before it."""
    if start == 0 or (start > 0) == buy:
        return "Open Long" if buy else "Open Short"
    if sz <= abs(start):
        return "Close Long" if start > 0 else "Close Short"
    return "Long > Short" if start > 0 else "Short > Long"


class RestPositions(msgspec.Struct, kw_only=True):
    """One REST read of an address: perps of the dexes in `dexes` (coin → szi), spot (token → total) or None.

    `window` is `(sent_ms, received_ms)` on the local wall clock widened by the caller's margin: trades
    inside it may or may not be in the answer, so positions they touched are not compared this round.
    """

    perp: dict[str, Decimal]
    dexes: frozenset[str]
    spot: dict[str, Decimal] | None
    account_value: Decimal | None
    spot_usd: Decimal | None
    marks: dict[str, Decimal] = msgspec.field(default_factory=dict)
    window: tuple[int, int]
    state_time: int


def rest_positions(
    states: Sequence[tuple[str, ClearinghouseState]],
    spot: SpotClearinghouseState | None,
    *,
    window: tuple[int, int],
    now_ms: int,
) -> RestPositions:
    """What one REST read says, in the tracker's terms (account value and spot USD as `PositionBook` values them)."""
    book = PositionBook()
    book.apply_all_dexs("", states, now_ms)
    perp: dict[str, Decimal] = {}
    marks: dict[str, Decimal] = {}
    for _, state in states:
        for ap in state.asset_positions:
            pos = ap.position
            if pos.szi:
                perp[pos.coin] = pos.szi
                if pos.position_value:
                    marks[pos.coin] = pos.position_value / abs(pos.szi)
    spot_map: dict[str, Decimal] | None = None
    if spot is not None:
        book.apply_spot("", spot.balances, now_ms)
        spot_map = {b.coin: b.total for b in spot.balances if b.total}
    times = [state.time for _, state in states if state.time]
    return RestPositions(
        perp=perp,
        dexes=frozenset(dex for dex, _ in states),
        spot=spot_map,
        account_value=book.account_value(""),
        spot_usd=book.spot_total_usd(""),
        marks=marks,
        window=window,
        state_time=max(times) if times else window[1],
    )


class LabelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Read `address`'s fills from `start_ms` (exchange time, a block's time) on, before `deadline_ms` (wall)."""

    address: str
    start_ms: int
    deadline_ms: int
    dexes: frozenset[str] = frozenset({""})  # REST fills are per perp dex (docs/protocol.md §4)


class TapeStats(msgspec.Struct, kw_only=True):
    trades_matched: int = 0
    buffered: int = 0
    buffer_dropped: int = 0
    blocks: int = 0
    signals_emitted: int = 0
    signals_held: int = 0
    held_dropped: int = 0
    signals_suppressed: int = 0  # covered by the precise tier (at or before the cut)
    late_trades: int = 0  # a trade of an already flushed block (continuation id)
    bootstraps: int = 0
    reconciles: int = 0
    reconcile_skipped: int = 0  # positions not compared: ambiguous window or history too short
    drifts_perp: int = 0
    drifts_spot: int = 0
    unwatched: int = 0
    label_waits: int = 0  # signals with engine trades parked for a label
    labelled_liquidation: int = 0
    labelled_twap: int = 0
    label_none: int = 0  # the fills came back without a label (an ordinary fill against the engine)
    label_timeouts: int = 0  # released unlabelled: the fills were not read within the wait


class _Block:
    __slots__ = ("backfilled", "coin", "engine_tids", "filled", "last_arrival", "notional", "owner", "records", "time")

    def __init__(self, owner: _Wide, coin: str, time: int, now: int) -> None:
        self.owner = owner
        self.coin = coin
        self.time = time
        self.last_arrival = now
        self.records: dict[str, AggregationRecord] = {}
        self.backfilled = False
        self.filled = _ZERO  # the address's traded size in this block so far (running totals of its fills)
        self.notional = _ZERO
        self.engine_tids: set[int] = set()


class _Parked:
    """Signals of one flushed block held back for an engine-trade label (or queued behind such a batch)."""

    __slots__ = ("deadline", "needs", "resolved", "signals", "time")

    def __init__(self, signals: list[Signal], needs: dict[str, frozenset[int]], time: int, deadline: int) -> None:
        self.signals = signals
        self.needs = needs  # signal_id → tids of its engine trades
        self.time = time
        self.deadline = deadline
        self.resolved = not needs


class _Wide:
    """Tracking state of one watched address."""

    __slots__ = (
        "account_value",
        "address",
        "blocks",
        "bootstrapped",
        "buffer",
        "cut",
        "flushed",
        "held",
        "held_fills",
        "history",
        "label",
        "label_fills",
        "marks",
        "owner",
        "parked",
        "perp",
        "spot",
        "spot_usd",
    )

    def __init__(self, address: str, label: str | None) -> None:
        self.address = address
        self.label = label
        self.owner: TrackedBy = "wide"
        self.cut = -1  # wide emits blocks strictly newer than this (the precise tier covered the rest)
        self.bootstrapped = False
        self.perp: dict[str, Decimal] = {}
        self.spot: dict[str, Decimal] = {}
        self.account_value: Decimal | None = None
        self.spot_usd: Decimal | None = None
        self.marks: dict[str, Decimal] = {}
        self.history: dict[str, deque[tuple[int, Decimal]]] = {}  # position key → (trade time, delta)
        self.buffer: deque[tuple[str, WsTrade, Side, bool]] = deque(maxlen=MAX_BUFFERED)
        self.blocks: dict[tuple[str, int], _Block] = {}
        self.flushed: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.held: deque[Signal] = deque(maxlen=MAX_HELD)
        self.held_fills: deque[FillRecord] = deque(maxlen=MAX_HELD_FILLS)
        self.parked: deque[_Parked] = deque()
        self.label_fills: OrderedDict[int, Fill] | None = None  # tid → fill, from label answers


class SizeWalk:
    """A deep-size walk of one address's state that can stop after a budget of objects and resume later, so a
    periodic memory gauge costs each loop step a bounded share (docs/architecture.md §10). The state may change
    between two steps of the walk: the total is an estimate, as the gauge is."""

    def __init__(self, root: object, skip: Iterable[object] = ()) -> None:
        self._stack: list[object] = [root]
        self._seen: set[int] = {id(obj) for obj in skip}
        self.size = 0

    @property
    def done(self) -> bool:
        return not self._stack

    def step(self, budget: int) -> bool:
        """Visit up to `budget` objects; True once the walk is complete."""
        stack, seen = self._stack, self._seen
        while stack and budget > 0:
            obj = stack.pop()
            budget -= 1
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            self.size += sys.getsizeof(obj)
            if isinstance(obj, dict):
                stack.extend(obj.keys())
                stack.extend(obj.values())
            elif isinstance(obj, list | tuple | deque | set | frozenset):
                stack.extend(obj)
            elif isinstance(obj, msgspec.Struct):
                stack.extend(getattr(obj, f) for f in obj.__struct_fields__)
            elif hasattr(obj, "__slots__") and not isinstance(obj, str | bytes | int | Decimal):
                stack.extend(getattr(obj, s, None) for s in obj.__slots__)
        return not stack


class TapeTracker:
    """Pure state machine of the wide tier; see the module docstring. `now_ms` is the caller's wall clock."""

    def __init__(
        self,
        symbols: SymbolMap,
        *,
        block_settle_ms: int,
        hold_ms: int,
        instance_id: str | None = None,
        collect_fills: bool = False,
        label_wait_ms: int = 0,
    ) -> None:
        self._symbols = symbols
        # Record every applied trade of a watched address for `take_fills` (off: nothing is kept).
        self.collect_fills = collect_fills
        self._fills: list[FillRecord] = []
        self._settle_ms = block_settle_ms
        self._hold_ms = hold_ms
        self._label_wait_ms = label_wait_ms
        self._requests: list[LabelRequest] = []
        self._parked: dict[str, None] = {}  # addresses with parked signals
        # Addresses with held signals or fills: the tick ages only these, not every watched address.
        self._holding: dict[str, None] = {}
        self._instance_id = instance_id
        self.stats = TapeStats()
        # address → state; the tape matches `users` against this dict (one lookup per side of a trade).
        self._watched: dict[str, _Wide] = {}
        self._open: OrderedDict[_Block, None] = OrderedDict()  # by last arrival, oldest first
        self._open_by_coin: dict[str, dict[_Block, None]] = {}
        self._last_px: dict[str, Decimal] = {}

    # ------------------------------------------------------------------------------------ addresses

    def set_symbols(self, symbols: SymbolMap) -> None:
        self._symbols = symbols

    def set_label_wait(self, wait_ms: int) -> None:
        """How long a block with engine trades waits for its label (0: not at all, nothing is read)."""
        self._label_wait_ms = max(0, wait_ms)

    def add_address(self, address: str, label: str | None = None) -> None:
        """Track an address (or relabel it); new addresses start wide-owned and un-bootstrapped."""
        st = self._watched.get(address)
        if st is None:
            self._watched[address] = _Wide(address, label)
        else:
            st.label = label

    def remove_address(self, address: str, now_ms: int) -> list[Signal]:
        """Stop tracking: open blocks are flushed (emitted if the address is wide-owned), state is dropped."""
        st = self._watched.get(address)
        if st is None:
            return []
        out: list[Signal] = []
        for block in list(st.blocks.values()):
            out.extend(self._flush(block, now_ms))
        out.extend(self._release(st, now_ms, everything=True))
        del self._watched[address]
        return out

    def is_watched(self, address: str) -> bool:
        return address in self._watched

    def addresses(self) -> list[str]:
        return list(self._watched)

    def __len__(self) -> int:
        return len(self._watched)

    def is_bootstrapped(self, address: str) -> bool:
        st = self._watched.get(address)
        return st is not None and st.bootstrapped

    def owner(self, address: str) -> TrackedBy | None:
        st = self._watched.get(address)
        return None if st is None else st.owner

    def position(self, address: str, coin: str) -> Decimal | None:
        """Tracked perp size of `coin`, or spot balance of a token; None before the bootstrap."""
        st = self._watched.get(address)
        if st is None or not st.bootstrapped:
            return None
        if coin in st.perp:
            return st.perp[coin]
        return st.spot.get(coin, _ZERO)

    def positions(self, address: str) -> tuple[dict[str, Decimal], dict[str, Decimal]] | None:
        st = self._watched.get(address)
        if st is None or not st.bootstrapped:
            return None
        return dict(st.perp), dict(st.spot)

    def coins_of_interest(self) -> set[str]:
        """Perp coins and spot pairs watched addresses hold (the ones worth a backfill after a tape gap)."""
        out: set[str] = set()
        for st in self._watched.values():
            out.update(st.perp)
            for token in st.spot:
                pair = self._symbols.stable_pair(token)
                if pair is not None:
                    out.add(pair)
        return out

    # ------------------------------------------------------------------------------------ ownership

    def set_owner(self, address: str, owner: TrackedBy, now_ms: int, *, cut: int | None = None) -> list[Signal]:
        """Hand an address between tiers.

        `precise`: from now on its blocks are held, not emitted. `wide`: blocks newer than `cut` (the last
        fill time the precise tier processed; None keeps the current cut) are emitted, held ones included.
        """
        st = self._watched.get(address)
        if st is None:
            return []
        if owner == "precise":
            st.owner = "precise"
            return []
        if cut is not None:
            st.cut = cut
        st.owner = "wide"
        self._fills.extend(f for f in st.held_fills if f.time > st.cut)
        st.held_fills.clear()
        out = [s for s in st.held if s.timestamp > st.cut]
        self.stats.signals_suppressed += len(st.held) - len(out)
        st.held.clear()
        self.stats.signals_emitted += len(out)
        return out

    def release_held(self, address: str, upto: int) -> list[Signal]:
        """The precise tier took over with every fill at or before `upto` already behind it: emit those blocks."""
        st = self._watched.get(address)
        if st is None:
            return []
        if st.held_fills:
            self._fills.extend(f for f in st.held_fills if f.time <= upto)
            st.held_fills = deque((f for f in st.held_fills if f.time > upto), maxlen=MAX_HELD_FILLS)
        out = [s for s in st.held if s.timestamp <= upto]
        if out:
            st.held = deque((s for s in st.held if s.timestamp > upto), maxlen=MAX_HELD)
            self.stats.signals_emitted += len(out)
        return out

    # ------------------------------------------------------------------------------------ trades

    def on_trades(self, coin: str, trades: Sequence[WsTrade], now_ms: int, *, backfilled: bool = False) -> list[Signal]:
        """One deduplicated `trades` frame of `coin` (every trade of the frame, watched or not)."""
        out: list[Signal] = []
        watched = self._watched
        newest = 0
        for trade in trades:
            if trade.time > newest:
                newest = trade.time
            users = trade.users
            if users is None:
                continue
            buyer = watched.get(users[0])
            seller = watched.get(users[1])
            if buyer is None and seller is None:
                continue
            if buyer is not None:
                self._on_fill(buyer, coin, trade, "B", now_ms, backfilled, out)
            if seller is not None:
                self._on_fill(seller, coin, trade, "A", now_ms, backfilled, out)
        if trades:
            self._last_px[coin] = trades[-1].px
        pending = self._open_by_coin.get(coin)
        if pending:
            # The coin's tape moved to a later block: earlier blocks of this coin are complete.
            for block in [b for b in pending if b.time < newest]:
                out.extend(self._flush(block, now_ms))
        return out

    def _on_fill(
        self, st: _Wide, coin: str, trade: WsTrade, side: Side, now: int, backfilled: bool, out: list[Signal]
    ) -> None:
        self.stats.trades_matched += 1
        if not st.bootstrapped:
            if len(st.buffer) == MAX_BUFFERED:
                self.stats.buffer_dropped += 1
            st.buffer.append((coin, trade, side, backfilled))
            self.stats.buffered += 1
            return
        self._apply(st, coin, trade, side, now, backfilled, out)

    def _apply(
        self, st: _Wide, coin: str, trade: WsTrade, side: Side, now: int, backfilled: bool, out: list[Signal]
    ) -> None:
        info = self._symbols.lookup(coin)
        spot = info.asset_type == "spot"
        book = st.spot if spot else st.perp
        key = info.token if spot else coin
        start = book.get(key, _ZERO)
        buy = side == "B"
        sz = trade.sz
        if spot:
            dir_ = "Buy" if buy else "Sell"
            after = start + sz if buy else max(_ZERO, start - sz)
        else:
            dir_ = perp_dir(start, buy, sz)
            after = start + sz if buy else start - sz
        if after:
            book[key] = after
        else:
            book.pop(key, None)
        self._remember(st, key if not spot else f"spot:{key}", trade.time, after - start, now)
        fill = Fill(
            coin=coin,
            px=trade.px,
            sz=sz,
            side=side,
            time=trade.time,
            start_position=start,
            dir=dir_,
            closed_pnl=_ZERO,
            hash=trade.hash or _NO_HASH,
            oid=0,
            crossed=trade.side == side,
            fee=_ZERO,
            tid=trade.tid,
        )
        parts = split_fill(fill)
        assert parts is not None  # derived dirs are always in the table
        block_key = (coin, trade.time)
        block = st.blocks.get(block_key)
        if block is None:
            block = st.blocks[block_key] = _Block(st, coin, trade.time, now)
            self._open_by_coin.setdefault(coin, {})[block] = None
        else:
            block.last_arrival = now
        self._open[block] = None
        self._open.move_to_end(block)
        late = block_key in st.flushed
        if late:
            self.stats.late_trades += 1
        block.backfilled = block.backfilled or backfilled
        if is_engine_trade(trade):
            block.engine_tids.add(trade.tid)
        for leg, part in parts:
            self._add(block, leg, part, now, continuation_tid=trade.tid if late else None)
        block.filled += sz
        block.notional += trade.px * sz
        if self.collect_fills:
            self._record_fill(st, block, fill, info, now, backfilled)

    def _record_fill(self, st: _Wide, block: _Block, fill: Fill, info: SymbolInfo, now: int, backfilled: bool) -> None:
        record = FillRecord(
            fill_id=fill_msg_id(st.address, fill.coin, fill.tid, 0, fill.time),
            address=st.address,
            source="market_tape",
            coin=fill.coin,
            symbol=info.symbol,
            asset_type=info.asset_type,
            oid=None,
            tid=fill.tid,
            side=fill.side,
            px=fill.px,
            sz=fill.sz,
            dir=fill.dir,
            start_position=fill.start_position,
            time=fill.time,
            crossed=fill.crossed,
            hash=fill.hash,
            backfilled=backfilled,
            order_filled_size=block.filled,
            order_vwap=block.notional / block.filled if block.filled else None,
            label=st.label,
            detected_at=now,
        )
        if st.owner == "precise":
            st.held_fills.append(record)
            self._holding[st.address] = None
        elif fill.time > st.cut:
            self._fills.append(record)

    def take_fills(self) -> list[FillRecord]:
        """Fill records of wide-owned addresses since the last call, in processing order (empty unless
        `collect_fills`); a handover (`set_owner`, `release_held`) adds the held ones it releases."""
        fills, self._fills = self._fills, []
        return fills

    def _add(self, block: _Block, leg: Leg, fill: Fill, now: int, continuation_tid: int | None) -> None:
        rec = block.records.get(leg.code)
        if rec is None:
            address = block.owner.address
            rec = block.records[leg.code] = new_record(
                address, key=0, twap=False, continuation_tid=None, leg=leg, fill=fill, now_ms=now
            )
            rec.signal_id = tape_signal_id(address, block.coin, leg.code, block.time, continuation_tid)
        rec.fills.append(fill)
        rec.size += fill.sz
        rec.last_activity_ms = now

    def _remember(self, st: _Wide, key: str, time: int, delta: Decimal, now: int) -> None:
        history = st.history.get(key)
        if history is None:
            history = st.history[key] = deque(maxlen=MAX_HISTORY)
        history.append((time, delta))
        horizon = now - HISTORY_MS
        while history and history[0][0] < horizon and len(history) > 1:
            history.popleft()

    # ------------------------------------------------------------------------------------ flush

    def _flush(self, block: _Block, now: int) -> list[Signal]:
        st = block.owner
        st.blocks.pop((block.coin, block.time), None)
        self._open.pop(block, None)
        by_coin = self._open_by_coin.get(block.coin)
        if by_coin is not None:
            by_coin.pop(block, None)
            if not by_coin:
                del self._open_by_coin[block.coin]
        st.flushed[(block.coin, block.time)] = None
        while len(st.flushed) > MAX_FLUSHED_KEYS:
            st.flushed.popitem(last=False)
        if st.address not in self._watched:
            return []
        self.stats.blocks += 1
        records = sorted(block.records.values(), key=lambda r: r.open_close != "close")
        signals = [
            self._signal(st, rec, trigger="tape_block", source="market_tape", now=now, backfilled=block.backfilled)
            for rec in records
        ]
        out = self._route(st, signals, now)
        if not out or self._label_wait_ms <= 0 or not (block.engine_tids or st.parked):
            return out
        needs: dict[str, frozenset[int]] = {}
        if block.engine_tids:
            for rec in records:
                tids = frozenset(f.tid for f in rec.fills if f.tid in block.engine_tids)
                if tids:
                    needs[rec.signal_id] = tids
        return self._park(st, out, needs, block.time, now)

    # ------------------------------------------------------------------------------------ engine labels

    def _park(
        self, st: _Wide, signals: list[Signal], needs: dict[str, frozenset[int]], time: int, now: int
    ) -> list[Signal]:
        needs = {sid: tids for sid, tids in needs.items() if any(s.signal_id == sid for s in signals)}
        batch = _Parked(signals, needs, time, now + self._label_wait_ms)
        if needs:
            self.stats.label_waits += len(needs)
            if not self._settle(st, batch):
                dexes = frozenset(_dex_of(s.coin) for s in signals if s.signal_id in needs)
                self._requests.append(
                    LabelRequest(address=st.address, start_ms=time, deadline_ms=batch.deadline, dexes=dexes)
                )
        st.parked.append(batch)
        self._parked[st.address] = None
        out: list[Signal] = []
        while len(st.parked) > MAX_PARKED:
            out.extend(self._pop_parked(st))
        out.extend(self._release(st, now))
        return out

    def _pop_parked(self, st: _Wide) -> list[Signal]:
        batch = st.parked.popleft()
        if not batch.resolved:
            self.stats.label_timeouts += len(batch.needs)
        if not st.parked:
            self._parked.pop(st.address, None)
        return batch.signals

    def _release(self, st: _Wide, now: int, *, everything: bool = False) -> list[Signal]:
        """Parked signals that may go: from the front, while labelled (or not waiting) or past the wait."""
        out: list[Signal] = []
        parked = st.parked
        while parked and (everything or parked[0].resolved or parked[0].deadline <= now):
            out.extend(self._pop_parked(st))
        return out

    def take_label_requests(self) -> list[LabelRequest]:
        """Fills to read for parked signals since the last call (the wide manager reads them over REST)."""
        out, self._requests = self._requests, []
        return out

    def waiting_labels(self) -> int:
        """Signals parked for a label or queued behind one."""
        return sum(len(b.signals) for a in self._parked for b in self._watched[a].parked)

    def apply_labels(self, address: str, fills: Sequence[Fill], now_ms: int) -> list[Signal]:
        """A read of the address's recent fills: label the parked blocks whose engine trades it holds, release.

        Each signal takes the liquidation block and TWAP id of the fills whose `tid` it holds; a block whose
        fills are not in the answer keeps waiting (until its wait ends) in case a later read finds them. The
        fills are kept for blocks parked later (at most MAX_LABEL_FILLS per address).
        """
        st = self._watched.get(address)
        if st is None:
            return []
        kept = st.label_fills
        if kept is None:
            kept = st.label_fills = OrderedDict()
        for fill in fills:
            kept[fill.tid] = fill
            kept.move_to_end(fill.tid)
        while len(kept) > MAX_LABEL_FILLS:
            kept.popitem(last=False)
        for batch in st.parked:
            if not batch.resolved:
                self._settle(st, batch)
        return self._release(st, now_ms)

    def _settle(self, st: _Wide, batch: _Parked) -> bool:
        """Label `batch` from the fills at hand if they hold every engine trade of it."""
        kept = st.label_fills
        if not kept or any(tid not in kept for tids in batch.needs.values() for tid in tids):
            return False
        batch.signals = [self._labelled(s, batch.needs.get(s.signal_id), kept) for s in batch.signals]
        batch.resolved = True
        return True

    def _labelled(self, signal: Signal, tids: frozenset[int] | None, fills: Mapping[int, Fill]) -> Signal:
        if not tids:
            return signal
        liquidation: LiquidationInfo | None = None
        twap_id: int | None = None
        for tid in sorted(tids):
            fill = fills[tid]
            if liquidation is None:
                liquidation = _liquidation_of(fill)
            if twap_id is None:
                twap_id = fill.twap_id
        if liquidation is None and twap_id is None:
            self.stats.label_none += 1
            return signal
        if liquidation is not None:
            self.stats.labelled_liquidation += 1
        if twap_id is not None:
            self.stats.labelled_twap += 1
        return msgspec.structs.replace(signal, liquidation=liquidation, twap_id=twap_id)

    def release_waiting(self) -> list[Signal]:
        """Every parked signal, labelled or not (shutdown: nothing more will be read)."""
        out: list[Signal] = []
        for address in list(self._parked):
            out.extend(self._release(self._watched[address], 0, everything=True))
        return out

    def _route(self, st: _Wide, signals: list[Signal], now: int) -> list[Signal]:
        if st.owner == "precise":
            for signal in signals:
                if len(st.held) == MAX_HELD:
                    self.stats.held_dropped += 1
                st.held.append(signal)
            self.stats.signals_held += len(signals)
            if signals:
                self._holding[st.address] = None
            return []
        out = [s for s in signals if s.timestamp > st.cut]
        self.stats.signals_suppressed += len(signals) - len(out)
        self.stats.signals_emitted += len(out)
        return out

    def _signal(
        self,
        st: _Wide,
        rec: AggregationRecord,
        *,
        trigger: Trigger,
        source: Source,
        now: int,
        backfilled: bool = False,
        fill_count: int | None = None,
    ) -> Signal:
        if backfilled:
            rec.backfilled = True
            rec.lateness_ms = now - max(f.time for f in rec.fills)
        balance = st.spot_usd if rec.asset_type == "spot" else st.account_value
        signal = build_signal(
            rec,
            trigger=trigger,
            status=None,
            symbols=self._symbols,
            balance=balance,
            label=st.label,
            now_ms=now,
            instance_id=self._instance_id,
        )
        if fill_count is None:
            return msgspec.structs.replace(signal, oid=None, source=source)
        return msgspec.structs.replace(signal, oid=None, source=source, fill_count=fill_count)

    def tick(self, now_ms: int) -> list[Signal]:
        """Flush blocks quiet for `block_settle`; drop held signals older than the hold."""
        out: list[Signal] = []
        open_ = self._open
        while open_:
            block = next(iter(open_))
            if block.last_arrival + self._settle_ms > now_ms:
                break
            out.extend(self._flush(block, now_ms))
        for address in list(self._parked):
            out.extend(self._release(self._watched[address], now_ms))
        horizon = now_ms - self._hold_ms
        for address in list(self._holding):
            found = self._watched.get(address)
            if found is None or not (found.held or found.held_fills):
                del self._holding[address]  # removed, or released / aged out to empty
                continue
            held = found.held
            while held and held[0].detected_at < horizon:
                held.popleft()
                self.stats.held_dropped += 1
            held_fills = found.held_fills
            while held_fills and held_fills[0].detected_at < horizon:
                held_fills.popleft()
        return out

    def open_blocks(self) -> int:
        return len(self._open)

    # ------------------------------------------------------------------------------------ REST

    def apply_read(
        self,
        address: str,
        states: Sequence[tuple[str, ClearinghouseState]],
        spot: SpotClearinghouseState | None,
        *,
        window: tuple[int, int],
        now_ms: int,
    ) -> list[Signal]:
        """`apply_rest` for a REST answer as the wide tier read it (`feeds.wide`)."""
        return self.apply_rest(address, rest_positions(states, spot, window=window, now_ms=now_ms), now_ms)

    def apply_rest(self, address: str, rest: RestPositions, now_ms: int) -> list[Signal]:
        """A REST read: bootstraps an un-bootstrapped address, otherwise reconciles it (drift → signals)."""
        st = self._watched.get(address)
        if st is None:
            self.stats.unwatched += 1
            return []
        if rest.account_value is not None:
            st.account_value = rest.account_value
        if rest.spot_usd is not None:
            st.spot_usd = rest.spot_usd
        st.marks.update(rest.marks)
        if not st.bootstrapped:
            return self._bootstrap(st, rest, now_ms)
        return self._reconcile(st, rest, now_ms)

    def _bootstrap(self, st: _Wide, rest: RestPositions, now: int) -> list[Signal]:
        lo, hi = rest.window
        if any(lo <= trade.time <= hi for _, trade, _, _ in st.buffer):
            self.stats.reconcile_skipped += 1  # cannot tell whether those trades are in the answer: read again
            return []
        perp = {c: v for c, v in rest.perp.items() if v}
        spot = {t: v for t, v in (rest.spot or {}).items() if v}
        buffered = sorted(st.buffer, key=lambda item: (item[1].time, item[1].tid))
        # Trades before the answer are in it: wind them back to get the position before the first one.
        for coin, trade, side, _ in buffered:
            if trade.time >= lo:
                continue
            info = self._symbols.lookup(coin)
            book, key = (spot, info.token) if info.asset_type == "spot" else (perp, coin)
            book[key] = book.get(key, _ZERO) - (trade.sz if side == "B" else -trade.sz)
        st.perp = {c: v for c, v in perp.items() if v}
        st.spot = {t: v for t, v in spot.items() if v}
        st.buffer.clear()
        st.bootstrapped = True
        self.stats.bootstraps += 1
        out: list[Signal] = []
        for coin, trade, side, backfilled in buffered:
            self._apply(st, coin, trade, side, now, backfilled, out)
        return out

    def _reconcile(self, st: _Wide, rest: RestPositions, now: int) -> list[Signal]:
        self.stats.reconciles += 1
        lo, hi = rest.window
        out: list[Signal] = []
        keys: set[tuple[bool, str]] = set()
        for coin in (*st.perp, *rest.perp):
            if _dex(coin) in rest.dexes:
                keys.add((False, coin))
        if rest.spot is not None:
            # Stablecoins are the cash side of every spot trade, which the tape does not follow: not positions.
            keys.update((True, token) for token in (*st.spot, *rest.spot) if token not in STABLE_TOKENS)
        for spot, key in sorted(keys):
            book = st.spot if spot else st.perp
            history = st.history.get(f"spot:{key}" if spot else key, ())
            if history and (len(history) == MAX_HISTORY and history[0][0] >= lo):
                self.stats.reconcile_skipped += 1  # trades older than the window fell out of the history
                continue
            if any(lo <= t <= hi for t, _ in history):
                self.stats.reconcile_skipped += 1  # a trade the answer may or may not include
                continue
            tracked = book.get(key, _ZERO)
            later = sum((d for t, d in history if t > hi), _ZERO)
            expected = tracked - later
            actual = (rest.spot or {}).get(key, _ZERO) if spot else rest.perp.get(key, _ZERO)
            if actual == expected:
                continue
            if spot:
                self.stats.drifts_spot += 1
            else:
                self.stats.drifts_perp += 1
            corrected = actual + later
            if corrected:
                book[key] = corrected
            else:
                book.pop(key, None)
            if st.owner == "wide":  # a precise-owned address's changes are the precise tier's to report
                out.extend(self._drift_signals(st, spot, key, expected, actual, rest.state_time, now))
        return out

    def _drift_signals(
        self, st: _Wide, spot: bool, key: str, before: Decimal, after: Decimal, time: int, now: int
    ) -> list[Signal]:
        coin = (self._symbols.stable_pair(key) or key) if spot else key
        buy = after > before
        sz = abs(after - before)
        px = st.marks.get(coin) or self._last_px.get(coin) or _ZERO
        fill = Fill(
            coin=coin,
            px=px,
            sz=sz,
            side="B" if buy else "A",
            time=time,
            start_position=before,
            dir=("Buy" if buy else "Sell") if spot else perp_dir(before, buy, sz),
            closed_pnl=_ZERO,
            hash=_NO_HASH,
            oid=0,
            crossed=False,
            fee=_ZERO,
            tid=0,
        )
        parts = split_fill(fill)
        assert parts is not None
        signals: list[Signal] = []
        for index, (leg, part) in enumerate(parts):
            rec = new_record(st.address, key=0, twap=False, continuation_tid=None, leg=leg, fill=part, now_ms=now)
            rec.signal_id = recon_signal_id(st.address, coin, time, second_half=index > 0)
            rec.fills.append(part)
            rec.size = part.sz
            signals.append(self._signal(st, rec, trigger="reconcile", source="reconcile", now=now, fill_count=0))
        return self._route(st, signals, now)

    # ------------------------------------------------------------------------------------ memory

    def memory_bytes(self, addresses: Iterable[str] | None = None) -> list[int]:
        """Approximate bytes of tracking state per address (all, or the given ones)."""
        chosen = self._watched if addresses is None else {a: self._watched[a] for a in addresses if a in self._watched}
        sizes = []
        for address in chosen:
            walk = self.size_walk(address)
            assert walk is not None
            walk.step(sys.maxsize)
            sizes.append(walk.size)
        return sizes

    def size_walk(self, address: str) -> SizeWalk | None:
        """A resumable `memory_bytes` walk of one address's state (None: not watched)."""
        st = self._watched.get(address)
        if st is None:
            return None
        return SizeWalk(st, skip=(st.label, st.address))

    def sample_addresses(self, n: int) -> list[str]:
        """The first `n` watched addresses (without copying all of them)."""
        return list(islice(self._watched, n))


def _liquidation_of(fill: Fill) -> LiquidationInfo | None:
    """As the precise tier reads a fill (`tracking.aggregator`): its liquidation block, else its liquidation `dir`."""
    block = fill.liquidation
    if block is not None:
        return LiquidationInfo(mark_px=block.mark_px, method=block.method, liquidated_user=block.liquidated_user)
    if fill.dir in LIQUIDATION_METHODS:
        return LiquidationInfo(mark_px=None, method=LIQUIDATION_METHODS[fill.dir])
    return None


def _dex(coin: str) -> str:
    return coin.split(":", 1)[0] if ":" in coin else ""


def _dex_of(coin: str) -> str:
    """The perp dex of a coin: `xyz:XYZ100` is on `xyz`, a coin without a prefix on the first dex (`""`)."""
    return coin.split(":", 1)[0] if ":" in coin else ""
