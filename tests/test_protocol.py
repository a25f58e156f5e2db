"""Unit tests for relay.protocol: format selection, close codes, frames both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from relay.errors import ProtocolViolation
from relay.protocol import (
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    ClientFrame,
    CloseCode,
    Format,
    encode_error,
    encode_message,
    encode_pong,
    encode_welcome,
    parse_client_frame,
    select_format,
)
from relay.wire import Event


def decode(frame: bytes, fmt: Format) -> Any:
    """What a client of this format reads from a server frame."""
    if fmt is Format.JSON:
        return orjson.loads(frame)
    return msgpack.unpackb(frame, raw=False)


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


# -- select_format -------------------------------------------------------------------------


def test_select_format_offered_msgpack() -> None:
    """Offering relay.v1.msgpack selects MessagePack and answers with that subprotocol."""
    assert select_format([SUBPROTOCOL_MSGPACK], None) == (Format.MSGPACK, SUBPROTOCOL_MSGPACK)


def test_select_format_offered_json() -> None:
    """Offering relay.v1.json selects JSON and answers with that subprotocol."""
    assert select_format([SUBPROTOCOL_JSON], None) == (Format.JSON, SUBPROTOCOL_JSON)


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        ([SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK], (Format.JSON, SUBPROTOCOL_JSON)),
        ([SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON], (Format.MSGPACK, SUBPROTOCOL_MSGPACK)),
        (["chat", SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON], (Format.MSGPACK, SUBPROTOCOL_MSGPACK)),
    ],
)
def test_select_format_offered_both_follows_client_order(
    offered: list[str], expected: tuple[Format, str]
) -> None:
    """With several offers the first one Relay supports, in the client's order, wins."""
    assert select_format(offered, None) == expected


def test_select_format_offer_beats_query() -> None:
    """A subprotocol offer decides the format even when the query says otherwise."""
    assert select_format([SUBPROTOCOL_JSON], "msgpack") == (Format.JSON, SUBPROTOCOL_JSON)


@pytest.mark.parametrize("offered", [["chat"], ["relay.v2.json"], ["RELAY.V1.JSON", "mqtt"]])
def test_select_format_only_unknown_offers_rejected(offered: list[str]) -> None:
    """Offers with nothing Relay speaks raise ProtocolViolation naming what to offer."""
    with pytest.raises(ProtocolViolation, match=SUBPROTOCOL_JSON):
        select_format(offered, None)


@pytest.mark.parametrize("query", [None, "", "json"])
def test_select_format_default_json(query: str | None) -> None:
    """No offer and no (or json) format query: JSON and no subprotocol."""
    assert select_format([], query) == (Format.JSON, None)


def test_select_format_query_msgpack() -> None:
    """No offer and format=msgpack: MessagePack and no subprotocol."""
    assert select_format([], "msgpack") == (Format.MSGPACK, None)


@pytest.mark.parametrize("query", ["xml", "MSGPACK", "msgpack ", "cbor"])
def test_select_format_bad_query_rejected(query: str) -> None:
    """An unknown format query raises ProtocolViolation."""
    with pytest.raises(ProtocolViolation, match="json or msgpack"):
        select_format([], query)


def test_format_binary_only_for_msgpack() -> None:
    """MessagePack goes in binary frames, JSON in text frames."""
    assert Format.MSGPACK.binary and not Format.JSON.binary


# -- close codes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "terminal", "at_once"),
    [
        (CloseCode.POLICY_VIOLATION, False, False),
        (CloseCode.TOO_LARGE, False, False),
        (CloseCode.INTERNAL_ERROR, False, False),
        (CloseCode.SERVICE_RESTART, False, True),
        (CloseCode.TRY_AGAIN_LATER, False, False),
        (CloseCode.REPLACED, True, False),
        (CloseCode.UNAUTHORIZED, True, False),
        (CloseCode.FORBIDDEN, True, False),
        (CloseCode.TOKEN_EXPIRED, False, True),
        (CloseCode.TOO_SLOW, False, True),
        (CloseCode.FEED_GAP, False, True),
        (4499, True, False),
        (4999, False, True),
        (5000, False, False),
        (3999, False, False),
    ],
)
def test_closecode_reconnect_rules_follow_table(code: int, terminal: bool, at_once: bool) -> None:
    """is_terminal and reconnect_at_once match DESIGN.md's close-code table and ranges."""
    assert CloseCode.is_terminal(code) is terminal
    assert CloseCode.reconnect_at_once(code) is at_once


