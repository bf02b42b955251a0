"""End-to-end bench: simulator (own process) → real WebSockets → the real service → JetStream + database.

Each pipeline is the service itself: `hl_monitor.app.Service(cfg).run(stop)` in this process, configured like
a deployment (embedded `nats-server` with JetStream, MariaDB or SQLite migrated by Alembic, the watched
whales in `addresses.initial`, HTTP, wide tier, retention, every background task), against the simulator in
a child process (`bench.simproc`) so the sim does not share the service's event loop. Only the clocks are
added: the bench wraps the running service's `Publisher.publish` to note the wall-clock time of each
JetStream ack (and, for the core-publish baseline, swaps the ack for a core NATS publish).

Per run the sim places market orders and reports, per oid, the wall-clock time its frames were queued for
sending. Latency = ack − send per order (the later ack when a flip made two signals); throughput = fills /
(last ack − first send). Zero loss is checked after each run: every order has an acked signal, the engine
processed every fill exactly once, the stream holds one message per signal, and the database holds every
signal, marked published.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal

import msgspec
import sqlalchemy as sa
from nats.js.api import PubAck
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from hl_monitor.app import Service
from hl_monitor.bench.frames import whale_address
from hl_monitor.bench.loopsteps import LoopSteps, StepSummary
from hl_monitor.bench.results import percentile
from hl_monitor.config import (
    AddressesConfig,
    Config,
    DatabaseConfig,
    HttpConfig,
    HyperliquidConfig,
    NatsConfig,
    ServiceConfig,
)
from hl_monitor.delivery.publisher import MSG_ID_HEADER, Publisher, signal_subject
from hl_monitor.domain.signal import Signal, encode_signal
from hl_monitor.errors import BenchError
from hl_monitor.feeds.connection import ConnState
from hl_monitor.storage import tables as t
from hl_monitor.storage.migrate import upgrade

__all__ = ["BenchError", "LoadRun", "Pipeline", "PipelineOptions", "SimProcess", "percentile"]

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
SERVICE_STOP_TIMEOUT_S: Final = 60.0  # the service's own shutdown deadline is 25 s; past this it is hung
BENCH_INSTANCE_ID: Final = "bench"
# The bare-publish probe: a stream of its own on the service's server (the signals stream's count stays exact).
PROBE_STREAM: Final = "BENCH_PROBE"
PROBE_SUBJECT: Final = "bench.probe"
PROBE_PAYLOAD_BYTES: Final = 600  # about one encoded signal


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
    steps: StepSummary | None = None  # the loop's steps from the first order sent to the last ack

    @property
    def fills_per_s(self) -> float:
        span = self.last_ack - self.first_send
        return self.fills / span if span > 0 else 0.0

    @property
    def zero_loss(self) -> bool:
        return bool(self.loss.get("zero_loss"))


class _AckClock:
    """Wraps the running service's `Publisher.publish`: notes each ack's wall-clock time per signal and oid.

    With `ack=False` the publish becomes a core NATS publish (no PubAck wait): the baseline that shows
    what waiting for JetStream costs. The stream still stores those messages (it captures the subjects).
    """

    def __init__(self, publisher: Publisher, *, ack: bool, stream: str, subject_prefix: str) -> None:
        self.acked: dict[str, tuple[int | None, float]] = {}  # signal_id → (oid, ack time)
        self.by_oid: dict[int, float] = {}  # oid → latest ack time
        self.detected: dict[int, float] = {}  # oid → latest detected_at (s)
        self.waiting: set[int] = set()  # oids of the current run not acked yet
        real = publisher.publish
        client = publisher.client

        async def publish(signal: Signal) -> PubAck:
            if ack:
                answer = await real(signal)
            else:
                subject = signal_subject(subject_prefix, signal)
                await client.publish(subject, encode_signal(signal), headers={MSG_ID_HEADER: signal.signal_id})
                answer = PubAck(stream=stream, seq=0)
            at = time.time()
            self.acked[signal.signal_id] = (signal.oid, at)
            if signal.oid is not None:
                self.by_oid[signal.oid] = at
                self.detected[signal.oid] = signal.detected_at / 1000
                self.waiting.discard(signal.oid)
            return answer

        publisher.publish = publish  # type: ignore[method-assign]  # this instance only: the bench's clock


class SimProcess:
    """The simulator child process (see `bench.simproc`)."""

    def __init__(self, log: Path, config: dict[str, Any] | None = None) -> None:
        self._log_path = log
        self._config = config or {}  # SimConfig fields over the child's defaults
        self._log: IO[bytes] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def start(self) -> None:
        self._log = self._log_path.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hl_monitor.bench.simproc",
            msgspec.json.encode(self._config).decode(),
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
    """The real service against the simulator; `async with Pipeline(opts) as p: await p.load(...)`."""

    def __init__(self, opts: PipelineOptions) -> None:
        self.opts = opts
        self.whales = [whale_address(i) for i in range(opts.whales)]
        self.startup_s = 0.0
        self._tmp = tempfile.TemporaryDirectory(prefix="hl-bench-")
        self._sim = SimProcess(Path(self._tmp.name) / "sim.log")
        self._db_name: str | None = None
        self._db: AsyncEngine | None = None  # the bench's own connection, for the loss check
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.service: Service | None = None
        self.clock: _AckClock | None = None
        self._cfg = Config()
        self._expected_signals = 0

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Pipeline:
        try:
            await self._start()
        except BaseException:
            await self._stop_all()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_all()

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

    def config(self, sim_url: str, db_url: str) -> Config:
        """A deployment's config with the bench's endpoints: defaults everywhere else."""
        tmp = Path(self._tmp.name)
        return Config(
            service=ServiceConfig(instance_id=BENCH_INSTANCE_ID, data_dir=str(tmp / "data")),
            hyperliquid=HyperliquidConfig(
                ws_url=f"ws://{sim_url}/ws", info_url=f"http://{sim_url}/info", stale_after=BENCH_STALE_AFTER_S
            ),
            nats=NatsConfig(url="embedded", store_dir=str(tmp / "nats")),
            database=DatabaseConfig(url=db_url),
            addresses=AddressesConfig(initial=list(self.whales)),
            http=HttpConfig(listen=f"127.0.0.1:{_free_port()}"),
        )

    async def prepare(self, db_url: str) -> None:
        """Runs once the database is migrated, before the service starts (a subclass fills tables here)."""

    async def _start(self) -> None:
        started = time.perf_counter()
        await self._sim.start()
        db_url = await self._database_url()
        await upgrade(db_url)
        await self.prepare(db_url)
        self._cfg = cfg = self.config(f"127.0.0.1:{self._sim.port}", db_url)
        self._db = create_async_engine(db_url)
        self.service = service = Service(cfg)
        self._task = asyncio.create_task(service.run(self._stop), name="bench-service")
        if not await self._wait(self._ready, READY_TIMEOUT_S):
            raise BenchError(f"service not ready with {len(self.whales)} live precise streams in {READY_TIMEOUT_S:g} s")
        self.startup_s = time.perf_counter() - started
        self.clock = _AckClock(
            service.components.publisher,
            ack=self.opts.ack,
            stream=cfg.nats.stream,
            subject_prefix=cfg.signals.subject_prefix,
        )

    def _ready(self) -> bool:
        service = self.service
        if service is None or not service.ready_event.is_set():
            return False
        for address in self.whales:
            stream = service.components.precise.stream(address)
            if stream is None or stream.connection.state is not ConnState.LIVE or stream.recoveries < 1:
                return False
        return True

    async def _wait(self, condition: Callable[[], bool], limit_s: float) -> bool:
        """Poll `condition` until it holds (True) or `limit_s` passes (False); a crashed service raises."""
        deadline = time.monotonic() + limit_s
        while not condition():
            task = self._task
            if task is not None and task.done():
                exc = None if task.cancelled() else task.exception()
                raise BenchError(f"the service stopped: {exc!r}")
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    async def _stop_all(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, SERVICE_STOP_TIMEOUT_S)
            except Exception as exc:  # a failed or hung shutdown must not leak the sim, the database or tmp
                sys.stderr.write(f"bench: service shutdown failed: {exc!r}\n")
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

    async def load(
        self, *, orders: int, fills_per_order: int, rate: float | None, seed: int, steps: LoopSteps | None = None
    ) -> LoadRun:
        """Place `orders` orders at `rate` fills/s (None: as fast as the sim goes) and wait for every ack.

        With `steps`, the loop's step durations are recorded from the load request until the last ack."""
        assert self.clock is not None
        assert self.service is not None
        clock, engine = self.clock, self.service.components.engine
        processed_before = engine.stats.fills_processed
        dups_before = engine.stats.duplicate_fills
        if steps is not None:
            steps.reset()
            steps.install()
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
        oids = {oid for oid, _, _ in sent}
        by_oid = clock.by_oid
        clock.waiting = {oid for oid in oids if oid not in by_oid}
        try:
            await self._wait(lambda: not clock.waiting, COMPLETION_TIMEOUT_S)  # on timeout the loss check tells
        finally:
            if steps is not None:
                steps.uninstall()
        run_signals = [sid for sid, (oid, _) in clock.acked.items() if oid in oids]
        latencies = [(by_oid[oid] - at) * 1000 for oid, at, _ in sent if oid in by_oid]
        run = LoadRun(
            orders=len(sent),
            fills=fills,
            signals=len(run_signals),
            first_send=min(at for _, at, _ in sent),
            last_ack=max((by_oid[oid] for oid in oids if oid in by_oid), default=0.0),
            latencies_ms=latencies,
            detect_ms=[(clock.detected[oid] - at) * 1000 for oid, at, _ in sent if oid in by_oid],
            deliver_ms=[(by_oid[oid] - clock.detected[oid]) * 1000 for oid in oids if oid in by_oid],
            steps=steps.summary() if steps is not None else None,
        )
        self._expected_signals += run.signals
        run.loss = await self._check_loss(oids, processed_before, dups_before, fills)
        return run

    async def bare_publish_ms(self, count: int) -> list[float]:
        """Round trips of `count` acknowledged JetStream publishes, one at a time, on the service's NATS server and
        connection, to a file stream of their own: the floor under the service's frame → ack latency."""
        assert self.service is not None
        js = self.service.components.publisher.client.jetstream()
        await js.add_stream(name=PROBE_STREAM, subjects=[PROBE_SUBJECT])
        payload = b"x" * PROBE_PAYLOAD_BYTES
        took: list[float] = []
        try:
            for n in range(count):
                started = time.perf_counter()
                await js.publish(PROBE_SUBJECT, payload, headers={MSG_ID_HEADER: f"probe-{n}"})
                took.append((time.perf_counter() - started) * 1000)
        finally:
            await js.delete_stream(PROBE_STREAM)
        return took

    async def _check_loss(self, oids: set[int], processed_before: int, dups_before: int, fills: int) -> dict[str, Any]:
        assert self.clock is not None
        assert self.service is not None
        assert self._db is not None
        engine, writer = self.service.components.engine, self.service.components.writer
        missing = sum(1 for oid in oids if oid not in self.clock.by_oid)
        # Wait for the flushes and published marks of this run to be committed, then count.
        deadline = time.monotonic() + COMPLETION_TIMEOUT_S
        js = self.service.components.publisher.client.jetstream()
        while True:
            await writer.flush()
            async with self._db.connect() as conn:
                rows = (await conn.execute(sa.select(sa.func.count()).select_from(t.signals))).scalar_one()
                published = (
                    await conn.execute(sa.select(sa.func.count()).select_from(t.signals).where(t.signals.c.published))
                ).scalar_one()
            stream_messages = (await js.stream_info(self._cfg.nats.stream)).state.messages
            settled = published == self._expected_signals and stream_messages >= self._expected_signals
            if settled or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        processed = engine.stats.fills_processed - processed_before
        duplicates = engine.stats.duplicate_fills - dups_before
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
