"""The Redis engine on a Redis Cluster (``redis+cluster://``): commands and scripts.

Commands and scripts go through redis-py's asyncio ``RedisCluster`` (a pool per node,
``MOVED``/``ASK`` followed, the slot map refreshed after a failover). Each script's keys
share the BizId's hash tag ``{B}`` (tests/engines/test_cluster_slots.py runs every one on
a real cluster), so redis-py routes a call to the master of its slot. :class:`ClusterBatcher`
stands in for the single-server :class:`~relay.engines.redis._batch.Batcher`: redis-py
sends each call to its slot's master; the epoch and the history read, which live in
different slots, go concurrently instead of in one pipeline.

With ``min_replicas`` a publish cannot go through redis-py's routing: ``WAIT`` must run
on the connection that wrote, to the master of the publish's slot, after a barrier write
in a slot of that master (a cluster sends ``PUBLISH`` over its bus, not to the replicas).
So :meth:`ClusterBatcher.call_replicated` queues the publishes of one event-loop turn and
sends each master's share as one pipeline on one of that master's connections, ending
with ``SET <prefix>:{B}:barrier "" PX <ms>`` and ``WAIT`` (:func:`relay.wire.wait_commands`,
what the publishers of backend_adapter send too). A publish refused with ``MOVED``,
``ASK``, ``TRYAGAIN`` or ``CLUSTERDOWN`` did not run: the slot map is read again and it
is resent, a few times within the command timeout.

Live delivery is sharded pub/sub, one reader per master: :mod:`relay.engines.redis._sharded`.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Iterable
from typing import Any, Final

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from relay.engines.redis._batch import ReplicasBehind
from relay.engines.redis._compat import pack_commands
from relay.wire import KeySpace, replicas_behind, wait_commands

__all__ = ["ClusterBatcher"]

# The replies that say a command did not run because its slot is elsewhere or moving.
_REDIRECTED: Final = (
    redis_errors.MovedError,
    redis_errors.AskError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
)
_ROUNDS: Final = 4  # sends of one replicated call, the first included
_PAUSE: Final = 0.05  # seconds before a resend, doubled each round

_Item = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


class ClusterBatcher:
    """The Batcher's interface over a cluster client: each call to its slot's master."""

    def __init__(
        self,
        cluster: RedisCluster,
        timeout: float,
        max_batch: int = 512,
        *,
        keys: KeySpace | None = None,
        min_replicas: int = 0,
        replica_timeout: float = 0.5,
    ) -> None:
        self._cluster = cluster
        self._timeout = timeout
        self._max_batch = max_batch
        self._keys = keys or KeySpace("relay")
        self._min_replicas = min_replicas
        self._replica_timeout = replica_timeout
        self._queue: list[_Item] = []
        self._scheduled = False
        self._stale = False  # the slot map must be read again before the next send
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, *args: Any) -> Any:
        """Run one command; its reply, or the redis-py exception it raised."""
        async with asyncio.timeout(self._timeout):
            return await self._cluster.execute_command(*args)

    async def call_replicated(self, *args: Any) -> Any:
        """Like :meth:`call`; with ``min_replicas``, answered once that many replicas of the
        slot's master have it (``args`` is an ``EVALSHA`` whose first key names the slot).

        ReplicasBehind if they did not acknowledge within ``replica_timeout`` (the
        command ran on the master all the same).
        """
        if not self._min_replicas:
            return await self.call(*args)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    async def call_many(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Run several commands concurrently (they may live on different shards)."""
        replies = await asyncio.gather(*(self.call(*args) for args in commands))
        return list(replies)

    def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), self._max_batch):
            batch = queue[start : start + self._max_batch]
            task = asyncio.ensure_future(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._settle, batch))

    def _settle(self, batch: list[_Item], task: Any) -> None:
        """Fail what a send left unanswered (it was cancelled by :meth:`close`)."""
        self._tasks.discard(task)
        for _, future in batch:
            if not future.done():
                future.set_exception(redis_errors.ConnectionError("cancelled"))

    async def _send(self, batch: list[_Item]) -> None:
        """Each master's share in one pipeline, all masters at once; resend what was
        redirected. Every call is answered within ``timeout``."""
        todo = batch
        redirected: Exception | None = None
        try:
            async with asyncio.timeout(self._timeout):
                for attempt in range(_ROUNDS):
                    if attempt:
                        await asyncio.sleep(_PAUSE * 2 ** (attempt - 1))
                    if self._stale:
                        self._stale = False
                        await self._cluster.nodes_manager.initialize()
                    parts: dict[str, tuple[Any, list[_Item]]] = {}
                    for item in todo:
                        node = self._cluster.nodes_manager.get_node_from_slot(_slot(item[0]))
                        parts.setdefault(node.name, (node, []))[1].append(item)
                    redirects = await asyncio.gather(
                        *(self._trip(node, part) for node, part in parts.values())
                    )
                    redirected = next((exc for exc in redirects if exc is not None), None)
                    todo = [item for item in todo if not item[1].done()]
                    if not todo:
                        return
        except Exception as exc:
            self._stale = True
            error = exc
            if isinstance(exc, TimeoutError):
                error = redis_errors.TimeoutError("redis did not answer in time")
            _fail((future for _, future in todo), error)
            return
        # The slot kept moving: retryable, like a master that is failing over.
        self._stale = True
        error = redirected or redis_errors.TryAgainError("slot kept moving")
        _fail((future for _, future in todo), error)

    async def _trip(self, node: Any, part: list[_Item]) -> Exception | None:
        """One pipeline to ``node``: the calls, the barrier, ``WAIT``. Returns the error
        of a call that was redirected (left unanswered, to be resent), or None.

        Any other failure fails every call of the part that has no answer yet."""
        try:
            conn = node.acquire_connection()
        except redis_errors.RedisError as exc:  # MaxConnectionsError
            _fail((future for _, future in part), exc)
            return None
        redirected: Exception | None = None
        try:
            barrier = self._keys.slot_barrier(_hash_tag(part[0][0]))
            commands = [args for args, _ in part]
            commands.extend(
                wait_commands(self._min_replicas, self._replica_timeout, barrier, in_slot=True)
            )
            await conn.send_packed_command(pack_commands(conn, commands), check_health=False)
            held: list[tuple[asyncio.Future[Any], Any]] = []
            for _, future in part:
                try:
                    reply = await conn.read_response(timeout=math.inf)
                except _REDIRECTED as exc:
                    redirected = exc
                    self._stale = True
                except redis_errors.ResponseError as exc:
                    if not future.done():
                        future.set_exception(exc)
                else:
                    held.append((future, reply))
            # The barrier's reply, then WAIT's. Either refused (the slot moved, the node
            # was demoted to a replica): the held calls are not vouched for and fail as
            # retryable; the redirected ones are still resent.
            refused: redis_errors.ResponseError | None = None
            replies: list[Any] = []
            for _ in range(2):
                try:
                    replies.append(await conn.read_response(timeout=math.inf))
                except redis_errors.ResponseError as exc:
                    refused = refused or exc
                    self._stale = True
            if refused is None:
                short = replicas_behind(replies[1], self._min_replicas, self._replica_timeout)
            else:
                short = f"the barrier before WAIT was refused: {refused}"
            for future, reply in held:
                if future.done():
                    continue
                if short is None:
                    future.set_result(reply)
                else:
                    future.set_exception(ReplicasBehind(short))
        except Exception as exc:
            await conn.disconnect(nowait=True)
            self._stale = True
            _fail((future for _, future in part), exc)
        except BaseException:
            await conn.disconnect(nowait=True)  # cancelled: _send answers the calls
            raise
        finally:
            node.release(conn)
        return redirected

    async def close(self) -> None:
        """Cancel what is in flight (its calls fail); the cluster client is the engine's."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _slot(args: tuple[Any, ...]) -> int:
    """The slot of an ``EVALSHA sha numkeys key …``: its first key's."""
    key = args[3]
    return key_slot(key if isinstance(key, bytes) else str(key).encode())


def _hash_tag(args: tuple[Any, ...]) -> str:
    """The ``{B}`` of an ``EVALSHA``'s first key: every key of a BizId carries it."""
    key = args[3].decode() if isinstance(args[3], bytes) else str(args[3])
    return key[key.index("{") + 1 : key.index("}")]


def _fail(futures: Iterable[asyncio.Future[Any]], error: Exception) -> None:
    """Answer with ``error`` each future that has no answer yet."""
    for future in futures:
        if not future.done():
            future.set_exception(error)
