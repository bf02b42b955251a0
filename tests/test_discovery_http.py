"""Discovery over HTTP and its confirmation reads: `GET /discovery`, 400 naming a bad parameter, the admin
route that watches a candidate, and `clearinghouseState` confirmations paced within `discovery.rest_share`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import msgspec
import pytest

from hl_monitor.cli import main
from hl_monitor.config import DiscoveryConfig, HttpConfig, HyperliquidConfig
from hl_monitor.domain.address import Priority
from hl_monitor.errors import InfoError
from hl_monitor.hyperliquid.protocol import ClearinghouseState
from hl_monitor.metrics import Metrics
from hl_monitor.ops.http import AddressInput, HttpServer, create_app
from hl_monitor.watch.discovery import DiscoveryKeeper
from tests.support.discovery_population import LIQUIDATED, MM, WASH_A, WHALE, population
from tests.support.http_fakes import EmptyView, MemoryAdmin

TOKEN: Final = "discovery-admin-token"
NOW_MS: Final = 1_000
POOR: Final = MM  # confirmed with a small account


class FakeInfo:
    """clearinghouseState answers by address; every call is recorded with its priority."""

    def __init__(self, values: dict[str, str], failing: frozenset[str] = frozenset()) -> None:
        self.values = values
        self.failing = failing
        self.calls: list[tuple[str, Priority]] = []

    async def clearinghouse_state(self, user: str, dex: str = "", *, priority: Priority = "high") -> ClearinghouseState:
        self.calls.append((user, priority))
        if user in self.failing:
            raise InfoError("clearinghouseState", 500, "boom")
        body = {
            "marginSummary": {"accountValue": self.values.get(user, "0")},
            "assetPositions": [
                {"position": {"coin": "ETH", "szi": "1000", "leverage": {"type": "cross", "value": 10}}}
            ],
        }
        return msgspec.json.decode(msgspec.json.encode(body), type=ClearinghouseState)


class FakeClock:
    """A monotonic clock that only the keeper's sleeps move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def keeper(
    info: FakeInfo, admin: MemoryAdmin | None = None, clock: FakeClock | None = None, **cfg: Any
) -> DiscoveryKeeper:
    clock = clock or FakeClock()
    k = DiscoveryKeeper(
        DiscoveryConfig(min_account_usd=100_000.0, **cfg),
        HyperliquidConfig(),
        info=info,
        metrics=Metrics(),
        is_watched=lambda a: admin is not None and a in admin.rows,
        wall_ms=lambda: NOW_MS,
        clock=clock,
        sleep=clock.sleep,
    )
    k.on_trades(population(NOW_MS), NOW_MS)
    return k


@dataclass
class Served:
    http: aiohttp.ClientSession
    admin: MemoryAdmin
    keeper: DiscoveryKeeper
    base: str


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    admin = MemoryAdmin()
    k = keeper(FakeInfo({WHALE: "2500000", POOR: "5000"}), admin)
    await k.confirm_due()
    cfg = HttpConfig(listen="127.0.0.1:0", admin_token=TOKEN)  # type: ignore[arg-type]
    app = create_app(EmptyView(), Metrics(), admin, cfg, discovery=k)
    async with (
        HttpServer(app, cfg.listen) as server,
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}") as session,
    ):
        yield Served(session, admin, k, f"http://127.0.0.1:{server.port}")


async def get(http: aiohttp.ClientSession, path: str, status: int = 200) -> Any:
    async with http.get(path) as resp:
        body = await resp.json()
        assert resp.status == status, body
        return body


async def test_discovery_lists_candidates_with_evidence_and_confirmation(served: Served) -> None:
    body = await get(served.http, "/discovery?window=1h&label=directional&limit=5")
    assert body["window"] == "1h"
    assert 1 < body["count"] <= 5  # retail that bought the liquidation is directional too, smaller
    assert {row["label"] for row in body["candidates"]} == {"directional"}
    assert body["candidates"][0]["address"] == WHALE
    whale = body["candidates"][0]
    assert whale["label"] == "directional"
    assert whale["net_usd_by_coin"] == {"ETH": 100_000.0}
    assert whale["evidence"]["net_ratio"] == 1
    assert whale["account_value_usd"] == 2_500_000.0
    assert whale["max_leverage"] == 10
    assert whale["promotable"] is True
    assert whale["watched"] is False

    every = await get(served.http, "/discovery")
    assert every["window"] == "24h"  # the longest window by default
    by_address = {row["address"]: row for row in every["candidates"]}
    assert by_address[POOR]["account_value_usd"] == 5_000.0
    assert by_address[POOR]["promotable"] is False  # below discovery.min_account_usd
    assert by_address[LIQUIDATED]["account_value_usd"] is None  # engine flow is never read


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("window=2h", "window"),
        ("window=soon", "window"),
        ("label=whale", "label"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("sort=notional", "sort"),
        ("limit=1&limit=2", "limit"),
    ],
)
async def test_bad_discovery_query_is_400_naming_the_parameter(served: Served, query: str, parameter: str) -> None:
    body = await get(served.http, f"/discovery?{query}", status=400)
    assert body["error"].startswith(f"{parameter}:"), body


