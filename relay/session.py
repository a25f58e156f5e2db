"""One client connection as the node sees it: a bounded send queue with a single writer.

Broadcast never waits on a client: the fan-out only appends pre-encoded frames to the
queue; one writer task per session moves them to the socket. A queue past its frame or
byte limit closes the session with 4508 (too slow), and the node's watchdog aborts a
socket whose write has blocked longer than the send timeout.

The socket is behind :class:`Transport`, so this module knows nothing of aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Protocol

import structlog

from relay.protocol import CloseCode, Format
from relay.wire import ID_ZERO, Event, StreamId

__all__ = ["RateLimiter", "Session", "SessionLimits", "Transport"]

log = structlog.get_logger("relay.session")


class Transport(Protocol):
    """The socket under a session (a relay.edge.EdgeConnection in production)."""

    async def send(self, frame: bytes) -> None:
        """Send one encoded frame (text for JSON, binary for MessagePack)."""

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame and wait for the peer's answer."""

    def abort(self) -> None:
        """Drop the TCP connection now."""

    def write_now(self, frame: bytes) -> bool:
        """Write a frame synchronously if the socket has room now; False means "queue it"."""


class SessionLimits:
    """The per-session limits a node applies (from Settings)."""

    __slots__ = ("close_flush_timeout", "close_linger", "close_timeout", "max_bytes", "max_frames")

    def __init__(
        self,
        max_frames: int = 2000,
        max_bytes: int = 8 * 1024 * 1024,
        close_flush_timeout: float = 1.0,
        close_linger: float = 0.25,
        close_timeout: float = 2.0,
    ) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.close_flush_timeout = close_flush_timeout
        self.close_linger = close_linger
        self.close_timeout = close_timeout  # for the close frame and the client's answer


