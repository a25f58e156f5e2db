"""Relay nodes on a Redis Cluster under load: kill -9 a master, reshard a slot range.

A 3-master Redis Cluster of the test's own (``redis-cli --cluster create``, one replica
per master, two for the min_replicas=1 runs; node timeout 1 s; a password), three relay
nodes and nginx from deploy/local-cluster.sh on its ``redis+cluster://`` URL, resuming
clients, and a TickPublisher (AsyncPublisher on the same URL, one ``mid`` per event,
retried until accepted). Per client, what was delivered must be exactly what was
accepted, once and in order, or the client was told ``recovered: false`` after the
disturbance: never a silent hole or a silent repeat.

``make test`` runs a modest load for a 2-core machine; RELAY_REDIS_CLUSTER_CLIENTS and
RELAY_REDIS_CLUSTER_RATE (events/s) set the full figures (300 clients, 500/s), e.g.
``RELAY_REDIS_CLUSTER_CLIENTS=300 RELAY_REDIS_CLUSTER_RATE=500 pytest -q -rP
tests/cluster/test_redis_cluster_failover.py``; every test prints a MEASURED line.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import msgpack
import pytest
from redis.crc import key_slot

from relay.wire import KeySpace
from tests.cluster.conftest import MakeCluster
from tests.cluster.support import (
    Fleet,
    LocalCluster,
    TickPublisher,
    get_json,
    missing_and_extra,
    wait_delivered,
)
from tests.support.redis_cluster import RedisCluster
from tests.support.timing import MS

CLIENTS = int(os.environ.get("RELAY_REDIS_CLUSTER_CLIENTS", "80"))
RATE = float(os.environ.get("RELAY_REDIS_CLUSTER_RATE", "400"))
TICK = CLIENTS / RATE  # one event per client per tick
RESHARD_SLOTS = 2000  # moved by redis-cli, the source's lowest slots
SETTINGS = {"heartbeat": 5, "drain_grace": 1, "close_linger": 0.05}
PASSWORD = "cluster-test-pw-5c2e"  # tests check it never reaches a node's log

pytestmark = pytest.mark.timeout(300)


MakeRedisCluster = Callable[[int], Awaitable[RedisCluster]]


@pytest.fixture
async def make_redis_cluster() -> AsyncIterator[MakeRedisCluster]:
    """Redis Clusters of this test's own (3 masters, ``replicas`` replicas each) with a
    password; closed at the end."""
    started: list[RedisCluster] = []

    async def make(replicas: int) -> RedisCluster:
        cluster = RedisCluster(replicas=replicas, password=PASSWORD)
        started.append(cluster)
        return await asyncio.to_thread(cluster.start)

    yield make
    for cluster in started:
        await asyncio.to_thread(cluster.close)


def _slot(client_id: str) -> int:
    return key_slot(KeySpace().log(client_id).encode())


def _ids_in(prefix: str, count: int, slots: range, share: float) -> list[str]:
    """``count`` client ids, ``share`` of them with their slot in ``slots``."""
    inside = round(count * share)
    picked: list[str] = []
    outside: list[str] = []
    n = 0
    while len(picked) < inside or len(outside) < count - inside:
        cid = f"{prefix}-{n}"
        n += 1
        if _slot(cid) in slots:
            if len(picked) < inside:
                picked.append(cid)
        elif len(outside) < count - inside:
            outside.append(cid)
    return picked + outside


def _missing_from_history(cluster: RedisCluster, accepted: dict[str, list[int]]) -> int:
    """Accepted events that the masters' streams do not hold now."""
    missing = 0
    for client_id, seqs in accepted.items():
        with cluster.client(cluster.master_of_slot(_slot(client_id))) as master:
            entries = master.xrange(KeySpace().log(client_id))
        kept = {msgpack.unpackb(fields[b"p"])["data"]["seq"] for _, fields in entries}
        missing += len(set(seqs) - kept)
    return missing


