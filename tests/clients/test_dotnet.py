"""The .NET client (clients/dotnet) against real `relay serve` nodes, nginx and Redis.

The library, its test driver and the console example are compiled with Debian's Mono
(`mcs`), cached under build/dotnet/ by a hash of their sources. The driver
(clients/dotnet/tests/RelayDriver) runs one RelayClient and prints one JSON line per
event; these tests read them and answer its token requests. The cluster is
deploy/local-cluster.sh: two nodes behind nginx, auth on, so a drained or killed node's
client comes back through the balancer on the other one, as a WPF desktop would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from backend_adapter import AsyncPublisher, issue_token
from tests.cluster.support import LocalCluster, TickPublisher, nginx_available
from tests.conftest import MS
from tests.support.node import Listener
from tests.support.scripted import Script, ScriptedNode, overlapping_replay, welcome
from tests.support.timing import eventually

ROOT = Path(__file__).resolve().parents[2]
DOTNET = ROOT / "clients" / "dotnet"
LIBRARY = sorted((DOTNET / "src" / "Relay.Client").glob("*.cs"))
DRIVER = sorted((DOTNET / "tests" / "RelayDriver").glob("*.cs"))
CONSOLE = sorted((DOTNET / "examples" / "console").glob("*.cs"))
SECRET = "dotnet-client-tests-hs256-secret-32+bytes"
SETTINGS = {
    "heartbeat": 5,
    "drain_grace": 1,
    "close_linger": 0.1,
    "auth_secret": SECRET,
    "token_leeway": 0,
}
SECONDS = 1000 * MS
"""One second, scaled by RELAY_TEST_TIMEOUT_FACTOR like every deadline here."""


# -- the build ---------------------------------------------------------------------------------


def _newtonsoft() -> Path | None:
    found = sorted(Path("/usr/lib/cli").glob("Newtonsoft.Json*/Newtonsoft.Json.dll"))
    return found[-1] if found else None


def _mcs(out: Path, target: str, sources: list[Path], refs: list[Path]) -> None:
    command = [
        "mcs",
        f"-target:{target}",
        f"-out:{out}",
        "-warn:4",
        "-warnaserror",
        "-r:System.dll",
        "-r:System.Core.dll",
        *(f"-r:{ref}" for ref in refs),
        *(str(s) for s in sources),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300_000 * MS)
    if result.returncode != 0:
        pytest.fail(f"mcs could not build {out.name}:\n{result.stdout}{result.stderr}")


@pytest.fixture(scope="session")
def dotnet_build() -> Path:
    """Relay.Client.dll, RelayDriver.exe and RelayConsole.exe; rebuilt when a source changed."""
    newtonsoft = _newtonsoft()
    missing = [name for name in ("mcs", "mono") if shutil.which(name) is None]
    if newtonsoft is None:
        missing.append("Newtonsoft.Json (libnewtonsoft-json-cil-dev)")
    if missing:
        pytest.fail(
            f"the .NET client tests need Mono: missing {', '.join(missing)}. Install "
            "mono-mcs mono-runtime libnewtonsoft-json-cil-dev (.ci/run does it as root)."
        )
    assert newtonsoft is not None
    digest = hashlib.sha256()
    version = subprocess.run(["mcs", "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode() + str(newtonsoft).encode())
    for path in (*LIBRARY, *DRIVER, *CONSOLE):
        digest.update(str(path.relative_to(DOTNET)).encode() + b"\0" + path.read_bytes())
    out = ROOT / "build" / "dotnet" / digest.hexdigest()[:16]
    if (out / "RelayConsole.exe").exists():
        return out
    work = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(newtonsoft, work / "Newtonsoft.Json.dll")
    library = work / "Relay.Client.dll"
    _mcs(library, "library", LIBRARY, [newtonsoft])
    _mcs(work / "RelayDriver.exe", "exe", DRIVER, [library, newtonsoft])
    _mcs(work / "RelayConsole.exe", "exe", CONSOLE, [library])
    try:
        work.rename(out)  # atomic: a parallel run sees all of it or nothing
    except OSError:
        shutil.rmtree(work, ignore_errors=True)  # another run finished first
    return out


# -- the cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    if not nginx_available():
        pytest.fail("nginx is missing: apt-get install nginx-light (.ci/run installs it)")
    cluster = LocalCluster(tmp_path_factory.mktemp("dotnet-cluster"), 2, **SETTINGS).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(shared_cluster: LocalCluster) -> LocalCluster:
    """The module's cluster with every node running (a test may have drained or killed one)."""
    for k in range(1, shared_cluster.nodes + 1):
        if shared_cluster.exit_code(k) is not None:
            shared_cluster.start_node(k)
    return shared_cluster


