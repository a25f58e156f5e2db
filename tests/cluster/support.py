"""Multi-process test support: the local cluster script, a fleet of resuming clients, a publisher.

:class:`LocalCluster` drives ``deploy/local-cluster.sh`` (so the nginx config under test is
the shipped template) and signals its processes directly to simulate crashes.
:class:`TrackingClient` is a deliberately small resuming client of its own — reconnect
forever, resume with ``since``, drop repeats by id — that records what a test needs to
measure: every welcome (when, which node, recovered), every close, the duplicates it
dropped. :class:`TickPublisher` publishes one event per client per tick through
``backend_adapter.AsyncPublisher`` and counts an event as accepted only once publish
returned, retrying a failed publish with the same ``mid`` until it is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from backend_adapter import AsyncPublisher
from relay.errors import PublishFailed
from relay.wire import StreamId, parse_id
from tests.support.timing import MS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "local-cluster.sh"
NGINX_BIN = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY_BIN = shutil.which("haproxy") or "/usr/sbin/haproxy"
API_KEY = "cluster-test-key"


def nginx_available() -> bool:
    return os.access(NGINX_BIN, os.X_OK)


def free_block(count: int) -> int:
    """A base port such that ``base .. base+count-1`` are free on 127.0.0.1 right now.

    Drawn below the kernel's ephemeral range (32768+), where outgoing connections of
    other tests could take them.
    """
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free block of loopback ports")


def node_env(**settings: Any) -> dict[str, str]:
    """The environment for the script: no inherited RELAY_*, then ``RELAY_<NAME>`` per setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_API_KEY"] = API_KEY
    env["NGINX_BIN"] = NGINX_BIN
    env["HAPROXY_BIN"] = HAPROXY_BIN
    for name, value in settings.items():
        env[f"RELAY_{name.upper()}"] = str(value)
    return env


