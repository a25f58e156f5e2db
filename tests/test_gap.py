"""The node's live-feed gap repair, end to end: a real Redis, a real node, the Python SDK.

A hole in the live feed is filled from history, or the sessions it affects are ended with
4509 ("live feed gap: reconnect and resume"). The client then resumes with ``since=`` and
the welcome's ``recovered`` tells it whether the hole was closed. Never a silent skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.client import Message, RelayClient
from relay.protocol import CloseCode
from relay.wire import PUBLISH_LUA, KeySpace, encode_payload, publish_call
from tests.support.node import Listener, NodeUnderTest, node_settings
from tests.support.redis_server import RedisServer
from tests.support.timing import eventually

FAST = {"backoff_base": 0.05, "backoff_max": 0.2, "connect_timeout": 5.0}


class Recorder:
    """What one SDK client went through: messages, closes (with how many messages came
    before each), and welcomes."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.closes: list[tuple[int, int]] = []  # (code, messages received before it)
        self.welcomes: list[dict[str, Any]] = []
        self.probe: Callable[[], object] | None = None  # called at each welcome
        self.probed: list[object] = []

    def on_message(self, message: Message) -> None:
        self.messages.append(message)

    def on_close(self, code: int, reason: str) -> None:
        self.closes.append((code, len(self.messages)))

    def on_welcome(self, frame: dict[str, Any]) -> None:
        self.welcomes.append(frame)
        if self.probe is not None:
            self.probed.append(self.probe())

    def client(self, node: NodeUnderTest, client_id: str) -> RelayClient:
        return RelayClient(
            f"ws://127.0.0.1:{node.settings.port}",
            client_id,
            on_message=self.on_message,
            on_close=self.on_close,
            on_welcome=self.on_welcome,
            **FAST,  # type: ignore[arg-type]
        )


def publish_args(biz_id: str, n: int, history_size: int) -> list[Any]:
    """EVAL arguments of the publish script: what a backend in any language sends."""
    keys, argv = publish_call(
        KeySpace(),
        biz_id,
        encode_payload(biz_id, "tick", n),
        mid=None,
        history_size=history_size,
        history_ttl=3600,
        dedupe_window=600,
    )
    return [PUBLISH_LUA, len(keys), *keys, *argv]


async def cut_pubsub_and_publish(
    raw: aioredis.Redis, biz_id: str, numbers: range, history_size: int
) -> list[str]:
    """Kill every pub/sub connection and publish ``numbers`` in the same pipeline.

    One pipeline, so Redis runs the publishes before the node can have resubscribed.
    """
    pipe = raw.pipeline(transaction=False)
    pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    for n in numbers:
        pipe.eval(*publish_args(biz_id, n, history_size))
    replies = await pipe.execute()
    assert replies[0] >= 1, "the node's pub/sub connection was killed"
    return [reply[0].decode() for reply in replies[1:]]


async def stream_ids(raw: aioredis.Redis, biz_id: str) -> list[str]:
    entries = await raw.xrange(KeySpace().log(biz_id))
    return [entry_id.decode() for entry_id, _ in entries]


async def start_relay(
    started: list[NodeUnderTest], redis: RedisServer, **overrides: Any
) -> NodeUnderTest:
    relay = await NodeUnderTest(node_settings(redis_url=redis.url, **overrides)).start()
    started.append(relay)
    return relay


async def receive_first(relay: NodeUnderTest, seen: Recorder, client: RelayClient) -> str:
    """Connect, publish event 0 and wait until it arrived live: the id of event 0."""
    await client.wait_connected()
    first = (await relay.publish(client.client_id, "tick", 0)).id
    await eventually(lambda: len(seen.messages) == 1)
    return first


