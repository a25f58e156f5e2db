"""The publishers on a real Redis Cluster (3 masters, 3 replicas): ``redis+cluster://``.

Each batch is split by hash slot and sent to the master that owns it; a slot that moves
while events are published (MOVED, ASK) loses none and duplicates none. The outbox
dispatcher reads the originals of duplicates back from each slot's master.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from backend_adapter import AsyncPublisher, Publisher
from relay import wire
from relay.errors import PublishFailed
from relay.wire import KeySpace, PublishResult
from tests.backend_adapter.sql_support import dispatch_after_a_crash
from tests.support.redis_cluster import RedisCluster
from tests.support.timing import MS

KEYS = KeySpace("relay")
BIZ_IDS = [f"shop-{n}" for n in range(30)]  # spread over the three masters


def _history(cluster: RedisCluster, biz_id: str) -> list[tuple[str, object]]:
    reader = redis.RedisCluster(host="127.0.0.1", port=cluster.masters()[0])
    try:
        entries = reader.xrange(KEYS.log(biz_id))
    finally:
        reader.close()
    return [
        (sid.decode(), wire.decode_payload(sid, f[b"prev"], f[b"p"]).data) for sid, f in entries
    ]


def test_cluster_batch_spans_every_master(redis_cluster: RedisCluster) -> None:
    """The BizIds of one publish_many live on all three masters; each history is whole."""
    owners = {redis_cluster.master_of_slot(redis_cluster.slot_of(KEYS.log(b))) for b in BIZ_IDS}
    assert len(owners) == 3
    items = [(biz, "e", i) for i in range(5) for biz in BIZ_IDS]
    with Publisher(redis_cluster.url) as publisher:
        results = publisher.publish_many(items)
        again = publisher.publish("shop-0", "e", "x", mid="m1")
        repeat = publisher.publish("shop-0", "e", "x", mid="m1")
    assert len(results) == len(items)
    for biz in BIZ_IDS:
        assert [data for _, data in _history(redis_cluster, biz)][:5] == list(range(5))
    assert (again.duplicate, repeat.duplicate, repeat.id) == (False, True, again.id)


async def test_cluster_async_publishes_land_in_order(redis_cluster: RedisCluster) -> None:
    """Concurrent publishes and a publish_many through AsyncPublisher: every event once."""
    async with AsyncPublisher(redis_cluster.url) as publisher:
        await asyncio.gather(
            *(publisher.publish(biz, "e", i, mid=f"{biz}-{i}") for biz in BIZ_IDS for i in [0])
        )
        await publisher.publish_many([(biz, "e", i) for i in range(1, 4) for biz in BIZ_IDS])
        assert await publisher.is_online("nobody") is False
    for biz in BIZ_IDS:
        assert [data for _, data in _history(redis_cluster, biz)] == [0, 1, 2, 3]


async def test_cluster_slot_moved_under_publishing(own_cluster: RedisCluster) -> None:
    """A BizId's slot moves to another master while events go to it: none lost, none twice,
    in order (the publisher follows ASK and MOVED by re-reading the layout and resending)."""
    biz = "moving"
    slot = own_cluster.slot_of(KEYS.log(biz))
    target = next(p for p in own_cluster.masters() if p != own_cluster.master_of_slot(slot))
    sent: list[int] = []
    async with AsyncPublisher(own_cluster.url, retries=20, backoff=0.01) as publisher:
        for i in range(200):  # a history worth migrating
            await publisher.publish(biz, "e", i, mid=str(i))
            sent.append(i)
        mover = asyncio.create_task(asyncio.to_thread(own_cluster.move_slot, slot, target, 5))
        after = 0
        while after < 50:  # until 50 more events went out after the move finished
            after += mover.done()
            await publisher.publish(biz, "e", len(sent), mid=str(len(sent)))
            sent.append(len(sent))
        await mover
    assert own_cluster.master_of_slot(slot) == target
    history = [data for _, data in _history(own_cluster, biz)]
    assert history[-100:] == sent[-100:]  # the history keeps the newest history_size events
    assert len(set(history)) == len(history)


@pytest.mark.parametrize("publisher_class", [Publisher, AsyncPublisher])
async def test_cluster_min_replicas_waits_for_the_slot_masters_replica(
    own_cluster: RedisCluster, publisher_class: type
) -> None:
    """With min_replicas=1 a publish succeeds once the replica of its slot's master holds
    it; with that replica frozen (SIGSTOP) the publish fails with ReplicasBehind, while a
    BizId on another master still publishes. A duplicate is vouched for the same way."""
    frozen_master = own_cluster.master_of_slot(own_cluster.slot_of(KEYS.log("shop-0")))
    other = next(
        b
        for b in BIZ_IDS
        if own_cluster.master_of_slot(own_cluster.slot_of(KEYS.log(b))) != frozen_master
    )
    replica = own_cluster.procs[own_cluster.replicas_of(frozen_master)[0]]
    kwargs = {"min_replicas": 1, "replica_timeout": 0.2, "retries": 1, "timeout": 1.0}
    publisher, retrier = (publisher_class(own_cluster.url, **kwargs) for _ in range(2))

    async def publish(via: Any, biz: str, mid: str) -> PublishResult:
        if isinstance(via, AsyncPublisher):
            return await via.publish(biz, "e", 1, mid=mid)
        return await asyncio.to_thread(via.publish, biz, "e", 1, mid)

    try:
        first = await publish(publisher, "shop-0", "a")
        assert (await publish(retrier, "shop-0", "a")).duplicate
        replica.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(PublishFailed, match="ReplicasBehind: 0 of 1 replica"):
                await publish(publisher, "shop-0", "b")
            # Another process retries "b" (same mid): a duplicate whose original the
            # replica does not hold is not vouched for either.
            with pytest.raises(PublishFailed, match="ReplicasBehind"):
                await publish(retrier, "shop-0", "b")
            assert not (await publish(retrier, other, "c")).duplicate
        finally:
            replica.send_signal(signal.SIGCONT)
    finally:
        for each in (publisher, retrier):
            if isinstance(each, AsyncPublisher):
                await each.close()
            else:
                each.close()
    assert first.id == next(sid for sid, _ in _history(own_cluster, "shop-0"))


def test_relay_publish_command_reaches_a_cluster(redis_cluster: RedisCluster) -> None:
    """`relay publish --redis-url redis+cluster://…` publishes (nodes still refuse it)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "publish",
            "cli-biz",
            "e",
            '{"n": 1}',
            "--redis-url",
            redis_cluster.url,
        ],
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
        check=True,
    ).stdout
    assert json.loads(out)["duplicate"] is False
    assert [data for _, data in _history(redis_cluster, "cli-biz")] == [{"n": 1}]


