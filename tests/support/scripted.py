"""A scripted fake node for client SDK tests: frames a real node never sends on demand.

Connection n plays script n: its frames, then a close with the script's code (or none:
it waits for the client to close). It records each handshake's query string, every
text frame the client sent (pings, acks), and the close code the client sent on each
connection — its answer to our close frame, or its own close; 1006 when no close frame
came.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

Script = tuple[list[dict[str, Any]], int | None]


class ScriptedNode:
    """Serves ``/ws/{client_id}`` on a free loopback port once ``server.start_server()`` ran."""

    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.queries: list[dict[str, str]] = []
        self.received: list[str] = []
        self.client_codes: list[int | None] = []
        app = web.Application()
        app.router.add_get("/ws/{client_id}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}"

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("relay.v1.json",))
        await ws.prepare(request)
        self.queries.append(dict(request.query))
        frames, code = self.scripts[min(len(self.queries), len(self.scripts)) - 1]
        for item in frames:
            await ws.send_str(orjson.dumps(item).decode())
        if code is not None:
            await ws.close(code=code, message=b"scripted")
        else:
            async for msg in ws:
                if isinstance(msg.data, str):
                    self.received.append(msg.data)
        self.client_codes.append(ws.close_code)
        return ws


def frame(sid: str) -> dict[str, Any]:
    """A message frame with id ``sid`` (its data is the id too)."""
    return {"type": "message", "id": sid, "biz_id": "c", "event": "e", "data": sid, "ts": 1.0}


def welcome(last_id: str, replayed: int = 0, **extra: Any) -> dict[str, Any]:
    return {"type": "welcome", "client_id": "c", "last_id": last_id, "replayed": replayed, **extra}


def overlapping_replay(first_close: int) -> list[Script]:
    """Two connections: 9-0 and 10-0 delivered, then a replay repeating them around 11-0,
    with 10-1 out of order, then 12-0. A client that compares ids as integer pairs hands
    over 9-0, 10-0, 11-0, 12-0 and drops three repeats."""
    return [
        ([welcome("5-0"), frame("9-0"), frame("10-0")], first_close),
        (
            [
                welcome("12-0", replayed=3, recovered=True),
                frame("9-0"),
                frame("10-0"),
                frame("11-0"),
                frame("10-1"),
                frame("12-0"),
            ],
            None,
        ),
    ]
