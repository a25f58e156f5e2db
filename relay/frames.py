"""WebSocket framing (RFC 6455 §5) for the server side: parse client frames, build ours.

Pure: bytes in, messages and bytes out. ``relay.edge`` moves them between the socket and
the session. Client frames are few and small (pings, acks), so clarity wins over speed
here; server frames are built once per event elsewhere and only get a header.

What a client can make the parser hold is bounded whatever it sends: at most one
incomplete frame and one unfinished message, together never more than
``max_size + MAX_OVERHEAD`` bytes (:attr:`FrameParser.held`), and a message may come in
at most ``max_fragments`` frames. Every frame is counted (:attr:`FrameParser.frames`), so
the caller can charge control frames and empty fragments against a budget too.

With permessage-deflate negotiated (RFC 7692, :mod:`relay.deflate`) the parser is given
an :class:`Inflating` object: RSV1 on a message's first frame marks it compressed, and the whole
message is inflated, within ``max_size``, before text is decoded. RSV1 anywhere else, and
RSV2/RSV3 always, are protocol errors.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Final, Protocol

from relay.errors import RelayError

__all__ = [
    "MAX_OVERHEAD",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "RSV1",
    "SHORT_FRAME",
    "SHORT_HEADERS",
    "FrameError",
    "FrameParser",
    "Inflating",
    "accept_key",
    "close_frame",
    "close_reason",
    "frame_header",
    "parse_close",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
RSV1: Final = 0x40  # of the first byte: "compressed" under permessage-deflate

_DATA_OPCODES = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY))
_CONTROL_OPCODES = frozenset((OP_CLOSE, OP_PING, OP_PONG))
_FIRST_OPCODES = frozenset((OP_TEXT, OP_BINARY))  # a message's first frame: RSV1 allowed
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD: Final = 14  # the longest frame header: 2 + 8 (64-bit length) + 4 (mask)
_MAX_CONTROL: Final = 125

MAX_OVERHEAD: Final = _MAX_HEAD + _MAX_CONTROL
"""Bytes a parser may hold beyond ``max_size``: a control frame's header and payload,
received in part while a message of ``max_size`` bytes is unfinished."""

# Close codes a peer may send (RFC 6455 §7.4, and the IANA registry for 1012-1014);
# 1004, 1005, 1006 and 1015 are never sent on the wire.
_VALID_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))

_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH").pack
_HEAD64 = struct.Struct("!BBQ").pack


class FrameError(RelayError):
    """The peer broke the framing rules; ``close_code`` is what to close with."""

    def __init__(self, message: str, close_code: int) -> None:
        super().__init__(message)
        self.close_code = close_code


class Inflating(Protocol):
    """What decompresses a client's compressed messages (relay.deflate.Inflater)."""

    def inflate(self, data: bytes, max_size: int) -> bytes:
        """The message ``data`` compresses; FrameError 1009 past ``max_size``, 1007 if corrupt."""
        ...


def accept_key(key: str) -> str:
    """The handshake's Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode()


def frame_header(opcode: int, size: int) -> bytes:
    """Header of one unmasked, final server frame carrying ``size`` bytes."""
    first = 0x80 | opcode
    if size < 126:
        return bytes((first, size))
    if size < 65536:
        return _HEAD16(first, 126, size)
    return _HEAD64(first, 127, size)


SHORT_FRAME: Final = 1024
"""Text and binary frames shorter than this take their header from :data:`SHORT_HEADERS`."""

SHORT_HEADERS: Final = tuple(
    tuple(frame_header(op, size) for size in range(SHORT_FRAME)) if op in _FIRST_OPCODES else ()
    for op in range(max(_FIRST_OPCODES) + 1)
)
"""``SHORT_HEADERS[opcode][size] == frame_header(opcode, size)`` for text and binary frames
below :data:`SHORT_FRAME` bytes: an index instead of a call where a header is built per
delivered message (~100 KB for the two tables)."""


def close_reason(reason: str) -> bytes:
    """A close reason within the 123 bytes a close frame allows, cut on a character."""
    return reason.encode()[:120].decode("utf-8", "ignore").encode()


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and the reason cut by :func:`close_reason`."""
    body = _LEN16.pack(code) + close_reason(reason)
    return frame_header(OP_CLOSE, len(body)) + body