@dataclass
class Outcome:
    """What a run measured, and which clients got something other than what was accepted."""

    accepted: int
    unkept: int  # accepted events no longer in any master's history
    missing: int  # accepted events never delivered
    wrong: int  # events delivered out of order or twice (by seq: a second id for one mid)
    twice: int  # of which delivered a second time
    repeats: int  # repeats the clients dropped by id
    failures: int
    deduplicated: int
    reconnected: int
    told: set[str]
    off: set[str]  # delivery is not exactly what was accepted
    short: set[str]  # an accepted event was never delivered
    examples: list[str]
    delivery: float

    def line(self) -> str:
        return (
            f"{self.accepted} events accepted, {self.unkept} of them missing from the masters'"
            f" history, {self.missing} never delivered ({len(self.short)} clients),"
            f" {self.wrong} out of order or twice (seq; {self.twice} delivered twice),"
            f" {self.repeats} repeats dropped by clients (id); {self.failures} publish"
            f" attempts raised PublishFailed and were"
            f" retried with the same mid ({self.deduplicated} deduplicated);"
            f" {self.reconnected} clients reconnected, {len(self.told)} told recovered=false;"
            f" last events delivered {self.delivery:.2f} s after the last publish"
        )

    def check(self, *, lossless: bool) -> None:
        # No silent loss or repeat: a client that did not get exactly the accepted events,
        # once and in order, was told.
        assert not self.off - self.told, (
            f"not told: {sorted(self.off - self.told)[:5]} {self.examples}"
        )
        if lossless:
            assert self.unkept == 0, "an accepted event is not on the masters"
            assert not self.short, f"accepted events lost: {self.examples}"


async def _settle(
    cluster: RedisCluster, fleet: Fleet, publisher: TickPublisher, since: float
) -> Outcome:
    """Stop publishing, wait for delivery, and compare it with what was accepted."""
    await publisher.stop()
    delivery = await wait_delivered(fleet, publisher.accepted, 30_000 * MS)
    missing, wrong, examples = missing_and_extra(fleet, publisher.accepted)
    unkept = await asyncio.to_thread(_missing_from_history, cluster, publisher.accepted)
    return Outcome(
        accepted=publisher.total,
        unkept=unkept,
        missing=missing,
        wrong=wrong,
        twice=sum(len(c.seqs) - len(set(c.seqs)) for c in fleet),
        repeats=fleet.duplicates,
        failures=publisher.failures,
        deduplicated=publisher.duplicates,
        reconnected=sum(1 for c in fleet if c.welcomes_after(since)),
        told={
            c.client_id for c in fleet if any(w.recovered is False for w in c.welcomes_after(since))
        },
        off={c.client_id for c in fleet if c.seqs != publisher.accepted[c.client_id]},
        short={c.client_id for c in fleet if set(publisher.accepted[c.client_id]) - set(c.seqs)},
        examples=examples,
        delivery=delivery,
    )


async def _heartbeats_live(nodes: LocalCluster) -> dict[str, float]:
    """Seconds since each registered node's last heartbeat (it beats every second here)."""
    async with aiohttp.ClientSession() as http:
        _, body = await get_json(http, f"{nodes.node_http(1)}/api/nodes")
    return {n["node"]: round(time.time() - n["last_seen"], 2) for n in body["nodes"]}


def _check_logs(nodes: LocalCluster) -> None:
    """No password in the nodes' logs, and no traceback (an error no one handled)."""
    logs = "".join(nodes.log(f"node{k}") for k in range(1, nodes.nodes + 1))
    assert PASSWORD not in logs, "the Redis password reached a node's log"
    assert "Traceback" not in logs, nodes.logs_tail(60)


