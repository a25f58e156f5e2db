"""Property tests with hypothesis: every parser at the boundary, and the payload round trip.

Parsers that read what clients or other publishers send may only raise the documented
exceptions (subclasses of relay.errors.InvalidInput, AuthError for tokens); anything else
would reach a handler as an internal error. Runs are derandomized and use no example
database, so they are the same on every machine and leave no files behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import math
import string
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.auth import verify_token
from relay.errors import AuthError, InvalidEnvelope, InvalidId, InvalidInput, ProtocolViolation
from relay.protocol import ClientFrame, Format, encode_message, parse_client_frame, select_format
from relay.wire import (
    ID_ZERO,
    Event,
    History,
    StreamId,
    decode_live,
    decode_payload,
    encode_live,
    encode_payload,
    format_id,
    parse_id,
    prove_recovery,
    validate_client_id,
)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)
SHORT = settings(max_examples=200, deadline=None, derandomize=True, database=None)

CLIENT_ID_ALPHABET = string.ascii_letters + string.digits + "_.:@-"
U64 = 2**64

client_ids = st.text(CLIENT_ID_ALPHABET, min_size=1, max_size=128)
utf8_text = st.text(st.characters(codec="utf-8"))
stream_ids = st.tuples(st.integers(0, U64 - 1), st.integers(0, U64 - 1))
id_like_text = st.one_of(
    st.builds(format_id, stream_ids),
    st.from_regex(r"[0-9\-+ ]{0,25}", fullmatch=True),
    st.text(string.printable, max_size=25),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), U64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    utf8_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.tuples(inner, inner),
        st.dictionaries(utf8_text, inner, max_size=5),
    ),
    max_leaves=25,
)
msgpack_values = st.recursive(
    st.one_of(json_scalars, st.binary(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(utf8_text, st.binary()), inner)
    ),
    max_leaves=15,
)


def as_json(value: Any) -> Any:
    """What a JSON client would see for ``value``: tuples are lists."""
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


# -- client frames -------------------------------------------------------------------------


def parse_or_violation(data: bytes | str, fmt: Format) -> ClientFrame | None:
    """Parse a frame; ProtocolViolation is the one allowed failure."""
    try:
        frame = parse_client_frame(data, fmt)
    except ProtocolViolation:
        return None
    assert frame.type in {"ping", "ack"}
    assert (frame.id is not None) == (frame.type == "ack")
    return frame


@FUZZ
@given(st.text(max_size=300))
@example('{"type":"ack","id":"18446744073709551616-0"}')
@example('{"type":"ping"}')
def test_fuzz_parse_client_frame_json_text(data: str) -> None:
    """Arbitrary text on a JSON connection: a frame or ProtocolViolation, nothing else."""
    parse_or_violation(data, Format.JSON)


@FUZZ
@given(st.binary(max_size=300))
@example(b"\x81\xa4type\xa4ping")
def test_fuzz_parse_client_frame_msgpack_bytes(data: bytes) -> None:
    """Arbitrary bytes on a MessagePack connection: a frame or ProtocolViolation."""
    parse_or_violation(data, Format.MSGPACK)


@SHORT
@given(st.one_of(st.binary(max_size=100), st.text(max_size=100)), st.sampled_from(list(Format)))
def test_fuzz_parse_client_frame_wrong_frame_kind(data: bytes | str, fmt: Format) -> None:
    """Text on MessagePack or bytes on JSON is always a ProtocolViolation."""
    if isinstance(data, bytes) != fmt.binary:
        with pytest.raises(ProtocolViolation):
            parse_client_frame(data, fmt)


frame_bodies = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["ping", "ack", "pong", "", "ACK"])},
        optional={"id": st.one_of(id_like_text, st.integers(), st.none(), st.binary())},
    ),
    st.dictionaries(utf8_text, json_scalars, max_size=4),
    json_values,
)


@FUZZ
@given(frame_bodies, st.sampled_from(list(Format)))
def test_fuzz_parse_client_frame_structured(body: Any, fmt: Format) -> None:
    """Well-encoded frames of any shape: ping/ack parse, everything else is a violation."""
    if fmt is Format.JSON:
        try:
            data: bytes | str = orjson.dumps(body).decode()
        except TypeError:  # bytes in the body: not expressible as JSON
            return
    else:
        try:
            data = pack(body)
        except OverflowError:  # integers beyond 64 bits: not expressible in MessagePack
            return
    frame = parse_or_violation(data, fmt)
    if frame is not None and frame.type == "ack":
        assert frame.id == parse_id(body["id"])


@SHORT
@given(st.text(st.characters(codec="utf-8"), max_size=5), st.sampled_from(list(Format)))
@example("²", Format.JSON)
def test_fuzz_parse_client_frame_unicode_ack_ids(raw_id: str, fmt: Format) -> None:
    """An ack with any Unicode id string is a frame or a ProtocolViolation."""
    body = {"type": "ack", "id": raw_id}
    parse_or_violation(orjson.dumps(body).decode() if fmt is Format.JSON else pack(body), fmt)


@SHORT
@given(st.lists(st.text(max_size=20), max_size=4), st.one_of(st.none(), st.text(max_size=10)))
def test_fuzz_select_format(offered: list[str], query: str | None) -> None:
    """Any offer list and format query: a supported choice or ProtocolViolation."""
    try:
        fmt, subprotocol = select_format(offered, query)
    except ProtocolViolation:
        return
    assert subprotocol is None or subprotocol in offered
    assert (subprotocol is None) == (not offered)
    assert fmt in Format


# -- ids and names -------------------------------------------------------------------------


def check_parse_id(text: str | bytes) -> None:
    try:
        sid = parse_id(text)
    except InvalidId:
        return
    assert 0 <= sid[0] < U64 and 0 <= sid[1] < U64
    assert parse_id(format_id(sid)) == sid


@FUZZ
@given(st.one_of(st.binary(max_size=45), id_like_text, st.text(string.printable, max_size=45)))
def test_fuzz_parse_id_bytes_and_ascii(text: str | bytes) -> None:
    """Bytes and ASCII text: a pair of u64 that round-trips, or InvalidId."""
    check_parse_id(text)


@FUZZ
@given(st.text(max_size=25))
@example("²")
def test_fuzz_parse_id_unicode_text(text: str) -> None:
    """Any Unicode text: a pair of u64, or InvalidId."""
    check_parse_id(text)


@FUZZ
@given(st.one_of(st.text(max_size=140), client_ids, st.text(CLIENT_ID_ALPHABET, max_size=140)))
def test_fuzz_validate_client_id(text: str) -> None:
    """Accepted ids are exactly 1-128 characters of the alphabet; others raise InvalidClientId."""
    valid = 1 <= len(text) <= 128 and all(c in CLIENT_ID_ALPHABET for c in text)
    try:
        assert validate_client_id(text) == text
    except InvalidInput:
        assert not valid
    else:
        assert valid


# -- envelopes -----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
@example(b"1-0 0-0 ")
@example(b"1-0 0-0 \x80")
def test_fuzz_decode_live_bytes(message: bytes) -> None:
    """Arbitrary bytes from the live channel: an event or exactly InvalidEnvelope."""
    try:
        decode_live(message)
    except InvalidEnvelope as exc:
        assert type(exc) is InvalidEnvelope


@FUZZ
@given(
    st.one_of(st.builds(format_id, stream_ids), st.binary(max_size=25)),
    st.one_of(st.builds(format_id, stream_ids), st.binary(max_size=25)),
    st.one_of(st.binary(max_size=200), st.builds(pack, msgpack_values)),
)
def test_fuzz_decode_live_framed(sid: str | bytes, prev: str | bytes, payload: bytes) -> None:
    """Id-shaped heads before junk or arbitrary MessagePack: event or InvalidEnvelope only."""
    head = [p.encode() if isinstance(p, str) else p for p in (sid, prev)]
    try:
        decode_live(b" ".join([*head, payload]))
    except InvalidEnvelope as exc:
        assert type(exc) is InvalidEnvelope


envelope_fields = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), msgpack_values),
        "mid": st.one_of(st.none(), utf8_text, msgpack_values),
        "biz": st.one_of(client_ids, msgpack_values),
        "ev": st.one_of(utf8_text, msgpack_values),
        "data": msgpack_values,
        "ts": st.one_of(st.floats(), st.integers(-(2**63), U64 - 1), msgpack_values),
    },
)


@FUZZ
@given(
    st.one_of(st.builds(format_id, stream_ids), st.binary(max_size=25)),
    st.one_of(
        st.binary(max_size=200), st.builds(pack, envelope_fields), st.builds(pack, msgpack_values)
    ),
)
def test_fuzz_decode_payload(sid: str | bytes, payload: bytes) -> None:
    """Arbitrary payloads and ids: an Event or an InvalidInput (InvalidId/InvalidEnvelope)."""
    try:
        event = decode_payload(sid, b"0-0", payload)
    except InvalidInput as exc:
        assert isinstance(exc, InvalidId | InvalidEnvelope)
        return
    assert isinstance(event.biz_id, str) and isinstance(event.event, str)
    assert isinstance(event.ts, float)


@FUZZ
@given(json_values, client_ids, st.text(min_size=1, max_size=128), st.one_of(st.none(), utf8_text))
def test_fuzz_payload_round_trip(data: Any, biz_id: str, event: str, mid: str | None) -> None:
    """JSON values survive encode_payload -> decode_payload equal, as JSON would carry them."""
    try:
        payload = encode_payload(biz_id, event, data, mid=mid or None, ts=1.5)
    except InvalidInput:  # an event name or mid with a lone surrogate, a too-long mid
        return
    decoded = decode_payload("7-1", "7-0", payload)
    assert decoded.data == as_json(data) == orjson.loads(orjson.dumps(data))
    assert (decoded.biz_id, decoded.event, decoded.mid, decoded.ts) == (
        biz_id,
        event,
        mid or None,
        1.5,
    )
    for fmt in Format:  # whatever was accepted can be sent to either kind of client
        encode_message(decoded, fmt)


@FUZZ
@given(json_values)
def test_fuzz_live_round_trip(data: Any) -> None:
    """A published payload survives the live channel framing, whatever bytes it holds."""
    payload = encode_payload("cml", "e", data, ts=1.0)
    event = decode_live(encode_live("9-3", "9-2", payload))
    assert (event.key, event.prev, event.data) == ((9, 3), (9, 2), as_json(data))


@dataclasses.dataclass
class _Point:
    x: int


class _Colour(enum.Enum):
    RED = "red"


non_json = st.one_of(
    st.binary(),
    st.sets(st.integers(), max_size=3),
    st.frozensets(st.integers(), max_size=3),
    st.complex_numbers(),
    st.integers().filter(lambda n: not -(2**63) <= n < U64),
    st.builds(object),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=3),
    st.lists(st.binary(), min_size=1, max_size=3),
)


@SHORT
@given(non_json)
def test_fuzz_payload_rejects_non_json(data: Any) -> None:
    """Data JSON cannot carry raises InvalidInput."""
    with pytest.raises(InvalidInput):
        encode_payload("cml", "e", data)


@SHORT
@given(st.one_of(st.datetimes(), st.dates(), st.uuids(), st.builds(_Point, st.integers(0, 9))))
@example(datetime.datetime(2024, 11, 26))
def test_fuzz_payload_rejects_orjson_only_types(data: Any) -> None:
    """Objects orjson can serialise but MessagePack cannot raise InvalidInput."""
    with pytest.raises(InvalidInput):
        encode_payload("cml", "e", data)


@SHORT
@given(msgpack_values)
@example(b"\x00")
def test_fuzz_decoded_payload_is_sendable(data: Any) -> None:
    """Whatever decode_payload accepts encodes as a frame or raises InvalidEnvelope only."""
    payload = pack({"v": 1, "mid": None, "biz": "cml", "ev": "e", "data": data, "ts": 1.0})
    try:
        event = decode_payload("1-0", "0-0", payload)
    except InvalidEnvelope:
        return
    for fmt in Format:
        with contextlib.suppress(InvalidEnvelope):
            encode_message(event, fmt)


# -- tokens --------------------------------------------------------------------------------

SECRET = "relay-test-secret-0123456789abcdef"


@SHORT
@given(
    st.one_of(
        st.text(max_size=300),
        st.from_regex(r"[A-Za-z0-9_\-]{0,40}(\.[A-Za-z0-9_\-=]{0,60}){2}", fullmatch=True),
    )
)
def test_fuzz_verify_token_junk(token: str) -> None:
    """Any junk token is refused with AuthError 4001, never another exception."""
    with pytest.raises(AuthError) as excinfo:
        verify_token(token, [SECRET], "cml")
    assert excinfo.value.close_code == 4001


# -- the recovery proof against a model of a Redis stream ----------------------------------

TTL_MS = 1000


@st.composite
def stream_scenarios(draw: st.DrawFn) -> tuple[StreamId, History, set[StreamId]]:
    """A BizId's publishes over time with trimming and expiry, read once at `now`.

    Returns (since, history read, every id ever published). The stream expires TTL_MS
    after its last publish and restarts with prev 0-0; MAXLEN trimming keeps a suffix.
    No data loss (Redis restart without AOF, memory engine restart) is modelled.
    """
    gaps = draw(st.lists(st.integers(0, 2 * TTL_MS), min_size=0, max_size=25))
    t = 1_000_000
    published: list[tuple[StreamId, StreamId, int]] = []  # (id, prev, time)
    current: list[tuple[StreamId, StreamId]] = []
    for gap in gaps:
        t += gap
        if current and t >= published[-1][2] + TTL_MS:
            current = []  # expired before this publish: a fresh incarnation
        last = current[-1][0] if current else None
        key = (t, 0) if last is None or t > last[0] else (last[0], last[1] + 1)
        prev = last or ID_ZERO
        current.append((key, prev))
        published.append((key, prev, t))
    now = t + draw(st.integers(0, 2 * TTL_MS))
    if current and now >= published[-1][2] + TTL_MS:
        current = []
    if current:
        keep = draw(st.integers(1, len(current)))
        current = current[-keep:]
    all_ids = {key for key, _, _ in published}
    since = draw(
        st.one_of(
            st.sampled_from(sorted(all_ids)) if all_ids else st.just(ID_ZERO),
            st.just(ID_ZERO),
            st.tuples(st.integers(999_000, now + TTL_MS), st.integers(0, 3)),
        )
    )
    limit = draw(st.integers(1, 30))
    after = [(k, p) for k, p in current if k > since]
    truncated = len(after) > limit
    entries = [Event(format_id(k), k, p, "cml", "e", None, 0.0) for k, p in after[-limit:]]
    if not current:
        return since, History([], None, None, None, now), all_ids
    first, first_prev = current[0]
    history = History(entries, first, first_prev, current[-1][0], now, truncated)
    return since, history, all_ids


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(stream_scenarios())
def test_fuzz_prove_recovery_is_sound(scenario: tuple[StreamId, History, set[StreamId]]) -> None:
    """Whenever prove_recovery says True, every id published after `since` is in the replay."""
    since, history, published = scenario
    if prove_recovery(since, history, TTL_MS):
        missed = {key for key in published if key > since}
        assert missed == {e.key for e in history.entries}


@SHORT
@given(st.floats(allow_nan=True), st.sampled_from(list(Format)))
def test_fuzz_float_data_reaches_clients(value: float, fmt: Format) -> None:
    """Any float is accepted and sent; JSON clients see null for NaN and infinities."""
    event = decode_payload("1-0", "0-0", encode_payload("cml", "e", value, ts=1.0))
    body = encode_message(event, fmt)
    if fmt is Format.JSON and not math.isfinite(value):
        assert orjson.loads(body)["data"] is None
