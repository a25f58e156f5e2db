"""Hostile clients against a real node: junk, floods, stuck readers, half requests.

Each attack gets its documented close code (docs/security.md) while an honest client on
the same node keeps receiving every event, in order, published throughout the attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgpack
import orjson
import pytest
from aiohttp import WSMsgType
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from backend_adapter import issue_token
from relay.engines.memory import MemoryEngine
from relay.wire import History, StreamId
from tests.support.node import API_KEY, Listener, NodeUnderTest, listen, node_settings
from tests.support.ports import stuck_reader
from tests.support.redis_server import RedisServer
from tests.support.served import ServedNode
from tests.support.timing import MS

SECRET = "relay-hostile-secret-0123456789abcdef"
T = TypeVar("T")
MakeNode = Callable[..., Awaitable[NodeUnderTest]]


@pytest.fixture
def make_node(started_nodes: list[NodeUnderTest]) -> MakeNode:
    """In-process nodes on the memory engine; all stop at the end of the test."""

    async def make(engine: Any = None, **overrides: Any) -> NodeUnderTest:
        node = await NodeUnderTest(node_settings(**overrides), engine).start()
        started_nodes.append(node)
        return node

    return make


class SteadyPublisher:
    """Publishes ``{"seq": n}`` to one BizId every millisecond until stopped."""

    def __init__(self, publish: Callable[[str, str, Any], Awaitable[Any]], biz_id: str) -> None:
        self.publish = publish
        self.biz_id = biz_id
        self.count = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> SteadyPublisher:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.publish(self.biz_id, "tick", {"seq": self.count})
            self.count += 1
            await asyncio.sleep(1 * MS)

    async def stop(self) -> int:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.count


async def assert_got_everything(honest: Listener, publisher: SteadyPublisher) -> None:
    """Stop publishing; the honest client has every event, in order, nothing else."""
    total = await publisher.stop()
    messages = await honest.wait_messages(total, timeout=10_000 * MS)
    assert [m["data"]["seq"] for m in messages] == list(range(total))
    assert {m["biz_id"] for m in messages} == {honest.welcome["client_id"]}
    assert honest.close_code is None


# -- attacks, each beside an honest client ---------------------------------------------

Attack = Callable[[Listener], Coroutine[Any, Any, None]]


async def send_ten_mib(attacker: Listener) -> None:
    assert attacker.ws is not None
    with contextlib.suppress(ConnectionError):  # the node hangs up mid-send
        await attacker.ws.send_bytes(b"x" * (10 << 20))


async def send_garbage_burst(attacker: Listener) -> None:
    assert attacker.ws is not None
    for i in range(1000):
        with contextlib.suppress(ConnectionError):
            await attacker.ws.send_str(f"garbage {i} {{[")


async def send_binary_junk(attacker: Listener) -> None:
    assert attacker.ws is not None
    junk = random.Random(1)
    await attacker.ws.send_bytes(junk.randbytes(200))
    await attacker.wait_for(lambda: len(attacker.frames) == 2)
    error = attacker.frames[1]
    assert error == {
        "type": "error",
        "code": "bad_request",
        "message": "this connection speaks JSON text frames",
    }
    for _ in range(50):
        with contextlib.suppress(ConnectionError):
            await attacker.ws.send_bytes(junk.randbytes(junk.randrange(1, 3000)))


async def send_truncated_msgpack(attacker: Listener) -> None:
    assert attacker.ws is not None
    frame = msgpack.packb({"type": "ack", "id": "1732612345678-0"})
    await attacker.ws.send_bytes(frame[:-5])
    await attacker.wait_for(lambda: len(attacker.frames) == 2)
    error = attacker.frames[1]
    assert error["code"] == "bad_request" and error["message"] == "frame is not valid msgpack"
    await attacker.send({"type": "ping"})  # the session survives one bad frame
    await attacker.wait_for(lambda: attacker.frames[-1] == {"type": "pong"})
    for cut in range(1, 40):
        with contextlib.suppress(ConnectionError):
            await attacker.ws.send_bytes(frame[: len(frame) - 1 - cut % (len(frame) - 1)])


async def send_invalid_utf8(attacker: Listener) -> None:
    assert attacker.ws is not None
    await attacker.ws.send_frame(b'{"type":"ping","x":"\xff\xfe"}', WSMsgType.TEXT)


async def send_ping_flood(attacker: Listener) -> None:
    assert attacker.ws is not None
    for _ in range(1000):  # valid frames, far above --client-rate 20/s and its burst of 60
        with contextlib.suppress(ConnectionError):
            await attacker.send({"type": "ping"})


ATTACKS: dict[str, tuple[Attack, str, int, str]] = {
    # name: (attack, format, close code, close reason)
    "10MiB-frame": (send_ten_mib, "json", 1009, ""),
    "1000-garbage-frames": (send_garbage_burst, "json", 1008, "too many invalid frames"),
    "binary-junk": (send_binary_junk, "json", 1008, "too many invalid frames"),
    "truncated-msgpack": (send_truncated_msgpack, "msgpack", 1008, "too many invalid frames"),
    "invalid-utf8-text": (send_invalid_utf8, "json", 1007, ""),
    "ping-flood": (send_ping_flood, "json", 1008, "rate limit exceeded"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_hostile_attack_gets_its_code_honest_client_gets_everything(
    make_node: MakeNode, listeners: list[Listener], name: str
) -> None:
    """Each attack is closed with its documented code; an honest client misses nothing."""
    attack, fmt, code, reason = ATTACKS[name]
    relay = await make_node()
    honest = await listen(listeners, relay.ws_url("honest"))
    publisher = SteadyPublisher(relay.publish, "honest").start()
    url = relay.ws_url("mallory", format=fmt)
    attacker = await listen(listeners, url, fmt=fmt)
    assert attacker.welcome["type"] == "welcome"
    await attack(attacker)
    assert await attacker.wait_closed(timeout=10_000 * MS) == code
    assert attacker.close_reason == reason
    during = publisher.count
    while publisher.count < during + 10:  # keep publishing a little after the close
        await asyncio.sleep(5 * MS)
    await assert_got_everything(honest, publisher)
    assert not relay.node.by_client.get("mallory")


async def test_hostile_slow_consumer_is_bounded_by_bytes(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """Big frames overflow --send-queue-max-bytes long before the frame count: 4508."""
    relay = await make_node(send_queue_max=100_000, send_queue_max_bytes=1 << 20)
    honest = await listen(listeners, relay.ws_url("honest"))
    stuck = stuck_reader(relay.settings.port, "/ws/stuck")
    try:
        for _ in range(200):
            if relay.node.by_client.get("stuck"):
                break
            await asyncio.sleep(10 * MS)
        blob = "x" * 50_000
        with capture_logs() as logs:
            publisher = SteadyPublisher(relay.publish, "honest").start()
            for _ in range(200):  # 10 MB at a client that reads nothing
                await relay.publish("stuck", "big", {"blob": blob})
                await asyncio.sleep(0)
            for _ in range(300):
                if not relay.node.by_client.get("stuck"):
                    break
                await asyncio.sleep(10 * MS)
            await assert_got_everything(honest, publisher)
        overflow = next(e for e in logs if e["event"] == "session.overflowed")
        assert overflow["client_id"] == "stuck"
        assert overflow["queued"] < 30 and overflow["queued_bytes"] <= 1 << 20
        assert not any(e["event"] == "session.send_timed_out" for e in logs)
        assert relay.node.metrics.sessions_closed.labels("4508")._value.get() == 1
    finally:
        stuck.close()


MALFORMED = {
    "request-line-9k": b"GET /ws/a?token=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header-9k": b"GET /ws/a HTTP/1.1\r\nHost: x\r\nX-A: " + b"y" * 9000 + b"\r\n\r\n",
    "200-headers": b"GET /ws/a HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    + b"\r\n",
    "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100) + b"\r\n\r\n",
    "no-upgrade": b"GET /ws/a HTTP/1.1\r\nHost: x\r\n\r\n",
    # A valid upgrade with a 55 KiB head (7 headers of 8,000 B), all in one write.
    "head-55k-one-write": b"GET /ws/a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 8000) for i in range(7))
    + b"\r\n",
    "no-ws-key": b"GET /ws/a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
}


async def test_hostile_malformed_http_is_400_node_keeps_serving(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """Oversized or malformed request heads get HTTP 400; sessions on the node live on."""
    relay = await make_node()
    honest = await listen(listeners, relay.ws_url("honest"))
    publisher = SteadyPublisher(relay.publish, "honest").start()

    def exchange(request: bytes) -> bytes:
        with socket.create_connection(
            ("127.0.0.1", relay.settings.port), timeout=5000 * MS
        ) as sock:
            sock.sendall(request)
            return sock.recv(64)

    loop = asyncio.get_running_loop()
    for name, request in MALFORMED.items():
        answer = await loop.run_in_executor(None, exchange, request)
        assert re.match(rb"HTTP/1\.[01] 400 ", answer), (name, answer)
    await assert_got_everything(honest, publisher)


async def test_hostile_connection_limit_closes_1013(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """Past --max-connections a new session is closed with 1013; a freed slot is reused."""
    relay = await make_node(max_connections=3)
    first = [await listen(listeners, relay.ws_url(f"c{i}")) for i in range(3)]
    extra = await listen(listeners, relay.ws_url("c3"))
    assert await extra.wait_closed() == 1013
    assert extra.close_reason == "connection limit reached" and not extra.frames
    await first[0].close()
    for _ in range(100):
        if len(relay.node.sessions) < 3:
            break
        await asyncio.sleep(10 * MS)
    again = await listen(listeners, relay.ws_url("c3"))
    assert again.welcome["type"] == "welcome"
    await relay.publish("c1", "e", {})
    await first[1].wait_messages(1)


async def test_hostile_origin_allow_list(make_node: MakeNode) -> None:
    """--allowed-origins: a foreign browser Origin gets 403 before the upgrade."""
    relay = await make_node(allowed_origins=("https://app.example.com",))
    async with aiohttp.ClientSession() as http:
        async with http.get(
            relay.ws_url("cml").replace("ws:", "http:"),
            headers={
                "Origin": "https://evil.example.com",
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        ) as response:
            assert response.status == 403
            body = await response.json()
            assert body["error"]["code"] == "origin_not_allowed"
        for origin in ("https://app.example.com", "HTTPS://APP.example.com/", None):
            async with http.ws_connect(relay.ws_url("cml"), origin=origin) as ws:
                welcome = orjson.loads((await ws.receive(timeout=5000 * MS)).data)
                assert welcome["type"] == "welcome", origin


async def test_hostile_since_older_than_max_age_is_not_recovered(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A since past --max-since-age gets recovered=false (no proof), still the replay."""
    relay = await make_node(max_since_age=500 * MS)
    first = await relay.publish("sam", "e", {"n": 1})
    await relay.publish("sam", "e", {"n": 2})
    await asyncio.sleep(700 * MS)
    third = await relay.publish("sam", "e", {"n": 3})
    stale = await listen(listeners, relay.ws_url("sam", since=first.id))
    assert stale.welcome["recovered"] is False and stale.welcome["replayed"] == 2
    assert [m["data"]["n"] for m in await stale.wait_messages(2)] == [2, 3]
    await stale.close()
    fresh = await listen(listeners, relay.ws_url("sam", since=third.id))
    assert fresh.welcome["recovered"] is True and fresh.welcome["replayed"] == 0
    unlimited = await make_node(max_since_age=0)
    old = await unlimited.publish("sam", "e", {"n": 1})
    await unlimited.publish("sam", "e", {"n": 2})
    await asyncio.sleep(600 * MS)
    again = await listen(listeners, unlimited.ws_url("sam", since=old.id))
    assert again.welcome["recovered"] is True and again.welcome["replayed"] == 1


