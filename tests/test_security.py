"""Security properties of a real run: secrets stay secret, auth and TLS work, input is bounded and never SQL.

- A service subprocess runs with distinctive secrets (admin token, MariaDB password of a user created for the
  test, NATS token of a nats-server started with `--auth`); everything it printed and every HTTP answer it gave
  (health, status, metrics, admin errors, 401/404/413/429) and `check-config` are grepped for them.
- The admin API: the token is required and repeated failures are rate limited (429).
- NATS over TLS with a CA made here with the `openssl` CLI; a service that does not trust the CA refuses to start.
- MySQL TLS is configurable: with `database.tls_ca` the client demands TLS (the local server has none).
- `hyperliquid.max_frame_bytes`: a too-big frame is refused and counted, the connection recovers, nothing lost.
- SQL-injection-shaped labels are stored verbatim (bound parameters), injection-shaped addresses rejected.
The container's non-root user is checked in tests/test_deploy.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from hl_monitor.app import Service
from hl_monitor.chaos.env import ChaosEnv, ChaosOptions, stream_signals
from hl_monitor.chaos.procs import NatsProcess
from hl_monitor.config import load_config
from hl_monitor.errors import HlMonitorError
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.storage.migrate import upgrade
from hl_monitor.storage.repository import Repository, create_blocking_engine, create_engine
from tests.support.ledger import expected_orders, observed_orders
from tests.support.service import W1, W2, live, running, service_config
from tests.support.waiting import wait_until

INJECTION_LABEL = "x'); DROP TABLE hlm_signals; -- \" OR 1=1 /* ` \\"
NEW_WHALE = "0x" + "e3" * 20


def _secrets() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {
        "admin token": f"AdminTok-{tag}-Zq9",
        "db password": f"DbPw-{tag}-Xk7",
        "nats token": f"NatsTok-{tag}-Wm3",
        "wrong db password": f"BadDbPw-{tag}-Qv5",
        "wrong nats token": f"BadNatsTok-{tag}-Rj8",
    }


async def _request(
    method: str, url: str, *, token: str | None = None, data: bytes | None = None, json: Any = None
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, data=data, json=json) as resp,
    ):
        return resp.status, await resp.text()


@pytest.mark.slow
@pytest.mark.mariadb
@pytest.mark.timeout(90)
async def test_secrets_never_appear_in_logs_status_metrics_or_errors(mariadb_url: str, tmp_path: Path) -> None:
    secrets = _secrets()
    user = f"hlm_sec_{uuid.uuid4().hex[:8]}"
    opts = ChaosOptions(quick=True, db="mariadb", mysql_url=mariadb_url)
    nats_token = secrets["nats token"]
    async with ChaosEnv(opts, tmp_path, nats_args=("--auth", nats_token), nats_options={"token": nats_token}) as env:
        db_url = sa.make_url(env.db_url)
        admin = create_async_engine(mariadb_url)
        try:
            async with admin.begin() as conn:
                await conn.execute(sa.text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{secrets['db password']}'"))
                await conn.execute(sa.text(f"GRANT ALL ON `{db_url.database}`.* TO '{user}'@'%'"))
            svc = env.svc
            svc.env.update(
                {
                    "HL_MONITOR__DATABASE__URL": db_url.set(username=user, password=None).render_as_string(),
                    "HL_MONITOR__DATABASE__PASSWORD": secrets["db password"],
                    "HL_MONITOR__NATS__TOKEN": nats_token,
                    "HL_MONITOR__HTTP__ADMIN_TOKEN": secrets["admin token"],
                    "HL_MONITOR__HTTP__AUTH_FAILURES_PER_MINUTE": "3",
                    "HL_MONITOR__LOG__LEVEL": "debug",
                }
            )
            answers: list[str] = []
            await env.start_service()
            base = svc.base_url + "/admin/addresses"
            async with env.trading():
                for path in ("/health", "/health/ready", "/status", "/metrics", "/nope"):
                    answers.append((await _request("GET", svc.base_url + path))[1])
                # The admin API needs the token; guesses are rate limited.
                statuses = []
                for guess in (None, "wrong", secrets["admin token"][:-1], "x" * 500):
                    status, text = await _request("GET", base, token=guess)
                    statuses.append(status)
                    answers.append(text)
                assert statuses[:3] == [401, 401, 401]
                assert statuses[3] == 429
                # Oversized and malformed bodies with the right token (from another client key: same IP, so
                # wait out nothing: a success does not count as a failure, but the IP is blocked for now).
                await asyncio.sleep(0)
                # Errors that carry database and NATS context: cut both for a moment.
                assert env.relay is not None
                await env.relay.stop()
                await asyncio.to_thread(env.nats.stop, kill=True)

                async def database_reason_shown() -> bool:
                    """Readiness quotes the driver's error once the database probe (every 5 s) has failed."""
                    return '"database"' in (await _request("GET", svc.base_url + "/health/ready"))[1]

                await wait_until(database_reason_shown, 30, "readiness naming the database", poll=0.1)
                for path in ("/health", "/health/ready", "/status", "/metrics"):
                    answers.append((await _request("GET", svc.base_url + path))[1])
                await env.relay.start()
                await asyncio.to_thread(env.nats.start)
                await svc.wait_ready(30)
            verdict = await env.finish()
            assert verdict.ok, verdict.problems
            check = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "hl_monitor", "check-config"],
                env={**os.environ, **svc.env},
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert check.returncode == 0, check.stderr
            # Start-up failures print the error: a wrong database password, then a wrong NATS token.
            wrong_db = {
                **svc.env,
                "HL_MONITOR__DATABASE__PASSWORD": secrets["wrong db password"],
                "HL_MONITOR__SERVICE__DATA_DIR": str(tmp_path / "wrong-db"),
            }
            wrong_nats = {
                **svc.env,
                "HL_MONITOR__NATS__TOKEN": secrets["wrong nats token"],
                "HL_MONITOR__SERVICE__DATA_DIR": str(tmp_path / "wrong-nats"),
            }
            failures = await asyncio.gather(
                *(
                    asyncio.to_thread(
                        subprocess.run,
                        [sys.executable, "-m", "hl_monitor", "run"],
                        env={**os.environ, **bad},
                        cwd=tmp_path,
                        capture_output=True,
                        text=True,
                        timeout=45,
                    )
                    for bad in (wrong_db, wrong_nats)
                )
            )
            assert [f.returncode for f in failures] == [1, 1], [f.stderr[-500:] for f in failures]
            assert "Access denied" in failures[0].stderr
            assert "uthorization" in failures[1].stderr
        finally:
            async with admin.begin() as conn:
                await conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'%'"))
            await admin.dispose()
        outputs = {
            "service log": svc.log_text(),
            "check-config": check.stdout + check.stderr,
            "wrong db password run": failures[0].stdout + failures[0].stderr,
            "wrong nats token run": failures[1].stdout + failures[1].stderr,
            **{f"http answer {i}": text for i, text in enumerate(answers)},
        }
    assert "database" in "".join(answers)  # the outage was reported: the grep covered error texts too
    assert len(outputs["service log"]) > 10_000  # debug logs of a whole run, not an empty file
    for name, secret in secrets.items():
        leaks = [where for where, text in outputs.items() if secret in text]
        assert not leaks, f"{name} appears in {leaks}"


