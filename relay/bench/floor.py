"""The floor: the least a Python asyncio process does for Relay's job, to measure against.

It reads the Redis pub/sub feed, looks up the socket by the message's channel (one per
BizId, as Relay subscribes them), and writes the event as a WebSocket text frame. The
event is decoded (MessagePack) and encoded (JSON) once, as any relay must to carry it.
Nothing else: no protocol beyond the welcome the load generator waits for, no ids
compared, no history, no gap checks, no queues, no acks, no auth, no metrics, no logs.

Relay's CPU per delivered message divided by the floor's, in the same run, is what the
``floor`` scenario of ``make bench`` reports. Not a server to use: a client that sends
anything is ignored, and one that stops reading is buffered without limit.

``python -m relay.bench.floor --port P --redis-url redis://...``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
import msgpack
import orjson

from relay.frames import OP_TEXT, accept_key, frame_header
from relay.wire import KeySpace

__all__ = ["main"]

_WELCOME = orjson.dumps({"type": "welcome", "last_id": "0-0", "recovered": True})
_WELCOME_FRAME = frame_header(OP_TEXT, len(_WELCOME)) + _WELCOME
_MAX_REQUEST = 16 * 1024


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class Feed(asyncio.Protocol):
    """The one pub/sub connection: SUBSCRIBE per client, every message to its socket."""

    def __init__(self, sockets: dict[bytes, asyncio.Transport]) -> None:
        self.sockets = sockets
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's quacks like one

    def subscribe(self, channel: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_resp(b"SUBSCRIBE", channel))

    def data_received(self, data: bytes) -> None:
        reader, sockets = self.reader, self.sockets
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if reply[0] != b"message":
                continue  # a subscribe confirmation
            sock = sockets.get(reply[1])
            if sock is None:
                continue
            sid, _prev, payload = reply[2].split(b" ", 2)
            body = msgpack.unpackb(payload)
            frame = orjson.dumps(
                {"type": "message", "id": sid.decode(), "biz_id": body["biz"], "data": body["data"]}
            )
            sock.write(frame_header(OP_TEXT, len(frame)) + frame)

    def connection_lost(self, exc: Exception | None) -> None:
        raise SystemExit("floor: the Redis connection was lost")


class Client(asyncio.Protocol):
    """One WebSocket: the upgrade, the welcome, then only writes; its input is ignored."""

    def __init__(self, feed: Feed, keys: KeySpace) -> None:
        self.feed, self.keys = feed, keys
        self.request = b""
        self.channel: bytes | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's quacks like one

    def data_received(self, data: bytes) -> None:
        if self.channel is not None:
            return  # pongs and whatever else the client says
        self.request += data
        if b"\r\n\r\n" not in self.request:
            if len(self.request) > _MAX_REQUEST:
                self._refuse()
            return
        head = self.request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        parts = head[0].split(" ")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])
        }
        path = urlsplit(parts[1]).path if len(parts) == 3 else ""
        key = headers.get("sec-websocket-key")
        if not path.startswith("/ws/") or key is None:
            self._refuse()
            return
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept_key(key).encode() + _WELCOME_FRAME
        )
        self.channel = self.keys.channel(unquote(path[4:])).encode()
        self.feed.sockets[self.channel] = self.transport
        self.feed.subscribe(self.channel)

    def _refuse(self) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.channel is not None and self.feed.sockets.get(self.channel) is self.transport:
            del self.feed.sockets[self.channel]


async def serve(host: str, port: int, redis_url: str) -> None:
    loop = asyncio.get_running_loop()
    url = urlsplit(redis_url)
    sockets: dict[bytes, asyncio.Transport] = {}
    _, feed = await loop.create_connection(
        lambda: Feed(sockets), url.hostname or "127.0.0.1", url.port or 6379
    )
    keys = KeySpace()
    server = await loop.create_server(lambda: Client(feed, keys), host, port, backlog=4096)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    async with server:
        await stop


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m relay.bench.floor", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    args: Any = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        run: Any = asyncio.run
    else:
        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port, args.redis_url))


if __name__ == "__main__":
    main()