# -- error hygiene ---------------------------------------------------------------------

LEAKY = f"redis://:{SECRET}@db.internal:6379 refused"


class ExplodingEngine(MemoryEngine):
    """A memory engine that fails unexpectedly, with a secret in the message, for 'victim'."""

    async def history(self, biz_id: str, since: StreamId | None, limit: int) -> History:
        if biz_id == "victim":
            raise RuntimeError(LEAKY)
        return await super().history(biz_id, since, limit)

    async def record_ack(self, client_id: str, session: str, message_id: str) -> None:
        if client_id == "acker":
            raise RuntimeError(LEAKY)
        await super().record_ack(client_id, session, message_id)


async def test_hostile_unexpected_errors_close_1011_without_leaking(
    make_node: MakeNode, listeners: list[Listener], caplog: pytest.LogCaptureFixture
) -> None:
    """A RuntimeError in connect or in the read loop: 1011 "internal error", no secret or
    traceback in the logs or the close reason, the node keeps serving everyone else."""
    tokens = {cid: issue_token(SECRET, cid, 600) for cid in ("honest", "victim", "acker", "late")}
    with capture_logs() as logs:
        relay = await make_node(ExplodingEngine(), allow_anonymous=False, auth_secret=(SECRET,))
        honest = await listen(listeners, relay.ws_url("honest", token=tokens["honest"]))
        publisher = SteadyPublisher(relay.publish, "honest").start()
        victim = await listen(listeners, relay.ws_url("victim", token=tokens["victim"]))
        assert await victim.wait_closed() == 1011
        assert victim.close_reason == "internal error" and not victim.frames
        acker = await listen(listeners, relay.ws_url("acker", token=tokens["acker"]))
        await acker.send({"type": "ack", "id": acker.welcome["last_id"]})
        assert await acker.wait_closed() == 1011
        assert acker.close_reason == "internal error"
        late = await listen(listeners, relay.ws_url("late", token=tokens["late"]))
        assert late.welcome["type"] == "welcome"
        await asyncio.sleep(50 * MS)
        await assert_got_everything(honest, publisher)
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": f"Bearer {API_KEY}"}
            async with http.post(
                f"{relay.base}/api/publish", json={"biz_id": "late", "event": "e"}, headers=auth
            ) as response:
                assert response.status == 200
        await late.wait_messages(1)
    failures = [e for e in logs if e["event"] in ("session.connect_failed", "session.failed")]
    assert [(e["client_id"], e["error"]) for e in failures] == [
        ("victim", "RuntimeError"),
        ("acker", "RuntimeError"),
    ]
    everything = repr(logs) + caplog.text
    for secret in (SECRET, API_KEY, LEAKY, *tokens.values()):
        assert secret not in everything
    assert "Traceback" not in everything
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# -- fuzzing against a live node -----------------------------------------------------------


