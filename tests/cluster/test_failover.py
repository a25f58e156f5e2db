"""A node dies (SIGKILL) or drains (SIGTERM) under load behind nginx: clients lose nothing.

Three relay processes, a real redis-server and a real nginx, all started by
deploy/local-cluster.sh. A few hundred clients connect through nginx, one event per client
per tick flows from backend_adapter.AsyncPublisher, and one node is killed or drained.
Every client reconnects through nginx, resumes with ``since`` and, after dropping repeats
by id, holds every accepted event exactly once and in order. The figures are printed.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time

import aiohttp
import pytest

from tests.cluster.conftest import MakeCluster
from tests.cluster.support import (
    Fleet,
    TickPublisher,
    get_json,
    missing_and_extra,
    readyz,
    wait_delivered,
)
from tests.support.timing import MS

CLIENTS = 300
TICK = 1000 * MS  # a second: CLIENTS events per second in all
SETTINGS = {"heartbeat": 5, "drain_grace": 3, "close_linger": 0.1}


def _summary(values: list[float]) -> str:
    values = sorted(values)
    if not values:
        return "n/a"
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"median {statistics.median(values):.3f} s, p99 {p99:.3f} s, max {values[-1]:.3f} s"


async def test_kill_9_one_of_three_nodes_clients_resume_through_nginx_without_loss(
    make_cluster: MakeCluster,
) -> None:
    """SIGKILL one of three nodes under load: its clients are back within seconds, nothing lost."""
    cluster = await make_cluster(3, **SETTINGS)
    ids = [f"kill-{i}" for i in range(CLIENTS)]
    async with Fleet({cid: cluster.lb_ws(cid) for cid in ids}) as fleet:
        connect_time = await fleet.wait_connected()
        spread = fleet.by_node()
        assert set(spread) == {"node1", "node2", "node3"}, spread
        async with TickPublisher(cluster.redis_url, ids, TICK) as publisher:
            await publisher.wait_ticks(2)
            victims = [c for c in fleet if c.node == "node2"]
            others = [c for c in fleet if c.node != "node2"]
            rss = cluster.rss_kb(2)
            # Kill just before a tick, so its events reach Redis while the victims are
            # away and must be replayed on resume.
            await publisher.wait_ticks(1)
            await asyncio.sleep(publisher.tick_times[-1] + TICK - time.monotonic() - 20 * MS)
            killed_at = time.monotonic()
            cluster.signal_node(2, signal.SIGKILL)
            reconnect = await fleet.wait(
                lambda: all(c.node not in (None, "node2") for c in victims),
                20_000 * MS,
                "the killed node's clients to be welcomed elsewhere",
            )
            per_client = [c.welcomes_after(killed_at)[0].at - killed_at for c in victims]
            await publisher.wait_ticks(3)
        delivery = await wait_delivered(fleet, publisher.accepted, 20_000 * MS)
        missing, wrong, examples = missing_and_extra(fleet, publisher.accepted)
        assert (missing, wrong) == (0, 0), examples
        assert all(c.node in ("node1", "node3") for c in fleet)
        assert all(not c.welcomes_after(killed_at) for c in others), "survivors' clients moved"
        rewelcomes = [w for c in victims for w in c.welcomes_after(killed_at)]
        assert all(w.recovered is True for w in rewelcomes)
        replayed = sum(w.replayed for w in rewelcomes)
        print(
            f"\nMEASURED kill -9: {CLIENTS} clients via nginx ({spread}),"
            f" connect {connect_time:.2f} s;"
            f" node2 (RSS {rss} kB) killed with {len(victims)} clients;"
            f" all re-welcomed {reconnect:.3f} s after the kill"
            f" (per client: {_summary(per_client)});"
            f" {publisher.total} events accepted, 0 lost, {fleet.duplicates} duplicates dropped"
            f" by the client, {replayed} replayed on resume, recovered=true on all"
            f" {len(rewelcomes)} re-welcomes; publish failures {publisher.failures};"
            f" last events delivered {delivery:.2f} s after the last publish;"
            f" now {fleet.by_node()}"
        )
    assert cluster.exit_code(2) == 128 + signal.SIGKILL


async def test_sigterm_drains_a_node_under_load_clients_resume_and_it_exits_0(
    make_cluster: MakeCluster,
) -> None:
    """SIGTERM: /readyz 503 at once, new sessions refused 1012, all closed 1012, exit 0, no loss."""
    cluster = await make_cluster(3, **SETTINGS)
    ids = [f"term-{i}" for i in range(CLIENTS)]
    async with Fleet({cid: cluster.lb_ws(cid) for cid in ids}) as fleet:
        connect_time = await fleet.wait_connected()
        spread = fleet.by_node()
        assert set(spread) == {"node1", "node2", "node3"}, spread
        assert fleet.http is not None
        http: aiohttp.ClientSession = fleet.http
        async with TickPublisher(cluster.redis_url, ids, TICK) as publisher:
            await publisher.wait_ticks(2)
            victims = [c for c in fleet if c.node == "node2"]
            others = [c for c in fleet if c.node != "node2"]
            rss = cluster.rss_kb(2)
            termed_at = time.monotonic()
            cluster.signal_node(2, signal.SIGTERM)
            while (status := await readyz(http, cluster.node_http(2))) == 200:
                assert time.monotonic() - termed_at < 2000 * MS, "readyz still 200"
                await asyncio.sleep(5 * MS)
            not_ready_after = time.monotonic() - termed_at
            assert status == 503
            # A new session straight to the draining node is refused with 1012; through a
            # balancer that retries (it says so in X-Relay-Lb-Retry) with HTTP 503.
            async with http.ws_connect(cluster.node_ws(2, "term-late")) as ws:
                msg = await ws.receive(timeout=5000 * MS)
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1012, msg
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(
                    cluster.node_ws(2, "term-late"), headers={"X-Relay-Lb-Retry": "1"}
                )
            assert refused.value.status == 503
            code = await cluster.wait_exit(2, SETTINGS["drain_grace"] + 10_000 * MS)
            exited_after = time.monotonic() - termed_at
            # Deregistered on the way out, not left to expire.
            _, body = await get_json(http, f"{cluster.node_http(1)}/api/nodes")
            assert [n["node"] for n in body["nodes"]] == ["node1", "node3"]
            await fleet.wait(
                lambda: all(c.node not in (None, "node2") for c in victims),
                20_000 * MS,
                "the drained node's clients to be welcomed elsewhere",
            )
            moved = max(c.welcomes_after(termed_at)[0].at for c in victims) - termed_at
            # Each client's own gap: from its 1012 to its welcome on another node.
            per_client = [
                c.welcomes_after(termed_at)[0].at
                - next(cl.at for cl in c.closes if cl.at >= termed_at and cl.welcomed)
                for c in victims
            ]
            await publisher.wait_ticks(2)
        delivery = await wait_delivered(fleet, publisher.accepted, 20_000 * MS)
        missing, wrong, examples = missing_and_extra(fleet, publisher.accepted)
        assert (missing, wrong) == (0, 0), examples
        assert code == 0, cluster.log("node2")[-3000:]
        closes = [cl for c in victims for cl in c.closes if cl.at >= termed_at]
        drained = [cl for cl in closes if cl.welcomed]
        bounced = [cl for cl in closes if not cl.welcomed]
        assert {cl.code for cl in drained} == {1012}, {cl.code for cl in drained}
        # Staggered: the closes spread over most of the grace period, not one burst.
        spread_s = max(cl.at for cl in drained) - min(cl.at for cl in drained)
        assert spread_s > 0.4 * SETTINGS["drain_grace"], spread_s
        assert all(not c.welcomes_after(termed_at) for c in others), "survivors' clients moved"
        rewelcomes = [w for c in victims for w in c.welcomes_after(termed_at)]
        assert all(w.recovered is True for w in rewelcomes)
        assert all(w.node != "node2" for w in rewelcomes)
        replayed = sum(w.replayed for w in rewelcomes)
        # nginx sends the handshakes the draining node answers 503 to the other nodes.
        assert not bounced, f"{len(bounced)} reconnects bounced off the draining node"
        print(
            f"\nMEASURED SIGTERM: {CLIENTS} clients via nginx ({spread}), connect"
            f" {connect_time:.2f} s; node2 drained {len(victims)} clients with"
            f" drain_grace={SETTINGS['drain_grace']} s (RSS {rss} kB): /readyz 503 after"
            f" {not_ready_after * 1000:.0f} ms, exit code {code} after {exited_after:.2f} s;"
            f" {len(drained)} sessions closed 1012 in batches spread over {spread_s:.2f} s,"
            f" {len(bounced)} reconnects refused"
            f" (closed without a welcome) on the way; last client re-welcomed {moved:.3f} s"
            f" after SIGTERM; from its 1012 to its next welcome per client: {_summary(per_client)};"
            f" {publisher.total} events accepted, 0 lost, {fleet.duplicates} duplicates dropped,"
            f" {replayed} replayed on resume;"
            f" last events delivered {delivery:.2f} s after the last publish;"
            f" now {fleet.by_node()}"
        )
