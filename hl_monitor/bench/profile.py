"""Optional CPU profile of the end-to-end run with py-spy (sampling, from outside the process).

py-spy is not a project dependency: it is looked up on PATH and in `.tools/bin` (install it there with
`.tools/bin/pip install py-spy`). Asking for a profile without it, or with a py-spy that cannot attach (ptrace
not permitted), fails the bench with a `BenchError` that says so, instead of a report without its profile.
Its raw output (collapsed stacks) is summarised here into the functions with the most samples, on the stack
(inclusive) and at the top of the stack (self).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Final

from hl_monitor.errors import BenchError

__all__ = ["Profiler", "find_py_spy", "require_py_spy", "summarise"]

SAMPLE_RATE_HZ: Final = 200
TOP_N: Final = 20
STOP_TIMEOUT_S: Final = 30.0
# Frames that only say "the event loop ran something": they are on every stack and explain nothing.
_NOISE: Final = ("asyncio/", "<module>", "threading.py", "selectors.py", "concurrent/futures", "runpy")


def find_py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    for base in (Path(sys.prefix).parent / ".tools/bin", Path(__file__).resolve().parents[2] / ".tools/bin"):
        candidate = base / "py-spy"
        if candidate.is_file():
            return str(candidate)
    return None


def require_py_spy() -> str:
    """py-spy's path, or a `BenchError` naming what is missing and how to install it."""
    found = find_py_spy()
    if found is None:
        raise BenchError(
            "--profile needs py-spy, found neither on PATH nor in .tools/bin: install it with "
            "`.tools/bin/pip install py-spy` (it is not a project dependency)"
        )
    return found


class Profiler:
    """Samples this process with py-spy between `start()` and `stop()`; writes collapsed stacks to `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._errors = path.with_suffix(".stderr")

    def start(self) -> None:
        binary = require_py_spy()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [binary, "record", "--pid", str(os.getpid()), "--rate", str(SAMPLE_RATE_HZ), "--format", "raw",
             "--nonblocking", "--output", str(self.path)],
            stdout=subprocess.DEVNULL,
            stderr=self._errors.open("wb"),
        )  # fmt: skip

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not self.path.exists():
            why = self._errors.read_text(errors="replace").strip()[-1000:] if self._errors.exists() else ""
            raise BenchError(f"py-spy wrote no profile (exit {proc.returncode}): {why or 'no message'}")


def _short(frame: str) -> str:
    """`func (path/to/file.py:123)` → `func (file.py)` so samples of one function on many lines add up."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({tail})"


def summarise(path: Path, top: int = TOP_N) -> dict[str, Any]:
    """Top functions by inclusive and self samples, as percentages of all samples of the event-loop thread."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";") if f]
        if not any("run_forever" in f for f in frames):
            continue  # other threads (thread pools, child watchers) are not the loop's CPU
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            if not any(noise in frame for noise in _NOISE):
                inclusive[frame] += n

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "rate_hz": SAMPLE_RATE_HZ, "inclusive": pct(inclusive), "self": pct(own)}
