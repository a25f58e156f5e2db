"""The scenarios of ``make bench``. Each starts its own nodes and clients on the run's
Redis, measures, and stops what it started (Redis is flushed between scenarios).

throughput  C clients, M events to random clients as fast as the publisher goes
latency     C clients, R events/s for a few seconds: latency percentiles under load
memory      many idle clients: RSS per connection, connects per second, idle CPU
storm       N clients on node A of two; A is killed (SIGKILL) while events flow; the
            clients reconnect to node B with ``since=``: time until all resumed, losses
floor       the throughput load on the floor server (relay.bench.floor), then on a node:
            the node's CPU per delivered message as a multiple of the floor's
soak        the latency load for a long time: does the node's RSS stay flat?
scale       100,000 clients on one box: several --workers, several load generators, each
            from its own loopback address; RSS per connection, connect rate, idle CPU,
            a 500 events/s trickle (p99, nothing lost) while one worker drains on SIGTERM
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

from relay.bench.harness import Bench, LoadGen, percentiles
from relay.bench.procs import Child, CpuSnapshot, alive, proc_rss_kb, tcp_counters

__all__ = ["PLOTTED_SCENARIOS", "SCENARIOS", "ScenarioResult"]

ScenarioResult = tuple[dict[str, Any], "array[float] | None"]

IDLE_HOLD_S = 5.0
STORM_RESUME_TIMEOUT_S = 60.0
DRAIN_TRICKLE_LEAD_S = 2.0
"""Seconds of the scale scenario's drain trickle before one worker gets SIGTERM."""


class IncompleteConnect(RuntimeError):
    """Not every client connected: the figures of the phase would mean nothing."""


def _check_connected(conn: dict[str, Any], wanted: int) -> None:
    if conn["connected"] < wanted:
        raise IncompleteConnect(
            f"only {conn['connected']} of {wanted} clients connected; see the logs"
        )


async def _cleanup(bench: Bench, gens: list[LoadGen], *nodes: Any) -> None:
    await bench.close_loadgens(gens)
    await bench.stop(*nodes)
    await bench.flush_redis()


async def _events(
    bench: Bench,
    name: str,
    *,
    clients: int,
    count: int,
    rate: float,
    title: str,
    server: Callable[[], Awaitable[tuple[Child, str]]] | None = None,
) -> ScenarioResult:
    """Shared by throughput, latency, soak and floor: one server (default: a node),
    clients, a publish phase."""
    o = bench.options
    load = bench.phase(title)
    node, url = await (server() if server else bench.node("a", workers=o.workers))
    gens: list[LoadGen] = []
    try:
        gens = await bench.loadgens()
        await bench.settle(1.0)
        conn = await bench.connect(gens, node, [url], clients)
        _check_connected(conn, clients)
        await bench.settle()
        phase = await bench.publish_phase(
            gens, node, clients=clients, count=count, rate=rate, label=name
        )
    finally:
        await _cleanup(bench, gens, node)
    figures = {
        "scenario": name,
        "loadavg_before": load,
        "clients": clients,
        "events": count,
        "rate": rate,
        "workers": o.workers,
        "publish_api": o.publish_api,
        **conn,
        **phase.figures,
    }
    return figures, phase.latencies


async def throughput(bench: Bench) -> ScenarioResult:
    o = bench.options
    return await _events(
        bench,
        "throughput",
        clients=o.clients,
        count=o.events,
        rate=0.0,
        title=f"throughput: {o.clients:,} clients, {o.events:,} events flat out,"
        f" {o.workers} worker(s)",
    )


FLOOR_FIGURES = ("throughput_msgs_s", "server_us_per_msg", "lat_ms", "lost", "dup", "misrouted")


async def floor(bench: Bench) -> ScenarioResult:
    """The throughput load on the floor server, then on one node: the node's CPU per
    delivered message as a multiple of the floor's, from the same run."""
    o = bench.options
    runs: dict[str, dict[str, Any]] = {}
    for server, start in (("floor", bench.floor), ("relay", lambda: bench.node("a"))):
        figures, _ = await _events(
            bench,
            "floor",
            clients=o.clients,
            count=o.events,
            rate=0.0,
            title=f"floor: {o.clients:,} clients, {o.events:,} events flat out, on {server}",
            server=start,
        )
        runs[server] = {
            "loadavg_before": figures["loadavg_before"],
            **{k: figures[k] for k in FLOOR_FIGURES},
        }
    floor_us, relay_us = runs["floor"]["server_us_per_msg"], runs["relay"]["server_us_per_msg"]
    return {
        "scenario": "floor",
        "clients": o.clients,
        "events": o.events,
        **runs,
        "relay_over_floor": round(relay_us / floor_us, 2) if floor_us and relay_us else None,
    }, None


