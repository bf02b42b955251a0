"""One precisely tracked address on its own connection, and its gap recovery.

Subscriptions: `userFills` (aggregateByTime false: exact tids for dedup), `orderUpdates` (carries no
user, hence one address per connection), `allDexsClearinghouseState` (positions, and the canary: it is
re-sent about every 5 s), `spotState`, `userTwapHistory` (a TWAP's end flushes its aggregation), plus
`bbo` of one coin (no user slot) that proves the socket itself flows when the canary goes quiet. Frames
go, in arrival order, to the tracking engine; the signals it returns are awaited into the sink
(backpressure). With a fills sink (`on_fills`), the fills the engine accepted from each frame or REST answer
(`take_fills`) are awaited into it first, so a fill goes out before the order signal it completes.

Gap recovery runs after every (re)connect, including the first one after a restart:
1. On `Connected` the engine's fill watermark is remembered as the start of the gap; if an earlier
   recovery never finished, its older start is kept, so a reconnect during recovery loses nothing.
2. The `userFills` snapshot arrives by itself after the subscribe (the engine tells a snapshot of a
   new address, which only seeds the watermark, from one after a gap).
3. Once live: REST `userFillsByTime` from gap start − `backfill_margin` (fills older than the snapshot
   reaches) of every perp dex the address uses, merged, fed to `engine.on_backfill` (dedup on tid is the
   engine's). REST fills are dex-scoped (docs/protocol.md §4): without `dex` only the first perp dex answers.
4. REST `orderStatus` for every oid the engine still has pending (`orderUpdates` does not replay).
5. REST `clearinghouseState` of the core dex. All dexs come anyway with the `allDexsClearinghouseState`
   push that follows the subscribe; one 2-weight call is enough to reconcile the book now.
Every REST answer is posted into the connection's queue and applied in order with the frames: a fill
pushed before an `orderStatus` answer is applied before that status, so a status never flushes an
order whose last fills are still waiting in the queue. REST goes through the weight budget (high
priority); a failed recovery is retried with backoff, and the gap start survives until one succeeds.

Fill audit (docs/architecture.md §8; a subscription can miss events while its connection and canary flow,
docs/protocol.md §9): every `fill_audit_interval` a live, recovered stream re-reads its address's fills since
the previous audit (minus an overlap, up to a few seconds ago) with `userFillsByTime` at low priority and
posts them like a backfill. Fills the engine had not seen are processed (signals flagged backfilled) and
counted; any such fill means the subscription lost events while the canary still flowed, so the
connection is rebuilt (`reconnects{reason="fills_missed"}`), which resubscribes and runs a full gap
recovery. Fills are the check rather than positions: they also catch an open and close that cancel out,
and they repair what they find. One read every 5 minutes per precise address and dex it uses costs 20 weight
plus 1 per 20 fills it returns (8 whales on one dex at 2,000 fills per window each: ~200 of the 1,200 a minute).

Which dexes an address uses: the first perp dex always (it also answers for spot fills); every dex whose state
in the `allDexsClearinghouseState` frames holds a position or collateral; every dex of a fill coin the stream
has seen (`xyz:XYZ100` → `xyz`). The set only grows while the stream lives. Until the first state frame has
come (a recovery waits for it up to `DEX_STATE_WAIT_S`), every perp dex the symbol map lists is asked. Reads are
counted per dex (`rest_dex_fill_reads`, `rest_dex_fills`; label `first`, a listed dex, or `other`).
Known limit: a dex the address funded, traded and emptied again entirely inside one gap shows in no state and
no fill the stream saw; its fills of that gap are not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import HyperliquidConfig
from hl_monitor.domain.address import Priority
from hl_monitor.domain.publication import FillRecord, FillSink
from hl_monitor.domain.signal import Signal, SignalSink
from hl_monitor.feeds.connection import (
    Connected,
    Connection,
    ConnectionBudget,
    ConnEvent,
    ConnState,
    Disconnected,
    Live,
    Posted,
    Received,
    SubscriptionFailed,
)
from hl_monitor.feeds.holdings import NO_HOLDINGS, HoldingsIntake
from hl_monitor.feeds.supervisor import Backoff
from hl_monitor.hyperliquid.info import FillHistory, merge_fill_histories
from hl_monitor.hyperliquid.protocol import (
    AllDexsClearinghouseStateData,
    AllDexsClearinghouseStateFrame,
    ClearinghouseState,
    ClearinghouseStateData,
    Fill,
    OrderStatusResponse,
    OrderUpdatesFrame,
    SpotStateData,
    SpotStateFrame,
    Subscription,
    TwapHistoryEntry,
    UserFillsData,
    UserFillsFrame,
    UserTwapHistoryData,
    UserTwapHistoryFrame,
    WsOrder,
)
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = [
    "CANARY_CHANNEL",
    "FLOW_COIN",
    "InfoApi",
    "Tracker",
    "UserStream",
    "user_subscriptions",
]

log = get_logger(__name__)

CANARY_CHANNEL: Final = "allDexsClearinghouseState"
# The most liquid book: its bbo changes nearly every block, so silence on it means the socket is stuck.
FLOW_COIN: Final = "BTC"
# Recovery retries start fast (a single lost REST reply) and settle at the weight window's length.
RECOVERY_RETRY_INITIAL_S: Final = 1.0
RECOVERY_RETRY_MAX_S: Final = 60.0
# Fills younger than this may still be on their way over the stream: an audit leaves them to it.
AUDIT_LAG_MS: Final = 5_000
# Consecutive audit windows overlap this much: exchange timestamps vs our clock, block time resolution.
AUDIT_OVERLAP_MS: Final = 30_000
# The first audit of a stream comes after a random share of the interval, so precise addresses spread out.
AUDIT_FIRST_MIN_SHARE: Final = 0.5
# `userTwapHistory` entries held while a gap is open (one per TWAP, newest state). They only end TWAP
# aggregations early; beyond this the oldest are dropped and those TWAPs flush by timeout as before.
MAX_HELD_TWAPS: Final = 1000
# How long a fill read waits for the first state frame to tell which dexes the address uses: the server sends
# the state on subscribe and about every 5 s after (docs/protocol.md §8). Past it, every listed dex is asked.
DEX_STATE_WAIT_S: Final = 6.0
# Metric label of the first perp dex (its name is the empty string) and of a dex the symbol map does not list.
FIRST_DEX_LABEL: Final = "first"
OTHER_DEX_LABEL: Final = "other"


class Watermark(Protocol):
    @property
    def time(self) -> int: ...


class Tracker(Protocol):
    """The tracking engine as the precise tier drives it."""

    def on_user_fills(self, address: str, data: UserFillsData, now_ms: int) -> list[Signal]: ...
    def on_order_updates(self, address: str, updates: list[WsOrder], now_ms: int) -> list[Signal]: ...
    def on_backfill(self, address: str, fills: list[Fill], now_ms: int) -> list[Signal]: ...
    def unseen_fills(self, address: str, fills: list[Fill]) -> int: ...
    def on_twap_history(self, address: str, data: UserTwapHistoryData, now_ms: int) -> list[Signal]: ...
    def on_order_status(self, address: str, oid: int, status: str, status_time: int, now_ms: int) -> list[Signal]: ...
    def on_clearinghouse(
        self, address: str, data: AllDexsClearinghouseStateData | ClearinghouseStateData, now_ms: int
    ) -> object: ...
    def on_spot_state(self, address: str, data: SpotStateData, now_ms: int) -> object: ...
    def pending_oids(self, address: str) -> Iterable[int]: ...
    def watermark(self, address: str) -> Watermark | None: ...
    def take_fills(self) -> list[FillRecord]: ...
    @property
    def symbols(self) -> SymbolMap: ...


class InfoApi(Protocol):
    """The REST calls gap recovery makes (`hyperliquid.info.InfoClient`)."""

    async def order_status(self, user: str, oid: int | str, *, priority: Priority = ...) -> OrderStatusResponse: ...
    async def user_fills_by_time(
        self, user: str, start_ms: int, end_ms: int | None = None, *, dex: str = ..., priority: Priority = ...
    ) -> FillHistory: ...
    async def clearinghouse_state(
        self, user: str, dex: str = "", *, priority: Priority = ...
    ) -> ClearinghouseState: ...


def user_subscriptions(address: str, flow_coin: str = FLOW_COIN) -> list[Subscription]:
    """userFills first: its snapshot then arrives before the other acks (the server answers in order)."""
    subs = [
        Subscription("userFills", user=address, aggregate_by_time=False),
        Subscription("orderUpdates", user=address),
        Subscription(CANARY_CHANNEL, user=address),
        Subscription("spotState", user=address),
        Subscription("userTwapHistory", user=address),
    ]
    if flow_coin:
        subs.append(Subscription("bbo", coin=flow_coin))
    return subs


# ---------------------------------------------------------------------------------------- recovery events


@dataclass(slots=True)
class _Backfill(Posted):
    fills: list[Fill]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    audit_epoch: int | None = None  # set for a fill audit: the recovered epoch it was asked in
    unseen: int = 0  # audits: fills the engine had not processed before (set by the handler)
    stale: bool = False  # audits: a reconnect came in between; a gap recovery accounts for these fills


@dataclass(frozen=True, slots=True)
class _OrderStatus(Posted):
    oid: int
    status: str
    status_time: int


@dataclass(frozen=True, slots=True)
class _Positions(Posted):
    state: ClearinghouseState


@dataclass(frozen=True, slots=True)
class _RecoveryDone(Posted):
    epoch: int
    covered_to: int  # wall ms when the recovery's fill backfill was asked: fills before it are complete


class UserStream:
    """A precise address on connection `user-{slot}`; `run()` until `stop()` (or a user-cap refusal)."""

    def __init__(
        self,
        address: str,
        slot: int,
        *,
        cfg: HyperliquidConfig,
        tracker: Tracker,
        info: InfoApi,
        budget: ConnectionBudget,
        metrics: Metrics,
        on_signals: SignalSink,
        on_over_budget: Callable[[str, str], None],
        holdings: HoldingsIntake = NO_HOLDINGS,
        on_fills: FillSink | None = None,
        flow_coin: str = FLOW_COIN,
        wall_ms: Callable[[], int] = _wall_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address.lower()
        self._holdings = holdings
        self._on_fills = on_fills
        self.slot = slot
        self._cfg = cfg
        self._tracker = tracker
        self._info = info
        self._metrics = metrics
        self._on_signals = on_signals
        self._on_over_budget = on_over_budget
        self._wall_ms = wall_ms
        self._rng = rng or random.Random()
        self.subscriptions = user_subscriptions(self.address, flow_coin)
        self.connection = Connection(
            name=f"user-{slot}",
            kind="user",
            subscriptions=self.subscriptions,
            handler=self._handle,
            cfg=cfg,
            budget=budget,
            metrics=metrics,
            canary_channel=CANARY_CHANNEL,
            wall_ms=wall_ms,
            rng=self._rng,
        )
        self.over_budget = False
        self.recovering = False
        self.recoveries = 0
        self._gap_open = False
        self._gap_start: int | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._audited_to: int | None = None  # wall ms up to which the stream's fills are known complete
        self._recovered_epoch: int | None = None  # the connection epoch whose gap recovery finished
        self._held_twaps: dict[int, TwapHistoryEntry] = {}  # TWAP states that came during a gap
        self.audits = 0
        self.fills_missed = 0
        self._dexes: set[str] = {""}  # perp dexes the address uses (module docstring)
        self._dexes_known = asyncio.Event()  # set once a state frame told which dexes hold something

    @property
    def user_subscription_count(self) -> int:
        return sum(1 for s in self.subscriptions if s.is_user_specific)

    def status(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "slot": self.slot,
            "recovering": self.recovering,
            "recoveries": self.recoveries,
            "audits": self.audits,
            "fills_missed": self.fills_missed,
            "dexes": sorted(self.fill_dexes()),
            "over_budget": self.over_budget,
            **self.connection.status(),
        }

    def stop(self) -> None:
        self.connection.stop()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                audit = None
                if self._cfg.fill_audit_interval > 0:
                    audit = tg.create_task(self._audit_loop(), name=f"audit:{self.address}")
                await self.connection.run()
                if audit is not None:
                    audit.cancel()
        finally:
            await self._cancel_recovery()

    # ------------------------------------------------------------------ events, in arrival order

    async def _handle(self, event: ConnEvent) -> None:
        now_ms = self._wall_ms()
        match event:
            case Received():
                await self._on_frame(event)
            case Connected():
                if not self._gap_open:
                    watermark = self._tracker.watermark(self.address)
                    self._gap_start = None if watermark is None else watermark.time
                    self._gap_open = True
            case Live():
                await self._cancel_recovery()
                self.recovering = True
                self._recovery = asyncio.create_task(self._recover(event.epoch), name=f"recover:{self.address}")
            case Disconnected():
                await self._cancel_recovery()
            case SubscriptionFailed(kind="user_cap"):
                self._refused(event.text)
            case SubscriptionFailed():
                log.error("subscription refused", address=self.address, kind=event.kind, text=event.text[:300])
            case _Backfill():
                try:
                    self._note_fill_dexes(event.fills)
                    if event.audit_epoch is not None:
                        if event.audit_epoch == self._recovered_epoch == self.connection.epoch:
                            event.unseen = self._tracker.unseen_fills(self.address, event.fills)
                        else:
                            event.stale = True
                    await self._holdings.on_fills(self.address, event.fills, now_ms)
                    await self._emit(self._tracker.on_backfill(self.address, event.fills, now_ms))
                finally:
                    event.done.set()
            case _OrderStatus():
                await self._emit(
                    self._tracker.on_order_status(self.address, event.oid, event.status, event.status_time, now_ms)
                )
            case _Positions():
                data = ClearinghouseStateData(user=self.address, clearinghouse_state=event.state, dex="")
                self._tracker.on_clearinghouse(self.address, data, now_ms)
            case _RecoveryDone() if event.epoch == self.connection.epoch:
                await self._recovered(event, now_ms)

    async def _recovered(self, event: _RecoveryDone, now_ms: int) -> None:
        self._gap_open = False
        self._gap_start = None
        self.recovering = False
        self.recoveries += 1
        self._audited_to = event.covered_to
        self._recovered_epoch = event.epoch
        if self._held_twaps:
            # The gap's fills and order statuses are in now: a TWAP's end no longer overtakes its slices.
            held = UserTwapHistoryData(user=self.address, history=list(self._held_twaps.values()))
            self._held_twaps.clear()
            await self._emit(self._tracker.on_twap_history(self.address, held, now_ms))

    async def _on_frame(self, event: Received) -> None:
        now_ms = event.received_ms
        match event.frame:
            case UserFillsFrame(data=fills) if self._mine(fills.user, "userFills"):
                self._note_fill_dexes(fills.fills)
                if not fills.is_snapshot:
                    observe = self._metrics.exchange_to_receive_seconds.labels(source="user_fills").observe
                    for fill in fills.fills:
                        observe(max(0.0, (now_ms - fill.time) / 1000))
                    # Positions first, so the order signal these fills complete carries the position after them.
                    await self._holdings.on_fills(self.address, fills.fills, now_ms)
                await self._emit(self._tracker.on_user_fills(self.address, fills, now_ms))
            case OrderUpdatesFrame(data=updates):
                self._metrics.order_updates_received.inc(len(updates))
                await self._emit(self._tracker.on_order_updates(self.address, updates, now_ms))
            case AllDexsClearinghouseStateFrame(data=state) if self._mine(state.user, CANARY_CHANNEL):
                self._note_state_dexes(state)
                self._tracker.on_clearinghouse(self.address, state, now_ms)
                await self._holdings.on_state(state, now_ms)
            case SpotStateFrame(data=spot) if self._mine(spot.user, "spotState"):
                self._tracker.on_spot_state(self.address, spot, now_ms)
                await self._holdings.on_spot(self.address, spot.spot_state, now_ms)
            case UserTwapHistoryFrame(data=twaps) if self._mine(twaps.user, "userTwapHistory"):
                if self._gap_open:
                    self._hold_twaps(twaps.history)
                else:
                    await self._emit(self._tracker.on_twap_history(self.address, twaps, now_ms))
            case _:
                pass  # bbo (the flow canary) and anything else: liveness only, nothing to track

    # ------------------------------------------------------------------ dexes

    def fill_dexes(self) -> frozenset[str]:
        """The perp dexes a fill read asks now (module docstring): the used ones, or every listed one if unknown."""
        if self._dexes_known.is_set():
            return frozenset(self._dexes)
        return frozenset(self._dexes) | self._tracker.symbols.dexes

    def _note_state_dexes(self, data: AllDexsClearinghouseStateData) -> None:
        for dex, state in data.clearinghouse_states:
            if state.asset_positions or state.margin_summary.account_value or state.withdrawable:
                self._dexes.add(dex)
        self._dexes_known.set()

    def _note_fill_dexes(self, fills: Iterable[Fill]) -> None:
        dexes = self._dexes
        for fill in fills:
            coin = fill.coin
            if ":" in coin:
                dexes.add(coin.split(":", 1)[0])

    def _dex_label(self, dex: str) -> str:
        if not dex:
            return FIRST_DEX_LABEL
        return dex if dex in self._tracker.symbols.dexes else OTHER_DEX_LABEL

    async def _read_fills(self, start: int, end: int | None, *, priority: Priority, via: str) -> FillHistory:
        """`userFillsByTime` of every dex the address uses, merged; one failed read fails the whole read."""
        if not self._dexes_known.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dexes_known.wait(), DEX_STATE_WAIT_S)
        histories: list[FillHistory] = []
        for dex in sorted(self.fill_dexes()):
            history = await self._info.user_fills_by_time(self.address, start, end, dex=dex, priority=priority)
            label = self._dex_label(dex)
            self._metrics.rest_dex_fill_reads.labels(dex=label, via=via).inc()
            self._metrics.rest_dex_fills.labels(dex=label, via=via).inc(len(history.fills))
            histories.append(history)
        return merge_fill_histories(histories)

    def _hold_twaps(self, entries: list[TwapHistoryEntry]) -> None:
        held = self._held_twaps
        for entry in entries:
            if entry.twap_id is not None:
                held.pop(entry.twap_id, None)
                held[entry.twap_id] = entry  # newest state last
        while len(held) > MAX_HELD_TWAPS:
            del held[next(iter(held))]

    def _mine(self, user: str, channel: str) -> bool:
        if user.lower() == self.address:
            return True
        self._metrics.frame_decode_errors.labels(kind="foreign_user").inc()
        log.warning("frame for another user on a precise connection", address=self.address, channel=channel)
        return False

    async def _emit(self, signals: list[Signal]) -> None:
        if self._on_fills is not None:
            fills = self._tracker.take_fills()
            if fills:
                await self._on_fills(fills)
        if signals:
            await self._on_signals(signals)

    def _refused(self, text: str) -> None:
        if self.over_budget:
            return  # one refusal per subscription arrives; one is enough
        self.over_budget = True
        log.warning("exchange refused another tracked user; address over budget", address=self.address, text=text)
        self.connection.stop()
        self._on_over_budget(self.address, "user_cap")

    # ------------------------------------------------------------------ recovery

    async def _cancel_recovery(self) -> None:
        task, self._recovery = self._recovery, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    async def _recover(self, epoch: int) -> None:
        backoff = Backoff(RECOVERY_RETRY_INITIAL_S, RECOVERY_RETRY_MAX_S, rng=self._rng)
        while True:
            try:
                await self._recover_once(epoch)
                self._metrics.gap_recoveries.labels(outcome="ok").inc()
                return
            except Exception as exc:
                # The gap stays open; the next attempt (or the next epoch) starts from the same watermark.
                delay = backoff.next_delay()
                self._metrics.gap_recoveries.labels(outcome="error").inc()
                log.warning("gap recovery failed; retrying", address=self.address, error=repr(exc), retry_in=delay)
                await asyncio.sleep(delay)

    async def _recover_once(self, epoch: int) -> None:
        conn = self.connection
        covered_to = self._wall_ms()
        if self._gap_start is not None:
            start = max(0, self._gap_start - int(self._cfg.backfill_margin * 1000))
            history = await self._read_fills(start, None, priority="high", via="recovery")
            newer = sum(1 for f in history.fills if f.time > self._gap_start)
            self._metrics.backfilled_fills.labels(via="rest").inc(newer)
            if history.truncated:
                log.warning("backfill reached the exchange's fill horizon", address=self.address, start_ms=start)
            backfill = _Backfill(history.fills)
            await conn.post(backfill)
            await backfill.done.wait()  # pending oids must include orders the backfill just revealed
        for oid in sorted(self._tracker.pending_oids(self.address)):
            reply = await self._info.order_status(self.address, oid, priority="high")
            if reply.order is None:
                log.info("order unknown to the exchange", address=self.address, oid=oid, status=reply.status)
                continue
            await conn.post(_OrderStatus(oid, reply.order.status, reply.order.status_timestamp))
        state = await self._info.clearinghouse_state(self.address, "", priority="high")
        await conn.post(_Positions(state))
        await conn.post(_RecoveryDone(epoch, covered_to))

    # ------------------------------------------------------------------ fill audit

    async def _audit_loop(self) -> None:
        interval = self._cfg.fill_audit_interval
        await asyncio.sleep(interval * self._rng.uniform(AUDIT_FIRST_MIN_SHARE, 1.0))
        while True:
            try:
                await self._audit()
            except Exception as exc:  # an audit never takes the stream down; the next one covers this stretch
                self._metrics.fill_audits.labels(outcome="error").inc()
                log.warning("fill audit failed", address=self.address, error=repr(exc))
            await asyncio.sleep(interval)

    def _audit_epoch(self) -> int | None:
        """The connection epoch an audit may run in: live, and its gap recovery done (else that covers it)."""
        conn = self.connection
        if conn.state is ConnState.LIVE and self._recovered_epoch == conn.epoch:
            return conn.epoch
        return None

    async def _audit(self) -> None:
        conn = self.connection
        start = self._audited_to
        epoch = self._audit_epoch()
        if start is None or epoch is None:
            self._metrics.fill_audits.labels(outcome="skipped").inc()
            return
        end = self._wall_ms() - AUDIT_LAG_MS
        history = await self._read_fills(start - AUDIT_OVERLAP_MS, end, priority="low", via="audit")
        audit = _Backfill(history.fills, audit_epoch=epoch)
        await conn.post(audit)
        await audit.done.wait()
        if audit.stale:
            self._metrics.fill_audits.labels(outcome="skipped").inc()
            return
        self.audits += 1
        self._audited_to = max(start, end)
        if not audit.unseen:
            self._metrics.fill_audits.labels(outcome="ok").inc()
            return
        self.fills_missed += audit.unseen
        self._metrics.fill_audits.labels(outcome="missed").inc()
        self._metrics.backfilled_fills.labels(via="audit").inc(audit.unseen)
        log.warning(
            "userFills missed fills the REST audit found; recovered them, rebuilding the subscription",
            address=self.address,
            missed=audit.unseen,
            window_ms=(start - AUDIT_OVERLAP_MS, end),
        )
        conn.request_reconnect("fills_missed", epoch)
