"""relay.deflate: the permessage-deflate offers we accept, what we answer, and the codec."""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.deflate import Agreement, Deflater, Inflater, negotiate, parse_extensions
from relay.frames import FrameError

TAIL = b"\x00\x00\xff\xff"


def agree(header: str | None, *, context_takeover: bool = False, bits: int = 12) -> Agreement:
    agreement = negotiate(header, context_takeover=context_takeover, window_bits=bits)
    assert agreement is not None
    return agreement


def client_compress(messages: list[bytes], *, takeover: bool) -> list[bytes]:
    """Messages compressed as a client does (RFC 7692 §7.2.1), with or without context."""
    zobj = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = []
    for message in messages:
        if not takeover:
            zobj = zlib.compressobj(6, zlib.DEFLATED, -15)
        data = zobj.compress(message) + zobj.flush(zlib.Z_SYNC_FLUSH)
        assert data.endswith(TAIL)
        out.append(data[:-4])
    return out


def test_websocketsharp_offer_is_answered_with_exactly_its_parameters() -> None:
    """WebSocketSharp rejects any other parameter and needs server_no_context_takeover."""
    offer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    agreement = agree(offer, context_takeover=True)
    assert agreement.response == offer
    assert not agreement.server_context_takeover and not agreement.client_context_takeover


def test_browser_offer_is_answered_plainly_and_client_context_is_kept() -> None:
    """Chromium and Firefox offer client_max_window_bits; the node asks nothing back."""
    agreement = agree("permessage-deflate; client_max_window_bits")
    assert agreement == Agreement("permessage-deflate", 15, False, True)


def test_server_window_is_echoed_and_respected() -> None:
    """aiohttp's compress=10 offer: the window is echoed and the compressor stays within it."""
    agreement = agree("permessage-deflate; client_max_window_bits; server_max_window_bits=10")
    assert agreement.response == "permessage-deflate; server_max_window_bits=10"
    assert agreement.window_bits == 10


def test_context_takeover_setting_gives_a_connection_its_own_window() -> None:
    """With the setting on and no server_no_context_takeover offered, the window is ours."""
    agreement = agree("permessage-deflate", context_takeover=True, bits=11)
    assert agreement.server_context_takeover and agreement.window_bits == 11
    assert (
        agree("permessage-deflate; server_max_window_bits=9", context_takeover=True).window_bits
        == 9
    )


@pytest.mark.parametrize(
    ("header", "response"),
    [
        ("permessage-deflate; server_max_window_bits=8, permessage-deflate", "permessage-deflate"),
        ("x-webkit-deflate-frame, permessage-deflate", "permessage-deflate"),
        ('permessage-deflate; client_max_window_bits="10"', "permessage-deflate"),
        (
            "permessage-deflate; foo, permessage-deflate; client_no_context_takeover",
            "permessage-deflate; client_no_context_takeover",
        ),
        (
            "PerMessage-Deflate ;  SERVER_NO_CONTEXT_TAKEOVER",
            "permessage-deflate; server_no_context_takeover",
        ),
    ],
    ids=["8-bit-window", "other-extension", "quoted", "unknown-param", "case-and-space"],
)
def test_first_acceptable_offer_wins(header: str, response: str) -> None:
    assert agree(header).response == response


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "x-webkit-deflate-frame",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        'permessage-deflate; client_max_window_bits="10',
        "permessage-deflate; =1",
        "permessage deflate",
        'permessage-deflate; server_max_window_bits="\u00b2"',  # a digit to str.isdigit only
        'permessage-deflate; client_max_window_bits="1\u00b2"',
    ],
)
def test_unacceptable_or_malformed_offers_mean_no_compression(header: str | None) -> None:
    assert negotiate(header, context_takeover=False, window_bits=12) is None


def test_extension_header_grammar() -> None:
    assert parse_extensions('a; b=1; c="x,\\"y"; d, e') == [
        ("a", [("b", "1"), ("c", 'x,"y'), ("d", None)]),
        ("e", []),
    ]


