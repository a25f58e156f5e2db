"""The wire contract shared by relay nodes and publishers: ids, keys, envelopes, Lua.

Pure: no I/O beyond reading the packaged Lua files once, no asyncio, no Redis client. A
Java or C# backend follows docs/wire.md, which describes exactly what this module does.

Stream ids are ``<ms>-<seq>`` as Redis makes them, compared as integer pairs. Every
history entry and every live message carries the id of the entry before it (``prev``),
so a receiver can tell a gap from a duplicate without asking anyone.
"""

from __future__ import annotations

import enum
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import msgpack

from relay.errors import InvalidClientId, InvalidEnvelope, InvalidId, InvalidInput, PayloadTooLarge

__all__ = [
    "ENVELOPE_VERSION",
    "HISTORY_LUA",
    "ID_ZERO",
    "MAX_CLIENT_ID_LEN",
    "MAX_DATA_DEPTH",
    "PUBLISH_BATCH_CLUSTER_LUA",
    "PUBLISH_BATCH_LUA",
    "PUBLISH_CLUSTER_LUA",
    "PUBLISH_LUA",
    "PUBLISH_RUN_CLUSTER_LUA",
    "PUBLISH_RUN_LUA",
    "Event",
    "History",
    "KeySpace",
    "PublishResult",
    "StreamId",
    "check_json_data",
    "decode_live",
    "decode_payload",
    "encode_live",
    "encode_payload",
    "format_id",
    "parse_attempt",
    "parse_history_reply",
    "parse_id",
    "parse_publish_reply",
    "prove_recovery",
    "publish_batch_call",
    "publish_call",
    "publish_run_call",
    "replicas_behind",
    "superseded",
    "validate_client_id",
    "validate_event_name",
    "validate_mid",
    "wait_commands",
]

StreamId = tuple[int, int]
"""A parsed stream id: (milliseconds, sequence)."""

ID_ZERO: Final[StreamId] = (0, 0)
ENVELOPE_VERSION: Final = 1
MAX_CLIENT_ID_LEN: Final = 128
MAX_EVENT_LEN: Final = 128
MAX_MID_LEN: Final = 200
DEFAULT_MAX_PAYLOAD: Final = 64 * 1024

_CLIENT_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_ID_RE: Final = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64: Final = 2**64
# The head of a live message as the publish script writes it: two ids as Redis makes them
# (no leading zeros; up to 19 digits, so below 2**64 without a check). One match reads
# both, and the first one's bytes are the text format_id would give: decode_live 1.1 µs
# instead of 1.9 for the ids (split, two parse_id, format_id), of the ~15 µs a delivered
# message costs. Anything else takes the general path, with the same results.
_DIGITS = rb"(0|[1-9][0-9]{0,18})"
_LIVE_IDS: Final = re.compile(rb"(%s-%s) %s-%s " % (_DIGITS, _DIGITS, _DIGITS, _DIGITS))
_INT_MIN: Final = -(2**63)  # the integers orjson and MessagePack both encode
_INT_END: Final = 2**64
MAX_DATA_DEPTH: Final = 254
"""Containers nested in ``data`` at most: orjson refuses deeper ones."""


def _check_plain(data: Any, depth: int = 0) -> None:
    """TypeError/ValueError for ``data`` that is not plain JSON, without orjson.

    Same verdicts as :func:`_check_orjson` (a hypothesis test holds them together): exact
    JSON types and tuples, str keys, 64-bit integers, enum members that are ints or
    strings; nothing else, not even subclasses.
    """
    kind = type(data)
    if data is None or kind in (bool, float, str):
        return
    if kind is int or (isinstance(data, enum.Enum) and isinstance(data, int | str)):
        if isinstance(data, int) and not _INT_MIN <= data < _INT_END:
            raise TypeError("Integer exceeds 64-bit range")
        return
    if kind in (list, tuple, dict):
        if depth >= MAX_DATA_DEPTH:
            raise TypeError(f"more than {MAX_DATA_DEPTH} nested containers")
        if kind is dict:
            for key, value in data.items():
                if type(key) is not str:
                    raise TypeError("Dict key must be str")
                _check_plain(value, depth + 1)
        else:
            for value in data:
                _check_plain(value, depth + 1)
        return
    raise TypeError(f"Type is not JSON serializable: {kind.__name__}")


