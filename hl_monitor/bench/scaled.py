"""The end-to-end pipeline (`bench.e2e.Pipeline`: the real service against the sim in its own process) at scale.

`ScaledPipeline` adds what the cost curves and the cascade need on top of the plain pipeline:
- wide addresses, written to `hlm_addresses` with tier `wide` before the service starts (as an operator would),
  and a start that waits until the planner has handed every one of them to the tape (and, if asked, until the
  wide tier has bootstrapped them all from REST);
- the simulator's `SimConfig` fields and a change of the service's config (`tune`), for the per-IP limits a
  bench raises to stand in for several IPs;
- a record of every acknowledged publish (`Delivery`), and the process's CPU time and resident memory.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from nats.js.api import PubAck
from sqlalchemy.ext.asyncio import create_async_engine

from hl_monitor.bench.e2e import Pipeline, PipelineOptions, SimProcess
from hl_monitor.bench.memory import rss_bytes
from hl_monitor.chaos.soak import BACKPRESSURE
from hl_monitor.config import Config
from hl_monitor.domain.signal import Signal
from hl_monitor.errors import BenchError
from hl_monitor.metrics import Metrics
from hl_monitor.storage import tables as t

__all__ = ["Delivery", "ScaledPipeline", "backpressure", "cpu_seconds"]

# Rows per INSERT of the wide addresses: one statement per chunk, small enough for any driver's packet limit.
ADDRESS_CHUNK: Final = 5_000
# Polls of the wide tier's state walk every address (O(n)): a few a second, not the plain pipeline's 100.
WIDE_POLL_S: Final = 0.25
# 300k addresses: the book's load, the planner's pass and the tape tracker's entries take tens of seconds.
WIDE_READY_TIMEOUT_S: Final = 300.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One acknowledged publish of a signal."""

    signal_id: str
    source: str
    address: str
    coin: str
    oid: int | None
    exchange_ms: int  # the signal's last fill time on the exchange
    detected_ms: int  # when the service built it
    acked_at: float  # wall clock of the ack, s


def cpu_seconds() -> float:
    """CPU time of this process (every thread: the loop, the writer's thread), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def backpressure(metrics: Metrics) -> dict[str, float]:
    """The backpressure counters the soak judges (`chaos/soak.py` BACKPRESSURE), summed over their labels."""
    out = {}
    for name in BACKPRESSURE:
        total = 0.0
        for family in metrics.registry.collect():
            for sample in family.samples:
                if sample.name == name:
                    total += sample.value
        out[name.removeprefix("hl_monitor_").removesuffix("_total")] = total
    return out


class ScaledPipeline(Pipeline):
    """`Pipeline` with wide addresses, sim limits and a config change (module docstring)."""

    def __init__(
        self,
        opts: PipelineOptions,
        *,
        wide: Sequence[str] = (),
        whales: Sequence[str] | None = None,
        sim: dict[str, Any] | None = None,
        tune: Callable[[Config], Config] | None = None,
        bootstrap: bool = False,
        before: Sequence[dict[str, Any]] = (),
    ) -> None:
        super().__init__(opts)
        if whales is not None:
            self.whales = list(whales)
        self.wide = list(wide)
        self._sim = SimProcess(Path(self._tmp.name) / "sim.log", sim)
        self._tune = tune
        self._bootstrap = bootstrap
        self._before = list(before)  # sim commands sent before the service starts
        self.deliveries: list[Delivery] = []
        self.acks: Counter[str] = Counter()  # signal id → acknowledged publishes of it

    async def prepare(self, db_url: str) -> None:
        for cmd in self._before:
            await self._sim.request(cmd)
        if not self.wide:
            return
        engine = create_async_engine(db_url)
        try:
            async with engine.begin() as conn:
                for i in range(0, len(self.wide), ADDRESS_CHUNK):
                    rows = [{"address": a, "tier": "wide"} for a in self.wide[i : i + ADDRESS_CHUNK]]
                    await conn.execute(t.addresses.insert(), rows)
        finally:
            await engine.dispose()

    def config(self, sim_url: str, db_url: str) -> Config:
        cfg = super().config(sim_url, db_url)
        return self._tune(cfg) if self._tune is not None else cfg

    async def _start(self) -> None:
        started = time.perf_counter()
        await super()._start()
        if self.wide and not await self._wide_ready():
            raise BenchError(f"the wide tier did not take {len(self.wide):,} addresses in {WIDE_READY_TIMEOUT_S:g} s")
        self.startup_s = time.perf_counter() - started
        self._record_acks()

    async def _wide_ready(self) -> bool:
        assert self.service is not None
        tier = self.service.components.wide_tier
        if tier is None:
            raise BenchError("the wide tier is off (wide.enabled)")
        key = "bootstrapped" if self._bootstrap else "addresses"
        deadline = time.monotonic() + WIDE_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            task = self._task
            if task is not None and task.done():
                raise BenchError(f"the service stopped: {None if task.cancelled() else task.exception()!r}")
            if tier.tape.continuous_since_ms() is not None and tier.wide.status()[key] >= len(self.wide):
                return True
            await asyncio.sleep(WIDE_POLL_S)
        return False

    def _record_acks(self) -> None:
        """Wraps the publish the ack clock already wraps: every acknowledged signal, tape ones included."""
        assert self.service is not None
        publisher = self.service.components.publisher
        inner = publisher.publish

        async def publish(signal: Signal) -> PubAck:
            answer = await inner(signal)
            self.acks[signal.signal_id] += 1
            self.deliveries.append(
                Delivery(
                    signal.signal_id, signal.source, signal.address, signal.coin, signal.oid,
                    signal.last_fill_time, signal.detected_at, time.time(),
                )
            )  # fmt: skip
            return answer

        publisher.publish = publish  # type: ignore[method-assign]  # this instance only: the bench's record

    @property
    def service_config(self) -> Config:
        """The config the service runs with (known once started)."""
        return self._cfg

    def rss(self) -> int:
        """Resident memory of this process: the service (the bench's driver is small beside it)."""
        return rss_bytes()

    async def request(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """A command to the simulator process (`bench/simproc.py`)."""
        return await self._sim.request(cmd)
