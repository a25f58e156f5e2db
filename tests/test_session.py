"""Unit tests for relay.session: the inbound rate limiter and a session's send queue.

Session tests run on the event loop with :class:`RecordingTransport` in place of the
socket; nothing touches the network.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from relay.protocol import CloseCode, Format
from relay.session import RateLimiter, Session, SessionLimits
from relay.wire import Event, StreamId, format_id
from tests.conftest import MS
from tests.support.timing import eventually


class RecordingTransport:
    """A socket double: records sent frames, close and abort, with loop timestamps.

    Clear ``reading`` to simulate a client that never reads: ``send`` then blocks, and so
    does ``close`` (its close frame cannot get out either) unless ``close_blocks`` is off.
    """

    def __init__(self, *, fail_send: bool = False, close_error: Exception | None = None) -> None:
        self.reading = asyncio.Event()
        self.reading.set()
        self.close_blocks = True
        self.fail_send = fail_send
        self.close_error = close_error
        self.reason: str | None = None
        self.log: list[tuple[str, Any, float]] = []  # (what, frame or code, loop time)

    def stall(self, *, close_blocks: bool = True) -> None:
        """From now on the client does not read."""
        self.reading.clear()
        self.close_blocks = close_blocks

    @property
    def frames(self) -> list[bytes]:
        return [item for what, item, _ in self.log if what == "send"]

    @property
    def closes(self) -> list[int]:
        return [item for what, item, _ in self.log if what == "close"]

    @property
    def aborted(self) -> bool:
        return any(what == "abort" for what, _, _ in self.log)

    def at(self, what: str) -> float:
        """Loop time of the last entry of this kind."""
        return [t for w, _, t in self.log if w == what][-1]

    def _record(self, what: str, item: Any) -> None:
        self.log.append((what, item, asyncio.get_running_loop().time()))

    async def send(self, frame: bytes) -> None:
        if self.fail_send:
            raise ConnectionResetError("peer went away")
        await self.reading.wait()
        self._record("send", frame)

    async def close(self, code: int, reason: str) -> None:
        self._record("close", code)
        self.reason = reason
        if self.close_error is not None:
            raise self.close_error
        if self.close_blocks:
            await self.reading.wait()

    def abort(self) -> None:
        self._record("abort", None)


def event(ms: int) -> Event:
    key: StreamId = (ms, 0)
    return Event(format_id(key), key, (ms - 1, 0), "cml", "e", ms, 1.0)


Factory = Callable[..., Session]


@pytest.fixture
async def make_session() -> AsyncIterator[Factory]:
    """Build sessions on a RecordingTransport; their writers are stopped at teardown."""
    made: list[Session] = []

    def make(
        transport: RecordingTransport,
        limits: SessionLimits | None = None,
        since: StreamId | None = None,
        *,
        live: bool = True,
    ) -> Session:
        session = Session(  # Session takes a Transport: mypy checks the double fits
            "cml", f"s-{len(made)}", Format.JSON, transport, limits or SessionLimits(), since
        )
        session.recovering = not live
        made.append(session)
        return session

    yield make
    for session in made:
        await session.stop_writer()


# -- RateLimiter (pure: pass `now`) --------------------------------------------------------


def test_ratelimiter_allows_burst_then_refuses() -> None:
    """A full bucket allows `burst` frames at once, then refuses."""
    limiter = RateLimiter(rate=2, burst=3)
    t0 = limiter.stamp
    assert [limiter.allow(t0) for _ in range(4)] == [True, True, True, False]


def test_ratelimiter_refills_at_rate() -> None:
    """Tokens come back at `rate` per second: half a second at 2/s buys one frame."""
    limiter = RateLimiter(rate=2, burst=3)
    t0 = limiter.stamp
    for _ in range(3):
        limiter.allow(t0)
    assert limiter.allow(t0 + 0.25) is False
    assert limiter.allow(t0 + 0.5) is True
    assert limiter.allow(t0 + 0.5) is False


def test_ratelimiter_caps_at_burst() -> None:
    """A long quiet period refills to `burst`, no more."""
    limiter = RateLimiter(rate=10, burst=2)
    t0 = limiter.stamp
    assert [limiter.allow(t0 + 3600) for _ in range(3)] == [True, True, False]


def test_ratelimiter_steady_rate_never_refused() -> None:
    """A client sending at `rate` is never refused (burst 2 absorbs float rounding)."""
    limiter = RateLimiter(rate=5, burst=2)
    t0 = limiter.stamp
    assert all(limiter.allow(t0 + i * 0.2) for i in range(200))


def test_ratelimiter_default_clock() -> None:
    """Without `now` the monotonic clock is used; a fresh bucket allows a frame."""
    assert RateLimiter(rate=1, burst=1).allow() is True


def test_sessionlimits_defaults_match_design() -> None:
    """Defaults: 2000 frames, 8 MiB, flush up to 1 s, linger 250 ms, close within 2 s."""
    limits = SessionLimits()
    assert (limits.max_frames, limits.max_bytes) == (2000, 8 * 1024 * 1024)
    assert (limits.close_flush_timeout, limits.close_linger) == (1.0, 0.25)
    assert limits.close_timeout == 2.0


def test_sessionlimits_overrides() -> None:
    """Every limit can be set."""
    limits = SessionLimits(
        max_frames=1, max_bytes=2, close_flush_timeout=3, close_linger=4, close_timeout=5
    )
    assert (limits.max_frames, limits.max_bytes) == (1, 2)
    assert (limits.close_flush_timeout, limits.close_linger, limits.close_timeout) == (3, 4, 5)


# -- Session: queue and writer -------------------------------------------------------------


async def test_session_frames_go_out_in_order(make_session: Factory) -> None:
    """Frames queued with send() reach the transport in order."""
    transport = RecordingTransport()
    session = make_session(transport)
    session.start()
    frames = [b"frame-%d" % i for i in range(200)]
    for frame in frames:
        session.send(frame)
    await eventually(lambda: len(transport.frames) == len(frames))
    assert transport.frames == frames and session.queued == 0


async def test_session_frames_queued_before_start_go_out(make_session: Factory) -> None:
    """Frames queued before the writer starts (welcome, replay) are sent once it does."""
    transport = RecordingTransport()
    session = make_session(transport)
    session.send(b"welcome")
    session.send(b"replay")
    assert session.queued == 2
    session.start()
    await eventually(lambda: len(transport.frames) == 2)
    assert transport.frames == [b"welcome", b"replay"]


async def test_session_push_drops_ids_at_or_before_last(make_session: Factory) -> None:
    """push() ignores events at or before the session's position and advances it."""
    transport = RecordingTransport()
    session = make_session(transport, since=(5, 0))
    session.start()
    session.push(event(4), b"4")
    session.push(event(5), b"5")
    session.push(event(6), b"6")
    session.push(event(6), b"6-again")
    session.push(event(7), b"7")
    await eventually(lambda: len(transport.frames) == 2)
    await asyncio.sleep(10 * MS)
    assert transport.frames == [b"6", b"7"] and session.last == (7, 0)


