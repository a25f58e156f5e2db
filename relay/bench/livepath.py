"""The node's live path in pure Python: pub/sub reply to ``transport.write``, socket stubbed.

``python -m relay.bench.livepath [--sessions 1000] [--events 100000] [--passes 7]``

What a delivered message costs the node in Python, without the kernel: the ``send()``
per frame that dominates a real run (and is the same for the floor) is left out, so a
change to the node's own code shows up here several times larger than in ``make bench
BENCH_ARGS="--scenarios floor"``, and without its noise.

It builds a real node on the memory engine, connects ``--sessions`` clients through the
edge's real handshake over transports that only record what is written, and hands the
Redis engine's pub/sub reader (``Subscriber``) a stream of RESP ``message`` replies as
Redis would send them: ``--per-read`` replies per socket read (flat out a read holds
about 15), to random BizIds, each event naming the previous one of its BizId. The
reader's protocol takes each read as in production (parsed by hiredis, each reply
dispatched):
channel lookup, ``decode_live``, the hub's order check, the frame encoded once, the
session's order check and flow control, metrics, the frame written. The floor server's
loop (``relay.bench.floor.Feed``) runs on the same bytes for comparison.

Each pass is timed by the process's CPU clock; the report is the minimum of the passes
(the least disturbed by other work on the machine) and the median, in µs per message.
Every pass checks that each event reached its client exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import structlog

from relay.bench.floor import Feed
from relay.config import Settings
from relay.edge import Edge, EdgeConnection
from relay.engines.memory import MemoryEngine
from relay.engines.redis._subscriber import Subscriber, Timings, _Session
from relay.metrics import Metrics
from relay.node import Node
from relay.wire import KeySpace, encode_live, encode_payload

__all__ = ["main"]


class SinkTransport:
    """A socket that takes every write at once (an empty send buffer), and counts them.

    Its methods are C callables (``list.append``, ``int``, ``bool``), so the stub adds
    next to nothing to what is measured.
    """

    def __init__(self, sink: list[bytes]) -> None:
        self.write: Callable[[bytes], None] = sink.append
        self.get_write_buffer_size: Callable[[], int] = int  # always 0: room for more
        self.is_closing: Callable[[], bool] = bool  # always False
        self.get_extra_info = {"peername": ("127.0.0.1", 1)}.get

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


def _resp_message(channel: bytes, data: bytes) -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(data),
        data,
    )


class Feeds:
    """The RESP bytes of each pass, one chunk per socket read, ids continuing across passes."""

    def __init__(self, biz_ids: list[str], per_read: int, seed: int) -> None:
        self.biz_ids = biz_ids
        self.channels = {biz: KeySpace().channel(biz).encode() for biz in biz_ids}
        self.per_read = per_read
        self.rng = random.Random(seed)
        self.last: dict[str, str] = {}
        self.ms = int(time.time() * 1000)

    def make(self, events: int) -> tuple[list[bytes], dict[str, int]]:
        """``events`` messages in reads of ``per_read``, and how many each BizId gets."""
        chunks, replies, per_biz = [], [], dict.fromkeys(self.biz_ids, 0)
        ts = time.time()
        for seq in range(events):
            biz = self.rng.choice(self.biz_ids)
            self.ms += 1
            sid, prev = f"{self.ms}-0", self.last.get(biz, "0-0")
            self.last[biz] = sid
            per_biz[biz] += 1
            payload = encode_payload(biz, "bench", {"seq": seq, "ts": ts * 1000, "biz": biz}, ts=ts)
            replies.append(_resp_message(self.channels[biz], encode_live(sid, prev, payload)))
            if len(replies) == self.per_read:
                chunks.append(b"".join(replies))
                replies = []
        if replies:
            chunks.append(b"".join(replies))
        return chunks, per_biz


async def _connect(edge: Edge, biz_ids: list[str]) -> dict[str, list[bytes]]:
    """One client per BizId through the edge's handshake; what each socket was written."""
    sinks: dict[str, list[bytes]] = {}
    for biz in biz_ids:
        sink: list[bytes] = []
        sinks[biz] = sink
        connection = EdgeConnection(edge)
        connection.connection_made(SinkTransport(sink))  # type: ignore[arg-type]
        key = base64.b64encode(os.urandom(16)).decode()
        connection.data_received(
            f"GET /ws/{biz} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
    node = edge.node
    for _ in range(1000):
        if len(node.sessions) == len(biz_ids) and all(
            not s.recovering for s in node.sessions.values()
        ):
            break
        await asyncio.sleep(0.01)
    else:
        raise SystemExit("livepath: the clients did not all go live")
    return sinks


def _reader(node: Node, feeds: Feeds) -> Callable[[bytes], None]:
    """The Redis engine's pub/sub reader, its channels known as if Redis had confirmed
    them: what it does with each socket read."""
    timings = Timings(1.0, 1.0, 3.0, 0.05, 1.0, 1.0)
    log = structlog.get_logger("relay.bench.livepath")
    reader = Subscriber(None, None, node, "bench:ctl", "bench", timings, log)  # type: ignore[arg-type]
    for biz, channel in feeds.channels.items():
        reader._channels[channel] = biz
    feed = reader._feed(_Session(None))  # type: ignore[arg-type]
    if feed is None:
        raise SystemExit("livepath: hiredis is not installed")
    return feed.data_received


def _timed(consume: Callable[[bytes], None], chunks: list[bytes]) -> float:
    gc.collect()
    started = time.process_time_ns()
    for chunk in chunks:
        consume(chunk)
    return (time.process_time_ns() - started) / 1000


async def run(args: Any) -> dict[str, list[float]]:
    settings = Settings(allow_anonymous=True, node_id="livepath", heartbeat=60.0)
    node = Node(settings, MemoryEngine(settings.engine_options), Metrics())
    await node.start()
    edge = Edge(node)
    biz_ids = [f"c{i}" for i in range(args.sessions)]
    try:
        sinks = await _connect(edge, biz_ids)
        feeds = Feeds(biz_ids, args.per_read, args.seed)
        floor_feeds = Feeds(biz_ids, args.per_read, args.seed)  # the floor checks no order
        relay_read = _reader(node, feeds)
        floor = Feed({feeds.channels[biz]: SinkTransport(sinks[biz]) for biz in biz_ids})  # type: ignore[misc]
        results: dict[str, list[float]] = {"relay": [], "floor": []}
        for _ in range(args.passes):
            for name, consume, source in (
                ("relay", relay_read, feeds),
                ("floor", floor.data_received, floor_feeds),
            ):
                chunks, per_biz = source.make(args.events)
                for sink in sinks.values():
                    sink.clear()
                results[name].append(_timed(consume, chunks) / args.events)
                wrong = [biz for biz in biz_ids if len(sinks[biz]) != per_biz[biz]]
                if wrong or any(s.closing for s in node.sessions.values()):
                    raise SystemExit(f"livepath: {name} delivered wrongly to {len(wrong)} clients")
        return results
    finally:
        await edge.close()
        await node.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m relay.bench.livepath", description=__doc__)
    p.add_argument("--sessions", type=int, default=1000, help="clients, one per BizId")
    p.add_argument("--events", type=int, default=100_000, help="messages per pass")
    p.add_argument("--passes", type=int, default=7)
    p.add_argument("--per-read", type=int, default=15, help="replies per socket read")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    import uvloop

    results = uvloop.run(run(args))
    load = os.getloadavg()[0]
    print(f"live path, {args.sessions} sessions, {args.events} events, load {load:.2f}")
    for name, figures in results.items():
        print(
            f"  {name:5}  µs/msg  min {min(figures):.3f}  median {statistics.median(figures):.3f}"
            f"  ({', '.join(f'{f:.2f}' for f in figures)})"
        )
    ratio = min(results["relay"]) / min(results["floor"])
    print(f"  relay ÷ floor (min): {ratio:.2f}")


if __name__ == "__main__":
    main()
