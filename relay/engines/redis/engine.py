"""The Redis engine itself: its connections, its lifecycle and its health.

The interfaces live beside it (``broker``, ``sessions``, ``nodes``); this class joins
them into one :class:`~relay.engine.Engine` and owns the pool, the batcher and the
pub/sub subscriber they share.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING, Any, Final

import redis.asyncio as aioredis
import structlog
from redis import exceptions as redis_errors
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from relay.engine import EngineHandler, EngineHealth, EngineOptions
from relay.engines.redis._base import (
    ACK_LUA,
    CLAIM_LUA,
    EPOCH_LUA,
    FORGET_LUA,
    as_float,
    translated,
)
from relay.engines.redis._batch import Batcher
from relay.engines.redis._cluster import ClusterBatcher
from relay.engines.redis._compat import hiredis_parser
from relay.engines.redis._sharded import ShardedSubscriber
from relay.engines.redis._subscriber import Subscriber, Timings, as_text, stop_task
from relay.engines.redis.broker import RedisBroker
from relay.engines.redis.nodes import RedisNodeRegistry
from relay.engines.redis.sessions import RedisSessionRegistry
from relay.errors import EngineError
from relay.redis_pool import async_cluster
from relay.redis_pool import async_pool as redis_pool
from relay.redis_url import parse_redis_url
from relay.wire import (
    HISTORY_LUA,
    PUBLISH_CLUSTER_LUA,
    PUBLISH_LUA,
    PUBLISH_RUN_CLUSTER_LUA,
    PUBLISH_RUN_LUA,
    KeySpace,
)

if TYPE_CHECKING:
    from relay.engine import Broker, Engine, NodeRegistry, SessionRegistry

__all__ = ["RedisEngine"]

_CLIENT_NAME_UNSAFE: Final = re.compile(r"[^!-~]")


class RedisEngine(RedisBroker, RedisSessionRegistry, RedisNodeRegistry):
    """Broker and registry on Redis; one pub/sub connection per node (per master of a
    Redis Cluster).

    ``connection_pool`` replaces the pool built from ``url`` (tests pass fakeredis's);
    the engine does not close a pool it was given. Timings are in seconds: commands give
    up after ``command_timeout``, sockets after ``socket_timeout``; the canary runs every
    ``canary_interval`` and must come back within ``canary_deadline``; reconnects back
    off from ``backoff_base`` to ``backoff_cap``; :meth:`subscribe` waits at most
    ``subscribe_timeout`` for Redis to confirm.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        options: EngineOptions | None = None,
        *,
        connection_pool: ConnectionPool | None = None,
        socket_timeout: float = 2.0,
        command_timeout: float = 5.0,
        command_retries: int = 1,
        max_connections: int = 64,
        canary_interval: float = 1.0,
        canary_deadline: float = 3.0,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
        subscribe_timeout: float = 5.0,
    ) -> None:
        self.options = options or EngineOptions()
        self._keys = KeySpace(self.options.key_prefix)
        self._socket_timeout = socket_timeout
        self._command_timeout = command_timeout
        self._timings = Timings(
            socket_timeout,
            canary_interval,
            canary_deadline,
            backoff_base,
            backoff_cap,
            subscribe_timeout,
        )
        self._owns_pool = connection_pool is None
        connection: dict[str, Any] = {
            "protocol": 2,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "retry": Retry(
                ExponentialWithJitterBackoff(cap=0.5, base=0.05),
                command_retries,
                supported_errors=(redis_errors.ConnectionError,),
            ),
        }
        self._cluster = connection_pool is None and parse_redis_url(url).is_cluster
        if self._cluster:
            # redis-py's cluster client parses with hiredis by itself when it is installed.
            cluster = async_cluster(url, max_connections=max_connections, **connection)
            target = parse_redis_url(url)
            auth = {"username": target.username, "password": target.password}
            # The shard readers' connections: like the pool's, to each master in turn.
            self._shard_connection = {**connection, **auth, **hiredis_parser()}
            self._redis = cluster  # type: ignore[assignment]
            self._batch = ClusterBatcher(  # type: ignore[assignment]
                cluster,
                command_timeout,
                keys=self._keys,
                min_replicas=self.options.min_replicas,
                replica_timeout=self.options.replica_timeout,
            )
        else:
            if connection_pool is None:
                connection_pool = redis_pool(
                    url,
                    max_connections=max_connections,
                    timeout=socket_timeout,
                    **connection,
                    **hiredis_parser(),
                )
            self._pool = connection_pool
            self._redis = aioredis.Redis(connection_pool=connection_pool)
            self._batch = Batcher(
                connection_pool,
                command_timeout,
                min_replicas=self.options.min_replicas,
                replica_timeout=self.options.replica_timeout,
                barrier=self._keys.barrier(),
            )
        # A cluster forwards a PUBLISH to every node and counts only the receivers of the
        # node that ran it: there the scripts SPUBLISH to the slot's master (sharded pub/sub).
        publish, publish_run = (
            (PUBLISH_CLUSTER_LUA, PUBLISH_RUN_CLUSTER_LUA)
            if self._cluster
            else (PUBLISH_LUA, PUBLISH_RUN_LUA)
        )
        self._publish_command = "SPUBLISH" if self._cluster else "PUBLISH"
        self._publish_script = self._redis.register_script(publish)
        self._publish_run_script = self._redis.register_script(publish_run)
        self._history_script = self._redis.register_script(HISTORY_LUA)
        self._claim_script = self._redis.register_script(CLAIM_LUA)
        self._forget_script = self._redis.register_script(FORGET_LUA)
        self._ack_script = self._redis.register_script(ACK_LUA)
        self._epoch_script = self._redis.register_script(EPOCH_LUA)
        self._reap_after = max(60.0, 6 * self.options.node_ttl)
        self._reaped_at = 0.0
        self._reaper: asyncio.Task[None] | None = None
        self._epoch_key = f"{self.options.key_prefix}:epoch"
        self._log: Any = structlog.get_logger(__name__)
        self._node_id = ""
        self._handler: EngineHandler | None = None
        self._started_at = 0.0
        self._sub: Subscriber | ShardedSubscriber | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registered = False
        self._closed = False

    @property
    def ready(self) -> bool:
        return self._sub is not None and self._sub.ready and not self._closed

    async def start(self, node_id: str, handler: EngineHandler) -> None:
        """Connect, subscribe the control channel, register the node; or EngineUnavailable.

        A start that failed leaves nothing running and may be tried again (a node waits
        for Redis at start-up); :meth:`close` ends the engine whether it started or not.
        """
        if self._closed or self._sub is not None:
            raise EngineError("a RedisEngine starts once")
        self._node_id = node_id
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._started_at = time.time()
        self._log = structlog.get_logger(__name__, node=node_id)
        client_name = _CLIENT_NAME_UNSAFE.sub("_", f"relay-sub:{node_id}")
        if self._cluster:
            self._sub = ShardedSubscriber(
                self._redis,  # type: ignore[arg-type]  # the cluster client
                self._shard_connection,
                handler,
                self._keys.control(node_id),
                client_name,
                self._timings,
                self._log,
            )
        else:
            self._sub = Subscriber(
                self._pool,
                self._redis,
                handler,
                self._keys.control(node_id),
                client_name,
                self._timings,
                self._log,
            )
        try:
            async with self._guard("start"):
                await self._epoch_script(keys=[self._epoch_key])
            await self._sub.start()
            await self.heartbeat(0)
            self._registered = True
        except BaseException:
            sub, self._sub = self._sub, None
            await sub.close()
            raise
        self._sub.start_canary()
        self._log.info("engine.started", engine=self.name)

    async def close(self) -> None:
        """Stop the subscriber, deregister the node, close connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            await stop_task(self._reaper)
        if self._sub is not None:
            await self._sub.close()
        if self._registered:
            try:
                with translated("deregister"):
                    async with asyncio.timeout(self._socket_timeout):
                        pipe = self._redis.pipeline(transaction=False)
                        pipe.delete(self._keys.node(self._node_id))
                        pipe.zrem(self._keys.nodes(), self._node_id)
                        await pipe.execute()
            except EngineError as exc:
                self._log.warning("engine.deregister_failed", error=str(exc))
        await self._batch.close()
        try:
            if self._cluster:
                await self._redis.aclose()
            else:
                await self._redis.aclose(close_connection_pool=self._owns_pool)
        except Exception as exc:
            self._log.warning("engine.close_failed", error=type(exc).__name__)
        self._log.info("engine.closed")

    async def health(self) -> EngineHealth:
        """PING for the round trip, then INFO (if the server has it) for version and load."""
        try:
            async with self._guard("health"):
                began = time.perf_counter()
                await self._redis.ping()
                latency = round((time.perf_counter() - began) * 1000, 3)
        except EngineError as exc:
            return EngineHealth(self.name, self.ready, False, error=str(exc))
        try:
            async with self._guard("health"):
                info = await self._redis.info()
        except EngineError:
            info = {}  # INFO may be renamed away (rename-command) or missing (fakeredis)
        return EngineHealth(
            self.name,
            self.ready,
            True,
            latency_ms=latency,
            version=as_text(info.get("redis_version", "")),
            used_memory=int(as_float(info["used_memory"])) if "used_memory" in info else None,
            clients=(
                int(as_float(info["connected_clients"])) if "connected_clients" in info else None
            ),
        )


if TYPE_CHECKING:  # mypy proves the Redis engine fits each interface

    def _fits_every_interface(
        engine: RedisEngine,
    ) -> tuple[Broker, SessionRegistry, NodeRegistry, Engine]:
        return engine, engine, engine, engine
