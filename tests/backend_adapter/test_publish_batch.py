"""Single events of several BizIds share one script call (publish_batch.lua).

A pipeline of the publishers carries events of many BizIds at once (concurrent
``publish`` calls of an AsyncPublisher, a ``publish_many``). On a single Redis those of
BizIds with one event each go in one EVALSHA; each caller must still get its own result
(id, receivers, online, duplicate) or its own error, and what Redis keeps and what a
receiver sees must be what publish.lua leaves. On a Redis Cluster each stays its own call;
the contract tests run there too.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from backend_adapter import AsyncPublisher, Publisher
from relay import wire
from relay.errors import PublishFailed
from tests.backend_adapter.conftest import LiveSubscriber, assert_chained, history
from tests.support.node import Listener
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer

KEYS = wire.KeySpace("relay")
FIXTURES = Path(__file__).parents[1] / "fixtures"
BIZ_IDS = [f"shop-{n}" for n in range(30)]


Reader = redis.Redis | redis.RedisCluster


@pytest.fixture(params=["redis", "cluster"])
def deployment(request: pytest.FixtureRequest) -> Iterator[tuple[str, Reader]]:
    """A single Redis (where the batch script is used) or a Redis Cluster (where it is
    not): its URL, and a plain client to look at what the publishes left."""
    reader: Reader
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        url, reader = server.url, redis.Redis.from_url(server.url)
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        url, reader = cluster.url, redis.RedisCluster(host="127.0.0.1", port=cluster.masters()[0])
    yield url, reader
    reader.close()


async def test_concurrent_publishes_each_get_their_own_result(
    deployment: tuple[str, Reader],
) -> None:
    """Three rounds of concurrent publishes to 30 BizIds: every caller's id is its event's
    in history, in order per BizId, each naming its predecessor."""
    url, reader = deployment
    async with AsyncPublisher(url) as publisher:
        rounds = []
        for n in range(3):
            rounds.append(
                await asyncio.gather(*(publisher.publish(biz, "e", n) for biz in BIZ_IDS))
            )
    for i, biz in enumerate(BIZ_IDS):
        events = history(reader, biz)
        assert [e.data for e in events] == [0, 1, 2]
        assert [e.id for e in events] == [results[i].id for results in rounds]
        assert_chained(events)
    assert not any(r.online or r.receivers or r.duplicate for results in rounds for r in results)


async def test_mids_dedupe_within_a_batch_and_against_earlier_publishes(
    deployment: tuple[str, Reader],
) -> None:
    """A mid seen before comes back as a duplicate carrying the first publish's id; the
    others in the same pipeline are published once each."""
    url, reader = deployment
    async with AsyncPublisher(url) as publisher:
        first = await publisher.publish("shop-1", "e", "a", mid="m-a")
        results = await asyncio.gather(
            publisher.publish("shop-0", "e", "x", mid="m-x"),
            publisher.publish("shop-1", "e", "a", mid="m-a"),  # seen before
            publisher.publish("shop-2", "e", "y"),
            publisher.publish("shop-3", "e", "z", mid="m-a"),  # same mid, other BizId: new
        )
        again = await asyncio.gather(
            publisher.publish("shop-0", "e", "x", mid="m-x"),
            publisher.publish("shop-3", "e", "z", mid="m-a"),
        )
    assert [r.duplicate for r in results] == [False, True, False, False]
    assert results[1].id == first.id
    assert [(r.id, r.duplicate) for r in again] == [(results[0].id, True), (results[3].id, True)]
    assert [e.data for e in history(reader, "shop-1")] == ["a"]
    for biz, data in (("shop-0", "x"), ("shop-2", "y"), ("shop-3", "z")):
        assert [e.data for e in history(reader, biz)] == [data]


def test_a_wrong_key_fails_its_own_publish_only(
    deployment: tuple[str, Reader],
) -> None:
    """A BizId whose history key holds a string: its publish fails, with Redis's reason;
    the other events of the same pipeline are published, before and after it."""
    url, reader = deployment
    reader.set(KEYS.log("shop-5"), "not a stream")
    items = [(biz, "e", 1) for biz in BIZ_IDS[:10]]
    with Publisher(url) as publisher, pytest.raises(PublishFailed, match="WRONGTYPE") as failed:
        publisher.publish_many(items)
    assert "'shop-5'" in str(failed.value)
    assert reader.get(KEYS.log("shop-5")) == b"not a stream"
    assert [len(history(reader, biz)) for biz in BIZ_IDS[:10] if biz != "shop-5"] == [1] * 9


async def test_a_wrong_key_fails_only_its_caller_among_concurrent_ones(
    deployment: tuple[str, Reader],
) -> None:
    url, reader = deployment
    reader.set(KEYS.log("shop-5"), "not a stream")
    async with AsyncPublisher(url) as publisher:
        outcomes = await asyncio.gather(
            *(publisher.publish(biz, "e", 1) for biz in BIZ_IDS[:10]), return_exceptions=True
        )
    assert [isinstance(o, PublishFailed) for o in outcomes] == [i == 5 for i in range(10)]
    assert all(isinstance(o, wire.PublishResult) for i, o in enumerate(outcomes) if i != 5)
    assert [len(history(reader, biz)) for biz in BIZ_IDS[:10] if biz != "shop-5"] == [1] * 9


def one_slot(count: int) -> list[str]:
    """``count`` BizIds whose keys hash to the same Redis Cluster slot."""
    seen: dict[int, list[str]] = {}
    for n in itertools.count():
        biz_id = f"s{n}"
        found = seen.setdefault(key_slot(KEYS.log(biz_id).encode()), [])
        found.append(biz_id)
        if len(found) == count:
            return found
    raise AssertionError("unreachable")


async def test_cluster_biz_ids_of_one_slot_share_a_call(redis_cluster: RedisCluster) -> None:
    """On a cluster, concurrent publishes to BizIds of one slot go in one call to its
    master (and a mid seen before is still a duplicate)."""
    biz_ids = one_slot(3)
    master = redis.Redis(port=redis_cluster.master_of_slot(key_slot(KEYS.log(biz_ids[0]).encode())))
    async with AsyncPublisher(redis_cluster.url) as publisher:
        first = await publisher.publish_many([(b, "e", 0, f"m-{b}") for b in biz_ids])
        master.config_resetstat()
        results = await asyncio.gather(
            *(publisher.publish(b, "e", 1) for b in biz_ids),
            publisher.publish(biz_ids[0], "e", 0, f"m-{biz_ids[0]}"),
        )
    assert int(master.info("commandstats")["cmdstat_evalsha"]["calls"]) == 2  # the batch, a run
    master.close()
    assert (results[3].id, results[3].duplicate) == (first[0].id, True)
    reader = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.masters()[0])
    for biz_id, one, result in zip(biz_ids, first, results, strict=False):
        assert [e.id for e in history(reader, biz_id)] == [one.id, result.id]
    reader.close()


async def test_receivers_and_online_per_event(redis_server: RedisServer, raw: redis.Redis) -> None:
    """In one batch: a BizId with a subscriber and a session record (online), one with a
    subscriber only (received, not online), one with neither."""
    raw.hset(KEYS.session("on"), "node", "n1")
    async with (
        LiveSubscriber(redis_server.url, KEYS.channel("on")) as on,
        LiveSubscriber(redis_server.url, KEYS.channel("heard")) as heard,
        AsyncPublisher(redis_server.url) as publisher,
    ):
        results = await asyncio.gather(
            publisher.publish("on", "e", 1),
            publisher.publish("heard", "e", 2),
            publisher.publish("nobody", "e", 3),
        )
        assert await on.next() is not None
        assert await heard.next() is not None
    assert [(r.receivers, r.online) for r in results] == [(1, True), (1, False), (0, False)]


async def test_a_client_receives_its_events_from_a_batch_in_order(
    publisher: AsyncPublisher, raw: redis.Redis, client: Listener
) -> None:
    """Concurrent publishes to cml and 29 other BizIds, five rounds: cml's client gets its
    five, in order, each with its id, and the node says it is online."""
    mine = []
    for n in range(5):
        results = await asyncio.gather(
            publisher.publish("cml", "e", n), *(publisher.publish(b, "e", n) for b in BIZ_IDS[1:])
        )
        mine.append(results[0])
    messages = await client.wait_messages(5)
    assert [m["data"] for m in messages] == [0, 1, 2, 3, 4]
    assert [m["id"] for m in messages] == [r.id for r in mine]
    assert all(r.online and r.receivers == 1 for r in mine)
    assert_chained(history(raw, "cml"))


def test_one_call_per_max_per_call_events(redis_server: RedisServer, raw: redis.Redis) -> None:
    """250 BizIds with one event each and a run of one BizId: script calls of at most
    max_per_call events (100): three batches and one run."""
    with Publisher(redis_server.url, max_per_call=100) as publisher:
        publisher.publish_many([("warm", "e", None)] * 2 + [("w2", "e", None), ("w3", "e", None)])
        raw.config_resetstat()
        items = [(f"b{n}", "e", n) for n in range(250)] + [("run", "e", n) for n in range(5)]
        results = publisher.publish_many(items)
    assert int(raw.info("commandstats")["cmdstat_evalsha"]["calls"]) == 4
    assert len(results) == 255
    assert [e.data for e in history(raw, "run")] == list(range(5))
    assert [e.id for e in history(raw, "b249")] == [results[249].id]


def test_a_batch_survives_a_flushed_script_cache(
    sync_publisher: Publisher, raw: redis.Redis
) -> None:
    sync_publisher.publish_many([(biz, "e", 0) for biz in BIZ_IDS])
    raw.script_flush()
    sync_publisher.publish_many([(biz, "e", 1) for biz in BIZ_IDS])
    for biz in BIZ_IDS:
        assert [e.data for e in history(raw, biz)] == [0, 1]


def test_batches_interleaved_with_other_scripts_keep_the_chain_and_ttls(
    sync_publisher: Publisher, raw: redis.Redis
) -> None:
    """publish_batch.lua, publish.lua, publish_run.lua and the two earlier versions of
    publish.lua take turns on the same BizIds: one chain each, and the TTLs publish.lua
    keeps (history above the TTL, the newest id at most as long)."""
    earlier = [(FIXTURES / f"publish_v{v}.lua").read_text() for v in (1, 2)]
    for round_ in range(4):
        sync_publisher.publish_many([(biz, "e", f"{round_}.batch") for biz in BIZ_IDS[:5]])
        sync_publisher.publish(BIZ_IDS[round_], "e", f"{round_}.single")
        sync_publisher.publish_many([(BIZ_IDS[round_ + 1], "e", f"{round_}.run")] * 2)
        keys, args = wire.publish_call(
            KEYS,
            BIZ_IDS[2],
            wire.encode_payload(BIZ_IDS[2], "e", f"{round_}.old"),
            mid=None,
            history_size=100,
            history_ttl=3600,
            dedupe_window=600,
        )
        raw.eval(earlier[round_ % 2], len(keys), *keys, *args)
    for biz in BIZ_IDS[:5]:
        events = history(raw, biz)
        assert_chained(events)
        assert [e.data for e in events if str(e.data).endswith("batch")] == [
            f"{n}.batch" for n in range(4)
        ]
        if biz != BIZ_IDS[2]:  # the earlier scripts wrote last there
            assert raw.get(KEYS.channel(biz)) == events[-1].id.encode()
            assert raw.pttl(KEYS.channel(biz)) <= raw.pttl(KEYS.log(biz))
            assert raw.pttl(KEYS.log(biz)) > 3_600_000


def test_the_batch_script_leaves_what_publish_lua_leaves(raw: redis.Redis) -> None:
    """The same events through publish_batch.lua and through publish.lua, on twin BizIds:
    the same replies, history entries and TTLs."""

    def stored(biz_id: str) -> list[tuple[str, object]]:
        return [(e.event, e.data) for e in history(raw, biz_id)]

    raw.hset(KEYS.session("b-on"), "node", "n1")
    raw.hset(KEYS.session("s-on"), "node", "n1")
    events = [("on", None), ("new", None), ("on", "m1"), ("on", "m1"), ("new", "m2")]
    for name, mid in events:
        payload = wire.encode_payload("x", "e", name, mid=mid)
        keys, args = wire.publish_call(
            KEYS,
            f"s-{name}",
            payload,
            mid=mid,
            history_size=100,
            history_ttl=60,
            dedupe_window=600,
        )
        single = raw.eval(wire.PUBLISH_LUA, 4, *keys, *args)
        keys, args = wire.publish_batch_call(
            KEYS,
            [(f"b-{name}", payload, mid), ("other", payload, None)],
            history_size=100,
            history_ttl=60,
            dedupe_window=600,
        )
        batch = raw.eval(wire.PUBLISH_BATCH_LUA, len(keys), *keys, *args)
        assert batch[1:4] == single[1:]  # receivers, online, duplicate
        assert batch[5:] == [0, 0, 0]
    for name in ("on", "new"):
        assert stored(f"s-{name}") == stored(f"b-{name}")
        for key in (KEYS.log, KEYS.channel):
            assert abs(raw.pttl(key(f"s-{name}")) - raw.pttl(key(f"b-{name}"))) < 1000
