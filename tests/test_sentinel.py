"""Redis Sentinel: engine and publishers follow a failover; min_replicas waits for replicas;
the outbox dispatcher reads duplicates back through the master.

A real deployment of redis-server processes (a master, two replicas, three sentinels with
down-after 1 s) per test; the tests kill and stop its processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest
import redis
import structlog

from backend_adapter import AsyncPublisher, Publisher
from relay.engine import EngineOptions
from relay.engines.redis import RedisEngine
from relay.errors import EngineUnavailable, PublishFailed
from relay.redis_pool import async_pool
from relay.wire import KeySpace, decode_payload, parse_id
from tests.backend_adapter.sql_support import dispatch_after_a_crash
from tests.engines.conftest import RecordingHandler
from tests.support.ports import free_ports
from tests.support.sentinel import PASSWORD, SERVICE, SentinelDeployment
from tests.support.timing import MS

pytestmark = pytest.mark.redis


async def _publish_until_accepted(
    publisher: AsyncPublisher, biz_id: str, seq: int, deadline: float
) -> int:
    """Publish with a mid until Redis accepts it; how many attempts failed."""
    failures = 0
    loop = asyncio.get_running_loop()
    while True:
        try:
            await publisher.publish(biz_id, "tick", {"seq": seq}, mid=f"{biz_id}:{seq}")
            return failures
        except PublishFailed:
            failures += 1
            assert loop.time() < deadline, "no publish accepted after the failover"
            await asyncio.sleep(100 * MS)


def _clients_of(ports: list[int]) -> list[dict[str, str]]:
    """CLIENT LIST of these sentinels, but for their links to each other and this probe."""
    found = []
    for port in ports:
        with redis.Redis(port=port, protocol=2, decode_responses=True) as sentinel:
            for line in sentinel.execute_command("CLIENT", "LIST").splitlines():
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                if not fields["name"].startswith("sentinel-") and fields["cmd"] != "client|list":
                    found.append(fields)
    return found


async def test_sentinel_engine_and_publishers_follow_a_failover(
    sentinel_deployment: SentinelDeployment,
) -> None:
    """Kill -9 the master and the URL's first sentinel: publishes reach the new master, the
    node resubscribes and receives them live, the sentinels are asked in RESP2, and the
    password never reaches a log line."""
    deployment = sentinel_deployment
    handler = RecordingHandler()
    engine = RedisEngine(deployment.url, EngineOptions(), socket_timeout=1.0)
    with structlog.testing.capture_logs() as logs:
        await engine.start("sentinel-node", handler)
        try:
            await engine.subscribe("b1")
            async with AsyncPublisher(deployment.url, timeout=1.0, retries=1) as publisher:
                first = await publisher.publish("b1", "tick", {"seq": 0}, mid="b1:0")
                await handler.wait_until(lambda: len(handler.events_for("b1")) == 1)
                # Every blocking call runs in a thread: a stalled loop makes the engine's
                # canary replace its connection, a resubscribe this test does not expect.
                old = await asyncio.to_thread(deployment.master_port)
                # The first sentinel of the URL is gone too: the others are asked.
                await asyncio.to_thread(deployment.kill, deployment.sentinel_ports[0])
                await asyncio.to_thread(deployment.kill, old)
                loop = asyncio.get_running_loop()
                failures = await _publish_until_accepted(
                    publisher, "b1", 1, loop.time() + 30_000 * MS
                )
                assert await asyncio.to_thread(deployment.master_port) != old
                # The node's subscription moved too: a live event arrives after resubscribing.
                await handler.wait_until(lambda: handler.resubscribes >= 1, 20_000)
                await _publish_until_accepted(publisher, "b1", 2, loop.time() + 10_000 * MS)
                await handler.wait_until(
                    lambda: [e.data["seq"] for e in handler.events_for("b1")][-1:] == [2],
                    10_000,
                )
                # What a node's gap repair reads after the resubscribe: seq 1, published
                # while the engine was (most likely) not yet subscribed, and seq 2.
                gap = await engine.history("b1", parse_id(first.id), 10)
                assert [e.data["seq"] for e in gap.entries] == [1, 2]
            with Publisher(deployment.url, timeout=1.0) as sync_publisher:
                result = await asyncio.to_thread(sync_publisher.publish, "b1", "tick", {"seq": 3})
                # The sentinels are asked in RESP2, as the data nodes: in RESP3 each new
                # sentinel connection also sent HELLO 3 and a CLIENT MAINT_NOTIFICATIONS
                # that the sentinel refuses (an error reply).
                alive = deployment.sentinel_ports[1:]
                ours = await asyncio.to_thread(_clients_of, alive)
                assert ours and {c["resp"] for c in ours} == {"2"}, [c["resp"] for c in ours]
            await handler.wait_until(lambda: len(handler.events_for("b1")) >= 3, 5_000)
            history = await engine.history("b1", None, 10)
            assert history.last is not None and result.id.startswith(str(history.last[0]))
        finally:
            await engine.close()
    assert failures >= 1, "the kill should have failed at least one attempt"
    assert PASSWORD not in repr(logs)


async def test_sentinel_min_replicas_holds_the_ack_until_replicas_have_the_event(
    sentinel_deployment: SentinelDeployment,
) -> None:
    """With min_replicas=1 a publish fails (retryable) while no replica answers -- also one
    that finds its mid already written by another publisher -- and succeeds once they are
    back; the engine's publish (the HTTP API's) too."""
    deployment = sentinel_deployment
    replica_pids = [deployment.procs[port].pid for port in deployment.data_ports[1:]]
    engine = RedisEngine(
        deployment.url, EngineOptions(min_replicas=1, replica_timeout=0.2), socket_timeout=1.0
    )
    await engine.start("wait-node", RecordingHandler())
    waiting = AsyncPublisher(
        deployment.url, min_replicas=1, replica_timeout=0.2, timeout=1.0, retries=0
    )
    plain = AsyncPublisher(deployment.url, timeout=1.0, retries=0)
    try:
        assert not (await waiting.publish("w1", "tick", {"seq": 0}, mid="w1:0")).duplicate
        assert not (await engine.publish("w1", "tick", {"seq": 1}, mid="w1:1")).duplicate
        for pid in replica_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            # Another publisher wrote w1:3 on the master alone. Finding its mid writes
            # nothing, yet the ack must still wait until a replica holds the original.
            assert not (await plain.publish("w1", "tick", {"seq": 3}, mid="w1:3")).duplicate
            with pytest.raises(PublishFailed, match="replica"):
                await waiting.publish("w1", "tick", {"seq": 3}, mid="w1:3")
            with pytest.raises(PublishFailed, match=r"0 of 1 replica\(s\) acknowledged"):
                await waiting.publish("w1", "tick", {"seq": 2}, mid="w1:2")
            with pytest.raises(EngineUnavailable, match="replica"):
                await engine.publish("w1", "tick", {"seq": 4}, mid="w1:4")
        finally:
            for pid in replica_pids:
                os.kill(pid, signal.SIGCONT)
        again = await waiting.publish("w1", "tick", {"seq": 2}, mid="w1:2")
        assert again.duplicate, "the failed attempt had reached the master"
        assert (await engine.publish("w1", "tick", {"seq": 4}, mid="w1:4")).duplicate
        with Publisher(deployment.url, min_replicas=2, replica_timeout=0.5) as sync_publisher:
            await asyncio.to_thread(sync_publisher.publish, "w1", "tick", {"seq": 5})
    finally:
        await plain.close()
        await waiting.close()
        await engine.close()


async def test_sentinel_outbox_reads_back_duplicates_through_the_master(
    sentinel_deployment: SentinelDeployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through Sentinel, the dispatcher reads each duplicate's original back from the
    master: rows published before a crash are marked, rows whose uid another event holds
    are published again under a new uid."""
    deployment = sentinel_deployment
    bizs = [f"shop-{n}" for n in range(6)]
    with (
        Publisher(deployment.url) as publisher,
        caplog.at_level(logging.WARNING, logger="backend_adapter.outbox"),
    ):
        crash = dispatch_after_a_crash
        first, second = await asyncio.to_thread(crash, tmp_path, publisher, bizs)
    assert (first.published, first.duplicates, first.collisions) == (4, 2, 2)
    assert (second.published, second.duplicates, second.collisions) == (2, 0, 0)
    warned = [r for r in caplog.records if r.getMessage().startswith("outbox.unexpected_")]
    assert len(warned) == 2
    master = deployment.client(deployment.master_port())
    try:
        for n, biz in enumerate(bizs):
            entries = master.xrange(KeySpace().log(biz))
            history = [decode_payload(s, f[b"prev"], f[b"p"]).data for s, f in entries]
            assert history == ([None, biz] if n % 3 == 2 else [biz]), (biz, history)
    finally:
        master.close()


async def test_sentinel_pool_closes_every_sentinel_after_overlapping_discoveries(
    sentinel_deployment: SentinelDeployment,
) -> None:
    """Overlapping master discoveries (each connection opened in a failover makes one), a
    sentinel down: the pool keeps asking every sentinel, so closing it closes them all."""
    (down,) = free_ports(1)
    auth, hosts = sentinel_deployment.url.removeprefix("redis+sentinel://").split("@")
    order = hosts.split("/")[0].split(",")
    for trial in range(20):
        addresses = [f"127.0.0.1:{down}", *order]
        addresses.insert(trial % 4, addresses.pop(0))  # the dead one at every place in turn
        url = f"redis+sentinel://{auth}@{','.join(addresses)}/{SERVICE}/0"
        pool = async_pool(url, socket_connect_timeout=1000 * MS)
        manager = pool.sentinel_manager  # type: ignore[attr-defined]
        clients = set(manager.sentinels)
        try:
            await asyncio.gather(*(manager.discover_master(SERVICE) for _ in range(50)))
            assert set(manager.sentinels) == clients, f"trial {trial}: a sentinel was dropped"
        finally:
            await pool.aclose()
