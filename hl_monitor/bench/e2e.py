"""End-to-end bench: simulator (own process) → real WebSockets → precise tier → engine → writer + outbox → JetStream.

The pipeline is assembled from the service's own components the way the app composes them (address book,
`PreciseManager` with one `UserStream` per whale, `TrackingEngine`, `BatchWriter` + `Outbox` + `Publisher`, a
real `nats-server` with JetStream, MariaDB or SQLite migrated by Alembic). The simulator runs in a child
process (`bench.simproc`) so it does not share the service's event loop.

Per run the sim places market orders and reports, per oid, the wall-clock time its frames were queued for
sending; the publisher records the wall-clock time of each JetStream ack. Latency = ack − send per order (the
later ack when a flip made two signals); throughput = fills / (last ack − first send). Zero loss is checked
after each run: every order has an acked signal, the engine processed every fill exactly once, the stream
holds one message per signal, and the database holds every signal, marked published.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal

import msgspec
import sqlalchemy as sa
from nats.js.api import PubAck
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from hl_monitor.bench.frames import whale_address
from hl_monitor.config import Config, DatabaseConfig, HyperliquidConfig, NatsConfig
from hl_monitor.delivery.embedded_nats import EmbeddedNats
from hl_monitor.delivery.outbox import Outbox
from hl_monitor.delivery.publisher import MSG_ID_HEADER, Publisher, signal_subject
from hl_monitor.errors import HlMonitorError
from hl_monitor.feeds.addresses import AddressBook, AddressDiff, StaticSource, WatchedAddress
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.connection import ConnState
from hl_monitor.feeds.precise import PreciseManager
from hl_monitor.hyperliquid.info import InfoClient
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.ops.metrics import Metrics
from hl_monitor.storage import tables as t
from hl_monitor.storage.migrate import upgrade
from hl_monitor.storage.repository import Repository, create_engine, now_ms
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.signals import Signal, encode_signal

__all__ = ["BenchError", "LoadRun", "Pipeline", "PipelineOptions", "percentile"]

DbKind = Literal["mariadb", "sqlite"]

# A run that has not delivered every order this long after the last one was sent has lost something.
COMPLETION_TIMEOUT_S: Final = 120.0
READY_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.01
# The sim pushes clearinghouse state every 5 s; under a saturating load the canary can queue behind fills,
# so the stale threshold is raised to keep a benchmark from measuring a reconnect instead of throughput.
BENCH_STALE_AFTER_S: Final = 120.0
SIM_START_TIMEOUT_S: Final = 30.0
SIM_LINE_LIMIT: Final = 256 * 1024 * 1024  # a load answer lists every order: tens of MB at most


class BenchError(HlMonitorError):
    """A benchmark could not run or its run lost data."""


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    db: DbKind
    mysql_url: str
    ack: bool = True  # JetStream publish waiting for the PubAck; False = core NATS publish (the baseline)
    whales: int = 8


@dataclass(slots=True)
class LoadRun:
    """What one load run delivered."""

    orders: int
    fills: int
    signals: int
    first_send: float
    last_ack: float
    latencies_ms: list[float]
    detect_ms: list[float]  # frame sent → signal built (WebSocket, decode, engine), ms resolution
    deliver_ms: list[float]  # signal built → JetStream ack
    loss: dict[str, Any] = field(default_factory=dict)

    @property
    def fills_per_s(self) -> float:
        span = self.last_ack - self.first_send
        return self.fills / span if span > 0 else 0.0

    @property
    def zero_loss(self) -> bool:
        return bool(self.loss.get("zero_loss"))


class _TimedPublisher(Publisher):
    """The real publisher, plus the wall-clock ack time of every signal (and an un-acked core-publish mode)."""

    def __init__(self, *args: Any, ack: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ack = ack
        self.acked: dict[str, tuple[int | None, float]] = {}  # signal_id → (oid, ack time)
        self.by_oid: dict[int, float] = {}  # oid → latest ack time
        self.detected: dict[int, float] = {}  # oid → latest detected_at (s)

    async def publish(self, signal: Signal) -> PubAck:
        if self._ack:
            ack = await super().publish(signal)
        else:
            subject = signal_subject(self._signals.subject_prefix, signal)
            await self._nc.publish(subject, encode_signal(signal), headers={MSG_ID_HEADER: signal.signal_id})
            ack = PubAck(stream=self._cfg.stream, seq=0)
        at = time.time()
        self.acked[signal.signal_id] = (signal.oid, at)
        if signal.oid is not None:
            self.by_oid[signal.oid] = at
            self.detected[signal.oid] = signal.detected_at / 1000
        return ack


class _SimProcess:
    """The simulator child process (see `bench.simproc`)."""

    def __init__(self, log: Path) -> None:
        self._log_path = log
        self._log: IO[bytes] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def start(self) -> None:
        self._log = self._log_path.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hl_monitor.bench.simproc",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
            limit=SIM_LINE_LIMIT,
        )
        hello = await asyncio.wait_for(self._read(), SIM_START_TIMEOUT_S)
        self.port = int(hello["port"])

    async def _read(self) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            code = await self.proc.wait()
            tail = self._log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"simulator process exited (code {code}): {tail}")
        answer: dict[str, Any] = msgspec.json.decode(line)
        return answer

    async def request(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(msgspec.json.encode(cmd) + b"\n")
        await self.proc.stdin.drain()
        return await self._read()

    async def stop(self) -> None:
        try:
            await self._stop()
        finally:
            if self._log is not None:
                self._log.close()

    async def _stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            proc.stdin.write(b'{"cmd":"quit"}\n')
            await proc.stdin.drain()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class Pipeline:
    """The service's precise path against the simulator; `async with Pipeline(opts) as p: await p.load(...)`."""

    def __init__(self, opts: PipelineOptions) -> None:
        self.opts = opts
        self.whales = [whale_address(i) for i in range(opts.whales)]
        self.metrics = Metrics()
        self.startup_s = 0.0
        self._tmp = tempfile.TemporaryDirectory(prefix="hl-bench-")
        self._sim = _SimProcess(Path(self._tmp.name) / "sim.log")
        self._nats: EmbeddedNats | None = None
        self._db_name: str | None = None
        self._db: AsyncEngine | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._info: InfoClient | None = None
        self.publisher: _TimedPublisher | None = None
        self.writer: BatchWriter | None = None
        self.outbox: Outbox | None = None
        self.engine: TrackingEngine | None = None
        self.manager: PreciseManager | None = None
        self._cfg = Config()
        self._expected_signals = 0
        self._fills_sent = 0

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Pipeline:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _database_url(self) -> str:
        if self.opts.db == "sqlite":
            return f"sqlite+aiosqlite:///{Path(self._tmp.name) / 'bench.db'}"
        self._db_name = f"hlm_bench_{uuid.uuid4().hex[:12]}"
        admin = create_async_engine(self.opts.mysql_url)
        try:
            async with admin.begin() as conn:
                await conn.execute(sa.text(f"CREATE DATABASE `{self._db_name}` CHARACTER SET utf8mb4"))
        except Exception as exc:
            self._db_name = None
            raise BenchError(f"MariaDB at {self.opts.mysql_url} is not usable: {exc}") from None
        finally:
            await admin.dispose()
        return f"{self.opts.mysql_url.rsplit('/', 1)[0]}/{self._db_name}"

    async def _start(self) -> None:
        started = time.perf_counter()
        await self._sim.start()
        sim_url = f"127.0.0.1:{self._sim.port}"
        nats_cfg = NatsConfig(store_dir=str(Path(self._tmp.name) / "nats"))
        self._nats = EmbeddedNats(nats_cfg, self.metrics)
        await self._nats.start()
        self._tasks.append(asyncio.create_task(self._nats.run(), name="bench-nats"))
        db_url = await self._database_url()
        await upgrade(db_url)
        self._cfg = cfg = Config(
            hyperliquid=HyperliquidConfig(
                ws_url=f"ws://{sim_url}/ws", info_url=f"http://{sim_url}/info", stale_after=BENCH_STALE_AFTER_S
            ),
            nats=nats_cfg,
            database=DatabaseConfig(url=db_url),
        )
        self._db = create_engine(cfg)
        repo = Repository(self._db)
        self.writer = writer = BatchWriter(self._db, cfg.writer, self.metrics)
        self.publisher = publisher = _TimedPublisher(
            cfg.nats, cfg.signals, self.metrics, url=self._nats.url, ack=self.opts.ack
        )
        await publisher.connect(wait=10)
        await publisher.ensure_stream()
        self.outbox = outbox = Outbox(publisher, repo, writer, self.metrics, cfg.nats)
        self.engine = engine = TrackingEngine(cfg.aggregation, SymbolMap.empty())

        async def on_change(diff: AddressDiff) -> None:
            for address in diff.added:
                engine.add_address(address)
            for address in diff.removed:
                engine.remove_address(address)

        book = AddressBook(
            [StaticSource([WatchedAddress(address=a, tier="precise") for a in self.whales])],
            self.metrics,
            reload_interval=cfg.addresses.reload_interval,
            remove_grace=cfg.addresses.remove_grace,
            on_change=on_change,
        )
        budgets = Budgets(cfg.hyperliquid, self.metrics)
        self._info = info = InfoClient.from_config(cfg.hyperliquid, budgets, self.metrics)
        await info.__aenter__()
        self.manager = PreciseManager(
            cfg.hyperliquid,
            book,
            tracker=engine,
            info=info,
            budget=budgets,
            metrics=self.metrics,
            on_signals=self._sink,
        )
        for name, coro in (
            ("bench-writer", writer.run()),
            ("bench-outbox", outbox.run()),
            ("bench-book", book.run()),
            ("bench-persist", self._persist()),
        ):
            self._tasks.append(asyncio.create_task(coro, name=name))
        await book.wait_loaded()
        self._tasks.append(asyncio.create_task(self.manager.run(), name="bench-precise"))
        if not await self._wait(self._ready, READY_TIMEOUT_S):
            raise BenchError(f"precise streams not live within {READY_TIMEOUT_S:g} s")
        self.startup_s = time.perf_counter() - started

    def _ready(self) -> bool:
        assert self.manager is not None
        for address in self.whales:
            stream = self.manager.stream(address)
            if stream is None or stream.connection.state is not ConnState.LIVE or stream.recoveries < 1:
                return False
        return True

    async def _wait(self, condition: Callable[[], bool], limit_s: float) -> bool:
        """Poll `condition` until it holds (True) or `limit_s` passes (False); a crashed component raises."""
        deadline = time.monotonic() + limit_s
        while not condition():
            for task in self._tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise BenchError(f"{task.get_name()} failed: {task.exception()!r}")
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    async def _sink(self, signals: list[Signal]) -> None:
        assert self.writer is not None
        assert self.outbox is not None
        for signal in signals:
            await self.writer.put_signal(signal)
            await self.outbox.submit(signal)

    async def _persist(self) -> None:
        assert self.engine is not None
        assert self.writer is not None
        while True:
            # Engine deltas go to the writer on its own flush cadence (what the app does between flushes).
            await asyncio.sleep(self._cfg.writer.flush_interval)
            timed_out = self.engine.tick(now_ms())
            if timed_out:
                await self._sink(timed_out)
            await self.writer.put_delta(self.engine.take_dirty())

    async def _stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.outbox is not None:
                await self.outbox.drain(5.0)
        for task in self._tasks:
            if task.get_name() not in ("bench-writer", "bench-nats", "bench-outbox"):
                task.cancel()
        with contextlib.suppress(Exception):
            if self.writer is not None:
                await self.writer.close()
        with contextlib.suppress(Exception):
            if self.publisher is not None:
                await self.publisher.close()
        if self._info is not None:
            with contextlib.suppress(Exception):
                await self._info.__aexit__(None, None, None)
        if self._nats is not None:
            with contextlib.suppress(Exception):
                await self._nats.stop()
        for task in self._tasks:
            if not task.done():
                task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks.clear()
        await self._sim.stop()
        if self._db is not None:
            await self._db.dispose()
        if self._db_name is not None:
            admin = create_async_engine(self.opts.mysql_url)
            try:
                async with admin.begin() as conn:
                    await conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{self._db_name}`"))
            finally:
                await admin.dispose()
        self._tmp.cleanup()

    # ---------------------------------------------------------------- load

    async def load(self, *, orders: int, fills_per_order: int, rate: float | None, seed: int) -> LoadRun:
        """Place `orders` orders at `rate` fills/s (None: as fast as the sim goes) and wait for every ack."""
        assert self.publisher is not None
        assert self.engine is not None
        publisher = self.publisher
        processed_before = self.engine.stats.fills_processed
        dups_before = self.engine.stats.duplicate_fills
        answer = await self._sim.request(
            {
                "cmd": "load",
                "whales": self.whales,
                "orders": orders,
                "fills_per_order": fills_per_order,
                "rate": rate,
                "seed": seed,
            }
        )
        sent: list[tuple[int, float, int]] = [tuple(x) for x in answer["sent"]]
        fills = int(answer["fills"])
        self._fills_sent += fills
        oids = {oid for oid, _, _ in sent}
        by_oid = publisher.by_oid

        def delivered() -> bool:
            return all(oid in by_oid for oid in oids)

        await self._wait(delivered, COMPLETION_TIMEOUT_S)  # on timeout the loss check reports what is missing
        run_signals = [sid for sid, (oid, _) in publisher.acked.items() if oid in oids]
        latencies = [(by_oid[oid] - at) * 1000 for oid, at, _ in sent if oid in by_oid]
        run = LoadRun(
            orders=len(sent),
            fills=fills,
            signals=len(run_signals),
            first_send=min(at for _, at, _ in sent),
            last_ack=max((by_oid[oid] for oid in oids if oid in by_oid), default=0.0),
            latencies_ms=latencies,
            detect_ms=[(publisher.detected[oid] - at) * 1000 for oid, at, _ in sent if oid in by_oid],
            deliver_ms=[(by_oid[oid] - publisher.detected[oid]) * 1000 for oid in oids if oid in by_oid],
        )
        self._expected_signals += run.signals
        run.loss = await self._check_loss(oids, processed_before, dups_before, fills)
        return run

    async def _check_loss(self, oids: set[int], processed_before: int, dups_before: int, fills: int) -> dict[str, Any]:
        assert self.publisher is not None
        assert self.writer is not None
        assert self.engine is not None
        assert self._db is not None
        missing = sum(1 for oid in oids if oid not in self.publisher.by_oid)
        # Wait for the flushes and published marks of this run to be committed, then count.
        deadline = time.monotonic() + COMPLETION_TIMEOUT_S
        while True:
            await self.writer.flush()
            async with self._db.connect() as conn:
                rows = (await conn.execute(sa.select(sa.func.count()).select_from(t.signals))).scalar_one()
                published = (
                    await conn.execute(sa.select(sa.func.count()).select_from(t.signals).where(t.signals.c.published))
                ).scalar_one()
            js = self.publisher._nc.jetstream()
            stream_messages = (await js.stream_info(self._cfg.nats.stream)).state.messages
            settled = published == self._expected_signals and stream_messages >= self._expected_signals
            if settled or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        processed = self.engine.stats.fills_processed - processed_before
        duplicates = self.engine.stats.duplicate_fills - dups_before
        facts: dict[str, Any] = {
            "orders_without_signal": missing,
            "fills_sent": fills,
            "fills_processed": processed,
            "duplicate_fills": duplicates,
            "signals_expected_total": self._expected_signals,
            "stream_messages_total": stream_messages,
            "db_signals_total": rows,
            "db_published_total": published,
        }
        facts["zero_loss"] = (
            missing == 0
            and processed == fills
            and stream_messages == self._expected_signals
            and rows == self._expected_signals
            and published == self._expected_signals
        )
        return facts
