"""Soak: a busy day compressed 20x, with the service's memory and queues watched the whole time.

A busy day, as this scenario defines it (no exchange statistics back these numbers; docs/protocol.md §8 has
the one tape-volume measurement there is; these are deliberately generous round numbers for a deployment
watching a few dozen whales):
- 8 precise whales (`hyperliquid.user_slots`' default: the precise tier full), each taking 2,160 actions a day
  (one every 40 s: multi-fill market orders with flips, resting limit orders filled in steps, cancels; the
  chaos `Trader`), around the clock;
- 40 wide-tier addresses watched (beyond the precise slots, so the tape tracks them), 20 of them active with
  720 market orders a day each (one every 2 minutes, 1-4 fills, flips included), the rest idle;
- a public trade tape on every simulator coin (6 perps on two dexes, 3 spot pairs) carrying 2,592,000 trades
  a day (30 trades/s exchange-wide, an assumed busy rate for the whole exchange; the real universe spreads them
  over ~200 coins, the service's cost is the trade rate), from 200 unwatched traders, 1-5 fills per order.
At 20x that is 4.0 precise actions/s, 3.3 wide orders/s and 600 tape trades/s: one real hour is 20 hours of
such a day. The service runs as a subprocess with production timeouts (not the chaos suite's short ones),
precise + wide tier, MariaDB (SQLite when unreachable) and a real nats-server. The time windows that size
the service's caches (flushed order keys, seen fill keys, parked statuses, tape dedup, handover hold) are
compressed by the same factor, so their steady-state contents equal a real busy day's; each is also capped
at a third of the warm-up so the short variants reach that steady state before they are judged.

Every few seconds the runner samples the service's RSS (`/proc/PID/status` VmRSS) and `/metrics`. The first
half of the run is warm-up; the second half is judged:
1. memory flat: the least-squares slope of RSS over the second half ≤ 10 MB/h (a leak of 0.5 KB per signal
   or ~5 bytes per tape trade exceeds it; at 20x it is 0.5 MB per real hour), relaxed for short windows to
   what RSS noise allows (3 MB over the window: pymalloc arenas and glibc trims move RSS in MB steps), and
   the final RSS ≤ the second half's median + 5 %;
2. no growing queue: outbox, writer queue, engine intake queue, open aggregations and parked statuses each
   stay ≤ 1,000 (a keeping-up service holds tens; every queue's capacity is ≥ 10,000, so a backlog is caught
   long before anything is dropped) and their least-squares rise over the second half is ≤ 20 items; no
   backpressure counter (intake queue full, writer queue full, outbox spilled) grows after warm-up; event-loop
   stalls (≥ 250 ms) at most one per 10 minutes judged; no feed reconnects;
3. exactly once: every precise order (oid, dir) and every wide-tier tape block (address, coin, block time,
   dir) of the ledger in the stream and the table exactly once, with exact size, VWAP and fill count.
The load itself is checked too: each stream must reach 90 % of its target rate, or the run proves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import statistics
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from hl_monitor.bench.frames import order_size, px_step, whale_address
from hl_monitor.chaos.env import (
    ChaosEnv,
    ChaosOptions,
    SignalKey,
    Totals,
    block_of,
    expected_orders,
    order_key,
    tape_key,
)
from hl_monitor.chaos.scenarios import Check, ScenarioResult
from hl_monitor.config import ENV_PREFIX, Config
from hl_monitor.domain.signal import Signal
from hl_monitor.errors import ChaosError
from hl_monitor.sim.exchange import PERPS, SPOT_PAIRS, Exchange
from hl_monitor.sim.server import SimConfig

__all__ = [
    "BACKPRESSURE",
    "COUNTERS",
    "MAX_RSS_SLOPE_MB_H",
    "QUEUE_GAUGES",
    "QUICK_S",
    "Bounds",
    "SoakSample",
    "bounds_for",
    "fit_slope",
    "judge_memory",
    "judge_queues",
    "soak",
]

# ---- the busy day (see the module docstring) and its compression
SPEED: Final = 20.0
DAY_S: Final = 86_400.0
WHALE_ACTIONS_PER_DAY: Final = 2_160
WIDE_WATCHED: Final = 40
WIDE_ACTIVE: Final = 20
WIDE_ORDERS_PER_DAY: Final = 720
TAPE_TRADES_PER_DAY: Final = 2_592_000
NOISE_TRADERS: Final = 200
NOISE_FILLS: Final = (1, 5)  # fills per tape order (uniform: 3 on average)
WIDE_FILLS: Final = (1, 4)
# Share of the tape per coin: the majors carry most trades, like on the real exchange.
TAPE_WEIGHTS: Final = {
    "BTC": 30,
    "ETH": 20,
    "SOL": 12,
    "HYPE": 15,
    "xyz:XYZ100": 4,
    "xyz:TSLA": 4,
    "@107": 8,
    "PURR/USDC": 4,
    "@142": 3,
}
NOISE_JITTER: Final = 0.0005  # tape prices stay within ±5 bp of the opening mid (no random walk over 20 h)
NOISE_FILL_HISTORY: Final = 64  # fills the sim keeps per unwatched trader: nothing reads them
SOAK_FILL_HISTORY: Final = 200_000  # per watched address: the verdict reads every fill of the run
TICK_S: Final = 0.01  # pacing granularity of the day driver
MAX_BURST_S: Final = 0.5  # after a runner stall, catch up at most this much schedule per tick

# ---- lengths
QUICK_S: Final = 50.0  # CI
FULL_S: Final = 180.0  # `make chaos`; `make soak` passes 3600
WARMUP_SHARE: Final = 0.5  # the first half warms up, the second half is judged
WINDOW_FIT: Final = 3  # a compressed cache window is at most a third of the warm-up
SAMPLES_PER_RUN: Final = 200  # sample interval = duration / this, within the bounds below
SAMPLE_MIN_S: Final = 1.0
SAMPLE_MAX_S: Final = 5.0
READY_WITHIN_S: Final = 60.0

# ---- pass criteria (reasons in the module docstring)
MAX_RSS_SLOPE_MB_H: Final = 10.0
RSS_NOISE_MB: Final = 3.0
FINAL_MARGIN: Final = 0.05
QUEUE_BOUND: Final = 1_000
QUEUE_RISE: Final = 20.0
STALL_EVERY_S: Final = 600.0  # at most one loop stall per this long of the judged window (at least one allowed)
MIN_RATE_SHARE: Final = 0.9

QUEUE_GAUGES: Final = (
    "hl_monitor_outbox_depth",
    "hl_monitor_writer_queue_depth",
    "hl_monitor_message_queue_size",
    "hl_monitor_order_aggregation_active",
    "hl_monitor_parked_statuses",
)
BACKPRESSURE: Final = (
    "hl_monitor_message_queue_full_total",
    "hl_monitor_writer_queue_full_total",
    "hl_monitor_outbox_spilled_total",
)
STALLS: Final = "hl_monitor_loop_stalls_total"
RECONNECTS: Final = "hl_monitor_reconnects_total"
COUNTERS: Final = (*BACKPRESSURE, STALLS, RECONNECTS, "hl_monitor_evictions_total")

# Cache windows compressed with the day: (section, key).
COMPRESSED_WINDOWS: Final = (
    ("aggregation", "flushed_ttl"),
    ("aggregation", "seen_window"),
    ("aggregation", "status_park_ttl"),
    ("wide", "dedup_window"),
    ("wide", "handover_hold"),
)
# The chaos environment shortens these to see faults fast; a soak runs the production values.
PRODUCTION_KEYS: Final = (
    ("hyperliquid", "ping_interval"),
    ("hyperliquid", "pong_timeout"),
    ("hyperliquid", "ack_timeout"),
    ("hyperliquid", "stale_after"),
    ("hyperliquid", "reconnect_initial_delay"),
    ("hyperliquid", "reconnect_max_delay"),
    ("hyperliquid", "over_budget_retry"),
    ("hyperliquid", "request_timeout"),
    ("hyperliquid", "healthy_after"),
    ("nats", "reconnect_wait"),
    ("nats", "retry_initial_delay"),
    ("nats", "retry_max_delay"),
    ("nats", "outbox_scan_interval"),
    ("nats", "publish_timeout"),
    ("database", "connect_timeout"),
    ("writer", "flush_interval"),
    ("writer", "retry_initial_delay"),
    ("writer", "retry_max_delay"),
    ("aggregation", "scan_interval"),
)

MetricMap = Mapping[tuple[str, frozenset[tuple[str, str]]], float]


PRECISE_WHALES: Final = tuple(whale_address(i) for i in range(8))  # sort before every wide address: the
# precise tier ranks `auto` addresses of equal priority by address, so these eight get the slots
WIDE_ADDRESSES: Final = tuple(f"0xee{i:038x}" for i in range(WIDE_WATCHED))


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-second rates of the compressed day."""

    precise_actions: float
    wide_orders: float
    tape_trades: float


