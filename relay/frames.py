"""WebSocket framing (RFC 6455 §5) for the server side: parse client frames, build ours.

Pure: bytes in, messages and bytes out. ``relay.ws`` moves them between the socket and
the session. Client frames are few and small (pings, acks), so clarity wins over speed
here; server frames are built once per event elsewhere and only get a header.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Final

from relay.errors import RelayError

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameError",
    "FrameParser",
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

_DATA_OPCODES = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY))
_CONTROL_OPCODES = frozenset((OP_CLOSE, OP_PING, OP_PONG))
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH").pack
_HEAD64 = struct.Struct("!BBQ").pack


class FrameError(RelayError):
    """The peer broke the framing rules; ``close_code`` is what to close with."""

    def __init__(self, message: str, close_code: int) -> None:
        super().__init__(message)
        self.close_code = close_code


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
    if not (code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999):
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
    """Incremental parser of one client's frames: masked, maybe fragmented, bounded.

    :meth:`feed` returns every complete message and control frame as ``(opcode,
    payload)``; text arrives decoded (``str``), everything else as ``bytes``. A message
    over ``max_size`` is refused from its header, before its payload is buffered.
    """

    __slots__ = ("_buffer", "_fragments", "_fragments_size", "_message_opcode", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = b""
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        self._message_opcode = 0  # opcode of the fragmented message under way, 0 if none

    def feed(self, data: bytes) -> list[tuple[int, bytes | str]]:
        buffer = self._buffer + data if self._buffer else data
        out: list[tuple[int, bytes | str]] = []
        pos, end = 0, len(buffer)
        while end - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            fin, opcode = first & 0x80, first & 0x0F
            if first & 0x70:
                raise FrameError("reserved bits set (no extension was negotiated)", 1002)
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
            message = self._assemble(opcode, bool(fin), payload)
            if message is not None:
                out.append(message)
        self._buffer = buffer[pos:] if pos < end else b""
        return out

    def _check(self, opcode: int, fin: int, size: int) -> None:
        if opcode in _CONTROL_OPCODES:
            if not fin or size > 125:
                raise FrameError("control frames must be final and at most 125 bytes", 1002)
            return
        if opcode not in _DATA_OPCODES:
            raise FrameError(f"unknown opcode {opcode}", 1002)
        if opcode == OP_CONTINUATION and not self._message_opcode:
            raise FrameError("continuation frame without a message to continue", 1002)
        if opcode != OP_CONTINUATION and self._message_opcode:
            raise FrameError("new message before the fragmented one ended", 1002)
        if self._fragments_size + size > self.max_size:
            raise FrameError("message too big", 1009)

    def _assemble(self, opcode: int, fin: bool, payload: bytes) -> tuple[int, bytes | str] | None:
        if opcode in _CONTROL_OPCODES:
            return opcode, payload
        if not fin:
            if opcode != OP_CONTINUATION:
                self._message_opcode = opcode
            self._fragments.append(payload)
            self._fragments_size += len(payload)
            return None
        if opcode == OP_CONTINUATION:
            opcode = self._message_opcode
            self._fragments.append(payload)
            payload = b"".join(self._fragments)
            self._fragments = []
            self._fragments_size = 0
            self._message_opcode = 0
        if opcode == OP_TEXT:
            try:
                return opcode, payload.decode()
            except UnicodeDecodeError:
                raise FrameError("text message is not valid UTF-8", 1007) from None
        return opcode, payload
