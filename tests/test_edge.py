"""The lean listener (relay.edge), the one WebSocket server, on a real socket: handshakes,
hand-over to aiohttp and back, close handshakes, heartbeats, hostile frames."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from relay.edge import Edge, EdgeConnection
from relay.engines.memory import MemoryEngine
from relay.frames import MAX_OVERHEAD, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, accept_key
from relay.metrics import Metrics
from relay.node import Node
from tests.support.frames import client_frame
from tests.support.node import Listener, NodeUnderTest, listen, node_settings
from tests.support.raw import RawClient, upgrade_request
from tests.support.timing import MS, eventually


async def start(started: list[NodeUnderTest], **overrides: Any) -> NodeUnderTest:
    node = await NodeUnderTest(node_settings(**overrides)).start()
    started.append(node)
    return node


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


async def test_edge_resume_replay_beyond_the_held_bytes_arrives_whole_and_in_order(
    started_nodes: list[NodeUnderTest],
) -> None:
    """A resume whose replay is larger than what is held with the 101 (64 KiB): the 101,
    the welcome, then every missed event once, in order, then live events."""
    node = await start(started_nodes)
    first = await node.publish("big", "e", {"n": -1})
    for n in range(90):  # ~90 KB of replay; the history keeps 100 events
        await node.publish("big", "e", {"n": n, "pad": "x" * 1000})
    client = await RawClient.open(node)
    head, _ = upgrade_request(f"/ws/big?since={first.id}")
    client.writer.write(head)
    assert (await client.response_head()).startswith(b"HTTP/1.1 101 ")
    welcome = orjson.loads((await client.frame())[1])
    assert welcome["type"] == "welcome" and welcome["replayed"] == 90 and welcome["recovered"]
    replayed = [orjson.loads((await client.frame())[1])["data"]["n"] for _ in range(90)]
    assert replayed == list(range(90))
    await node.publish("big", "e", {"n": 90})
    assert orjson.loads((await client.frame())[1])["data"]["n"] == 90
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
    answer = await asyncio.wait_for(client.reader.read(), 5000 * MS)  # the node hangs up after it
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
    body = orjson.loads(answer.partition(b"\r\n\r\n")[2])
    assert message.decode().lower() in body["error"]["message"].lower()
    client.close()


async def test_other_requests_go_to_aiohttp_and_keep_alive_upgrades_to_the_edge(
    started_nodes: list[NodeUnderTest],
) -> None:
    """Health, the API and 405s are aiohttp's; a WebSocket requested on a keep-alive
    connection after another request (a proxy reusing an idle upstream connection) is
    taken over by the edge, a frame sent with its head included, and aiohttp lets go of
    the connection when it ends."""
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
    client.writer.write(head + client_frame(OP_TEXT, b'{"type":"ping"}'))
    assert (await client.response_head()).startswith(b"HTTP/1.1 101")
    assert orjson.loads((await client.frame())[1])["type"] == "welcome"
    assert await client.frame() == (OP_TEXT, b'{"type":"pong"}')
    assert node.edge is not None
    assert [c.session.client_id for c in node.edge.connections if c.session] == ["kept"]
    await node.publish("kept", "e", {"n": 1})
    assert orjson.loads((await client.frame())[1])["data"] == {"n": 1}
    client.writer.write(client_frame(OP_CLOSE, struct.pack("!H", 1000)))
    assert (await client.frame())[0] == OP_CLOSE
    assert await asyncio.wait_for(client.reader.read(), 5000 * MS) == b""
    assert node.runner is not None and node.runner.server is not None
    server = node.runner.server
    for _ in range(200):
        if not server.connections and not node.edge.connections:
            break
        await asyncio.sleep(10 * MS)
    assert not server.connections and not node.edge.connections
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
    assert await asyncio.wait_for(client.reader.read(), 5000 * MS) == b""  # the server hangs up
    for _ in range(100):
        if not node.node.by_client.get("leaver"):
            break
        await asyncio.sleep(10 * MS)
    assert not node.node.by_client.get("leaver")
    client.close()


async def test_heartbeat_pings_and_drops_a_silent_peer(
    started_nodes: list[NodeUnderTest], listeners: list[Listener]
) -> None:
    """A client that never answers pings is dropped, and the node says so; one that does
    (aiohttp) stays."""
    with capture_logs() as logs:
        node = await start(started_nodes, heartbeat=400 * MS)
        polite = await listen(listeners, node.ws_url("polite"))
        mute = await RawClient.open(node)
        mute.writer.write(upgrade_request("/ws/mute")[0])
        await mute.response_head()
        await mute.frame()  # welcome
        assert await mute.frame(timeout=3000 * MS) == (OP_PING, b"")
        # aborted, no pong came
        assert await asyncio.wait_for(mute.reader.read(), 3000 * MS) == b""
    missed = [e for e in logs if e["event"] == "session.pong_missed"]
    assert [e["client_id"] for e in missed] == ["mute"] and missed[0]["waited"] > 0.2
    await asyncio.sleep(1000 * MS)  # over two heartbeats: the polite client pongs through them
    assert polite.close_code is None and node.node.by_client.get("polite")
    await node.publish("polite", "e", 1)
    assert [m["data"] for m in await polite.wait_messages(1)] == [1]
    mute.close()


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
        await asyncio.sleep(10 * MS)
    assert not node.node.sessions and not node.node.by_client
    assert node.edge is not None
    assert all(c.session is None for c in node.edge.connections)

    async def all_offline() -> bool:
        statuses = [await node.node.engine.client_status(f"quitter{i}") for i in range(50)]
        return not any(status.online for status in statuses)

    # A session leaves node.sessions first; its record is released a step later.
    await eventually(all_offline, what="every quitter offline")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(node.ws_url("after"))
        assert (await ws.receive_json())["type"] == "welcome"
        await ws.close()


async def _wait_eof(client: RawClient, timeout: float) -> float:
    """Seconds until the node hung up; asserts it sent nothing more before."""
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(client.reader.read(), timeout) == b""
    return asyncio.get_running_loop().time() - started


@pytest.mark.parametrize("cause", ["connection-limit-1013", "drain-1012"])
async def test_edge_echoed_close_code_ends_tcp_at_once(
    started_nodes: list[NodeUnderTest], cause: str
) -> None:
    """A client that answers the node's 1013 or 1012 with the same code (as browsers do)
    is hung up on at once, not after the close timeout, and gets no 1002."""
    node = await start(started_nodes, max_connections=1, close_timeout=2000 * MS)
    first = await RawClient.open(node)
    first.writer.write(upgrade_request("/ws/first")[0])
    await first.response_head()
    await first.frame()  # welcome
    if cause == "drain-1012":
        client, expected = first, 1012
        drain = asyncio.get_running_loop().create_task(node.node.drain(0.0))
    else:
        client, expected = await RawClient.open(node), 1013
        client.writer.write(upgrade_request("/ws/second")[0])
        await client.response_head()
    opcode, payload = await client.frame()
    assert (opcode, struct.unpack("!H", payload[:2])[0]) == (OP_CLOSE, expected)
    client.writer.write(client_frame(OP_CLOSE, payload[:2]))
    assert await _wait_eof(client, 5000 * MS) < 1000 * MS  # the close timeout is 2000 MS
    if cause == "drain-1012":
        await drain
    else:
        first.close()
    client.close()


async def test_edge_frames_before_a_bad_frame_in_one_read_are_served(
    started_nodes: list[NodeUnderTest],
) -> None:
    """A ping and an unmasked frame in one write: the pong comes, then close 1002."""
    node = await start(started_nodes)
    client = await RawClient.open(node)
    client.writer.write(upgrade_request("/ws/mixed")[0])
    await client.response_head()
    await client.frame()  # welcome
    client.writer.write(
        client_frame(OP_TEXT, b'{"type":"ping"}') + client_frame(OP_TEXT, b"x", masked=False)
    )
    assert await client.frame() == (OP_TEXT, b'{"type":"pong"}')
    opcode, payload = await client.frame()
    assert (opcode, struct.unpack("!H", payload[:2])[0]) == (OP_CLOSE, 1002)
    client.close()


async def test_edge_ping_flood_gets_few_pongs_then_1008(
    started_nodes: list[NodeUnderTest],
) -> None:
    """A thousand WebSocket pings in a burst: at most --client-ping-rate pongs a second,
    then close 1008 "rate limit exceeded" once the frame budget is spent."""
    node = await start(started_nodes, client_ping_rate=5.0, client_frame_burst=300)
    client = await RawClient.open(node)
    client.writer.write(upgrade_request("/ws/pinger")[0])
    await client.response_head()
    await client.frame()  # welcome
    pings = b"".join(client_frame(OP_PING, b"p" * 125) for _ in range(50))
    client.writer.write(pings)
    assert await client.frame() == (OP_PONG, b"p" * 125)
    for _ in range(19):
        client.writer.write(pings)
        with contextlib.suppress(ConnectionError):
            await client.writer.drain()
    pongs = 1
    while True:
        opcode, payload = await client.frame()
        if opcode != OP_PONG:
            break
        pongs += 1
    assert (opcode, struct.unpack("!H", payload[:2])[0]) == (OP_CLOSE, 1008)
    assert payload[2:] == b"rate limit exceeded"
    assert 1 <= pongs <= 10
    client.close()


class UnreadPeerTransport(asyncio.Transport):
    """The socket under one EdgeConnection, whose peer reads only when the test says so.

    Writes pile up in a buffer with asyncio's default marks (pause_writing above 64 KiB,
    resume_writing at 16 KiB); pause_reading stops the test from delivering bytes, as
    the kernel would; connection_lost comes on the next loop turn, as it does for real.
    """

    HIGH = 64 * 1024
    LOW = 16 * 1024

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.buffered = 0
        self.peak = 0
        self.paused = False
        self.reading = True
        self.closing = False
        self.lost = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            return
        self.buffered += len(data)
        self.peak = max(self.peak, self.buffered)
        if not self.paused and self.buffered > self.HIGH:
            self.paused = True
            self.protocol.pause_writing()

    def peer_reads(self, size: int) -> None:
        self.buffered -= min(size, self.buffered)
        if self.paused and self.buffered <= self.LOW:
            self.paused = False
            self.protocol.resume_writing()
        if self.closing and not self.buffered:
            self._lose()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        if not self.buffered:
            self._lose()

    def abort(self) -> None:
        self.closing = True
        self.buffered = 0
        self._lose()

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


EDGE_MAX_SIZE = 2048


@st.composite
def client_messages(draw: st.DrawFn) -> bytes:
    """One client message in 1-12 fragments (empty ones too) with pings between them,
    left unfinished now and then; or a burst of pings; or, rarely, a broken frame."""
    kind = draw(st.sampled_from(["message"] * 3 + ["pings"] * 4 + ["broken"]))
    if kind == "pings":
        return client_frame(OP_PING, b"p" * 125) * draw(st.integers(1, 200))
    if kind == "broken":
        return draw(
            st.sampled_from(
                [
                    client_frame(OP_TEXT, b"x", masked=False),
                    client_frame(OP_TEXT, b"\xff"),
                    client_frame(OP_CLOSE, struct.pack("!H", 1000)),
                    client_frame(OP_BINARY, b"x" * (EDGE_MAX_SIZE + 1)),
                ]
            )
        )
    body = draw(st.sampled_from([b'{"type":"ping"}', b"junk", b"a" * (EDGE_MAX_SIZE - 1)]))
    opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
    count = draw(st.integers(1, 12))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), min_size=count - 1, max_size=count - 1)))
    parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    unfinished = draw(st.integers(0, 5)) == 0
    frames = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1 and not unfinished
        frames.append(
            client_frame(
                OP_TEXT if i == 0 and opcode == OP_TEXT else (opcode if i == 0 else 0),
                part,
                fin=last,
            )
        )
        if draw(st.booleans()):
            frames.append(client_frame(draw(st.sampled_from([OP_PING, OP_PONG])), b"c" * 125))
    return b"".join(frames)


@st.composite
def edge_actions(draw: st.DrawFn) -> list[tuple[str, bytes | int]]:
    """A client's life on the edge: writes (cut anywhere) of random messages, turns of
    the event loop, and reads of what the node sent it (mostly none)."""
    actions: list[tuple[str, bytes | int]] = []
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["write", "write", "write", "turn", "peer_reads"]))
        if kind == "turn":
            actions.append(("turn", 0))
        elif kind == "peer_reads":
            actions.append(("peer_reads", draw(st.sampled_from([1, 4096, 1 << 20]))))
        else:
            data = draw(client_messages())
            cut = draw(st.integers(0, len(data)))
            actions += [("write", data[:cut]), ("write", data[cut:])]
    return actions


def edge_bound(max_size: int) -> int:
    """docs/security.md: what one client's input can make an edge connection hold."""
    parser = max_size + MAX_OVERHEAD
    pending = max_size  # messages sent before the session opened
    owed_pong = 125
    write_buffer = UnreadPeerTransport.HIGH + 4096  # high-water mark + one frame of ours
    return parser + pending + owed_pong + write_buffer