def _orjson_check() -> Callable[[Any], None] | None:
    try:
        import orjson
    except ImportError:  # relay-backend: a publisher installed without the server
        return None
    strict = (
        orjson.OPT_PASSTHROUGH_DATETIME
        | orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_SUBCLASS
    )

    def _check_orjson(data: Any) -> None:
        orjson.dumps(data, option=strict)

    return _check_orjson


check_json_data: Final[Callable[[Any], None]] = _orjson_check() or _check_plain
"""Raise TypeError/ValueError unless ``data`` is plain JSON (orjson in C when installed)."""


def _lua(name: str) -> str:
    return resources.files("relay").joinpath("lua", name).read_text(encoding="utf-8")


PUBLISH_LUA: Final = _lua("publish.lua")
"""Atomic publish: dedupe on ``mid``, XADD with trim, TTL, PUBLISH, online lookup."""

PUBLISH_RUN_LUA: Final = _lua("publish_run.lua")
"""PUBLISH_LUA for a run of events of one BizId in one call: the per-call cost paid once."""


def _batched(template: str, script: str) -> str:
    """publish_batch.lua: ``template`` with ``script`` (publish.lua) as the body of its
    ``publish(k, payload, mid)``, called once per event.

    The event's keys are KEYS[k + 1..k + 4] and the shared settings move to ARGV[1..3].
    Renamed in the text rather than passed as a KEYS and an ARGV table per event: those
    two tables cost Redis ~0.6 µs an event (docs/benchmarks.md). Its replies ``{a, b, c,
    d}`` become four return values, which the template lays into one flat reply.
    """
    argv = {"1": "payload", "2": "ARGV[1]", "3": "ARGV[2]", "4": "mid", "5": "ARGV[3]"}
    body = re.sub(r"KEYS\[(\d)\]", r"KEYS[k + \1]", script)
    body = re.sub(r"ARGV\[(\d)\]", lambda m: argv[m.group(1)], body)
    body, replies = re.subn(r"^(\s*)return \{(.*)\}$", r"\1return \2", body, flags=re.MULTILINE)
    if replies != body.count("return"):
        raise AssertionError("every return of publish.lua must be one table {id, ...}")
    # Once per call instead of once per event: the TTL's arithmetic (tonumber, math.floor)
    # and looking up redis.call cost Redis ~3,400 of ~57,300 instructions an event
    # (callgrind, docs/benchmarks.md).
    for line in _BATCH_SETTINGS:
        if body.count(line) != 1:
            raise AssertionError(f"publish.lua must have the line {line!r} once")
        body = body.replace(line, "")
    body = body.replace("redis.call(", "call(")
    for slot in ("-- <publish.lua: settings>\n", "-- <publish.lua>\n"):
        if template.count(slot) != 1:
            raise AssertionError(f"publish_batch.lua must have one line {slot.strip()!r}")
    template = template.replace("-- <publish.lua: settings>\n", "".join(_BATCH_SETTINGS))
    return template.replace("-- <publish.lua>\n", body)


_BATCH_SETTINGS: Final = (
    "local ttl_ms = tonumber(ARGV[2]) * 1000\n",
    "local slack_ms = math.floor(ttl_ms / 4)\n",
)
"""publish.lua's lines that read only the shared settings, as renamed for the batch."""


PUBLISH_BATCH_LUA: Final = _batched(_lua("publish_batch.lua"), PUBLISH_LUA)
"""PUBLISH_LUA for each of several events of any BizIds in one call (backend_adapter's
pipelines; publish.lua stays the contract for other backends)."""