class LocalCluster:
    """Redis (or an external one) + N relay nodes + nginx, via deploy/local-cluster.sh."""

    def __init__(
        self,
        directory: Path,
        nodes: int = 3,
        *,
        redis_url: str | None = None,
        balancer: str = "nginx",
        **settings: Any,
    ) -> None:
        self.dir = directory
        self.nodes = nodes
        self.external_redis = redis_url
        self.balancer = balancer
        self.env = node_env(**settings)
        self.base_port = 0
        self.started = False

    # -- script ---------------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 60_000 * MS) -> subprocess.CompletedProcess[str]:
        """Run the script with this cluster's --dir; raise with its output and logs if it fails."""
        result = subprocess.run(
            [str(SCRIPT), *args, "--dir", str(self.dir)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"local-cluster.sh {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{self.logs_tail()}"
            )
        return result

    def start(self) -> LocalCluster:
        args = ["start", "-n", str(self.nodes), "--balancer", self.balancer]
        if self.external_redis:
            args += ["--redis-url", self.external_redis]
        for attempt in range(3):  # a port taken between the probe and the start: try again
            self.base_port = free_block(self.nodes + 2)
            try:
                self.run(*args, "--base-port", str(self.base_port))
                break
            except RuntimeError as exc:
                if "is taken" not in str(exc) or attempt == 2:
                    raise
        self.started = True
        return self

    def stop(self) -> str:
        if not self.started:
            return ""
        self.started = False
        return self.run("stop", timeout=90_000 * MS).stdout

    def start_node(self, k: int) -> None:
        self.run("start-node", str(k))

    def describe_balancer(self) -> str:
        """The balancer and, for nginx, the parameters of its server lines."""
        if self.balancer != "nginx":
            return self.balancer
        params = self.env.get("NGINX_SERVER_PARAMS", "max_fails=0")
        return f"nginx ({params or 'no server parameters'})"

    def logs_tail(self, lines: int = 25) -> str:
        out = []
        for path in sorted((self.dir / "logs").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def log(self, name: str) -> str:
        path = self.dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_lines_naming(self, client_id: str, sessions: Iterable[str] = ()) -> list[str]:
        """The nodes' log lines about ``client_id`` (or its BizId) or one of ``sessions``,
        each prefixed with its node; in either log format."""
        words = [re.escape(client_id), *map(re.escape, sessions)]
        pattern = re.compile(
            r"""(?:client_id|biz_id|session)["']?[=:]\s*["']?(?:"""
            + "|".join(words)
            + r""")(?![\w-])"""
        )
        out = []
        for path in sorted((self.dir / "logs").glob("node*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if pattern.search(line):
                    out.append(f"{path.stem}: {line}")
        return out

    # -- addresses --------------------------------------------------------------------------

    @property
    def lb_port(self) -> int:
        return self.base_port

    @property
    def lb_http(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def redis_url(self) -> str:
        return self.external_redis or f"redis://127.0.0.1:{self.base_port + 1}/0"

    def node_port(self, k: int) -> int:
        return self.base_port + 1 + k

    def node_http(self, k: int) -> str:
        return f"http://127.0.0.1:{self.node_port(k)}"

    def lb_ws(self, client_id: str) -> str:
        return f"ws://127.0.0.1:{self.lb_port}/ws/{client_id}"

    def node_ws(self, k: int, client_id: str) -> str:
        return f"ws://127.0.0.1:{self.node_port(k)}/ws/{client_id}"

    # -- processes ----------------------------------------------------------------------------

    def pid(self, name: str) -> int:
        """The pid of ``nodeK``, ``nginx`` or ``redis`` from the script's pid files."""
        pidfiles = {"nginx": "nginx/nginx.pid", "haproxy": "haproxy/haproxy.pid"}
        path = self.dir / pidfiles.get(name, f"{name}.pid")
        return int(path.read_text().strip())

    def signal_node(self, k: int, sig: signal.Signals) -> None:
        os.kill(self.pid(f"node{k}"), sig)

    def exit_code(self, k: int) -> int | None:
        """Node k's exit code as its supervisor recorded it; None while it runs."""
        path = self.dir / f"node{k}.exit"
        text = path.read_text().strip() if path.exists() else ""
        return int(text) if text else None

    async def wait_exit(self, k: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.exit_code(k)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"node{k} still running after {timeout:.1f} s")
            await asyncio.sleep(50 * MS)
        return code

    def rss_kb(self, k: int) -> int:
        for line in Path(f"/proc/{self.pid(f'node{k}')}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


# -- HTTP helpers ----------------------------------------------------------------------------


async def get_json(
    http: aiohttp.ClientSession, url: str, *, api_key: str | None = API_KEY
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with http.get(url, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def readyz(http: aiohttp.ClientSession, base: str) -> int:
    try:
        async with http.get(f"{base}/readyz", timeout=aiohttp.ClientTimeout(total=2000 * MS)) as r:
            return r.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def relay_cli(*args: str) -> tuple[int, str, str]:
    """Run the ``relay`` console script; (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / ".venv" / "bin" / "relay")
        if (ROOT / ".venv" / "bin" / "relay").exists()
        else "relay",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- clients ---------------------------------------------------------------------------------


@dataclass
class Welcome:
    at: float  # time.monotonic() when it arrived
    node: str
    recovered: bool | None
    replayed: int
    session: str = ""


@dataclass
class Close:
    at: float
    code: int | None
    welcomed: bool  # the connection had got its welcome before it closed


@dataclass
class TrackingClient:
    """One client_id: reconnects for ever, resumes from the last id, drops repeats by id."""

    client_id: str
    url: str
    seqs: list[int] = field(default_factory=list)  # data["seq"] of each delivered message
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each, in step
    duplicates: int = 0
    welcomes: list[Welcome] = field(default_factory=list)
    closes: list[Close] = field(default_factory=list)
    connect_errors: int = 0
    last_id: str | None = None
    terminal: int | None = None  # a 4000-4499 close code: the client stopped
    _last: StreamId | None = None
    _ws: aiohttp.ClientWebSocketResponse | None = None
    _stopping: bool = False

    @property
    def node(self) -> str | None:
        """The node of the current connection (None between connections)."""
        return self.welcomes[-1].node if self._ws is not None and self.welcomes else None

    def welcomes_after(self, t: float) -> list[Welcome]:
        return [w for w in self.welcomes if w.at >= t]

    def first_arrival(self, min_seq: int) -> float | None:
        """When the first message with seq >= ``min_seq`` arrived (None: not yet)."""
        return next(
            (at for seq, at in zip(self.seqs, self.arrivals, strict=True) if seq >= min_seq), None
        )

    async def run(self, http: aiohttp.ClientSession) -> None:
        attempt = 0
        rng = random.Random()
        while not self._stopping:
            url = self.url + (f"?since={self.last_id}" if self.last_id else "")
            welcomed = False
            code: int | None = None
            try:
                async with http.ws_connect(
                    url, autoping=True, timeout=aiohttp.ClientWSTimeout(ws_close=2000 * MS)
                ) as ws:
                    self._ws = ws
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        frame = orjson.loads(msg.data)
                        kind = frame.get("type")
                        if kind == "message":
                            self._deliver(frame)
                        elif kind == "welcome":
                            welcomed = True
                            attempt = 0
                            self.welcomes.append(
                                Welcome(
                                    time.monotonic(),
                                    frame["node"],
                                    frame.get("recovered"),
                                    frame.get("replayed", 0),
                                    frame.get("session", ""),
                                )
                            )
                            if self.last_id is None:
                                self.last_id = frame.get("last_id")
                                if self.last_id:
                                    self._last = parse_id(self.last_id)
                    code = ws.close_code
            except (aiohttp.ClientError, OSError, TimeoutError):
                self.connect_errors += 1
            finally:
                self._ws = None
            self.closes.append(Close(time.monotonic(), code, welcomed))
            if self._stopping:
                return
            if code is not None and 4000 <= code < 4500:
                self.terminal = code
                return
            if (
                code == 1012
                or (code is not None and 4500 <= code < 5000)
                or (welcomed and code in (None, 1006))
            ):
                await asyncio.sleep(rng.uniform(0.0, 0.25))  # "at once", jittered
            else:
                await asyncio.sleep(rng.uniform(0.0, min(2.0, 0.05 * 2**attempt)))
                attempt += 1

    def _deliver(self, frame: dict[str, Any]) -> None:
        key = parse_id(frame["id"])
        if self._last is not None and key <= self._last:
            self.duplicates += 1
            return
        self._last = key
        self.last_id = frame["id"]
        self.seqs.append(frame["data"]["seq"])
        self.arrivals.append(time.monotonic())

    async def stop_connection(self) -> None:
        """Close the current connection from the client side; the client reconnects."""
        ws = self._ws
        if ws is not None and not ws.closed:
            await ws.close()

    async def stop(self) -> None:
        self._stopping = True
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2000 * MS)


class Fleet:
    """Many TrackingClients on one aiohttp session (TCPConnector(limit=0)), one task each."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.clients = {cid: TrackingClient(cid, url) for cid, url in urls.items()}
        self.http: aiohttp.ClientSession | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Fleet:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.tasks = [
            asyncio.create_task(c.run(self.http), name=f"client-{c.client_id}")
            for c in self.clients.values()
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(c.stop() for c in self.clients.values()))
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=5000 * MS)
            for task in pending:
                task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.close()

    def __iter__(self) -> Any:
        return iter(self.clients.values())

    def __len__(self) -> int:
        return len(self.clients)

    async def wait(self, predicate: Any, timeout: float, what: str) -> float:
        """Wait until ``predicate()``; the seconds it took. Fails with ``what`` on timeout."""
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
            await asyncio.sleep(20 * MS)
        return time.monotonic() - start

    async def wait_connected(self, timeout: float = 30_000 * MS) -> float:
        return await self.wait(
            lambda: all(c.node is not None for c in self), timeout, "every client's welcome"
        )

    def by_node(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for client in self:
            if client.node is not None:
                counts[client.node] = counts.get(client.node, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def duplicates(self) -> int:
        return sum(c.duplicates for c in self)


# -- publishing ---------------------------------------------------------------------------------


class TickPublisher:
    """Each tick publishes the next seq to every client, concurrently, with ``mid``s.

    A publish counts as accepted only once it returned. One that raised PublishFailed is
    retried with the same ``mid`` until it is accepted (the mid makes a publish that
    reached Redis before the failure a no-op), and the next tick starts only after
    every publish of this one was accepted, so each client's seqs are published in order.
    """

    def __init__(
        self, redis_url: str, client_ids: Iterable[str], interval: float, **publisher: Any
    ) -> None:
        publisher.setdefault("timeout", 1000 * MS)
        self.publisher = AsyncPublisher(redis_url, **publisher)
        self.client_ids = list(client_ids)
        self.interval = interval
        self.accepted: dict[str, list[int]] = {cid: [] for cid in self.client_ids}
        self.failures = 0  # PublishFailed raised (each then retried)
        self.last_failure = ""  # the message of the last one
        self.duplicates = 0  # publishes Redis reported as repeats of an earlier mid
        self.ticks = 0
        self.tick_times: list[float] = []  # monotonic start of each tick
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> TickPublisher:
        self._task = asyncio.create_task(self._run(), name="tick-publisher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop()
        finally:
            await self.publisher.close()

    async def stop(self) -> None:
        """Finish the tick in progress (all of it accepted), then stop."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def wait_ticks(self, count: int, timeout: float = 60_000 * MS) -> None:
        target = self.ticks + count
        deadline = time.monotonic() + timeout
        while self.ticks < target:
            if self._task is not None and self._task.done():
                self._task.result()
                raise AssertionError("publisher stopped")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"publisher made {self.ticks} of {target} ticks; last failure:"
                    f" {self.last_failure or 'none'}"
                )
            await asyncio.sleep(20 * MS)

    @property
    def total(self) -> int:
        return sum(len(seqs) for seqs in self.accepted.values())

    async def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            started = time.monotonic()
            self.tick_times.append(started)
            await asyncio.gather(*(self._publish(cid, seq) for cid in self.client_ids))
            seq += 1
            self.ticks += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self.interval - (time.monotonic() - started))):
                    await self._stop.wait()

    async def _publish(self, client_id: str, seq: int) -> None:
        while True:
            try:
                result = await self.publisher.publish(
                    client_id, "tick", {"seq": seq}, mid=f"{client_id}:{seq}"
                )
            except PublishFailed as exc:
                self.last_failure = str(exc)
                self.failures += 1
                await asyncio.sleep(100 * MS)
                continue
            self.duplicates += result.duplicate
            self.accepted[client_id].append(seq)
            return


def explain_drops(
    cluster: LocalCluster, clients: Iterable[TrackingClient], since: float, *, most: int = 5
) -> str:
    """Why ``clients`` connected again after ``since`` (monotonic): for each (up to ``most``),
    its closes and welcomes (seconds after ``since``) and the node log lines about it."""
    clients = list(clients)
    wall = datetime.fromtimestamp(time.time() - (time.monotonic() - since), UTC)
    codes = Counter(c.code for client in clients for c in client.closes if c.at >= since)
    out = [
        f"{len(clients)} clients dropped, closes by code {dict(codes)};"
        f" t=0 is {wall:%H:%M:%S.%f} UTC in the node logs"
    ]
    for client in clients[:most]:
        closes = [(round(c.at - since, 2), c.code) for c in client.closes]
        welcomes = [(round(w.at - since, 2), w.node, w.recovered) for w in client.welcomes]
        out.append(
            f"{client.client_id}: closes (s, code) {closes}; welcomes (s, node, recovered)"
            f" {welcomes}"
        )
        lines = cluster.log_lines_naming(client.client_id, (w.session for w in client.welcomes))
        out.extend(f"    {line}" for line in lines[-20:])
    return "\n".join(out)


def missing_and_extra(fleet: Fleet, accepted: dict[str, list[int]]) -> tuple[int, int, list[str]]:
    """(events accepted but not delivered, events delivered out of order or twice, examples)."""
    missing = wrong = 0
    examples: list[str] = []
    for client in fleet:
        want = accepted[client.client_id]
        got = client.seqs
        if got != want:
            lost = sorted(set(want) - set(got))
            missing += len(lost)
            wrong += len(got) - len(set(got)) + sum(1 for a, b in itertools.pairwise(got) if b <= a)
            if len(examples) < 5:
                examples.append(
                    f"{client.client_id}: want {want[:3]}..{want[-3:]} got "
                    f"{len(got)}, lost {lost[:10]}, welcomes {client.welcomes[-3:]}"
                )
    return missing, wrong, examples


async def wait_delivered(fleet: Fleet, accepted: dict[str, list[int]], timeout: float) -> float:
    """Wait until every client holds every accepted seq; the seconds it took."""

    def done() -> bool:
        return all(len(c.seqs) >= len(accepted[c.client_id]) for c in fleet)

    start = time.monotonic()
    while not done() and time.monotonic() - start < timeout:
        await asyncio.sleep(50 * MS)
    return time.monotonic() - start