async def drive_edge(actions: list[tuple[str, bytes | int]]) -> tuple[int, int]:
    settings = node_settings(
        max_message_size=EDGE_MAX_SIZE,
        max_fragments=8,
        client_frame_burst=3000,  # high enough for pongs to reach the high-water mark
        client_ping_rate=10_000.0,
        client_rate=1000.0,
        client_burst=1000,
        max_errors=1000,
    )
    node = Node(settings, MemoryEngine(settings.engine_options), Metrics())
    await node.start()
    edge = Edge(node)
    connection = EdgeConnection(edge)
    transport = UnreadPeerTransport(connection)
    connection.connection_made(transport)
    backlog: list[bytes] = [upgrade_request("/ws/prop")[0]]
    peak = 0
    try:
        for kind, value in actions:
            if kind == "write":
                assert isinstance(value, bytes)
                backlog.append(value)
            elif kind == "peer_reads":
                assert isinstance(value, int)
                transport.peer_reads(value)
            await asyncio.sleep(0)
            while backlog and transport.reading and not transport.lost:
                connection.data_received(backlog.pop(0))
                peak = max(peak, connection.held())
                assert connection.held() <= edge_bound(EDGE_MAX_SIZE)
        transport.peer_reads(1 << 30)
        for _ in range(5):
            await asyncio.sleep(0)
        return peak, transport.peak
    finally:
        transport.abort()
        await asyncio.sleep(0)
        await node.close()


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(edge_actions())
def test_edge_memory_per_connection_stays_bounded(actions: list[tuple[str, bytes | int]]) -> None:
    """Random frame sequences against an EdgeConnection whose peer reads when it likes:
    the bytes held for it never exceed the documented bound."""
    peak, write_peak = asyncio.run(drive_edge(actions))
    event(f"held peak {peak // 1024} KiB, write buffer peak {write_peak // 1024} KiB")
    assert peak <= edge_bound(EDGE_MAX_SIZE)


