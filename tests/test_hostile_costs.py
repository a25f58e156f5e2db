"""Hostile input, round two: what one client costs the node, secrets in the whole log,
and a client's bytes never a traceback.

Floods run against ``relay serve`` in a subprocess: its peak RSS (VmHWM) is read from
/proc and /healthz is timed throughout. Each test is one row of docs/security.md's
"Hostile cases tried" table.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from backend_adapter import issue_token
from relay.frames import OP_CLOSE, OP_PING, OP_TEXT
from tests.support.frames import client_frame
from tests.support.node import API_KEY, Listener, NodeUnderTest, listen, node_settings
from tests.support.redis_server import RedisServer
from tests.support.served import RELAY, ServedNode
from tests.support.timing import MS

SECRET = "relay-costs-secret-0123456789abcdef"
OTHER_SECRET = "relay-costs-second-secret-fedcba9876543210"
REDIS_PASSWORD = "redis-pass-4f1c9e2a7b"
MAX_GROWTH_KB = 32 * 1024
MAX_HEALTH_LATENCY = 500 * MS
FLOOD_SECONDS = 4000 * MS

UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


def upgrade(path: str, extra: str = "") -> bytes:
    return UPGRADE.format(path=path, extra=extra).encode("latin-1")


class HealthProbe:
    """GET /healthz every 20 ms in a thread; the slowest answer is the figure."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.worst = 0.0
        self.count = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=5000 * MS) as response:
                    assert response.status == 200
            except OSError:
                self.failures += 1
            self.worst = max(self.worst, time.monotonic() - started)
            self.count += 1
            self._stop.wait(0.02)

    @contextlib.contextmanager
    def running(self) -> Iterator[HealthProbe]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)


def flood_once(port: int, head: bytes, prelude: bytes, block: bytes, until: float) -> int:
    """One connection that never reads: ``head`` and ``prelude``, then ``block`` over and
    over until ``until`` (monotonic) or until the node hangs up. Bytes sent."""
    # No small SO_RCVBUF: on loopback it stalls the sender in retransmissions, and the
    # flood would measure the kernel, not the node.
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head)
    answer = b""
    while b"\r\n\r\n" not in answer:  # the handshake's answer: the last thing it reads
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    sent = 0
    sock.settimeout(200 * MS)
    try:
        sock.sendall(prelude)
        while time.monotonic() < until:
            try:
                sent += sock.send(block)
            except TimeoutError:
                continue  # the node stopped reading us: backpressure
    except OSError:  # reset or broken pipe: the node hung up
        return -sent - 1
    finally:
        sock.close()
    return sent


def flood(port: int, head: bytes, prelude: bytes, block: bytes, seconds: float) -> dict[str, Any]:
    """Flood for ``seconds``, connecting again each time the node hangs up (one
    connection at a time). What was sent, and how long the first connection lasted."""
    started = time.monotonic()
    until = started + seconds
    sent, connections, first_lasted = 0, 0, None
    while time.monotonic() < until:
        result = flood_once(port, head, prelude, block, until)
        connections += 1
        if result < 0 and first_lasted is None and connections == 1:
            first_lasted = time.monotonic() - started
        sent += abs(result + 1) if result < 0 else result
    return {"sent_mb": sent / 1e6, "connections": connections, "hung_up_after": first_lasted}


