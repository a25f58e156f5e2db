"""Watching a client without taking its place: ``/observe/{client_id}`` and ``relay tail``.

Real nodes on a real Redis, a real client (the SDK), and the real ``relay tail`` process.
Before the observer, ``relay tail`` connected as the client and so replaced it with the
terminal 4000: the WPF client it was meant to watch never came back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from relay.client import RelayClient, RelayClosed
from tests.support.node import API_KEY, NodeUnderTest, node_settings
from tests.support.redis_server import RedisServer
from tests.support.tail import Tail
from tests.support.timing import MS, eventually

pytestmark = pytest.mark.redis

FAST = {"backoff_base": 0.05, "backoff_max": 0.2, "connect_timeout": 5.0}


@pytest.fixture
async def two_nodes(redis_server: RedisServer) -> AsyncIterator[list[NodeUnderTest]]:
    """Two nodes on one real Redis, one client session per client_id (the default)."""
    nodes = [
        await NodeUnderTest(node_settings(redis_url=redis_server.url)).start() for _ in range(2)
    ]
    yield nodes
    for node in nodes:
        await node.stop()


def ws_base(node: NodeUnderTest) -> str:
    return f"ws://127.0.0.1:{node.settings.port}"


async def test_tail_watches_a_connected_client_without_closing_it(
    two_nodes: list[NodeUnderTest],
) -> None:
    """A real client on node A, `relay tail` on node B: both see every event; no one is closed."""
    a, b = two_nodes
    closes: list[tuple[int, str]] = []
    async with RelayClient(
        ws_base(a), "wpf-1", on_close=lambda code, reason: closes.append((code, reason)), **FAST
    ) as client:
        await client.wait_connected()
        tail = await Tail.start("wpf-1", "--url", ws_base(b), "--api-key", API_KEY)
        try:
            await eventually(tail.welcomed)
            ids = [(await a.publish("wpf-1", "label.created", {"n": n})).id for n in range(5)]
            got = [await asyncio.wait_for(client.__anext__(), 10_000 * MS) for _ in ids]
            await eventually(lambda: len(tail.out) == len(ids))
            assert [m.id for m in got] == ids
            assert [line["id"] for line in tail.out] == ids
            assert [line["data"] for line in tail.out] == [{"n": n} for n in range(5)]
            # The client still holds its session, on its node, and was never closed.
            assert client.connected and client.connects == 1 and closes == []
            status = await a.node.engine.client_status("wpf-1")
            assert status.online and status.node == a.node.id
            assert status.session == client.welcome["session"]  # type: ignore[index]
        finally:
            await tail.stop()
    assert tail.proc.returncode is not None


async def test_observer_is_not_closed_when_the_client_reconnects(
    two_nodes: list[NodeUnderTest],
) -> None:
    """A client connecting after the observer claims its session; the observer stays."""
    a, b = two_nodes
    tail = await Tail.start("wpf-2", "--url", ws_base(b), "--api-key", API_KEY)
    try:
        await eventually(tail.welcomed)
        async with RelayClient(ws_base(a), "wpf-2", **FAST) as client:
            await client.wait_connected()
            first = (await a.publish("wpf-2", "e", 1)).id
            assert (await asyncio.wait_for(client.__anext__(), 10_000 * MS)).id == first
        async with RelayClient(ws_base(b), "wpf-2", **FAST) as again:
            await again.wait_connected()
            second = (await b.publish("wpf-2", "e", 2)).id
            assert (await asyncio.wait_for(again.__anext__(), 10_000 * MS)).id == second
        await eventually(lambda: len(tail.out) == 2)
        assert [line["id"] for line in tail.out] == [first, second]
        assert not any('"close"' in line for line in tail.err)
        assert tail.proc.returncode is None
    finally:
        await tail.stop()


async def test_tail_replays_history_after_since(two_nodes: list[NodeUnderTest]) -> None:
    """--since replays what history still holds after that id, then goes live."""
    a, b = two_nodes
    ids = [(await a.publish("wpf-3", "e", n)).id for n in range(4)]
    tail = await Tail.start("wpf-3", "--url", ws_base(b), "--api-key", API_KEY, "--since", ids[1])
    try:
        await eventually(lambda: len(tail.out) == 2)
        live = (await a.publish("wpf-3", "e", 4)).id
        await eventually(lambda: len(tail.out) == 3)
        assert [line["id"] for line in tail.out] == [ids[2], ids[3], live]
    finally:
        await tail.stop()


async def test_tail_with_a_wrong_api_key_exits_with_the_reason(
    two_nodes: list[NodeUnderTest],
) -> None:
    """A wrong key is closed 4001 after the upgrade; tail exits 2 and says why."""
    tail = await Tail.start("wpf-4", "--url", ws_base(two_nodes[0]), "--api-key", "wrong")
    assert await tail.exit_code() == 2
    assert "missing or wrong API key" in "".join(tail.err)
    assert tail.out == []


async def test_tail_without_an_api_key_says_how_to_watch(two_nodes: list[NodeUnderTest]) -> None:
    """No key and no --as-client: exit 2 before connecting, naming both ways."""
    tail = await Tail.start("wpf-5", "--url", ws_base(two_nodes[0]))
    assert await tail.exit_code() == 2
    message = "".join(tail.err)
    assert "--api-key" in message and "--as-client" in message


async def test_tail_as_client_replaces_the_client(two_nodes: list[NodeUnderTest]) -> None:
    """--as-client is the old behaviour, on request: it takes the session (the client gets 4000)."""
    a, b = two_nodes
    async with RelayClient(ws_base(a), "wpf-6", **FAST) as client:
        await client.wait_connected()
        tail = await Tail.start("wpf-6", "--url", ws_base(b), "--as-client")
        try:
            await eventually(tail.welcomed)
            with pytest.raises(RelayClosed) as closed:
                await asyncio.wait_for(client.wait_closed(), 10_000 * MS)
            assert closed.value.code == 4000
        finally:
            await tail.stop()


async def test_observer_needs_the_api_to_be_on(redis_server: RedisServer) -> None:
    """A node without --api-key has no observers: closed 4001 with a reason that says so."""
    node = await NodeUnderTest(node_settings(redis_url=redis_server.url, api_key=None)).start()
    try:
        observer = RelayClient(ws_base(node), "wpf-7", observe_key="anything", **FAST)
        async with observer:
            with pytest.raises(RelayClosed) as closed:
                await asyncio.wait_for(observer.wait_closed(), 10_000 * MS)
        assert closed.value.code == 4001 and "--api-key" in closed.value.reason
    finally:
        await node.stop()
