"""WebSocket endpoints: ``/ws/{client_id}`` for clients, ``/observe/{client_id}`` for operators.

What a handshake means, independent of the socket: :mod:`relay.edge`, the only
WebSocket server, moves the bytes. What can be refused before the upgrade (a bad
client_id, ``since`` or ``format``) gets HTTP 400, a browser Origin outside
``--allowed-origins`` 403.
Everything after it is a close code with a reason, because WebSocketSharp and browsers
cannot read an HTTP status (docs/protocol.md, close codes; docs/security.md). Unexpected
errors close 1011.

An observer (``relay tail``) is authorised by the API key, not a client token, and sees a
client's events without claiming its session: watching a client never replaces it.
Observers are served by the edge like clients; their requests reach it through aiohttp's
route (:func:`relay.edge.adopt`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass

import structlog
from aiohttp import web

from relay.auth import api_key_matches, bearer_token, verify_token
from relay.errors import AuthError, EngineUnavailable, InvalidInput, ProtocolViolation, RelayError
from relay.node import Node, NodeUnavailable
from relay.protocol import (
    CloseCode,
    Format,
    encode_error,
    encode_pong,
    parse_client_frame,
    select_format,
)
from relay.session import RateLimiter, Session, Transport
from relay.wire import StreamId, parse_attempt, parse_id, validate_client_id

__all__ = [
    "LB_RETRY_HEADER",
    "NODE_KEY",
    "Admission",
    "Inbound",
    "Refused",
    "admit",
    "authenticate",
    "authorise_observer",
    "open_session",
    "session_failed",
]

log = structlog.get_logger("relay.ws")

NODE_KEY = web.AppKey("relay_node", Node)

LB_RETRY_HEADER = "X-Relay-Lb-Retry"
"""Set by a load balancer that retries a handshake answered 503 on another node."""


# -- shared by both servers ---------------------------------------------------------------


class Refused(RelayError):
    """A handshake answered with an HTTP error instead of an upgrade."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


@dataclass(slots=True)
class Admission:
    """A handshake that may be upgraded, and what the session will need."""

    client_id: str
    fmt: Format
    subprotocol: str | None
    format_error: str | None  # offered subprotocols all unknown: closed 1002 after upgrade
    since: StreamId | None
    attempt: str | None
    token: str | None
    observe: bool = False  # /observe/: authorised by the API key, claims nothing


def admit(
    node: Node, client_id: str, query: Mapping[str, str], headers: Mapping[str, str]
) -> Admission:
    """Check a handshake before the upgrade; raises Refused. ``headers`` are lower-case."""
    settings = node.settings
    if not node.ready and headers.get(LB_RETRY_HEADER.lower()):
        # Behind a retrying balancer a 503 sends the client to a node that takes it; a
        # 1012/1013 after the upgrade would send it back here (least_conn favours the
        # emptiest node, which a draining or starting one is).
        reason = node.unready_reason()
        code = reason.replace(" ", "_")
        raise Refused(503, code, f"node {reason}; try another node", {"Retry-After": "0"})
    # Cross-site WebSocket hijacking: a page elsewhere cannot use a visitor's browser to
    # connect. A 403 before the upgrade is fine here: only browsers send Origin.
    if not _origin_allowed(headers.get("origin"), settings.allowed_origins):
        raise Refused(403, "origin_not_allowed", "this Origin may not connect")
    try:
        validate_client_id(client_id)
        raw_since = query.get("since")
        since = parse_id(raw_since) if raw_since else None
        attempt = query.get("attempt") or None
        if attempt is not None:
            parse_attempt(attempt)
    except InvalidInput as exc:
        raise Refused(400, exc.code, str(exc)) from None
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    format_error: str | None = None
    try:
        fmt, subprotocol = select_format(offered, query.get("format"))
    except ProtocolViolation as exc:
        if not offered:
            raise Refused(400, exc.code, str(exc)) from None
        fmt, subprotocol, format_error = Format.JSON, None, str(exc)
    token = query.get("token") or bearer_token(headers.get("authorization"))
    return Admission(client_id, fmt, subprotocol, format_error, since, attempt, token)


