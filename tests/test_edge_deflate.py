"""permessage-deflate on the edge, the one WebSocket server: WebSocketSharp's offer byte by
byte, aiohttp's client, context takeover, and a real Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from relay.deflate import Inflater
from relay.frames import OP_CLOSE, OP_TEXT, RSV1
from tests.support.frames import client_frame
from tests.support.node import NodeUnderTest, node_settings
from tests.support.ports import free_port
from tests.support.raw import RawClient, upgrade_request
from tests.support.timing import MS

TAIL = b"\x00\x00\xff\xff"
WEBSOCKETSHARP = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
SHARP_OFFER = f"Sec-WebSocket-Extensions: {WEBSOCKETSHARP}\r\n"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


async def start(started: list[NodeUnderTest], **overrides: Any) -> NodeUnderTest:
    node = await NodeUnderTest(node_settings(**overrides)).start()
    started.append(node)
    return node


def compressed(message: bytes) -> bytes:
    """A client message compressed without context, as WebSocketSharp sends it."""
    zobj = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = zobj.compress(message) + zobj.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]


async def test_edge_websocketsharp_offer_gets_exactly_its_parameters(
    started_nodes: list[NodeUnderTest],
) -> None:
    """WebSocketSharp rejects any other parameter: the answer echoes its two. Big events
    arrive compressed (RSV1), small ones plain; its compressed ping is inflated and
    answered."""
    node = await start(started_nodes, compress=True, compress_min_size=256)
    client = await RawClient.open(node)
    head, _ = upgrade_request("/ws/sharp", extra=SHARP_OFFER)
    client.writer.write(head)
    response = await client.response_head()
    assert f"\r\nSec-WebSocket-Extensions: {WEBSOCKETSHARP}\r\n".encode() in response
    first, welcome = await client.raw_frame()
    assert not first & RSV1 and orjson.loads(welcome)["type"] == "welcome"
    await node.publish("sharp", "e", {"text": "y" * 2000})
    first, payload = await client.raw_frame()
    assert first == 0x80 | RSV1 | OP_TEXT and len(payload) < 200
    message = orjson.loads(zlib.decompressobj(-15).decompress(payload + TAIL))
    assert message["data"] == {"text": "y" * 2000}
    client.writer.write(client_frame(OP_TEXT, compressed(b'{"type":"ping"}'), rsv=4))
    assert await client.raw_frame() == (0x80 | OP_TEXT, b'{"type":"pong"}')
    client.close()


async def test_edge_without_compress_ignores_the_offer_and_refuses_rsv1(
    started_nodes: list[NodeUnderTest],
) -> None:
    """Off (the default), an offer gets a plain upgrade, and a compressed frame is a
    protocol error (1002), as RFC 6455 says of reserved bits nobody negotiated."""
    node = await start(started_nodes, compress=False)
    client = await RawClient.open(node)
    head, _ = upgrade_request("/ws/plain", extra=SHARP_OFFER)
    client.writer.write(head)
    assert b"Sec-WebSocket-Extensions" not in await client.response_head()
    await client.frame()  # welcome
    client.writer.write(client_frame(OP_TEXT, compressed(b'{"type":"ping"}'), rsv=4))
    opcode, payload = await client.frame()
    assert (opcode, struct.unpack("!H", payload[:2])[0]) == (OP_CLOSE, 1002)
    client.close()


async def test_edge_offer_with_a_non_ascii_window_is_declined_not_a_crash(
    started_nodes: list[NodeUnderTest],
) -> None:
    """An offer whose window is b"\\xb2" (read as "²", a digit to str.isdigit, not to int)
    gets a plain upgrade and a welcome; it raised in the handshake before."""
    node = await start(started_nodes, compress=True)
    client = await RawClient.open(node)
    offer = b'Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits="\xb2"\r\n'
    head, _ = upgrade_request("/ws/odd")
    client.writer.write(head[:-2] + offer + b"\r\n")
    response = await client.response_head()
    assert response.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Extensions" not in response
    assert orjson.loads((await client.frame())[1])["type"] == "welcome"
    client.close()


@pytest.mark.parametrize("takeover", [False, True], ids=["shared", "context-takeover"])
async def test_edge_aiohttp_client_with_deflate_is_served_by_the_edge(
    started_nodes: list[NodeUnderTest], takeover: bool
) -> None:
    """--compress does not change servers: aiohttp's deflate client is an EdgeConnection,
    gets every event in order (each compressed alone, or with the connection's own
    context), and its compressed pings are answered."""
    node = await start(
        started_nodes, compress=True, compress_min_size=0, compress_context_takeover=takeover
    )
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(node.ws_url("zip"), compress=15)
        try:
            assert ws.compress == 15  # the node agreed to permessage-deflate
            assert (await ws.receive_json())["type"] == "welcome"
            assert node.edge is not None
            assert [c.session.client_id for c in node.edge.connections if c.session] == ["zip"]
            for n in range(30):
                await node.publish("zip", "e", {"n": n, "text": "x" * (n * 40)})
            received = [(await ws.receive_json(timeout=5_000 * MS))["data"] for _ in range(30)]
            assert received == [{"n": n, "text": "x" * (n * 40)} for n in range(30)]
            await ws.send_str('{"type":"ping"}')
            assert (await ws.receive_json(timeout=5_000 * MS))["type"] == "pong"
        finally:
            await ws.close()


async def test_edge_one_event_to_several_sessions_is_compressed_once(
    started_nodes: list[NodeUnderTest],
) -> None:
    """Under --duplicates allow one event reaches every session of its BizId: without
    context every session gets the same compressed bytes."""
    node = await start(started_nodes, compress=True, duplicates="allow")
    clients = []
    for _ in range(3):
        client = await RawClient.open(node)
        head, _ = upgrade_request(
            "/ws/many", extra=f"Sec-WebSocket-Extensions: {WEBSOCKETSHARP}\r\n"
        )
        client.writer.write(head)
        await client.response_head()
        await client.frame()  # welcome
        clients.append(client)
    await node.publish("many", "e", {"text": "z" * 1000})
    frames = [await client.raw_frame() for client in clients]
    assert all(first & RSV1 for first, _ in frames)
    assert len({payload for _, payload in frames}) == 1
    for client in clients:
        client.close()


PAGE = """<!doctype html><script>
const report = (what) => fetch("/report", {method: "POST", body: JSON.stringify(what)});
const ws = new WebSocket("WS_URL");
const events = [];
ws.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (m.type === "welcome") report({welcome: true, extensions: ws.extensions});
  if (m.type === "message") {
    events.push(m.data);
    ws.send(JSON.stringify({type: "ack", id: m.id}));
    ws.send(JSON.stringify({type: "ping"}));
  }
  if (m.type === "pong") report({events: events, extensions: ws.extensions});
};
ws.onclose = (e) => report({closed: e.code});
</script>"""


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium")
async def test_edge_chromium_negotiates_deflate_and_reads_compressed_events(
    started_nodes: list[NodeUnderTest], tmp_path: Path
) -> None:
    """A real browser offers permessage-deflate; the node agrees, its compressed events are
    read, and the browser's compressed ack and ping are inflated (context kept)."""
    node = await start(started_nodes, compress=True, compress_min_size=0)
    reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def page(request: web.Request) -> web.Response:
        html = PAGE.replace("WS_URL", node.ws_url("browser"))
        return web.Response(text=html, content_type="text/html")

    async def report(request: web.Request) -> web.Response:
        await reports.put(orjson.loads(await request.read()))
        return web.Response()

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/report", report)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    browser = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'chromium'}",
        f"http://127.0.0.1:{port}/",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        welcome = await asyncio.wait_for(reports.get(), 30_000 * MS)
        assert welcome == {"welcome": True, "extensions": "permessage-deflate"}
        data = {"label": "ÄÖÜ " * 100, "n": 1}
        await node.publish("browser", "e", data)
        done = await asyncio.wait_for(reports.get(), 15_000 * MS)
        assert done == {"events": [data], "extensions": "permessage-deflate"}
        assert node.edge is not None
        (connection,) = [c for c in node.edge.connections if c.session]
        inflater = connection.inflater
        assert isinstance(inflater, Inflater) and inflater is not node.edge.inflater
        assert inflater.inflated >= 2  # the browser compressed its ack and ping
    finally:
        with contextlib.suppress(ProcessLookupError):
            browser.kill()
        await browser.wait()
        await runner.cleanup()
