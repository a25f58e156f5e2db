"""Redis trouble under load: a restart (kill + start on the same port) and a hang (SIGSTOP).

Three relay processes and nginx from deploy/local-cluster.sh, on a Redis of the test's
own (``--redis-url``) so the test can kill, restart, stop and continue it.

The restart test runs Redis with ``appendonly yes``: without persistence a restart
empties every stream, and what was accepted but not yet delivered is gone with them
(clients then resume with ``recovered=false``). With AOF, no event that publish accepted
may be lost, and no connected client may be dropped.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.cluster.conftest import MakeCluster
from tests.cluster.support import (
    Fleet,
    LocalCluster,
    TickPublisher,
    explain_drops,
    missing_and_extra,
    readyz,
    wait_delivered,
)
from tests.support.redis_server import RedisServer
from tests.support.timing import MS

CLIENTS = 300
TICK = 500 * MS
SETTINGS = {"heartbeat": 5, "drain_grace": 1, "close_linger": 0.05}


@pytest.fixture
async def aof_redis() -> AsyncIterator[RedisServer]:
    # appendfsync always: the AOF is written before every reply. With everysec (Redis's
    # default, deploy/redis/redis.conf's) a SIGKILL can lose acknowledged writes when the
    # disk is slow: while its once-a-second background fsync runs, Redis keeps the next
    # writes in memory, up to 2 s, yet replies to them. Those events reached the clients
    # live, but the restarted streams lack them, so their sessions end 4509 and resume
    # with recovered=false: clients dropped, nothing lost (as in a CI run of 2026-12-06,
    # one client). Measured with fdatasync delayed 300 ms (strace --inject): everysec lost
    # acknowledged writes in 2 of 8 kills, always in 0 of 6; this test failed that way.
    server = await asyncio.to_thread(RedisServer(appendonly=True, appendfsync="always").start)
    yield server
    await asyncio.to_thread(server.close)


async def _metric(http: aiohttp.ClientSession, base: str, name: str) -> float:
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def _metrics(http: aiohttp.ClientSession, cluster: LocalCluster, name: str) -> int:
    values = [await _metric(http, cluster.node_http(k), name) for k in (1, 2, 3)]
    return int(sum(values))


async def _all_ready(http: aiohttp.ClientSession, cluster: LocalCluster, want: int) -> bool:
    codes = [await readyz(http, cluster.node_http(k)) for k in (1, 2, 3)]
    return all(code == want for code in codes)


async def _wait_ready(
    http: aiohttp.ClientSession, cluster: LocalCluster, want: int, timeout: float, what: str
) -> float:
    start = time.monotonic()
    while not await _all_ready(http, cluster, want):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(50 * MS)
    return time.monotonic() - start


async def test_redis_restart_with_aof_under_load_loses_no_accepted_event(
    make_cluster: MakeCluster, aof_redis: RedisServer
) -> None:
    """Kill Redis, start it on the same port 1.5 s later: every accepted event arrives once."""
    cluster = await make_cluster(3, redis_url=aof_redis.url, **SETTINGS)
    ids = [f"rr-{i}" for i in range(CLIENTS)]
    async with Fleet({cid: cluster.lb_ws(cid) for cid in ids}) as fleet:
        await fleet.wait_connected()
        assert fleet.http is not None
        http = fleet.http
        # A client that leaves while Redis is down and never comes back.
        leaver = await http.ws_connect(cluster.node_ws(1, "leaver"))
        await leaver.receive(timeout=5000 * MS)
        async with TickPublisher(aof_redis.url, ids, TICK) as publisher:
            await publisher.wait_ticks(3)
            before = publisher.total
            killed_at = time.monotonic()
            await asyncio.to_thread(aof_redis.kill)
            unready = await _wait_ready(http, cluster, 503, 5000 * MS, "/readyz 503 on every node")
            # Twenty clients drop their connection while Redis is down and must come back.
            movers = list(fleet)[:20]
            for client in movers:
                await client.stop_connection()
            await asyncio.sleep(50 * MS)
            stopped_at = time.monotonic()
            await leaver.close()
            await asyncio.sleep(max(0.0, 1500 * MS - (time.monotonic() - killed_at)))
            await asyncio.to_thread(aof_redis.start)
            restarted_at = time.monotonic()
            down_for = restarted_at - killed_at
            ready = await _wait_ready(http, cluster, 200, 20_000 * MS, "/readyz 200 on every node")
            await fleet.wait(
                lambda: all(c.node is not None for c in fleet),
                20_000 * MS,
                "every client connected",
            )
            await publisher.wait_ticks(3)
            # Its node could not release its record while Redis was down; once Redis is
            # back the record goes, or it would read online for as long as node1 lives.
            ready_at = time.monotonic()
            while await publisher.publisher.is_online("leaver"):
                assert time.monotonic() - ready_at < 10_000 * MS, "leaver still online 10 s later"
                await asyncio.sleep(100 * MS)
            left = time.monotonic() - restarted_at
        delivery = await wait_delivered(fleet, publisher.accepted, 20_000 * MS)
        missing, wrong, examples = missing_and_extra(fleet, publisher.accepted)
        assert (missing, wrong) == (0, 0), examples
        rewelcomes = [w for c in movers for w in c.welcomes_after(killed_at)]
        refused = [cl.code for c in movers for cl in c.closes if cl.at > stopped_at]
        unrecovered = [
            c for c in movers if any(not w.recovered for w in c.welcomes_after(killed_at))
        ]
        assert not unrecovered, explain_drops(cluster, unrecovered, killed_at)
        stayed = [c for c in fleet if c not in movers]
        dropped = [c for c in stayed if c.welcomes_after(killed_at)]
        assert not dropped, explain_drops(cluster, dropped, killed_at)
        gaps = await _metrics(http, cluster, "relay_gaps_repaired_total")
        resubscribed = await _metrics(http, cluster, "relay_engine_reconnects_total")
        print(
            f"\nMEASURED Redis restart (appendonly yes, appendfsync always): {CLIENTS} clients"
            f" via nginx, Redis down {down_for:.2f} s; /readyz 503 on all 3 nodes"
            f" {unready * 1000:.0f} ms after the kill, 200 again {ready:.2f} s after the restart"
            f" (subscriptions back);"
            f" {publisher.total} events accepted ({before} before the kill), 0 lost, 0 twice,"
            f" {fleet.duplicates} duplicates dropped by clients; {publisher.failures} publish"
            f" attempts raised PublishFailed and were retried with the same mid"
            f" ({publisher.duplicates} of the retries were deduplicated by mid);"
            f" nodes resubscribed {resubscribed} times and repaired {gaps} BizId gaps;"
            f" {len(movers)} clients reconnecting during the outage saw closes"
            f" {dict(collections.Counter(str(code) for code in refused))}"
            f" and then {len(rewelcomes)} welcomes, all recovered=true;"
            f" last events delivered {delivery:.2f} s after the last publish; a client that left"
            f" during the outage read offline {left:.2f} s after the restart"
        )


async def test_redis_sigstop_beyond_canary_deadline_turns_unready_then_replays_the_gap(
    make_cluster: MakeCluster, own_redis: RedisServer
) -> None:
    """A hung Redis: /readyz 503 after the canary deadline; after SIGCONT every event arrives."""
    cluster = await make_cluster(3, redis_url=own_redis.url, **SETTINGS)
    ids = [f"hang-{i}" for i in range(CLIENTS)]
    async with Fleet({cid: cluster.lb_ws(cid) for cid in ids}) as fleet:
        await fleet.wait_connected()
        assert fleet.http is not None
        http = fleet.http
        async with TickPublisher(own_redis.url, ids, TICK) as publisher:
            await publisher.wait_ticks(3)
            # Stop Redis just before a tick: its publishes are sent to a hung Redis.
            await asyncio.sleep(publisher.tick_times[-1] + TICK - time.monotonic() - 20 * MS)
            before = publisher.total
            stopped_at = time.monotonic()
            own_redis.stop_process()
            unready = await _wait_ready(
                http, cluster, 503, 10_000 * MS, "/readyz 503 on every node"
            )
            # Stay hung a little past the moment the last node noticed.
            await asyncio.sleep(500 * MS)
            own_redis.continue_process()
            continued_at = time.monotonic()
            stopped_for = continued_at - stopped_at
            ticks_at_cont = publisher.ticks
            ready = await _wait_ready(http, cluster, 200, 20_000 * MS, "/readyz 200 on every node")
            await publisher.wait_ticks(3)
        delivery = await wait_delivered(fleet, publisher.accepted, 20_000 * MS)
        missing, wrong, examples = missing_and_extra(fleet, publisher.accepted)
        assert (missing, wrong) == (0, 0), examples
        assert all(not c.welcomes_after(stopped_at) for c in fleet), "a client was dropped"
        gaps = await _metrics(http, cluster, "relay_gaps_repaired_total")
        resubscribed = await _metrics(http, cluster, "relay_engine_reconnects_total")
        assert resubscribed >= 3, "every node should have replaced its deaf subscription"
        print(
            f"\nMEASURED Redis SIGSTOP: {CLIENTS} clients via nginx, Redis hung"
            f" {stopped_for:.2f} s; /readyz 503 on all 3 nodes {unready:.2f} s after SIGSTOP"
            f" (canary deadline 3 s), 200 again {ready:.2f} s after SIGCONT;"
            f" {publisher.total} events accepted ({before} before the stop, the tick in flight at"
            f" SIGSTOP and {publisher.ticks - ticks_at_cont} ticks after SIGCONT), 0 lost, 0 twice,"
            f" {fleet.duplicates} duplicates dropped by clients; {publisher.failures} publish"
            f" attempts raised PublishFailed and were retried with the same mid"
            f" ({publisher.duplicates} deduplicated by mid); nodes resubscribed {resubscribed}"
            f" times and repaired {gaps} BizId gaps from the streams; no client reconnected;"
            f" last events delivered {delivery:.2f} s after the last publish"
        )
