"""A WebSocket client on a bare socket, to see exactly what the node writes."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

from tests.support.node import NodeUnderTest
from tests.support.timing import MS


def upgrade_request(path: str, *, version: str = "13", extra: str = "") -> tuple[bytes, str]:
    """A client's upgrade request head for ``path``, and its Sec-WebSocket-Key."""
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n"
    )
    return head.encode(), key


class RawClient:
    """A WebSocket client on a bare socket, to see exactly what the node writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, node: NodeUnderTest) -> RawClient:
        return cls(*await asyncio.open_connection("127.0.0.1", node.settings.port))

    async def response_head(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5000 * MS)

    async def frame(self, timeout: float = 5000 * MS) -> tuple[int, bytes]:
        """The next frame's opcode and payload."""
        first, payload = await self.raw_frame(timeout)
        return first & 0x0F, payload

    async def raw_frame(self, timeout: float = 5000 * MS) -> tuple[int, bytes]:
        """The next frame's first byte (FIN, RSV bits, opcode) and payload."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
        assert not second & 0x80, "server frames are never masked"
        return first, await self.reader.readexactly(size)

    def close(self) -> None:
        self.writer.close()
