"""The owner of what whales hold: feeds the pure `PositionModel`, and sends what it finds on its way.

Inputs (docs/architecture.md §9), each from the component that reads it:
- precise tier (`feeds.user_stream`): `userFills` fills (not the subscription snapshot: the first state frame
  is the baseline), `allDexsClearinghouseState` and `spotState` frames;
- wide tier: the tape's trades of addresses tracked `wide` (`feeds.market_tape`), and the REST reads of the
  wide reader (`feeds.wide`);
- marks: `allMids` (`feeds.marks`), applied at most every `MARK_APPLY_INTERVAL_S`.
Outputs, for every input that changed something:
- each position event and liquidation alert as a `Publication` (persisted first, then JetStream with its
  deterministic id: `hl.positions.{address}.{symbol}`, `hl.alerts.{address}.{symbol}.liquidation_risk`), and
  each event's history row;
- the address's document, to the database (`hlm_positions`, with the model's bookkeeping) and the KV view
  (`hl_positions`). Changed documents are written together every `DOCUMENT_FLUSH_S` (a whale trading many times a
  second costs one write per flush, not one per trade; events and alerts never wait); a document that only moved
  with the marks is refreshed in the KV at most every `positions.kv_refresh`
  per address and at most `KV_MARK_WRITES_PER_S` documents a second in all, round robin, so 100k wide addresses
  with open positions cost a bounded write rate (their refresh interval stretches to N ÷ that rate);
- with each document written, an account-value sample for the console's chart (`hlm_account_values`), at most
  one per address every `ACCOUNT_VALUE_SAMPLE_S` and only when the value moved, so its rate is bounded by the
  document writes above as well.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Protocol

import msgspec

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import Config, PositionsConfig
from hl_monitor.delivery.kv_view import KvView
from hl_monitor.delivery.publications import (
    PublicationOutbox,
    PublicationPublisher,
    PublicationSinkImpl,
    alert_subject,
    position_subject,
)
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.domain.publication import Publication, PublicationSink
from hl_monitor.errors import PortfolioStateError
from hl_monitor.feeds.marks import MarkBudget, MarkFeed
from hl_monitor.hyperliquid.protocol import (
    AllDexsClearinghouseStateData,
    ClearinghouseState,
    Fill,
    SpotState,
    WsTrade,
)
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.storage.repository import Repository
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.portfolio import AddressPortfolio, PositionChanges, PositionModel
from hl_monitor.tracking.position_events import PositionEvent, format_decimal
from hl_monitor.tracking.risk import RiskAlert

__all__ = ["PortfolioStore", "PositionKeeper", "PositionsKv", "PositionsTier", "open_positions", "positions_tier"]

log = get_logger(__name__)

# allMids arrives on every mid change (several times a second on a busy exchange); revaluing every holder that
# often would cost loop time for no reader's benefit. Marks are folded and applied this often.
MARK_APPLY_INTERVAL_S: Final = 1.0
# Upper bound of mark-driven KV refreshes a second over all addresses (changes are not limited): 100k wide
# addresses with open positions are then each refreshed every 100 s instead of every `kv_refresh`.
KV_MARK_WRITES_PER_S: Final = 1000
# The KV refresher wakes this often; each wake writes at most its share of the rate above.
KV_TICK_S: Final = 0.25
# Changed documents are written (KV and table) this often: the latest state of a busy whale, once per flush.
DOCUMENT_FLUSH_S: Final = 0.25

# The console's account-value chart stores at most one sample per address this often: a whale whose value moves
# with every mark costs a row a minute (1,440 a day), not one per KV refresh.
ACCOUNT_VALUE_SAMPLE_S: Final = 60.0

_ENCODE: Final = msgspec.json.Encoder(decimal_format="string")


class PortfolioStore(Protocol):
    """The storage writer's position intake (`storage.writer.BatchWriter`)."""

    async def put_portfolio(
        self, address: str, doc: AddressPortfolio, encoded: bytes | None = None, model_state: bytes | None = None
    ) -> None: ...
    async def delete_portfolio(self, address: str) -> None: ...
    async def put_position_event(self, event: PositionEvent) -> None: ...
    async def put_account_value(self, address: str, time_ms: int, value: Decimal) -> None: ...


