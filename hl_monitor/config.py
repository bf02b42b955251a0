"""Typed configuration: `cfg.toml`, then `HL_MONITOR__SECTION__KEY` environment overrides.

Every key has a default here and is documented in `cfg.toml`. Unknown keys, wrong types and bad
URLs raise `ConfigError` naming the dotted key; the CLI turns that into one line and exit code 2.
Secrets (admin token, NATS credentials, database password) are accepted only from the environment
and are `Secret` values whose repr never shows them.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec

from hl_monitor.domain.address import is_valid_address
from hl_monitor.errors import ConfigError
from hl_monitor.hyperliquid import constants as hl

ENV_PREFIX: Final = "HL_MONITOR__"
EMBEDDED: Final = "embedded"  # nats.url of the supervised local nats-server
DEFAULT_CONFIG_PATH: Final = Path("cfg.toml")
MASK: Final = "***"


class Secret(str):
    """A string that never shows itself in repr, logs or the printed config."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class HyperliquidConfig(_Section, frozen=True):
    ws_url: str = hl.MAINNET_WS_URL
    info_url: str = hl.MAINNET_INFO_URL
    # Precise slots: each precise whale needs its own connection (orderUpdates carries no user).
    user_slots: int = 8
    max_connections: int = hl.MAX_CONNECTIONS
    max_new_connections_per_minute: int = hl.MAX_NEW_CONNECTIONS_PER_MINUTE
    max_subscriptions: int = hl.MAX_SUBSCRIPTIONS
    max_users: int = hl.MAX_USERS
    max_client_messages_per_minute: int = hl.MAX_CLIENT_MESSAGES_PER_MINUTE
    rest_weight_per_minute: int = hl.REST_WEIGHT_PER_MINUTE
    # Share of REST weight/messages only high priority may use, so gap recovery never starves behind polling.
    budget_high_priority_reserve: float = 0.25
    ping_interval: float = hl.PING_INTERVAL_S
    pong_timeout: float = hl.PONG_TIMEOUT_S
    ack_timeout: float = hl.ACK_TIMEOUT_S
    ack_retries: int = 3
    stale_after: float = 15.0
    reconnect_initial_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    healthy_after: float = 60.0
    backfill_margin: float = 60.0
    # Each precise address's recent fills are re-read from REST this often (0: never) to catch a userFills
    # subscription that silently misses events while the connection and its canary still flow.
    fill_audit_interval: float = 300.0
    over_budget_retry: float = 60.0
    max_frame_bytes: int = 16 * 1024 * 1024
    request_timeout: float = 10.0


# JetStream flushes its store every 2 minutes by default; an ack younger than that may exist only in memory.
DEFAULT_REPLAY_WINDOW_S: Final = 180.0


class NatsConfig(_Section, frozen=True):
    # "embedded", or a seed list of nats:// / tls:// URLs, comma-separated (a TOML array is joined to this form)
    url: str = "embedded"
    stream: str = "HL_SIGNALS"
    store_dir: str = "./data/nats"
    duplicate_window: float = 7200.0
    max_age: float = 7 * 86400.0
    max_bytes: int = -1
    retention: Literal["limits", "interest", "workqueue"] = "limits"
    replicas: int = 1  # copies of every stream the service creates (signals, fills, positions)
    kv_replicas: int = 1  # copies of every KeyValue bucket it creates (members, leases, positions)
    # Messages acknowledged this recently are re-published after a NATS restart or a stream regression: longer
    # than the server's default flush interval (2 min), so an ack the server lost before writing comes back.
    replay_window: float = DEFAULT_REPLAY_WINDOW_S
    publish_timeout: float = 5.0
    max_inflight: int = 1000
    embedded_port: int = 0  # 0 = a free loopback port, so the embedded server never collides with a system NATS on 4222
    reconnect_wait: float = 2.0  # seconds between NATS reconnect attempts (nats-py default; tests use less)
    outbox_size: int = 10_000  # signals held in memory awaiting an ack; beyond that the store scan carries them
    outbox_scan_interval: float = 5.0  # how often persisted-but-unacked signals are re-read from the store
    retry_initial_delay: float = 0.2  # first pause after a failed publish; doubles up to retry_max_delay
    retry_max_delay: float = 10.0  # cap of the publish retry backoff: NATS back ⇒ delivery resumes within this
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    user: Secret | None = None
    password: Secret | None = None
    token: Secret | None = None
    creds: Secret | None = None  # path of a .creds file (user JWT + NKey seed)
    nkey_seed: Secret | None = None  # path of a file holding an NKey user seed

    @property
    def seeds(self) -> list[str]:
        """The seed list: every URL of `url` in order (empty for "embedded"); the client may connect to any."""
        return [] if self.url == EMBEDDED else split_seeds(self.url)


