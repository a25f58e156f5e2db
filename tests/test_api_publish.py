"""POST /api/publish over real HTTP on a real node, memory and Redis engine: strict fields,
errors that name the field, and the batch form ``{"events": [...]}``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis

from tests.support.node import API_KEY, Listener, NodeUnderTest, listen, node_settings
from tests.support.redis_server import RedisServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(params=["memory", "redis"])
def engine_url(request: pytest.FixtureRequest) -> str | None:
    """None (the memory engine) or the URL of the shared private Redis, flushed."""
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start(started: list[NodeUnderTest], engine_url: str | None, **kw: Any) -> NodeUnderTest:
    node = await NodeUnderTest(node_settings(redis_url=engine_url, **kw)).start()
    started.append(node)
    return node


async def post(http: aiohttp.ClientSession, node: NodeUnderTest, body: Any) -> tuple[int, Any]:
    async with http.post(f"{node.base}/api/publish", json=body, headers=AUTH) as response:
        return response.status, await response.json()


async def history_events(node: NodeUnderTest, biz_id: str) -> list[str]:
    history = await node.node.engine.history(biz_id, (0, 0), 100)
    return [entry.event for entry in history.entries]


async def test_api_publish_unknown_fields_are_400_naming_them(
    engine_url: str | None, started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """A misspelt field ("date" for "data") is a 400 that names it; nothing is published."""
    node = await start(started_nodes, engine_url)
    body = {"biz_id": "x", "event": "e", "date": {"id": 1}, "ttl": 5}
    status, answer = await post(http, node, body)
    assert status == 400 and answer["error"]["code"] == "bad_request"
    message = answer["error"]["message"]
    assert "'date'" in message and "'ttl'" in message and "biz_id, event, data, mid" in message
    assert await history_events(node, "x") == []


async def test_api_publish_bad_biz_id_error_names_biz_id(
    engine_url: str | None, started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """An invalid or missing biz_id: 400 whose message says biz_id, not client_id."""
    node = await start(started_nodes, engine_url)
    status, answer = await post(http, node, {"biz_id": "a b", "event": "e"})
    assert status == 400 and answer["error"]["code"] == "bad_client_id"
    assert "'biz_id' must be 1-128 characters" in answer["error"]["message"]
    status, answer = await post(http, node, {"event": "e"})
    assert status == 400 and "'biz_id' is required" in answer["error"]["message"]


async def test_api_publish_batch_answers_one_result_per_event_in_order(
    engine_url: str | None,
    started_nodes: list[NodeUnderTest],
    listeners: list[Listener],
    http: aiohttp.ClientSession,
) -> None:
    """Each event gets its own answer or its own error; the valid ones are delivered, in
    order per BizId, once each."""
    node = await start(started_nodes, engine_url, max_payload=1000)
    alice = await listen(listeners, node.ws_url("alice"))
    bob = await listen(listeners, node.ws_url("bob"))
    events = [
        {"biz_id": "alice", "event": "a1", "data": {"n": 1}},
        {"biz_id": "alice", "event": "a2", "date": {}},  # unknown field
        {"biz_id": "bob", "event": "b1"},
        {"biz_id": "alice", "event": "a3", "mid": "m-3"},
        {"biz_id": "a b", "event": "x"},  # bad biz_id
        {"biz_id": "bob", "event": "b2", "data": "x" * 2000},  # over --max-payload
        {"biz_id": "alice", "event": "a3", "mid": "m-3"},  # a repeat: duplicate
        "not an object",
        {"biz_id": "alice", "event": "a4"},
    ]
    status, answer = await post(http, node, {"events": events})
    assert status == 200 and set(answer) == {"results"}
    results = answer["results"]
    assert len(results) == len(events)
    codes = [r["error"]["code"] if "error" in r else "ok" for r in results]
    assert codes == [
        "ok",
        "bad_request",
        "ok",
        "ok",
        "bad_client_id",
        "too_large",
        "ok",
        "bad_request",
        "ok",
    ]
    assert "'date'" in results[1]["error"]["message"]
    assert "'biz_id'" in results[4]["error"]["message"]
    assert results[6] == {**results[3], "duplicate": True, "receivers": 0}
    assert results[0]["online"] is True and results[0]["receivers"] == 1
    got_alice = await alice.wait_messages(3)
    got_bob = await bob.wait_messages(1)
    assert [(m["event"], m["id"]) for m in got_alice] == [
        ("a1", results[0]["id"]),
        ("a3", results[3]["id"]),
        ("a4", results[8]["id"]),
    ]
    assert [(m["event"], m["id"]) for m in got_bob] == [("b1", results[2]["id"])]
    assert await history_events(node, "alice") == ["a1", "a3", "a4"]
    assert await history_events(node, "bob") == ["b1"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"events": []}, "non-empty list"),
        ({"events": {"biz_id": "x", "event": "e"}}, "non-empty list"),
        ({"events": [{"biz_id": "x", "event": "e"}] * 4}, "at most 3 per call"),
        ({"events": [{"biz_id": "x", "event": "e"}], "mid": "m"}, "unknown field 'mid'"),
    ],
)
async def test_api_publish_batch_malformed_is_400_and_publishes_nothing(
    engine_url: str | None,
    started_nodes: list[NodeUnderTest],
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    needle: str,
) -> None:
    """An empty or non-list `events`, more than --publish-batch-max, or a stray field: 400."""
    node = await start(started_nodes, engine_url, publish_batch_max=3)
    status, answer = await post(http, node, body)
    assert status == 400 and needle in answer["error"]["message"], answer
    assert await history_events(node, "x") == []


async def test_api_publish_batch_with_redis_down_is_unavailable_per_event(
    own_redis: RedisServer, started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """Redis gone: 200 with an `unavailable` error on each valid event (retry those), and
    the invalid one still names its own error."""
    node = await start(started_nodes, own_redis.url)
    own_redis.kill()
    events = [{"biz_id": "x", "event": "e1"}, {"biz_id": "x"}, {"biz_id": "y", "event": "e2"}]
    status, answer = await post(http, node, {"events": events})
    assert status == 200
    assert [r["error"]["code"] for r in answer["results"]] == [
        "unavailable",
        "bad_request",
        "unavailable",
    ]


async def test_api_publish_batch_sends_one_script_call_per_biz_id(
    own_redis: RedisServer, started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """A batch of 10 events of one BizId interleaved with 5 of another reaches Redis as two
    script calls (one run each), and each BizId's events keep their order."""
    node = await start(started_nodes, own_redis.url)
    events = [{"biz_id": "alice", "event": f"a{n}"} for n in range(10)]
    for n in range(5):
        events.insert(2 * n + 1, {"biz_id": "bob", "event": f"b{n}"})
    raw = redis.Redis(port=own_redis.port, password=own_redis.password)
    try:
        raw.config_resetstat()
        status, answer = await post(http, node, {"events": events})
        stats = raw.info("commandstats")
    finally:
        raw.close()
    assert status == 200 and all("id" in r for r in answer["results"])
    evalsha = stats["cmdstat_evalsha"]  # a fresh server answers NOSCRIPT first: not run
    assert evalsha["calls"] - evalsha["failed_calls"] == 2
    assert stats["cmdstat_xadd"]["calls"] == 15
    assert await history_events(node, "alice") == [f"a{n}" for n in range(10)]
    assert await history_events(node, "bob") == [f"b{n}" for n in range(5)]
