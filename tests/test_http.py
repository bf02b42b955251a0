"""The HTTP operations surface over a real aiohttp server on a free port.

The service side is a small in-memory ServiceView / AddressAdmin: these tests pin the HTTP contract
(status codes, bodies, auth, validation, audit); the wired components are tested where they live.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from hl_monitor.config import HttpConfig, Secret
from hl_monitor.errors import ConfigError
from hl_monitor.metrics import Metrics
from hl_monitor.ops.http import (
    AddressInput,
    AuthFailureLimiter,
    HttpServer,
    create_app,
)
from tests.support.http_fakes import WHALE, FakeView, MemoryAdmin

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WHALE2 = "0x" + "cd" * 20
WHALE3 = "0x" + "ef" * 20


@dataclass
class Served:
    http: aiohttp.ClientSession
    metrics: Metrics
    view: FakeView
    admin: MemoryAdmin
    port: int

    async def metric(self, line_prefix: str) -> str:
        async with self.http.get("/metrics") as resp:
            text = await resp.text()
        return next(line for line in text.splitlines() if line.startswith(line_prefix))


@contextlib.asynccontextmanager
async def serve(token: str | None = TOKEN, with_admin: bool = True, **http: Any) -> AsyncIterator[Served]:
    cfg = HttpConfig(listen="127.0.0.1:0", admin_token=Secret(token) if token else None, **http)
    metrics, view, admin = Metrics(), FakeView(), MemoryAdmin()
    app = create_app(view, metrics, admin if with_admin else None, cfg)
    async with (
        HttpServer(app, cfg.listen) as server,
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}") as session,
    ):
        yield Served(session, metrics, view, admin, server.port)


# ---------------------------------------------------------------- health, readiness, status, metrics


async def test_all_up_is_live_ready_and_healthy() -> None:
    async with serve() as s:
        async with s.http.get("/health/live") as resp:
            assert resp.status == 200
            assert await resp.text() == "ok"
        async with s.http.get("/health/ready") as resp:
            assert resp.status == 200
            assert await resp.json() == {"ready": True, "reasons": {}}
        async with s.http.get("/health") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["status"] == "ok"
        assert body["uptime"] == 12.5
        assert body["addresses"] == {"count": 1}
        assert await s.metric("hl_monitor_ready ") == "hl_monitor_ready 1.0"


@pytest.mark.parametrize(
    ("nats_up", "db_up", "stale", "reasons"),
    [
        (False, True, {}, {"nats": "disconnected"}),
        (True, False, {}, {"database": "unreachable"}),
        (True, True, {"user-3": 42.0}, {"feed:user-3": "stale for 42s"}),
        (
            False,
            False,
            {"tape": 11.0},
            {"nats": "disconnected", "database": "unreachable", "feed:tape": "stale for 11s"},
        ),
    ],
    ids=["nats-down", "db-down", "stale-feed", "everything-down"],
)
async def test_not_ready_answers_503_with_reasons_but_stays_live(
    nats_up: bool, db_up: bool, stale: dict[str, float], reasons: dict[str, str]
) -> None:
    async with serve() as s:
        s.view.nats_up, s.view.db_up, s.view.stale = nats_up, db_up, stale
        async with s.http.get("/health/ready") as resp:
            assert resp.status == 503
            assert await resp.json() == {"ready": False, "reasons": reasons}
        async with s.http.get("/health") as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["status"] == "unavailable"
        assert body["reasons"] == reasons
        assert body["uptime"] == 12.5
        async with s.http.get("/health/live") as resp:
            assert resp.status == 200
        assert await s.metric("hl_monitor_ready ") == "hl_monitor_ready 0.0"


async def test_readiness_follows_recovery_and_metrics_scrape_refreshes_the_gauge() -> None:
    async with serve() as s:
        s.view.nats_up = False
        async with s.http.get("/health/ready") as resp:
            assert resp.status == 503
        s.view.nats_up = True
        # No probe in between: the scrape itself must bring the gauge back to 1.
        assert await s.metric("hl_monitor_ready ") == "hl_monitor_ready 1.0"
        async with s.http.get("/health/ready") as resp:
            assert resp.status == 200


async def test_a_crashing_view_makes_readiness_503_not_500() -> None:
    async with serve() as s:
        s.view.broken = True
        async with s.http.get("/health/ready") as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["reasons"] == {"service": "readiness check failed: RuntimeError"}
        async with s.http.get("/health/live") as resp:
            assert resp.status == 200


async def test_status_returns_the_view_as_json_with_exact_decimals() -> None:
    async with serve() as s, s.http.get("/status") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["connections"][0] == {"id": "user-1", "state": "live", "subscriptions": 4, "feed_age": 1.5}
    assert body["budgets"] == {"users": {"used": 1, "capacity": 10}}
    assert body["notional"] == "12.3400"


async def test_metrics_serves_the_service_registry_and_process_metrics() -> None:
    async with serve() as s:
        s.metrics.outbox_depth.set(7)
        async with s.http.get("/metrics") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            text = await resp.text()
    assert "hl_monitor_outbox_depth 7.0" in text.splitlines()
    assert "# TYPE hl_monitor_signals_published_total counter" in text
    assert "process_resident_memory_bytes" in text
    assert "python_info" in text


async def test_unknown_path_and_wrong_method_are_json_errors() -> None:
    async with serve() as s:
        async with s.http.get("/nope") as resp:
            assert resp.status == 404
            assert await resp.json() == {"error": "Not Found"}
        async with s.http.post("/health/live") as resp:
            assert resp.status == 405
            assert "GET" in resp.headers["Allow"]


async def test_two_apps_on_one_metrics_object_do_not_clash() -> None:
    metrics = Metrics()
    cfg = HttpConfig(listen="127.0.0.1:0")
    create_app(FakeView(), metrics, None, cfg)
    create_app(FakeView(), metrics, None, cfg)  # collectors are registered once per registry


async def test_port_in_use_is_a_config_error_naming_http_listen() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = HttpConfig(listen=f"127.0.0.1:{port}")
        server = HttpServer(create_app(FakeView(), Metrics(), None, cfg), cfg.listen)
        with pytest.raises(ConfigError) as info:
            await server.start()
    assert info.value.key == "http.listen"
    with pytest.raises(RuntimeError):
        _ = server.port


# ---------------------------------------------------------------- admin: authentication


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_admin_routes_do_not_exist_without_a_token(method: str) -> None:
    async with serve(token=None) as s, s.http.request(method, "/admin/addresses", json=[{"address": WHALE}]) as resp:
        assert resp.status == 404


async def test_admin_routes_do_not_exist_without_an_admin_implementation() -> None:
    async with serve(with_admin=False) as s, s.http.get("/admin/addresses", headers=AUTH) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    ("headers", "challenge"),
    [
        ({}, 'Bearer realm="hl-monitor"'),
        ({"Authorization": "Bearer wrong-token"}, 'Bearer realm="hl-monitor", error="invalid_token"'),
        ({"Authorization": f"Basic {TOKEN}"}, 'Bearer realm="hl-monitor", error="invalid_token"'),
        ({"Authorization": f"Bearer {TOKEN}x"}, 'Bearer realm="hl-monitor", error="invalid_token"'),
    ],
    ids=["no-header", "wrong-token", "wrong-scheme", "token-prefix"],
)
async def test_admin_without_the_right_token_is_401_and_changes_nothing(
    headers: dict[str, str], challenge: str
) -> None:
    async with serve() as s:
        async with s.http.post("/admin/addresses", json={"address": WHALE}, headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == challenge
            assert await resp.json() == {"error": "missing or invalid bearer token"}
        assert s.admin.rows == {}
        assert await s.metric('hl_monitor_admin_requests_total{outcome="unauthorized"}') == (
            'hl_monitor_admin_requests_total{outcome="unauthorized"} 1.0'
        )


async def test_right_token_lists_addresses() -> None:
    async with serve() as s:
        await s.admin.add([AddressInput(address=WHALE, label="big")])
        async with s.http.get("/admin/addresses", headers=AUTH) as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body == {"addresses": [{"address": WHALE, "label": "big", "tier": "auto", "priority": 0, "is_active": True}]}


async def test_repeated_auth_failures_block_that_client_only() -> None:
    async with serve(auth_failures_per_minute=3) as s:
        for _ in range(3):
            async with s.http.get("/admin/addresses", headers={"Authorization": "Bearer guess"}) as resp:
                assert resp.status == 401
        # Blocked now, even with the right token: a guesser cannot tell a hit from a miss.
        async with s.http.get("/admin/addresses", headers=AUTH) as resp:
            assert resp.status == 429
            assert 0 < int(resp.headers["Retry-After"]) <= 60
        # Another client address on loopback is not affected.
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=connector) as other,
            other.get(f"http://127.0.0.1:{s.port}/admin/addresses", headers=AUTH) as resp,
        ):
            assert resp.status == 200


def test_limiter_unblocks_after_the_window() -> None:
    now = [1000.0]
    limiter = AuthFailureLimiter(limit=2, window=60.0, clock=lambda: now[0])
    limiter.record_failure("a")
    assert limiter.retry_after("a") is None
    now[0] += 10
    limiter.record_failure("a")
    assert limiter.retry_after("a") == pytest.approx(50.0)
    now[0] += 49
    assert limiter.retry_after("a") == pytest.approx(1.0)
    now[0] += 1
    assert limiter.retry_after("a") is None
    # The next failure counts against the newest stamps only: one old plus one new is the limit again.
    limiter.record_failure("a")
    assert limiter.retry_after("a") == pytest.approx(10.0)


def test_limiter_memory_is_bounded_and_evictions_counted() -> None:
    evicted: list[int] = []
    limiter = AuthFailureLimiter(limit=1, max_clients=3, clock=lambda: 0.0, on_evict=lambda: evicted.append(1))
    for client in ("a", "b", "c", "d", "e"):
        limiter.record_failure(client)
    assert len(limiter) == 3
    assert len(evicted) == 2
    assert limiter.retry_after("a") is None  # forgotten
    assert limiter.retry_after("e") is not None


# ---------------------------------------------------------------- admin: validation


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"address": "0x12"}, "$.address: '0x12' is not 0x followed by 40 hex digits"),
        ({"address": WHALE + "00"}, "is not 0x followed by 40 hex digits"),
        ([{"address": WHALE}, {"address": "zz"}], "$[1].address: 'zz' is not 0x followed by 40 hex digits"),
        ({"address": WHALE, "tier": "vip"}, "Invalid enum value 'vip' - at `$.tier`"),
        ({"address": WHALE, "priority": -1}, "Expected `int` >= 0 - at `$.priority`"),
        ({"address": WHALE, "priority": "high"}, "Expected `int | null`, got `str` - at `$.priority`"),
        ({"address": WHALE, "label": "x" * 65}, "$.label: longer than 64 characters"),
        ({"address": WHALE, "label": "evil\nline"}, "$.label: control characters are not allowed"),
        ({"address": WHALE, "lable": "typo"}, "unknown field `lable`"),
        ([], "Expected `array` of length >= 1"),
        ([{"address": WHALE}, {"address": WHALE.upper().replace("0X", "0x")}], "appears more than once"),
        ("0xabc", "Expected `object | array`, got `str`"),
        ({"address": WHALE, "min_notional_usd": -5}, "$.min_notional_usd: -5 is not a dollar amount of 0 or more"),
        ({"address": WHALE, "min_notional_usd": "NaN"}, "$.min_notional_usd: NaN is not a dollar amount"),
        ({"address": WHALE, "min_notional_usd": "lots"}, "Invalid decimal string - at `$.min_notional_usd`"),
        ([{"address": WHALE}, {"address": WHALE2, "deny_symbols": ["BTC,ETH"]}], "$[1].deny_symbols: 'BTC,ETH' is not"),
        ({"address": WHALE, "allow_symbols": "BTC"}, "got `str` - at `$.allow_symbols`"),
    ],
    ids=[
        "short-address",
        "long-address",
        "bad-address-in-bulk",
        "bad-tier",
        "negative-priority",
        "string-priority",
        "long-label",
        "control-char-label",
        "unknown-field",
        "empty-list",
        "duplicate-in-bulk",
        "not-an-object",
        "negative-floor",
        "nan-floor",
        "text-floor",
        "comma-in-symbol",
        "symbols-not-a-list",
    ],
)
async def test_invalid_add_is_400_with_a_clear_message(body: Any, message: str) -> None:
    async with serve() as s:
        async with s.http.post("/admin/addresses", json=body, headers=AUTH) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert message in error
        assert s.admin.rows == {}


async def test_malformed_or_empty_json_is_400() -> None:
    async with serve() as s:
        async with s.http.post("/admin/addresses", data=b"{not json", headers=AUTH) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"].startswith("request body is not valid JSON")
        async with s.http.post("/admin/addresses", data=b"", headers=AUTH) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "request body is empty; expected JSON"


async def test_oversized_body_is_413_whether_declared_or_streamed() -> None:
    async with serve(max_body_bytes=1024) as s:
        big = b'[{"address": "' + WHALE.encode() + b'", "label": "' + b"x" * 2000 + b'"}]'
        async with s.http.post("/admin/addresses", data=big, headers=AUTH) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "request body larger than 1024 bytes"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: aiohttp's own limit must catch it
            for _ in range(4):
                yield b" " * 512

        async with s.http.post("/admin/addresses", data=chunks(), headers=AUTH) as resp:
            assert resp.status == 413
        assert s.admin.rows == {}


async def test_bad_address_in_path_is_400() -> None:
    async with serve() as s:
        async with s.http.delete("/admin/addresses/0xnothex", headers=AUTH) as resp:
            assert resp.status == 400
            assert "is not 0x followed by 40 hex digits" in (await resp.json())["error"]
        async with s.http.patch("/admin/addresses/0x1", json={"tier": "wide"}, headers=AUTH) as resp:
            assert resp.status == 400


# ---------------------------------------------------------------- admin: changes and audit


async def test_add_normalises_and_audits_each_change() -> None:
    async with serve() as s:
        mixed = "0x" + "AbCd" * 10
        with capture_logs() as logs:
            async with s.http.post(
                "/admin/addresses", json={"address": mixed, "label": "whale", "tier": "precise"}, headers=AUTH
            ) as resp:
                assert resp.status == 200
                assert await resp.json() == {"written": 1, "addresses": [mixed.lower()]}
        assert s.admin.rows[mixed.lower()]["tier"] == "precise"
        audit = [e for e in logs if e["event"] == "admin change"]
        assert audit == [
            {
                "event": "admin change",
                "log_level": "info",
                "action": "add",
                "client": "127.0.0.1",
                "count": 1,
                "addresses": [mixed.lower()],
                "truncated": False,
            }
        ]


async def test_bulk_import_then_patch_then_delete() -> None:
    async with serve() as s:
        bulk = [
            {"address": WHALE, "label": "a", "priority": 5},
            {"address": WHALE2, "tier": "wide"},
            {"address": WHALE3, "is_active": False},
        ]
        async with s.http.post("/admin/addresses", json=bulk, headers=AUTH) as resp:
            assert resp.status == 200
            assert (await resp.json())["written"] == 3
        assert sorted(s.admin.rows) == sorted([WHALE, WHALE2, WHALE3])

        with capture_logs() as logs:
            async with s.http.patch(
                f"/admin/addresses/{WHALE.upper().replace('0X', '0x')}",
                json={"label": "renamed", "tier": "precise", "priority": 9},
                headers=AUTH,
            ) as resp:
                assert resp.status == 200
                row = await resp.json()
        assert row == {"address": WHALE, "label": "renamed", "tier": "precise", "priority": 9, "is_active": True}
        assert [(e["action"], e["label"], e["tier"], e["priority"]) for e in logs if e["event"] == "admin change"] == [
            ("update", "renamed", "precise", 9)
        ]

        async with s.http.delete(f"/admin/addresses/{WHALE2}", headers=AUTH) as resp:
            assert resp.status == 200
            assert await resp.json() == {"removed": 1}
        async with s.http.delete(f"/admin/addresses/{WHALE2}", headers=AUTH) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == f"{WHALE2} is not watched"

        async with s.http.delete("/admin/addresses", json={"addresses": [WHALE, WHALE3, WHALE2]}, headers=AUTH) as resp:
            assert resp.status == 200
            assert await resp.json() == {"removed": 2}
        async with s.http.get("/admin/addresses", headers=AUTH) as resp:
            assert await resp.json() == {"addresses": []}


async def test_filters_are_normalised_before_they_reach_the_address_book() -> None:
    async with serve() as s:
        body = {"address": WHALE, "min_notional_usd": 2500, "allow_symbols": [" BTC", "btc", "", "xyz:XYZ100"]}
        async with s.http.post("/admin/addresses", json=body, headers=AUTH) as resp:
            assert resp.status == 200
        row = s.admin.rows[WHALE]
        assert (row["min_notional_usd"], row["allow_symbols"]) == (Decimal(2500), ("BTC", "xyz:XYZ100"))
        with capture_logs() as logs:
            async with s.http.patch(
                f"/admin/addresses/{WHALE}", json={"deny_symbols": ["ETH"], "min_notional_usd": "0.5"}, headers=AUTH
            ) as resp:
                assert resp.status == 200
        assert (s.admin.rows[WHALE]["deny_symbols"], s.admin.rows[WHALE]["min_notional_usd"]) == (
            ("ETH",),
            Decimal("0.5"),
        )
        (audit,) = [e for e in logs if e["event"] == "admin change"]
        assert (audit["deny_symbols"], audit["min_notional_usd"]) == (("ETH",), "0.5")


async def test_patch_needs_a_change_and_a_known_address() -> None:
    async with serve() as s:
        await s.admin.add([AddressInput(address=WHALE)])
        async with s.http.patch(f"/admin/addresses/{WHALE}", json={}, headers=AUTH) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"].startswith("nothing to change")
        async with s.http.patch(f"/admin/addresses/{WHALE2}", json={"tier": "wide"}, headers=AUTH) as resp:
            assert resp.status == 404
        async with s.http.patch(f"/admin/addresses/{WHALE}", json={"tier": "gold"}, headers=AUTH) as resp:
            assert resp.status == 400
        async with s.http.patch(f"/admin/addresses/{WHALE}", json={"is_active": False}, headers=AUTH) as resp:
            assert resp.status == 200
            assert (await resp.json())["is_active"] is False


async def test_database_outage_is_503_and_counted() -> None:
    async with serve() as s:
        s.admin.db_down = True
        async with s.http.post("/admin/addresses", json={"address": WHALE}, headers=AUTH) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == "database unavailable: connection refused"
        assert await s.metric('hl_monitor_admin_requests_total{outcome="unavailable"}') == (
            'hl_monitor_admin_requests_total{outcome="unavailable"} 1.0'
        )
