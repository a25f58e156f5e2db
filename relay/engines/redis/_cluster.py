"""The Redis engine on a Redis Cluster (``redis+cluster://``): commands and scripts.

Each script's keys share the BizId's hash tag ``{B}`` (tests/engines/test_cluster_slots.py
runs every one on a real cluster), so a call belongs to the master of its slot.
:class:`ClusterBatcher` stands in for the single-server
:class:`~relay.engines.redis._batch.Batcher` (both are a
:class:`~relay.engines.redis._batch.TurnQueue`): it queues the calls of one event-loop turn,
groups them by the master that owns each one's slot in redis-py's slot map, and sends each
master's share as one pipeline on one of that master's connections, every master at once.
Through redis-py's ``RedisCluster.execute_command``, one call at a time (a pool checkout,
a timer and a write each), 64 concurrent publishes went at less than half the rate
(docs/operations.md, "Redis Cluster"). A command whose slot it cannot tell (not an
``EVALSHA`` with keys nor an ``SPUBLISH``) still goes through redis-py.

A call refused with ``MOVED``, ``ASK``, ``TRYAGAIN`` or ``CLUSTERDOWN`` did not run: the
slot map is read again and it is resent, a few times within the command timeout, then
failed as retryable; the other calls of its pipeline are answered as they come. ``ASK``
is not followed (redis-py's own following of it ends in "TTL exhausted" for these
scripts): a slot migrating longer than the resends fails its publishes. A connection that
fails mid-pipeline is dropped and the calls it left unanswered are resent the same way,
as redis-py's own retries did (a call that ran but whose reply was lost runs again: a
publish with a mid comes back a duplicate). Any other error reply answers its own call.

With ``min_replicas`` (:meth:`ClusterBatcher.call_replicated`) ``WAIT`` must run on the
connection that wrote, to the master of the publish's slot, after a barrier write in a slot
of that master (a cluster sends ``PUBLISH`` over its bus, not to the replicas): a
master's share that holds such a call ends with ``SET <prefix>:{B}:barrier "" PX <ms>``
and ``WAIT`` (:func:`relay.wire.wait_commands`, what the publishers of backend_adapter
send too), and its replicated calls are answered after WAIT's reply.

Live delivery is sharded pub/sub, one reader per master: :mod:`relay.engines.redis._sharded`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from typing import Any, Final, cast

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from relay.engines.redis._batch import TurnQueue, _Item
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
_ROUNDS: Final = 4  # sends of one call, the first included
_PAUSE: Final = 0.05  # seconds before a resend, doubled each round


class ClusterBatcher(TurnQueue):
    """The Batcher's interface over a cluster: each turn's calls, one pipeline per master."""

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
        super().__init__(
            timeout, max_batch, min_replicas=min_replicas, replica_timeout=replica_timeout
        )
        self._cluster = cluster
        self._keys = keys or KeySpace("relay")
        self._stale = False  # the slot map must be read again before the next send

    async def call(self, *args: Any) -> Any:
        """Run one command; its reply, or the redis-py exception it raised."""
        if _slot(args) is None:
            async with asyncio.timeout(self._timeout):
                return await self._cluster.execute_command(*args)
        return await self._call(args, False)

    async def call_replicated(self, *args: Any) -> Any:
        """Like :meth:`call`; with ``min_replicas``, answered once that many replicas of the
        slot's master have it (``args`` is an ``EVALSHA`` whose first key names the slot).

        ReplicasBehind if they did not acknowledge within ``replica_timeout`` (the
        command ran on the master all the same).
        """
        if not self._min_replicas:
            return await self.call(*args)
        return await self._call(args, True)

    async def call_many(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Run several commands in this turn's pipelines (they may live on different
        masters); the first error is raised."""
        replies = await asyncio.gather(*(self.call(*args) for args in commands))
        return list(replies)

    async def _send(self, batch: list[_Item]) -> None:
        """Each master's share in one pipeline, all masters at once; resend what was
        redirected or lost with its connection. Every call is answered within ``timeout``."""
        todo = batch
        resend: Exception | None = None
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
                        slot = cast(int, _slot(item[0]))  # call routes the slotless elsewhere
                        node = self._cluster.nodes_manager.get_node_from_slot(slot)
                        parts.setdefault(node.name, (node, []))[1].append(item)
                    errors = await asyncio.gather(
                        *(self._trip(node, part) for node, part in parts.values())
                    )
                    resend = next((exc for exc in errors if exc is not None), resend)
                    todo = [item for item in todo if not item[1].done()]
                    if not todo:
                        return
        except Exception as exc:
            self._stale = True
            error = exc
            if isinstance(exc, TimeoutError):
                error = redis_errors.TimeoutError("redis did not answer in time")
            _fail((future for _, future, _ in todo), error)
            return
        # The slot kept moving, or the master kept failing: retryable, like a failover.
        self._stale = True
        error = resend or redis_errors.TryAgainError("slot kept moving")
        _fail((future for _, future, _ in todo), error)

    async def _trip(self, node: Any, part: list[_Item]) -> Exception | None:
        """One pipeline to ``node``: the calls, and if any is replicated the barrier and
        ``WAIT``. Returns why it left calls unanswered (to be resent), or None."""
        resend: Exception | None = None
        try:
            conn = node.acquire_connection()
        except redis_errors.RedisError as exc:  # MaxConnectionsError
            _fail((future for _, future, _ in part), exc)
            return None
        replicated = [item for item in part if item[2]]
        try:
            commands = [args for args, _, _ in part]
            if replicated:
                barrier = self._keys.slot_barrier(_hash_tag(replicated[0][0]))
                commands.extend(
                    wait_commands(self._min_replicas, self._replica_timeout, barrier, in_slot=True)
                )
            await conn.send_packed_command(pack_commands(conn, commands), check_health=False)
            held: list[tuple[asyncio.Future[Any], Any]] = []
            for _, future, waits in part:
                try:
                    reply = await conn.read_response(timeout=math.inf)
                except _REDIRECTED as exc:
                    resend = exc
                    self._stale = True
                except redis_errors.ResponseError as exc:
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if waits:
                        held.append((future, reply))
                    elif not future.done():
                        future.set_result(reply)
            if replicated:
                self._vouch(held, await self._barrier_replies(conn))
        except Exception as exc:
            await conn.disconnect(nowait=True)
            self._stale = True
            if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError):
                resend = exc  # the plain calls without a reply are resent
                _fail((future for _, future, waits in part if waits), exc)
            else:
                _fail((future for _, future, _ in part), exc)
        except BaseException:
            await conn.disconnect(nowait=True)  # cancelled: _send answers the calls
            raise
        finally:
            node.release(conn)
        return resend

    async def _barrier_replies(self, conn: Any) -> str | None:
        """Read the barrier's reply, then WAIT's: why the held calls are not vouched for,
        or None. Either refused (the slot moved, the node was demoted to a replica): the
        held calls fail as retryable; the redirected ones are still resent."""
        refused: redis_errors.ResponseError | None = None
        replies: list[Any] = []
        for _ in range(2):
            try:
                replies.append(await conn.read_response(timeout=math.inf))
            except redis_errors.ResponseError as exc:
                refused = refused or exc
                self._stale = True
        if refused is not None:
            return f"the barrier before WAIT was refused: {refused}"
        return replicas_behind(replies[1], self._min_replicas, self._replica_timeout)


def _slot(args: tuple[Any, ...]) -> int | None:
    """The slot of an ``EVALSHA sha numkeys key …`` (its first key's) or of an
    ``SPUBLISH channel …``; None for anything else (redis-py routes it)."""
    name = str(args[0]).upper()
    if name in ("EVALSHA", "EVAL") and len(args) > 3 and int(args[2]) > 0:
        key = args[3]
    elif name == "SPUBLISH" and len(args) > 1:
        key = args[1]
    else:
        return None
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
