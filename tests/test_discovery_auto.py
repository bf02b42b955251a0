"""Automatic watching on a controlled clock, against a real JetStream and the SQLite address table: confirmed
directional whales are added (wide, tagged, at most `auto_max`), expire without qualifying activity, an
operator's removal sticks, and every change is announced once on `hl.discovery.{address}`. In cluster mode only
the holder of the `discovery` lease writes."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import msgspec
import sqlalchemy as sa

from hl_monitor.config import ClusterConfig, DiscoveryConfig
from hl_monitor.delivery.discovery import discovery_subject
from hl_monitor.domain.publication import DiscoveryAnnouncement
from hl_monitor.hyperliquid.protocol import WsTrade
from hl_monitor.storage import tables as t
from hl_monitor.watch.autowatch import AUTO_LABEL
from tests.support.discovery import HOUR_MS, Clock, FakeInfo, announcer, buys, maker_flow
from tests.support.metrics import metric_value
from tests.support.nats import NatsServer, read_stream
from tests.support.waiting import wait_until

STREAM: Final = "HL_DISCOVERY"
BIG: Final = "0x" + "b1" * 20
SECOND: Final = "0x" + "b2" * 20
THIRD: Final = "0x" + "b3" * 20
SMALL: Final = "0x" + "b4" * 20  # directional, below auto_min_notional_usd
POOR: Final = "0x" + "b5" * 20  # directional and big, account below min_account_usd
MAKER: Final = "0x" + "a1" * 20  # the largest notional of all, never auto-watched
RICH: Final = 5_000_000

CFG: Final = DiscoveryConfig(
    windows=[3600.0],
    auto_watch=True,
    auto_min_notional_usd=1_000_000.0,
    auto_max=2,
    auto_expire=7200.0,
    min_account_usd=100_000.0,
)


def _info() -> FakeInfo:
    return FakeInfo({BIG: RICH, SECOND: RICH, THIRD: RICH, SMALL: RICH, POOR: 50_000, MAKER: RICH})


def _tape(t: int) -> list[WsTrade]:
    return [
        *maker_flow(MAKER, 40_000_000, t=t),
        *buys(BIG, 6_000_000, t=t, first_retail=1),
        *buys(SECOND, 4_000_000, t=t, first_retail=20),
        *buys(THIRD, 3_000_000, t=t, first_retail=40),
        *buys(SMALL, 500_000, t=t, first_retail=60),
        *buys(POOR, 8_000_000, t=t, first_retail=80),
    ]


async def _stream(url: str) -> list[DiscoveryAnnouncement]:
    messages = await read_stream(url, STREAM)
    out = []
    for subject, msg_id, payload in messages:
        a = msgspec.json.decode(payload, type=DiscoveryAnnouncement)
        assert (subject, msg_id) == (discovery_subject("hl.discovery", a.address), a.event_id)
        out.append(a)
    return out


async def test_auto_watch_adds_caps_expires_and_announces_each_change_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    async with announcer(nats_server.url, f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}", CFG) as a:
        one = a.instance(clock, _info(), CFG)
        one.keeper.on_trades(_tape(clock.wall_ms()), clock.wall_ms())
        await one.step()

        # The two best confirmed directional whales, as wide rows with the auto label; never the maker (largest
        # notional), the small whale or the poor one; the cap keeps the third out.
        rows = await a.rows()
        assert set(rows) == {BIG, SECOND}
        assert {(r["tier"], r["label"], r["is_active"]) for r in rows.values()} == {("wide", AUTO_LABEL, True)}
        await wait_until(a.all_acknowledged, what="announcements acknowledged")
        announced = await _stream(nats_server.url)
        assert [(x.action, x.address) for x in announced] == [("watch", BIG), ("watch", SECOND)]
        assert announced[0].account_value_usd == RICH
        assert announced[0].notional_usd == 6_000_000
        assert announced[0].window == "1h"
        assert announced[0].net_usd_by_coin == {"ETH": 6_000_000.0}

        # Nothing changed: a second pass neither adds nor announces again.
        await one.step()
        assert set(await a.rows()) == {BIG, SECOND}
        await wait_until(a.all_acknowledged)
        assert len(await _stream(nats_server.url)) == 2

        # The operator drops SECOND: it stays dropped (an inactive row) and THIRD takes the free place.
        await a.table.remove([SECOND])
        await one.step()
        rows = await a.rows()
        assert (rows[SECOND]["is_active"], rows[THIRD]["label"]) == (False, AUTO_LABEL)

        # BIG keeps trading, THIRD goes quiet: after auto_expire THIRD is deleted and announced, BIG stays.
        for _ in range(5):
            clock.advance(1800)
            one.keeper.on_trades(buys(BIG, 2_000_000, t=clock.wall_ms()), clock.wall_ms())
            await one.step()
        rows = await a.rows()
        assert THIRD not in rows
        assert rows[BIG]["is_active"]
        await wait_until(a.all_acknowledged)
        announced = await _stream(nats_server.url)
        assert [(x.action, x.address) for x in announced] == [
            ("watch", BIG),
            ("watch", SECOND),
            ("watch", THIRD),
            ("unwatch", THIRD),
        ]
        gone = announced[-1]
        assert gone.reason == "no qualifying activity for 7200 s"
        assert gone.last_active_ms is not None
        assert gone.at_ms - gone.last_active_ms >= 7_200_000
        assert metric_value(one.metrics, "discovery_auto_changes_total", action="unwatch") == 1
        assert metric_value(one.metrics, "discovery_auto_watched") == 1

        # Exactly once across a re-publish: every row marked unacknowledged again (a restart that lost the acks)
        # is published again and stored once.
        async with a.table.engine.begin() as conn:
            await conn.execute(sa.update(t.publications).values(published_at=None))
        await a.restart_outbox()
        await wait_until(a.all_acknowledged, what="re-published")
        assert len(await _stream(nats_server.url)) == 4


async def test_a_restart_does_not_expire_what_it_has_not_watched_for_a_window(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    async with announcer(nats_server.url, f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}", CFG) as a:
        first = a.instance(clock, _info(), CFG)
        first.keeper.on_trades(_tape(clock.wall_ms()), clock.wall_ms())
        await first.step()
        assert set(await a.rows()) == {BIG, SECOND}

        clock.advance(3 * 3600)  # down for longer than auto_expire
        restarted = a.instance(clock, _info(), CFG)
        await restarted.step()
        assert set(await a.rows()) == {BIG, SECOND}, "empty windows right after a start prove no inactivity"
        clock.advance(HOUR_MS / 1000)
        await restarted.step()
        clock.advance(7200)
        await restarted.step()
        assert await a.rows() == {}


async def test_only_the_discovery_lease_holder_writes(nats_server: NatsServer, tmp_path: Path) -> None:
    cluster = ClusterConfig(mode="nats", lease_ttl=1.0, heartbeat=0.25, failover=2.0)
    clock = Clock()
    async with announcer(nats_server.url, f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}", CFG) as a:
        one = a.instance(clock, _info(), CFG, instance_id="one", cluster=cluster)
        two = a.instance(clock, _info(), CFG, instance_id="two", cluster=cluster)
        await wait_until(lambda: one.leads() or two.leads(), what="a holder")
        holder, other = (one, two) if one.leads() else (two, one)
        assert not other.leads()
        for instance in (one, two):  # both read the same tape
            instance.keeper.on_trades(_tape(clock.wall_ms()), clock.wall_ms())
        await other.step()
        assert await a.rows() == {}, "the instance without the lease writes nothing"
        assert metric_value(other.metrics, "discovery_leader") == 0
        await holder.step()
        await other.step()
        assert set(await a.rows()) == {BIG, SECOND}
        await wait_until(a.all_acknowledged)
        announced = await _stream(nats_server.url)
        assert [(x.address, x.instance_id) for x in announced] == [(BIG, holder.name), (SECOND, holder.name)]

        # The holder stops (its lease is released): the other takes over and is the only writer from then on.
        assert holder.lease is not None
        await a.stop_lease(holder.lease)
        await wait_until(other.leads, what="takeover")
        await a.table.remove([SECOND])
        await other.step()
        await holder.step()
        await wait_until(a.all_acknowledged)
        announced = await _stream(nats_server.url)
        assert [(x.action, x.address, x.instance_id) for x in announced[2:]] == [("watch", THIRD, other.name)]
