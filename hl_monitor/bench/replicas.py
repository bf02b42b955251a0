"""Publish latency of an R3 stream against an R1 stream, on one local three-node cluster in one run.

    python -m hl_monitor.bench.replicas [--count 3000] [--concurrency 1 32]

Both streams live on the same cluster (`hl_monitor/bench/nats_cluster.py`), so the difference is the replication
(an R3 publish is acknowledged once a quorum of two nodes stored it), not the machine. Every publish carries a
unique `Nats-Msg-Id` like a signal (`delivery/publisher.py` `publish_with_id`). Rounds alternate between the two
streams so a slow phase of the machine hits both. With concurrency 1 each publish waits for the previous ack (the
latency a single signal sees); with more, that many publishes are in flight (the outbox's `nats.max_inflight`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nats
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from hl_monitor.bench.nats_cluster import NatsCluster
from hl_monitor.delivery.publisher import publish_with_id

DEFAULT_COUNT: Final = 3000  # publishes per stream and concurrency: enough samples for a stable p99
DEFAULT_CONCURRENCY: Final = (1, 32)  # one at a time (a signal's latency) and a burst through the outbox
ROUNDS: Final = 10  # alternations between the streams per case
ACK_WAIT_S: Final = 5.0  # the service's default nats.publish_timeout
DUPLICATE_WINDOW_S: Final = 7200.0  # the service's default: dedup state is part of what a publish costs
# A realistic signal payload size (an encoded signal is ~1 KB of JSON).
PAYLOAD: Final = b"x" * 1024


@dataclass(frozen=True, slots=True)
class ReplicaResult:
    replicas: int
    concurrency: int
    publishes: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    per_second: float


def _stream(replicas: int) -> StreamConfig:
    return StreamConfig(
        name=f"BENCH_R{replicas}",
        subjects=[f"bench.r{replicas}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


async def _round(js: JetStreamContext, replicas: int, start: int, count: int, concurrency: int) -> list[float]:
    """`count` publishes, `concurrency` in flight; the latency of each in seconds."""
    latencies: list[float] = []
    ids = iter(range(start, start + count))
    stream = f"BENCH_R{replicas}"

    async def worker() -> None:
        for n in ids:
            began = time.perf_counter()
            await publish_with_id(
                js, f"bench.r{replicas}.{n % 16}", PAYLOAD, msg_id=f"m{n}", stream=stream, ack_wait=ACK_WAIT_S
            )
            latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _result(replicas: int, concurrency: int, latencies: list[float], elapsed: float) -> ReplicaResult:
    ms = sorted(x * 1000 for x in latencies)
    return ReplicaResult(
        replicas=replicas,
        concurrency=concurrency,
        publishes=len(ms),
        p50_ms=round(statistics.median(ms), 3),
        p99_ms=round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
        max_ms=round(ms[-1], 3),
        per_second=round(len(ms) / elapsed, 1),
    )


async def bench_replicas(
    root: Path, count: int = DEFAULT_COUNT, concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
) -> list[ReplicaResult]:
    """R1 and R3 publish latency on a fresh local three-node cluster under `root`."""
    cluster = NatsCluster(root)
    await cluster.start()
    try:
        nc = await nats.connect(servers=[node.url for node in cluster.nodes])
        try:
            js = nc.jetstream(timeout=ACK_WAIT_S)
            for replicas in (1, 3):
                await js.add_stream(_stream(replicas))
            results: list[ReplicaResult] = []
            next_id = 0
            per_round = max(1, count // ROUNDS)
            for inflight in concurrency:
                latencies: dict[int, list[float]] = {1: [], 3: []}
                elapsed: dict[int, float] = {1: 0.0, 3: 0.0}
                for _ in range(ROUNDS):
                    for replicas in (1, 3):
                        began = time.perf_counter()
                        latencies[replicas] += await _round(js, replicas, next_id, per_round, inflight)
                        elapsed[replicas] += time.perf_counter() - began
                        next_id += per_round
                results += [_result(r, inflight, latencies[r], elapsed[r]) for r in (1, 3)]
            return results
        finally:
            await nc.close()
    finally:
        cluster.stop()


def render(results: list[ReplicaResult]) -> str:
    lines = [
        "| replicas | in flight | publishes | p50 ms | p99 ms | max ms | publishes/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| R{r.replicas} | {r.concurrency} | {r.publishes} | {r.p50_ms} | {r.p99_ms} | {r.max_ms} | {r.per_second} |"
        for r in results
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="publishes per stream and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hlm-replicas-") as tmp:
        results = asyncio.run(bench_replicas(Path(tmp), args.count, tuple(args.concurrency)))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
