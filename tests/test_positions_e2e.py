"""What whales hold, end to end: the real service against the simulator, NATS JetStream and a database.

Position events reach `hl.positions.*` once each (also across a restart), the KV view holds the keeper's last
document, `/positions` answers from it, order signals carry the position after them, and a liquidation-risk alert
goes out once per crossing of a level, with hysteresis.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import pytest

from hl_monitor.app import Service
from hl_monitor.domain.signal import decode_signal
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.storage.migrate import upgrade
from hl_monitor.watch.positions import PositionKeeper
from tests.support.nats import NatsServer, read_stream
from tests.support.service import W1, W2, live, running, service_config
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

POSITIONS_STREAM = "HL_POSITIONS"
# The sim pushes each whale's state this often; the keeper then holds the exchange's liquidation price.
STATE_PUSH_S = 0.2
DOCUMENT_JSON = msgspec.json.Encoder(decimal_format="string")


async def kv_document(url: str, address: str) -> dict[str, Any] | None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("hl_positions")
        try:
            entry = await kv.get(address)
        except nats.js.errors.KeyNotFoundError:
            return None
        return json.loads(entry.value or b"null")  # type: ignore[no-any-return]
    finally:
        await nc.close()


async def events(url: str) -> list[dict[str, Any]]:
    return [
        {**json.loads(data), "_subject": subject, "_id": msg_id}
        for subject, msg_id, data in await read_stream(url, POSITIONS_STREAM)
        if subject.startswith("hl.positions.")
    ]


async def alerts(url: str) -> list[tuple[str, str]]:
    return [
        (json.loads(data)["level"], msg_id)
        for subject, msg_id, data in await read_stream(url, POSITIONS_STREAM)
        if subject.startswith("hl.alerts.")
    ]


def keeper_of(service: Service) -> PositionKeeper:
    positions = service.components.positions
    assert positions is not None, "positions.enabled is on by default"
    return positions.keeper


def quiet(service: Service) -> bool:
    """Everything the keeper produced is stored and acknowledged."""
    positions = service.components.positions
    assert positions is not None
    return (
        positions.keeper.pending_documents == 0
        and positions.outbox.depth == 0
        and positions.kv.depth == 0
        and service.components.writer.depth == 0
    )


async def test_positions_of_both_tiers_reach_events_kv_http_and_signals_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(db_url)
    async with SimServer(SimConfig(clearinghouse_push_interval=STATE_PUSH_S)) as sim:
        # One user slot: W1 (listed first, same priority) is precise, W2 goes to the wide tier.
        cfg = service_config(sim, nats_server.url, db_url, tmp_path / "data", HYPERLIQUID__USER_SLOTS="1")
        precise, wide = sim.exchange.whale(W1), sim.exchange.whale(W2)
        async with running(cfg) as service:
            await live(service, W1)
            keeper = keeper_of(service)
            wide_tier = service.components.wide_tier
            assert wide_tier is not None
            planner = wide_tier.planner
            await wait_until(lambda: planner.tier(W2) == "wide", within=20)
            await wait_until(lambda: keeper.portfolio(W1) is not None, within=10)  # the first state: a baseline

            await precise.market_order("BTC", True, "2", "80000")
            await precise.market_order("BTC", True, "1", "80300")

            def leverage_known() -> bool:  # a state frame showed the coin's leverage setting; flips keep it
                doc = keeper.portfolio(W1)
                btc = doc.position("BTC") if doc is not None else None
                return btc is not None and btc.size == 3 and btc.leverage is not None

            await wait_until(leverage_known, within=10)
            await precise.market_order("BTC", False, "4", "80100", fills=2)  # long 3 → 1, then a flip to short 1
            await wide.market_order("ETH", False, "5", "2400")

            def settled() -> bool:
                w1, w2 = keeper.portfolio(W1), keeper.portfolio(W2)
                btc = w1.position("BTC") if w1 is not None else None
                eth = w2.position("ETH") if w2 is not None else None
                return btc is not None and btc.size == -1 and eth is not None and eth.size == -5 and quiet(service)

            await wait_until(settled, within=20)
            first = await events(nats_server.url)
            kinds = [(e["address"], e["coin"], e["event"]) for e in first]
            # In order per address; the two addresses' events come from different feeds and may interleave.
            assert [k for k in kinds if k[0] == W1] == [
                (W1, "BTC", "opened"),
                (W1, "BTC", "increased"),
                (W1, "BTC", "reduced"),
                (W1, "BTC", "flipped"),
            ]
            assert [k for k in kinds if k[0] == W2] == [(W2, "ETH", "opened")]
            assert [e["_id"] for e in first] == [e["event_id"] for e in first]
            assert {e["_subject"] for e in first} == {f"hl.positions.{W1}.BTCUSDC", f"hl.positions.{W2}.ETHUSDC"}
            flip = [e for e in first if e["address"] == W1][3]
            assert (Decimal(flip["size_before"]), Decimal(flip["size_after"])) == (Decimal(1), Decimal(-1))
            sim_btc = precise.view("BTC")
            assert sim_btc is not None
            assert Decimal(flip["after"]["entry_px"]) == sim_btc.entry_px  # a flip opens at the fill price

            # The KV view holds exactly the keeper's document; HTTP answers from the same documents.
            async def kv_holds_the_keepers_document() -> bool:
                # State frames keep arriving (each one a new document); between a flush and the next frame the KV
                # value must be exactly the keeper's document.
                document = await kv_document(nats_server.url, W1)
                return quiet(service) and document == json.loads(DOCUMENT_JSON.encode(keeper.portfolio(W1)))

            await wait_until(kv_holds_the_keepers_document, within=10)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{cfg.http.listen}/positions", params={"symbol": "BTC"}) as resp:
                    assert resp.status == 200
                    rows = (await resp.json())["positions"]
                async with http.get(f"http://{cfg.http.listen}/positions", params={"sort": "sideways"}) as resp:
                    assert resp.status == 400
                    assert (await resp.json())["error"].startswith("sort:")
            assert [(r["address"], r["side"], Decimal(r["size"])) for r in rows] == [(W1, "SHORT", Decimal(-1))]

            # The order that flipped the position carries the position after it.
            signals = [decode_signal(data) for _, _, data in await read_stream(nats_server.url)]
            opened_short = [s for s in signals if s.address == W1 and s.dir == "Open Short"]
            assert len(opened_short) == 1
            assert (opened_short[0].entry_px, opened_short[0].leverage) == (sim_btc.entry_px, sim_btc.leverage)

        # While the service is down the whale closes its short; the restarted service reports that once, and
        # nothing it had already reported goes out again.
        await precise.market_order("BTC", True, "1", "80000")
        async with running(cfg) as service:
            await live(service, W1)
            keeper = keeper_of(service)
            await precise.market_order("BTC", True, "2", "80200")  # a marker after the gap: a new long

            def reopened() -> bool:
                doc = keeper.portfolio(W1)
                btc = doc.position("BTC") if doc is not None else None
                return btc is not None and btc.size == 2 and quiet(service)

            await wait_until(reopened, within=20)
            after = await events(nats_server.url)
        assert after[: len(first)] == first
        assert [(e["coin"], e["event"]) for e in after[len(first) :]] == [("BTC", "closed"), ("BTC", "opened")]
        assert len({e["_id"] for e in after}) == len(after)


async def test_a_whale_near_liquidation_is_alerted_once_per_crossing(nats_server: NatsServer, tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(db_url)
    async with SimServer(SimConfig(clearinghouse_push_interval=STATE_PUSH_S)) as sim:
        cfg = service_config(sim, nats_server.url, db_url, tmp_path / "data", ADDRESSES__INITIAL=W1)
        whale = sim.exchange.whale(W1, usdc="200000")  # liquidation about half the price away at the open
        whale.set_leverage("BTC", 20)
        async with running(cfg) as service:
            await live(service, W1)
            keeper = keeper_of(service)
            await whale.market_order("BTC", True, "5", "80000")
            view = whale.view("BTC")
            assert view is not None
            assert view.liquidation_px is not None
            liq = view.liquidation_px

            def known() -> bool:
                doc = keeper.portfolio(W1)
                position = doc.position("BTC") if doc is not None else None
                return position is not None and position.liquidation_px == liq

            await wait_until(known, within=10)

            async def mark_at(distance: str) -> None:
                """Move BTC's mid so the long is `distance` (a fraction of the mark) above its liquidation price."""
                mid = (liq / (1 - Decimal(distance))).quantize(Decimal("0.1"))
                sim.exchange.set_mid("BTC", mid)

                def applied() -> bool:
                    doc = keeper.portfolio(W1)
                    position = doc.position("BTC") if doc is not None else None
                    return position is not None and position.mark_px == mid and quiet(service)

                await wait_until(applied, within=10)

            await mark_at("0.08")  # below 0.10: one alert
            await mark_at("0.11")  # above the level, below its rearm point (0.15): still disarmed
            await mark_at("0.09")  # no second alert for the same crossing
            await mark_at("0.04")  # below 0.05: one alert for that level
            await mark_at("0.30")  # recovered past both rearm points
            await mark_at("0.08")  # a new crossing of 0.10
            got = await alerts(nats_server.url)
        assert [level for level, _ in got] == ["0.1", "0.05", "0.1"]
        assert len({msg_id for _, msg_id in got}) == 3
