"""The asyncio client SDK against real nodes in this loop (and one scripted fake node)."""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, TypedDict

import aiohttp
import jwt
import orjson
import pytest

from relay.client import (
    ABNORMAL,
    AT_ONCE_JITTER,
    Action,
    Message,
    Plan,
    RelayClient,
    RelayClosed,
    backoff_delay,
    connect_url,
    plan_reconnect,
    reconnect_delay,
    tail,
)
from relay.errors import RelayError
from relay.protocol import CloseCode, Format
from relay.wire import parse_id
from tests.support.node import API_KEY, NodeUnderTest, node_settings
from tests.support.scripted import ScriptedNode, frame, overlapping_replay, welcome
from tests.support.timing import MS, eventually

SECRET = "client-tests-hs256-secret-of-32-bytes+"  # PyJWT warns below 32 bytes


class Timing(TypedDict):
    backoff_base: float
    backoff_max: float
    connect_timeout: float


FAST = Timing(backoff_base=50 * MS, backoff_max=200 * MS, connect_timeout=2000 * MS)
"""Backoff short enough that every reconnect in these tests takes well under a second."""


# -- helpers ----------------------------------------------------------------------------


@pytest.fixture
async def relay() -> AsyncIterator[NodeUnderTest]:
    """One anonymous memory-engine node on a free port."""
    node = await NodeUnderTest(node_settings()).start()
    yield node
    await node.stop()


@pytest.fixture
async def secured() -> AsyncIterator[NodeUnderTest]:
    """A node that demands HS256 tokens signed with SECRET."""
    node = await NodeUnderTest(node_settings(allow_anonymous=False, auth_secret=(SECRET,))).start()
    yield node
    await node.stop()


def ws_base(node: NodeUnderTest) -> str:
    return f"ws://127.0.0.1:{node.settings.port}"


def token(client_id: str, ttl: float = 3600.0) -> str:
    return jwt.encode({"sub": client_id, "exp": int(time.time() + ttl)}, SECRET, "HS256")


async def api(node: NodeUnderTest, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            f"{node.base}{path}",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as response,
    ):
        return await response.json()


async def publish(node: NodeUnderTest, biz_id: str, event: str, data: Any = None) -> str:
    """Publish through the HTTP API; returns the stream id."""
    result = await api(
        node, "POST", "/api/publish", {"biz_id": biz_id, "event": event, "data": data}
    )
    return str(result["id"])


async def take(client: RelayClient, count: int, timeout: float = 5000 * MS) -> list[Message]:
    async with asyncio.timeout(timeout):
        return [await anext(client) for _ in range(count)]


def on_node(client: RelayClient, node_id: str) -> bool:
    """True when the client is connected and its last welcome came from ``node_id``."""
    return client.connected and client.welcome is not None and client.welcome["node"] == node_id


def recorder() -> tuple[list[tuple[int, str]], Callable[[int, str], None]]:
    closes: list[tuple[int, str]] = []
    return closes, lambda code, reason: closes.append((code, reason))


# -- pure decisions -----------------------------------------------------------------------


def test_backoff_delay_is_full_jitter_under_a_growing_cap() -> None:
    """Delays lie in [0, min(cap, base*2**n)], spread out, and reach the cap's range."""
    rng = random.Random(7)
    for attempt in range(12):
        bound = min(30.0, 0.5 * 2**attempt)
        samples = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0.0 <= s <= bound for s in samples)
        assert max(samples) > 0.8 * bound  # uses the whole window
        assert len(set(samples)) == 200  # jittered, not a fixed schedule
    assert backoff_delay(10_000, 0.5, 30.0, rng) <= 30.0  # no overflow far out
    assert backoff_delay(3, 0.5, 30.0, random.Random(1)) == backoff_delay(
        3, 0.5, 30.0, random.Random(1)
    )


def test_reconnect_delay_is_at_once_only_right_after_a_welcome() -> None:
    """1012/4508 wait at most the small jitter first, then back off; 1008 waits long."""
    rng = random.Random(3)
    first = [reconnect_delay(Action.AT_ONCE, 0, 0.5, 30.0, rng) for _ in range(100)]
    assert max(first) <= AT_ONCE_JITTER
    later = [reconnect_delay(Action.AT_ONCE, 6, 0.5, 30.0, rng) for _ in range(100)]
    assert max(later) > 1.0
    long = [reconnect_delay(Action.LONG_BACKOFF, 0, 0.5, 30.0, rng) for _ in range(100)]
    assert min(long) >= 15.0 and max(long) <= 30.0


