"""Unit tests for relay.wire: ids, names, key space, envelopes, Lua calls, recovery proof."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import re
import time
import uuid
from typing import Any

import msgpack
import orjson
import pytest

from relay.errors import (
    InvalidClientId,
    InvalidEnvelope,
    InvalidId,
    InvalidInput,
    PayloadTooLarge,
)
from relay.protocol import Format, encode_message
from relay.wire import (
    DEFAULT_MAX_PAYLOAD,
    HISTORY_LUA,
    ID_ZERO,
    PUBLISH_BATCH_CLUSTER_LUA,
    PUBLISH_BATCH_LUA,
    PUBLISH_CLUSTER_LUA,
    PUBLISH_LUA,
    PUBLISH_RUN_CLUSTER_LUA,
    PUBLISH_RUN_LUA,
    Event,
    History,
    KeySpace,
    PublishResult,
    StreamId,
    decode_live,
    decode_payload,
    encode_live,
    encode_payload,
    format_id,
    parse_attempt,
    parse_history_reply,
    parse_id,
    parse_publish_reply,
    prove_recovery,
    publish_call,
    superseded,
    validate_client_id,
)

U64 = 2**64
TTL_MS = 3_600_000


def envelope(**fields: Any) -> bytes:
    """A hand-made MessagePack envelope, for shapes encode_payload refuses to make."""
    body: dict[str, Any] = {"v": 1, "mid": None, "biz": "cml", "ev": "e", "data": None, "ts": 1.0}
    body.update(fields)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: between the first '{' and the next '}'."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start)]


# -- ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["0-0", "1-0", "9-0", "10-0", "1732612345678-0", "1732612345678-17", f"{U64 - 1}-{U64 - 1}"],
)
def test_parse_id_format_id_round_trip(text: str) -> None:
    """format_id(parse_id(s)) gives back a canonical id unchanged."""
    assert format_id(parse_id(text)) == text


def test_parse_id_accepts_bytes() -> None:
    """Ids read from Redis as bytes parse like their text."""
    assert parse_id(b"1732612345678-3") == (1732612345678, 3)


def test_parse_id_orders_as_integer_pairs() -> None:
    """'9-0' sorts before '10-0' once parsed, though not as strings."""
    assert "9-0" > "10-0"  # the trap: string order
    assert parse_id("9-0") < parse_id("10-0")
    assert parse_id("10-2") < parse_id("10-10")


@pytest.mark.parametrize(
    ("text", "expected"), [("1732612345678", (1732612345678, 0)), (b"42", (42, 0))]
)
def test_parse_id_bare_ms_means_seq_zero(text: str | bytes, expected: StreamId) -> None:
    """A bare '<ms>' is '<ms>-0'."""
    assert parse_id(text) == expected


def test_parse_id_leading_zeros_normalise() -> None:
    """Leading zeros parse to the same pair and format canonically."""
    assert format_id(parse_id("007-01")) == "7-1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-",
        "1-",
        "-1",
        "a-b",
        "1-0-0",
        " 1-0",
        "1-0 ",
        "1-0\n",
        "1.0",
        "0x10-0",
        "+1-0",
        "1_000-0",
        "1e3-0",
        "1-*",
        "*",
    ],
)
def test_parse_id_rejects_junk(text: str) -> None:
    """Anything that is not '<ms>-<seq>' or '<ms>' raises InvalidId."""
    with pytest.raises(InvalidId):
        parse_id(text)


@pytest.mark.parametrize("text", ["-5", "-1-0", "1--1", "-1--1"])
def test_parse_id_rejects_negative(text: str) -> None:
    """Negative parts are not stream ids."""
    with pytest.raises(InvalidId):
        parse_id(text)


@pytest.mark.parametrize(
    "text", [f"{U64}-0", f"0-{U64}", str(U64), "9" * 20, "1" * 21, "1" * 21 + "-0", "0-" + "1" * 21]
)
def test_parse_id_rejects_out_of_range(text: str) -> None:
    """Parts of 2**64 and above raise InvalidId (Redis ids are two u64)."""
    with pytest.raises(InvalidId):
        parse_id(text)


@pytest.mark.parametrize(
    "raw", ["\u0661-\u0662".encode(), "²".encode(), b"\xff-0", b"1-\x80", b"\xc3\xa9"]
)
def test_parse_id_rejects_non_ascii_bytes(raw: bytes) -> None:
    """Bytes that are not ASCII raise InvalidId, not UnicodeDecodeError."""
    with pytest.raises(InvalidId):
        parse_id(raw)


@pytest.mark.parametrize("text", ["²", "1²", "①"])
def test_parse_id_rejects_non_ascii_digit_text(text: str) -> None:
    """Text made of non-ASCII 'digits' raises InvalidId."""
    with pytest.raises(InvalidId):
        parse_id(text)


@pytest.mark.parametrize("text", ["\u0661\u0662", "\u0661-\u0662", "\uff11-\uff10"])
def test_parse_id_rejects_unicode_decimal_digits(text: str) -> None:
    """Ids are ASCII: Arabic-Indic or fullwidth digits raise InvalidId, as their bytes do."""
    with pytest.raises(InvalidId):
        parse_id(text)


# -- names -------------------------------------------------------------------------------


@pytest.mark.parametrize("client_id", ["a", "cml", "A-Z_a-z.0-9:@-", "user@example.com", "x" * 128])
def test_validate_client_id_accepts_alphabet(client_id: str) -> None:
    """1-128 characters of A-Z a-z 0-9 _ . : @ - are returned unchanged."""
    assert validate_client_id(client_id) == client_id


@pytest.mark.parametrize(
    "client_id",
    [
        "",
        "x" * 129,
        "é",
        "\uff43\uff4d\uff4c",
        "a b",
        " a",
        "a/b",
        "a\n",
        "a\x00",
        "{a}",
        "a#b",
        "a+b",
        "a%20",
    ],
)
def test_validate_client_id_rejects_outside_alphabet(client_id: str) -> None:
    """Empty, 129 characters, unicode, spaces, '/' and braces raise InvalidClientId."""
    with pytest.raises(InvalidClientId):
        validate_client_id(client_id)


@pytest.mark.parametrize("value", [None, 5, b"cml", ["cml"]])
def test_validate_client_id_rejects_non_strings(value: Any) -> None:
    """A client_id that is not a str raises InvalidClientId, not TypeError."""
    with pytest.raises(InvalidClientId):
        validate_client_id(value)


# -- key space ---------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["relay", "tenant-a:relay"])
def test_keyspace_biz_keys_share_hash_tag(prefix: str) -> None:
    """log, channel, session and mid keys of one BizId hash to the same slot."""
    keys = KeySpace(prefix)
    names = [keys.log("cml"), keys.channel("cml"), keys.session("cml"), keys.mid("cml", "m-1")]
    assert {hash_tag(name) for name in names} == {"cml"}
    assert all(name.startswith(f"{prefix}:") for name in names)
    assert len(set(names)) == 4


def test_keyspace_names_match_design() -> None:
    """The documented layout: relay:{B}:log, :ch, :session, relay:node:N, relay:ctl:N."""
    keys = KeySpace()
    assert keys.log("B") == "relay:{B}:log"
    assert keys.channel("B") == "relay:{B}:ch"
    assert keys.session("B") == "relay:{B}:session"
    assert keys.node("n1") == "relay:node:n1"
    assert keys.control("n1") == "relay:ctl:n1"


# -- envelopes ---------------------------------------------------------------------------


def test_encode_payload_decode_payload_round_trip() -> None:
    """Every field published comes back from decode_payload."""
    data = {"label": "x", "n": [1, 2.5, None, True], "nested": {"k": "v"}}
    payload = encode_payload("cml", "label.created", data, mid="m-1", ts=1732612345.678)
    event = decode_payload("1732612345678-1", b"1732612345678-0", payload)
    assert event == Event(
        id="1732612345678-1",
        key=(1732612345678, 1),
        prev=(1732612345678, 0),
        biz_id="cml",
        event="label.created",
        data=data,
        ts=1732612345.678,
        mid="m-1",
    )


def test_encode_payload_is_documented_msgpack_map() -> None:
    """The payload is a MessagePack map with exactly v, mid, biz, ev, data, ts."""
    before = time.time()
    body = msgpack.unpackb(encode_payload("cml", "e", [1]), raw=False)
    assert set(body) == {"v", "mid", "biz", "ev", "data", "ts"}
    assert body["v"] == 1 and body["mid"] is None and body["data"] == [1]
    assert before <= body["ts"] <= time.time()


@pytest.mark.parametrize("data", [b"bytes", {1, 2}, object(), {1: "int key"}, 2**64, "\ud800"])
def test_encode_payload_rejects_non_json_data(data: Any) -> None:
    """Data JSON clients could not receive (bytes, set, object, ...) raises InvalidInput."""
    with pytest.raises(InvalidInput, match="JSON"):
        encode_payload("cml", "e", data)


@dataclasses.dataclass
class _Point:
    x: int


class _Colour(enum.Enum):
    RED = "red"


@pytest.mark.parametrize(
    "data",
    [
        datetime.datetime(2024, 11, 26, tzinfo=datetime.UTC),
        uuid.UUID(int=1),
        _Point(1),
        _Colour.RED,
    ],
    ids=["datetime", "uuid", "dataclass", "enum"],
)
def test_encode_payload_rejects_orjson_only_types(data: Any) -> None:
    """Objects orjson serialises but MessagePack cannot raise InvalidInput, not TypeError."""
    with pytest.raises(InvalidInput):
        encode_payload("cml", "e", data)


def test_encode_payload_rejects_oversize() -> None:
    """A payload over the default 64 KiB raises PayloadTooLarge."""
    with pytest.raises(PayloadTooLarge):
        encode_payload("cml", "e", "x" * DEFAULT_MAX_PAYLOAD)


def test_encode_payload_limit_is_inclusive() -> None:
    """A payload of exactly max_size bytes passes; one byte less of limit refuses it."""
    size = len(encode_payload("cml", "e", "x" * 100, ts=1.0))
    assert len(encode_payload("cml", "e", "x" * 100, ts=1.0, max_size=size)) == size
    with pytest.raises(PayloadTooLarge):
        encode_payload("cml", "e", "x" * 100, ts=1.0, max_size=size - 1)


@pytest.mark.parametrize(
    ("biz", "event", "mid", "error"),
    [
        ("bad id", "e", None, InvalidClientId),
        ("cml", "", None, InvalidInput),
        ("cml", "e" * 129, None, InvalidInput),
        ("cml", "e", "", InvalidInput),
        ("cml", "e", "m" * 201, InvalidInput),
    ],
)
def test_encode_payload_validates_names(
    biz: str, event: str, mid: str | None, error: type[Exception]
) -> None:
    """Bad biz_id, event name or mid raise before anything is encoded."""
    with pytest.raises(error):
        encode_payload(biz, event, None, mid=mid)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({1: 2}),
        envelope(v=2),
        envelope(v=None),
        envelope(biz=5),
        envelope(ev=None),
        envelope(ts="now"),
        envelope(mid=7),
    ],
)
def test_decode_payload_rejects_malformed_envelope(payload: bytes) -> None:
    """Non-MessagePack, non-map, wrong version or wrong field types raise InvalidEnvelope."""
    with pytest.raises(InvalidEnvelope):
        decode_payload("1-0", "0-0", payload)


def test_decode_payload_bad_id_raises_invalid_id() -> None:
    """A malformed entry id raises InvalidId (an InvalidInput), as parse_history_reply relies on."""
    with pytest.raises(InvalidId):
        decode_payload("x", "0-0", envelope())


def test_decode_payload_binary_data_reaches_json_clients_as_base64() -> None:
    """MessagePack bin from another language's publisher becomes base64 text in JSON."""
    event = decode_payload("1-0", "0-0", envelope(data={"k": b"\x00\x01"}))
    frame = orjson.loads(encode_message(event, Format.JSON))
    assert frame["data"] == {"k": "AAE="}
    assert msgpack.unpackb(encode_message(event, Format.MSGPACK))["data"] == {"k": b"\x00\x01"}


