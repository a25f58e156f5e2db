"""The Redis engine: history in Streams, live delivery over one pub/sub connection per node.

The URL names one Redis or, with ``redis+sentinel://``, the master that Sentinel names:
every new connection (the pool's and the pub/sub one) asks the sentinels, so after a
failover the engine reconnects to the new master and repairs gaps as after a restart.
With ``EngineOptions.min_replicas`` a publish returns only once ``WAIT`` says that many
replicas hold it (:mod:`relay.engines._batch`).

Commands (publish, history, registry) go through a connection pool: hiredis, RESP2, and an
explicit retry of one quick attempt on connection errors only, so an outage surfaces as
:class:`~relay.errors.EngineUnavailable` within ``socket_timeout`` instead of being hidden
for seconds (FIELD-NOTES).

Live delivery does not use redis-py's ``PubSub``: it reconnects and resubscribes silently,
and what was published meanwhile is gone without a sign. Instead one raw connection per
node is driven by one reader task. Every reconnect is explicit (jittered exponential
backoff), resubscribes every wanted channel, and then calls
``handler.on_resubscribed()`` so the node replays each BizId's gap from history. A
subscription confirmation nobody asked for is treated the same way.

A hung Redis (SIGSTOP) leaves the socket open and silent, so a canary proves delivery: every
``canary_interval`` seconds ``Control(action="canary")`` is published through the pool to
the node's own control channel; if none has come back on the pub/sub connection for
``canary_deadline`` seconds the engine turns unready (``on_health(False)``) and replaces the
pub/sub connection. The next canary that comes back makes it ready again. Canaries are
consumed here and never reach ``on_control``.

Control messages are JSON objects with the fields of :class:`~relay.engine.Control`
(``{"action": "kick", "client_id": …, "session": …, "code": 4000, "reason": …,
"token": …}``), so an operator can read them with ``redis-cli SUBSCRIBE`` and any language
can send one; missing fields take their defaults, unknown fields are ignored.

Junk written by another publisher never stops anything: a bad live message or history
entry is logged as ``engine.bad_message`` (size and reason, never the bytes) and skipped.

Keys are those of DESIGN.md ("Redis layout") plus ``<prefix>:epoch``: the Redis clock when
Relay first saw this dataset, set if missing and returned with every history read as
``History.epoch_ms``. A restart without persistence or a FLUSHALL deletes it, so a client
whose ``since`` predates the data Redis still has is never told it recovered everything.

Keeping the heartbeat going is the node's job: :meth:`RedisEngine.start` registers the node
once and :meth:`RedisEngine.close` deregisters it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import Iterator
from importlib import resources
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import redis.asyncio as aioredis
import structlog
from redis import exceptions as redis_errors
from redis._parsers import _AsyncHiredisParser
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.typing import EncodableT, FieldT
from redis.utils import HIREDIS_AVAILABLE

from relay.engine import (
    ClientStatus,
    Control,
    EngineHandler,
    EngineHealth,
    EngineOptions,
    NodeFigures,
    NodeInfo,
    SessionRecord,
)
from relay.engines._batch import Batcher, ReplicasBehind
from relay.engines._pool import connection_pool as redis_pool
from relay.engines._subscriber import (
    _reraise_swallowed_cancel,
    _safely,
    _stop,
    _Subscriber,
    _text,
    _Timings,
    decode_control,
    encode_control,
)
from relay.errors import (
    EngineError,
    EngineUnavailable,
    InvalidInput,
    RelayError,
)
from relay.wire import (
    HISTORY_LUA,
    PUBLISH_LUA,
    History,
    KeySpace,
    PublishResult,
    StreamId,
    decode_payload,
    encode_payload,
    format_id,
    parse_history_reply,
    parse_id,
    parse_publish_reply,
    publish_call,
    validate_client_id,
)

if TYPE_CHECKING:
    from relay.engine import Broker, Engine, NodeRegistry, SessionRegistry

__all__ = ["RedisEngine", "decode_control", "encode_control"]

_CLIENT_NAME_UNSAFE: Final = re.compile(r"[^!-~]")


def _lua(name: str) -> str:
    return resources.files("relay").joinpath("lua", name).read_text(encoding="utf-8")


# The registry scripts, one file each in relay/lua/ (the key and argument layout is at
# the head of each). Each touches one key, so they run in Redis Cluster too.
_CLAIM_LUA: Final = _lua("claim.lua")
_FORGET_LUA: Final = _lua("forget.lua")
_EPOCH_LUA: Final = _lua("epoch.lua")
_ACK_LUA: Final = _lua("ack.lua")

# -- helpers ------------------------------------------------------------------------------


_UNREACHABLE: Final = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    TimeoutError,
    OSError,
)


def _translate(what: str, exc: BaseException) -> RelayError | None:
    """The relay.errors error for a redis or socket error; None for anything else."""
    if isinstance(exc, RelayError):
        return None
    if isinstance(exc, ReplicasBehind):
        return EngineUnavailable(f"redis replication ({what}): {exc}")
    if isinstance(exc, _UNREACHABLE):
        # redis-py's text names the host and port (never a password) and the OS's reason.
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return EngineUnavailable(f"redis is unreachable ({what}: {why})")
    if isinstance(exc, redis_errors.RedisError):
        return EngineError(f"redis failed ({what}): {exc}")
    return None


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn redis and socket errors into relay.errors; RelayErrors pass through."""
    try:
        yield
    except Exception as exc:
        error = _translate(what, exc)
        if error is None:
            raise
        raise error from exc