class RateLimiter:
    """Token bucket for inbound frames: ``rate`` per second, bursts of ``burst``."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self, now: float | None = None, cost: int = 1) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class Session:
    """A client's live connection: position, recovery buffer, send queue, writer."""

    __slots__ = (
        "_closed",
        "_closer",
        "_live",
        "_queue",
        "_queued_bytes",
        "_write_now",
        "_writer",
        "attempt",
        "client_id",
        "close_code",
        "closing",
        "connected_at",
        "errors",
        "expires_at",
        "format",
        "held",
        "id",
        "last",
        "limits",
        "observer",
        "recovering",
        "sending_since",
        "since",
        "transport",
    )

    def __init__(
        self,
        client_id: str,
        session_id: str,
        fmt: Format,
        transport: Transport,
        limits: SessionLimits,
        since: StreamId | None = None,
    ) -> None:
        self.client_id = client_id
        self.id = session_id
        self.format = fmt
        self.transport = transport
        self.limits = limits
        self.since = since
        self.last: StreamId = since or ID_ZERO
        self.recovering = True  # live events are held until the replay is queued
        self.held: list[Event] = []
        self.connected_at = time.time()
        self.attempt: str | None = None  # "<instance>.<n>" from the client, if it sent one
        self.observer = False  # an operator watching the client's events: holds no claim
        self.expires_at: float | None = None
        self.errors = 0
        self.closing = False
        self.close_code: int | None = None
        self.sending_since = 0.0  # monotonic start of the write in progress, 0 if none
        self._queue: deque[bytes] | None = None  # made on first use: most sessions never queue
        self._queued_bytes = 0
        self._live = False  # start() called: the welcome and replay are queued
        self._closer: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] | None = None  # set when close() has finished
        self._writer: asyncio.Task[None] | None = None
        self._write_now = getattr(transport, "write_now", None)

    def __repr__(self) -> str:
        return f"<Session {self.id} client={self.client_id}>"

    # -- fan-out side (never awaits) -------------------------------------------------

    def push(self, event: Event, frame: bytes | None) -> None:
        """Queue a live event's pre-encoded frame, unless it is behind our position.

        An event that does not follow the position (a hole nobody filled) is never sent:
        the session ends with 4509 and the client resumes from what it has. ``None`` is
        an event with no encoding in this format: skipped, but the position passes it.
        """
        last, key = self.last, event.key
        if key <= last:
            return
        if self.recovering:
            self.held.append(event)
            return
        prev = event.prev
        if prev != last and prev != ID_ZERO:  # hub.follows, inlined: the hot path
            self.gap()
            return
        self.last = key
        if frame is None:
            return
        # send() inlined: called for every delivered message, and a Python call is
        # ~0.05 µs of the ~6 µs of Python a message costs the node. The same test as send's.
        if not (
            self._live
            and not self._queue
            and self._writer is None
            and not self.closing
            and self._write_now is not None
            and self._write_now(frame)
        ):
            self._enqueue(frame)

    def send(self, frame: bytes) -> None:
        """Queue a frame for the writer; past the limits the session is closed 4508."""
        # Fast path: live, nothing queued, no write in flight and room in the socket's
        # buffer, so the frame goes out now without a writer task (push() has a copy).
        if not (
            self._live
            and not self._queue
            and self._writer is None
            and not self.closing
            and self._write_now is not None
            and self._write_now(frame)
        ):
            self._enqueue(frame)

    def _enqueue(self, frame: bytes) -> None:
        if self.closing:
            return  # dropped once the session is closing
        queue = self._queue
        if (len(queue) if queue else 0) >= self.limits.max_frames or (
            self._queued_bytes + len(frame) > self.limits.max_bytes
        ):
            self.overflow()
            return
        if queue is None:
            queue = self._queue = deque()
        queue.append(frame)
        self._queued_bytes += len(frame)
        if self._live and self._writer is None:
            self._start_writer()

    def overflow(self) -> None:
        """The client does not keep up: drop what is queued and close with 4508."""
        log.info(
            "session.overflowed",
            client_id=self.client_id,
            session=self.id,
            queued=self.queued,
            queued_bytes=self._queued_bytes,
        )
        self._queue = None
        self._queued_bytes = 0
        self._close_soon(CloseCode.TOO_SLOW, "send queue overflow", flush=False)

    def gap(self) -> None:
        """The live feed has a hole before the next event: end the session with 4509.

        What is queued still goes out (it precedes the hole); nothing after it does. The
        client reconnects with ``since=`` and the welcome's ``recovered`` tells whether
        history still closes the hole.
        """
        if self.closing:
            return
        log.warning("session.gap_detected", client_id=self.client_id, session=self.id)
        self._close_soon(CloseCode.FEED_GAP, "live feed gap: reconnect and resume")

    def _close_soon(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Close from synchronous code: closing now (nothing more is queued), the rest in a task."""
        if self.closing:
            return
        self._begin_close(code)
        self._closer = asyncio.get_running_loop().create_task(
            self._finish_close(code, reason, flush=flush)
        )

    @property
    def queued(self) -> int:
        return len(self._queue) if self._queue else 0

    # -- writer ------------------------------------------------------------------------

    def start(self) -> None:
        """Let frames flow: what was queued during recovery first, in order."""
        self._live = True
        queue, write_now = self._queue, self._write_now
        while queue and write_now is not None and write_now(queue[0]):
            self._queued_bytes -= len(queue.popleft())
        if not queue:
            self._queue = None
        elif self._writer is None:
            self._start_writer()

    def _start_writer(self) -> None:
        # A writer task exists only while frames wait: an idle session costs no task.
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        queue, send = self._queue, self.transport.send
        assert queue is not None  # a writer starts only for a queued frame
        try:
            while queue:
                frame = queue.popleft()
                self._queued_bytes -= len(frame)
                self.sending_since = time.monotonic()
                await send(frame)
                self.sending_since = 0.0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket died under us
            log.debug("session.write_failed", session=self.id, error=type(exc).__name__)
            self.closing = True
            self._queue = None
            self._queued_bytes = 0
        if not queue:
            self._queue = None  # back to the lean idle state
        self._writer = None

    async def _drained(self) -> None:
        while self._queue or self._writer is not None:
            await asyncio.sleep(0.01)

    async def close(self, code: int, reason: str = "", *, flush: bool = True) -> None:
        """Close from the server side: flush the queue briefly, linger, send the code.

        WebSocketSharp may discard frames that arrive right before a close frame, hence
        the linger after the last data; resume-by-id covers whatever is still lost.
        """
        if self.closing:
            return
        self._begin_close(code)
        await self._finish_close(code, reason, flush=flush)

    def _begin_close(self, code: int) -> None:
        self.closing = True
        self.close_code = int(code)
        self._closed = asyncio.get_running_loop().create_future()

    async def _finish_close(self, code: int, reason: str, *, flush: bool) -> None:
        assert self._closed is not None
        try:
            await self._close(code, reason, flush=flush)
        finally:
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until a close the server began has finished (no-op if none began)."""
        if self._closed is not None:
            await asyncio.shield(self._closed)

    async def _close(self, code: int, reason: str, *, flush: bool) -> None:
        if flush and self._live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained(), self.limits.close_flush_timeout)
            if self.limits.close_linger > 0:
                await asyncio.sleep(self.limits.close_linger)
        await self.stop_writer()
        try:
            await asyncio.wait_for(self.transport.close(code, reason), self.limits.close_timeout)
        except (TimeoutError, ConnectionError, RuntimeError):
            self.transport.abort()

    async def stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        self._queue = None
        self._queued_bytes = 0