@pytest.mark.parametrize(
    ("code", "can_renew", "plan"),
    [
        (4000, True, Plan(Action.STOP)),
        (4001, False, Plan(Action.STOP)),
        (4001, True, Plan(Action.BACKOFF, renew_token=True)),
        (4003, True, Plan(Action.STOP)),
        (4499, False, Plan(Action.STOP)),
        (4500, True, Plan(Action.AT_ONCE, renew_token=True)),
        (4500, False, Plan(Action.STOP)),
        (4508, False, Plan(Action.AT_ONCE)),
        (4509, False, Plan(Action.AT_ONCE)),
        (4999, False, Plan(Action.AT_ONCE)),
        (1012, False, Plan(Action.AT_ONCE)),
        (1008, False, Plan(Action.LONG_BACKOFF)),
        (1006, False, Plan(Action.BACKOFF)),
        (1011, False, Plan(Action.BACKOFF)),
        (1013, False, Plan(Action.BACKOFF)),
        (1000, False, Plan(Action.BACKOFF)),
    ],
)
def test_plan_reconnect_follows_the_close_code_table(
    code: int, can_renew: bool, plan: Plan
) -> None:
    """Each close code maps to DESIGN.md's client action."""
    assert plan_reconnect(code, can_renew=can_renew) == plan


def test_connect_url_adds_path_token_and_since() -> None:
    """A base URL gets /ws/{id}; a full one is kept; token and since go in the query."""
    url = connect_url("ws://h:1/", "cml", token="t.k", since="5-1")
    assert url.path == "/ws/cml" and url.query["token"] == "t.k" and url.query["since"] == "5-1"
    full = connect_url("wss://h/relay/ws/cml?format=json", "cml", since="7-0")
    assert full.path == "/relay/ws/cml" and dict(full.query) == {"format": "json", "since": "7-0"}
    assert connect_url("ws://h/prefix", "a.b", token=None).human_repr() == "ws://h/prefix/ws/a.b"
    assert connect_url("ws://h", "x", attempt="inst.3").query["attempt"] == "inst.3"


# -- against a real node ------------------------------------------------------------------


async def test_client_receives_events_in_order(relay: NodeUnderTest) -> None:
    """Thirty events arrive once each, in publish order, with increasing ids."""
    async with RelayClient(ws_base(relay), "cml", **FAST) as client:
        hello = await client.wait_connected()
        assert hello["client_id"] == "cml" and "recovered" not in hello
        for seq in range(30):
            await relay.publish("cml", "tick", {"seq": seq})
        messages = await take(client, 30)
    assert [m.data["seq"] for m in messages] == list(range(30))
    keys = [parse_id(m.id) for m in messages]
    assert keys == sorted(keys) and len(set(keys)) == 30
    assert {(m.biz_id, m.event) for m in messages} == {("cml", "tick")}
    assert client.last_id == messages[-1].id and client.closed


async def test_client_kick_is_terminal_and_never_reconnects(relay: NodeUnderTest) -> None:
    """DELETE /api/clients/{id} closes 4000: the client stops, raises, stays away."""
    closes, on_close = recorder()
    async with RelayClient(ws_base(relay), "kicked", on_close=on_close, **FAST) as client:
        await client.wait_connected()
        assert (await api(relay, "DELETE", "/api/clients/kicked"))["kicked"] is True
        with pytest.raises(RelayClosed) as raised:
            await take(client, 1)
        assert raised.value.code == 4000 and isinstance(raised.value, RelayError)
        # closed: the reconnect loop has returned, so no second connection can follow.
        assert client.closed and client.connects == 1 and closes == [(4000, raised.value.reason)]
        await eventually(lambda: not relay.node.sessions)
        assert relay.node.metrics.sessions_opened._value.get() == 1
        assert (await api(relay, "GET", "/api/clients/kicked"))["online"] is False
        with pytest.raises(RelayClosed):
            await client.wait_closed()