def test_cluster_outbox_reads_back_duplicates_on_every_master(
    redis_cluster: RedisCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows published before a crash, and rows whose uid another event holds, on BizIds of
    all three masters: the dispatcher reads every original back from its slot's master,
    marks the first kind quietly and publishes the second again under a new uid."""
    bizs = BIZ_IDS[:9]
    with (
        Publisher(redis_cluster.url) as publisher,
        caplog.at_level(logging.WARNING, logger="backend_adapter.outbox"),
    ):
        first, second = dispatch_after_a_crash(tmp_path, publisher, bizs)
    owners = {redis_cluster.master_of_slot(redis_cluster.slot_of(KEYS.log(b))) for b in bizs}
    assert len(owners) == 3
    assert (first.published, first.duplicates, first.collisions) == (6, 3, 3)
    assert (second.published, second.duplicates, second.collisions) == (3, 0, 0)
    warned = [r for r in caplog.records if r.getMessage().startswith("outbox.unexpected_")]
    assert len(warned) == 3
    for n, biz in enumerate(bizs):
        history = [data for _, data in _history(redis_cluster, biz)]
        assert history == ([None, biz] if n % 3 == 2 else [biz]), (biz, history)


async def test_cluster_reshard_under_load_loses_and_doubles_nothing(
    own_cluster: RedisCluster,
) -> None:
    """`redis-cli --cluster reshard` moves 300 slots while AsyncPublisher publishes to
    BizIds in them (one mid per event, concurrently): every accepted event is in its
    BizId's history exactly once, in the order accepted, and every slot ends on the target."""
    source = own_cluster.master_of_slot(0)
    target = next(p for p in own_cluster.masters() if p != source)
    moving = [b for b in (f"r{n}" for n in range(3000)) if own_cluster.slot_of(KEYS.log(b)) < 300]
    biz_ids = moving[:12]
    accepted: dict[str, list[int]] = {biz: [] for biz in biz_ids}
    failed = 0

    async def lane(publisher: AsyncPublisher, biz: str, stop: asyncio.Event) -> None:
        nonlocal failed
        n = 0
        while not stop.is_set() or n < 20:
            try:
                await publisher.publish(biz, "e", n, mid=f"{biz}-{n}")
                accepted[biz].append(n)
            except PublishFailed:
                failed += 1
            n += 1

    async with AsyncPublisher(
        own_cluster.url, retries=30, backoff=0.01, history_size=100_000
    ) as publisher:
        stop = asyncio.Event()
        lanes = [asyncio.create_task(lane(publisher, biz, stop)) for biz in biz_ids]
        await asyncio.sleep(0)
        await asyncio.to_thread(own_cluster.reshard, source, target, 300)
        stop.set()
        await asyncio.gather(*lanes)
    assert all(
        own_cluster.master_of_slot(own_cluster.slot_of(KEYS.log(b))) == target for b in biz_ids
    )
    assert failed == 0
    for biz in biz_ids:
        assert [data for _, data in _history(own_cluster, biz)] == accepted[biz]