def token(client_id: str, ttl: int = 3600) -> str:
    return issue_token(SECRET, client_id, ttl)


def node_number(name: str) -> int:
    return int(name.removeprefix("node"))


# -- the driver --------------------------------------------------------------------------------


class Driver:
    """One RelayDriver.exe process: its event lines as they come, and its token answers."""

    def __init__(
        self,
        build: Path,
        tmp_path: Path,
        url: str,
        client_id: str,
        *flags: str,
        tokens: Callable[[int], str] | None = None,
    ) -> None:
        self.build = build
        self.client_id = client_id
        self.args = ["run", "--url", url, "--client-id", client_id, *flags]
        self.tokens = tokens
        if tokens is not None:
            self.args.append("--tokens")
        self.stderr_path = tmp_path / f"driver-{client_id}-{time.monotonic_ns()}.stderr"
        self.events: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> Driver:
        with self.stderr_path.open("wb") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                "mono",
                "--debug",
                str(self.build / "RelayDriver.exe"),
                *self.args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            event = orjson.loads(raw)
            self.events.append(event)
            if event["ev"] == "token_request" and self.tokens is not None:
                await self.send(f"token {self.tokens(event['n'])}")
            self._changed.set()
        self._changed.set()

    async def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["ev"] == kind]

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.of("message")

    @property
    def seqs(self) -> list[int]:
        return [orjson.loads(m["data_json"])["seq"] for m in self.messages]

    def describe(self) -> str:
        stderr = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        lines = [orjson.dumps(e).decode() for e in self.events if e["ev"] != "message"]
        return (
            f"{len(self.messages)} messages; other events:\n  "
            + "\n  ".join(lines[-15:])
            + f"\nclient log (tail):\n{stderr[-3000:]}"
        )

    async def wait(
        self, predicate: Callable[[], bool], what: str, timeout: float = 20 * SECONDS
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; {self.describe()}")
            if self._reader is not None and self._reader.done():
                raise AssertionError(f"the driver exited waiting for {what}; {self.describe()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_event(
        self, kind: str, count: int = 1, timeout: float = 20 * SECONDS
    ) -> dict[str, Any]:
        await self.wait(lambda: len(self.of(kind)) >= count, f"{count} x {kind}", timeout)
        return self.of(kind)[count - 1]

    async def status(self) -> dict[str, Any]:
        count = len(self.of("status"))
        await self.send("status")
        return await self.wait_event("status", count + 1)

    async def stop(self) -> int:
        """StopAsync in the driver; its exit code."""
        await self.send("stop")
        await self.wait_event("stopped")
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), 10 * SECONDS)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


