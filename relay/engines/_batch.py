"""Automatic pipelining: commands issued in one event-loop turn share one round trip.

A reconnect storm makes thousands of nodes' worth of registry and history calls at once;
through redis-py one by one each costs a pool checkout, a timeout context and a packer
call. Here every call of a turn is packed into one write on one connection and the
replies are handed back in order, each to its own caller.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.connection import ConnectionPool

__all__ = ["Batcher"]


class Batcher:
    """Queue commands; send each turn's queue as one pipeline on one pooled connection."""

    def __init__(self, pool: ConnectionPool, timeout: float, max_batch: int = 512) -> None:
        self._pool = pool
        self._timeout = timeout
        self._max_batch = max_batch
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, *args: Any) -> Any:
        """Run one command; its reply, or the redis-py exception it raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    async def call_many(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Run several commands in the same round trip; the first error is raised."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for args in commands:
            future: asyncio.Future[Any] = loop.create_future()
            self._queue.append((args, future))
            futures.append(future)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
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

    def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), self._max_batch):
            task = asyncio.ensure_future(self._round_trip(queue[start : start + self._max_batch]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _round_trip(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        done = 0
        conn = None
        try:
            conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            async with asyncio.timeout(self._timeout):
                await conn.send_packed_command(
                    conn.pack_commands([args for args, _ in batch]), check_health=False
                )
                for _, future in batch:
                    try:
                        reply = await conn.read_response(timeout=math.inf)
                    except redis_errors.ResponseError as exc:
                        if not future.done():
                            future.set_exception(exc)
                    else:
                        if not future.done():
                            future.set_result(reply)
                    done += 1
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else redis_errors.ConnectionError("cancelled")
            if isinstance(exc, TimeoutError):
                error = redis_errors.TimeoutError("redis did not answer in time")
            for _, future in batch[done:]:
                if not future.done():
                    future.set_exception(error)
            if conn is not None:
                await conn.disconnect()
            if not isinstance(exc, Exception):
                raise
        finally:
            if conn is not None:
                await self._pool.release(conn)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
