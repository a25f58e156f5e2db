"""AsyncPublisher against a real redis-server: publish, dedupe, batches, presence, failures."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio
import redis.exceptions as rex

from backend_adapter import (
    AsyncPublisher,
    ConfigError,
    EngineUnavailable,
    InvalidInput,
    PayloadTooLarge,
    PublishFailed,
    PublishResult,
)
from relay import wire
from relay.errors import InvalidClientId
from tests.backend_adapter.conftest import LiveSubscriber, dead_url, restart_later
from tests.conftest import MS
from tests.support.redis_server import RedisServer

KEYS = wire.KeySpace()


def stream_events(raw: redis.Redis, biz_id: str) -> list[wire.Event]:
    entries = raw.xrange(KEYS.log(biz_id))
    return [wire.decode_payload(sid, f[b"prev"], f[b"p"]) for sid, f in entries]


async def test_publish_returns_id_and_no_receivers_when_nobody_listens(
    publisher: AsyncPublisher,
) -> None:
    """A publish nobody listens to still gets a stream id, with receivers=0, offline."""
    result = await publisher.publish("cml", "label.created", {"n": 1})
    assert isinstance(result, PublishResult)
    assert wire.parse_id(result.id) > (0, 0)
    assert (result.receivers, result.online, result.duplicate) == (0, False, False)


async def test_publish_reaches_a_channel_subscriber(
    publisher: AsyncPublisher, redis_server: RedisServer
) -> None:
    """A raw subscriber receives '<id> <prev> <payload>' that decode_live understands."""
    async with LiveSubscriber(redis_server.url, KEYS.channel("cml")) as sub:
        first = await publisher.publish("cml", "label.created", {"label": 42, "ok": True})
        second = await publisher.publish("cml", "label.deleted", [1, "two"])
        assert first.receivers == 1
        one, two = await sub.next(), await sub.next()
    assert one is not None and two is not None
    event = wire.decode_live(one)
    assert (event.id, event.prev) == (first.id, (0, 0))
    assert (event.biz_id, event.event, event.data) == (
        "cml",
        "label.created",
        {"label": 42, "ok": True},
    )
    later = wire.decode_live(two)
    assert (later.id, later.prev, later.data) == (second.id, event.key, [1, "two"])


async def test_publish_online_only_with_a_session_and_a_listener(
    publisher: AsyncPublisher, redis_server: RedisServer, raw: redis.Redis
) -> None:
    """`online` is true when a node listens on the channel and a session record exists."""
    raw.hset(KEYS.session("cml"), mapping={"node": "n1", "session": "s-1"})
    assert (await publisher.publish("cml", "e", 1)).online is False  # no node listens
    async with LiveSubscriber(redis_server.url, KEYS.channel("cml")):
        assert (await publisher.publish("cml", "e", 2)).online is True


async def test_publish_appends_to_history_stream(
    publisher: AsyncPublisher, raw: redis.Redis
) -> None:
    """Each publish is one stream entry with its payload, prev id and a TTL."""
    a = await publisher.publish("cml", "a", {"i": 1})
    b = await publisher.publish("cml", "b", {"i": 2}, mid="m-2")
    events = stream_events(raw, "cml")
    assert [(e.id, e.event, e.data, e.mid) for e in events] == [
        (a.id, "a", {"i": 1}, None),
        (b.id, "b", {"i": 2}, "m-2"),
    ]
    assert events[1].prev == events[0].key
    assert 3600 < raw.ttl(KEYS.log("cml")) <= 5400  # history_ttl to 1.5 times it


async def test_publish_history_settings_are_applied(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    """history_size trims the stream (approximately) and history_ttl sets its expiry."""
    async with AsyncPublisher(redis_server.url, history_size=10, history_ttl=60) as pub:
        await pub.publish_many([("cml", "e", i) for i in range(500)])
    assert raw.xlen(KEYS.log("cml")) < 500  # MAXLEN ~ trims whole radix nodes
    assert 60 < raw.ttl(KEYS.log("cml")) <= 90


async def test_publish_same_mid_twice_is_a_duplicate(
    publisher: AsyncPublisher, redis_server: RedisServer, raw: redis.Redis
) -> None:
    """A repeated mid returns the first id, duplicate=True, and publishes nothing."""
    async with LiveSubscriber(redis_server.url, KEYS.channel("cml")) as sub:
        first = await publisher.publish("cml", "order.paid", {"order": 7}, mid="outbox-17")
        again = await publisher.publish("cml", "order.paid", {"order": 7}, mid="outbox-17")
        assert await sub.next() is not None
        assert await sub.next(timeout=200 * MS) is None
    assert (again.id, again.duplicate, again.receivers) == (first.id, True, 0)
    assert first.duplicate is False
    assert raw.xlen(KEYS.log("cml")) == 1
    assert 0 < raw.ttl(KEYS.mid("cml", "outbox-17")) <= 600


async def test_publish_mid_is_scoped_to_its_biz_id(publisher: AsyncPublisher) -> None:
    """The same mid on two BizIds is two events."""
    a = await publisher.publish("a", "e", 1, mid="m")
    b = await publisher.publish("b", "e", 1, mid="m")
    assert not a.duplicate and not b.duplicate


@pytest.mark.parametrize(
    ("biz_id", "event", "data", "mid", "error"),
    [
        ("bad id!", "e", 1, None, InvalidClientId),
        ("", "e", 1, None, InvalidClientId),
        ("x" * 129, "e", 1, None, InvalidClientId),
        ("cml", "", 1, None, InvalidInput),
        ("cml", "e" * 129, 1, None, InvalidInput),
        ("cml", "e", {1, 2}, None, InvalidInput),
        ("cml", "e", object(), None, InvalidInput),
        ("cml", "e", 1, "", InvalidInput),
        ("cml", "e", "x" * 70_000, None, PayloadTooLarge),
    ],
)
async def test_publish_invalid_input_raises_without_touching_redis(
    biz_id: str, event: str, data: object, mid: str | None, error: type[Exception]
) -> None:
    """Bad input raises its documented error at once, even with Redis unreachable."""
    async with AsyncPublisher(dead_url(), retries=0) as pub:
        with pytest.raises(error):
            await pub.publish(biz_id, event, data, mid)
        with pytest.raises(error):
            await pub.publish_many([("ok", "e", 1), (biz_id, event, data, mid)])


async def test_publish_payload_limit_is_configurable(redis_server: RedisServer) -> None:
    """max_payload bounds the encoded envelope."""
    async with AsyncPublisher(redis_server.url, max_payload=200) as pub:
        await pub.publish("cml", "e", "x" * 100)
        with pytest.raises(PayloadTooLarge):
            await pub.publish("cml", "e", "x" * 200)


async def test_publish_many_preserves_order_and_returns_results(
    publisher: AsyncPublisher, raw: redis.Redis
) -> None:
    """Results come back in item order; each BizId's stream holds its items in order."""
    items = [(biz, "e", {"i": i}) for i in range(30) for biz in ("a", "b")]
    results = await publisher.publish_many(items)
    assert len(results) == 60
    for biz in ("a", "b"):
        ids = [r.id for (b, _, _), r in zip(items, results, strict=True) if b == biz]
        events = stream_events(raw, biz)
        assert [e.id for e in events] == ids
        assert [e.data["i"] for e in events] == list(range(30))


