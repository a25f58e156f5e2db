"""What both publishers share: the packed EVALSHA command, retry policy, error translation.

Pure: no sockets, no asyncio, no Redis client. :class:`PublishCodec` turns one publish into
the exact bytes of ``EVALSHA <publish.lua> 4 KEYS... ARGV...`` that relay.wire defines
(``publish_call``), because redis-py's generic command packer costs more CPU than the
rest of a batched publish put together. A contract test checks that the bytes equal
what redis-py would send for ``wire.publish_call``'s KEYS and ARGV.

With ``min_replicas``, each pipeline ends with ``PUBLISH <prefix>:barrier ""`` and
``WAIT <min_replicas> <ms>`` (:class:`Replication`): the publishes count as done only
when WAIT says enough replicas hold everything the master had written up to the barrier
(which also covers the original of a publish that came back as a duplicate). Fewer
replicas is a transient failure: retried like a lost connection, with the same ``mid``.

Retries: only failures that say nothing about the command itself are retried (the
connection broke, timed out, Redis is loading its dataset or was demoted to a replica).
Anything else is a bug or a misconfiguration and fails at once. After the last attempt
every error becomes a :class:`~relay.errors.PublishFailed` naming the BizId and the cause.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import redis.exceptions as rex
from redis.crc import key_slot

from relay.backoff import Backoff, Retry
from relay.errors import (
    ConfigError,
    EngineError,
    EngineUnavailable,
    InvalidEnvelope,
    InvalidInput,
    PublishFailed,
)
from relay.redis_url import parse_redis_url
from relay.wire import (
    DEFAULT_MAX_PAYLOAD,
    PUBLISH_BATCH_CLUSTER_LUA,
    PUBLISH_BATCH_LUA,
    PUBLISH_CLUSTER_LUA,
    PUBLISH_LUA,
    PUBLISH_RUN_CLUSTER_LUA,
    PUBLISH_RUN_LUA,
    Event,
    KeySpace,
    PublishResult,
    decode_payload,
    encode_payload,
    parse_publish_reply,
    replicas_behind,
    wait_commands,
)

__all__ = [
    "PUBLISH_BATCH_SHA",
    "PUBLISH_RUN_SHA",
    "PUBLISH_SHA",
    "SCRIPT_LOAD",
    "SCRIPT_LOADS",
    "Call",
    "Item",
    "PublishCodec",
    "PublisherBase",
    "ReplicasBehind",
    "Replication",
    "RetryPolicy",
    "RoundTrip",
    "after_failure",
    "by_slot",
    "in_slot",
    "is_transient",
    "lookup_failed",
    "publish_failed",
    "replication",
    "stored_event",
]

ClientT = TypeVar("ClientT")

PUBLISH_SHA: Final = hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()
"""EVALSHA digest of publish.lua; Redis computes the same on SCRIPT LOAD."""


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


PUBLISH_RUN_SHA: Final = hashlib.sha1(PUBLISH_RUN_LUA.encode()).hexdigest()
"""EVALSHA digest of publish_run.lua."""


def _script_load(script: str) -> bytes:
    return b"*3\r\n" + b"".join(map(_bulk, (b"SCRIPT", b"LOAD", script.encode())))


SCRIPT_LOAD: Final = _script_load(PUBLISH_LUA)
"""The packed ``SCRIPT LOAD <publish.lua>``, sent after a NOSCRIPT reply."""

PUBLISH_BATCH_SHA: Final = hashlib.sha1(PUBLISH_BATCH_LUA.encode()).hexdigest()
"""EVALSHA digest of publish_batch.lua."""

SCRIPT_LOADS: Final = [SCRIPT_LOAD, _script_load(PUBLISH_RUN_LUA), _script_load(PUBLISH_BATCH_LUA)]
"""The scripts' ``SCRIPT LOAD``: what a publisher sends after a NOSCRIPT (one reply each)."""

_CLUSTER_SHA: Final = hashlib.sha1(PUBLISH_CLUSTER_LUA.encode()).hexdigest()
_RUN_CLUSTER_SHA: Final = hashlib.sha1(PUBLISH_RUN_CLUSTER_LUA.encode()).hexdigest()
_BATCH_CLUSTER_SHA: Final = hashlib.sha1(PUBLISH_BATCH_CLUSTER_LUA.encode()).hexdigest()
_CLUSTER_LOADS: Final = [
    _script_load(PUBLISH_CLUSTER_LUA),
    _script_load(PUBLISH_RUN_CLUSTER_LUA),
    _script_load(PUBLISH_BATCH_CLUSTER_LUA),
]


