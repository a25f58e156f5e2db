"""The status page (``GET /``) in a real Chromium, against two real nodes on one Redis.

What an operator does: open a node's address, type the API key, and watch the cluster:
both nodes listed with their address and state, figures that move when clients connect
and events are published. A wrong key is refused. The screenshot is for the docs' readers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from playwright.async_api import BrowserContext, Page

from tests.conftest import MS
from tests.js.conftest import save_screenshot
from tests.support.node import API_KEY, Listener, NodeUnderTest, listen, start_node
from tests.support.redis_server import RedisServer

WAIT = 15_000 * MS


async def snapshot(page: Page) -> Any:
    """The page's table and tiles as the operator reads them."""
    return await page.evaluate(
        """() => ({
          nodes: [...document.querySelectorAll('#nodes tbody tr')].map((r) => ({
            node: r.dataset.node, state: r.dataset.state,
            cells: [...r.cells].map((c) => c.textContent),
          })),
          connections: document.querySelector('#t-connections').textContent,
          publishes: document.querySelector('#t-publishes').textContent,
          messages: document.querySelector('#t-messages').textContent,
          link: document.querySelector('#link').dataset.state,
        })"""
    )


async def wait_page(page: Page, condition: str) -> None:
    await page.wait_for_function(condition, timeout=WAIT * 1000)


async def publish_burst(node: NodeUnderTest, biz_ids: list[str], seconds: float) -> int:
    """Publish through the node's HTTP API for ``seconds``; returns how many."""
    sent = 0
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(node.base, headers=headers) as http:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            for biz_id in biz_ids:
                body = {"biz_id": biz_id, "event": "tick", "data": {"n": sent}}
                async with http.post("/api/publish", json=body) as resp:
                    assert resp.status == 200
                sent += 1
            await asyncio.sleep(0.01)
    return sent


async def test_status_page_shows_two_live_nodes_after_login(
    context: BrowserContext,
    redis_server: RedisServer,
    started_nodes: list[NodeUnderTest],
    listeners: list[Listener],
    tmp_path: Path,
) -> None:
    """Wrong key refused; right key: both nodes, ready, with figures that follow the traffic
    and the gaps a lost live feed caused."""
    a = await start_node(started_nodes, redis_url=redis_server.url, node_id="status-a")
    b = await start_node(started_nodes, redis_url=redis_server.url, node_id="status-b")
    page = await context.new_page()
    await page.goto(f"{a.base}/")
    await page.wait_for_selector("#login:not([hidden])")

    await page.fill("#api-key", "not-the-key")
    await page.click("#login-form button[type=submit]")
    await wait_page(page, "() => document.querySelector('#login-error').textContent !== ''")
    assert await page.text_content("#login-error") == "Wrong API key."
    assert await page.is_hidden("#main")

    await page.fill("#api-key", API_KEY)
    await page.click("#login-form button[type=submit]")
    await wait_page(page, "() => document.querySelectorAll('#nodes tbody tr').length === 2")
    seen = await snapshot(page)
    assert [(n["node"], n["state"]) for n in seen["nodes"]] == [
        ("status-a", "ready"),
        ("status-b", "ready"),
    ]
    row_a, row_b = (n["cells"] for n in seen["nodes"])
    assert row_a[0] == "status-athis" and row_b[0] == "status-b"  # "this" marks node a
    assert (row_a[1], row_b[1]) == (a.node.address, b.node.address)
    assert seen["connections"] == "0" and seen["link"] == "live"

    # Clients on both nodes, events published through node a: the page follows.
    await listen(listeners, a.ws_url("desk-a"))
    await listen(listeners, b.ws_url("desk-b"))
    sent = await publish_burst(a, ["desk-a", "desk-b"], 3.0)
    assert sent > 20
    await wait_page(
        page,
        """() => {
          const rows = [...document.querySelectorAll('#nodes tbody tr')];
          const cell = (r, cls) => r.querySelector('td.' + cls).textContent;
          return document.querySelector('#t-connections').textContent === '2'
            && rows.every((r) => cell(r, 'conns') === '1')
            && rows.every((r) => parseFloat(cell(r, 'msgs')) > 0)
            && parseFloat(cell(rows[0], 'pubs')) > 0
            && parseFloat(document.querySelector('#t-publishes').textContent) > 0;
        }""",
    )

    # Redis cuts both nodes' live feeds: each resubscribes and fills the gap from history.
    # The page lists what its node did, newest first.
    raw = aioredis.from_url(redis_server.url)
    try:
        await raw.client_kill_filter(_type="pubsub")
    finally:
        await raw.aclose()
    await wait_page(
        page,
        """() => {
          const kinds = [...document.querySelectorAll('#recent .kind')].map((k) => k.textContent);
          return kinds.includes('engine.resubscribed') && kinds.includes('gap.repaired');
        }""",
    )
    assert await page.is_hidden("#recent-empty")
    await save_screenshot(page, tmp_path, "status-page.png")

    # The key is kept for the tab: a reload goes straight to the figures.
    await page.reload()
    await wait_page(page, "() => document.querySelectorAll('#nodes tbody tr').length === 2")
    assert await page.is_hidden("#login")


async def test_status_feed_refuses_a_wrong_key(started_nodes: list[NodeUnderTest]) -> None:
    """/status/feed: 401 without the key or with a wrong one; the page shell needs none."""
    node = await start_node(started_nodes)
    async with aiohttp.ClientSession(node.base) as http:
        async with http.get("/") as resp:
            assert resp.status == 200
            assert "Relay status" in await resp.text()
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.get("/status/feed", headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthorized"
