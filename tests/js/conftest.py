"""The JavaScript client against real nodes: a real Chromium (Playwright) and Node 20 with ws.

Every test here runs a two-node cluster (deploy/local-cluster.sh: its own Redis, nginx
in front) with auth on, and a page server of its own on another origin that serves
tests/js/page.html and hands out tokens — what an app's backend does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from backend_adapter import issue_token
from tests.cluster.support import LocalCluster, get_json, nginx_available
from tests.support.ports import free_port
from tests.support.timing import MS

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SECRET = "js-client-tests-hs256-secret-of-32-bytes"
NODE = shutil.which("node") or "/usr/bin/node"
NPM = shutil.which("npm") or "/usr/bin/npm"


def chromium_available() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return os.access(CHROMIUM, os.X_OK)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests with a cluster need nginx; a browser needs Chromium; ``ws_dir`` node and npm."""
    for item in items:
        if HERE not in Path(str(item.fspath)).parents:
            continue
        fixtures = set(getattr(item, "fixturenames", ()))
        if "cluster" in fixtures:
            item.add_marker(pytest.mark.cluster)
            if not nginx_available():
                item.add_marker(pytest.mark.skip(reason="nginx is missing (.ci/run installs it)"))
        if "browser" in fixtures and not chromium_available():
            item.add_marker(
                pytest.mark.skip(reason="chromium or playwright missing (.ci/run installs them)")
            )
        node_tools = os.access(NODE, os.X_OK) and os.access(NPM, os.X_OK)
        if Path(str(item.fspath)).name == "test_node.py" and not node_tools:
            item.add_marker(
                pytest.mark.skip(reason="node and npm are missing (.ci/run installs them)")
            )


class PageServer:
    """The app's own web server: the test page, and a token endpoint (ttl adjustable)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.ttl = 3600
        self.valid = True  # False: hand out tokens no node accepts (4001)
        self.tokens_issued = 0
        self.runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> PageServer:
        app = web.Application()
        app.router.add_get("/page.html", self._page)
        app.router.add_get("/token", self._token)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=(HERE / "page.html").read_bytes(), content_type="text/html", charset="utf-8"
        )

    async def _token(self, request: web.Request) -> web.Response:
        self.tokens_issued += 1
        secret = SECRET if self.valid else "not-the-nodes-secret-but-32-bytes-long"
        return web.Response(text=issue_token(secret, request.query["client"], ttl=self.ttl))

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def wait_last_ack(cluster: LocalCluster, client_id: str, want: str) -> None:
    """Wait until the registry shows ``want`` as the client's last ack (through the balancer)."""
    url = f"{cluster.lb_http}/api/clients/{client_id}"
    async with aiohttp.ClientSession() as http, asyncio.timeout(10_000 * MS):
        while (await get_json(http, url))[1].get("last_ack") != want:
            await asyncio.sleep(50 * MS)


@pytest.fixture
async def page_server() -> AsyncIterator[PageServer]:
    server = await PageServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    """Redis + two nodes + nginx, tokens required, a 1 s drain and no token leeway."""
    started = LocalCluster(
        tmp_path / "cluster", 2, auth_secret=SECRET, drain_grace=1, heartbeat=5, token_leeway=0
    )
    await asyncio.to_thread(started.start)
    yield started
    await asyncio.to_thread(started.stop)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """One browser profile: its localStorage outlives a page of it."""
    ctx = await browser.new_context()
    yield ctx
    await ctx.close()


NOTES_DIR = Path(os.environ.get("RELAY_TEST_NOTES_DIR", "/work/notes"))


async def save_screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """Save a PNG of ``page`` under the test's tmp dir; copy it to NOTES_DIR if that exists."""
    target = tmp_path / name
    await page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 0
    if NOTES_DIR.is_dir():
        shutil.copyfile(target, NOTES_DIR / name)
    return target
