"""Redis memory per BizId of history: ``python -m tests.backend_adapter.bench_redis_memory``.

Starts a private redis-server, publishes through :class:`backend_adapter.Publisher` (the
real path: history Stream, newest-id key, one dedupe key per ``mid``) to 50 BizIds with
a typical ~200-byte event, more events than ``history_size`` so the Stream is trimmed as
in production, and reports per BizId ``MEMORY USAGE … SAMPLES 0`` of its keys (the
Stream, the rest) and the ``INFO memory`` growth, beside the raw bytes of the payloads
it keeps. Not a test: numbers depend on the Redis version and allocator.
"""

from __future__ import annotations

import sys

import redis

from backend_adapter import Publisher
from tests.support.redis_server import RedisServer

BIZ_IDS = 50
EVENT = {"id": 123456, "label": "order shipped", "by": "warehouse-7", "note": "x" * 120}


def measure(server: RedisServer, history: int, with_mid: bool) -> dict[str, float]:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    before = int(client.info("memory")["used_memory"])
    with Publisher(server.url, history_size=history) as publisher:
        items = [
            (f"biz-{b}", "label.created", EVENT, f"m-{b}-{n}" if with_mid else None)
            for n in range(history + history // 5)
            for b in range(BIZ_IDS)
        ]
        publisher.publish_many(items)
        keys = publisher.keys
    after = int(client.info("memory")["used_memory"])
    stream = other = 0
    for key in client.scan_iter(count=1000):
        size = int(client.memory_usage(key, samples=0) or 0)
        if key.endswith(b":log"):
            stream += size
        else:
            other += size
    payload = len(client.xrevrange(keys.log("biz-0"), count=1)[0][1][b"p"])
    client.close()
    return {
        "stream": stream / BIZ_IDS,
        "other": other / BIZ_IDS,
        "used_memory": (after - before) / BIZ_IDS,
        "raw": history * payload,
        "payload": payload,
    }


def main(argv: list[str]) -> None:
    histories = [int(a) for a in argv] or [100, 1000]
    server = RedisServer().start()
    try:
        for history in histories:
            for with_mid in (False, True):
                m = measure(server, history, with_mid)
                print(
                    f"history_size={history} mid={'yes' if with_mid else 'no'}"
                    f" payload={m['payload']} B: Stream {m['stream'] / 1024:.1f} KiB,"
                    f" other keys {m['other'] / 1024:.1f} KiB, INFO used_memory"
                    f" +{m['used_memory'] / 1024:.1f} KiB per BizId;"
                    f" payload bytes kept {m['raw'] / 1024:.1f} KiB"
                )
    finally:
        server.close()


if __name__ == "__main__":
    main(sys.argv[1:])
