"""The node end to end over real sockets, on the memory engine and on a real Redis."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from relay.protocol import SUBPROTOCOL_MSGPACK, CloseCode
from tests.support.node import (
    API_KEY,
    Listener,
    NodeUnderTest,
    listen,
    node_settings,
    start_node,
)
from tests.support.ports import stuck_reader
from tests.support.redis_server import RedisServer
from tests.support.timing import MS

SERVERS = [("memory", "edge"), ("redis", "edge"), ("memory", "aiohttp")]
"""Engine and way in: relay serve's listener on both engines, and aiohttp handing over."""

MakeNode = Callable[..., Awaitable[NodeUnderTest]]


@pytest.fixture(params=SERVERS, ids=["-".join(p) for p in SERVERS])
def make_node(request: pytest.FixtureRequest, started_nodes: list[NodeUnderTest]) -> MakeNode:
    """Start nodes on the engine and server under test; all stop at the end of the test."""
    engine, server = request.param
    if engine == "redis":
        redis_url = request.getfixturevalue("redis_server").url
        return functools.partial(start_node, started_nodes, server, redis_url=redis_url)
    return functools.partial(start_node, started_nodes, server)


async def test_delivery_twenty_clients_in_order_without_misroute(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """20 clients each get exactly their own events, in publish order."""
    relay = await make_node()
    clients = [await listen(listeners, relay.ws_url(f"c{i}")) for i in range(20)]
    for seq in range(200):
        await relay.publish(f"c{seq % 20}", "tick", {"seq": seq})
    for i, client in enumerate(clients):
        messages = await client.wait_messages(10)
        assert [m["data"]["seq"] for m in messages] == list(range(i, 200, 20))
        assert {m["biz_id"] for m in messages} == {f"c{i}"}
        ids = [m["id"] for m in messages]
        assert len(set(ids)) == 10
    await asyncio.sleep(50 * MS)
    assert all(len(c.messages) == 10 for c in clients)


async def test_welcome_first_with_head_of_history(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """The welcome comes first and names the newest id, so a client can resume from it."""
    relay = await make_node()
    result = await relay.publish("alice", "created", {"n": 1})
    client = await listen(listeners, relay.ws_url("alice"))
    welcome = client.welcome
    assert welcome["type"] == "welcome"
    assert welcome["client_id"] == "alice"
    assert welcome["node"] == relay.settings.node_id
    assert welcome["last_id"] == result.id
    assert "recovered" not in welcome
    assert welcome["replayed"] == 0


async def test_resume_after_gap_replays_missed_in_order(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A client that was away gets everything it missed, in order, recovered=true."""
    relay = await make_node()
    first = await listen(listeners, relay.ws_url("bob"))
    await relay.publish("bob", "e", {"seq": 0})
    seen = await first.wait_messages(1)
    await first.close()
    for seq in range(1, 6):
        await relay.publish("bob", "e", {"seq": seq})
    again = await listen(listeners, relay.ws_url("bob", since=seen[-1]["id"]))
    await relay.publish("bob", "e", {"seq": 6})
    messages = await again.wait_messages(6)
    assert again.welcome["recovered"] is True
    assert again.welcome["replayed"] == 5
    assert [m["data"]["seq"] for m in messages] == [1, 2, 3, 4, 5, 6]
    assert again.welcome["last_id"] == messages[4]["id"]


async def test_resume_from_welcome_head_when_nothing_was_received(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A client that never got a message resumes from the welcome's last_id, losing nothing."""
    relay = await make_node()
    first = await listen(listeners, relay.ws_url("quiet"))
    head = first.welcome["last_id"]
    await first.close()
    await relay.publish("quiet", "e", {"seq": 1})
    again = await listen(listeners, relay.ws_url("quiet", since=head))
    messages = await again.wait_messages(1)
    assert again.welcome["recovered"] is True
    assert [m["data"]["seq"] for m in messages] == [1]


async def test_resume_after_trimmed_history_is_not_recovered(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """When history no longer reaches back to `since`, the welcome says recovered=false."""
    relay = await make_node(history_size=5)
    first = await listen(listeners, relay.ws_url("carol"))
    await relay.publish("carol", "e", {"seq": 0})
    seen = await first.wait_messages(1)
    await first.close()
    for seq in range(1, 400):
        await relay.publish("carol", "e", {"seq": seq})
    again = await listen(listeners, relay.ws_url("carol", since=seen[-1]["id"]))
    messages = await again.wait_messages(1)
    assert again.welcome["recovered"] is False
    seqs = [m["data"]["seq"] for m in messages]
    assert seqs == sorted(seqs) and seqs[-1] == 399
    assert len(seqs) < 399


async def test_resume_with_unknown_future_id_is_not_recovered(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """An id newer than anything in history cannot be proven: recovered=false."""
    relay = await make_node()
    await relay.publish("dave", "e", {})
    client = await listen(listeners, relay.ws_url("dave", since="99999999999999-0"))
    assert client.welcome["recovered"] is False


async def test_msgpack_client_by_subprotocol_receives_binary_frames(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """Subprotocol relay.v1.msgpack switches both directions to MessagePack."""
    relay = await make_node()
    client = await listen(
        listeners, relay.ws_url("erin"), fmt="msgpack", protocols=(SUBPROTOCOL_MSGPACK,)
    )
    assert client.ws is not None and client.ws.protocol == SUBPROTOCOL_MSGPACK
    await relay.publish("erin", "e", {"x": [1, 2]})
    messages = await client.wait_messages(1)
    assert messages[0]["data"] == {"x": [1, 2]}
    await client.send({"type": "ping"})
    await client.wait_for(lambda: client.frames[-1] == {"type": "pong"})


async def test_msgpack_and_json_clients_share_a_biz_id(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """With duplicates allowed, a JSON and a MessagePack session of one id both receive."""
    relay = await make_node(duplicates="allow")
    as_json = await listen(listeners, relay.ws_url("fay"))
    as_msgpack = await listen(listeners, relay.ws_url("fay", format="msgpack"), fmt="msgpack")
    await relay.publish("fay", "e", {"k": "v"})
    assert (await as_json.wait_messages(1))[0]["data"] == {"k": "v"}
    assert (await as_msgpack.wait_messages(1))[0]["data"] == {"k": "v"}


async def test_subprotocol_unknown_is_closed_1002(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A client offering only unknown subprotocols is refused with 1002, not ignored."""
    relay = await make_node()
    client = await listen(listeners, relay.ws_url("gus"), protocols=("chat.v9",))
    assert await client.wait_closed() == 1002


async def test_invalid_client_id_is_http_400_before_upgrade(make_node: MakeNode) -> None:
    """A client_id outside the alphabet is refused with HTTP 400 and a JSON error."""
    relay = await make_node()
    async with aiohttp.ClientSession() as http:
        for bad in ("has space", "x" * 129, "semi;colon"):
            async with http.get(f"{relay.base}/ws/{bad}") as response:
                assert response.status == 400
                body = await response.json()
                assert body["error"]["code"] == "bad_client_id"
        async with http.get(f"{relay.base}/ws/ok?since=yesterday") as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "bad_id"
        async with http.get(f"{relay.base}/ws/ok?attempt=no-number") as response:
            assert response.status == 400
            assert "attempt" in (await response.json())["error"]["message"]


async def test_client_frames_ping_ack_and_garbage(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """ping gets pong, ack is recorded, garbage gets an error frame and the session lives."""
    relay = await make_node()
    client = await listen(listeners, relay.ws_url("hal"))
    result = await relay.publish("hal", "e", {})
    await client.wait_messages(1)
    await client.send({"type": "ping"})
    await client.send({"type": "ack", "id": result.id})
    await client.send({"type": "subscribe", "to": "someone-else"})
    await client.wait_for(lambda: sum(f["type"] in ("pong", "error") for f in client.frames) == 2)
    errors = [f for f in client.frames if f["type"] == "error"]
    assert errors[0]["code"] == "bad_request" and "unknown frame type" in errors[0]["message"]
    status = await relay.node.engine.client_status("hal")
    assert status.last_ack == result.id
    await relay.publish("hal", "e", {"after": True})
    assert (await client.wait_messages(2))[-1]["data"] == {"after": True}


async def test_persistent_garbage_is_closed_1008(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A client that keeps sending garbage is closed with 1008 after max_errors."""
    relay = await make_node(max_errors=3)
    client = await listen(listeners, relay.ws_url("ivy"))
    for _ in range(10):
        await client.send({"type": "nonsense"})
    assert await client.wait_closed() == 1008


async def test_oversize_message_is_closed_1009(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A frame over max_message_size is closed with 1009."""
    relay = await make_node(max_message_size=1024)
    client = await listen(listeners, relay.ws_url("jay"))
    assert client.ws is not None
    await client.ws.send_str("x" * 4096)
    assert await client.wait_closed() == 1009


async def test_client_that_never_reads_is_closed_4508_others_unaffected(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A stuck client is closed with 4508 while an honest one receives every event."""
    relay = await make_node(send_queue_max=50, send_timeout=1000 * MS)
    honest = await listen(listeners, relay.ws_url("honest"))
    stuck = stuck_reader(relay.settings.port, "/ws/stuck")
    try:
        for _ in range(100):
            if relay.node.by_client.get("stuck"):
                break
            await asyncio.sleep(10 * MS)
        blob = "x" * 20000
        for seq in range(400):
            await relay.publish("stuck", "big", {"blob": blob})
            await relay.publish("honest", "e", {"seq": seq})
            if seq % 50 == 0:
                await asyncio.sleep(0)
        messages = await honest.wait_messages(400, timeout=10_000 * MS)
        assert [m["data"]["seq"] for m in messages] == list(range(400))
        for _ in range(300):
            if not relay.node.by_client.get("stuck"):
                break
            await asyncio.sleep(10 * MS)
        closed = relay.node.metrics.sessions_closed.labels("4508")._value.get()
        assert closed == 1
        assert not relay.node.by_client.get("stuck")
    finally:
        stuck.close()


async def test_newer_session_replaces_older_with_4000(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """By default a second connection of a client_id closes the first with 4000."""
    relay = await make_node()
    older = await listen(listeners, relay.ws_url("kim"))
    newer = await listen(listeners, relay.ws_url("kim"))
    assert await older.wait_closed() == 4000
    await relay.publish("kim", "e", {"to": "newer"})
    assert (await newer.wait_messages(1))[0]["data"] == {"to": "newer"}
    status = await relay.node.engine.client_status("kim")
    assert status.online and status.session == newer.welcome["session"]


async def test_drain_closes_sessions_1012(make_node: MakeNode, listeners: list[Listener]) -> None:
    """Draining closes every session with 1012 (reconnect at once and resume)."""
    relay = await make_node()
    clients = [await listen(listeners, relay.ws_url(f"d{i}")) for i in range(5)]
    await relay.node.drain(300 * MS)
    for client in clients:
        assert await client.wait_closed() == 1012


async def test_api_publish_and_errors(make_node: MakeNode, listeners: list[Listener]) -> None:
    """POST /api/publish delivers; bad key 401, bad body 400, oversize 413."""
    relay = await make_node(max_payload=1000)
    client = await listen(listeners, relay.ws_url("lee"))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as http:
        url = f"{relay.base}/api/publish"
        async with http.post(
            url, json={"biz_id": "lee", "event": "e", "data": 1}, headers=auth
        ) as r:
            assert r.status == 200
            body = await r.json()
            assert body["online"] is True and body["receivers"] == 1
            assert body["duplicate"] is False
        async with http.post(url, json={"biz_id": "lee", "event": "e"}) as r:
            assert r.status == 401
        async with http.post(url, data=b"{not json", headers=auth) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "bad_request"
        async with http.post(url, json={"biz_id": "a b", "event": "e"}, headers=auth) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "bad_client_id"
        big = {"biz_id": "lee", "event": "e", "data": "x" * 1500}
        async with http.post(url, json=big, headers=auth) as r:
            assert r.status == 413
        async with http.get(f"{relay.base}/api/clients/lee", headers=auth) as r:
            assert (await r.json())["online"] is True
        async with http.get(f"{relay.base}/readyz") as r:
            assert r.status == 200
        async with http.get(f"{relay.base}/metrics") as r:
            assert "relay_connections 1.0" in await r.text()
    assert [m["data"] for m in await client.wait_messages(1)] == [1]


async def test_publish_mid_is_idempotent(make_node: MakeNode, listeners: list[Listener]) -> None:
    """A repeated mid returns the first id, duplicate=true, and delivers once."""
    relay = await make_node()
    client = await listen(listeners, relay.ws_url("max"))
    first = await relay.publish("max", "e", {"n": 1}, mid="order-17")
    again = await relay.publish("max", "e", {"n": 1}, mid="order-17")
    assert again.id == first.id and again.duplicate and not first.duplicate
    await relay.publish("max", "e", {"n": 2})
    messages = await client.wait_messages(2)
    assert [m["data"]["n"] for m in messages] == [1, 2]


async def test_restarted_redis_without_persistence_ends_session_4509_then_resumes_live(
    own_redis: RedisServer, listeners: list[Listener]
) -> None:
    """Redis restarted without AOF lost its data: the session ends 4509 (no proof nothing
    was lost), a resume is told recovered=false, and live delivery goes on."""
    relay = await NodeUnderTest(node_settings(redis_url=own_redis.url)).start()
    try:
        client = await listen(listeners, relay.ws_url("ned"))
        await relay.publish("ned", "e", {"seq": 0})
        await client.wait_messages(1)
        own_redis.restart()
        assert await client.wait_closed(timeout=15_000 * MS) == CloseCode.FEED_GAP
        assert [m["data"]["seq"] for m in client.messages] == [0]
        since = client.messages[-1]["id"]
        again = None
        for _ in range(300):  # refused with 1013 until the node proves its feed live again
            again = await listen(listeners, relay.ws_url("ned", since=since))
            if again.close_code is None:
                break
            await asyncio.sleep(50 * MS)
        assert again is not None and again.welcome["recovered"] is False
        await relay.publish("ned", "e", {"seq": 1})
        messages = await again.wait_messages(1, timeout=15_000 * MS)
        assert [m["data"]["seq"] for m in messages] == [1]
    finally:
        await relay.stop()


async def test_resume_on_restarted_memory_node_is_not_recovered(
    listeners: list[Listener],
) -> None:
    """A memory node that restarted lost its history: a resume cannot be proven complete."""
    settings = node_settings()
    relay = await NodeUnderTest(settings).start()
    first = await listen(listeners, relay.ws_url("otto"))
    head = first.welcome["last_id"]
    await first.close()
    await relay.stop()
    await asyncio.sleep(10 * MS)
    relay = await NodeUnderTest(settings).start()
    try:
        again = await listen(listeners, relay.ws_url("otto", since=head))
        assert again.welcome["recovered"] is False
    finally:
        await relay.stop()


async def test_occasional_bursts_over_the_rate_are_forgiven(listeners: list[Listener]) -> None:
    """Bursts spread over time are throttled, never closed: only a sustained flood is."""
    relay = await NodeUnderTest(node_settings(client_rate=10, client_burst=2)).start()
    try:
        client = await listen(listeners, relay.ws_url("burst"))
        for _ in range(3):
            for _ in range(3):
                await client.send({"type": "ping"})
            await asyncio.sleep(500 * MS)
        assert client.close_code is None
        for _ in range(200):
            await client.send({"type": "ping"})
        assert await client.wait_closed() == 1008
    finally:
        await relay.stop()


class _RecordingTransport:
    """A socket double for sessions opened directly on the node."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed_with: int | None = None

    async def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = code

    def abort(self) -> None:
        self.closed_with = self.closed_with or 1006


async def test_stale_handshake_finishing_last_does_not_replace_newer(make_node: MakeNode) -> None:
    """A client's abandoned slow attempt that completes late is closed, not its live session."""
    from relay.protocol import Format

    relay = await make_node()
    node = relay.node
    live, stale = _RecordingTransport(), _RecordingTransport()
    now = time.time()
    newer = await node.connect("twice", Format.JSON, live, started_at=now)
    older = await node.connect("twice", Format.JSON, stale, started_at=now - 10)
    for _ in range(100):
        if stale.closed_with is not None:
            break
        await asyncio.sleep(10 * MS)
    assert stale.closed_with == 4000
    assert live.closed_with is None and not newer.closing
    assert (await node.engine.client_status("twice")).session == newer.id
    await node.disconnect(older)
    await node.disconnect(newer)


async def test_rejoin_closes_sessions_1012_so_clients_register_again(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """When the registry forgot this node, its clients are sent to reconnect (1012)."""
    from relay.engine import Control

    relay = await make_node()
    client = await listen(listeners, relay.ws_url("rejoiner"))
    relay.node.on_control(Control("rejoin"))
    assert await client.wait_closed() == 1012