class SignalsConfig(_Section, frozen=True):
    subject_prefix: str = "hl.signals"
    legacy_subject: str = "hl_address_signal"
    legacy_enabled: bool = True
    # Signals of a smaller notional are stored but not published (README "Filters"); 0 publishes everything.
    min_notional_usd: float = 0.0
    # `position_size` bounds by notional USD: Small below the first, Medium below the second, else Large.
    position_size_thresholds: list[float] = msgspec.field(default_factory=lambda: [10_000.0, 100_000.0])


class DatabaseConfig(_Section, frozen=True):
    url: str = "sqlite+aiosqlite:///./data/hl-monitor.db"
    password: Secret | None = None
    pool_size: int = 5
    max_overflow: int = 5
    pool_recycle: float = 1800.0
    connect_timeout: float = 10.0
    tls_ca: str = ""
    legacy_addresses_table: bool = False
    # Also keep the old service's tables (hl_address_signal, hl_position_cache, hl_order_aggregation) up to date;
    # `hl-monitor db upgrade` creates them when this is on (README "Legacy tables").
    legacy_tables: bool = False
    sqlite_busy_timeout: float = 5.0  # seconds a SQLite writer waits for the file lock (cleaner, CLI) before retrying


class HttpConfig(_Section, frozen=True):
    listen: str = "0.0.0.0:8080"
    admin_token: Secret | None = None
    max_body_bytes: int = 1024 * 1024
    auth_failures_per_minute: int = 10  # failed admin logins per client IP a minute before 429 (slows token guessing)


class AggregationConfig(_Section, frozen=True):
    timeout: float = 300.0
    scan_interval: float = 1.0
    status_park_ttl: float = 600.0
    flushed_ttl: float = 3600.0
    max_pending_orders: int = 200_000
    max_parked_statuses: int = 100_000
    max_flushed_keys: int = 500_000
    status_grace: float = 10.0  # a terminal status waits this long for the fills it accounts for
    seen_window: float = 3600.0  # fill keys kept per address so replays/backfills in this window dedupe exactly
    max_seen_per_address: int = 20_000  # caps one very active address's keys (its dedup floor rises instead)
    unknown_coin_hold: float = 60.0  # a signal of a coin missing from metadata waits this long for a reload


class WideConfig(_Section, frozen=True):
    """The wide tier (docs/architecture.md §4): the `trades` tape of every coin, filtered by the watched set."""

    enabled: bool = True  # run the tape at all (cluster mode: also needs cluster.tape_role = "active")
    subscription_budget: int = 900  # `trades` + one `bbo` canary per tape connection; 100 of 1000 left for precise
    stale_after: float = 10.0  # no `bbo` canary on a tape connection for this long → stale, reconnect and backfill
    block_settle: float = 0.5  # a tape block is complete this long after its last trade (or when the coin moves on)
    dedup_window: float = 120.0  # trade ids kept per coin; covers the ~30-trade replay after every (re)subscribe
    backfill_max_coins: int = 8  # REST recentTrades after a tape reconnect (20+ weight each), watched coins first
    reconcile_interval: float = 300.0  # each wide address's positions are re-read from REST at most this often
    reconcile_settle: float = 2.0  # a REST answer is compared once the tape had this long to deliver older trades
    rest_share: float = 0.5  # share of rest_weight_per_minute the wide tier may use (the rest: precise, metadata)
    max_addresses: int = 10_000  # watched addresses the tape tracks; beyond this they are reported, not tracked
    universe_refresh: float = 3600.0  # coin list and 24 h volumes are re-read this often (new listings)
    handover_hold: float = 600.0  # tape signals of a precise address are held this long in case it moves back to wide
    engine_label_wait: float = 2.0  # a tape signal with an engine trade waits this long for its REST label (0 = off)


class AddressesConfig(_Section, frozen=True):
    reload_interval: float = 60.0
    remove_grace: float = 300.0
    server_id: int | None = None
    initial: list[str] = msgspec.field(default_factory=list)


