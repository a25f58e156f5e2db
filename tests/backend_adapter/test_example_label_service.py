"""examples/label_service, started as its README says, against a real node and Redis."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from examples.label_service import app as label_app
from tests.conftest import MS
from tests.support.node import Listener, NodeUnderTest, node_settings
from tests.support.ports import free_port, wait_port
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
WAIT = 10_000 * MS


@pytest.fixture
async def relay(redis_server: RedisServer) -> AsyncIterator[NodeUnderTest]:
    node = await NodeUnderTest(node_settings(redis_url=redis_server.url)).start()
    yield node
    await node.stop()


@asynccontextmanager
async def running_service(redis_url: str, db: Path) -> AsyncIterator[str]:
    """``python -m examples.label_service`` on a free port; yields its base URL."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "examples.label_service",
        "--db",
        f"sqlite:///{db}",
        "--redis-url",
        redis_url,
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
        code = await asyncio.wait_for(proc.wait(), 10_000 * MS)
    assert code == 0  # stopped cleanly: dispatcher thread joined, pool closed


@pytest.fixture
async def label_service(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[str]:
    async with running_service(redis_server.url, tmp_path / "labels.db") as url:
        yield url


async def create_label(service: str, text: str) -> dict[str, Any]:
    body = {"biz_id": "cml", "text": text}
    async with aiohttp.ClientSession(service) as http, http.post("/labels", json=body) as resp:
        assert resp.status == 201
        label: dict[str, Any] = await resp.json()
        return label


async def test_example_label_service_events_reach_a_client(
    relay: NodeUnderTest, label_service: str
) -> None:
    """Create, move and delete a label over HTTP: the client gets the three events, in order."""
    client = await Listener(relay.ws_url("cml")).connect()
    try:
        async with aiohttp.ClientSession(label_service) as http:
            body = {"biz_id": "cml", "text": "hello", "x": 10, "y": 20}
            async with http.post("/labels", json=body) as resp:
                assert resp.status == 201
                label = await resp.json()
            async with http.post("/labels", json={"biz_id": "bad id!", "text": "x"}) as resp:
                assert resp.status == 400  # refused in the transaction: no label, no event
            async with http.patch(f"/labels/{label['id']}", json={"x": 30, "y": 40}) as resp:
                assert resp.status == 200
            async with http.patch("/labels/999", json={"x": 1, "y": 1}) as resp:
                assert resp.status == 404
            async with http.delete(f"/labels/{label['id']}") as resp:
                assert resp.status == 200
            async with http.get("/labels", params={"biz_id": "cml"}) as resp:
                assert (await resp.json()) == {"labels": []}
        messages = await client.wait_messages(3)
    finally:
        await client.close()
    hello = {"id": label["id"], "biz_id": "cml", "text": "hello"}
    assert [(m["event"], m["data"]) for m in messages] == [
        ("label.created", {**hello, "x": 10, "y": 20}),
        ("label.moved", {**hello, "x": 30, "y": 40}),
        ("label.deleted", {"id": label["id"], "biz_id": "cml"}),
    ]


def test_example_label_service_upgrades_a_database_without_positions(tmp_path: Path) -> None:
    """A labels.db of the version before positions: opened, its labels sit at 0,0 and move."""
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE labels (id INTEGER PRIMARY KEY, biz_id VARCHAR(128) NOT NULL,"
            " text VARCHAR(500) NOT NULL, created_at DATETIME DEFAULT CURRENT_TIMESTAMP)"
        )
        conn.execute("INSERT INTO labels (biz_id, text) VALUES ('cml', 'old label')")
    conn.close()
    engine = label_app.make_engine(f"sqlite:///{db}")
    try:
        assert label_app.list_labels(engine, "cml") == [
            {"id": 1, "biz_id": "cml", "text": "old label", "x": 0, "y": 0}
        ]
        moved = label_app.move_label(engine, 1, 5, 6)
        assert moved == {"id": 1, "biz_id": "cml", "text": "old label", "x": 5, "y": 6}
        assert label_app.list_labels(engine, "cml") == [moved]
    finally:
        engine.dispose()


async def test_example_label_service_survives_a_recreated_database(
    relay: NodeUnderTest, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Database deleted and created again: its labels (ids from 1 again) still reach the client."""
    db = tmp_path / "labels.db"
    client = await Listener(relay.ws_url("cml")).connect()
    try:
        async with running_service(redis_server.url, db) as service:
            first = [await create_label(service, f"first {n}") for n in range(2)]
            await client.wait_messages(2, timeout=WAIT)
        for path in tmp_path.glob("labels.db*"):  # the file and its WAL
            path.unlink()
        async with running_service(redis_server.url, db) as service:
            second = [await create_label(service, f"second {n}") for n in range(2)]
            messages = await client.wait_messages(4, timeout=WAIT)
    finally:
        await client.close()
    assert [label["id"] for label in second] == [label["id"] for label in first] == [1, 2]
    assert [m["data"] for m in messages] == [*first, *second]
