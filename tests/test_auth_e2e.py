"""Connection tokens and the CLI's auth guard end to end: a real node, real sockets.

Each refusal is a close code with a reason after the upgrade (DESIGN.md, close-code
table), because WebSocketSharp and browsers cannot read an HTTP status.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import jwt
import orjson
import pytest
from structlog.testing import capture_logs

from backend_adapter import issue_token
from tests.support.node import (
    API_KEY,
    Listener,
    NodeUnderTest,
    listen,
    start_node,
)
from tests.support.served import RELAY, ServedNode
from tests.support.timing import MS

# HMAC keys at least as long as the hash: PyJWT warns below that, and warnings are errors.
OLD = "relay-e2e-old-secret-0123456789abcdef"
NEW = "relay-e2e-new-secret-fedcba9876543210"
OTHER = "relay-e2e-other-secret-00000000000000"

MakeNode = Callable[..., Awaitable[NodeUnderTest]]


@pytest.fixture(params=["edge", "aiohttp"])
def make_node(request: pytest.FixtureRequest, started_nodes: list[NodeUnderTest]) -> MakeNode:
    """Nodes that require tokens signed with OLD (override freely), on both WebSocket
    ways in (relay serve's listener, or aiohttp's route handing over); stopped at the end."""

    return functools.partial(
        start_node, started_nodes, request.param, allow_anonymous=False, auth_secret=(OLD,)
    )


async def refused_with(opened: list[Listener], url: str) -> tuple[int | None, str]:
    """Connect, expect no welcome, and return the close code and reason."""
    client = await listen(opened, url)
    await client.wait_closed()
    assert not client.frames, client.frames
    return client.close_code, client.close_reason


# -- refusals ---------------------------------------------------------------------------


async def test_auth_missing_token_closes_4001(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """No token at all: close 4001 "missing token", after the upgrade."""
    relay = await make_node()
    assert await refused_with(listeners, relay.ws_url("cml")) == (4001, "missing token")


@pytest.mark.parametrize(
    "token",
    [
        "junk",
        "a.b.c",
        issue_token(OTHER, "cml", 600),  # signed with a secret the node does not know
        jwt.encode({"sub": "cml"}, OLD, algorithm="HS256"),  # no exp: would never expire
        jwt.encode({"sub": "cml", "exp": 2**40}, None, algorithm="none"),  # unsigned
    ],
    ids=["junk", "dots", "wrong-secret", "no-exp", "alg-none"],
)
async def test_auth_bad_token_closes_4001(
    make_node: MakeNode, listeners: list[Listener], token: str
) -> None:
    """A token that is not one of ours: close 4001 "invalid token"."""
    relay = await make_node()
    code, reason = await refused_with(listeners, relay.ws_url("cml", token=token))
    assert (code, reason) == (4001, "invalid token")


async def test_auth_token_for_another_client_closes_4003(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A valid token whose sub is another client_id: close 4003, do not reconnect."""
    relay = await make_node()
    url = relay.ws_url("cml", token=issue_token(OLD, "someone-else", 600))
    assert await refused_with(listeners, url) == (4003, "token does not grant this client_id")


async def test_auth_expired_token_closes_4500(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A token that expired longer ago than the leeway: close 4500 (refresh, reconnect)."""
    relay = await make_node()
    token = issue_token(OLD, "cml", 60, now=time.time() - 120)  # expired 60 s ago
    assert await refused_with(listeners, relay.ws_url("cml", token=token)) == (
        4500,
        "token expired",
    )


async def test_auth_token_within_leeway_is_accepted(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """--token-leeway tolerates clock skew: a token 5 s past exp passes a 30 s leeway."""
    relay = await make_node(token_leeway=30.0)
    token = issue_token(OLD, "cml", 60, now=time.time() - 65)
    client = await listen(listeners, relay.ws_url("cml", token=token))
    assert client.welcome["type"] == "welcome"
    strict = await make_node(token_leeway=0.0)
    assert (await refused_with(listeners, strict.ws_url("cml", token=token)))[0] == 4500


async def test_auth_not_yet_valid_token_closes_4001(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A token whose nbf is an hour ahead: close 4001 "token not yet valid"."""
    relay = await make_node()
    now = int(time.time())
    token = jwt.encode({"sub": "cml", "exp": now + 7200, "nbf": now + 3600}, OLD, "HS256")
    code, reason = await refused_with(listeners, relay.ws_url("cml", token=token))
    assert (code, reason) == (4001, "token not yet valid")


async def test_auth_without_secret_or_anonymous_fails_closed(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A node built with neither a secret nor --allow-anonymous lets nobody in: 4001."""
    relay = await make_node(auth_secret=())
    token = issue_token(OLD, "cml", 600)
    assert (await refused_with(listeners, relay.ws_url("cml", token=token)))[0] == 4001
    assert (await refused_with(listeners, relay.ws_url("cml")))[0] == 4001


# -- admissions ---------------------------------------------------------------------------


async def test_auth_valid_token_in_query_receives_events(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A valid token in `token=` (WebSocketSharp's only way) gets welcome and events."""
    relay = await make_node()
    client = await listen(listeners, relay.ws_url("cml", token=issue_token(OLD, "cml", 600)))
    assert client.welcome["type"] == "welcome" and client.welcome["client_id"] == "cml"
    await relay.publish("cml", "e", {"n": 1})
    assert [m["data"] for m in await client.wait_messages(1)] == [{"n": 1}]


async def test_auth_bearer_header_token_receives_events(make_node: MakeNode) -> None:
    """`Authorization: Bearer <token>` works as well as the query string."""
    relay = await make_node()
    headers = {"Authorization": f"Bearer {issue_token(OLD, 'cml', 600)}"}
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(relay.ws_url("cml"), headers=headers) as ws,
    ):
        welcome = orjson.loads((await ws.receive(timeout=5_000 * MS)).data)
        assert welcome["type"] == "welcome"
        await relay.publish("cml", "e", {"via": "header"})
        message = orjson.loads((await ws.receive(timeout=5_000 * MS)).data)
        assert message["data"] == {"via": "header"}
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(relay.ws_url("cml"), headers={"Authorization": "Bearer junk"}) as ws,
    ):
        closing = await ws.receive(timeout=5_000 * MS)
        assert (closing.data, closing.extra) == (4001, "invalid token")


