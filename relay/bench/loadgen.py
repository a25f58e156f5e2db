"""The load generator: the benchmark's WebSocket clients, in a process of their own.

``python -m relay.bench.loadgen`` reads one JSON command a line on stdin and answers
each with one JSON line on stdout (logs go to stderr). The orchestrator drives it:

    connect    {"urls", "prefix", "start", "count", "concurrency", "reconnect",
                "reconnect_concurrency", "jitter", "source"}
               starts clients ``prefix+start`` … in the background; answers at once.
               ``source``: the local address(es) to connect from, comma-separated
               (127.0.0.2,127.0.0.3, …), one per client in turn: each source address
               has its own ephemeral ports, ~28,000 on Linux
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
from typing import Any, Final, cast
from urllib.parse import urlsplit

import orjson

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
        "source",
        "url_index",
    )

    def __init__(self, client_id: str, source: str | None = None) -> None:
        self.id = client_id
        self.source = source  # the local address it connects from, as a host has one
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


class _NoUpgrade(Exception):
    """The handshake failed before the upgrade; the message says why (for the report)."""


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+


def _client_socket(source: str | None) -> socket.socket:
    """A non-blocking client socket; bound to ``(source, 0)`` with the port left to connect().

    Without IP_BIND_ADDRESS_NO_PORT, bind() picks a port no other socket of that address
    holds, a search that grows with every socket bound: at ~15,000 clients per address
    the kernel spent most of the load generators' time there (connects fell from ~1,300/s
    to ~200/s, and reconnects after a drain timed out). connect() needs the port to be
    unique only per destination.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if source:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            sock.bind((source, 0))
        except OSError:
            sock.close()
            raise
    return sock


# The rest of every upgrade request. The key is the same for every client: only the node
# reads it, and the load generator does not check the accept header it answers with.
_REQUEST_TAIL: Final = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
_MAX_HEAD: Final = 16384  # an upgrade response longer than this is not one
# A client's frames must be masked (RFC 6455 §5.3); a zero key leaves the payload as it
# is, and the only frames these clients send are a pong and a close reply.
_ZERO_MASK: Final = b"\x00\x00\x00\x00"


class _Connection(asyncio.Protocol):
    """One client's WebSocket connection, as little of one as the benchmark needs.

    The load generator's clients must cost less CPU than the node they measure. Through
    aiohttp's client a handshake cost a load generator 360-450 µs of CPU, twice the
    node's, so a reconnect storm on a busy machine measured the clients (see
    docs/benchmarks.md, 2026-12-06). Here the upgrade request is one pre-built write, the
    101 response is only checked for its status, and each server frame is handled where
    it arrives: a Relay node sends whole frames (never fragmented), unmasked, text for
    JSON. The welcome updates the client and resolves ``welcome``; messages go to the
    tally as :meth:`LoadGen.deliver` says; pings are answered; a close frame is answered
    and its code resolves ``closed`` once the socket ends (1006 when it ends without one).
    """

    def __init__(self, gen: LoadGen, client: Client, request: bytes) -> None:
        loop = gen.loop
        self.gen = gen
        self.client = client
        self.request = request
        self.welcome: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's TCPTransport is no asyncio.Transport subclass
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        code = 1006 if self.close_code is None else self.close_code
        if not self.welcome.done():
            if self.upgraded:
                self.welcome.set_exception(_Refused(code))
            else:
                why = "closed before the upgrade" if exc is None else _why(exc)
                self.welcome.set_exception(_NoUpgrade(why))
        if not self.closed.done():
            self.closed.set_result(code)

    def data_received(self, data: bytes) -> None:
        if self.close_code is not None:
            return  # closing: the node ends the socket
        buf = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._no_upgrade("response head too long")
                else:
                    self.buffer = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self._no_upgrade("HTTP " + buf[9:12].decode("latin-1"))
                return
            self.upgraded = True
            buf = buf[end + 4 :]
        pos, available = 0, len(buf)
        while available - pos >= 2:
            first, size = buf[pos], buf[pos + 1]
            if first & 0xF0 != 0x80 or size & 0x80:  # a fragment, RSV bits, or masked
                self._protocol_error()
                return
            head = 2
            if size >= 126:
                head = 4 if size == 126 else 10
                if available - pos < head:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + head])
            end = pos + head + size
            if end > available:
                break
            payload = buf[pos + head : end]
            pos = end
            opcode = first & 0x0F
            if opcode == 0x1:  # text
                if self.welcome.done():
                    self.gen.deliver(self.client, payload)
                else:
                    self._welcomed(payload)
            elif opcode == 0x9:  # ping: the pong carries its payload
                self._send(0x8A, payload)
            elif opcode == 0x8:  # close: answered with its code; the node ends the socket
                self.close_code = int.from_bytes(payload[:2]) if size >= 2 else 1005
                self._send(0x88, payload[:2])
                self.buffer = b""
                return
            elif opcode != 0x2 and opcode != 0xA:  # binary and pong are ignored
                self._protocol_error()
                return
        self.buffer = buf[pos:]

    def _send(self, first: int, payload: bytes) -> None:
        """A control frame (payload ≤ 125 bytes), masked as a client's must be."""
        assert self.transport is not None
        self.transport.write(bytes((first, 0x80 | len(payload))) + _ZERO_MASK + payload)

    def _welcomed(self, payload: bytes) -> None:
        frame = orjson.loads(payload)
        if frame.get("type") != "welcome":
            self.welcome.set_exception(_Refused(None))
            self.abort()
            return
        client = self.client
        if client.last is None:
            # Resume from the head of history even if nothing was delivered yet.
            client.last = parse_id(frame["last_id"])
        now = time.time()
        if client.dropped_at:
            client.resumed_at = now
            client.recovered = frame.get("recovered")
        else:
            client.ready = True
        self.gen.last_ready_at = now
        self.welcome.set_result(None)

    def _no_upgrade(self, why: str) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(_NoUpgrade(why))
        self.abort()

    def _protocol_error(self) -> None:
        self.gen.errors += 1
        self.close_code = 1002
        self.abort()


