"""permessage-deflate (RFC 7692) for the server side: which offer to accept, and the codec.

Pure: header text in, an :class:`Agreement` out; bytes in, bytes out (zlib is computation,
not I/O). :mod:`relay.edge` negotiates at the handshake and sets RSV1 on what it compresses;
:class:`relay.frames.FrameParser` inflates what a client compressed.

What the node answers, so that every client reads it (WebSocketSharp rejects a reply with
a parameter it did not offer, and needs ``server_no_context_takeover`` back when it
offered it): the first acceptable offer, with its ``server_no_context_takeover``,
``client_no_context_takeover`` and ``server_max_window_bits`` echoed, nothing else.

Server to client, each message is compressed on its own by default (``Z_FULL_FLUSH``: no
message refers to an earlier one), which any client can decode whether or not it asked
for it. So one compressor serves every connection and an event fanned out to several
sessions is compressed once (:class:`Deflater` remembers its last message). With
``--compress-context-takeover``, a connection whose client allows it gets a compressor of
its own: small events shrink far more (they repeat the previous ones' keys), at the cost
of the compressor's memory on every such connection (docs/configuration.md).

Client to server, a client that did not offer ``client_no_context_takeover`` may refer
back to its earlier messages, so its connection keeps an inflater with a 32 KiB window,
made when its first compressed message arrives. Without context a fresh inflater per
message keeps nothing.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass
from typing import Final

from relay.frames import FrameError

__all__ = ["Agreement", "Deflater", "Inflater", "negotiate", "parse_extensions"]

NAME: Final = "permessage-deflate"
_TAIL: Final = b"\x00\x00\xff\xff"  # the empty stored block every message ends with (§7.2.1)
_LEVEL: Final = 1  # measured: level 6 saves under 2 % more on events, for 30 % more CPU

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf"\s*({_TOKEN})\s*(?:=\s*(?:({_TOKEN})|\"((?:[^\"\\]|\\.)*)\"))?\s*$")
_NAME = re.compile(rf"\s*({_TOKEN})\s*$")

Params = list[tuple[str, str | None]]


@dataclass(frozen=True, slots=True)
class Agreement:
    """The permessage-deflate settings of one connection."""

    response: str  # the Sec-WebSocket-Extensions value of the 101
    window_bits: int  # our compressor's window: at most what the client allowed
    server_context_takeover: bool  # a compressor of the connection's own
    client_context_takeover: bool  # the client may refer back: keep its inflater


def parse_extensions(header: str) -> list[tuple[str, Params]]:
    """The extensions of a Sec-WebSocket-Extensions value, in order (RFC 6455 §9.1).

    Raises ValueError on anything outside the grammar.
    """
    extensions: list[tuple[str, Params]] = []
    for item in _split(header, ","):
        if not item.strip():
            continue
        name, *raw_params = _split(item, ";")
        match = _NAME.match(name)
        if match is None:
            raise ValueError(f"bad extension name {name!r}")
        params: Params = []
        for raw in raw_params:
            param = _PARAM.match(raw)
            if param is None:
                raise ValueError(f"bad extension parameter {raw!r}")
            key, token, quoted = param.groups()
            value = token if quoted is None else re.sub(r"\\(.)", r"\1", quoted)
            params.append((key, value))
        extensions.append((match.group(1), params))
    return extensions


def _split(text: str, separator: str) -> list[str]:
    """``text`` split on ``separator`` outside quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quoted:
        raise ValueError("unterminated quoted string")
    parts.append("".join(current))
    return parts


@functools.lru_cache(maxsize=256)
def negotiate(header: str | None, *, context_takeover: bool, window_bits: int) -> Agreement | None:
    """The agreement for the first permessage-deflate offer we can honour, or None.

    ``context_takeover`` and ``window_bits`` are the node's settings for a compressor per
    connection. A malformed header or no acceptable offer means no compression, not a
    refused handshake: the connection works without it. Clients send few distinct offers,
    so agreements are cached and shared: none is kept per connection.
    """
    if not header:
        return None
    try:
        extensions = parse_extensions(header)
    except ValueError:
        return None
    for name, params in extensions:
        if name.lower() == NAME:
            agreement = _accept(params, context_takeover, window_bits)
            if agreement is not None:
                return agreement
    return None


