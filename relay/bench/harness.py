"""The orchestrator's tools: start and stop what a scenario needs, drive the load, measure.

:class:`Bench` owns every process of a run (Redis, nodes, load generators, publishers)
and stops them all on the way out, whatever the way out is. A scenario asks it for
nodes and clients, then runs a :meth:`Bench.publish_phase`, which samples the CPU of
every role from /proc over the phase and turns the load generators' counters into the
figures of the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import signal
import sys
import time
from array import array
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import orjson
import redis.asyncio

from relay.bench.procs import (
    Child,
    CpuSnapshot,
    free_port,
    loadavg,
    proc_cpu_s,
    proc_rss_kb,
    start_floor,
    start_node,
    start_redis,
)
from relay.redis_pool import async_pool

__all__ = ["Bench", "LoadGen", "Options", "Phase", "Progress", "percentiles"]

DRAIN_IDLE_S = 5.0
DRAIN_MAX_S = 60.0
POLL_S = 0.25


@dataclass(frozen=True)
class Options:
    """Everything the command line says about a run."""

    scenarios: tuple[str, ...]
    clients: int = 1000
    events: int = 50_000
    rate: float = 2000.0
    duration: float = 10.0
    idle_clients: int = 10_000
    workers: int = 1
    storm_clients: int = 5000
    storm_rate: float = 500.0
    storm_seconds: float = 12.0
    storm_kill_after: float = 3.0
    storm_jitter: float = 0.25
    storm_concurrency: int = 100_000
    scale_clients: int = 100_000
    scale_workers: int = 8
    scale_loadgens: int = 6
    scale_rate: float = 500.0
    scale_seconds: float = 20.0
    scale_drain_grace: float = 10.0
    soak: float = 0.0
    loadgen_procs: int = 1
    batch: int = 100
    publish_api: str = "many"
    concurrency: int = 200
    settle: float = 1.5
    pin: bool = False
    plot: bool = True
    out: Path = Path("bench-out")


@dataclass
class Phase:
    """What a publish phase measured: the figures, every latency (ms), and ``during``'s result."""

    figures: dict[str, Any]
    latencies: array[float]
    side: Any