def _sharded(script: str) -> str:
    """``script`` for a Redis Cluster: its one PUBLISH made SPUBLISH (sharded pub/sub), so
    the event goes to the subscribers on its slot's master only and ``receivers`` counts
    them. Derived rather than kept as a second file, so the two can never drift apart."""
    single = "redis.call('PUBLISH', KEYS[2]"
    if script.count(single) != 1:
        raise AssertionError("a publish script must PUBLISH to KEYS[2] exactly once")
    return script.replace(single, "redis.call('SPUBLISH', KEYS[2]")


PUBLISH_CLUSTER_LUA: Final = _sharded(PUBLISH_LUA)
"""PUBLISH_LUA for a Redis Cluster: the same script with SPUBLISH."""

PUBLISH_RUN_CLUSTER_LUA: Final = _sharded(PUBLISH_RUN_LUA)
"""PUBLISH_RUN_LUA for a Redis Cluster (SPUBLISH)."""

PUBLISH_BATCH_CLUSTER_LUA: Final = _batched(_lua("publish_batch.lua"), PUBLISH_CLUSTER_LUA)
"""PUBLISH_BATCH_LUA for a Redis Cluster (SPUBLISH), for events whose keys share a slot."""

HISTORY_LUA: Final = _lua("history.lua")
"""Consistent history read: bounds of the stream, entries after ``since``, server time."""


# -- ids ---------------------------------------------------------------------------------


def parse_id(text: str | bytes) -> StreamId:
    """Parse ``<ms>-<seq>``; a bare ``<ms>`` means ``<ms>-0``. Raises InvalidId."""
    if isinstance(text, bytes):
        # The live feed's two ids per message, without decoding: bytes.isdigit() is true
        # only for ASCII digits. 0.28 µs an id instead of 0.42-0.55 (decode_live: 2.5 µs
        # instead of 2.9, of the ~16 µs a delivered message costs). The rest as for str.
        ms_part, sep, seq_part = text.partition(b"-")
        if (
            sep
            and 0 < len(ms_part) <= 20
            and 0 < len(seq_part) <= 20
            and ms_part.isdigit()
            and seq_part.isdigit()
        ):
            ms, seq = int(ms_part), int(seq_part)
            if ms >= _U64 or seq >= _U64:
                raise InvalidId("stream id out of range")
            return ms, seq
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidId("stream id must be ASCII '<ms>-<seq>'") from None
    head, dash, tail = text.partition("-")
    if 0 < len(head) <= 20 and 0 < len(tail) <= 20 and head.isdecimal() and text.isascii():
        ms, seq = int(head), int(tail) if tail.isdecimal() else -1
        if seq < 0:
            raise InvalidId("stream id must look like '<ms>-<seq>'")
    elif not dash and text.isascii() and text.isdigit() and len(text) <= 20:
        ms, seq = int(text), 0
    else:
        match = _ID_RE.fullmatch(text)
        if match is None:
            raise InvalidId("stream id must look like '<ms>-<seq>'")
        ms, seq = int(match[1]), int(match[2])
    if ms >= _U64 or seq >= _U64:
        raise InvalidId("stream id out of range")
    return ms, seq


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


# -- names ------------------------------------------------------------------------------


def validate_client_id(client_id: str) -> str:
    """Return ``client_id`` if it is 1-128 chars of ``A-Z a-z 0-9 _ . : @ -``."""
    if not isinstance(client_id, str) or _CLIENT_ID_RE.fullmatch(client_id) is None:
        raise InvalidClientId("client_id must be 1-128 characters of A-Z a-z 0-9 _ . : @ -")
    return client_id


_ATTEMPT_RE: Final = re.compile(r"([A-Za-z0-9_-]{1,32})\.([0-9]{1,9})")


