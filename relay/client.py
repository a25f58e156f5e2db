"""The asyncio client SDK: one connection to a relay node that survives everything else.

The old client gave up after five reconnects and lost whatever was published while it was
away. :class:`RelayClient` reconnects forever with full-jitter backoff, resumes from the
last id it delivered (``since``), drops repeats by id, and stops only when a close code
from the server says so (4000-4499, DESIGN.md's table). docs/client.md states the same
rules for clients in other languages.

The decisions are pure functions (:func:`plan_reconnect`, :func:`reconnect_delay`,
:func:`connect_url`) so they are tested without sockets; the class only moves frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import random
import secrets
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, TextIO

import aiohttp
import msgpack
import orjson
from yarl import URL

from relay.backoff import Backoff, Jitter
from relay.errors import RelayError
from relay.protocol import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, CloseCode
from relay.wire import StreamId, format_id, parse_id, validate_client_id

__all__ = [
    "Action",
    "Message",
    "Plan",
    "RelayClient",
    "RelayClosed",
    "backoff_delay",
    "connect_url",
    "plan_reconnect",
    "reconnect_delay",
    "tail",
]

# A library inside someone else's app logs through stdlib logging: silent until the app
# configures it (warnings reach stderr), never printing to stdout, where `relay tail`
# writes its JSON lines. Messages keep the project's ``noun.past_verb`` event names.
log = logging.getLogger("relay.client")

AT_ONCE_JITTER: Final = 0.25
"""Most seconds an "at once" reconnect waits, so a drained node's clients do not herd."""

ACK_INTERVAL: Final = 0.25
"""Least seconds between two ack frames: acks are coalesced under the server's rate limit."""

ABNORMAL: Final = 1006
"""The code recorded when a connection ends without a close frame (or never opens)."""

_WS_TIMEOUT: Final = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0)

Format = Literal["json", "msgpack"]
TokenFactory = Callable[[], Awaitable[str] | str]


# -- values --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One event delivered to the app, exactly as the server's ``message`` frame."""

    id: str
    biz_id: str
    event: str
    data: Any
    ts: float


class RelayClosed(RelayError):
    """The server closed the connection for good (4000-4499, or 4500 with no new token)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed for good: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


# -- pure decisions ------------------------------------------------------------------------


class Action(enum.Enum):
    """What to do after a connection ended."""

    STOP = "stop"  # terminal: do not reconnect
    AT_ONCE = "at_once"  # reconnect after a small jitter
    BACKOFF = "backoff"  # reconnect after full-jitter exponential backoff
    LONG_BACKOFF = "long_backoff"  # reconnect after half to all of the backoff cap


@dataclass(frozen=True, slots=True)
class Plan:
    """The next step after a close: an action, and whether to fetch a new token first."""

    action: Action
    renew_token: bool = False


def plan_reconnect(code: int, *, can_renew: bool) -> Plan:
    """Map a close code to the next step (DESIGN.md, close-code table).

    ``can_renew`` says a token factory exists and a fresh token is worth trying: 4500
    (expired) then reconnects at once with a new token, 4001 (invalid) after backoff.
    """
    if code == CloseCode.TOKEN_EXPIRED:
        return Plan(Action.AT_ONCE, renew_token=True) if can_renew else Plan(Action.STOP)
    if code == CloseCode.UNAUTHORIZED and can_renew:
        return Plan(Action.BACKOFF, renew_token=True)
    if CloseCode.is_terminal(code):
        return Plan(Action.STOP)
    if CloseCode.reconnect_at_once(code):
        return Plan(Action.AT_ONCE)
    if code == CloseCode.POLICY_VIOLATION:
        return Plan(Action.LONG_BACKOFF)
    return Plan(Action.BACKOFF)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform between 0 and ``min(cap, base * 2**attempt)`` seconds."""
    return Backoff(base, cap).delay(attempt, rng)


def reconnect_delay(
    action: Action, attempt: int, base: float, cap: float, rng: random.Random
) -> float:
    """Seconds to wait before the next connect; ``attempt`` counts failures since a welcome.

    "At once" is at once only for the first reconnect after a welcomed session: a node
    that keeps answering 1012 (still draining) gets ordinary backoff, not a tight loop.
    """
    if action is Action.AT_ONCE:
        if attempt == 0:
            return rng.uniform(0.0, min(AT_ONCE_JITTER, cap))
        return backoff_delay(attempt, base, cap, rng)
    if action is Action.LONG_BACKOFF:
        return Backoff(cap, cap, Jitter.HALF).delay(0, rng)  # half to all of the cap
    return backoff_delay(attempt, base, cap, rng)


