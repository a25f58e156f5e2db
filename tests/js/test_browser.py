"""relay-client.js in a real browser (Debian's Chromium, headless, driven by Playwright).

The page lives on another origin than the nodes and imports the module from the balancer's
``/client/relay-client.js`` (so CORS is exercised), fetches tokens from its own server,
and records what the client tells it. The nodes are real ``relay serve`` processes behind
nginx on a private Redis; drains and crashes are real signals. Each scenario publishes
numbered events while it disrupts the client and checks the page got each exactly once,
in order. Reconnect times are printed (``-s``) for the issue note.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.async_api import BrowserContext, Page

from backend_adapter import AsyncPublisher, issue_token
from tests.cluster.support import LocalCluster, TickPublisher
from tests.conftest import MS
from tests.js.conftest import SECRET, PageServer, wait_last_ack
from tests.support.node import Listener


async def open_page(
    context: BrowserContext,
    server: PageServer,
    cluster: LocalCluster,
    client_id: str,
    *,
    fmt: str = "json",
    store: bool = False,
    hang: int | None = None,
) -> Page:
    query = {
        "script": f"{cluster.lb_http}/client/relay-client.js",
        "url": f"ws://127.0.0.1:{cluster.lb_port}",
        "client": client_id,
        "format": fmt,
    }
    if store:
        query["store"] = "1"
    if hang is not None:
        query["hang"] = str(hang)
    page = await context.new_page()
    await page.goto(f"{server.origin}/page.html?{urlencode(query)}")
    await page.wait_for_function(
        "() => window.relay && (window.relay.ready || window.relay.errors.length)"
    )
    assert await state(page, "errors") == []
    return page


async def state(page: Page, key: str) -> Any:
    return await page.evaluate(f"() => window.relay.{key}")


async def wait_page(page: Page, condition: str, arg: Any = None, timeout: float = 30.0) -> None:
    """Wait for a JS condition on ``window.relay`` (``r``), e.g. ``r.welcomes.length >= 2``."""
    await page.wait_for_function(
        f"(arg) => {{ const r = window.relay; return {condition}; }}",
        arg=arg,
        timeout=timeout * 1000,
    )


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["data"]["seq"] for m in messages]


def node_index(node_id: str) -> int:
    return int(node_id.removeprefix("node"))


async def disrupt_while_publishing(
    page: Page, cluster: LocalCluster, client_id: str, sig: signal.Signals
) -> dict[str, Any]:
    """Publish ticks; signal the page's node mid-stream; all delivered once, in order."""
    await wait_page(page, "r.welcomes.length >= 1")
    first = (await state(page, "welcomes"))[0]
    async with TickPublisher(cluster.redis_url, [client_id], interval=0.02) as ticks:
        await ticks.wait_ticks(20)
        cluster.signal_node(node_index(first["node"]), sig)
        await wait_page(page, "r.welcomes.length >= 2")
        await ticks.wait_ticks(20)
    accepted = ticks.accepted[client_id]
    await wait_page(page, "r.messages.length >= arg", len(accepted))
    messages = await state(page, "messages")
    welcomes = await state(page, "welcomes")
    closes = await state(page, "closes")
    assert seqs(messages) == accepted  # nothing lost, nothing twice, in order
    second = welcomes[1]
    assert second["node"] != first["node"]
    assert second["recovered"] is True
    close = closes[0]
    reconnect_ms = second["at"] - close["at"]
    return {"close": close, "reconnect_ms": reconnect_ms, "events": len(accepted)}


async def test_browser_receives_in_order_from_a_module_imported_across_origins(
    context: BrowserContext, page_server: PageServer, cluster: LocalCluster
) -> None:
    """The page imports the node's module (CORS), connects with a token, gets events in order."""
    page = await open_page(context, page_server, cluster, "web-order")
    await wait_page(page, "r.welcomes.length >= 1")
    async with AsyncPublisher(cluster.redis_url) as publisher:
        ids = [(await publisher.publish("web-order", "tick", {"seq": n})).id for n in range(50)]
    await wait_page(page, "r.messages.length >= 50")
    messages = await state(page, "messages")
    assert [m["id"] for m in messages] == ids
    assert seqs(messages) == list(range(50))
    assert {(m["biz_id"], m["event"]) for m in messages} == {("web-order", "tick")}
    assert page_server.tokens_issued == 1
    await wait_last_ack(cluster, "web-order", ids[-1])  # acked once handled


async def test_browser_receives_msgpack_when_asked(
    context: BrowserContext, page_server: PageServer, cluster: LocalCluster
) -> None:
    """format "msgpack": binary frames decoded by the module's own decoder, same objects."""
    page = await open_page(context, page_server, cluster, "web-msgpack", fmt="msgpack")
    await wait_page(page, "r.welcomes.length >= 1")
    data = {"seq": 0, "name": "ü" * 40, "nested": [1, -2, 3.5, None, True, {"k": "v"}]}
    big = {"seq": 1, "text": "x" * 40000, "n": 2**40}
    async with AsyncPublisher(cluster.redis_url) as publisher:
        await publisher.publish("web-msgpack", "a", data)
        await publisher.publish("web-msgpack", "b", big)
    await wait_page(page, "r.messages.length >= 2")
    messages = await state(page, "messages")
    assert [m["data"] for m in messages] == [data, big]
    assert (await state(page, "welcomes"))[0]["type"] == "welcome"