Encoded = tuple[bytes, bytes, bytes, bytes]
"""A publish, packed: its four key bulks (publish.lua's KEYS), its dedupe key bulk (the
last of them), its payload bulk and its mid bulk."""

Item = tuple[str, str, Any] | tuple[str, str, Any, str | None]
"""One entry of ``publish_many``: ``(biz_id, event, data)`` or ``(biz_id, event, data, mid)``."""

_TRANSIENT: Final = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ReadOnlyError,
    TimeoutError,
    # A cluster moving or failing over a slot: ask again once the layout is re-read.
    rex.AskError,  # and MOVED
    rex.TryAgainError,
    rex.ClusterDownError,
)
# A wrong password or missing ACL permission does not heal by waiting.
_PERMANENT: Final = (rex.AuthenticationError, rex.AuthorizationError)


class ReplicasBehind(rex.TimeoutError):
    """Fewer replicas than ``min_replicas`` acknowledged the writes in time."""


@dataclass(frozen=True, slots=True)
class Replication:
    """``min_replicas`` replicas must hold a publish within ``timeout`` seconds (WAIT)."""

    min_replicas: int
    timeout: float
    barrier: str
    in_slot: bool = False  # a Redis Cluster: the barrier is a SET in the batch's slot

    def commands(self, slot_barrier: str) -> bytes:
        """The packed barrier write and ``WAIT`` (:func:`relay.wire.wait_commands`): two
        replies follow the batch.

        The barrier is ``PUBLISH <barrier> ""``, or on a cluster (which sends PUBLISH over
        its bus, not to the replicas) ``SET <slot_barrier> "" PX <timeout>`` in the slot of
        the batch, whose master the connection is.
        """
        barrier = slot_barrier if self.in_slot else self.barrier
        packed = b""
        for command in wait_commands(
            self.min_replicas, self.timeout, barrier, in_slot=self.in_slot
        ):
            packed += b"*%d\r\n" % len(command)
            packed += b"".join(_bulk(str(arg).encode()) for arg in command)
        return packed

    def check(self, acked: Any) -> None:
        """Raise ReplicasBehind unless WAIT's reply ``acked`` is enough."""
        behind = replicas_behind(acked, self.min_replicas, self.timeout)
        if behind is not None:
            raise ReplicasBehind(behind)


def replication(
    key_prefix: str, min_replicas: int, replica_timeout: float, timeout: float
) -> Replication | None:
    """The publisher's WAIT settings, checked; None without ``min_replicas``."""
    if isinstance(min_replicas, bool) or not isinstance(min_replicas, int) or min_replicas < 0:
        raise ConfigError(f"min_replicas must be a non-negative integer, not {min_replicas!r}")
    if not min_replicas:
        return None
    if not 0 < replica_timeout < timeout:
        raise ConfigError("replica_timeout must be positive and shorter than timeout")
    return Replication(min_replicas, replica_timeout, KeySpace(key_prefix).barrier())


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: connection lost, timeout, LOADING, READONLY."""
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, _PERMANENT)


def _cause(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def publish_failed(biz_id: str, attempts: int | None, exc: BaseException) -> PublishFailed:
    """The error a caller sees when a publish gave up; ``__cause__`` is the Redis error.

    ``attempts`` is None for a failure that was not worth retrying.
    """
    tries = "" if attempts is None else f" after {attempts} attempt{'s' if attempts != 1 else ''}"
    error = PublishFailed(f"publish to BizId {biz_id!r} failed{tries}: {_cause(exc)}")
    error.__cause__ = exc
    return error


def lookup_failed(what: str, attempts: int, exc: BaseException) -> EngineError:
    """The error of a failed registry read such as ``is_online``."""
    kind = EngineUnavailable if is_transient(exc) else EngineError
    tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}"
    error = kind(f"{what} failed{tries}: {_cause(exc)}")
    error.__cause__ = exc
    return error


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``retries`` more attempts after the first, sleeping with full-jitter backoff.

    The n-th sleep (n from 0) is uniform in ``[0, min(max_backoff, backoff * 2**n)]``:
    full jitter, so a fleet of backends that lost Redis together does not return in step.
    The timing is :mod:`relay.backoff`'s, shared with the rest of the tree.
    """

    retries: int = 3
    backoff: float = 0.05
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ConfigError("retries, backoff and max_backoff must not be negative")

    def delay(self, attempt: int) -> float:
        return Backoff(self.backoff, self.max_backoff).delay(attempt)

    def start(self) -> Retry:
        """A fresh count of failures for one operation, giving up after ``retries``."""
        return Retry(Backoff(self.backoff, self.max_backoff), self.retries)