def test_decode_payload_ext_data_cannot_be_encoded_for_json() -> None:
    """MessagePack ext types have no JSON form: encode_message raises InvalidEnvelope."""
    event = decode_payload("1-0", "0-0", envelope(data=msgpack.ExtType(5, b"x")))
    with pytest.raises(InvalidEnvelope):
        encode_message(event, Format.JSON)


def test_encode_live_decode_live_round_trip() -> None:
    """decode_live(encode_live(id, prev, payload)) is the event; spaces in data survive."""
    payload = encode_payload("cml", "e", {"text": "a b  c "}, ts=2.0)
    message = encode_live("5-1", "5-0", payload)
    assert message.startswith(b"5-1 5-0 ")
    event = decode_live(message)
    assert (event.id, event.key, event.prev) == ("5-1", (5, 1), (5, 0))
    assert event.data == {"text": "a b  c "}
    assert event == decode_payload("5-1", "5-0", payload)


@pytest.mark.parametrize(
    ("sid", "prev"),
    [
        ("5-1", "5-0"),
        ("0-1", "0-0"),
        ("05-1", "5-0"),  # leading zeros: the same key, the id written canonically
        ("5-01", "005-0"),
        ("5", "4"),  # a bare <ms>
        ("9999999999999999999-0", "1-0"),  # 19 digits
        ("18446744073709551615-18446744073709551615", "12345678901234567890-0"),  # 20 digits
    ],
)
def test_decode_live_ids_as_decode_payload(sid: str, prev: str) -> None:
    """Every id spelling decode_payload takes gives decode_live the same event."""
    payload = encode_payload("cml", "e", {"n": 1}, ts=2.0)
    assert decode_live(encode_live(sid, prev, payload)) == decode_payload(sid, prev, payload)


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"junk",
        b"1-0",
        b"1-0 0-0",
        b"x 0-0 " + envelope(),
        b"1-0 y " + envelope(),
        b"\xff-0 0-0 " + envelope(),
        b" 1-0 0-0 " + envelope(),
        b"1-0 0-0 \xc1",
        b"1-0 0-18446744073709551616 " + envelope(),  # prev past 2**64
        b"1-0 0-0 " + envelope(v=9),
        f"{U64}-0 0-0 ".encode() + envelope(),
    ],
)
def test_decode_live_junk_raises_only_invalid_envelope(message: bytes) -> None:
    """Every malformed live message raises exactly InvalidEnvelope, never another type."""
    with pytest.raises(InvalidEnvelope) as excinfo:
        decode_live(message)
    assert excinfo.type is InvalidEnvelope


