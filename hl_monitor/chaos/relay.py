"""A TCP relay in front of a server (MariaDB in the chaos suite) that can be cut and restored.

`stop()` drops every relayed connection at once and refuses new ones (the port is closed), like a database
host that vanished; `start()` listens again on the same port. Used by the chaos runner and the storage tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Final

__all__ = ["TcpRelay", "free_port"]

HOST: Final = "127.0.0.1"
CHUNK: Final = 65536  # bytes read per pipe iteration


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class TcpRelay:
    """Relays `HOST:port` to `target_host:target_port`; `stop()` is the outage, `start()` the recovery."""

    def __init__(self, target_port: int, target_host: str = HOST, port: int = 0) -> None:
        self.port = port or free_port()
        self.target_host = target_host
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()
        self.accepted = 0

    @property
    def cut(self) -> bool:
        return self.server is None

    async def start(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._accept, HOST, self.port, reuse_address=True)

    async def stop(self) -> None:
        """Close the listener and drop every relayed connection."""
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> TcpRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        pipes = [asyncio.create_task(self._pipe(reader, up_writer)), asyncio.create_task(self._pipe(up_reader, writer))]
        self.pipes.update(pipes)
        try:
            await asyncio.gather(*pipes)
        except asyncio.CancelledError:
            pass
        finally:
            self.pipes.difference_update(pipes)
            for w in (writer, up_writer):
                w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError):
            writer.close()