class WriterConfig(_Section, frozen=True):
    batch_size: int = 100  # rows per statement: 500-row chunks held the loop ~9 ms each (p99 +8 ms), and were slower
    flush_interval: float = 0.5
    queue_size: int = 50_000
    retry_initial_delay: float = 0.5
    retry_max_delay: float = 30.0


class RetentionConfig(_Section, frozen=True):
    interval: float = 3600.0
    aggregations: float = 2 * 3600.0
    signals: float = 7 * 86400.0
    # Position events, and acknowledged publications (position events and alerts), older than this go.
    position_events: float = 7 * 86400.0
    max_signals: int = 500_000
    # Unflushed aggregations idle this long are abandoned (their order ended long ago).
    open_aggregations: float = 86400.0
    batch_size: int = 5000


class SymbolsConfig(_Section, frozen=True):
    refresh_interval: float = 7200.0  # exchange metadata (perps of every dex, spot pairs) reload, as the old service
    retry_initial_delay: float = 5.0  # first retry after a failed load; doubles up to retry_max_delay
    retry_max_delay: float = 300.0  # a long metadata outage is retried every 5 minutes
    reload_min_interval: float = 10.0  # on-demand reloads (unknown coin in a frame) at most this often: REST weight


class ClusterConfig(_Section, frozen=True):
    """Scale-out (docs/architecture.md §5): how this instance shares the precise addresses with others."""

    # single: one instance (as before); static: addresses pinned by addresses.server_id; nats: leases on JetStream KV.
    mode: Literal["single", "static", "nats"] = "single"
    failover: float = 15.0  # upper bound for a dead instance's addresses to be tracked elsewhere (lease_ttl + 2 beats)
    lease_ttl: float = 10.0  # server-side expiry of a lease or member key; a holder fences itself at half of it
    heartbeat: float = 2.0  # membership beat, lease renewal and placement cadence (≤ lease_ttl/4: 2 tries to renew)
    members_bucket: str = "hl_members"  # KV bucket: one key per live instance with its capacity
    leases_bucket: str = "hl_leases"  # KV bucket: one key per precisely tracked address, value = holder
    tape_role: Literal["active", "none"] = "active"  # advertised: whether this instance runs the wide tier's tape


class PositionsConfig(_Section, frozen=True):
    """What whales hold (docs/architecture.md §9): documents, position events, liquidation alerts, the KV view."""

    enabled: bool = True
    subject_prefix: str = "hl.positions"  # events: {prefix}.{address}.{symbol}
    alerts_prefix: str = "hl.alerts"  # alerts: {prefix}.{address}.{symbol}.liquidation_risk
    stream: str = "HL_POSITIONS"  # JetStream stream holding position events and alerts
    max_age: float = 604800.0  # seconds the stream keeps an event (7 d, like signals in the database)
    kv_bucket: str = "hl_positions"  # KV: key = address, value = its whole position document (JSON)
    kv_refresh: float = 5.0  # mark-driven document refreshes per address at most this often; changes go at once
    liquidation_alert_levels: list[float] = msgspec.field(default_factory=lambda: [0.10, 0.05, 0.02])


class DiscoveryConfig(_Section, frozen=True):
    """Whale discovery from the tape (README "Discovery"): heavy hitters, labels, confirmation, auto-watch."""

    enabled: bool = True  # count the tape's parties at all (needs the wide tier's tape)
    windows: list[float] = msgspec.field(default_factory=lambda: [3600.0, 86400.0])  # rolling windows, seconds
    max_tracked: int = 50_000  # counters per window: memory is fixed whatever the number of traders
    exclude: list[str] = msgspec.field(default_factory=list)  # addresses never ranked (vaults, own accounts)
    rest_share: float = 0.05  # share of rest_weight_per_minute confirmation reads may use, at low priority
    confirm_top: int = 20  # the top candidates of each window confirmed with one clearinghouseState read each
    confirm_ttl: float = 3600.0  # a confirmation (account value) is reused this long before it is read again
    pass_interval: float = 30.0  # seconds between confirmation passes (each followed by an auto-watch step)
    min_account_usd: float = 100_000.0  # a confirmed account below this is shown but never watched automatically
    auto_watch: bool = False  # watch confirmed directional candidates automatically (tier wide, never precise)
    auto_min_notional_usd: float = 1_000_000.0  # window notional a candidate needs to be auto-watched
    auto_max: int = 20  # auto-watched addresses at most, at any time
    auto_expire: float = 86400.0  # an auto-watched address without qualifying activity this long is removed
    subject_prefix: str = "hl.discovery"  # auto-watch adds and removes: {prefix}.{address}
    stream: str = "HL_DISCOVERY"  # JetStream stream holding the announcements
    max_age: float = 2_592_000.0  # seconds the stream keeps an announcement (30 d: why an address is watched)


