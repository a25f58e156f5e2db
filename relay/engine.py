"""The Engine: a broker, a session registry and a node registry behind one object.

Three small interfaces, as in centrifuge: :class:`Broker` (publish, subscribe, history),
:class:`SessionRegistry` (claim, release, lookup, kick) and :class:`NodeRegistry`
(heartbeat, list; register and reap happen in :meth:`Engine.start` and the heartbeat).
:class:`Engine` is their union plus a lifecycle, so the node holds one object, and a new
engine can be written one interface at a time against its contract suite
(tests/engines/test_*_contract.py, each run on every implementation).

Two implementations sit in ``relay.engines``: ``memory`` (one process, no Redis) and
``redis``; each proves statically that it fits every interface. Engines never import the
hub, the node or aiohttp; they report upward through an :class:`EngineHandler` the node
passes to :meth:`Engine.start`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from relay.wire import Event, History, PublishResult, StreamId, superseded

__all__ = [
    "Broker",
    "ClientStatus",
    "Control",
    "Engine",
    "EngineHandler",
    "EngineHealth",
    "EngineOptions",
    "NodeFigures",
    "NodeInfo",
    "NodeRegistry",
    "SessionRecord",
    "SessionRegistry",
    "is_stale_claim",
    "kicked_in_claim",
]


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Settings every engine honours (see docs/configuration.md)."""

    history_size: int = 100  # entries kept per BizId (Redis: MAXLEN ~, so a little more)
    history_ttl: int = 3600  # seconds history lives after the last publish
    dedupe_window: int = 600  # seconds a publish `mid` is remembered
    max_payload: int = 64 * 1024  # bytes of one encoded publish payload
    node_ttl: float = 10.0  # seconds a node counts as alive after its last heartbeat
    key_prefix: str = "relay"
    min_replicas: int = 0  # Redis: replicas that must hold a publish before it returns (WAIT)
    replica_timeout: float = 0.5  # Redis: seconds to wait for them, then the publish fails


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """Who holds a client_id: written on connect, fenced by ``session`` on release."""

    client_id: str
    node: str
    session: str
    since: str | None
    connected_at: float
    attempt: str | None = None  # "<instance>.<n>" when the client sends one


def is_stale_claim(holder: SessionRecord, claim: SessionRecord) -> bool:
    """True when ``holder`` is a later handshake of the same client than ``claim``.

    A later attempt of the same client instance, or, without attempts, a handshake that
    began later on the same node (same clock). Such a claim never displaces the holder.
    The Redis engine's claim script applies the same rule.
    """
    return superseded(holder.attempt, claim.attempt) or (
        holder.node == claim.node and holder.connected_at > claim.connected_at
    )


def kicked_in_claim(holder: SessionRecord, claim: SessionRecord) -> bool:
    """True when a claim given a ``kick`` sends it itself, on an engine that
    ``kicks_in_claim``: ``holder`` is an earlier attempt of ``claim``'s client instance,
    on another node. The client ended that attempt before it made this one, so the kick
    is right even if ``claim``'s handshake was abandoned while the claim was in flight."""
    return holder.node != claim.node and superseded(claim.attempt, holder.attempt)


@dataclass(frozen=True, slots=True)
class ClientStatus:
    """What the registry knows about a client_id (``GET /api/clients/{id}``)."""

    client_id: str
    online: bool
    node: str | None
    session: str | None
    since: str | None
    last_ack: str | None


@dataclass(frozen=True, slots=True)
class NodeFigures:
    """What a node says of itself with each heartbeat, for operators (the status page).

    Rates are per second over the last heartbeat interval; counts are since the start.
    """

    address: str = ""  # host:port where the node listens
    state: str = "ready"  # ready | unready | draining
    messages_per_s: float = 0.0  # message frames queued to sessions
    events_per_s: float = 0.0  # live events received from the engine
    publishes_per_s: float = 0.0  # publishes through this node's HTTP API
    gaps_repaired: int = 0
    gaps_unrecoverable: int = 0
    closed_4509: int = 0  # sessions ended because history could not close a gap


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node's liveness and load (``GET /api/nodes``)."""

    node: str
    connections: int
    started_at: float
    last_seen: float
    figures: NodeFigures = NodeFigures()

    def to_dict(self) -> dict[str, Any]:
        """Flat, as ``GET /api/nodes`` and ``relay nodes`` show it."""
        return {
            "node": self.node,
            "connections": self.connections,
            "started_at": self.started_at,
            "last_seen": self.last_seen,
            **dataclasses.asdict(self.figures),
        }


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """The broker as seen from this node: reachable, how fast, and what it is."""

    engine: str
    ready: bool
    reachable: bool
    latency_ms: float | None = None  # one round trip, None when unreachable
    version: str = ""
    used_memory: int | None = None  # bytes
    clients: int | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Control:
    """A command sent to one node through its control channel.

    ``action`` is ``kick`` (close ``session`` of ``client_id`` with ``code``),
    ``canary`` (the node's own liveness probe; ``token`` identifies it) or ``rejoin``
    (the registry forgot this node's sessions: close them so their clients re-register).
    """

    action: str
    client_id: str = ""
    session: str = ""
    code: int = 4000
    reason: str = ""
    token: str = ""


