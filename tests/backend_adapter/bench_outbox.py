"""Outbox throughput beside direct publishing: ``python -m tests.backend_adapter.bench_outbox [N]``.

Starts a private redis-server, a SQLite file and a PostgreSQL database of its own, and
measures wall-clock events per second for N events (default 20,000) spread over 500
BizIds:

- direct ``Publisher.publish_many`` in batches of 500 (what the outbox cannot beat),
- writing the outbox: ``enqueue_many`` of 500 rows per transaction,
- draining it: ``OutboxDispatcher.run_once`` (batch 500) until the table is empty,
  with one dispatcher, and on PostgreSQL also with two in threads.

Rounds (second argument, default 3) interleave the methods; the median and the best
round are printed with the load average, since a busy machine halves every figure.

Not a test: the numbers depend on the machine. The report quotes them.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from backend_adapter import Publisher
from backend_adapter.outbox import OutboxDispatcher, create_outbox_table, enqueue_many
from tests.backend_adapter.sql_support import fresh_engine, postgres_database, sqlite_url
from tests.support.redis_server import RedisServer

BATCH = 500


def data(i: int) -> dict[str, object]:
    return {"label": i, "name": "shipping label", "ok": True}


def items(n: int) -> list[tuple[str, str, object]]:
    return [(f"b{i % 500}", "label.created", data(i)) for i in range(n)]


def rate(n: int, run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return n / (time.perf_counter() - started)


def bench_direct(redis_url: str, n: int) -> float:
    events = items(n)
    with Publisher(redis_url) as publisher:
        publisher.publish("warmup", "e", 0)

        def run() -> None:
            for start in range(0, n, BATCH):
                publisher.publish_many(events[start : start + BATCH])

        return rate(n, run)


def fill(engine: sa.Engine, n: int) -> float:
    events = items(n)

    def run() -> None:
        for start in range(0, n, BATCH):
            with engine.begin() as conn:
                enqueue_many(conn, events[start : start + BATCH])

    return rate(n, run)


def drain(engine: sa.Engine, redis_url: str, n: int, dispatchers: int) -> float:
    publishers = [Publisher(redis_url, history_size=50) for _ in range(dispatchers)]
    workers = [OutboxDispatcher(engine, p, batch_size=BATCH) for p in publishers]

    def one(dispatcher: OutboxDispatcher) -> None:
        idle = 0
        while idle < 3:  # a round may find only rows another dispatcher holds
            stats = dispatcher.run_once()
            idle = 0 if stats.published else idle + 1

    def run() -> None:
        threads = [threading.Thread(target=one, args=(w,)) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        result = rate(n, run)
        assert workers[0].pending() == 0
        return result
    finally:
        for publisher in publishers:
            publisher.close()


def bench_database(name: str, url: str, redis_url: str, n: int) -> dict[str, float]:
    out = {}
    runs = [1, 2] if url.startswith("postgresql") else [1]
    for count in runs:
        engine = fresh_engine(url)
        create_outbox_table(engine)
        if count == 1:
            out[f"{name}: enqueue_many, 500 rows/transaction"] = fill(engine, n)
        else:
            fill(engine, n)
        label = "1 dispatcher" if count == 1 else f"{count} dispatchers (threads)"
        out[f"{name}: outbox drained, {label}"] = drain(engine, redis_url, n, count)
        engine.dispose()
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    server = RedisServer().start()
    results: dict[str, list[float]] = {}

    def add(round_results: dict[str, float]) -> None:
        for name, value in round_results.items():
            results.setdefault(name, []).append(value)
        server.flush()

    try:
        with tempfile.TemporaryDirectory() as tmp, postgres_database() as pg:
            # Interleaved rounds: a noisy neighbour slows every method alike.
            for _ in range(repeats):
                add({"direct Publisher.publish_many x500": bench_direct(server.url, n)})
                add(bench_database("SQLite", sqlite_url(Path(tmp)), server.url, n))
                add(bench_database("PostgreSQL", pg, server.url, n))
    finally:
        server.close()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{n} events over 500 BizIds, wall clock, {repeats} rounds, load average {load:.1f}")
    print(f"{'':52} {'median':>9} {'best':>9}  events/s")
    for name, values in results.items():
        print(f"{name:52} {statistics.median(values):9,.0f} {max(values):9,.0f}")


if __name__ == "__main__":
    main()