@pytest.mark.parametrize(
    ("sig", "code", "limit_ms"),
    [(signal.SIGTERM, 1012, 5000), (signal.SIGKILL, 1006, 10000)],
    ids=["drain", "kill-9"],
)
async def test_browser_resumes_on_another_node_when_its_node_goes(
    context: BrowserContext,
    page_server: PageServer,
    cluster: LocalCluster,
    sig: signal.Signals,
    code: int,
    limit_ms: int,
) -> None:
    """SIGTERM (1012) or kill -9 (1006) of the page's node: back on the other node, none lost."""
    client_id = f"web-{sig.name.lower()}"
    page = await open_page(context, page_server, cluster, client_id)
    result = await disrupt_while_publishing(page, cluster, client_id, sig)
    assert result["close"]["code"] == code and result["close"]["willReconnect"] is True
    assert result["reconnect_ms"] < limit_ms
    print(
        f"\nbrowser {sig.name}: reconnected in {result['reconnect_ms']} ms, "
        f"{result['events']} events, 0 lost"
    )


async def test_browser_reload_resumes_from_the_stored_cursor(
    context: BrowserContext, page_server: PageServer, cluster: LocalCluster
) -> None:
    """localStorage keeps the cursor: the reopened page gets only what it missed, recovered."""
    page = await open_page(context, page_server, cluster, "web-reload", store=True)
    await wait_page(page, "r.welcomes.length >= 1")
    async with AsyncPublisher(cluster.redis_url) as publisher:
        for n in range(3):
            await publisher.publish("web-reload", "tick", {"seq": n})
        await wait_page(page, "r.messages.length >= 3")
        seen = await state(page, "messages")
        await page.goto("about:blank")  # the app is gone; the events go on
        missed = [
            (await publisher.publish("web-reload", "tick", {"seq": n})).id for n in range(3, 7)
        ]
    page = await open_page(context, page_server, cluster, "web-reload", store=True)
    await wait_page(page, "r.messages.length >= 4")
    welcome = (await state(page, "welcomes"))[0]
    assert welcome["recovered"] is True and welcome["replayed"] == 4
    messages = await state(page, "messages")
    assert [m["id"] for m in messages] == missed
    assert seqs(seen) == [0, 1, 2] and seqs(messages) == [3, 4, 5, 6]
    stored = await page.evaluate("() => window.relay.client.lastId")
    assert stored == missed[-1]


async def test_browser_cursor_moves_only_after_the_handler_returned(
    context: BrowserContext, page_server: PageServer, cluster: LocalCluster
) -> None:
    """A page closed while its handler was busy with an event gets that event again."""
    page = await open_page(context, page_server, cluster, "web-busy", store=True, hang=1)
    await wait_page(page, "r.welcomes.length >= 1")
    async with AsyncPublisher(cluster.redis_url) as publisher:
        ids = [(await publisher.publish("web-busy", "tick", {"seq": n})).id for n in range(3)]
    await wait_page(page, "r.messages.length >= 2")  # 0 handled, 1 stuck, 2 waiting its turn
    assert await page.evaluate("() => window.relay.client.lastId") == ids[0]
    assert seqs(await state(page, "messages")) == [0, 1]
    await page.goto("about:blank")
    page = await open_page(context, page_server, cluster, "web-busy", store=True)
    await wait_page(page, "r.messages.length >= 2")
    welcome = (await state(page, "welcomes"))[0]
    assert welcome["recovered"] is True and welcome["replayed"] == 2
    assert [m["id"] for m in await state(page, "messages")] == ids[1:]


async def test_browser_stops_for_good_when_replaced(
    context: BrowserContext, page_server: PageServer, cluster: LocalCluster
) -> None:
    """4000 (a newer session of the client_id): the page stops, and never takes it back."""
    page = await open_page(context, page_server, cluster, "web-4000")
    await wait_page(page, "r.welcomes.length >= 1")
    token = issue_token(SECRET, "web-4000", ttl=600)
    newer = Listener(f"{cluster.node_ws(1, 'web-4000')}?token={token}")
    await newer.connect()
    try:
        await wait_page(page, "r.closes.length >= 1")
        close = (await state(page, "closes"))[0]
        assert close["code"] == 4000 and close["willReconnect"] is False
        assert await page.evaluate("() => window.relay.client.stopped") is True
        # Had the page come back, the newer session would be replaced (4000) in turn.
        deadline = time.monotonic() + 1500 * MS
        while time.monotonic() < deadline:
            assert newer.close_code is None
            await asyncio.sleep(50 * MS)
        assert len(await state(page, "welcomes")) == 1
        assert len(await state(page, "closes")) == 1
    finally:
        await newer.close()