async def test_session_push_held_while_recovering(make_session: Factory) -> None:
    """While recovering, pushed events are held, not queued, and the position stays."""
    transport = RecordingTransport()
    session = make_session(transport, since=(5, 0), live=False)
    session.push(event(5), b"5")
    session.push(event(6), b"6")
    session.push(event(7), b"7")
    assert [e.key for e in session.held] == [(6, 0), (7, 0)]
    assert session.queued == 0 and session.last == (5, 0)


async def test_session_send_after_closing_ignored(make_session: Factory) -> None:
    """Once closing, send() queues nothing."""
    transport = RecordingTransport()
    session = make_session(transport)
    await session.close(CloseCode.NORMAL)
    session.send(b"late")
    assert session.queued == 0 and transport.frames == []


async def test_session_write_error_stops_writer(make_session: Factory) -> None:
    """A send that raises marks the session closing and drops its queue."""
    transport = RecordingTransport(fail_send=True)
    session = make_session(transport)
    session.send(b"a")
    session.send(b"b")
    session.start()
    await eventually(lambda: session.closing)
    assert session.queued == 0


async def test_session_push_past_a_hole_closes_4509_after_what_was_queued(
    make_session: Factory,
) -> None:
    """An event that does not follow the position is never sent: queued frames go, then 4509."""
    transport = RecordingTransport()
    session = make_session(transport, SessionLimits(close_linger=0), since=(5, 0))
    session.start()
    session.push(event(6), b"6")
    session.push(event(9), b"9")  # names 8-0 as its predecessor: 7-0 and 8-0 are missing
    session.push(event(10), b"10")
    session.push(Event("11-0", (11, 0), (0, 0), "cml", "e", 11, 1.0), b"fresh-stream")
    await eventually(lambda: transport.closes)
    assert transport.frames == [b"6"] and transport.closes == [CloseCode.FEED_GAP]
    assert session.close_code == 4509
    assert transport.reason == "live feed gap: reconnect and resume"


