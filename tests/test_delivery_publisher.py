"""Publisher against a real nats-server: subjects, dedup by Nats-Msg-Id, stream settings, legacy payload, auth, TLS.

Also holds the helpers the other delivery tests import (`make_signal`, `read_stream`, `nats_cfg`, `wait_until`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal as os_signal
import subprocess
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import RetentionPolicy

from hl_monitor.config import NatsConfig, Secret, SignalsConfig
from hl_monitor.delivery.publisher import Publisher, signal_subject, subject_token
from hl_monitor.domain.signal import LEGACY_KEYS, decode_signal
from hl_monitor.errors import ConfigError, DeliveryError, PublishError
from hl_monitor.metrics import Metrics
from tests.support import nats_auth
from tests.support.delivery import ADDRESS, freeze, make_signal, nats_cfg
from tests.support.metrics import metric_value
from tests.support.nats import NatsServer, nats_server_binary, read_stream
from tests.support.net import free_port
from tests.support.waiting import wait_until


async def received(sub: Subscription, quiet: float = 0.3) -> list[Msg]:
    """Every message the core subscription got, once nothing more arrived for `quiet` seconds."""
    out = []
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            out.append(await sub.next_msg(timeout=quiet))
    return out


async def connected_publisher(url: str, cfg: NatsConfig | None = None, **signals: Any) -> tuple[Publisher, Metrics]:
    metrics = Metrics()
    publisher = Publisher(cfg or nats_cfg(), SignalsConfig(**signals), metrics, url=url)
    await publisher.connect(wait=5)
    await publisher.ensure_stream()
    return publisher, metrics


@contextlib.asynccontextmanager
async def nats_with(tmp_path: Path, *extra: str) -> AsyncIterator[str]:
    """A nats-server with extra command-line options (auth, TLS); yields its client URL (host:port)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *[nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "extra"), *extra],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            except OSError:
                assert proc.returncode is None, "nats-server exited at start"
                assert time.monotonic() < deadline, "nats-server did not start"
                await asyncio.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        await proc.wait()


# ---- subjects ----


@pytest.mark.parametrize(
    ("value", "token"),
    [
        pytest.param("BTCUSDC", "BTCUSDC", id="plain"),
        pytest.param("xyz:XYZ100", "xyz:XYZ100", id="hip3-prefix"),
        pytest.param("PURR/USDC", "PURR/USDC", id="slash-pair"),
        pytest.param("@107", "@107", id="spot-index"),
        pytest.param("PUMP-26USDC", "PUMP-26USDC", id="dash"),
        pytest.param("A.B", "A%2EB", id="dot"),
        pytest.param("a b\tc", "a%20b%09c", id="whitespace"),
        pytest.param("*>", "%2A%3E", id="wildcards"),
        pytest.param("50%", "50%25", id="percent-is-escaped-for-reversibility"),
        pytest.param("ü", "%C3%BC", id="utf8-bytes"),
        pytest.param("", "_", id="empty"),
    ],
)
def test_subject_token_is_a_single_safe_token(value: str, token: str) -> None:
    """Symbols become one NATS token: forbidden characters are %-escaped, common symbol forms stay readable."""
    assert subject_token(value) == token


def test_signal_subject_lets_consumers_filter_by_address_symbol_direction_side() -> None:
    signal = make_signal(symbol="xyz:XYZ.100")
    assert signal_subject("hl.signals", signal) == f"hl.signals.{ADDRESS}.xyz:XYZ%2E100.close.SHORT"


