"""deploy/local-cluster.sh commands; the nginx template."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.cluster.support import API_KEY, ROOT, SCRIPT, LocalCluster, get_json, node_env
from tests.support.timing import MS

TEMPLATE = ROOT / "deploy" / "nginx" / "relay.conf.template"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_nginx_template_balances_websockets_with_timeouts_beyond_the_heartbeat() -> None:
    """least_conn, HTTP/1.1 upgrade headers, no buffering, read/send timeouts > 25 s heartbeat."""
    text = TEMPLATE.read_text()
    assert "least_conn;" in text
    assert "proxy_http_version 1.1;" in text
    assert re.search(r"map \$http_upgrade \$relay_connection", text)
    ws = text[text.index("location ~ ^/(ws|observe)/") :]
    ws = ws[: ws.index("}")]
    # A location with one proxy_set_header inherits none: the upgrade headers must be here.
    assert "proxy_set_header Upgrade $http_upgrade;" in ws
    assert "proxy_set_header Connection $relay_connection;" in ws
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in ws
    assert "proxy_set_header X-Relay-Lb-Retry 1;" in ws
    timeouts = re.findall(r"proxy_(?:read|send)_timeout (\d+)s;", ws)
    assert len(timeouts) == 2 and all(int(t) > 25 for t in timeouts)
    assert "proxy_buffering off;" in text


async def test_script_start_status_restart_a_node_and_stop(tmp_path: Path) -> None:
    """The script's own Redis, 2 nodes, nginx: every command does what its usage says."""
    cluster = LocalCluster(tmp_path / "c", 2, heartbeat=5, drain_grace=1)
    await asyncio.to_thread(cluster.start)
    try:
        conf = (cluster.dir / "nginx" / "relay.conf").read_text()
        assert "@@" not in conf
        assert conf.count(f"server 127.0.0.1:{cluster.node_port(1)} ") == 1
        assert conf.count(f"server 127.0.0.1:{cluster.node_port(2)} ") == 1
        status = await asyncio.to_thread(cluster.run, "status")
        assert status.stdout.count("running") == 4, status.stdout  # nginx, 2 nodes, redis
        assert status.stdout.count("/readyz 200") == 2
        pids = {name: cluster.pid(name) for name in ("nginx", "redis", "node1", "node2")}
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(cluster.lb_ws("script")) as ws:
                welcome = orjson.loads((await ws.receive(timeout=5000 * MS)).data)
                assert welcome["type"] == "welcome" and welcome["node"] in ("node1", "node2")
            code, body = await get_json(http, f"{cluster.lb_http}/api/nodes")
            assert code == 200 and [n["node"] for n in body["nodes"]] == ["node1", "node2"]
        # A second start in the same directory refuses.
        with pytest.raises(RuntimeError, match="already running"):
            await asyncio.to_thread(cluster.run, "start", "-n", "2", "--base-port", "20000")
        stopped = await asyncio.to_thread(cluster.run, "stop-node", "2")
        assert "node2 exited with code 0" in stopped.stdout
        assert not _alive(pids["node2"])
        status = await asyncio.to_thread(cluster.run, "status")
        assert "exited with code 0" in status.stdout
        await asyncio.to_thread(cluster.start_node, 2)
        assert cluster.pid("node2") != pids["node2"]
        pids["node2"] = cluster.pid("node2")
    finally:
        out = await asyncio.to_thread(cluster.stop)
    assert "node1 exited with code 0" in out and "node2 exited with code 0" in out, out
    assert [name for name, pid in pids.items() if _alive(pid)] == []
    status = subprocess.run(
        [str(SCRIPT), "status", "--dir", str(cluster.dir)],
        env=node_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert status.returncode != 0 and "running" not in status.stdout


def _cluster_base_port() -> int:
    """A base port whose balancer, node, six Redis Cluster ports and their cluster bus ports
    (+10000, kept below the kernel's ephemeral range) are all free."""
    for base in range(10_000 + (os.getpid() % 50) * 200, 22_000, 211):
        ports = [base, base + 1, base + 2, *range(base + 101, base + 107)]
        ports += [p + 10_000 for p in range(base + 101, base + 107)]
        try:
            for port in ports:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports for a local Redis Cluster")


async def test_script_redis_cluster_serves_nodes_end_to_end(tmp_path: Path) -> None:
    """`start --redis cluster` (make cluster REDIS=cluster) forms a 3-master/3-replica Redis
    Cluster with redis-cli and gives the nodes its redis+cluster:// URL: both nodes get
    ready, a client connected through the balancer receives an event published on the
    other node's API (sharded pub/sub, counted as one receiver), and `stop` stops all."""
    base = _cluster_base_port()
    args = ["--dir", str(tmp_path / "c"), "--base-port", str(base)]
    started = await asyncio.to_thread(
        subprocess.run,
        [str(SCRIPT), "start", "-n", "2", "--redis", "cluster", *args],
        capture_output=True,
        text=True,
        timeout=120_000 * MS,
        env=node_env(),
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        created = (tmp_path / "c" / "logs" / "redis-cluster-create.log").read_text()
        assert "[OK] All 16384 slots covered" in created
        assert created.count("Adding replica") == 3
        url = ",".join(f"127.0.0.1:{base + 100 + k}" for k in (1, 2, 3))
        assert f"redis+cluster://{url}" in (tmp_path / "c" / "cluster.env").read_text()
        status = await asyncio.to_thread(
            subprocess.run,
            [str(SCRIPT), "status", "--dir", str(tmp_path / "c")],
            capture_output=True,
            text=True,
            env=node_env(),
            check=False,
        )
        assert status.stdout.count("running") == 9, status.stdout  # nginx, 2 nodes, 6 redis
        assert status.stdout.count("/readyz 200") == 2
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{base}/ws/on-cluster") as ws,
        ):
            welcome = orjson.loads((await ws.receive(timeout=5000 * MS)).data)
            assert welcome["type"] == "welcome"
            other = 2 if welcome["node"] == "node1" else 1
            async with http.post(
                f"http://127.0.0.1:{base + other}/api/publish",
                json={"biz_id": "on-cluster", "event": "e", "data": {"n": 1}},
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as response:
                answer = await response.json()
            assert response.status == 200, answer
            assert answer["receivers"] == 1 and answer["online"] is True
            message = orjson.loads((await ws.receive(timeout=5000 * MS)).data)
            assert (message["id"], message["data"]) == (answer["id"], {"n": 1})
    finally:
        stopped = await asyncio.to_thread(
            subprocess.run,
            [str(SCRIPT), "stop", "--dir", str(tmp_path / "c")],
            capture_output=True,
            text=True,
            env=node_env(),
            check=False,
        )
    assert "node1 exited with code 0" in stopped.stdout, stopped.stdout
    for port in range(base + 101, base + 107):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"redis-server {port} still runs"