async def latency(bench: Bench) -> ScenarioResult:
    o = bench.options
    count = int(o.rate * o.duration)
    return await _events(
        bench,
        "latency",
        clients=o.clients,
        count=count,
        rate=o.rate,
        title=f"latency: {o.clients:,} clients, {o.rate:,.0f} events/s for {o.duration:g} s",
    )


async def soak(bench: Bench) -> ScenarioResult:
    o = bench.options
    figures, latencies = await _events(
        bench,
        "soak",
        clients=o.clients,
        count=int(o.rate * o.soak),
        rate=o.rate,
        title=f"soak: {o.clients:,} clients, {o.rate:,.0f} events/s for {o.soak:g} s",
    )
    series = figures["rss_series"]
    figures["rss_soak_kb"] = {
        "start": figures["rss_server_kb"]["start"],
        "end": figures["rss_server_kb"]["end"],
        "max": max((kb for _, kb in series), default=0),
    }
    return figures, latencies


async def memory(bench: Bench) -> ScenarioResult:
    o = bench.options
    n = o.idle_clients
    load = bench.phase(f"memory: {n:,} idle connections, {o.workers} worker(s)")
    assert bench.redis is not None
    node, url = await bench.node("a", workers=o.workers)
    gens: list[LoadGen] = []
    try:
        gens = await bench.loadgens()
        await bench.settle(1.0)
        redis_before = proc_rss_kb(bench.redis.pid)
        conn = await bench.connect(gens, node, [url], n)
        _check_connected(conn, n)
        await bench.settle()
        rss_after = sum(proc_rss_kb(p) for p in node.pids())
        redis_after = proc_rss_kb(bench.redis.pid)
        idle_pct = await _idle_cpu_pct(bench, node, f"memory: {n:,} connections")
        bench.progress.done(f"memory: held {n:,} idle connections for {IDLE_HOLD_S:g} s")
        rss_idle = sum(proc_rss_kb(p) for p in node.pids())
    finally:
        await _cleanup(bench, gens, node)
    rss_before = conn["rss_server_kb_before_connect"]
    connected = conn["connected"]
    figures = {
        "scenario": "memory",
        "loadavg_before": load,
        "clients": n,
        "workers": o.workers,
        **conn,
        "rss_server_kb": {"before": rss_before, "after": rss_after, "after_idle": rss_idle},
        "bytes_per_conn": round((rss_after - rss_before) * 1024 / connected) if connected else None,
        "redis_bytes_per_conn": (
            round((redis_after - redis_before) * 1024 / connected) if connected else None
        ),
        "idle_server_cpu_pct": idle_pct,
    }
    return figures, None