def wait_sessions_gone(node: ServedNode, timeout: float = 10_000 * MS) -> None:
    """Until the node's relay_connections gauge is back to 0."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{node.base}/metrics", timeout=5000 * MS) as response:
            text = response.read().decode()
        if re.search(r"^relay_connections 0(\.0)?$", text, re.MULTILINE):
            return
        assert time.monotonic() < deadline, "the flooding session is still open"
        time.sleep(20 * MS)


def run_flood(
    tmp_path: Path,
    flags: tuple[str, ...],
    path: str,
    prelude: bytes,
    block: bytes,
    *,
    cpu_bounded: bool = True,
) -> dict[str, Any]:
    """One flooding connection against a fresh node: RSS growth, /healthz, the flood.

    ``cpu_bounded``: the frame budget is on, so /healthz must stay fast; without it a
    flood costs the node CPU (the budget is what bounds it) but still no memory.
    """
    node = ServedNode(tmp_path, "--log-level", "warning", *flags).start()
    try:
        for _ in range(20):  # warm up code paths before the baseline
            urllib.request.urlopen(f"{node.base}/healthz", timeout=5000 * MS).close()
        before = node.status("VmRSS")
        with HealthProbe(node.base).running() as probe:
            figures = flood(node.port, upgrade(path), prelude, block, FLOOD_SECONDS)
            wait_sessions_gone(node)  # the node is done with what the flood sent
        figures.update(
            growth_mb=(node.status("VmHWM") - before) / 1024,
            health_worst_ms=probe.worst * 1000,
            health_checks=probe.count,
            health_failures=probe.failures,
        )
    finally:
        assert node.stop() == 0
    print(figures)
    assert figures["growth_mb"] * 1024 < MAX_GROWTH_KB, figures
    if cpu_bounded:
        assert figures["health_failures"] == 0, figures
        assert figures["health_worst_ms"] < MAX_HEALTH_LATENCY * 1000, figures
    return figures


PINGS = client_frame(OP_PING, b"p" * 125) * 500
EMPTY_CONTINUATIONS = client_frame(0, b"", fin=False) * 10_000
NO_BUDGET = ("--client-frame-rate", "1e9", "--client-frame-burst", "1000000000")


def token_path(client_id: str) -> str:
    return f"/ws/{client_id}?token={issue_token(SECRET, client_id, 600)}"


@pytest.mark.parametrize("budget", ["defaults", "no-frame-budget"])
def test_hostile_ping_flood_from_a_never_reading_client(tmp_path: Path, budget: str) -> None:
    """An authorised client that never reads sends 125-byte pings flat out: the node's
    peak RSS grows < 32 MB. With the default frame budget each connection is cut off at
    once (the client keeps coming back) and /healthz answers in < 500 ms throughout;
    without one, the pongs are rate-limited and stop at the write buffer's high-water
    mark, so memory stays flat all the same."""
    bounded = budget == "defaults"
    flags = ("--auth-secret", SECRET, *(() if bounded else NO_BUDGET))
    figures = run_flood(tmp_path, flags, token_path("pinger"), b"", PINGS, cpu_bounded=bounded)
    if budget == "defaults":
        assert figures["hung_up_after"] is not None and figures["hung_up_after"] < 2000 * MS


def test_hostile_ping_flood_without_a_token_during_the_4001_close(tmp_path: Path) -> None:
    """No token: the node closes 4001 and waits for the answer; pings sent meanwhile get
    no pong, and the frame budget ends the connection at once, not after the timeout."""
    figures = run_flood(tmp_path, ("--auth-secret", SECRET), "/ws/anonymous", b"", PINGS)
    assert figures["hung_up_after"] is not None and figures["hung_up_after"] < 1000 * MS


@pytest.mark.parametrize("limits", ["defaults", "no-frame-or-fragment-limit"])
def test_hostile_empty_continuation_flood(tmp_path: Path, limits: str) -> None:
    """A text message opened, then empty continuation frames flat out: < 32 MB; by
    default refused (1009) after --max-fragments with /healthz < 500 ms throughout;
    without limits the unfinished message holds one byte however many fragments come."""
    bounded = limits == "defaults"
    flags: tuple[str, ...] = ("--auth-secret", SECRET)
    if not bounded:
        flags += (*NO_BUDGET, "--max-fragments", "1000000000")
    opened = client_frame(OP_TEXT, b"x", fin=False)
    figures = run_flood(
        tmp_path, flags, token_path("fragments"), opened, EMPTY_CONTINUATIONS, cpu_bounded=bounded
    )
    if limits == "defaults":
        assert figures["hung_up_after"] is not None and figures["hung_up_after"] < 2000 * MS


# -- secrets in the whole log ----------------------------------------------------------


def test_hostile_no_secret_anywhere_in_the_log(tmp_path: Path) -> None:
    """A node started with every secret-bearing setting (two auth secrets, the API key,
    a Redis URL with a password), at debug level, through connects, refusals, API calls
    and junk: not one of them, nor a token, appears anywhere in its log."""
    redis = RedisServer(password=REDIS_PASSWORD).start()
    token = issue_token(SECRET, "alice", 600)
    node = ServedNode(
        tmp_path,
        "--auth-secret",
        f"{SECRET},{OTHER_SECRET}",
        "--api-key",
        API_KEY,
        "--redis-url",
        redis.url,
        "--log-level",
        "debug",
        "--log-format",
        "json",
    )
    try:
        node.start()

        async def exercise() -> None:
            opened: list[Listener] = []
            try:
                alice = await listen(opened, f"{node.ws_url('alice')}?token={token}")
                assert alice.welcome["type"] == "welcome"
                bad = await listen(opened, f"{node.ws_url('bob')}?token={token}")
                assert await bad.wait_closed() == 4003
                assert alice.http is not None
                auth = {"Authorization": f"Bearer {API_KEY}"}
                body = {"biz_id": "alice", "event": "e", "data": {"n": 1}}
                async with alice.http.post(
                    f"{node.base}/api/publish", json=body, headers=auth
                ) as r:
                    assert r.status == 200
                assert [m["data"] for m in await alice.wait_messages(1)] == [{"n": 1}]
                wrong = {"Authorization": f"Bearer {API_KEY}x"}
                async with alice.http.get(f"{node.base}/api/nodes", headers=wrong) as r:
                    assert r.status == 401
            finally:
                await asyncio.gather(*(listener.close() for listener in opened))

        asyncio.run(exercise())
        with socket.create_connection(("127.0.0.1", node.port), timeout=5000 * MS) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"y" * 9000 + b"\r\n\r\n")
            assert sock.recv(64).startswith((b"HTTP/1.1 400", b"HTTP/1.0 400"))
    finally:
        assert node.stop() == 0
        redis.close()
    log = node.stderr()
    assert '"node.configured"' in log and "redis://:***@127.0.0.1" in log
    for secret in (SECRET, OTHER_SECRET, API_KEY, REDIS_PASSWORD, token):
        assert secret not in log
    assert "Traceback" not in log
    for line in log.splitlines():
        orjson.loads(line)  # every line is JSON, aiohttp's and asyncio's too


# -- a client's bytes are never a traceback --------------------------------------------


def exchange(port: int, request: bytes, *, hang_up: bool = False) -> bytes:
    """Send ``request`` on a fresh connection; what came back (nothing if we hung up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5000 * MS) as sock:
        sock.sendall(request)
        if hang_up:
            return b""
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def close_code(answer: bytes) -> int:
    """The code of the first close frame after a 101 answer."""
    frames = answer.partition(b"\r\n\r\n")[2]
    while frames:
        opcode, size = frames[0] & 0x0F, frames[1] & 0x7F
        if opcode == OP_CLOSE:
            return int(struct.unpack("!H", frames[2:4])[0])
        frames = frames[2 + size :]
    raise AssertionError(f"no close frame in {answer!r}")