@pytest.fixture
async def drivers(dotnet_build: Path, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start drivers with ``await drivers(url, client_id, *flags, tokens=…)``; killed at the end."""
    started: list[Driver] = []

    async def start(url: str, client_id: str, *flags: str, **kwargs: Any) -> Driver:
        driver = Driver(dotnet_build, tmp_path, url, client_id, *flags, **kwargs)
        started.append(driver)
        return await driver.start()

    yield start
    for driver in started:
        await driver.close()


def valid_tokens(client_id: str) -> Callable[[int], str]:
    return lambda n: token(client_id)


async def welcomed(drivers: Any, cluster: LocalCluster, cid: str, *flags: str) -> Driver:
    """A driver of ``cid`` through nginx with good tokens, once it is welcomed."""
    driver: Driver = await drivers(cluster.lb_ws(cid), cid, *flags, tokens=valid_tokens(cid))
    await driver.wait_event("connected")
    return driver


@pytest.fixture
async def publisher(cluster: LocalCluster) -> AsyncIterator[AsyncPublisher]:
    pub = AsyncPublisher(cluster.redis_url)
    yield pub
    await pub.close()


# -- the pure parts ----------------------------------------------------------------------------


def test_dotnet_selftest_pure_parts_pass(dotnet_build: Path) -> None:
    """Id order, close-code table, backoff, URL, JSON scanner, MessagePack codec, cursor file."""
    result = subprocess.run(
        ["mono", "--debug", str(dotnet_build / "RelayDriver.exe"), "selftest"],
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    )
    failed = [line for line in result.stdout.splitlines() if not line.startswith("ok ")]
    assert result.returncode == 0 and not failed, result.stdout + result.stderr
    assert len(result.stdout.splitlines()) >= 12


SAMPLES: list[Any] = [
    None,
    True,
    0,
    -1,
    127,
    128,
    -33,
    255,
    65536,
    2**31,
    -(2**31) - 1,
    2**63 - 1,
    2**63 + 5,
    -(2**63),
    0.1,
    1.0,
    -2.5e-300,
    1e300,
    "",
    'héllo "q" \\ / {}[] \n\t\x01 ✓ 😀',
    "x" * 40,
    "y" * 300,
    "z" * 70000,
    [],
    [1, [2, [3, {"a": None}]]],
    {},
    {"when": "2024-01-02T03:04:05Z", "nested": {"list": [1.5, "s", False]}},
    {"big": list(range(20)), "map": {str(i): i for i in range(20)}},
]


def test_dotnet_decodes_frames_exactly_as_python_encodes_them(dotnet_build: Path) -> None:
    """Every JSON and MessagePack type from orjson/msgpack arrives as the same data JSON."""
    lines = []
    for i, data in enumerate(SAMPLES):
        frame = {"type": "message", "id": f"{i}-1", "biz_id": "b", "event": "e", "data": data}
        frame["ts"] = 1.5
        lines.append("json " + orjson.dumps(frame).decode())
        lines.append("msgpack " + msgpack.packb(frame, use_bin_type=True).hex())
    lines.append("msgpack " + msgpack.packb({"type": "message", "data": b"\x00\xff"}).hex())
    lines.append("json " + '{"type":"message","data":1')
    lines.append("msgpack " + msgpack.packb({"type": "message"})[:-2].hex())
    result = subprocess.run(
        ["mono", "--debug", str(dotnet_build / "RelayDriver.exe"), "decode"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    )
    assert result.returncode == 0, result.stderr
    decoded = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(decoded) == len(lines)
    for i, data in enumerate(SAMPLES):
        via_json, via_msgpack = decoded[2 * i], decoded[2 * i + 1]
        # JSON: the data's own text, byte for byte; MessagePack: the same value.
        assert via_json["data_json"] == orjson.dumps(data).decode(), data
        assert orjson.loads(via_msgpack["data_json"]) == data, data
        for got in (via_json, via_msgpack):
            assert (got["type"], got["id"], got["event"], got["ts"]) == (
                "message",
                f"{i}-1",
                "e",
                1.5,
            )
    assert orjson.loads(decoded[-3]["data_json"]) == "AP8="  # bytes: base64
    assert "error" in decoded[-2] and "error" in decoded[-1]


# -- against the cluster -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_dotnet_client_receives_events_in_order(
    cluster: LocalCluster, drivers: Any, publisher: AsyncPublisher, fmt: str
) -> None:
    """Published events arrive once each, in publish order, with their data intact."""
    cid = f"dn-order-{fmt}"
    driver = await drivers(cluster.lb_ws(cid), cid, "--format", fmt, tokens=valid_tokens(cid))
    welcome = await driver.wait_event("connected")
    assert welcome["recovered"] is None  # no position yet: nothing to recover
    ids = []
    for seq in range(60):
        data = {"seq": seq, "text": 'héllo "q" {]', "when": "2024-01-02T03:04:05Z", "f": 0.1}
        result = await publisher.publish(cid, "label.created", data)
        ids.append(result.id)
    await driver.wait(lambda: len(driver.messages) >= 60, "60 messages")
    assert [m["id"] for m in driver.messages] == ids
    assert driver.seqs == list(range(60))
    first = driver.messages[0]
    assert (first["biz_id"], first["event"]) == (cid, "label.created")
    assert first["data"]["when"] == "2024-01-02T03:04:05Z"  # a string, not a DateTime
    assert orjson.loads(first["data_json"]) == first["data"]
    assert await driver.stop() == 0
    assert driver.of("stopped")[0]["last_id"] == ids[-1]


async def _failover(
    cluster: LocalCluster, drivers: Any, cid: str, sig: signal.Signals, what: str
) -> dict[str, Any]:
    """A driver under 20 events/s whose node gets ``sig``: it must be welcomed on the other
    node, recovered, holding every accepted event once and in order. Prints the figures;
    returns the Disconnected event for the caller's checks."""
    driver = await drivers(cluster.lb_ws(cid), cid, tokens=valid_tokens(cid))
    first = await driver.wait_event("connected")
    async with TickPublisher(cluster.redis_url, [cid], 0.05) as publisher:
        await publisher.wait_ticks(20)
        await driver.wait(lambda: len(driver.messages) >= 10, "live messages")
        signalled_at = time.time()
        cluster.signal_node(node_number(first["node"]), sig)
        await driver.wait_event("connected", 2)
        await publisher.wait_ticks(20)
    accepted = publisher.accepted[cid]
    await driver.wait(lambda: len(driver.messages) >= len(accepted), "every accepted event")
    gone, back = driver.of("disconnected")[0], driver.of("connected")[1]
    assert gone["will_reconnect"] is True
    assert back["node"] != first["node"]
    assert back["recovered"] is True
    assert driver.seqs == accepted  # every event, once, in order
    print(
        f"\nMEASURED .NET client, {what}: disconnected {gone['t'] - signalled_at:.3f} s after"
        f" the signal (code {gone['code']}), welcomed on {back['node']}"
        f" {back['t'] - gone['t']:.3f} s later ({back['t'] - signalled_at:.3f} s after the"
        f" signal), replayed {back['replayed']}; {len(accepted)} events published, 0 lost,"
        f" 0 handed over twice"
    )
    return gone


async def test_dotnet_client_resumes_on_another_node_after_a_drain_without_loss(
    cluster: LocalCluster, drivers: Any
) -> None:
    """SIGTERM of its node: 1012, back through nginx on the other node, recovered, nothing lost."""
    gone = await _failover(cluster, drivers, "dn-drain", signal.SIGTERM, "SIGTERM drain")
    # Mono (like .NET before 8) refuses a close frame with 1012 and aborts the socket: the
    # client says so and reconnects as after any lost connection. .NET 8 reports 1012.
    assert gone["code"] == 1012 or (gone["code"] == 1006 and "refused" in gone["reason"]), gone


async def test_dotnet_client_resumes_after_its_node_is_killed_without_loss(
    cluster: LocalCluster, drivers: Any
) -> None:
    """kill -9 of its node: 1006, back on the other node, recovered, nothing lost."""
    gone = await _failover(cluster, drivers, "dn-kill", signal.SIGKILL, "kill -9")
    assert gone["code"] == 1006 and "refused" not in gone["reason"], gone


async def test_dotnet_client_stops_for_good_when_replaced(
    cluster: LocalCluster, drivers: Any, publisher: AsyncPublisher
) -> None:
    """4000 (replaced by a newer session): no reconnect, Completion faults, it stays away."""
    cid = "dn-replaced"
    driver = await welcomed(drivers, cluster, cid)
    newer = Listener(f"{cluster.node_ws(1, cid)}?token={token(cid)}")
    await newer.connect()
    try:
        gone = await driver.wait_event("disconnected")
        assert (gone["code"], gone["will_reconnect"]) == (4000, False), gone
        completed = await driver.wait_event("completed")
        assert completed["code"] == 4000
        # A client that came back would ask for a token first, then replace the newer
        # session in turn: neither happens, and the newer session keeps the events.
        await publisher.publish(cid, "after", {"seq": 1})
        await newer.wait_messages(1)
        status = await driver.status()
        assert (status["token_requests"], status["connects"], status["connected"]) == (1, 1, False)
        assert newer.close_code is None
        assert not driver.messages
    finally:
        await newer.close()
    assert await driver.stop() == 0


async def test_dotnet_client_renews_an_expired_token_and_resumes(
    cluster: LocalCluster, drivers: Any
) -> None:
    """4500 (token expired while connected): a new token is asked for, resumed, nothing lost."""
    cid = "dn-expiry"
    ttls = {1: 3}  # the first token lives 3 s, the next ones an hour
    driver = await drivers(cluster.lb_ws(cid), cid, tokens=lambda n: token(cid, ttls.get(n, 3600)))
    await driver.wait_event("connected")
    async with TickPublisher(cluster.redis_url, [cid], 0.05) as publisher:
        gone = await driver.wait_event("disconnected")
        back = await driver.wait_event("connected", 2)
        await publisher.wait_ticks(10)
    accepted = publisher.accepted[cid]
    await driver.wait(lambda: len(driver.messages) >= len(accepted), "every accepted event")
    assert (gone["code"], gone["will_reconnect"]) == (4500, True), gone
    assert [e["n"] for e in driver.of("token_request")] == [1, 2]
    assert back["recovered"] is True
    assert driver.seqs == accepted
    print(
        f"\nMEASURED .NET client, token expiry: welcomed again {back['t'] - gone['t']:.3f} s"
        f" after the 4500, {len(accepted)} events, 0 lost"
    )


async def test_dotnet_client_asks_once_more_after_an_invalid_token(
    cluster: LocalCluster, drivers: Any
) -> None:
    """4001 with a token provider: one more token is asked for; a good one connects."""
    cid = "dn-4001-once"
    driver = await drivers(
        cluster.lb_ws(cid), cid, tokens=lambda n: "not-a-jwt" if n == 1 else token(cid)
    )
    await driver.wait_event("connected")
    gone = driver.of("disconnected")[0]
    assert (gone["code"], gone["will_reconnect"]) == (4001, True), gone
    assert len(driver.of("token_request")) == 2


async def test_dotnet_client_stops_after_a_second_invalid_token(
    cluster: LocalCluster, drivers: Any
) -> None:
    """4001 twice in a row: it stops, having asked for exactly two tokens."""
    cid = "dn-4001-twice"
    driver = await drivers(cluster.lb_ws(cid), cid, tokens=lambda n: f"not-a-jwt-{n}")
    completed = await driver.wait_event("completed")
    assert completed["code"] == 4001
    codes = [(e["code"], e["will_reconnect"]) for e in driver.of("disconnected")]
    assert codes == [(4001, True), (4001, False)]
    status = await driver.status()
    assert (status["token_requests"], status["connects"]) == (2, 0)


async def test_dotnet_client_restarted_with_a_file_cursor_gets_only_what_it_missed(
    cluster: LocalCluster, drivers: Any, publisher: AsyncPublisher, tmp_path: Path
) -> None:
    """A new process on the same FileCursorStore: recovered true, exactly the missed events."""
    cid = "dn-restart"
    cursor = tmp_path / "state" / "cursor"
    first = await drivers(
        cluster.lb_ws(cid), cid, "--cursor", str(cursor), tokens=valid_tokens(cid)
    )
    await first.wait_event("connected")
    for seq in range(5):
        await publisher.publish(cid, "tick", {"seq": seq})
    await first.wait(lambda: len(first.messages) >= 5, "the first 5 events")
    assert await first.stop() == 0
    assert cursor.read_text().strip() == first.messages[-1]["id"]

    missed = [(await publisher.publish(cid, "tick", {"seq": seq})).id for seq in range(5, 12)]
    second = await drivers(
        cluster.lb_ws(cid), cid, "--cursor", str(cursor), tokens=valid_tokens(cid)
    )
    welcome = await second.wait_event("connected")
    assert (welcome["recovered"], welcome["replayed"]) == (True, 7)
    await second.wait(lambda: len(second.messages) >= 7, "the 7 missed events")
    await publisher.publish(cid, "tick", {"seq": 12})
    await second.wait(lambda: len(second.messages) >= 8, "a live event after the replay")
    assert [m["id"] for m in second.messages[:7]] == missed
    assert second.seqs == list(range(5, 13))
    assert await second.stop() == 0


async def test_dotnet_client_killed_mid_handler_gets_that_event_again(
    cluster: LocalCluster, drivers: Any, publisher: AsyncPublisher, tmp_path: Path
) -> None:
    """At least once: the cursor moves after the handler returned, so a crash mid-handler
    redelivers that event after the restart (and the one before it is not repeated)."""
    cid = "dn-mid-handler"
    cursor = tmp_path / "cursor"
    flags = ("--cursor", str(cursor), "--handler-ms", "600000")
    first = await drivers(cluster.lb_ws(cid), cid, *flags[:2], tokens=valid_tokens(cid))
    await first.wait_event("connected")
    done = await publisher.publish(cid, "tick", {"seq": 0})
    await first.wait(lambda: len(first.messages) >= 1, "the first event")
    assert await first.stop() == 0
    busy = await drivers(cluster.lb_ws(cid), cid, *flags, tokens=valid_tokens(cid))
    await busy.wait_event("connected")
    caught = await publisher.publish(cid, "tick", {"seq": 1})
    await busy.wait(lambda: len(busy.messages) >= 1, "the event its handler is busy with")
    assert busy.proc is not None
    busy.proc.kill()  # the app dies inside the handler
    await busy.proc.wait()
    assert cursor.read_text().strip() == done.id
    again = await drivers(cluster.lb_ws(cid), cid, *flags[:2], tokens=valid_tokens(cid))
    welcome = await again.wait_event("connected")
    await again.wait(lambda: len(again.messages) >= 1, "the redelivered event")
    assert (welcome["recovered"], welcome["replayed"]) == (True, 1)
    assert [m["id"] for m in again.messages] == [caught.id]
    assert await again.stop() == 0


async def test_dotnet_client_raises_events_on_the_captured_context(
    cluster: LocalCluster, drivers: Any, publisher: AsyncPublisher
) -> None:
    """Started on a SynchronizationContext (the UI thread's stand-in): every handler runs on it."""
    cid = "dn-context"
    driver = await welcomed(drivers, cluster, cid, "--context")
    for seq in range(20):
        await publisher.publish(cid, "tick", {"seq": seq})
    await driver.wait(lambda: len(driver.messages) >= 20, "20 messages")
    assert await driver.stop() == 0
    raised = [e for e in driver.events if "on_context" in e]
    assert [e["ev"] for e in raised] == ["connected", *["message"] * 20, "disconnected"]
    assert all(e["on_context"] for e in raised), [e for e in raised if not e["on_context"]]
    assert driver.seqs == list(range(20))


async def test_dotnet_client_without_a_context_raises_events_off_it(
    cluster: LocalCluster, drivers: Any, publisher: AsyncPublisher
) -> None:
    """Started with no SynchronizationContext: handlers run on the client's own thread, in order."""
    cid = "dn-no-context"
    driver = await welcomed(drivers, cluster, cid)
    await publisher.publish(cid, "tick", {"seq": 0})
    await driver.wait(lambda: len(driver.messages) >= 1, "a message")
    assert await driver.stop() == 0
    assert not any(e.get("on_context") for e in driver.events)


async def test_dotnet_client_gives_up_a_frozen_node_and_resumes_elsewhere(
    cluster: LocalCluster, drivers: Any
) -> None:
    """SIGSTOP of its node (no close, no RST): silent 2 heartbeats → abort, resume, no loss."""
    cid = "dn-frozen"
    driver = await drivers(
        cluster.lb_ws(cid),
        cid,
        "--heartbeat",
        "1",
        "--connect-timeout",
        "3",
        tokens=valid_tokens(cid),
    )
    first = await driver.wait_event("connected")
    frozen = node_number(first["node"])
    try:
        async with TickPublisher(cluster.redis_url, [cid], 0.05) as publisher:
            await publisher.wait_ticks(10)
            stopped_at = time.time()
            cluster.signal_node(frozen, signal.SIGSTOP)
            await driver.wait(
                lambda: any(e["node"] != first["node"] for e in driver.of("connected")),
                "a welcome on the other node",
                30 * SECONDS,
            )
            await publisher.wait_ticks(10)
    finally:
        cluster.signal_node(frozen, signal.SIGCONT)
    accepted = publisher.accepted[cid]
    await driver.wait(lambda: len(driver.messages) >= len(accepted), "every accepted event")
    gone = driver.of("disconnected")[0]
    back = next(e for e in driver.of("connected") if e["node"] != first["node"])
    assert gone["code"] == 1006 and "no frame from the server for 2 s" in gone["reason"], gone
    assert 1.5 <= gone["t"] - stopped_at <= 10 * SECONDS
    assert back["recovered"] is True
    assert driver.seqs == accepted
    print(
        f"\nMEASURED .NET client, frozen node (SIGSTOP, heartbeat 1 s): gave up after"
        f" {gone['t'] - stopped_at:.3f} s, welcomed on {back['node']}"
        f" {back['t'] - stopped_at:.3f} s after the freeze;"
        f" {len(accepted)} events, 0 lost"
    )


# -- against a scripted node -------------------------------------------------------------------


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Any]]:
    started: list[ScriptedNode] = []

    async def start(scripts: list[Script]) -> ScriptedNode:
        node = ScriptedNode(scripts)
        started.append(node)
        await node.server.start_server()
        return node

    yield start
    for node in started:
        await node.server.close()