async def storm(bench: Bench) -> ScenarioResult:
    o = bench.options
    n = o.storm_clients
    load = bench.phase(
        f"storm: {n:,} clients on node A, A killed after {o.storm_kill_after:g} s"
        f" at {o.storm_rate:,.0f} events/s; they resume on node B"
    )
    node_a, url_a = await bench.node("a")
    node_b, url_b = await bench.node("b")
    gens: list[LoadGen] = []
    try:
        gens = await bench.loadgens()
        await bench.settle(1.0)
        conn = await bench.connect(gens, node_a, [url_a, url_b], n, reconnect=True)
        _check_connected(conn, n)
        await bench.settle()

        async def kill_a() -> dict[str, Any]:
            await asyncio.sleep(o.storm_kill_after)
            # From the kill until every client resumed: node B's and the clients' CPU.
            roles = {"server": node_b.pids(), "loadgen": [gen.child.pid for gen in gens]}
            t_kill = time.time()
            node_a.kill_group(signal.SIGKILL)
            cpu0 = CpuSnapshot.take(roles)
            while time.time() - t_kill < STORM_RESUME_TIMEOUT_S:
                st = await bench.stats(gens)
                if st["dropped"] >= n and st["resumed"] >= st["dropped"]:
                    break
                await asyncio.sleep(0.05)
            return {"t_kill": t_kill, "resume_cpu_s": CpuSnapshot.take(roles).delta(cpu0)}

        count = int(o.storm_rate * max(o.storm_seconds, o.storm_kill_after + 1))
        phase = await bench.publish_phase(
            gens,
            node_b,
            clients=n,
            count=count,
            rate=o.storm_rate,
            label="storm",
            during=kill_a(),
        )
        resumes = [await gen.call("resumes") for gen in gens]
    finally:
        await _cleanup(bench, gens, node_a, node_b)
    t_kill = float(phase.side["t_kill"])
    resume_cpu = phase.side["resume_cpu_s"]
    resumed_at = [t for r in resumes for t in r["resumed_at"]]
    dropped = sum(int(r["dropped"]) for r in resumes)
    codes: dict[str, int] = {}
    handshake_errors: dict[str, int] = {}
    for r in resumes:
        for code, times in r["codes"].items():
            codes[code] = codes.get(code, 0) + int(times)
        for why, times in r["handshake_errors"].items():
            handshake_errors[why] = handshake_errors.get(why, 0) + int(times)
    after_kill = [t - t_kill for t in resumed_at]
    everyone = len(resumed_at) >= n
    f = phase.figures
    figures = {
        "scenario": "storm",
        "loadavg_before": load,
        "clients": n,
        "events": count,
        "rate": o.storm_rate,
        "kill_after_s": o.storm_kill_after,
        "jitter_s": o.storm_jitter,
        "reconnects_in_flight_max": o.storm_concurrency,
        **conn,
        "dropped": dropped,
        "first_drop_after_s": round(
            min((float(r["first_drop_at"]) for r in resumes if r["first_drop_at"]), default=t_kill)
            - t_kill,
            3,
        ),
        "resumed": len(resumed_at),
        "all_resumed": everyone,
        "all_resumed_after_s": round(max(after_kill), 3) if everyone and after_kill else None,
        "resume_s": percentiles(after_kill),
        "not_recovered": sum(int(r["not_recovered"]) for r in resumes),
        "resume_cpu_s": {k: round(v, 3) for k, v in resume_cpu.items()},
        "server_us_per_resume": (
            round(1e6 * resume_cpu["server"] / len(resumed_at), 1) if resumed_at else None
        ),
        "loadgen_us_per_resume": (
            round(1e6 * resume_cpu["loadgen"] / len(resumed_at), 1) if resumed_at else None
        ),
        "reconnect_attempts": sum(int(r["attempts"]) for r in resumes),
        "close_codes": codes,
        "refused": sum(int(r["refused"]) for r in resumes),
        "welcome_timeouts": sum(int(r["welcome_timeouts"]) for r in resumes),
        "handshake_errors": handshake_errors,
        "stopped_terminal": sum(int(r["stopped_terminal"]) for r in resumes),
        **f,
        "survivor": "b",
    }
    return figures, phase.latencies


SOURCES_PER_LOADGEN = 4


def scale_sources(count: int, per_loadgen: int = SOURCES_PER_LOADGEN) -> list[str]:
    """Each load generator's loopback source addresses, comma-separated ("127.0.0.2,…"):
    each address has its own ~28,000 ephemeral ports toward the node's one address and port.

    Several per generator, so no address uses more than a fraction of its ports. With one
    address per generator (~16,700 clients, 60 % of its ports), the reconnects after a
    drain got the ports the closed connections had just freed: the same 4-tuples, whose
    SO_REUSEPORT hash (reciprocal_scale: a contiguous eighth of the hash space per
    listener) maps the drained worker's eighth onto 1-2 of the 7 others. Those took the
    whole share at once and refused most of it (31,478 handshakes refused, 179 trickle
    events undelivered within the 60 s window, quiet machine 2026-12-06 06:19), while
    five workers sat idle. Clients on distinct hosts do not repeat 4-tuples.
    """
    return [
        ",".join(f"127.0.0.{2 + g * per_loadgen + k}" for k in range(per_loadgen))
        for g in range(count)
    ]


async def _idle_cpu_pct(bench: Bench, node: Child, label: str) -> float:
    """The node's CPU (every worker) while its clients sit idle, % of one core."""
    cpu0 = CpuSnapshot.take({"server": node.pids()})
    t0 = time.monotonic()
    while (left := IDLE_HOLD_S - (time.monotonic() - t0)) > 0:
        bench.progress.show(f"{label}: idle, {left:.0f} s left")
        await asyncio.sleep(min(0.5, left))
    idle = CpuSnapshot.take({"server": node.pids()}).delta(cpu0)
    return round(100 * idle["server"] / IDLE_HOLD_S, 2)


