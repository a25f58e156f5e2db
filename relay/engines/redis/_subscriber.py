"""The Redis engine's pub/sub side: the node's one pub/sub connection, driven by one reader.

It batches SUBSCRIBE and UNSUBSCRIBE commands and waits for Redis to confirm them,
resubscribes every wanted channel after a reconnect (then calls
``handler.on_resubscribed()``), runs the canary, and dispatches what arrives: messages to
``handler.on_event``, control frames to ``handler.on_control``. It lives apart from
:mod:`relay.engines.redis`'s broker and registries (commands, history) because it is its own state
machine with its own connection; the engine creates one and forwards subscribe and
unsubscribe to it. The control-message encoding and the small task helpers are here
because both sides use them and this module must not import the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from relay.backoff import Backoff, Jitter
from relay.backoff import Retry as Retrying
from relay.engine import Control, EngineHandler
from relay.engines.redis._compat import pack_commands, reply_reader, transport_of
from relay.errors import EngineError, EngineUnavailable, InvalidEnvelope
from relay.wire import decode_live

__all__ = [
    "Subscriber",
    "Timings",
    "as_text",
    "decode_control",
    "encode_control",
    "reraise_swallowed_cancel",
    "safely",
    "stop_task",
]

_SUBSCRIBE: Final = b"subscribe"
_UNSUBSCRIBE: Final = b"unsubscribe"
_MESSAGE: Final = b"message"
_BATCH: Final = 1000  # channels per SUBSCRIBE command when resubscribing
_NOTHING: Final = object()  # hiredis: no whole reply buffered
_Messages = tuple[bytes, Callable[[bytes, bytes], None]]  # a reply kind and its handler


# -- control messages ---------------------------------------------------------------------


def encode_control(control: Control) -> bytes:
    """A control message as sent on ``<prefix>:ctl:<node>``: a JSON object."""
    return orjson.dumps(asdict(control))


def decode_control(data: bytes) -> Control:
    """Inverse of :func:`encode_control`; anything malformed raises InvalidEnvelope."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidEnvelope("control message is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise InvalidEnvelope("control message is not an object with an action")
    text = {name: body.get(name, "") for name in ("client_id", "session", "reason", "token")}
    code = body.get("code", 4000)
    if not all(isinstance(v, str) for v in text.values()) or type(code) is not int:
        raise InvalidEnvelope("control message fields have the wrong types")
    return Control(body["action"], code=code, **text)


# -- the pub/sub side -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timings:
    socket_timeout: float
    canary_interval: float
    canary_deadline: float
    backoff_base: float
    backoff_cap: float
    subscribe_timeout: float


@dataclass(eq=False, slots=True)
class _Session:
    """One pub/sub connection and what was asked of it.

    ``sent`` holds channels whose latest command here was SUBSCRIBE; ``ops`` the commands
    not yet confirmed, per channel, oldest first; ``awaiting`` the channels of the initial
    batch still unconfirmed (the session is live once it is empty).
    """

    conn: AbstractConnection
    sent: set[bytes] = field(default_factory=set)
    ops: dict[bytes, deque[bytes]] = field(default_factory=dict)
    awaiting: set[bytes] = field(default_factory=set)
    live: bool = False
    live_at: float = 0.0
    outbox: list[tuple[bytes, bytes]] = field(default_factory=list)  # (UN)SUBSCRIBEs to write
    writes: set[asyncio.Task[None]] = field(default_factory=set)


