"""The one way tests wait for live components to reach a state."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Final

import pytest

# Long enough for a busy 2-core machine to finish a reconnect and a gap recovery; a failure costs this much.
DEFAULT_WITHIN_S: Final = 15.0
# Short against every interval under test, long enough not to spin the loop.
POLL_S: Final = 0.01


async def wait_until(
    check: Callable[[], object],
    within: float = DEFAULT_WITHIN_S,
    what: str = "",
    *,
    poll: float = POLL_S,
    details: Callable[[], str] | None = None,
) -> float:
    """Poll `check` (plain or async) until it is truthy and return the seconds that took; fail the test if it
    stays falsy for `within` seconds, with `details()` (e.g. the log tails of subprocesses) in the message.

    Polling, because there is no event to wait on for "the sim saw N things". The deadline is loop time, so
    under `@pytest.mark.looptime` it is fake time as well.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return loop.time() - started
        if loop.time() - started > within:
            extra = "" if details is None else "\n" + details()
            pytest.fail(f"timed out after {within} s waiting for {what or check}{extra}", pytrace=details is None)
        await asyncio.sleep(poll)
