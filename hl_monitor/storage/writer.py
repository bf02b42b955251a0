"""The batch writer: coalesce by natural key, write chunked multi-row upserts, retry forever, lose nothing.

Puts land in a buffer keyed by each table's natural key (signal_id, msg_id, event_id, address+oid+direction,
address); a newer put for a buffered key replaces or merges into the buffered row (counted as
`batch_dedup_cache_hit`); a position document deleted while its put is buffered is only deleted. The
buffer is bounded (`writer.queue_size` distinct rows, counting those being written): a put that needs a new
slot waits (backpressure, counted in `writer_queue_full`), it never drops.

A flush swaps the buffer out and writes it in ONE transaction, one statement per chunk of
`writer.batch_size` rows per table, in this order: voided pending aggregations of removed addresses,
signal inserts, publish marks, signal holdings ended and started, publication inserts, their publish marks,
position events, account-value samples, aggregation upserts, aggregation closes, watermarks, deleted position
documents, position documents.
Upserts use one cached statement per table executed with the chunk's rows (compiled once; the driver
batches them: sqlite3's executemany, pymysql's multi-row rewrite of `INSERT … VALUES … ON DUPLICATE KEY`),
so a flush never rebuilds SQLAlchemy constructs per row and value. Only where the driver would not batch
(MySQL >= 8.0.20, whose `AS new` row alias pymysql does not recognise) a multi-row statement is built per
chunk.

Where the work runs (docs/architecture.md §10): puts and coalescing are dict operations on the event loop; a
flush hands the swapped-out buffer to the writer's own thread, which builds the statements, escapes the values
and talks to the database on a blocking connection of its own (`repository.create_blocking_engine`, one
connection). The loop only awaits the thread's answer, so no SQL building, escaping or driver I/O ever holds the
feeds. One thread, one flush at a time: transactions commit in put order, exactly as on the loop before.
On a transient error (server gone, lock, timeout) the same batch is retried with exponential backoff
until it commits, while new puts keep coalescing into the next buffer. A row the database refuses as
invalid (DataError/IntegrityError) cannot succeed by waiting: the batch is then written chunk by
chunk and row by row, and only the refused rows are logged in full and counted (`writer_rejected`)
instead of blocking every later write forever.

Legacy tables (`database.legacy_tables`, `storage.legacy`): the same puts also buffer the old service's rows,
coalesced by their own keys and written in the same transaction after the rows they mirror: `hl_address_signal`
right after the signal inserts (only for signals that flush stored for the first time, so a replayed signal is
never a second legacy row), `hl_order_aggregation` after the aggregations, `hl_position_cache` after the
position documents. Off, nothing of this is buffered.

Ordering contract with delivery: call `put_signal` (`put_publication`) before handing the message to its
outbox, so the "mark published" that follows its ack is always queued after the insert (FIFO), either merged
into the buffered insert or written as an UPDATE after the insert committed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import chain
from typing import Any, Final

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.clock import wall_ms as now_ms
from hl_monitor.config import DatabaseConfig, WriterConfig
from hl_monitor.domain.publication import Publication
from hl_monitor.domain.signal import Signal
from hl_monitor.errors import StorageError
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.storage import tables as t
from hl_monitor.storage.legacy import (
    legacy_aggregation_row,
    legacy_direction,
    legacy_position_row,
    legacy_signal_row,
)
from hl_monitor.storage.repository import (
    ACCOUNT_VALUE_KEYS,
    ACCOUNT_VALUE_UPDATE,
    ADDRESS_KEYS,
    AGG_KEYS,
    AGG_UPDATE,
    BY_ADDRESS_UPDATE,
    EVENT_KEYS,
    EVENT_UPDATE,
    HOLDING_KEYS,
    HOLDING_UPDATE,
    LEGACY_AGG_KEYS,
    LEGACY_AGG_UPDATE,
    LEGACY_POSITION_UPDATE,
    MAX_MARKS_PER_STATEMENT,
    POSITION_UPDATE,
    PUBLICATION_KEYS,
    PUBLICATION_UPDATE,
    SIGNAL_KEYS,
    SIGNAL_UPDATE,
    AggKey,
    close_aggregations_statement,
    create_blocking_engine,
    delete_holdings_statement,
    delete_legacy_positions_statement,
    delete_positions_statement,
    encode_json,
    is_transient,
    mark_publications_call,
    mark_published_call,
    max_rows_per_statement,
    portfolio_row,
    position_event_row,
    publication_row,
    signal_row,
    upsert,
    upsert_statement,
    void_legacy_statement,
    void_pending_statement,
)
from hl_monitor.tracking.portfolio import AddressPortfolio
from hl_monitor.tracking.position_events import PositionEvent
from hl_monitor.tracking.state import AggregationRecord, StateDelta

log = get_logger(__name__)

Payload = bytes | str | Mapping[str, Any] | msgspec.Struct
Row = dict[str, Any]

# Backoff jitter: each pause is the nominal delay times a factor in [1 - JITTER, 1 + JITTER], so several
# instances hitting one recovering database do not retry in lockstep.
JITTER: Final = 0.2
# A refused row is logged in full but cut to this many characters (a huge fills record must not flood logs).
MAX_LOGGED_ROW_CHARS: Final = 4000


@dataclass
class _Buffer:
    """Rows waiting to be written, by natural key; insertion order is kept (dicts)."""

    signals: dict[str, Row] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)  # publish acks for signals no longer buffered
    holdings: dict[tuple[str, str], Row] = field(default_factory=dict)  # (address, coin) → holding row
    ended_holdings: set[tuple[str, str]] = field(default_factory=set)  # to delete (no put after the end)
    publications: dict[str, Row] = field(default_factory=dict)
    publication_marks: dict[str, int] = field(default_factory=dict)  # acks for publications no longer buffered
    position_events: dict[str, Row] = field(default_factory=dict)
    account_values: dict[tuple[str, int], Row] = field(default_factory=dict)  # (address, time) → sample row
    aggregations: dict[AggKey, Row] = field(default_factory=dict)
    closes: dict[AggKey, tuple[str | None, int]] = field(default_factory=dict)  # (status, at) for unbuffered rows
    watermarks: dict[str, Row] = field(default_factory=dict)
    positions: dict[str, Row] = field(default_factory=dict)
    deleted_positions: set[str] = field(default_factory=set)  # documents to delete (no put after the delete)
    voided: set[str] = field(default_factory=set)  # addresses whose stored pending aggregations are void
    # The old service's rows (`database.legacy_tables`): signal_id → (its hlm_signals created_at, row), and by key.
    legacy_signals: dict[str, tuple[int, Row]] = field(default_factory=dict)
    legacy_aggregations: dict[AggKey, Row] = field(default_factory=dict)
    legacy_positions: dict[str, Row] = field(default_factory=dict)
    legacy_deleted_positions: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return (
            len(self.legacy_signals)
            + len(self.legacy_aggregations)
            + len(self.legacy_positions)
            + len(self.legacy_deleted_positions)
            + len(self.voided)
            + len(self.signals)
            + len(self.marks)
            + len(self.holdings)
            + len(self.ended_holdings)
            + len(self.publications)
            + len(self.publication_marks)
            + len(self.position_events)
            + len(self.account_values)
            + len(self.deleted_positions)
            + len(self.aggregations)
            + len(self.closes)
            + len(self.watermarks)
            + len(self.positions)
        )


# One statement execution: the statement and its parameters (None, a dict, or a list of rows = executemany).
_Call = tuple[sa.Executable, Any]


@dataclass
class _Op:
    """One kind of write: its rows, and how to turn a chunk of them into one statement execution (or, with `run`,
    into whatever statements the chunk needs on the flush's connection)."""

    table: str
    rows: list[Any]
    build: Callable[[list[Any]], _Call]
    chunk: int
    run: Callable[[sa.Connection, list[Any]], None] | None = None


class BatchWriter:
    """Buffered, coalescing, retrying writer for the hot tables. Run `run()` in the service TaskGroup."""

    def __init__(
        self,
        engine: AsyncEngine,
        cfg: WriterConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], int] = now_ms,
        legacy_tables: bool = False,
        symbol_of: Callable[[str], str] | None = None,
        database: DatabaseConfig | None = None,
    ) -> None:
        """`engine` names the database; the writer writes through a blocking engine of its own on the same URL,
        with `database`'s session settings (timeouts, TLS; defaults when not given)."""
        self.engine = engine
        self.cfg = cfg
        self.metrics = metrics
        self.dialect = engine.dialect.name
        self._blocking = create_blocking_engine(engine.url, database or DatabaseConfig())
        # The one thread that runs every flush's SQL (module docstring): FIFO, one transaction at a time.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hlm-writer")
        self._clock = clock
        self.legacy_tables = legacy_tables  # also write the old service's tables (module docstring)
        self._symbol_of = symbol_of or (lambda coin: coin)  # coin → symbol for hl_order_aggregation
        self._pending = _Buffer()
        self._inflight: _Buffer | None = None
        self._inflight_seq = 0
        self._put_seq = 0  # puts accepted so far
        self._written_seq = 0  # every put up to this one is committed
        self._lock = asyncio.Lock()  # one flush at a time: no two writers race on the same keys
        self._space = asyncio.Condition()
        self._wake = asyncio.Event()
        self._closed = False
        self._stopped = asyncio.Event()
        self._current_table = ""
        self._upserts: dict[str, sa.Executable | None] = {}  # table → cached batched upsert (None: build per chunk)

    # ------------------------------------------------------------ puts

    async def put_signal(self, signal: Signal) -> None:
        """Persist a signal (unpublished). Idempotent on signal_id: a repeated put changes nothing stored."""
        buf = await self._slot(signal.signal_id in self._pending.signals)
        existing = buf.signals.get(signal.signal_id)
        if existing is not None:
            self._hit("signals")
        else:
            at = buf.marks.pop(signal.signal_id, None)
            created = self._clock()
            buf.signals[signal.signal_id] = signal_row(signal, created, at)
            if self.legacy_tables:
                buf.legacy_signals[signal.signal_id] = (created, legacy_signal_row(signal))
        self._accepted()

    async def mark_published(self, signal_id: str, at_ms: int) -> None:
        """Record the JetStream ack of a signal (merged into its buffered insert when still buffered)."""
        buf = await self._slot(signal_id in self._pending.signals or signal_id in self._pending.marks)
        row = buf.signals.get(signal_id)
        if row is not None:
            self._hit("signals")
            if not row["published"]:
                row["published"], row["published_at"] = True, at_ms
        elif signal_id in buf.marks:
            self._hit("signals")
        else:
            buf.marks[signal_id] = at_ms
        self._accepted()

    async def put_holding(self, address: str, coin: str, signal_id: str) -> None:
        """Record that the open `signal_id` of this position was published (the sink's holdings); after the signal."""
        key = (address, coin)
        pending = self._pending
        buf = await self._slot(key in pending.holdings or key in pending.ended_holdings)
        if key in buf.holdings or key in buf.ended_holdings:
            self._hit("signal_holdings")
        buf.ended_holdings.discard(key)
        buf.holdings[key] = {"address": address, "coin": coin, "signal_id": signal_id, "updated_at": self._clock()}
        self._accepted()

    async def end_holding(self, address: str, coin: str) -> None:
        """The position's closing signal was handled: forget the holding (supersedes a buffered put)."""
        key = (address, coin)
        pending = self._pending
        buf = await self._slot(key in pending.holdings or key in pending.ended_holdings)
        if buf.holdings.pop(key, None) is not None or key in buf.ended_holdings:
            self._hit("signal_holdings")
        buf.ended_holdings.add(key)
        self._accepted()

    async def put_aggregation(
        self,
        address: str,
        oid: int,
        direction: str,
        record: Payload,
        *,
        coin: str,
        status: str,
        fill_count: int,
        first_fill_time: int,
        last_fill_time: int,
        twap_id: int | None = None,
        closed: bool = False,
    ) -> None:
        """Upsert an aggregation row; `record` is the engine's own JSON/Struct. `closed`: its signal was built."""
        key = (address, oid, direction)
        buf = await self._slot(key in self._pending.aggregations or key in self._pending.closes)
        if key in buf.aggregations or key in buf.closes:
            self._hit("aggregations")
        buf.closes.pop(key, None)  # the later upsert decides the row's state
        now = self._clock()
        buf.aggregations[key] = {
            "address": address,
            "oid": oid,
            "direction": direction,
            "twap_id": twap_id,
            "coin": coin,
            "status": status,
            "fill_count": fill_count,
            "first_fill_time": first_fill_time,
            "last_fill_time": last_fill_time,
            "record": encode_json(record),
            "closed": closed,
            "closed_at": now if closed else None,
            "updated_at": now,
        }
        self._accepted()

    async def close_aggregation(self, address: str, oid: int, direction: str, *, status: str | None = None) -> None:
        """Mark an aggregation flushed (its signal was emitted); retention deletes it later."""
        key = (address, oid, direction)
        at = self._clock()
        buf = await self._slot(key in self._pending.aggregations or key in self._pending.closes)
        row = buf.aggregations.get(key)
        if row is not None:
            self._hit("aggregations")
            row.update(closed=True, closed_at=at, updated_at=at)
            if status is not None:
                row["status"] = status
        else:
            if key in buf.closes:
                self._hit("aggregations")
            buf.closes[key] = (status, at)
        self._accepted()

    async def put_record(self, record: AggregationRecord) -> None:
        """Upsert one engine record (pending, or flushed: then the row is closed and kept for a restart)."""
        await self.put_aggregation(
            record.address,
            record.oid,
            record.direction,
            record,
            coin=record.coin,
            status=record.status or "",
            fill_count=len(record.fills),
            first_fill_time=record.first_fill_time,
            last_fill_time=record.last_fill_time,
            twap_id=record.twap_id,
            closed=record.state == "flushed",
        )
        if self.legacy_tables:
            key = (record.address, record.oid, legacy_direction(record))
            buf = await self._slot(key in self._pending.legacy_aggregations)
            if key in buf.legacy_aggregations:
                self._hit(t.legacy_order_aggregation.name)
            buf.legacy_aggregations[key] = legacy_aggregation_row(record, self._symbol_of(record.coin), self._clock())
            self._accepted()

    async def put_delta(self, delta: StateDelta) -> None:
        """Persist what `TrackingEngine.take_dirty()` returned."""
        for address in delta.removed_addresses:
            await self.void_pending(address)
        for record in chain(delta.upserted, delta.closed):
            await self.put_record(record)
        for watermark in delta.watermarks:
            await self.put_watermark(watermark.address, watermark)

    async def void_pending(self, address: str) -> None:
        """Delete the address's stored pending aggregations (it stopped being tracked); flushed rows stay."""
        buf = await self._slot(address in self._pending.voided)
        for key in [k for k, row in buf.aggregations.items() if k[0] == address and not row["closed"]]:
            del buf.aggregations[key]  # older than the void: superseded by it
        for key in [k for k, row in buf.legacy_aggregations.items() if k[0] == address and not row["signal_sent"]]:
            del buf.legacy_aggregations[key]
        buf.voided.add(address)
        self._accepted()

    async def put_watermark(self, address: str, payload: Payload) -> None:
        """Upsert an address's fill high-water mark (last write wins)."""
        await self._put_by_address("watermarks", address, payload)

    async def put_portfolio(
        self, address: str, doc: AddressPortfolio, encoded: bytes | None = None, model_state: bytes | None = None
    ) -> None:
        """Upsert an address's whole position document (last write wins; a later delete supersedes it).

        `encoded` is the document's JSON when the caller has it already (the KV view gets the same bytes);
        `model_state` the position model's bookkeeping of the address, which a restart resumes from.
        """
        payload = encoded.decode() if encoded is not None else encode_json(doc)
        state = model_state.decode() if model_state is not None else None
        now = self._clock()
        await self._put_position_row(address, portfolio_row(address, doc, payload, now, state))
        if self.legacy_tables:
            pending = self._pending
            buf = await self._slot(address in pending.legacy_positions or address in pending.legacy_deleted_positions)
            if address in buf.legacy_positions or address in buf.legacy_deleted_positions:
                self._hit(t.legacy_position_cache.name)
            buf.legacy_deleted_positions.discard(address)
            buf.legacy_positions[address] = legacy_position_row(doc, now)
            self._accepted()

    async def delete_portfolio(self, address: str) -> None:
        """Delete an address's position document (the address is no longer watched); supersedes a buffered put."""
        pending = self._pending
        buf = await self._slot(address in pending.positions or address in pending.deleted_positions)
        if buf.positions.pop(address, None) is not None or address in buf.deleted_positions:
            self._hit("positions")
        buf.deleted_positions.add(address)
        self._accepted()
        if self.legacy_tables:
            buf = await self._slot(address in pending.legacy_positions or address in pending.legacy_deleted_positions)
            if buf.legacy_positions.pop(address, None) is not None or address in buf.legacy_deleted_positions:
                self._hit(t.legacy_position_cache.name)
            buf.legacy_deleted_positions.add(address)
            self._accepted()

    async def _put_position_row(self, address: str, row: Row) -> None:
        pending = self._pending
        buf = await self._slot(address in pending.positions or address in pending.deleted_positions)
        if address in buf.positions or address in buf.deleted_positions:
            self._hit("positions")
        buf.deleted_positions.discard(address)  # the upsert alone leaves the row as this put wants it
        buf.positions[address] = row
        self._accepted()

    async def put_position_event(self, event: PositionEvent) -> None:
        """Persist a position event. Idempotent on event_id: a repeated put changes nothing stored."""
        buf = await self._slot(event.event_id in self._pending.position_events)
        if event.event_id in buf.position_events:
            self._hit("position_events")
        else:
            buf.position_events[event.event_id] = position_event_row(event, self._clock())
        self._accepted()

    async def put_account_value(self, address: str, time_ms: int, value: Decimal) -> None:
        """Persist one account-value sample (the console's chart). Idempotent on (address, time)."""
        key = (address, time_ms)
        buf = await self._slot(key in self._pending.account_values)
        if key in buf.account_values:
            self._hit("account_values")
        buf.account_values[key] = {"address": address, "time": time_ms, "account_value": value}
        self._accepted()

    async def put_publication(self, publication: Publication) -> None:
        """Persist a publication (unpublished) before it goes to its outbox. Idempotent on msg_id."""
        msg_id = publication.msg_id
        buf = await self._slot(msg_id in self._pending.publications)
        if msg_id in buf.publications:
            self._hit("publications")
        else:
            buf.publications[msg_id] = publication_row(publication, buf.publication_marks.pop(msg_id, None))
        self._accepted()

    async def mark_publication_published(self, msg_id: str, at_ms: int) -> None:
        """Record the JetStream ack of a publication (merged into its buffered insert when still buffered)."""
        pending = self._pending
        buf = await self._slot(msg_id in pending.publications or msg_id in pending.publication_marks)
        row = buf.publications.get(msg_id)
        if row is not None:
            self._hit("publications")
            if row["published_at"] is None:
                row["published_at"] = at_ms
        elif msg_id in buf.publication_marks:
            self._hit("publications")
        else:
            buf.publication_marks[msg_id] = at_ms
        self._accepted()

    async def _put_by_address(self, table: str, address: str, payload: Payload) -> None:
        buf = await self._slot(address in getattr(self._pending, table))
        rows: dict[str, Row] = getattr(buf, table)
        if address in rows:
            self._hit(table)
        rows[address] = {"address": address, "payload": encode_json(payload), "updated_at": self._clock()}
        self._accepted()

    async def _slot(self, coalesces: bool) -> _Buffer:
        """The buffer to put into, after waiting for space unless the put only replaces a buffered row."""
        if self._closed:
            raise StorageError("batch writer is closed")
        if not coalesces and self._depth() >= self.cfg.queue_size:
            self.metrics.writer_queue_full.inc()
            self._wake.set()
            async with self._space:
                await self._space.wait_for(lambda: self._depth() < self.cfg.queue_size)
        return self._pending

    def _hit(self, table: str) -> None:
        self.metrics.batch_dedup_cache_hit.labels(table=table).inc()

    def _accepted(self) -> None:
        self._put_seq += 1
        # The depth gauge is set when a flush takes the buffer (and by the service's stats loop), not per put:
        # a labelled gauge update per row was a few percent of the loop at 20k fills/s.
        if len(self._pending) >= self.cfg.batch_size:
            self._wake.set()

    def _depth(self) -> int:
        return len(self._pending) + (len(self._inflight) if self._inflight is not None else 0)

    # ------------------------------------------------------------ flushing

    async def run(self) -> None:
        """Flush every `flush_interval`, or at once when a batch is full, until `close()`."""
        try:
            while not self._closed:
                try:
                    async with asyncio.timeout(self.cfg.flush_interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                await self._flush_once()
        finally:
            self._stopped.set()

    async def flush(self) -> None:
        """Return once everything put before this call is committed (retrying as long as it takes)."""
        target = self._put_seq
        while self._written_seq < target:
            await self._flush_once()

    async def close(self) -> None:
        """Refuse new puts, write everything buffered, stop `run()`, close the writer's connection."""
        self._closed = True
        await self.flush()
        self._wake.set()
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._blocking.dispose)
        finally:
            # The worker is idle now; it ends on its own once told (no join on the loop).
            self._thread.shutdown(wait=False)

    @property
    def depth(self) -> int:
        """Rows buffered or being written."""
        return self._depth()

    async def _flush_once(self) -> None:
        async with self._lock:
            if self._inflight is None:
                if not self._pending:
                    self._written_seq = self._put_seq
                    return
                self._inflight, self._pending = self._pending, _Buffer()
                self._inflight_seq = self._put_seq
                self.metrics.writer_queue_depth.set(self._depth())
            batch = self._inflight
            delay = self.cfg.retry_initial_delay
            while True:
                try:
                    await self._in_thread(self._write, batch)
                    break
                except Exception as exc:
                    if not is_transient(exc):
                        log.warning("batch refused, isolating bad rows", table=self._current_table, error=str(exc))
                        try:
                            await self._in_thread(self._write_isolating, batch)
                            break
                        except Exception as again:
                            if not is_transient(again):
                                raise
                            exc = again
                    self.metrics.db_up.set(0)
                    self.metrics.writer_retries.labels(table=self._current_table or "connect").inc()
                    log.warning(
                        "database write failed, retrying",
                        table=self._current_table,
                        rows=len(batch),
                        retry_in=round(delay, 3),
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    await asyncio.sleep(delay * random.uniform(1 - JITTER, 1 + JITTER))
                    delay = min(delay * 2, self.cfg.retry_max_delay)
            self.metrics.db_up.set(1)
            self._inflight = None
            self._written_seq = self._inflight_seq
            self.metrics.writer_queue_depth.set(self._depth())
        async with self._space:
            self._space.notify_all()

    def _ops(self, batch: _Buffer) -> list[_Op]:
        d = self.dialect
        size = self.cfg.batch_size
        ops = [
            _Op(
                "aggregations",
                sorted(batch.voided),
                lambda addresses: (void_pending_statement(addresses), None),
                max_rows_per_statement(d, t.aggregations, size),
            ),
            self._upsert_op("signals", t.signals, list(batch.signals.values()), SIGNAL_KEYS, SIGNAL_UPDATE),
            _Op(
                t.legacy_address_signal.name,
                [(signal_id, created, row) for signal_id, (created, row) in batch.legacy_signals.items()],
                _no_statement,
                max_rows_per_statement(d, t.legacy_address_signal, size),
                run=_insert_legacy_signals,
            ),
            _Op(
                "signals",
                list(batch.marks.items()),
                mark_published_call,
                min(MAX_MARKS_PER_STATEMENT, max_rows_per_statement(d, t.signals, size)),
            ),
            _Op(
                "signal_holdings",
                sorted(batch.ended_holdings),
                lambda keys: (delete_holdings_statement(keys), None),
                max_rows_per_statement(d, t.signal_holdings, size),
            ),
            self._upsert_op(
                "signal_holdings", t.signal_holdings, list(batch.holdings.values()), HOLDING_KEYS, HOLDING_UPDATE
            ),
            self._upsert_op(
                "publications", t.publications, list(batch.publications.values()), PUBLICATION_KEYS, PUBLICATION_UPDATE
            ),
            _Op(
                "publications",
                list(batch.publication_marks.items()),
                mark_publications_call,
                min(MAX_MARKS_PER_STATEMENT, max_rows_per_statement(d, t.publications, size)),
            ),
            self._upsert_op(
                "position_events", t.position_events, list(batch.position_events.values()), EVENT_KEYS, EVENT_UPDATE
            ),
            self._upsert_op(
                "account_values",
                t.account_values,
                list(batch.account_values.values()),
                ACCOUNT_VALUE_KEYS,
                ACCOUNT_VALUE_UPDATE,
            ),
            self._upsert_op("aggregations", t.aggregations, list(batch.aggregations.values()), AGG_KEYS, AGG_UPDATE),
        ]
        closes_by_status: dict[str | None, list[tuple[AggKey, int]]] = {}
        for key, (status, at) in batch.closes.items():
            closes_by_status.setdefault(status, []).append((key, at))
        for status, items in closes_by_status.items():
            ops.append(
                _Op(
                    "aggregations",
                    items,
                    _closer(status),
                    max_rows_per_statement(d, t.aggregations, size),
                )
            )
        if batch.legacy_aggregations or (batch.voided and self.legacy_tables):
            ops.append(
                _Op(
                    t.legacy_order_aggregation.name,
                    sorted(batch.voided) if self.legacy_tables else [],
                    lambda addresses: (void_legacy_statement(addresses), None),
                    max_rows_per_statement(d, t.legacy_order_aggregation, size),
                )
            )
            ops.append(
                self._upsert_op(
                    t.legacy_order_aggregation.name,
                    t.legacy_order_aggregation,
                    list(batch.legacy_aggregations.values()),
                    LEGACY_AGG_KEYS,
                    LEGACY_AGG_UPDATE,
                )
            )
        ops.append(
            self._upsert_op(
                "watermarks", t.watermarks, list(batch.watermarks.values()), ADDRESS_KEYS, BY_ADDRESS_UPDATE
            )
        )
        ops.append(
            _Op(
                "positions",
                sorted(batch.deleted_positions),
                lambda addresses: (delete_positions_statement(addresses), None),
                max_rows_per_statement(d, t.positions, size),
            )
        )
        ops.append(
            self._upsert_op("positions", t.positions, list(batch.positions.values()), ADDRESS_KEYS, POSITION_UPDATE)
        )
        if batch.legacy_positions or batch.legacy_deleted_positions:
            ops.append(
                _Op(
                    t.legacy_position_cache.name,
                    sorted(batch.legacy_deleted_positions),
                    lambda addresses: (delete_legacy_positions_statement(addresses), None),
                    max_rows_per_statement(d, t.legacy_position_cache, size),
                )
            )
            ops.append(
                self._upsert_op(
                    t.legacy_position_cache.name,
                    t.legacy_position_cache,
                    list(batch.legacy_positions.values()),
                    ADDRESS_KEYS,
                    LEGACY_POSITION_UPDATE,
                )
            )
        return [op for op in ops if op.rows]

    def _upsert_op(
        self, name: str, table: sa.Table, rows: list[Row], keys: Sequence[str], update: Mapping[str, Any]
    ) -> _Op:
        d = self.dialect
        many = self._batched_upsert(table, keys, update)

        def build(chunk: list[Row]) -> _Call:
            if many is not None:
                return many, chunk
            return upsert(d, table, chunk, keys, update), None

        return _Op(name, rows, build, max_rows_per_statement(d, table, self.cfg.batch_size))

    def _batched_upsert(self, table: sa.Table, keys: Sequence[str], update: Mapping[str, Any]) -> sa.Executable | None:
        """The table's cached upsert for executemany, or None where the driver would send it row by row.

        Decided once per table after the first connection (the MySQL dialect learns the server version then).
        """
        if table.name in self._upserts:
            return self._upserts[table.name]
        stmt = upsert_statement(self.dialect, table, keys, update)
        dialect = self._blocking.dialect
        if self.dialect != "sqlite" and getattr(dialect, "server_version_info", None) is None:
            return None  # not connected yet: the per-chunk statement is right for every server
        usable = self.dialect == "sqlite" or _driver_batches(str(stmt.compile(dialect=dialect)))
        self._upserts[table.name] = stmt if usable else None
        return self._upserts[table.name]

    async def _in_thread(self, write: Callable[[_Buffer], None], batch: _Buffer) -> None:
        """Run `write(batch)` on the writer's thread; the loop awaits without doing any of it."""
        await asyncio.get_running_loop().run_in_executor(self._thread, write, batch)

    # Everything below runs on the writer's thread, never on the event loop.

    def _write(self, batch: _Buffer) -> None:
        """The whole batch in one transaction, one statement per chunk."""
        self._current_table = ""
        written: dict[str, int] = {}
        with self._blocking.begin() as conn:
            for op in self._ops(batch):
                for chunk in _chunks(op.rows, op.chunk):
                    self._execute(conn, op, chunk)
                    written[op.table] = written.get(op.table, 0) + len(chunk)
        for table, count in written.items():
            self.metrics.writer_rows.labels(table=table).inc(count)

    def _execute(self, conn: sa.Connection, op: _Op, chunk: list[Any]) -> None:
        self._current_table = op.table
        started = time.perf_counter()
        if op.run is not None:
            op.run(conn, chunk)
        else:
            statement, params = op.build(chunk)
            conn.execute(statement, params)
        self.metrics.batch_write_duration_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_write_size.observe(len(chunk))

    def _write_isolating(self, batch: _Buffer) -> None:
        """Slow path after a refused batch: each chunk in its own transaction, a refused chunk row by row."""
        for op in self._ops(batch):
            for chunk in _chunks(op.rows, op.chunk):
                try:
                    self._commit(op, chunk)
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    for row in chunk:
                        try:
                            self._commit(op, [row])
                        except Exception as row_exc:
                            if is_transient(row_exc):
                                raise
                            self.metrics.writer_rejected.labels(table=op.table).inc()
                            log.error(
                                "database refused a row; it is not retried",
                                table=op.table,
                                row=repr(row)[:MAX_LOGGED_ROW_CHARS],
                                error=f"{type(row_exc).__name__}: {row_exc}",
                            )

    def _commit(self, op: _Op, chunk: list[Any]) -> None:
        with self._blocking.begin() as conn:
            self._execute(conn, op, chunk)
        self.metrics.writer_rows.labels(table=op.table).inc(len(chunk))


def _chunks(rows: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(rows), size):
        yield list(rows[start : start + size])


def _no_statement(chunk: list[Any]) -> _Call:
    raise AssertionError("an op with `run` is executed by it")


def _insert_legacy_signals(conn: sa.Connection, chunk: list[tuple[str, int, Row]]) -> None:
    """Legacy rows of the signals this transaction stored for the first time: a signal row that was already there
    kept its older `created_at` (the upsert never changes it), so a replayed signal adds no second legacy row."""
    s = t.signals.c
    ids = [signal_id for signal_id, _, _ in chunk]
    query = sa.select(s.signal_id, s.created_at).where(s.signal_id.in_(ids))
    stored: dict[str, int] = {row.signal_id: row.created_at for row in conn.execute(query).all()}
    rows = [row for signal_id, created, row in chunk if stored.get(signal_id) == created]
    if rows:
        conn.execute(sa.insert(t.legacy_address_signal), rows)


def _closer(status: str | None) -> Callable[[list[Any]], _Call]:
    def build(chunk: list[Any]) -> _Call:
        return close_aggregations_statement([key for key, _ in chunk], status, max(at for _, at in chunk)), None

    return build


def _driver_batches(sql: str) -> bool:
    """True when pymysql rewrites an executemany of `sql` into multi-row statements (not one per row)."""
    from pymysql.cursors import RE_INSERT_VALUES

    return RE_INSERT_VALUES.match(sql) is not None
