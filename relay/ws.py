"""The WebSocket endpoint ``GET /ws/{client_id}``: validate, upgrade, authenticate, relay.

What can be refused before the upgrade (a bad client_id, ``since`` or ``format``) gets
HTTP 400, and a browser Origin outside ``--allowed-origins`` 403. Everything after it is
a close code with a reason, because WebSocketSharp and browsers cannot read an HTTP
status (DESIGN.md, close-code table; docs/security.md). Unexpected errors close 1011.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from relay.auth import bearer_token, verify_token
from relay.errors import AuthError, InvalidInput, ProtocolViolation, RelayError
from relay.node import Node, NodeUnavailable
from relay.protocol import (
    CloseCode,
    Format,
    encode_error,
    encode_pong,
    parse_client_frame,
    select_format,
)
from relay.session import RateLimiter, Session
from relay.wire import parse_attempt, parse_id, validate_client_id

__all__ = ["LB_RETRY_HEADER", "NODE_KEY", "websocket_handler"]

log = structlog.get_logger("relay.ws")

_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack

NODE_KEY = web.AppKey("relay_node", Node)

LB_RETRY_HEADER = "X-Relay-Lb-Retry"
"""Set by a load balancer that retries a handshake answered 503 on another node."""


class AiohttpTransport:
    """Adapts a WebSocketResponse to the session's Transport."""

    __slots__ = ("_compress", "_first_byte", "_opcode", "_request", "_ws")

    def __init__(
        self, ws: web.WebSocketResponse, request: web.Request, fmt: Format, compress: bool
    ) -> None:
        self._ws = ws
        self._request = request
        self._opcode = WSMsgType.BINARY if fmt.binary else WSMsgType.TEXT
        self._first_byte = 0x80 | int(self._opcode)  # FIN + opcode, unmasked (server side)
        self._compress = compress

    async def send(self, frame: bytes) -> None:
        await self._ws.send_frame(frame, self._opcode)

    def write_now(self, frame: bytes) -> bool:
        """Write the frame straight to an idle socket (no compression, empty buffer).

        Bypasses aiohttp's coroutine for the common case; frames stay whole and in
        order because every write to the transport happens on this one thread.
        """
        transport = self._request.transport
        if (
            self._compress
            or transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size()
        ):
            return False
        size = len(frame)
        first = self._first_byte
        if size < 126:
            transport.write(bytes((first, size)) + frame)
        elif size < 65536:
            transport.write(_LEN2(first, 126, size) + frame)
        else:
            transport.write(_LEN3(first, 127, size))
            transport.write(frame)
        return True

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._ws.close(code=code, message=_close_reason(reason))
        finally:
            # A peer that stopped reading keeps a graceful close pending forever.
            transport = self._request.transport
            if transport is not None and transport.get_write_buffer_size() > 0:
                transport.abort()

    def abort(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.abort()


def _close_reason(reason: str) -> bytes:
    """A close reason within the 123 bytes a close frame allows, cut on a character."""
    return reason.encode()[:120].decode("utf-8", "ignore").encode()


def _bad_request(code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=400)


def _origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No list, or no Origin (WebSocketSharp, SDKs), or an Origin on the list."""
    if not allowed or origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    return any(origin == a.rstrip("/").lower() for a in allowed)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    started_at = time.time()
    node = request.app[NODE_KEY]
    settings = node.settings
    if node.draining and request.headers.get(LB_RETRY_HEADER):
        # Behind a retrying balancer a 503 sends the client to a live node; a 1012 after
        # the upgrade would send it back here (least_conn favours the emptiest node).
        return web.json_response(
            {"error": {"code": "draining", "message": "node draining; try another node"}},
            status=503,
            headers={"Retry-After": "0"},
        )
    client_id = request.match_info["client_id"]
    # Cross-site WebSocket hijacking: a page elsewhere cannot use a visitor's browser to
    # connect. A 403 before the upgrade is fine here: only browsers send Origin.
    if not _origin_allowed(request.headers.get("Origin"), settings.allowed_origins):
        return web.json_response(
            {"error": {"code": "origin_not_allowed", "message": "this Origin may not connect"}},
            status=403,
        )
    try:
        validate_client_id(client_id)
        raw_since = request.query.get("since")
        since = parse_id(raw_since) if raw_since else None
        attempt = request.query.get("attempt") or None
        if attempt is not None:
            parse_attempt(attempt)
    except InvalidInput as exc:
        return _bad_request(exc.code, str(exc))
    offered = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    format_error: str | None = None
    try:
        fmt, subprotocol = select_format(offered, request.query.get("format"))
    except ProtocolViolation as exc:
        if not offered:
            return _bad_request(exc.code, str(exc))
        fmt, subprotocol, format_error = Format.JSON, None, str(exc)

    ws = web.WebSocketResponse(
        protocols=(subprotocol,) if subprotocol else (),
        heartbeat=settings.heartbeat,
        max_msg_size=settings.max_message_size,
        compress=settings.compress,
        timeout=2.0,
    )
    try:
        await ws.prepare(request)
    except ConnectionError:
        return ws  # the client gave up before the upgrade was answered (a reconnect herd)
    if format_error is not None:
        await ws.close(code=CloseCode.PROTOCOL_ERROR, message=_close_reason(format_error))
        return ws

    expires_at: float | None = None
    token = request.query.get("token") or bearer_token(request.headers.get("Authorization"))
    # Fail closed: without --allow-anonymous a token is required, even with no secret.
    if not settings.allow_anonymous or (token and settings.auth_secret):
        try:
            expires_at = verify_token(
                token, settings.auth_secret, client_id, leeway=settings.token_leeway
            )
        except AuthError as exc:
            log.info("session.refused", client_id=client_id, code=exc.close_code, reason=str(exc))
            await ws.close(code=exc.close_code, message=str(exc).encode())
            return ws

    transport = AiohttpTransport(ws, request, fmt, bool(ws.compress))
    try:
        session = await node.connect(
            client_id,
            fmt,
            transport,
            since=since,
            expires_at=expires_at,
            started_at=started_at,
            attempt=attempt,
        )
    except NodeUnavailable as exc:
        await ws.close(code=exc.close_code, message=str(exc).encode())
        return ws
    except RelayError as exc:
        log.warning("session.connect_failed", client_id=client_id, error=str(exc))
        await ws.close(code=CloseCode.INTERNAL_ERROR, message=b"internal error")
        return ws
    except Exception as exc:
        # Not ours: its message may carry anything (a URL with a password, a token), so
        # only its type is logged and the client learns nothing but "internal error".
        log.error("session.connect_failed", client_id=client_id, error=type(exc).__name__)
        await ws.close(code=CloseCode.INTERNAL_ERROR, message=b"internal error")
        return ws
    if session.closing:
        # Replaced while it was connecting: its close handshake is under way and owns the
        # socket's reader, so this handler must not read as well.
        try:
            await session.wait_closed()
        finally:
            await node.disconnect(session)
        return ws
    try:
        await _read_loop(ws, node, session)
    except Exception as exc:
        log.error(
            "session.failed", client_id=client_id, session=session.id, error=type(exc).__name__
        )
        await session.close(CloseCode.INTERNAL_ERROR, "internal error", flush=False)
    finally:
        await node.disconnect(session)
    return ws


async def _read_loop(ws: web.WebSocketResponse, node: Node, session: Session) -> None:
    """Answer client frames: ping, ack, and errors for anything else; police the rate."""
    settings = node.settings
    limiter = RateLimiter(settings.client_rate, settings.client_burst)
    strikes = RateLimiter(settings.client_rate, settings.client_burst)
    fmt = session.format
    async for msg in ws:
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            continue  # ERROR / CLOSE end the iteration by themselves
        if session.closing:
            continue
        if not limiter.allow():
            # Frames over the rate are dropped. The drops have a budget of their own that
            # refills at the same rate: bursts are forgiven, a sustained flood is closed.
            if not strikes.allow():
                node.metrics.bad_frames.inc()
                node.spawn(session.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded"))
            continue
        data: Any = msg.data
        try:
            frame = parse_client_frame(data, fmt)
        except ProtocolViolation as exc:
            session.errors += 1
            node.metrics.bad_frames.inc()
            if session.errors > settings.max_errors:
                node.spawn(session.close(CloseCode.POLICY_VIOLATION, "too many invalid frames"))
            else:
                session.send(encode_error(fmt, exc.code, str(exc)))
            continue
        if frame.type == "ping":
            session.send(encode_pong(fmt))
        elif frame.type == "ack" and frame.id is not None:
            await node.acknowledge(session, frame.id)
