"""relay.frames: client frames parsed by the RFC 6455 rules, split anywhere, bounded."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.deflate import Inflater
from relay.frames import (
    MAX_OVERHEAD,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    SHORT_FRAME,
    SHORT_HEADERS,
    FrameError,
    FrameParser,
    accept_key,
    close_frame,
    frame_header,
    parse_close,
)
from tests.support.frames import client_frame


def test_rfc_example_accept_key() -> None:
    """The handshake example of RFC 6455 §1.3."""
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_text_binary_and_control_frames() -> None:
    parser = FrameParser(1 << 16)
    data = (
        client_frame(OP_TEXT, "héllo".encode())
        + client_frame(OP_BINARY, b"\x00\x01")
        + client_frame(OP_PING, b"p")
        + client_frame(OP_PONG, b"")
        + client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye")
    )
    assert parser.feed(data) == [
        (OP_TEXT, "héllo"),
        (OP_BINARY, b"\x00\x01"),
        (OP_PING, b"p"),
        (OP_PONG, b""),
        (OP_CLOSE, b"\x03\xe8bye"),
    ]


def test_16_and_64_bit_lengths() -> None:
    parser = FrameParser(1 << 20)
    medium, large = os.urandom(300), os.urandom(70_000)
    assert parser.feed(client_frame(OP_BINARY, medium) + client_frame(OP_BINARY, large)) == [
        (OP_BINARY, medium),
        (OP_BINARY, large),
    ]


def test_fragmented_message_with_a_ping_in_between() -> None:
    parser = FrameParser(1 << 16)
    data = (
        client_frame(OP_TEXT, b"ab", fin=False)
        + client_frame(OP_PING, b"x")
        + client_frame(0, b"cd", fin=False)
        + client_frame(0, b"ef")
    )
    assert parser.feed(data) == [(OP_PING, b"x"), (OP_TEXT, "abcdef")]


@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
)
def test_any_split_of_the_stream_gives_the_same_messages(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(client_frame(OP_BINARY, p) for p in payloads)
    parser = FrameParser(1 << 16)
    got: list[tuple[int, bytes | str]] = []
    pos = 0
    for cut in cuts:
        got += parser.feed(stream[pos : pos + cut])
        pos += cut
    got += parser.feed(stream[pos:])
    assert got == [(OP_BINARY, p) for p in payloads]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(OP_TEXT, b"x", masked=False), 1002),
        (client_frame(OP_TEXT, b"x", rsv=4), 1002),  # RSV1: no deflate was negotiated
        (client_frame(0x3, b"x"), 1002),  # reserved opcode
        (client_frame(OP_PING, b"x" * 126), 1002),
        (client_frame(OP_PING, b"x", fin=False), 1002),
        (client_frame(0, b"x"), 1002),  # continuation of nothing
        (client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"), 1002),
        (client_frame(OP_TEXT, b"\xff\xfe"), 1007),
        (client_frame(OP_BINARY, b"x" * 1025), 1009),
        (client_frame(OP_TEXT, b"x" * 600, fin=False) + client_frame(0, b"x" * 600), 1009),
    ],
)
def test_violations_have_their_close_code(data: bytes, code: int) -> None:
    parser = FrameParser(1024)
    assert parser.feed(data) == []
    assert parser.failure is not None and parser.failure.close_code == code
    assert parser.feed(client_frame(OP_PING, b"after")) == []  # nothing after a violation
    assert parser.held == 0


def test_frames_before_a_violation_in_the_same_read_are_kept() -> None:
    """An ack then a bad frame in one read: the ack is returned, then the failure."""
    parser = FrameParser(1 << 16)
    data = (
        client_frame(OP_TEXT, b'{"type":"ack","id":"1-0"}')
        + client_frame(OP_PING, b"p")
        + client_frame(OP_TEXT, b"x", masked=False)
        + client_frame(OP_TEXT, b"never")
    )
    assert parser.feed(data) == [(OP_TEXT, '{"type":"ack","id":"1-0"}'), (OP_PING, b"p")]
    assert parser.failure is not None and parser.failure.close_code == 1002


def test_oversize_refused_from_the_header_alone() -> None:
    """A 10 MiB frame is refused before its payload arrives: nothing is buffered."""
    head = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 10 << 20) + b"mask"
    parser = FrameParser(65536)
    assert parser.feed(head) == []
    assert parser.failure is not None and parser.failure.close_code == 1009
    assert parser.held == 0


def test_fragments_per_message_are_capped_empty_ones_included() -> None:
    """Empty continuations cost a frame each: past max_fragments the message is 1009,
    and while it is unfinished the parser holds its payload bytes only."""
    parser = FrameParser(1 << 16, max_fragments=4)
    stream = client_frame(OP_TEXT, b"a", fin=False) + client_frame(0, b"", fin=False) * 2
    assert parser.feed(stream) == []
    assert (parser.frames, parser.held, parser.failure) == (3, 1, None)
    assert parser.feed(client_frame(0, b"b")) == [(OP_TEXT, "ab")]  # the 4th frame ends it
    parser.feed(client_frame(OP_TEXT, b"", fin=False) + client_frame(0, b"", fin=False) * 4)
    assert parser.failure is not None and parser.failure.close_code == 1009
    assert parser.frames == 8


def test_one_byte_fragments_hold_their_bytes_not_a_list() -> None:
    """A message in 1-byte fragments holds about as many bytes as it carries."""
    parser = FrameParser(1 << 16, max_fragments=10_000)
    parser.feed(client_frame(OP_BINARY, b"x", fin=False))
    for _ in range(3000):
        parser.feed(client_frame(0, b"x", fin=False))
    assert parser.held == 3001 and parser.failure is None


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, *range(1007, 1015), 3000, 4001, 4999])
def test_every_close_code_a_client_may_send_is_accepted(code: int) -> None:
    """1012 (drain), 1013 (limit) and 1014 echoed back by a client are valid (RFC 6455
    §7.4 and the IANA registry)."""
    assert parse_close(struct.pack("!H", code) + b"bye") == (code, "bye")


def test_close_payloads() -> None:
    assert parse_close(b"") == (1005, "")
    assert parse_close(struct.pack("!H", 4000) + "déjà".encode()) == (4000, "déjà")
    for bad, code in [
        (b"\x03", 1002),
        (struct.pack("!H", 1005), 1002),
        (struct.pack("!H", 1015), 1002),
        (struct.pack("!H", 1004), 1002),
        (struct.pack("!H", 2999), 1002),
        (struct.pack("!H", 5000), 1002),
        (struct.pack("!H", 999), 1002),
        (struct.pack("!H", 1000) + b"\xff", 1007),
    ]:
        with pytest.raises(FrameError) as raised:
            parse_close(bad)
        assert raised.value.close_code == code


def test_server_frames() -> None:
    assert frame_header(OP_TEXT, 5) == b"\x81\x05"
    assert frame_header(OP_BINARY, 300) == b"\x82\x7e\x01\x2c"
    assert frame_header(OP_BINARY, 70_000) == b"\x82\x7f" + struct.pack("!Q", 70_000)
    frame = close_frame(4000, "é" * 100)  # cut to 120 bytes on a character
    assert frame[:2] == b"\x88\x7a" and frame[2:4] == struct.pack("!H", 4000)
    assert frame[4:].decode() == "é" * 60


MAX_SIZE = 1024


@st.composite
def client_streams(draw: st.DrawFn) -> list[bytes]:
    """Random client frames (data, fragments, control, now and then a broken one), as
    one byte stream cut into reads anywhere."""
    frames = []
    for _ in range(draw(st.integers(1, 40))):
        opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY, 0, 0, 0, OP_PING, OP_PONG, OP_CLOSE]))
        size = draw(st.sampled_from([0, 1, 7, 125, 126, 600, MAX_SIZE, MAX_SIZE + 1]))
        fin = draw(st.booleans())
        if opcode in (OP_PING, OP_PONG, OP_CLOSE) and draw(st.integers(0, 9)):
            size, fin = min(size, 125), True  # mostly valid control frames
        frames.append(
            client_frame(opcode, b"a" * size, fin=fin, masked=draw(st.integers(0, 30)) > 0)
        )
    stream = b"".join(frames)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


@given(client_streams(), st.integers(1, 8))
def test_parser_holds_at_most_max_size_plus_overhead(reads: list[bytes], fragments: int) -> None:
    """Whatever frames arrive, cut anywhere: the parser never holds more than
    max_size + MAX_OVERHEAD bytes, and every frame it parsed is counted."""
    parser = FrameParser(MAX_SIZE, max_fragments=fragments)
    for data in reads:
        parser.feed(data)
        assert parser.held <= MAX_SIZE + MAX_OVERHEAD
        if parser.failure is not None:
            assert parser.held == 0
    assert parser.frames <= sum(len(r) for r in reads) // 6  # a client frame is >= 6 bytes


def test_parser_failure_keeps_no_traceback() -> None:
    """The failure kept by a parser has no traceback: its frames would hold the read's
    bytes and the parser in a cycle, freed only by a full collection (a reconnecting
    flood of bad messages grew a node by 60 MB that way)."""
    parser = FrameParser(1024, max_fragments=2)
    parser.feed(client_frame(OP_TEXT, b"", fin=False) + client_frame(0, b"", fin=False) * 3)
    assert parser.failure is not None and parser.failure.__traceback__ is None


def _deflated(message: bytes) -> bytes:
    zobj = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (zobj.compress(message) + zobj.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_compressed_messages_are_inflated_before_text_is_decoded() -> None:
    """RSV1 on a message's first frame (permessage-deflate): one frame or fragments."""
    inflater = Inflater(context_takeover=False)
    parser = FrameParser(1 << 16, inflater=inflater)
    data = _deflated("héllo wörld".encode())
    half = len(data) // 2
    assert parser.feed(
        client_frame(OP_TEXT, data, rsv=4)
        + client_frame(OP_BINARY, data[:half], fin=False, rsv=4)
        + client_frame(OP_PING, b"")
        + client_frame(0, data[half:])
        + client_frame(OP_TEXT, b"plain")
    ) == [
        (OP_TEXT, "héllo wörld"),
        (OP_PING, b""),
        (OP_BINARY, "héllo wörld".encode()),
        (OP_TEXT, "plain"),
    ]
    assert inflater.inflated == 2 and parser.failure is None