class LoopThread:
    """An event loop in a thread, so hypothesis' synchronous tests can drive a real node."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15_000 * MS) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class LiveNode:
    """A node and an HTTP client session on a LoopThread."""

    def __init__(self, **overrides: Any) -> None:
        self.thread = LoopThread()
        self.relay = self.thread.run(NodeUnderTest(node_settings(**overrides)).start())
        self.http = self.thread.run(self._session())

    @staticmethod
    async def _session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.thread.run(coro)

    def close(self) -> None:
        self.run(self.http.close())
        self.run(self.relay.stop())
        self.thread.close()

    async def healthy(self) -> None:
        """/healthz answers and a fresh client gets a published event."""
        async with self.http.get(f"{self.relay.base}/healthz") as response:
            assert response.status == 200
        async with self.http.ws_connect(self.relay.ws_url("canary")) as ws:
            assert orjson.loads((await ws.receive(timeout=5000 * MS)).data)["type"] == "welcome"
            await self.relay.publish("canary", "e", {"alive": True})
            message = orjson.loads((await ws.receive(timeout=5000 * MS)).data)
            assert message["data"] == {"alive": True}


@pytest.fixture
def live() -> Iterator[LiveNode]:
    """A node of the test's own: each fuzz test checks its node's health at its end."""
    node = LiveNode(max_payload=2000)
    yield node
    node.close()


FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
good_ids = st.from_regex(r"[A-Za-z0-9_.:@-]{1,12}", fullmatch=True)
good_names = st.text(min_size=1, max_size=20)
# Mostly valid fields, so that bodies get past the first check and reach the engine.
publish_bodies = st.one_of(
    st.fixed_dictionaries(
        {
            "biz_id": st.one_of(good_ids, good_ids, good_ids, st.text(max_size=140), json_values),
            "event": st.one_of(good_names, good_names, st.text(max_size=300), json_values),
        },
        optional={
            "data": st.one_of(json_values, json_values, st.text(min_size=1500, max_size=2500)),
            "mid": st.one_of(good_names, st.text(max_size=300), json_values),
        },
    ),
    json_values,
)


async def _post(live: LiveNode, body: bytes, content_type: str) -> tuple[int, Any]:
    async with live.http.post(
        f"{live.relay.base}/api/publish",
        data=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": content_type},
    ) as response:
        return response.status, await response.read()


def check_api_answer(status: int, raw: bytes) -> None:
    event(f"HTTP {status}")
    assert status in (200, 400, 413), (status, raw[:200])
    body = orjson.loads(raw)
    if status == 200:
        assert set(body) == {"id", "online", "receivers", "duplicate"}
    else:
        assert set(body["error"]) == {"code", "message"}
        assert "Traceback" not in body["error"]["message"]


def test_fuzz_api_publish_json_bodies(live: LiveNode) -> None:
    """Any JSON body on POST /api/publish: 200, 400 or 413 with a JSON answer, never
    500; afterwards the node answers health checks and delivers events."""

    @FUZZ
    @given(publish_bodies)
    def fuzz(body: Any) -> None:
        check_api_answer(*live.run(_post(live, orjson.dumps(body), "application/json")))

    fuzz()
    live.run(live.healthy())


def test_fuzz_api_publish_raw_bytes(live: LiveNode) -> None:
    """Any bytes with any content type: 200, 400 or 413, never 500; the node stays
    healthy."""

    @settings(FUZZ, max_examples=60)
    @given(
        st.one_of(
            st.binary(max_size=300),
            st.binary(min_size=5000, max_size=6000),  # past client_max_size: 413
            st.just(b'{"biz_id":"a","event":"e","data":' * 300),
            st.just(b'{"biz_id":"a","event":"e","data":1e999}'),
            st.just(b'{"biz_id":"a","event":"e","data":123456789012345678901234567890}'),
        ),
        st.sampled_from(["application/json", "text/plain", "application/octet-stream"]),
    )
    def fuzz(body: bytes, content_type: str) -> None:
        check_api_answer(*live.run(_post(live, body, content_type)))

    fuzz()
    live.run(live.healthy())


async def _one_frame(live: LiveNode, fmt: str, opcode: WSMsgType, payload: bytes) -> list[Any]:
    """Send one frame then a ping; what came back (frames, then the close code if any)."""
    seen: list[Any] = []
    url = live.relay.ws_url("fuzzer", format=fmt)
    async with live.http.ws_connect(url, autoclose=False) as ws:
        assert (await ws.receive(timeout=5000 * MS)).type in (WSMsgType.TEXT, WSMsgType.BINARY)
        await ws.send_frame(payload, opcode)
        ping = {"type": "ping"}
        with contextlib.suppress(ConnectionError):
            if fmt == "json":
                await ws.send_str(orjson.dumps(ping).decode())
            else:
                await ws.send_bytes(msgpack.packb(ping))
        while True:
            msg = await ws.receive(timeout=5000 * MS)
            if msg.type == WSMsgType.TEXT:
                seen.append(orjson.loads(msg.data))
            elif msg.type == WSMsgType.BINARY:
                seen.append(msgpack.unpackb(msg.data))
            else:
                seen.append(("close", msg.data if msg.type == WSMsgType.CLOSE else msg.type))
                return seen
            if seen[-1] == {"type": "pong"}:
                return seen


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


frame_payloads = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(lambda v: orjson.dumps(v), json_values),
    st.builds(lambda v, cut: msgpack.packb(v)[:cut], json_values, st.integers(0, 50)),
    st.sampled_from([b'{"type":"ack","id":"1-0"}', b'{"type":"ping"}', b"\x81\xa4type\xa4ping"]),
)


def test_fuzz_arbitrary_frames_over_a_socket(live: LiveNode) -> None:
    """Any single frame: an error frame or a pong, or 1007 for invalid UTF-8 text; never
    1011; afterwards the node is healthy and holds no session of the fuzzer."""

    @settings(FUZZ, max_examples=100)
    @given(
        st.sampled_from(["json", "msgpack"]),
        st.sampled_from([WSMsgType.TEXT, WSMsgType.BINARY]),
        frame_payloads,
    )
    def fuzz(fmt: str, opcode: WSMsgType, payload: bytes) -> None:
        seen = live.run(_one_frame(live, fmt, opcode, payload))
        event(
            f"{fmt} {opcode.name}: "
            + ", ".join(str(f.get("type") if isinstance(f, dict) else f) for f in seen)
        )
        if opcode == WSMsgType.TEXT and not _is_utf8(payload):
            assert seen == [("close", 1007)]
            return
        assert seen[-1] == {"type": "pong"}, seen
        for frame in seen[:-1]:
            assert frame["type"] in ("error", "pong"), seen
            if frame["type"] == "error":
                assert frame["code"] == "bad_request"

    fuzz()
    live.run(live.healthy())
    node = live.relay.node
    for _ in range(200):  # the fuzzer's last session closes in the background
        if "fuzzer" not in node.by_client:
            break
        time.sleep(10 * MS)
    assert set(node.by_client) <= {"canary"}


# -- the real CLI: half requests, stuck readers, RSS -----------------------------------


def test_hostile_handshake_timeout_cuts_half_requests(tmp_path: Path) -> None:
    """--handshake-timeout 1 s: a half-sent request and a silent socket are disconnected;
    keep-alive requests and upgraded WebSockets are not."""
    node = ServedNode(
        tmp_path, "--allow-anonymous", "--api-key", API_KEY, "--handshake-timeout", f"{1000 * MS:g}"
    )
    node.start()
    try:
        half = socket.create_connection(("127.0.0.1", node.port))
        silent = socket.create_connection(("127.0.0.1", node.port))
        started = time.monotonic()
        half.sendall(b"GET /ws/slowloris HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        for sock in (half, silent):
            sock.settimeout(5000 * MS)
            assert sock.recv(1024) == b""  # EOF: the node hung up
        assert 800 * MS < time.monotonic() - started < 3000 * MS
        half.close()
        silent.close()

        kept = socket.create_connection(("127.0.0.1", node.port))
        kept.settimeout(5000 * MS)
        for _ in range(3):
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert kept.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(400 * MS)  # the deadline restarts after each response
        kept.close()

        async def websocket_outlives_the_deadline() -> None:
            client = Listener(node.ws_url("patient"))
            await client.connect()
            try:
                await asyncio.sleep(1500 * MS)
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(
                        f"{node.base}/api/publish",
                        json={"biz_id": "patient", "event": "e", "data": 1},
                        headers={"Authorization": f"Bearer {API_KEY}"},
                    ) as response,
                ):
                    assert response.status == 200
                assert [m["data"] for m in await client.wait_messages(1)] == [1]
            finally:
                await client.close()

        asyncio.run(websocket_outlives_the_deadline())
    finally:
        assert node.stop() == 0


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def test_hostile_never_reading_clients_bounded_rss(tmp_path: Path) -> None:
    """Clients that never read get 4508 while 64 MB is aimed at them; the node's RSS
    stays bounded and an honest client receives every event, in order."""
    node = ServedNode(tmp_path, "--allow-anonymous", "--api-key", API_KEY, "--log-level", "warning")
    node.start()
    try:
        figures = asyncio.run(_flood_stuck_readers(node))
    finally:
        assert node.stop() == 0
    print(
        "RSS kB: before {before}, after {after}, peak {peak}; {sent_mb} MB aimed at "
        "{rounds} never-reading clients, {honest} honest events".format(**figures)
    )
    assert figures["peak"] - figures["before"] < 32 * 1024


async def _flood_stuck_readers(node: ServedNode) -> dict[str, int]:
    rounds, per_round, blob = 4, 500, "x" * 32_000
    auth = {"Authorization": f"Bearer {API_KEY}"}
    honest = Listener(node.ws_url("honest"))
    await honest.connect()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:

        async def publish(biz_id: str, event: str, data: Any) -> None:
            body = {"biz_id": biz_id, "event": event, "data": data}
            async with http.post(f"{node.base}/api/publish", json=body, headers=auth) as r:
                assert r.status == 200, await r.text()

        async def closed_4508() -> float:
            async with http.get(f"{node.base}/metrics") as r:
                return _metric(await r.text(), 'relay_sessions_closed_total{code="4508"}')

        for _ in range(20):  # warm up allocator and code paths before the baseline
            await publish("warmup", "e", {"blob": blob})
        await asyncio.sleep(200 * MS)
        before = node.status("VmRSS")
        publisher = SteadyPublisher(publish, "honest").start()
        sem = asyncio.Semaphore(8)

        async def big() -> None:
            async with sem:
                await publish("stuck", "big", {"blob": blob})

        for round_ in range(rounds):
            stuck = stuck_reader(node.port, "/ws/stuck")
            try:
                for _ in range(200):
                    async with http.get(f"{node.base}/api/clients/stuck", headers=auth) as r:
                        if (await r.json())["online"]:
                            break
                    await asyncio.sleep(10 * MS)
                await asyncio.gather(*(big() for _ in range(per_round)))
                for _ in range(500):
                    if await closed_4508() == round_ + 1:
                        break
                    await asyncio.sleep(20 * MS)
                assert await closed_4508() == round_ + 1
            finally:
                stuck.close()
        await asyncio.sleep(50 * MS)
        count = publisher.count
        await assert_got_everything(honest, publisher)
        return {
            "before": before,
            "after": node.status("VmRSS"),
            "peak": node.status("VmHWM"),
            "sent_mb": rounds * per_round * len(blob) // 1_000_000,
            "rounds": rounds,
            "honest": max(count, publisher.count),
        }
    finally:
        await http.close()
        await honest.close()


# -- isolation ---------------------------------------------------------------------------


async def test_isolation_thousand_clients_each_get_exactly_their_own(
    redis_server: RedisServer,
) -> None:
    """1,000 clients, 3,000 events to random ids on the Redis engine: every client gets
    exactly its own events, in order, and nothing else."""
    relay = await NodeUnderTest(node_settings(redis_url=redis_server.url)).start()
    ids = [f"client-{i:04d}" for i in range(1000)]
    got: dict[str, list[dict[str, Any]]] = {cid: [] for cid in ids}
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    readers: list[asyncio.Task[None]] = []
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    gate = asyncio.Semaphore(50)

    async def read(cid: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            frame = orjson.loads(msg.data)
            if frame["type"] != "welcome":
                got[cid].append(frame)

    async def open_one(cid: str) -> None:
        async with gate:
            ws = await http.ws_connect(relay.ws_url(cid))
            welcome = orjson.loads((await ws.receive(timeout=10_000 * MS)).data)
            assert welcome["type"] == "welcome" and welcome["client_id"] == cid
            sockets.append(ws)
            readers.append(asyncio.get_running_loop().create_task(read(cid, ws)))

    try:
        await asyncio.gather(*(open_one(cid) for cid in ids))
        assert len(relay.node.sessions) == 1000
        rng = random.Random(1000)
        expected: dict[str, list[int]] = {cid: [] for cid in ids}
        for seq in range(3000):
            cid = rng.choice(ids)
            expected[cid].append(seq)
            await relay.publish(cid, "e", {"seq": seq, "to": cid})
        deadline = time.monotonic() + 15_000 * MS
        while sum(map(len, got.values())) < 3000 and time.monotonic() < deadline:
            await asyncio.sleep(50 * MS)
        await asyncio.sleep(200 * MS)  # anything misrouted would arrive meanwhile
        for cid in ids:
            frames = got[cid]
            assert all(f["type"] == "message" and f["biz_id"] == cid for f in frames), cid
            assert all(f["data"]["to"] == cid for f in frames), cid
            assert [f["data"]["seq"] for f in frames] == expected[cid], cid
        assert sum(1 for cid in ids if not expected[cid]) > 0  # some must get nothing
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        await asyncio.gather(*readers, return_exceptions=True)
        await http.close()
        await relay.stop()