async def test_session_push_unsendable_event_still_moves_the_position(
    make_session: Factory,
) -> None:
    """An event with no encoding in this format (frame None) is skipped, not taken for a hole."""
    transport = RecordingTransport()
    session = make_session(transport, since=(5, 0))
    session.start()
    session.push(event(6), None)
    session.push(event(7), b"7")
    await eventually(lambda: transport.frames)
    assert transport.frames == [b"7"] and session.last == (7, 0) and not session.closing


# -- Session: overflow ---------------------------------------------------------------------


async def test_session_overflow_by_count_closes_4508(make_session: Factory) -> None:
    """One frame past max_frames drops the queue and closes with 4508."""
    transport = RecordingTransport()
    session = make_session(transport, SessionLimits(max_frames=3, max_bytes=10**6))
    for i in range(3):
        session.send(b"%d" % i)
    assert session.queued == 3
    session.send(b"one too many")
    assert session.queued == 0
    await eventually(lambda: transport.closes)
    assert transport.closes == [CloseCode.TOO_SLOW] and session.close_code == 4508
    assert transport.frames == [] and not transport.aborted


async def test_session_overflow_by_bytes_closes_4508(make_session: Factory) -> None:
    """A frame that would take the queue past max_bytes closes with 4508; exactly full is fine."""
    transport = RecordingTransport()
    session = make_session(transport, SessionLimits(max_frames=100, max_bytes=10))
    session.send(b"123456")
    session.send(b"7890")
    assert session.queued == 2  # 10 bytes: at the limit, not over it
    session.send(b"x")
    assert session.queued == 0
    await eventually(lambda: transport.closes)
    assert transport.closes == [4508] and transport.frames == []


async def test_session_overflow_of_client_that_never_reads(make_session: Factory) -> None:
    """A stalled client fills the queue; 4508 cancels the blocked send, nothing more goes out."""
    transport = RecordingTransport()
    transport.stall(close_blocks=False)
    session = make_session(transport, SessionLimits(max_frames=5, max_bytes=10**6))
    session.start()
    session.send(b"first")
    await eventually(lambda: session.sending_since)  # the writer is stuck in send()
    for i in range(6):
        session.send(b"%d" % i)
    await eventually(lambda: transport.closes)
    assert transport.closes == [4508] and session.closing
    session.send(b"after")
    transport.reading.set()  # the client wakes up: nothing is left to send
    await asyncio.sleep(20 * MS)
    assert transport.frames == [] and session.queued == 0


async def test_session_push_overflow_closes_4508(make_session: Factory) -> None:
    """Live pushes past the limit close the session like sends do."""
    transport = RecordingTransport()
    session = make_session(transport, SessionLimits(max_frames=2))
    for ms in (1, 2, 3):
        session.push(event(ms), b"x")
    await eventually(lambda: transport.closes)
    assert transport.closes == [4508]


# -- Session: close ------------------------------------------------------------------------


