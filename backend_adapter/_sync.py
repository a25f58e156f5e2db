"""Publisher: the AsyncPublisher API for threaded code (Django, Flask, Celery workers).

One instance is shared by all threads of a process: the only state is redis-py's
connection pool, which is thread-safe. A BlockingConnectionPool makes a thread wait for
a free connection (up to ``timeout``) instead of failing when every connection is busy.
Each publish is one round trip (EVALSHA of relay.wire's publish script, packed once by
PublishCodec); ``publish_many`` sends a whole batch as one pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from backend_adapter._core import (
    SCRIPT_LOAD,
    Call,
    Item,
    PublishCodec,
    RetryPolicy,
    after_failure,
    is_transient,
    lookup_failed,
    publish_failed,
    replication,
)
from relay.backoff import retry_sync
from relay.errors import ConfigError, EngineError, PublishFailed
from relay.redis_pool import sync_pool
from relay.wire import DEFAULT_MAX_PAYLOAD, PublishResult, validate_client_id

__all__ = ["Publisher"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _transient_redis_error(exc: Exception) -> bool:
    return isinstance(exc, rex.RedisError) and is_transient(exc)


class Publisher:
    """Publish events to Relay from synchronous code; safe to share between threads.

    Same arguments and semantics as :class:`~backend_adapter.AsyncPublisher`, with a
    ``redis.Redis`` as ``client``. ``max_connections`` is the pool size: threads beyond
    it wait for a connection.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        client: redis.Redis | None = None,
        key_prefix: str = "relay",
        history_size: int = 100,
        history_ttl: int = 3600,
        dedupe_window: int = 600,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        retries: int = 3,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        timeout: float = 2.0,
        max_connections: int = 32,
        max_batch: int = 500,
        min_replicas: int = 0,
        replica_timeout: float = 0.5,
    ) -> None:
        if (redis_url is None) == (client is None):
            raise ConfigError("give exactly one of redis_url or client")
        if timeout <= 0 or max_connections < 1 or max_batch < 1:
            raise ConfigError("timeout, max_connections and max_batch must be positive")
        self._codec = PublishCodec(
            key_prefix=key_prefix,
            history_size=history_size,
            history_ttl=history_ttl,
            dedupe_window=dedupe_window,
            max_payload=max_payload,
        )
        self._retry = RetryPolicy(retries, backoff, max_backoff)
        self._replication = replication(key_prefix, min_replicas, replica_timeout, timeout)
        self._max_batch = max_batch
        if client is None:
            assert redis_url is not None
            pool = sync_pool(
                redis_url,
                max_connections=max_connections,
                timeout=timeout,  # waiting for a free connection counts as one attempt
                protocol=2,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),  # our RetryPolicy is the only one
            )
            self._client: redis.Redis = redis.Redis.from_pool(pool)
            self._owns_client = True
        else:
            self._client = client
            self._owns_client = False
        # redis-py's pool and command methods are untyped: keep them behind Any here.
        self._pool: Any = self._client.connection_pool
        self._command: Any = self._client.execute_command
        self._closed = False

    def publish(self, biz_id: str, event: str, data: Any, mid: str | None = None) -> PublishResult:
        """Publish one event; see :meth:`AsyncPublisher.publish`."""
        call = Call(biz_id, self._codec.command(biz_id, event, data, mid))
        if self._closed:
            raise PublishFailed("publisher is closed")
        self._run([call])
        outcome = call.outcome
        if isinstance(outcome, PublishResult):
            return outcome
        assert outcome is not None
        raise outcome

    def publish_many(self, items: Iterable[Item]) -> list[PublishResult]:
        """Publish a batch, one pipeline per ``max_batch`` items, in order.

        See :meth:`AsyncPublisher.publish_many`.
        """
        calls = self._codec.calls(items)
        if self._closed:
            raise PublishFailed("publisher is closed")
        step = self._max_batch
        for start in range(0, len(calls), step):
            chunk = calls[start : start + step]
            self._run(chunk)
            for call in chunk:
                if isinstance(call.outcome, PublishFailed):
                    raise call.outcome
        return [call.outcome for call in calls if isinstance(call.outcome, PublishResult)]

    def is_online(self, client_id: str) -> bool:
        """True if a session record for ``client_id`` exists and its node is alive."""
        validate_client_id(client_id)
        if self._closed:
            raise EngineError("publisher is closed")
        keys = self._codec.keys
        session = keys.session(client_id)

        def lookup() -> bool:
            node = self._command("HGET", session, "node")
            if node is None:
                return False
            return bool(self._command("EXISTS", keys.node(_text(node))))

        retry = self._retry.start()
        try:
            return retry_sync(lookup, retry, _transient_redis_error)
        except rex.RedisError as exc:
            raise lookup_failed(f"is_online({client_id!r})", retry.failures, exc) from exc

    def close(self) -> None:
        """Close the pool if this publisher made it."""
        self._closed = True
        if self._owns_client:
            self._owns_client = False
            self._client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- talking to Redis ----------------------------------------------------------------

    def _run(self, calls: Sequence[Call]) -> None:
        """Send ``calls`` with retries; every call ends with an outcome."""
        todo = list(calls)
        retry = self._retry.start()
        while True:
            try:
                self._exchange(todo)
                return
            except Exception as exc:
                todo, delay = after_failure(todo, exc, retry)
            if not todo:
                return
            time.sleep(delay)

    def _exchange(self, calls: list[Call]) -> None:
        pool = self._pool
        conn = pool.get_connection()
        try:
            self._round_trip(conn, calls, reload=True)
        except BaseException:
            # Replies may still be on their way: this connection is out of step.
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _round_trip(self, conn: Any, calls: list[Call], *, reload: bool) -> None:
        replicated = self._replication
        commands = [call.command for call in calls]
        if replicated is not None:
            commands.append(replicated.commands())
        conn.send_packed_command(commands)
        missing: list[Call] = []
        failure: Exception | None = None
        result = self._codec.result
        # With min_replicas, outcomes are kept until WAIT vouches for them.
        held: list[tuple[Call, PublishResult]] | None = None if replicated is None else []
        for call in calls:
            try:
                outcome = result(conn.read_response())
                if held is None:
                    call.outcome = outcome
                else:
                    held.append((call, outcome))
            except rex.NoScriptError:
                missing.append(call)
            except rex.ResponseError as exc:
                if is_transient(exc):
                    failure = failure or exc
                else:
                    call.outcome = publish_failed(call.biz_id, None, exc)
        if replicated is not None and held is not None:
            conn.read_response()  # the barrier's receivers
            replicated.check(conn.read_response())
            for call, outcome in held:
                call.outcome = outcome
        if missing:
            # Redis restarted or its script cache was flushed; see _asyncio.py.
            if not reload:
                raise rex.NoScriptError("publish script vanished again right after loading")
            conn.send_packed_command([SCRIPT_LOAD])
            conn.read_response()
            self._round_trip(conn, missing, reload=False)
        if failure is not None:
            raise failure
