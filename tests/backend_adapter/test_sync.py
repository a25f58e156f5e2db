"""Publisher (threaded code) against a real redis-server: the AsyncPublisher cases, in sync."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import redis.exceptions as rex

from backend_adapter import (
    AsyncPublisher,
    ConfigError,
    EngineUnavailable,
    InvalidInput,
    PayloadTooLarge,
    Publisher,
    PublishFailed,
    PublishResult,
)
from relay import wire
from relay.errors import InvalidClientId
from tests.backend_adapter.conftest import dead_url, restart_later
from tests.conftest import MS
from tests.support.redis_server import RedisServer

KEYS = wire.KeySpace()


def test_sync_publish_returns_id_and_no_receivers(sync_publisher: Publisher) -> None:
    """A publish nobody listens to gets a stream id, receivers=0, offline."""
    result = sync_publisher.publish("cml", "label.created", {"n": 1})
    assert isinstance(result, PublishResult)
    assert wire.parse_id(result.id) > (0, 0)
    assert (result.receivers, result.online, result.duplicate) == (0, False, False)


def test_sync_publish_reaches_a_channel_subscriber(
    sync_publisher: Publisher, raw: redis.Redis
) -> None:
    """A raw subscriber receives the live message; the stream holds the entry."""
    pubsub = raw.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(KEYS.channel("cml"))
    pubsub.get_message(timeout=1000 * MS)
    try:
        result = sync_publisher.publish("cml", "label.created", {"label": 42})
        message = pubsub.get_message(timeout=1000 * MS)
    finally:
        pubsub.close()
    assert message is not None and result.receivers == 1
    event = wire.decode_live(message["data"])
    assert (event.id, event.biz_id, event.event, event.data) == (
        result.id,
        "cml",
        "label.created",
        {"label": 42},
    )
    assert raw.xlen(KEYS.log("cml")) == 1


def test_sync_publish_same_mid_twice_is_a_duplicate(
    sync_publisher: Publisher, raw: redis.Redis
) -> None:
    """A repeated mid returns the first id with duplicate=True and adds nothing."""
    first = sync_publisher.publish("cml", "e", 1, mid="outbox-1")
    again = sync_publisher.publish("cml", "e", 1, mid="outbox-1")
    assert (again.id, again.duplicate) == (first.id, True)
    assert raw.xlen(KEYS.log("cml")) == 1


def test_sync_publish_many_preserves_order(sync_publisher: Publisher, raw: redis.Redis) -> None:
    """Results in item order; the stream holds the items in order."""
    results = sync_publisher.publish_many([("cml", "e", i) for i in range(40)])
    entries = raw.xrange(KEYS.log("cml"))
    assert [r.id for r in results] == [sid.decode() for sid, _ in entries]
    payloads = [wire.decode_payload(sid, f[b"prev"], f[b"p"]).data for sid, f in entries]
    assert payloads == list(range(40))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("bad id!", "e", 1), InvalidClientId),
        (("cml", "", 1), InvalidInput),
        (("cml", "e", {1}), InvalidInput),
        (("cml", "e", "x" * 70_000), PayloadTooLarge),
    ],
)
def test_sync_publish_invalid_input_raises_without_touching_redis(
    args: tuple[str, str, object], error: type[Exception]
) -> None:
    """Bad input raises its documented error at once, even with Redis unreachable."""
    with Publisher(dead_url(), retries=0) as pub:
        with pytest.raises(error):
            pub.publish(*args)
        with pytest.raises(error):
            pub.publish_many([("ok", "e", 1), args])
        with pytest.raises(InvalidInput, match="tuples"):
            pub.publish_many([("ok", "e")])  # type: ignore[list-item]


def test_sync_publish_from_many_threads(redis_server: RedisServer, raw: redis.Redis) -> None:
    """One Publisher shared by 16 threads on a 4-connection pool: every publish lands."""
    with (
        Publisher(redis_server.url, max_connections=4, history_size=10_000) as pub,
        ThreadPoolExecutor(16) as pool,
    ):
        results = list(pool.map(lambda i: pub.publish("cml", "e", i), range(1600)))
    assert len({r.id for r in results}) == 1600
    assert raw.xlen(KEYS.log("cml")) == 1600


def test_sync_publish_after_script_flush(sync_publisher: Publisher, raw: redis.Redis) -> None:
    """NOSCRIPT is handled by loading the script and sending again."""
    sync_publisher.publish("cml", "e", 1)
    raw.script_flush()
    sync_publisher.publish_many([("cml", "e", 2), ("cml", "e", 3)])
    assert raw.xlen(KEYS.log("cml")) == 3


def test_sync_publish_wrong_key_type_fails_without_retry(
    sync_publisher: Publisher, raw: redis.Redis
) -> None:
    """A command error raises PublishFailed at once, caused by the ResponseError."""
    raw.set(KEYS.log("taken"), "x")
    with pytest.raises(PublishFailed, match=r"'taken'.*WRONGTYPE") as info:
        sync_publisher.publish("taken", "e", 1)
    assert isinstance(info.value.__cause__, rex.ResponseError)


def test_sync_publish_with_redis_down_fails_after_bounded_retries(own_redis: RedisServer) -> None:
    """Redis down: PublishFailed after the retries, quickly; works again after restart."""
    with Publisher(own_redis.url, retries=3, backoff=0.05) as pub:
        pub.publish("cml", "e", 0)
        own_redis.kill()
        started = time.monotonic()
        with pytest.raises(PublishFailed, match=r"'cml' failed after 4 attempts") as info:
            pub.publish("cml", "e", 1)
        assert time.monotonic() - started < 2000 * MS
        assert isinstance(info.value.__cause__, rex.ConnectionError)
        with pytest.raises(EngineUnavailable):
            pub.is_online("cml")
        own_redis.start()
        assert pub.publish("cml", "e", 2).id


def test_sync_publish_with_hung_redis_times_out(own_redis: RedisServer) -> None:
    """A stopped Redis costs about (retries + 1) * timeout, then PublishFailed."""
    with Publisher(own_redis.url, retries=1, backoff=0.01, timeout=0.2) as pub:
        pub.publish("cml", "e", 0)
        own_redis.stop_process()
        try:
            started = time.monotonic()
            with pytest.raises(PublishFailed, match="Timeout"):
                pub.publish("cml", "e", 1)
            assert time.monotonic() - started < 1500 * MS
        finally:
            own_redis.continue_process()
        assert pub.publish("cml", "e", 2).id


def test_sync_publish_rides_through_a_short_outage(own_redis: RedisServer) -> None:
    """An outage shorter than the retry budget is invisible to the caller."""
    with Publisher(own_redis.url, retries=20, backoff=0.05, max_backoff=0.2) as pub:
        pub.publish("cml", "e", 0)
        own_redis.kill()
        restart = restart_later(own_redis, 0.3)
        try:
            started = time.monotonic()
            result = pub.publish("cml", "e", 1)
            waited = time.monotonic() - started
        finally:
            restart.join()
    assert result.id and waited >= 0.25


def test_sync_is_online_follows_session_and_node(
    sync_publisher: Publisher, raw: redis.Redis
) -> None:
    """Offline without a record, online with a live node, offline once the node is gone."""
    assert sync_publisher.is_online("cml") is False
    raw.hset(KEYS.session("cml"), mapping={"node": "n1", "session": "s-1"})
    assert sync_publisher.is_online("cml") is False
    raw.set(KEYS.node("n1"), "1")
    assert sync_publisher.is_online("cml") is True
    raw.delete(KEYS.node("n1"))
    assert sync_publisher.is_online("cml") is False


def test_sync_publisher_close_refuses_more(redis_server: RedisServer) -> None:
    """After close(), publishing raises PublishFailed; close is idempotent."""
    pub = Publisher(redis_server.url)
    pub.close()
    pub.close()
    with pytest.raises(PublishFailed, match="closed"):
        pub.publish("cml", "e", 1)


def test_sync_publisher_keeps_a_callers_client_open(redis_server: RedisServer) -> None:
    """A client passed in is reused and left open on close."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        with Publisher(client=client) as pub:
            pub.publish("cml", "e", 1)
        assert client.exists(KEYS.log("cml")) == 1
    finally:
        client.close()


def test_sync_publisher_rejects_bad_settings() -> None:
    """Neither or both of redis_url and client: ConfigError."""
    with pytest.raises(ConfigError):
        Publisher()
    with pytest.raises(ConfigError):
        Publisher("redis://x", max_connections=0)


@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_validate_refuses_what_publish_would_and_sends_nothing(
    kind: str, redis_server: RedisServer, raw: redis.Redis
) -> None:
    """validate() applies the publisher's own max_payload and checks, without Redis."""
    options = {"key_prefix": "vp", "max_payload": 200}
    publisher: Publisher | AsyncPublisher = (
        Publisher(redis_server.url, **options)
        if kind == "sync"
        else AsyncPublisher(redis_server.url, **options)
    )
    publisher.validate("cml", "label.created", {"id": 1}, mid="m-1")
    with pytest.raises(PayloadTooLarge):
        publisher.validate("cml", "label.created", {"text": "x" * 300})
    with pytest.raises(InvalidInput):
        publisher.validate("no spaces allowed", "label.created", {})
    assert publisher.keys.log("cml") == wire.KeySpace("vp").log("cml")
    assert raw.keys("vp:*") == []
    if isinstance(publisher, Publisher):
        publisher.close()
