"""Handshakes to a node whose Redis is gone or hung are answered at once, never left waiting.

A real redis-server, killed or SIGSTOPped under an in-process node. Without a retrying
balancer the client gets 101 and close 1013 (back off, retry); with ``X-Relay-Lb-Retry``
it gets HTTP 503 so the balancer tries another node.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from relay.protocol import CloseCode
from tests.support.node import NodeUnderTest, node_settings
from tests.support.redis_server import RedisServer
from tests.support.timing import MS

LB_HEADERS = {"X-Relay-Lb-Retry": "1"}


async def _handshake(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[str, float]:
    """What the handshake ended in (``close <code>``, ``HTTP <status>``, ``welcome``), and when."""
    began = time.monotonic()
    try:
        async with http.ws_connect(url, headers=headers or {}) as ws:
            msg = await ws.receive(timeout=20_000 * MS)
            outcome = "welcome" if msg.type == aiohttp.WSMsgType.TEXT else f"close {ws.close_code}"
    except aiohttp.WSServerHandshakeError as exc:
        outcome = f"HTTP {exc.status}"
    return outcome, time.monotonic() - began


async def test_handshake_during_redis_stall_gets_1013_once_the_canary_misses(
    own_redis: RedisServer, started_nodes: list[NodeUnderTest]
) -> None:
    """Redis SIGSTOPped: a handshake waiting on it is closed 1013 when the canary misses
    (3 s), not after the command and release timeouts; later ones are answered at once."""
    node = await NodeUnderTest(node_settings(redis_url=own_redis.url)).start()
    started_nodes.append(node)
    async with aiohttp.ClientSession() as http:
        assert (await _handshake(http, node.ws_url("warm")))[0] == "welcome"
        own_redis.stop_process()
        try:
            stalled = time.monotonic()
            waiting = await _handshake(http, node.ws_url("waiting"))
            while node.node.ready:
                assert time.monotonic() - stalled < 15_000 * MS, "the canary never missed"
                await asyncio.sleep(20 * MS)
            plain = await _handshake(http, node.ws_url("later"))
            balanced = await _handshake(http, node.ws_url("later"), LB_HEADERS)
        finally:
            own_redis.continue_process()
    assert waiting[0] == f"close {CloseCode.TRY_AGAIN_LATER}"
    assert waiting[1] < 5.0, f"a handshake waited {waiting[1]:.2f} s on a hung Redis"
    assert plain[0] == f"close {CloseCode.TRY_AGAIN_LATER}" and plain[1] < 1.0
    assert balanced[0] == "HTTP 503" and balanced[1] < 1.0
    print(
        f"\nMEASURED Redis SIGSTOP: a handshake begun during the stall closed 1013 after"
        f" {waiting[1]:.2f} s; after the canary missed: 1013 in {plain[1] * 1000:.1f} ms,"
        f" 503 in {balanced[1] * 1000:.1f} ms"
    )


@pytest.mark.parametrize("headers", [None, LB_HEADERS], ids=["plain", "balancer"])
async def test_handshake_with_redis_down_is_refused_at_once(
    own_redis: RedisServer, started_nodes: list[NodeUnderTest], headers: dict[str, str] | None
) -> None:
    """Redis killed: handshakes get 1013 (or 503 for a retrying balancer) at once."""
    node = await NodeUnderTest(node_settings(redis_url=own_redis.url)).start()
    started_nodes.append(node)
    own_redis.kill()
    deadline = time.monotonic() + 10_000 * MS
    while node.node.ready:
        assert time.monotonic() < deadline
        await asyncio.sleep(20 * MS)
    async with aiohttp.ClientSession() as http:
        outcome, took = await _handshake(http, node.ws_url("down"), headers)
    assert outcome == ("HTTP 503" if headers else f"close {CloseCode.TRY_AGAIN_LATER}")
    assert took < 1.0
