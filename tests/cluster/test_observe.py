"""`relay tail` through the balancer: nginx forwards /observe/ like /ws/ (the shipped template)."""

from __future__ import annotations

import asyncio

from backend_adapter import AsyncPublisher
from relay.client import RelayClient
from tests.cluster.conftest import MakeCluster
from tests.cluster.support import API_KEY
from tests.support.tail import Tail
from tests.support.timing import MS


async def test_tail_through_nginx_leaves_the_client_connected(make_cluster: MakeCluster) -> None:
    """Client and `relay tail` both through nginx: both get every event; the client stays."""
    cluster = await make_cluster(2, heartbeat=5, drain_grace=1)
    lb = f"ws://127.0.0.1:{cluster.lb_port}"
    closes: list[int] = []
    async with RelayClient(
        lb, "lb-watched", on_close=lambda code, _: closes.append(code), backoff_base=0.05
    ) as client:
        await client.wait_connected()
        tail = await Tail.start("lb-watched", "--url", lb, "--api-key", API_KEY)
        try:
            async with asyncio.timeout(20_000 * MS):
                while not tail.welcomed():
                    await asyncio.sleep(20 * MS)
            async with AsyncPublisher(cluster.redis_url) as publisher:
                ids = [(await publisher.publish("lb-watched", "e", n)).id for n in range(3)]
            got = [(await asyncio.wait_for(client.__anext__(), 10_000 * MS)).id for _ in ids]
            async with asyncio.timeout(10_000 * MS):
                while len(tail.out) < len(ids):
                    await asyncio.sleep(20 * MS)
            assert got == ids and [line["id"] for line in tail.out] == ids
            assert client.connected and client.connects == 1 and closes == []
        finally:
            await tail.stop()