async def test_client_resumes_after_4508_without_loss_or_duplicates(relay: NodeUnderTest) -> None:
    """Events published while it was away are replayed after since = the last id seen."""
    missed: list[str] = []

    async def on_close(code: int, reason: str) -> None:
        if code == CloseCode.TOO_SLOW and not missed:
            missed.extend([await publish(relay, "cml", "e", n) for n in (3, 4)])

    async with RelayClient(ws_base(relay), "cml", on_close=on_close, **FAST) as client:
        await client.wait_connected()
        first = [await publish(relay, "cml", "e", n) for n in (1, 2)]
        assert [m.id for m in await take(client, 2)] == first
        await relay.node.kick("cml", CloseCode.TOO_SLOW, "test")
        rest = await take(client, 2)
        assert [m.id for m in rest] == missed and [m.data for m in rest] == [3, 4]
        assert client.welcome is not None
        assert client.welcome["replayed"] == 2 and client.recovered is True
        assert client.connects == 2 and not client.gap and client.duplicates == 0
        status = await api(relay, "GET", "/api/clients/cml")
        assert status["since"] == first[-1]


async def test_client_reconnects_to_a_new_node_after_drain(relay: NodeUnderTest) -> None:
    """1012 from a draining node: it reconnects (refused meanwhile) and resumes on the next."""
    closes: list[int] = []
    old_node_gone = asyncio.Event()

    async def on_close(code: int, reason: str) -> None:
        closes.append(code)
        await old_node_gone.wait()  # see stop_without_racing_reconnects

    async with RelayClient(ws_base(relay), "cml", on_close=on_close, **FAST) as client:
        await client.wait_connected()
        ids = [await publish(relay, "cml", "e", n) for n in range(3)]
        await take(client, 3)
        await stop_without_racing_reconnects(relay, old_node_gone)
        await eventually(lambda: len(closes) >= 2)  # 1012, then refused while down
        successor = await NodeUnderTest(replace(relay.settings, node_id="successor")).start()
        try:
            await eventually(lambda: on_node(client, "successor"))
            assert closes[0] == CloseCode.SERVICE_RESTART
            assert set(closes[1:]) == {ABNORMAL}
            status = await api(successor, "GET", "/api/clients/cml")
            assert status["since"] == ids[-1] and client.recovered is not None
            fresh = await publish(successor, "cml", "after", None)
            assert [m.id for m in await take(client, 1)] == [fresh]
        finally:
            await client.close()
            await successor.stop()


async def stop_without_racing_reconnects(node: NodeUnderTest, gone: asyncio.Event) -> None:
    """Drain (1012) and stop ``node``; only then let the client, held in on_close, retry.

    A connection accepted while aiohttp's runner cleans up is never closed (the socket
    leaks, and ResourceWarning is an error here), so reconnects must not hit that window.
    """
    await node.node.drain(100 * MS)
    await node.stop()
    gone.set()


async def test_client_flags_a_gap_when_history_died_with_the_node(
    relay: NodeUnderTest,
) -> None:
    """An event published before a node restart is gone: the welcome must say not recovered."""
    lost: list[str] = []
    old_node_gone = asyncio.Event()

    async def publish_while_away(code: int, reason: str) -> None:
        if code == CloseCode.SERVICE_RESTART and not lost:
            lost.append((await relay.node.publish("cml", "lost", None)).id)
        await old_node_gone.wait()

    async with RelayClient(ws_base(relay), "cml", on_close=publish_while_away, **FAST) as client:
        await client.wait_connected()
        await publish(relay, "cml", "seen", None)
        await take(client, 1)
        await stop_without_racing_reconnects(relay, old_node_gone)
        successor = await NodeUnderTest(replace(relay.settings, node_id="successor")).start()
        try:
            await eventually(lambda: on_node(client, "successor"))
            assert lost, "the event was published while the client was away"
            assert client.recovered is False and client.gap
        finally:
            await client.close()
            await successor.stop()


async def test_client_flags_a_gap_when_history_was_trimmed() -> None:
    """since older than the retained history: recovered=false, gap set, on_gap called."""
    node = await NodeUnderTest(node_settings(history_size=3)).start()
    gaps: list[dict[str, Any]] = []
    try:
        ids = [(await node.publish("cml", "e", n)).id for n in range(6)]
        client = RelayClient(ws_base(node), "cml", since=ids[0], on_gap=gaps.append, **FAST)
        async with client:
            replayed = await take(client, 3)
            assert [m.id for m in replayed] == ids[3:]
            assert client.gap and client.recovered is False
            assert gaps == [client.welcome] and gaps[0]["replayed"] == 3
    finally:
        await node.stop()


