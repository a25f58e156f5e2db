"""What the Redis engine's parts share: the scripts, error translation, and the state.

:class:`RedisBase` declares the state :class:`~relay.engines.redis.engine.RedisEngine`
builds, so the broker and the two registries can each live in a module of their own
(one per interface of :mod:`relay.engine`) and still be one object.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from importlib import resources
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import ConnectionPool
from redis.commands.core import AsyncScript

from relay.engine import EngineHandler, EngineOptions
from relay.engines.redis._batch import Batcher, ReplicasBehind
from relay.engines.redis._subscriber import Subscriber, Timings, reraise_swallowed_cancel
from relay.errors import EngineError, EngineUnavailable, RelayError
from relay.wire import KeySpace

if TYPE_CHECKING:
    from relay.engines.redis._sharded import ShardedSubscriber

__all__ = [
    "ACK_LUA",
    "CLAIM_LUA",
    "EPOCH_LUA",
    "FORGET_LUA",
    "Guard",
    "RedisBase",
    "as_float",
    "translated",
]


def _lua(name: str) -> str:
    return resources.files("relay").joinpath("lua", name).read_text(encoding="utf-8")


# The registry scripts, one file each in relay/lua/ (the key and argument layout is at
# the head of each). Each touches one key, so they run in Redis Cluster too.
CLAIM_LUA: Final = _lua("claim.lua")
FORGET_LUA: Final = _lua("forget.lua")
EPOCH_LUA: Final = _lua("epoch.lua")
ACK_LUA: Final = _lua("ack.lua")


_UNREACHABLE: Final = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    TimeoutError,
    OSError,
    # A Redis Cluster with no master answering, a slot without a master mid-failover,
    # CLUSTERDOWN: redis-py's cluster client raises these, the first two outside RedisError.
    redis_errors.RedisClusterUnreachableError,
    redis_errors.SlotNotCoveredError,
    redis_errors.ClusterDownError,
    # A slot that kept moving under a call of a cluster's pipeline (ClusterBatcher resends
    # it a few times): it did not run, and a retry a moment later goes through.
    redis_errors.MovedError,
    redis_errors.AskError,
    redis_errors.TryAgainError,
)


def _translate(what: str, exc: BaseException) -> RelayError | None:
    """The relay.errors error for a redis or socket error; None for anything else."""
    if isinstance(exc, RelayError):
        return None
    if isinstance(exc, ReplicasBehind):
        return EngineUnavailable(f"redis replication ({what}): {exc}")
    if isinstance(exc, _UNREACHABLE):
        # redis-py's text names the host and port (never a password) and the OS's reason.
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return EngineUnavailable(f"redis is unreachable ({what}: {why})")
    if isinstance(exc, redis_errors.RedisError | redis_errors.RedisClusterException):
        return EngineError(f"redis failed ({what}): {exc}")
    return None


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn redis and socket errors into relay.errors; RelayErrors pass through."""
    try:
        yield
    except Exception as exc:
        error = _translate(what, exc)
        if error is None:
            raise
        raise error from exc


class Guard:
    """``async with`` around engine commands: bound the time, translate errors, and re-raise
    a cancellation redis-py swallowed.

    A slotted class rather than an @asynccontextmanager, and no timer of its own for
    commands the batcher already bounds: it wraps every command of every connect, where a
    generator-based manager and a timer per command showed as ~10% of a node's CPU.
    """

    __slots__ = ("_cancels", "_loop", "_task", "_timeout", "_what")

    def __init__(
        self, what: str, timeout: float | None, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._what = what
        self._loop = loop  # given, current_task() needs no get_running_loop() (a getpid())
        self._timeout = None if timeout is None else asyncio.timeout(timeout)
        self._task: asyncio.Task[Any] | None = None
        self._cancels = 0

    async def __aenter__(self) -> None:
        task = self._task = asyncio.current_task(self._loop)
        self._cancels = task.cancelling() if task is not None else 0
        if self._timeout is not None:
            await self._timeout.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timeout is not None:
            try:
                await self._timeout.__aexit__(exc_type, exc, tb)
            except TimeoutError as expired:
                exc = expired
        if exc is None:
            reraise_swallowed_cancel(self._task, self._cancels)
            return
        error = _translate(self._what, exc)
        if error is not None:
            raise error from exc


def as_float(value: Any) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return 0.0
    return result


class RedisBase:
    """The state of a Redis engine and the plumbing every command goes through."""

    options: EngineOptions
    _keys: KeySpace
    _socket_timeout: float
    _command_timeout: float
    _timings: Timings
    _owns_pool: bool
    _pool: ConnectionPool
    _redis: aioredis.Redis
    _batch: Batcher
    _cluster: bool  # a Redis Cluster: sharded pub/sub, one slot per script
    _publish_command: str  # PUBLISH, or SPUBLISH on a cluster (control messages)
    _publish_script: AsyncScript
    _publish_run_script: AsyncScript
    _history_script: AsyncScript
    _claim_script: AsyncScript
    _forget_script: AsyncScript
    _ack_script: AsyncScript
    _epoch_script: AsyncScript
    _reap_after: float
    _reaped_at: float
    _reaper: asyncio.Task[None] | None
    _epoch_key: str
    _log: Any
    _node_id: str
    _handler: EngineHandler | None
    _started_at: float
    _sub: Subscriber | ShardedSubscriber | None
    _loop: asyncio.AbstractEventLoop | None  # the started engine's
    _registered: bool
    _closed: bool

    async def _evalsha(
        self, script: Any, keys: list[str], args: list[Any], *, replicated: bool = False
    ) -> Any:
        """Run a registered script through the batcher; load it once on NOSCRIPT.

        ``replicated``: answered once ``min_replicas`` replicas have its writes.
        """
        call = self._batch.call_replicated if replicated else self._batch.call
        try:
            return await call("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            pass
        async with asyncio.timeout(self._command_timeout):  # see _history_and_epoch
            script.sha = await self._redis.script_load(script.script)
            return await call("EVALSHA", script.sha, len(keys), *keys, *args)

    def _guard(self, what: str, *, batched: bool = False) -> Guard:
        """Refuse after close; bound the time (``batched``: the batcher does), translate errors."""
        if self._closed:
            raise EngineError("engine is closed")
        return Guard(what, None if batched else self._command_timeout, self._loop)

    def _subscriber(self) -> Subscriber | ShardedSubscriber:
        if self._closed:
            raise EngineError("engine is closed")
        if self._sub is None:
            raise EngineError("engine is not started")
        return self._sub
