"""The Redis engine on a real Redis Cluster whose master dies: it follows the promotion.

The contract suites run on the cluster as well (the ``cluster`` kind of
tests/engines/conftest.py); this is what a single server has no counterpart of.
"""

from __future__ import annotations

import asyncio

import redis

from relay.engine import EngineOptions
from relay.engines.redis import RedisEngine
from relay.errors import EngineError
from relay.wire import KeySpace
from tests.conftest import MS
from tests.engines.conftest import RecordingHandler
from tests.support.redis_cluster import RedisCluster

KEYS = KeySpace("relay")


def _subscriber_master(cluster: RedisCluster, node_id: str) -> int:
    """The master the engine's pub/sub connection is on (its client name names the node)."""
    for port in cluster.masters():
        with cluster.client(port) as client:
            if any(c.get("name") == f"relay-sub:{node_id}" for c in client.client_list()):
                return port
    raise LookupError("the engine's pub/sub connection is on no master")


def _biz_on(cluster: RedisCluster, master: int) -> str:
    return next(
        biz
        for biz in (f"biz-{n}" for n in range(1000))
        if cluster.master_of_slot(cluster.slot_of(KEYS.log(biz))) == master
    )


def _replica_has(cluster: RedisCluster, replica: int, biz: str, length: int) -> bool:
    with cluster.client(replica) as client:
        client.execute_command("READONLY")
        return int(client.xlen(KEYS.log(biz))) >= length


async def test_engine_follows_a_killed_master_to_its_replica(own_cluster: RedisCluster) -> None:
    """Kill -9 the master holding both a subscribed BizId and the engine's pub/sub
    connection: publishes fail as retryable for a moment, then land on the promoted replica,
    nothing accepted before the kill is lost, the engine resubscribes on another node (so
    the node repairs gaps) and live delivery comes back, each event at most once."""
    engine = RedisEngine(
        own_cluster.url, EngineOptions(), socket_timeout=500 * MS, command_timeout=2000 * MS
    )
    handler = RecordingHandler()
    await engine.start("node-failover", handler)
    try:
        master = await asyncio.to_thread(_subscriber_master, own_cluster, "node-failover")
        biz = await asyncio.to_thread(_biz_on, own_cluster, master)
        replica = own_cluster.replicas_of(master)[0]
        await engine.subscribe(biz)
        before = await engine.publish(biz, "e", 1)
        await handler.wait_until(lambda: [e.id for e in handler.events_for(biz)] == [before.id])
        while not await asyncio.to_thread(_replica_has, own_cluster, replica, biz, 1):
            await asyncio.sleep(20 * MS)

        promoted, _ = await asyncio.to_thread(own_cluster.kill_master_and_wait_failover, master)
        assert promoted == replica

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20_000 * MS
        while True:  # a publisher retries a retryable failure
            try:
                after = await engine.publish(biz, "e", 2)
                break
            except (EngineError, redis.RedisError):
                assert loop.time() < deadline, "publishes never reached the promoted replica"
                await asyncio.sleep(100 * MS)
        history = await engine.history(biz, (0, 0), 10)
        assert [e.id for e in history.entries] == [before.id, after.id]

        await handler.wait_until(
            lambda: engine.ready and handler.resubscribes >= 1, timeout_ms=20_000
        )
        live = await engine.publish(biz, "e", 3)
        await handler.wait_until(
            lambda: live.id in [e.id for e in handler.events_for(biz)], timeout_ms=10_000
        )
        delivered = [e.id for e in handler.events_for(biz)]
        assert delivered[0] == before.id and delivered[-1] == live.id
        assert len(delivered) == len(set(delivered))  # each event at most once
    finally:
        await engine.close()


async def test_engine_follows_a_moved_slot(own_cluster: RedisCluster) -> None:
    """Move a subscribed BizId's slot, keys included, to another master between two
    publishes: the second lands on the new owner (MOVED followed), history holds both in
    order, both are delivered live once each, and the second names the first as ``prev``."""
    engine = RedisEngine(own_cluster.url, EngineOptions())
    handler = RecordingHandler()
    await engine.start("node-moved", handler)
    try:
        biz = "moved-biz"
        slot = own_cluster.slot_of(KEYS.log(biz))
        source = own_cluster.master_of_slot(slot)
        target = next(port for port in own_cluster.masters() if port != source)
        await engine.subscribe(biz)
        first = await engine.publish(biz, "e", 1)
        await asyncio.to_thread(own_cluster.move_slot, slot, target)
        second = await engine.publish(biz, "e", 2)
        assert own_cluster.master_of_slot(slot) == target
        history = await engine.history(biz, (0, 0), 10)
        assert [e.id for e in history.entries] == [first.id, second.id]
        await handler.wait_until(lambda: len(handler.events_for(biz)) >= 2)
        delivered = {e.id: e for e in handler.events_for(biz)}
        assert sorted(delivered) == sorted([first.id, second.id])
        assert len(handler.events_for(biz)) == 2
        # Classic pub/sub reaches the reader over two paths here (the old owner's message
        # crosses the cluster bus), so the two may arrive in either order; ``prev`` links
        # them, so the node's hub (relay.hub: GAP, then STALE) still hands clients order.
        assert delivered[second.id].prev == delivered[first.id].key
    finally:
        await engine.close()