async def test_client_token_factory_renews_an_expired_token(secured: NodeUnderTest) -> None:
    """4500 at connect: one call to the factory, an immediate reconnect, a welcome."""
    calls = 0

    async def factory() -> str:
        nonlocal calls
        calls += 1
        return token("cml")

    closes, on_close = recorder()
    expired = token("cml", ttl=-120)
    async with RelayClient(
        ws_base(secured), "cml", token=expired, token_factory=factory, on_close=on_close, **FAST
    ) as client:
        await client.wait_connected()
        assert calls == 1 and client.connects == 2 and [c for c, _ in closes] == [4500]
        sid = await publish(secured, "cml", "e", None)
        assert [m.id for m in await take(client, 1)] == [sid]


@pytest.mark.parametrize(
    ("credential", "code"),
    [
        (lambda: "not-a-jwt", CloseCode.UNAUTHORIZED),
        (lambda: token("someone-else"), CloseCode.FORBIDDEN),
        (lambda: token("cml", ttl=-120), CloseCode.TOKEN_EXPIRED),
    ],
    ids=["4001", "4003", "4500"],
)
async def test_client_auth_failure_without_factory_is_terminal(
    secured: NodeUnderTest, credential: Callable[[], str], code: int
) -> None:
    """Without a token factory, 4001/4003/4500 stop the client on the first attempt."""
    async with RelayClient(ws_base(secured), "cml", token=credential(), **FAST) as client:
        with pytest.raises(RelayClosed) as raised:
            await client.wait_connected()
        assert raised.value.code == code
        # closed: the reconnect loop has returned, so no second attempt can follow.
        assert client.closed and client.connects == 1


async def test_client_invalid_fresh_token_stops_after_one_renewal(secured: NodeUnderTest) -> None:
    """4001 with a factory: one renewal; a fresh token that is also refused is terminal."""
    calls: list[int] = []

    def factory() -> str:
        calls.append(1)
        return "still-garbage"

    client = RelayClient(ws_base(secured), "cml", token="garbage", token_factory=factory, **FAST)
    async with client:
        with pytest.raises(RelayClosed) as raised:
            await client.wait_closed()
    assert raised.value.code == CloseCode.UNAUTHORIZED and len(calls) == 1
    assert client.connects == 2


async def test_client_speaks_msgpack(relay: NodeUnderTest) -> None:
    """format="msgpack" negotiates relay.v1.msgpack; data round-trips; acks are understood."""
    async with RelayClient(ws_base(relay), "cml", format="msgpack", **FAST) as client:
        await client.wait_connected()
        assert [s.format for s in relay.node.sessions.values()] == [Format.MSGPACK]
        data = {"a": [1, 2.5, "x"], "n": None, "nested": {"k": True}}
        sid = await publish(relay, "cml", "label.created", data)
        [msg] = await take(client, 1)
        assert (msg.id, msg.event, msg.data) == (sid, "label.created", data)
        await client.ack(msg.id)
        await eventually_status(relay, "cml", "last_ack", sid)


async def eventually_status(node: NodeUnderTest, client_id: str, key: str, value: Any) -> None:
    async with asyncio.timeout(5000 * MS):
        while (await api(node, "GET", f"/api/clients/{client_id}")).get(key) != value:
            await asyncio.sleep(50 * MS)


async def test_client_auto_ack_acknowledges_what_the_app_took(relay: NodeUnderTest) -> None:
    """auto_ack acks a message once the app asks for the next one."""
    async with RelayClient(ws_base(relay), "cml", auto_ack=True, **FAST) as client:
        await client.wait_connected()
        ids = [await publish(relay, "cml", "e", n) for n in range(3)]
        await take(client, 3)
        await eventually_status(relay, "cml", "last_ack", ids[1])


async def test_client_queue_is_bounded_and_applies_back_pressure(relay: NodeUnderTest) -> None:
    """An app that does not consume holds at most max_queue; nothing is lost or reconnected."""
    async with RelayClient(ws_base(relay), "cml", max_queue=5, **FAST) as client:
        await client.wait_connected()
        ids = [(await relay.publish("cml", "e", n)).id for n in range(60)]
        await eventually(lambda: client.queued == 5)
        await asyncio.sleep(200 * MS)
        assert client.queued == 5
        assert [m.id for m in await take(client, 60)] == ids
        assert client.connects == 1


async def test_client_on_message_callback_receives_instead_of_the_queue(
    relay: NodeUnderTest,
) -> None:
    """With on_message, messages go to the callback (awaited) and nothing is queued."""
    got: list[Message] = []

    async def on_message(msg: Message) -> None:
        got.append(msg)

    async with RelayClient(ws_base(relay), "cml", on_message=on_message, **FAST) as client:
        await client.wait_connected()
        ids = [await publish(relay, "cml", "e", n) for n in range(3)]
        await eventually(lambda: len(got) == 3)
        assert [m.id for m in got] == ids and client.queued == 0


