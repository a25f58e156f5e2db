"""The listener of ``relay serve``: WebSocket upgrades on the bare socket, the rest to aiohttp.

An aiohttp WebSocket keeps a request, a response, a reader queue, two tasks and a
heartbeat timer alive per connection: about 15 KB and 170 µs of CPU per connect before
Relay does anything (docs/benchmarks.md). Here a connection that starts with
``GET /ws/`` is one asyncio Protocol: the request head is parsed once and dropped, the
frame parser is :mod:`relay.frames`, the protocol object is the session's Transport,
and server pings come from one sweep over all connections instead of a timer each.
Every other request (the API, health, metrics) is handed, bytes and socket, to
aiohttp's own protocol.

This is the only WebSocket server: a WebSocket upgrade that arrives on a keep-alive
connection aiohttp is serving (a proxy reusing an idle upstream connection), and an
observer's ``/observe/`` (``relay tail``), are taken back from aiohttp by :func:`adopt`
and served by an EdgeConnection like any other, and
``--compress`` only adds permessage-deflate (:mod:`relay.deflate`) to the connections
whose client offers it. Validation, authentication and inbound frames are
:mod:`relay.ws`'s.

What one client costs is bounded whatever it sends (docs/security.md): every frame,
control frames and empty fragments included, is charged against ``--client-frame-rate``
(1008 beyond); pings are answered at most ``--client-ping-rate`` times a second and
never into a write buffer above its high-water mark (RFC 6455 §5.5.3 lets a server
answer only the latest); and a client that does not read what it is sent is not read
either until its buffer drains. The bytes held per connection are :meth:`EdgeConnection.held`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast
from urllib.parse import unquote

import structlog
from aiohttp import web

from relay.deflate import Agreement, Deflater, Inflater, negotiate
from relay.errors import AuthError
from relay.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RSV1,
    SHORT_FRAME,
    SHORT_HEADERS,
    FrameError,
    FrameParser,
    Inflating,
    accept_key,
    close_frame,
    frame_header,
    parse_close,
)
from relay.log import bad_request
from relay.node import Node
from relay.protocol import CloseCode, encode_http_error
from relay.session import RateLimiter, Session
from relay.ws import (
    Admission,
    Inbound,
    Refused,
    admit,
    authenticate,
    authorise_observer,
    open_session,
    session_failed,
)

__all__ = ["EDGE_KEY", "Edge", "EdgeConnection", "adopt", "adopt_observer"]

log = structlog.get_logger("relay.edge")

WS_PREFIX: Final = b"GET /ws/"
MAX_LINE: Final = 8190  # aiohttp's limits for a request line and for one header line
MAX_HEADERS: Final = 100
OPENING_HOLD: Final = 64 * 1024  # bytes held with the 101 while a session opens, at most

_HEAD, _CONNECTING, _OPEN, _CLOSED = range(4)
_SPACE: Final = " \t\n\r\x0b\x0c"  # what bytes.strip() strips (str.strip() strips more)


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _http_error(status: int, code: str, message: str, headers: dict[str, str]) -> bytes:
    body = encode_http_error(code, message)
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


def parse_head(head: bytes) -> tuple[str, dict[str, str], dict[str, str]]:
    """Client id, query (first value of each name) and lower-case headers of a
    ``GET /ws/<client_id>`` request head; raises Refused."""
    # Decoded once (latin-1: one byte, one character), not twice per header, and the
    # query split by hand as parse_qsl(keep_blank_values=True) does: an aiohttp client's
    # head (8 headers, 2 query fields) 13.4 -> 6.6 µs, a `ws` client's 7.8 -> 3.9 µs.
    lines = head.decode("latin-1").split("\r\n")
    if max(map(len, lines)) > MAX_LINE:
        raise Refused(400, "bad_request", "request line or header too long")
    if len(lines) - 1 > MAX_HEADERS:
        raise Refused(400, "bad_request", "too many headers")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1":
        raise Refused(400, "bad_request", "bad request line")
    target = parts[1]
    if not target.isascii():
        raise Refused(400, "bad_request", "bad request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip(_SPACE) or " " in name or "\t" in name:
            raise Refused(400, "bad_request", "bad header line")
        key = name.lower()
        text = value.strip(" \t")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    path, _, query_string = target.partition("?")
    segment = path[len("/ws/") :]
    if not segment or "/" in segment:
        raise Refused(404, "not_found", "not found")
    query: dict[str, str] = {}
    for field in query_string.split("&"):  # what parse_qsl(keep_blank_values=True) does
        if field:
            name, _, content = field.partition("=")
            query.setdefault(unquote(name.replace("+", " ")), unquote(content.replace("+", " ")))
    return unquote(segment), query, headers


def handshake_key(headers: dict[str, str]) -> str:
    """The Sec-WebSocket-Key of a valid version 13 upgrade; raises Refused."""
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        raise Refused(400, "bad_request", "not a WebSocket upgrade (Upgrade: websocket missing)")
    if "upgrade" not in _tokens(headers.get("connection", "")):
        raise Refused(400, "bad_request", "not a WebSocket upgrade (Connection: upgrade missing)")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise Refused(400, "bad_request", "unsupported Sec-WebSocket-Version (13 is)")
    key = headers.get("sec-websocket-key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise Refused(400, "bad_request", "bad Sec-WebSocket-Key") from None
    return key


class Edge:
    """The protocol factory of the node's listening socket, and its connections."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.http: Callable[[], asyncio.BaseProtocol] | None = None
        self.connections: set[EdgeConnection] = set()
        self._deflaters: dict[int, Deflater] = {}
        self.inflater = Inflater(context_takeover=False)  # stateless: shared
        self._sweeper: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None

    def __call__(self) -> asyncio.BaseProtocol:
        return EdgeConnection(self)

    async def listen(self, sock: socket.socket, http: Callable[[], asyncio.BaseProtocol]) -> None:
        """Serve connections on a bound, listening socket; ``http`` makes aiohttp's protocol."""
        self.http = http
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self, sock=sock, backlog=4096)
        self._start_sweeping()

    def _start_sweeping(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def deflater(self, window_bits: int) -> Deflater:
        """The compressor shared by every connection without context takeover."""
        deflater = self._deflaters.get(window_bits)
        if deflater is None:
            deflater = self._deflaters[window_bits] = Deflater(window_bits, context_takeover=False)
        return deflater

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening and pinging; drop every connection still open (after a drain)."""
        self.stop_listening()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for connection in list(self.connections):
            connection.abort()

    async def _sweep(self) -> None:
        """Ping connections silent for a heartbeat; drop those that ignored the last ping."""
        heartbeat = self.node.settings.heartbeat
        while True:
            await asyncio.sleep(min(heartbeat / 4, 5.0))
            now = time.monotonic()
            for connection in list(self.connections):
                connection.check_alive(now, heartbeat)


async def _guarded(session: Session, call: Awaitable[None]) -> None:
    try:
        await call
    except Exception as exc:
        await session_failed(session, exc)


class EdgeConnection(asyncio.Protocol):
    """One client socket: its handshake, then frames; the session's Transport."""

    __slots__ = (
        "_buffer",
        "_closed",
        "_deadline",
        "_deflate",
        "_deflater",
        "_drain",
        "_edge",
        "_frame_budget",
        "_inbound",
        "_lost",
        "_opcode",
        "_opener",
        "_parser",
        "_pending",
        "_pending_size",
        "_ping_budget",
        "_ping_sent",
        "_pong_owed",
        "_state",
        "_transport",
        "_upgrade_reply",
        "last_seen",
        "session",
    )

    def __init__(self, edge: Edge) -> None:
        self._edge = edge
        self._transport: asyncio.Transport | None = None
        # The 101 response, and the frames written while the session opens (_upgrade).
        self._upgrade_reply: bytearray | None = None
        self._state = _HEAD
        self._buffer = b""
        self._deadline: asyncio.TimerHandle | None = None
        self._parser: FrameParser | None = None
        self._opcode = OP_TEXT
        self._opener: asyncio.Task[None] | None = None
        self._pending: list[bytes | str] | None = None
        self._pending_size = 0
        self._frame_budget: RateLimiter | None = None
        self._ping_budget: RateLimiter | None = None
        self._pong_owed: bytes | None = None  # the latest ping not answered yet
        self._inbound: Inbound | None = None
        self._closed: asyncio.Future[None] | None = None  # the peer's close frame, awaited
        self._drain: asyncio.Future[None] | None = None
        self._lost = False
        self._deflate: Agreement | None = None
        self._deflater: Deflater | None = None
        self._ping_sent = 0.0
        self.last_seen = 0.0
        self.session: Session | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but quacks like one.
        self._transport = transport = cast(asyncio.Transport, transport)
        self._edge.connections.add(self)
        self._deadline = self._edge.node.loop.call_later(
            self._edge.node.settings.handshake_timeout, transport.abort
        )

    def data_received(self, data: bytes) -> None:
        if self._state == _HEAD:
            self._on_head_data(data)
            return
        parser = self._parser
        if parser is None:
            return  # a framing error or a close frame ended the stream
        self.last_seen = now = time.monotonic()
        counted = parser.frames
        messages = parser.feed(data)
        budget = self._frame_budget
        assert budget is not None  # made with the parser
        over_budget = parser.frames > counted and not budget.allow(now, parser.frames - counted)
        # The messages of this read (at most one read's worth) are answered first, in the
        # order the client sent them, so the first offence is the one the close names.
        for opcode, payload in messages:
            self._on_message(opcode, payload)
            if self._parser is None:
                return  # a close frame: nothing after it counts
        if over_budget:
            self._parser = None
            self._fail(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
            return
        if parser.failure is not None:
            self._parser = None
            self._fail(parser.failure.close_code)

    def pause_writing(self) -> None:
        # Backpressure both ways: a client that does not read what it is sent is not
        # read either, so what it sends cannot pile up answers in the write buffer.
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
            pong, self._pong_owed = self._pong_owed, None
            if pong is not None and self._closed is None:
                self._put(transport, frame_header(OP_PONG, len(pong)) + pong)

    def held(self) -> int:
        """Bytes this connection holds for what its client sent (or did not read)."""
        held = len(self._buffer) + len(self._upgrade_reply or b"") + self._pending_size
        held += len(self._pong_owed or b"")
        if self._parser is not None:
            held += self._parser.held
        if self._transport is not None:
            held += self._transport.get_write_buffer_size()
        return held

    @property
    def inflater(self) -> Inflating | None:
        """What inflates this connection's compressed messages (permessage-deflate)."""
        return self._parser.inflater if self._parser is not None else None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._state = _CLOSED
        self._edge.connections.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        for waiter in (self._closed, self._drain):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        session, self.session = self.session, None
        if session is not None:
            node = self._edge.node
            node.spawn(node.disconnect(session))

    # -- the handshake -------------------------------------------------------------------

    def _on_head_data(self, data: bytes) -> None:
        buffer = self._buffer = self._buffer + data
        if not buffer.startswith(WS_PREFIX):
            if len(buffer) < len(WS_PREFIX) and WS_PREFIX.startswith(buffer):
                return  # too little to tell yet
            self._hand_over()
            return
        end = buffer.find(b"\r\n\r\n")
        limit = self._edge.node.settings.max_request_head
        if end < 0 and len(buffer) <= limit:
            return
        if end < 0 or end + 4 > limit:  # however the bytes arrived
            self._buffer = b""
            self._refuse(400, "bad_request", "request head too large")
            return
        head, rest = buffer[:end], buffer[end + 4 :]
        self._buffer = b""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        try:
            client_id, query, headers = parse_head(head)
        except Refused as refused:
            self._refuse(refused.status, refused.code, refused.message, refused.headers)
            return
        self._handshake(client_id, query, headers, rest)

    def _handshake(
        self,
        client_id: str,
        query: dict[str, str],
        headers: dict[str, str],
        rest: bytes,
        *,
        observe: bool = False,
    ) -> None:
        """Answer a parsed ``GET /ws/<client_id>`` (or ``/observe/``); ``rest`` is what the
        client sent after it."""
        started_at = time.time()
        try:
            admission = admit(self._edge.node, client_id, query, headers)
            key = handshake_key(headers)
        except Refused as refused:
            self._refuse(refused.status, refused.code, refused.message, refused.headers)
            return
        admission.observe = observe
        self._upgrade(key, admission, headers, started_at)
        if rest and self._parser is not None:
            self.data_received(rest)

    def _hand_over(self) -> None:
        """Not a WebSocket upgrade on /ws/: aiohttp's protocol takes the socket from here."""
        transport = self._transport
        assert transport is not None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._edge.connections.discard(self)
        self._transport = None
        self._state = _CLOSED
        assert self._edge.http is not None  # set by Edge.listen, the only way here
        http = self._edge.http()
        transport.set_protocol(http)
        http.connection_made(transport)
        if isinstance(http, asyncio.Protocol):
            http.data_received(self._buffer)
        self._buffer = b""

    def _refuse(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        transport = self._transport
        self._state = _CLOSED
        if status == 400:
            bad_request(message, source="edge")
        if transport is not None:
            transport.write(_http_error(status, code, message, headers or {}))
            transport.close()

    def _upgrade(
        self, key: str, admission: Admission, headers: dict[str, str], started_at: float
    ) -> None:
        transport = self._transport
        assert transport is not None
        node = self._edge.node
        settings = node.settings
        response = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        )
        if admission.subprotocol:
            response += f"Sec-WebSocket-Protocol: {admission.subprotocol}\r\n"
        inflater: Inflating | None = None
        if settings.compress:
            deflate = self._deflate = negotiate(
                headers.get("sec-websocket-extensions"),
                context_takeover=settings.compress_context_takeover,
                window_bits=settings.compress_window_bits,
            )
            if deflate is not None:
                response += f"Sec-WebSocket-Extensions: {deflate.response}\r\n"
                inflater = (
                    Inflater(context_takeover=True)
                    if deflate.client_context_takeover
                    else self._edge.inflater
                )
        # Held, and written with what follows it while the session opens (the welcome, its
        # replay, or a close): one system call for all instead of one each. A loopback
        # write costs the node ~6-7 µs (it also runs the client's TCP receive) and the
        # client a wake-up; a client may not send before it reads the 101, so holding it
        # changes nothing it can observe but the timing.
        self._upgrade_reply = bytearray(response + "\r\n", "latin-1")
        self._state = _CONNECTING
        self._parser = FrameParser(settings.max_message_size, settings.max_fragments, inflater)
        self._frame_budget = RateLimiter(settings.client_frame_rate, settings.client_frame_burst)
        self._opcode = OP_BINARY if admission.fmt.binary else OP_TEXT
        self.last_seen = time.monotonic()
        if admission.format_error is not None:
            self._close_soon(CloseCode.PROTOCOL_ERROR, admission.format_error)
            return
        try:
            if admission.observe:
                authorise_observer(node, headers)
                expires_at = None
            else:
                expires_at = authenticate(node, admission)
        except AuthError as exc:
            self._close_soon(exc.close_code, str(exc))
            return
        self._opener = node.loop.create_task(self._open(admission, expires_at, started_at))

    async def _open(self, admission: Admission, expires_at: float | None, started: float) -> None:
        node = self._edge.node
        opened = await open_session(
            node, admission, self, expires_at, started, observe=admission.observe
        )
        self._opener = None
        if isinstance(opened, tuple):
            await self.close(*opened)
            return
        if self._lost:
            await node.disconnect(opened)
            return
        self.session = opened
        self._state = _OPEN
        if self._upgrade_reply is not None:
            self._write(b"")  # the 101 with the welcome and replay held after it (write_now)
        pending, self._pending = self._pending, None
        self._pending_size = 0
        for payload in pending or ():
            self._on_data(payload)

    def _close_soon(self, code: int, reason: str) -> None:
        self._edge.node.spawn(self.close(code, reason))

    # -- frames --------------------------------------------------------------------------

    def _on_message(self, opcode: int, payload: bytes | str) -> None:
        if opcode in (OP_TEXT, OP_BINARY):
            self._on_data(payload)
        elif isinstance(payload, str):
            return  # only text is decoded
        elif opcode == OP_PING:
            self._on_ping(payload)
        elif opcode == OP_PONG:
            self._ping_sent = 0.0
        elif opcode == OP_CLOSE:
            self._on_close(payload)

    def _on_data(self, payload: bytes | str) -> None:
        session = self.session
        if session is None:
            if self._state == _CONNECTING:
                pending = self._pending = self._pending or []
                size = len(payload)
                settings = self._edge.node.settings
                if (
                    len(pending) < settings.max_early_messages
                    and self._pending_size + size <= settings.max_message_size
                ):
                    pending.append(payload)
                    self._pending_size += size
            return
        node = self._edge.node
        inbound = self._inbound = self._inbound or Inbound()
        try:
            ack = inbound.handle(node, session, payload)
        except Exception as exc:
            node.spawn(session_failed(session, exc))
            return
        if ack is not None:
            node.spawn(_guarded(session, ack))

    def _on_ping(self, payload: bytes) -> None:
        """Answer at most --client-ping-rate pings a second, never into a full buffer;
        a ping not answered now is owed (only the latest) until the buffer drains."""
        transport = self._transport
        if transport is None or transport.is_closing() or self._closed is not None:
            return  # after our close frame nothing else is sent
        budget = self._ping_budget
        if budget is None:
            rate = self._edge.node.settings.client_ping_rate
            budget = self._ping_budget = RateLimiter(rate, max(1, int(rate)))
        if self._drain is not None or not budget.allow():
            if self._drain is not None:
                self._pong_owed = payload
            return
        self._put(transport, frame_header(OP_PONG, len(payload)) + payload)

    def _on_close(self, payload: bytes) -> None:
        try:
            code, _ = parse_close(payload)
        except FrameError as exc:
            self._parser = None
            self._fail(exc.close_code)
            return
        self._parser = None  # nothing may follow a close frame
        closed = self._closed
        if closed is None:
            # The client closes: answer with its code, then hang up (the server closes TCP).
            self._write(close_frame(1000 if code == 1005 else code))
            self._closed = asyncio.get_running_loop().create_future()
            self._closed.set_result(None)
            if self._transport is not None:
                self._transport.close()
        elif not closed.done():
            closed.set_result(None)

    def _fail(self, code: int, reason: str = "") -> None:
        """The client broke the rules: close with ``code``, through the session if any."""
        closed = self._closed
        if closed is not None and not closed.done():
            # Our close frame is out and the stream is broken: its answer cannot come.
            closed.set_result(None)
            return
        session = self.session
        if session is not None:
            self._edge.node.spawn(session.close(code, reason, flush=False))
        else:
            self._close_soon(code, reason)

    def check_alive(self, now: float, heartbeat: float) -> None:
        """One heartbeat tick: ping a silent client; abort one that missed its pong."""
        if self._state != _OPEN:
            return
        if self._ping_sent:
            if now - self._ping_sent > heartbeat / 2:
                # Said, since the session's close shows only "no code": a client gone
                # silent and a node or client too busy to answer in time look alike there.
                session = self.session
                self._edge.node.log.info(
                    "session.pong_missed",
                    client_id=session.client_id if session is not None else None,
                    session=session.id if session is not None else None,
                    waited=round(now - self._ping_sent, 3),
                )
                self.abort()
        elif now - self.last_seen >= heartbeat:
            self._ping_sent = now
            self._write(frame_header(OP_PING, 0))

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._put(transport, data)

    def _put(self, transport: asyncio.Transport, data: bytes) -> None:
        """Write ``data``, after the 101 response (and what joined it) if that is still held."""
        reply = self._upgrade_reply
        if reply is not None:
            self._upgrade_reply = None
            reply += data
            transport.write(reply)
        else:
            transport.write(data)

    # -- the session's Transport ---------------------------------------------------------

    async def send(self, frame: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection closed")
        self._put(transport, self._framed(frame))
        if self._drain is not None:
            await asyncio.shield(self._drain)

    def write_now(self, frame: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        reply = self._upgrade_reply
        if reply is not None:
            # Opening: the welcome and its replay join the held 101; _open writes them.
            reply += self._framed(frame)
            if len(reply) > OPENING_HOLD:
                self._put(transport, b"")
        elif self._deflate is None:
            # _framed() inlined for the usual case, and a short frame's header from a table:
            # called for every delivered message, and a Python call is ~0.05 µs of the ~6 µs
            # of Python a message costs the node (frame_header() itself ~0.1 µs).
            size = len(frame)
            if size < SHORT_FRAME:
                transport.write(SHORT_HEADERS[self._opcode][size] + frame)
            else:
                transport.write(frame_header(self._opcode, size) + frame)
        else:
            transport.write(self._compressed(frame))
        return True

    def _framed(self, frame: bytes) -> bytes:
        if self._deflate is None:
            return frame_header(self._opcode, len(frame)) + frame
        return self._compressed(frame)

    def _compressed(self, frame: bytes) -> bytes:
        """``frame`` with its header under permessage-deflate: compressed unless it is short.

        Called only for a frame that is written at once: a compressor with context
        takeover must see exactly what the client reads, in order.
        """
        deflate = self._deflate
        assert deflate is not None
        if len(frame) < self._edge.node.settings.compress_min_size:
            return frame_header(self._opcode, len(frame)) + frame
        deflater = self._deflater
        if deflater is None:
            if deflate.server_context_takeover:
                deflater = Deflater(deflate.window_bits, context_takeover=True)
            else:
                deflater = self._edge.deflater(deflate.window_bits)
            self._deflater = deflater
        data = deflater.compress(frame)
        return frame_header(self._opcode | RSV1, len(data)) + data

    async def close(self, code: int, reason: str) -> None:
        """Send our close frame, wait (bounded) for the client's, then hang up."""
        transport = self._transport
        if transport is None or self._lost:
            return
        if self._closed is not None:  # a close is already under way
            await asyncio.shield(self._closed)
            return
        self._closed = closed = asyncio.get_running_loop().create_future()
        if not transport.is_closing():
            self._put(transport, close_frame(code, reason))
        if transport.get_write_buffer_size() > 0:
            transport.abort()  # a peer that stopped reading keeps a graceful close pending
            return
        if self._parser is None:
            transport.close()  # a broken stream cannot carry the answer
            return
        try:
            await asyncio.wait_for(asyncio.shield(closed), self._edge.node.settings.close_timeout)
        except TimeoutError:
            transport.abort()
            return
        # Answered (or the stream broke meanwhile): hang up, without waiting on a buffer
        # that a peer which stopped reading would never drain.
        transport.abort() if transport.get_write_buffer_size() else transport.close()

    def abort(self) -> None:
        transport = self._transport
        if transport is not None:
            transport.abort()


EDGE_KEY = web.AppKey("relay_edge", Edge)


class _Adopted(EdgeConnection):
    """An EdgeConnection on a socket aiohttp was serving, which must learn when it closes."""

    __slots__ = ("_on_lost",)

    def __init__(self, edge: Edge, on_lost: Callable[[BaseException | None], None]) -> None:
        super().__init__(edge)
        self._on_lost = on_lost

    def take_over(
        self,
        transport: asyncio.BaseTransport,
        request: tuple[str, dict[str, str], dict[str, str]],
        rest: bytes,
        *,
        observe: bool,
    ) -> None:
        """Serve ``transport`` from its parsed upgrade request on."""
        self.connection_made(transport)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._handshake(*request, rest, observe=observe)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._on_lost(exc)


class _Tail:
    """What aiohttp read past an upgrade's head, received through its ``set_parser``."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        """aiohttp's protocol lost the socket: the EdgeConnection already knows."""


async def adopt(request: web.Request) -> web.StreamResponse:
    """``GET /ws/{client_id}`` on a connection aiohttp serves: the edge takes the socket.

    A proxy that keeps idle upstream connections (nginx ``keepalive``) may send an upgrade
    on one that carried API or health requests before.
    """
    return await _adopt(request, observe=False)


async def adopt_observer(request: web.Request) -> web.StreamResponse:
    """``GET /observe/{client_id}`` (``relay tail``): the edge serves observers too."""
    return await _adopt(request, observe=True)


async def _adopt(request: web.Request, *, observe: bool) -> web.StreamResponse:
    """Give a request's socket to a new EdgeConnection. aiohttp hands over the bytes it
    read past the head (``set_parser``, as its own WebSocketResponse does); the socket's
    events then go to an EdgeConnection, served like any other, and aiohttp's protocol is
    told when the socket closes, so its own bookkeeping ends as for any connection. The
    handler returns only then, with a response nobody can receive.
    """
    edge = request.app[EDGE_KEY]
    transport, protocol = request.transport, request.protocol
    if transport is None or transport.is_closing():
        return web.Response()
    finished = asyncio.get_running_loop().create_future()

    def lost(exc: BaseException | None) -> None:
        protocol.connection_lost(exc)
        if not finished.done():
            finished.set_result(None)

    protocol.keep_alive(False)
    tail = _Tail()
    protocol.set_parser(cast(Any, tail))
    connection = _Adopted(edge, lost)
    transport.set_protocol(connection)
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    query: dict[str, str] = {}
    for field, content in request.query.items():
        query.setdefault(field, content)
    edge._start_sweeping()
    parsed = (request.match_info["client_id"], query, headers)
    connection.take_over(transport, parsed, tail.data, observe=observe)
    await finished
    return web.Response()
