"""The suite's asyncio guard (tests/conftest.py) really fails tests that hide loop problems.

A small inner test session runs with this suite's conftest hooks in a subprocess; each inner test commits one
of the sins and the outcome of each is checked. Lost task exceptions and never-awaited coroutines fail every
test; a callback holding the loop fails only a test marked `loop_guard`, and only while that test runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from hl_monitor.ops.process import STALL_THRESHOLD_S

REPO = Path(__file__).resolve().parents[1]

INNER_CONFTEST = """
from tests.conftest import LOOP_GUARD_MARKER, _no_silent_loop_problems  # noqa: F401
from tests.conftest import pytest_configure as suite_configure


def pytest_configure(config):
    suite_configure(config)
    config.addinivalue_line("markers", f"{LOOP_GUARD_MARKER}: fail on a callback holding the loop")
"""

INNER_TESTS = """
import asyncio
import gc
import time

import pytest


@pytest.mark.loop_guard
async def test_blocking_callback_guarded():
    await asyncio.sleep(0)
    time.sleep(0.3)
    await asyncio.sleep(0)


async def test_blocking_callback_unguarded():
    await asyncio.sleep(0)
    time.sleep(0.3)
    await asyncio.sleep(0)


async def test_task_exception_never_retrieved():
    async def boom():
        raise RuntimeError("lost")

    task = asyncio.get_running_loop().create_task(boom())
    await asyncio.sleep(0.01)
    del task
    gc.collect()


async def test_coroutine_never_awaited():
    async def forgotten():
        return 1

    forgotten()
    gc.collect()


@pytest.mark.loop_guard
async def test_busy_but_fine():
    for _ in range(50):
        await asyncio.sleep(0.001)
"""


def test_guard_fails_blocking_lost_exceptions_and_unawaited_coroutines(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(INNER_CONFTEST))
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", str(tmp_path), "-rA", "-q", "-p", "no:cacheprovider",
            "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function", "-W", "error",
            "--rootdir", str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    outcomes: dict[str, set[str]] = {}
    for line in result.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR") and "::" in rest:
            name = rest.split("::", 1)[1].split(" ", 1)[0]
            outcomes.setdefault(name, set()).add(word)
    assert outcomes == {
        "test_blocking_callback_guarded": {"PASSED", "ERROR"},  # the call passes, the guard fails it at teardown
        "test_blocking_callback_unguarded": {"PASSED"},  # runs after a guarded test: the guard is off again
        "test_task_exception_never_retrieved": {"PASSED", "ERROR"},
        "test_coroutine_never_awaited": {"FAILED"},  # RuntimeWarning under -W error
        "test_busy_but_fine": {"PASSED"},
    }, result.stdout[-4000:]
    # The guarded test's 0.3 s block is reported (its exact figure depends on the machine's load).
    held = [float(s) for s in re.findall(r"held the event loop for (\d+\.\d+) s", result.stdout)]
    assert held, result.stdout[-4000:]
    assert min(held) >= STALL_THRESHOLD_S, held
    assert "Task exception was never retrieved" in result.stdout
    assert "was never awaited" in result.stdout
