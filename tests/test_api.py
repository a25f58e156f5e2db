"""The HTTP API, health and metrics (relay/api.py): every route's answers, on real nodes.

Each route is exercised for its success body and for every error it can give: the JSON
error body ``{"error": {"code", "message"}}`` with its status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from relay.protocol import CloseCode
from tests.cluster.support import relay_cli
from tests.conftest import MS
from tests.support.node import API_KEY, Listener, NodeUnderTest, listen, node_settings
from tests.support.redis_server import RedisServer
from tests.support.timing import eventually

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    node: NodeUnderTest,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    """One request; the status and the JSON body (text for non-JSON answers)."""
    async with http.request(
        method, f"{node.base}{path}", headers=AUTH if headers is None else headers, **kwargs
    ) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


def error(code: str) -> Any:
    """Matches an API error body with ``code`` and a non-empty message."""

    class _Error:
        def __eq__(self, body: object) -> bool:
            return (
                isinstance(body, dict)
                and set(body) == {"error"}
                and body["error"]["code"] == code
                and isinstance(body["error"]["message"], str)
                and bool(body["error"]["message"])
            )

        def __repr__(self) -> str:
            return f"<error {code}>"

    return _Error()


async def start(started: list[NodeUnderTest], **overrides: Any) -> NodeUnderTest:
    node = await NodeUnderTest(node_settings(**overrides)).start()
    started.append(node)
    return node


# -- DELETE /api/clients/{id} across nodes --------------------------------------------------


async def test_api_kick_closes_every_session_of_the_client_on_every_node(
    redis_server: RedisServer,
    started_nodes: list[NodeUnderTest],
    listeners: list[Listener],
    http: aiohttp.ClientSession,
) -> None:
    """--duplicates allow, sessions on two nodes: DELETE on a third closes all of them 4000."""
    a, b, c = [
        await start(started_nodes, redis_url=redis_server.url, duplicates="allow") for _ in range(3)
    ]
    on_b = await listen(listeners, b.ws_url("many"))
    on_a = [await listen(listeners, a.ws_url("many")) for _ in range(2)]  # the newest: on a
    other = await listen(listeners, a.ws_url("someone-else"))
    assert await call(http, c, "DELETE", "/api/clients/many") == (
        200,
        {"client_id": "many", "kicked": True},
    )
    for conn in (on_b, *on_a):
        assert await conn.wait_closed() == CloseCode.REPLACED
        assert conn.close_reason == "closed by the operator"
    await eventually(lambda: len(a.node.sessions) == 1 and not b.node.sessions)
    assert other.close_code is None
    status, body = await call(http, c, "GET", "/api/clients/many")
    assert status == 200 and body["online"] is False


async def test_api_kick_on_the_node_holding_the_client_closes_the_remote_sessions_too(
    redis_server: RedisServer,
    started_nodes: list[NodeUnderTest],
    listeners: list[Listener],
    http: aiohttp.ClientSession,
) -> None:
    """DELETE on the node of the newest session also reaches the older one on another node."""
    a, b = [
        await start(started_nodes, redis_url=redis_server.url, duplicates="allow") for _ in range(2)
    ]
    older = await listen(listeners, b.ws_url("pair"))
    newer = await listen(listeners, a.ws_url("pair"))
    assert (await call(http, a, "DELETE", "/api/clients/pair"))[0] == 200
    assert await newer.wait_closed() == CloseCode.REPLACED
    assert await older.wait_closed() == CloseCode.REPLACED


async def test_api_kick_unknown_client_is_404_and_bad_id_400(
    started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """DELETE of a client with no session: 404 not_found; of an invalid id: 400 bad_client_id."""
    node = await start(started_nodes)
    assert await call(http, node, "DELETE", "/api/clients/nobody") == (404, error("not_found"))
    assert await call(http, node, "DELETE", "/api/clients/a%20b") == (
        400,
        error("bad_client_id"),
    )


# -- POST /api/publish ---------------------------------------------------------------------


async def test_api_publish_answers_id_online_receivers_duplicate(
    started_nodes: list[NodeUnderTest], listeners: list[Listener], http: aiohttp.ClientSession
) -> None:
    """200 with the stream id and who got it; a repeated mid says duplicate with the same id."""
    node = await start(started_nodes)
    client = await listen(listeners, node.ws_url("pia"))
    body = {"biz_id": "pia", "event": "label.created", "data": {"n": 1}, "mid": "m-1"}
    status, first = await call(http, node, "POST", "/api/publish", json=body)
    assert status == 200 and set(first) == {"id", "online", "receivers", "duplicate"}
    assert first["online"] is True and first["receivers"] == 1 and first["duplicate"] is False
    assert await call(http, node, "POST", "/api/publish", json=body) == (
        200,
        {**first, "duplicate": True, "receivers": 0},
    )
    status, nobody = await call(
        http, node, "POST", "/api/publish", json={"biz_id": "away", "event": "e"}
    )
    assert status == 200 and nobody["online"] is False and nobody["receivers"] == 0
    messages = await client.wait_messages(1)
    assert [(m["id"], m["event"], m["data"]) for m in messages] == [
        (first["id"], "label.created", {"n": 1})
    ]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", "bad_request"),
        (b"[1, 2]", "bad_request"),
        (b'{"event": "e"}', "bad_request"),
        (b'{"biz_id": "x", "event": 7}', "bad_request"),
        (b'{"biz_id": "a b", "event": "e"}', "bad_client_id"),
        (b'{"biz_id": "x", "event": ""}', "bad_request"),
        (b'{"biz_id": "x", "event": "e", "mid": ""}', "bad_request"),
    ],
)
async def test_api_publish_invalid_body_is_400(
    started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession, payload: bytes, code: str
) -> None:
    """Each kind of invalid body is a 400 with its error code, and nothing is published."""
    node = await start(started_nodes)
    assert await call(http, node, "POST", "/api/publish", data=payload) == (400, error(code))
    history = await node.node.engine.history("x", (0, 0), 10)
    assert history.entries == []


async def test_api_publish_too_large_is_413(
    started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """A payload over --max-payload, and a body over twice that, are 413 too_large."""
    node = await start(started_nodes, max_payload=1000)
    big = {"biz_id": "x", "event": "e", "data": "x" * 1500}
    assert await call(http, node, "POST", "/api/publish", json=big) == (413, error("too_large"))
    huge = {"biz_id": "x", "event": "e", "data": "x" * 8000}  # over the 6 KB body limit
    assert await call(http, node, "POST", "/api/publish", json=huge) == (413, error("too_large"))


async def test_api_publish_with_redis_down_is_503_unavailable(
    own_redis: RedisServer, started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """Redis gone: 503 unavailable, a message that says retry, and no detail of the error."""
    node = await start(started_nodes, redis_url=own_redis.url)
    own_redis.kill()
    status, body = await call(
        http, node, "POST", "/api/publish", json={"biz_id": "x", "event": "e"}
    )
    assert (status, body) == (503, error("unavailable")) and "retry" in body["error"]["message"]


async def test_api_publish_refused_by_redis_is_503_engine_error(
    own_redis: RedisServer, started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """Redis answers an error (an ACL without XADD): 503 engine_error, not a 500."""
    node = await start(started_nodes, redis_url=own_redis.url)
    admin = redis.Redis(port=own_redis.port)
    admin.execute_command("ACL", "SETUSER", "default", "-xadd")
    admin.close()
    status, body = await call(
        http, node, "POST", "/api/publish", json={"biz_id": "x", "event": "e"}
    )
    assert (status, body) == (503, error("engine_error"))


# -- GET /api/clients/{id}, GET /api/nodes --------------------------------------------------


async def test_api_client_status_online_then_offline(
    started_nodes: list[NodeUnderTest], listeners: list[Listener], http: aiohttp.ClientSession
) -> None:
    """The status body names node, session, since and last_ack; offline after the close."""
    node = await start(started_nodes)
    first = await node.publish("cas", "e", None)
    client = await listen(listeners, node.ws_url("cas", since=first.id))
    await client.send({"type": "ack", "id": first.id})
    online = {
        "client_id": "cas",
        "online": True,
        "node": node.node.id,
        "session": client.welcome["session"],
        "since": first.id,
        "last_ack": first.id,  # the ack is recorded in the background
    }
    await eventually_answers(http, node, "/api/clients/cas", (200, online), headers=AUTH)
    await client.close()
    await eventually(lambda: not node.node.sessions)
    status, offline = await call(http, node, "GET", "/api/clients/cas")
    assert status == 200 and offline["online"] is False and offline["client_id"] == "cas"
    assert await call(http, node, "GET", "/api/clients/a%20b") == (400, error("bad_client_id"))


async def test_api_nodes_lists_every_live_node(
    redis_server: RedisServer, started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """GET /api/nodes on either node lists both: connections, times, address and state."""
    a, b = [await start(started_nodes, redis_url=redis_server.url) for _ in range(2)]
    status, body = await call(http, b, "GET", "/api/nodes")
    assert status == 200 and set(body) == {"nodes"}
    assert {n["node"]: n["address"] for n in body["nodes"]} == {
        a.node.id: f"127.0.0.1:{a.settings.port}",
        b.node.id: f"127.0.0.1:{b.settings.port}",
    }
    for info in body["nodes"]:
        assert {"node", "connections", "started_at", "last_seen", "state"} <= set(info)
        assert {"messages_per_s", "events_per_s", "publishes_per_s", "closed_4509"} <= set(info)
        assert info["connections"] == 0 and info["last_seen"] >= info["started_at"] > 0
        assert info["state"] == "ready"


async def test_relay_nodes_cli_shows_what_api_nodes_shows(
    redis_server: RedisServer, started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """`relay nodes --redis-url` and GET /api/nodes list a node with the same flat fields."""
    node = await start(started_nodes, redis_url=redis_server.url)
    _, body = await call(http, node, "GET", "/api/nodes")
    code, out, err = await relay_cli("nodes", "--redis-url", redis_server.url)
    assert code == 0, err
    [from_api], [from_cli] = body["nodes"], orjson.loads(out)["nodes"]
    assert set(from_cli) == set(from_api)
    assert (from_cli["node"], from_cli["address"]) == (node.node.id, from_api["address"])


# -- authorisation and routing -------------------------------------------------------------

ROUTES = [
    ("POST", "/api/publish"),
    ("GET", "/api/clients/x"),
    ("DELETE", "/api/clients/x"),
    ("GET", "/api/nodes"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_api_every_route_needs_the_key(
    started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession, method: str, path: str
) -> None:
    """No key, a wrong key, another scheme: 401 unauthorized on every route."""
    node = await start(started_nodes)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
    ):
        assert await call(http, node, method, path, headers=headers) == (
            401,
            error("unauthorized"),
        )


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_api_every_route_is_off_without_a_key(
    started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession, method: str, path: str
) -> None:
    """Without --api-key every route answers 404 api_disabled, with or without a header."""
    node = await start(started_nodes, api_key=None)
    assert await call(http, node, method, path) == (404, error("api_disabled"))


async def test_api_unknown_route_and_wrong_method_are_json_errors(
    started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """An unknown /api/ path is 404, a wrong method 405: both as JSON error bodies."""
    node = await start(started_nodes)
    assert await call(http, node, "GET", "/api/nope") == (404, error("http_error"))
    assert await call(http, node, "GET", "/api/publish") == (405, error("http_error"))


# -- health, readiness, metrics ------------------------------------------------------------


async def test_health_ready_and_metrics_need_no_key(
    started_nodes: list[NodeUnderTest], listeners: list[Listener], http: aiohttp.ClientSession
) -> None:
    """/healthz and /readyz answer JSON with the node id; /metrics is Prometheus text."""
    node = await start(started_nodes)
    await listen(listeners, node.ws_url("met"))
    node_id = node.node.id
    assert await call(http, node, "GET", "/healthz", headers={}) == (
        200,
        {"status": "ok", "node": node_id},
    )
    assert await call(http, node, "GET", "/readyz", headers={}) == (
        200,
        {"status": "ready", "node": node_id},
    )
    status, text = await call(http, node, "GET", "/metrics", headers={})
    assert status == 200 and "relay_connections 1.0" in text
    assert "relay_sessions_opened_total 1.0" in text


async def test_readyz_503_while_redis_is_down_then_200(
    own_redis: RedisServer, started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """Redis killed: 503 "engine not ready", /healthz still 200; Redis back: 200 again."""
    node = await start(started_nodes, redis_url=own_redis.url)
    own_redis.kill()
    unready = {"status": "unavailable", "reason": "engine not ready", "node": node.node.id}
    await eventually_answers(http, node, "/readyz", (503, unready))
    assert (await call(http, node, "GET", "/healthz", headers={}))[0] == 200
    own_redis.start()
    await eventually_answers(
        http, node, "/readyz", (200, {"status": "ready", "node": node.node.id})
    )


async def test_readyz_503_draining(
    started_nodes: list[NodeUnderTest], http: aiohttp.ClientSession
) -> None:
    """Once the node drains, /readyz says 503 draining (the balancer stops sending clients)."""
    node = await start(started_nodes)
    await node.node.drain(0.05)
    assert await call(http, node, "GET", "/readyz", headers={}) == (
        503,
        {"status": "unavailable", "reason": "draining", "node": node.node.id},
    )


async def eventually_answers(
    http: aiohttp.ClientSession,
    node: NodeUnderTest,
    path: str,
    want: tuple[int, Any],
    headers: dict[str, str] | None = None,
) -> None:
    """Poll GET ``path`` (without a key unless given) until it answers ``want``."""
    got: tuple[int, Any] | None = None
    async with asyncio.timeout(10_000 * MS):
        while got != want:
            got = await call(http, node, "GET", path, headers=headers or {})
            if got != want:
                await asyncio.sleep(20 * MS)
