"""The wall clock every component stamps events with (epoch milliseconds, the exchange's unit)."""

from __future__ import annotations

import time


def wall_ms() -> int:
    """Now, in epoch milliseconds (integer arithmetic: no float rounding)."""
    return time.time_ns() // 1_000_000