def _bits(value: str) -> bool:
    """A window size's digits: ASCII only ("²" is a digit to str.isdigit, not to int)."""
    return value.isascii() and value.isdigit() and len(value) <= 2


def _accept(params: Params, context_takeover: bool, window_bits: int) -> Agreement | None:
    """The agreement for one offer, or None when it breaks §7.1 or asks for an 8-bit window."""
    seen: dict[str, str | None] = {}
    for key, value in params:
        key = key.lower()
        if key in seen:
            return None
        seen[key] = value
    response = [NAME]
    server_takeover = client_takeover = True
    bits = 15
    for key, value in seen.items():
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
            response.append(key)
            if key == "server_no_context_takeover":
                server_takeover = False
            else:
                client_takeover = False
        elif key == "server_max_window_bits":
            # zlib cannot make a 256-byte window; decline, as the RFC allows.
            if value is None or not _bits(value) or not 9 <= int(value) <= 15:
                return None
            bits = int(value)
            response.append(f"{key}={bits}")
        elif key == "client_max_window_bits":
            if value is not None and not (_bits(value) and 8 <= int(value) <= 15):
                return None
            # Not answered: our inflater takes any window up to 15 bits.
        else:
            return None
    server_takeover = server_takeover and context_takeover
    if server_takeover:
        bits = min(bits, window_bits)
    return Agreement("; ".join(response), bits, server_takeover, client_takeover)


class Deflater:
    """Compresses server messages for one compression context.

    Without context takeover one Deflater per window size is shared by every connection:
    each message is flushed with ``Z_FULL_FLUSH``, so it never refers to an earlier one,
    and the last message's output is remembered, so an event fanned out to several
    sessions (the same bytes object) is compressed once. With context takeover a
    connection has its own, its window and memory level sized by ``window_bits``.
    """

    __slots__ = ("_flush", "_last_in", "_last_out", "_shared", "_zobj")

    def __init__(self, window_bits: int, *, context_takeover: bool) -> None:
        mem_level = max(1, min(8, window_bits - 7)) if context_takeover else 8
        self._zobj = zlib.compressobj(_LEVEL, zlib.DEFLATED, -window_bits, mem_level)
        self._flush = zlib.Z_SYNC_FLUSH if context_takeover else zlib.Z_FULL_FLUSH
        self._shared = not context_takeover
        self._last_in: bytes | None = None
        self._last_out = b""

    def compress(self, data: bytes) -> bytes:
        """One message's compressed payload, without the trailing empty block."""
        if data is self._last_in:
            return self._last_out
        out = self._zobj.compress(data) + self._zobj.flush(self._flush)
        if out.endswith(_TAIL):
            out = out[:-4]
        if self._shared:
            self._last_in, self._last_out = data, out
        return out


class Inflater:
    """Decompresses client messages, bounded by the message size limit.

    With context takeover it belongs to one connection and keeps the client's window;
    without, it keeps nothing between messages and one serves every such connection.
    """

    __slots__ = ("_context_takeover", "_zobj", "inflated")

    def __init__(self, *, context_takeover: bool) -> None:
        self._context_takeover = context_takeover
        self._zobj: zlib._Decompress | None = None
        self.inflated = 0  # messages inflated

    def inflate(self, data: bytes, max_size: int) -> bytes:
        """The message ``data`` compresses; FrameError 1009 past ``max_size``, 1007 if corrupt."""
        zobj = self._zobj
        if zobj is None:
            zobj = zlib.decompressobj(-15)
            if self._context_takeover:
                self._zobj = zobj
        try:
            out = zobj.decompress(data + _TAIL, max_size + 1)
        except zlib.error:
            self._zobj = None
            raise FrameError("invalid compressed data", 1007) from None
        if len(out) > max_size or zobj.unconsumed_tail:
            raise FrameError("message too big", 1009)
        if zobj.eof:  # the client ended its stream (BFINAL): the next message starts anew
            self._zobj = None
        self.inflated += 1
        return out
