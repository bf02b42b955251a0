"""Retention: delete old aggregations, signals, position events and publications in small batches, never an
unpublished signal or publication.

Each batch selects at most `retention.batch_size` primary keys and deletes them in its own short
transaction, so the batch writer never waits on the cleaner for longer than one batch (on SQLite, whose
single write lock both share, that is what keeps the writer's latency flat). Rules (the old service's
defaults): closed aggregations older than `retention.aggregations` (2 h); never-closed ones idle for
`retention.open_aggregations` (their order ended long ago); published signals older than
`retention.signals` (7 d); then, while more than `retention.max_signals` rows remain, the oldest
published ones; position events older than `retention.position_events` (by exchange time), account-value
samples older than that as well (the address chart shows both over the same span), and publications
acknowledged and created before that horizon; acknowledged fills (kind `fill`, many) already
after `fills_retention` when given (the service passes `nats.duplicate_window`: a re-publish after that would
no longer be deduplicated anyway, and the engine never replays a fill that old). With `legacy_tables`, the old
service's rows by its own rules: `hl_address_signal` older than `retention.signals`, `hl_order_aggregation`
not updated for `retention.aggregations`. Unpublished signals and publications are the outboxes and stay until
delivery marks them.

Nothing acknowledged within `replay_window` (`nats.replay_window`) is deleted, whatever rule matches it: after a
NATS restart or a stream regression the outboxes re-publish those rows, since the server may have lost them
(delivery/relay.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.clock import wall_ms as now_ms
from hl_monitor.config import DEFAULT_REPLAY_WINDOW_S, Config, RetentionConfig
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.storage import tables as t
from hl_monitor.storage.legacy import utc
from hl_monitor.storage.repository import is_transient

log = get_logger(__name__)

MS_PER_S: Final = 1000


class RetentionCleaner:
    """Runs `run_once` at start and then every `retention.interval` seconds."""

    def __init__(
        self,
        engine: AsyncEngine,
        cfg: RetentionConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], int] = now_ms,
        fills_retention: float | None = None,
        legacy_tables: bool = False,
        replay_window: float = DEFAULT_REPLAY_WINDOW_S,
    ) -> None:
        """`replay_window`: rows acknowledged this recently stay (the outboxes may re-publish them)."""
        self.engine = engine
        self._replay_window = replay_window
        self.cfg = cfg
        self.metrics = metrics
        self._clock = clock
        self._fills_retention = fills_retention
        self._legacy = legacy_tables

    @classmethod
    def from_config(cls, engine: AsyncEngine, cfg: Config, metrics: Metrics) -> RetentionCleaner:
        """The service's cleaner: fills kept for the duplicate window, acknowledged rows for the replay window."""
        return cls(
            engine,
            cfg.retention,
            metrics,
            fills_retention=cfg.nats.duplicate_window,
            legacy_tables=cfg.database.legacy_tables,
            replay_window=cfg.nats.replay_window,
        )

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.metrics.db_up.set(0)
                log.warning("retention run failed; next run at the interval", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.cfg.interval)

    async def run_once(self) -> dict[str, int]:
        """One pass over every rule; returns rows deleted per table."""
        now = self._clock()
        a, s, e, p = t.aggregations.c, t.signals.c, t.position_events.c, t.publications.c
        events_before = now - int(self.cfg.position_events * MS_PER_S)
        replay_from = now - int(self._replay_window * MS_PER_S)
        # Suppressed signals were never sent (no ack time): nothing to replay.
        signal_settled = sa.and_(
            s.published == sa.true(), sa.or_(s.published_at.is_(None), s.published_at < replay_from)
        )
        publication_settled = sa.and_(p.published_at.is_not(None), p.published_at < replay_from)
        deleted = {
            "aggregations": await self._delete_where(
                t.aggregations,
                sa.or_(
                    sa.and_(a.closed == sa.true(), a.updated_at < now - int(self.cfg.aggregations * MS_PER_S)),
                    sa.and_(a.closed == sa.false(), a.updated_at < now - int(self.cfg.open_aggregations * MS_PER_S)),
                ),
            ),
            "signals": await self._delete_where(
                t.signals, sa.and_(signal_settled, s.created_at < now - int(self.cfg.signals * MS_PER_S))
            ),
        }
        deleted["signals"] += await self._cap_signals(signal_settled)
        deleted["position_events"] = await self._delete_where(
            t.position_events, e.time < events_before, key=e.event_id, order=e.time
        )
        v = t.account_values.c
        deleted["account_values"] = await self._delete_where(
            t.account_values, v.time < events_before, key=(v.address, v.time), order=v.time
        )
        deleted["publications"] = await self._delete_where(
            t.publications,
            sa.and_(publication_settled, p.created_at < events_before),
            key=p.msg_id,
            order=p.created_at,
        )
        if self._fills_retention is not None:
            deleted["publications"] += await self._delete_where(
                t.publications,
                sa.and_(
                    p.kind == "fill",
                    publication_settled,
                    p.created_at < now - int(self._fills_retention * MS_PER_S),
                ),
                key=p.msg_id,
                order=p.created_at,
            )
        if self._legacy:
            ls, la = t.legacy_address_signal.c, t.legacy_order_aggregation.c
            deleted[t.legacy_address_signal.name] = await self._delete_where(
                t.legacy_address_signal, ls.created_at < utc(now - int(self.cfg.signals * MS_PER_S))
            )
            deleted[t.legacy_order_aggregation.name] = await self._delete_where(
                t.legacy_order_aggregation, la.updated_at < utc(now - int(self.cfg.aggregations * MS_PER_S))
            )
        for table, count in deleted.items():
            if count:
                self.metrics.retention_deleted.labels(table=table).inc(count)
        self.metrics.db_up.set(1)
        if any(deleted.values()):
            log.info("retention deleted rows", **deleted)
        return deleted

    async def _cap_signals(self, settled: sa.ColumnElement[bool]) -> int:
        """Delete the oldest `settled` signals while the table holds more than `max_signals` rows."""
        async with self.engine.connect() as conn:
            total = int((await conn.execute(sa.select(sa.func.count()).select_from(t.signals))).scalar_one())
        excess = total - self.cfg.max_signals
        if excess <= 0:
            return 0
        return await self._delete_where(t.signals, settled, limit=excess)

    async def _delete_where(
        self,
        table: sa.Table,
        where: sa.ColumnElement[bool],
        limit: int | None = None,
        *,
        key: sa.ColumnElement[Any] | tuple[sa.ColumnElement[Any], ...] | None = None,
        order: sa.ColumnElement[Any] | None = None,
    ) -> int:
        """Delete matching rows oldest first (`order`, default the `id` key), one bounded batch per transaction;
        at most `limit` rows. The delete repeats `where`, so a row that stopped matching stays. A key of several
        columns (a composite primary key) is matched as a row value."""
        columns = key if isinstance(key, tuple) else (key if key is not None else table.c.id,)
        oldest = order if order is not None else columns[0]
        pk = columns[0] if len(columns) == 1 else sa.tuple_(*columns)
        deleted = 0
        while limit is None or deleted < limit:
            size = self.cfg.batch_size if limit is None else min(self.cfg.batch_size, limit - deleted)
            async with self.engine.begin() as conn:
                rows = (await conn.execute(sa.select(*columns).where(where).order_by(oldest).limit(size))).all()
                ids = [row[0] for row in rows] if len(columns) == 1 else [tuple(row) for row in rows]
                if ids:
                    await conn.execute(sa.delete(table).where(pk.in_(ids), where))
            deleted += len(ids)
            if len(ids) < size:
                break
            await asyncio.sleep(0)  # let the writer and the rest of the loop in between batches
        return deleted