def parse_attempt(text: str) -> tuple[str, int]:
    """``<instance>.<n>``: which client instance connects, and its n-th attempt.

    Of two handshakes of one instance, the higher ``n`` is the newer, whatever order
    they reach the registry in; a client that gave up on a slow attempt says so by
    counting up.
    """
    match = _ATTEMPT_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidInput(
            "attempt must look like '<instance>.<n>' (instance: 1-32 of A-Z a-z 0-9 _ -)"
        )
    return match[1], int(match[2])


def superseded(holder_attempt: str | None, attempt: str | None) -> bool:
    """True when ``holder_attempt`` is a later attempt of the same client instance."""
    if not holder_attempt or not attempt:
        return False
    try:
        held, ours = parse_attempt(holder_attempt), parse_attempt(attempt)
    except InvalidInput:
        return False
    return held[0] == ours[0] and held[1] > ours[1]


def validate_event_name(event: str) -> str:
    if not isinstance(event, str) or not 1 <= len(event) <= MAX_EVENT_LEN:
        raise InvalidInput(f"event must be a string of 1-{MAX_EVENT_LEN} characters")
    return event


def validate_mid(mid: str | None) -> str | None:
    if mid is None:
        return None
    if not isinstance(mid, str) or not 1 <= len(mid) <= MAX_MID_LEN:
        raise InvalidInput(f"mid must be a string of 1-{MAX_MID_LEN} characters")
    return mid


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Redis key names. Every key of one BizId shares the hash tag ``{B}``."""

    prefix: str = "relay"

    def log(self, biz_id: str) -> str:
        return f"{self.prefix}:{{{biz_id}}}:log"

    def channel(self, biz_id: str) -> str:
        return f"{self.prefix}:{{{biz_id}}}:ch"

    def session(self, biz_id: str) -> str:
        return f"{self.prefix}:{{{biz_id}}}:session"

    def mid(self, biz_id: str, mid: str) -> str:
        return f"{self.prefix}:{{{biz_id}}}:mid:{mid}"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    def control(self, node_id: str) -> str:
        return f"{self.prefix}:ctl:{node_id}"

    def barrier(self) -> str:
        """The channel of an empty PUBLISH before ``WAIT``: a write that follows every
        earlier one, so WAIT covers them all (see docs/wire.md, min-replicas)."""
        return f"{self.prefix}:barrier"

    def slot_barrier(self, biz_id: str) -> str:
        """The key of a short-lived ``SET`` before ``WAIT`` on a Redis Cluster, in
        ``biz_id``'s slot: a cluster does not replicate PUBLISH, so the barrier must be a
        write on the slot's own master."""
        return f"{self.prefix}:{{{biz_id}}}:barrier"


# -- envelopes --------------------------------------------------------------------------


# Each thread's MessagePack packer for encode_payload: msgpack.packb makes a Packer (and
# its buffer) per call, ~0.5 µs of its ~1.4 (timeit, a publish's envelope); a Packer's
# buffer must not be shared between threads (the sync Publisher may run in many).
_packers = threading.local()


def encode_payload(
    biz_id: str,
    event: str,
    data: Any,
    *,
    mid: str | None = None,
    ts: float | None = None,
    max_size: int = DEFAULT_MAX_PAYLOAD,
) -> bytes:
    """Validate a publish and encode its payload: a MessagePack map ``v mid biz ev data ts``.

    ``data`` must be JSON-compatible, because JSON clients receive it as JSON.
    """
    validate_client_id(biz_id)
    validate_event_name(event)
    validate_mid(mid)
    try:
        # JSON clients receive `data` as JSON: refuse what JSON has no type for, even
        # where orjson or msgpack would invent an encoding (datetime, UUID, bytes).
        check_json_data(data)
        try:
            pack = _packers.pack
        except AttributeError:
            pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
        payload: bytes = pack(
            {
                "v": ENVELOPE_VERSION,
                "mid": mid,
                "biz": biz_id,
                "ev": event,
                "data": data,
                "ts": time.time() if ts is None else ts,
            }
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"data must be JSON-compatible: {exc}") from None
    if len(payload) > max_size:
        raise PayloadTooLarge(f"payload is {len(payload)} bytes; the limit is {max_size}")
    return payload