class Call:
    """One publish on its way: its packed parts and, once known, its outcome.

    ``keys``, ``dedupe``, ``payload`` and ``mid`` are what PublishCodec.commands puts in
    the script call that carries it.
    """

    __slots__ = ("biz_id", "dedupe", "keys", "mid", "outcome", "payload")

    def __init__(self, biz_id: str, encoded: Encoded) -> None:
        self.biz_id = biz_id
        self.keys, self.dedupe, self.payload, self.mid = encoded
        self.outcome: PublishResult | PublishFailed | None = None


def by_slot(calls: Iterable[Call], keys: KeySpace) -> dict[int, list[Call]]:
    """A batch split by Redis Cluster hash slot, each part in the batch's order.

    Every key of a BizId carries its hash tag, so one slot holds all of a publish's keys
    and the events of one BizId stay in order within their part.
    """
    parts: dict[int, list[Call]] = {}
    for call in calls:
        parts.setdefault(key_slot(keys.log(call.biz_id).encode()), []).append(call)
    return parts


def in_slot(replication: Replication | None) -> Replication | None:
    """The WAIT settings for a Redis Cluster: the barrier becomes a write in the slot."""
    return None if replication is None else dataclasses.replace(replication, in_slot=True)


def after_failure(calls: list[Call], exc: Exception, retry: Retry) -> tuple[list[Call], float]:
    """A failed exchange: the calls to send again and the wait before (none left: ``[]``).

    A reply read before the failure is final; only the rest is resent. Once ``exc`` is not
    transient or the retries are spent, every call still open gets its PublishFailed.
    """
    todo = [call for call in calls if call.outcome is None]
    delay = retry.failed()
    if delay is not None and is_transient(exc):
        return todo, delay
    tries = retry.failures if is_transient(exc) else None
    for call in todo:
        call.outcome = publish_failed(call.biz_id, tries, exc)
    return [], 0.0


_NAMES_KEPT: Final = 4096  # BizIds whose key bulks a PublishCodec keeps (see _key_bulks)


