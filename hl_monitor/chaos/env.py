"""The chaos environment: simulator in this loop, real NATS, real database, the service as a subprocess.

    async with ChaosEnv(options, workdir) as env:
        await env.start_service()                 # `python -m hl_monitor run`, waits for /health/ready
        async with env.trading():                 # whales trade in the background (seeded)
            async with env.observe() as obs:      # samples /health/ready and /metrics while a fault lasts
                env.nats.stop(kill=True) ...
        verdict = await env.finish()              # settle orders, wait for delivery, SIGTERM, compare with ledger

The verdict compares the JetStream stream and the signals table with the simulator's ledger (ground truth per
order): every order that filled exactly once per `dir`, with the exact size, VWAP and fill count, every stored
message's `Nats-Msg-Id` equal to its `signal_id`, the same ids in the table, all marked published.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Self

import nats
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from hl_monitor.bench.frames import order_size, px_step
from hl_monitor.chaos.procs import NatsProcess, ServiceProcess
from hl_monitor.chaos.relay import HOST, TcpRelay, free_port
from hl_monitor.config import ENV_PREFIX
from hl_monitor.domain.signal import Signal, decode_signal
from hl_monitor.errors import ChaosError
from hl_monitor.sim.exchange import WireFill
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.storage.migrate import upgrade
from hl_monitor.storage.repository import Repository

__all__ = [
    "DEFAULT_MYSQL_URL",
    "WHALES",
    "ChaosEnv",
    "ChaosOptions",
    "Observation",
    "Trader",
    "Verdict",
    "compare",
    "expected_orders",
    "order_key",
    "stream_signals",
]

DEFAULT_MYSQL_URL: Final = os.environ.get("HL_TEST_MYSQL_URL", "mysql+aiomysql://root@127.0.0.1:3306/test")
WHALES: Final = ("0x" + "c1" * 20, "0x" + "d2" * 20)
STREAM: Final = "HL_SIGNALS"
SUBJECT_PREFIX: Final = "hl.signals."
STALE_AFTER_S: Final = 2.0  # the service's hyperliquid.stale_after: a stall is noticed within a few seconds
OBSERVE_INTERVAL_S: Final = 0.2  # readiness/metrics sampling while a fault lasts
DELIVERY_STALL_S: Final = 20.0  # settling gives up when the table and the stream did not grow for this long
DELIVERY_MAX_S: Final = 240.0  # and in any case after this long
DUPLICATE_WATCH_S: Final = 0.5  # extra time after the last expected signal in which a duplicate would show up
TRADE_COINS: Final = ("BTC", "ETH", "SOL")
MAX_RESTING_PER_WHALE: Final = 4  # open limit orders per whale; more would only inflate recovery's orderStatus calls
LIMIT_OFFSET: Final = Decimal("0.002")  # resting limit orders sit 0.2 % away from the mid

SignalKey = tuple[Any, ...]  # what a signal is matched to the ledger by: (oid, dir) for orders
Totals = tuple[Decimal, Decimal, int]  # (size, VWAP, fill count)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChaosOptions:
    """How hard and how long. `quick` is the CI variant: same faults, shorter holds, fewer repetitions."""

    db: str = "sqlite"  # "sqlite" or "mariadb" (MariaDB sits behind a cuttable TCP relay)
    mysql_url: str = DEFAULT_MYSQL_URL  # server to create a fresh database on when db == "mariadb"
    quick: bool = False
    kill_points: int = 20
    db_outage_s: float = 60.0
    seed: int = 1
    keep_workdir: bool = False
    soak_s: float | None = None  # length of the soak scenario's load phase (None: its quick/full default)


_FLIPS: Final = {"Long > Short": ("Close Long", "Open Short"), "Short > Long": ("Close Short", "Open Long")}


def _by_order(fill: WireFill, dir_: str) -> SignalKey:
    return (fill.oid, dir_)


def expected_orders(
    sim: SimServer, *addresses: str, by: Callable[[WireFill, str], SignalKey] = _by_order
) -> dict[SignalKey, Totals]:
    """Ground truth from the exchange's fills: (oid, dir) → (size, VWAP, fill count).

    A flip fill counts as a close of |startPosition| and an open of the rest (the signal contract), so the
    ledger's per-`dir` totals are rebuilt from the fills themselves. `by` groups fills other ways (tape blocks).
    """
    acc: dict[SignalKey, tuple[Decimal, Decimal, int]] = {}

    def add(key: SignalKey, sz: Decimal, px: Decimal) -> None:
        size, notional, count = acc.get(key, (Decimal(0), Decimal(0), 0))
        acc[key] = (size + sz, notional + sz * px, count + 1)

    ex = sim.exchange
    for address in addresses:
        for fill in ex.user_fills(address, 1 << 30):
            sz, px = Decimal(fill.sz), Decimal(fill.px)
            split = _FLIPS.get(fill.dir)
            if split is None:
                add(by(fill, fill.dir), sz, px)
                continue
            closed = abs(Decimal(fill.start_position))
            add(by(fill, split[0]), closed, px)
            if sz > closed:
                add(by(fill, split[1]), sz - closed, px)
    return {key: (size, notional / size, count) for key, (size, notional, count) in acc.items()}


async def stream_signals(nats_url: str, stream: str = STREAM, **options: Any) -> list[tuple[str, Signal]]:
    """Every stored message of the stream that is a full signal: (Nats-Msg-Id, decoded signal)."""
    nc = await nats.connect(nats_url, allow_reconnect=False, **options)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out: list[tuple[str, Signal]] = []
        if not info.state.messages:  # an empty stream reports first_seq 0, which no message has
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            if msg.subject and msg.subject.startswith(SUBJECT_PREFIX) and msg.data is not None:
                out.append((msg_id, decode_signal(msg.data)))
        return out
    finally:
        await nc.close()


async def stream_count(nats_url: str, stream: str = STREAM, **options: Any) -> int:
    """Messages in the stream now (0 when the stream or the server is not there)."""
    try:
        nc = await nats.connect(nats_url, allow_reconnect=False, connect_timeout=1, **options)
    except Exception:  # any connection failure: nothing to count yet
        return 0
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    except Exception:  # stream not created yet
        return 0
    finally:
        await nc.close()


@dataclass(slots=True)
class Verdict:
    """Stream and table against the ledger. `problems` is empty when both hold exactly the expected signals."""

    expected: int = 0
    in_stream: int = 0
    in_table: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def order_key(sig: Signal) -> SignalKey:
    """The ledger key of a precise signal: (oid, dir)."""
    return (sig.oid or 0, sig.dir)


def tape_key(sig: Signal) -> SignalKey:
    """The ledger key of a tape signal: its block (address, coin, block time, dir)."""
    return ("tape", sig.address, sig.coin, sig.timestamp, sig.dir)


def block_of(address: str) -> Callable[[WireFill, str], SignalKey]:
    """`expected_orders` grouping for the wide tier: an address's fills by tape block, keyed like `tape_key`."""

    def key(fill: WireFill, dir_: str) -> SignalKey:
        return ("tape", address, fill.coin, fill.time, dir_)

    return key