def parse_close(payload: bytes) -> tuple[int, str]:
    """Code and reason of a peer's close frame (1005 when it carried none)."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError("close frame with a one-byte payload", 1002)
    (code,) = _LEN16.unpack_from(payload)
    if not (code in _VALID_CLOSE_CODES or 3000 <= code <= 4999):
        raise FrameError(f"invalid close code {code}", 1002)
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError("close reason is not UTF-8", 1007) from None
    return code, reason


def _unmask(payload: bytes, mask: bytes) -> bytes:
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little"
    )


class FrameParser:
    """Incremental parser of one client's frames: masked, maybe fragmented, maybe
    compressed, bounded.

    :meth:`feed` returns every complete message and control frame as ``(opcode,
    payload)``; text arrives decoded (``str``), everything else as ``bytes``. It never
    raises: the first violation is kept in :attr:`failure` (its ``close_code`` is what to
    close with), the frames before it in the same read are still returned, and nothing
    after it is parsed. A message over ``max_size`` is refused from its header, before
    its payload is buffered; one in more than ``max_fragments`` frames when the next
    fragment arrives. ``inflater`` decompresses compressed messages.
    """

    __slots__ = (
        "_buffer",
        "_compressed",
        "_fragment_count",
        "_fragments",
        "_message_opcode",
        "failure",
        "frames",
        "inflater",
        "max_fragments",
        "max_size",
    )

    def __init__(
        self,
        max_size: int,
        max_fragments: int = 128,
        inflater: Inflating | None = None,
    ) -> None:
        self.max_size = max_size
        self.inflater = inflater
        self.max_fragments = max_fragments
        self.frames = 0  # every frame parsed so far, control frames and empty ones included
        self.failure: FrameError | None = None
        self._buffer = b""
        self._fragments = bytearray()  # not a list: empty fragments must cost nothing
        self._fragment_count = 0
        self._message_opcode = 0  # opcode of the fragmented message under way, 0 if none
        self._compressed = False  # whether the message under way had RSV1

    @property
    def held(self) -> int:
        """Bytes held for an incomplete frame and an unfinished message."""
        return len(self._buffer) + len(self._fragments)

    def feed(self, data: bytes) -> list[tuple[int, bytes | str]]:
        out: list[tuple[int, bytes | str]] = []
        if self.failure is not None:
            return out
        try:
            self._parse(data, out)
        except FrameError as exc:
            # Without its traceback: the frames in it hold this read's bytes and the
            # parser itself, a cycle that would keep them until a full collection.
            self.failure = exc.with_traceback(None)
            self._buffer = b""
            self._fragments = bytearray()
        return out

    def _parse(self, data: bytes, out: list[tuple[int, bytes | str]]) -> None:
        buffer = self._buffer + data if self._buffer else data
        pos, end = 0, len(buffer)
        try:
            while end - pos >= 2:
                first, second = buffer[pos], buffer[pos + 1]
                fin, opcode = first & 0x80, first & 0x0F
                rsv = first & 0x70
                if rsv and (rsv != RSV1 or self.inflater is None or opcode not in _FIRST_OPCODES):
                    raise FrameError("reserved bits set (no extension allows them here)", 1002)
                if not second & 0x80:
                    raise FrameError("client frames must be masked", 1002)
                size = second & 0x7F
                head = 2
                if size == 126:
                    if end - pos < 4:
                        break
                    (size,) = _LEN16.unpack_from(buffer, pos + 2)
                    head = 4
                elif size == 127:
                    if end - pos < 10:
                        break
                    (size,) = _LEN64.unpack_from(buffer, pos + 2)
                    if size >> 63:
                        raise FrameError("frame length out of range", 1002)
                    head = 10
                self._check(opcode, fin, size)
                if end - pos < head + 4 + size:
                    break
                mask = buffer[pos + head : pos + head + 4]
                start = pos + head + 4
                payload = _unmask(buffer[start : start + size], mask)
                pos = start + size
                self.frames += 1
                message = self._assemble(opcode, bool(fin), bool(rsv), payload)
                if message is not None:
                    out.append(message)
        finally:
            self._buffer = buffer[pos:] if pos < end else b""

    def _check(self, opcode: int, fin: int, size: int) -> None:
        if opcode in _CONTROL_OPCODES:
            if not fin or size > _MAX_CONTROL:
                raise FrameError("control frames must be final and at most 125 bytes", 1002)
            return
        if opcode not in _DATA_OPCODES:
            raise FrameError(f"unknown opcode {opcode}", 1002)
        if opcode == OP_CONTINUATION and not self._message_opcode:
            raise FrameError("continuation frame without a message to continue", 1002)
        if opcode != OP_CONTINUATION and self._message_opcode:
            raise FrameError("new message before the fragmented one ended", 1002)
        if len(self._fragments) + size > self.max_size:
            raise FrameError("message too big", 1009)
        if opcode == OP_CONTINUATION and self._fragment_count >= self.max_fragments:
            raise FrameError("message in too many fragments", 1009)

    def _assemble(
        self, opcode: int, fin: bool, compressed: bool, payload: bytes
    ) -> tuple[int, bytes | str] | None:
        if opcode in _CONTROL_OPCODES:
            return opcode, payload
        if opcode != OP_CONTINUATION:
            self._compressed = compressed
        if not fin:
            if opcode != OP_CONTINUATION:
                self._message_opcode = opcode
            self._fragments += payload
            self._fragment_count += 1
            return None
        if opcode == OP_CONTINUATION:
            opcode = self._message_opcode
            self._fragments += payload
            payload = bytes(self._fragments)
            self._fragments = bytearray()
            self._fragment_count = 0
            self._message_opcode = 0
        if self._compressed and self.inflater is not None:
            payload = self.inflater.inflate(payload, self.max_size)
        if opcode == OP_TEXT:
            try:
                return opcode, payload.decode()
            except UnicodeDecodeError:
                raise FrameError("text message is not valid UTF-8", 1007) from None
        return opcode, payload
