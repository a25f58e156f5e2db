"""The node: wires hub, sessions and engine. Connect, recover, fan out, kick, drain.

Connecting is the delicate part, done in this order so nothing falls between history
and the live feed: subscribe the BizId and hold its live events → read history after
``since`` and, in the same round trip, claim the client_id (kick the older session) →
queue welcome and replay → release the held events newer than the replay → live.

Fan-out happens here and only here: each event is encoded once per format and appended
to every local session's queue without awaiting any socket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Collection, Coroutine, Iterable, Sequence
from typing import Any

import structlog

from relay.backoff import Backoff, Jitter, Retry
from relay.config import Settings
from relay.engine import (
    Control,
    Engine,
    NodeFigures,
    SessionRecord,
    is_stale_claim,
    kicked_in_claim,
)
from relay.errors import EngineError, EngineUnavailable, InvalidEnvelope, RelayError
from relay.hub import DELIVER, GAP, STALE, Hub, Subscription
from relay.metrics import Metrics, RateMeter
from relay.protocol import CloseCode, Format, encode_message, encode_welcome
from relay.session import Session, SessionLimits, Transport
from relay.wire import (
    ID_ZERO,
    Event,
    History,
    PublishResult,
    StreamId,
    format_id,
    prove_recovery,
)

__all__ = ["Node", "NodeUnavailable"]

log = structlog.get_logger("relay.node")

START_BACKOFF_BASE = 0.2  # seconds before the second start attempt; doubles each time
START_BACKOFF_CAP = 2.0  # seconds between start attempts at most (each then jittered)
RECENT_EVENTS = 50  # notable events kept for the status page (a display, not a log)
_REPLACED = "replaced by a newer session"
DROP_COST_S = 0.0003  # seconds to stop per session a drain's deadline leaves open (_stop_reserve)


class NodeUnavailable(RelayError):
    """The node does not take new sessions now (draining, or at its connection limit)."""

    def __init__(self, message: str, close_code: int) -> None:
        super().__init__(message)
        self.close_code = close_code


def _new_session_id() -> str:
    """Unguessable: 72 bits from the OS per id (what secrets.token_urlsafe(9) gives, cheaper)."""
    return "s-" + base64.urlsafe_b64encode(os.urandom(9)).decode()


class Node:
    """One relay process's sessions and their routing to the engine."""

    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.id = settings.node_id
        self.hub: Hub[Session] = Hub()
        self.sessions: dict[str, Session] = {}
        self.by_client: dict[str, list[Session]] = {}
        self.limits = SessionLimits(
            max_frames=settings.send_queue_max,
            max_bytes=settings.send_queue_max_bytes,
            close_flush_timeout=settings.close_flush_timeout,
            close_linger=settings.close_linger,
            close_timeout=settings.close_timeout,
        )
        self.accepting = False
        self.draining = False
        self.stopped = False  # closed: deregistered, engine closed
        self.started_at = 0.0
        self.start_error: str | None = None  # why the last start attempt failed
        self._abandoned: set[str] = set()  # sessions whose connect gave up on the engine
        self._ttl_ms = settings.history_ttl * 1000
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        self._pending_connects = 0
        self._repair_again: set[str] = set()
        # (client_id, session) whose record could not be released (engine unavailable);
        # retried after each heartbeat, or it would read online while this node lives.
        self._unreleased: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.log = log.bind(node=self.id)
        # What an operator wants to see at a glance: the latest gaps, 4509s, engine
        # trouble (newest last), and how many of each since the start.
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.tally: Counter[str] = Counter()

    @property
    def address(self) -> str:
        """``host:port`` this node listens on; a wildcard host is named by the host name."""
        host = self.settings.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.settings.port}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this node runs in (the first one it was used from).

        Kept because on Python 3.11 every ``asyncio.get_running_loop()``, and so every
        ``ensure_future``, ``current_task`` and ``Future()`` without a loop, is a
        ``getpid()`` system call (~0.5 µs here): a connect made about 15 of them.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def note(self, kind: str, **detail: Any) -> None:
        """Remember a notable event for the status page (``kind`` is its log event's name)."""
        self.tally[kind] += 1
        self.recent.append({"ts": time.time(), "kind": kind, **detail})

    def figures(self, rates: RateMeter) -> NodeFigures:
        """What this node reports of itself with each heartbeat."""
        r = rates.read()
        return NodeFigures(
            address=self.address,
            state="draining" if self.draining else "ready" if self.ready else "unready",
            messages_per_s=r.messages_per_s,
            events_per_s=r.events_per_s,
            publishes_per_s=r.publishes_per_s,
            gaps_repaired=self.tally["gap.repaired"],
            gaps_unrecoverable=self.tally["gap.unrecoverable"],
            closed_4509=self.tally["session.closed_4509"],
        )

    # -- lifecycle -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True when the node takes sessions and can prove live delivery works."""
        return self.accepting and not self.draining and self.engine.ready

    def unready_reason(self) -> str:
        """Why the node is not ready: ``draining``, ``starting`` or ``engine not ready``."""
        if self.draining:
            return "draining"
        return "engine not ready" if self.accepting else "starting"

    async def start(self, wait: float | None = None) -> None:
        """Connect the engine and register, then accept sessions.

        ``wait=None`` tries once. Otherwise an unreachable engine is retried with backoff
        for ``wait`` seconds (0: for ever), logging ``node.start_failed`` each time: a node
        started while Redis is away comes up when Redis does, ``/readyz`` 503 meanwhile,
        instead of exiting for a supervisor to restart it. Past ``wait`` the last
        EngineUnavailable is raised.
        """
        self.started_at = time.time()
        began = time.monotonic()
        retry = Retry(
            Backoff(START_BACKOFF_BASE, START_BACKOFF_CAP, Jitter.HALF),
            retries=0 if wait is None else None,
            deadline=began + wait if wait else None,
        )
        while True:
            try:
                await self.engine.start(self.id, self)
                break
            except EngineUnavailable as exc:
                self.start_error = str(exc)
                delay = retry.failed(time.monotonic())
                if delay is None:
                    if wait is not None:
                        waited = time.monotonic() - began
                        self.log.error("node.start_timed_out", error=str(exc), waited=waited)
                        raise EngineUnavailable(f"{exc}; gave up after {waited:.0f} s") from exc
                    raise
                self.log.warning(
                    "node.start_failed",
                    error=str(exc),
                    attempt=retry.failures,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
        self.start_error = None
        self.accepting = True
        rates = RateMeter(self.metrics)
        # The engine registered the node bare; say at once where it listens and that it
        # is ready, rather than a heartbeat interval later.
        with contextlib.suppress(EngineError):
            await self.engine.heartbeat(len(self.sessions), self.figures(rates))
        self._loops = [
            self._spawn_loop(self._heartbeat_loop(rates), "heartbeat"),
            self._spawn_loop(self._watchdog_loop(), "watchdog"),
        ]
        self.log.info("node.started", engine=self.engine.name, attempts=retry.failures + 1)

    def _spawn_loop(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return self.loop.create_task(coro, name=f"relay-{name}-{self.id}")

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run a background task the node keeps a reference to and cancels on close."""
        task = asyncio.ensure_future(coro, loop=self.loop)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, grace: float | None = None, *, exiting: bool = False) -> None:
        """Stop accepting, close every session with 1012 in staggered batches, deregister.

        ``grace`` (``--drain-grace``) is a deadline, counted from this call: the closes go
        out over its first 60 % on a fixed timetable, the sockets then have until the
        grace is nearly over (:meth:`_stop_reserve` keeps its end for stopping) to finish
        their close handshake, and whatever is still open then is dropped by :meth:`close`.
        A late batch goes out at once instead of pushing the rest back: timed by sleeps of
        1/200 of the spread each, a busy loop stretched a 10 s drain to 13.2 s (10,136
        sessions, one core) and 18.2 s (12,623 sessions on a loaded machine), past a
        supervisor's patience.

        ``exiting``: the process ends right after (``relay serve``), so the sessions
        still open at the deadline are left to the kernel (:meth:`stop_leaving_sessions`)
        instead of being closed one by one, which costs ~300 µs of CPU each and took a
        starved worker 8.6 s for 8,642 sessions: its exit came 6 s past a 10 s grace.
        Deregistering is then bounded by the deadline also when no session is left (a
        hung Redis held it for the socket timeout, 2 s, past a 1 s grace).
        """
        grace = self.settings.drain_grace if grace is None else grace
        began = time.monotonic()
        end = began + max(1.0, grace)  # a second at least for the close handshakes
        self.accepting = False
        self.draining = True
        sessions = list(self.sessions.values())
        self.note("node.draining", sessions=len(sessions))
        self.log.info("node.draining", sessions=len(sessions), grace=grace)
        if sessions:
            # Spread the closes over most of the grace period so the clients' reconnects
            # do not arrive at the other nodes as one herd.
            batches = max(1, min(len(sessions), int(grace / 0.05) or 1))
            size = -(-len(sessions) // batches)
            spread = max(0.0, grace * 0.6)
            for batch, start in enumerate(range(0, len(sessions), size)):
                late = time.monotonic() - (began + spread * batch / batches)
                if late < 0:
                    await asyncio.sleep(-late)
                for session in sessions[start : start + size]:
                    self.spawn(session.close(CloseCode.SERVICE_RESTART, "node draining"))
            issued = time.monotonic() - began
            while self.sessions and time.monotonic() < end - self._stop_reserve(grace, exiting):
                await asyncio.sleep(0.02)
            self.log.info(
                "node.drained",
                sessions=len(sessions),
                left=len(self.sessions),
                closes_sent_s=round(issued, 3),
                took_s=round(time.monotonic() - began, 3),
            )
        if exiting and self.sessions:
            await self.stop_leaving_sessions(until=end)
        else:
            await self.close(until=end if exiting else None)

    def _stop_reserve(self, grace: float, exiting: bool = False) -> float:
        """The end of a drain's grace kept for stopping: the loops, deregistering, dropping
        the sessions still open (unless ``exiting``: they are left), the process's exit.
        Measured: 0.2-0.3 s with none left; with 8,000 left (clients that never answered
        the close) 2.6 s on a loaded machine, 0.8 s for 4,000 on a quiet one: about
        300 µs per session dropped."""
        grace = max(1.0, grace)
        least = min(1.0, grace * 0.1)
        if exiting:
            return least
        return max(least, min(grace * 0.4, len(self.sessions) * DROP_COST_S))

    async def stop_leaving_sessions(self, until: float) -> None:
        """Stop the loops, deregister and close the engine, leaving the sessions still
        open as they are: for a process that exits next, whose sockets the kernel then
        closes at once, whatever their number. Their clients have had their 1012 (or,
        on a loop too starved to send every close in time, see the socket drop: 1006);
        they resume elsewhere from their own last id, as after a crash, and their
        records are a gone node's from the deregistering on.

        ``until`` (monotonic) bounds the engine's close: a Redis that stopped answering
        would hold the deregistering for its socket timeout, past the drain's grace; the
        node's record then expires with its TTL instead.
        """
        self.accepting = False
        self.stopped = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        await self._close_engine(until)
        self.log.info("node.stopped", left=len(self.sessions))

    async def _close_engine(self, until: float | None) -> None:
        """Deregister and close the engine, given up at ``until`` (monotonic) if set."""
        try:
            async with asyncio.timeout(
                None if until is None else max(0.1, until - time.monotonic())
            ):
                await self.engine.close()
        except TimeoutError:
            self.log.warning("node.deregister_abandoned", reason="drain deadline")

    async def close(self, until: float | None = None) -> None:
        """Close what is left (1001), stop the loops, deregister (given up at ``until``,
        monotonic, if set: see :meth:`stop_leaving_sessions`). Idempotent."""
        self.accepting = False
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loops = []
        left = list(self.sessions.values())
        if left:
            await asyncio.gather(
                *(s.close(CloseCode.GOING_AWAY, "node stopping", flush=False) for s in left),
                return_exceptions=True,
            )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # From here a socket that drops is not released: the node deregisters now, and its
        # records become a gone node's (3,195 session.release_failed warnings on an
        # engine closing under them, when this was set after the close).
        self.stopped = True
        await self._close_engine(until)
        self.log.info("node.stopped")

    async def _heartbeat_loop(self, rates: RateMeter) -> None:
        interval = max(0.5, self.settings.engine_options.node_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.engine.heartbeat(len(self.sessions), self.figures(rates))
                if self._unreleased:
                    await self._retry_releases()
            except EngineError as exc:
                self.log.warning("node.heartbeat_failed", error=str(exc))

    async def _watchdog_loop(self) -> None:
        """Abort sockets whose write is stuck; close sessions whose token expired."""
        timeout = self.settings.send_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 2))
            mono, now = time.monotonic(), time.time()
            for session in list(self.sessions.values()):
                if session.closing:
                    continue
                if session.sending_since and mono - session.sending_since > timeout:
                    self.log.info("session.send_timed_out", session=session.id)
                    session.overflow()
                elif session.expires_at is not None and now >= session.expires_at:
                    self.spawn(session.close(CloseCode.TOKEN_EXPIRED, "token expired"))

    # -- sessions --------------------------------------------------------------------

    async def connect(
        self,
        client_id: str,
        fmt: Format,
        transport: Transport,
        *,
        since: StreamId | None = None,
        expires_at: float | None = None,
        started_at: float | None = None,
        attempt: str | None = None,
        observe: bool = False,
    ) -> Session:
        """Open a session: subscribe, claim and replay, go live. Raises NodeUnavailable.

        ``started_at`` is when the handshake arrived: of two handshakes of one client on
        this node, the later one wins even if the earlier one finishes last.
        ``observe`` opens an observer (``relay tail``): the client's events, replay
        included, without claiming its session, so the client itself is never replaced.
        """
        if self.draining:
            raise NodeUnavailable("node is draining", CloseCode.SERVICE_RESTART)
        if not self.accepting:
            # Starting: waiting for Redis. Back off and retry (another node may take it).
            raise NodeUnavailable("node is starting", CloseCode.TRY_AGAIN_LATER)
        if len(self.sessions) >= self.settings.max_connections:
            raise NodeUnavailable("connection limit reached", CloseCode.TRY_AGAIN_LATER)
        if not self.engine.ready:
            # Redis is down or hung: a session could not be proven live. Back off and retry.
            raise NodeUnavailable("broker unavailable", CloseCode.TRY_AGAIN_LATER)
        if self._pending_connects >= self.settings.max_pending_connects:
            # A reconnect herd: refuse cheaply now rather than time everyone out later.
            raise NodeUnavailable("too many connects at once", CloseCode.TRY_AGAIN_LATER)
        self._pending_connects += 1
        try:
            return await self._connect(
                client_id, fmt, transport, since, expires_at, started_at, attempt, observe
            )
        finally:
            self._pending_connects -= 1

    async def _connect(
        self,
        client_id: str,
        fmt: Format,
        transport: Transport,
        since: StreamId | None,
        expires_at: float | None,
        started_at: float | None,
        attempt: str | None,
        observe: bool,
    ) -> Session:
        session = Session(client_id, _new_session_id(), fmt, transport, self.limits, since)
        session.expires_at = expires_at
        if started_at is not None:
            session.connected_at = started_at
        session.attempt = attempt
        session.observer = observe
        self.sessions[session.id] = session
        if not observe:
            self.by_client.setdefault(client_id, []).append(session)
        try:
            sub, held, history = await self._open_feed(session, observe)
        except BaseException:
            # Told now; the engine calls of forgetting it may wait on a hung Redis.
            self.spawn(self.disconnect(session))
            raise
        if session.closing or not held:  # replaced while connecting, or a stale handshake
            return session
        # From here to live nothing awaits: no event can slip between replay and live.
        entries = history.entries if since is not None else []
        recovered = None if since is None else self._recovered(since, history)
        head = entries[-1].key if entries else history.head()
        session.send(
            encode_welcome(
                fmt,
                client_id=client_id,
                node=self.id,
                session=session.id,
                heartbeat=self.settings.heartbeat,
                last_id=head,
                recovered=recovered,
                replayed=len(entries),
            )
        )
        for entry in entries:
            frame = self._encode(entry, fmt)
            if frame is not None:
                session.send(frame)
        session.last = head
        if sub.last is None:
            sub.advance(history.head())
        self._go_live(session)
        session.start()
        self.metrics.connections.set(len(self.sessions))
        self.metrics.sessions_opened.inc()
        self.metrics.replayed.inc(len(entries))
        self.log.info(
            "session.opened",
            client_id=client_id,
            session=session.id,
            format=fmt.value,
            since=format_id(since) if since else None,
            recovered=recovered,
            replayed=len(entries),
        )
        return session

    async def _open_feed(
        self, session: Session, observe: bool
    ) -> tuple[Subscription[Session], bool, History]:
        """Subscribe, then claim (or observe) and read history in one round trip."""
        sub = await self._attach(session)
        # History must be read after the subscription is live; the claim need not wait
        # for either, so it goes with the history read: one round trip instead of two.
        # The claim's task is made first, so its command joins the history read's batch;
        # one task per connect and no gather (each costs a task and a future more).
        claim = self.loop.create_task(self._observe() if observe else self._claim(session))
        try:
            history = await self.engine.history(
                session.client_id, session.since, self.settings.replay_limit
            )
        finally:
            held = await claim  # a failed claim is the error raised, as it comes first
        return sub, held, history

    def _recovered(self, since: StreamId, history: History) -> bool:
        """The welcome's ``recovered``: a ``since`` past --max-since-age is not vouched for."""
        max_age_ms = self.settings.max_since_age * 1000
        if max_age_ms and since[0] < history.now_ms - max_age_ms:
            return False
        return prove_recovery(since, history, self._ttl_ms)

    def _go_live(self, session: Session) -> None:
        """Release the live events held while connecting; past a hole the session ends 4509."""
        held, session.held = session.held, []
        session.recovering = False
        for event in held:
            if event.key > session.last:
                session.push(event, self._encode(event, session.format))

    async def _claim(self, session: Session) -> bool:
        """Record this session as the client_id's holder; with ``replace``, kick the old.

        False when a later handshake of the client holds it: this session is being closed.
        """
        record = SessionRecord(
            session.client_id,
            self.id,
            session.id,
            format_id(session.since) if session.since else None,
            session.connected_at,
            session.attempt,
        )
        replace = self.settings.duplicates == "replace"
        kick = Control("kick", session.client_id, "", CloseCode.REPLACED, _REPLACED)
        old = await self.engine.claim_session(record, exclusive=replace, kick=kick)
        if session.id in self._abandoned:
            # Its client was told 1013 already: kick no one, and undo the claim now. The
            # client may be live elsewhere by now, on a later attempt whose claim landed
            # first; this claim took its record, and this session's release would then
            # delete it (offline, never replaced by the client's next connection).
            await self._unclaim(session, old if replace else None)
            return False
        if not replace or old is None or old.session == session.id:
            return True
        if is_stale_claim(old, record):
            # A later handshake of this client already holds it: this one is stale.
            self.spawn(session.close(CloseCode.REPLACED, "a newer session exists"))
            return False
        self.log.info(
            "session.replaced", client_id=session.client_id, old=old.session, old_node=old.node
        )
        control = Control("kick", session.client_id, old.session, CloseCode.REPLACED, _REPLACED)
        if old.node == self.id:
            self.on_control(control)
        elif not (self.engine.kicks_in_claim and kicked_in_claim(old, record)):
            # Not awaited: the new session does not depend on it, and after a node died
            # every client of it would wait for a kick that reaches no one.
            self.spawn(self._kick_remote(old.node, control))
        return True

    async def _unclaim(self, session: Session, displaced: SessionRecord | None) -> None:
        """Release an abandoned session's claim at once, putting back the holder it
        displaced (fenced: a claim that landed after it is left alone)."""
        if displaced is not None and displaced.session == session.id:
            displaced = None
        try:
            await self.engine.release_session(session.client_id, session.id, restore=displaced)
        except EngineError as exc:
            # Its release is tried again as the session is forgotten, without the restore.
            self.log.warning("session.unclaim_failed", session=session.id, error=str(exc))

    async def _observe(self) -> bool:
        """An observer's stand-in for the claim: it holds no record, so it always goes live."""
        return True

    async def _kick_remote(self, node_id: str, control: Control) -> None:
        try:
            await self.engine.send_control(node_id, control)
        except EngineError as exc:
            self.log.warning("session.kick_failed", old_node=node_id, error=str(exc))

    async def _attach(self, session: Session) -> Subscription[Session]:
        biz_id = session.client_id
        sub, first = self.hub.add(biz_id, session)
        if first:
            future = self.loop.create_future()
            self._subscribing[biz_id] = future
            try:
                await self.engine.subscribe(biz_id)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved here; waiters still get it
                raise
            else:
                future.set_result(None)
            finally:
                self._subscribing.pop(biz_id, None)
        else:
            pending = self._subscribing.get(biz_id)
            if pending is not None:
                await asyncio.shield(pending)
        return sub

    async def disconnect(self, session: Session) -> None:
        """Forget a session whose socket is gone: unsubscribe if last, release the record."""
        if self.sessions.pop(session.id, None) is None:
            return
        self._abandoned.discard(session.id)
        peers = self.by_client.get(session.client_id)
        if peers is not None and not session.observer:
            peers.remove(session)
            if not peers:
                del self.by_client[session.client_id]
        session.closing = True
        await session.stop_writer()
        self.metrics.connections.set(len(self.sessions))
        self.metrics.sessions_closed.labels(str(session.close_code or "peer")).inc()
        if session.close_code == CloseCode.TOO_SLOW:
            self.metrics.overflows.inc()
        elif session.close_code == CloseCode.FEED_GAP:
            self.note("session.closed_4509", client_id=session.client_id)
        self.log.info(
            "session.closed",
            client_id=session.client_id,
            session=session.id,
            code=session.close_code,
        )
        if self.stopped:
            # A socket dropped after the drain's deadline: the node has deregistered, so
            # its records are a gone node's, and the engine is closed (each release would
            # fail: 2,458 warnings and 1 s more before exiting, in a drain that left them).
            return
        try:
            if self.hub.remove(session.client_id, session):
                await self.engine.unsubscribe(session.client_id)
            if not session.observer:
                await self._release(session.client_id, session.id)
        except EngineError as exc:
            # A session that went live wrote its record; one that failed while
            # connecting (Redis down) almost surely did not, and is not kept.
            if not session.recovering:
                self._unreleased.add((session.client_id, session.id))
            self.log.warning("session.release_failed", session=session.id, error=str(exc))

    async def _release(self, client_id: str, session_id: str) -> None:
        await self.engine.release_session(client_id, session_id)

    async def _retry_releases(self) -> None:
        """Release the records left behind while the engine was unavailable (fenced)."""
        count = len(self._unreleased)
        for key in list(self._unreleased):
            await self._release(*key)
            self._unreleased.discard(key)
        self.log.info("session.releases_retried", count=count)

    async def acknowledge(self, session: Session, message_id: StreamId) -> None:
        if session.observer:
            return  # an observer's position is its own, not the client's
        try:
            await self.engine.record_ack(session.client_id, session.id, format_id(message_id))
        except EngineError as exc:
            self.log.debug("session.ack_failed", session=session.id, error=str(exc))

    async def kick(self, client_id: str, code: int = CloseCode.REPLACED, reason: str = "") -> bool:
        """Close every session of ``client_id`` on every live node. True if one was known.

        Each node is told to close all of the client's sessions (with ``--duplicates
        allow`` there may be several, on several nodes), not just the one the registry
        names: a session still connecting is not in the registry yet.
        """
        reason = reason or "closed by the operator"
        control = Control("kick", client_id, "", code, reason)
        found = bool(self.by_client.get(client_id))
        self.on_control(control)
        status, live = await asyncio.gather(
            self.engine.client_status(client_id), self.engine.nodes()
        )
        targets = {info.node for info in live}
        if status.node is not None:
            targets.add(status.node)
        targets.discard(self.id)
        sent = await asyncio.gather(
            *(self.engine.send_control(node_id, control) for node_id in sorted(targets)),
            return_exceptions=True,
        )
        for outcome in sent:
            if isinstance(outcome, BaseException):
                raise outcome
        return found or status.online

    async def publish(
        self, biz_id: str, event: str, data: Any, *, mid: str | None = None
    ) -> PublishResult:
        result = await self.engine.publish(biz_id, event, data, mid=mid)
        self.metrics.publishes.inc()
        return result

    async def publish_run(
        self, biz_id: str, events: Sequence[tuple[str, Any, str | None]]
    ) -> list[PublishResult]:
        results = await self.engine.publish_run(biz_id, events)
        self.metrics.publishes.inc(len(results))
        return results

    # -- engine callbacks --------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        sub = self.hub.get(event.biz_id)
        if sub is None:
            return
        self.metrics.events_in += 1
        verdict = sub.offer(event)
        if verdict is DELIVER:
            self._fan_out(sub, event)
        elif self.draining and verdict is not STALE:
            self._hand_over(sub)
        elif verdict is GAP:
            self.spawn(self._repair(sub))

    def _hand_over(self, sub: Subscription[Session]) -> None:
        """While draining, a BizId whose feed has (or may have) a hole is not repaired here:
        its sessions end now with 1012 and resume on another node from their own last id,
        where history fills the hole. A repair would read history for sessions about to
        leave, and holding their events until the timetable closes them would delay them
        by up to most of the grace. (Seen: a 100,000-client run whose drained worker had
        its pub/sub connection replaced mid-drain, its canary missed on a busy machine;
        that worker then had 12,416 sessions' BizIds to repair, and exited 2 s past its
        grace.)"""
        sub.held.clear()  # the next node replays them from history
        for session in sub.sessions:
            if not session.closing:
                self.spawn(session.close(CloseCode.SERVICE_RESTART, "node draining"))
        self.note("gap.handed_over", biz_id=sub.biz_id, sessions=len(sub.sessions))
        self.log.info("gap.handed_over", biz_id=sub.biz_id, sessions=len(sub.sessions))

    def _fan_out(self, sub: Subscription[Session], event: Event) -> None:
        sessions = sub.sessions
        if not sessions:
            return
        if len(sessions) == 1:
            # The usual case, one session per BizId: no table of frames by format (its
            # dict and Format's hashing in Python are ~0.3 µs of the ~15 µs a message costs).
            session = sessions[0]
            # _encode() inlined: a Python call less per delivered message.
            try:
                frame: bytes | None = encode_message(event, session.format)
            except InvalidEnvelope as exc:
                self._unsendable(event, exc)
                frame = None
            session.push(event, frame)
        else:
            frames: dict[Format, bytes | None] = {}
            for session in sessions:
                fmt = session.format
                if fmt not in frames:
                    frames[fmt] = self._encode(event, fmt)
                session.push(event, frames[fmt])
        metrics = self.metrics
        metrics.messages_out += len(sessions)
        # The clock is read per event (~0.06 µs), not once per pub/sub read: a read can
        # hold a backlog of hundreds of messages that take milliseconds to fan out, and the
        # histogram's first bucket is 0.5 ms.
        metrics.latency.observe(time.time() - event.ts)

    def _encode(self, event: Event, fmt: Format) -> bytes | None:
        try:
            return encode_message(event, fmt)
        except InvalidEnvelope as exc:
            self._unsendable(event, exc)
            return None

    def _unsendable(self, event: Event, exc: InvalidEnvelope) -> None:
        self.log.warning("event.unsendable", biz_id=event.biz_id, id=event.id, error=str(exc))

    async def _repair(self, sub: Subscription[Session]) -> None:
        """Fill a live-feed gap from history, then release what was held meanwhile.

        A hole is never skipped. When history cannot prove it closed (trimmed past it,
        expired, or unreadable for --gap-repair-timeout), the sessions it affects end with
        4509 and resume with ``since=``: their welcome's ``recovered`` tells the truth.
        """
        biz_id = sub.biz_id
        while True:
            since = sub.last
            assert since is not None
            history = await self._repair_history(biz_id, since)
            if history is None:
                self._abandon(sub, since, "history unreadable")
                return
            entries = [e for e in history.entries if e.key > since]
            if prove_recovery(since, history, self._ttl_ms):
                self.metrics.gaps.inc()
                self.note("gap.repaired", biz_id=biz_id, replayed=len(entries))
                self.log.info("gap.repaired", biz_id=biz_id, replayed=len(entries))
            elif entries and entries[0].prev != ID_ZERO:
                # History was trimmed past the hole. What it kept is contiguous, so it
                # still continues any session whose own position reaches it (one that
                # connected meanwhile); every other session ends 4509 in Session.push.
                self.note("gap.unrecoverable", biz_id=biz_id, reason="history trimmed")
                self.log.warning(
                    "gap.unrecoverable",
                    biz_id=biz_id,
                    since=format_id(since),
                    resumes_after=format_id(entries[0].prev),
                )
            else:
                self._abandon(sub, since, "history does not reach back to the hole")
                return
            for entry in entries:
                sub.advance(entry.key)
                self._fan_out(sub, entry)
            if biz_id in self._repair_again:
                self._repair_again.discard(biz_id)
                continue
            released, complete = sub.end_repair()
            for event in released:
                self._fan_out(sub, event)
            if complete:
                return
            # A held event does not follow: another hole opened during the read.

    async def _repair_history(self, biz_id: str, since: StreamId) -> History | None:
        """History after ``since``, retried with backoff; None once the time is up."""
        retry = Retry(
            Backoff(0.1, jitter=Jitter.NONE),
            deadline=time.monotonic() + self.settings.gap_repair_timeout,
        )
        while True:
            try:
                return await self.engine.history(biz_id, since, self.settings.replay_limit)
            except EngineError as exc:
                self.log.warning("gap.repair_failed", biz_id=biz_id, error=str(exc))
            delay = retry.failed(time.monotonic())
            if delay is None:
                return None
            await asyncio.sleep(delay)

    def _abandon(self, sub: Subscription[Session], since: StreamId, why: str) -> None:
        """No history continues the feed: end every session of the BizId here with 4509.

        Sessions still connecting end too (their own history read may predate the hole).
        The held events are dropped, never delivered past the hole; the position is
        forgotten, so a session that connects next starts from its own history read.
        """
        self._repair_again.discard(sub.biz_id)
        dropped = sub.reset()
        sessions = [s for s in sub.sessions if not s.closing]
        self.note("gap.unrecoverable", biz_id=sub.biz_id, reason=why)
        self.log.warning(
            "gap.unrecoverable",
            biz_id=sub.biz_id,
            since=format_id(since),
            reason=why,
            sessions=len(sessions),
            dropped=len(dropped),
        )
        for session in sessions:
            session.gap()

    def on_resubscribed(self, biz_ids: Collection[str] | None = None) -> None:
        """The live feed was re-established: every BizId (or each of ``biz_ids``) may have
        a gap."""
        self.metrics.engine_reconnects.inc()
        if biz_ids is None:
            subs: Iterable[Subscription[Session]] = self.hub
            count = len(self.hub)
        else:
            subs = [sub for sub in map(self.hub.get, biz_ids) if sub is not None]
            count = len(subs)
        self.note("engine.resubscribed", subscriptions=count)
        self.log.info("engine.resubscribed", subscriptions=count, draining=self.draining)
        for sub in subs:
            if not sub.sessions:
                continue
            if self.draining:  # held, not repaired: its next event hands its sessions over
                sub.hold()
                continue
            if sub.repairing:
                self._repair_again.add(sub.biz_id)
                continue
            since = sub.last if sub.last is not None else min(s.last for s in sub.sessions)
            sub.begin_repair(since)
            self.spawn(self._repair(sub))

    def on_control(self, control: Control) -> None:
        if control.action == "rejoin":
            # The registry forgot us (taken for dead): clients reconnect and are recorded.
            for session in list(self.sessions.values()):
                self.spawn(session.close(CloseCode.SERVICE_RESTART, "node rejoining"))
            return
        if control.action != "kick":
            return
        for session in list(self.by_client.get(control.client_id, ())):
            if control.session and session.id != control.session:
                continue
            self.spawn(session.close(control.code, control.reason))

    def on_health(self, healthy: bool) -> None:
        self.note("engine.health_changed", healthy=healthy)
        self.log.warning("engine.health_changed", healthy=healthy)
        if healthy:
            return
        # A hung Redis answers nothing until the socket and command timeouts (seconds);
        # the canary notices sooner. Connects still waiting on it are told now (1013); they
        # finish unseen: marked, they neither kick the previous holder nor go live.
        for session in list(self.sessions.values()):
            if session.recovering and not session.closing:
                self._abandoned.add(session.id)
                self.spawn(session.close(CloseCode.TRY_AGAIN_LATER, "broker unavailable"))
