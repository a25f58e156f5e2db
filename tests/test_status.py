"""The status feed behind ``GET /``: bounded, keyed, ended with the node; its snapshot."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from relay.engine import EngineHealth, NodeFigures, NodeInfo
from relay.status import snapshot
from tests.conftest import MS
from tests.support.node import API_KEY, NodeUnderTest, start_node

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def read_event(resp: aiohttp.ClientResponse) -> bytes:
    """The next ``data:`` line of an event stream."""
    while True:
        line = await asyncio.wait_for(resp.content.readline(), 5000 * MS)
        assert line, "the stream ended"
        if line.startswith(b"data: "):
            return line


async def test_status_feed_pushes_snapshots_and_ends_with_the_node(
    started_nodes: list[NodeUnderTest],
) -> None:
    """Snapshots arrive about once a second; stopping the node ends the stream at once."""
    node = await start_node(started_nodes)
    async with (
        aiohttp.ClientSession(node.base, headers=AUTH) as http,
        http.get("/status/feed") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await read_event(resp)
        await read_event(resp)
        assert b'"node":"' + node.node.id.encode() in first
        began = time.monotonic()
        await node.stop()
        await asyncio.wait_for(resp.content.read(), 5000 * MS)  # to the end of the stream
        assert resp.content.at_eof()
        assert time.monotonic() - began < 3000 * MS  # not aiohttp's shutdown timeout


async def test_status_feeds_are_bounded_per_node(started_nodes: list[NodeUnderTest]) -> None:
    """Past --status-feeds open pages a new feed gets 503; a page that leaves frees its place."""
    node = await start_node(started_nodes, status_feeds=1)
    async with aiohttp.ClientSession(node.base, headers=AUTH) as http:
        async with http.get("/status/feed") as first:
            await read_event(first)
            async with http.get("/status/feed") as second:
                assert second.status == 503
                assert (await second.json())["error"]["code"] == "too_many_pages"
        deadline = time.monotonic() + 5000 * MS
        while True:
            async with http.get("/status/feed") as again:
                if again.status == 200:
                    await read_event(again)
                    break
            assert time.monotonic() < deadline, "the closed page's place was never freed"
            await asyncio.sleep(50 * MS)


async def test_status_page_off_with_zero_feeds(started_nodes: list[NodeUnderTest]) -> None:
    """--status-feeds 0: no page, no feed (404); health stays."""
    node = await start_node(started_nodes, status_feeds=0)
    async with aiohttp.ClientSession(node.base, headers=AUTH) as http:
        for path in ("/", "/status", "/status/status.js", "/status/feed"):
            async with http.get(path) as resp:
                assert resp.status == 404
        async with http.get("/healthz") as resp:
            assert resp.status == 200


def test_status_snapshot_without_registry_shows_this_node_alone() -> None:
    """Registry unreadable: this node's live figures alone, and the page is told why."""
    me = NodeInfo("a", 3, 1.0, 9.0, NodeFigures(address="h:1", messages_per_s=2.5))
    down = EngineHealth("redis", False, False, error="redis unreachable")
    body = snapshot("a", me, None, down, [{"ts": 5.0, "kind": "gap.repaired"}], 9.0)
    assert [row["node"] for row in body["nodes"]] == ["a"]
    assert body["registry_error"] is True
    assert body["totals"]["messages_per_s"] == 2.5
    assert body["engine"]["error"] == "redis unreachable"


def test_status_snapshot_prefers_live_figures_for_this_node() -> None:
    """This node's registry entry (a heartbeat old) is replaced by its live figures."""
    stale = NodeInfo("a", 1, 1.0, 5.0, NodeFigures(state="ready"))
    other = NodeInfo("b", 4, 2.0, 8.5, NodeFigures(state="draining", publishes_per_s=1.5))
    live = NodeInfo("a", 2, 1.0, 9.0, NodeFigures(state="ready", publishes_per_s=0.5))
    up = EngineHealth("redis", True, True, latency_ms=0.2)
    recent = [{"ts": 1.0, "kind": "gap.repaired"}, {"ts": 2.0, "kind": "node.draining"}]
    body = snapshot("a", live, [other, stale], up, recent, 9.0)
    assert [(r["node"], r["connections"], r["self"]) for r in body["nodes"]] == [
        ("a", 2, True),
        ("b", 4, False),
    ]
    assert (body["totals"]["connections"], body["totals"]["publishes_per_s"]) == (6, 2.0)
    assert (body["totals"]["nodes"], body["totals"]["ready"]) == (2, 1)
    assert [e["kind"] for e in body["recent"]] == ["node.draining", "gap.repaired"]
