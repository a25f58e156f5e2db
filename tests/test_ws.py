"""The WebSocket endpoint's own behaviours (relay/ws.py), on both ways into the one server.

``relay serve`` answers upgrades on the edge (relay/edge.py) directly; an Application
served by aiohttp alone (and observers, and upgrades on a keep-alive connection) reaches
aiohttp's route first, which hands the socket to the edge (``relay.edge.adopt``). Every
test here runs both ways. tests/test_node.py and tests/test_auth_e2e.py run their
end-to-end suites both ways as well.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest

from relay.protocol import CloseCode
from relay.ws import LB_RETRY_HEADER
from tests.conftest import MS
from tests.support.node import Listener, NodeUnderTest, listen, start_node

MakeNode = Callable[..., Awaitable[NodeUnderTest]]


@pytest.fixture(params=["edge", "aiohttp"])
def make_node(request: pytest.FixtureRequest, started_nodes: list[NodeUnderTest]) -> MakeNode:
    """Start memory-engine nodes on the server under test; all stop at the end."""
    return functools.partial(start_node, started_nodes, request.param)


async def test_ws_draining_node_closes_new_handshakes_1012(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A handshake reaching a draining node is upgraded and closed 1012: reconnect elsewhere."""
    relay = await make_node()
    await relay.node.drain(0.05)
    client = await listen(listeners, relay.ws_url("late"))
    assert await client.wait_closed() == CloseCode.SERVICE_RESTART
    assert client.frames == [] and client.close_reason == "node is draining"


async def test_ws_draining_node_answers_a_retrying_balancer_http_503(make_node: MakeNode) -> None:
    """With the balancer's retry header, draining is HTTP 503 (Retry-After: 0), no upgrade."""
    relay = await make_node()
    await relay.node.drain(0.05)
    async with (
        aiohttp.ClientSession() as http,
        http.get(relay.ws_url("late").replace("ws:", "http:"), headers={LB_RETRY_HEADER: "1"}) as r,
    ):
        assert r.status == 503 and r.headers["Retry-After"] == "0"
        body = orjson.loads(await r.read())
        assert body["error"]["code"] == "draining" and body["error"]["message"]


async def test_ws_origin_outside_the_allowed_list_is_http_403(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """An Origin not in --allowed-origins is 403 before the upgrade; a listed one connects."""
    relay = await make_node(allowed_origins=("https://app.example",))
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(relay.ws_url("x"), origin="https://evil.example")
        assert refused.value.status == 403
        async with http.ws_connect(relay.ws_url("x"), origin="https://app.example/") as ws:
            welcome = orjson.loads((await ws.receive(timeout=5_000 * MS)).data)
            assert welcome["type"] == "welcome"


async def test_ws_frames_sent_before_the_welcome_are_answered_after_it(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A ping sent right after the upgrade, before the welcome, is answered after the welcome."""
    relay = await make_node()
    client = Listener(relay.ws_url("eager"))
    listeners.append(client)
    await client.connect(wait_welcome=False)
    await client.send({"type": "ping"})
    await client.wait_for(lambda: len(client.frames) >= 2)
    assert [f["type"] for f in client.frames] == ["welcome", "pong"]


async def test_ws_peer_that_never_answers_pings_is_dropped(make_node: MakeNode) -> None:
    """Heartbeat: a peer that leaves the server's ping unanswered is dropped, its session gone."""
    relay = await make_node(heartbeat=0.4)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(relay.ws_url("mute"), autoping=False) as ws,
    ):
        assert orjson.loads((await ws.receive(timeout=5_000 * MS)).data)["type"] == "welcome"
        assert (await ws.receive(timeout=5_000 * MS)).type is aiohttp.WSMsgType.PING
        # Not answered: the server gives up half a heartbeat later.
        closing = await ws.receive(timeout=3000 * MS)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    async with asyncio.timeout(3000 * MS):
        while relay.node.sessions:
            await asyncio.sleep(5 * MS)
