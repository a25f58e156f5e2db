"""Session routing across nodes: one live session per client_id, the registry, the APIs, the CLI.

Clients connect straight to the node ports here (not through nginx), to pick the nodes.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import orjson

from backend_adapter import AsyncPublisher
from tests.cluster.conftest import MakeCluster
from tests.cluster.support import API_KEY, LocalCluster, get_json, relay_cli
from tests.support.timing import MS

SETTINGS = {"heartbeat": 5, "drain_grace": 1, "close_linger": 0.05}


class Conn:
    """One raw WebSocket: its welcome, its messages and its close code."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.welcome: dict[str, Any] = {}
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.closed_at = 0.0
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self.welcomed = asyncio.Event()
        self.closed = asyncio.Event()

    async def open(self) -> Conn:
        self.ws = await self.http.ws_connect(self.url)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            frame = orjson.loads(msg.data)
            if frame["type"] == "welcome":
                self.welcome = frame
                self.welcomed.set()
            elif frame["type"] == "message":
                self.messages.append(frame)
        self.close_code = self.ws.close_code
        self.closed_at = time.monotonic()
        self.closed.set()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._task is not None:
            await self._task


async def _status_everywhere(
    http: aiohttp.ClientSession, cluster: LocalCluster, client_id: str
) -> list[dict[str, Any]]:
    """GET /api/clients/{id} on every node and through nginx."""
    bases = [cluster.node_http(k) for k in range(1, cluster.nodes + 1)] + [cluster.lb_http]
    answers = []
    for base in bases:
        status, body = await get_json(http, f"{base}/api/clients/{client_id}")
        assert status == 200, body
        answers.append(body)
    return answers


async def _cli_clients(cluster: LocalCluster, client_id: str) -> dict[str, Any]:
    code, out, err = await relay_cli("clients", client_id, "--redis-url", cluster.redis_url)
    assert code == 0, err
    result: dict[str, Any] = orjson.loads(out)  # stdout is the JSON line and nothing else
    return result


