"""Checking a rate budget from the outside: the most spent in any window."""

from __future__ import annotations


def max_in_any_window(events: list[tuple[float, int]], window: float) -> int:
    """Largest sum of amounts stamped within any half-open `window` (events sorted by time)."""
    worst = 0
    for i, (t_end, _) in enumerate(events):
        total = sum(amount for t, amount in events[: i + 1] if t > t_end - window)
        worst = max(worst, total)
    return worst
