"""JetStream publisher: one NATS connection, the signal stream, one stored message per `signal_id`.

Subject of a signal: `{signals.subject_prefix}.{address}.{symbol}.{direction}.{side}`, e.g.
`hl.signals.0xabc….BTCUSDC.close.SHORT`, so a consumer can filter by address (`hl.signals.0xabc….>`), symbol
(`hl.signals.*.BTCUSDC.>`), direction or side. Address and symbol go through `subject_token`: characters that
NATS forbids in a token ('.', '*', '>', whitespace) and anything outside `[A-Za-z0-9_:/@+=-]` become `%XX` (the
UTF-8 bytes in upper-case hex, '%' itself included, so the mapping is reversible); `@107`, `xyz:XYZ100` and
`PURR/USDC` stay as they are. Every message carries `Nats-Msg-Id: signal_id`: JetStream stores a re-published
id once within the stream's `duplicate_window` and answers `PubAck.duplicate`.

The duplicate window (default 2 h) must cover the longest re-publish horizon: the outbox re-sends signals that
were persisted but not acknowledged after a NATS outage or a service restart. The server keeps every id seen in
the window in memory (roughly 150 B each), so 2 h at a sustained 100 signals/s costs about 100 MB; shorten it
for very high rates.

Legacy subject: old consumers used core NATS subscriptions on `hl_address_signal`, so the old flat payload is
published there with core NATS, not into the stream (the stream then holds each signal exactly once, and
`{prefix}.>` is its only subject). It is sent only when JetStream stored the signal for the first time, or when
an earlier attempt in this process had an unknown outcome, so legacy subscribers get no duplicates from
re-publishes; like the old service it is at-most-once (a crash between the ack and the legacy publish loses
that copy, the stream keeps it).

Seed list: `nats.url` may name several servers of one cluster. The client connects to any of them (in random
order, so instances spread over the nodes), learns the cluster's other client URLs from the server, and when its
node dies moves to another one after at most `nats.reconnect_wait` per server it already tried. While it moves,
`is_connected` is false and publishing is refused (the outbox keeps the signals). A stream leader election does
not drop the connection: publishes time out until a new leader answers (readiness then says degraded,
docs/architecture.md §8), the outbox retries them with the same `Nats-Msg-Id`, and those the old leader had
stored before dying are answered as duplicates (README "NATS in production").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import string
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, PubAck, RetentionPolicy, StorageType, StreamConfig, StreamInfo

from hl_monitor.config import EMBEDDED, NatsConfig, Secret, SignalsConfig, mask_url, split_seeds
from hl_monitor.delivery.embedded_nats import EmbeddedNats
from hl_monitor.domain.signal import Signal, encode_legacy, encode_signal
from hl_monitor.errors import ConfigError, DeliveryError, PublishError
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.tasks import quietly

__all__ = [
    "NATS_CONNECT_WAIT_S",
    "PublishError",
    "Publisher",
    "check_subject",
    "ensure_kv_replicas",
    "ensure_stream",
    "open_publisher",
    "publish_with_id",
    "signal_subject",
    "subject_token",
]

log = get_logger(__name__)

MSG_ID_HEADER: Final = "Nats-Msg-Id"
CONNECTION_NAME: Final = "hl-monitor"
CONNECT_TIMEOUT_S: Final = 2  # one TCP+handshake attempt; the client retries forever after it
PING_INTERVAL_S: Final = 20  # the old service's value: a silently dead server is noticed within a minute
MAX_OUTSTANDING_PINGS: Final = 3
# Bytes nats-py may buffer while reconnecting. We refuse to publish while disconnected, so this only holds
# requests caught mid-disconnect; bounded so a long outage cannot grow memory.
PENDING_SIZE: Final = 2 * 1024 * 1024
DRAIN_TIMEOUT_S: Final = 5.0  # close(): in-flight acks come back within a publish timeout; don't hang shutdown
# Ids whose publish had an unknown outcome (timeout, dropped connection): their duplicate ack still means the
# legacy copy was never sent. Bounded by the outbox size in practice; the cap only guards misuse.
MAX_UNCERTAIN_IDS: Final = 100_000

_SAFE_CHARS: Final = frozenset(string.ascii_letters + string.digits + "_:/@+=-")
_FATAL_MARKERS: Final = ("authorization violation", "authentication", "user authentication expired")


def subject_token(value: str) -> str:
    """`value` as one NATS subject token (see the module docstring); an empty value becomes `_`."""
    if not value:
        return "_"
    if all(ch in _SAFE_CHARS for ch in value):
        return value
    return "".join(ch if ch in _SAFE_CHARS else "".join(f"%{b:02X}" for b in ch.encode()) for ch in value)


def signal_subject(prefix: str, signal: Signal) -> str:
    """The JetStream subject of `signal`."""
    return f"{prefix}.{subject_token(signal.address)}.{subject_token(signal.symbol)}.{signal.direction}.{signal.side}"


def check_subject(key: str, subject: str) -> None:
    """Raise `ConfigError` naming `key` unless `subject` is a NATS subject without wildcards or empty tokens."""
    tokens = subject.split(".")
    if not subject or any(not t or t in ("*", ">") or any(c.isspace() for c in t) for t in tokens):
        raise ConfigError(key, f"{subject!r} is not a NATS subject without wildcards or empty tokens")


def _is_fatal(exc: BaseException) -> bool:
    """Errors retrying cannot fix: wrong credentials or a TLS peer we must not trust."""
    if isinstance(exc, ssl.SSLError | nats.errors.AuthorizationError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _FATAL_MARKERS)


KV_STREAM_PREFIX: Final = "KV_"  # a KeyValue bucket is the stream KV_{bucket}

# Failures after which the message may or may not have been stored: the server may have written it.
UNKNOWN_OUTCOME_REASONS: Final = frozenset({"timeout", "disconnected"})


def _replicas_refused(what: str, name: str, have: int, wanted: int, setting: str, why: str) -> DeliveryError:
    return DeliveryError(
        f"{what} {name!r} has {have} replica(s) but {setting} = {wanted}, and the server refused to change it "
        f"({why}); nothing was deleted: change {setting} back to {have} or scale the {what} on the server"
    )


def _byte_limit(value: int | None) -> int:
    """A stream's byte limit as the server reports it: unset is JetStream's -1 (no limit)."""
    return -1 if value is None else value


async def ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> StreamInfo:
    """Create the stream `wanted.name`, or update it when its settings differ; `DeliveryError` when refused.

    A replica count differing from `wanted.num_replicas` is changed in place when the server allows it (a
    cluster scales a stream up or down); otherwise the error names the stream and both counts. Never deletes.
    """
    name = wanted.name
    if not name:
        raise DeliveryError("a stream needs a name")
    have_replicas: int | None = None
    try:
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            info = await js.add_stream(wanted)
            log.info("stream created", stream=name, subjects=wanted.subjects, replicas=wanted.num_replicas)
        else:
            have = info.config
            if (
                have.subjects != wanted.subjects
                or have.duplicate_window != wanted.duplicate_window
                or have.max_age != wanted.max_age
                or _byte_limit(have.max_bytes) != _byte_limit(wanted.max_bytes)
                or have.retention != wanted.retention
                or have.num_replicas != wanted.num_replicas
            ):
                if have.num_replicas != wanted.num_replicas:
                    have_replicas = have.num_replicas
                info = await js.update_stream(wanted)
                log.info("stream updated", stream=name, subjects=wanted.subjects, replicas=wanted.num_replicas)
    except nats.js.errors.APIError as exc:
        if have_replicas is not None:
            raise _replicas_refused(
                "stream", name, have_replicas, wanted.num_replicas or 1, "nats.replicas", str(exc.description)
            ) from None
        raise DeliveryError(f"cannot create or update stream {name!r}: {exc.description}") from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise DeliveryError(f"cannot create or update stream {name!r}: {exc!r}") from None
    return info


async def ensure_kv_replicas(js: JetStreamContext, bucket: str, wanted: int) -> None:
    """Give the KeyValue bucket `bucket` (the stream `KV_{bucket}`) `wanted` replicas (`nats.kv_replicas`).

    Changed in place when the server allows it; otherwise `DeliveryError` naming the bucket and both counts.
    The bucket's other settings and its data are left as they are. NATS errors on the way (connection, timeout)
    are raised as they are, so a caller that retries them keeps doing so.
    """
    info = await js.stream_info(f"{KV_STREAM_PREFIX}{bucket}")
    have = info.config.num_replicas or 1
    if have == wanted:
        return
    try:
        await js.update_stream(replace(info.config, num_replicas=wanted))
    except nats.js.errors.APIError as exc:
        raise _replicas_refused(
            "KeyValue bucket", bucket, have, wanted, "nats.kv_replicas", str(exc.description)
        ) from None
    log.info("kv bucket replicas changed", bucket=bucket, replicas_before=have, replicas=wanted)


async def publish_with_id(
    js: JetStreamContext, subject: str, payload: bytes, *, msg_id: str, stream: str, ack_wait: float
) -> PubAck:
    """One JetStream publish carrying `Nats-Msg-Id: msg_id`; the ack says whether it was a duplicate.

    Raises `PublishError` whose `reason` is a `publish_errors` label: `no_stream`, `api_error`, `timeout`,
    `disconnected` (the last two leave the outcome unknown: the server may have stored it). Not counted here.
    """
    try:
        return await js.publish(subject, payload, timeout=ack_wait, stream=stream, headers={MSG_ID_HEADER: msg_id})
    except nats.js.errors.NoStreamResponseError:
        raise PublishError("no_stream", "no JetStream stream answered", msg_id) from None
    except nats.js.errors.APIError as exc:
        raise PublishError("api_error", f"{exc.err_code}: {exc.description}", msg_id) from None
    except (nats.errors.TimeoutError, TimeoutError):
        raise PublishError("timeout", f"no ack within {ack_wait:g} s", msg_id) from None
    except nats.errors.Error as exc:
        raise PublishError("disconnected", f"{type(exc).__name__}: {exc}", msg_id) from None


class _StartTlsEofNoise(logging.Filter):
    """Drops asyncio's "returning true from eof_received() has no effect when using ssl".

    nats-py upgrades to TLS after the server's INFO (STARTTLS style); its stream protocol still answers
    `eof_received()` as for plain TCP, so asyncio warns on every server-side close of a TLS connection.
    Harmless, and noise in every outage; only that exact message is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("returning true from eof_received() has no effect")


