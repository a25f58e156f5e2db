"""examples/label_service, started as its README says, against a real node and Redis."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.node import Listener, NodeUnderTest, node_settings
from tests.support.ports import free_port, wait_port
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def relay(redis_server: RedisServer) -> AsyncIterator[NodeUnderTest]:
    node = await NodeUnderTest(node_settings(redis_url=redis_server.url)).start()
    yield node
    await node.stop()


@pytest.fixture
async def label_service(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[str]:
    """``python -m examples.label_service`` on a free port; yields its base URL."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "examples.label_service",
        "--db",
        f"sqlite:///{tmp_path / 'labels.db'}",
        "--redis-url",
        redis_server.url,
        "--port",
        str(port),
        cwd=ROOT,
    )
    try:
        await asyncio.to_thread(wait_port, port, 30.0)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 10)
    assert code == 0  # stopped cleanly: dispatcher thread joined, pool closed


async def test_example_label_service_events_reach_a_client(
    relay: NodeUnderTest, label_service: str
) -> None:
    """Create and delete a label over HTTP: the client gets both events, in order."""
    client = await Listener(relay.ws_url("cml")).connect()
    try:
        async with aiohttp.ClientSession(label_service) as http:
            async with http.post("/labels", json={"biz_id": "cml", "text": "hello"}) as resp:
                assert resp.status == 201
                label = await resp.json()
            async with http.post("/labels", json={"biz_id": "bad id!", "text": "x"}) as resp:
                assert resp.status == 400  # refused in the transaction: no label, no event
            async with http.delete(f"/labels/{label['id']}") as resp:
                assert resp.status == 200
            async with http.get("/labels", params={"biz_id": "cml"}) as resp:
                assert (await resp.json()) == {"labels": []}
        messages = await client.wait_messages(2)
    finally:
        await client.close()
    assert [(m["event"], m["data"]) for m in messages] == [
        ("label.created", {"id": label["id"], "biz_id": "cml", "text": "hello"}),
        ("label.deleted", {"id": label["id"], "biz_id": "cml"}),
    ]