def authenticate(node: Node, admission: Admission) -> float | None:
    """The token's expiry (None: never or anonymous); raises AuthError with its close code."""
    settings = node.settings
    token = admission.token
    # Fail closed: without --allow-anonymous a token is required, even with no secret.
    if settings.allow_anonymous and not (token and settings.auth_secret):
        return None
    try:
        return verify_token(
            token,
            settings.auth_secret,
            admission.client_id,
            leeway=settings.token_leeway,
            audience=settings.token_audience,
            max_ttl=settings.max_token_ttl,
        )
    except AuthError as exc:
        log.info(
            "session.refused", client_id=admission.client_id, code=exc.close_code, reason=str(exc)
        )
        raise


async def open_session(
    node: Node,
    admission: Admission,
    transport: Transport,
    expires_at: float | None,
    started_at: float,
    *,
    observe: bool = False,
) -> Session | tuple[int, str]:
    """Connect the session, or the close code and reason to refuse it with."""
    client_id = admission.client_id
    try:
        return await node.connect(
            client_id,
            admission.fmt,
            transport,
            since=admission.since,
            expires_at=expires_at,
            started_at=started_at,
            attempt=admission.attempt,
            observe=observe,
        )
    except NodeUnavailable as exc:
        return exc.close_code, str(exc)
    except EngineUnavailable:
        # Redis stopped answering mid-connect: nothing broke here; back off and retry.
        return CloseCode.TRY_AGAIN_LATER, "broker unavailable"
    except RelayError as exc:
        log.warning("session.connect_failed", client_id=client_id, error=str(exc))
        return CloseCode.INTERNAL_ERROR, "internal error"
    except Exception as exc:
        # Not ours: its message may carry anything (a URL with a password, a token), so
        # only its type is logged and the client learns nothing but "internal error".
        log.error("session.connect_failed", client_id=client_id, error=type(exc).__name__)
        return CloseCode.INTERNAL_ERROR, "internal error"


class Inbound:
    """What a session's client sends: ping, ack, errors for anything else; rate-policed."""

    __slots__ = ("_limiter", "_strikes")

    def __init__(self) -> None:
        self._limiter: RateLimiter | None = None  # made on the first frame: most never send
        self._strikes: RateLimiter | None = None

    def handle(self, node: Node, session: Session, data: bytes | str) -> Awaitable[None] | None:
        """Answer one data message; an ack's engine call is returned for the caller to run."""
        if session.closing:
            return None
        settings = node.settings
        if self._limiter is None or self._strikes is None:
            self._limiter = RateLimiter(settings.client_rate, settings.client_burst)
            self._strikes = RateLimiter(settings.client_rate, settings.client_burst)
        if not self._limiter.allow():
            # Frames over the rate are dropped. The drops have a budget of their own that
            # refills at the same rate: bursts are forgiven, a sustained flood is closed.
            if not self._strikes.allow():
                node.metrics.bad_frames.inc()
                node.spawn(session.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded"))
            return None
        fmt = session.format
        try:
            frame = parse_client_frame(data, fmt)
        except ProtocolViolation as exc:
            session.errors += 1
            node.metrics.bad_frames.inc()
            if session.errors > settings.max_errors:
                node.spawn(session.close(CloseCode.POLICY_VIOLATION, "too many invalid frames"))
            else:
                session.send(encode_error(fmt, exc.code, str(exc)))
            return None
        if frame.type == "ping":
            session.send(encode_pong(fmt))
        elif frame.type == "ack" and frame.id is not None:
            return node.acknowledge(session, frame.id)
        return None


async def session_failed(session: Session, exc: Exception) -> None:
    """An unexpected error while serving a session: log its type only, close 1011."""
    log.error(
        "session.failed", client_id=session.client_id, session=session.id, error=type(exc).__name__
    )
    await session.close(CloseCode.INTERNAL_ERROR, "internal error", flush=False)


def _origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No list, or no Origin (WebSocketSharp, SDKs), or an Origin on the list."""
    if not allowed or origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    return any(origin == a.rstrip("/").lower() for a in allowed)


def authorise_observer(node: Node, headers: Mapping[str, str]) -> None:
    """An observer presents the node's API key as a Bearer token; raises AuthError (4001)."""
    api_key = node.settings.api_key
    if not api_key:
        raise AuthError(
            "observing needs the node's API key: start it with --api-key",
            CloseCode.UNAUTHORIZED,
        )
    if not api_key_matches(headers.get("authorization"), api_key):
        raise AuthError("missing or wrong API key", CloseCode.UNAUTHORIZED)