def connect_url(
    url: str,
    client_id: str,
    *,
    token: str | None = None,
    since: str | None = None,
    attempt: str | None = None,
    observe: bool = False,
) -> URL:
    """``{url}/ws/{client_id}?token=…&since=…&attempt=…``; ``url`` may end in ``/ws/{id}``.

    The token goes in the query string, which every client (WebSocketSharp included) can
    set; the node also accepts an ``Authorization: Bearer`` header. ``attempt`` is
    ``<instance>.<n>``: a stale handshake this client gave up on then never replaces
    the newer one. ``observe`` makes it ``/observe/{client_id}``, the operator's view.
    """
    target = URL(url)
    path = target.path.rstrip("/")
    for kind in ("ws", "observe"):
        if path.endswith(f"/{kind}/{client_id}"):
            path = path[: -len(f"/{kind}/{client_id}")]
    kind = "observe" if observe else "ws"
    target = target.with_path(f"{path}/{kind}/{client_id}", keep_query=True)
    pairs = (("token", token), ("since", since), ("attempt", attempt))
    extra = {k: v for k, v in pairs if v is not None}
    return target.update_query(extra) if extra else target


# -- the client ----------------------------------------------------------------------------


async def _call(fn: Callable[..., Any] | None, *args: Any) -> None:
    """Run an app callback, sync or async; its errors are logged, never fatal."""
    if fn is None:
        return
    try:
        result = fn(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("client.callback_failed callback=%s", getattr(fn, "__name__", repr(fn)))


class RelayClient:
    """A reconnecting, resuming WebSocket client of one ``client_id``.

    Consume messages with ``async for msg in client`` or an ``on_message`` callback (then
    nothing is queued). The queue holds at most ``max_queue`` messages; when it is full
    the client stops reading the socket and does not reconnect until the app catches up.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        token: str | None = None,
        token_factory: TokenFactory | None = None,
        since: str | None = None,
        format: Format = "json",
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 10.0,
        heartbeat: float | None = 30.0,
        session: aiohttp.ClientSession | None = None,
        max_queue: int = 1000,
        auto_ack: bool = False,
        on_message: Callable[[Message], Awaitable[None] | None] | None = None,
        on_welcome: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None,
        on_close: Callable[[int, str], Awaitable[None] | None] | None = None,
        on_gap: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None,
        observe_key: str | None = None,
    ) -> None:
        if format not in ("json", "msgpack"):
            raise ValueError("format must be 'json' or 'msgpack'")
        if max_queue < 1 or backoff_base <= 0 or backoff_max <= 0 or connect_timeout <= 0:
            raise ValueError("max_queue, backoff and timeouts must be positive")
        self.url = url
        self.client_id = validate_client_id(client_id)
        self.format: Format = format
        self._token = token
        self._token_factory = token_factory
        self._position: StreamId | None = parse_id(since) if since else None
        self._backoff = (backoff_base, backoff_max)
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._http = session
        self._own_http = session is None
        self._max_queue = max_queue
        self.auto_ack = auto_ack
        self.on_message = on_message
        self.on_welcome = on_welcome
        self.on_close = on_close
        self.on_gap = on_gap
        self._observe_key = observe_key
        self._rng = random.Random()

        self.welcome: dict[str, Any] | None = None
        """The last welcome frame, as a dict (``recovered``, ``replayed``, ``last_id``…)."""
        self.gap = False
        """True once a welcome said ``recovered: false``; reset it after reloading state."""
        self.error: RelayClosed | None = None
        """Why the client stopped, if the server ended it for good."""
        self.connects = 0
        self.duplicates = 0
        self._instance = secrets.token_urlsafe(9)  # names this client in `attempt=`
        self._attempts = 0

        self._buffer: deque[Message] = deque()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = False
        self._closing = False
        self._finished = False
        self._fresh_token = False
        self._yielded: StreamId | None = None
        self._ack_wanted: StreamId | None = None
        self._ack_sent: StreamId | None = None
        self._ack_wake = asyncio.Event()

    # -- public surface ----------------------------------------------------------------

    @property
    def last_id(self) -> str | None:
        """The id the next connect resumes after (``since``): the newest one delivered."""
        return format_id(self._position) if self._position is not None else None

    @property
    def recovered(self) -> bool | None:
        """The last welcome's ``recovered`` (None when no ``since`` was sent)."""
        value = None if self.welcome is None else self.welcome.get("recovered")
        return value if isinstance(value, bool) else None

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def closed(self) -> bool:
        """True once the client stopped: closed by the app or ended by the server."""
        return self._finished

    @property
    def queued(self) -> int:
        """Messages received and not yet taken by the app."""
        return len(self._buffer)

    async def start(self) -> None:
        """Start connecting in the background; returns at once (see :meth:`wait_connected`)."""
        if self._task is not None:
            return
        if self._finished:
            raise RelayError("the client is closed; make a new one")
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"relay-client-{self.client_id}"
        )

    async def close(self) -> None:
        """Send the pending ack, close the socket (1000) and stop. Idempotent."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            ws = self._ws
            if ws is not None and self._connected:
                await self._send_ack(ws)
            if task is asyncio.current_task():
                # Called from a callback: the run loop sees _closing when the socket ends.
                if ws is not None:
                    await ws.close()
                return
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._finish()

    async def wait_connected(self) -> dict[str, Any]:
        """Wait for a welcomed connection and return its welcome; raises if the client stopped."""
        if self._task is None:
            raise RelayError("the client is not started: use start() or 'async with'")
        while not self._connected:
            self._raise_if_finished()
            await self._changed.wait()
        assert self.welcome is not None
        return self.welcome

    async def wait_closed(self) -> None:
        """Wait until the client stops; raises :class:`RelayClosed` if the server ended it."""
        while not self._finished:
            await self._changed.wait()
        if self.error is not None:
            raise self.error

    async def ack(self, message_id: str) -> None:
        """Tell the server ``message_id`` was processed (``{"type":"ack","id":…}``).

        Acks are coalesced: the newest one goes out at most every ACK_INTERVAL seconds
        (and again after a reconnect), which keeps a busy client under the rate limit.
        """
        self._want_ack(parse_id(message_id))

    async def __aenter__(self) -> RelayClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> RelayClient:
        return self

    async def __anext__(self) -> Message:
        """The next message. Ends after :meth:`close`; raises RelayClosed after a terminal close."""
        if self.auto_ack and self._yielded is not None:
            self._want_ack(self._yielded)  # asking for the next means the last is processed
        while True:
            if self._closing:
                raise StopAsyncIteration
            if self._buffer:
                msg = self._buffer.popleft()
                self._notify()
                self._yielded = parse_id(msg.id)
                return msg
            if self._finished:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            await self._changed.wait()

    # -- internals ---------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake everyone waiting for a change (a fresh Event per generation)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _raise_if_finished(self) -> None:
        if self._finished:
            if self.error is not None:
                raise self.error
            raise RelayError("the client is closed")

    async def _finish(self) -> None:
        self._finished = True
        self._connected = False
        self._notify()
        if self._own_http and self._http is not None:
            await self._http.close()

    async def _run(self) -> None:
        """Connect, serve, decide, wait; until a terminal close or :meth:`close`."""
        attempt = 0
        try:
            while not self._closing:
                await self._wait_for_room()
                try:
                    code, reason, welcomed = await self._serve_once()
                except Exception as exc:  # a bug must not end "reconnect forever"
                    log.exception("client.failed client_id=%s", self.client_id)
                    code, reason, welcomed = ABNORMAL, f"client error: {exc!r}", False
                if welcomed:
                    attempt = 0
                    self._fresh_token = False
                await _call(self.on_close, code, reason)
                if self._closing:
                    break
                can_renew = self._token_factory is not None and not (
                    code == CloseCode.UNAUTHORIZED and self._fresh_token
                )
                plan = plan_reconnect(code, can_renew=can_renew)
                if plan.action is Action.STOP:
                    self.error = RelayClosed(code, reason)
                    log.info(
                        "client.stopped client_id=%s code=%s reason=%s",
                        self.client_id,
                        code,
                        reason,
                    )
                    break
                delay = reconnect_delay(plan.action, attempt, *self._backoff, self._rng)
                attempt += 1
                log.info(
                    "client.reconnecting client_id=%s code=%s reason=%s delay=%.3f",
                    self.client_id,
                    code,
                    reason,
                    delay,
                )
                if plan.renew_token and not await self._renew_token():
                    delay = max(delay, backoff_delay(attempt, *self._backoff, self._rng))
                await asyncio.sleep(delay)
        finally:
            await self._finish()

    async def _renew_token(self) -> bool:
        factory = self._token_factory
        assert factory is not None
        try:
            result = factory()
            self._token = await result if inspect.isawaitable(result) else result
        except Exception as exc:
            log.warning("client.token_failed client_id=%s error=%r", self.client_id, exc)
            return False
        self._fresh_token = True
        return True

    async def _wait_for_room(self) -> None:
        """Back-pressure across reconnects: no new connection while the queue is full."""
        while len(self._buffer) >= self._max_queue and not self._closing:
            await self._changed.wait()

    async def _serve_once(self) -> tuple[int, str, bool]:
        """One connection from connect to close: (close code, reason, was it welcomed)."""
        assert self._http is not None
        if self._token is None and self._token_factory is not None:
            await self._renew_token()
        self._attempts += 1
        observe = self._observe_key is not None
        url = connect_url(
            self.url,
            self.client_id,
            token=None if observe else self._token,
            since=self.last_id,
            attempt=None if observe else f"{self._instance}.{self._attempts}",
            observe=observe,
        )
        headers = {"Authorization": f"Bearer {self._observe_key}"} if observe else None
        subprotocol = SUBPROTOCOL_MSGPACK if self.format == "msgpack" else SUBPROTOCOL_JSON
        try:
            async with asyncio.timeout(self._connect_timeout):
                ws = await self._http.ws_connect(
                    url,
                    protocols=(subprotocol,),
                    headers=headers,
                    heartbeat=self._heartbeat,
                    timeout=_WS_TIMEOUT,
                )
        except aiohttp.WSServerHandshakeError as exc:
            # An HTTP answer instead of an upgrade (a proxy's 502, the node's 400): like a
            # browser, report 1006 and back off.
            return ABNORMAL, f"handshake refused: HTTP {exc.status} {exc.message}", False
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Only the type and the OS error: some messages quote the URL, token included.
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else ""
            return ABNORMAL, f"connect failed: {type(exc).__name__} {detail}".rstrip(), False
        self.connects += 1
        self._ws = ws
        welcomed = False
        ack_task: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    if welcomed:
                        msg = await ws.receive()
                    else:
                        async with asyncio.timeout(self._connect_timeout):
                            msg = await ws.receive()
                except TimeoutError:
                    return ABNORMAL, "no welcome from the server", False
                except (aiohttp.ClientError, ConnectionError):  # e.g. answering a ping
                    return ABNORMAL, "connection lost", welcomed
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    frame = self._decode(msg.data)
                    if frame is None:
                        continue
                    if not welcomed:
                        if frame.get("type") != "welcome":
                            await ws.close(code=CloseCode.PROTOCOL_ERROR, message=b"no welcome")
                            return CloseCode.PROTOCOL_ERROR, "first frame was not a welcome", False
                        welcomed = True
                        await self._on_welcome(frame)
                        ack_task = asyncio.get_running_loop().create_task(self._ack_loop(ws))
                    else:
                        await self._on_frame(frame)
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    code = msg.data if isinstance(msg.data, int) and msg.data else ABNORMAL
                    return code, str(msg.extra or ""), welcomed
                else:  # CLOSING, CLOSED, ERROR: the socket is gone
                    break
            code = ws.close_code if ws.close_code is not None else ABNORMAL
            return code, "connection lost", welcomed
        finally:
            self._ws = None
            if self._connected:
                self._connected = False
                self._notify()
            if ack_task is not None:
                ack_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ack_task
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()

    def _decode(self, data: str | bytes) -> dict[str, Any] | None:
        try:
            frame = orjson.loads(data) if isinstance(data, str) else msgpack.unpackb(data)
        except Exception:
            log.warning("client.bad_frame client_id=%s", self.client_id)
            return None
        if not isinstance(frame, dict):
            log.warning("client.bad_frame client_id=%s", self.client_id)
            return None
        return frame

    async def _on_welcome(self, frame: dict[str, Any]) -> None:
        """Record the welcome; with nothing to replay, its ``last_id`` is where we stand."""
        self.welcome = frame
        last_id = frame.get("last_id")
        if not frame.get("replayed") and isinstance(last_id, str):
            with contextlib.suppress(RelayError):
                key = parse_id(last_id)
                if self._position is None or key > self._position:
                    self._position = key
        self._connected = True
        self._ack_sent = None
        if self._ack_wanted is not None:
            self._ack_wake.set()  # the new session has no ack on record yet
        self._notify()
        log.info(
            "client.connected client_id=%s node=%s recovered=%s replayed=%s",
            self.client_id,
            frame.get("node"),
            frame.get("recovered"),
            frame.get("replayed"),
        )
        await _call(self.on_welcome, frame)
        if frame.get("recovered") is False:
            self.gap = True
            log.warning("client.gap client_id=%s last_id=%s", self.client_id, frame.get("last_id"))
            await _call(self.on_gap, frame)

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message":
            try:
                msg = Message(
                    str(frame["id"]),
                    str(frame["biz_id"]),
                    str(frame["event"]),
                    frame.get("data"),
                    float(frame["ts"]),
                )
                key = parse_id(msg.id)
            except (KeyError, TypeError, ValueError, RelayError):
                log.warning("client.bad_message client_id=%s", self.client_id)
                return
            if self._position is not None and key <= self._position:
                self.duplicates += 1
                return
            if self.on_message is not None:
                await _call(self.on_message, msg)
                # Only now: a callback cut short (close() cancels it) has not passed it.
                self._position = key
                if self.auto_ack:
                    self._want_ack(key)
            else:
                self._position = key  # queued: kept across reconnects, so resume after it
                await self._enqueue(msg)
        elif kind == "welcome":
            await self._on_welcome(frame)
        elif kind == "error":
            log.warning(
                "client.server_error client_id=%s code=%s message=%s",
                self.client_id,
                frame.get("code"),
                frame.get("message"),
            )
        # "pong" and types from later protocol versions need nothing.

    async def _enqueue(self, msg: Message) -> None:
        """Queue for the iterator; while the queue is full, the socket is not read."""
        while len(self._buffer) >= self._max_queue:
            await self._changed.wait()
        self._buffer.append(msg)
        self._notify()

    def _want_ack(self, key: StreamId) -> None:
        if self._ack_wanted is None or key > self._ack_wanted:
            self._ack_wanted = key
            self._ack_wake.set()

    async def _ack_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            if not await self._send_ack(ws):
                return
            await asyncio.sleep(ACK_INTERVAL)

    async def _send_ack(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Send the newest wanted ack if not sent yet; False when the socket is gone."""
        key = self._ack_wanted
        if key is None or (self._ack_sent is not None and key <= self._ack_sent):
            return True
        frame = {"type": "ack", "id": format_id(key)}
        try:
            if self.format == "msgpack":
                await ws.send_bytes(msgpack.packb(frame))
            else:
                await ws.send_str(orjson.dumps(frame).decode())
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            return False
        self._ack_sent = key
        return True


