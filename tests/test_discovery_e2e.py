"""Automatic discovery in the running service: the simulator's population trades on the tape, the service counts
it, confirms the candidates over REST, watches the directional whales (tier wide, tagged) and announces each once
on `hl.discovery.{address}`; the makers, the wash pair and the engine account are left alone."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from hl_monitor.app import Service
from hl_monitor.cluster.discovery import DiscoveryPart
from hl_monitor.config import Config
from hl_monitor.sim.scenarios import population_roles, run_scenario
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.storage.migrate import upgrade
from hl_monitor.storage.repository import AddressTable
from hl_monitor.watch.autowatch import AUTO_LABEL
from tests.support.nats import NatsServer, read_stream
from tests.support.service import running, service_config
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(150)

SEED = 18
# More passes after the adds than it took to make them: nothing is added or announced again.
EXTRA_PASSES = 5


def tape_live(service: Service) -> bool:
    wide = service.components.wide_tier
    return wide is not None and wide.tape.continuous_since_ms() is not None


def passed(part: DiscoveryPart, passes: int) -> bool:
    return part.passes >= passes


def discovery_of(service: Service) -> DiscoveryPart:
    part = service.components.discovery
    assert part is not None, "discovery is on by default with the wide tier's tape"
    return part


async def announcements(url: str) -> list[dict[str, Any]]:
    return [
        {**json.loads(data), "_subject": subject, "_id": msg_id}
        for subject, msg_id, data in await read_stream(url, "HL_DISCOVERY")
    ]


async def test_the_populations_directional_whales_are_auto_watched_and_announced_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(db_url)
    async with SimServer() as sim:
        cfg = service_config(
            sim,
            nats_server.url,
            db_url,
            tmp_path / "data",
            DISCOVERY__AUTO_WATCH="true",
            DISCOVERY__AUTO_MIN_NOTIONAL_USD="400000",  # one cycle's whale order is 500,000 USD
            DISCOVERY__PASS_INTERVAL="0.2",
            DISCOVERY__REST_SHARE="1",
        )
        async with running(cfg) as service:
            wide = service.components.wide_tier
            assert wide is not None
            await wait_until(lambda: wide.tape.continuous_since_ms() is not None, what="tape live")
            part = discovery_of(service)
            addresses = await run_scenario(sim, "population", SEED, step_delay=0.05)
            roles = population_roles(addresses)
            whales = sorted(a for a, role in roles.items() if role == "directional")
            table = AddressTable(service.components.repo.engine)

            async def auto_rows() -> dict[str, dict[str, Any]]:
                return {r["address"]: r for r in await table.list() if r["label"] == AUTO_LABEL}

            async def both_watched() -> bool:
                return sorted(await auto_rows()) == whales

            await wait_until(both_watched, within=30, what="both directional whales auto-watched")
            rows = await auto_rows()
            assert {r["tier"] for r in rows.values()} == {"wide"}
            book = service.components.book
            await wait_until(lambda: all(w in book.entries() for w in whales), what="in the address book")
            await wait_until(lambda: all(wide.planner.tier(w) == "wide" for w in whales), what="on the wide tier")

            passes = part.passes
            await wait_until(lambda: part.passes >= passes + EXTRA_PASSES, what="more passes")
            await wait_until(lambda: part.outbox is not None and part.outbox.depth == 0, what="announced")
            sent = await announcements(nats_server.url)
            assert sorted((m["address"], m["action"]) for m in sent) == [(w, "watch") for w in whales]
            for m in sent:
                assert m["_subject"] == f"hl.discovery.{m['address']}"
                assert m["_id"] == m["event_id"]
                assert m["label"] == AUTO_LABEL
                assert m["account_value_usd"] > 0
                assert m["net_usd_by_coin"], "the evidence the decision was taken on"
            assert sorted(await auto_rows()) == whales, "nothing else was added: makers, wash pair, engine"
            assert not set(whales) & set(service.components.precise.assigned()), "never promoted to precise"
            others = [a for a, role in roles.items() if role != "directional"]
            discovered = {r["address"] for r in await table.list() if r["label"].startswith("discovered:")}
            assert not discovered & set(others)


# Both services connect from 127.0.0.1: the simulator's per-IP limits must cover the two together.
SHARED_IP = SimConfig(
    max_connections=200,
    max_new_connections_per_minute=10_000,
    max_users=200,
    max_subscriptions=10_000,
    max_client_messages_per_minute=100_000,
    rest_weight_per_minute=1_000_000,
)


async def test_in_a_cluster_only_the_discovery_lease_holder_watches_and_announces(
    nats_server: NatsServer, tmp_path: Path, mariadb_url: str
) -> None:
    await upgrade(mariadb_url)
    async with SimServer(SHARED_IP) as sim:

        def cfg(name: str) -> Config:
            return service_config(
                sim,
                nats_server.url,
                mariadb_url,
                tmp_path / name,
                SERVICE__INSTANCE_ID=name,
                CLUSTER__MODE="nats",  # default lease TTL (10 s): a busy loop must not hand the role over mid-test
                DISCOVERY__AUTO_WATCH="true",
                DISCOVERY__AUTO_MIN_NOTIONAL_USD="400000",
                DISCOVERY__PASS_INTERVAL="0.2",
                DISCOVERY__REST_SHARE="1",
            )

        async with running(cfg("one")) as one, running(cfg("two")) as two:
            parts = {"one": discovery_of(one), "two": discovery_of(two)}
            for service in (one, two):
                await wait_until(partial(tape_live, service), what="tape live")

            def leader() -> str | None:
                held = [n for n, p in parts.items() if p.lease is not None and p.lease.held()]
                return held[0] if len(held) == 1 else None

            await wait_until(leader, what="one discovery lease holder")
            addresses = await run_scenario(sim, "population", SEED, step_delay=0.05)
            whales = sorted(a for a, role in population_roles(addresses).items() if role == "directional")
            table = AddressTable(one.components.repo.engine)

            async def watched() -> list[str]:
                return sorted(r["address"] for r in await table.list() if r["label"] == AUTO_LABEL)

            async def both_watched() -> bool:
                return await watched() == whales

            await wait_until(both_watched, within=30, what="both directional whales auto-watched")
            for part in parts.values():  # both keep passing over the same candidates
                await wait_until(partial(passed, part, part.passes + EXTRA_PASSES), what="more passes")
            await wait_until(
                lambda: all(p.outbox is not None and p.outbox.depth == 0 for p in parts.values()), what="announced"
            )
            sent = await announcements(nats_server.url)
            holder = leader()
            assert holder is not None
            assert sorted((m["address"], m["instance_id"]) for m in sent) == [(w, holder) for w in whales]
            other = parts["two" if holder == "one" else "one"].auto
            assert other is not None
            assert other.announced == [], "the instance without the lease wrote nothing"
            assert await watched() == whales