class _Guard:
    """``async with`` around engine commands: bound the time, translate errors, and re-raise
    a cancellation redis-py swallowed.

    A slotted class rather than an @asynccontextmanager, and no timer of its own for
    commands the batcher already bounds: it wraps every command of every connect, where a
    generator-based manager and a timer per command showed as ~10% of a node's CPU.
    """

    __slots__ = ("_cancels", "_task", "_timeout", "_what")

    def __init__(self, what: str, timeout: float | None) -> None:
        self._what = what
        self._timeout = None if timeout is None else asyncio.timeout(timeout)
        self._task: asyncio.Task[Any] | None = None
        self._cancels = 0

    async def __aenter__(self) -> None:
        task = self._task = asyncio.current_task()
        self._cancels = task.cancelling() if task is not None else 0
        if self._timeout is not None:
            await self._timeout.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timeout is not None:
            try:
                await self._timeout.__aexit__(exc_type, exc, tb)
            except TimeoutError as expired:
                exc = expired
        if exc is None:
            _reraise_swallowed_cancel(self._task, self._cancels)
            return
        error = _translate(self._what, exc)
        if error is not None:
            raise error from exc


def _float(value: Any) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return 0.0
    return result


_FIGURES: Final = tuple(f.name for f in dataclasses.fields(NodeFigures))