class EngineHandler(Protocol):
    """What an engine calls back. All callbacks run on the event loop and must not block."""

    def on_event(self, event: Event) -> None:
        """A live event for a subscribed BizId, in publish order per BizId."""

    def on_control(self, control: Control) -> None:
        """A control message addressed to this node."""

    def on_resubscribed(self, biz_ids: Collection[str] | None = None) -> None:
        """The live subscription was re-established: events may have been missed.

        The node replays each subscribed BizId's gap from history; with ``biz_ids``, only
        those BizIds' (a Redis Cluster moved their slots, or reconnected to their master).
        """

    def on_health(self, healthy: bool) -> None:
        """The engine gained or lost its proof that the live subscription works."""


@runtime_checkable
class Broker(Protocol):
    """Moves events: appends each to its BizId's history and delivers it live.

    Live events reach the :class:`EngineHandler` given to :meth:`Engine.start`.
    """

    async def publish(
        self, biz_id: str, event: str, data: Any, *, mid: str | None = None
    ) -> PublishResult:
        """Append to history and deliver live, atomically; dedupe on ``mid``."""

    async def publish_run(
        self, biz_id: str, events: Sequence[tuple[str, Any, str | None]]
    ) -> list[PublishResult]:
        """Publish ``(event, data, mid)`` events of one BizId in order, in one step.

        Each result is what :meth:`publish` of that event, in turn, would answer (a mid
        seen earlier in the run is a duplicate). Every event is validated first: an
        invalid one raises before anything is published.
        """

    async def subscribe(self, biz_id: str) -> None:
        """Start live delivery of ``biz_id``; returns once the subscription is live.

        Called once per BizId (the hub counts references); must be idempotent.
        """

    async def unsubscribe(self, biz_id: str) -> None:
        """Stop live delivery of ``biz_id``. Idempotent."""

    async def history(self, biz_id: str, since: StreamId | None, limit: int) -> History:
        """Read history: the stream's bounds and, given ``since``, the entries after it."""


@runtime_checkable
class SessionRegistry(Protocol):
    """Who holds each client_id, fenced by session, and a way to reach its node (kick)."""

    @property
    def kicks_in_claim(self) -> bool:
        """Whether :meth:`claim_session` sends its ``kick`` (see :func:`kicked_in_claim`)."""

    async def claim_session(
        self, record: SessionRecord, *, exclusive: bool = True, kick: Control | None = None
    ) -> SessionRecord | None:
        """Record ``record`` as the holder of its client_id; return the previous holder.

        ``exclusive`` (``--duplicates replace``) forgets every other session of the
        client_id; otherwise the record lists every live session, names the newest, and
        a release hands it to another live session instead of deleting it.

        The newest claim wins, except that a stale handshake never displaces a later one
        of the same client (one it gave up on and reconnected after): the holder is a
        later attempt of the same instance (``attempt``), or, without attempts, began
        later on the same node. Then the record is left alone and the holder returned.

        ``kick`` (with ``exclusive``, on an engine that ``kicks_in_claim``): a displaced
        holder that is an earlier attempt of the same client instance on another node is
        sent ``kick`` with its session's id as part of the claim (one command and no task
        per resume in a reconnect storm). Any other displaced session is the caller's to
        kick, once it knows its own session is still wanted.
        """

    async def release_session(
        self, client_id: str, session: str, *, restore: SessionRecord | None = None
    ) -> bool:
        """Forget ``session``; the record goes only if it named it and no other session
        remains (fencing: a replaced session's late release changes nothing). True if the
        record named it.

        ``restore``: the holder that ``session``'s exclusive claim displaced, put back
        as the only session if the record still names ``session`` (a claim made for a
        handshake abandoned while it was in flight is undone so; a newer claim since is
        left alone). Its last acknowledged id is not kept.
        """

    async def record_ack(self, client_id: str, session: str, message_id: str) -> None:
        """Store the last id the session acknowledged (only if it still holds the record)."""

    async def client_status(self, client_id: str) -> ClientStatus:
        """What is known of ``client_id``; online only if its node is alive."""

    async def send_control(self, node_id: str, control: Control) -> None:
        """Send a control message to ``node_id`` (possibly this node): a kick, or the
        node's own canary and rejoin."""


@runtime_checkable
class NodeRegistry(Protocol):
    """Which nodes are alive and what they carry.

    :meth:`Engine.start` registers the node and :meth:`Engine.close` deregisters it; the
    Redis engine reaps the session records of long-silent nodes from :meth:`heartbeat`.
    """

    async def heartbeat(self, connections: int, figures: NodeFigures | None = None) -> None:
        """Refresh this node's liveness and load (``figures`` default to none reported)."""

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes, each with the figures of its last heartbeat."""


@runtime_checkable
class Engine(Broker, SessionRegistry, NodeRegistry, Protocol):
    """All three interfaces and a lifecycle. ``ready`` is False while live delivery
    cannot be proven."""

    name: str

    @property
    def ready(self) -> bool: ...

    async def start(self, node_id: str, handler: EngineHandler) -> None:
        """Connect, subscribe the node's control channel, register the node."""

    async def close(self) -> None:
        """Deregister the node and release every connection. Idempotent."""

    async def health(self) -> EngineHealth:
        """Probe the broker once (one round trip); never raises for an unreachable one."""
