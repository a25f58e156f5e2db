"""Publisher: the AsyncPublisher API for threaded code (Django, Flask, Celery workers).

One instance is shared by all threads of a process: the only state is redis-py's
connection pool, which is thread-safe. A BlockingConnectionPool makes a thread wait for
a free connection (up to ``timeout``) instead of failing when every connection is busy.
Each publish is one round trip (EVALSHA of relay.wire's publish script, packed once by
PublishCodec); ``publish_many`` sends a whole batch as one pipeline, its BizIds' single
events sharing script calls as AsyncPublisher's do (PublishCodec.plan).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.client import NEVER_DECODE
from redis.retry import Retry

from backend_adapter._core import (
    Call,
    Item,
    PublisherBase,
    RoundTrip,
    after_failure,
    by_slot,
    in_slot,
    is_transient,
    lookup_failed,
    raise_first_failure,
    results,
    stored_event,
)
from relay.backoff import retry_sync
from relay.errors import EngineError, PublishFailed
from relay.redis_pool import sync_cluster, sync_pool
from relay.redis_url import parse_redis_url
from relay.wire import Event, PublishResult, validate_client_id

__all__ = ["Publisher"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _transient_redis_error(exc: Exception) -> bool:
    return isinstance(exc, rex.RedisError) and is_transient(exc)


class Publisher(PublisherBase[redis.Redis]):
    """Publish events to Relay from synchronous code; safe to share between threads.

    Same arguments and semantics as :class:`~backend_adapter.AsyncPublisher`, with a
    ``redis.Redis`` as ``client``. ``max_connections`` (default 32) is the pool size:
    threads beyond it wait for a connection.
    """

    DEFAULT_MAX_CONNECTIONS = 32

    def _connect(self, redis_url: str | None, client: redis.Redis | None) -> None:
        self._cluster: Any = None  # redis.RedisCluster for redis+cluster://
        self._stale = False  # the cluster's slot layout must be read again
        if redis_url is not None and parse_redis_url(redis_url).is_cluster:
            self._replication = in_slot(self._replication)
            self._cluster = sync_cluster(
                redis_url,
                protocol=2,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._client: Any = self._cluster
            self._owns_client = True
        elif client is None:
            assert redis_url is not None
            pool = sync_pool(
                redis_url,
                max_connections=self._max_connections,
                timeout=self._timeout,  # waiting for a free connection counts as one attempt
                protocol=2,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),  # our RetryPolicy is the only one
            )
            self._client = redis.Redis.from_pool(pool)
            self._owns_client = True
        else:
            self._client = client
            self._owns_client = False
        # redis-py's pool and command methods are untyped: keep them behind Any here.
        self._pool: Any = getattr(self._client, "connection_pool", None)  # None: cluster
        self._command: Any = self._client.execute_command

    def publish(self, biz_id: str, event: str, data: Any, mid: str | None = None) -> PublishResult:
        """Publish one event; see :meth:`AsyncPublisher.publish`."""
        call = Call(biz_id, self._codec.encode(biz_id, event, data, mid))
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
        calls = self._calls(items)
        for batch in self._batches(calls):
            self._run(batch)
            raise_first_failure(batch)
        return results(calls)

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

    def _read_originals(self, duplicates: Sequence[tuple[str, str]]) -> list[Event | None]:
        """The events that duplicate publishes collided with, read back from history.

        ``duplicates`` holds ``(biz_id, id)`` of results with ``duplicate=True``; each gets
        the event stored under that id, or None if it is gone (trimmed) or unreadable.
        One pipeline on this publisher's own pool; on a Redis Cluster redis-py sends each
        XRANGE to the master of its BizId's slot. Raw bytes whatever the client's
        ``decode_responses``: the payload is MessagePack. Not retried (the caller retries
        the round); any Redis error is a PublishFailed.

        Internal to backend_adapter, for the outbox dispatcher's duplicate check, and so
        not in docs/backend.md: it reads history, which clients get from a node, and the
        one need for it is the dispatcher's, which takes a sync Publisher only. Made
        public, it would need an AsyncPublisher twin and a promise about reading history.
        """
        pipe: Any = self._client.pipeline(transaction=False)  # untyped in redis-py
        log = self._codec.keys.log
        for biz_id, sid in duplicates:
            xrange = ("XRANGE", log(biz_id), sid, sid, "COUNT", 1)
            pipe.execute_command(*xrange, **{NEVER_DECODE: True})
        try:
            replies = pipe.execute()
        except (rex.RedisError, rex.RedisClusterException) as exc:
            count = len(duplicates)
            raise PublishFailed(f"reading back {count} duplicate(s) failed: {exc}") from exc
        return [stored_event(entries) for entries in replies]

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
        if self._cluster is None:
            self._exchange_with(self._pool, calls)
            return
        # One round trip per master owning a slot of the batch; a MOVED/ASK/TRYAGAIN or
        # CLUSTERDOWN reply or a lost master re-reads the slot layout before the retry.
        cluster = self._cluster
        try:
            if self._stale:
                self._stale = False
                cluster.nodes_manager.initialize()
            parts: dict[str, tuple[Any, list[Call]]] = {}
            for slot, part in by_slot(calls, self._codec.keys).items():
                node = cluster.nodes_manager.get_node_from_slot(slot)
                parts.setdefault(node.name, (node, []))[1].extend(part)
            for node, part in parts.values():
                self._exchange_with(cluster.get_redis_connection(node).connection_pool, part)
        except Exception as exc:
            self._stale = is_transient(exc)
            raise

    def _exchange_with(self, pool: Any, calls: list[Call]) -> None:
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
        trip = RoundTrip(calls, self._codec, self._replication)
        conn.send_packed_command(trip.commands)
        for group in trip.groups:
            try:
                trip.reply(group, conn.read_response())
            except rex.ResponseError as exc:
                trip.error(group, exc)
        if trip.replication is not None:
            conn.read_response()  # the barrier's receivers
            trip.replicas(conn.read_response())
        if trip.missing:
            # Redis restarted or its script cache was flushed; see _asyncio.py.
            if not reload:
                raise rex.NoScriptError("publish script vanished again right after loading")
            conn.send_packed_command(self._codec.script_loads)
            for _ in self._codec.script_loads:
                conn.read_response()
            self._round_trip(conn, trip.missing, reload=False)
        trip.finish()
