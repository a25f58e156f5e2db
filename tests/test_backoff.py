"""relay.backoff: the one retry timing (delays, give-up rules, reset) and its drivers."""

from __future__ import annotations

import asyncio
import random

import pytest

from relay.backoff import Backoff, Jitter, Retry, retry_async, retry_sync
from relay.errors import ConfigError


@pytest.mark.parametrize("attempt", [0, 1, 3, 6, 10_000])
def test_full_jitter_spreads_below_a_capped_doubling_ceiling(attempt: int) -> None:
    backoff = Backoff(0.1, 2.0)
    ceiling = min(2.0, 0.1 * 2 ** min(attempt, 62))
    delays = [backoff.delay(attempt, random.Random(seed)) for seed in range(200)]
    assert all(0.0 <= d <= ceiling for d in delays)
    assert min(delays) < ceiling / 4 and max(delays) > ceiling * 3 / 4


def test_half_jitter_never_waits_less_than_half_and_none_waits_the_ceiling() -> None:
    half = [Backoff(0.2, 2.0, Jitter.HALF).delay(2, random.Random(s)) for s in range(200)]
    assert all(0.4 <= d <= 0.8 for d in half)
    assert [Backoff(0.1, jitter=Jitter.NONE).delay(n) for n in range(4)] == [0.1, 0.2, 0.4, 0.8]


def test_the_same_seed_gives_the_same_delays() -> None:
    one = [Backoff(0.5, 30.0).delay(n, random.Random(7)) for n in range(5)]
    assert one == [Backoff(0.5, 30.0).delay(n, random.Random(7)) for n in range(5)]


def test_negative_settings_are_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Backoff(-0.1)
    with pytest.raises(ConfigError):
        Retry(Backoff(0.1), retries=-1)


def test_retries_give_up_on_the_failure_after_the_last_retry() -> None:
    retry = Retry(Backoff(0.1, jitter=Jitter.NONE), retries=2)
    assert [retry.failed(), retry.failed(), retry.failed()] == [0.1, 0.2, None]
    assert retry.failures == 3


def test_a_deadline_cuts_the_last_wait_and_then_gives_up() -> None:
    retry = Retry(Backoff(1.0, jitter=Jitter.NONE), deadline=10.0)
    assert retry.failed(now=0.0) == 1.0
    assert retry.failed(now=9.5) == 0.5  # 2 s planned, 0.5 s left
    assert retry.failed(now=10.0) is None


def test_success_resets_to_the_shortest_delay() -> None:
    retry = Retry(Backoff(0.1, jitter=Jitter.NONE))
    for _ in range(5):
        retry.failed()
    retry.succeeded()
    assert retry.failed() == 0.1 and retry.failures == 1


def test_retry_sync_retries_what_is_retryable_and_counts_every_attempt() -> None:
    outcomes: list[Exception | str] = [ConnectionError("a"), ConnectionError("b"), "ok"]
    slept: list[float] = []

    def call() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    retry = Retry(Backoff(0.1, jitter=Jitter.NONE), retries=5)
    assert retry_sync(call, retry, lambda e: isinstance(e, OSError), sleep=slept.append) == "ok"
    assert slept == [0.1, 0.2] and retry.failures == 0

    def broken() -> str:
        raise ValueError("not worth retrying")

    with pytest.raises(ValueError):
        retry_sync(broken, retry, lambda e: isinstance(e, OSError), sleep=slept.append)
    assert retry.failures == 1 and slept == [0.1, 0.2]


def test_retry_async_gives_up_with_the_last_error() -> None:
    attempts = 0

    async def call() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError(f"attempt {attempts}")

    async def no_wait(_: float) -> None:
        await asyncio.sleep(0)

    retry = Retry(Backoff(0.1), retries=3)
    with pytest.raises(ConnectionError, match="attempt 4"):
        asyncio.run(retry_async(call, retry, lambda e: True, sleep=no_wait))
    assert attempts == 4 == retry.failures