BUSY_RATES: Final = Rates(
    precise_actions=len(PRECISE_WHALES) * WHALE_ACTIONS_PER_DAY / DAY_S * SPEED,
    wide_orders=WIDE_ACTIVE * WIDE_ORDERS_PER_DAY / DAY_S * SPEED,
    tape_trades=TAPE_TRADES_PER_DAY / DAY_S * SPEED,
)


@dataclass(frozen=True, slots=True)
class Bounds:
    """Pass bounds for one run length (see the module docstring)."""

    warmup_s: float
    sample_s: float
    rss_slope_mb_h: float
    final_margin: float
    queue_max: float
    queue_rise: float
    stalls_max: int


def bounds_for(duration_s: float) -> Bounds:
    warmup = duration_s * WARMUP_SHARE
    window_h = (duration_s - warmup) / 3600
    return Bounds(
        warmup_s=warmup,
        sample_s=min(SAMPLE_MAX_S, max(SAMPLE_MIN_S, duration_s / SAMPLES_PER_RUN)),
        rss_slope_mb_h=max(MAX_RSS_SLOPE_MB_H, RSS_NOISE_MB / window_h),
        final_margin=FINAL_MARGIN,
        queue_max=QUEUE_BOUND,
        queue_rise=QUEUE_RISE,
        stalls_max=max(1, int((duration_s - warmup) / STALL_EVERY_S)),
    )


