"""The tests' one time unit, so the whole suite can be slowed down on a loaded machine."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable

__all__ = ["MS", "eventually", "wait_until"]

MS = float(os.environ.get("RELAY_TEST_TIMEOUT_FACTOR", "1")) / 1000
"""One millisecond, scaled by RELAY_TEST_TIMEOUT_FACTOR (e.g. 3 on a busy CI machine).

Write every deadline, poll interval and timing setting of a test as ``n * MS``; leave
plain seconds only where a value is data (a backoff formula's inputs), not a wait.
"""


async def eventually(
    predicate: Callable[[], object],
    timeout: float = 10_000 * MS,
    *,
    poll: float = 10 * MS,
    what: str = "condition",
) -> None:
    """Wait until ``predicate()`` holds (it may return an awaitable); fail after ``timeout``.

    The one polling wait of the suite: deadlines are relative and in ``MS``, so a slowed
    suite waits longer without any test changing.
    """
    deadline = time.monotonic() + timeout
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout / MS:.0f} MS")
        await asyncio.sleep(poll)


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10_000 * MS,
    *,
    poll: float = 10 * MS,
    what: str = "condition",
) -> None:
    """:func:`eventually` for synchronous tests (blocks the thread while polling)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout / MS:.0f} MS")
        time.sleep(poll)
