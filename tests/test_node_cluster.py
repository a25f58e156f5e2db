"""A node on a real Redis Cluster with a client connected: a master's death and a slot's
move while events keep coming lose nothing, duplicate nothing and keep the order; with
--redis-min-replicas, the HTTP API refuses (retryable) what a master cannot replicate."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import redis

from backend_adapter import AsyncPublisher
from relay import wire
from relay.errors import PublishFailed
from relay.wire import KeySpace
from tests.support.node import API_KEY, Listener, NodeUnderTest, listen, start_node
from tests.support.redis_cluster import RedisCluster
from tests.support.served import ServedNode
from tests.support.timing import MS

pytestmark = pytest.mark.redis

KEYS = KeySpace("relay")


def _biz_on(cluster: RedisCluster, master: int) -> str:
    return next(
        biz
        for biz in (f"client-{n}" for n in range(1000))
        if cluster.master_of_slot(cluster.slot_of(KEYS.log(biz))) == master
    )


def _wait_promoted(cluster: RedisCluster, slot: int, master: int) -> None:
    """Until another master (the replica) serves ``slot``."""
    deadline = time.monotonic() + 30_000 * MS
    while True:
        with contextlib.suppress(LookupError, redis.RedisError):
            if cluster.master_of_slot(slot) != master:
                return
        assert time.monotonic() < deadline, "no replica took over"
        time.sleep(50 * MS)


class Feed:
    """Publishes numbered events to one BizId every few ms until stopped, each retried with
    its own ``mid`` until Redis accepts it: the ids of the accepted events, in order."""

    def __init__(self, publisher: AsyncPublisher, biz: str) -> None:
        self.publisher = publisher
        self.biz = biz
        self.accepted: list[str] = []
        self.hold = asyncio.Lock()  # held: nothing is published
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def publish(self) -> None:
        n = len(self.accepted)
        while True:
            try:
                result = await self.publisher.publish(self.biz, "tick", {"n": n}, mid=f"m{n}")
            except PublishFailed:
                await asyncio.sleep(50 * MS)  # a master is down or a slot on its way
                continue
            self.accepted.append(result.id)
            return

    def start(self) -> None:
        async def run() -> None:
            while not self._stop.is_set():
                async with self.hold:
                    await self.publish()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(20 * MS):
                        await self._stop.wait()

        self._task = asyncio.create_task(run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def _live_through(
    cluster: RedisCluster,
    started_nodes: list[NodeUnderTest],
    listeners: list[Listener],
    disturb: Callable[[str, Feed], Awaitable[None]],
) -> None:
    """A client on a node receives every accepted event once and in order, live, while
    ``disturb(biz, feed)`` runs and after."""
    relay = await start_node(started_nodes, redis_url=cluster.url)
    biz = await asyncio.to_thread(_biz_on, cluster, cluster.masters()[0])
    client = await listen(listeners, relay.ws_url(biz))
    async with AsyncPublisher(cluster.url, timeout=500 * MS, retries=1) as publisher:
        feed = Feed(publisher, biz)
        for _ in range(3):
            await feed.publish()
        await client.wait_messages(3)
        feed.start()
        await disturb(biz, feed)
        await asyncio.sleep(300 * MS)  # events after the change, live
        await feed.stop()
        last = await publisher.publish(biz, "tick", {"n": "last"})
        assert last.receivers == 1  # the node reads the slot's (new) master
    accepted = [*feed.accepted, last.id]
    await client.wait_messages(len(accepted), timeout=10_000 * MS)
    await asyncio.sleep(100 * MS)
    assert [m["id"] for m in client.messages] == accepted
    assert client.close_code is None
    metrics = relay.node.metrics
    assert metrics.engine_reconnects._value.get() >= 1  # the node was told to repair


async def test_node_on_cluster_master_killed_client_gets_every_event_in_order(
    own_cluster: RedisCluster, started_nodes: list[NodeUnderTest], listeners: list[Listener]
) -> None:
    """Kill -9 the master of the client's BizId while events keep coming: publishes are
    retried until the replica takes over, the node subscribes there and repairs the gap
    from history; the client gets every accepted event once, in order, and stays on."""

    async def kill(biz: str, feed: Feed) -> None:
        slot = own_cluster.slot_of(KEYS.log(biz))
        master = own_cluster.master_of_slot(slot)
        async with feed.hold:  # everything accepted is on the replica when the master dies
            with own_cluster.client(master) as client:
                await asyncio.to_thread(client.execute_command, "WAIT", 1, 2000)
            own_cluster.kill(master)
        await asyncio.to_thread(_wait_promoted, own_cluster, slot, master)

    await _live_through(own_cluster, started_nodes, listeners, kill)


async def test_node_on_cluster_slot_moved_client_gets_every_event_in_order(
    own_cluster: RedisCluster, started_nodes: list[NodeUnderTest], listeners: list[Listener]
) -> None:
    """Move the slot of the client's BizId to another master while events keep coming:
    the node follows it (sunsubscribe, then SSUBSCRIBE on the new master) and repairs the
    gap; the client gets every accepted event once, in order, and stays on."""

    async def move(biz: str, feed: Feed) -> None:
        slot = own_cluster.slot_of(KEYS.log(biz))
        source = own_cluster.master_of_slot(slot)
        target = next(port for port in own_cluster.masters() if port != source)
        await asyncio.to_thread(own_cluster.move_slot, slot, target)

    await _live_through(own_cluster, started_nodes, listeners, move)


def _mids(cluster: RedisCluster, biz: str) -> list[str | None]:
    """The ``mid`` of each entry of ``biz``'s history, read from its master."""
    reader = redis.RedisCluster(host="127.0.0.1", port=cluster.masters()[0])
    try:
        entries = reader.xrange(KEYS.log(biz))
    finally:
        reader.close()
    return [wire.decode_payload(sid, f[b"prev"], f[b"p"]).mid for sid, f in entries]