async def test_dotnet_client_drops_repeats_comparing_ids_as_integer_pairs(
    scripted: Any, drivers: Any
) -> None:
    """A replay overlapping what was handed over yields nothing twice; 10-0 comes after 9-0."""
    # 4508, not 1012: Mono's WebSocket refuses 1012 (see the drain test).
    node = await scripted(overlapping_replay(4508))
    driver = await drivers(node.url, "c", "--backoff-base", "0.05")
    await driver.wait(lambda: len(driver.messages) >= 4, "4 messages")
    status = await driver.status()
    assert [m["id"] for m in driver.messages] == ["9-0", "10-0", "11-0", "12-0"]
    assert status["duplicates"] == 3
    assert [q.get("since") for q in node.queries] == [None, "10-0"]
    instance, n1 = node.queries[0]["attempt"].split(".")
    assert node.queries[1]["attempt"] == f"{instance}.{int(n1) + 1}"
    assert await driver.stop() == 0


async def test_dotnet_client_stops_at_a_second_invalid_token_despite_a_failure_between(
    scripted: Any, drivers: Any
) -> None:
    """4001, a failed connect, 4001: no welcome came between, so it stops (as Python and JS)."""
    node = await scripted([([], 4001), ([], 1011), ([], 4001)])
    driver = await drivers(node.url, "c", "--backoff-base", "0.05", tokens=lambda n: f"t{n}")
    completed = await driver.wait_event("completed")
    assert completed["code"] == 4001
    codes = [(e["code"], e["will_reconnect"]) for e in driver.of("disconnected")]
    assert codes == [(4001, True), (1011, True), (4001, False)]
    assert len(node.queries) == 3