async def test_auth_rotation_accepts_old_and_new_secret(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """--auth-secret OLD,NEW: tokens of either secret connect; a third secret's do not."""
    relay = await make_node(auth_secret=(OLD, NEW))
    old = await listen(listeners, relay.ws_url("a", token=issue_token(OLD, "a", 600)))
    new = await listen(listeners, relay.ws_url("b", token=issue_token(NEW, "b", 600)))
    await relay.publish("a", "e", {"to": "a"})
    await relay.publish("b", "e", {"to": "b"})
    assert [m["data"] for m in await old.wait_messages(1)] == [{"to": "a"}]
    assert [m["data"] for m in await new.wait_messages(1)] == [{"to": "b"}]
    other = relay.ws_url("c", token=issue_token(OTHER, "c", 600))
    assert await refused_with(listeners, other) == (4001, "invalid token")


async def test_auth_anonymous_with_secret_still_checks_given_tokens(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """With --allow-anonymous and a secret, no token passes but a bad one is still 4001."""
    relay = await make_node(allow_anonymous=True)
    anonymous = await listen(listeners, relay.ws_url("anon"))
    assert anonymous.welcome["type"] == "welcome"
    assert (await refused_with(listeners, relay.ws_url("anon2", token="junk")))[0] == 4001


async def test_auth_session_closed_4500_when_token_expires(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """A session lives until its token's exp (leeway 0), then is closed with 4500."""
    relay = await make_node(token_leeway=0.0)
    token = issue_token(OLD, "cml", 2)
    exp = jwt.decode(token, OLD, algorithms=["HS256"])["exp"]
    client = await listen(listeners, relay.ws_url("cml", token=token))
    assert client.welcome["type"] == "welcome"
    await relay.publish("cml", "e", {"n": 1})
    await client.wait_messages(1)
    assert await client.wait_closed(timeout=5_000 * MS) == 4500
    closed_at = time.time()
    assert client.close_reason == "token expired"
    # The watchdog ticks every second: closed at exp, at most about a tick late.
    assert exp <= closed_at < exp + 2.5


async def test_auth_refusals_never_log_or_echo_the_token(
    make_node: MakeNode, listeners: list[Listener]
) -> None:
    """Refused and accepted tokens appear in no log entry and in no close reason."""
    tokens = {
        "bad-sig": issue_token(OTHER, "cml", 600),
        "expired": issue_token(OLD, "cml", 60, now=time.time() - 600),
        "other-id": issue_token(OLD, "bob", 600),
        "good": issue_token(OLD, "cml", 600),
    }
    with capture_logs() as logs:
        relay = await make_node()
        for token in tokens.values():
            client = await listen(listeners, relay.ws_url("cml", token=token))
            assert token not in client.close_reason
        await asyncio.gather(*(listener.close() for listener in listeners))
        await relay.stop()
    text = repr(logs)
    assert "session.refused" in text
    for token in tokens.values():
        assert token not in text
        for part in token.split("."):
            assert part not in text
    assert OLD not in text and OTHER not in text and API_KEY not in text


async def test_api_wrong_key_is_401_and_not_logged(make_node: MakeNode) -> None:
    """A wrong or near-miss API key gets 401; neither key shows up in the logs."""
    with capture_logs() as logs:
        relay = await make_node()
        async with aiohttp.ClientSession() as http:
            for key in ("nope", API_KEY[:-1], API_KEY + "x", API_KEY.upper()):
                async with http.post(
                    f"{relay.base}/api/publish",
                    json={"biz_id": "a", "event": "e"},
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status == 401
                    assert (await response.json())["error"]["code"] == "unauthorized"
        await relay.stop()
    assert API_KEY not in repr(logs)


# -- the CLI ------------------------------------------------------------------------------


def test_serve_refuses_to_start_without_secret_or_anonymous(tmp_path: Path) -> None:
    """`relay serve` with neither flag exits non-zero and names the flags to add."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [str(RELAY), "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30_000 * MS,
        env=env,
    )
    assert done.returncode != 0
    assert "--auth-secret" in done.stderr and "--allow-anonymous" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_anonymous_logs_a_warning_at_start(tmp_path: Path) -> None:
    """--allow-anonymous starts, loudly: a warning naming the risk is on stderr."""
    node = ServedNode(tmp_path, "--allow-anonymous").start()
    try:
        stderr = node.stderr()
    finally:
        assert node.stop() == 0
    line = next(line for line in stderr.splitlines() if "auth.anonymous_enabled" in line)
    assert "warning" in line and "ANY client" in line


def test_serve_with_secret_never_logs_it(tmp_path: Path) -> None:
    """The secret and API key given on the command line never reach the node's logs."""
    node = ServedNode(tmp_path, "--auth-secret", f"{OLD},{NEW}", "--api-key", API_KEY)
    node.start()
    try:
        stderr = node.stderr()
    finally:
        assert node.stop() == 0
    stderr += node.stderr()
    assert "node.configured" in stderr
    assert OLD not in stderr and NEW not in stderr and API_KEY not in stderr