@pytest.mark.slow
async def test_admin_api_stores_injection_shaped_labels_verbatim_and_rejects_bad_addresses(
    nats_server: Any, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(db_url)
    token = "t0ken-" + uuid.uuid4().hex
    async with SimServer(SimConfig(clearinghouse_push_interval=0.3)) as sim:
        cfg = service_config(sim, nats_server.url, db_url, tmp_path / "data", HTTP__ADMIN_TOKEN=token)
        async with running(cfg):
            url = f"http://{cfg.http.listen}/admin/addresses"
            status, text = await _request(
                "POST", url, token=token, json={"address": NEW_WHALE, "label": INJECTION_LABEL}
            )
            assert status in (200, 201), text
            for bad in ("0x'; DROP TABLE hlm_addresses; --", NEW_WHALE + "' OR '1'='1", "0x" + "g" * 40):
                status, text = await _request("POST", url, token=token, json={"address": bad})
                assert status == 400, (bad, text)
            status, text = await _request("DELETE", f"{url}/0x' OR 1=1 --", token=token)
            assert status == 400, text
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "hl_monitor", "addresses", "add", W2, "--label", INJECTION_LABEL],
        env={**os.environ, "HL_MONITOR__DATABASE__URL": db_url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            rows: dict[str, str | None] = dict(
                (await conn.execute(sa.text("SELECT address, label FROM hlm_addresses"))).all()
            )
            tables = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    assert rows[NEW_WHALE] == INJECTION_LABEL
    assert rows[W2] == INJECTION_LABEL
    assert {"hlm_signals", "hlm_addresses"} <= tables


# ------------------------------------------------------------------------------------- TLS


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def local_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    d = tmp_path_factory.mktemp("ca")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hl-monitor test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))  # fmt: skip
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.cnf"),
             "-out", str(d / "server.pem"))  # fmt: skip
    return d


