"""Fixtures for backend_adapter tests: publishers on the private Redis, and named doubles."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from backend_adapter import AsyncPublisher, Publisher
from relay import wire
from tests.backend_adapter.sql_support import postgres_database, sqlite_url
from tests.conftest import MS
from tests.support.node import Listener, NodeUnderTest, node_settings
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"  # >= 32 bytes: PyJWT warns about less


def dead_url() -> str:
    """A Redis URL nothing listens on: any attempt to use it fails at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


def restart_later(server: RedisServer, delay: float) -> threading.Thread:
    """Start ``server`` again after ``delay`` seconds, from a thread; join it afterwards."""

    def run() -> None:
        time.sleep(delay)
        server.start()

    thread = threading.Thread(target=run, name="restart-redis")
    thread.start()
    return thread


class LiveSubscriber:
    """A raw redis-py pub/sub subscriber on one channel, as a relay node would be."""

    def __init__(self, url: str, channel: str) -> None:
        self.client = redis.asyncio.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.channel = channel

    async def __aenter__(self) -> LiveSubscriber:
        await self.pubsub.subscribe(self.channel)
        # Wait for the confirmation so nothing published next is missed.
        await self.pubsub.get_message(timeout=1000 * MS)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()
        await self.client.aclose()

    async def next(self, timeout: float = 1000 * MS) -> bytes | None:
        """The next message's data, or None if nothing arrives within ``timeout``."""
        message = await self.pubsub.get_message(timeout=timeout)
        return None if message is None else bytes(message["data"])


def history(reader: redis.Redis | redis.RedisCluster, biz_id: str) -> list[wire.Event]:
    """The events stored for ``biz_id`` (prefix ``relay``), oldest first."""
    return [
        wire.decode_payload(sid, fields[b"prev"], fields[b"p"])
        for sid, fields in reader.xrange(wire.KeySpace("relay").log(biz_id))
    ]


def assert_chained(events: list[wire.Event]) -> None:
    """Each event names the one before it as its predecessor, the first none."""
    prev = wire.ID_ZERO
    for event in events:
        assert event.prev == prev, f"{event.id} names {event.prev}"
        prev = event.key


@pytest.fixture
async def publisher(redis_server: RedisServer) -> AsyncIterator[AsyncPublisher]:
    async with AsyncPublisher(redis_server.url) as pub:
        yield pub


@pytest.fixture
def sync_publisher(redis_server: RedisServer) -> Iterator[Publisher]:
    with Publisher(redis_server.url) as pub:
        yield pub


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client to look at what a publish left in Redis."""
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


# -- a relay node and a client, and databases, for the end-to-end tests -------------------


@pytest.fixture
async def relay(redis_server: RedisServer) -> AsyncIterator[NodeUnderTest]:
    """A relay node on the private Redis."""
    node = await NodeUnderTest(node_settings(redis_url=redis_server.url)).start()
    yield node
    await node.stop()


@pytest.fixture
async def client(relay: NodeUnderTest) -> AsyncIterator[Listener]:
    """A WebSocket client of BizId ``cml`` on ``relay``."""
    listener = await Listener(relay.ws_url("cml")).connect()
    yield listener
    await listener.close()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A private PostgreSQL database for this module, dropped afterwards."""
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return str(request.getfixturevalue("pg_url"))
