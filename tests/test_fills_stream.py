"""Fills as they happen, end to end: the real service against the simulator, NATS JetStream and a database.

Every deduplicated fill of a precise address reaches `hl.fills.{address}.{symbol}` once, before its order's signal,
with the order's running totals; a wide address's tape trades reach the same subjects with `source: market_tape`;
neither a reconnect (the snapshot and the tape replay) nor a restart sends a fill twice; `fills.enabled = false`
publishes none.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from hl_monitor.app import Service
from hl_monitor.domain.signal import decode_signal
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.storage import tables as t
from hl_monitor.storage.migrate import upgrade
from tests.support.metrics import metric_value
from tests.support.nats import NatsServer, read_stream
from tests.support.service import W1, W2, live, running, service_config
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

FILLS_STREAM = "HL_FILLS"


async def fills(url: str) -> list[dict[str, Any]]:
    return [
        {**json.loads(data, parse_float=Decimal), "_subject": subject, "_id": msg_id}
        for subject, msg_id, data in await read_stream(url, FILLS_STREAM)
    ]


def emitted(service: Service) -> float:
    """Fills the service handed to its fills outbox in this run (each a persisted, then published message)."""
    metrics = service.components.metrics
    return sum(metric_value(metrics, "fills_emitted_total", source=source) for source in ("user_fills", "market_tape"))


def quiet(service: Service) -> bool:
    outbox = service.components.fills_outbox
    assert outbox is not None
    return outbox.depth == 0 and service.components.writer.depth == 0


async def test_fills_of_both_tiers_go_out_once_each_across_a_reconnect_and_a_restart(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(db_url)
    url = nats_server.url
    async with SimServer(SimConfig()) as sim:
        # One user slot: W1 (listed first) is precise, W2 goes to the wide tier.
        cfg = service_config(sim, url, db_url, tmp_path / "data", HYPERLIQUID__USER_SLOTS="1")
        precise, wide = sim.exchange.whale(W1), sim.exchange.whale(W2)
        async with running(cfg) as service:
            await live(service, W1)
            wide_tier = service.components.wide_tier
            assert wide_tier is not None
            await wait_until(lambda: wide_tier.planner.tier(W2) == "wide", within=20)

            # A resting order fills in two pieces: each fill goes out at once, long before the order's signal.
            oid = await precise.limit_order("BTC", True, "3", "80000")
            await precise.fill(oid, "1")
            got: list[dict[str, Any]] = []

            async def count(n: int) -> bool:
                got[:] = await fills(url)
                return len(got) >= n and quiet(service)

            await wait_until(lambda: count(1), within=10)
            [first] = got
            assert first["_subject"] == f"hl.fills.{W1}.BTCUSDC"
            assert first["_id"] == first["fill_id"] == f"{W1}:fill:BTC:{first['tid']}"
            assert (first["oid"], first["side"], first["dir"], first["source"]) == (oid, "B", "Open Long", "user_fills")
            assert (first["sz"], first["px"], first["start_position"]) == (1, 80000, 0)
            assert (first["order_filled_size"], first["order_vwap"], first["backfilled"]) == (1, 80000, False)
            assert not [s for _, _, s in await read_stream(url) if decode_signal(s).oid == oid]  # no signal yet

            await precise.fill(oid, "2", "80300")
            await wide.market_order("ETH", False, "5", "2400", fills=2)
            await wait_until(lambda: count(4), within=20)
            second = got[1]
            assert (second["order_filled_size"], second["order_vwap"]) == (3, 80200)  # (80000 + 2 × 80300) ÷ 3
            tape = [f for f in got if f["address"] == W2]
            assert [(f["source"], f["side"], f["dir"], f["oid"]) for f in tape] == [
                ("market_tape", "A", "Open Short", None),
                ("market_tape", "A", "Open Short", None),
            ]
            assert {f["_subject"] for f in tape} == {f"hl.fills.{W2}.ETHUSDC"}
            assert tape[-1]["order_filled_size"] == 5  # the tape block's running total

            # Every socket drops: the userFills snapshot and the tape's replay come again and are absorbed.
            assert sim.faults.abrupt_close_all() >= 2
            await wait_until(lambda: service.components.precise.stream(W1) is not None, within=10)
            stream = service.components.precise.stream(W1)
            assert stream is not None
            await wait_until(lambda: stream.recoveries >= 2, within=20)
            await precise.market_order("BTC", False, "1", "80100")  # a marker behind the replay
            await wait_until(lambda: count(5), within=20)
            assert emitted(service) == len(got) == 5
            first_run = got[:]

        # While the service is down the whale sells; the restarted service recovers that fill once and sends
        # nothing it had sent before.
        await precise.market_order("BTC", False, "1", "80000")
        async with running(cfg) as service:
            await live(service, W1)
            await precise.market_order("BTC", True, "1", "80200")  # a marker after the gap
            await wait_until(lambda: count(7), within=20)
            assert emitted(service) == 2
        assert got[:5] == first_run
        down, marker = got[5:]
        assert (down["side"], down["px"], down["backfilled"]) == ("A", 80000, True)
        assert (marker["side"], marker["px"], marker["backfilled"]) == ("B", 80200, False)
        assert len({f["_id"] for f in got}) == len(got)


async def test_fills_disabled_publish_none(nats_server: NatsServer, tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(db_url)
    async with SimServer(SimConfig()) as sim:
        cfg = service_config(
            sim, nats_server.url, db_url, tmp_path / "data", ADDRESSES__INITIAL=W1, FILLS__ENABLED="false"
        )
        async with running(cfg) as service:
            assert service.components.fills_outbox is None
            await live(service, W1)
            await sim.exchange.whale(W1).market_order("BTC", True, "1", "80000")

            async def signalled() -> bool:
                return any(decode_signal(s).address == W1 for _, _, s in await read_stream(nats_server.url))

            await wait_until(signalled, within=20)  # the fill was processed: its order's signal is out
    nc = await nats.connect(nats_server.url)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().stream_info(FILLS_STREAM)
    finally:
        await nc.close()
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            kinds = (await conn.execute(sa.select(t.publications.c.kind).distinct())).scalars().all()
    finally:
        await engine.dispose()
    assert "fill" not in kinds