def test_closecode_values_match_design() -> None:
    """The numeric codes are the documented ones."""
    assert {c.name: int(c) for c in CloseCode if c >= 1008} == {
        "POLICY_VIOLATION": 1008,
        "TOO_LARGE": 1009,
        "INTERNAL_ERROR": 1011,
        "SERVICE_RESTART": 1012,
        "TRY_AGAIN_LATER": 1013,
        "REPLACED": 4000,
        "UNAUTHORIZED": 4001,
        "FORBIDDEN": 4003,
        "TOKEN_EXPIRED": 4500,
        "TOO_SLOW": 4508,
        "FEED_GAP": 4509,
    }


def test_closecode_every_code_is_in_the_protocol_docs() -> None:
    """docs/protocol.md's close-code table lists every code the server sends."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    table = text.split("## Close codes", 1)[1].split("\n## ", 1)[0]
    rows = {int(line.split("|")[1]) for line in table.splitlines() if line[:3] in ("| 1", "| 4")}
    assert {int(c) for c in CloseCode if c != CloseCode.NORMAL} <= rows


# -- server frames -------------------------------------------------------------------------


def welcome(fmt: Format, recovered: bool | None) -> Any:
    return decode(
        encode_welcome(
            fmt,
            client_id="cml",
            node="n1",
            session="s-1",
            heartbeat=25,
            last_id=(1732612345678, 0),
            recovered=recovered,
            replayed=3,
        ),
        fmt,
    )


@pytest.mark.parametrize("fmt", list(Format))
def test_encode_welcome_fields(fmt: Format) -> None:
    """welcome carries the documented keys, last_id as '<ms>-<seq>'."""
    assert welcome(fmt, True) == {
        "type": "welcome",
        "client_id": "cml",
        "node": "n1",
        "session": "s-1",
        "heartbeat": 25,
        "recovered": True,
        "replayed": 3,
        "last_id": "1732612345678-0",
    }


@pytest.mark.parametrize("fmt", list(Format))
def test_encode_welcome_recovered_absent_when_none(fmt: Format) -> None:
    """Without `since` (recovered None) the key is absent, not null; False stays False."""
    assert "recovered" not in welcome(fmt, None)
    assert welcome(fmt, False)["recovered"] is False


@pytest.mark.parametrize("fmt", list(Format))
def test_encode_message_decodes_to_same_keys(fmt: Format) -> None:
    """A message frame decodes, in either format, to the documented keys and values."""
    data = {"label": "x", "n": [1, 2.5, None], "ok": True}
    event = Event("1732612345678-0", (1732612345678, 0), (0, 0), "cml", "label.created", data, 1.5)
    assert decode(encode_message(event, fmt), fmt) == {
        "type": "message",
        "id": "1732612345678-0",
        "biz_id": "cml",
        "event": "label.created",
        "data": data,
        "ts": 1.5,
    }


def test_encode_message_json_and_msgpack_agree() -> None:
    """Both formats carry the same keys and values for one event."""
    event = Event("5-1", (5, 1), (5, 0), "cml", "e", {"k": [1, "v"]}, 2.0, mid="m")
    assert decode(encode_message(event, Format.JSON), Format.JSON) == decode(
        encode_message(event, Format.MSGPACK), Format.MSGPACK
    )


def test_encode_message_json_is_text() -> None:
    """A JSON frame is UTF-8 text a browser can parse."""
    event = Event("5-1", (5, 1), (5, 0), "cml", "e", {"name": "Zoë"}, 2.0)
    assert "Zoë" in encode_message(event, Format.JSON).decode("utf-8")


@pytest.mark.parametrize("fmt", list(Format))
def test_encode_pong_and_error(fmt: Format) -> None:
    """pong and error frames carry the documented keys."""
    assert decode(encode_pong(fmt), fmt) == {"type": "pong"}
    assert decode(encode_error(fmt, "bad_request", "nope"), fmt) == {
        "type": "error",
        "code": "bad_request",
        "message": "nope",
    }


# -- client frames -------------------------------------------------------------------------


def client(value: Any, fmt: Format) -> bytes | str:
    """A client frame as the socket hands it over: str for JSON, bytes for MessagePack."""
    return orjson.dumps(value).decode() if fmt is Format.JSON else pack(value)


@pytest.mark.parametrize("fmt", list(Format))
def test_parse_client_frame_ping(fmt: Format) -> None:
    """{"type":"ping"} parses to a ping; extra keys are ignored."""
    assert parse_client_frame(client({"type": "ping"}, fmt), fmt) == ClientFrame("ping")
    assert parse_client_frame(client({"type": "ping", "x": 1}, fmt), fmt) == ClientFrame("ping")


@pytest.mark.parametrize("fmt", list(Format))
def test_parse_client_frame_ack_with_id(fmt: Format) -> None:
    """{"type":"ack","id":"<ms>-<seq>"} parses to an ack with the id as a pair."""
    frame = parse_client_frame(client({"type": "ack", "id": "1732612345678-2"}, fmt), fmt)
    assert frame == ClientFrame("ack", (1732612345678, 2))


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"type": "ack"}, "ack needs an 'id'"),
        ({"type": "ack", "id": 5}, "ack needs an 'id'"),
        ({"type": "ack", "id": None}, "ack needs an 'id'"),
        ({"type": "ack", "id": "x-y"}, "stream id"),
        ({"type": "ack", "id": f"{2**64}-0"}, "out of range"),
    ],
)
def test_parse_client_frame_ack_bad_id(fmt: Format, body: Any, message: str) -> None:
    """An ack without a valid id raises ProtocolViolation saying what is wrong."""
    with pytest.raises(ProtocolViolation, match=message):
        parse_client_frame(client(body, fmt), fmt)


@pytest.mark.parametrize("fmt", list(Format))
def test_parse_client_frame_ack_unicode_digit_id(fmt: Format) -> None:
    """An ack id of non-ASCII 'digits' raises ProtocolViolation, not ValueError."""
    with pytest.raises(ProtocolViolation):
        parse_client_frame(client({"type": "ack", "id": "²"}, fmt), fmt)


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("body", [{"type": "subscribe"}, {"type": None}, {}, {"kind": "ping"}])
def test_parse_client_frame_unknown_type(fmt: Format, body: Any) -> None:
    """Objects whose type is not ping or ack raise ProtocolViolation naming the choices."""
    with pytest.raises(ProtocolViolation, match="expected 'ping' or 'ack'"):
        parse_client_frame(client(body, fmt), fmt)


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("body", [["ping"], "ping", 1, None, True])
def test_parse_client_frame_non_object(fmt: Format, body: Any) -> None:
    """A frame that is not an object raises ProtocolViolation."""
    with pytest.raises(ProtocolViolation, match="must be an object"):
        parse_client_frame(client(body, fmt), fmt)


def test_parse_client_frame_text_on_msgpack_connection() -> None:
    """A text frame on a MessagePack connection raises ProtocolViolation saying so."""
    with pytest.raises(ProtocolViolation, match="MessagePack binary"):
        parse_client_frame('{"type":"ping"}', Format.MSGPACK)


def test_parse_client_frame_binary_on_json_connection() -> None:
    """A binary frame on a JSON connection raises ProtocolViolation saying so."""
    with pytest.raises(ProtocolViolation, match="JSON text"):
        parse_client_frame(b'{"type":"ping"}', Format.JSON)


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        ('{"type":"ping","pad":"' + "x" * 4096 + '"}', Format.JSON),
        (pack({"type": "ping", "pad": "x" * 4096}), Format.MSGPACK),
    ],
)
def test_parse_client_frame_oversize(data: bytes | str, fmt: Format) -> None:
    """A frame over 4096 bytes raises ProtocolViolation before it is decoded."""
    with pytest.raises(ProtocolViolation, match="4096"):
        parse_client_frame(data, fmt)


def test_parse_client_frame_at_limit_accepted() -> None:
    """A frame of exactly 4096 bytes is still parsed."""
    head = '{"type":"ping","pad":"'
    data = head + "x" * (4096 - len(head) - 2) + '"}'
    assert len(data) == 4096
    assert parse_client_frame(data, Format.JSON) == ClientFrame("ping")


def test_parse_client_frame_oversize_counts_utf8_bytes() -> None:
    """The 4096-byte limit counts UTF-8 bytes of a text frame, not characters."""
    data = '{"type":"ping","pad":"' + "é" * 2049 + '"}'
    assert len(data.encode()) > 4096 >= len(data)
    with pytest.raises(ProtocolViolation, match="4096"):
        parse_client_frame(data, Format.JSON)


@pytest.mark.parametrize(
    "data",
    [b"\xa2\xff\xfe", b"\x81\xa4type\xa2\xc3\x28", b"\xff\xfe\xfd", b"\xc1", b"", b"\x92\x01"],
    ids=["bad-utf8-str", "bad-utf8-value", "trailing-bytes", "reserved", "empty", "truncated"],
)
def test_parse_client_frame_invalid_msgpack(data: bytes) -> None:
    """Invalid UTF-8 inside MessagePack, junk or truncated bytes raise ProtocolViolation."""
    with pytest.raises(ProtocolViolation, match="not valid msgpack"):
        parse_client_frame(data, Format.MSGPACK)


@pytest.mark.parametrize("data", ["", "{", "ping", '{"type":"ping"} x', "\ud800", "NaN"])
def test_parse_client_frame_invalid_json(data: str) -> None:
    """Text that is not JSON (including lone surrogates) raises ProtocolViolation."""
    with pytest.raises(ProtocolViolation, match="not valid json"):
        parse_client_frame(data, Format.JSON)