@pytest.mark.parametrize(
    ("key", "value"), [("subject_prefix", "hl.*"), ("subject_prefix", "hl..x"), ("legacy_subject", "a >")]
)
def test_bad_subjects_are_config_errors(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Publisher(NatsConfig(), msgspec.structs.replace(SignalsConfig(), **{key: value}), Metrics(), url="nats://x:1")
    assert err.value.key == f"signals.{key}"


# ---- publish and dedup ----


async def test_publish_stores_each_signal_id_once_with_exact_payload(nats_server: NatsServer) -> None:
    """The same signal published twice is stored once; the second ack says duplicate; decimals stay exact."""
    publisher, metrics = await connected_publisher(nats_server.url)
    signal = make_signal()
    try:
        first = await publisher.publish(signal)
        second = await publisher.publish(signal)
    finally:
        await publisher.close()
    assert not first.duplicate
    assert second.duplicate
    assert second.seq == first.seq
    [(subject, msg_id, payload)] = await read_stream(nats_server.url)
    assert subject == signal_subject("hl.signals", signal)
    assert msg_id == signal.signal_id
    assert decode_signal(payload) == signal
    assert b'"size":1.000000000000000001' in payload
    assert metric_value(metrics, "signals_published_total", side="SHORT", symbol="BTCUSDC") == 1
    assert metric_value(metrics, "publish_duplicates_total") == 1
    assert metric_value(metrics, "signal_to_ack_seconds_count") == 1


async def test_stream_is_created_with_configured_settings_and_updated_when_they_change(
    nats_server: NatsServer,
) -> None:
    cfg = nats_cfg(stream="SIGS_T", duplicate_window=300.0, max_age=3600.0, max_bytes=10_000_000, retention="interest")
    publisher, _ = await connected_publisher(nats_server.url, cfg, subject_prefix="whales.sig")
    try:
        info = await publisher.ensure_stream()
        assert info.config.name == "SIGS_T"
        assert info.config.subjects == ["whales.sig.>"]  # the legacy subject is core NATS only
        assert info.config.duplicate_window == 300.0
        assert info.config.max_age == 3600.0
        assert info.config.max_bytes == 10_000_000
        assert info.config.retention == RetentionPolicy.INTEREST
    finally:
        await publisher.close()
    longer = nats_cfg(
        stream="SIGS_T", duplicate_window=900.0, max_age=3600.0, max_bytes=10_000_000, retention="interest"
    )
    publisher, _ = await connected_publisher(nats_server.url, longer, subject_prefix="whales.sig")
    try:
        assert (await publisher.ensure_stream()).config.duplicate_window == 900.0
    finally:
        await publisher.close()


async def test_duplicate_window_longer_than_max_age_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        Publisher(NatsConfig(duplicate_window=7200.0, max_age=60.0), SignalsConfig(), Metrics(), url="nats://x:1")
    assert err.value.key == "nats.duplicate_window"


async def test_legacy_subject_gets_the_old_eleven_keys_once(nats_server: NatsServer) -> None:
    """Old consumers (core NATS on hl_address_signal) get the flat payload, once, even when re-published."""
    listener = await nats.connect(nats_server.url)
    sub = await listener.subscribe("hl_address_signal")
    await listener.flush()
    publisher, _ = await connected_publisher(nats_server.url)
    signal = make_signal()
    try:
        await publisher.publish(signal)
        await publisher.publish(signal)
        await publisher.publish(make_signal(1))
    finally:
        await publisher.close()
    got = await received(sub)
    await listener.close()
    assert len(got) == 2
    first = json.loads(got[0].data, parse_float=Decimal)
    assert tuple(first) == LEGACY_KEYS
    assert first["size"] == Decimal("1.000000000000000001")
    assert first["timestamp"] == signal.timestamp
    assert first["side"] == "SHORT"
    assert first["direction"] == "close"
    assert len(await read_stream(nats_server.url)) == 2  # legacy copies are not stored in the stream


async def test_legacy_disabled_sends_nothing_there(nats_server: NatsServer) -> None:
    listener = await nats.connect(nats_server.url)
    sub = await listener.subscribe("hl_address_signal")
    await listener.flush()
    publisher, _ = await connected_publisher(nats_server.url, legacy_enabled=False)
    try:
        await publisher.publish(make_signal())
    finally:
        await publisher.close()
    assert await received(sub) == []
    await listener.close()
    assert len(await read_stream(nats_server.url)) == 1


async def test_publish_with_unknown_outcome_still_sends_legacy_once(nats_server: NatsServer) -> None:
    """A publish that timed out (server frozen) but was stored: the retry is a duplicate and sends the legacy copy."""
    assert nats_server.proc is not None
    listener = await nats.connect(nats_server.url)
    publisher, metrics = await connected_publisher(nats_server.url, nats_cfg(publish_timeout=0.3))
    try:
        sub = await listener.subscribe("hl_address_signal")
        await listener.flush()
        signal = make_signal()
        freeze(nats_server.proc.pid)
        try:
            with pytest.raises(PublishError) as err:
                await publisher.publish(signal)
            assert err.value.reason == "timeout"
        finally:
            os.kill(nats_server.proc.pid, os_signal.SIGCONT)
        ack = await publisher.publish(signal)
        assert ack.duplicate  # the frozen server stored the first attempt once it resumed
        assert len(await received(sub)) == 1
    finally:
        await publisher.close()
        await listener.close()
    assert metric_value(metrics, "publish_errors_total", reason="timeout") == 1
    assert [m[1] for m in await read_stream(nats_server.url)] == [signal.signal_id]


# ---- connection state ----


async def test_connected_gauge_is_zero_while_reconnecting(nats_server: NatsServer) -> None:
    """The old service reported NATS up while reconnecting; here the gauge and is_connected drop at once."""
    publisher, metrics = await connected_publisher(nats_server.url)

    def up() -> bool:
        return publisher.is_connected

    try:
        assert up()
        assert metric_value(metrics, "nats_connected") == 1
        await asyncio.to_thread(nats_server.stop)
        await wait_until(lambda: metric_value(metrics, "nats_connected") == 0, what="gauge 0")
        assert not up()
        with pytest.raises(PublishError) as err:
            await publisher.publish(make_signal())
        assert err.value.reason == "disconnected"
        await asyncio.to_thread(nats_server.start)
        await wait_until(up, what="reconnect")
        assert metric_value(metrics, "nats_connected") == 1
        assert not (await publisher.publish(make_signal())).duplicate
    finally:
        await publisher.close()
    assert metric_value(metrics, "nats_connected") == 0
    assert not up()


async def test_stream_is_recreated_after_the_server_lost_its_store(nats_server: NatsServer) -> None:
    publisher, metrics = await connected_publisher(nats_server.url)
    try:
        await publisher.publish(make_signal(0))
        await asyncio.to_thread(nats_server.stop)
        shutil.rmtree(nats_server.store)
        await asyncio.to_thread(nats_server.start)
        await wait_until(lambda: publisher.is_connected, what="reconnect")
        reasons = []
        for _ in range(5):
            try:
                assert not (await publisher.publish(make_signal(1))).duplicate
                break
            except PublishError as exc:
                reasons.append(exc.reason)  # the first request right after a reconnect may also time out
    finally:
        await publisher.close()
    assert "no_stream" in reasons
    assert [m[1] for m in await read_stream(nats_server.url)] == [make_signal(1).signal_id]
    assert metric_value(metrics, "publish_errors_total", reason="no_stream") == 1


async def test_unreachable_server_gives_up_after_wait() -> None:
    publisher = Publisher(nats_cfg(), SignalsConfig(), Metrics(), url=f"nats://127.0.0.1:{free_port()}")
    with pytest.raises(DeliveryError, match=r"unreachable for 0\.5 s"):
        await publisher.connect(wait=0.5)


# ---- auth and TLS ----


@pytest.mark.parametrize(
    ("server_args", "good", "bad"),
    [
        pytest.param(("--auth", "s3cret"), {"token": Secret("s3cret")}, {"token": Secret("nope")}, id="token"),
        pytest.param(
            ("--user", "hl", "--pass", "pw1"),
            {"user": Secret("hl"), "password": Secret("pw1")},
            {"user": Secret("hl"), "password": Secret("wrong")},
            id="user-password",
        ),
    ],
)
async def test_auth_from_secrets_and_wrong_credentials_fail_fast(
    tmp_path: Path, server_args: tuple[str, ...], good: dict[str, Secret], bad: dict[str, Secret]
) -> None:
    """Credentials come from the (env-only) secrets; wrong ones are a clear DeliveryError, not an endless retry."""
    async with nats_with(tmp_path, *server_args) as hostport:
        publisher, _ = await connected_publisher(f"nats://{hostport}", nats_cfg(**good))
        try:
            assert not (await publisher.publish(make_signal())).duplicate
        finally:
            await publisher.close()
        refused = Publisher(nats_cfg(**bad), SignalsConfig(), Metrics(), url=f"nats://{hostport}")
        started = time.monotonic()
        with pytest.raises(DeliveryError, match=r"refused the connection: .*[Aa]uthorization"):
            await refused.connect(wait=10)
        assert time.monotonic() - started < 5


async def test_nkey_seed_auth_and_an_unknown_key_is_refused(tmp_path: Path) -> None:
    config, seed = nats_auth.nkey_user_config(tmp_path)
    async with nats_with(tmp_path, "-c", str(config)) as hostport:
        publisher, _ = await connected_publisher(f"nats://{hostport}", nats_cfg(nkey_seed=Secret(str(seed))))
        try:
            assert not (await publisher.publish(make_signal())).duplicate
        finally:
            await publisher.close()
        (tmp_path / "other").mkdir()
        _, other = nats_auth.nkey_user_config(tmp_path / "other")  # a key the server was not told about
        refused = Publisher(
            nats_cfg(nkey_seed=Secret(str(other))), SignalsConfig(), Metrics(), url=f"nats://{hostport}"
        )
        with pytest.raises(DeliveryError, match=r"refused the connection: .*[Aa]uthorization"):
            await refused.connect(wait=10)


async def test_creds_file_auth_against_an_operator_mode_server_with_jetstream(tmp_path: Path) -> None:
    """Decentralised auth as on Synadia Cloud: operator → account (JetStream enabled) → user JWT in a .creds file."""
    setup = nats_auth.operator_setup(tmp_path)
    async with nats_with(tmp_path, "-c", str(setup.config)) as hostport:
        publisher, _ = await connected_publisher(f"nats://{hostport}", nats_cfg(creds=Secret(str(setup.creds))))
        try:
            assert not (await publisher.publish(make_signal())).duplicate
            assert (await publisher.publish(make_signal())).duplicate  # JetStream dedup works in the account
        finally:
            await publisher.close()
        cfg = nats_cfg(creds=Secret(str(setup.foreign_creds)))
        refused = Publisher(cfg, SignalsConfig(), Metrics(), url=f"nats://{hostport}")
        with pytest.raises(DeliveryError, match=r"refused the connection: .*[Aa]uthorization"):
            await refused.connect(wait=10)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, via the openssl CLI."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
             "-subj", "/CN=test-ca", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
                 "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))  # fmt: skip


async def test_mutual_tls_with_a_local_ca(tmp_path: Path) -> None:
    """tls_ca verifies the server, tls_cert/tls_key authenticate us; an untrusted server is a clear DeliveryError."""
    pki = tmp_path / "pki"
    pki.mkdir()
    await asyncio.to_thread(_make_pki, pki)
    args = ("--tlsverify", "--tlscert", str(pki / "server.pem"), "--tlskey", str(pki / "server.key"),
            "--tlscacert", str(pki / "ca.pem"))  # fmt: skip
    async with nats_with(tmp_path, *args) as hostport:
        cfg = nats_cfg(tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key"))
        publisher, _ = await connected_publisher(f"tls://{hostport}", cfg)
        try:
            assert not (await publisher.publish(make_signal())).duplicate
        finally:
            await publisher.close()
        other = tmp_path / "other"
        other.mkdir()
        await asyncio.to_thread(_make_pki, other)
        untrusting = Publisher(
            nats_cfg(tls_ca=str(other / "ca.pem"), tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key")),
            SignalsConfig(),
            Metrics(),
            url=f"tls://{hostport}",
        )
        with pytest.raises(DeliveryError, match=r"refused the connection: .*CERTIFICATE_VERIFY_FAILED"):
            await untrusting.connect(wait=10)


async def test_bad_tls_and_creds_files_are_config_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as err:
        await Publisher(nats_cfg(tls_ca=missing), SignalsConfig(), Metrics(), url="tls://127.0.0.1:1").connect(wait=1)
    assert err.value.key == "nats.tls_ca"
    with pytest.raises(ConfigError) as err:
        await Publisher(nats_cfg(creds=Secret(missing)), SignalsConfig(), Metrics(), url="nats://127.0.0.1:1").connect(
            wait=1
        )
    assert err.value.key == "nats.creds"
    not_a_seed = tmp_path / "seed.txt"
    not_a_seed.write_text("hunter2\n")
    with pytest.raises(ConfigError) as err:
        await Publisher(
            nats_cfg(nkey_seed=Secret(str(not_a_seed))), SignalsConfig(), Metrics(), url="nats://127.0.0.1:1"
        ).connect(wait=1)
    assert err.value.key == "nats.nkey_seed"
    assert "hunter2" not in str(err.value)
