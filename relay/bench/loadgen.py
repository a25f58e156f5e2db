"""The load generator: the benchmark's WebSocket clients, in a process of their own.

``python -m relay.bench.loadgen`` reads one JSON command a line on stdin and answers
each with one JSON line on stdout (logs go to stderr). The orchestrator drives it:

    connect    {"urls", "prefix", "start", "count", "concurrency", "reconnect",
                "reconnect_concurrency", "jitter", "source"}
               starts clients ``prefix+start`` … in the background; answers at once.
               ``source``: the local address to connect from (127.0.0.2, …): each
               source address has its own ephemeral ports, ~28,000 on Linux
    expect     {"count"}   resets delivery accounting for events seq 0..count-1
    stats      {}          counters (connected, delivered, lost so far, …)
    latencies  {"path"}    writes every latency (ms, float64) to ``path``
    resumes    {}          per-client reconnect figures of a storm
    close      {}          closes every client and exits

Each client keeps the id of the last message it processed and drops any message whose
id is not newer (a replay overlapping what it already had), exactly as the SDK does. A
client that loses its node reconnects to the next URL of ``urls`` (what a load balancer
does once the dead node fails its health check) with ``since=`` that id.

Latency is the receive time minus ``data.ts``, which the publisher stamps (epoch ms)
just before it sends: both processes read the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import random
import secrets
import socket
import sys
import time
from array import array
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import WSMsgType

from relay.backoff import Backoff
from relay.client import Action, plan_reconnect, reconnect_delay
from relay.wire import StreamId, format_id, parse_id

__all__ = ["main"]

# The SDK's defaults (relay.client.RelayClient): what real clients of a dead node do.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
CONNECT_TIMEOUT = 10.0  # handshake and welcome
FIRST_CONNECT_TRIES = 3


class Tally:
    """Delivery accounting for one phase: events seq 0..count-1, each expected once."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = bytearray(count)
        self.latencies = array("d")
        self.delivered = 0
        self.dup = 0
        self.misrouted = 0
        self.bad = 0
        self.first_recv = 0.0
        self.last_recv = 0.0

    def deliver(self, client_id: str, biz_id: Any, data: Any, now_ms: float) -> None:
        try:
            seq = data["seq"]
            latency = now_ms - data["ts"]
        except (TypeError, KeyError):
            self.bad += 1
            return
        if not (isinstance(seq, int) and 0 <= seq < self.count):
            self.bad += 1
            return
        if self.seen[seq]:
            self.dup += 1
            return
        self.seen[seq] = 1
        self.latencies.append(latency)
        self.delivered += 1
        if biz_id != client_id or data.get("biz", client_id) != client_id:
            self.misrouted += 1
        if not self.first_recv:
            self.first_recv = now_ms
        self.last_recv = now_ms


class Client:
    """One simulated client: its id, its position in the stream, its reconnect story."""

    __slots__ = (
        "attempts",
        "dropped_at",
        "handshakes",
        "id",
        "last",
        "ready",
        "recovered",
        "resumed_at",
        "url_index",
    )

    def __init__(self, client_id: str) -> None:
        self.id = client_id
        self.last: StreamId | None = None
        self.ready = False
        self.url_index = 0
        self.dropped_at = 0.0
        self.resumed_at = 0.0
        self.recovered: bool | None = None
        self.attempts = 0
        self.handshakes = 0


class _Refused(Exception):
    """A connect that did not end in a welcome; ``code`` is the close code, if any."""

    def __init__(self, code: int | None) -> None:
        super().__init__(code)
        self.code = code


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+


def _port_at_connect(addr_info: Any) -> socket.socket:
    """A client socket whose bind to (source, 0) leaves the port to connect().

    Without IP_BIND_ADDRESS_NO_PORT, bind() picks a port no other socket of that address
    holds, a search that grows with every socket bound: at ~15,000 clients per address
    the kernel spent most of the load generators' time there (connects fell from ~1,300/s
    to ~200/s, and reconnects after a drain timed out). connect() needs the port to be
    unique only per destination.
    """
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    return sock