async def test_admin_watch_adds_a_candidate_as_wide_with_its_label(served: Served) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    path = f"/admin/discovery/{WHALE}/watch"
    async with served.http.post(path) as resp:
        assert resp.status == 401
    async with served.http.post(path, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    assert served.admin.rows[WHALE]["tier"] == "wide"
    assert served.admin.rows[WHALE]["label"] == "discovered:directional"
    listed = await get(served.http, "/discovery?window=1h&label=directional")
    assert listed["candidates"][0]["watched"] is True
    # Twice: the operator's entry is never overwritten.
    async with served.http.post(path, headers=headers) as resp:
        assert resp.status == 409
    unknown = "0x" + "99" * 20
    async with served.http.post(f"/admin/discovery/{unknown}/watch", headers=headers) as resp:
        assert resp.status == 404
    assert unknown not in served.admin.rows


async def test_admin_lists_and_removes_the_auto_watched_in_bulk(served: Served) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    auto = ["0x" + f"{i:02x}" * 20 for i in (0x71, 0x72)]
    manual = "0x" + "73" * 20
    await served.admin.add([AddressInput(address=a, label="discovered:auto:directional", tier="wide") for a in auto])
    await served.admin.add([AddressInput(address=manual, label="discovered:directional", tier="wide")])
    async with served.http.get("/admin/discovery/auto") as resp:
        assert resp.status == 401
    async with served.http.get("/admin/discovery/auto", headers=headers) as resp:
        assert [row["address"] for row in (await resp.json())["addresses"]] == auto
    async with served.http.delete("/admin/discovery/auto", headers=headers) as resp:
        assert (await resp.json())["removed"] == 2
    assert set(served.admin.rows) == {manual}, "what the operator watched from discovery stays"


async def test_no_discovery_route_without_the_keeper() -> None:
    cfg = HttpConfig(listen="127.0.0.1:0")
    app = create_app(EmptyView(), Metrics(), None, cfg)
    async with (
        HttpServer(app, cfg.listen) as server,
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}") as session,
        session.get("/discovery") as resp,
    ):
        assert resp.status == 404


async def test_confirmation_reads_are_low_priority_paced_within_the_share_and_not_repeated() -> None:
    clock = FakeClock()
    info = FakeInfo({WHALE: "2500000"}, failing=frozenset({WASH_A}))
    k = keeper(info, clock=clock, rest_share=0.05, confirm_top=3)
    confirmed = await k.confirm_due()
    read = [address for address, _ in info.calls]
    assert LIQUIDATED not in read
    assert all(priority == "low" for _, priority in info.calls)
    assert confirmed == len(read) - (WASH_A in read)
    # 5 % of 1200 weight a minute is 1 weight a second: one 2-weight read every 2 s at most.
    assert clock.now == pytest.approx(2.0 * (len(read) - 1))
    # Within confirm_ttl only the failed read is tried again.
    info.calls.clear()
    await k.confirm_due()
    assert [address for address, _ in info.calls] == ([WASH_A] if WASH_A in read else [])
    assert k.confirmation(WHALE) is not None


async def test_discover_command_prints_the_running_services_candidates(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["discover", "--url", served.base, "--window", "1h", "--label", "directional", "--limit", "2"]
    assert await asyncio.to_thread(main, [*args, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["candidates"][0]["address"] == WHALE
    assert body["count"] == 2
    assert await asyncio.to_thread(main, args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:4] == [WHALE, "directional", "100,000", "2,500,000"]
    assert await asyncio.to_thread(main, ["discover", "--url", served.base, "--window", "2h"]) == 2
    assert "window:" in capsys.readouterr().err
