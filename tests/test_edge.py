"""The lean listener (relay.edge) on a real socket: handshakes, hand-over to aiohttp,
close handshakes, heartbeats, and the aiohttp route it leaves for --compress."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from typing import Any

import aiohttp
import orjson
import pytest

from relay.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, accept_key
from tests.support.frames import client_frame
from tests.support.node import Listener, NodeUnderTest, listen, node_settings


async def start(started: list[NodeUnderTest], **overrides: Any) -> NodeUnderTest:
    node = await NodeUnderTest(node_settings(**overrides)).start()
    started.append(node)
    return node


def upgrade_request(path: str, *, version: str = "13", extra: str = "") -> tuple[bytes, str]:
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n"
    )
    return head.encode(), key


class RawClient:
    """A WebSocket client on a bare socket, to see exactly what the node writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, node: NodeUnderTest) -> RawClient:
        return cls(*await asyncio.open_connection("127.0.0.1", node.settings.port))

    async def response_head(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        first, second = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
        assert not second & 0x80, "server frames are never masked"
        return first & 0x0F, await self.reader.readexactly(size)

    def close(self) -> None:
        self.writer.close()


async def test_upgrade_answer_and_frames_sent_with_the_head(
    started_nodes: list[NodeUnderTest],
) -> None:
    """101 with the RFC accept key and the chosen subprotocol; a ping sent in the same
    write as the head is answered after the welcome."""
    node = await start(started_nodes)
    client = await RawClient.open(node)
    head, key = upgrade_request("/ws/raw", extra="Sec-WebSocket-Protocol: x, relay.v1.json\r\n")
    client.writer.write(head + client_frame(OP_TEXT, b'{"type":"ping"}'))
    response = await client.response_head()
    assert response.startswith(b"HTTP/1.1 101 ")
    assert f"Sec-WebSocket-Accept: {accept_key(key)}\r\n".encode() in response
    assert b"Sec-WebSocket-Protocol: relay.v1.json\r\n" in response
    opcode, welcome = await client.frame()
    assert opcode == OP_TEXT and orjson.loads(welcome)["type"] == "welcome"
    assert await client.frame() == (OP_TEXT, b'{"type":"pong"}')
    client.writer.write(client_frame(OP_PING, b"hi"))
    assert await client.frame() == (OP_PONG, b"hi")
    client.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (upgrade_request("/ws/a", version="8")[0], 400, b"Sec-WebSocket-Version"),
        (
            b"GET /ws/a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n",
            400,
            b"Key",
        ),
        (upgrade_request("/ws/a")[0].replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400, b"line"),
        (upgrade_request("/ws/a/b")[0], 404, b"not found"),
        (upgrade_request("/ws/a")[0].replace(b"Host: x", b" folded", 1), 400, b"header"),
    ],
    ids=["version-8", "short-key", "http-1.0", "nested-path", "obs-fold"],
)
async def test_bad_handshakes_get_http_errors(
    started_nodes: list[NodeUnderTest], request_bytes: bytes, status: int, message: bytes
) -> None:
    node = await start(started_nodes)
    client = await RawClient.open(node)
    client.writer.write(request_bytes)
    answer = await asyncio.wait_for(client.reader.read(), 5)  # the node hangs up after it
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
    body = orjson.loads(answer.partition(b"\r\n\r\n")[2])
    assert message.decode().lower() in body["error"]["message"].lower()
    client.close()