def _why(exc: BaseException) -> str:
    """An exception as the report counts handshake errors: its type and errno name."""
    why = type(exc).__name__
    code = getattr(exc, "errno", None)
    if code:  # OSError says little: ECONNRESET, EADDRNOTAVAIL, EMFILE, …
        why += f" {errno.errorcode.get(code, code)}"
    return why


class LoadGen:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.clients: list[Client] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.tally = Tally(0)
        self.rng = random.Random(7)
        self.urls: list[tuple[str, int, str]] = []  # host, port, request head after line 1
        self.sources: list[str] = []
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
        self.sources = [s for s in str(cmd.get("source") or "").split(",") if s]
        self.urls = []
        for url in cmd["urls"]:
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            self.urls.append((host, port, f"Host: {parts.netloc}\r\n{_REQUEST_TAIL}"))
        self.instance = secrets.token_urlsafe(6)
        self.reconnect = bool(cmd.get("reconnect", False))
        self.jitter = float(cmd.get("jitter", 0.25))
        self.gate = asyncio.Semaphore(int(cmd.get("concurrency", 200)))
        self.regate = asyncio.Semaphore(int(cmd.get("reconnect_concurrency", 200)))
        prefix, start, count = str(cmd["prefix"]), int(cmd["start"]), int(cmd["count"])
        sources: list[str | None] = [*self.sources] or [None]
        fresh = [
            Client(f"{prefix}{i}", sources[i % len(sources)]) for i in range(start, start + count)
        ]
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

    # -- one client --------------------------------------------------------------------------

    def _request(self, client: Client) -> tuple[str, int, bytes]:
        """The address of the client's node and its upgrade request.

        Like the SDK: ``attempt`` counts this client's handshakes, so a stale one it gave
        up on never replaces the newer one."""
        client.handshakes += 1
        host, port, tail = self.urls[client.url_index % len(self.urls)]
        query = f"attempt={self.instance}.{client.handshakes}"
        if client.last is not None:
            query += f"&since={format_id(client.last)}"
        return host, port, f"GET /ws/{client.id}?{query} HTTP/1.1\r\n{tail}".encode()

    async def run_client(self, client: Client) -> None:
        failures = 0
        while True:
            if client.dropped_at:
                client.attempts += 1
            try:
                conn = await self._open(client)
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
            try:
                code = await conn.closed
            finally:
                conn.abort()  # cancelled (the close command), or the node closed first
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

    async def _open(self, client: Client) -> _Connection:
        """Handshake and welcome, or _Refused."""
        async with self.regate if client.dropped_at else self.gate:
            host, port, request = self._request(client)
            conn = _Connection(self, client, request)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await self._dial(host, port, conn)
                    await conn.welcome
            except (OSError, TimeoutError, _NoUpgrade) as exc:
                conn.welcome.cancel()  # nobody waits for it now
                conn.abort()
                if conn.upgraded:  # upgraded, but no welcome in time
                    self.timeouts += 1
                    raise _Refused(None) from None
                self.refused += 1
                why = str(exc) if isinstance(exc, _NoUpgrade) else _why(exc)
                self.handshake_errors[why] = self.handshake_errors.get(why, 0) + 1
                raise _Refused(None) from None
            except BaseException:  # _Refused, or cancelled by the close command
                conn.welcome.cancel()
                conn.abort()
                raise
        return conn

    async def _dial(self, host: str, port: int, conn: _Connection) -> None:
        sock = _client_socket(conn.client.source)
        try:
            await self.loop.sock_connect(sock, (host, port))
            await self.loop.create_connection(lambda: conn, sock=sock)
        except BaseException:
            sock.close()
            raise

    def deliver(self, client: Client, payload: bytes) -> None:
        """A text frame after the welcome: a message is delivered once, unless not newer
        than the client's last id (a replay overlapping what it already had)."""
        frame = orjson.loads(payload)
        kind = frame.get("type")
        if kind != "message":
            if kind == "error":
                self.errors += 1
            else:
                self.other_frames += 1
            return
        sid = parse_id(frame["id"])
        last = client.last
        if last is not None and sid <= last:
            self.stale_dropped += 1
            return
        client.last = sid
        now_ms = time.time() * 1000.0
        self.tally.deliver(client.id, frame.get("biz_id"), frame.get("data"), now_ms)


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
# With the defaults, full collections that walk 5,000-10,000 clients (of aiohttp's client,
# before _Connection) were 48-66 % of a load generator's CPU in a reconnect storm (py-spy
# --native), and delayed the herd by seconds: the storm measured the clients' collector.
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
