"""Rolling restarts through a balancer, measured: the harness of the availability tests.

:func:`rolling_restart` does what every deploy does to a cluster started by
deploy/local-cluster.sh: SIGTERM node K, start it again once it exited, wait for its
``/readyz``, go on with the next. :func:`restart_figures` then says, per restart, how long
the clients it closed took to be welcomed again (close → next welcome).

Run as a script it prints those figures for one balancer setting, so settings can be
compared side by side (docs/operations.md quotes them)::

    python -m tests.cluster.restarts                       # nginx, the shipped template
    NGINX_SERVER_PARAMS="max_fails=1 fail_timeout=5s" python -m tests.cluster.restarts
    python -m tests.cluster.restarts --balancer haproxy
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.support import (
    NGINX_BIN,
    Fleet,
    LocalCluster,
    TickPublisher,
    missing_and_extra,
    wait_delivered,
)
from tests.support.timing import MS

SETTINGS = {"heartbeat": 5, "drain_grace": 3, "close_linger": 0.1}


@dataclass
class Restart:
    node: int
    signalled: float  # monotonic time of the SIGTERM
    exited: float
    ready: float  # the script saw its /readyz 200 again


@dataclass
class RestartFigures:
    node: int
    closed: int  # clients whose connection closed during this restart
    reconnect: list[float]  # per such client: its close → its next welcome, seconds
    not_back: int  # of those, never welcomed again

    def row(self) -> str:
        values = sorted(self.reconnect)
        if not values:
            return f"node{self.node}: no client closed"
        return (
            f"node{self.node}: {self.closed} clients closed, reconnect median"
            f" {statistics.median(values):.2f} s, max {values[-1]:.2f} s"
            + (f", {self.not_back} never back" if self.not_back else "")
        )


async def rolling_restart(cluster: LocalCluster, *, settle: float = 0.0) -> list[Restart]:
    """SIGTERM each node in turn, restart it once it exited, wait until it is ready."""
    restarts = []
    for k in range(1, cluster.nodes + 1):
        signalled = time.monotonic()
        cluster.signal_node(k, signal.SIGTERM)
        code = await cluster.wait_exit(k, 60)
        assert code == 0, f"node{k} exited {code} after SIGTERM\n{cluster.log(f'node{k}')[-3000:]}"
        exited = time.monotonic()
        await asyncio.to_thread(cluster.start_node, k)
        restarts.append(Restart(k, signalled, exited, time.monotonic()))
        await asyncio.sleep(settle)
    return restarts


def restart_figures(fleet: Fleet, restarts: list[Restart]) -> list[RestartFigures]:
    """Per restart: for every client whose connection closed between this SIGTERM and the
    next, the time from that first close to its next welcome."""
    out = []
    for i, restart in enumerate(restarts):
        end = restarts[i + 1].signalled if i + 1 < len(restarts) else float("inf")
        delays: list[float] = []
        closed = not_back = 0
        for client in fleet:
            close = next((c for c in client.closes if restart.signalled <= c.at < end), None)
            if close is None:
                continue
            closed += 1
            welcome = next((w for w in client.welcomes if w.at >= close.at), None)
            if welcome is None:
                not_back += 1
            else:
                delays.append(welcome.at - close.at)
        out.append(RestartFigures(restart.node, closed, delays, not_back))
    return out


@dataclass
class Outcome:
    figures: list[RestartFigures]
    restarts: list[Restart]
    not_connected_after: int  # clients without a live connection 10 s after the last ready
    back_within: float  # seconds from the last node's ready until every client was connected
    accepted: int
    missing: int
    wrong: int
    examples: list[str]
    duplicates: int
    no_live_upstreams: int  # nginx error-log lines

    def report(self, title: str) -> str:
        lines = [f"MEASURED {title}:"]
        lines += [f"  {f.row()}" for f in self.figures]
        lines.append(
            f"  every client connected {self.back_within:.2f} s after the last node was ready"
            if self.not_connected_after == 0
            else f"  {self.not_connected_after} clients NOT connected 10 s after the last node"
            " was ready"
        )
        lines.append(
            f"  {self.accepted} events accepted, {self.missing} missing, {self.wrong} out of"
            f" order or twice, {self.duplicates} repeats dropped by id;"
            f" nginx 'no live upstreams' lines: {self.no_live_upstreams}"
        )
        return "\n".join(lines)


async def run_rolling_restart(
    cluster: LocalCluster, clients: int, tick: float, *, prefix: str = "roll"
) -> Outcome:
    """Clients through the balancer, events every tick, one rolling restart; the outcome."""
    ids = [f"{prefix}-{i}" for i in range(clients)]
    async with Fleet({cid: cluster.lb_ws(cid) for cid in ids}) as fleet:
        await fleet.wait_connected(60)
        async with TickPublisher(cluster.redis_url, ids, tick) as publisher:
            await publisher.wait_ticks(2)
            restarts = await rolling_restart(cluster)
            last_ready = restarts[-1].ready
            try:
                await fleet.wait(
                    lambda: all(c.node is not None for c in fleet), 10, "every client back"
                )
                back_within = time.monotonic() - last_ready
                not_connected = 0
            except AssertionError:
                back_within = float("inf")
                not_connected = sum(1 for c in fleet if c.node is None)
            await publisher.wait_ticks(2)
        await wait_delivered(fleet, publisher.accepted, 20)
        missing, wrong, examples = missing_and_extra(fleet, publisher.accepted)
        return Outcome(
            restart_figures(fleet, restarts),
            restarts,
            not_connected,
            back_within,
            publisher.total,
            missing,
            wrong,
            examples,
            fleet.duplicates,
            cluster.log("nginx-error").count("no live upstreams"),
        )


def _without_lb_retry(cluster: LocalCluster) -> None:
    """Take the header out of the rendered nginx config and reload nginx."""
    conf = cluster.dir / "nginx" / "relay.conf"
    lines = conf.read_text().splitlines(keepends=True)
    conf.write_text("".join(line for line in lines if "X-Relay-Lb-Retry 1" not in line))
    prefix = f"{cluster.dir}/nginx/"
    subprocess.run(
        [NGINX_BIN, "-p", prefix, "-c", f"{prefix}nginx.conf", "-s", "reload"], check=True
    )
    time.sleep(1000 * MS)  # the new worker takes over


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--balancer", choices=("nginx", "haproxy"), default="nginx")
    parser.add_argument("--clients", type=int, default=150)
    parser.add_argument("--tick", type=float, default=0.5)
    parser.add_argument(
        "--no-lb-retry",
        action="store_true",
        help="nginx without X-Relay-Lb-Retry: a draining node answers 101 + 1012, not 503",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relay-restarts-") as tmp:
        cluster = LocalCluster(Path(tmp), 3, balancer=args.balancer, **SETTINGS)
        await asyncio.to_thread(cluster.start)
        if args.no_lb_retry:
            await asyncio.to_thread(_without_lb_retry, cluster)
        try:
            outcome = await run_rolling_restart(cluster, args.clients, args.tick)
        finally:
            await asyncio.to_thread(cluster.stop)
    title = f"rolling restart, {args.clients} clients, {args.clients / args.tick:.0f} events/s"
    if args.no_lb_retry:
        title += ", without X-Relay-Lb-Retry"
    print(outcome.report(f"{title}, {cluster.describe_balancer()}"))
    for example in outcome.examples:
        print("  ", example)


if __name__ == "__main__":
    asyncio.run(_main())