async def test_other_requests_and_keep_alive_upgrades_go_to_aiohttp(
    started_nodes: list[NodeUnderTest],
) -> None:
    """Health, the API and 405s are aiohttp's; a WebSocket requested on a keep-alive
    connection after another request is served by the aiohttp route, events included."""
    node = await start(started_nodes)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{node.base}/healthz") as response:
            assert response.status == 200
        async with http.post(f"{node.base}/ws/a") as response:
            assert response.status == 405
    client = await RawClient.open(node)
    client.writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    health = await client.response_head()
    assert health.startswith(b"HTTP/1.1 200")
    length = int(health.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await client.reader.readexactly(length)
    head, _ = upgrade_request("/ws/kept")
    client.writer.write(head)
    assert (await client.response_head()).startswith(b"HTTP/1.1 101")
    assert orjson.loads((await client.frame())[1])["type"] == "welcome"
    await node.publish("kept", "e", {"n": 1})
    assert orjson.loads((await client.frame())[1])["data"] == {"n": 1}
    client.close()


async def test_client_close_is_answered_and_the_session_forgotten(
    started_nodes: list[NodeUnderTest],
) -> None:
    node = await start(started_nodes)
    client = await RawClient.open(node)
    client.writer.write(upgrade_request("/ws/leaver")[0])
    await client.response_head()
    await client.frame()  # welcome
    assert node.node.by_client.get("leaver")
    client.writer.write(client_frame(OP_CLOSE, struct.pack("!H", 4100) + b"done"))
    opcode, payload = await client.frame()
    assert (opcode, payload[:2]) == (OP_CLOSE, struct.pack("!H", 4100))
    assert await asyncio.wait_for(client.reader.read(), 5) == b""  # the server hangs up
    for _ in range(100):
        if not node.node.by_client.get("leaver"):
            break
        await asyncio.sleep(0.01)
    assert not node.node.by_client.get("leaver")
    client.close()


async def test_heartbeat_pings_and_drops_a_silent_peer(
    started_nodes: list[NodeUnderTest], listeners: list[Listener]
) -> None:
    """A client that never answers pings is dropped; one that does (aiohttp) stays."""
    node = await start(started_nodes, heartbeat=0.4)
    polite = await listen(listeners, node.ws_url("polite"))
    mute = await RawClient.open(node)
    mute.writer.write(upgrade_request("/ws/mute")[0])
    await mute.response_head()
    await mute.frame()  # welcome
    assert await mute.frame(timeout=3) == (OP_PING, b"")
    assert await asyncio.wait_for(mute.reader.read(), 3) == b""  # aborted, no pong came
    await asyncio.sleep(1.0)
    assert polite.close_code is None and node.node.by_client.get("polite")
    await node.publish("polite", "e", 1)
    assert [m["data"] for m in await polite.wait_messages(1)] == [1]
    mute.close()


async def test_compress_uses_the_aiohttp_route_with_permessage_deflate(
    started_nodes: list[NodeUnderTest], listeners: list[Listener]
) -> None:
    node = await start(started_nodes, compress=True)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(node.ws_url("zip"), compress=15)
        try:
            assert ws.compress == 15  # the server agreed to permessage-deflate
            assert (await ws.receive_json())["type"] == "welcome"
            await node.publish("zip", "e", {"text": "x" * 1000})
            assert (await ws.receive_json())["data"] == {"text": "x" * 1000}
        finally:
            await ws.close()


async def test_client_gone_while_connecting_leaves_nothing_behind(
    started_nodes: list[NodeUnderTest],
) -> None:
    """Hang-ups right after the head (a herd giving up) leave no session, subscription
    or registry record; the node still serves."""
    node = await start(started_nodes)
    for i in range(50):
        client = await RawClient.open(node)
        client.writer.write(upgrade_request(f"/ws/quitter{i}")[0])
        await client.writer.drain()
        client.writer.transport.abort()
    for _ in range(200):
        if not node.node.sessions and not node.node.by_client:
            break
        await asyncio.sleep(0.01)
    assert not node.node.sessions and not node.node.by_client
    assert node.edge is not None
    assert all(c.session is None for c in node.edge.connections)
    for i in range(50):
        status = await node.node.engine.client_status(f"quitter{i}")
        assert not status.online
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(node.ws_url("after"))
        assert (await ws.receive_json())["type"] == "welcome"
        await ws.close()