# -- Lua calls ---------------------------------------------------------------------------


def test_publish_call_shape_with_mid() -> None:
    """KEYS are log, channel, session, mid key; ARGV payload, size, ttl, mid, window."""
    keys = KeySpace()
    payload = encode_payload("cml", "e", None, mid="m-1")
    kv, argv = publish_call(
        keys, "cml", payload, mid="m-1", history_size=100, history_ttl=3600, dedupe_window=86400
    )
    assert kv == [keys.log("cml"), keys.channel("cml"), keys.session("cml"), keys.mid("cml", "m-1")]
    assert argv == [payload, 100, 3600, "m-1", 86400]
    assert {hash_tag(k) for k in kv} == {"cml"}


def test_publish_call_shape_without_mid() -> None:
    """Without a mid, KEYS[4] is a key in the BizId's slot and ARGV[4] is ''."""
    keys = KeySpace()
    kv, argv = publish_call(
        keys, "cml", b"p", mid=None, history_size=10, history_ttl=60, dedupe_window=5
    )
    assert kv[3] == keys.log("cml")
    assert argv == [b"p", 10, 60, "", 5]


def test_publish_call_matches_lua_arity() -> None:
    """publish_call supplies exactly the KEYS and ARGV slots PUBLISH_LUA reads."""
    kv, argv = publish_call(
        KeySpace(), "cml", b"p", mid="m", history_size=1, history_ttl=1, dedupe_window=1
    )
    assert max(int(n) for n in re.findall(r"KEYS\[(\d+)\]", PUBLISH_LUA)) == len(kv)
    assert max(int(n) for n in re.findall(r"ARGV\[(\d+)\]", PUBLISH_LUA)) == len(argv)
    assert max(int(n) for n in re.findall(r"KEYS\[(\d+)\]", HISTORY_LUA)) == 1


