"""A fast extra: both publishers on fakeredis (the real-Redis tests are the ones that count)."""

from __future__ import annotations

import fakeredis
import pytest

from backend_adapter import AsyncPublisher, Publisher
from relay import wire

KEYS = wire.KeySpace()


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


async def test_fakeredis_async_publish_dedupe_and_batch(server: fakeredis.FakeServer) -> None:
    """Publish, mid dedupe, publish_many and is_online work on fakeredis too."""
    client = fakeredis.FakeAsyncRedis(server=server)
    async with AsyncPublisher(client=client) as pub:
        first = await pub.publish("cml", "e", {"a": 1}, mid="m1")
        again = await pub.publish("cml", "e", {"a": 1}, mid="m1")
        batch = await pub.publish_many([("cml", "e", 2), ("other", "e", 3)])
        await client.hset(KEYS.session("cml"), "node", "n1")
        await client.set(KEYS.node("n1"), "1")
        online = await pub.is_online("cml")
    assert (again.id, again.duplicate) == (first.id, True)
    assert len(batch) == 2 and online
    assert await client.xlen(KEYS.log("cml")) == 2
    await client.aclose()


def test_fakeredis_sync_publish(server: fakeredis.FakeServer) -> None:
    """The sync Publisher works on fakeredis."""
    client = fakeredis.FakeRedis(server=server)
    with Publisher(client=client) as pub:
        result = pub.publish("cml", "e", 1)
        assert not pub.is_online("cml")
    entries = client.xrange(KEYS.log("cml"))
    assert entries[0][0].decode() == result.id