@dataclass(slots=True)
class SoakSample:
    at: float  # seconds since the load started
    rss_mb: float | None  # None: the process was gone
    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)


def fit_slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope dy/dx (0 for fewer than two distinct x)."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def _judged(samples: Sequence[SoakSample], bounds: Bounds) -> list[SoakSample]:
    return [s for s in samples if s.at >= bounds.warmup_s]


def judge_memory(samples: Sequence[SoakSample], bounds: Bounds) -> Check:
    """RSS slope over the judged half and final RSS against its median."""
    rss = [(s.at / 3600, s.rss_mb) for s in _judged(samples, bounds) if s.rss_mb is not None]
    if len(rss) < 3:
        return Check("memory flat after warm-up", False, f"only {len(rss)} RSS samples after warm-up")
    slope = fit_slope(rss)
    median = statistics.median(v for _, v in rss)
    final = rss[-1][1]
    limit = median * (1 + bounds.final_margin)
    ok = slope <= bounds.rss_slope_mb_h and final <= limit
    detail = (
        f"RSS slope {slope:+.1f} MB/h (bound {bounds.rss_slope_mb_h:.0f}); final {final:.1f} MB vs median "
        f"{median:.1f} MB (bound {limit:.1f}); {len(rss)} samples"
    )
    return Check("memory flat after warm-up", ok, detail)