class FillsConfig(_Section, frozen=True):
    """Every deduplicated fill as it happens (README "Fills"), on its own stream."""

    enabled: bool = True
    subject_prefix: str = "hl.fills"  # {prefix}.{address}.{symbol}
    stream: str = "HL_FILLS"  # JetStream stream holding fills only, so their retention is their own
    max_age: float = 86400.0  # seconds the stream keeps a fill (they are many; signals keep the orders for 7 d)
    max_bytes: int = -1  # stream size cap in bytes (-1: none); the oldest fills go first


class UiConfig(_Section, frozen=True):
    """The web console at `/ui/` (README "Console")."""

    enabled: bool = True  # serve the console at all
    read_only: bool = False  # True: no administration in the console even when `http.admin_token` is set


class LogConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class ServiceConfig(_Section, frozen=True):
    instance_id: str = ""
    data_dir: str = "./data"
    shutdown_timeout: float = 25.0
    lease_ttl: float = 30.0  # shared-database instance lease: a crashed holder's lease is taken over after this
    lease_renew_interval: float = 10.0  # renew three times per TTL so two failed renewals still keep the lease


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    service: ServiceConfig = msgspec.field(default_factory=ServiceConfig)
    hyperliquid: HyperliquidConfig = msgspec.field(default_factory=HyperliquidConfig)
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    signals: SignalsConfig = msgspec.field(default_factory=SignalsConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    aggregation: AggregationConfig = msgspec.field(default_factory=AggregationConfig)
    addresses: AddressesConfig = msgspec.field(default_factory=AddressesConfig)
    wide: WideConfig = msgspec.field(default_factory=WideConfig)
    writer: WriterConfig = msgspec.field(default_factory=WriterConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    symbols: SymbolsConfig = msgspec.field(default_factory=SymbolsConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    positions: PositionsConfig = msgspec.field(default_factory=PositionsConfig)
    fills: FillsConfig = msgspec.field(default_factory=FillsConfig)
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    ui: UiConfig = msgspec.field(default_factory=UiConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)

    @property
    def instance_id(self) -> str:
        """Configured id, else host name + absolute data directory (two data dirs = two identities)."""
        return self.service.instance_id or f"{socket.gethostname()}:{Path(self.service.data_dir).resolve()}"

    def database_url(self) -> str:
        """The DSN with the environment password filled in (never log this; see `masked`)."""
        if self.database.password is None:
            return self.database.url
        parts = urlsplit(self.database.url)
        user = parts.username or "root"
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        netloc = f"{user}:{self.database.password}@{host}{port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


SECRET_KEYS: Final = frozenset(
    {
        "nats.user",
        "nats.password",
        "nats.token",
        "nats.creds",
        "nats.nkey_seed",
        "database.password",
        "http.admin_token",
    }
)

_PATH_RE: Final = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN_RE: Final = re.compile(r"unknown field `([^`]+)`")


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Secret and isinstance(obj, str):
        return Secret(obj)
    raise NotImplementedError


def _key_from_validation(message: str) -> tuple[str, str]:
    match = _PATH_RE.search(message)
    path = match.group(1) if match else ""
    text = message[: match.start()] if match else message
    unknown = _UNKNOWN_RE.search(text)
    if unknown:
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        text = "unknown key"
    return path or "<root>", text


def split_seeds(url: str) -> list[str]:
    """The URLs of a comma-separated seed list, blanks around them dropped."""
    return [part.strip() for part in url.split(",") if part.strip()]


def _join_seed_array(data: dict[str, Any]) -> None:
    """`nats.url` given as a TOML array becomes the comma-separated form the rest of the service reads."""
    section = data.get("nats")
    if isinstance(section, dict) and isinstance(section.get("url"), list):
        seeds = section["url"]
        if not all(isinstance(seed, str) for seed in seeds):
            raise ConfigError("nats.url", "a seed list holds URL strings only")
        section["url"] = ",".join(seed.strip() for seed in seeds)


def _env_overrides(environ: Mapping[str, str], data: dict[str, Any]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(name, f"expected {ENV_PREFIX}SECTION__KEY")
        section, key = parts
        if section not in Config.__struct_fields__:
            raise ConfigError(f"{section}.{key}", f"unknown section {section!r} (from {name})")
        section_type = Config.__annotations__[section]
        fields = _section_fields(section_type)
        if key not in fields:
            raise ConfigError(f"{section}.{key}", f"unknown key (from {name})")
        data.setdefault(section, {})[key] = _coerce_env(value, fields[key], f"{section}.{key}")


def _section_fields(section_type: Any) -> dict[str, Any]:
    sections: dict[str, type[msgspec.Struct]] = {
        "ServiceConfig": ServiceConfig,
        "HyperliquidConfig": HyperliquidConfig,
        "NatsConfig": NatsConfig,
        "SignalsConfig": SignalsConfig,
        "DatabaseConfig": DatabaseConfig,
        "HttpConfig": HttpConfig,
        "AggregationConfig": AggregationConfig,
        "AddressesConfig": AddressesConfig,
        "WideConfig": WideConfig,
        "WriterConfig": WriterConfig,
        "RetentionConfig": RetentionConfig,
        "SymbolsConfig": SymbolsConfig,
        "ClusterConfig": ClusterConfig,
        "FillsConfig": FillsConfig,
        "PositionsConfig": PositionsConfig,
        "DiscoveryConfig": DiscoveryConfig,
        "UiConfig": UiConfig,
        "LogConfig": LogConfig,
    }
    cls = sections[section_type if isinstance(section_type, str) else section_type.__name__]
    return {f.name: f.type for f in msgspec.structs.fields(cls)}


def _coerce_env(value: str, type_: Any, key: str) -> Any:
    """Environment values are strings: lists are comma-separated, everything else goes through lax decoding."""
    if getattr(type_, "__origin__", None) is list:
        return [item.strip() for item in value.split(",") if item.strip()]
    if value == "" and "None" in repr(type_):
        return None
    return value


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration; raise `ConfigError` naming the bad key."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    cfg_path = path or DEFAULT_CONFIG_PATH
    if cfg_path.exists():
        try:
            data = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(cfg_path), f"not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(str(cfg_path), f"cannot read: {exc.strerror}") from None
        for key in SECRET_KEYS:
            section, name = key.split(".")
            if isinstance(data.get(section), dict) and name in data[section]:
                env_name = f"{ENV_PREFIX}{section.upper()}__{name.upper()}"
                raise ConfigError(key, f"secrets are read only from the environment; set {env_name}")
    elif path is not None:
        raise ConfigError(str(path), "config file does not exist")
    _join_seed_array(data)
    _env_overrides(environ, data)
    try:
        cfg = msgspec.convert(data, Config, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        key, text = _key_from_validation(str(exc))
        raise ConfigError(key, text) from None
    validate(cfg)
    return cfg


def _require_scheme(key: str, url: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not (parts.netloc or parts.path):
        raise ConfigError(key, f"{mask_url(url)!r} is not a URL with scheme {' or '.join(schemes)}")


def _validate_seeds(url: str) -> None:
    """`embedded` alone, or one or more nats:// / tls:// URLs each naming a host; the error names the bad one."""
    if url == EMBEDDED:
        return
    seeds = split_seeds(url)
    if not seeds:
        raise ConfigError("nats.url", 'empty: use "embedded" or one or more nats:// / tls:// URLs')
    if EMBEDDED in seeds:
        raise ConfigError("nats.url", '"embedded" is a single server: it cannot be part of a seed list')
    for seed in seeds:
        _require_scheme("nats.url", seed, ("nats", "tls"))
        try:
            port = urlsplit(seed).port
        except ValueError:
            port = -1
        if not urlsplit(seed).hostname or port == -1:
            raise ConfigError("nats.url", f"{mask_url(seed)!r} does not name a host and port (nats://host:4222)")


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:8080`) into a pair; `ValueError` when malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(value)
    return host.strip("[]") or "0.0.0.0", int(port)


def validate(cfg: Config) -> None:
    """Semantic checks msgspec cannot express."""
    _require_scheme("hyperliquid.ws_url", cfg.hyperliquid.ws_url, ("ws", "wss"))
    _require_scheme("hyperliquid.info_url", cfg.hyperliquid.info_url, ("http", "https"))
    _validate_seeds(cfg.nats.url)
    _require_scheme("database.url", cfg.database.url, ("sqlite+aiosqlite", "mysql+aiomysql", "mysql+pymysql", "mysql"))
    if urlsplit(cfg.database.url).password and not os.environ.get(f"{ENV_PREFIX}DATABASE__URL"):
        raise ConfigError(
            "database.url",
            f"put the password in {ENV_PREFIX}DATABASE__PASSWORD, not in the config file",
        )
    try:
        parse_listen(cfg.http.listen)
    except ValueError:
        raise ConfigError("http.listen", f"{cfg.http.listen!r} is not host:port") from None
    positive = {
        "hyperliquid.user_slots": cfg.hyperliquid.user_slots,
        "hyperliquid.max_connections": cfg.hyperliquid.max_connections,
        "hyperliquid.max_users": cfg.hyperliquid.max_users,
        "hyperliquid.rest_weight_per_minute": cfg.hyperliquid.rest_weight_per_minute,
        "hyperliquid.ping_interval": cfg.hyperliquid.ping_interval,
        "hyperliquid.stale_after": cfg.hyperliquid.stale_after,
        "aggregation.timeout": cfg.aggregation.timeout,
        "writer.batch_size": cfg.writer.batch_size,
        "writer.queue_size": cfg.writer.queue_size,
        "service.shutdown_timeout": cfg.service.shutdown_timeout,
        "service.lease_renew_interval": cfg.service.lease_renew_interval,
        "symbols.refresh_interval": cfg.symbols.refresh_interval,
        "symbols.retry_initial_delay": cfg.symbols.retry_initial_delay,
        "http.auth_failures_per_minute": cfg.http.auth_failures_per_minute,
        "wide.stale_after": cfg.wide.stale_after,
        "wide.block_settle": cfg.wide.block_settle,
        "wide.rest_share": cfg.wide.rest_share,
        "retention.position_events": cfg.retention.position_events,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}")
    if cfg.hyperliquid.user_slots > cfg.hyperliquid.max_connections:
        raise ConfigError(
            "hyperliquid.user_slots",
            f"{cfg.hyperliquid.user_slots} slots need as many connections; max_connections is "
            f"{cfg.hyperliquid.max_connections}",
        )
    _validate_replicas(cfg.nats)
    if cfg.nats.creds is not None and cfg.nats.nkey_seed is not None:
        raise ConfigError("nats.nkey_seed", "set nats.creds or nats.nkey_seed, not both (a .creds file has a seed)")
    if cfg.hyperliquid.fill_audit_interval < 0:
        raise ConfigError(
            "hyperliquid.fill_audit_interval", f"must be ≥ 0 (0 = off), got {cfg.hyperliquid.fill_audit_interval}"
        )
    if cfg.wide.engine_label_wait < 0:
        raise ConfigError("wide.engine_label_wait", f"must be ≥ 0 (0 = off), got {cfg.wide.engine_label_wait}")
    if cfg.wide.rest_share > 1:
        raise ConfigError("wide.rest_share", f"must be a share of the REST budget in (0, 1], got {cfg.wide.rest_share}")
    if cfg.service.lease_renew_interval >= cfg.service.lease_ttl:
        raise ConfigError(
            "service.lease_renew_interval",
            f"{cfg.service.lease_renew_interval} must be shorter than service.lease_ttl ({cfg.service.lease_ttl})",
        )
    _validate_cluster(cfg)
    _validate_signals(cfg.signals)
    _validate_discovery(cfg.discovery)
    for addr in cfg.addresses.initial:
        if not is_valid_address(addr):
            raise ConfigError("addresses.initial", f"{addr!r} is not 0x + 40 hex digits")


def _validate_replicas(nats_cfg: NatsConfig) -> None:
    for key, value in (("nats.replicas", nats_cfg.replicas), ("nats.kv_replicas", nats_cfg.kv_replicas)):
        if value < 1:
            raise ConfigError(key, f"must be ≥ 1, got {value}")
        if value > 1 and nats_cfg.url == "embedded":
            raise ConfigError(
                key, f"{value} replicas need a NATS cluster; the embedded server is a single node: set 1 or nats.url"
            )
    if nats_cfg.replay_window < 0:
        raise ConfigError("nats.replay_window", f"must be ≥ 0 (0 = no replay), got {nats_cfg.replay_window}")


def _validate_signals(signals: SignalsConfig) -> None:
    if not math.isfinite(signals.min_notional_usd) or signals.min_notional_usd < 0:
        raise ConfigError("signals.min_notional_usd", f"must be a dollar amount ≥ 0, got {signals.min_notional_usd}")
    bounds = signals.position_size_thresholds
    if len(bounds) != 2 or not all(math.isfinite(b) and b >= 0 for b in bounds) or bounds[0] >= bounds[1]:
        raise ConfigError(
            "signals.position_size_thresholds",
            f"must be two dollar amounts ≥ 0, the first below the second (Small | Medium | Large), got {bounds}",
        )


def _validate_discovery(d: DiscoveryConfig) -> None:
    if not d.windows or any(not math.isfinite(w) or w < 60 for w in d.windows):
        raise ConfigError("discovery.windows", f"must be one or more windows of at least 60 seconds, got {d.windows}")
    if len(set(d.windows)) != len(d.windows):
        raise ConfigError("discovery.windows", f"a window appears twice: {d.windows}")
    positive = {
        "discovery.max_tracked": d.max_tracked,
        "discovery.confirm_ttl": d.confirm_ttl,
        "discovery.pass_interval": d.pass_interval,
        "discovery.auto_expire": d.auto_expire,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}")
    for key, count in {"discovery.confirm_top": d.confirm_top, "discovery.auto_max": d.auto_max}.items():
        if count < 0:
            raise ConfigError(key, f"must be ≥ 0, got {count}")
    if not 0 < d.rest_share <= 1:
        raise ConfigError("discovery.rest_share", f"must be a share of the REST budget in (0, 1], got {d.rest_share}")
    for key, usd in {
        "discovery.min_account_usd": d.min_account_usd,
        "discovery.auto_min_notional_usd": d.auto_min_notional_usd,
    }.items():
        if not math.isfinite(usd) or usd < 0:
            raise ConfigError(key, f"must be a dollar amount ≥ 0, got {usd}")
    for addr in d.exclude:
        if not is_valid_address(addr):
            raise ConfigError("discovery.exclude", f"{addr!r} is not 0x + 40 hex digits")


def _validate_cluster(cfg: Config) -> None:
    c = cfg.cluster
    for key, value in {
        "cluster.failover": c.failover,
        "cluster.lease_ttl": c.lease_ttl,
        "cluster.heartbeat": c.heartbeat,
    }.items():
        if value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}")
    if c.mode == "static" and cfg.addresses.server_id is None:
        raise ConfigError("cluster.mode", "static mode pins addresses by server_id: set addresses.server_id")
    if c.mode == "nats" and cfg.nats.url == EMBEDDED:
        raise ConfigError("cluster.mode", "nats mode needs a NATS shared by every instance: set nats.url")
    if c.heartbeat > c.lease_ttl / 4:
        raise ConfigError("cluster.heartbeat", f"{c.heartbeat} must be ≤ cluster.lease_ttl / 4 ({c.lease_ttl / 4})")
    if c.lease_ttl + 2 * c.heartbeat > c.failover:
        raise ConfigError(
            "cluster.failover",
            f"{c.failover} cannot be met: a dead holder's lease expires after lease_ttl ({c.lease_ttl}) and is "
            f"claimed within 2 heartbeats ({2 * c.heartbeat}); raise failover or lower lease_ttl/heartbeat",
        )
    for key, bucket in {"cluster.members_bucket": c.members_bucket, "cluster.leases_bucket": c.leases_bucket}.items():
        if not re.fullmatch(r"[a-zA-Z0-9_-]+", bucket):
            raise ConfigError(key, f"{bucket!r} is not a KeyValue bucket name (letters, digits, _ and -)")


def mask_url(url: str) -> str:
    """Replace the password of a URL with `***`."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username}:{MASK}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def masked(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data with every secret masked (for check-config and /status)."""
    data: dict[str, Any] = msgspec.to_builtins(cfg, enc_hook=lambda obj: MASK)
    for key in SECRET_KEYS:
        section, name = key.split(".")
        if data[section].get(name) is not None:
            data[section][name] = MASK
    data["database"]["url"] = mask_url(data["database"]["url"])
    data["nats"]["url"] = ",".join(mask_url(seed) for seed in split_seeds(data["nats"]["url"]))
    data["service"]["effective_instance_id"] = cfg.instance_id
    return data