async def test_same_client_on_two_nodes_older_gets_4000_registry_names_the_survivor(
    make_cluster: MakeCluster,
) -> None:
    """node1 then node2 for one client_id: node1's session closes 4000; every view says node2."""
    cluster = await make_cluster(3, **SETTINGS)
    async with aiohttp.ClientSession() as http, AsyncPublisher(cluster.redis_url) as publisher:
        older = await Conn(http, cluster.node_ws(1, "dup")).open()
        await asyncio.wait_for(older.welcomed.wait(), 5000 * MS)
        assert older.welcome["node"] == "node1"
        assert await publisher.is_online("dup")
        newer = await Conn(http, cluster.node_ws(2, "dup")).open()
        await asyncio.wait_for(newer.welcomed.wait(), 5000 * MS)
        welcomed_at = time.monotonic()
        await asyncio.wait_for(older.closed.wait(), 3000 * MS)
        kicked_after = older.closed_at - welcomed_at
        assert older.close_code == 4000
        assert newer.welcome["node"] == "node2"
        # Give node1 time to run its (fenced) release of the older session, then look.
        await asyncio.sleep(500 * MS)
        session = newer.welcome["session"]
        for body in await _status_everywhere(http, cluster, "dup"):
            assert (body["online"], body["node"], body["session"]) == (True, "node2", session)
        cli = await _cli_clients(cluster, "dup")
        assert (cli["online"], cli["node"], cli["session"]) == (True, "node2", session)
        assert await publisher.is_online("dup")
        result = await publisher.publish("dup", "e", {"to": "newer"})
        assert (result.online, result.receivers) == (True, 1)  # node1 unsubscribed
        await asyncio.sleep(300 * MS)
        assert [m["data"] for m in newer.messages] == [{"to": "newer"}]
        assert older.messages == []
        # DELETE on a third node kicks the session on node2.
        async with http.delete(
            f"{cluster.node_http(3)}/api/clients/dup",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as response:
            assert response.status == 200
        await asyncio.wait_for(newer.closed.wait(), 3000 * MS)
        assert newer.close_code == 4000
        deadline = time.monotonic() + 3000 * MS
        while await publisher.is_online("dup"):
            assert time.monotonic() < deadline
            await asyncio.sleep(50 * MS)
        assert not (await _cli_clients(cluster, "dup"))["online"]
        await older.close()
        await newer.close()
    print(
        f"\nMEASURED duplicate client_id: the older session (node1) got 4000"
        f" {kicked_after * 1000:.0f} ms after the newer (node2) was welcomed; /api/clients on"
        f" 3 nodes + nginx, `relay clients` and is_online all named node2"
    )


async def test_simultaneous_connects_on_two_nodes_leave_exactly_one_survivor(
    make_cluster: MakeCluster,
) -> None:
    """One client_id connecting to node1 and node2 at the same instant, 20 times: one survives."""
    cluster = await make_cluster(2, **SETTINGS)
    rounds = 20
    survivors_by_node: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        conns: list[tuple[str, Conn, Conn]] = []
        for i in range(rounds):
            cid = f"race-{i}"
            a, b = Conn(http, cluster.node_ws(1, cid)), Conn(http, cluster.node_ws(2, cid))
            await asyncio.gather(a.open(), b.open())
            conns.append((cid, a, b))
        deadline = time.monotonic() + 5000 * MS
        while not all(a.closed.is_set() or b.closed.is_set() for _, a, b in conns):
            assert time.monotonic() < deadline, "a round still has two sessions"
            await asyncio.sleep(20 * MS)
        await asyncio.sleep(500 * MS)  # late releases and kicks have landed
        for cid, a, b in conns:
            alive = [c for c in (a, b) if not c.closed.is_set()]
            dead = [c for c in (a, b) if c.closed.is_set()]
            assert len(alive) == 1, (cid, a.close_code, b.close_code)
            assert dead[0].close_code == 4000
            survivor = alive[0]
            await asyncio.wait_for(survivor.welcomed.wait(), 2000 * MS)
            body = (await _status_everywhere(http, cluster, cid))[0]
            assert (body["online"], body["node"], body["session"]) == (
                True,
                survivor.welcome["node"],
                survivor.welcome["session"],
            )
            survivors_by_node[body["node"]] = survivors_by_node.get(body["node"], 0) + 1
        await asyncio.gather(*(c.close() for _, a, b in conns for c in (a, b)))
    print(
        f"\nMEASURED simultaneous connects: {rounds} rounds on node1+node2, exactly one"
        f" survivor each (closed 4000: the other), registry = survivor; survivors by node"
        f" {dict(sorted(survivors_by_node.items()))}"
    )


async def test_duplicates_allow_fans_out_across_nodes(make_cluster: MakeCluster) -> None:
    """--duplicates allow: sessions of one client_id on two nodes both get every event."""
    cluster = await make_cluster(2, duplicates="allow", **SETTINGS)
    async with aiohttp.ClientSession() as http, AsyncPublisher(cluster.redis_url) as publisher:
        one = await Conn(http, cluster.node_ws(1, "fan")).open()
        two = await Conn(http, cluster.node_ws(2, "fan")).open()
        await asyncio.gather(one.welcomed.wait(), two.welcomed.wait())
        results = [await publisher.publish("fan", "e", {"seq": seq}) for seq in range(5)]
        assert {r.receivers for r in results} == {2}
        deadline = time.monotonic() + 3000 * MS
        while len(one.messages) < 5 or len(two.messages) < 5:
            assert time.monotonic() < deadline, (len(one.messages), len(two.messages))
            await asyncio.sleep(20 * MS)
        for conn in (one, two):
            assert [m["data"]["seq"] for m in conn.messages] == list(range(5))
        assert not one.closed.is_set() and not two.closed.is_set()
        await one.close()
        await two.close()


async def test_client_of_a_dead_node_goes_offline_when_its_node_key_expires(
    make_cluster: MakeCluster,
) -> None:
    """Liveness comes from the node key: kill -9 its node, the client is offline after the TTL."""
    cluster = await make_cluster(2, **SETTINGS)
    async with aiohttp.ClientSession() as http, AsyncPublisher(cluster.redis_url) as publisher:
        ghost = await Conn(http, cluster.node_ws(2, "ghost")).open()
        await asyncio.wait_for(ghost.welcomed.wait(), 5000 * MS)
        assert (await _status_everywhere(http, cluster, "ghost"))[0]["online"]
        cluster.signal_node(2, signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.wait_for(ghost.closed.wait(), 5000 * MS)
        while await publisher.is_online("ghost"):
            assert time.monotonic() - killed_at < 10_000 * MS, (
                "still online 10 s after its node died"
            )
            await asyncio.sleep(100 * MS)
        offline_after = time.monotonic() - killed_at
        status, body = await get_json(http, f"{cluster.node_http(1)}/api/clients/ghost")
        assert (status, body["online"], body["node"]) == (200, False, "node2")
        status, body = await get_json(http, f"{cluster.node_http(1)}/api/nodes")
        assert [n["node"] for n in body["nodes"]] == ["node1"]
        cli = await relay_cli("nodes", "--redis-url", cluster.redis_url)
        assert cli[0] == 0 and [n["node"] for n in orjson.loads(cli[1])["nodes"]] == ["node1"]
        await ghost.close()
    print(
        f"\nMEASURED node death: a client of the killed node read offline (is_online,"
        f" /api/clients) {offline_after:.2f} s after kill -9 (node TTL 3 s with heartbeat 5 s);"
        f" /api/nodes and `relay nodes` list node1 only"
    )


async def test_duplicates_allow_client_stays_online_while_a_session_lives_elsewhere(
    make_cluster: MakeCluster,
) -> None:
    """--duplicates allow: closing the session on node2 leaves the one on node1 online."""
    cluster = await make_cluster(2, duplicates="allow", **SETTINGS)
    async with aiohttp.ClientSession() as http, AsyncPublisher(cluster.redis_url) as publisher:
        one = await Conn(http, cluster.node_ws(1, "fan2")).open()
        await asyncio.wait_for(one.welcomed.wait(), 5000 * MS)
        two = await Conn(http, cluster.node_ws(2, "fan2")).open()
        await asyncio.wait_for(two.welcomed.wait(), 5000 * MS)
        await two.close()
        await asyncio.sleep(300 * MS)
        try:
            assert not one.closed.is_set()
            assert await publisher.is_online("fan2")
        finally:
            await one.close()
