"""Publisher CPU per event: ``python -m tests.backend_adapter.bench_publish [N]``.

Starts a private redis-server and measures this process's CPU time (time.process_time,
so Redis's own work is excluded) for N publishes in rounds of 100: concurrent
``publish`` calls through asyncio.gather, ``publish_many``, and the sync Publisher.
Not a test: numbers depend on the machine. The report quotes them.
"""

from __future__ import annotations

import asyncio
import sys
import time

from backend_adapter import AsyncPublisher, Publisher
from tests.support.redis_server import RedisServer

ROUND = 100


def data(i: int) -> dict[str, object]:
    return {"label": i, "name": "shipping label", "ok": True}


async def bench_async(url: str, n: int) -> dict[str, float]:
    out = {}
    async with AsyncPublisher(url) as pub:
        await pub.publish("warmup", "e", 0)
        started = time.process_time()
        for base in range(0, n, ROUND):
            await asyncio.gather(
                *(
                    pub.publish(f"b{i % 500}", "label.created", data(i))
                    for i in range(base, base + ROUND)
                )
            )
        out["async gather x100"] = time.process_time() - started
        started = time.process_time()
        for base in range(0, n, ROUND):
            await pub.publish_many(
                [(f"b{i % 500}", "label.created", data(i)) for i in range(base, base + ROUND)]
            )
        out["async publish_many x100"] = time.process_time() - started
        started = time.process_time()
        for i in range(n // 10):
            await pub.publish(f"b{i % 500}", "label.created", data(i))
        out["async sequential (n/10)"] = (time.process_time() - started) * 10
    return out


def bench_sync(url: str, n: int) -> dict[str, float]:
    out = {}
    with Publisher(url) as pub:
        pub.publish("warmup", "e", 0)
        started = time.process_time()
        for base in range(0, n, ROUND):
            pub.publish_many(
                [(f"b{i % 500}", "label.created", data(i)) for i in range(base, base + ROUND)]
            )
        out["sync publish_many x100"] = time.process_time() - started
        started = time.process_time()
        for i in range(n // 10):
            pub.publish(f"b{i % 500}", "label.created", data(i))
        out["sync sequential (n/10)"] = (time.process_time() - started) * 10
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    server = RedisServer().start()
    try:
        results = asyncio.run(bench_async(server.url, n)) | bench_sync(server.url, n)
    finally:
        server.close()
    for name, seconds in results.items():
        print(f"{name:28} {seconds / n * 1e6:7.1f} µs CPU/event")


if __name__ == "__main__":
    main()
