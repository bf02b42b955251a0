"""A liquidation cascade replayed against the real service (`sim/scenarios.py` `cascade`).

The service (`bench.scaled.ScaledPipeline`: default config, embedded NATS with JetStream acks, MariaDB or SQLite)
watches the plan's precise whales (`addresses.initial`) and its wide addresses (`hlm_addresses`, tier `wide`, each
holding a position opened before the service started). Once every wide address is bootstrapped, the sim runs the
cascade: the tape of every coin at ×20, a fifth of the wide addresses flipping or liquidated (engine trades, zero
hash), the whales trading 50 fills/s each. What is checked and reported:
- detection latency, exchange time (the signal's last fill) → JetStream ack: precise signals and tape signals
  (split into ordinary trades and engine trades, which wait up to `wide.engine_label_wait` for their REST label);
- the backpressure counters (`chaos/soak.py` BACKPRESSURE) before and after: they must not rise;
- exactly once: every whale order has a signal, every mover its tape signals once (a flip's two legs, a
  liquidation's close), nobody else any, no signal
  acknowledged twice, and the stream and the database hold exactly the acknowledged signals;
- readiness (`/ready`'s checks, `StatusView.readiness`) sampled all along: never false.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from hl_monitor.bench.e2e import DbKind, PipelineOptions
from hl_monitor.bench.results import BenchResult, Case, percentile, stat
from hl_monitor.bench.scaled import Delivery, ScaledPipeline, backpressure
from hl_monitor.config import Config
from hl_monitor.sim.scenarios import cascade_plan
from hl_monitor.storage import tables as t

__all__ = ["CASCADE_FULL", "CASCADE_SMOKE", "CascadeOutcome", "CascadeSize", "bench_cascade", "run_cascade"]

PRECISE_TARGET_MS: Final = 1_000.0
TAPE_TARGET_MS: Final = 2_000.0
# The bench's IP is given this REST weight a minute (sim and service alike) so 1,000 wide bootstraps (6 weight
# each: two perp dexes and spot) take seconds: at the exchange's 1,200 the wide tier's half share bootstraps
# 100 addresses a minute. It also lets every engine trade's label read start at once (README "Benchmarks").
BENCH_REST_WEIGHT: Final = 60_000
READINESS_POLL_S: Final = 0.1
DRAIN_TIMEOUT_S: Final = 60.0  # after the cascade: every expected signal acknowledged by then, or it is missing
SETTLE_TIMEOUT_S: Final = 60.0  # the writer's last flush and the stream's count
POLL_S: Final = 0.05
# Tape signals per mover: a flip is split into its two legs (close, then open), a liquidation closes.
SIGNALS_PER_MOVE: Final = {"flip": 2, "liquidation": 1}


@dataclass(frozen=True, slots=True)
class CascadeSize:
    whales: int = 8
    wide: int = 1_000
    movers: int = 200
    seconds: float = 60.0
    calm_tape: float = 500.0  # trades/s; the cascade runs ×20
    whale_fills_s: float = 50.0
    seed: int = 7

    def plan_args(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "whales": self.whales,
            "wide": self.wide,
            "movers": self.movers,
            "seconds": self.seconds,
            "calm_tape": self.calm_tape,
            "whale_fills_s": self.whale_fills_s,
        }


CASCADE_FULL: Final = CascadeSize()
# The bench code in seconds: 2 whales, 40 wide addresses of which 10 move, a 1,000 trades/s tape for 2 s.
CASCADE_SMOKE: Final = CascadeSize(whales=2, wide=40, movers=10, seconds=2.0, calm_tape=50.0, whale_fills_s=20.0)


@dataclass(slots=True)
class CascadeOutcome:
    size: CascadeSize
    db: DbKind
    record: dict[str, Any]  # the sim's `CascadeRecord`
    precise_ms: list[float] = field(default_factory=list)  # exchange time → ack, per precise signal
    tape_ms: list[float] = field(default_factory=list)  # per tape signal of a mover
    tape_engine_ms: list[float] = field(default_factory=list)  # of them, liquidations (engine trades)
    backpressure_before: dict[str, float] = field(default_factory=dict)
    backpressure_after: dict[str, float] = field(default_factory=dict)
    readiness_samples: int = 0
    not_ready: list[dict[str, str]] = field(default_factory=list)  # the reasons of each failed sample
    once: dict[str, Any] = field(default_factory=dict)  # the exactly-once facts
    tape_trades_per_s: float = 0.0
    startup_s: float = 0.0

    @property
    def exactly_once(self) -> bool:
        return bool(self.once.get("ok"))

    @property
    def no_backpressure(self) -> bool:
        return all(self.backpressure_after[k] <= self.backpressure_before.get(k, 0.0) for k in self.backpressure_after)

    @property
    def always_ready(self) -> bool:
        return self.readiness_samples > 0 and not self.not_ready


def _tune(cfg: Config) -> Config:
    hl = msgspec.structs.replace(cfg.hyperliquid, rest_weight_per_minute=BENCH_REST_WEIGHT)
    return msgspec.structs.replace(cfg, hyperliquid=hl)


async def run_cascade(size: CascadeSize, db: DbKind, mysql_url: str) -> CascadeOutcome:
    """One cascade against a fresh service; every fact of the outcome (module docstring)."""
    plan = cascade_plan(**size.plan_args())
    args = size.plan_args()
    pipe = ScaledPipeline(
        PipelineOptions(db, mysql_url, True, size.whales),
        wide=plan.wide,
        whales=plan.whales,
        sim={"rest_weight_per_minute": BENCH_REST_WEIGHT},
        tune=_tune,
        bootstrap=True,
        before=[{"cmd": "cascade_setup", "plan": args}],
    )
    async with pipe:
        assert pipe.service is not None
        service = pipe.service
        outcome = CascadeOutcome(size=size, db=db, record={}, startup_s=pipe.startup_s)
        outcome.backpressure_before = backpressure(service.metrics)
        sampling = asyncio.Event()

        async def sample_readiness() -> None:
            while not sampling.is_set():
                verdict = service.components.status.readiness()
                outcome.readiness_samples += 1
                if not verdict.ok:
                    outcome.not_ready.append(dict(verdict.reasons))
                await asyncio.sleep(READINESS_POLL_S)

        sampler = asyncio.create_task(sample_readiness(), name="bench-readiness")
        try:
            outcome.record = await pipe.request({"cmd": "cascade", "plan": args})
            await _drain(pipe, outcome.record)
        finally:
            sampling.set()
            await sampler
        outcome.backpressure_after = backpressure(service.metrics)
        outcome.once = await _exactly_once(pipe, outcome.record)
        _latencies(outcome, pipe.deliveries, outcome.record)
        elapsed = outcome.record["elapsed_s"]
        outcome.tape_trades_per_s = outcome.record["crowd_trades"] / elapsed if elapsed else 0.0
    return outcome


def _expected_met(pipe: ScaledPipeline, record: dict[str, Any]) -> bool:
    acked_oids = {d.oid for d in pipe.deliveries if d.oid is not None}
    per_mover = Counter(d.address for d in pipe.deliveries if d.source == "market_tape")
    return all(oid in acked_oids for oid, _ in record["orders"]) and all(
        per_mover[address] >= SIGNALS_PER_MOVE[kind] for address, _, kind, _ in record["events"]
    )


async def _drain(pipe: ScaledPipeline, record: dict[str, Any]) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if _expected_met(pipe, record):
            return
        await asyncio.sleep(POLL_S)


async def _exactly_once(pipe: ScaledPipeline, record: dict[str, Any]) -> dict[str, Any]:
    assert pipe.service is not None
    components = pipe.service.components
    whales = set(pipe.whales)
    movers = {address: SIGNALS_PER_MOVE[kind] for address, _, kind, _ in record["events"]}
    acked_oids = {d.oid for d in pipe.deliveries if d.oid is not None}
    per_mover: Counter[str] = Counter(d.address for d in pipe.deliveries if d.source == "market_tape")
    unexpected = [d for d in pipe.deliveries if d.address not in whales and d.address not in movers]
    distinct = len(pipe.acks)
    # The writer's last flush and the publish marks, then the stream's count.
    js = components.publisher.client.jetstream()
    engine = create_async_engine(pipe.service_config.database.url)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    try:
        while True:
            await components.writer.flush()
            async with engine.connect() as conn:
                rows = (await conn.execute(sa.select(sa.func.count()).select_from(t.signals))).scalar_one()
                published = (
                    await conn.execute(sa.select(sa.func.count()).select_from(t.signals).where(t.signals.c.published))
                ).scalar_one()
            stream = (await js.stream_info(pipe.service_config.nats.stream)).state.messages
            if (published == distinct and stream == distinct) or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
    finally:
        await engine.dispose()
    facts: dict[str, Any] = {
        "whale_orders": len(record["orders"]),
        "whale_orders_without_signal": sum(1 for oid, _ in record["orders"] if oid not in acked_oids),
        "movers": len(movers),
        "movers_without_signal": sum(1 for a in movers if per_mover[a] == 0),
        "movers_with_other_count": sum(1 for a, n in movers.items() if 0 < per_mover[a] != n),
        "unexpected_signals": len(unexpected),
        "unexpected_sample": [f"{d.source} {d.address} {d.coin}" for d in unexpected[:5]],
        "signals_acked": distinct,
        "acked_more_than_once": sum(1 for n in pipe.acks.values() if n > 1),
        "stream_messages": stream,
        "db_signals": rows,
        "db_published": published,
    }
    facts["ok"] = (
        facts["whale_orders_without_signal"] == 0
        and facts["movers_without_signal"] == 0
        and facts["movers_with_other_count"] == 0
        and not unexpected
        and facts["acked_more_than_once"] == 0
        and stream == distinct == rows == published
    )
    return facts


def _latencies(outcome: CascadeOutcome, deliveries: list[Delivery], record: dict[str, Any]) -> None:
    kinds = {address: kind for address, _, kind, _ in record["events"]}
    seen: dict[str, int] = defaultdict(int)
    for d in deliveries:
        seen[d.signal_id] += 1
        if seen[d.signal_id] > 1:
            continue
        ms = d.acked_at * 1000 - d.exchange_ms
        if d.source == "market_tape" and d.address in kinds:
            outcome.tape_ms.append(ms)
            if kinds[d.address] == "liquidation":
                outcome.tape_engine_ms.append(ms)
        elif d.source != "market_tape":
            outcome.precise_ms.append(ms)


async def bench_cascade(size: CascadeSize, mysql_url: str, mariadb: bool) -> BenchResult:
    started = time.perf_counter()
    db: DbKind = "mariadb" if mariadb else "sqlite"
    result = BenchResult(
        name="cascade",
        title="A liquidation cascade (sim `cascade`) against the service: exchange time → JetStream ack",
        input=(
            f"{size.seconds:g} s of the tape of every coin at ×20 ({size.calm_tape * 20:,.0f} trades/s), {size.wide:,} "
            f"wide addresses of which {size.movers} flip or are liquidated (half each: engine trades, zero hash), "
            f"{size.whales} precise whales at {size.whale_fills_s:g} fills/s each; {db}, JetStream acks"
        ),
    )
    o = await run_cascade(size, db, mysql_url)

    def p(values: list[float], q: float) -> list[float]:
        return [percentile(values, q)] if values else []

    metrics = {}
    for label, values in (("precise", o.precise_ms), ("tape", o.tape_ms), ("tape_engine", o.tape_engine_ms)):
        for q in (50, 99):
            if values:
                metrics[f"{label}_p{q}_ms"] = stat(p(values, q), "ms")
        if values:
            metrics[f"{label}_max_ms"] = stat([max(values)], "ms")
    metrics["tape_trades_per_s"] = stat([o.tape_trades_per_s], "trades/s")
    metrics["startup_s"] = stat([o.startup_s], "s")
    result.cases.append(
        Case(
            name=f"{db}, JetStream ack",
            metrics=metrics,
            info={
                "exactly_once": o.once,
                "backpressure_before": o.backpressure_before,
                "backpressure_after": o.backpressure_after,
                "readiness_samples": o.readiness_samples,
                "not_ready_samples": len(o.not_ready),
                "not_ready_reasons": o.not_ready[:10],
                "precise_signals": len(o.precise_ms),
                "tape_signals": len(o.tape_ms),
                "whale_fills": o.record.get("fills", 0),
                "crowd_trades": o.record.get("crowd_trades", 0),
                "cascade_elapsed_s": o.record.get("elapsed_s", 0.0),
            },
        )
    )
    precise_p99 = percentile(o.precise_ms, 99) if o.precise_ms else float("nan")
    tape_p99 = percentile(o.tape_ms, 99) if o.tape_ms else float("nan")
    result.targets[f"precise p99 < {PRECISE_TARGET_MS:,.0f} ms"] = (
        f"{'met' if precise_p99 < PRECISE_TARGET_MS else 'missed'} (p99 {precise_p99:,.0f} ms)"
    )
    result.targets[f"tape p99 < {TAPE_TARGET_MS:,.0f} ms"] = (
        f"{'met' if tape_p99 < TAPE_TARGET_MS else 'missed'} (p99 {tape_p99:,.0f} ms)"
    )
    rises = {k: v - o.backpressure_before.get(k, 0.0) for k, v in o.backpressure_after.items()}
    result.targets["no backpressure counter rising"] = (
        f"{'met' if o.no_backpressure else 'missed'} ({', '.join(f'{k} +{v:g}' for k, v in rises.items())})"
    )
    once = o.once
    result.targets["exactly once"] = (
        f"{'met' if o.exactly_once else 'missed'} ({once.get('signals_acked', 0):,} signals acked, stream "
        f"{once.get('stream_messages', 0):,}, database {once.get('db_signals', 0):,}; orders without signal "
        f"{once.get('whale_orders_without_signal')}, movers without signal/with another count "
        f"{once.get('movers_without_signal')}/{once.get('movers_with_other_count')}, unexpected "
        f"{once.get('unexpected_signals')}, acked twice {once.get('acked_more_than_once')})"
    )
    result.targets["readiness true throughout"] = (
        f"{'met' if o.always_ready else 'missed'} ({o.readiness_samples:,} samples, {len(o.not_ready)} not ready)"
    )
    result.notes.append(
        "Latency is the ack's wall clock minus the signal's last fill time on the exchange (the sim stamps fills "
        "with the same machine's clock). Tape signals wait for their block to settle (`wide.block_settle`, 0.5 s); "
        "those with an engine trade also wait for their REST label (up to `wide.engine_label_wait`, 2 s)."
    )
    result.notes.append(
        f"REST weight of the bench's IP raised to {BENCH_REST_WEIGHT:,}/min (sim and service) so the wide "
        "bootstraps fit the bench; every other setting is the service's default."
    )
    result.seconds = time.perf_counter() - started
    return result