def test_edge_pongs_wait_while_the_client_does_not_read() -> None:
    """Pings from a client that reads nothing: pongs stop at the write buffer's
    high-water mark, the socket is no longer read, and only the latest ping is answered
    once the client reads again."""

    async def scenario() -> None:
        settings = node_settings(client_ping_rate=10_000.0, client_frame_burst=100_000)
        node = Node(settings, MemoryEngine(settings.engine_options), Metrics())
        await node.start()
        connection = EdgeConnection(Edge(node))
        transport = UnreadPeerTransport(connection)
        connection.connection_made(transport)
        connection.data_received(upgrade_request("/ws/deaf")[0])
        for _ in range(5):
            await asyncio.sleep(0)
        pings = 0
        while transport.reading:
            connection.data_received(client_frame(OP_PING, (b"%07d" % pings).ljust(125)))
            pings += 1
        assert transport.paused and pings < 600  # 64 KiB of pongs at most
        assert transport.buffered <= UnreadPeerTransport.HIGH + 200
        connection.data_received(client_frame(OP_PING, b"latest"))  # what a kernel had
        written = transport.buffered
        transport.peer_reads(1 << 30)
        assert transport.reading and transport.buffered == len(b"latest") + 2
        assert written <= UnreadPeerTransport.HIGH + 200
        transport.abort()
        await asyncio.sleep(0)
        await node.close()

    asyncio.run(scenario())


