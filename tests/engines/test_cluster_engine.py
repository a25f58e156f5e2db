"""The Redis engine on a real Redis Cluster: a reader per master (sharded pub/sub), which
follows a master's death and a slot's move.

The contract suites run on the cluster as well (the ``cluster`` kind of
tests/engines/conftest.py); this is what a single server has no counterpart of.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import deque

import pytest
import redis
import structlog
from redis.crc import key_slot

from backend_adapter import AsyncPublisher
from relay.engine import Control, EngineOptions
from relay.engines.redis import RedisEngine
from relay.engines.redis._sharded import (
    NodeTarget,
    ShardedSubscriber,
    ShardReader,
    canary_channel,
)
from relay.engines.redis._subscriber import _SUBSCRIBE, _UNSUBSCRIBE, Timings, _Session
from relay.errors import EngineError, EngineUnavailable
from relay.redis_pool import async_cluster
from relay.wire import KeySpace
from tests.conftest import MS
from tests.engines.conftest import RecordingHandler
from tests.support.redis_cluster import RedisCluster
from tests.support.timing import eventually

KEYS = KeySpace("relay")
TIMINGS = Timings(1.0, 1.0, 3.0, 0.05, 2.0, 5.0)


def _readers(cluster: RedisCluster, node_id: str) -> dict[int, int]:
    """How many pub/sub connections of the engine (its client name names the node) each
    live node holds."""
    counts = {}
    for port in cluster.alive():
        with cluster.client(port) as client:
            names = [c.get("name") for c in client.client_list()]
        counts[port] = names.count(f"relay-sub:{node_id}")
    return counts


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
    """Kill -9 the master holding a subscribed BizId (and one of the engine's readers):
    publishes fail as retryable for a moment, then land on the promoted replica, nothing
    accepted before the kill is lost, the engine subscribes on the promoted replica and
    tells the node to repair gaps, and live delivery comes back (``receivers`` 1), each
    event at most once."""
    engine = RedisEngine(
        own_cluster.url, EngineOptions(), socket_timeout=500 * MS, command_timeout=2000 * MS
    )
    handler = RecordingHandler()
    await engine.start("node-failover", handler)
    try:
        master = own_cluster.masters()[0]
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
        assert all(named == [biz] for named in handler.resubscribed)  # that master's only
        live = await engine.publish(biz, "e", 3)
        assert live.receivers == 1
        await handler.wait_until(
            lambda: live.id in [e.id for e in handler.events_for(biz)], timeout_ms=10_000
        )
        delivered = [e.id for e in handler.events_for(biz)]
        assert delivered[0] == before.id and delivered[-1] == live.id
        assert len(delivered) == len(set(delivered))  # each event at most once
    finally:
        await engine.close()


async def test_engine_follows_a_moved_slot(own_cluster: RedisCluster) -> None:
    """Move a subscribed BizId's slot, keys included, to another master: the old master
    ends the subscription (``sunsubscribe``), the engine subscribes on the new one and
    tells the node to repair that BizId (no other); the next publish lands there (MOVED
    followed), is counted (``receivers`` 1) and delivered live, naming the first as
    ``prev``; history holds both."""
    engine = RedisEngine(own_cluster.url, EngineOptions())
    handler = RecordingHandler()
    await engine.start("node-moved", handler)
    try:
        biz = "moved-biz"
        slot = own_cluster.slot_of(KEYS.log(biz))
        source = own_cluster.master_of_slot(slot)
        target = next(port for port in own_cluster.masters() if port != source)
        elsewhere = await asyncio.to_thread(_biz_on, own_cluster, source)
        await engine.subscribe(biz)
        await engine.subscribe(elsewhere)  # same master, another slot: not moved
        first = await engine.publish(biz, "e", 1)
        assert first.receivers == 1
        await asyncio.to_thread(own_cluster.move_slot, slot, target)
        await handler.wait_until(lambda: handler.resubscribes >= 1)
        assert handler.resubscribed == [[biz]]  # only the moved BizId is repaired
        second = await engine.publish(biz, "e", 2)
        assert own_cluster.master_of_slot(slot) == target
        assert second.receivers == 1
        history = await engine.history(biz, (0, 0), 10)
        assert [e.id for e in history.entries] == [first.id, second.id]
        await handler.wait_until(lambda: len(handler.events_for(biz)) >= 2)
        delivered = handler.events_for(biz)
        assert [e.id for e in delivered] == [first.id, second.id]
        assert delivered[1].prev == delivered[0].key
    finally:
        await engine.close()


async def test_engine_subscribe_follows_a_moved_reply(own_cluster: RedisCluster) -> None:
    """A slot moved while the engine had nothing subscribed in it, so its slot map is stale:
    SSUBSCRIBE on the old master is answered ``-MOVED``, the engine reads the map again
    and subscribes on the new master; subscribe() returns once that is confirmed, and the
    next publish is counted there and delivered."""
    engine = RedisEngine(own_cluster.url, EngineOptions())
    handler = RecordingHandler()
    await engine.start("node-moved-reply", handler)
    try:
        biz = "moved-reply-biz"
        slot = own_cluster.slot_of(KEYS.log(biz))
        source = own_cluster.master_of_slot(slot)
        target = next(port for port in own_cluster.masters() if port != source)
        await asyncio.to_thread(own_cluster.move_slot, slot, target)
        await engine.subscribe(biz)
        published = await engine.publish(biz, "e", 1)
        assert published.receivers == 1
        await handler.wait_until(lambda: [e.id for e in handler.events_for(biz)] == [published.id])
    finally:
        await engine.close()


async def test_engine_reads_every_master_and_counts_receivers(redis_cluster: RedisCluster) -> None:
    """One reader connection per master; an event of a BizId on each of the three shards,
    from the engine or from backend_adapter's publisher, is delivered live with
    ``receivers`` 1 (the shard's subscriber, counted by SPUBLISH), a BizId nobody
    subscribed has none, and a kick reaches the node on its control channel."""
    engine = RedisEngine(redis_cluster.url, EngineOptions())
    handler = RecordingHandler()
    await engine.start("node-shards", handler)
    try:
        masters = redis_cluster.masters()
        readers = await asyncio.to_thread(_readers, redis_cluster, "node-shards")
        assert {port: n for port, n in readers.items() if n} == dict.fromkeys(masters, 1)
        bizs = [await asyncio.to_thread(_biz_on, redis_cluster, m) for m in masters]
        for biz in bizs:
            await engine.subscribe(biz)
        results = [await engine.publish(biz, "e", n) for n, biz in enumerate(bizs)]
        assert [r.receivers for r in results] == [1, 1, 1]
        await handler.wait_until(
            lambda: (
                [[e.id for e in handler.events_for(b)] for b in bizs] == [[r.id] for r in results]
            )
        )
        async with AsyncPublisher(redis_cluster.url) as publisher:  # the same script
            by_publisher = await publisher.publish_many([(b, "p", n) for n, b in enumerate(bizs)])
        assert [r.receivers for r in by_publisher] == [1, 1, 1]
        await handler.wait_until(lambda: len(handler.events) == 6)
        nobody = next(b for b in (f"idle-{n}" for n in range(100)) if b not in bizs)
        assert (await engine.publish(nobody, "e", 0)).receivers == 0
        await engine.send_control("node-shards", Control("kick", client_id=bizs[0]))
        await handler.wait_until(lambda: [c.client_id for c in handler.controls] == [bizs[0]])
    finally:
        await engine.close()


async def test_engine_is_unready_while_one_master_is_deaf(own_cluster: RedisCluster) -> None:
    """SIGSTOP one master: its reader's canary stops coming back, so the engine turns
    unready (on_health False) although the other masters answer; SIGCONT, and it is
    ready again once that reader's canary returns, delivering on that master."""
    engine = RedisEngine(
        own_cluster.url, EngineOptions(), canary_interval=100 * MS, canary_deadline=400 * MS
    )
    handler = RecordingHandler()
    await engine.start("node-deaf", handler)
    try:
        master = own_cluster.masters()[0]
        biz = await asyncio.to_thread(_biz_on, own_cluster, master)
        await engine.subscribe(biz)
        assert engine.ready
        pid = own_cluster.procs[master].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await handler.wait_until(lambda: False in handler.health, timeout_ms=5000)
            assert not engine.ready
        finally:
            os.kill(pid, signal.SIGCONT)
        await handler.wait_until(lambda: engine.ready and handler.health[-1], timeout_ms=20_000)
        published = await engine.publish(biz, "e", 1)
        assert published.receivers == 1
        await handler.wait_until(lambda: published.id in [e.id for e in handler.events_for(biz)])
    finally:
        await engine.close()


def test_canary_channel_hashes_to_a_slot_the_master_serves() -> None:
    """A master's canary channel is found however few slots it serves (one here), the same
    every time; a master without slots gets none."""
    for owned in ({12345}, {0}, set(range(5461, 10923))):
        channel = canary_channel("relay:ctl:node-1", owned)
        assert channel is not None and key_slot(channel.encode()) in owned
        assert canary_channel("relay:ctl:node-1", owned) == channel
    assert canary_channel("relay:ctl:node-1", set()) is None


async def test_shard_reader_settles_every_command_of_a_moved_slot() -> None:
    """A -MOVED answers one command, but every (S)SUBSCRIBE and SUNSUBSCRIBE of that slot
    on the connection will be refused alike: at the first one the reader drops the
    channels it was subscribing (their waiters learn it, the owner looks again) and
    forgets the unsubscribes, so nothing waits for a confirmation that never comes."""
    cluster = async_cluster("redis+cluster://127.0.0.1:1")
    owner = ShardedSubscriber(
        cluster,
        {},
        RecordingHandler(),
        "relay:ctl:n",
        "relay-sub:n",
        TIMINGS,
        structlog.get_logger(),
    )
    reader = ShardReader(
        owner, "127.0.0.1:1", "relay:ctl:n:shard:0", NodeTarget({}, "127.0.0.1", 1)
    )
    subscribing, unsubscribing, elsewhere = b"relay:{a}:ch", b"relay:{a}:x", b"relay:{b}:ch"
    session = _Session(conn=None)  # type: ignore[arg-type]  # no I/O here
    session.sent = {subscribing, elsewhere}
    session.ops = {
        subscribing: deque([_SUBSCRIBE]),
        unsubscribing: deque([_UNSUBSCRIBE]),
        elsewhere: deque([_SUBSCRIBE]),
    }
    reader.channels.update({subscribing: "a", elsewhere: "b"})
    waiter = asyncio.get_running_loop().create_future()
    reader._waiters[subscribing] = [waiter]
    slot = key_slot(subscribing)
    reader._on_error_reply(session, redis.exceptions.MovedError(f"{slot} 127.0.0.1:2"))
    assert list(session.ops) == [elsewhere] and session.sent == {elsewhere}
    assert reader.channels == {elsewhere: "b"}
    assert isinstance(waiter.exception(), EngineError)  # subscribe() looks again
    assert owner._changed.is_set()
    await cluster.aclose()


async def test_engine_reports_a_cluster_with_no_master_as_unavailable(
    own_cluster: RedisCluster,
) -> None:
    """Every master killed: redis-py's cluster client raises its own errors (not
    RedisError), which the engine must turn into EngineUnavailable like a lost single
    server, so the node's heartbeat loop goes on (and is not reaped once Redis is back)
    and its drain closes the engine without a traceback."""
    engine = RedisEngine(
        own_cluster.url, EngineOptions(), socket_timeout=500 * MS, command_timeout=2000 * MS
    )
    await engine.start("node-alone", RecordingHandler())
    closed = False
    try:
        for port in list(own_cluster.procs):
            await asyncio.to_thread(own_cluster.kill, port)
        for _ in range(2):  # once with the old slot map, once after redis-py dropped it
            try:
                await engine.heartbeat(0)
            except EngineUnavailable as exc:
                assert "redis is unreachable (heartbeat" in str(exc)
            else:
                raise AssertionError("a heartbeat with every node dead succeeded")
        await engine.close()
        closed = True
    finally:
        if not closed:
            await engine.close()


async def _publish_each(engine: RedisEngine, bizs: list[str], mid: str) -> list[object]:
    """One publish per BizId, all in one event-loop turn: results, or the errors raised."""
    return await asyncio.gather(
        *(engine.publish(biz, "e", biz, mid=mid) for biz in bizs), return_exceptions=True
    )


async def test_engine_min_replicas_fails_the_publishes_of_a_master_without_replication(
    own_cluster: RedisCluster,
) -> None:
    """--redis-min-replicas 1 on a cluster: with one master's replication stopped, the
    publishes (single and runs) of its BizIds fail as retryable (EngineUnavailable: "0 of
    1 replica"), a retry with the same mid too; BizIds on the other masters, published in
    the same turn, go on. After the replicas resume, the retry is accepted once: the
    event is in history a single time, under the id the master gave it."""
    engine = RedisEngine(
        own_cluster.url,
        EngineOptions(min_replicas=1, replica_timeout=0.2),
        socket_timeout=1000 * MS,
        command_timeout=3000 * MS,
    )
    await engine.start("node-minrep", RecordingHandler())
    try:
        masters = own_cluster.masters()
        bizs = [await asyncio.to_thread(_biz_on, own_cluster, port) for port in masters]
        cut, others = bizs[0], bizs[1:]
        before = await _publish_each(engine, bizs, "m0")  # one pipeline per master
        assert all(not isinstance(r, BaseException) for r in before), before

        await asyncio.to_thread(own_cluster.cut_replicas, masters[0])
        try:
            during = await _publish_each(engine, bizs, "m1")
            assert isinstance(during[0], EngineUnavailable), during[0]
            assert "0 of 1 replica(s) acknowledged" in str(during[0])
            assert all(not isinstance(r, BaseException) for r in during[1:]), during
            with pytest.raises(EngineUnavailable, match="replica"):  # a duplicate: not vouched
                await engine.publish(cut, "e", cut, mid="m1")
            with pytest.raises(EngineUnavailable, match="replica"):
                await engine.publish_run(cut, [("e", 2, "m2"), ("e", 3, "m3")])
            run = await engine.publish_run(others[0], [("e", 2, "m2"), ("e", 3, "m3")])
            assert [r.duplicate for r in run] == [False, False]
        finally:
            await asyncio.to_thread(own_cluster.resume_replicas)

        retried = await engine.publish(cut, "e", cut, mid="m1")
        assert retried.duplicate  # the first attempt ran on the master: accepted once
        again = await engine.publish_run(cut, [("e", 2, "m2"), ("e", 3, "m3")])
        assert [r.duplicate for r in again] == [True, True]
        history = await engine.history(cut, (0, 0), 10)
        assert [e.mid for e in history.entries] == ["m0", "m1", "m2", "m3"]
        assert history.entries[1].id == retried.id
    finally:
        await engine.close()


async def test_engine_min_replicas_follows_a_moved_slot(own_cluster: RedisCluster) -> None:
    """--redis-min-replicas 1: after a BizId's slot moved to another master, the next
    publish (refused with MOVED by the old master, so not run there) is resent to the new
    one and waits for that master's replica; history holds both events, once each."""
    engine = RedisEngine(own_cluster.url, EngineOptions(min_replicas=1, replica_timeout=0.5))
    await engine.start("node-minrep-moved", RecordingHandler())
    try:
        biz = "moved-biz"
        slot = own_cluster.slot_of(KEYS.log(biz))
        source = own_cluster.master_of_slot(slot)
        target = next(port for port in own_cluster.masters() if port != source)
        first = await engine.publish(biz, "e", 1, mid="first")
        await asyncio.to_thread(own_cluster.move_slot, slot, target)
        second = await engine.publish(biz, "e", 2, mid="second")
        assert not second.duplicate
        history = await engine.history(biz, (0, 0), 10)
        assert [e.id for e in history.entries] == [first.id, second.id]
        replica = own_cluster.replicas_of(target)[0]
        assert await asyncio.to_thread(_replica_has, own_cluster, replica, biz, 2)
    finally:
        await engine.close()


async def test_engine_min_replicas_after_a_failover_without_a_spare_replica(
    own_cluster: RedisCluster,
) -> None:
    """3 masters with one replica each: after a master's failover the promoted replica has
    no replica of its own, so with --redis-min-replicas 1 every publish of its BizIds
    fails as retryable (the BizIds of the other masters go on) -- why the docs ask for
    two replicas per master. Once a replica joins it again, they are accepted."""
    engine = RedisEngine(
        own_cluster.url,
        EngineOptions(min_replicas=1, replica_timeout=0.2),
        socket_timeout=500 * MS,
        command_timeout=3000 * MS,
    )
    await engine.start("node-minrep-failover", RecordingHandler())
    try:
        master, other_master = own_cluster.masters()[:2]
        biz = await asyncio.to_thread(_biz_on, own_cluster, master)
        other = await asyncio.to_thread(_biz_on, own_cluster, other_master)
        await engine.publish(biz, "e", 1, mid="before")
        promoted, _ = await asyncio.to_thread(own_cluster.kill_master_and_wait_failover, master)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20_000 * MS
        while True:  # until the engine reaches the promoted replica: then WAIT says 0 of 1
            try:
                await engine.publish(biz, "e", 2, mid="after")
            except EngineUnavailable as exc:
                if "0 of 1 replica(s)" in str(exc):
                    break
            else:
                raise AssertionError("a publish was acknowledged by a master without replicas")
            assert loop.time() < deadline, "publishes never reached the promoted replica"
            await asyncio.sleep(100 * MS)
        assert not (await engine.publish(other, "e", 2, mid="after")).duplicate

        # A replica joins the promoted master (taken from another master, for the test).
        spare = own_cluster.replicas_of(other_master)[0]
        promoted_id = next(n.node_id for n in own_cluster.nodes() if n.port == promoted)
        with own_cluster.client(spare) as client:
            client.execute_command("CLUSTER", "REPLICATE", promoted_id)

        async def accepted() -> bool:
            try:
                return (await engine.publish(biz, "e", 2, mid="after")).duplicate
            except EngineUnavailable:
                return False

        await eventually(
            accepted, 20_000 * MS, poll=100 * MS, what="accepted after a replica joined"
        )
    finally:
        await engine.close()


async def test_engine_pipeline_spanning_a_moved_slot_accepts_each_event_once(
    own_cluster: RedisCluster,
) -> None:
    """One turn's publishes pipelined to a master whose slot moved meanwhile (the engine's
    slot map is stale): the moved BizId's are refused with MOVED and resent to the new
    master, the same pipeline's others are answered at once; every event is accepted once
    (none a duplicate), and each BizId's history holds each of its events once."""
    engine = RedisEngine(own_cluster.url, EngineOptions())
    await engine.start("node-pipe-moved", RecordingHandler())
    try:
        moved = "moved-biz"
        slot = own_cluster.slot_of(KEYS.log(moved))
        source = own_cluster.master_of_slot(slot)
        target = next(port for port in own_cluster.masters() if port != source)
        neighbour = await asyncio.to_thread(_biz_on, own_cluster, source)
        far = await asyncio.to_thread(_biz_on, own_cluster, target)
        bizs = [moved, neighbour, far]
        for biz in bizs:
            await engine.publish(biz, "e", 0, mid=f"{biz}-0")
        await asyncio.to_thread(own_cluster.move_slot, slot, target)
        results = await asyncio.gather(
            *(engine.publish(biz, "e", n, mid=f"{biz}-{n}") for n in range(1, 11) for biz in bizs)
        )
        assert not any(result.duplicate for result in results)
        for biz in bizs:
            history = await engine.history(biz, (0, 0), 100)
            mids = [e.mid for e in history.entries]
            assert sorted(mids) == sorted(f"{biz}-{n}" for n in range(11))
    finally:
        await engine.close()
