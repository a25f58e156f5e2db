"""Automatic pipelining: commands issued in one event-loop turn share one round trip.

A reconnect storm makes thousands of nodes' worth of registry and history calls at once;
through redis-py one by one each costs a pool checkout, a timeout context and a packer
call. Here every call of a turn is packed into one write on one connection and the
replies are handed back in order, each to its own caller.

Every call is answered within ``timeout`` of its turn, from the pool checkout to the
last reply: one timer per batch bounds them all, so callers need no timer of their own.

A connection that served a round trip cleanly is kept for the next one for up to
``KEEP_IDLE`` seconds, instead of going back to redis-py's pool: a checkout there (its
condition, lock and timeout, and a probe read of the socket) and the release cost about
as much Python as the round trip itself, and connects arriving one at a time make one
round trip each (node CPU per connect, tests/bench_connect.py: see docs/benchmarks.md).
One kept longer goes back through the pool, whose checkout makes sure it is still good.

A call made with :meth:`Batcher.call_replicated` is answered only once ``WAIT`` says
``min_replicas`` replicas hold it: the batch then ends with ``PUBLISH <barrier> ""`` and
``WAIT``. The barrier is a write of this connection after every write the master had done
before, so WAIT also covers a publish that came back as a duplicate of one made earlier
(``WAIT`` alone only covers the connection's own writes). One WAIT serves the batch.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from typing import Any, Final

from redis import exceptions as redis_errors
from redis.asyncio.connection import ConnectionPool

from relay.engines.redis._compat import pack_commands, send_packed, still_open
from relay.wire import replicas_behind, wait_commands

__all__ = ["Batcher", "ReplicasBehind", "TurnQueue"]

_Item = tuple[tuple[Any, ...], "asyncio.Future[Any]", bool]  # command, caller, replicated

KEEP_IDLE: Final = 1.0  # seconds a connection is kept between round trips, outside the pool
KEEP_MAX: Final = 4  # connections kept at most


class ReplicasBehind(redis_errors.TimeoutError):
    """Fewer replicas than asked for acknowledged a write in time; retrying is safe."""


class TurnQueue:
    """The calls of one event-loop turn, queued and handed to :meth:`_send` together.

    What :class:`Batcher` and the cluster's ``ClusterBatcher`` share: every call is
    answered, by ``_send`` or, if that was cancelled before it answered, by
    :meth:`_settle`; ``max_batch`` calls at most go to one ``_send``.
    """

    def __init__(
        self,
        timeout: float,
        max_batch: int,
        *,
        min_replicas: int,
        replica_timeout: float,
    ) -> None:
        self._timeout = timeout
        self._max_batch = max_batch
        self._min_replicas = min_replicas
        self._replica_timeout = replica_timeout
        self._queue: list[_Item] = []
        self._scheduled = False
        # Kept from the first call: on Python 3.11 each get_running_loop() (and each
        # ensure_future) is a getpid() system call, and every connect makes 3 calls here.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _call(self, args: tuple[Any, ...], replicated: bool) -> Any:
        return await self._enqueue(args, replicated)

    def _enqueue(self, args: tuple[Any, ...], replicated: bool) -> asyncio.Future[Any]:
        """Queue one call for this turn's send; the future is its answer."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future, replicated))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), self._max_batch):
            batch = queue[start : start + self._max_batch]
            task = asyncio.ensure_future(self._send(batch), loop=self._loop)
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._settle, batch))

    def _settle(self, batch: list[_Item], task: Any) -> None:
        """Fail what a send left unanswered: it was cancelled by :meth:`close`, maybe
        before it began (then nothing of it ran)."""
        self._tasks.discard(task)
        for _, future, _ in batch:
            if not future.done():
                future.set_exception(redis_errors.ConnectionError("cancelled"))

    async def _send(self, batch: list[_Item]) -> None:
        """Run the calls of ``batch`` and answer each, within ``timeout``."""
        raise NotImplementedError

    @staticmethod
    def _vouch(held: list[tuple[asyncio.Future[Any], Any]], short: str | None) -> None:
        """Answer the replicated calls held for WAIT: their replies, or ReplicasBehind
        with ``short`` (why the replicas are not known to have them)."""
        for future, reply in held:
            if future.done():
                continue
            if short is None:
                future.set_result(reply)
            else:
                future.set_exception(ReplicasBehind(short))

    async def close(self) -> None:
        """Cancel what is in flight (its calls fail); the connections are the engine's."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Batcher(TurnQueue):
    """Queue commands; send each turn's queue as one pipeline on one pooled connection."""

    def __init__(
        self,
        pool: ConnectionPool,
        timeout: float,
        max_batch: int = 512,
        *,
        min_replicas: int = 0,
        replica_timeout: float = 0.5,
        barrier: str = "relay:barrier",
    ) -> None:
        super().__init__(
            timeout, max_batch, min_replicas=min_replicas, replica_timeout=replica_timeout
        )
        self._pool = pool
        self._barrier = wait_commands(min_replicas, replica_timeout, barrier, in_slot=False)
        self._kept: list[tuple[float, Any]] = []  # (since, connection), newest last

    async def call(self, *args: Any) -> Any:
        """Run one command; its reply, or the redis-py exception it raised."""
        return await self._call(args, False)

    async def call_replicated(self, *args: Any) -> Any:
        """Like :meth:`call`; with ``min_replicas``, answered once that many replicas have it.

        ReplicasBehind if they did not acknowledge within ``replica_timeout`` (the
        command ran on the master all the same).
        """
        return await self._call(args, self._min_replicas > 0)

    async def call_many(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Run several commands in the same round trip; the first error is raised."""
        futures = [self._enqueue(args, False) for args in commands]
        replies = []
        error: BaseException | None = None
        for future in futures:
            try:
                replies.append(await future)
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return replies

    async def _connection(self) -> Any:
        """A kept connection if one is fresh, else one from the pool."""
        kept = self._kept
        if kept:
            since, conn = kept.pop()
            if time.monotonic() - since <= KEEP_IDLE and still_open(conn):
                return conn
            kept.append((since, conn))
            stale, self._kept = kept, []
            for _, old in stale:
                await self._pool.release(old)
        return await self._pool.get_connection()  # type: ignore[no-untyped-call]

    async def _send(self, batch: list[_Item]) -> None:
        conn = None
        clean = False
        waiting = any(replicated for _, _, replicated in batch)
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._connection()
                commands = [args for args, _, _ in batch]
                if waiting:
                    commands.extend(self._barrier)
                await send_packed(conn, pack_commands(conn, commands))
                held: list[tuple[asyncio.Future[Any], Any]] = []
                for _, future, replicated in batch:
                    try:
                        reply = await conn.read_response(timeout=math.inf)
                    except redis_errors.ResponseError as exc:
                        if not future.done():
                            future.set_exception(exc)
                    else:
                        if replicated:
                            held.append((future, reply))
                        elif not future.done():
                            future.set_result(reply)
                if waiting:
                    await conn.read_response(timeout=math.inf)  # the barrier's receivers
                    acked = await conn.read_response(timeout=math.inf)
                    self._vouch(
                        held, replicas_behind(acked, self._min_replicas, self._replica_timeout)
                    )
            clean = True
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else redis_errors.ConnectionError("cancelled")
            if isinstance(exc, TimeoutError):
                error = redis_errors.TimeoutError("redis did not answer in time")
            for _, future, _ in batch:  # answered ones are done; held ones fail too
                if not future.done():
                    future.set_exception(error)
            if conn is not None:
                await conn.disconnect()
            if not isinstance(exc, Exception):
                raise
        finally:
            if conn is not None:
                if clean and len(self._kept) < KEEP_MAX and still_open(conn):
                    self._kept.append((time.monotonic(), conn))
                else:
                    await self._pool.release(conn)

    async def close(self) -> None:
        """Cancel what is in flight; the kept connections go back to the pool."""
        await super().close()
        kept, self._kept = self._kept, []
        for _, conn in kept:
            await self._pool.release(conn)