def test_shared_deflater_messages_decode_alone_and_in_a_kept_context() -> None:
    """Without context every message stands alone: a fresh inflater and a client that
    keeps its window (a browser) read the same bytes."""
    deflater = Deflater(15, context_takeover=False)
    messages = [b'{"type":"message","id":"%d-0","data":{"n":%d}}' % (i, i) for i in range(50)]
    kept = zlib.decompressobj(-15)
    for message in messages:
        out = deflater.compress(message)
        assert zlib.decompressobj(-15).decompress(out + TAIL) == message
        assert kept.decompress(out + TAIL) == message


def test_shared_deflater_compresses_one_event_once() -> None:
    """The same frame object fanned out to several sessions is compressed once."""
    deflater = Deflater(15, context_takeover=False)
    frame = b'{"type":"message","data":"' + b"x" * 500 + b'"}'
    first = deflater.compress(frame)
    assert deflater.compress(frame) is first
    assert deflater.compress(bytes(frame)) == first  # an equal copy: compressed again, alike


def test_context_takeover_deflater_shrinks_repeated_events() -> None:
    """A connection's own compressor refers back to earlier events: small ones shrink."""
    own, shared = Deflater(12, context_takeover=True), Deflater(15, context_takeover=False)
    client = zlib.decompressobj(-15)
    sizes = []
    for i in range(20):
        message = b'{"type":"message","id":"17648630%05d-0","event":"order.updated"}' % i
        out = own.compress(message)
        assert client.decompress(out + TAIL) == message
        sizes.append((len(out), len(shared.compress(message))))
    assert all(own_size < shared_size / 2 for own_size, shared_size in sizes[1:])


@pytest.mark.parametrize("takeover", [True, False])
def test_inflater_reads_clients_with_and_without_context(takeover: bool) -> None:
    messages = [b'{"type":"ack","id":"%d-0"}' % i for i in range(30)]
    inflater = Inflater(context_takeover=takeover)
    for sent, message in zip(client_compress(messages, takeover=takeover), messages, strict=True):
        assert inflater.inflate(sent, 1024) == message


def test_inflater_bounds_the_inflated_size() -> None:
    """A small compressed message that inflates past the limit is refused with 1009."""
    bomb = client_compress([bytes(1 << 20)], takeover=False)[0]
    assert len(bomb) < 2048
    with pytest.raises(FrameError) as caught:
        Inflater(context_takeover=True).inflate(bomb, 65536)
    assert caught.value.close_code == 1009
    assert Inflater(context_takeover=False).inflate(bomb, 1 << 20) == bytes(1 << 20)


def test_inflater_refuses_corrupt_data_with_1007() -> None:
    with pytest.raises(FrameError) as caught:
        Inflater(context_takeover=True).inflate(b"\xff\xff\xff\xff", 1024)
    assert caught.value.close_code == 1007


def test_inflater_accepts_a_final_block_and_starts_over() -> None:
    """A client that ends a message with BFINAL (some .NET deflaters do) is still read."""
    inflater = Inflater(context_takeover=True)
    for message in (b"first message", b"second message"):
        zobj = zlib.compressobj(6, zlib.DEFLATED, -15)
        assert inflater.inflate(zobj.compress(message) + zobj.flush(), 1024) == message


@given(st.lists(st.binary(max_size=2000), max_size=10), st.integers(9, 15))
def test_deflate_inflate_roundtrip(messages: list[bytes], bits: int) -> None:
    for takeover in (True, False):
        deflater = Deflater(bits, context_takeover=takeover)
        inflater = Inflater(context_takeover=takeover)
        for message in messages:
            assert inflater.inflate(deflater.compress(message), 4096) == message


def test_random_payload_roundtrip_at_the_limit() -> None:
    payload = os.urandom(4096)
    assert (
        Inflater(context_takeover=False).inflate(
            Deflater(15, context_takeover=False).compress(payload), 4096
        )
        == payload
    )