def judge_queues(samples: Sequence[SoakSample], bounds: Bounds) -> list[Check]:
    """Each queue gauge bounded and not rising; no backpressure; loop stalls and reconnects."""
    judged = _judged(samples, bounds)
    if len(judged) < 3:
        return [Check("no growing queue", False, f"only {len(judged)} samples after warm-up")]
    parts, ok = [], True
    for name in QUEUE_GAUGES:
        values = [(s.at, s.gauges.get(name, 0.0)) for s in judged]
        peak = max(v for _, v in values)
        rise = fit_slope(values) * (values[-1][0] - values[0][0])
        ok &= peak <= bounds.queue_max and rise <= bounds.queue_rise
        parts.append(f"{name.removeprefix('hl_monitor_')} max {peak:g} rise {rise:+.1f}")
    checks = [
        Check("no growing queue", ok, f"bound {bounds.queue_max:g}, rise ≤ {bounds.queue_rise:g}: " + "; ".join(parts))
    ]

    def growth(name: str) -> float:
        return judged[-1].counters.get(name, 0.0) - judged[0].counters.get(name, 0.0)

    pressure = {name.removeprefix("hl_monitor_").removesuffix("_total"): growth(name) for name in BACKPRESSURE}
    checks.append(
        Check(
            "no backpressure after warm-up",
            not any(pressure.values()),
            ", ".join(f"{k} +{v:g}" for k, v in pressure.items()),
        )
    )
    stalls = growth(STALLS)
    checks.append(
        Check("event-loop stalls", stalls <= bounds.stalls_max, f"+{stalls:g} after warm-up (≤ {bounds.stalls_max})")
    )
    reconnects = samples[-1].counters.get(RECONNECTS, 0.0) if samples else 0.0
    checks.append(Check("no feed reconnects", reconnects == 0, f"reconnects {reconnects:g}"))
    return checks


# --------------------------------------------------------------------------------------- the day


class SoakEnv(ChaosEnv):
    """The chaos environment with wide-tier addresses: tape blocks are compared with the ledger as well."""

    wide: tuple[str, ...] = WIDE_ADDRESSES

    def expected(self) -> Mapping[SignalKey, Totals]:
        want = dict(expected_orders(self.sim, *self.whales))
        for address in self.wide:
            want.update(expected_orders(self.sim, address, by=block_of(address)))
        return want

    def signal_key(self, sig: Signal) -> SignalKey:
        return order_key(sig) if sig.source == "user_fills" else tape_key(sig)