# -- relay tail ----------------------------------------------------------------------------


def _line(body: dict[str, Any]) -> str:
    return orjson.dumps(body).decode() + "\n"


async def tail(
    url: str,
    client_id: str,
    *,
    since: str | None = None,
    token: str | None = None,
    api_key: str | None = None,
    fmt: Format = "json",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> None:
    """Print one JSON line per message to ``out``, and welcome/close lines to ``err``.

    With ``api_key`` it watches as an observer (``/observe/{client_id}``), which never
    takes the client's place; without, it connects as the client (``token``) and so
    replaces the client's own session. Runs until cancelled (Ctrl-C) or a terminal
    close, which it raises as RelayClosed.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err

    def on_welcome(frame: dict[str, Any]) -> None:
        err.write(_line(frame))
        err.flush()

    def on_close(code: int, reason: str) -> None:
        err.write(_line({"type": "close", "code": code, "reason": reason}))
        err.flush()

    client = RelayClient(
        url,
        client_id,
        token=token,
        since=since,
        format=fmt,
        on_welcome=on_welcome,
        on_close=on_close,
        observe_key=api_key,
    )
    async with client:
        async for msg in client:
            out.write(
                _line(
                    {
                        "id": msg.id,
                        "biz_id": msg.biz_id,
                        "event": msg.event,
                        "data": msg.data,
                        "ts": msg.ts,
                    }
                )
            )
            out.flush()