async def _drain_one_worker(
    bench: Bench, gens: list[LoadGen], node: Child, after: float
) -> dict[str, Any]:
    """SIGTERM to one worker ``after`` s into the trickle: how long it takes to drain its
    clients and exit, and until every one of them is connected again (to the others)."""
    await asyncio.sleep(after)
    worker = next(pid for pid in node.pids() if pid != node.pid)
    counters = tcp_counters()
    t0 = time.monotonic()
    os.kill(worker, signal.SIGTERM)
    while alive(worker) and time.monotonic() - t0 < STORM_RESUME_TIMEOUT_S:
        await asyncio.sleep(0.05)
    exited = time.monotonic() - t0
    st = await bench.stats(gens)
    while st["resumed"] < st["dropped"] and time.monotonic() - t0 < STORM_RESUME_TIMEOUT_S:
        await asyncio.sleep(0.1)
        st = await bench.stats(gens)
    resumes = [await gen.call("resumes") for gen in gens]
    errors: dict[str, int] = {}
    for r in resumes:
        for why, times in r["handshake_errors"].items():
            errors[why] = errors.get(why, 0) + int(times)
    return {
        "drain_refused": sum(int(r["refused"]) for r in resumes),
        "drain_handshake_errors": errors,
        "drain_worker_exited_s": round(exited, 3),
        "drain_clients": int(st["dropped"]),
        "drain_clients_resumed": int(st["resumed"]),
        "drain_all_resumed_s": round(time.monotonic() - t0, 3),
        "drain_tcp_counters": {
            name: count - counters.get(name, 0)
            for name, count in tcp_counters().items()
            if count != counters.get(name, 0)
        },
    }


async def scale(bench: Bench) -> ScenarioResult:
    o = bench.options
    n, workers = o.scale_clients, o.scale_workers
    sources = scale_sources(o.scale_loadgens)
    load = bench.phase(
        f"scale: {n:,} clients, {workers} workers, {o.scale_loadgens} load generators from"
        f" 127.0.0.2…{sources[-1].rsplit(',', 1)[-1]}, {o.scale_rate:,.0f} events/s trickle"
    )
    assert bench.redis is not None
    node, url = await bench.node(
        "a", workers=workers, extra=("--drain-grace", str(o.scale_drain_grace))
    )
    gens: list[LoadGen] = []
    try:
        gens = await bench.loadgens(o.scale_loadgens, sources)
        await bench.settle(1.0)
        redis_before = proc_rss_kb(bench.redis.pid)
        conn = await bench.connect(gens, node, [url], n, reconnect=True, timeout=900.0)
        _check_connected(conn, n)
        await bench.settle()
        rss_after = {pid: proc_rss_kb(pid) for pid in node.pids()}
        redis_after = proc_rss_kb(bench.redis.pid)
        idle_pct = await _idle_cpu_pct(bench, node, "scale")
        count = int(o.scale_rate * o.scale_seconds)
        phase = await bench.publish_phase(
            gens, node, clients=n, count=count, rate=o.scale_rate, label="scale trickle"
        )
        # The drain has a trickle of its own: its events wait for their clients' resume,
        # which would swamp the first one's percentiles; here only the count matters.
        # (Nor its CPU: the drained worker's share leaves the sum when it exits.)
        drain_count = int(o.scale_rate * (DRAIN_TRICKLE_LEAD_S + o.scale_drain_grace + 5.0))
        drain = await bench.publish_phase(
            gens,
            node,
            clients=n,
            count=drain_count,
            rate=o.scale_rate,
            label="scale drain",
            during=_drain_one_worker(bench, gens, node, DRAIN_TRICKLE_LEAD_S),
        )
    finally:
        await _cleanup(bench, gens, node)
    rss_before = conn["rss_server_kb_before_connect"]
    connected = conn["connected"]
    f = phase.figures
    figures = {
        "scenario": "scale",
        "loadavg_before": load,
        "clients": n,
        "workers": workers,
        "loadgens": o.scale_loadgens,
        "sources": sources,
        "events": count,
        "rate": o.scale_rate,
        "drain_grace_s": o.scale_drain_grace,
        **conn,
        "server_processes": len(rss_after),
        "rss_server_kb": {"before": rss_before, "after": sum(rss_after.values())},
        "rss_worker_kb": sorted(rss_after.values()),
        "bytes_per_conn": (
            round((sum(rss_after.values()) - rss_before) * 1024 / connected) if connected else None
        ),
        "redis_bytes_per_conn": (
            round((redis_after - redis_before) * 1024 / connected) if connected else None
        ),
        "idle_server_cpu_pct": idle_pct,
        **{k: v for k, v in f.items() if k != "rss_server_kb"},
        **(drain.side or {}),
        "drain_events": drain.figures["sent"],
        "drain_delivered": drain.figures["delivered"],
        "drain_lost": drain.figures["lost"],
        "drain_dup": drain.figures["dup"],
        "drain_lat_ms": drain.figures["lat_ms"],
    }
    return figures, phase.latencies


SCENARIOS: dict[str, Callable[[Bench], Awaitable[ScenarioResult]]] = {
    "throughput": throughput,
    "latency": latency,
    "memory": memory,
    "storm": storm,
    "soak": soak,
    "scale": scale,
    "floor": floor,
}

PLOTTED_SCENARIOS = ("throughput", "latency")