class Progress:
    """One updating status line per phase on stderr (a line every few seconds off a tty)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0
        self.start = time.monotonic()

    def begin(self) -> None:
        self.start = time.monotonic()
        self.last = 0.0

    def show(self, text: str) -> None:
        now = time.monotonic()
        line = f"  {text}  [{now - self.start:5.1f} s]"
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
        elif now - self.last >= 5.0:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = now

    def done(self, text: str) -> None:
        line = f"  {text}  [{time.monotonic() - self.start:5.1f} s]"
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()


class LoadGen:
    """A ``relay.bench.loadgen`` process and its command channel."""

    def __init__(self, child: Child, source: str | None = None) -> None:
        self.child = child
        self.source = source  # the local address its clients connect from
        self.lock = asyncio.Lock()

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        proc = self.child.proc
        assert proc.stdin is not None and proc.stdout is not None
        async with self.lock:
            proc.stdin.write(orjson.dumps({"cmd": cmd, **args}) + b"\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited; see {self.child.log_path}")
        reply: dict[str, Any] = orjson.loads(line)
        if "error" in reply:
            raise RuntimeError(f"load generator: {reply['error']}")
        return reply


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """min, p50, p90, p99, p99.9, max and mean of ``values`` (ms), rounded to µs."""
    if not values:
        return dict.fromkeys(("min", "p50", "p90", "p99", "p999", "max", "mean"))
    ordered = sorted(values)
    n = len(ordered)

    def at(p: float) -> float:
        return round(ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))], 3)

    return {
        "min": round(ordered[0], 3),
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "p999": at(99.9),
        "max": round(ordered[-1], 3),
        "mean": round(sum(ordered) / n, 3),
    }


def _sum_stats(replies: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for reply in replies:
        for key, value in reply.items():
            if key in ("last_recv_ms", "last_ready_at"):
                total[key] = max(total.get(key, 0.0), value)
            elif key == "first_recv_ms":
                if value and (not total.get(key) or value < total[key]):
                    total[key] = value
                total.setdefault(key, value)
            elif isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
    return total


def _r(value: float, digits: int = 3) -> float:
    return round(value, digits)


class Bench:
    """Every process of one run; ``async with`` stops them all, also on errors and Ctrl-C."""

    def __init__(
        self, options: Options, progress: Progress, *, started: list[int] | None = None
    ) -> None:
        self.options = options
        self.progress = progress
        self.log_dir = options.out / "logs"
        self.children: list[Child] = []
        self.started = [] if started is None else started  # every pid started, for the record
        self.redis: Child | None = None
        self.redis_url = ""
        self._redis_dir: Path | None = None
        server_cpus = frozenset({0}) if options.pin else None
        load_cpus = frozenset({1}) if options.pin else None
        self.server_cpus, self.load_cpus = server_cpus, load_cpus

    async def __aenter__(self) -> Bench:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis, port, self._redis_dir = await start_redis(self.log_dir, self.load_cpus)
        self.adopt(self.redis)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop(*self.children)
        if self._redis_dir is not None:
            shutil.rmtree(self._redis_dir, ignore_errors=True)

    # -- processes -------------------------------------------------------------------------

    def adopt(self, child: Child) -> None:
        self.children.append(child)
        self.started.extend(child.pids() or [child.pid])

    async def stop(self, *children: Child) -> None:
        """Stop ``children``, last started first; a second Ctrl-C kills the rest outright."""
        cancelled = False
        for child in reversed(children):
            try:
                await asyncio.shield(child.stop())
            except asyncio.CancelledError:
                cancelled = True
                child.kill_group(signal.SIGKILL)
            finally:
                if child in self.children:
                    self.children.remove(child)
        if cancelled:
            raise asyncio.CancelledError

    async def node(
        self, name: str, *, workers: int = 1, extra: Sequence[str] = ()
    ) -> tuple[Child, str]:
        """A fresh ``relay serve`` on a free port; returns it and its ws:// base URL."""
        port = free_port()
        child = await start_node(
            name,
            port,
            self.redis_url,
            self.log_dir,
            workers=workers,
            extra=extra,
            cpus=self.server_cpus,
        )
        self.adopt(child)
        return child, f"ws://127.0.0.1:{port}"

    async def floor(self) -> tuple[Child, str]:
        """The floor server on a free port, pinned like a node; returns it and its URL."""
        port = free_port()
        child = await start_floor(port, self.redis_url, self.log_dir, cpus=self.server_cpus)
        self.adopt(child)
        return child, f"ws://127.0.0.1:{port}"

    async def loadgens(
        self, count: int | None = None, sources: Sequence[str | None] = ()
    ) -> list[LoadGen]:
        """``count`` load generators (default ``--loadgen-procs``); the i-th connects
        from ``sources[i]`` when given."""
        gens = []
        for i in range(self.options.loadgen_procs if count is None else count):
            child = await Child.spawn(
                f"loadgen {i}",
                [sys.executable, "-m", "relay.bench.loadgen"],
                self.log_dir / f"loadgen-{i}.log",
                pipes=True,
                cpus=self.load_cpus,
            )
            self.adopt(child)
            gens.append(LoadGen(child, sources[i] if i < len(sources) else None))
        for gen in gens:
            await gen.call("stats")  # imported and listening
        return gens

    async def close_loadgens(self, gens: Sequence[LoadGen]) -> None:
        for gen in gens:
            with contextlib.suppress(RuntimeError, TimeoutError, OSError):
                await asyncio.wait_for(gen.call("close"), 15)
        await self.stop(*(gen.child for gen in gens))

    async def flush_redis(self) -> None:
        client = redis.asyncio.Redis(connection_pool=async_pool(self.redis_url))
        try:
            await client.flushall()
        finally:
            await client.aclose(close_connection_pool=True)

    async def settle(self, seconds: float | None = None) -> None:
        await asyncio.sleep(self.options.settle if seconds is None else seconds)

    def phase(self, title: str) -> list[float]:
        """Announce a phase with the machine's load average (the machine is shared)."""
        load = loadavg()
        self.progress.note(f"[bench] {title}  (loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
        self.progress.begin()
        return load

    # -- load ------------------------------------------------------------------------------

    @staticmethod
    async def stats(gens: Sequence[LoadGen]) -> dict[str, Any]:
        return _sum_stats([await gen.call("stats") for gen in gens])

    async def connect(
        self,
        gens: Sequence[LoadGen],
        server: Child,
        urls: Sequence[str],
        count: int,
        *,
        prefix: str = "c",
        reconnect: bool = False,
        timeout: float = 180.0,
    ) -> dict[str, Any]:
        """Connect ``count`` clients, split over ``gens``; the connect figures."""
        rss0 = sum(proc_rss_kb(p) for p in server.pids())
        roles = {"server": server.pids(), "loadgen": [gen.child.pid for gen in gens]}
        cpu0 = CpuSnapshot.take(roles)
        t0 = time.time()
        share, rest = divmod(count, len(gens))
        start = 0
        for i, gen in enumerate(gens):
            n = share + (1 if i < rest else 0)
            await gen.call(
                "connect",
                urls=list(urls),
                prefix=prefix,
                start=start,
                count=n,
                concurrency=max(1, self.options.concurrency // len(gens)),
                reconnect=reconnect,
                reconnect_concurrency=max(1, self.options.storm_concurrency // len(gens)),
                jitter=self.options.storm_jitter,
                source=gen.source,
            )
            start += n
        deadline = time.monotonic() + timeout
        while True:
            st = await self.stats(gens)
            self.progress.show(f"connect: ready {st['ready']}/{count}  failed {st['failed']}")
            if st["ready"] + st["failed"] >= st["clients"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        cpu = CpuSnapshot.take(roles).delta(cpu0)
        cpu["other"] = max(0.0, cpu.pop("machine") - cpu["server"] - cpu["loadgen"])
        end = st["last_ready_at"] or time.time()
        seconds = max(1e-3, end - t0)
        ready = int(st["ready"])
        self.progress.done(
            f"connect: {ready}/{count} ready, {st['failed']} failed, {ready / seconds:,.0f}/s"
        )
        return {
            "connected": ready,
            "connect_failed": count - ready,
            "connect_time_s": _r(seconds),
            "connect_rate_per_s": _r(ready / seconds, 1),
            "server_us_per_connect": _r(1e6 * cpu["server"] / ready, 1) if ready else None,
            "loadgen_us_per_connect": _r(1e6 * cpu["loadgen"] / ready, 1) if ready else None,
            "connect_cpu_pct_of_core": {k: _r(100 * v / seconds, 1) for k, v in cpu.items()},
            "rss_server_kb_before_connect": rss0,
        }

    async def _drain(
        self, gens: Sequence[LoadGen], server: Child, sent: int, label: str
    ) -> dict[str, Any]:
        """Wait until everything is delivered, or nothing new came for a while, or a cap."""
        t_drain = time.monotonic()
        last_delivered, last_change = -1, t_drain
        while True:
            st = await self.stats(gens)
            now = time.monotonic()
            if st["delivered"] != last_delivered:
                last_delivered, last_change = st["delivered"], now
            self.progress.show(f"{label}: delivered {st['delivered']:,}/{sent:,} (draining)")
            if (
                st["delivered"] >= sent
                or now - last_change > DRAIN_IDLE_S
                or now - t_drain > DRAIN_MAX_S
                or not server.alive()
            ):
                return st
            await asyncio.sleep(POLL_S / 2)

    async def publish_phase(
        self,
        gens: Sequence[LoadGen],
        server: Child,
        *,
        clients: int,
        count: int,
        rate: float,
        label: str,
        prefix: str = "c",
        during: Coroutine[Any, Any, Any] | None = None,
    ) -> Phase:
        """Publish ``count`` events (flat out when ``rate`` is 0), drain, and measure.

        ``during`` is an optional coroutine run beside the publisher (the storm's kill).
        """
        assert self.redis is not None
        for gen in gens:
            await gen.call("expect", count=count)
        server_pids = server.pids()
        roles = {
            "server": server_pids,
            "redis": [self.redis.pid],
            "loadgen": [gen.child.pid for gen in gens],
        }
        rss_series: list[tuple[float, int]] = []
        rss_start = sum(proc_rss_kb(p) for p in server_pids)
        timeout = (count / rate if rate > 0 else 0) + 240
        publisher = await Child.spawn(
            f"publisher ({label})",
            [
                sys.executable, "-m", "relay_cli.bench_publisher",
                "--redis", self.redis_url,
                "--prefix", prefix,
                "--clients", str(clients),
                "--count", str(count),
                "--rate", str(rate),
                "--batch", str(self.options.batch),
                "--api", self.options.publish_api,
                "--timeout", str(timeout),
            ],
            self.log_dir / "publisher.log",
            pipes=True,
            cpus=self.load_cpus,
        )  # fmt: skip
        self.adopt(publisher)
        # The phase's clocks start when the publisher says it is about to send.
        cpu0 = CpuSnapshot.take(roles)
        started = asyncio.Event()

        async def read_publisher() -> list[bytes]:
            stdout = publisher.proc.stdout
            assert stdout is not None
            nonlocal cpu0
            lines = []
            while line := await stdout.readline():
                if line.startswith(b'{"started"'):
                    cpu0 = CpuSnapshot.take(roles)
                    started.set()
                else:
                    lines.append(line)
            return lines

        reading = asyncio.ensure_future(read_publisher())
        side: asyncio.Future[Any] | None = None
        pub_cpu_polled = 0.0
        t_start = time.monotonic()
        last_rss = 0.0
        try:
            while not reading.done():
                await asyncio.wait({reading}, timeout=POLL_S)
                if side is None and started.is_set() and during is not None:
                    side = asyncio.ensure_future(during)
                pub_cpu_polled = proc_cpu_s(publisher.pid) or pub_cpu_polled
                now = time.monotonic()
                if now - last_rss >= 1.0:
                    last_rss = now
                    rss_series.append(
                        (_r(now - t_start, 1), sum(proc_rss_kb(p) for p in server.pids()))
                    )
                st = await self.stats(gens)
                self.progress.show(
                    f"{label}: delivered {st['delivered']:,}/{count:,}  ready {st['ready']}"
                    + (f"  resumed {st['resumed']}/{st['dropped']}" if st["dropped"] else "")
                )
            pub_out = reading.result()
            await publisher.proc.wait()
            lines = [ln for ln in pub_out if ln.startswith(b"{")]
            if not lines:
                raise RuntimeError(f"publisher failed; see {publisher.log_path}")
            pub: dict[str, Any] = orjson.loads(lines[-1])
            sent = int(pub["sent"])
            side_result = await side if side is not None else None
            st = await self._drain(gens, server, sent, label)
        finally:
            if not reading.done():
                reading.cancel()
            if side is None and during is not None:
                during.close()  # never started: no "never awaited" warning
            elif side is not None and not side.done():
                side.cancel()
            await self.stop(publisher)
        cpu1 = CpuSnapshot.take(roles)
        rss_end = sum(proc_rss_kb(p) for p in server.pids())
        rss_series.append((_r(time.monotonic() - t_start, 1), rss_end))
        delivered = int(st["delivered"])
        self.progress.done(f"{label}: delivered {delivered:,}/{sent:,}")

        latencies = array("d")
        for i, gen in enumerate(gens):
            path = self.log_dir / f"latencies-{i}.bin"
            reply = await gen.call("latencies", path=str(path))
            with path.open("rb") as f:
                latencies.fromfile(f, int(reply["n"]))
            path.unlink()

        cpu = cpu1.delta(cpu0)
        measured = max(1e-3, cpu1.at - cpu0.at)
        pub_cpu = float(pub.get("cpu_s") or pub_cpu_polled)
        cpu["publisher"] = pub_cpu
        accounted = cpu["server"] + cpu["redis"] + cpu["loadgen"] + pub_cpu
        cpu["other"] = max(0.0, cpu["machine"] - accounted)
        t_first = float(pub.get("t_first_ms") or 0.0)
        t_last = float(st.get("last_recv_ms") or 0.0)
        window = max(1e-3, (t_last - t_first) / 1000.0) if t_first and t_last else None
        per_msg = (lambda s: _r(1e6 * s / delivered, 1)) if delivered else (lambda s: None)
        figures = {
            "sent": sent,
            "delivered": delivered,
            "lost": max(0, sent - delivered),
            "dup": int(st["dup"]),
            "misrouted": int(st["misrouted"]),
            "bad_frames": int(st["bad"]),
            "stale_dropped": int(st["stale_dropped"]),
            "publish_errors": int(pub.get("errors", 0)),
            "publish_s": pub.get("duration_s"),
            "publish_rate": pub.get("rate"),
            "window_s": _r(window) if window else None,
            "throughput_msgs_s": _r(delivered / window, 1) if window else None,
            "lat_ms": percentiles(latencies),
            "cpu_s": {k: _r(v) for k, v in cpu.items()},
            "cpu_window_s": _r(measured),
            "cpu_pct_of_core": {k: _r(100 * v / measured, 1) for k, v in cpu.items()},
            "server_us_per_msg": per_msg(cpu["server"]),
            "loadgen_us_per_msg": per_msg(cpu["loadgen"]),
            "redis_us_per_msg": per_msg(cpu["redis"]),
            "publisher_us_per_event": _r(1e6 * pub_cpu / sent, 1) if sent else None,
            "rss_server_kb": {"start": rss_start, "end": rss_end},
            "rss_series": rss_series,
            "server_alive": server.alive(),
        }
        return Phase(figures, latencies, side_result)
