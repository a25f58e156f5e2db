"""relay.frames: client frames parsed by the RFC 6455 rules, split anywhere, bounded."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
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
    with pytest.raises(FrameError) as raised:
        FrameParser(1024).feed(data)
    assert raised.value.close_code == code


def test_oversize_refused_from_the_header_alone() -> None:
    """A 10 MiB frame is refused before its payload arrives: nothing is buffered."""
    head = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 10 << 20) + b"mask"
    with pytest.raises(FrameError) as raised:
        FrameParser(65536).feed(head)
    assert raised.value.close_code == 1009


def test_close_payloads() -> None:
    assert parse_close(b"") == (1005, "")
    assert parse_close(struct.pack("!H", 4000) + "déjà".encode()) == (4000, "déjà")
    for bad, code in [
        (b"\x03", 1002),
        (struct.pack("!H", 1005), 1002),
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
