"""Node CPU per WebSocket connect, A/B: ``python -m tests.bench_connect CHECKOUT...``.

Each round starts a private redis-server and one ``relay serve`` (anonymous, from the
checkout's own ``.venv``, so two checkouts compare two versions of the code), opens
``--connects`` WebSocket connections with ``--concurrency`` handshakes in flight from
this process (bare sockets: a handshake, then the welcome frame), and reads the node's
utime + stime from /proc just before the first handshake and right after the last
welcome. Redis' CPU is read the same way. Rounds go A B A B … (``--rounds`` each) and the
median of each checkout is printed with every round's figure and the load average, since
the machine is shared: CPU per connect is the figure that survives a noisy machine, the
rate is not.

``--since`` makes every client resume (``since=`` an id older than anything stored), as a
reconnect herd does; ``--profile DIR`` records the node with py-spy during the connects of
each round (``--native`` adds C frames).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay.bench.procs import free_port, loadavg, proc_cpu_s, wait_port

HEAD = (
    "GET /ws/{cid}{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class _Client(asyncio.Protocol):
    """Sends the upgrade, counts the connection once its first frame (the welcome) arrives."""

    def __init__(self, head: bytes, done: asyncio.Future[None]) -> None:
        self.head = head
        self.done = done
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.head)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        if not self.buffer.startswith(b"HTTP/1.1 101"):
            self.done.set_exception(RuntimeError(self.buffer[:80].decode("latin-1")))
            return
        if len(self.buffer) > end + 4:  # the first bytes after the head: the welcome
            self.done.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed before the welcome"))


async def _connect_all(port: int, count: int, concurrency: int, since: bool, tag: str) -> list:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    transports: list[asyncio.BaseTransport] = []
    query = "?since=1-0" if since else ""

    async def one(i: int) -> None:
        async with gate:
            key = base64.b64encode(os.urandom(16)).decode()
            head = HEAD.format(cid=f"{tag}{i}", query=query, key=key).encode()
            done: asyncio.Future[None] = loop.create_future()
            transport, _ = await loop.create_connection(
                lambda: _Client(head, done), "127.0.0.1", port
            )
            transports.append(transport)
            await done

    await asyncio.gather(*(one(i) for i in range(count)))
    return transports


async def _round(
    checkout: Path, args: argparse.Namespace, label: str, number: int
) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="relay-bench-connect-"))
    procs: list[subprocess.Popen[bytes]] = []
    transports: list[asyncio.BaseTransport] = []
    try:
        redis_port = free_port()
        redis = subprocess.Popen(
            [shutil.which("redis-server") or "/usr/sbin/redis-server", "--port", str(redis_port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work),
             "--maxclients", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        procs.append(redis)
        await wait_port(redis_port, 10.0)
        port = free_port()
        with (work / "node.log").open("wb") as node_log:
            node = subprocess.Popen(
                [str(checkout / ".venv/bin/relay"), "serve", "--host", "127.0.0.1", "--port",
                 str(port), "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--node-id",
                 f"bench-connect-{label}", "--allow-anonymous", "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=node_log, start_new_session=True,
            )  # fmt: skip
        procs.append(node)
        await wait_port(port, 30.0)
        await asyncio.sleep(0.5)
        spy = None
        if args.strace:
            spy = subprocess.Popen(
                ["strace", "-c", "-f", "-p", str(node.pid),
                 "-o", f"{args.strace}-{label}-{number}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.sleep(1.0)
        elif args.profile:
            out = Path(args.profile) / f"{label}-{number}.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen(
                [shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
                 "record", "-p", str(node.pid), "-r", str(args.rate), "-f", "raw", "-o", str(out),
                 *(["--native"] if args.native else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.sleep(1.0)
        load = loadavg()[0]
        node0, redis0, t0 = proc_cpu_s(node.pid), proc_cpu_s(redis.pid), time.monotonic()
        transports = await _connect_all(port, args.connects, args.concurrency, args.since, "c")
        node1, redis1, t1 = proc_cpu_s(node.pid), proc_cpu_s(redis.pid), time.monotonic()
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        n = args.connects
        return {
            "node_us": 1e6 * (node1 - node0) / n,
            "redis_us": 1e6 * (redis1 - redis0) / n,
            "rate": n / (t1 - t0),
            "load": load,
        }
    finally:
        for transport in transports:
            transport.abort()
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


async def _main(args: argparse.Namespace) -> None:
    checkouts = [Path(c).resolve() for c in args.checkouts]
    labels = [c.name for c in checkouts]
    results: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    for number in range(args.rounds):
        for checkout, label in zip(checkouts, labels, strict=True):
            r = await _round(checkout, args, label, number)
            results[label].append(r)
            print(
                f"round {number + 1} {label:>16}: node {r['node_us']:6.1f} µs/connect, "
                f"redis {r['redis_us']:5.1f}, {r['rate']:6.0f} connects/s, load {r['load']:.2f}",
                flush=True,
            )
    for label in labels:
        rs = results[label]
        node = sorted(r["node_us"] for r in rs)
        redis = sorted(r["redis_us"] for r in rs)
        print(
            f"{label:>16}: node median {statistics.median(node):.1f} µs/connect "
            f"({', '.join(f'{v:.0f}' for v in node)}); redis median {statistics.median(redis):.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+", help="checkouts with a .venv (make setup)")
    parser.add_argument("--connects", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--since", action="store_true", help="every client resumes (since=)")
    parser.add_argument("--profile", help="py-spy raw profiles into this folder")
    parser.add_argument("--native", action="store_true")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--strace", help="strace -c of the node during the connects, to this path")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