async def test_dotnet_client_completes_the_close_handshake_both_ways(
    scripted: Any, drivers: Any
) -> None:
    """It answers the server's close with the same code, and StopAsync sends 1000 and waits."""
    node = await scripted([([welcome("1-0")], 4508), ([welcome("1-0")], None)])
    driver = await drivers(node.url, "c", "--backoff-base", "0.05")
    await driver.wait_event("connected", 2)
    gone = driver.of("disconnected")[0]
    assert (gone["code"], gone["reason"], gone["will_reconnect"]) == (4508, "scripted", True)
    started = time.monotonic()
    assert await driver.stop() == 0
    assert time.monotonic() - started < 2 * SECONDS  # the reply came; no CloseTimeout wait
    await eventually(lambda: len(node.client_codes) == 2, what="the second close")
    assert node.client_codes == [4508, 1000]
    last = driver.of("disconnected")[-1]
    assert (last["code"], last["will_reconnect"]) == (1000, False)


# -- the console example -----------------------------------------------------------------------


async def test_dotnet_console_example_prints_events_and_stops_on_enter(
    cluster: LocalCluster, dotnet_build: Path, publisher: AsyncPublisher, tmp_path: Path
) -> None:
    """clients/dotnet/examples/console, built and run: prints the events, Enter stops it cleanly."""
    cid = "dn-console"
    proc = await asyncio.create_subprocess_exec(
        "mono",
        str(dotnet_build / "RelayConsole.exe"),
        cluster.lb_ws(cid),
        cid,
        "--cursor",
        str(tmp_path / "cursor"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "RELAY_TOKEN": token(cid)},
    )
    assert proc.stdin is not None and proc.stdout is not None
    lines: list[str] = []

    async def line_starting(prefix: str) -> str:
        assert proc.stdout is not None
        async with asyncio.timeout(20 * SECONDS):
            while True:
                raw = await proc.stdout.readline()
                assert raw, f"the example exited; it printed {lines}"
                lines.append(raw.decode().rstrip("\n"))
                if lines[-1].startswith(prefix):
                    return lines[-1]

    try:
        assert "recovered=none" in await line_starting("connected ")
        result = await publisher.publish(cid, "label.created", {"id": 7, "text": "hi"})
        printed = await line_starting("message ")
        assert printed == f'message {result.id} label.created {{"id":7,"text":"hi"}}'
        proc.stdin.write(b"\n")
        await proc.stdin.drain()
        assert await line_starting("stopped ") == f"stopped last_id={result.id}"
        assert await asyncio.wait_for(proc.wait(), 10 * SECONDS) == 0
        assert "disconnected code=1000 reason= reconnect=false" in lines
        assert (tmp_path / "cursor").read_text().strip() == result.id
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_dotnet_project_files_target_both_runtimes_and_reference_what_exists() -> None:
    """The csproj and XAML files (not buildable here) are well-formed XML; the projects name
    net462 and .NET 6 and point at real projects."""
    projects = sorted(DOTNET.rglob("*.csproj")) + sorted((ROOT / "examples").rglob("*.csproj"))
    assert {p.name for p in projects} >= {
        "Relay.Client.csproj",
        "RelayConsole.csproj",
        "WpfLabelClient.csproj",
    }
    for project in projects:
        root = ET.parse(project).getroot()
        frameworks = (root.findtext("PropertyGroup/TargetFrameworks") or "").split(";")
        assert "net462" in frameworks and any(f.startswith("net6.0") for f in frameworks), project
        for ref in root.iter("ProjectReference"):
            target = project.parent / ref.attrib["Include"].replace("\\", "/")
            assert target.resolve().is_file(), f"{project}: {ref.attrib['Include']}"
    for xaml in sorted((ROOT / "examples" / "wpf-label-client").glob("*.xaml")):
        ET.parse(xaml)
    library = ET.parse(DOTNET / "src" / "Relay.Client" / "Relay.Client.csproj").getroot()
    packages = {r.attrib["Include"] for r in library.iter("PackageReference")}
    assert packages <= {"Newtonsoft.Json", "Microsoft.NETFramework.ReferenceAssemblies"}