def compare(
    want: Mapping[SignalKey, Totals],
    stored: list[tuple[str, Signal]],
    rows: list[tuple[Signal, bool]],
    unpublished: int,
    *,
    key: Callable[[Signal], SignalKey] = order_key,
) -> Verdict:
    verdict = Verdict(expected=len(want), in_stream=len(stored), in_table=len(rows))
    problems = verdict.problems
    ids = [msg_id for msg_id, _ in stored]
    if len(ids) != len(set(ids)):
        problems.append(f"stream: {len(ids) - len(set(ids))} Nats-Msg-Id stored twice")
    bad_ids = [msg_id for msg_id, sig in stored if msg_id != sig.signal_id]
    if bad_ids:
        problems.append(f"stream: {len(bad_ids)} messages whose Nats-Msg-Id is not their signal_id")
    for where, signals in (("stream", [s for _, s in stored]), ("table", [s for s, _ in rows])):
        got: dict[SignalKey, Totals] = {}
        for sig in signals:
            k = key(sig)
            if k in got:
                problems.append(f"{where}: duplicate signal for {k} ({sig.signal_id})")
            got[k] = (sig.size, sig.price, sig.fill_count)
        # Sorted by text: keys of different shapes (orders, tape blocks) may be mixed.
        missing = sorted(set(want) - set(got), key=str)
        extra = sorted(set(got) - set(want), key=str)
        wrong = sorted((k for k in set(want) & set(got) if want[k] != got[k]), key=str)
        if missing:
            problems.append(f"{where}: {len(missing)} expected signals missing, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{where}: {len(extra)} signals for no order, e.g. {extra[:3]}")
        for k in wrong[:3]:
            problems.append(f"{where}: {k}: got {got[k]}, ledger says {want[k]}")
        if len(wrong) > 3:
            problems.append(f"{where}: {len(wrong) - 3} more signals with a wrong size/price/fill count")
    if sorted(s.signal_id for s, _ in rows) != sorted(ids):
        problems.append("table and stream hold different signal_ids")
    if unpublished or not all(published for _, published in rows):
        problems.append(f"table: {unpublished} signals still marked unpublished")
    return verdict