@pytest.fixture
def tls_nats(local_ca: Path, tmp_path: Path) -> Iterator[NatsProcess]:
    args = ("--tls", "--tlscert", str(local_ca / "server.pem"), "--tlskey", str(local_ca / "server.key"))
    server = NatsProcess(tmp_path / "nats", extra_args=args, scheme="tls")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
async def test_nats_tls_with_a_local_ca(tls_nats: NatsProcess, local_ca: Path, tmp_path: Path) -> None:
    """With `nats.tls_ca` the service publishes over TLS; without trusting the CA it refuses to start."""
    import ssl

    db_url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(db_url)
    async with SimServer(SimConfig(clearinghouse_push_interval=0.3)) as sim:
        untrusted = service_config(sim, tls_nats.url, db_url, tmp_path / "d0")
        with pytest.raises(HlMonitorError, match=r"(?i)certificate|tls|ssl"):
            await asyncio.wait_for(Service(untrusted).run(asyncio.Event()), 30)
        cfg = service_config(sim, tls_nats.url, db_url, tmp_path / "d1", NATS__TLS_CA=str(local_ca / "ca.pem"))
        async with running(cfg) as service:
            await live(service, W1)
            await sim.exchange.whale(W1).market_order("BTC", True, "0.5", "80000", fills=2)
            await wait_until(lambda: _published(service) >= 1, within=15)
    context = ssl.create_default_context(cafile=str(local_ca / "ca.pem"))
    stored = await stream_signals(tls_nats.url, tls=context)
    assert observed_orders([sig for _, sig in stored]) == expected_orders(sim, W1)


def _published(service: Service) -> float:
    return sum(
        s.value
        for m in service.metrics.registry.collect()
        if m.name == "hl_monitor_signals_published"
        for s in m.samples
        if s.name.endswith("_total")
    )


@pytest.mark.mariadb
async def test_mysql_tls_is_configurable(mariadb_url: str, local_ca: Path) -> None:
    """`database.tls_ca` makes the client demand TLS: against this server (TLS off) it fails rather than fall back."""
    plain = load_config(None, environ={"HL_MONITOR__DATABASE__URL": mariadb_url})
    engine = create_engine(plain)
    try:
        await Repository(engine).ping()
    finally:
        await engine.dispose()
    tls = load_config(
        None,
        environ={"HL_MONITOR__DATABASE__URL": mariadb_url, "HL_MONITOR__DATABASE__TLS_CA": str(local_ca / "ca.pem")},
    )
    engine = create_engine(tls)
    try:
        with pytest.raises(Exception, match="does not offer TLS"):
            await Repository(engine).ping()
    finally:
        await engine.dispose()
    # The batch writer's own blocking connection (storage/writer.py) demands it the same way.
    blocking = create_blocking_engine(sa.make_url(tls.database_url()), tls.database)
    try:
        with pytest.raises(Exception, match="does not offer TLS"):
            await asyncio.to_thread(lambda: blocking.connect().close())
    finally:
        blocking.dispose()


# ------------------------------------------------------------------------------------- frame size bound


@pytest.mark.slow
async def test_too_big_frame_is_refused_counted_and_the_connection_recovers(nats_server: Any, tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(db_url)
    limit = 64 * 1024
    # Small snapshots: the resubscribe's snapshot must fit, the big order comes back through REST backfill.
    async with SimServer(SimConfig(clearinghouse_push_interval=0.3, fills_snapshot_size=5)) as sim:
        cfg = service_config(sim, nats_server.url, db_url, tmp_path / "data", HYPERLIQUID__MAX_FRAME_BYTES=str(limit))
        async with running(cfg) as service:
            await live(service, W1, W2)
            whale = sim.exchange.whale(W1)
            await whale.market_order("ETH", True, "40", "2300", fills=400, px_step="0.01")  # one ~140 KB frame
            await whale.market_order("SOL", False, "3", "95", fills=2)
            await wait_until(lambda: _published(service) >= 2, within=20)
            too_big = service.metrics.registry.get_sample_value(
                "hl_monitor_frame_decode_errors_total", {"kind": "too_big"}
            )
            reconnects = service.metrics.registry.get_sample_value(
                "hl_monitor_reconnects_total", {"kind": "user", "reason": "frame_too_big"}
            )
            await live(service, W1, W2)
    assert (too_big or 0) >= 1
    assert (reconnects or 0) >= 1
    stored = await stream_signals(nats_server.url)
    assert observed_orders([sig for _, sig in stored]) == expected_orders(sim, W1)