def test_publish_cluster_scripts_differ_only_by_spublish() -> None:
    """The Redis Cluster scripts are the single-server ones with SPUBLISH for PUBLISH, and
    nothing else (docs/wire.md tells other-language publishers to make that one change)."""
    for single, cluster in (
        (PUBLISH_LUA, PUBLISH_CLUSTER_LUA),
        (PUBLISH_RUN_LUA, PUBLISH_RUN_CLUSTER_LUA),
        (PUBLISH_BATCH_LUA, PUBLISH_BATCH_CLUSTER_LUA),
    ):
        assert single.count("call('PUBLISH'") == 1  # publish_batch.lua's redis.call is call
        assert "SPUBLISH" not in single
        assert cluster == single.replace("call('PUBLISH'", "call('SPUBLISH'")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ([b"5-1", 2, 1, 0], PublishResult("5-1", True, 2, False)),
        (["5-1", 0, 0, 0], PublishResult("5-1", False, 0, False)),
        ([b"5-0", 0, 1, 1], PublishResult("5-0", True, 0, True)),
        ([b"5-0", b"3", b"0", b"1"], PublishResult("5-0", False, 3, True)),
    ],
)
def test_parse_publish_reply_maps_fields(reply: list[Any], expected: PublishResult) -> None:
    """{id, receivers, online, duplicate} from the script becomes a PublishResult."""
    assert parse_publish_reply(reply) == expected


