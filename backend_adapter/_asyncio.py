"""AsyncPublisher: publish from asyncio code, coalescing concurrent publishes into pipelines.

Why coalesce: one EVALSHA through redis-py's command API costs ~70 µs of CPU; the same
command written with a hundred others in one pipeline costs ~5 µs. A backend publishes
from many concurrent tasks (request handlers, ``asyncio.gather``), so :meth:`publish`
queues its packed command and waits on a future; a sender task started on the next turn
of the event loop writes everything queued so far as one pipeline and resolves the
futures (ioredis calls this auto-pipelining). A lone publish still costs one round trip.
Within a pipeline, the events of different BizIds share script calls (publish_batch.lua,
``max_per_call`` events each; see PublishCodec.plan): ~3 µs less Redis CPU per event.

Why a semaphore: at most ``max_connections`` senders and lookups hold a connection at
once, so ``asyncio.gather`` of thousands of publishes waits its turn instead of failing
with redis-py's ``MaxConnectionsError`` (redis-py >= 6 caps pools at 100), even with a
caller's client whose pool does not block. Our own pool is a BlockingConnectionPool of
the same size, and one more for the kept connection below, as a second line.

Why a kept connection: a sender that found nothing more to send keeps its connection
for the next one (up to ``KEEP_IDLE``), outside redis-py's pool, when the pool is ours.
A checkout there (a lock, two metrics hooks and a probe of the socket) and the release
cost about as much Python as the rest of a small round trip: publishing 2 events every
millisecond (``gather`` of ``publish()``, the comparison harness's latency scenario),
the publisher spent 119-125 µs of CPU per event with a checkout per round trip and
97-102 µs with the kept connection, and the first event reached the socket 20-60 µs
sooner (plain asyncio loop, load average 2-4). Our pool holds one connection more than
``max_connections`` for it, so the semaphore's bound on what senders and lookups hold
still stands.

Order: one ``publish_many`` call and successive awaited ``publish`` calls reach Redis in
order. Publishes that run concurrently have no defined order between them; they are
written in the order they were queued, but two batches may be in flight at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Final

import redis.asyncio
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from backend_adapter._core import (
    Call,
    Encoded,
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
)
from relay.backoff import retry_async
from relay.errors import EngineError, PublishFailed
from relay.redis_pool import async_cluster, async_pool
from relay.redis_url import parse_redis_url
from relay.wire import PublishResult, validate_client_id

__all__ = ["AsyncPublisher"]

KEEP_IDLE: Final = 1.0  # seconds a sender's connection is kept for the next round trip


class _Pending(Call):
    """A queued publish and the future its caller awaits."""

    __slots__ = ("future",)

    def __init__(
        self,
        biz_id: str,
        encoded: Encoded,
        future: asyncio.Future[PublishResult],
    ) -> None:
        super().__init__(biz_id, encoded)
        self.future = future


def _settle(batch: list[_Pending]) -> None:
    for call in batch:
        future = call.future
        if future.done():  # the caller was cancelled; the publish may still have happened
            continue
        outcome = call.outcome
        if isinstance(outcome, PublishResult):
            future.set_result(outcome)
        elif outcome is not None:
            future.set_exception(outcome)
        else:
            future.set_exception(
                PublishFailed(
                    f"publish to BizId {call.biz_id!r} was interrupted; "
                    "it may or may not have been published"
                )
            )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class AsyncPublisher(PublisherBase[redis.asyncio.Redis]):
    """Publish events to Relay from asyncio code. One instance per process and event loop.

    Give ``redis_url`` (the publisher owns and closes its pool) or ``client`` (a
    ``redis.asyncio.Redis`` you keep; its own retry settings then add to ours).
    ``history_ttl`` must be at least the nodes' history TTL, and ``key_prefix`` theirs.
    ``timeout`` bounds each attempt (connect, and one round trip); a publish gives up
    after ``retries + 1`` attempts, about ``(retries + 1) * timeout`` plus backoff at
    worst, and much sooner when Redis refuses connections. ``redis_url`` may name a
    Sentinel-watched master (``redis+sentinel://…``). With ``min_replicas`` a publish
    succeeds only once that many replicas hold it (``WAIT``, up to ``replica_timeout``).
    At most ``max_batch`` events go in one pipeline and ``max_per_call`` in one script
    call (Redis runs nothing else while a script runs).
    """

    DEFAULT_MAX_CONNECTIONS = 16

    def _connect(self, redis_url: str | None, client: redis.asyncio.Redis | None) -> None:
        self._cluster: Any = None  # redis.asyncio.RedisCluster for redis+cluster://
        self._stale = False  # the cluster's slot layout must be read again
        if redis_url is not None and parse_redis_url(redis_url).is_cluster:
            self._replication = in_slot(self._replication)
            self._cluster = async_cluster(
                redis_url,
                protocol=2,
                socket_timeout=None,  # asyncio.timeout bounds every attempt
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._client: Any = self._cluster
            self._owns_client = True
        elif client is None:
            assert redis_url is not None
            pool = async_pool(
                redis_url,
                max_connections=self._max_connections + 1,  # + the kept one (_checkout)
                timeout=None,  # never waits: the semaphore admits at most max_connections
                protocol=2,  # RESP2 + hiredis (installed with redis[hiredis]) is fastest
                socket_timeout=None,  # see _exchange: asyncio.timeout bounds every attempt
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),  # our RetryPolicy is the only one
            )
            self._client = redis.asyncio.Redis.from_pool(pool)
            self._owns_client = True
        else:
            self._client = client
            self._owns_client = False
        # redis-py's pool and command methods are untyped: keep them behind Any here.
        self._pool: Any = getattr(self._client, "connection_pool", None)  # None: cluster
        self._command: Any = self._client.execute_command
        self._slots = asyncio.Semaphore(self._max_connections)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Pending] = []
        self._waking = False  # a sender was started and has not taken its batch yet
        self._senders = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # The last sender's connection and when it was kept (monotonic); only in our pool.
        self._kept: tuple[float, Any] | None = None

    # -- public API ----------------------------------------------------------------------

    async def publish(
        self, biz_id: str, event: str, data: Any, mid: str | None = None
    ) -> PublishResult:
        """Publish one event to ``biz_id``; ``mid`` makes a repeat a no-op (see docs).

        Raises InvalidInput / PayloadTooLarge at once, without touching Redis, and
        PublishFailed once the retries are spent.
        """
        encoded = self._codec.encode(biz_id, event, data, mid)
        if self._closed:
            raise PublishFailed("publisher is closed")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        call = _Pending(biz_id, encoded, loop.create_future())
        self._pending.append(call)
        if not self._waking:
            self._wake()
        return await call.future

    async def publish_many(self, items: Iterable[Item]) -> list[PublishResult]:
        """Publish a batch in one pipeline per ``max_batch`` items, in order.

        Every item is validated before anything is sent. Results come back in the
        order of ``items``. Events of one BizId reach Redis in the order given. If an
        item fails, PublishFailed is raised for the first failure; items before it
        were published, and later ones may have been: publish again with ``mid``s.
        """
        calls = self._calls(items)
        for batch in self._batches(calls):
            await self._run(batch)
            raise_first_failure(batch)
        return results(calls)

    async def is_online(self, client_id: str) -> bool:
        """True if a session record for ``client_id`` exists and its node is alive.

        Raises InvalidClientId for a malformed id, EngineUnavailable when Redis cannot
        be reached within the retries.
        """
        validate_client_id(client_id)
        if self._closed:
            raise EngineError("publisher is closed")
        keys = self._codec.keys
        session = keys.session(client_id)

        async def lookup() -> bool:
            async with self._slots, asyncio.timeout(self._timeout):
                node = await self._command("HGET", session, "node")
                if node is None:
                    return False
                return bool(await self._command("EXISTS", keys.node(_text(node))))

        retry = self._retry.start()
        try:
            return await retry_async(lookup, retry, is_transient, sleep=asyncio.sleep)
        except (rex.RedisError, TimeoutError) as exc:
            raise lookup_failed(f"is_online({client_id!r})", retry.failures, exc) from exc

    async def close(self) -> None:
        """Finish the publishes already queued, then close the pool if we made it.

        Cancelled meanwhile, it stops the senders (their publishes fail with
        PublishFailed: they may or may not have been published) and closes the pool all
        the same, so no connection is left open.
        """
        self._closed = True
        try:
            while self._tasks:  # a queued publish always has a sender coming for it
                await asyncio.wait(set(self._tasks))
        finally:
            for task in self._tasks:
                task.cancel()
            if self._tasks:  # a sender still using the pool would reconnect it
                await asyncio.wait(set(self._tasks))
            kept, self._kept = self._kept, None
            if kept is not None:
                await self._pool.release(kept[1])
            if self._owns_client:
                self._owns_client = False
                await self._client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- batching ------------------------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        # Its pool's connections and locks belong to that loop; redis.asyncio is the same.
        if self._loop is not None:
            raise RuntimeError("an AsyncPublisher belongs to the event loop it first ran on")
        self._loop = loop

    def _wake(self) -> None:
        """Start a sender unless one is about to start or all connections are busy.

        The sender takes its batch when it first runs, on the next turn of the loop, so
        it collects every publish queued until then; a busy sender takes the next batch
        itself when its round trip is over.
        """
        if self._senders >= self._max_connections:
            return
        assert self._loop is not None
        self._waking = True
        self._senders += 1
        task = self._loop.create_task(self._send_loop())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Pending]:
        pending = self._pending
        if len(pending) <= self._max_batch:
            self._pending = []
            return pending
        batch = pending[: self._max_batch]
        del pending[: self._max_batch]
        return batch

    async def _send_loop(self) -> None:
        # Each sender keeps taking what queued up during its round trip: the busier the
        # publisher, the bigger (and cheaper per event) the batches.
        self._waking = False
        try:
            while self._pending:
                batch = self._take()
                if self._pending and not self._waking:
                    self._wake()  # more than one batch is waiting: send them in parallel
                try:
                    await self._run(batch)
                finally:
                    _settle(batch)
        finally:
            self._senders -= 1

    # -- talking to Redis ----------------------------------------------------------------

    async def _run(self, calls: Sequence[Call]) -> None:
        """Send ``calls`` with retries; every call ends with an outcome (or we were cancelled)."""
        todo = list(calls)
        retry = self._retry.start()
        while True:
            try:
                await self._exchange(todo)
                return
            except Exception as exc:
                todo, delay = after_failure(todo, exc, retry)
            if not todo:
                return
            await asyncio.sleep(delay)

    async def _exchange(self, calls: list[Call]) -> None:
        if self._cluster is not None:
            await self._exchange_cluster(calls)
            return
        # One deadline covers connecting and the whole round trip, so our own pool runs
        # without socket_timeout: redis-py would otherwise start an extra task per send.
        pool = self._pool
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout):
                    conn = await self._checkout()
                    try:
                        await self._round_trip(conn, calls, reload=True)
                    except BaseException:
                        # Replies may still be on their way: the connection is out of step.
                        await conn.disconnect(nowait=True)
                        await pool.release(conn)
                        raise
                    await self._checkin(conn)
            except TimeoutError as exc:  # asyncio's, not redis.exceptions.TimeoutError
                raise rex.TimeoutError(f"no reply from Redis within {self._timeout} s") from exc

    async def _checkout(self) -> Any:
        """The connection kept by the last sender if it is fresh, else one from the pool.

        One kept longer than KEEP_IDLE goes back through the pool, whose checkout makes
        sure it is still good. One the server closed meanwhile fails its round trip as a
        lost connection would: retried, and the command had not run.
        """
        kept, self._kept = self._kept, None
        if kept is not None:
            since, conn = kept
            if time.monotonic() - since <= KEEP_IDLE and conn.is_connected:
                return conn
            await self._pool.release(conn)
        return await self._pool.get_connection()

    async def _checkin(self, conn: Any) -> None:
        """Keep a connection after a clean round trip (one at most, our pool only)."""
        if self._kept is None and self._owns_client and not self._closed:
            self._kept = (time.monotonic(), conn)
        else:
            await self._pool.release(conn)

    async def _exchange_cluster(self, calls: list[Call]) -> None:
        """One round trip per master owning a slot of the batch, all at once.

        A MOVED, ASK, TRYAGAIN or CLUSTERDOWN reply or a lost master fails the exchange as
        transient: the slot layout is read again before the retry resends what is open.
        """
        cluster = self._cluster
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout):
                    if self._stale:
                        self._stale = False
                        await cluster.nodes_manager.initialize()
                    else:
                        await cluster.initialize()
                    parts: dict[str, tuple[Any, list[Call]]] = {}
                    for slot, part in by_slot(calls, self._codec.keys).items():
                        node = cluster.nodes_manager.get_node_from_slot(slot)
                        parts.setdefault(node.name, (node, []))[1].extend(part)
                    done = await asyncio.gather(
                        *(self._node_trip(node, part) for node, part in parts.values()),
                        return_exceptions=True,
                    )
            except TimeoutError as exc:
                self._stale = True
                raise rex.TimeoutError(f"no reply from Redis within {self._timeout} s") from exc
            except rex.RedisError:
                self._stale = True
                raise
        for failure in done:
            if isinstance(failure, BaseException):
                self._stale = self._stale or is_transient(failure)
                raise failure

    async def _node_trip(self, node: Any, calls: list[Call]) -> None:
        conn = node.acquire_connection()
        try:
            await self._round_trip(conn, calls, reload=True)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            node.release(conn)

    async def _round_trip(self, conn: Any, calls: list[Call], *, reload: bool) -> None:
        trip = RoundTrip(calls, self._codec, self._replication)
        await conn.send_packed_command(trip.commands)
        for group in trip.groups:
            try:
                # One deadline covers the whole batch (asyncio.timeout in _exchange);
                # a per-reply timeout would cost more CPU than the reply itself.
                trip.reply(group, await conn.read_response(timeout=math.inf))
            except rex.ResponseError as exc:
                trip.error(group, exc)
        if trip.replication is not None:
            await conn.read_response(timeout=math.inf)  # the barrier's receivers
            trip.replicas(await conn.read_response(timeout=math.inf))
        if trip.missing:
            # Redis restarted or its script cache was flushed. The command did not run,
            # so sending it again is safe. (Should another connection reload the script
            # in the middle of this pipeline, a later event of a BizId could overtake an
            # earlier one here; that needs a restart mid-batch and is accepted.)
            if not reload:
                raise rex.NoScriptError("publish script vanished again right after loading")
            await conn.send_packed_command(self._codec.script_loads)
            for _ in self._codec.script_loads:
                await conn.read_response(timeout=math.inf)
            await self._round_trip(conn, trip.missing, reload=False)
        trip.finish()