async def test_publish_many_spans_several_pipelines_in_order(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    """A batch longer than max_batch goes out in order, pipeline after pipeline."""
    async with AsyncPublisher(redis_server.url, max_batch=7) as pub:
        results = await pub.publish_many(("cml", "e", i, f"m{i}") for i in range(50))
    assert [e.data for e in stream_events(raw, "cml")] == list(range(50))
    assert [r.id for r in results] == [e.id for e in stream_events(raw, "cml")]


async def test_publish_many_empty_is_a_no_op(publisher: AsyncPublisher) -> None:
    """No items, no round trip, no results."""
    assert await publisher.publish_many([]) == []


async def test_publish_many_with_mid_dedupes(publisher: AsyncPublisher, raw: redis.Redis) -> None:
    """Re-sending a batch with mids publishes nothing new."""
    items = [("cml", "e", i, f"row-{i}") for i in range(5)]
    first = await publisher.publish_many(items)
    again = await publisher.publish_many(items)
    assert [r.id for r in again] == [r.id for r in first]
    assert all(r.duplicate for r in again)
    assert raw.xlen(KEYS.log("cml")) == 5


async def test_publish_concurrent_gather_beyond_pool_size(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    """Thousands of concurrent publishes share a 2-connection pool without failing."""
    async with AsyncPublisher(redis_server.url, max_connections=2, history_size=10_000) as pub:
        results = await asyncio.gather(*(pub.publish("cml", "e", i) for i in range(3000)))
    assert len({r.id for r in results}) == 3000
    assert raw.xlen(KEYS.log("cml")) == 3000


async def test_publish_concurrent_with_callers_non_blocking_pool(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    """A caller's client whose pool raises MaxConnectionsError is never overdrawn."""
    pool = redis.asyncio.ConnectionPool.from_url(redis_server.url, max_connections=2)
    client = redis.asyncio.Redis.from_pool(pool)
    try:
        async with AsyncPublisher(client=client, max_connections=2) as pub:
            results = await asyncio.gather(
                *(pub.publish(f"b{i % 10}", "e", i) for i in range(2000)),
                *(pub.publish_many([("x", "e", i)]) for i in range(200)),
                *(pub.is_online(f"b{i}") for i in range(200)),
            )
        assert len(results) == 2400
        # The caller's client is still theirs, and still open.
        assert await client.ping()
    finally:
        await client.aclose()


async def test_publish_concurrent_keeps_call_order_of_one_task(
    publisher: AsyncPublisher, raw: redis.Redis
) -> None:
    """Successive awaited publishes of one task land in order despite other traffic."""

    async def noise() -> None:
        for i in range(200):
            await publisher.publish(f"n{i % 7}", "e", i)

    async def ordered() -> None:
        for i in range(200):
            await publisher.publish("cml", "e", i)

    await asyncio.gather(noise(), ordered(), noise())
    tail = [e.data for e in stream_events(raw, "cml")]  # trimmed to about 100 entries
    assert tail == list(range(200 - len(tail), 200))


async def test_publish_after_redis_dropped_the_idle_connection_lands_once(
    publisher: AsyncPublisher, raw: redis.Redis
) -> None:
    """Redis closing the connection a publish left (CLIENT KILL) between two publishes:
    the next one still lands, exactly once."""
    await publisher.publish("cml", "e", 1)
    assert raw.client_kill_filter(_type="normal", skipme=True) >= 1
    result = await publisher.publish("cml", "e", 2)
    assert result.id and not result.duplicate
    assert [e.data for e in stream_events(raw, "cml")] == [1, 2]


async def test_publish_after_script_flush_reloads_the_script(
    publisher: AsyncPublisher, raw: redis.Redis
) -> None:
    """NOSCRIPT (Redis restarted, cache flushed) is handled by loading the script."""
    await publisher.publish("cml", "e", 1)
    raw.script_flush()
    results = await asyncio.gather(*(publisher.publish("cml", "e", i) for i in range(20)))
    assert len({r.id for r in results}) == 20
    assert raw.xlen(KEYS.log("cml")) == 21


async def test_publish_wrong_key_type_fails_without_retry(
    publisher: AsyncPublisher, raw: redis.Redis
) -> None:
    """A command error (a foreign key in the way) raises PublishFailed at once."""
    raw.set(KEYS.log("taken"), "not a stream")
    started = time.monotonic()
    with pytest.raises(PublishFailed, match=r"'taken'.*WRONGTYPE") as info:
        await publisher.publish("taken", "e", 1)
    assert isinstance(info.value.__cause__, rex.ResponseError)
    assert "attempt" not in str(info.value)
    assert time.monotonic() - started < 500 * MS
    with pytest.raises(PublishFailed, match="'taken'"):
        await publisher.publish_many([("ok", "e", 1), ("taken", "e", 2), ("ok", "e", 3)])
    assert raw.xlen(KEYS.log("ok")) == 2  # the rest of the pipeline still ran


async def test_publish_with_redis_down_fails_after_bounded_retries(own_redis: RedisServer) -> None:
    """Redis down: PublishFailed names the BizId and cause, after the retries, quickly."""
    async with AsyncPublisher(own_redis.url, retries=3, backoff=0.05) as pub:
        await pub.publish("cml", "e", 0)
        own_redis.kill()
        started = time.monotonic()
        with pytest.raises(PublishFailed, match=r"'cml' failed after 4 attempts: .*Error") as info:
            await pub.publish("cml", "e", 1)
        elapsed = time.monotonic() - started
        assert elapsed < 2000 * MS, elapsed  # 3 sleeps of at most 0.05, 0.1, 0.2 s
        assert isinstance(info.value.__cause__, rex.ConnectionError)
        with pytest.raises(PublishFailed, match="'a'"):
            await pub.publish_many([("a", "e", 1), ("b", "e", 2)])
        with pytest.raises(EngineUnavailable, match="is_online"):
            await pub.is_online("cml")

        own_redis.start()
        result = await pub.publish("cml", "e", 2)  # a fresh Redis: reconnect + NOSCRIPT
        assert result.id and not result.duplicate


async def test_publish_with_hung_redis_times_out(own_redis: RedisServer) -> None:
    """A stopped (SIGSTOP) Redis costs about (retries + 1) * timeout, then PublishFailed."""
    async with AsyncPublisher(own_redis.url, retries=1, backoff=0.01, timeout=0.2) as pub:
        await pub.publish("cml", "e", 0)
        own_redis.stop_process()
        try:
            started = time.monotonic()
            with pytest.raises(PublishFailed, match=r"within 0\.2 s"):
                await pub.publish("cml", "e", 1)
            assert time.monotonic() - started < 1500 * MS
        finally:
            own_redis.continue_process()
        assert (await pub.publish("cml", "e", 2)).id


async def test_publish_rides_through_a_short_outage(own_redis: RedisServer) -> None:
    """An outage shorter than the retry budget is invisible to the caller."""
    async with AsyncPublisher(own_redis.url, retries=20, backoff=0.05, max_backoff=0.2) as pub:
        before = await pub.publish("cml", "e", 0)
        own_redis.kill()
        restart = restart_later(own_redis, 0.3)
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(pub.publish("cml", "e", i) for i in range(1, 50)))
            waited = time.monotonic() - started
        finally:
            restart.join()
    assert waited >= 0.25  # it really waited for Redis to come back
    assert len({r.id for r in results}) == 49 and before.id not in {r.id for r in results}


async def test_is_online_false_without_session_record(publisher: AsyncPublisher) -> None:
    """No session record: offline."""
    assert await publisher.is_online("cml") is False


async def test_is_online_true_with_record_on_a_live_node(
    publisher: AsyncPublisher, raw: redis.Redis
) -> None:
    """A session record whose node key exists: online."""
    raw.hset(KEYS.session("cml"), mapping={"node": "n1", "session": "s-1"})
    raw.set(KEYS.node("n1"), "alive", ex=10)
    assert await publisher.is_online("cml") is True


async def test_is_online_false_when_node_is_gone(
    publisher: AsyncPublisher, raw: redis.Redis
) -> None:
    """A session record pointing at a node whose key expired: offline."""
    raw.hset(KEYS.session("cml"), mapping={"node": "n1", "session": "s-1"})
    assert await publisher.is_online("cml") is False


async def test_is_online_rejects_bad_client_id(publisher: AsyncPublisher) -> None:
    """A malformed client_id raises InvalidClientId."""
    with pytest.raises(InvalidClientId):
        await publisher.is_online("no spaces")


async def test_publisher_custom_key_prefix(redis_server: RedisServer, raw: redis.Redis) -> None:
    """key_prefix moves every key, for publish and is_online alike."""
    keys = wire.KeySpace("app1")
    raw.hset(keys.session("cml"), "node", "n1")
    raw.set(keys.node("n1"), "1")
    async with AsyncPublisher(redis_server.url, key_prefix="app1") as pub:
        await pub.publish("cml", "e", 1)
        assert await pub.is_online("cml")
    assert raw.xlen(keys.log("cml")) == 1
    assert not raw.exists(KEYS.log("cml"))


async def test_publisher_close_finishes_queued_publishes(redis_server: RedisServer) -> None:
    """close() waits for publishes already queued; later ones raise PublishFailed."""
    pub = AsyncPublisher(redis_server.url)
    tasks = [asyncio.ensure_future(pub.publish("cml", "e", i)) for i in range(100)]
    await asyncio.sleep(0)
    await pub.close()
    assert all(t.done() and t.result().id for t in tasks)
    with pytest.raises(PublishFailed, match="closed"):
        await pub.publish("cml", "e", 1)
    await pub.close()  # idempotent


async def test_publisher_close_cancelled_fails_what_hangs_and_closes_its_connections(
    own_redis: RedisServer,
) -> None:
    """close() cancelled while a publish hangs (Redis stopped): that publish fails at once
    with PublishFailed, and none of the publisher's connections stays open."""
    pub = AsyncPublisher(own_redis.url, timeout=30.0, retries=0)
    await asyncio.gather(*(pub.publish("cml", "e", i) for i in range(50)))  # several open
    own_redis.stop_process()
    try:
        hanging = asyncio.ensure_future(pub.publish("cml", "e", 50))
        await asyncio.sleep(100 * MS)
        closing = asyncio.ensure_future(pub.close())
        await asyncio.sleep(100 * MS)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        with pytest.raises(PublishFailed, match="interrupted"):
            async with asyncio.timeout(2000 * MS):
                await hanging
    finally:
        own_redis.continue_process()
    with redis.Redis.from_url(own_redis.url) as raw:
        deadline = time.monotonic() + 5000 * MS
        while len(raw.client_list(_type="normal")) > 1:  # itself
            assert time.monotonic() < deadline, raw.client_list(_type="normal")
            await asyncio.sleep(20 * MS)


async def test_publisher_cancelled_publish_does_not_break_others(publisher: AsyncPublisher) -> None:
    """Cancelling a waiting publish leaves the rest of its batch unharmed."""
    tasks = [asyncio.ensure_future(publisher.publish("cml", "e", i)) for i in range(10)]
    await asyncio.sleep(0)
    tasks[3].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    assert all(isinstance(r, PublishResult) for i, r in enumerate(done) if i != 3)


async def test_publisher_keeps_a_callers_client_open(redis_server: RedisServer) -> None:
    """A client passed in is reused and left open on close."""
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        async with AsyncPublisher(client=client) as pub:
            await pub.publish("cml", "e", 1)
        assert await client.exists(KEYS.log("cml")) == 1
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"redis_url": "redis://x", "client": object()},
        {"redis_url": "redis://x", "history_size": 0},
        {"redis_url": "redis://x", "retries": -1},
        {"redis_url": "redis://x", "timeout": 0},
        {"redis_url": "redis://x", "key_prefix": "a{b}"},
    ],
)
def test_publisher_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    """Bad construction raises ConfigError."""
    with pytest.raises(ConfigError):
        AsyncPublisher(**kwargs)  # type: ignore[arg-type]