class Trader:
    """Seeded whale activity: multi-fill market orders (flips included) and resting limit orders filled in steps."""

    def __init__(self, sim: SimServer, whales: tuple[str, ...], rng: random.Random) -> None:
        self.sim = sim
        self.whales = list(whales)
        self.rng = rng
        self.resting: dict[int, tuple[str, Decimal]] = {}  # oid → (whale, unfilled size)
        self.actions = 0

    async def step(self, whales: tuple[str, ...] | None = None) -> None:
        """One action by one whale (of `whales`, default all)."""
        rng, ex = self.rng, self.sim.exchange
        whale = rng.choice(list(whales or self.whales))
        w = ex.whale(whale)
        self.actions += 1
        mine = [oid for oid, (owner, _) in self.resting.items() if owner == whale]
        roll = rng.random()
        if mine and (roll < 0.35 or len(mine) >= MAX_RESTING_PER_WHALE):
            oid = rng.choice(mine)
            _, left = self.resting[oid]
            if rng.random() < 0.4 or left <= 0:
                await w.cancel(oid)
                del self.resting[oid]
                return
            part = (left / 2).quantize(left) if left > 1 else left
            part = part if part > 0 else left
            await w.fill(oid, part)
            self.resting[oid] = (whale, left - part)
            if left - part <= 0:
                del self.resting[oid]
            return
        coin = rng.choice(TRADE_COINS)
        mid = ex.mids[coin]
        is_buy = rng.random() < 0.5
        size = order_size(ex, coin, rng)
        if roll < 0.55:
            px = mid * (1 - LIMIT_OFFSET if is_buy else 1 + LIMIT_OFFSET)
            px = px.quantize(Decimal("0.1") if mid > 1000 else Decimal("0.01"))
            oid = await w.limit_order(coin, is_buy, size, px)
            self.resting[oid] = (whale, size)
            return
        await w.market_order(coin, is_buy, size, mid, fills=rng.randint(1, 4), px_step=px_step(mid))

    async def settle(self) -> None:
        """End every resting order (a cancel is terminal), so every expected signal can be flushed."""
        ex = self.sim.exchange
        for oid, (whale, _) in list(self.resting.items()):
            await ex.whale(whale).cancel(oid)
        self.resting.clear()


@dataclass(slots=True)
class Sample:
    at: float
    reasons: dict[str, str] | None  # None: the service did not answer
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float] | None