def _figures(fields: dict[str, Any]) -> NodeFigures:
    """A node hash's figures; a field missing (an older node) or unreadable keeps its default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(NodeFigures):
        raw = fields.get(f.name)
        if raw is None:
            continue
        text = _text(raw)
        if f.type == "str":
            values[f.name] = text
            continue
        number = _float(text)
        values[f.name] = int(number) if f.type == "int" else number
    return NodeFigures(**values)


def _session_record(client_id: str, flat: list[Any]) -> SessionRecord | None:
    if not flat:
        return None
    fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}
    return SessionRecord(
        client_id,
        _text(fields.get("node")),
        _text(fields.get("session")),
        _text(fields.get("since")) or None,
        _float(fields.get("connected_at")),
        _text(fields.get("attempt")) or None,
    )


def _parse_history(reply: list[Any], skipped: list[str]) -> History:
    """Like :func:`relay.wire.parse_history_reply`, but junk entries are left out.

    The reason for each skipped entry is appended to ``skipped``. A first entry whose
    ``prev`` is unreadable is kept as a bound but can no longer prove a recovery.
    """
    try:
        return parse_history_reply(reply)
    except InvalidInput:
        pass
    head = list(reply[:5])
    try:
        parse_id(head[2])
    except InvalidInput:
        skipped.append("first entry has a malformed prev")
        head[2] = head[1]
    rest = reply[5:]
    kept: list[Any] = []
    for i in range(0, len(rest) - 2, 3):
        triple = rest[i : i + 3]
        try:
            decode_payload(*triple)
        except InvalidInput as exc:
            skipped.append(str(exc))
            continue
        kept.extend(triple)
    return parse_history_reply(head + kept)


class RedisEngine:
    """Broker and registry on Redis; one pub/sub connection per node.

    ``connection_pool`` replaces the pool built from ``url`` (tests pass fakeredis's);
    the engine does not close a pool it was given. Timings are in seconds: commands give
    up after ``command_timeout``, sockets after ``socket_timeout``; the canary runs every
    ``canary_interval`` and must come back within ``canary_deadline``; reconnects back
    off from ``backoff_base`` to ``backoff_cap``; :meth:`subscribe` waits at most
    ``subscribe_timeout`` for Redis to confirm.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        options: EngineOptions | None = None,
        *,
        connection_pool: ConnectionPool | None = None,
        socket_timeout: float = 2.0,
        command_timeout: float = 5.0,
        command_retries: int = 1,
        max_connections: int = 64,
        canary_interval: float = 1.0,
        canary_deadline: float = 3.0,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
        subscribe_timeout: float = 5.0,
    ) -> None:
        self.options = options or EngineOptions()
        self._keys = KeySpace(self.options.key_prefix)
        self._socket_timeout = socket_timeout
        self._command_timeout = command_timeout
        self._timings = _Timings(
            socket_timeout,
            canary_interval,
            canary_deadline,
            backoff_base,
            backoff_cap,
            subscribe_timeout,
        )
        self._owns_pool = connection_pool is None
        if connection_pool is None:
            parser: dict[str, Any] = {"parser_class": _AsyncHiredisParser}
            connection_pool = redis_pool(
                url,
                protocol=2,
                max_connections=max_connections,
                timeout=socket_timeout,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(
                    ExponentialWithJitterBackoff(cap=0.5, base=0.05),
                    command_retries,
                    supported_errors=(redis_errors.ConnectionError,),
                ),
                **(parser if HIREDIS_AVAILABLE else {}),
            )
        self._pool = connection_pool
        self._redis = aioredis.Redis(connection_pool=connection_pool)
        self._batch = Batcher(
            connection_pool,
            command_timeout,
            min_replicas=self.options.min_replicas,
            replica_timeout=self.options.replica_timeout,
            barrier=self._keys.barrier(),
        )
        self._publish_script = self._redis.register_script(PUBLISH_LUA)
        self._history_script = self._redis.register_script(HISTORY_LUA)
        self._claim_script = self._redis.register_script(_CLAIM_LUA)
        self._forget_script = self._redis.register_script(_FORGET_LUA)
        self._ack_script = self._redis.register_script(_ACK_LUA)
        self._epoch_script = self._redis.register_script(_EPOCH_LUA)
        self._reap_after = max(60.0, 6 * self.options.node_ttl)
        self._reaped_at = 0.0
        self._reaper: asyncio.Task[None] | None = None
        self._epoch_key = f"{self.options.key_prefix}:epoch"
        self._log: Any = structlog.get_logger(__name__)
        self._node_id = ""
        self._handler: EngineHandler | None = None
        self._started_at = 0.0
        self._sub: _Subscriber | None = None
        self._registered = False
        self._closed = False

    @property
    def ready(self) -> bool:
        return self._sub is not None and self._sub.ready and not self._closed

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, node_id: str, handler: EngineHandler) -> None:
        """Connect, subscribe the control channel, register the node; or EngineUnavailable.

        A start that failed leaves nothing running and may be tried again (a node waits
        for Redis at start-up); :meth:`close` ends the engine whether it started or not.
        """
        if self._closed or self._sub is not None:
            raise EngineError("a RedisEngine starts once")
        self._node_id = node_id
        self._handler = handler
        self._started_at = time.time()
        self._log = structlog.get_logger(__name__, node=node_id)
        self._sub = _Subscriber(
            self._pool,
            self._redis,
            handler,
            self._keys.control(node_id),
            _CLIENT_NAME_UNSAFE.sub("_", f"relay-sub:{node_id}"),
            self._timings,
            self._log,
        )
        try:
            async with self._guard("start"):
                await self._epoch_script(keys=[self._epoch_key])
            await self._sub.start()
            await self.heartbeat(0)
            self._registered = True
        except BaseException:
            sub, self._sub = self._sub, None
            await sub.close()
            raise
        self._sub.start_canary()
        self._log.info("engine.started", engine=self.name)

    async def close(self) -> None:
        """Stop the subscriber, deregister the node, close connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            await _stop(self._reaper)
        if self._sub is not None:
            await self._sub.close()
        if self._registered:
            try:
                with _translated("deregister"):
                    async with asyncio.timeout(self._socket_timeout):
                        pipe = self._redis.pipeline(transaction=False)
                        pipe.delete(self._keys.node(self._node_id))
                        pipe.zrem(self._keys.nodes(), self._node_id)
                        await pipe.execute()
            except EngineError as exc:
                self._log.warning("engine.deregister_failed", error=str(exc))
        await self._batch.close()
        try:
            await self._redis.aclose(close_connection_pool=self._owns_pool)
        except Exception as exc:
            self._log.warning("engine.close_failed", error=type(exc).__name__)
        self._log.info("engine.closed")

    # -- broker ------------------------------------------------------------------------

    async def publish(
        self, biz_id: str, event: str, data: Any, *, mid: str | None = None
    ) -> PublishResult:
        opts = self.options
        payload = encode_payload(biz_id, event, data, mid=mid, max_size=opts.max_payload)
        keys, args = publish_call(
            self._keys,
            biz_id,
            payload,
            mid=mid,
            history_size=opts.history_size,
            history_ttl=opts.history_ttl,
            dedupe_window=opts.dedupe_window,
        )
        async with self._guard("publish", batched=True):
            reply = await self._evalsha(self._publish_script, keys, args, replicated=True)
        return parse_publish_reply(reply)

    async def history(self, biz_id: str, since: StreamId | None, limit: int) -> History:
        """Read history with the dataset's epoch; an entry that is not an envelope is skipped."""
        validate_client_id(biz_id)
        args: list[str | int] = ["" if since is None else format_id(since), limit]
        async with self._guard("history", batched=True):
            epoch, reply = await self._history_and_epoch(self._keys.log(biz_id), args)
        skipped: list[str] = []
        result = _parse_history(reply, skipped)
        for reason in skipped:
            self._log.warning("engine.bad_message", source="history", biz_id=biz_id, reason=reason)
        return dataclasses.replace(result, epoch_ms=int(epoch))

    async def _history_and_epoch(self, log_key: str, args: list[str | int]) -> list[Any]:
        """The epoch and the history script, sent together: one round trip."""
        epoch, history = self._epoch_script, self._history_script
        try:
            return await self._batch.call_many(
                ("EVALSHA", epoch.sha, 1, self._epoch_key),
                ("EVALSHA", history.sha, 1, log_key, *args),
            )
        except redis_errors.NoScriptError:
            pass
        # Scripts flushed (a restart, SCRIPT FLUSH): the batcher bounds only its own round
        # trips, so the reload and the retry get a bound of their own.
        async with asyncio.timeout(self._command_timeout):
            for script in (epoch, history):
                script.sha = await self._redis.script_load(script.script)
            return await self._batch.call_many(
                ("EVALSHA", epoch.sha, 1, self._epoch_key),
                ("EVALSHA", history.sha, 1, log_key, *args),
            )

    async def _evalsha(
        self, script: Any, keys: list[str], args: list[Any], *, replicated: bool = False
    ) -> Any:
        """Run a registered script through the batcher; load it once on NOSCRIPT.

        ``replicated``: answered once ``min_replicas`` replicas have its writes.
        """
        call = self._batch.call_replicated if replicated else self._batch.call
        try:
            return await call("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            pass
        async with asyncio.timeout(self._command_timeout):  # see _history_and_epoch
            script.sha = await self._redis.script_load(script.script)
            return await call("EVALSHA", script.sha, len(keys), *keys, *args)

    async def subscribe(self, biz_id: str) -> None:
        """Subscribe; returns when Redis confirmed it, EngineUnavailable if it did not in time.

        An :meth:`unsubscribe` of the same BizId while this waits makes it return at once.
        """
        validate_client_id(biz_id)
        await self._subscriber().subscribe(self._keys.channel(biz_id).encode(), biz_id)

    async def unsubscribe(self, biz_id: str) -> None:
        await self._subscriber().unsubscribe(self._keys.channel(biz_id).encode())

    # -- registry ----------------------------------------------------------------------

    async def claim_session(
        self, record: SessionRecord, *, exclusive: bool = True
    ) -> SessionRecord | None:
        validate_client_id(record.client_id)
        args = [
            record.node,
            record.session,
            record.since or "",
            repr(record.connected_at),
            "1" if exclusive else "0",
            record.attempt or "",
        ]
        async with self._guard("claim_session", batched=True):
            flat = await self._evalsha(
                self._claim_script, [self._keys.session(record.client_id)], args
            )
        return _session_record(record.client_id, flat)

    async def release_session(self, client_id: str, session: str) -> bool:
        validate_client_id(client_id)
        async with self._guard("release_session", batched=True):
            removed = await self._evalsha(
                self._forget_script, [self._keys.session(client_id)], ["session", session]
            )
        return bool(removed)

    async def record_ack(self, client_id: str, session: str, message_id: str) -> None:
        validate_client_id(client_id)
        async with self._guard("record_ack", batched=True):
            await self._evalsha(
                self._ack_script, [self._keys.session(client_id)], [session, message_id]
            )

    async def client_status(self, client_id: str) -> ClientStatus:
        """Online only if a record exists and its node is alive; the record is shown anyway."""
        validate_client_id(client_id)
        async with self._guard("client_status"):
            record = await self._redis.hgetall(self._keys.session(client_id))
            if not record:
                return ClientStatus(client_id, False, None, None, None, None)
            fields = {_text(k): _text(v) for k, v in record.items()}
            node = fields.get("node", "")
            alive = bool(node) and bool(await self._redis.exists(self._keys.node(node)))
        return ClientStatus(
            client_id,
            alive,
            node or None,
            fields.get("session") or None,
            fields.get("since") or None,
            fields.get("last_ack") or None,
        )

    async def send_control(self, node_id: str, control: Control) -> None:
        # Batched: a reconnect herd from a dead node sends one kick per client at once,
        # which one by one would exhaust the connection pool.
        async with self._guard("send_control", batched=True):
            await self._batch.call("PUBLISH", self._keys.control(node_id), encode_control(control))

    async def heartbeat(self, connections: int, figures: NodeFigures | None = None) -> None:
        """Write this node's hash with a TTL of ``node_ttl`` and its score in the node set."""
        self._subscriber()
        now = time.time()
        key = self._keys.node(self._node_id)
        mapping: dict[FieldT, EncodableT] = {
            "connections": connections,
            "started_at": repr(self._started_at),
            "last_seen": repr(now),
        }
        for name in _FIGURES:  # every one, so a heartbeat without figures resets them
            value = getattr(figures or NodeFigures(), name)
            mapping[name] = repr(value) if isinstance(value, float) else value
        async with self._guard("heartbeat"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, max(1, int(self.options.node_ttl * 1000)))
            pipe.zadd(self._keys.nodes(), {self._node_id: now})
            added = (await pipe.execute())[-1]
        if added and self._registered and self._handler is not None:
            # Another node took us for dead and forgot our sessions' records: our clients
            # must connect again to be found. The node closes them with 1012.
            self._log.warning("engine.reaped_while_alive")
            _safely(self._log, self._handler.on_control, Control("rejoin"))
        if now - self._reaped_at > self._reap_after / 2 and (
            self._reaper is None or self._reaper.done()
        ):
            self._reaped_at = now
            self._reaper = asyncio.create_task(self._reap_dead_nodes(), name="relay-reaper")

    async def _reap_dead_nodes(self) -> None:
        """Forget the session records of nodes silent for ``reap_after``; one node each.

        Removing the dead node from the node set is the lock: whoever's ZREM succeeds
        scans the records. Only a node's death costs a scan, never a connect.
        """
        nodes_key = self._keys.nodes()
        pattern = f"{self.options.key_prefix}:{{*}}:session"
        try:
            async with self._guard("reap"):
                cutoff = time.time() - self._reap_after
                dead = [_text(m) for m in await self._redis.zrangebyscore(nodes_key, 0, cutoff)]
            for node in dead:
                if node == self._node_id:
                    continue
                async with self._guard("reap"):
                    if await self._redis.exists(self._keys.node(node)):
                        continue
                    if not await self._redis.zrem(nodes_key, node):
                        continue  # another node is reaping it
                fixed = 0
                async for key in self._redis.scan_iter(match=pattern, count=1000):
                    async with self._guard("reap", batched=True):
                        fixed += int(
                            await self._evalsha(self._forget_script, [_text(key)], ["node", node])
                        )
                self._log.info("engine.node_reaped", dead_node=node, records=fixed)
        except EngineError as exc:
            self._log.warning("engine.reap_failed", error=str(exc))

    async def nodes(self) -> list[NodeInfo]:
        """Live nodes, by id: members of the node set whose hash has not expired.

        Dead members stay in the set until a live node reaps their sessions.
        """
        async with self._guard("nodes"):
            members = [_text(m) for m in await self._redis.zrange(self._keys.nodes(), 0, -1)]
            pipe = self._redis.pipeline(transaction=False)
            for member in members:
                pipe.hgetall(self._keys.node(member))
            rows = await pipe.execute()
        result = []
        for member, row in zip(members, rows, strict=True):
            if row:
                fields = {_text(k): v for k, v in row.items()}
                result.append(
                    NodeInfo(
                        member,
                        int(_float(fields.get("connections"))),
                        _float(fields.get("started_at")),
                        _float(fields.get("last_seen")),
                        _figures(fields),
                    )
                )
        return sorted(result, key=lambda n: n.node)

    async def health(self) -> EngineHealth:
        """PING for the round trip, then INFO (if the server has it) for version and load."""
        try:
            async with self._guard("health"):
                began = time.perf_counter()
                await self._redis.ping()
                latency = round((time.perf_counter() - began) * 1000, 3)
        except EngineError as exc:
            return EngineHealth(self.name, self.ready, False, error=str(exc))
        try:
            async with self._guard("health"):
                info = await self._redis.info()
        except EngineError:
            info = {}  # INFO may be renamed away (rename-command) or missing (fakeredis)
        return EngineHealth(
            self.name,
            self.ready,
            True,
            latency_ms=latency,
            version=_text(info.get("redis_version", "")),
            used_memory=int(_float(info["used_memory"])) if "used_memory" in info else None,
            clients=int(_float(info["connected_clients"])) if "connected_clients" in info else None,
        )

    # -- command plumbing --------------------------------------------------------------

    def _guard(self, what: str, *, batched: bool = False) -> _Guard:
        """Refuse after close; bound the time (``batched``: the batcher does), translate errors."""
        if self._closed:
            raise EngineError("engine is closed")
        return _Guard(what, None if batched else self._command_timeout)

    def _subscriber(self) -> _Subscriber:
        if self._closed:
            raise EngineError("engine is closed")
        if self._sub is None:
            raise EngineError("engine is not started")
        return self._sub


if TYPE_CHECKING:  # mypy proves the Redis engine fits each interface

    def _fits_every_interface(
        engine: RedisEngine,
    ) -> tuple[Broker, SessionRegistry, NodeRegistry, Engine]:
        return engine, engine, engine, engine
