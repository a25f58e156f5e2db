"""Sentinel failover under load: kill -9 the Redis master behind two nodes and nginx.

A master, two replicas and three sentinels (down-after 1 s) of the test's own; two relay
nodes and nginx from deploy/local-cluster.sh, all on ``redis+sentinel://``; resuming
clients; a TickPublisher (AsyncPublisher on the same URL, one ``mid`` per event, retried
until accepted). With ``--redis-min-replicas 1`` no accepted event may be lost; without
it the test reports what was lost. In both, a client that misses an accepted event must
have been told (a welcome with ``recovered: false`` after the kill): never a silent hole.

``make test`` runs a modest load for a 2-core machine; RELAY_SENTINEL_CLIENTS and
RELAY_SENTINEL_RATE (events/s) set the full figures (200 clients, 500/s).
"""

from __future__ import annotations

import asyncio
import os
import time

import msgpack
import pytest

from relay.wire import KeySpace
from tests.cluster.conftest import MakeCluster
from tests.cluster.support import Fleet, TickPublisher, missing_and_extra, wait_delivered
from tests.support.sentinel import PASSWORD, SentinelDeployment
from tests.support.timing import MS

CLIENTS = int(os.environ.get("RELAY_SENTINEL_CLIENTS", "100"))
RATE = float(os.environ.get("RELAY_SENTINEL_RATE", "200"))
TICK = CLIENTS / RATE  # one event per client per tick
SETTINGS = {"heartbeat": 5, "drain_grace": 1, "close_linger": 0.05}


def _missing_from_history(deployment: SentinelDeployment, accepted: dict[str, list[int]]) -> int:
    """Accepted events that the (new) master's streams do not hold."""
    missing = 0
    with deployment.client(deployment.master_port()) as master:
        for client_id, seqs in accepted.items():
            entries = master.xrange(KeySpace().log(client_id))
            kept = {msgpack.unpackb(fields[b"p"])["data"]["seq"] for _, fields in entries}
            missing += len(set(seqs) - kept)
    return missing


async def _kill_master_under_load(
    make_cluster: MakeCluster,
    deployment: SentinelDeployment,
    min_replicas: int,
    *,
    lag: float = 0.0,
) -> None:
    """Kill -9 the master mid-run; with ``lag``, replication stops that long before the
    kill (replicas stopped, links dropped), so what was accepted meanwhile is only on it."""
    cluster = await make_cluster(
        2, redis_url=deployment.url, redis_min_replicas=min_replicas, **SETTINGS
    )
    ids = [f"sf-{i}" for i in range(CLIENTS)]
    async with Fleet({cid: cluster.lb_ws(cid) for cid in ids}) as fleet:
        await fleet.wait_connected(60_000 * MS)
        async with TickPublisher(
            deployment.url, ids, TICK, min_replicas=min_replicas, timeout=1000 * MS
        ) as publisher:
            await publisher.wait_ticks(3)
            old = deployment.master_port()
            killed_at = time.monotonic()
            in_flight = publisher.ticks  # the seq of the tick under way
            if lag:
                await asyncio.to_thread(deployment.cut_replicas, old)
                await asyncio.sleep(lag)
            await asyncio.to_thread(deployment.kill, old)
            deployment.resume_replicas()
            # Delivery resumed: a client receives an event of a later tick than the one
            # in flight at the kill; for everyone: every client has received one.
            after = in_flight + 1
            first = await fleet.wait(
                lambda: any(c.seqs and c.seqs[-1] >= after for c in fleet),
                60_000 * MS,
                "first delivery",
            )
            everyone = first + await fleet.wait(
                lambda: all(c.seqs and c.seqs[-1] >= after for c in fleet),
                60_000 * MS,
                "all delivering",
            )
            await publisher.wait_ticks(5)
        delivery = await wait_delivered(fleet, publisher.accepted, 30_000 * MS)
        missing, wrong, examples = missing_and_extra(fleet, publisher.accepted)
        told = {
            c.client_id
            for c in fleet
            if any(w.recovered is False for w in c.welcomes_after(killed_at))
        }
        # Clients whose delivery is not exactly what was accepted, once and in order.
        off = {c.client_id for c in fleet if c.seqs != publisher.accepted[c.client_id]}
        short = {c.client_id for c in fleet if set(publisher.accepted[c.client_id]) - set(c.seqs)}
        reconnected = sum(1 for c in fleet if c.welcomes_after(killed_at))
    unkept = await asyncio.to_thread(_missing_from_history, deployment, publisher.accepted)
    logs = cluster.log("node1") + cluster.log("node2")
    print(
        f"\nMEASURED Sentinel failover (kill -9 master, down-after 1 s"
        f"{f', replication stopped {lag:.2f} s before' if lag else ''}),"
        f" --redis-min-replicas {min_replicas}: {CLIENTS} clients via nginx on 2 nodes,"
        f" {RATE:.0f} events/s; delivery resumed {first:.2f} s after the kill (every client"
        f" {everyone:.2f} s); {publisher.total} events accepted, {unkept} of them missing from"
        f" the new master's history, {missing} never delivered, {wrong} out of order or twice"
        f" (seq), {fleet.duplicates} repeats dropped by clients (id); {publisher.failures}"
        f" publish attempts raised PublishFailed and were retried with the same mid"
        f" ({publisher.duplicates} deduplicated); {reconnected} clients reconnected,"
        f" {len(told)} told recovered=false; last events delivered {delivery:.2f} s after"
        f" the last publish"
    )
    assert PASSWORD not in logs, "the Redis password reached a node's log"
    # No silent loss: a client that did not get exactly the accepted events was told.
    assert not off - told, f"not told: {sorted(off - told)[:5]} {examples}"
    if min_replicas:
        assert unkept == 0, "an accepted event is not on the new master"
        assert not short, f"accepted events lost: {examples}"


@pytest.mark.timeout(300)
async def test_sentinel_failover_with_min_replicas_loses_no_accepted_event(
    make_cluster: MakeCluster, sentinel_deployment: SentinelDeployment
) -> None:
    """--redis-min-replicas 1: after kill -9 of the master every accepted event arrives
    once, in order; nodes and publishers follow the new master."""
    await _kill_master_under_load(make_cluster, sentinel_deployment, 1)


@pytest.mark.timeout(300)
async def test_sentinel_failover_without_min_replicas_never_loses_silently(
    make_cluster: MakeCluster, sentinel_deployment: SentinelDeployment
) -> None:
    """Without --redis-min-replicas: the loss is measured; any client missing an accepted
    event was told recovered=false."""
    await _kill_master_under_load(make_cluster, sentinel_deployment, 0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("min_replicas", [1, 0])
async def test_sentinel_failover_with_lagging_replicas(
    make_cluster: MakeCluster, sentinel_deployment: SentinelDeployment, min_replicas: int
) -> None:
    """Replicas behind at the kill (replication stopped 1.5 ticks before): without
    min-replicas accepted events are lost (measured), never silently; with it none is."""
    await _kill_master_under_load(make_cluster, sentinel_deployment, min_replicas, lag=1.5 * TICK)
