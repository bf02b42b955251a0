"""Process safety: one instance per identity (data-dir lock) and an event-loop stall watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from hl_monitor.errors import InstanceLockedError
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

log = get_logger(__name__)

LOCK_FILE_NAME: Final = "hl-monitor.lock"
# Loop stalls longer than this are logged and counted: a 250 ms stall already delays signals noticeably.
STALL_THRESHOLD_S: Final = 0.25
# Probe often enough to see a 250 ms stall, rarely enough to cost nothing.
WATCHDOG_INTERVAL_S: Final = 0.1


class InstanceLock:
    """An exclusive `flock` on `{data_dir}/hl-monitor.lock`.

    The kernel releases the lock when the holder dies, even on `kill -9`, so a crashed holder never
    blocks a restart; a second live process with the same data directory is refused at once.
    """

    def __init__(self, data_dir: Path, instance_id: str) -> None:
        self.path = data_dir / LOCK_FILE_NAME
        self.instance_id = instance_id
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown holder"
            os.close(fd)
            raise InstanceLockedError(self.instance_id, f"lock {self.path} held by {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class LoopWatchdog:
    """Measures how late the loop wakes a periodic sleeper; a late wake-up means something blocked the loop."""

    def __init__(
        self, metrics: Metrics, threshold: float = STALL_THRESHOLD_S, interval: float = WATCHDOG_INTERVAL_S
    ) -> None:
        self.metrics = metrics
        self.threshold = threshold
        self.interval = interval
        self.stalls = 0
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(self.interval)
            lag = time.monotonic() - started - self.interval
            if lag > self.threshold:
                self.stalls += 1
                self.worst = max(self.worst, lag)
                self.metrics.loop_stalls.inc()
                with contextlib.suppress(Exception):
                    log.warning("event loop stalled", stall_ms=round(lag * 1000, 1))