def test_parse_history_reply_missing_stream() -> None:
    """A one-element reply {now_ms} is an empty history with no bounds."""
    history = parse_history_reply([1732612345678])
    assert history == History([], None, None, None, 1732612345678)
    assert history.truncated is False


def test_parse_history_reply_entries_and_bounds() -> None:
    """Bounds, the truncated flag and each (id, prev, payload) triple are decoded."""
    p1 = encode_payload("cml", "a", 1, ts=1.0)
    p2 = encode_payload("cml", "b", 2, ts=2.0)
    reply = [2000, b"10-0", b"0-0", b"12-0", 1, b"11-0", b"10-0", p1, b"12-0", b"11-0", p2]
    history = parse_history_reply(reply)
    assert (history.first, history.first_prev, history.last) == ((10, 0), (0, 0), (12, 0))
    assert history.now_ms == 2000 and history.truncated is True
    assert [(e.key, e.prev, e.event, e.data) for e in history.entries] == [
        ((11, 0), (10, 0), "a", 1),
        ((12, 0), (11, 0), "b", 2),
    ]


def test_parse_history_reply_bounds_only() -> None:
    """A reply with bounds and no entries (no since) has an empty entry list."""
    history = parse_history_reply([5, "1-0", "0-0", "3-0", 0])
    assert history.entries == [] and history.last == (3, 0) and not history.truncated


def test_parse_history_reply_junk_entry_raises() -> None:
    """A junk entry raises an InvalidInput rather than yielding a bogus event."""
    with pytest.raises(InvalidInput):
        parse_history_reply([5, b"1-0", b"0-0", b"1-0", 0, b"1-0", b"0-0", b"\xc1"])


# -- History and the recovery proof --------------------------------------------------------


def stream(
    first: StreamId,
    first_prev: StreamId,
    last: StreamId,
    *,
    now_ms: int | None = None,
    truncated: bool = False,
) -> History:
    """A history read of an existing stream (entries do not matter to the proof)."""
    return History([], first, first_prev, last, now_ms or last[0] + 1, truncated)


def missing(now_ms: int) -> History:
    """A history read of a stream that does not exist."""
    return History([], None, None, None, now_ms)