class BusyDay:
    """Paces the three activity streams of the compressed day on the simulator (seeded)."""

    def __init__(self, env: SoakEnv, rates: Rates, rng: random.Random) -> None:
        self.env = env
        self.ex: Exchange = env.sim.exchange
        self.rates = rates
        self.rng = rng
        self.done = {"precise": 0, "wide": 0, "tape": 0}
        self.anchor = dict(self.ex.mids)
        self.spot = {pair.name: pair.base.name for pair in SPOT_PAIRS}
        self.perps = [p.name for p in PERPS]
        self.coins = list(TAPE_WEIGHTS)
        self.weights = list(TAPE_WEIGHTS.values())
        self.noise = [f"0xaa{i:038x}" for i in range(NOISE_TRADERS)]
        for address in self.noise:
            self.ex.account(address).fills = deque(maxlen=NOISE_FILL_HISTORY)
        self.seconds = 0.0

    async def run(self, duration: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        rates = {"precise": self.rates.precise_actions, "wide": self.rates.wide_orders, "tape": self.rates.tape_trades}
        while (elapsed := loop.time() - start) < duration:
            for stream, rate in rates.items():
                due = min(int(elapsed * rate) - self.done[stream], int(rate * MAX_BURST_S) + 1)
                while due > 0:
                    due -= await self._act(stream)
            self.seconds = elapsed
            await asyncio.sleep(TICK_S)
        self.seconds = loop.time() - start

    async def _act(self, stream: str) -> int:
        """One unit of `stream`; returns how much of its schedule it covered (tape: trades)."""
        if stream == "precise":
            await self.env.trader.step()
            n = 1
        elif stream == "wide":
            self._wide_order()
            n = 1
        else:
            n = self._tape_order()
        self.done[stream] += n
        return n

    def _wide_order(self) -> None:
        rng, ex = self.rng, self.ex
        address = self.env.wide[rng.randrange(WIDE_ACTIVE)]
        coin = rng.choice(self.perps)
        mid = ex.mids[coin]
        ex.market_order(
            address,
            coin,
            rng.random() < 0.5,
            order_size(ex, coin, rng),
            mid,
            fills=rng.randint(*WIDE_FILLS),
            px_step=px_step(mid),
        )

    def _tape_order(self) -> int:
        rng, ex = self.rng, self.ex
        coin = rng.choices(self.coins, self.weights)[0]
        trader = self.noise[rng.randrange(NOISE_TRADERS)]
        fills = rng.randint(*NOISE_FILLS)
        lot = ex.lot_size(coin)
        raw = self.anchor[coin] * (1 + Decimal(str(round(rng.uniform(-NOISE_JITTER, NOISE_JITTER), 6))))
        px = raw.quantize(Decimal(1).scaleb(raw.adjusted() - 4))  # 5 significant figures like the exchange
        base = self.spot.get(coin)
        if base is None:
            pos = ex.account(trader).positions.get(coin)
            is_buy = pos is None or pos.szi <= 0
            size = lot * rng.randint(fills, fills * 10)
        else:
            held = ex.account(trader).spot.get(base)
            balance = held.total if held is not None else Decimal(0)
            is_buy = balance == 0
            size = lot * rng.randint(fills, fills * 10) if is_buy else balance
        ex.market_order(trader, coin, is_buy, size, px, fills=fills)
        return fills


# --------------------------------------------------------------------------------------- the scenario


def _service_env(bounds: Bounds) -> dict[str, str]:
    defaults = Config()
    env = {
        f"{ENV_PREFIX}{section.upper()}__{key.upper()}": str(getattr(getattr(defaults, section), key))
        for section, key in PRODUCTION_KEYS
    }
    for section, key in COMPRESSED_WINDOWS:
        window = min(getattr(getattr(defaults, section), key) / SPEED, bounds.warmup_s / WINDOW_FIT)
        env[f"{ENV_PREFIX}{section.upper()}__{key.upper()}"] = f"{window:g}"
    env[f"{ENV_PREFIX}ADDRESSES__INITIAL"] = ",".join(PRECISE_WHALES + WIDE_ADDRESSES)
    return env


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _sum(metrics: MetricMap, name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def _append_row(csv: Path, cells: Sequence[str], *, new: bool = False) -> None:
    """One CSV line (a few hundred bytes to a local file every few seconds: not worth a thread)."""
    with csv.open("w" if new else "a", encoding="utf-8") as fh:
        fh.write(",".join(cells) + "\n")


async def _sampler(env: SoakEnv, samples: list[SoakSample], every: float, t0: float, csv: Path) -> None:
    """Samples RSS and metrics every `every` seconds; each sample is also appended to `csv` as it is taken."""
    svc = env.svc
    _append_row(csv, ("at", "rss_mb", *QUEUE_GAUGES, *COUNTERS), new=True)
    while True:
        proc = svc.proc
        rss = _rss_mb(proc.pid) if proc is not None else None
        metrics = await svc.metrics() or {}
        sample = SoakSample(
            at=time.monotonic() - t0,
            rss_mb=rss,
            gauges={name: _sum(metrics, name) for name in QUEUE_GAUGES},
            counters={name: _sum(metrics, name) for name in COUNTERS},
        )
        samples.append(sample)
        row = [sample.at, rss if rss is not None else -1.0, *sample.gauges.values(), *sample.counters.values()]
        _append_row(csv, [f"{v:.2f}" for v in row])
        await asyncio.sleep(every)


async def _mariadb_reachable(url: str) -> bool:
    engine = create_async_engine(url, connect_args={"connect_timeout": 2})
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
        return True
    except Exception:  # any failure to connect: fall back to SQLite
        return False
    finally:
        await engine.dispose()


async def soak(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    duration = opts.soak_s if opts.soak_s is not None else (QUICK_S if opts.quick else FULL_S)
    bounds = bounds_for(duration)
    if opts.db == "mariadb" and not await _mariadb_reachable(opts.mysql_url):
        opts = dataclasses.replace(opts, db="sqlite")
        res.notes.append("MariaDB unreachable: ran on SQLite")
    sim_cfg = SimConfig(seed=opts.seed, fill_history_limit=SOAK_FILL_HISTORY, record_ledger=False)
    env_vars = _service_env(bounds)
    samples: list[SoakSample] = []
    async with SoakEnv(opts, workdir, sim_config=sim_cfg, service_env=env_vars, whales=PRECISE_WHALES) as env:
        res.log_path = env.svc.log_path
        await env.start_service(within=READY_WITHIN_S)
        day = BusyDay(env, BUSY_RATES, random.Random(opts.seed))
        t0 = time.monotonic()
        csv = workdir / "soak-samples.csv"
        sampler = asyncio.create_task(_sampler(env, samples, bounds.sample_s, t0, csv), name="soak-sampler")
        try:
            await day.run(duration)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        for address in (*PRECISE_WHALES, *WIDE_ADDRESSES):
            fills = env.sim.exchange.account(address).fills
            if fills.maxlen is not None and len(fills) >= fills.maxlen:
                raise ChaosError(f"{address} traded past the sim's fill history: the ledger would be incomplete")
        _judge(res, day, samples, bounds, duration)
        res.verdict = await env.finish()
        orders = len(expected_orders(env.sim, *env.whales))
        blocks = res.verdict.expected - orders
        res.checks.append(
            Check("both tiers compared", orders > 0 and blocks > 0, f"{orders} precise orders, {blocks} tape blocks")
        )


def _judge(res: ScenarioResult, day: BusyDay, samples: list[SoakSample], bounds: Bounds, duration: float) -> None:
    res.checks.append(judge_memory(samples, bounds))
    res.checks.extend(judge_queues(samples, bounds))
    seconds = day.seconds or duration
    achieved = {k: v / seconds for k, v in day.done.items()}
    targets = {"precise": BUSY_RATES.precise_actions, "wide": BUSY_RATES.wide_orders, "tape": BUSY_RATES.tape_trades}
    short = {k: achieved[k] / targets[k] for k in targets if achieved[k] < MIN_RATE_SHARE * targets[k]}
    res.checks.append(
        Check(
            f"load ≥ {MIN_RATE_SHARE:.0%} of the {SPEED:g}x busy day",
            not short,
            f"precise {achieved['precise']:.2f}/s, wide {achieved['wide']:.2f}/s, tape {achieved['tape']:.0f} trades/s",
        )
    )
    rss = [s.rss_mb for s in samples if s.rss_mb is not None]
    evictions = samples[-1].counters.get("hl_monitor_evictions_total", 0.0) if samples else 0.0
    res.notes.append(
        f"{duration:g} s of a {SPEED:g}x busy day ({duration * SPEED / 3600:.1f} day-hours): {day.done['precise']} "
        f"precise actions, {day.done['wide']} wide orders, {day.done['tape']} tape trades; warm-up "
        f"{bounds.warmup_s:g} s, sample every {bounds.sample_s:g} s; RSS first {rss[0] if rss else 0:.1f} MB, "
        f"max {max(rss, default=0):.1f} MB, last {rss[-1] if rss else 0:.1f} MB; evictions {evictions:g}"
    )