class _Feed(asyncio.Protocol):
    """The pub/sub socket's reading side once redis-py has connected it.

    redis-py opens the connection (TLS, AUTH, HELLO, CLIENT SETNAME); then
    :meth:`attach` puts this protocol under the socket, and each read is parsed by hiredis
    and dispatched in :meth:`data_received`, as the floor server does
    (relay.bench.floor). Through redis-py each read also went through a StreamReader, a
    task wake-up and ``read_response``: about 1 µs more per message at the ~15 messages
    one read holds flat out (a bare reader of 200,000 messages on a real Redis, 3
    rounds: 2.4-2.8 µs per message that way, 1.5-1.8 this way). Writes still go through
    redis-py's StreamWriter; its protocol still hears of write pauses and of the end.

    ``messages``, if given, is a reply kind and its handler: each ``[kind, channel, data]``
    reply goes straight to ``handler(channel, data)``, as in the floor's loop, and every
    other reply to ``dispatch`` (a Python call less per message, ~0.1 µs).

    ``ended`` fails with what ended the feed: a lost connection, a protocol error, or
    whatever the dispatch raised (an error reply, for one).
    """

    def __init__(
        self, dispatch: Callable[[Any], None], reader: Any, messages: _Messages | None = None
    ) -> None:
        self._dispatch = dispatch
        self._reader = reader
        self._kind: bytes | None
        self._on_message: Callable[[bytes, bytes], None]
        self._kind, self._on_message = messages or (None, _unused)
        self._streams: asyncio.BaseProtocol | None = None
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    def of(cls, dispatch: Callable[[Any], None], messages: _Messages | None = None) -> _Feed | None:
        """A feed for ``dispatch`` (and ``messages``), or None without hiredis."""
        reader = reply_reader(_NOTHING)
        return None if reader is None else cls(dispatch, reader, messages)

    def attach(self, transport: asyncio.Transport) -> None:
        self._streams = transport.get_protocol()
        transport.set_protocol(self)

    def stop(self) -> None:
        """Dispatch nothing more: the reader is done, the connection is dropped next."""
        if not self.ended.done():
            self.ended.cancel()
        elif not self.ended.cancelled():
            self.ended.exception()  # retrieved: the reader raised it, or was cancelled first

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        reader, dispatch = self._reader, self._dispatch
        kind, on_message = self._kind, self._on_message
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not _NOTHING:
                if type(reply) is list and len(reply) == 3 and reply[0] == kind:
                    on_message(reply[1], reply[2])
                else:
                    dispatch(reply)
        except Exception as exc:
            self._end(exc)

    def eof_received(self) -> bool | None:
        self._end(redis_errors.ConnectionError("Redis closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(redis_errors.ConnectionError(f"connection lost: {exc!r}"))
        if self._streams is not None:
            self._streams.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._streams is not None:
            self._streams.pause_writing()

    def resume_writing(self) -> None:
        if self._streams is not None:
            self._streams.resume_writing()

    def _end(self, exc: Exception) -> None:
        if not self.ended.done():
            self.ended.set_exception(exc)


class Subscriber:
    """The node's one pub/sub connection: subscriptions, the reader, reconnects, the canary.

    The class attributes name the pub/sub dialect (classic here); the ``_on_*`` hooks and
    :meth:`_commands` are where a shard's reader on a Redis Cluster differs
    (:mod:`relay.engines.redis._sharded`).
    """

    _SUBSCRIBE_COMMAND: bytes = b"SUBSCRIBE"
    _UNSUBSCRIBE_COMMAND: bytes = b"UNSUBSCRIBE"
    _SUBSCRIBED: bytes = _SUBSCRIBE  # the kinds of the replies Redis pushes
    _UNSUBSCRIBED: bytes = _UNSUBSCRIBE
    _MESSAGE_KIND: bytes = _MESSAGE

    def __init__(
        self,
        pool: ConnectionPool,
        redis: aioredis.Redis,
        handler: EngineHandler,
        control_channel: str,
        client_name: str,
        timings: Timings,
        log: Any,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._handler = handler
        self._control_channel = control_channel.encode()
        self._client_name = client_name
        self._t = timings
        self._log = log
        self.ready = False
        self._closed = False
        self._channels: dict[bytes, str] = {}  # wanted BizId channels
        # Callers waiting for a channel's confirmation, and when each gives up (oldest first).
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._expiries: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._session: _Session | None = None
        self._reader: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._canary: asyncio.Task[None] | None = None
        self._canary_kick = asyncio.Event()
        self._canary_prefix = secrets.token_hex(6) + ":"
        self._canary_ok_at = 0.0
        self._bad_window = 0.0  # engine.bad_message rate limit: window start, lines, left out
        self._bad_logged = 0
        self._bad_suppressed = 0
        self._first_live: asyncio.Future[None] | None = None
        self._ever_live = False
        self._loop: asyncio.AbstractEventLoop | None = None  # see the loop property

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop, kept from its first use: on Python 3.11 each
        get_running_loop() (and each ensure_future) is a getpid() system call, and every
        connect subscribes."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def start(self) -> None:
        """Connect and subscribe the control channel, or raise EngineUnavailable."""
        self._first_live = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="relay-redis-sub")
        try:
            async with asyncio.timeout(self._t.subscribe_timeout):
                await asyncio.shield(self._first_live)
        except TimeoutError:
            raise EngineUnavailable("redis did not confirm the control subscription") from None
        self.ready = True

    def start_canary(self) -> None:
        self._canary_ok_at = asyncio.get_running_loop().time()
        self._canary = asyncio.create_task(self._run_canary(), name="relay-redis-canary")

    async def close(self) -> None:
        self._closed = True
        self.ready = False
        for task in (self._canary, self._task):
            if task is not None:
                await stop_task(task)
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(EngineError("engine closed"))
        self._waiters.clear()
        if self._first_live is not None and not self._first_live.done():
            self._first_live.cancel()

    async def subscribe(self, channel: bytes, biz_id: str) -> None:
        if channel in self._channels and self._is_live(channel):
            return
        loop = self.loop
        waiters = self._waiters.get(channel)
        if waiters is None:
            waiters = self._waiters[channel] = []
        waiter: asyncio.Future[None] = loop.create_future()
        waiters.append(waiter)
        if channel not in self._channels:
            self._channels[channel] = biz_id
            await self._send(b"SUBSCRIBE", channel)
        self._expire_at(loop.time() + self._t.subscribe_timeout, waiter)
        try:
            await waiter
        except TimeoutError:
            if self._waiters.get(channel) is waiters:
                del self._waiters[channel]
            if self._channels.pop(channel, None) is not None:
                await self._send(b"UNSUBSCRIBE", channel)
            raise EngineUnavailable("redis did not confirm the subscription in time") from None

    async def unsubscribe(self, channel: bytes) -> None:
        if self._channels.pop(channel, None) is None:
            return
        _wake(self._waiters.pop(channel, ()))
        await self._send(b"UNSUBSCRIBE", channel)

    def _expire_at(self, deadline: float, waiter: asyncio.Future[None]) -> None:
        """Fail ``waiter`` with TimeoutError at ``deadline`` unless it is done by then.

        One timer serves every waiter (deadlines come in order), and each caller awaits its
        own future: a timeout context and a shield per subscribe cost more than the wait.
        """
        expiries = self._expiries
        while expiries and expiries[0][1].done():
            expiries.popleft()
        expiries.append((deadline, waiter))
        if self._expiry_timer is None:
            loop = self.loop
            self._expiry_timer = loop.call_at(deadline, self._expire, deadline)

    def _expire(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        now = max(due, loop.time())
        expiries = self._expiries
        while expiries and (expiries[0][0] <= now or expiries[0][1].done()):
            _, waiter = expiries.popleft()
            if not waiter.done():
                waiter.set_exception(TimeoutError())
        self._expiry_timer = None
        if expiries:
            deadline = expiries[0][0]
            self._expiry_timer = loop.call_at(deadline, self._expire, deadline)

    # -- connection lifecycle ----------------------------------------------------------

    async def _run(self) -> None:
        """Keep one pub/sub connection subscribed to every wanted channel, forever."""
        loop = asyncio.get_running_loop()
        retry = Retrying(
            Backoff(self._t.backoff_base, self._t.backoff_cap, Jitter.HALF)
        )  # for ever
        number = 0
        down_since: float | None = None
        while True:
            number += 1
            try:
                session = await self._open()
            except Exception as exc:
                self._log.debug(
                    "engine.reconnect_failed",
                    attempt=retry.failures + 1,
                    error=type(exc).__name__,
                )
            else:
                if down_since is not None:
                    self._log.info(
                        "engine.reconnected",
                        attempts=retry.failures + 1,
                        down_for=round(loop.time() - down_since, 3),
                    )
                error = await self._serve(session)
                self._log.warning("engine.disconnected", error=error, session=number)
                self._set_health(False, reason="disconnected")
                self._on_disconnected()
                down_since = loop.time()
                if session.live_at:
                    retry.succeeded()
            await asyncio.sleep(retry.failed() or 0.0)

    async def _open(self) -> _Session:
        """A connection of the pool's kind, outside the pool, that never retries by itself."""
        kwargs = dict(self._pool.connection_kwargs)
        kwargs.update(
            socket_timeout=None,  # reads block; the canary and the connect timeout bound them
            socket_connect_timeout=self._t.socket_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            client_name=self._client_name,
        )
        conn: AbstractConnection = self._pool.connection_class(**kwargs)
        try:
            async with asyncio.timeout(self._t.socket_timeout * 2):
                await conn.connect()  # type: ignore[no-untyped-call]  # unannotated upstream
        except BaseException:
            await _discard(conn)
            raise
        return _Session(conn)

    async def _serve(self, session: _Session) -> str:
        """Run the reader on ``session`` until it fails or is replaced; say why it ended."""
        self._session = session
        reader = self._reader = asyncio.create_task(self._read(session), name="relay-redis-read")
        try:
            await asyncio.wait([reader])
        finally:
            self._session = None
            self._reader = None
            await stop_task(reader)
            await _discard(session.conn)
        if reader.cancelled():
            return "replaced"
        return type(reader.exception()).__name__

    async def _read(self, session: _Session) -> None:
        """Subscribe the wanted channels, then dispatch every reply until the socket fails."""
        conn = session.conn
        wanted = [self._control_channel, *self._channels]
        initial = [channel for channel in wanted if channel not in session.sent]
        session.sent.update(initial)
        session.awaiting.update(initial)
        for channel in initial:
            session.ops[channel] = deque([_SUBSCRIBE])
        transport = transport_of(conn)
        feed = self._feed(session)
        if feed is not None and transport is not None:
            feed.attach(transport)  # before SUBSCRIBE: every reply to it comes to the feed
        else:
            feed = None
        try:
            batches = self._commands(_SUBSCRIBE, initial)
            await conn.send_packed_command(conn.pack_commands(batches), check_health=False)
            if feed is not None:
                await feed.ended
            read, dispatch = conn.read_response, self._dispatch
            while True:  # without hiredis: redis-py's parser, one reply at a time
                try:
                    reply = await read(timeout=math.inf)
                except redis_errors.ResponseError as exc:  # an error reply to a command of ours
                    reply = exc
                dispatch(session, reply)
        finally:
            if feed is not None:
                feed.stop()

    def _feed(self, session: _Session) -> _Feed | None:
        """What reads ``session``'s socket with hiredis (None without it): messages to
        :meth:`_on_message`, the other replies to :meth:`_dispatch`."""
        dispatch = functools.partial(self._dispatch, session)
        return _Feed.of(dispatch, (self._MESSAGE_KIND, self._on_message))

    def _commands(self, kind: bytes, channels: list[bytes]) -> list[list[bytes]]:
        """(UN)SUBSCRIBE commands for ``channels`` (``kind`` is the reply kind it asks for)."""
        name = self._SUBSCRIBE_COMMAND if kind == _SUBSCRIBE else self._UNSUBSCRIBE_COMMAND
        return [[name, *channels[i : i + _BATCH]] for i in range(0, len(channels), _BATCH)]

    async def _send(self, command: bytes, channel: bytes) -> None:
        """SUBSCRIBE or UNSUBSCRIBE on the live connection; the next one resubscribes anyway.

        Returns at once: the command is written with the others of this loop turn.
        """
        session = self._session
        if session is None or not session.conn.is_connected:
            return
        if command == b"SUBSCRIBE":
            if channel in session.sent:
                return
            session.sent.add(channel)
            session.ops.setdefault(channel, deque()).append(_SUBSCRIBE)
        else:
            if channel not in session.sent:
                return
            session.sent.discard(channel)
            session.ops.setdefault(channel, deque()).append(_UNSUBSCRIBE)
            if channel in session.awaiting:
                session.awaiting.discard(channel)
                if not session.awaiting:
                    self._session_live(session)
        # Commands of one loop turn go out as one write, consecutive ones of a kind merged
        # (a reconnect storm subscribes thousands of channels at once).
        session.outbox.append((command, channel))
        if len(session.outbox) == 1:
            self.loop.call_soon(self._flush_outbox, session)

    def _flush_outbox(self, session: _Session) -> None:
        pending, session.outbox = session.outbox, []
        runs: list[tuple[bytes, list[bytes]]] = []
        for command, channel in pending:
            kind = _SUBSCRIBE if command == b"SUBSCRIBE" else _UNSUBSCRIBE
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(channel)
            else:
                runs.append((kind, [channel]))
        commands = [
            command for kind, channels in runs for command in self._commands(kind, channels)
        ]
        transport = transport_of(session.conn)
        if transport is None:  # not connected, or redis-py moved its writer: see _write
            task = self.loop.create_task(self._write(session, commands))
            session.writes.add(task)
            task.add_done_callback(session.writes.discard)
            return
        # Written here, not by a task awaiting redis-py's send_packed_command: a fresh
        # connect makes one SUBSCRIBE, and a write that way cost 10.4-11.3 µs of CPU
        # against 3.8-4.7 straight (20,000 writes to a real Redis, 3 rounds). Nothing to
        # drain: a few bytes a channel, and a lost connection ends the feed, whose
        # successor resubscribes everything.
        if not transport.is_closing():
            transport.writelines(pack_commands(session.conn, [tuple(c) for c in commands]))

    async def _write(self, session: _Session, commands: list[list[bytes]]) -> None:
        try:
            conn = session.conn
            if conn.is_connected:
                packed = pack_commands(conn, [tuple(command) for command in commands])
                await conn.send_packed_command(packed, check_health=False)
        except Exception as exc:
            self._log.debug("engine.send_failed", error=type(exc).__name__)
            if self._session is session and self._reader is not None:
                self._reader.cancel()

    def _is_live(self, channel: bytes) -> bool:
        """Redis confirmed ``channel`` on the current connection and nothing is pending."""
        session = self._session
        return session is not None and channel in session.sent and channel not in session.ops

    # -- what the reader sees ----------------------------------------------------------

    def _dispatch(self, session: _Session, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            if isinstance(reply, redis_errors.ResponseError):
                self._on_error_reply(session, reply)
            return
        kind = reply[0]
        if kind == self._MESSAGE_KIND:
            self._on_message(reply[1], reply[2])
        elif kind == self._SUBSCRIBED:
            self._on_confirmation(session, _SUBSCRIBE, reply[1])
        elif kind == self._UNSUBSCRIBED:
            self._on_confirmation(session, _UNSUBSCRIBE, reply[1])

    def _on_error_reply(self, session: _Session, error: redis_errors.ResponseError) -> None:
        """Redis refused a (UN)SUBSCRIBE: the connection is out of step; a new one retries."""
        raise error

    def _on_dropped(self, session: _Session, channel: bytes) -> None:
        """Redis ended a subscription nobody asked to end (a shard's slot moved away)."""

    def _on_disconnected(self) -> None:
        """The connection was lost or replaced; the reader is about to connect again."""

    async def _publish(self, channel: str, data: bytes) -> None:
        """Send a canary to ``channel``."""
        await self._redis.publish(channel, data)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        biz_id = self._channels.get(channel)
        if not biz_id:
            # The node's control channel is never a BizId's, so it is looked for only
            # here, off the per-event path; "" is another control channel of the node's
            # (a shard's).
            if biz_id is not None or channel == self._control_channel:
                self._on_control(data)
            return  # else unsubscribed a moment ago
        try:
            event = decode_live(data)
        except InvalidEnvelope as exc:
            self._bad_message(channel, data, str(exc))
            return
        if event.biz_id != biz_id:
            self._bad_message(channel, data, "envelope biz does not match the channel")
            return
        try:
            self._handler.on_event(event)
        except Exception:
            self._log.exception("engine.handler_failed", callback="on_event")

    def _on_control(self, data: bytes) -> None:
        try:
            control = decode_control(data)
        except InvalidEnvelope as exc:
            self._bad_message(self._control_channel, data, str(exc))
            return
        if control.action == "canary":
            if control.token.startswith(self._canary_prefix):
                self._canary_ok_at = asyncio.get_running_loop().time()
                self._set_health(True)
            return
        safely(self._log, self._handler.on_control, control)

    def _bad_message(self, channel: bytes, data: bytes, reason: str) -> None:
        # Another publisher's bug can send junk at full speed: at most ten lines a second,
        # each saying how many were left out before it.
        now = time.monotonic()
        if now - self._bad_window > 1.0:
            self._bad_window, self._bad_logged = now, 0
        if self._bad_logged >= 10:
            self._bad_suppressed += 1
            return
        self._bad_logged += 1
        suppressed, self._bad_suppressed = self._bad_suppressed, 0
        self._log.warning(
            "engine.bad_message",
            source="pubsub",
            channel=as_text(channel),
            size=len(data),
            reason=reason,
            suppressed=suppressed,
        )

    def _on_confirmation(self, session: _Session, kind: bytes, channel: bytes) -> None:
        ops = session.ops.get(channel)
        if ops and ops[0] == kind:
            ops.popleft()
            if not ops:
                del session.ops[channel]
        elif kind == _SUBSCRIBE:
            # A confirmation nobody asked for: the subscription was re-established, and
            # whatever was published before it may be lost.
            self._log.warning("engine.resubscribed", reason="unexpected_confirmation")
            safely(self._log, self._handler.on_resubscribed)
        elif channel in session.sent:
            self._on_dropped(session, channel)
        if kind != _SUBSCRIBE or channel not in session.sent or channel in session.ops:
            return
        if channel in session.awaiting:
            session.awaiting.discard(channel)
            if not session.awaiting:
                self._session_live(session)
        _wake(self._waiters.pop(channel, ()))

    def _session_live(self, session: _Session) -> None:
        if session.live:
            return
        session.live = True
        session.live_at = asyncio.get_running_loop().time()
        if self._first_live is not None and not self._first_live.done():
            self._first_live.set_result(None)
        if self._ever_live:
            self._log.info("engine.resubscribed", channels=len(self._channels) + 1)
            safely(self._log, self._handler.on_resubscribed)
        self._ever_live = True
        self._canary_kick.set()

    # -- health ------------------------------------------------------------------------

    def _set_health(self, healthy: bool, reason: str = "") -> None:
        if self.ready == healthy or self._closed:
            return
        self.ready = healthy
        if healthy:
            self._log.info("engine.healthy")
        else:
            self._log.warning("engine.unhealthy", reason=reason)
        safely(self._log, self._handler.on_health, healthy)

    async def _run_canary(self) -> None:
        """Publish a canary to ourselves every interval; replace a deaf connection."""
        loop = asyncio.get_running_loop()
        count = 0
        channel = self._control_channel.decode()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._t.canary_interval):
                    await self._canary_kick.wait()
            self._canary_kick.clear()
            self._check_canary(loop.time())
            session = self._session
            if session is None or not session.live:
                continue
            count += 1
            canary = Control("canary", token=f"{self._canary_prefix}{count}")
            try:
                async with asyncio.timeout(self._t.canary_interval):
                    await self._publish(channel, encode_control(canary))
            except Exception as exc:
                self._log.debug("engine.canary_failed", error=type(exc).__name__)
            reraise_swallowed_cancel(asyncio.current_task(), 0)
            self._check_canary(loop.time())

    def _check_canary(self, now: float) -> None:
        session = self._session
        if session is None or not session.live:
            return
        if now - max(self._canary_ok_at, session.live_at) <= self._t.canary_deadline:
            return
        session.live = False
        self._log.warning("engine.canary_missed", deadline=self._t.canary_deadline)
        self._set_health(False, reason="canary_missed")
        if self._reader is not None:
            self._reader.cancel()


# -- helpers ------------------------------------------------------------------------------


def _unused(channel: bytes, data: bytes) -> None:
    """A feed's message handler when it has none (no reply kind matches ``None``)."""


def _wake(waiters: Iterable[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def safely(log: Any, callback: Callable[..., None], *args: Any) -> None:
    """Call a handler callback; its failure is logged and never reaches the reader."""
    try:
        callback(*args)
    except Exception:
        log.exception("engine.handler_failed", callback=getattr(callback, "__name__", "?"))


def reraise_swallowed_cancel(task: asyncio.Task[Any] | None, before: int) -> None:
    """Raise CancelledError if the task was cancelled during a command that returned anyway.

    On Python 3.11 redis-py writes through ``asyncio.wait_for``, which drops a cancellation
    that races with the write completing; without this a cancelled task carries on.
    """
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it, cancelling again if a cancellation was swallowed."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=1.0)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not report it at exit


async def _discard(conn: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)


def as_text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