header_values = st.one_of(
    st.binary(max_size=40).filter(lambda b: b"\r\n" not in b),
    st.sampled_from(
        [
            *(b"\xff", b"Bearer \xff\xfe", b"%FF%FE", b"websocket", b"Upgrade", b"13"),
            *(b"permessage-deflate; server_max_window_bits=10", b'permessage-deflate; x="'),
        ]
    ),
)
header_names = st.sampled_from(
    [
        b"Upgrade",
        b"Connection",
        b"Sec-WebSocket-Key",
        b"Sec-WebSocket-Version",
        b"Sec-WebSocket-Protocol",
        b"Sec-WebSocket-Extensions",
        b"Authorization",
        b"Origin",
        b"X-Relay-Lb-Retry",
        b"X-\xff",
    ]
)
targets = st.one_of(
    st.builds(
        lambda cid, query: b"/ws/" + cid + (b"?" + query if query else b""),
        st.one_of(
            st.from_regex(rb"[A-Za-z0-9_.:@-]{1,12}", fullmatch=True),
            st.binary(max_size=20).filter(lambda b: b" " not in b and b"\r" not in b),
        ),
        st.sampled_from(
            [b"", b"token=%FF%FE", b"since=%FF", b"format=\xff", b"since=1-0&attempt=x"]
        ),
    ),
    st.binary(max_size=30).filter(lambda b: b" " not in b and b"\r\n" not in b),
)