async def test_client_close_ends_iteration(relay: NodeUnderTest) -> None:
    """close() ends a pending ``async for`` without an error and closes the socket."""
    client = RelayClient(ws_base(relay), "cml", **FAST)
    await client.start()
    await client.wait_connected()

    iterating = asyncio.Event()

    async def consume() -> list[Message]:
        iterating.set()  # runs on into the loop below until it waits for a message
        return [msg async for msg in client]

    consumer = asyncio.create_task(consume())
    await iterating.wait()
    assert not consumer.done()  # waiting inside ``async for``
    await client.close()
    assert await asyncio.wait_for(consumer, 2000 * MS) == []
    assert client.closed and not client.connected
    await eventually(lambda: not relay.node.sessions)


# -- against a scripted node --------------------------------------------------------------


async def test_client_drops_duplicates_comparing_ids_as_integer_pairs() -> None:
    """A replay overlapping delivered ids yields nothing twice; 10-0 sorts after 9-0."""
    fake = ScriptedNode(overlapping_replay(CloseCode.SERVICE_RESTART))
    await fake.server.start_server()
    try:
        async with RelayClient(fake.url, "c", **FAST) as client:
            got = await take(client, 4)
            assert [m.id for m in got] == ["9-0", "10-0", "11-0", "12-0"]
            assert client.duplicates == 3
            assert [q.get("since") for q in fake.queries] == [None, "10-0"]
    finally:
        await fake.server.close()


async def test_client_resumes_from_welcome_last_id_when_nothing_arrived() -> None:
    """A client that never got a message reconnects with since = the welcome's last_id."""
    fake = ScriptedNode([([welcome("42-7")], CloseCode.SERVICE_RESTART), ([welcome("42-7")], None)])
    await fake.server.start_server()
    try:
        async with RelayClient(fake.url, "c", **FAST) as client:
            await eventually(lambda: client.connects == 2 and client.connected)
            assert [q.get("since") for q in fake.queries] == [None, "42-7"]
    finally:
        await fake.server.close()


async def test_client_last_id_passes_a_message_only_once_its_callback_returned() -> None:
    """close() during an on_message callback leaves last_id on the message before, so an
    app that saves it resumes with the unfinished one (as the JS and .NET clients do)."""
    fake = ScriptedNode([([welcome("5-0"), frame("9-0"), frame("10-0")], None)])
    await fake.server.start_server()
    seen_inside: list[str | None] = []
    stuck = asyncio.Event()
    client: RelayClient | None = None

    async def on_message(msg: Message) -> None:
        assert client is not None
        seen_inside.append(client.last_id)
        if msg.id == "10-0":
            stuck.set()
            await asyncio.Event().wait()  # the app is still working when it shuts down

    try:
        client = RelayClient(fake.url, "c", on_message=on_message, **FAST)
        await client.start()
        await asyncio.wait_for(stuck.wait(), 5000 * MS)
        await client.close()
        assert seen_inside == ["5-0", "9-0"]
        assert client.last_id == "9-0"
    finally:
        await fake.server.close()


# -- relay tail ---------------------------------------------------------------------------


async def test_tail_prints_json_lines_until_a_terminal_close(relay: NodeUnderTest) -> None:
    """One JSON line per message on out; welcome and close lines on err; 4000 raises."""
    out, err = io.StringIO(), io.StringIO()
    task = asyncio.create_task(tail(ws_base(relay), "cml", out=out, err=err))
    await eventually(lambda: '"welcome"' in err.getvalue())
    ids = [await publish(relay, "cml", "e", {"n": n}) for n in range(2)]
    await eventually(lambda: out.getvalue().count("\n") == 2)
    await api(relay, "DELETE", "/api/clients/cml")
    with pytest.raises(RelayClosed):
        await asyncio.wait_for(task, 5000 * MS)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["id"], x["event"], x["data"]) for x in lines] == [
        (ids[0], "e", {"n": 0}),
        (ids[1], "e", {"n": 1}),
    ]
    notes = [orjson.loads(line) for line in err.getvalue().splitlines()]
    assert [n["type"] for n in notes] == ["welcome", "close"] and notes[1]["code"] == 4000
