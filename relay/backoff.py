"""The one retry timing of the tree: exponential backoff with jitter and a cap (sans-I/O).

:class:`Backoff` turns an attempt number into a delay; :class:`Retry` counts failures
since the last success and says when to give up (after ``retries`` retries, or once a
deadline on the caller's clock has passed, the last wait cut to what is left). Neither
sleeps nor reads a clock: the caller passes the time in, so the policy is tested without
waiting. :func:`retry_sync` and :func:`retry_async` are the thin drivers for a call that
is simply tried again; loops that do more between attempts (log, resend part of a
batch, reconnect) use :class:`Retry` directly.

Users: the client SDK's reconnect, the node's start and gap repair, the Redis engine's
pub/sub reconnect, the publishers and the outbox dispatcher, and the load generator.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from relay.errors import ConfigError

__all__ = ["Backoff", "Jitter", "Retry", "retry_async", "retry_sync"]

T = TypeVar("T")

_MAX_EXPONENT = 62  # 2**62 times any sane base is past any cap, and still a finite float


class Jitter(Enum):
    """How a delay is drawn below its ceiling ``min(cap, base * 2**attempt)``."""

    NONE = "none"  # exactly the ceiling
    FULL = "full"  # uniform in [0, ceiling]: a fleet that failed together comes back spread
    HALF = "half"  # uniform in [ceiling / 2, ceiling]: spread, but never much sooner


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays that double from ``base`` up to ``cap`` seconds, jittered."""

    base: float
    cap: float = math.inf
    jitter: Jitter = Jitter.FULL

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0:
            raise ConfigError("backoff base and cap must not be negative")

    def ceiling(self, attempt: int) -> float:
        """The longest delay after failure number ``attempt`` (counted from 0)."""
        return min(self.cap, self.base * 2.0 ** min(attempt, _MAX_EXPONENT))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failure number ``attempt`` (from 0); ``rng`` for tests."""
        ceiling = self.ceiling(attempt)
        uniform = (rng or random).uniform
        if self.jitter is Jitter.FULL:
            return uniform(0.0, ceiling)
        if self.jitter is Jitter.HALF:
            return ceiling * uniform(0.5, 1.0)
        return ceiling


@dataclass(slots=True)
class Retry:
    """Failures since the last success, and the give-up rules (none: retry for ever).

    ``retries``: give up on failure number ``retries + 1``. ``deadline``: a time on the
    caller's clock after which to give up; a wait never runs past it.
    """

    backoff: Backoff
    retries: int | None = None
    deadline: float | None = None
    rng: random.Random | None = None
    failures: int = 0

    def __post_init__(self) -> None:
        if self.retries is not None and self.retries < 0:
            raise ConfigError("retries must not be negative")

    def failed(self, now: float = 0.0) -> float | None:
        """Count a failure: the seconds to wait before trying again, or None to give up.

        ``now`` is the caller's clock, needed only with a ``deadline``.
        """
        self.failures += 1
        if self.retries is not None and self.failures > self.retries:
            return None
        delay = self.backoff.delay(self.failures - 1, self.rng)
        if self.deadline is not None:
            left = self.deadline - now
            if left <= 0:
                return None
            delay = min(delay, left)
        return delay

    def succeeded(self) -> None:
        """A success: the next failure waits the shortest delay again."""
        self.failures = 0


def retry_sync(
    call: Callable[[], T],
    retry: Retry,
    retryable: Callable[[Exception], bool],
    *,
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call()`` until it returns; a failure ``retryable`` rejects, or the last, is raised."""
    while True:
        try:
            result = call()
        except Exception as exc:
            delay = retry.failed(clock())  # counted either way: failures == attempts made
            if delay is None or not retryable(exc):
                raise
            sleep(delay)
        else:
            retry.succeeded()
            return result


async def retry_async(
    call: Callable[[], Awaitable[T]],
    retry: Retry,
    retryable: Callable[[Exception], bool],
    *,
    sleep: Callable[[float], Awaitable[object]],
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """:func:`retry_sync` for coroutines; ``sleep`` is the loop's (``asyncio.sleep``)."""
    while True:
        try:
            result = await call()
        except Exception as exc:
            delay = retry.failed(clock())  # counted either way: failures == attempts made
            if delay is None or not retryable(exc):
                raise
            await sleep(delay)
        else:
            retry.succeeded()
            return result