_TLS_EOF_FILTER: Final = _StartTlsEofNoise()


def _read_tls(cfg: NatsConfig, scheme: str) -> ssl.SSLContext | None:
    if not (cfg.tls_ca or cfg.tls_cert or scheme == "tls"):
        return None
    try:
        context = ssl.create_default_context(cafile=cfg.tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("nats.tls_ca", f"cannot load CA file {cfg.tls_ca!r}: {exc}") from None
    if cfg.tls_cert:
        try:
            context.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("nats.tls_cert", f"cannot load {cfg.tls_cert!r} / {cfg.tls_key!r}: {exc}") from None
    elif cfg.tls_key:
        raise ConfigError("nats.tls_key", "tls_key needs tls_cert")
    return context


# What the first line of each credential file starts with (nsc / nk output): a wrong file fails at start-up.
_CREDENTIAL_MARKERS: Final = {"nats.creds": "-----BEGIN NATS USER JWT-----", "nats.nkey_seed": "SU"}


def _credential_file(key: str, path: Secret) -> str:
    """The credential file's path, once it is readable and looks like what `key` needs (its content is never shown)."""
    name = str(path)
    try:
        head = Path(name).read_text(encoding="ascii", errors="replace").lstrip()[:64]
    except OSError as exc:
        raise ConfigError(key, f"cannot read {name!r}: {exc.strerror or exc}") from None
    marker = _CREDENTIAL_MARKERS[key]
    if not head.startswith(marker):
        raise ConfigError(key, f"{name!r} does not start with {marker!r}")
    return name


class Publisher:
    """The NATS connection and JetStream publishing. `connect()`, `ensure_stream()`, `publish()`, `close()`."""

    def __init__(
        self,
        nats_cfg: NatsConfig,
        signals_cfg: SignalsConfig,
        metrics: Metrics,
        *,
        url: str | None = None,
    ) -> None:
        """`url` overrides `nats_cfg.url` (the embedded server's URL); either may be a comma-separated seed list."""
        self._cfg = nats_cfg
        self._signals = signals_cfg
        self._metrics = metrics
        self._url = url or nats_cfg.url
        if self._url == EMBEDDED:
            raise DeliveryError("nats.url is 'embedded': pass the embedded server's url to Publisher")
        self._seeds = split_seeds(self._url)
        if not self._seeds:
            raise ConfigError("nats.url", "no server URL given")
        check_subject("signals.subject_prefix", signals_cfg.subject_prefix)
        if signals_cfg.legacy_enabled:
            check_subject("signals.legacy_subject", signals_cfg.legacy_subject)
        if nats_cfg.duplicate_window <= 0:
            raise ConfigError("nats.duplicate_window", "must be > 0: the outbox relies on JetStream dedup")
        if 0 < nats_cfg.max_age < nats_cfg.duplicate_window:
            raise ConfigError("nats.duplicate_window", "must not exceed nats.max_age (JetStream refuses it)")
        self._nc = Client()
        self._js: JetStreamContext | None = None
        self._connected = asyncio.Event()
        self._fatal: asyncio.Future[BaseException] | None = None
        self._stream_ready = False
        self._uncertain: OrderedDict[str, None] = OrderedDict()
        self._last_error = ""

    # ---- connection ----

    @property
    def client(self) -> Client:
        """The NATS connection, shared with the cluster's KeyValue leases (one connection per instance)."""
        return self._nc

    @property
    def url(self) -> str:
        """The configured URL or seed list, as given."""
        return self._url

    @property
    def seeds(self) -> list[str]:
        """The servers the client may connect to, in configured order."""
        return list(self._seeds)

    @property
    def connected_url(self) -> str | None:
        """The server this connection is on now (password masked); None while disconnected."""
        if not self.is_connected or self._nc.connected_url is None:
            return None
        return mask_url(self._nc.connected_url.geturl())

    @property
    def is_connected(self) -> bool:
        """True only while the connection is up (false while reconnecting)."""
        return self._nc.is_connected and not self._nc.is_draining

    async def wait_connected(self) -> None:
        await self._connected.wait()

    @property
    def server_id(self) -> str | None:
        """The id in the INFO of the server the connection is on: a restarted nats-server has a new one."""
        if not self._nc.is_connected:
            return None
        server = self._nc._server_info.get("server_id")  # nats-py keeps the latest INFO only privately
        return server if isinstance(server, str) and server else None

    async def stream_last_seq(self, stream: str) -> int:
        """The stream's last sequence (0 when it does not exist)."""
        try:
            info = await self._require_js().stream_info(stream)
        except nats.js.errors.NotFoundError:
            return 0
        return info.state.last_seq

    def _connect_options(self) -> dict[str, Any]:
        cfg = self._cfg
        options: dict[str, Any] = {
            "servers": list(self._seeds),
            "name": CONNECTION_NAME,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": cfg.reconnect_wait,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "ping_interval": PING_INTERVAL_S,
            "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
            "pending_size": PENDING_SIZE,
            "drain_timeout": DRAIN_TIMEOUT_S,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
        }
        if cfg.user is not None:
            options["user"] = str(cfg.user)
        if cfg.password is not None:
            options["password"] = str(cfg.password)
        if cfg.token is not None:
            options["token"] = str(cfg.token)
        if cfg.creds is not None:
            options["user_credentials"] = _credential_file("nats.creds", cfg.creds)
        if cfg.nkey_seed is not None:
            options["nkeys_seed"] = _credential_file("nats.nkey_seed", cfg.nkey_seed)
        scheme = "tls" if any(urlsplit(seed).scheme == "tls" for seed in self._seeds) else "nats"
        tls = _read_tls(cfg, scheme)
        if tls is not None:
            options["tls"] = tls
            logging.getLogger("asyncio").addFilter(_TLS_EOF_FILTER)  # idempotent: a filter is added once
        return options

    async def connect(self, wait: float | None = None) -> None:
        """Connect, retrying while the server is unreachable (up to `wait` seconds; None = forever).

        Raises `DeliveryError` at once for errors retrying cannot fix (credentials, TLS), or when `wait` ran out.
        """
        options = self._connect_options()
        self._fatal = asyncio.get_running_loop().create_future()
        attempt: asyncio.Future[Any] = asyncio.create_task(self._nc.connect(**options), name="nats-connect")
        waiters: set[asyncio.Future[Any]] = {attempt, self._fatal}
        done, _ = await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        problem: str | None = None
        if attempt not in done:
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await attempt
            if self._fatal.done():
                problem = f"NATS at {self._safe_url} refused the connection: {self._fatal.result()}"
            else:
                problem = f"NATS at {self._safe_url} unreachable for {wait:g} s: {self._last_error or 'no answer'}"
        elif (exc := attempt.exception()) is not None:
            problem = f"cannot connect to NATS at {self._safe_url}: {exc}"
        if problem is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._metrics.nats_connected.set(0)
            raise DeliveryError(problem)
        self._js = self._nc.jetstream(timeout=self._cfg.publish_timeout)
        self._metrics.nats_connected.set(1)
        self._connected.set()
        log.info("nats connected", url=self.connected_url, seeds=self._safe_url)

    @property
    def _safe_url(self) -> str:
        shown = []
        for seed in self._seeds:
            parts = urlsplit(seed)
            shown.append(f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.hostname else seed)
        return ",".join(shown)

    async def _on_error(self, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if self._fatal is not None and not self._fatal.done() and _is_fatal(exc):
            self._fatal.set_result(exc)
        # One line per distinct error: a server down for minutes would otherwise log every reconnect attempt.
        if text != self._last_error:
            log.warning("nats error", error=text)
        self._last_error = text

    async def _on_disconnected(self) -> None:
        if self._connected.is_set():
            log.warning("nats disconnected; reconnecting", url=self._safe_url)
        self._connected.clear()
        self._metrics.nats_connected.set(0)

    async def _on_reconnected(self) -> None:
        self._last_error = ""
        self._metrics.nats_connected.set(1)
        self._connected.set()
        log.info("nats reconnected", url=self.connected_url)

    async def _on_closed(self) -> None:
        self._connected.clear()
        self._metrics.nats_connected.set(0)

    async def close(self) -> None:
        """Drain the connection (flushes what was sent, waits for in-flight replies) and close it."""
        self._connected.clear()
        try:
            if self.is_connected:
                await self._nc.drain()
            elif not self._nc.is_closed:
                await self._nc.close()
        except nats.errors.Error as exc:
            log.warning("nats drain failed; closing", error=str(exc))
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._metrics.nats_connected.set(0)
        log.info("nats closed")

    # ---- stream ----

    def stream_config(self) -> StreamConfig:
        cfg = self._cfg
        return StreamConfig(
            name=cfg.stream,
            description="hl-monitor signals, one message per signal_id",
            subjects=[f"{self._signals.subject_prefix}.>"],
            retention=RetentionPolicy(cfg.retention),
            max_age=cfg.max_age,
            max_bytes=cfg.max_bytes,
            storage=StorageType.FILE,
            num_replicas=cfg.replicas,
            duplicate_window=cfg.duplicate_window,
            discard=DiscardPolicy.OLD,
        )

    async def ensure_stream(self) -> StreamInfo:
        """Create the stream, or update it when its settings differ from the config."""
        info = await ensure_stream(self._require_js(), self.stream_config())
        self._stream_ready = True
        return info

    def jetstream(self) -> JetStreamContext:
        """The connection's JetStream context, shared with position publications and the KV view."""
        return self._require_js()

    def _require_js(self) -> JetStreamContext:
        if self._js is None:
            raise DeliveryError("publisher is not connected: call connect() first")
        return self._js

    # ---- publish ----

    async def publish(self, signal: Signal) -> PubAck:
        """Publish `signal` once; returns the ack (`duplicate` when the stream already had it).

        Raises `PublishError` (counted in `publish_errors{reason}`); the caller keeps the signal pending.
        """
        js = self._require_js()
        sid = signal.signal_id
        if not self.is_connected:
            raise self._failed("disconnected", "not connected to NATS", sid)
        if not self._stream_ready:
            try:
                await self.ensure_stream()
            except DeliveryError as exc:
                raise self._failed("no_stream", str(exc), sid) from None
        try:
            ack = await publish_with_id(
                js,
                signal_subject(self._signals.subject_prefix, signal),
                encode_signal(signal),
                msg_id=sid,
                stream=self._cfg.stream,
                ack_wait=self._cfg.publish_timeout,
            )
        except PublishError as exc:
            if exc.reason == "no_stream":
                self._stream_ready = False  # stream gone (server reset) or JetStream not up yet: re-check next time
            elif exc.reason in UNKNOWN_OUTCOME_REASONS:
                self._remember_uncertain(sid)
            self._metrics.publish_errors.labels(reason=exc.reason).inc()
            raise
        uncertain = sid in self._uncertain
        self._uncertain.pop(sid, None)
        if ack.duplicate:
            self._metrics.publish_duplicates.inc()
        else:
            self._metrics.signals_published.labels(side=signal.side, symbol=signal.symbol).inc()
            self._metrics.signal_to_ack_seconds.observe(max(0.0, time.time() - signal.detected_at / 1000))
        if self._signals.legacy_enabled and (not ack.duplicate or uncertain):
            await self._publish_legacy(signal)
        return ack

    async def _publish_legacy(self, signal: Signal) -> None:
        try:
            await self._nc.publish(self._signals.legacy_subject, encode_legacy(signal))
        except nats.errors.Error as exc:
            self._metrics.publish_errors.labels(reason="legacy").inc()
            log.warning("legacy publish failed", signal_id=signal.signal_id, error=str(exc))

    def _remember_uncertain(self, signal_id: str) -> None:
        self._uncertain[signal_id] = None
        if len(self._uncertain) > MAX_UNCERTAIN_IDS:
            self._uncertain.popitem(last=False)
            self._metrics.evictions.labels(kind="publish_uncertain").inc()

    def _failed(self, reason: str, detail: str, signal_id: str) -> PublishError:
        self._metrics.publish_errors.labels(reason=reason).inc()
        return PublishError(reason, detail, signal_id)


# How long the service waits for an external NATS at start before giving up with a clear error.
NATS_CONNECT_WAIT_S: Final = 30.0


@asynccontextmanager
async def open_publisher(
    nats_cfg: NatsConfig, signals_cfg: SignalsConfig, metrics: Metrics
) -> AsyncIterator[tuple[Publisher, EmbeddedNats | None]]:
    """The embedded server (`nats.url = "embedded"`), the publisher connected to NATS and the stream created or
    updated; on exit the connection drains, then the embedded server stops."""
    async with AsyncExitStack() as stack:
        embedded: EmbeddedNats | None = None
        if nats_cfg.url == EMBEDDED:
            embedded = EmbeddedNats(nats_cfg, metrics)
            await embedded.start()
            stack.push_async_callback(embedded.stop)
        publisher = Publisher(nats_cfg, signals_cfg, metrics, url=embedded.url if embedded is not None else None)
        await publisher.connect(wait=NATS_CONNECT_WAIT_S)
        stack.push_async_callback(quietly(publisher.close, DeliveryError))
        await publisher.ensure_stream()
        yield publisher, embedded
