"""``relay serve --workers N``: N node processes on one port (SO_REUSEPORT), each its own node."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.cluster.support import API_KEY, Fleet, TickPublisher, get_json, readyz
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.timing import MS

RELAY = Path(sys.executable).with_name("relay")
CLIENTS = 50


async def test_workers_2_share_one_port_and_stop_together_on_sigterm(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Two workers on one port: both node ids in welcomes and /api/nodes; SIGTERM → exit 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    # heartbeat 5 s: node TTL 3 s, so the node hash (and its load) is refreshed every second.
    env.update(RELAY_DRAIN_GRACE="1", RELAY_API_KEY=API_KEY, RELAY_HEARTBEAT="5")
    log = (tmp_path / "workers.log").open("wb")
    parent = subprocess.Popen(
        [str(RELAY), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--node-id", "wk", "--redis-url", own_redis.url, "--allow-anonymous"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        ids = [f"w-{i}" for i in range(CLIENTS)]
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20_000 * MS
            while True:
                status, body = (0, {})
                if await readyz(http, base) == 200:
                    status, body = await get_json(http, f"{base}/api/nodes")
                if status == 200 and len(body["nodes"]) == 2:
                    break
                assert parent.poll() is None, (tmp_path / "workers.log").read_text()
                assert time.monotonic() < deadline, "two workers never registered"
                await asyncio.sleep(100 * MS)
            assert [n["node"] for n in body["nodes"]] == ["wk-w0", "wk-w1"]
            children = [
                int(pid)
                for pid in subprocess.run(
                    ["pgrep", "-P", str(parent.pid)], capture_output=True, text=True
                ).stdout.split()
            ]
            assert len(children) == 2
            async with Fleet({cid: f"ws://127.0.0.1:{port}/ws/{cid}" for cid in ids}) as fleet:
                await fleet.wait_connected()
                spread = fleet.by_node()
                assert set(spread) == {"wk-w0", "wk-w1"}, spread
                async with TickPublisher(own_redis.url, ids, 200 * MS) as publisher:
                    await publisher.wait_ticks(3)
                await fleet.wait(
                    lambda: all(len(c.seqs) == len(publisher.accepted[c.client_id]) for c in fleet),
                    10_000 * MS,
                    "every event",
                )
                assert all(c.seqs == publisher.accepted[c.client_id] for c in fleet)
                connections: dict[str, int] = {}
                deadline = time.monotonic() + 10_000 * MS
                while connections != spread:  # as of each worker's last heartbeat
                    assert time.monotonic() < deadline, f"/api/nodes says {connections}"
                    _, body = await get_json(http, f"{base}/api/nodes")
                    connections = {n["node"]: n["connections"] for n in body["nodes"]}
                    await asyncio.sleep(100 * MS)
                started = time.monotonic()
                parent.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(parent.wait, 20_000 * MS)
                stopped_after = time.monotonic() - started
                closes = {cl.code for c in fleet for cl in c.closes if cl.welcomed}
        assert code == 0, (tmp_path / "workers.log").read_text()[-3000:]
        assert closes == {1012}, closes
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
        print(
            f"\nMEASURED --workers 2: {CLIENTS} clients on one port spread {spread};"
            f" /api/nodes connections {connections}; {publisher.total} events delivered;"
            f" SIGTERM to the parent: both workers drained (1012) and the parent exited"
            f" {code} after {stopped_after:.2f} s"
        )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        log.close()