class PortfolioSource(Protocol):
    """Where a restart finds the model's bookkeeping (`storage.repository.Repository`)."""

    async def load_position_states(self) -> list[bytes]: ...


class PositionsKv(Protocol):
    """The `hl_positions` KV view (`delivery.kv_view.PositionsView`): coalescing, latest value wins."""

    async def put(self, address: str, doc_json: bytes) -> None: ...
    async def delete(self, address: str) -> None: ...


class PositionKeeper:
    """See the module docstring. `run()` applies marks and refreshes the KV until cancelled."""

    def __init__(
        self,
        model: PositionModel,
        *,
        cfg: PositionsConfig,
        publish: PublicationSink,
        store: PortfolioStore,
        kv: PositionsKv,
        metrics: Metrics,
        tracked_wide: Callable[[str], bool],
        labels: Callable[[str], str] = lambda _address: "",
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self._labels = labels
        self.model = model
        self._cfg = cfg
        self._publish = publish
        self._store = store
        self._kv = kv
        self._metrics = metrics
        self._tracked_wide = tracked_wide
        self._wall_ms = wall_ms
        # coin → its latest mid and the local time that mid was received (the model's order of marks and states).
        self._pending_mids: dict[str, tuple[Decimal, int]] = {}
        # Addresses whose document moved only with the marks, oldest first; with the time of their last KV write.
        self._mark_dirty: OrderedDict[str, None] = OrderedDict()
        self._kv_written: dict[str, int] = {}
        # Addresses whose document changed since the last flush (insertion-ordered, no duplicates).
        self._changed_docs: dict[str, None] = {}
        self._refresh_ms = round(cfg.kv_refresh * 1000)
        # Each address's last stored account-value sample: (ms, value).
        self._sampled: dict[str, tuple[int, Decimal]] = {}

    async def restore(self, source: PortfolioSource) -> int:
        """Start from what the last run stored: documents, remembered executions and alert states.

        A fill replayed by the first snapshot or the gap recovery is then recognised (no second event), a fill
        missed while the service was down is a new event, and an alert already sent is not sent again.
        """
        restored = 0
        for raw in await source.load_position_states():
            try:
                self.model.restore_account(raw)
                restored += 1
            except PortfolioStateError as exc:
                self._metrics.position_restore_errors.inc()
                log.error("a stored position state could not be restored; the address starts afresh", error=str(exc))
        log.info("positions restored", addresses=restored)
        return restored

    # ------------------------------------------------------------------ reading

    def portfolio(self, address: str) -> AddressPortfolio | None:
        return self.model.get(address)

    def portfolios(self) -> list[AddressPortfolio]:
        return [doc for address in self.model if (doc := self.model.get(address)) is not None]

    def label(self, address: str) -> str:
        return self._labels(address)

    def position_fields(self, address: str, coin: str) -> tuple[Decimal | None, int | None, Decimal | None] | None:
        """`(entry_px, leverage, liquidation_px)` of the address's position in `coin` as far as known."""
        doc = self.model.get(address)
        position = doc.position(coin) if doc is not None else None
        if position is None:
            return None
        return position.entry_px, position.leverage, position.liquidation_px

    # ------------------------------------------------------------------ precise tier

    async def on_fills(self, address: str, fills: Sequence[Fill], now_ms: int) -> None:
        out = PositionChanges()
        for fill in fills:
            _merge(out, self.model.on_fill(address, fill, now_ms))
        await self._changed(address, out)

    async def on_state(self, data: AllDexsClearinghouseStateData, now_ms: int) -> None:
        await self._changed(data.user, self.model.on_all_dexs_state(data, now_ms))

    async def on_spot(self, address: str, state: SpotState, now_ms: int) -> None:
        self.model.on_spot_state(address, state, now_ms)
        await self._changed(address, PositionChanges())

    # ------------------------------------------------------------------ wide tier

    async def on_trades(self, trades: Sequence[WsTrade], now_ms: int) -> None:
        """Tape trades of one coin; only parties the tape tracks as `wide` are the wide tier's to account."""
        touched: dict[str, PositionChanges] = {}
        for trade in trades:
            if trade.users is None:
                continue
            for user in set(trade.users):
                address = user.lower()
                if self._tracked_wide(address):
                    _merge(touched.setdefault(address, PositionChanges()), self.model.on_trade(address, trade, now_ms))
        for address, changes in touched.items():
            await self._changed(address, changes)

    async def on_rest(
        self,
        address: str,
        states: Sequence[tuple[str, ClearinghouseState]],
        spot: SpotState | None,
        now_ms: int,
    ) -> None:
        out = PositionChanges()
        for dex, state in states:
            _merge(out, self.model.on_dex_state(address, dex, state, now_ms, source="rest"))
        if spot is not None:
            self.model.on_spot_state(address, spot, now_ms, source="rest")
        await self._changed(address, out)

    # ------------------------------------------------------------------ marks and the watched set

    async def on_marks(self, mids: Mapping[str, Decimal], now_ms: int) -> None:
        for coin, mid in mids.items():
            self._pending_mids[coin] = (mid, now_ms)

    async def forget(self, addresses: Collection[str]) -> None:
        """Addresses no longer watched: their documents leave the KV view and the table."""
        for address in addresses:
            if self.model.remove(address):
                self._mark_dirty.pop(address, None)
                self._changed_docs.pop(address, None)
                self._kv_written.pop(address, None)
                self._sampled.pop(address, None)
                await self._kv.delete(address)
                await self._store.delete_portfolio(address)

    @property
    def pending_documents(self) -> int:
        """Changed documents not yet handed to the KV view and the table."""
        return len(self._changed_docs)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._apply_marks_loop(), name="positions:marks")
            tg.create_task(self._kv_refresh_loop(), name="positions:kv")
            tg.create_task(self._flush_documents_loop(), name="positions:documents")

    async def _flush_documents_loop(self) -> None:
        while True:
            await asyncio.sleep(DOCUMENT_FLUSH_S)
            await self.flush_documents()

    async def flush_documents(self) -> int:
        """Write every changed document to the KV view and the table (also the shutdown's last step); how many."""
        changed, self._changed_docs = self._changed_docs, {}
        now = self._wall_ms()
        for address in changed:
            doc = self.model.get(address)
            if doc is None:
                continue  # forgotten meanwhile: its delete already went out
            self._mark_dirty.pop(address, None)
            encoded = await self._write_kv(address, doc, now)
            await self._store.put_portfolio(address, doc, encoded, self.model.export_account(address))
        return len(changed)

    async def _apply_marks_loop(self) -> None:
        while True:
            await asyncio.sleep(MARK_APPLY_INTERVAL_S)
            await self.apply_marks()

    async def apply_marks(self) -> None:
        """Revalue every holder of a coin whose mid moved; alerts go out, documents wait for the KV refresher."""
        if not self._pending_mids:
            return
        pending, self._pending_mids = self._pending_mids, {}
        by_receipt: dict[int, dict[str, Decimal]] = {}
        for coin, (mid, received_ms) in pending.items():
            by_receipt.setdefault(received_ms, {})[coin] = mid
        alerts: list[RiskAlert] = []
        for received_ms in sorted(by_receipt):  # a state frame received after a mid keeps its own mark
            alerts.extend(self.model.on_marks(by_receipt[received_ms], received_ms))
        for address in self.model.holders(pending):
            self._mark_dirty[address] = None
        if alerts:
            await self._send([], alerts)
            for alert in alerts:  # the disarmed levels must survive a restart
                self._changed_docs[alert.address] = None

    async def _kv_refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(KV_TICK_S)
            await self.refresh_kv(round(KV_MARK_WRITES_PER_S * KV_TICK_S))

    async def refresh_kv(self, budget: int) -> int:
        """Write up to `budget` mark-moved documents whose last write is `kv_refresh` old; how many were written."""
        now = self._wall_ms()
        written = 0
        for address in list(self._mark_dirty):
            if written >= budget:
                break
            if now - self._kv_written.get(address, 0) < self._refresh_ms:
                continue
            del self._mark_dirty[address]
            doc = self.model.get(address)
            if doc is not None:
                await self._write_kv(address, doc, now)
                written += 1
        return written

    # ------------------------------------------------------------------ outputs

    async def _changed(self, address: str, changes: PositionChanges) -> None:
        address = address.lower()
        doc = self.model.get(address)
        if doc is None:
            return
        await self._send(changes.events, changes.alerts)
        self._changed_docs[address] = None

    async def _write_kv(self, address: str, doc: AddressPortfolio, now: int) -> bytes:
        self._kv_written[address] = now
        encoded = _ENCODE.encode(doc)
        await self._kv.put(address, encoded)
        await self._sample(address, doc.account_value, now)
        return encoded

    async def _sample(self, address: str, value: Decimal | None, now: int) -> None:
        """Store the account value when it moved and the last sample is `ACCOUNT_VALUE_SAMPLE_S` old."""
        if value is None:
            return
        last = self._sampled.get(address)
        if last is not None and (last[1] == value or now - last[0] < ACCOUNT_VALUE_SAMPLE_S * 1000):
            return
        self._sampled[address] = (now, value)
        await self._store.put_account_value(address, now, value)

    async def _send(self, events: Sequence[PositionEvent], alerts: Sequence[RiskAlert]) -> None:
        now = self._wall_ms()
        out: list[Publication] = []
        for event in events:
            await self._store.put_position_event(event)
            self._metrics.position_events.labels(event=event.event).inc()
            out.append(
                Publication(
                    msg_id=event.event_id,
                    kind="position_event",
                    subject=position_subject(self._cfg.subject_prefix, event.address, event.symbol),
                    payload=_ENCODE.encode(event),
                    created_at=now,
                )
            )
        for alert in alerts:
            self._metrics.liquidation_alerts.labels(level=format_decimal(alert.level)).inc()
            out.append(
                Publication(
                    msg_id=alert.alert_id,
                    kind="alert",
                    subject=alert_subject(self._cfg.alerts_prefix, alert.address, alert.symbol),
                    payload=_ENCODE.encode(alert),
                    created_at=now,
                )
            )
        if out:
            await self._publish(out)