def test_history_head_missing_stream_is_just_before_now() -> None:
    """With no stream, head() is (now_ms - 1, 0): before any id added after the read."""
    assert missing(1732612345678).head() == (1732612345677, 0)


def test_history_head_never_negative() -> None:
    """head() of a missing stream at now_ms 0 is 0-0, not a negative id."""
    assert missing(0).head() == ID_ZERO


def test_history_head_existing_stream_is_last() -> None:
    """With a stream, head() is its newest entry."""
    assert stream((1, 0), ID_ZERO, (9, 3)).head() == (9, 3)


SINCE: StreamId = (1_000_000, 0)


def test_prove_recovery_intact_chain() -> None:
    """Oldest retained entry names `since` as its predecessor: nothing missing."""
    history = stream((1_000_050, 0), SINCE, (1_000_090, 0))
    assert prove_recovery(SINCE, history, TTL_MS) is True


def test_prove_recovery_trimmed() -> None:
    """Entries after `since` were trimmed (first_prev != since, since < first): not proven."""
    history = stream((1_000_080, 0), (1_000_070, 0), (1_000_090, 0))
    assert prove_recovery(SINCE, history, TTL_MS) is False


def chain(*keys: StreamId, since: StreamId, first_prev: StreamId = (999_000, 0)) -> History:
    """A read of a stream holding ``keys`` (each naming the one before), after ``since``."""
    prevs = [first_prev, *keys[:-1]]
    entries = [
        Event(format_id(k), k, p, "cml", "e", None, 0.0)
        for k, p in zip(keys, prevs, strict=True)
        if k > since
    ]
    return History(entries, keys[0], first_prev, keys[-1], keys[-1][0] + 1)


RETAINED: tuple[StreamId, ...] = ((1_000_000, 0), (1_000_050, 0), (1_000_090, 0))


@pytest.mark.parametrize("since", RETAINED)
def test_prove_recovery_since_within_retained_range(since: StreamId) -> None:
    """since is a retained entry: everything after it is still retained."""
    assert prove_recovery(since, chain(*RETAINED, since=since), TTL_MS) is True


@pytest.mark.parametrize("since", [(1_000_000, 5), (1_000_060, 0)])
def test_prove_recovery_since_missing_from_the_chain_is_not_proven(since: StreamId) -> None:
    """first <= since < last, but no entry names since (a failover to a replica that
    lacked it rewound the stream): not proven."""
    assert prove_recovery(since, chain(*RETAINED, since=since), TTL_MS) is False


def test_prove_recovery_rewound_stream_with_earlier_new_ids_is_not_proven() -> None:
    """The promoted replica's clock is behind: an entry published after the failover sorts
    before the lost id the client holds. The replay (after since) would miss it."""
    lost = (1_000_080, 0)
    history = chain((1_000_000, 0), (1_000_050, 0), (1_000_070, 0), (1_000_095, 0), since=lost)
    assert prove_recovery(lost, history, TTL_MS) is False


def test_prove_recovery_since_after_last() -> None:
    """The client claims an id newer than the stream's newest: not proven."""
    history = stream((999_000, 0), ID_ZERO, (999_999, 9))
    assert prove_recovery(SINCE, history, TTL_MS) is False


def test_prove_recovery_missing_stream_within_ttl() -> None:
    """No stream, and less than ttl since `since`: nothing after it can have expired yet."""
    assert prove_recovery(SINCE, missing(SINCE[0] + TTL_MS - 1), TTL_MS) is True
    assert prove_recovery(SINCE, missing(SINCE[0]), TTL_MS) is True


def test_prove_recovery_missing_stream_after_ttl() -> None:
    """No stream and ttl has passed: an incarnation may have lived and expired."""
    assert prove_recovery(SINCE, missing(SINCE[0] + TTL_MS), TTL_MS) is False


def test_prove_recovery_missing_stream_since_in_future() -> None:
    """No stream and `since` is later than the broker's clock: not proven."""
    assert prove_recovery(SINCE, missing(SINCE[0] - 1), TTL_MS) is False