class LoadGen:
    def __init__(self) -> None:
        self.http: aiohttp.ClientSession | None = None
        self.clients: list[Client] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.tally = Tally(0)
        self.rng = random.Random(7)
        self.urls: list[str] = []
        self.reconnect = False
        self.jitter = 0.25
        self.gate = asyncio.Semaphore(200)  # handshakes in flight on the first connect
        self.regate = asyncio.Semaphore(200)  # and on reconnects (a herd: many)
        self.failed = 0
        self.closed_after_ready = 0
        self.stale_dropped = 0  # messages not newer than the client's last id
        self.errors = 0
        self.other_frames = 0
        self.refused = 0  # handshakes that failed: refused, reset, timed out
        self.handshake_errors: dict[str, int] = {}  # by exception (and HTTP status)
        self.timeouts = 0  # upgraded, but no welcome within CONNECT_TIMEOUT
        self.stopped = 0  # clients told to stop by a terminal close code (4000-4499)
        self.codes: dict[str, int] = {}
        self.last_ready_at = 0.0

    # -- commands --------------------------------------------------------------------------

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd.get("cmd")
        if name == "connect":
            await self.connect(cmd)
            return {"ok": True}
        if name == "expect":
            self.tally = Tally(int(cmd["count"]))
            return {"ok": True}
        if name == "stats":
            return self.stats()
        if name == "latencies":
            with open(cmd["path"], "wb") as f:
                self.tally.latencies.tofile(f)
            return {"ok": True, "n": len(self.tally.latencies)}
        if name == "resumes":
            return self.resumes()
        if name == "close":
            await self.close()
            return {"ok": True}
        return {"error": f"unknown command {name!r}"}

    async def connect(self, cmd: dict[str, Any]) -> None:
        if self.http is None:
            source = cmd.get("source")
            self.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0,
                    force_close=False,
                    local_addr=(source, 0) if source else None,
                    socket_factory=_port_at_connect if source else None,
                ),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        self.urls = [u.rstrip("/") for u in cmd["urls"]]
        self.instance = secrets.token_urlsafe(6)
        self.reconnect = bool(cmd.get("reconnect", False))
        self.jitter = float(cmd.get("jitter", 0.25))
        self.gate = asyncio.Semaphore(int(cmd.get("concurrency", 200)))
        self.regate = asyncio.Semaphore(int(cmd.get("reconnect_concurrency", 200)))
        prefix, start, count = str(cmd["prefix"]), int(cmd["start"]), int(cmd["count"])
        fresh = [Client(f"{prefix}{i}") for i in range(start, start + count)]
        self.clients.extend(fresh)
        for client in fresh:
            task = asyncio.create_task(self.run_client(client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def stats(self) -> dict[str, Any]:
        t = self.tally
        ready = sum(1 for c in self.clients if c.ready)
        return {
            "clients": len(self.clients),
            "ready": ready,
            "failed": self.failed,
            "closed_after_ready": self.closed_after_ready,
            "expected": t.count,
            "delivered": t.delivered,
            "dup": t.dup,
            "misrouted": t.misrouted,
            "bad": t.bad,
            "stale_dropped": self.stale_dropped,
            "first_recv_ms": t.first_recv,
            "last_recv_ms": t.last_recv,
            "last_ready_at": self.last_ready_at,
            "errors": self.errors,
            "other_frames": self.other_frames,
            "dropped": sum(1 for c in self.clients if c.dropped_at),
            "resumed": sum(1 for c in self.clients if c.resumed_at),
        }

    def resumes(self) -> dict[str, Any]:
        dropped = [c for c in self.clients if c.dropped_at]
        return {
            "dropped": len(dropped),
            "first_drop_at": min((c.dropped_at for c in dropped), default=0.0),
            "resumed_at": [c.resumed_at for c in dropped if c.resumed_at],
            "not_recovered": sum(1 for c in dropped if c.resumed_at and c.recovered is False),
            "attempts": sum(c.attempts for c in dropped),
            "refused": self.refused,
            "welcome_timeouts": self.timeouts,
            "handshake_errors": self.handshake_errors,
            "stopped_terminal": self.stopped,
            "codes": self.codes,
        }

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=10)
        if self.http is not None:
            await self.http.close()

    # -- one client --------------------------------------------------------------------------

    def _url(self, client: Client) -> str:
        # Like the SDK: `attempt` counts this client's handshakes, so a stale one it gave
        # up on never replaces the newer one.
        client.handshakes += 1
        url = f"{self.urls[client.url_index % len(self.urls)]}/ws/{client.id}"
        url += f"?attempt={self.instance}.{client.handshakes}"
        return url if client.last is None else f"{url}&since={format_id(client.last)}"

    async def run_client(self, client: Client) -> None:
        failures = 0
        while True:
            if client.dropped_at:
                client.attempts += 1
            try:
                ws = await self._open(client)
            except _Refused as exc:
                failures += 1
                key = str(exc.code) if exc.code is not None else "no welcome"
                self.codes[key] = self.codes.get(key, 0) + 1
                if exc.code is not None and 4000 <= exc.code <= 4499:
                    self.stopped += 1
                    if not client.ready:
                        self.failed += 1
                    return
                if not client.dropped_at and failures >= FIRST_CONNECT_TRIES:
                    self.failed += 1
                    return
                # Refused or overloaded: try the same address again (the balancer
                # stopped sending anyone to a dead node; it only moves us on a drop).
                await asyncio.sleep(self._backoff(failures))
                continue
            failures = 0
            code = await self._read(client, ws)
            client.dropped_at = client.dropped_at or time.time()
            if not self.reconnect:
                self.closed_after_ready += 1
                return
            key = str(code)
            self.codes[key] = self.codes.get(key, 0) + 1
            plan = plan_reconnect(code, can_renew=False)
            if plan.action is Action.STOP:
                self.stopped += 1
                return
            if code == 1012 or code == 1006 or 4500 <= code <= 4999:
                # The node went away (1006: killed, no close frame): the load balancer
                # sends the reconnect to the next address.
                client.url_index += 1
            await asyncio.sleep(self._reconnect_delay(plan.action))

    def _backoff(self, attempt: int) -> float:
        return Backoff(BACKOFF_BASE, BACKOFF_CAP).delay(attempt, self.rng)

    def _reconnect_delay(self, action: Action) -> float:
        """The SDK's wait after a welcomed session ended (``relay.client.reconnect_delay``):
        "at once" (1012, 4500-4999) within ``jitter`` (the SDK's 0.25 s by default), and
        full-jitter backoff from 0.5 s after anything else. A killed node's clients see
        1006, no close frame, and so back off: up to 0.5 s, not 0.25."""
        if action is Action.AT_ONCE:
            return self.rng.uniform(0.0, self.jitter)
        return reconnect_delay(action, 0, BACKOFF_BASE, BACKOFF_CAP, self.rng)

    async def _open(self, client: Client) -> aiohttp.ClientWebSocketResponse:
        """Handshake and welcome, or _Refused."""
        assert self.http is not None
        async with self.regate if client.dropped_at else self.gate:
            deadline = asyncio.get_running_loop().time() + CONNECT_TIMEOUT
            try:
                async with asyncio.timeout_at(deadline):
                    ws = await self.http.ws_connect(
                        self._url(client),
                        autoclose=True,
                        autoping=True,
                        compress=0,
                        max_msg_size=0,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
                    )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.refused += 1
                why = f"{type(exc).__name__} {getattr(exc, 'status', '')}".strip()
                code = getattr(exc, "errno", None)
                if code:  # OSError says little: ECONNRESET, EADDRNOTAVAIL, EMFILE, …
                    why += f" {errno.errorcode.get(code, code)}"
                self.handshake_errors[why] = self.handshake_errors.get(why, 0) + 1
                raise _Refused(None) from None
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await ws.receive()
            except TimeoutError:
                self.timeouts += 1
                await ws.close()
                raise _Refused(None) from None
            if msg.type is not WSMsgType.TEXT:
                code = ws.close_code
                await ws.close()
                raise _Refused(code if code is not None else 1006)
            frame = orjson.loads(msg.data)
            if frame.get("type") != "welcome":
                await ws.close()
                raise _Refused(None)
        if client.last is None:
            # Resume from the head of history even if nothing was delivered yet.
            client.last = parse_id(frame["last_id"])
        now = time.time()
        if client.dropped_at:
            client.resumed_at = now
            client.recovered = frame.get("recovered")
        else:
            client.ready = True
        self.last_ready_at = now
        return ws

    async def _read(self, client: Client, ws: aiohttp.ClientWebSocketResponse) -> int:
        """Deliver messages until the connection ends; returns the close code (1006: none)."""
        receive = ws.receive
        loads = orjson.loads
        clock = time.time
        client_id = client.id
        try:
            while True:
                try:
                    msg = await receive()
                except (aiohttp.ClientError, OSError):  # the auto-pong met a closing socket
                    break
                if msg.type is WSMsgType.TEXT:
                    frame = loads(msg.data)
                    if frame.get("type") != "message":
                        if frame.get("type") == "error":
                            self.errors += 1
                        else:
                            self.other_frames += 1
                        continue
                    sid = parse_id(frame["id"])
                    last = client.last
                    if last is not None and sid <= last:
                        self.stale_dropped += 1
                        continue
                    client.last = sid
                    self.tally.deliver(
                        client_id, frame.get("biz_id"), frame.get("data"), clock() * 1000.0
                    )
                elif msg.type is not WSMsgType.BINARY:  # CLOSE, CLOSING, CLOSED, ERROR
                    break
        finally:
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()
        code = ws.close_code
        return 1006 if code is None else int(code)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    gen = LoadGen()
    out = sys.stdout.buffer
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = orjson.loads(line)
            try:
                reply = await gen.handle(cmd)
            except Exception as exc:  # reported to the orchestrator, which gives up
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(orjson.dumps(reply) + b"\n")
            out.flush()
            if cmd.get("cmd") == "close":
                break
    finally:
        await gen.close()


# Collections of the cyclic garbage collector: the young generation every 100,000 net
# allocations instead of 700, and the whole heap (every client's objects) about never.
# With the defaults, full collections that walk 5,000-10,000 aiohttp connections were
# 48-66 % of a load generator's CPU in a reconnect storm (py-spy --native), and delayed
# the herd by seconds: the storm measured the clients' collector, not the node.
GC_THRESHOLDS: Final = (100_000, 20, 100)


def main() -> None:
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(_serve())
    else:
        uvloop.run(_serve())


if __name__ == "__main__":
    main()