VALID_UPGRADE = {
    b"Upgrade": b"websocket",
    b"Connection": b"Upgrade",
    b"Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ==",
    b"Sec-WebSocket-Version": b"13",
}


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(targets, st.lists(st.tuples(header_names, header_values), max_size=4))
def test_edge_handshake_of_any_bytes_is_an_upgrade_or_an_http_refusal(
    target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Any request head on /ws/ (non-UTF-8 values, odd targets and queries): the edge
    answers 101 or an HTTP error with a JSON body, never an exception (a traceback)."""

    async def scenario() -> bytes:
        settings_ = node_settings(allowed_origins=("https://app.example.com",), compress=True)
        node = Node(settings_, MemoryEngine(settings_.engine_options), Metrics())
        await node.start()
        edge = Edge(node)
        edge.http = asyncio.Protocol  # what is not /ws/ goes to "aiohttp"
        connection = EdgeConnection(edge)
        transport = RecordingPeer(connection)
        connection.connection_made(transport)
        fields = dict(VALID_UPGRADE)
        fields.update(headers)  # junk replaces or joins the valid upgrade's headers
        head = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
        head += b"".join(name + b": " + value + b"\r\n" for name, value in fields.items())
        connection.data_received(head + b"\r\n")
        for _ in range(5):
            await asyncio.sleep(0)
        transport.abort()
        await asyncio.sleep(0)
        await node.close()
        return bytes(transport.written)

    answer = asyncio.run(scenario())
    if not target.startswith(b"/ws/"):
        return  # handed to aiohttp (its parser: tests/test_hostile_costs.py)
    status = answer[9:12]
    event(f"HTTP {status.decode()}")
    assert answer.startswith(b"HTTP/1.1 ") and status in (b"101", b"400", b"403", b"404", b"503")
    if status != b"101":
        assert set(orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]) == {"code", "message"}


class RecordingPeer(UnreadPeerTransport):
    """UnreadPeerTransport that keeps what the edge wrote, and takes a hand-over."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__(protocol)
        self.written = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self.written += data
        super().write(data)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self.protocol = protocol
