"""What `sync_interval: always` costs the embedded server: acked publishes with and without it, same machine.

`python -m hl_monitor.bench.sync [--messages N] [--inflight W] [--store DIR]` starts the embedded `nats-server`
twice on a fresh store (once with `always`, once with the server's default two-minute flush) and measures, for
each, N publishes of a real signal payload with `Nats-Msg-Id` into the signals stream:

- latency: one publish at a time (publish → ack), p50 and p99;
- throughput: W publishes in flight at once (the outbox's `nats.max_inflight` pattern), acks per second.

The store directory matters: fsync cost is the disk's (`--store` on the production volume measures that one).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Final

import msgspec

from hl_monitor.bench.e2e import percentile
from hl_monitor.config import NatsConfig, SignalsConfig
from hl_monitor.delivery.embedded_nats import SYNC_INTERVAL, EmbeddedNats
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.domain.signal import Signal
from hl_monitor.metrics import Metrics

MESSAGES: Final = 2000  # per mode: enough for a stable p99 in a few seconds
INFLIGHT: Final = 256  # concurrent publishes of the throughput pass (the outbox allows up to 1000)
DEFAULT_SYNC: Final = "2m"  # nats-server's own default flush interval
MS_PER_S: Final = 1000.0
EXAMPLE: Final = msgspec.json.decode(
    b'{"address":"0x' + b"ab" * 20 + b'","asset_type":"futures","symbol":"BTCUSDC","coin_type":"A",'
    b'"direction":"open","side":"LONG","position_rate":"0.5","close_rate":"0","size":"1.5","price":"65000.5",'
    b'"timestamp":1717000000000,"signal_id":"x","coin":"BTC","dir":"Open Long","oid":1,"status":"filled",'
    b'"trigger":"status","fill_count":3,"first_fill_time":1717000000000,"last_fill_time":1717000000500,'
    b'"notional_usd":"97500.75","position_before":"0","position_after":"1.5","detected_at":1717000000600}',
    type=Signal,
)


def _signal(run: str, i: int) -> Signal:
    return msgspec.structs.replace(EXAMPLE, signal_id=f"{run}:{i}", oid=i)


async def _measure(sync_interval: str, store: Path, messages: int, inflight: int) -> dict[str, float]:
    server = EmbeddedNats(NatsConfig(store_dir=str(store)), Metrics(), sync_interval=sync_interval)
    await server.start()
    publisher = Publisher(
        NatsConfig(publish_timeout=30.0), SignalsConfig(legacy_enabled=False), Metrics(), url=server.url
    )
    try:
        await publisher.connect(wait=10)
        await publisher.ensure_stream()
        for i in range(min(100, messages)):  # warm the connection and the stream's first block
            await publisher.publish(_signal("warm", i))
        latencies = []
        for i in range(messages):
            started = time.perf_counter()
            await publisher.publish(_signal("seq", i))
            latencies.append((time.perf_counter() - started) * MS_PER_S)
        slots = asyncio.Semaphore(inflight)

        async def one(i: int) -> None:
            async with slots:
                await publisher.publish(_signal("par", i))

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(messages)))
        elapsed = time.perf_counter() - started
    finally:
        await publisher.close()
        await server.stop()
    return {
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "acks_per_s": messages / elapsed,
    }


async def compare(messages: int, inflight: int, base: Path) -> dict[str, dict[str, float]]:
    """Both modes, each on a fresh store under `base`."""
    results = {}
    for mode in (DEFAULT_SYNC, SYNC_INTERVAL):
        store = base / f"store-{mode}"
        shutil.rmtree(store, ignore_errors=True)
        results[mode] = await _measure(mode, store, messages, inflight)
        shutil.rmtree(store, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hl_monitor.bench.sync", description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--inflight", type=int, default=INFLIGHT)
    parser.add_argument("--store", type=Path, default=None, help="where the stores go (default: a temp directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hl-sync-bench-") as tmp:
        base = args.store or Path(tmp)
        results = asyncio.run(compare(args.messages, args.inflight, base))
    print(f"{args.messages} acked publishes per mode; throughput with {args.inflight} in flight; store under {base}")
    print("| sync_interval | publish p50 | publish p99 | acks/s |")
    print("|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['acks_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
