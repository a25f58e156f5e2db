"""A real node in the test's event loop on a free port, and a recording WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

import aiohttp
import msgpack
import orjson
from aiohttp import web

from relay.app import EDGE_KEY, NODE_KEY, create_app, listening_socket
from relay.config import Settings
from relay.edge import Edge
from relay.engine import Engine
from relay.node import Node
from tests.support.ports import free_port
from tests.support.timing import MS

API_KEY = "test-api-key"

DEFLATE = os.environ.get("RELAY_TEST_DEFLATE") == "1"
"""The compressed pass of ``make test``: nodes answer permessage-deflate and compress every
frame (``--compress-min-size 0``), and every aiohttp client of the tests offers it (the
``deflate_offered`` fixture of tests/conftest.py)."""


def node_settings(**overrides: Any) -> Settings:
    """Settings for a node under test: anonymous, fast closes, short grace."""
    base = Settings(
        host="127.0.0.1",
        port=free_port(),
        allow_anonymous=True,
        api_key=API_KEY,
        close_linger=0.0,
        close_flush_timeout=0.5,
        drain_grace=0.5,
        heartbeat=5.0,
        node_id=f"test-{free_port()}",
        compress=DEFLATE,
        compress_min_size=0 if DEFLATE else 256,
    )
    return replace(base, **overrides)


class NodeUnderTest:
    """One node on 127.0.0.1 in the current loop.

    ``server="edge"`` listens like ``relay serve`` (the edge, aiohttp for the rest);
    ``server="aiohttp"`` serves the Application with aiohttp alone (as when the app is
    mounted elsewhere): every WebSocket first reaches aiohttp's route, which hands the
    socket to the edge (relay.edge.adopt), the one WebSocket server.
    """

    def __init__(
        self, settings: Settings, engine: Engine | None = None, *, server: str = "edge"
    ) -> None:
        assert server in ("edge", "aiohttp")
        self.settings = settings
        self.server = server
        self.app = create_app(settings, engine)
        self.runner: web.AppRunner | None = None
        self.edge: Edge | None = None

    @property
    def node(self) -> Node:
        return self.app[NODE_KEY]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def ws_url(self, client_id: str, **query: str) -> str:
        qs = f"?{urlencode(query)}" if query else ""
        return f"ws://127.0.0.1:{self.settings.port}/ws/{client_id}{qs}"

    async def start(self) -> NodeUnderTest:
        self.runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        assert self.runner.server is not None
        sock = listening_socket("127.0.0.1", self.settings.port, False)
        self.edge = self.app[EDGE_KEY]
        if self.server == "aiohttp":
            # aiohttp alone: every WebSocket reaches its route and is handed to the edge.
            await web.SockSite(self.runner, sock).start()
            return self
        # The listener `relay serve` uses: WebSocket upgrades on the edge, the rest aiohttp.
        await self.edge.listen(sock, self.runner.server)
        return self

    async def stop(self) -> None:
        if self.edge is not None:
            self.edge.stop_listening()
        if self.runner is not None:
            await self.runner.cleanup()  # drains the node: its sessions close 1012
            self.runner = None
        if self.edge is not None:
            await self.edge.close()
            self.edge = None

    async def publish(self, biz_id: str, event: str, data: Any, mid: str | None = None) -> Any:
        return await self.node.publish(biz_id, event, data, mid=mid)


async def start_node(
    started: list[NodeUnderTest], server: str = "edge", **overrides: Any
) -> NodeUnderTest:
    """Start a node with ``node_settings(**overrides)`` on ``server``; append it to
    ``started`` (the ``started_nodes`` fixture stops them at the end of the test)."""
    node = await NodeUnderTest(node_settings(**overrides), server=server).start()
    started.append(node)
    return node


class Listener:
    """A WebSocket client that records every frame and the close code."""

    def __init__(self, url: str, *, fmt: str = "json", protocols: tuple[str, ...] = ()) -> None:
        self.url = url
        self.fmt = fmt
        self.protocols = protocols
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "message"]

    @property
    def welcome(self) -> dict[str, Any]:
        return self.frames[0]

    async def connect(self, wait_welcome: bool = True) -> Listener:
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(
            self.url, protocols=self.protocols, autoping=True, autoclose=False
        )
        # The compressed pass must really compress: a node that did not agree fails here.
        assert self.ws.compress or not DEFLATE, "permessage-deflate was not negotiated"
        self._task = asyncio.get_running_loop().create_task(self._read())
        if wait_welcome:
            await self.wait_for(lambda: bool(self.frames) or self.close_code is not None)
        return self

    async def _read(self) -> None:
        assert self.ws is not None
        # Not `async for`: it stops before yielding the CLOSE message, losing the reason.
        while True:
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(orjson.loads(msg.data))
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self.frames.append(msgpack.unpackb(msg.data, raw=False))
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                self.close_code, self.close_reason = msg.data, msg.extra or ""
                break
            elif msg.type in (
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                break
            self._changed.set()
        await self.ws.close()
        if self.close_code is None:
            self.close_code = self.ws.close_code
        self._changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 5000 * MS) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()
            if predicate():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"condition not met; frames={len(self.frames)} close={self.close_code}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_messages(self, count: int, timeout: float = 5000 * MS) -> list[dict[str, Any]]:
        await self.wait_for(lambda: len(self.messages) >= count, timeout)
        return self.messages

    async def wait_closed(self, timeout: float = 5000 * MS) -> int | None:
        await self.wait_for(lambda: self.close_code is not None, timeout)
        return self.close_code

    async def send(self, data: Any) -> None:
        assert self.ws is not None
        if self.fmt == "msgpack":
            await self.ws.send_bytes(msgpack.packb(data))
        else:
            await self.ws.send_str(orjson.dumps(data).decode())

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self.http is not None:
            await self.http.close()


async def listen(opened: list[Listener], url: str, **kwargs: Any) -> Listener:
    """Connect a Listener that the ``listeners`` fixture closes at the end of the test."""
    listener = Listener(url, **kwargs)
    opened.append(listener)
    return await listener.connect()
