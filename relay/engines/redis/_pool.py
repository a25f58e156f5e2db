"""The engine's connection pool, built from any Redis URL that relay.redis_url accepts.

With ``redis+sentinel://`` the pool asks the sentinels for the master's address whenever
it opens a connection (redis-py's ``SentinelConnectionPool``), and it still blocks for a
free connection instead of failing like redis-py's plain pools do. The pub/sub side opens
its own connections with the pool's ``connection_class`` and ``connection_kwargs``, so
after a failover it, too, reconnects to the master the sentinels name.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from relay.errors import ConfigError
from relay.redis_url import parse_redis_url

__all__ = ["connection_pool"]


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The master named by Sentinel, behind a pool that waits for a free connection."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        try:
            await super().disconnect(inuse_connections)
        finally:
            if inuse_connections:  # closing the pool (even if a connection's close failed)
                await self.sentinel_manager.aclose()


def connection_pool(url: str, **options: Any) -> ConnectionPool:
    """A blocking pool for ``url``; ``options`` are redis-py pool and connection arguments."""
    target = parse_redis_url(url)
    if not target.is_sentinel:
        try:
            pool: ConnectionPool = BlockingConnectionPool.from_url(url, **options)
        except ValueError as exc:
            raise ConfigError(f"invalid redis URL: {exc}") from None
        return pool
    timeout = options.get("socket_connect_timeout") or options.get("socket_timeout")
    manager = Sentinel(target.sentinels, sentinel_kwargs=target.sentinel_kwargs(timeout))
    return _BlockingSentinelPool(  # type: ignore[no-untyped-call]  # unannotated upstream
        target.service, manager, **target.master_kwargs(), **options
    )
