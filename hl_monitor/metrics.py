"""Every Prometheus metric the service exports, on one object bound to one registry.

Components receive the `Metrics` object (tests build a fresh one per test with its own registry).
The old service's `hl_monitor_*` names are kept with their labels and are actually updated here.
Labels are bounded: no per-address label anywhere; `symbol` (on signals, as the old service had it, and on
the whale position gauges) is bounded by the exchange's coin list from meta.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

NS: Final = "hl_monitor"

# Latency buckets from 1 ms to 30 s: exchange→receive is usually tens of ms, backfills take seconds.
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The old service's buckets, kept for dashboard compatibility.
FILLS_PER_ORDER_BUCKETS: Final = (1, 2, 3, 5, 10, 20, 50)
BATCH_SIZE_BUCKETS: Final = (1, 10, 25, 50, 100, 200, 500, 1000)
BATCH_DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

CONNECTION_STATES: Final = ("connecting", "subscribing", "live", "stale", "backing_off", "closed")


class Metrics:
    """All metrics; attribute names match the metric names without the namespace."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, namespace=NS, registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, namespace=NS, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels, namespace=NS, registry=r, buckets=buckets)

        # ---- old service names (the old service's, kept for existing dashboards), all updated now ----
        self.signals_published = counter("signals_published", "Signals acknowledged by JetStream.", ("side", "symbol"))
        self.signal_errors = counter("signal_errors", "Signal build/publish/store errors by type.", ("type",))
        self.addresses_subscribed = gauge("addresses_subscribed", "Watched addresses with a live feed.")
        self.websocket_connected = gauge("websocket_connected", "Hyperliquid WebSocket connections in state live.")
        self.nats_connected = gauge("nats_connected", "1 while the NATS connection is up (not while reconnecting).")
        self.trades_deduplicated = counter("trades_deduplicated", "Fills/trades dropped as already seen (by tid).")
        self.trades_processed = counter("trades_processed", "Fills/trades processed by type.", ("type",))
        self.positions_total = gauge("positions_total", "Open positions across watched addresses.")
        self.position_updates = counter("position_updates", "Position state frames applied.", ("status",))
        self.margin_updates = counter("margin_updates", "Margin summary updates applied.", ("status",))
        self.order_aggregation_active = gauge("order_aggregation_active", "Orders being aggregated (not flushed).")
        self.order_flush = counter("order_flush", "Aggregations flushed into signals by trigger.", ("trigger",))
        self.order_fills_per_order = histogram(
            "order_fills_per_order",
            "Fills per flushed order (observed once per signal).",
            FILLS_PER_ORDER_BUCKETS,
        )
        self.order_updates_received = counter("order_updates_received", "orderUpdates entries received.")
        self.pool_manager_connection_count = gauge("pool_manager_connection_count", "Open WebSocket connections.")
        self.cache_hit = counter("cache_hit", "Cache hits.", ("cache_type",))
        self.cache_miss = counter("cache_miss", "Cache misses.", ("cache_type",))
        self.message_queue_size = gauge("message_queue_size", "Frames waiting for the tracking engine.")
        self.message_queue_full = counter("message_queue_full", "Times a bounded intake queue was full (backpressure).")
        self.batch_write_size = histogram("batch_write_size", "Rows per database batch.", BATCH_SIZE_BUCKETS)
        self.batch_write_duration_seconds = histogram(
            "batch_write_duration_seconds", "Duration of one database batch.", BATCH_DURATION_BUCKETS
        )
        self.batch_dedup_cache_hit = counter(
            "batch_dedup_cache_hit", "Rows coalesced in the writer buffer by natural key.", ("table",)
        )

        # ---- latency per stage ----
        self.exchange_to_receive_seconds = histogram(
            "exchange_to_receive_seconds",
            "Exchange fill time to frame receive.",
            LATENCY_BUCKETS,
            ("source",),
        )
        self.receive_to_signal_seconds = histogram(
            "receive_to_signal_seconds", "Frame receive to signal built.", LATENCY_BUCKETS, ("trigger",)
        )
        self.signal_to_ack_seconds = histogram(
            "signal_to_ack_seconds", "Signal built to JetStream ack.", LATENCY_BUCKETS
        )

        # ---- feeds ----
        self.connection_state = gauge("connection_state", "Connections per state.", ("kind", "state"))
        self.feed_age_seconds = gauge("feed_age_seconds", "Seconds since the last canary frame.", ("connection",))
        self.reconnects = counter("reconnects", "Reconnects by connection kind and reason.", ("kind", "reason"))
        self.error_frames = counter("error_frames", "Hyperliquid error frames by kind.", ("kind",))
        self.frames_received = counter("frames_received", "Frames received by channel.", ("channel",))
        self.frame_decode_errors = counter("frame_decode_errors", "Undecodable frames by kind.", ("kind",))
        self.subscribe_retries = counter("subscribe_retries", "Subscribe requests re-sent after an ack timeout.")
        self.budget_used = gauge("budget_used", "Per-IP budget in use.", ("budget",))
        self.budget_capacity = gauge("budget_capacity", "Per-IP budget capacity.", ("budget",))
        self.budget_refusals = counter("budget_refusals", "Requests refused or delayed by a budget.", ("budget",))
        self.rest_weight_used = counter("rest_weight_used", "REST /info weight spent.", ("request",))
        self.rest_requests = counter(
            "rest_requests", "REST /info requests by type and outcome.", ("request", "outcome")
        )
        self.rest_items_odd = counter(
            "rest_items_odd",
            "Odd entries in REST answers by request and kind (skipped, or read with substitutes).",
            ("request", "kind"),
        )
        self.rest_dex_fill_reads = counter(
            "rest_dex_fill_reads",
            "REST fill reads of precise addresses per perp dex (`first`, a listed dex, or `other`), by purpose.",
            ("dex", "via"),
        )
        self.rest_dex_fills = counter(
            "rest_dex_fills", "Fills REST fill reads returned per perp dex, by purpose.", ("dex", "via")
        )
        self.addresses_by_tier = gauge(
            "addresses_by_tier", "Watched addresses by tier and assignment.", ("tier", "state")
        )
        self.backfilled_fills = counter("backfilled_fills", "Fills recovered after a gap (snapshot or REST).", ("via",))
        self.task_restarts = counter("task_restarts", "Supervised task restarts.", ("task",))
        self.handler_errors = counter("handler_errors", "Frame handler crashes (the connection reconnects).", ("kind",))
        self.gap_recoveries = counter("gap_recoveries", "Gap recoveries after (re)connects by outcome.", ("outcome",))
        self.fill_audits = counter(
            "fill_audits",
            "Periodic REST re-reads of precise fills by outcome (missed: the stream lost fills).",
            ("outcome",),
        )
        self.address_reloads = counter("address_reloads", "Address book reloads and skipped rows.", ("outcome",))
        self.tape_uncovered_coins = gauge("tape_uncovered_coins", "Coins without a trades subscription (over budget).")
        self.tape_events = counter("tape_events", "Wide-tier tape and reconcile events by kind.", ("kind",))
        self.drift_corrections = counter("drift_corrections", "Wide positions fixed by reconcile.", ("asset_type",))
        self.wide_address_memory_bytes = gauge("wide_address_memory_bytes", "Tape state per wide address.", ("stat",))

        # ---- tracking ----
        self.late_fills = counter("late_fills", "Fills for an already flushed order.", ("outcome",))
        self.unknown_dirs = counter("unknown_dirs", "Fills whose dir is not in the direction table.")
        self.parked_statuses = gauge("parked_statuses", "Order statuses waiting for their first fill.")
        self.evictions = counter("evictions", "Tracking state evicted by TTL or size.", ("kind",))
        self.symbol_reloads = counter(
            "symbol_reloads", "Exchange metadata (symbol map) loads by outcome.", ("outcome",)
        )
        self.held_signals = counter("held_signals", "Signals held for an unknown coin, by outcome.", ("outcome",))
        self.signals_built = counter("signals_built", "Signals built by source and direction.", ("source", "direction"))
        self.signals_suppressed = counter(
            "signals_suppressed",
            "Signals stored but not published because a filter caught them, by reason "
            "(symbol_denied, symbol_not_allowed, min_notional).",
            ("reason",),
        )
        self.signals_filter_overridden = counter(
            "signals_filter_overridden",
            "Close signals a filter would have caught, published because their position's open was published.",
        )

        # ---- whale positions (set by ops.positions.export_gauges; events and alerts counted by their owner) ----
        self.whale_notional_usd = gauge(
            "whale_notional_usd",
            "Notional (USD at the mark) of watched addresses' perp positions per symbol and side (long, short); "
            "symbol is bounded by the exchange's coin list, and a symbol nobody holds any more is removed.",
            ("symbol", "side"),
        )
        self.whale_unrealized_pnl_usd = gauge(
            "whale_unrealized_pnl_usd",
            "Unrealized PnL (USD) of watched addresses' perp positions per symbol; "
            "symbol is bounded by the exchange's coin list.",
            ("symbol",),
        )
        self.positions_near_liquidation = gauge(
            "positions_near_liquidation",
            "Perp positions whose liquidation distance (|mark - liquidation price| / mark) is below each alert "
            "level; level is the configured fraction without trailing zeros (0.1, 0.05, 0.02).",
            ("level",),
        )
        self.position_bad_input = counter(
            "position_bad_input", "Inputs (or fields of them) the position model refused, by kind.", ("kind",)
        )
        self.position_restore_errors = counter(
            "position_restore_errors", "Stored position states that could not be restored at start (address afresh)."
        )
        self.position_events = counter(
            "position_events",
            "Position events by kind (opened, increased, reduced, closed, flipped, liquidated, leverage_changed).",
            ("event",),
        )
        self.liquidation_alerts = counter(
            "liquidation_alerts",
            "Liquidation risk alerts by the level crossed (same level values as positions_near_liquidation).",
            ("level",),
        )

        # ---- cluster (cluster/) ----
        self.cluster_members = gauge("cluster_members", "Live instances in the membership bucket (self included).")
        self.cluster_owned_addresses = gauge("cluster_owned_addresses", "Precise addresses leased by this instance.")
        self.cluster_lease_takeovers = counter("cluster_lease_takeovers", "Leases claimed from another instance.")
        self.cluster_lease_losses = counter("cluster_lease_losses", "Leases given up by reason.", ("reason",))
        self.cluster_kv_errors = counter("cluster_kv_errors", "Failed or timed-out KeyValue operations by op.", ("op",))

        # ---- delivery / storage ----
        self.outbox_depth = gauge("outbox_depth", "Signals persisted but not yet acknowledged by JetStream.")
        self.publish_errors = counter("publish_errors", "JetStream publish failures by reason.", ("reason",))
        self.publish_duplicates = counter("publish_duplicates", "Publishes JetStream reported as duplicate.")
        self.outbox_spilled = counter("outbox_spilled", "Signals left to the store scan because the outbox was full.")
        self.publications_published = counter(
            "publications_published", "Position events, alerts and fills stored by JetStream (first store).", ("kind",)
        )
        self.publication_duplicates = counter(
            "publication_duplicates",
            "Position event, alert and fill publishes JetStream reported as duplicate.",
            ("kind",),
        )
        self.publication_errors = counter(
            "publication_errors",
            "Position event, alert and fill delivery failures by reason (publish, mark_published, outbox_scan).",
            ("reason",),
        )
        self.publications_depth = gauge(
            "publications_depth", "Position events and alerts persisted but not yet acknowledged by JetStream."
        )
        self.publications_spilled = counter(
            "publications_spilled", "Publications left to the store scan because their outbox was full."
        )
        self.fills_emitted = counter(
            "fills_emitted", "Deduplicated fills handed to the fills stream's outbox, by source.", ("source",)
        )
        self.fills_outbox_depth = gauge("fills_outbox_depth", "Fills persisted but not yet acknowledged by JetStream.")
        self.fills_spilled = counter("fills_spilled", "Fills left to the store scan because their outbox was full.")
        self.replays = counter(
            "replays",
            "Times an outbox re-published its replay window because NATS may have lost acknowledged messages "
            "(server changed, stream regressed, sequence re-used), by kind (signal, fill, position) and reason.",
            ("kind", "reason"),
        )
        self.replayed = counter(
            "replayed",
            "Acknowledged messages re-published by those replays, by kind (signal, fill, position).",
            ("kind",),
        )
        self.kv_writes = counter("kv_writes", "Position documents written to (or deleted from) the KV view.", ("op",))
        self.kv_errors = counter("kv_errors", "Failed KV view operations by op (each is retried).", ("op",))
        self.kv_queue_depth = gauge("kv_queue_depth", "Addresses whose latest document waits for the KV view.")
        self.writer_queue_depth = gauge("writer_queue_depth", "Rows waiting in the batch writer.")
        self.writer_retries = counter("writer_retries", "Batch writes retried after an error.", ("table",))
        self.writer_rows = counter("writer_rows", "Rows written by table.", ("table",))
        self.writer_queue_full = counter("writer_queue_full", "Writer puts that waited for space (backpressure).")
        self.writer_rejected = counter("writer_rejected", "Rows the database refused as invalid.", ("table",))
        self.db_up = gauge("db_up", "1 when the last database operation succeeded.")
        self.retention_deleted = counter("retention_deleted", "Rows deleted by the retention cleaner.", ("table",))
        self.lease_renewals = counter(
            "lease_renewals", "Shared-database instance lease renewals by outcome.", ("outcome",)
        )
        self.loop_stalls = counter("loop_stalls", "Event-loop stalls longer than the watchdog threshold.")
        self.ready = gauge("ready", "1 when /health/ready answers 200.")
        self.admin_requests = counter("admin_requests", "Admin API requests by outcome.", ("outcome",))
        self.build_info = gauge("build_info", "Build information.", ("version",))
        self.discovery_trades = counter("discovery_trades", "Tape trades counted by whale discovery.")
        self.discovery_tracked = gauge(
            "discovery_tracked", "Addresses with a discovery counter, by window (bounded by max_tracked).", ("window",)
        )
        self.discovery_evictions = counter(
            "discovery_evictions", "Discovery counters replaced by a newcomer (Space-Saving), by window.", ("window",)
        )
        self.discovery_confirm_reads = counter(
            "discovery_confirm_reads",
            "clearinghouseState reads confirming discovery candidates, by outcome.",
            ("outcome",),
        )
        self.discovery_auto_changes = counter(
            "discovery_auto_changes", "Addresses watched or unwatched by automatic discovery, by action.", ("action",)
        )
        self.discovery_auto_watched = gauge("discovery_auto_watched", "Addresses watched by automatic discovery now.")
        self.discovery_leader = gauge(
            "discovery_leader", "1 while this instance may write automatic discovery changes."
        )
        self.discovery_outbox_depth = gauge(
            "discovery_outbox_depth", "Discovery announcements persisted but not yet acknowledged by JetStream."
        )
        self.discovery_spilled = counter(
            "discovery_spilled", "Discovery announcements left to the store scan because their outbox was full."
        )
