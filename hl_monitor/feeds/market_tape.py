"""The market tape: `trades` of every coin on a few shared connections, deduplicated, fed to the tape tracker.

Coverage. Every perp of every dex (delisted ones excluded) and every spot pair is a candidate, one
`trades` subscription each. At most `wide.subscription_budget` (default 900 of the per-IP 1000, leaving
room for precise users) are subscribed, and never more than the shared subscription budget grants; when
there are more coins, the busiest by 24 h notional volume (`metaAndAssetCtxs` per dex and
`spotMetaAndAssetCtxs`: perps and spot pairs on one scale) are covered and the rest are reported
(`/status`, `tape_uncovered_coins`). Positions on uncovered coins still change through the wide tier's
REST reconcile. The coin list and volumes are re-read every `wide.universe_refresh`; a changed list, or
other busiest coins when the budget is short, rebuilds the tape connections.

Sharding. The covered coins, busiest first, are dealt round-robin over `max_connections - user_slots`
connections (`tape-0`, `tape-1`, …), so every connection carries liquid coins.

Liveness. Trades are no proof of life: at night, or in a quiet market, the least busy connection's coins can
go minutes without one. So every tape connection also subscribes `bbo` of the busiest covered coin, whose
best bid/offer moves nearly every block (`docs/protocol.md` §8), and that is its canary: no `bbo` frame for
`wide.stale_after` (the `Connection` stale detector) means a stuck socket; silence on `trades` means nothing.
One canary per connection counts against `wide.subscription_budget` and the shared subscription budget like
a coin, so the covered coins are the budget minus the connections.

Dedup. The server replays ~30 recent trades on every (re)subscribe, and REST backfills overlap the
stream: a trade is new unless its `(time, tid)` was seen on its coin within `wide.dedup_window` of the
coin's newest trade (older ones count as seen). Trades older than the tape's start are history: dropped.

Gaps. After a reconnect the replay is the first recovery; then REST `recentTrades` (low priority, at
most `wide.backfill_max_coins` coins, those held by watched addresses first) fills what the replay
missed, posted into the connection's queue so it is applied in order with the stream. Trades that
arrive this way carry `backfilled`. `continuous_since_ms()` tells the wide manager from when on the tape
is complete, so a REST answer is never compared against a tape that may have missed trades, and
`caught_up(t)` whether every trade up to exchange time `t` has been handed over (a busy service can hold
seconds of tape in its queues: an answer compared before then would count those trades twice).

Fills: with a fills sink (`on_fills`), the fill records the tracker made (`take_fills`: trades of wide-owned
addresses, and held ones a handover released) are awaited into it before the signals of each frame and tick;
the tick loop also carries those a REST read or a handover produced between frames.
Engine trades: the tape tells the tracker its wait for an engine-trade label (`wide.engine_label_wait`); the
tracker parks such blocks and releases them on the tape's tick (see `tracking.tape`), and `finish` lets
every parked signal go.

Symbols: the tracker needs a `SymbolMap` with spot metadata (a spot trade moves its base token). The
tape does not set it: the app's symbol loader feeds `TapeTracker.set_symbols` like the engine's; every
loaded universe also goes to `on_universe` (`TapeUniverse.symbols()` builds a map from it).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Protocol

import msgspec

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import HyperliquidConfig, WideConfig
from hl_monitor.domain.address import Priority
from hl_monitor.domain.publication import FillRecord, FillSink
from hl_monitor.domain.signal import Signal, SignalSink
from hl_monitor.errors import HlMonitorError
from hl_monitor.feeds.connection import (
    Connected,
    Connection,
    ConnectionBudget,
    ConnEvent,
    Disconnected,
    Live,
    Posted,
    Received,
    SubscriptionFailed,
)
from hl_monitor.feeds.holdings import NO_HOLDINGS, HoldingsIntake
from hl_monitor.feeds.marks import MarkIntake
from hl_monitor.feeds.supervisor import Backoff
from hl_monitor.hyperliquid.protocol import (
    AllMidsFrame,
    MetaAndAssetCtxs,
    PerpDexs,
    PerpMeta,
    SpotMeta,
    SpotMetaAndAssetCtxs,
    Subscription,
    TradesFrame,
    WsTrade,
)
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = [
    "CANARY_CHANNEL",
    "CoveragePlan",
    "DiscoveryIntake",
    "MarketTape",
    "TapeCoin",
    "TapeUniverse",
    "TradeDedup",
    "load_universe",
    "plan_coverage",
    "shard",
    "split_budget",
]

log = get_logger(__name__)

# Keys per coin the dedup keeps at most (BTC at 10x a busy day is ~50 trades/s × the 120 s window).
MAX_KEYS_PER_COIN: Final = 20_000
# Tick of the block-settle / hold timers: a fraction of the settle time so a block is late by little.
MAX_TICK_S: Final = 0.1
# Memory per wide address is measured on a sample this large and exported this often (it walks every structure).
MEMORY_SAMPLE: Final = 200
MEMORY_EVERY_S: Final = 10.0
# Objects the memory walk visits per tick: well under a millisecond of the loop (docs/architecture.md §10); a
# whale's state of tens of thousands of objects is measured over a few seconds of ticks instead of in one step.
MEMORY_WALK_BUDGET: Final = 1_000
# Universe (re)load retries: fast for a lost reply, then at the weight window's pace.
LOAD_RETRY_INITIAL_S: Final = 1.0
LOAD_RETRY_MAX_S: Final = 60.0
# How many uncovered coins /status lists by name (the count is always exact).
STATUS_UNCOVERED: Final = 50
# The tape connections' canary: `bbo` of the busiest coin moves nearly every block, traded or not.
CANARY_CHANNEL: Final = "bbo"


class TapeInfoApi(Protocol):
    """The REST calls the tape makes (`hyperliquid.info.InfoClient`)."""

    async def perp_dexs(self, *, priority: Priority = ...) -> PerpDexs: ...
    async def meta_and_asset_ctxs(self, dex: str = "", *, priority: Priority = ...) -> MetaAndAssetCtxs: ...
    async def spot_meta_and_asset_ctxs(self, *, priority: Priority = ...) -> SpotMetaAndAssetCtxs: ...
    async def recent_trades(self, coin: str, *, priority: Priority = ...) -> list[WsTrade]: ...


class TapeIntake(Protocol):
    """The tape tracker as the tape feeds it (`tracking.tape.TapeTracker`)."""

    def on_trades(
        self, coin: str, trades: Sequence[WsTrade], now_ms: int, *, backfilled: bool = False
    ) -> list[Signal]: ...

    def tick(self, now_ms: int) -> list[Signal]: ...
    def take_fills(self) -> list[FillRecord]: ...
    def set_label_wait(self, wait_ms: int) -> None: ...
    def release_waiting(self) -> list[Signal]: ...
    def open_blocks(self) -> int: ...
    def coins_of_interest(self) -> set[str]: ...
    def sample_addresses(self, n: int) -> list[str]: ...
    def size_walk(self, address: str) -> MemoryWalk | None: ...


class MemoryWalk(Protocol):
    """A resumable deep-size walk of one address's tape state (`tracking.tape.SizeWalk`)."""

    size: int

    def step(self, budget: int) -> bool: ...


