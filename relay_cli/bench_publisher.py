"""The benchmark's publisher: backend_adapter.AsyncPublisher in a process of its own.

It lives here, above both packages, because it imports backend_adapter (relay.bench
starts it by module name, never imports it).

``python -m relay_cli.bench_publisher --redis URL --clients C --count M [--rate R]`` publishes
events seq 0..M-1 to uniformly random BizIds ``{prefix}0 … {prefix}{C-1}`` with
``data = {"seq", "ts", "biz"}``, ``ts`` stamped (epoch ms) just before each batch is
handed to the publisher: one ``publish_many`` call (``--api many``), or one ``publish``
call per event, gathered, which AsyncPublisher pipelines by itself (``--api gather``).
With ``--rate 0`` it sends batches of ``--batch`` back to back, ``--inflight`` at a time;
at a rate it sends what is due every millisecond or so. It prints one JSON line at the
end, as the shared harness's publishers do: ``sent, errors, t_first_ms, t_last_ms,
duration_s, rate, cpu_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from backend_adapter import AsyncPublisher

__all__ = ["main"]

TICK_S = 0.001


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m relay_cli.bench_publisher")
    p.add_argument("--redis", required=True)
    p.add_argument("--prefix", default="c")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="events/s; 0: as fast as possible")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--inflight", type=int, default=2, help="batches in flight at rate 0")
    p.add_argument(
        "--api",
        choices=("many", "gather"),
        default="many",
        help="publish_many(batch), or asyncio.gather of publish() per event (auto-pipelined)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=300.0)
    return p.parse_args(argv)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    rnd = random.Random(args.seed)
    prefix, clients, count = args.prefix, args.clients, args.count
    sent = errors = 0
    t_first = 0.0

    def items(start: int, n: int) -> list[tuple[str, str, dict[str, Any]]]:
        ts = time.time() * 1000.0
        out = []
        for seq in range(start, start + n):
            biz = f"{prefix}{rnd.randrange(clients)}"
            out.append((biz, "bench", {"seq": seq, "ts": ts, "biz": biz}))
        return out

    async with AsyncPublisher(args.redis, max_batch=max(args.batch, 1)) as publisher:
        # Tells the orchestrator to start its CPU clocks: start-up is not part of a phase.
        sys.stdout.buffer.write(b'{"started": true}\n')
        sys.stdout.flush()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + args.timeout

        async def send(batch: list[tuple[str, str, dict[str, Any]]]) -> None:
            nonlocal errors
            try:
                if args.api == "many":
                    await publisher.publish_many(batch)
                else:
                    await asyncio.gather(*(publisher.publish(*item) for item in batch))
            except Exception as exc:  # counted; the run goes on
                errors += len(batch)
                print(f"publisher: {type(exc).__name__}: {exc}", file=sys.stderr)

        if args.rate <= 0:
            window: set[asyncio.Task[None]] = set()
            while sent < count and time.perf_counter() < deadline:
                n = min(args.batch, count - sent)
                t_first = t_first or time.time() * 1000.0
                window.add(asyncio.create_task(send(items(sent, n))))
                sent += n
                if len(window) >= args.inflight:
                    _, pending = await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
                    window = set(pending)
            if window:
                await asyncio.wait(window)
        else:
            while sent < count and time.perf_counter() < deadline:
                elapsed = time.perf_counter() - t0
                due = min(count, int(elapsed * args.rate) + 1)
                n = min(due - sent, args.batch)
                if n <= 0:
                    await asyncio.sleep(max(TICK_S, (sent + 1) / args.rate - elapsed))
                    continue
                t_first = t_first or time.time() * 1000.0
                await send(items(sent, n))
                sent += n
    duration = time.perf_counter() - t0
    return {
        "sent": sent - errors,
        "attempted": sent,
        "errors": errors,
        "t_first_ms": t_first,
        "t_last_ms": time.time() * 1000.0,
        "duration_s": round(duration, 3),
        "rate": round((sent - errors) / duration, 1) if duration > 0 else None,
        "cpu_s": round(time.process_time() - cpu0, 3),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        result = asyncio.run(_run(args))
    else:
        result = uvloop.run(_run(args))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