@pytest.fixture
async def raw(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the test's own Redis: a backend publishing, an operator's ACL."""
    client = aioredis.Redis(port=own_redis.port)
    yield client
    await client.aclose()


async def test_gap_past_trimmed_history_ends_session_4509_and_resume_is_not_recovered(
    own_redis: RedisServer, raw: aioredis.Redis, started_nodes: list[NodeUnderTest]
) -> None:
    """400 events lost from pub/sub and trimmed from history: 4509, recovered=false, then whole."""
    relay = await start_relay(started_nodes, own_redis, history_size=5)
    seen = Recorder()
    async with seen.client(relay, "gap") as client:
        first = await receive_first(relay, seen, client)
        await cut_pubsub_and_publish(raw, "gap", range(1, 401), history_size=5)
        await eventually(lambda: bool(seen.closes))  # the resubscribe found the hole
        final = (await raw.eval(*publish_args("gap", 401, 5)))[0].decode()
        await eventually(lambda: seen.messages[-1].id == final)

    assert seen.closes[0] == (CloseCode.FEED_GAP, 1), "closed 4509 with nothing past the hole"
    assert seen.messages[0].id == first
    assert [w.get("recovered") for w in seen.welcomes[:2]] == [None, False]
    assert seen.welcomes[1]["replayed"] > 0
    resumed = [m.id for m in seen.messages[1:]]
    retained = await stream_ids(raw, "gap")
    assert resumed[0] in retained, "the replay starts inside the retained history"
    assert resumed == retained[retained.index(resumed[0]) :], "every event after it, in order"
    assert client.duplicates == 0


async def test_gap_repaired_from_history_keeps_the_session_open(
    own_redis: RedisServer, raw: aioredis.Redis, started_nodes: list[NodeUnderTest]
) -> None:
    """Lost pub/sub messages still in history are replayed into the open session: no close."""
    relay = await start_relay(started_nodes, own_redis)
    seen = Recorder()
    async with seen.client(relay, "kept") as client:
        first = await receive_first(relay, seen, client)
        lost = await cut_pubsub_and_publish(raw, "kept", range(1, 51), history_size=100)
        await eventually(lambda: len(seen.messages) == 51)
        live = (await relay.publish("kept", "tick", 51)).id
        await eventually(lambda: seen.messages[-1].id == live)
        assert seen.closes == [] and client.connects == 1
    assert [m.id for m in seen.messages] == [first, *lost, live]
    assert relay.node.metrics.gaps._value.get() >= 1


async def test_gap_other_biz_ids_untouched_when_one_is_unrecoverable(
    own_redis: RedisServer, raw: aioredis.Redis, started_nodes: list[NodeUnderTest]
) -> None:
    """Only the BizId whose hole cannot be closed is ended; the others stay open and whole."""
    relay = await start_relay(started_nodes, own_redis, history_size=5)
    hit, calm = Recorder(), Recorder()
    async with hit.client(relay, "hit") as hit_client, calm.client(relay, "calm") as calm_client:
        await hit_client.wait_connected()
        await calm_client.wait_connected()
        before = (await relay.publish("calm", "tick", 0)).id
        await cut_pubsub_and_publish(raw, "hit", range(300), history_size=5)
        await eventually(lambda: hit.closes)
        after = (await relay.publish("calm", "tick", 1)).id
        await eventually(lambda: len(calm.messages) == 2)
        assert [m.id for m in calm.messages] == [before, after]
        assert calm.closes == [] and calm_client.connects == 1
        assert hit.closes[0] == (CloseCode.FEED_GAP, 0)


async def test_gap_with_history_unreadable_ends_session_4509_then_resumes_recovered(
    own_redis: RedisServer, raw: aioredis.Redis, started_nodes: list[NodeUnderTest]
) -> None:
    """History reads refused (ACL: no XRANGE) past --gap-repair-timeout: 4509, never a skip.

    Once reads work again the client resumes with since= and gets every event it missed.
    """
    relay = await start_relay(started_nodes, own_redis, gap_repair_timeout=0.5)
    seen = Recorder()
    async with seen.client(relay, "acl") as client:
        first = await receive_first(relay, seen, client)
        # The history script reads with XRANGE; publishing needs only XREVRANGE and XADD.
        await raw.execute_command("ACL", "SETUSER", "default", "-xrange")
        missed = await cut_pubsub_and_publish(raw, "acl", range(1, 11), history_size=100)
        started = time.monotonic()
        await eventually(lambda: seen.closes)
        assert seen.closes[0] == (CloseCode.FEED_GAP, 1)
        assert time.monotonic() - started >= 0.5 - 0.05, "it retried for the repair timeout"
        await raw.execute_command("ACL", "SETUSER", "default", "+xrange")
        await eventually(lambda: len(seen.messages) == 11)
        live = (await relay.publish("acl", "tick", 11)).id
        await eventually(lambda: seen.messages[-1].id == live)
    assert [m.id for m in seen.messages] == [first, *missed, live]
    assert seen.welcomes[-1]["recovered"] is True and seen.welcomes[-1]["replayed"] == 10
    assert client.duplicates == 0


async def test_gap_session_connecting_during_a_repair_misses_nothing(
    own_redis: RedisServer, raw: aioredis.Redis, started_nodes: list[NodeUnderTest]
) -> None:
    """A second session of the BizId goes live while the first waits on a repair: both whole."""
    relay = await start_relay(started_nodes, own_redis, duplicates="allow", gap_repair_timeout=30.0)
    early, late = Recorder(), Recorder()
    async with early.client(relay, "pair") as early_client:
        ids = [await receive_first(relay, early, early_client)]
        await raw.execute_command("ACL", "SETUSER", "default", "-xrange")
        with capture_logs() as logs:
            ids += await cut_pubsub_and_publish(raw, "pair", range(1, 11), history_size=100)
            # Three failed reads: the repair's next one is 0.8 s away, time enough for a
            # session to connect and go live in the middle of it.
            await eventually(lambda: count(logs, "gap.repair_failed") >= 3)
        sub = relay.node.hub.get("pair")
        assert sub is not None and sub.repairing
        late.probe = lambda: sub.repairing
        ids.append((await relay.publish("pair", "tick", 11)).id)  # held by the repair
        await raw.execute_command("ACL", "SETUSER", "default", "+xrange")
        async with late.client(relay, "pair") as late_client:
            await late_client.wait_connected()
            ids.append((await relay.publish("pair", "tick", 12)).id)
            await eventually(lambda: early.messages[-1].id == ids[-1])
            await eventually(lambda: late.messages and late.messages[-1].id == ids[-1])
            assert early.closes == [] and late.closes == []
    assert late.probed == [True], "the late session went live during the repair"
    assert [m.id for m in early.messages] == ids
    assert late.welcomes[0]["last_id"] == ids[11]  # its own history read: up to the head
    assert [m.id for m in late.messages] == ids[12:]


async def test_gap_on_a_draining_node_hands_the_sessions_over_instead_of_repairing(
    own_redis: RedisServer, raw: aioredis.Redis, started_nodes: list[NodeUnderTest]
) -> None:
    """The feed of a draining node is replaced: at the BizId's next event its session ends
    1012 (long before the drain's timetable would close it), and resumes on another node
    with every event it missed, in order, from history; the leaving node reads none."""
    leaving = await start_relay(started_nodes, own_redis)
    staying = await start_relay(started_nodes, own_redis)
    # Closed in connection order over 60 % of the grace: "mover", last of 20, ~17 s in.
    listeners = [await Listener(leaving.ws_url(f"filler-{i}")).connect() for i in range(19)]
    mover = await Listener(leaving.ws_url("mover")).connect()
    listeners.append(mover)
    first = (await leaving.publish("mover", "tick", 0)).id
    await mover.wait_messages(1)
    drain = asyncio.create_task(leaving.node.drain(30.0))
    try:
        await eventually(lambda: leaving.node.draining)
        missed = await cut_pubsub_and_publish(raw, "mover", range(1, 4), history_size=100)
        await eventually(lambda: leaving.node.tally["engine.resubscribed"] >= 1)
        missed.append((await staying.publish("mover", "tick", 4)).id)
        assert await mover.wait_closed() == CloseCode.SERVICE_RESTART
        assert [m["id"] for m in mover.messages] == [first], "nothing out of order before"
        await eventually(lambda: staying.node.ready)  # its feed was cut too
        resumed = await Listener(staying.ws_url("mover", since=first)).connect()
        listeners.append(resumed)
        assert [m["id"] for m in await resumed.wait_messages(4)] == missed
        assert resumed.welcome["recovered"] is True
        assert leaving.node.tally["gap.handed_over"] == 1
        assert leaving.node.tally["gap.repaired"] == 0
    finally:
        drain.cancel()  # not the 17 s of timetable left; the node closes what is open
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        await leaving.node.close()
        for listener in listeners:
            await listener.close()


def count(logs: list[dict[str, Any]], event: str) -> int:
    return sum(1 for entry in logs if entry["event"] == event)
