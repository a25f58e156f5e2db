"""The Redis engine on a Redis Cluster (``redis+cluster://``): commands and scripts.

Commands and scripts go through redis-py's asyncio ``RedisCluster`` (a pool per node,
``MOVED``/``ASK`` followed, the slot map refreshed after a failover). Each script's keys
share the BizId's hash tag ``{B}`` (tests/engines/test_cluster_slots.py runs every one on
a real cluster), so redis-py routes a call to the master of its slot. :class:`ClusterBatcher`
stands in for the single-server :class:`~relay.engines.redis._batch.Batcher`: redis-py
sends each call to its slot's master; the epoch and the history read, which live in
different slots, go concurrently instead of in one pipeline.

Live delivery is sharded pub/sub, one reader per master: :mod:`relay.engines.redis._sharded`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.cluster import RedisCluster

__all__ = ["ClusterBatcher"]


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