class MemorySampler:
    """Sizes of a sample of watched addresses, measured a budget of objects per call (the tape's tick), one
    address after the other; the gauge exports the latest size of each (`MarketTape.export_memory`)."""

    def __init__(self, tracker: TapeIntake, sample: int) -> None:
        self._tracker = tracker
        self._sample = sample
        self._queue: deque[str] = deque()
        self._walk: tuple[str, MemoryWalk] | None = None
        self.sizes: dict[str, int] = {}  # address → bytes, at most `sample` addresses

    def step(self, budget: int) -> None:
        while budget > 0:
            if self._walk is None:
                if not self._queue:
                    chosen = self._tracker.sample_addresses(self._sample)
                    if not chosen:
                        self.sizes.clear()
                        return
                    keep = set(chosen)
                    self.sizes = {a: n for a, n in self.sizes.items() if a in keep}
                    self._queue.extend(chosen)
                address = self._queue.popleft()
                walk = self._tracker.size_walk(address)
                if walk is None:
                    self.sizes.pop(address, None)
                    continue
                self._walk = (address, walk)
            address, walk = self._walk
            if not walk.step(budget):
                return  # the budget is spent; the walk resumes at the next call
            self.sizes[address] = walk.size
            self._walk = None
            return  # one address finished per call at most: the next begins at the next tick