@pytest.mark.parametrize(
    ("negotiated", "frames", "code"),
    [
        (False, client_frame(OP_TEXT, _deflated(b"x"), rsv=4), 1002),
        (True, client_frame(OP_PING, b"", rsv=4), 1002),
        (True, client_frame(OP_TEXT, b"a", fin=False) + client_frame(0, b"b", rsv=4), 1002),
        (True, client_frame(OP_TEXT, b"x", rsv=2), 1002),
        (True, client_frame(OP_TEXT, b"\xff\xff\xff", rsv=4), 1007),
        (True, client_frame(OP_BINARY, _deflated(bytes(100_000)), rsv=4), 1009),
    ],
    ids=["unnegotiated", "control", "continuation", "rsv2", "corrupt", "inflates-too-big"],
)
def test_compression_violations_fail_with_their_close_code(
    negotiated: bool, frames: bytes, code: int
) -> None:
    """RSV1 only where permessage-deflate allows it; bad or oversized deflate data fails."""
    parser = FrameParser(65536, inflater=Inflater(context_takeover=True) if negotiated else None)
    assert parser.feed(frames + client_frame(OP_TEXT, b"after")) == []
    assert parser.failure is not None and parser.failure.close_code == code


def test_short_headers_are_frame_header_for_every_short_size() -> None:
    """The table of short frames' headers says what frame_header() says, size by size."""
    for op in (OP_TEXT, OP_BINARY):
        assert [SHORT_HEADERS[op][size] for size in range(SHORT_FRAME)] == [
            frame_header(op, size) for size in range(SHORT_FRAME)
        ]
    assert frame_header(OP_TEXT, 125) == bytes((0x81, 125))
    assert frame_header(OP_TEXT, 126) == b"\x81\x7e\x00\x7e"
