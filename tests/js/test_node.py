"""relay-client.js under Node 20 with the ``ws`` package, against real nodes behind nginx.

``ws`` is installed by ``npm ci`` from tests/js/node/package-lock.json into a cache
directory (once per lock file). The client runs as tests/js/node/client.mjs, printing
one JSON line per event it reports. The pure decisions are checked against the Python
SDK's (the reference) through tests/js/node/pure.mjs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from relay.client import (
    AT_ONCE_JITTER,
    Action,
    plan_reconnect,
    reconnect_delay,
)
from relay.wire import parse_id
from tests.cluster.support import LocalCluster, TickPublisher
from tests.js.conftest import HERE, NODE, NPM, ROOT, PageServer, wait_last_ack
from tests.support.scripted import ScriptedNode, frame, overlapping_replay, welcome
from tests.support.timing import MS

MODULE = ROOT / "clients" / "js" / "relay-client.js"
NODE_DIR = HERE / "node"


@pytest.fixture(scope="session")
def ws_dir() -> Path:
    """A directory whose node_modules holds ``ws`` exactly as the committed lock file says."""
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = base / "relay-tests" / f"npm-{hashlib.sha256(lock).hexdigest()[:16]}"
    if not (target / "node_modules" / "ws" / "package.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            (target / name).write_bytes((NODE_DIR / name).read_bytes())
        subprocess.run(
            [NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=target,
            check=True,
            timeout=300_000 * MS,
            stdin=subprocess.DEVNULL,
        )
    return target


class NodeClient:
    """tests/js/node/client.mjs in a subprocess, its events parsed as they arrive."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._readers = [asyncio.create_task(self._read()), asyncio.create_task(self._err())]

    @classmethod
    async def start(
        cls,
        ws_dir: Path,
        url: str,
        client_id: str,
        token_url: str,
        fmt: str = "json",
        handler_delay_ms: int = 0,
        **options: float,
    ) -> NodeClient:
        env = dict(
            os.environ,
            RELAY_WS_DIR=str(ws_dir),
            RELAY_MODULE=MODULE.as_uri(),
            RELAY_URL=url,
            RELAY_CLIENT=client_id,
            RELAY_TOKEN_URL=token_url,
            RELAY_TOKEN="" if token_url else "t",
            RELAY_FORMAT=fmt,
            RELAY_OPTIONS=json.dumps(options),
            RELAY_HANDLER_DELAY_MS=str(handler_delay_ms),
        )
        proc = await asyncio.create_subprocess_exec(
            NODE,
            str(NODE_DIR / "client.mjs"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.events.append(orjson.loads(line))

    async def _err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]

    async def wait(
        self, predicate: Callable[[], bool], what: str, timeout: float = 30_000 * MS
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    if self.proc.returncode is not None and not predicate():
                        await asyncio.gather(*self._readers)
                        break
                    await asyncio.sleep(20 * MS)
        except TimeoutError:
            pass
        if not predicate():
            raise AssertionError(
                f"{what}: events {self.events[-5:]} stderr {self.stderr.decode()[-2000:]}"
            )

    async def stop(self) -> int:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            code = await asyncio.wait_for(self.proc.wait(), 10_000 * MS)
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code


@pytest.fixture
async def node_clients() -> AsyncIterator[list[NodeClient]]:
    started: list[NodeClient] = []
    yield started
    for client in started:
        with contextlib.suppress(ProcessLookupError):
            await client.stop()


async def start_client(
    started: list[NodeClient],
    ws_dir: Path,
    cluster: LocalCluster,
    server: PageServer,
    client_id: str,
    fmt: str = "json",
) -> NodeClient:
    client = await NodeClient.start(
        ws_dir,
        f"ws://127.0.0.1:{cluster.lb_port}",
        client_id,
        f"{server.origin}/token?client={client_id}",
        fmt,
    )
    started.append(client)
    await client.wait(lambda: bool(client.of("connected")), "no welcome")
    return client


def run_pure(request: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [NODE, str(NODE_DIR / "pure.mjs")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=30_000 * MS,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


# -- the pure parts, against the Python SDK ------------------------------------------------


class _Top:
    """A random source that always draws the top of the range (Python side)."""

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * 0.999999


def test_js_decisions_match_the_python_sdk() -> None:
    """Id order, the close-code plan and the delay bounds are those of relay.client."""
    pairs = [("9-0", "10-0"), ("10-0", "9-0"), ("5-5", "5-5"), ("5-10", "5-9"), ("7", "7-0")]
    pairs.append(("18446744073709551615-1", "18446744073709551615-0"))
    codes = [1000, 1001, 1002, 1006, 1008, 1009, 1011, 1012, 1013, 4000, 4001, 4003, 4400, 4499]
    codes += [4500, 4508, 4509, 4999]
    delays = [(a, n) for a in ("at_once", "backoff", "long_backoff") for n in (0, 1, 3, 10, 70)]
    answer = run_pure({"pairs": pairs, "codes": codes, "delays": delays, "packed": [], "urls": []})
    want = [(parse_id(a) > parse_id(b)) - (parse_id(a) < parse_id(b)) for a, b in pairs]
    assert answer["compare"] == want
    for code, (plain, renewing) in zip(codes, answer["plans"], strict=True):
        assert plain == plan_reconnect(code, can_renew=False).action.value, code
        assert renewing == plan_reconnect(code, can_renew=True).action.value, code
    for (action, attempt), got in zip(delays, answer["delays"], strict=True):
        want_delay = reconnect_delay(Action(action), attempt, 0.5, 30.0, _Top())  # type: ignore[arg-type]
        assert got == pytest.approx(want_delay), (action, attempt)
    assert answer["delays"][0] <= AT_ONCE_JITTER


def test_js_msgpack_decoder_reads_what_python_packs() -> None:
    """Every MessagePack type a frame can carry decodes to the same value."""
    values: list[Any] = [
        None,
        True,
        False,
        0,
        127,
        128,
        255,
        256,
        65535,
        65536,
        2**32,
        2**53 - 1,
        2**63,
        -1,
        -32,
        -33,
        -128,
        -129,
        -(2**31),
        -(2**63),
        1.5,
        -0.25,
        "",
        "ü" * 40,
        "x" * 300,
        "y" * 70000,
        b"\x00\x01",
        list(range(20)),
        {f"k{n}": n for n in range(20)},
        {"type": "message", "id": "1-0", "data": {"nested": [1, {"a": None}]}},
        {"__proto__": {"polluted": True}, "constructor": 1},  # keys like any other (as JSON.parse)
    ]
    packed = [msgpack.packb(v, use_bin_type=True).hex() for v in values]
    answer = run_pure({"pairs": [], "codes": [], "delays": [], "packed": packed, "urls": []})

    def as_js(value: Any) -> Any:
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int) and abs(value) > 2**53 - 1:
            return f"big:{value}"
        if isinstance(value, bytes):
            return f"bin:{value.hex()}"
        if isinstance(value, list):
            return [as_js(v) for v in value]
        if isinstance(value, dict):
            return {k: as_js(v) for k, v in value.items()}
        return value

    assert answer["unpacked"] == [as_js(v) for v in values]


# -- against real nodes ---------------------------------------------------------------------


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["data"]["seq"] for m in messages]


async def disrupt_while_publishing(
    client: NodeClient, cluster: LocalCluster, client_id: str, sig: signal.Signals
) -> tuple[dict[str, Any], float, int]:
    """Publish ticks; signal the client's node mid-stream; everything once and in order."""
    first = client.of("connected")[0]
    async with TickPublisher(cluster.redis_url, [client_id], interval=0.02) as ticks:
        await ticks.wait_ticks(20)
        cluster.signal_node(int(first["node"].removeprefix("node")), sig)
        await client.wait(lambda: len(client.of("connected")) >= 2, "no second welcome")
        await ticks.wait_ticks(20)
    accepted = ticks.accepted[client_id]
    await client.wait(lambda: len(client.of("message")) >= len(accepted), "events missing")
    assert seqs(client.of("message")) == accepted  # nothing lost, nothing twice, in order
    # The acks followed the client to its new session: the last one is the last message.
    last_id = client.of("message")[-1]["id"]
    await wait_last_ack(cluster, client_id, last_id)
    second = client.of("connected")[1]
    assert second["node"] != first["node"] and second["recovered"] is True
    close = client.of("disconnected")[0]
    return close, second["at"] - close["at"], len(accepted)


async def test_node_client_resumes_on_another_node_after_a_drain(
    ws_dir: Path,
    cluster: LocalCluster,
    page_server: PageServer,
    node_clients: list[NodeClient],
) -> None:
    """Node 20 + ws: events in order; SIGTERM of its node: 1012, resumed elsewhere, none lost."""
    client = await start_client(node_clients, ws_dir, cluster, page_server, "node:js@drain")
    close, reconnect_ms, events = await disrupt_while_publishing(
        client, cluster, "node:js@drain", signal.SIGTERM
    )
    assert close["code"] == 1012 and close["willReconnect"] is True
    assert reconnect_ms < 5000
    assert await client.stop() == 0
    print(f"\nnode drain: reconnected in {reconnect_ms} ms, {events} events, 0 lost")


async def test_node_client_resumes_after_its_node_is_killed(
    ws_dir: Path,
    cluster: LocalCluster,
    page_server: PageServer,
    node_clients: list[NodeClient],
) -> None:
    """Node 20 + ws, MessagePack: kill -9 of its node: 1006, resumed elsewhere, none lost."""
    client = await start_client(
        node_clients, ws_dir, cluster, page_server, "node-kill", fmt="msgpack"
    )
    close, reconnect_ms, events = await disrupt_while_publishing(
        client, cluster, "node-kill", signal.SIGKILL
    )
    assert close["code"] == 1006 and close["willReconnect"] is True
    assert reconnect_ms < 10000
    print(f"\nnode kill -9: reconnected in {reconnect_ms} ms, {events} events, 0 lost")


async def test_node_client_renews_an_expired_token_and_resumes(
    ws_dir: Path,
    cluster: LocalCluster,
    page_server: PageServer,
    node_clients: list[NodeClient],
) -> None:
    """4500 (token expired while connected): a new token from the function, resumed, none lost."""
    page_server.ttl = 3
    client = await start_client(node_clients, ws_dir, cluster, page_server, "node-expiry")
    async with TickPublisher(cluster.redis_url, ["node-expiry"], interval=0.05) as ticks:
        await client.wait(
            lambda: len(client.of("connected")) >= 2, "no reconnect", timeout=30_000 * MS
        )
        await ticks.wait_ticks(10)
    accepted = ticks.accepted["node-expiry"]
    await client.wait(lambda: len(client.of("message")) >= len(accepted), "events missing")
    assert seqs(client.of("message")) == accepted
    close = client.of("disconnected")[0]
    assert close["code"] == 4500 and close["willReconnect"] is True
    assert client.of("connected")[1]["recovered"] is True
    assert page_server.tokens_issued >= 2


async def test_node_client_stops_after_a_second_invalid_token(
    ws_dir: Path,
    cluster: LocalCluster,
    page_server: PageServer,
    node_clients: list[NodeClient],
) -> None:
    """4001: the token function is asked once more; a second 4001 stops the client."""
    page_server.valid = False
    client = await NodeClient.start(
        ws_dir,
        f"ws://127.0.0.1:{cluster.lb_port}",
        "node-bad-token",
        f"{page_server.origin}/token?client=node-bad-token",
    )
    node_clients.append(client)
    assert await asyncio.wait_for(client.proc.wait(), 30_000 * MS) == 3
    await client.stop()
    closes = client.of("disconnected")
    assert [(c["code"], c["willReconnect"]) for c in closes] == [(4001, True), (4001, False)]
    assert client.of("connected") == [] and page_server.tokens_issued == 2


# -- against a scripted server: what real nodes do not do on cue -----------------------------


async def scripted_client(
    ws_dir: Path,
    node: ScriptedNode,
    started: list[NodeClient],
    handler_delay_ms: int = 0,
    **options: float,
) -> NodeClient:
    client = await NodeClient.start(
        ws_dir,
        node.url,
        "c",
        "",
        handler_delay_ms=handler_delay_ms,
        backoffBase=0.05,
        backoffMax=0.2,
        **options,
    )
    started.append(client)
    return client


async def test_node_client_leaves_a_silent_or_confused_server_and_resumes(
    ws_dir: Path, node_clients: list[NodeClient]
) -> None:
    """No welcome first: 1002; no pong: 1006; then resumed from last_id, repeats dropped."""
    silent = ScriptedNode(
        [
            ([frame("101-0")], None),
            ([welcome("100-0")], None),
            (
                [
                    welcome("100-0", recovered=True),
                    *(frame(sid) for sid in ("100-0", "101-0", "9-0", "102-0", "101-0", "1000-0")),
                ],
                None,
            ),
        ]
    )
    await silent.server.start_server()
    try:
        client = await scripted_client(
            ws_dir, silent, node_clients, pingInterval=0.3, pongTimeout=0.3
        )
        await client.wait(lambda: len(client.of("message")) >= 3, "no messages")
        closes = [(c["code"], c["reason"], c["willReconnect"]) for c in client.of("disconnected")]
        assert closes == [
            (1002, "first frame was not a welcome", True),
            (1006, "no answer from the server", True),
        ]
        # Resumed after the head of history the silent server's welcome gave; repeats dropped.
        assert silent.queries[2]["since"] == "100-0" and "since" not in silent.queries[0]
        assert [m["id"] for m in client.of("message")] == ["101-0", "102-0", "1000-0"]
        attempts = [q["attempt"].split(".") for q in silent.queries]
        assert len({a[0] for a in attempts}) == 1 and [a[1] for a in attempts] == ["1", "2", "3"]
        assert '{"type":"ping"}' in silent.received
        await client.wait(
            lambda: '{"type":"ack","id":"1000-0"}' in silent.received, "no ack of the last id"
        )
        assert all(q["token"] == "t" for q in silent.queries)
        assert await client.stop() == 0
    finally:
        await silent.server.close()


async def test_node_client_compares_ids_as_integer_pairs(
    ws_dir: Path, node_clients: list[NodeClient]
) -> None:
    """A replay overlapping what was delivered (9-0 < 10-0 < 10-1 < 11-0): each id once."""
    node = ScriptedNode(overlapping_replay(1012))
    await node.server.start_server()
    try:
        client = await scripted_client(ws_dir, node, node_clients)
        await client.wait(lambda: len(client.of("message")) >= 4, "messages missing")
        assert [m["id"] for m in client.of("message")] == ["9-0", "10-0", "11-0", "12-0"]
        assert node.queries[1]["since"] == "10-0"
        assert client.of("disconnected")[0]["code"] == 1012
        assert await client.stop() == 0
    finally:
        await node.server.close()


async def test_node_client_lets_go_while_the_app_is_behind_and_resumes(
    ws_dir: Path, node_clients: list[NodeClient]
) -> None:
    """A slow app: past maxQueue the client lets the socket go, resumes caught up, loses nothing."""
    burst = [welcome("0-0"), *(frame(f"{n}-0") for n in range(1, 41))]
    node = ScriptedNode([(burst, None), (burst, None)])
    await node.server.start_server()
    try:
        client = await scripted_client(ws_dir, node, node_clients, handler_delay_ms=20, maxQueue=8)
        await client.wait(lambda: len(client.of("message")) >= 40, "messages missing")
        assert [m["id"] for m in client.of("message")] == [f"{n}-0" for n in range(1, 41)]
        paused = client.of("disconnected")[0]
        assert paused["code"] == 1000 and paused["willReconnect"] is True
        assert "behind" in paused["reason"]
        # Each resume starts after the newest id it held, never from the start again.
        resumed = [parse_id(q["since"]) for q in node.queries[1:]]
        assert resumed == sorted(resumed) and resumed[0] >= (8, 0)
        assert await client.stop() == 0
    finally:
        await node.server.close()


def test_package_installs_from_the_repository(tmp_path: Path) -> None:
    """`npm install <repo>/clients/js` imports as @relay/client; its tarball holds the module."""
    package_dir = MODULE.parent
    packed = subprocess.run(
        [NPM, "pack", "--dry-run", "--json"],
        cwd=package_dir,
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
        check=True,
    )
    files = {f["path"]: f["size"] for f in json.loads(packed.stdout)[0]["files"]}
    assert files["relay-client.js"] == MODULE.stat().st_size
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "private": true, "type": "module"}')
    subprocess.run(
        [NPM, "install", "--offline", "--no-audit", "--no-fund", str(package_dir)],
        cwd=app,
        capture_output=True,
        timeout=120_000 * MS,
        check=True,
    )
    script = 'import("@relay/client").then((m) => console.log(typeof m.RelayClient, m.VERSION))'
    out = subprocess.run(
        [NODE, "--input-type=module", "-e", script],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=30_000 * MS,
        check=True,
    ).stdout
    package = json.loads((package_dir / "package.json").read_text())
    assert out.split() == ["function", package["version"]]