class DiscoveryIntake(Protocol):
    """Where deduplicated tape trades go for whale discovery (`watch/discovery.py`); must not block."""

    def on_trades(self, trades: Sequence[WsTrade], now_ms: int) -> None: ...


class TapeBudget(ConnectionBudget, Protocol):
    def try_add_subscriptions(self, n: int = 1) -> bool: ...
    def release_subscriptions(self, n: int = 1, *, after_close: bool = False) -> None: ...


# ---------------------------------------------------------------------------------------- dedup


class _Seen:
    __slots__ = ("floor", "keys", "newest", "order")

    def __init__(self) -> None:
        self.floor = 0
        self.newest = 0
        self.keys: set[tuple[int, int]] = set()
        self.order: deque[tuple[int, int]] = deque()


class TradeDedup:
    """Drops trades already seen, per coin, by `(time, tid)`; see the module docstring. Pure, bounded."""

    def __init__(self, window_ms: int, *, start_ms: int = 0, max_per_coin: int = MAX_KEYS_PER_COIN) -> None:
        self.window_ms = window_ms
        self.start_ms = start_ms
        self.max_per_coin = max_per_coin
        self._coins: dict[str, _Seen] = {}
        self.duplicates = 0
        self.history = 0  # older than the tape's start

    def fresh(self, coin: str, trades: Sequence[WsTrade]) -> list[WsTrade]:
        seen = self._coins.get(coin)
        if seen is None:
            seen = self._coins[coin] = _Seen()
        keys = seen.keys
        order = seen.order
        floor = max(seen.floor, self.start_ms)
        newest = seen.newest
        out: list[WsTrade] = []
        for trade in trades:
            t = trade.time
            if t < floor:
                if t < self.start_ms:
                    self.history += 1
                else:
                    self.duplicates += 1
                continue
            key = (t, trade.tid)
            if key in keys:
                self.duplicates += 1
                continue
            keys.add(key)
            order.append(key)
            if t > newest:
                newest = t
            out.append(trade)
        seen.newest = newest
        cutoff = newest - self.window_ms
        if cutoff > seen.floor:
            seen.floor = cutoff
            while order and order[0][0] < cutoff:
                keys.discard(order.popleft())
        while len(order) > self.max_per_coin:
            evicted = order.popleft()
            keys.discard(evicted)
            seen.floor = max(seen.floor, evicted[0] + 1)  # anything at or before it now counts as seen
        return out

    def keys(self) -> int:
        return sum(len(s.keys) for s in self._coins.values())


# ---------------------------------------------------------------------------------------- universe


class TapeCoin(msgspec.Struct, frozen=True):
    coin: str
    volume: Decimal  # 24 h notional volume (0 when unknown)
    spot: bool


class TapeUniverse(msgspec.Struct, frozen=True):
    """Every tradable coin plus the metadata it came from (enough to build a `SymbolMap`)."""

    coins: list[TapeCoin]
    perp_metas: dict[str, PerpMeta]
    spot_meta: SpotMeta
    perp_dexs: PerpDexs

    @property
    def dexes(self) -> list[str]:
        return list(self.perp_metas)

    def symbols(self, pair_categories: Mapping[str, int] | None = None) -> SymbolMap:
        return SymbolMap.build(
            perp_metas=self.perp_metas,
            spot_meta=self.spot_meta,
            perp_dexs=self.perp_dexs,
            pair_categories=pair_categories,
        )


async def load_universe(info: TapeInfoApi) -> TapeUniverse:
    """perpDexs, metaAndAssetCtxs per dex and spotMetaAndAssetCtxs (20 weight each): every coin with its 24 h volume."""
    dexs = await info.perp_dexs()
    names = ["", *(d.name for d in dexs if d is not None)]
    metas: dict[str, PerpMeta] = {}
    coins: list[TapeCoin] = []
    for dex in names:
        mac = await info.meta_and_asset_ctxs(dex)
        metas[dex] = mac.meta
        for entry, ctx in zip(mac.meta.universe, mac.asset_ctxs, strict=True):
            if not entry.is_delisted:
                coins.append(TapeCoin(entry.name, ctx.day_ntl_vlm, False))
    spot_ctxs = await info.spot_meta_and_asset_ctxs()
    spot, volumes = spot_ctxs.meta, spot_ctxs.volumes()
    coins.extend(TapeCoin(pair.name, volumes.get(pair.name, Decimal(0)), True) for pair in spot.universe)
    return TapeUniverse(coins=coins, perp_metas=metas, spot_meta=spot, perp_dexs=dexs)