@dataclass(slots=True)
class Observation:
    """What `/health/ready` and `/metrics` said while a fault lasted."""

    samples: list[Sample] = field(default_factory=list)

    def reasons_seen(self) -> set[str]:
        return {key for s in self.samples if s.reasons for key in s.reasons}

    def reason_texts(self) -> list[str]:
        return sorted({f"{k}: {v}" for s in self.samples if s.reasons for k, v in s.reasons.items()})

    def saw_reason(self, prefix: str) -> bool:
        return any(key.startswith(prefix) for key in self.reasons_seen())

    def always_ready(self) -> bool:
        return all(s.reasons == {} for s in self.samples)

    def metric(self, sample: Sample, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        if sample.metrics is None:
            return 0.0
        want = set(labels.items())
        return sum(v for (n, ls), v in sample.metrics.items() if n == name and want <= ls)

    def delta(self, name: str, **labels: str) -> float:
        """Growth of a counter over the observation (within one process life)."""
        scraped = [s for s in self.samples if s.metrics is not None]
        if len(scraped) < 2:
            return 0.0
        return self.metric(scraped[-1], name, **labels) - self.metric(scraped[0], name, **labels)

    def max(self, name: str, **labels: str) -> float:
        return max((self.metric(s, name, **labels) for s in self.samples if s.metrics is not None), default=0.0)

    def min(self, name: str, **labels: str) -> float:
        return min((self.metric(s, name, **labels) for s in self.samples if s.metrics is not None), default=0.0)


class ChaosEnv:
    """One scenario's world. Use as an async context manager; `finish()` gives the verdict."""

    def __init__(
        self,
        options: ChaosOptions,
        workdir: Path,
        *,
        sim_config: SimConfig | None = None,
        embedded_nats: bool = False,
        service_env: Mapping[str, str] | None = None,
        whales: tuple[str, ...] = WHALES,
        nats_args: tuple[str, ...] = (),
        nats_options: Mapping[str, Any] | None = None,
        settle_stall_s: float = DELIVERY_STALL_S,
    ) -> None:
        self.options = options
        self.workdir = workdir
        self.rng = random.Random(options.seed)
        self.whales = whales
        self.sim = SimServer(sim_config or SimConfig(clearinghouse_push_interval=0.3, seed=options.seed))
        self.embedded = embedded_nats
        self.nats = NatsProcess(workdir / "nats", extra_args=nats_args)
        self.nats_options = dict(nats_options or {})  # how the runner itself connects (auth, TLS)
        self.settle_stall_s = settle_stall_s
        self.relay: TcpRelay | None = None
        self.db_url = ""  # what the service is given (through the relay for MariaDB)
        self._direct_db_url = ""  # what the runner reads and migrates with
        self._drop_db: Callable[[], Any] | None = None
        self.service_env_extra = dict(service_env or {})
        self.service: ServiceProcess | None = None
        self.trader = Trader(self.sim, whales, self.rng)
        self._trading: asyncio.Task[None] | None = None
        self.trading_paused = asyncio.Event()
        self.trading_whales: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.sim.start()
        try:
            if not self.embedded:
                await asyncio.to_thread(self.nats.start)
            await self._create_database()
            self.service = ServiceProcess(self.service_env(), self.workdir / "run", self.workdir / "service.log")
        except BaseException:
            await self._cleanup()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._cleanup()

    async def _cleanup(self) -> None:
        await self.stop_trading()
        if self.service is not None and self.service.running:
            await self.service.kill9()
        await asyncio.to_thread(self.nats.stop)
        if self.relay is not None:
            await self.relay.stop()
        if self._drop_db is not None:
            with contextlib.suppress(Exception):
                await self._drop_db()
        await self.sim.stop()

    async def _create_database(self) -> None:
        if self.options.db == "sqlite":
            self._direct_db_url = self.db_url = f"sqlite+aiosqlite:///{self.workdir / 'hl.db'}"
            await upgrade(self.db_url)
            return
        if self.options.db != "mariadb":
            raise ChaosError(f"unknown database kind {self.options.db!r}")
        base = sa.make_url(self.options.mysql_url)
        name = f"hlm_chaos_{uuid.uuid4().hex[:10]}"
        admin = create_async_engine(base)
        try:
            async with admin.begin() as conn:
                await conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
        finally:
            await admin.dispose()

        async def drop() -> None:
            eng = create_async_engine(base)
            try:
                async with eng.begin() as conn:
                    await conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
            finally:
                await eng.dispose()

        self._drop_db = drop
        direct = base.set(database=name)
        self._direct_db_url = direct.render_as_string(hide_password=False)
        await upgrade(self._direct_db_url)
        self.relay = TcpRelay(direct.port or 3306, direct.host or HOST)
        await self.relay.start()
        self.db_url = direct.set(host=HOST, port=self.relay.port).render_as_string(hide_password=False)

    def service_env(self) -> dict[str, str]:
        """The service's whole configuration, as environment variables with fast timeouts."""
        p = ENV_PREFIX
        env = {
            f"{p}HYPERLIQUID__WS_URL": self.sim.ws_url,
            f"{p}HYPERLIQUID__INFO_URL": self.sim.info_url,
            f"{p}HYPERLIQUID__PING_INTERVAL": "1",
            f"{p}HYPERLIQUID__PONG_TIMEOUT": "1",
            f"{p}HYPERLIQUID__ACK_TIMEOUT": "0.5",
            f"{p}HYPERLIQUID__STALE_AFTER": str(STALE_AFTER_S),
            f"{p}HYPERLIQUID__RECONNECT_INITIAL_DELAY": "0.05",
            f"{p}HYPERLIQUID__RECONNECT_MAX_DELAY": "0.5",
            f"{p}HYPERLIQUID__OVER_BUDGET_RETRY": "1",
            f"{p}HYPERLIQUID__REQUEST_TIMEOUT": "2",
            f"{p}HYPERLIQUID__HEALTHY_AFTER": "5",
            f"{p}NATS__URL": "embedded" if self.embedded else self.nats.url,
            f"{p}NATS__STORE_DIR": str(self.workdir / "nats"),
            f"{p}NATS__RECONNECT_WAIT": "0.2",
            f"{p}NATS__RETRY_INITIAL_DELAY": "0.05",
            f"{p}NATS__RETRY_MAX_DELAY": "0.5",
            f"{p}NATS__OUTBOX_SCAN_INTERVAL": "0.5",
            f"{p}NATS__PUBLISH_TIMEOUT": "2",
            f"{p}DATABASE__URL": self.db_url,
            f"{p}DATABASE__CONNECT_TIMEOUT": "1",
            f"{p}WRITER__FLUSH_INTERVAL": "0.05",
            f"{p}WRITER__RETRY_INITIAL_DELAY": "0.05",
            f"{p}WRITER__RETRY_MAX_DELAY": "0.5",
            f"{p}AGGREGATION__SCAN_INTERVAL": "0.1",
            f"{p}ADDRESSES__INITIAL": ",".join(self.whales),
            f"{p}HTTP__LISTEN": f"{HOST}:{free_port()}",
            f"{p}SERVICE__DATA_DIR": str(self.workdir / "data"),
            f"{p}SERVICE__SHUTDOWN_TIMEOUT": "10",
            f"{p}SERVICE__INSTANCE_ID": "chaos",
            f"{p}LOG__LEVEL": "info",
            f"{p}LOG__FORMAT": "json",
        }
        env.update(self.service_env_extra)
        return env

    @property
    def svc(self) -> ServiceProcess:
        if self.service is None:
            raise ChaosError("environment not entered")
        return self.service

    @property
    def nats_url(self) -> str:
        return self.nats.url

    async def start_service(self, *, wait_ready: bool = True, within: float = 30.0) -> None:
        await self.svc.start()
        if wait_ready:
            await self.svc.wait_ready(within)

    # ------------------------------------------------------------------ whales

    @contextlib.asynccontextmanager
    async def trading(self, interval: float = 0.05) -> AsyncIterator[None]:
        """Whales trade every `interval` seconds until the block ends (pause with `trading_paused`)."""
        self._trading = asyncio.create_task(self._trade_loop(interval), name="chaos-trader")
        try:
            yield
        finally:
            await self.stop_trading()

    async def _trade_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not self.trading_paused.is_set():
                await self.trader.step(self.trading_whales)

    async def stop_trading(self) -> None:
        task, self._trading = self._trading, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ observation

    async def sample(self) -> Sample:
        svc = self.svc
        reasons, metrics = await asyncio.gather(svc.readiness(), svc.metrics())
        return Sample(time.monotonic(), reasons, metrics)

    @contextlib.asynccontextmanager
    async def observe(self) -> AsyncIterator[Observation]:
        """Sample readiness and metrics every OBSERVE_INTERVAL_S until the block ends (one sample at each edge)."""
        obs = Observation()
        obs.samples.append(await self.sample())

        async def loop() -> None:
            while True:
                await asyncio.sleep(OBSERVE_INTERVAL_S)
                obs.samples.append(await self.sample())

        task = asyncio.create_task(loop(), name="chaos-observer")
        try:
            yield obs
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            obs.samples.append(await self.sample())

    async def wait_observed(self, obs: Observation, predicate: Callable[[Observation], bool], within: float) -> bool:
        """Until `predicate(obs)` holds (True) or `within` seconds passed (False)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if predicate(obs):
                return True
            await asyncio.sleep(OBSERVE_INTERVAL_S)
        return predicate(obs)

    # ------------------------------------------------------------------ verdict

    def expected(self) -> Mapping[SignalKey, Totals]:
        """Ground truth the verdict compares with (a subclass may add signals of other kinds)."""
        return expected_orders(self.sim, *self.whales)

    def signal_key(self, sig: Signal) -> SignalKey:
        """How a stored signal is matched to `expected()`."""
        return order_key(sig)

    async def _table_state(self) -> tuple[int, int]:
        """(signals in the table, of which unpublished); (0, 1) while the database does not answer."""
        engine = create_async_engine(self._direct_db_url)
        try:
            repo = Repository(engine)
            return len(await repo.list_signals(limit=1_000_000)), await repo.count_unpublished()
        except Exception:  # unreachable right now: not delivered yet
            return 0, 1
        finally:
            await engine.dispose()

    async def wait_delivered(self) -> str | None:
        """Until the table holds every expected signal, all acknowledged, and the stream as many.

        Gives up after `settle_stall_s` without progress (or DELIVERY_MAX_S in all) and says how far it got, so a
        verdict can tell "still recovering" from "lost".
        """
        want = len(self.expected())
        started = last_progress = time.monotonic()
        best = (-1, -1)
        while True:
            rows, unpublished = await self._table_state()
            in_stream = 0 if self.embedded else await stream_count(self.nats_url, **self.nats_options)
            if rows >= want and unpublished == 0 and (self.embedded or in_stream >= want):
                await asyncio.sleep(DUPLICATE_WATCH_S)
                return None
            now = time.monotonic()
            if (rows, in_stream) > best:
                best, last_progress = (rows, in_stream), now
            if now - last_progress > self.settle_stall_s or now - started > DELIVERY_MAX_S:
                return (
                    f"delivery incomplete after {now - started:.0f} s: table {rows}/{want} "
                    f"({unpublished} unpublished), stream {in_stream}"
                )
            await asyncio.sleep(0.2)

    async def finish(self) -> Verdict:
        """Settle every order, wait for delivery, stop the service with SIGTERM and compare both sinks."""
        await self.stop_trading()
        await self.trader.settle()
        svc = self.svc
        if not svc.running:
            await self.start_service()
        incomplete = await self.wait_delivered()
        problems = [incomplete] if incomplete else []
        code = await svc.terminate()
        if code != 0:
            problems.append(f"service exited with code {code} after SIGTERM")
        if self.embedded:
            # The embedded server went down with the service: read its store with a server of our own.
            await asyncio.to_thread(self.nats.start)
        verdict = await self.verdict(self.nats_url)
        verdict.problems[:0] = problems
        return verdict

    async def verdict(self, nats_url: str) -> Verdict:
        stored = await stream_signals(nats_url, **self.nats_options)
        engine = create_async_engine(self._direct_db_url)
        try:
            repo = Repository(engine)
            rows = [(r.signal, r.published) for r in await repo.list_signals(limit=1_000_000)]
            unpublished = await repo.count_unpublished()
        finally:
            await engine.dispose()
        return compare(self.expected(), stored, rows, unpublished, key=self.signal_key)

    def replace_sim_config(self, **changes: Any) -> None:
        """Change a simulator limit on the fly (the server reads its config on every decision)."""
        self.sim.config = dataclasses.replace(self.sim.config, **changes)