def test_hostile_client_bytes_are_never_a_traceback(tmp_path: Path) -> None:
    """Non-UTF-8 Authorization headers (API: 401; WebSocket: 4001), a disconnect
    mid-body, requests the HTTP parser rejects and a 55 KiB head in one write: each is
    answered, none is a 500, and the JSON log holds no traceback, only rate-limited
    http.bad_request events."""
    node = ServedNode(
        tmp_path,
        *("--auth-secret", SECRET, "--api-key", API_KEY, "--log-format", "json"),
        *("--close-timeout", f"{200 * MS:g}"),
    ).start()
    port = node.port
    try:
        answer = exchange(
            port,
            b"GET /api/nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        answer = exchange(port, upgrade("/ws/a", "Authorization: Bearer \xff\r\n"))
        assert answer.startswith(b"HTTP/1.1 101 ") and close_code(answer) == 4001
        answer = exchange(port, upgrade("/ws/a?token=%FF%FE"))
        assert close_code(answer) == 4001
        key = f"Authorization: Bearer {API_KEY}\r\n".encode()
        for _ in range(3):
            exchange(
                port,
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
                + key
                + b'Content-Length: 1000\r\n\r\n{"biz',
                hang_up=True,
            )
        padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 8000) for i in range(7))
        answer = exchange(port, upgrade("/ws/a")[:-2] + padding + b"\r\n")
        assert answer[9:13] == b"400 ", answer[:100]
        for _ in range(50):  # a flood of requests the parser rejects
            answer = exchange(
                port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"y" * 9000 + b"\r\n\r\n"
            )
            assert answer[9:13] == b"400 ", answer[:100]
        time.sleep(1500 * MS)  # the count of what the rate limit left out is written after 1 s
        with urllib.request.urlopen(f"{node.base}/healthz", timeout=5000 * MS) as response:
            assert response.status == 200
    finally:
        assert node.stop() == 0
    log = node.stderr()
    events = [orjson.loads(line) for line in log.splitlines()]
    assert "Traceback" not in log and "500" not in {str(e.get("status")) for e in events}
    assert not [e for e in events if e["level"] in ("error", "critical")], log
    bad = [e for e in events if e["event"] == "http.bad_request"]
    assert bad and len(bad) <= 5, bad  # 55+ bad requests in a few seconds, 1 line a second
    assert sum(1 + e["suppressed"] for e in bad) == 54  # 50 + 3 mid-body + the 55 KiB head