class CoveragePlan(msgspec.Struct, frozen=True):
    covered: list[TapeCoin]  # busiest first
    uncovered: list[TapeCoin]


def plan_coverage(coins: Sequence[TapeCoin], budget: int) -> CoveragePlan:
    """The `budget` busiest coins (24 h volume; perps before spot on a tie, then by name) and the rest."""
    ranked = sorted(coins, key=lambda c: (-c.volume, c.spot, c.coin))
    budget = max(0, budget)
    return CoveragePlan(covered=ranked[:budget], uncovered=ranked[budget:])


def split_budget(granted: int, connections: int, coins: int) -> tuple[int, int]:
    """`(connections, coins)` that `granted` subscriptions carry when each connection also needs its canary.

    Every connection carries at least one coin, so no more connections than coins, and none without a coin.
    """
    used = max(0, min(connections, granted // 2, coins))
    return used, min(coins, granted - used) if used else 0


def shard(coins: Sequence[str], connections: int) -> list[list[str]]:
    """Deal coins (busiest first) round-robin over `connections`; empty shards are dropped."""
    if connections <= 0:
        return []
    return [part for part in (list(coins[i::connections]) for i in range(connections)) if part]


# ---------------------------------------------------------------------------------------- feed


@dataclass(frozen=True, slots=True)
class _Backfill(Posted):
    coin: str
    trades: list[WsTrade]


@dataclass(frozen=True, slots=True)
class _BackfillDone(Posted):
    epoch: int


class _Shard:
    __slots__ = (
        "applied_ms",
        "backfill",
        "coins",
        "connected_ms",
        "connection",
        "continuous_since",
        "epochs",
        "in_gap",
        "index",
    )

    def __init__(self, index: int, coins: list[str]) -> None:
        self.index = index
        self.coins = coins
        self.applied_ms = 0  # newest exchange time of a trade handed to the tracker from this connection
        self.connection: Connection | None = None
        self.connected_ms = 0
        self.continuous_since: int | None = None
        self.epochs = 0
        self.in_gap = True
        self.backfill: asyncio.Task[None] | None = None


class MarketTape:
    """Runs the tape; `run()` until cancelled. See the module docstring."""

    def __init__(
        self,
        cfg: HyperliquidConfig,
        wide: WideConfig,
        *,
        tracker: TapeIntake,
        info: TapeInfoApi,
        budget: TapeBudget,
        metrics: Metrics,
        on_signals: SignalSink,
        on_universe: Callable[[TapeUniverse], None] | None = None,
        holdings: HoldingsIntake = NO_HOLDINGS,
        discovery: DiscoveryIntake | None = None,
        marks: MarkIntake | None = None,
        mark_dexes: Sequence[str] = ("",),
        on_fills: FillSink | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        # The tape's own stale threshold; everything else (ping, acks, backoff) as for every connection.
        self._conn_cfg = msgspec.structs.replace(cfg, stale_after=wide.stale_after)
        self._clock = clock
        self._canary_coin: str | None = None
        tracker.set_label_wait(round(wide.engine_label_wait * 1000))
        self._cfg = cfg
        self._wide = wide
        self._tracker = tracker
        self._memory = MemorySampler(tracker, MEMORY_SAMPLE)
        self._info = info
        self._budget = budget
        self._metrics = metrics
        self._on_signals = on_signals
        self._on_universe = on_universe
        self._holdings = holdings
        self._discovery = discovery
        # Marks ride on the first tape connection: connections are the scarcest per-IP resource (docs/protocol.md §5).
        self._marks = marks
        self._mark_subscriptions = [Subscription("allMids", dex=dex or None) for dex in mark_dexes] if marks else []
        self._marks_reserved = False
        self.mark_pushes = 0
        self._on_fills = on_fills
        self._wall_ms = wall_ms
        self._rng = rng or random.Random()
        self._dedup = TradeDedup(round(wide.dedup_window * 1000))
        self.universe: TapeUniverse | None = None
        self._plan: CoveragePlan | None = None
        self._shards: list[_Shard] = []
        self._subscribed = 0
        self._started = False
        self._processed = metrics.trades_processed.labels(type="tape")
        self._latency = metrics.exchange_to_receive_seconds.labels(source="tape")

    # ------------------------------------------------------------------ reading

    @property
    def dedup(self) -> TradeDedup:
        return self._dedup

    def connections(self) -> list[Connection]:
        return [s.connection for s in self._shards if s.connection is not None]

    def uncovered(self) -> list[str]:
        return [] if self._plan is None else [c.coin for c in self._plan.uncovered]

    def covered(self) -> list[str]:
        return [coin for s in self._shards for coin in s.coins]

    def continuous_since_ms(self) -> int | None:
        """Wall ms from which every covered coin's trades have been applied; None while any shard is in a gap."""
        if not self._started:
            return None
        if not self._shards:
            return 0  # no tape: positions change only through REST, any answer may be compared
        since = 0
        for s in self._shards:
            if s.in_gap or s.continuous_since is None:
                return None
            since = max(since, s.continuous_since)
        return since

    def caught_up(self, t_ms: int) -> bool:
        """Every trade at or before exchange time `t_ms` that reached us has been handed to the tracker.

        Per connection: it has handed over a trade newer than `t_ms` (a connection carries blocks in order,
        so every older one went first), or nothing it received is still waiting (a quiet connection). The
        caller adds a wall-clock settle on top, for trades still in flight on the network.
        """
        for s in self._shards:
            if s.applied_ms > t_ms:
                continue
            if s.connection is not None and s.connection.backlog:
                return False
        return True

    def status(self) -> dict[str, Any]:
        uncovered = self.uncovered()
        return {
            "connections": [{**s.connection.status(), "coins": len(s.coins)} for s in self._shards if s.connection],
            "covered": sum(len(s.coins) for s in self._shards),
            "uncovered_count": len(uncovered),
            "uncovered": uncovered[:STATUS_UNCOVERED],
            "continuous_since_ms": self.continuous_since_ms(),
            "dedup_keys": self._dedup.keys(),
            "open_blocks": self._tracker.open_blocks(),
            "mark_pushes": self.mark_pushes,
        }

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        self._dedup.start_ms = self._wall_ms()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._tick_loop(), name="tape:tick")
                universe = await self._load()
                while True:
                    universe = await self._run_plan(universe)
        finally:
            self._release_subscriptions()

    async def _load(self) -> TapeUniverse:
        backoff = Backoff(LOAD_RETRY_INITIAL_S, LOAD_RETRY_MAX_S, rng=self._rng)
        while True:
            try:
                universe = await load_universe(self._info)
            except (HlMonitorError, OSError) as exc:
                delay = backoff.next_delay()
                self._metrics.tape_events.labels(kind="universe_error").inc()
                log.warning("tape universe load failed; retrying", error=repr(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            if self._on_universe is not None:
                self._on_universe(universe)
            return universe

    def _reserve(self, wanted: int) -> int:
        """Take as many subscriptions as the shared budget grants, up to `wanted`."""
        n = wanted
        while n > 0 and not self._budget.try_add_subscriptions(n):
            n = n * 9 // 10 if n > 10 else n - 1
        self._subscribed = n
        return n

    def _release_subscriptions(self) -> None:
        if self._subscribed:
            self._budget.release_subscriptions(self._subscribed, after_close=True)
            self._subscribed = 0
        if self._marks_reserved:
            self._budget.release_subscriptions(len(self._mark_subscriptions), after_close=True)
            self._marks_reserved = False

    async def _run_plan(self, universe: TapeUniverse) -> TapeUniverse:
        """Run connections for `universe` until a refresh changes the coin list; return the new universe."""
        self.universe = universe
        connections = max(0, self._cfg.max_connections - self._cfg.user_slots)
        n_coins = len(universe.coins)
        # Every coin plus one canary per connection, as far as the tape's own budget allows.
        wanted = min(self._wide.subscription_budget, n_coins + min(connections, n_coins)) if connections else 0
        granted = self._reserve(wanted)
        connections, covered = split_budget(granted, connections, n_coins)
        if connections + covered < granted:
            self._budget.release_subscriptions(granted - connections - covered)
            self._subscribed = connections + covered
        plan = plan_coverage(universe.coins, covered)
        self._plan = plan
        self._canary_coin = plan.covered[0].coin if plan.covered else None
        self._metrics.tape_uncovered_coins.set(len(plan.uncovered))
        if plan.uncovered:
            log.warning(
                "tape cannot cover every coin; busiest covered",
                covered=len(plan.covered),
                uncovered=len(plan.uncovered),
                budget=self._wide.subscription_budget,
                granted=granted,
            )
        self._shards = [_Shard(i, coins) for i, coins in enumerate(shard([c.coin for c in plan.covered], connections))]
        if self._mark_subscriptions and self._shards:
            self._marks_reserved = self._budget.try_add_subscriptions(len(self._mark_subscriptions))
            if not self._marks_reserved:
                self._metrics.tape_events.labels(kind="marks_refused").inc()
                log.warning("no subscription left for allMids: marks move only with state frames")
        self._started = True
        log.info("tape planned", coins=len(plan.covered), connections=len(self._shards))
        try:
            async with asyncio.TaskGroup() as tg:
                for s in self._shards:
                    s.connection = self._connection(s)
                    tg.create_task(s.connection.run(), name=f"tape-{s.index}")
                new = await self._wait_for_change(universe)
                for s in self._shards:
                    assert s.connection is not None
                    s.connection.stop()
        finally:
            for s in self._shards:
                await self._cancel_backfill(s)
            self._release_subscriptions()
        log.info("tape coins or their ranking changed; rebuilding connections", coins=len(new.coins))
        return new

    async def _wait_for_change(self, current: TapeUniverse) -> TapeUniverse:
        """The next universe whose coin list, or whose busiest coins within the granted budget, differ."""
        wanted = {c.coin for c in current.coins}
        assert self._plan is not None
        granted = len(self._plan.covered)
        covered = {c.coin for c in self._plan.covered}
        while True:
            await asyncio.sleep(self._wide.universe_refresh)
            try:
                new = await load_universe(self._info)
            except (HlMonitorError, OSError) as exc:
                self._metrics.tape_events.labels(kind="universe_error").inc()
                log.warning("tape universe refresh failed; keeping the current coins", error=repr(exc))
                continue
            if self._on_universe is not None:
                self._on_universe(new)
            if {c.coin for c in new.coins} != wanted:
                return new
            if {c.coin for c in plan_coverage(new.coins, granted).covered} != covered:
                # Volumes moved coins across the budget's edge (a new listing got busy): worth one reconnect
                # per refresh at most; the replay and backfill cover it.
                return new
            self.universe = new

    def _connection(self, s: _Shard) -> Connection:
        async def handler(event: ConnEvent) -> None:
            await self._handle(s, event)

        assert self._canary_coin is not None  # a shard exists only when some coin is covered
        subscriptions = [Subscription("trades", coin=coin) for coin in s.coins]
        subscriptions.append(Subscription(CANARY_CHANNEL, coin=self._canary_coin))
        if s.index == 0 and self._marks_reserved:
            subscriptions.extend(self._mark_subscriptions)
        return Connection(
            name=f"tape-{s.index}",
            kind="tape",
            subscriptions=subscriptions,
            handler=handler,
            cfg=self._conn_cfg,
            budget=self._budget,
            metrics=self._metrics,
            canary_channel=CANARY_CHANNEL,
            clock=self._clock,
            wall_ms=self._wall_ms,
            rng=self._rng,
        )

    # ------------------------------------------------------------------ events, in arrival order per shard

    async def _handle(self, s: _Shard, event: ConnEvent) -> None:
        match event:
            case Received(frame=AllMidsFrame(data=mids)) if self._marks is not None:
                self.mark_pushes += 1
                await self._marks.on_marks(mids.mids, event.received_ms)
            case Received(frame=TradesFrame(data=trades)) if trades:
                await self._on_trades(s, trades, event.received_ms, backfilled=False)
            case Connected():
                s.epochs += 1
                s.connected_ms = self._wall_ms()
                s.in_gap = True
            case Live() if s.epochs == 1:
                s.in_gap = False
                s.continuous_since = s.connected_ms
            case Live():
                await self._cancel_backfill(s)
                s.backfill = asyncio.create_task(self._backfill(s, event.epoch), name=f"tape-{s.index}:backfill")
            case Disconnected():
                await self._cancel_backfill(s)
                s.in_gap = True
            case SubscriptionFailed():
                self._metrics.tape_events.labels(kind="subscription_refused").inc()
                log.error(
                    "tape subscription refused", connection=f"tape-{s.index}", kind=event.kind, text=event.text[:300]
                )
            case _Backfill(trades=trades) if trades:
                await self._on_trades(
                    s, sorted(trades, key=lambda t: (t.time, t.tid)), self._wall_ms(), backfilled=True
                )
            case _BackfillDone() if s.connection is not None and event.epoch == s.connection.epoch:
                s.in_gap = False
                s.continuous_since = s.connected_ms
            case _:
                pass  # other frames (none subscribed) and stale backfill ends

    async def _on_trades(self, s: _Shard, trades: Sequence[WsTrade], now_ms: int, *, backfilled: bool) -> None:
        coin = trades[0].coin
        fresh = self._dedup.fresh(coin, trades)
        dropped = len(trades) - len(fresh)
        if dropped:
            self._metrics.trades_deduplicated.inc(dropped)
        if not fresh:
            return
        self._processed.inc(len(fresh))
        newest = max(t.time for t in fresh)
        if not backfilled:
            self._latency.observe(max(0.0, (now_ms - newest) / 1000))
            # Replayed trades that happened while this shard was disconnected are late: flag them.
            backfilled = s.epochs > 1 and fresh[0].time < s.connected_ms
        await self._holdings.on_trades(fresh, now_ms)  # first, so the block's signal carries the position after it
        if self._discovery is not None:
            self._discovery.on_trades(fresh, now_ms)
        signals = self._tracker.on_trades(coin, fresh, now_ms, backfilled=backfilled)
        if not backfilled:
            s.applied_ms = max(s.applied_ms, newest)
        await self._emit(signals)

    async def _emit(self, signals: list[Signal]) -> None:
        if self._on_fills is not None:
            fills = self._tracker.take_fills()
            if fills:
                await self._on_fills(fills)
        if signals:
            await self._on_signals(signals)

    async def finish(self) -> None:
        """Shutdown, intake stopped: every open block is complete now, so flush them all (the tape's last tick);
        signals still waiting for an engine-trade label go out as they are."""
        await self._emit(self._tracker.tick(self._wall_ms() + round(self._wide.block_settle * 1000)))
        await self._emit(self._tracker.release_waiting())

    async def _cancel_backfill(self, s: _Shard) -> None:
        task, s.backfill = s.backfill, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    async def _backfill(self, s: _Shard, epoch: int) -> None:
        conn = s.connection
        assert conn is not None
        interest = self._tracker.coins_of_interest()
        coins = [c for c in s.coins if c in interest] + [c for c in s.coins if c not in interest]
        for coin in coins[: self._wide.backfill_max_coins]:
            try:
                trades = await self._info.recent_trades(coin, priority="low")
            except (HlMonitorError, OSError) as exc:
                self._metrics.tape_events.labels(kind="backfill_error").inc()
                log.warning("tape backfill failed", coin=coin, error=repr(exc))
                continue
            self._metrics.tape_events.labels(kind="backfill_request").inc()
            await conn.post(_Backfill(coin, trades))
        # Whatever the replay and backfill could not bring back is lost to the tape; REST reconcile finds it.
        await conn.post(_BackfillDone(epoch))

    # ------------------------------------------------------------------ timers

    async def _tick_loop(self) -> None:
        tick = min(MAX_TICK_S, self._wide.block_settle / 2)
        last_memory = 0.0
        while True:
            await asyncio.sleep(tick)
            await self._emit(self._tracker.tick(self._wall_ms()))
            self._memory.step(MEMORY_WALK_BUDGET)
            now = time.monotonic()
            if now - last_memory >= MEMORY_EVERY_S:
                last_memory = now
                self.export_memory()

    def export_memory(self) -> None:
        sizes = list(self._memory.sizes.values())
        gauge = self._metrics.wide_address_memory_bytes
        gauge.labels(stat="mean").set(sum(sizes) / len(sizes) if sizes else 0)
        gauge.labels(stat="max").set(max(sizes, default=0))