@dataclass(slots=True)
class Event:
    """One published event as a node sees it: from history or from the live channel."""

    id: str
    key: StreamId
    prev: StreamId
    biz_id: str
    event: str
    data: Any
    ts: float
    mid: str | None = None


def decode_payload(sid: str | bytes, prev: str | bytes, payload: bytes) -> Event:
    """Decode one entry; anything malformed raises InvalidEnvelope, never anything else."""
    key = parse_id(sid)
    return _decode_body(format_id(key), key, parse_id(prev), payload)


def _decode_body(sid: str, key: StreamId, prev: StreamId, payload: bytes) -> Event:
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on junk
        raise InvalidEnvelope(f"payload is not MessagePack ({type(exc).__name__})") from None
    # Subscripts rather than .get(), a method call each: this runs per event. MessagePack
    # decodes a map to a dict and nothing else; any other body raises TypeError here.
    try:
        version, biz, ev, ts = body["v"], body["biz"], body["ev"], body["ts"]
    except (KeyError, TypeError):
        version = body.get("v") if type(body) is dict else None
        biz = ev = ts = None
    if version != ENVELOPE_VERSION:
        raise InvalidEnvelope("payload is not a version-1 relay envelope")
    mid = body.get("mid")
    if not (
        isinstance(biz, str)
        and isinstance(ev, str)
        and isinstance(ts, (int, float))  # a tuple: `int | float` builds a union per call
        and (mid is None or isinstance(mid, str))
    ):
        raise InvalidEnvelope("envelope fields biz, ev, ts have the wrong types")
    # Event(...) without its __init__, once per event: calling a class runs the Python
    # __init__ from C (type.__call__), a call Python 3.11 cannot inline; __new__ and eight
    # slot stores here cost about half as much (0.49 against 0.86 µs with the reads a
    # message makes of it, timeit min of 15). Its dataclass __eq__ in the tests reads every
    # field, so a field left out here fails them.
    event = Event.__new__(Event)
    event.id = sid
    event.key = key
    event.prev = prev
    event.biz_id = biz
    event.event = ev
    event.data = body.get("data")
    event.ts = float(ts)
    event.mid = mid
    return event


def encode_live(sid: str, prev: str, payload: bytes) -> bytes:
    """The pub/sub message: ``<id> <prev> <payload>`` (ids are ASCII, payload binary)."""
    return b"%s %s %s" % (sid.encode(), prev.encode(), payload)


