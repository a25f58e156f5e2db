"""The Redis engine on a Redis Cluster (``redis+cluster://``).

Commands and scripts go through redis-py's asyncio ``RedisCluster`` (a pool per node,
``MOVED``/``ASK`` followed, the slot map refreshed after a failover). Each script's keys
share the BizId's hash tag ``{B}`` (tests/engines/test_cluster_slots.py runs every one on
a real cluster), so redis-py routes a call to the master of its slot. :class:`ClusterBatcher`
stands in for the single-server :class:`~relay.engines.redis._batch.Batcher`: redis-py
sends each call to its slot's master; the epoch and the history read, which live in
different slots, go concurrently instead of in one pipeline.

Live delivery still uses the node's one classic pub/sub connection (``SUBSCRIBE``): a
cluster forwards every ``PUBLISH`` to every node, so that connection may be on any node.
:class:`AnyNode` gives the subscriber the next known node on each (re)connect, so when
the node it read from dies it moves to another and the usual resubscribe and gap repair
follow. The costs, which sharded pub/sub (``SSUBSCRIBE`` on each slot's master) would
remove and which are why ``relay serve`` does not accept a cluster yet:

- every publish crosses the cluster bus to every node;
- ``PUBLISH`` counts only the subscribers of the node that ran it, so a publish's
  ``receivers`` and ``online`` are wrong unless the reader happens to be on that master;
- a BizId's events may reach the reader out of order when its slot moves (the old
  owner's message crosses the bus, the new one's may not): ``prev`` still links them, so
  the hub repairs from history (GAP) and drops the late one (STALE).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection

__all__ = ["AnyNode", "ClusterBatcher"]


class ClusterBatcher:
    """The Batcher's interface over a cluster client: each call to its slot's master."""

    def __init__(self, cluster: RedisCluster, timeout: float) -> None:
        self._cluster = cluster
        self._timeout = timeout

    async def call(self, *args: Any) -> Any:
        """Run one command; its reply, or the redis-py exception it raised."""
        async with asyncio.timeout(self._timeout):
            return await self._cluster.execute_command(*args)

    async def call_replicated(self, *args: Any) -> Any:
        """Like :meth:`call` (``min_replicas`` is refused for a cluster at start)."""
        return await self.call(*args)

    async def call_many(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Run several commands concurrently (they may live on different shards)."""
        replies = await asyncio.gather(*(self.call(*args) for args in commands))
        return list(replies)

    async def close(self) -> None:
        """Nothing of its own to close: the cluster client is the engine's."""


class AnyNode:
    """What the subscriber needs of a pool: a connection class and the keyword arguments
    of the next node to try, in turn over the masters the cluster client knows (replicas
    would do for classic pub/sub, but a master's death is then the one event to handle)."""

    connection_class = Connection

    def __init__(self, cluster: RedisCluster, kwargs: dict[str, Any]) -> None:
        self._cluster = cluster
        self._kwargs = kwargs
        self._turn = itertools.count()

    @property
    def connection_kwargs(self) -> dict[str, Any]:
        nodes = sorted((node.host, node.port) for node in self._cluster.get_primaries())
        if not nodes:  # not initialised yet: the seed nodes of the URL
            nodes = [
                (node.host, node.port)
                for node in self._cluster.nodes_manager.startup_nodes.values()
            ]
        host, port = nodes[next(self._turn) % len(nodes)]
        return {**self._kwargs, "host": host, "port": port}
