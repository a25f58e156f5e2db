"""The status page: ``GET /`` (and ``/status``), the cluster as this node sees it, live.

The page itself is three static files shipped in the package (``relay/static/status.*``,
no build step, nothing from a CDN) and holds no data: anyone may load it. Its figures come
from ``GET /status/feed``, which needs the API key like ``/api/*`` and streams
``text/event-stream``: one snapshot a second, pushed by the node. The page reads it with
``fetch`` (``EventSource`` cannot send an Authorization header, and a key in a URL ends up
in proxies' logs).

However many pages are open, one sampler per node makes each snapshot (the registry's
node list, a PING and an INFO to Redis) and hands the same bytes to every page; a page
that reads slowly skips snapshots instead of queueing them. No page open, no sampling.
``--status-feeds`` bounds the pages open at once (0 turns the page off).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from relay.auth import api_key_matches
from relay.engine import EngineHealth, NodeInfo
from relay.errors import EngineError
from relay.metrics import RateMeter
from relay.node import Node
from relay.ws import NODE_KEY

__all__ = ["FEED_INTERVAL", "StatusFeed", "add_status_routes", "snapshot"]

FEED_INTERVAL: Final = 1.0  # seconds between two snapshots pushed to the open pages
_STATIC: Final = {
    "status.html": "text/html",
    "status.css": "text/css",
    "status.js": "text/javascript",
}
# The page runs only its own files: no inline script, nothing from elsewhere.
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

log = structlog.get_logger("relay.status")


def snapshot(
    node_id: str,
    live: NodeInfo,
    registry: list[NodeInfo] | None,
    health: EngineHealth,
    recent: list[dict[str, Any]],
    now: float,
) -> dict[str, Any]:
    """What one push of the feed says: nodes, totals, broker health, recent events.

    ``live`` is this node as measured now; it replaces this node's registry entry (which
    is up to one heartbeat old). ``registry`` None means the registry could not be read:
    this node is shown alone and ``registry_error`` says so.
    """
    others = [info for info in registry or [] if info.node != node_id]
    rows = []
    for info in sorted([live, *others], key=lambda n: n.node):
        rows.append({**info.to_dict(), "self": info.node == node_id})
    summed = ("connections", "messages_per_s", "events_per_s", "publishes_per_s")
    counted = ("gaps_repaired", "gaps_unrecoverable", "closed_4509")
    totals: dict[str, Any] = {name: sum(row[name] for row in rows) for name in summed + counted}
    for name in summed[1:]:
        totals[name] = round(totals[name], 2)
    totals["nodes"] = len(rows)
    totals["ready"] = sum(1 for row in rows if row["state"] == "ready")
    return {
        "at": now,
        "node": node_id,
        "nodes": rows,
        "totals": totals,
        "engine": dataclasses.asdict(health),
        "registry_error": registry is None,
        "recent": list(reversed(recent)),
    }


class StatusFeed:
    """One sampler for every open status page of a node; started by the first page."""

    def __init__(self, node: Node, interval: float = FEED_INTERVAL) -> None:
        self.node = node
        self.interval = interval
        self._pages: set[asyncio.Queue[bytes | None]] = set()
        self._sampler: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pages(self) -> int:
        return len(self._pages)

    def join(self) -> asyncio.Queue[bytes | None] | None:
        """A queue of snapshots for a new page, or None when ``--status-feeds`` are open."""
        if self._closed or len(self._pages) >= self.node.settings.status_feeds:
            return None
        page: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
        self._pages.add(page)
        if self._sampler is None or self._sampler.done():
            self._sampler = asyncio.get_running_loop().create_task(
                self._sample(), name=f"relay-status-{self.node.id}"
            )
        return page

    def leave(self, page: asyncio.Queue[bytes | None]) -> None:
        self._pages.discard(page)
        if not self._pages and self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None

    async def close(self) -> None:
        """End every page's stream (the node is stopping) and the sampler."""
        self._closed = True
        for page in self._pages:
            _offer(page, None)
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None

    async def _sample(self) -> None:
        rates = RateMeter(self.node.metrics)
        while True:
            began = time.monotonic()
            try:
                body = await self._snapshot(rates)
            except Exception as exc:  # a bug here must not end the feed of every page
                log.error("status.snapshot_failed", error=type(exc).__name__)
            else:
                for page in self._pages:
                    _offer(page, body)
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - began)))

    async def _snapshot(self, rates: RateMeter) -> bytes:
        node = self.node
        live = NodeInfo(
            node.id, len(node.sessions), node.started_at, time.time(), node.figures(rates)
        )
        health = await node.engine.health()
        registry: list[NodeInfo] | None
        try:
            registry = await node.engine.nodes() if health.reachable else None
        except EngineError:  # unreachable between the two calls: shown, not raised
            registry = None
        body = snapshot(node.id, live, registry, health, list(node.recent), time.time())
        return b"data: " + orjson.dumps(body) + b"\n\n"


def _offer(page: asyncio.Queue[bytes | None], item: bytes | None) -> None:
    """Put ``item`` in a one-slot queue, replacing what the page has not read yet."""
    if page.full():
        page.get_nowait()
    page.put_nowait(item)


FEED_KEY: Final = web.AppKey("relay_status_feed", StatusFeed)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


async def feed(request: web.Request) -> web.StreamResponse:
    """``text/event-stream`` of snapshots; the API key as ``Authorization: Bearer``."""
    status_feed = request.app[FEED_KEY]
    settings = status_feed.node.settings
    if not settings.status_feeds:
        raise web.HTTPNotFound()
    api_key = settings.api_key
    if not api_key:
        return _error(404, "api_disabled", "the status page needs an API key: --api-key")
    if not api_key_matches(request.headers.get("Authorization"), api_key):
        return _error(401, "unauthorized", "missing or wrong API key")
    page = status_feed.join()
    if page is None:
        return _error(503, "too_many_pages", "too many status pages open (--status-feeds)")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # nginx: pass each snapshot on at once
        }
    )
    try:
        await response.prepare(request)
        await response.write(b": relay status feed\n\n")
        while (body := await page.get()) is not None:
            await response.write(body)
    except ConnectionError:
        pass  # the page went away
    finally:
        status_feed.leave(page)
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _static_handler(name: str) -> Handler:
    body = (resources.files("relay") / "static" / name).read_bytes()
    headers = {
        "Content-Type": f"{_STATIC[name]}; charset=utf-8",
        "Cache-Control": "no-cache",
        "Content-Security-Policy": _CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    async def handler(request: web.Request) -> web.Response:
        if not request.app[FEED_KEY].node.settings.status_feeds:
            raise web.HTTPNotFound()
        return web.Response(body=body, headers=headers)

    return handler


def add_status_routes(app: web.Application) -> None:
    """``/``, ``/status``, its two assets and ``/status/feed`` on ``app`` (which has NODE_KEY)."""
    status_feed = StatusFeed(app[NODE_KEY])
    app[FEED_KEY] = status_feed
    page = _static_handler("status.html")
    app.router.add_get("/", page)
    app.router.add_get("/status", page)
    app.router.add_get("/status/status.css", _static_handler("status.css"))
    app.router.add_get("/status/status.js", _static_handler("status.js"))
    app.router.add_get("/status/feed", feed)

    async def close_feeds(app: web.Application) -> None:
        await status_feed.close()

    app.on_shutdown.append(close_feeds)
