"""A TCP proxy in front of NATS that can partition (black-hole) and heal."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """TCP proxy to NATS that can black-hole traffic (a partition: no resets, just silence) and heal."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackholed = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                if not self.blackholed:
                    dst.write(data)
                    await dst.drain()
        dst.close()

    def partition(self) -> None:
        self.blackholed = True

    def heal(self) -> None:
        """End the partition; connections that lost bytes are reset (the client reconnects)."""
        self.blackholed = False
        for w in self._writers:
            w.close()
        self._writers.clear()

    async def close(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
