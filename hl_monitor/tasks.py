"""Small task helpers for the one event loop: wait for the first of several, cancel and wait for the rest, and
release steps that must not mask the real exit reason."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

__all__ = ["cancel_and_wait", "first_of", "quietly"]


async def first_of(*aws: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of `aws` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(tasks)


async def cancel_and_wait(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until they are done; a task's own error is raised.

    A cancel of the caller while it waits propagates: awaiting each task under `suppress(CancelledError)` would
    swallow it too, and the caller (the service's shutdown) would carry on as if never cancelled.
    """
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc


def quietly(close: Callable[[], Awaitable[None]], *errors: type[BaseException]) -> Callable[[], Awaitable[None]]:
    """A release step whose expected failures (the peer is already gone) must not mask the real exit reason."""

    async def run() -> None:
        with contextlib.suppress(*errors):
            await close()

    return run