def _merge(into: PositionChanges, more: PositionChanges) -> None:
    into.events.extend(more.events)
    into.alerts.extend(more.alerts)


@dataclass(frozen=True, slots=True)
class PositionsTier:
    """What whales hold: the keeper of the model, its mark feed, and where its outputs go (`positions.enabled`)."""

    keeper: PositionKeeper
    marks: MarkFeed | None  # None: marks ride on the tape's first connection (or no connection is left for them)
    outbox: PublicationOutbox
    kv: KvView


async def open_positions(
    cfg: Config,
    publisher: Publisher,
    repo: Repository,
    writer: BatchWriter,
    metrics: Metrics,
    *,
    tracked_wide: Callable[[str], bool],
    labels: Callable[[str], str],
    on_published: Callable[[Publication], None] | None = None,
) -> tuple[PositionKeeper, PublicationOutbox, KvView]:
    """The positions stream and KV bucket (created or updated), their outbox, and the keeper restored from the store
    (`on_published`: sees each acknowledged position event and alert, must not block)."""
    positions_publisher = PublicationPublisher(publisher, cfg.nats, cfg.positions, metrics)
    await positions_publisher.ensure_stream()
    outbox = PublicationOutbox(positions_publisher, repo, writer, metrics, cfg.nats, on_published=on_published)
    kv = KvView(publisher, cfg.nats, cfg.positions, metrics)
    await kv.open()
    keeper = PositionKeeper(
        PositionModel(alert_levels=[Decimal(str(level)) for level in cfg.positions.liquidation_alert_levels]),
        cfg=cfg.positions,
        publish=PublicationSinkImpl(writer, outbox),
        store=writer,
        kv=kv,
        metrics=metrics,
        tracked_wide=tracked_wide,
        labels=labels,
    )
    await keeper.restore(repo)
    return keeper, outbox, kv


def positions_tier(
    cfg: Config,
    keeper: PositionKeeper,
    outbox: PublicationOutbox,
    kv: KvView,
    *,
    with_tape: bool,
    budget: MarkBudget,
    metrics: Metrics,
    mark_dexes: Sequence[str],
) -> PositionsTier:
    """The positions tier; its marks ride on the tape's first connection, without a tape on a connection of their
    own (when one is left beside the precise slots)."""
    marks: MarkFeed | None = None
    if not with_tape and cfg.hyperliquid.user_slots < cfg.hyperliquid.max_connections:
        marks = MarkFeed(cfg.hyperliquid, intake=keeper, budget=budget, metrics=metrics, dexes=mark_dexes)
    elif not with_tape:
        log.warning("every connection is a precise slot: marks move only with state frames")
    return PositionsTier(keeper=keeper, marks=marks, outbox=outbox, kv=kv)