async def test_hostile_non_utf8_bearer_on_the_aiohttp_route_closes_4001(
    started_nodes: list[NodeUnderTest], listeners: list[Listener]
) -> None:
    """--compress (aiohttp's WebSocket route): a non-UTF-8 Bearer header is 101 then
    close 4001, not a dropped connection and a traceback."""
    relay = await NodeUnderTest(
        node_settings(compress=True, allow_anonymous=False, auth_secret=(SECRET,))
    ).start()
    started_nodes.append(relay)
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(
        None, exchange, relay.settings.port, upgrade("/ws/a", "Authorization: Bearer \xff\r\n")
    )
    assert answer.startswith(b"HTTP/1.1 101 ") and close_code(answer) == 4001


# -- tokens ----------------------------------------------------------------------------


async def test_hostile_token_audience_accepted_only_when_configured(
    started_nodes: list[NodeUnderTest], listeners: list[Listener]
) -> None:
    """A token with aud (backend_adapter's audience=): welcome on a node started with the
    same --token-audience, which refuses one without aud; elsewhere 4001 saying why."""
    with_aud = issue_token(SECRET, "cml", 600, audience="relay")
    plain = issue_token(SECRET, "cml", 600)
    for audience, token, code, reason in [
        ("relay", with_aud, None, None),
        ("relay", plain, 4001, "token has no audience (aud); this node requires one"),
        (
            None,
            with_aud,
            4001,
            "token has an audience (aud); this node was started without --token-audience",
        ),
    ]:
        relay = await NodeUnderTest(
            node_settings(allow_anonymous=False, auth_secret=(SECRET,), token_audience=audience)
        ).start()
        started_nodes.append(relay)
        client = await listen(listeners, relay.ws_url("cml", token=token))
        if code is None:
            assert client.welcome["type"] == "welcome"
        else:
            assert await client.wait_closed() == code and client.close_reason == reason


async def test_hostile_token_living_ten_years_refused_with_max_token_ttl(
    started_nodes: list[NodeUnderTest], listeners: list[Listener]
) -> None:
    """--max-token-ttl 86400: a token with exp ten years after iat is 4001; a day is fine."""
    relay = await NodeUnderTest(
        node_settings(allow_anonymous=False, auth_secret=(SECRET,), max_token_ttl=86400.0)
    ).start()
    started_nodes.append(relay)
    decade = await listen(
        listeners, relay.ws_url("cml", token=issue_token(SECRET, "cml", 10 * 365 * 86400))
    )
    assert await decade.wait_closed() == 4001
    assert decade.close_reason == "token lifetime exceeds this node's --max-token-ttl"
    day = await listen(listeners, relay.ws_url("cml", token=issue_token(SECRET, "cml", 86400)))
    assert day.welcome["type"] == "welcome"


def test_hostile_short_auth_secret_refused_at_start(tmp_path: Path) -> None:
    """relay serve --auth-secret abc exits non-zero saying why; --allow-weak-secret starts."""
    done = subprocess.run(
        [str(RELAY), "serve", "--port", "0", "--auth-secret", "abc"],
        capture_output=True,
        text=True,
        timeout=30_000 * MS,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "shorter than 32 bytes" in done.stderr and "--allow-weak-secret" in done.stderr
    node = ServedNode(tmp_path, "--auth-secret", "abc", "--allow-weak-secret").start()
    assert node.stop() == 0