@pytest.mark.parametrize("lagged", [False, True], ids=["in-sync", "lagged"])
@pytest.mark.parametrize("min_replicas", [1, 0])
async def test_redis_cluster_master_killed_under_load(
    make_redis_cluster: MakeRedisCluster,
    make_cluster: MakeCluster,
    min_replicas: int,
    lagged: bool,
) -> None:
    """kill -9 of the master serving most clients, its replica takes over: every accepted
    event arrives once, in order, or the client is told recovered=false; with the
    publisher's min_replicas=1 none is lost, even when replication had stopped (lagged:
    1.5 ticks before the kill) and what the master accepted meanwhile dies with it.

    With min_replicas=1 each master has two replicas: with one, the promoted replica has
    none left, and its shard refuses every publish until a replica joins it (by design).
    """
    redis = await make_redis_cluster(1 + min_replicas)
    nodes = await make_cluster(3, redis_url=redis.url, **SETTINGS)
    ids = [f"ck-{i}" for i in range(CLIENTS)]
    owner = {cid: redis.master_of_slot(_slot(cid)) for cid in ids}
    victim = max(set(owner.values()), key=list(owner.values()).count)
    hit = {cid for cid, port in owner.items() if port == victim}
    async with Fleet({cid: nodes.lb_ws(cid) for cid in ids}) as fleet:
        await fleet.wait_connected(60_000 * MS)
        async with TickPublisher(
            redis.url, ids, TICK, min_replicas=min_replicas, timeout=1000 * MS
        ) as publisher:
            await publisher.wait_ticks(3)
            if lagged:
                await asyncio.to_thread(redis.cut_replicas, victim)
                await asyncio.sleep(1.5 * TICK)
            killed_at = time.monotonic()
            after = publisher.ticks + 1  # the first seq published wholly after the kill
            _, promoted = await asyncio.to_thread(redis.kill_master_and_wait_failover, victim)
            await fleet.wait(
                lambda: all(c.first_arrival(after) is not None for c in fleet),
                60_000 * MS,
                "every client's delivery after the kill",
            )
            await publisher.wait_ticks(5)
            outcome = await _settle(redis, fleet, publisher, killed_at)
            # Late enough that a heartbeat loop that died at the kill shows (beats every 1 s).
            await asyncio.sleep(max(0.0, killed_at + 5000 * MS - time.monotonic()))
            beats = await _heartbeats_live(nodes)
        resumed = {c.client_id: (c.first_arrival(after) or 0.0) - killed_at for c in fleet}
    hit_times = sorted(resumed[cid] for cid in hit)
    rest_times = sorted(t for cid, t in resumed.items() if cid not in hit)
    print(
        f"\nMEASURED Redis Cluster failover (kill -9 one of 3 masters,"
        f" {redis.replicas_per_master} replicas each, node timeout {redis.node_timeout_ms} ms"
        f"{f', replication stopped {1.5 * TICK:.2f} s before' if lagged else ''}),"
        f" publisher min_replicas={min_replicas}: {CLIENTS} clients via nginx on 3 nodes,"
        f" {RATE:.0f} events/s; replica promoted {promoted - killed_at:.2f} s after the kill;"
        f" live delivery resumed for the {len(hit)} clients of the killed master median"
        f" {statistics.median(hit_times):.2f} s, max {hit_times[-1]:.2f} s (the others median"
        f" {statistics.median(rest_times):.2f} s, max {rest_times[-1]:.2f} s: a tick waits"
        f" for all its publishes); " + outcome.line()
    )
    _check_logs(nodes)
    # Each node still beats (a heartbeat loop ended by an error leaves its record to expire).
    assert len(beats) == 3 and max(beats.values()) < 2500 * MS, f"seconds since beats: {beats}"
    outcome.check(lossless=bool(min_replicas))


async def test_redis_cluster_reshard_under_load(
    make_redis_cluster: MakeRedisCluster, make_cluster: MakeCluster
) -> None:
    """``redis-cli --cluster reshard`` moves a slot range holding a third of the clients
    while they receive: every accepted event arrives once, in order, none is lost."""
    redis = await make_redis_cluster(1)
    source = redis.master_of_slot(0)
    target = next(port for port in redis.masters() if port != source)
    moved = range(0, RESHARD_SLOTS)  # redis-cli takes the source's lowest slots first
    ids = _ids_in("cr", CLIENTS, moved, 1 / 3)
    nodes = await make_cluster(3, redis_url=redis.url, **SETTINGS)
    async with Fleet({cid: nodes.lb_ws(cid) for cid in ids}) as fleet:
        await fleet.wait_connected(60_000 * MS)
        async with TickPublisher(redis.url, ids, TICK, timeout=1000 * MS) as publisher:
            await publisher.wait_ticks(3)
            started = time.monotonic()
            first_tick = publisher.ticks
            await asyncio.to_thread(redis.reshard, source, target, RESHARD_SLOTS)
            took = time.monotonic() - started
            ticks_during = publisher.ticks - first_tick
            await publisher.wait_ticks(5)
            outcome = await _settle(redis, fleet, publisher, started)
    now_on_target = [cid for cid in ids if redis.master_of_slot(_slot(cid)) == target]
    moved_clients = [cid for cid in ids if _slot(cid) in moved]
    gaps = [b - a for a, b in zip(publisher.tick_times, publisher.tick_times[1:], strict=False)]
    print(
        f"\nMEASURED Redis Cluster reshard (redis-cli --cluster reshard of {RESHARD_SLOTS}"
        f" slots under load): {CLIENTS} clients via nginx on 3 nodes, {RATE:.0f} events/s,"
        f" {len(moved_clients)} of them in the moved slots; the reshard took {took:.2f} s,"
        f" {ticks_during} ticks meanwhile, longest tick {max(gaps):.2f} s (planned"
        f" {TICK:.2f} s); " + outcome.line()
    )
    assert set(moved_clients) <= set(now_on_target), "redis-cli did not move the chosen slots"
    _check_logs(nodes)
    outcome.check(lossless=True)
