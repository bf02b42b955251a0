"""Process safety: one instance per data dir (even after kill -9), healthcheck exit codes, loop watchdog."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from aiohttp import web

from hl_monitor.errors import InstanceLockedError
from hl_monitor.metrics import Metrics
from hl_monitor.ops.healthcheck import check, default_url
from hl_monitor.ops.process import InstanceLock, LoopWatchdog
from tests.support.net import free_port

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hl_monitor.ops.process import InstanceLock
    lock = InstanceLock(Path(sys.argv[1]), "x")
    lock.acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_second_holder_of_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    """Two processes with one data directory cannot both run; the refusal names the holder."""
    first = InstanceLock(tmp_path, "a")
    first.acquire()
    try:
        with pytest.raises(InstanceLockedError) as info:
            InstanceLock(tmp_path, "a").acquire()
        assert f"pid {os.getpid()}" in info.value.holder
    finally:
        first.release()
    with InstanceLock(tmp_path, "a"):  # released → free again
        pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    """kill -9 of the holder frees the lock at once (the kernel drops flocks of dead processes)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(InstanceLockedError):
            InstanceLock(tmp_path, "b").acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with InstanceLock(tmp_path, "b"):
            pass
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


async def _serve(status: int, body: str) -> tuple[web.AppRunner, str]:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/health/ready", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/health/ready"


async def test_healthcheck_reports_ok_and_reasons() -> None:
    """200 → healthy; 503 → unhealthy with the JSON reasons in one line; closed port → unreachable."""
    runner, url = await _serve(200, '{"ready": true}')
    try:
        ok, reason = await asyncio.to_thread(check, url)
        assert ok, reason
    finally:
        await runner.cleanup()
    runner, url = await _serve(503, '{"ready": false, "reasons": {"nats": "disconnected"}}')
    try:
        ok, reason = await asyncio.to_thread(check, url)
        assert not ok
        assert '{"nats":"disconnected"}' in reason
        assert "\n" not in reason
    finally:
        await runner.cleanup()
    ok, reason = await asyncio.to_thread(check, f"http://127.0.0.1:{free_port()}/health/live", 2.0)
    assert not ok
    assert reason.startswith("unreachable")


def test_healthcheck_cli_exit_codes() -> None:
    """The CLI exits 1 with one line when nothing listens, and derives the URL from [http] listen."""
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "hl_monitor", "healthcheck", "--ready", "--timeout", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "HL_MONITOR__HTTP__LISTEN": f"0.0.0.0:{port}"},
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == [
        f"unhealthy: unreachable http://127.0.0.1:{port}/health/ready: [Errno 111] Connection refused"
    ]
    assert default_url("[::1]:9000", ready=False) == "http://[::1]:9000/health/live"


async def test_watchdog_counts_a_blocking_callback() -> None:
    """A callback that blocks the loop for 400 ms is seen as one stall and counted in loop_stalls."""
    metrics = Metrics()
    dog = LoopWatchdog(metrics, threshold=0.25, interval=0.02)
    task = asyncio.create_task(dog.run())
    await asyncio.sleep(0.05)
    time.sleep(0.4)  # noqa: ASYNC251 - the blocking call the watchdog must notice
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert dog.stalls == 1
    assert dog.worst >= 0.3
    assert metrics.registry.get_sample_value("hl_monitor_loop_stalls_total") == 1.0
