"""Engine fixtures: a recording handler double and started engines of every kind."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

from relay.engine import Control, Engine, EngineOptions, SessionRecord
from relay.engines.memory import MemoryEngine
from relay.engines.redis import RedisEngine
from relay.redis_pool import async_cluster
from relay.wire import Event, KeySpace
from tests.conftest import MS

KINDS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.redis),
    "fakeredis",
    pytest.param("cluster", marks=pytest.mark.redis),  # a real 3-master Redis Cluster
]
REDIS_KINDS = [pytest.param("redis", marks=pytest.mark.redis), "fakeredis"]

_node_ids = itertools.count(1)


class RecordingHandler:
    """An EngineHandler that records every callback and lets a test wait for a condition."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.controls: list[Control] = []
        self.resubscribes = 0
        self.resubscribed: list[list[str] | None] = []  # the BizIds named each time (None: all)
        self.health: list[bool] = []
        self._changed = asyncio.Event()

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def on_control(self, control: Control) -> None:
        self.controls.append(control)
        self._changed.set()

    def on_resubscribed(self, biz_ids: Collection[str] | None = None) -> None:
        self.resubscribes += 1
        self.resubscribed.append(None if biz_ids is None else sorted(biz_ids))
        self._changed.set()

    def on_health(self, healthy: bool) -> None:
        self.health.append(healthy)
        self._changed.set()

    def events_for(self, biz_id: str) -> list[Event]:
        return [e for e in self.events if e.biz_id == biz_id]

    async def wait_until(self, condition: Callable[[], bool], timeout_ms: float = 3000) -> None:
        """Return once ``condition()`` holds; fail the test after ``timeout_ms``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms * MS
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"condition not met within {timeout_ms:.0f} ms")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 50 * MS)):
                    await self._changed.wait()


@dataclass
class Harness:
    """A started engine, its handler, and a plain Redis client beside it (None for memory)."""

    kind: str
    engine: Engine
    handler: RecordingHandler
    node_id: str
    keys: KeySpace
    raw: aioredis.Redis | None

    async def expire_history(self, biz_id: str) -> None:
        """Make ``biz_id``'s history expire now, as its TTL would."""
        if isinstance(self.engine, MemoryEngine):
            self.engine._streams[biz_id].expires_at = 0.0  # no clock to turn in memory
            return
        assert self.raw is not None
        await self.raw.pexpire(self.keys.log(biz_id), 1)
        await asyncio.sleep(10 * MS)


def record(h: Harness, client_id: str, session: str, since: str | None = None) -> SessionRecord:
    """A session record of ``client_id`` on ``h``'s node, claimed now."""
    return SessionRecord(client_id, h.node_id, session, since, time.time())


StartEngine = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_engine(request: pytest.FixtureRequest) -> AsyncIterator[StartEngine]:
    """Build and start engines of ``request.param``'s kind; close them all afterwards.

    ``url`` points a "redis" engine at another server (e.g. ``own_redis``); other keyword
    arguments go to RedisEngine. All fakeredis engines of one test share one FakeServer.
    """
    kind: str = request.param
    opened: list[Harness] = []
    cleanups: list[Callable[[], Awaitable[Any]]] = []
    fake_server = fakeredis.FakeServer()

    async def start(
        options: EngineOptions | None = None, *, url: str | None = None, **kwargs: Any
    ) -> Harness:
        options = options or EngineOptions()
        raw: aioredis.Redis | None = None
        engine: Engine
        if kind == "memory":
            engine = MemoryEngine(options)
        elif kind == "redis":
            if url is None:
                url = request.getfixturevalue("redis_server").url
            engine = RedisEngine(url, options, **kwargs)
            raw = aioredis.Redis.from_url(url, protocol=2)
        elif kind == "cluster":
            url = request.getfixturevalue("redis_cluster").url
            engine = RedisEngine(url, options, **kwargs)
            raw = async_cluster(url, protocol=2)  # type: ignore[assignment]  # same commands
        else:
            fake = fakeredis.FakeAsyncRedis(server=fake_server, protocol=2)
            cleanups.append(lambda: fake.aclose(close_connection_pool=True))
            engine = RedisEngine(
                "redis://fake", options, connection_pool=fake.connection_pool, **kwargs
            )
            raw = fakeredis.FakeAsyncRedis(server=fake_server, protocol=2)
        if raw is not None:
            cleanups.append(raw.aclose)
        handler = RecordingHandler()
        node_id = f"node-{next(_node_ids)}"
        harness = Harness(kind, engine, handler, node_id, KeySpace(options.key_prefix), raw)
        opened.append(harness)
        await engine.start(node_id, handler)
        return harness

    yield start
    for harness in opened:
        await harness.engine.close()
    for cleanup in reversed(cleanups):
        await cleanup()


@pytest.fixture
async def harness(start_engine: StartEngine) -> Harness:
    """One started engine with default options."""
    return await start_engine()
