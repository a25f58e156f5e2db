"""The Application's lifecycle (relay/app.py): the node is up before the first request and
drains after the last, registered in Redis exactly while it serves."""

from __future__ import annotations

import socket

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from relay.app import NODE_KEY, accept_queue, listening_socket
from relay.engines.memory import MemoryEngine
from relay.protocol import CloseCode
from relay.wire import KeySpace
from tests.support.node import Listener, NodeUnderTest, listen, node_settings
from tests.support.redis_server import RedisServer


async def registered(redis_server: RedisServer, node_id: str) -> bool:
    """The node's liveness hash exists and the node set lists it."""
    keys = KeySpace()
    async with aioredis.Redis(port=redis_server.port) as raw:
        alive = bool(await raw.exists(keys.node(node_id)))
        listed = await raw.zscore(keys.nodes(), node_id) is not None
    assert alive == listed, (alive, listed)
    return alive


async def test_app_lifecycle_registers_on_start_and_drains_and_deregisters_on_cleanup(
    redis_server: RedisServer, listeners: list[Listener]
) -> None:
    """Setup starts the node (ready, registered); cleanup closes sessions 1012, deregisters."""
    relay = NodeUnderTest(node_settings(redis_url=redis_server.url))
    node = relay.node
    assert not node.ready and not await registered(redis_server, node.id)
    await relay.start()
    try:
        assert node.ready and node.accepting and await registered(redis_server, node.id)
        client = await listen(listeners, relay.ws_url("life"))
        assert client.welcome["node"] == node.id
    finally:
        await relay.stop()
    assert await client.wait_closed() == CloseCode.SERVICE_RESTART
    assert node.draining and not node.ready and not node.sessions
    assert not await registered(redis_server, node.id)


async def test_app_serves_the_engine_it_is_given(listeners: list[Listener]) -> None:
    """create_app(settings, engine) runs the node on that engine instead of the configured one."""
    engine = MemoryEngine()
    relay = NodeUnderTest(node_settings(redis_url="redis://127.0.0.1:1/0"), engine)
    assert relay.app[NODE_KEY].engine is engine
    await relay.start()
    try:
        client = await listen(listeners, relay.ws_url("own"))
        await engine.publish("own", "e", 1)
        assert [m["data"] for m in await client.wait_messages(1)] == [1]
    finally:
        await relay.stop()


async def test_app_without_the_edge_serves_api_health_and_websockets(
    listeners: list[Listener],
) -> None:
    """The Application alone (aiohttp's server): health, the API and /ws/ all answer; the
    WebSocket is handed from aiohttp's route to the edge, the one WebSocket server."""
    relay = await NodeUnderTest(node_settings(), server="aiohttp").start()
    try:
        assert isinstance(relay.app, web.Application)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{relay.base}/healthz") as response:
                assert response.status == 200
            async with http.get(f"{relay.base}/readyz") as response:
                assert response.status == 200
        client = await listen(listeners, relay.ws_url("alone"))
        assert relay.edge is not None
        assert [c.session.client_id for c in relay.edge.connections if c.session] == ["alone"]
        await relay.publish("alone", "e", 2)
        assert [m["data"] for m in await client.wait_messages(1)] == [2]
    finally:
        await relay.stop()
    assert await client.wait_closed() == CloseCode.SERVICE_RESTART


def test_accept_queue_counts_the_connections_waiting_to_be_accepted() -> None:
    """What a --workers worker reports when it leaves the port: the connections the kernel
    completed for it that it has not accepted (reset on close without tcp_migrate_req)."""
    with listening_socket("127.0.0.1", 0, reuse_port=True) as sock:
        assert accept_queue(sock) == 0
        port = sock.getsockname()[1]
        waiting = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        assert accept_queue(sock) == 3
        sock.accept()[0].close()
        assert accept_queue(sock) == 2
        for client in waiting:
            client.close()