async def test_serve_on_cluster_with_min_replicas_answers_503_while_a_master_is_not_replicated(
    own_cluster: RedisCluster, tmp_path: Path
) -> None:
    """``relay serve --redis-url redis+cluster://… --redis-min-replicas 1``: with the
    replication of one master stopped, POST /api/publish for a BizId of that master
    answers 503 ``unavailable`` (single, and its event in a batch), while a BizId of
    another master in the same batch is accepted. After the replicas resume, the same
    requests are accepted, each event once in history."""
    node = ServedNode(
        tmp_path,
        "--redis-url",
        own_cluster.url,
        "--redis-min-replicas",
        "1",
        "--redis-replica-timeout",
        "0.2",
        "--allow-anonymous",
        "--api-key",
        API_KEY,
    )
    await asyncio.to_thread(node.start)
    masters = own_cluster.masters()
    cut = await asyncio.to_thread(_biz_on, own_cluster, masters[0])
    other = await asyncio.to_thread(_biz_on, own_cluster, masters[1])
    single = {"biz_id": cut, "event": "e", "data": 1, "mid": "single"}
    batch = {
        "events": [
            {"biz_id": cut, "event": "e", "data": 2, "mid": "batch"},
            {"biz_id": other, "event": "e", "data": 3, "mid": "batch"},
        ]
    }
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        async with aiohttp.ClientSession(base_url=node.base, headers=auth) as http:

            async def post(body: dict[str, object]) -> tuple[int, dict[str, object]]:
                async with http.post("/api/publish", json=body) as response:
                    return response.status, await response.json()

            assert (await post({**single, "mid": "first"}))[0] == 200
            await asyncio.to_thread(own_cluster.cut_replicas, masters[0])
            try:
                status, answer = await post(single)
                assert (status, answer["error"]["code"]) == (503, "unavailable"), answer
                status, answer = await post(batch)
                cut_result, other_result = answer["results"]
                assert status == 200 and cut_result["error"]["code"] == "unavailable"
                assert other_result["duplicate"] is False
            finally:
                await asyncio.to_thread(own_cluster.resume_replicas)

            status, answer = await post(single)  # the client's retry, same mid
            assert status == 200 and answer["duplicate"] is True
            status, answer = await post(batch)
            assert [r["duplicate"] for r in answer["results"]] == [True, True]
    finally:
        assert await asyncio.to_thread(node.stop) == 0
    assert await asyncio.to_thread(_mids, own_cluster, cut) == ["first", "single", "batch"]
    assert await asyncio.to_thread(_mids, own_cluster, other) == ["batch"]