def decode_live(message: bytes) -> Event:
    """Inverse of :func:`encode_live`, followed by :func:`decode_payload`."""
    match = _LIVE_IDS.match(message)
    if match is not None:
        sid, ms, seq, prev_ms, prev_seq = match.groups()
        # A sequence is nearly always 0 (a second entry in the same ms of one stream is
        # rare): a compare is ~0.08 µs cheaper than int(), twice per message.
        key = int(ms), 0 if seq == b"0" else int(seq)
        prev = int(prev_ms), 0 if prev_seq == b"0" else int(prev_seq)
        return _decode_body(sid.decode(), key, prev, message[match.end() :])
    parts = message.split(b" ", 2)
    if len(parts) != 3:
        raise InvalidEnvelope("live message is not '<id> <prev> <payload>'")
    try:
        return decode_payload(parts[0], parts[1], parts[2])
    except InvalidId as exc:
        raise InvalidEnvelope(str(exc)) from None


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What a publish did: the stream id, how many nodes received it, and more."""

    id: str
    online: bool
    receivers: int
    duplicate: bool = False


# -- history and recovery ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class History:
    """A consistent read of one BizId's history.

    ``first``/``first_prev``/``last`` describe the stream (None when it does not exist),
    ``entries`` are those after ``since`` (all of them unless ``truncated``), and
    ``now_ms`` is the broker's clock at the read.
    """

    entries: list[Event]
    first: StreamId | None
    first_prev: StreamId | None
    last: StreamId | None
    now_ms: int
    truncated: bool = False
    epoch_ms: int = 0
    """When the store's data began (engine start, Redis dataset created); nothing earlier
    can be vouched for, because a restart without persistence leaves no trace."""

    def head(self) -> StreamId:
        """The id a client can resume from: the newest entry, or just before "now".

        Any entry added after this read gets an id of at least ``(now_ms, 0)``, so
        ``(now_ms - 1, 0)`` sorts before all of them and after nothing that exists.
        """
        return self.last if self.last is not None else (max(self.now_ms - 1, 0), 0)


def prove_recovery(since: StreamId, history: History, ttl_ms: int) -> bool:
    """True only if every entry published after ``since`` is in ``history.entries``.

    Trimming leaves no trace in a Redis Stream, so the proof rests on four facts:
    entries are contiguous (trimming only removes the oldest); each entry names its
    predecessor (``prev``), so a ``since`` inside the retained range must be an entry that
    the next one names (``entries`` then start right after ``since``); a stream lives at
    least ``ttl_ms`` after its last publish (publishers must use a TTL at least the
    node's); and the store's data is known to
    go back to ``history.epoch_ms`` (a Redis restart without persistence, a FLUSHALL or
    a memory-engine restart moves it).
    """
    if history.truncated:
        return False
    if history.first is None or history.last is None:
        # No stream. An incarnation born after `since` that already expired must have
        # lived ttl_ms, so if less than that has passed, nothing was lost -- provided
        # the store itself did not lose its data since then.
        return history.epoch_ms <= since[0] <= history.now_ms < since[0] + ttl_ms
    if since > history.last:
        return False  # the client claims an id this stream never had
    if since >= history.first:
        # `since` must still be in the chain: the newest entry, or named by the next one.
        # A failover to a replica that lacked the newest entries rewinds the stream: ids a
        # client already holds are then gone, and later ones may even sort before them.
        if since == history.last:
            return True
        return bool(history.entries) and history.entries[0].prev == since
    if history.first_prev == since and since != ID_ZERO:
        return True  # the oldest retained entry directly follows `since`
    # The oldest retained entry began a fresh incarnation: nothing of it was trimmed,
    # and an older incarnation after `since` would have needed ttl_ms to expire.
    return (
        history.first_prev == ID_ZERO
        and history.epoch_ms <= since[0]
        and history.first[0] < since[0] + ttl_ms
    )


# -- the Lua calls, shared by the Redis engine and backend_adapter -----------------------


def publish_call(
    keys: KeySpace,
    biz_id: str,
    payload: bytes,
    *,
    mid: str | None,
    history_size: int,
    history_ttl: int,
    dedupe_window: int,
) -> tuple[list[str], list[bytes | str | int]]:
    """KEYS and ARGV of :data:`PUBLISH_LUA` (docs/wire.md shows the same)."""
    return (
        [
            keys.log(biz_id),
            keys.channel(biz_id),
            keys.session(biz_id),
            keys.mid(biz_id, mid) if mid is not None else keys.log(biz_id),
        ],
        [payload, history_size, history_ttl, mid or "", dedupe_window],
    )


def publish_run_call(
    keys: KeySpace,
    biz_id: str,
    events: Sequence[tuple[bytes, str | None]],
    *,
    history_size: int,
    history_ttl: int,
    dedupe_window: int,
) -> tuple[list[str], list[bytes | str | int]]:
    """KEYS and ARGV of :data:`PUBLISH_RUN_LUA` for ``(payload, mid)`` events of one BizId.

    Every key is in ``biz_id``'s ``{B}`` slot, so the call is safe on a cluster.
    """
    log = keys.log(biz_id)
    dedupe = [log if mid is None else keys.mid(biz_id, mid) for _, mid in events]
    args: list[bytes | str | int] = [history_size, history_ttl, dedupe_window]
    for payload, mid in events:
        args += (payload, mid or "")
    return [log, keys.channel(biz_id), keys.session(biz_id), *dedupe], args


def publish_batch_call(
    keys: KeySpace,
    events: Sequence[tuple[str, bytes, str | None]],
    *,
    history_size: int,
    history_ttl: int,
    dedupe_window: int,
) -> tuple[list[str], list[bytes | str | int]]:
    """KEYS and ARGV of :data:`PUBLISH_BATCH_LUA` for ``(biz_id, payload, mid)`` events.

    Each event's four keys are :func:`publish_call`'s, so a Redis Cluster runs the call
    only when every BizId's ``{B}`` tag hashes to one slot.
    """
    names: list[str] = []
    args: list[bytes | str | int] = [history_size, history_ttl, dedupe_window]
    for biz_id, payload, mid in events:
        log = keys.log(biz_id)
        dedupe = log if mid is None else keys.mid(biz_id, mid)
        names += (log, keys.channel(biz_id), keys.session(biz_id), dedupe)
        args += (payload, mid or "")
    return names, args


def wait_commands(
    min_replicas: int, timeout: float, barrier: str, *, in_slot: bool
) -> tuple[tuple[str | int, ...], tuple[str | int, ...]]:
    """The barrier write and ``WAIT`` that end a pipeline of publishes with min_replicas.

    ``WAIT`` covers only the connection's own writes; the barrier is a write after every
    one the master had made, so it also covers the original of a duplicate. It is
    ``PUBLISH <barrier> ""`` (:meth:`KeySpace.barrier`), or with ``in_slot`` (a Redis
    Cluster, which sends PUBLISH over its bus, not to the replicas) ``SET <barrier> ""
    PX <timeout>`` with ``barrier`` a key in the pipeline's slot
    (:meth:`KeySpace.slot_barrier`), so it lands on that slot's master (docs/wire.md).
    """
    ms = max(1, round(timeout * 1000))
    write: tuple[str | int, ...] = (
        ("SET", barrier, "", "PX", ms) if in_slot else ("PUBLISH", barrier, "")
    )
    return write, ("WAIT", min_replicas, ms)


def replicas_behind(acked: Any, min_replicas: int, timeout: float) -> str | None:
    """Why ``WAIT``'s reply ``acked`` does not vouch for the writes; None if it does."""
    if isinstance(acked, int) and acked >= min_replicas:
        return None
    return f"{acked} of {min_replicas} replica(s) acknowledged the write within {timeout} s"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_publish_reply(reply: Any) -> PublishResult:
    """Turn the script's ``{id, receivers, online, duplicate}`` into a PublishResult."""
    sid, receivers, online, duplicate = reply
    return PublishResult(_text(sid), bool(int(online)), int(receivers), bool(int(duplicate)))


def parse_history_reply(reply: list[Any], epoch_ms: int = 0) -> History:
    """Turn :data:`HISTORY_LUA`'s flat reply into a History; junk entries raise.

    ``epoch_ms`` is the store's epoch, read beside it (every connect reads both: passed
    in rather than set with ``dataclasses.replace``, ~1.4 µs a call).
    """
    now_ms = int(reply[0])
    if len(reply) == 1:
        return History([], None, None, None, now_ms, epoch_ms=epoch_ms)
    first, first_prev, last = parse_id(reply[1]), parse_id(reply[2]), parse_id(reply[3])
    rest = reply[5:]
    entries = [decode_payload(rest[i], rest[i + 1], rest[i + 2]) for i in range(0, len(rest), 3)]
    return History(entries, first, first_prev, last, now_ms, bool(int(reply[4])), epoch_ms)
