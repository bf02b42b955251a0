"""Real processes the chaos suite controls: a restartable `nats-server` and the service as a subprocess.

The service runs exactly as in production (`python -m hl_monitor run`), configured only through
`HL_MONITOR__SECTION__KEY` variables, with its stdout/stderr appended to one log file per run so a test can
grep every byte it printed. `kill9()` is a real SIGKILL: nothing in the process gets to clean up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from hl_monitor.chaos.relay import HOST, free_port
from hl_monitor.config import ENV_PREFIX
from hl_monitor.delivery.embedded_nats import find_nats_server
from hl_monitor.errors import ChaosError

__all__ = ["ChaosError", "NatsProcess", "ServiceProcess", "parse_metrics"]

NATS_START_TIMEOUT_S: Final = 10.0
STOP_GRACE_S: Final = 5.0  # SIGTERM → SIGKILL for helper processes
POLL_S: Final = 0.05
PORT_RETRIES: Final = 3  # first start of a nats-server whose free port another process grabbed meanwhile
HTTP_TIMEOUT_S: Final = 2.0  # one probe of the service's HTTP port; a hung handler must not hang the runner


class NatsProcess:
    """A `nats-server -js` on a fixed port and store, stoppable and restartable (SIGKILL or SIGTERM)."""

    def __init__(self, store: Path, *, port: int = 0, extra_args: Sequence[str] = (), scheme: str = "nats") -> None:
        self.port = port or free_port()
        self.store = store
        self.extra_args = list(extra_args)
        self.scheme = scheme
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start and wait for the server's INFO banner. A first start whose free port was taken meanwhile (by
        another process on a busy machine) retries on a new port; a restart keeps its port."""
        for _ in range(PORT_RETRIES):
            if self._spawn():
                self.starts += 1
                return
            if self.starts:
                break
            self.port = free_port()
        raise ChaosError(f"nats-server did not start on port {self.port} (exit code {self._exit_code()})")

    def _exit_code(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def _spawn(self) -> bool:
        args = [find_nats_server(), "-a", HOST, "-p", str(self.port), "-js", "-sd", str(self.store), *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + NATS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                    sock.settimeout(1.0)
                    banner = sock.recv(5)
                # Someone else's listener on the port would not greet like NATS, and our process would have exited.
                if banner == b"INFO " and self.proc.poll() is None:
                    return True
            except OSError:
                pass
            time.sleep(0.025)
        self.stop(kill=True)
        return False

    def stop(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text → {(sample name, labels): value}."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


class ServiceProcess:
    """`python -m hl_monitor run` with an environment-only config; start, wait ready, SIGKILL, SIGTERM."""

    def __init__(self, env: Mapping[str, str], workdir: Path, log_path: Path) -> None:
        self.env = dict(env)
        self.workdir = workdir
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.kills = 0
        self.exit_codes: list[int] = []

    @property
    def listen(self) -> str:
        return self.env[f"{ENV_PREFIX}HTTP__LISTEN"]

    @property
    def base_url(self) -> str:
        return f"http://{self.listen}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        if self.running:
            raise ChaosError("service already running")
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(self.env)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n--- start {self.starts + 1} ---\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "hl_monitor",
                "run",
                cwd=self.workdir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.starts += 1

    async def wait_http(self, within: float = 30.0) -> None:
        """Until the HTTP port answers `/health/live` (the service is past its start-up checks)."""
        await self._wait(lambda status, _: status == 200, "/health/live", within)

    async def wait_ready(self, within: float = 30.0) -> None:
        """Until `/health/ready` answers 200 (feeds live, NATS and database reachable)."""
        await self._wait(lambda status, _: status == 200, "/health/ready", within)

    async def _wait(self, ok: Any, path: str, within: float) -> None:
        deadline = time.monotonic() + within
        last: object = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.returncode is not None:
                raise ChaosError(f"service exited with code {self.proc.returncode} while waiting for {path}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                status, body = await self.get(path)
                last = body
                if ok(status, body):
                    return
            await asyncio.sleep(POLL_S * 2)
        raise ChaosError(f"service not answering {path} within {within:g} s (last answer: {last!r})")

    async def get(self, path: str, *, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.base_url + path, headers=headers) as resp,
        ):
            text = await resp.text()
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, text

    async def readiness(self) -> dict[str, str] | None:
        """Readiness reasons ({} when ready); None when the service does not answer."""
        try:
            _, body = await self.get("/health/ready")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        if not isinstance(body, dict):
            return None
        reasons: dict[str, str] = body.get("reasons") or {}
        return reasons

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        try:
            status, text = await self.get("/metrics")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        if status != 200 or not isinstance(text, str):
            return None
        # A full /metrics page takes ~0.1 s to parse under load: off the loop the harness drives the faults on.
        return await asyncio.to_thread(parse_metrics, text)

    async def kill9(self) -> None:
        """SIGKILL: no shutdown code runs."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGKILL)
        self.exit_codes.append(await proc.wait())
        self.kills += 1

    async def terminate(self, within: float = 40.0) -> int:
        """SIGTERM and wait for the orderly shutdown; returns the exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), within)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise ChaosError(f"service did not stop within {within:g} s of SIGTERM") from None
        code = proc.returncode
        assert code is not None
        self.exit_codes.append(code)
        return code

    async def wait_exit(self, within: float) -> int:
        """For a service expected to refuse to start: its exit code."""
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), within)
        self.exit_codes.append(code)
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