def test_prove_recovery_fresh_incarnation_within_ttl() -> None:
    """Stream restarted (first_prev 0-0) less than ttl after `since`: no older one expired."""
    history = stream((SINCE[0] + TTL_MS - 1, 0), ID_ZERO, (SINCE[0] + TTL_MS + 5, 0))
    assert prove_recovery(SINCE, history, TTL_MS) is True


def test_prove_recovery_store_restarted_after_since_proves_nothing() -> None:
    """A store whose data began after `since` (Redis restart without AOF) cannot vouch."""
    gone = dataclasses.replace(missing(SINCE[0] + 10), epoch_ms=SINCE[0] + 5)
    assert prove_recovery(SINCE, gone, TTL_MS) is False
    fresh = stream((SINCE[0] + 20, 0), ID_ZERO, (SINCE[0] + 30, 0))
    assert prove_recovery(SINCE, dataclasses.replace(fresh, epoch_ms=SINCE[0] + 5), TTL_MS) is False
    assert prove_recovery(SINCE, dataclasses.replace(fresh, epoch_ms=SINCE[0]), TTL_MS) is True


def test_prove_recovery_fresh_incarnation_beyond_ttl() -> None:
    """Stream restarted ttl or more after `since`: an older incarnation may have expired."""
    history = stream((SINCE[0] + TTL_MS, 0), ID_ZERO, (SINCE[0] + TTL_MS + 5, 0))
    assert prove_recovery(SINCE, history, TTL_MS) is False


def test_prove_recovery_since_zero_not_proven_by_chain() -> None:
    """since 0-0 and first_prev 0-0 'match', but that is no chain: not proven."""
    history = stream((1732612345678, 0), ID_ZERO, (1732612345678, 5))
    assert prove_recovery(ID_ZERO, history, TTL_MS) is False


def test_prove_recovery_truncated() -> None:
    """The replay was cut at the limit: not proven, even when since >= first."""
    history = stream((1_000_000, 0), SINCE, (1_000_090, 0), truncated=True)
    assert prove_recovery((1_000_050, 0), history, TTL_MS) is False
    assert prove_recovery(SINCE, history, TTL_MS) is False


def test_decoded_event_data_is_json_equal() -> None:
    """Tuples published come back as lists, like JSON would deliver them."""
    payload = encode_payload("cml", "e", {"t": (1, "a")}, ts=1.0)
    event = decode_payload("1-0", "0-0", payload)
    assert event.data == orjson.loads(orjson.dumps({"t": (1, "a")})) == {"t": [1, "a"]}


def test_parse_attempt_instance_and_number() -> None:
    """``<instance>.<n>`` parses; anything else is InvalidInput."""
    assert parse_attempt("a_B-9.12") == ("a_B-9", 12)
    for bad in ("", "x", "x.", ".1", "x.1.2", "x y.1", "x.-1", "x." + "9" * 10, "a" * 33 + ".1"):
        with pytest.raises(InvalidInput):
            parse_attempt(bad)


def test_superseded_only_by_a_later_attempt_of_the_same_instance() -> None:
    """A holder supersedes a claim only if it is the same instance with a higher n."""
    assert superseded("i.2", "i.1")
    assert not superseded("i.1", "i.2")
    assert not superseded("j.9", "i.1")
    assert not superseded(None, "i.1") and not superseded("i.2", None)


@pytest.mark.parametrize(
    "text",
    ["1-", "-1", "a-b", "1-0-0", " 1-0", "1-0 ", "1-0\n", "+1-0", "1_000-0", "1-*", "-5",
     "1--1", "1-+2", "1- 2", f"{U64}-0", f"0-{U64}", "1" * 21 + "-0", "0-" + "1" * 21],
)  # fmt: skip
def test_parse_id_refuses_junk_bytes_as_it_refuses_text(text: str) -> None:
    """Ids off the live feed arrive as bytes: the same junk raises InvalidId there too."""
    with pytest.raises(InvalidId):
        parse_id(text.encode())


@pytest.mark.parametrize("text", ["0-0", "007-01", "18446744073709551615-18446744073709551615"])
def test_parse_id_reads_bytes_as_it_reads_text(text: str) -> None:
    assert parse_id(text.encode()) == parse_id(text)