class PublishCodec:
    """Builds the EVALSHA commands of a round trip's publishes and reads their replies.

    Everything that does not depend on the event (the script digests, the numbers in
    ARGV, the key prefix) is packed once here.
    """

    __slots__ = (
        "_batch_head",
        "_cluster",
        "_head",
        "_limits",
        "_max_payload",
        "_max_per_call",
        "_names",
        "_no_mid",
        "_run_head",
        "_window",
        "keys",
        "script_loads",
    )

    def __init__(
        self,
        *,
        key_prefix: str = "relay",
        history_size: int = 100,
        history_ttl: int = 3600,
        dedupe_window: int = 600,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_per_call: int = 100,
        cluster: bool = False,
    ) -> None:
        """``cluster``: the scripts' Redis Cluster variants (SPUBLISH instead of PUBLISH).

        ``max_per_call``: at most this many events in one script call (see :meth:`plan`).
        """
        for name, value in (
            ("history_size", history_size),
            ("history_ttl", history_ttl),
            ("dedupe_window", dedupe_window),
            ("max_payload", max_payload),
            ("max_per_call", max_per_call),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, not {value!r}")
        if not key_prefix or any(c in key_prefix for c in "{} \r\n"):
            raise ConfigError("key_prefix must be non-empty, without braces or whitespace")
        self.keys = KeySpace(key_prefix)
        self._max_payload = max_payload
        self._max_per_call = max_per_call
        self._cluster = cluster
        # ARGV order and KEYS order follow relay.wire.publish_call exactly.
        sha, run_sha, batch_sha = (
            (_CLUSTER_SHA, _RUN_CLUSTER_SHA, _BATCH_CLUSTER_SHA)
            if cluster
            else (PUBLISH_SHA, PUBLISH_RUN_SHA, PUBLISH_BATCH_SHA)
        )
        self._head = b"*12\r\n" + b"".join(map(_bulk, (b"EVALSHA", sha.encode(), b"4")))
        self._run_head = _bulk(b"EVALSHA") + _bulk(run_sha.encode())
        self._batch_head = _bulk(b"EVALSHA") + _bulk(batch_sha.encode())
        self.script_loads = _CLUSTER_LOADS if cluster else SCRIPT_LOADS
        """The packed ``SCRIPT LOAD`` of the scripts, sent after a NOSCRIPT (a reply each)."""
        self._limits = _bulk(b"%d" % history_size) + _bulk(b"%d" % history_ttl)
        self._no_mid = _bulk(b"")
        self._window = _bulk(b"%d" % dedupe_window)
        # BizId -> its stream, channel and session key bulks, and the stream's alone.
        self._names: dict[str, tuple[bytes, bytes]] = {}

    def command(self, biz_id: str, event: str, data: Any, mid: str | None = None) -> bytes:
        """Validate and encode a publish as one EVALSHA of publish.lua; raises InvalidInput
        or PayloadTooLarge."""
        return self.single_command(Call(biz_id, self.encode(biz_id, event, data, mid)))

    def encode(self, biz_id: str, event: str, data: Any, mid: str | None = None) -> Encoded:
        """A publish's parts, validated: the bulks every script call is made of."""
        payload = _bulk(encode_payload(biz_id, event, data, mid=mid, max_size=self._max_payload))
        names, log = self._names.get(biz_id) or self._key_bulks(biz_id)
        if mid is None:
            return names + log, log, payload, self._no_mid
        dedupe = _bulk(self.keys.mid(biz_id, mid).encode())
        return names + dedupe, dedupe, payload, _bulk(mid.encode())

    def _key_bulks(self, biz_id: str) -> tuple[bytes, bytes]:
        """``biz_id``'s stream, channel and session key bulks (publish.lua's KEYS[1..3]),
        and its stream's alone (KEYS[4] without a mid), kept for the next event.

        Formatting them cost about 1.3 µs of a publish's ~3.5 µs of encoding (timeit, a
        78-byte payload); most backends publish to the same BizIds again and again. At
        most _NAMES_KEPT are kept, then all are dropped and kept anew.
        """
        keys = self.keys
        log = _bulk(keys.log(biz_id).encode())
        names = log + _bulk(keys.channel(biz_id).encode()) + _bulk(keys.session(biz_id).encode())
        if len(self._names) >= _NAMES_KEPT:
            self._names.clear()
        self._names[biz_id] = (names, log)
        return names, log

    def calls(self, items: Iterable[Item]) -> list[Call]:
        """Encode every item of a batch before anything is sent: all valid, or nothing."""
        encode = self.encode
        calls = []
        for item in items:
            if not 3 <= len(item) <= 4:
                raise InvalidInput("publish_many items are (biz_id, event, data[, mid]) tuples")
            calls.append(Call(item[0], encode(*item)))
        return calls

    def plan(self, calls: list[Call]) -> list[list[Call]]:
        """The script calls of one round trip, in the order sent: one reply each.

        Each BizId's events go in one call (publish_run.lua), in the order given; the
        BizIds with a single event share calls (publish_batch.lua) instead of one
        publish.lua each, which costs Redis ~3 µs less per event (docs/benchmarks.md).
        No call holds more than ``max_per_call`` events: Redis runs nothing else while a
        script runs. On a Redis Cluster only BizIds of one hash slot share a call (one
        script's keys must), which random BizIds seldom are. Across BizIds the order is
        not kept, and need not be: concurrent publishes have none, publish_many promises
        it per BizId.
        """
        step = self._max_per_call
        by_biz: dict[str, list[Call]] = {}
        for call in calls:
            by_biz.setdefault(call.biz_id, []).append(call)
        singles = [run[0] for run in by_biz.values() if len(run) == 1]
        parts = by_slot(singles, self.keys).values() if self._cluster else [singles]
        groups = [part[i : i + step] for part in parts for i in range(0, len(part), step)]
        for run in by_biz.values():
            if len(run) > 1:
                groups += (run[i : i + step] for i in range(0, len(run), step))
        return groups

    def commands(self, group: list[Call]) -> bytes:
        """The EVALSHA that carries ``group``, a part of :meth:`plan`: publish.lua for one
        event, publish_run.lua for a run of one BizId, publish_batch.lua otherwise."""
        if len(group) == 1:
            return self.single_command(group[0])
        if group[0].biz_id == group[-1].biz_id:  # plan's groups are one BizId or all distinct
            return self.run_command(group)
        return self.batch_command(group)

    def single_command(self, call: Call) -> bytes:
        """publish.lua's EVALSHA, as :func:`relay.wire.publish_call` lays it out."""
        return b"".join((self._head, call.keys, call.payload, self._limits, call.mid, self._window))

    def run_command(self, run: list[Call]) -> bytes:
        """One EVALSHA of publish_run.lua for calls that share a BizId (so one slot)."""
        biz_id, keys = run[0].biz_id, self.keys
        return b"".join(
            (
                b"*%d\r\n" % (9 + 3 * len(run)),
                self._run_head,
                _bulk(b"%d" % (3 + len(run))),
                _bulk(keys.log(biz_id).encode()),
                _bulk(keys.channel(biz_id).encode()),
                _bulk(keys.session(biz_id).encode()),
                *(call.dedupe for call in run),
                self._limits,
                self._window,
                *(part for call in run for part in (call.payload, call.mid)),
            )
        )

    def batch_command(self, calls: list[Call]) -> bytes:
        """One EVALSHA of publish_batch.lua (:func:`relay.wire.publish_batch_call`)."""
        return b"".join(
            (
                b"*%d\r\n" % (6 + 6 * len(calls)),
                self._batch_head,
                _bulk(b"%d" % (4 * len(calls))),
                *(call.keys for call in calls),
                self._limits,
                self._window,
                *(part for call in calls for part in (call.payload, call.mid)),
            )
        )

    @staticmethod
    def result(reply: Any) -> PublishResult:
        return parse_publish_reply(reply)


class RoundTrip:
    """One pipelined exchange, sans-I/O: the commands to send, then every reply fed in.

    The sync and asyncio publishers differ only in how they write and read a
    connection; what a reply means is decided here. With min_replicas, outcomes are
    held until WAIT vouches for them.
    """

    __slots__ = (
        "_held",
        "_result",
        "calls",
        "commands",
        "failure",
        "groups",
        "missing",
        "replication",
    )

    def __init__(
        self, calls: list[Call], codec: PublishCodec, replication: Replication | None
    ) -> None:
        self.calls = calls
        self.replication = replication
        self.groups = codec.plan(calls)  # one command, so one reply, per group
        self.commands = [codec.commands(group) for group in self.groups]
        if replication is not None:
            self.commands.append(replication.commands(codec.keys.slot_barrier(calls[0].biz_id)))
        self._result = codec.result
        self._held: list[tuple[Call, PublishResult]] | None = None if replication is None else []
        self.missing: list[Call] = []  # NOSCRIPT: Redis lost the script; load it, resend
        self.failure: Exception | None = None  # the first transient error reply

    def reply(self, group: list[Call], reply: Any) -> None:
        """The reply to ``group``'s command, as read."""
        if len(group) == 1 and self._held is None:
            group[0].outcome = self._result(reply)
            return
        if len(group) == 1:
            replies = [reply]
        elif group[0].biz_id == group[-1].biz_id:  # publish_run.lua: a table an event
            replies = reply
        else:  # publish_batch.lua: one flat array, four elements an event
            replies = [reply[i : i + 4] for i in range(0, len(reply), 4)]
        for call, one in zip(group, replies, strict=True):
            if isinstance(one[0], rex.ResponseError):  # publish_batch.lua: this event's own
                self.error([call], one[0])
                continue
            outcome = self._result(one)
            if self._held is None:
                call.outcome = outcome
            else:
                self._held.append((call, outcome))

    def error(self, group: list[Call], exc: rex.ResponseError) -> None:
        """The error reply to ``group``'s command (redis-py raises it from the read)."""
        if isinstance(exc, rex.NoScriptError):
            self.missing.extend(group)
        elif is_transient(exc):
            self.failure = self.failure or exc
        else:
            for call in group:
                call.outcome = publish_failed(call.biz_id, None, exc)

    def replicas(self, acked: Any) -> None:
        """WAIT's answer (after the barrier's): the held outcomes stand, or ReplicasBehind."""
        assert self.replication is not None and self._held is not None
        self.replication.check(acked)
        for call, outcome in self._held:
            call.outcome = outcome

    def finish(self) -> None:
        """After any resend of :attr:`missing`: raise the transient failure, if there was one."""
        if self.failure is not None:
            raise self.failure


class PublisherBase(Generic[ClientT]):
    """What the sync and asyncio publishers share: settings, validation, keys; no I/O.

    The arguments are documented on :class:`~backend_adapter.AsyncPublisher`; a subclass
    opens its pool in :meth:`_connect` and sets ``DEFAULT_MAX_CONNECTIONS``.
    """

    DEFAULT_MAX_CONNECTIONS = 16

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        client: ClientT | None = None,
        key_prefix: str = "relay",
        history_size: int = 100,
        history_ttl: int = 3600,
        dedupe_window: int = 600,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        retries: int = 3,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        timeout: float = 2.0,
        max_connections: int | None = None,
        max_batch: int = 500,
        max_per_call: int = 100,
        min_replicas: int = 0,
        replica_timeout: float = 0.5,
    ) -> None:
        if max_connections is None:
            max_connections = self.DEFAULT_MAX_CONNECTIONS
        if (redis_url is None) == (client is None):
            raise ConfigError("give exactly one of redis_url or client")
        if timeout <= 0 or max_connections < 1 or max_batch < 1:
            raise ConfigError("timeout, max_connections and max_batch must be positive")
        self._codec = PublishCodec(
            key_prefix=key_prefix,
            history_size=history_size,
            history_ttl=history_ttl,
            dedupe_window=dedupe_window,
            max_payload=max_payload,
            max_per_call=max_per_call,
            cluster=redis_url is not None and parse_redis_url(redis_url).is_cluster,
        )
        self._retry = RetryPolicy(retries, backoff, max_backoff)
        self._replication = replication(key_prefix, min_replicas, replica_timeout, timeout)
        self._timeout = timeout
        self._max_connections = max_connections
        self._max_batch = max_batch
        self._closed = False
        self._connect(redis_url, client)

    def _connect(self, redis_url: str | None, client: ClientT | None) -> None:
        """Open the pool for ``redis_url``, or use ``client`` (exactly one is given)."""
        raise NotImplementedError

    @property
    def keys(self) -> KeySpace:
        """The Redis keys of this publisher's ``key_prefix`` (relay.wire.KeySpace)."""
        return self._codec.keys

    def validate(self, biz_id: str, event: str, data: Any, mid: str | None = None) -> None:
        """Raise what :meth:`publish` would raise for this event before sending: InvalidInput,
        PayloadTooLarge (this publisher's ``max_payload``). Sends nothing.

        For checking an event while the transaction that makes it due can still roll back.
        """
        self._codec.command(biz_id, event, data, mid)

    def _calls(self, items: Iterable[Item]) -> list[Call]:
        calls = self._codec.calls(items)
        if self._closed:
            raise PublishFailed("publisher is closed")
        return calls

    def _batches(self, calls: list[Call]) -> Iterator[list[Call]]:
        step = self._max_batch
        for start in range(0, len(calls), step):
            yield calls[start : start + step]


def raise_first_failure(calls: Iterable[Call]) -> None:
    """publish_many stops at the first failed item of a batch: its PublishFailed."""
    for call in calls:
        if isinstance(call.outcome, PublishFailed):
            raise call.outcome


def stored_event(entries: Any) -> Event | None:
    """The event of an ``XRANGE <log> <id> <id> COUNT 1`` reply read as raw bytes.

    None when the entry is gone (trimmed, or the history expired) or is not a relay
    envelope: what a caller cannot compare, it must not guess at.
    """
    if not entries:
        return None
    sid, fields = entries[0]
    try:
        return decode_payload(sid, fields[b"prev"], fields[b"p"])
    except (InvalidEnvelope, KeyError):
        return None


def results(calls: Iterable[Call]) -> list[PublishResult]:
    return [call.outcome for call in calls if isinstance(call.outcome, PublishResult)]
