"""Connection pools for the engine and the publishers, from any URL relay.redis_url accepts.

The one place a Redis pool is built, so the engine and backend_adapter cannot drift apart
(relay-backend ships this module too). ``redis+sentinel://`` gives a pool that asks the
sentinels for the master whenever it opens a connection, so after a failover retries (and
the engine's pub/sub side, which opens its connections with the pool's
``connection_class`` and ``connection_kwargs``) reach the new master. Every pool blocks
for a free connection rather than fail, like redis-py's ``BlockingConnectionPool``.

A ``redis+cluster://`` URL has no single pool: :func:`async_cluster` and
:func:`sync_cluster` build redis-py's cluster clients (a pool per node, ``MOVED`` and
``ASK`` followed, the layout refreshed after a failover); :func:`async_pool` and
:func:`sync_pool` refuse it.

It imports redis but does no I/O itself: it sits beside the pure core, below the engines
(tests/test_layers.py lets backend_adapter import it and nothing else that imports redis).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster as async_cluster_mod
import redis.asyncio.sentinel as async_sentinel
import redis.cluster as sync_cluster_mod
import redis.sentinel as sync_sentinel

from relay.errors import ConfigError
from relay.redis_url import parse_redis_url

__all__ = ["async_cluster", "async_pool", "sync_cluster", "sync_pool"]


class _AsyncSentinel(async_sentinel.Sentinel):
    """redis-py's Sentinel client, asking for the master one call at a time.

    A successful ``discover_master`` moves the sentinel that answered to the front of
    ``self.sentinels`` by the index it had when the call reached it. Two calls that
    overlap (every connection a pool opens during a failover makes one) can swap by an
    index that is stale by then: one sentinel's client is dropped from the list and
    another appears twice (7 of 20 trials of 50 concurrent calls, one sentinel down).
    The dropped client's open connections are then closed by nobody, not even
    :meth:`aclose`, and warn when collected. redis-py 8.2 has no lock there (its open
    PR 4331 notes the same race for a rotating order).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._discovering = asyncio.Lock()

    async def discover_master(self, service_name: str) -> Any:
        async with self._discovering:
            return await super().discover_master(service_name)


class _SyncSentinel(sync_sentinel.Sentinel):
    """redis-py's Sentinel client for threads, asking for the master one call at a time
    (see :class:`_AsyncSentinel`: the same reordering, raced by threads)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._discovering = threading.Lock()

    def discover_master(self, service_name: str) -> Any:
        with self._discovering:
            return super().discover_master(service_name)


class _AsyncSentinelPool(
    async_sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool
):
    """Sentinel's master behind a pool that waits for a free connection (asyncio)."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        try:
            await super().disconnect(inuse_connections)
        finally:
            if inuse_connections:  # closing the pool (even if a connection's close failed)
                await self.sentinel_manager.aclose()


class _SyncSentinelPool(sync_sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's master behind a pool that waits for a free connection (threads)."""

    def disconnect(self, inuse_connections: bool = True) -> None:
        try:
            super().disconnect(inuse_connections)
        finally:
            if inuse_connections:
                self.sentinel_manager.close()


def _pool(url: str, options: dict[str, Any], sentinel: Any, sentinel_pool: Any, pool: Any) -> Any:
    target = parse_redis_url(url)
    if target.is_cluster:
        raise ConfigError("redis+cluster:// names a cluster, not one server: use a cluster client")
    if target.is_sentinel:
        timeout = options.get("socket_connect_timeout") or options.get("socket_timeout")
        manager = sentinel(target.sentinels, sentinel_kwargs=target.sentinel_kwargs(timeout))
        return sentinel_pool(target.service, manager, **target.master_kwargs(), **options)
    try:
        return pool.from_url(url, **options)
    except ValueError as exc:
        raise ConfigError(f"invalid redis URL: {exc}") from None


def async_pool(url: str, **options: Any) -> redis.asyncio.ConnectionPool:
    """A blocking asyncio pool for ``url``; ``options`` are redis-py pool/connection arguments."""
    result: redis.asyncio.ConnectionPool = _pool(
        url,
        options,
        _AsyncSentinel,
        _AsyncSentinelPool,
        redis.asyncio.BlockingConnectionPool,
    )
    return result


def sync_pool(url: str, **options: Any) -> redis.ConnectionPool:
    """A blocking pool for threads; see :func:`async_pool`."""
    result: redis.ConnectionPool = _pool(
        url, options, _SyncSentinel, _SyncSentinelPool, redis.BlockingConnectionPool
    )
    return result


def _cluster_arguments(url: str) -> dict[str, Any]:
    target = parse_redis_url(url)
    if not target.is_cluster:
        raise ConfigError("a cluster client needs a redis+cluster:// URL")
    return {"username": target.username, "password": target.password}


def async_cluster(url: str, **options: Any) -> async_cluster_mod.RedisCluster:
    """redis-py's asyncio cluster client for a ``redis+cluster://`` URL; ``options`` are
    RedisCluster and connection arguments."""
    nodes = [
        async_cluster_mod.ClusterNode(host, port)
        for host, port in parse_redis_url(url).cluster_nodes
    ]
    return async_cluster_mod.RedisCluster(startup_nodes=nodes, **_cluster_arguments(url), **options)


def sync_cluster(url: str, **options: Any) -> sync_cluster_mod.RedisCluster:
    """redis-py's cluster client for threads; see :func:`async_cluster`."""
    nodes = [
        sync_cluster_mod.ClusterNode(host, port)  # type: ignore[no-untyped-call]
        for host, port in parse_redis_url(url).cluster_nodes
    ]
    return sync_cluster_mod.RedisCluster(startup_nodes=nodes, **_cluster_arguments(url), **options)