async def test_session_close_flushes_before_close_frame(make_session: Factory) -> None:
    """close() sends every queued frame first, then the close frame, then nothing else."""
    transport = RecordingTransport()
    session = make_session(transport, SessionLimits(close_linger=0))
    session.start()
    frames = [b"a", b"b", b"c"]
    for frame in frames:
        session.send(frame)
    await session.close(CloseCode.SERVICE_RESTART, "draining")
    assert [(w, i) for w, i, _ in transport.log] == [
        ("send", b"a"),
        ("send", b"b"),
        ("send", b"c"),
        ("close", 1012),
    ]
    assert transport.reason == "draining" and session.close_code == 1012


async def test_session_close_lingers_after_last_frame(make_session: Factory) -> None:
    """close() waits close_linger after the queue drains before the close frame."""
    linger = 100 * MS
    transport = RecordingTransport()
    session = make_session(transport, SessionLimits(close_linger=linger))
    session.start()
    session.send(b"last words")
    await session.close(CloseCode.SERVICE_RESTART)
    assert transport.at("close") - transport.at("send") >= linger * 0.9


async def test_session_close_waits_flush_timeout_for_stuck_send(make_session: Factory) -> None:
    """A send that never finishes delays close by close_flush_timeout, then it is cancelled."""
    flush = 100 * MS
    transport = RecordingTransport()
    transport.stall(close_blocks=False)
    session = make_session(transport, SessionLimits(close_flush_timeout=flush, close_linger=0))
    session.start()
    session.send(b"stuck")
    await eventually(lambda: session.sending_since)
    started = asyncio.get_running_loop().time()
    await session.close(CloseCode.SERVICE_RESTART)
    assert transport.at("close") - started >= flush * 0.9
    assert transport.frames == [] and not transport.aborted


async def test_session_close_blocked_send_aborts_after_timeout(make_session: Factory) -> None:
    """A client that never reads cannot take the close frame either: abort after
    --close-timeout (it was a fixed 2 s, whatever the setting)."""
    close_timeout = 100 * MS
    transport = RecordingTransport()
    transport.stall()
    limits = SessionLimits(
        close_flush_timeout=20 * MS, close_linger=10 * MS, close_timeout=close_timeout
    )
    session = make_session(transport, limits)
    session.start()
    session.send(b"stuck")
    await eventually(lambda: session.sending_since)
    started = asyncio.get_running_loop().time()
    await session.close(CloseCode.SERVICE_RESTART)
    assert transport.closes == [1012] and transport.aborted
    assert transport.at("abort") - started >= close_timeout * 0.9
    assert transport.frames == []


@pytest.mark.parametrize("error", [ConnectionResetError("gone"), RuntimeError("closing")])
async def test_session_close_error_aborts(make_session: Factory, error: Exception) -> None:
    """A close frame that cannot be sent (connection or runtime error) aborts the socket."""
    transport = RecordingTransport(close_error=error)
    session = make_session(transport)
    await session.close(CloseCode.INTERNAL_ERROR)
    assert transport.closes == [1011] and transport.aborted


async def test_session_close_is_idempotent(make_session: Factory) -> None:
    """A second close() does nothing: one close frame, the first code kept."""
    transport = RecordingTransport()
    session = make_session(transport, SessionLimits(close_linger=0))
    session.start()
    await asyncio.gather(
        session.close(CloseCode.SERVICE_RESTART), session.close(CloseCode.REPLACED)
    )
    await session.close(CloseCode.TOO_SLOW)
    assert transport.closes == [1012] and session.close_code == 1012


async def test_session_close_without_writer_skips_flush(make_session: Factory) -> None:
    """With no writer running, close() does not wait: queued frames are dropped."""
    transport = RecordingTransport()
    session = make_session(transport, SessionLimits(close_linger=10.0))
    session.send(b"never sent")
    async with asyncio.timeout(1000 * MS):
        await session.close(CloseCode.NORMAL)
    assert transport.closes == [1000] and transport.frames == [] and session.queued == 0
