"""Shared fixtures: a private Redis per test session (flushed per test), time units."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.node import DEFLATE, Listener, NodeUnderTest
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer
from tests.support.sentinel import PASSWORD, SentinelDeployment
from tests.support.timing import MS as MS  # re-exported: many modules import it from here


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under RELAY_TEST_STRICT=1 (CI) a skipped test fails: a missing tool or service is
    an install step to fix, never a test counted as passing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("RELAY_TEST_STRICT") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under RELAY_TEST_STRICT=1: {reason}"


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_server(shared_redis: RedisServer) -> RedisServer:
    """The session's private Redis, empty at the start of each test."""
    shared_redis.flush()
    return shared_redis


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to kill, stop and restart."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
async def sentinel_deployment() -> AsyncIterator[SentinelDeployment]:
    """A Sentinel deployment of this test's own (master, 2 replicas, 3 sentinels)."""
    found = await asyncio.to_thread(SentinelDeployment(password=PASSWORD).start)
    yield found
    await asyncio.to_thread(found.close)


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster().start()
    yield cluster
    cluster.close()


@pytest.fixture
def redis_cluster(shared_cluster: RedisCluster) -> RedisCluster:
    """The session's private Redis Cluster (3 masters, 3 replicas), empty at the start of
    each test. Tests that kill or move things use ``own_cluster``."""
    shared_cluster.flush()
    return shared_cluster


@pytest.fixture
async def own_cluster() -> AsyncIterator[RedisCluster]:
    """A Redis Cluster of this test's own (3 masters, 3 replicas) to kill masters of and
    move slots in."""
    cluster = await asyncio.to_thread(RedisCluster().start)
    yield cluster
    await asyncio.to_thread(cluster.close)


@pytest.fixture
async def listeners() -> AsyncIterator[list[Listener]]:
    """Listeners opened with ``tests.support.node.listen``; closed at the end of the test."""
    opened: list[Listener] = []
    yield opened
    await asyncio.gather(*(listener.close() for listener in opened))


@pytest.fixture
async def started_nodes() -> AsyncIterator[list[NodeUnderTest]]:
    """Nodes a test started (append them); stopped at the end of the test."""
    started: list[NodeUnderTest] = []
    yield started
    for node in started:
        await node.stop()


@pytest.fixture(autouse=True)
def deflate_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the compressed pass (RELAY_TEST_DEFLATE=1), every aiohttp WebSocket client the
    tests make (Listener, RelayClient, bare ws_connect) offers permessage-deflate, as
    browsers do, unless a test chose ``compress`` itself. The library's default, not
    Relay's code, is what changes."""
    if not DEFLATE:
        return
    ws_connect = aiohttp.ClientSession.ws_connect

    def offering(self: aiohttp.ClientSession, url: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("compress", 15)
        return ws_connect(self, url, **kwargs)

    monkeypatch.setattr(aiohttp.ClientSession, "ws_connect", offering)
