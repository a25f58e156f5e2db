"""The memory engine: one process, no Redis, the same ids, history and semantics.

It is the default when no Redis URL is given, so ``relay serve`` works on a bare machine.
Payloads go through the same encoder as Redis publishes, so data round-trips alike.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relay.engine import (
    ClientStatus,
    Control,
    EngineHandler,
    EngineHealth,
    EngineOptions,
    NodeFigures,
    NodeInfo,
    SessionRecord,
    is_stale_claim,
)
from relay.errors import EngineError
from relay.wire import (
    ID_ZERO,
    Event,
    History,
    PublishResult,
    StreamId,
    decode_payload,
    encode_payload,
    format_id,
)

if TYPE_CHECKING:
    from relay.engine import Broker, Engine, NodeRegistry, SessionRegistry

__all__ = ["MemoryEngine"]


@dataclass(slots=True)
class _Stream:
    entries: deque[Event] = field(default_factory=deque)
    last: StreamId = ID_ZERO
    expires_at: float = 0.0


class MemoryEngine:
    """Broker and registry in this process's memory."""

    name = "memory"
    kicks_in_claim = False  # one node: a displaced session is always the caller's own

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self._streams: dict[str, _Stream] = {}
        self._mids: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._subscribed: set[str] = set()
        self._sessions: dict[str, SessionRecord] = {}  # the newest session per client_id
        self._live_sessions: dict[str, dict[str, SessionRecord]] = {}
        self._acks: dict[str, str] = {}
        self._handler: EngineHandler | None = None
        self._node_id = ""
        self._started_at = 0.0
        self._connections = 0
        self._last_seen = 0.0
        self._figures = NodeFigures()
        self._publishes = 0
        # History before this process is unknown. One millisecond earlier, because a head
        # read in the first millisecond is (now - 1, 0) (History.head) and must be vouched
        # for; no earlier process can have published in that same millisecond.
        self._epoch_ms = int(time.time() * 1000) - 1

    @property
    def ready(self) -> bool:
        return self._handler is not None

    async def start(self, node_id: str, handler: EngineHandler) -> None:
        self._node_id = node_id
        self._handler = handler
        self._started_at = self._last_seen = time.time()

    async def close(self) -> None:
        self._handler = None
        self._subscribed.clear()

    # -- broker ----------------------------------------------------------------------

    def _live_stream(self, biz_id: str, now: float) -> _Stream | None:
        stream = self._streams.get(biz_id)
        if stream is not None and stream.expires_at <= now:
            del self._streams[biz_id]
            return None
        return stream

    def _sweep(self, now: float) -> None:
        """Forget expired streams and mids; amortised over publishes."""
        for biz_id in [b for b, s in self._streams.items() if s.expires_at <= now]:
            del self._streams[biz_id]
        while self._mids:
            key, (_, expires_at) = next(iter(self._mids.items()))
            if expires_at > now:
                break
            del self._mids[key]

    async def publish(
        self, biz_id: str, event: str, data: Any, *, mid: str | None = None
    ) -> PublishResult:
        max_size = self.options.max_payload
        return self._publish(
            biz_id, encode_payload(biz_id, event, data, mid=mid, max_size=max_size), mid
        )

    async def publish_run(
        self, biz_id: str, events: Sequence[tuple[str, Any, str | None]]
    ) -> list[PublishResult]:
        max_size = self.options.max_payload
        encoded = [
            (encode_payload(biz_id, event, data, mid=mid, max_size=max_size), mid)
            for event, data, mid in events
        ]
        return [self._publish(biz_id, payload, mid) for payload, mid in encoded]

    def _publish(self, biz_id: str, payload: bytes, mid: str | None) -> PublishResult:
        opts = self.options
        now = time.time()
        self._publishes += 1
        if self._publishes % 1024 == 0:
            self._sweep(now)
        online = biz_id in self._subscribed and biz_id in self._sessions
        if mid is not None:
            seen = self._mids.get((biz_id, mid))
            if seen is not None and seen[1] > now:
                return PublishResult(seen[0], online, 0, duplicate=True)
        stream = self._live_stream(biz_id, now)
        if stream is None:
            stream = self._streams[biz_id] = _Stream()
        ms = int(now * 1000)
        prev = stream.last if stream.entries else ID_ZERO
        key = (ms, 0) if ms > stream.last[0] else (stream.last[0], stream.last[1] + 1)
        sid = format_id(key)
        entry = decode_payload(sid, format_id(prev), payload)
        stream.entries.append(entry)
        stream.last = key
        stream.expires_at = now + opts.history_ttl
        while len(stream.entries) > opts.history_size:
            stream.entries.popleft()
        if mid is not None:
            self._mids[(biz_id, mid)] = (sid, now + opts.dedupe_window)
            self._mids.move_to_end((biz_id, mid))
        receivers = 0
        if biz_id in self._subscribed and self._handler is not None:
            receivers = 1
            self._handler.on_event(entry)
        return PublishResult(sid, online, receivers)

    async def subscribe(self, biz_id: str) -> None:
        self._subscribed.add(biz_id)

    async def unsubscribe(self, biz_id: str) -> None:
        self._subscribed.discard(biz_id)

    async def history(self, biz_id: str, since: StreamId | None, limit: int) -> History:
        now = time.time()
        now_ms = int(now * 1000)
        stream = self._live_stream(biz_id, now)
        if stream is None or not stream.entries:
            return History([], None, None, None, now_ms, epoch_ms=self._epoch_ms)
        first = stream.entries[0]
        entries: list[Event] = []
        truncated = False
        if since is not None:
            entries = [e for e in stream.entries if e.key > since]
            if len(entries) > limit:
                entries, truncated = entries[-limit:], True
        return History(
            entries, first.key, first.prev, stream.last, now_ms, truncated, self._epoch_ms
        )

    # -- registry --------------------------------------------------------------------

    async def claim_session(
        self, record: SessionRecord, *, exclusive: bool = True, kick: Control | None = None
    ) -> SessionRecord | None:
        client_id = record.client_id
        old = self._sessions.get(client_id)
        live = self._live_sessions.setdefault(client_id, {})
        if exclusive:
            if old is not None and is_stale_claim(old, record):
                return old  # a later handshake of this client already holds it
            live.clear()
            self._acks.pop(client_id, None)
        live[record.session] = record
        self._sessions[client_id] = record
        return old

    async def release_session(
        self, client_id: str, session: str, *, restore: SessionRecord | None = None
    ) -> bool:
        live = self._live_sessions.get(client_id, {})
        live.pop(session, None)
        record = self._sessions.get(client_id)
        if record is None or record.session != session:
            return False
        if restore is not None:
            self._sessions[client_id] = restore
            self._live_sessions[client_id] = {restore.session: restore}
            return True
        if live:
            self._sessions[client_id] = next(reversed(live.values()))
            return True
        del self._sessions[client_id]
        self._live_sessions.pop(client_id, None)
        self._acks.pop(client_id, None)
        return True

    async def record_ack(self, client_id: str, session: str, message_id: str) -> None:
        record = self._sessions.get(client_id)
        if record is not None and record.session == session:
            self._acks[client_id] = message_id

    async def client_status(self, client_id: str) -> ClientStatus:
        record = self._sessions.get(client_id)
        if record is None:
            return ClientStatus(client_id, False, None, None, None, None)
        return ClientStatus(
            client_id,
            True,
            record.node,
            record.session,
            record.since,
            self._acks.get(client_id),
        )

    async def send_control(self, node_id: str, control: Control) -> None:
        handler = self._handler
        if handler is None:
            raise EngineError("engine is not started")
        if node_id == self._node_id:
            asyncio.get_running_loop().call_soon(handler.on_control, control)

    async def heartbeat(self, connections: int, figures: NodeFigures | None = None) -> None:
        self._connections = connections
        self._figures = figures or NodeFigures()
        self._last_seen = time.time()

    async def nodes(self) -> list[NodeInfo]:
        if self._handler is None:
            return []
        return [
            NodeInfo(
                self._node_id, self._connections, self._started_at, self._last_seen, self._figures
            )
        ]

    async def health(self) -> EngineHealth:
        return EngineHealth(self.name, self.ready, True, latency_ms=0.0)


if TYPE_CHECKING:  # mypy proves the memory engine fits each interface

    def _fits_every_interface(
        engine: MemoryEngine,
    ) -> tuple[Broker, SessionRegistry, NodeRegistry, Engine]:
        return engine, engine, engine, engine
