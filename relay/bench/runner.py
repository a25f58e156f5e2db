"""``python -m relay.bench`` (``make bench``): the command line, the run, the outputs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
import sys
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from relay.bench.harness import Bench, Options, Progress
from relay.bench.report import environment, markdown, plot_latencies
from relay.bench.scenarios import PLOTTED_SCENARIOS, SCENARIOS

__all__ = ["build_parser", "main"]

DEFAULT_SCENARIOS = ("throughput", "latency", "memory", "storm")
FD_RESERVE = 200
SCALE_WORKER_SKEW = 1.2
"""A worker may get this much more than its even share of the scale scenario's clients."""


def build_parser() -> argparse.ArgumentParser:
    d = Options(scenarios=DEFAULT_SCENARIOS)
    p = argparse.ArgumentParser(
        prog="python -m relay.bench",
        description="Relay's benchmark: a private redis-server, real `relay serve` nodes, "
        "WebSocket clients and a publisher in processes of their own.",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: %(default)s;"
        " soak runs when --soak is given)",
    )
    p.add_argument("--clients", type=int, default=d.clients, help="throughput/latency clients")
    p.add_argument("--events", type=int, default=d.events, help="throughput events")
    p.add_argument("--rate", type=float, default=d.rate, help="latency/soak events per second")
    p.add_argument("--duration", type=float, default=d.duration, help="latency seconds")
    p.add_argument(
        "--idle-clients", type=int, default=d.idle_clients, help="memory scenario connections"
    )
    p.add_argument("--workers", type=int, default=d.workers, help="relay serve --workers")
    p.add_argument("--storm-clients", type=int, default=d.storm_clients)
    p.add_argument("--storm-rate", type=float, default=d.storm_rate, help="events/s in the storm")
    p.add_argument("--storm-seconds", type=float, default=d.storm_seconds, help="publish time")
    p.add_argument("--storm-kill-after", type=float, default=d.storm_kill_after)
    p.add_argument(
        "--storm-jitter",
        type=float,
        default=d.storm_jitter,
        help="most seconds an 'at once' reconnect (1012, 4500-4999) waits; a killed node's"
        " 1006 backs off as the SDKs do (0-0.5 s)",
    )
    p.add_argument(
        "--storm-concurrency",
        type=int,
        default=d.storm_concurrency,
        help="reconnect handshakes in flight (default: no limit, a herd)",
    )
    p.add_argument("--scale-clients", type=int, default=d.scale_clients)
    p.add_argument(
        "--scale-workers", type=int, default=d.scale_workers, help="relay serve --workers"
    )
    p.add_argument(
        "--scale-loadgens",
        type=int,
        default=d.scale_loadgens,
        help="load generator processes, each from its own 127.0.0.x",
    )
    p.add_argument("--scale-rate", type=float, default=d.scale_rate, help="trickle events/s")
    p.add_argument("--scale-seconds", type=float, default=d.scale_seconds, help="trickle time")
    p.add_argument(
        "--scale-drain-grace",
        type=float,
        default=d.scale_drain_grace,
        help="the nodes' --drain-grace (one worker is drained)",
    )
    p.add_argument("--soak", type=float, default=d.soak, metavar="SECONDS", help="0: no soak")
    p.add_argument("--loadgen-procs", type=int, default=d.loadgen_procs)
    p.add_argument("--batch", type=int, default=d.batch, help="events per publish batch")
    p.add_argument(
        "--publish-api",
        choices=("many", "gather"),
        default=d.publish_api,
        help="AsyncPublisher.publish_many per batch, or gather of publish() per event",
    )
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="handshakes in flight")
    p.add_argument("--settle", type=float, default=d.settle, help="seconds after connecting")
    p.add_argument(
        "--pin", action="store_true", help="nodes on CPU 0; redis, clients, publisher on CPU 1"
    )
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--out", type=Path, default=d.out, help="output folder (default %(default)s)")
    return p


def _options(args: argparse.Namespace) -> Options:
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}")
    if args.soak > 0 and "soak" not in names:
        names.append("soak")
    if min(args.loadgen_procs, args.workers, args.scale_loadgens) < 1 or args.scale_workers < 2:
        raise SystemExit(
            "--loadgen-procs, --workers and --scale-loadgens must be at least 1,"
            " --scale-workers at least 2 (one of them is drained)"
        )
    return Options(
        scenarios=tuple(names),
        clients=args.clients,
        events=args.events,
        rate=args.rate,
        duration=args.duration,
        idle_clients=args.idle_clients,
        workers=args.workers,
        storm_clients=args.storm_clients,
        storm_rate=args.storm_rate,
        storm_seconds=args.storm_seconds,
        storm_kill_after=args.storm_kill_after,
        storm_jitter=args.storm_jitter,
        storm_concurrency=args.storm_concurrency,
        scale_clients=args.scale_clients,
        scale_workers=args.scale_workers,
        scale_loadgens=args.scale_loadgens,
        scale_rate=args.scale_rate,
        scale_seconds=args.scale_seconds,
        scale_drain_grace=args.scale_drain_grace,
        soak=args.soak,
        loadgen_procs=args.loadgen_procs,
        batch=args.batch,
        publish_api=args.publish_api,
        concurrency=args.concurrency,
        settle=args.settle,
        pin=args.pin,
        plot=args.plot,
        out=args.out,
    )


def _raise_fd_limit(options: Options) -> None:
    """Use the hard limit; a run that cannot fit its connections stops before starting."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    biggest = max(options.clients, options.storm_clients)
    if "memory" in options.scenarios:
        biggest = max(biggest, options.idle_clients)
    if "scale" in options.scenarios:
        # per process: a load generator's share, and a worker's (SO_REUSEPORT spreads
        # unevenly, and a drained worker's clients move to the others)
        per_gen = -(-options.scale_clients // options.scale_loadgens)
        per_worker = int(
            SCALE_WORKER_SKEW * options.scale_clients / max(1, options.scale_workers - 1)
        )
        biggest = max(biggest, per_gen, per_worker)
    if biggest + FD_RESERVE > soft:
        raise SystemExit(
            f"{biggest:,} connections in one process need more than the fd limit {soft:,}"
            " allows: lower --idle-clients / --clients / --storm-clients, or raise"
            " --scale-workers / --scale-loadgens"
        )


async def _run(
    options: Options, results: list[dict[str, Any]], plots: dict[str, Any], pids: list[int]
) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    progress = Progress()
    async with Bench(options, progress, started=pids) as bench:
        for name in options.scenarios:
            try:
                figures, latencies = await SCENARIOS[name](bench)
            except (RuntimeError, TimeoutError, OSError) as exc:
                progress.note(f"[bench] {name} FAILED: {exc}")
                results.append({"scenario": name, "error": str(exc)})
                with contextlib.suppress(Exception):
                    await bench.flush_redis()
                continue
            results.append(figures)
            if latencies is not None and name in PLOTTED_SCENARIOS:
                plots[name] = latencies


def _write(
    options: Options, results: list[dict[str, Any]], plots: dict[str, Any], pids: list[int]
) -> str:
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    env = environment()
    table = markdown(results, env, when)
    doc = {
        "date": when,
        "environment": env,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
        "results": results,
        "pids_started": pids,
    }
    (out / "results.json").write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    )
    (out / "results.md").write_text(table)
    if options.plot and plots:
        typed: dict[str, array[float]] = plots
        if plot_latencies(typed, out / "latency.png"):
            print(f"[bench] latency plot: {out / 'latency.png'}", file=sys.stderr)
    print(f"[bench] figures: {out / 'results.json'}, {out / 'results.md'}", file=sys.stderr)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    options = _options(build_parser().parse_args(argv))
    _raise_fd_limit(options)
    results: list[dict[str, Any]] = []
    plots: dict[str, Any] = {}
    pids: list[int] = []
    interrupted = False
    try:
        asyncio.run(_run(options, results, plots, pids))
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
        print("\n[bench] interrupted; every process it started is stopped", file=sys.stderr)
    if results:
        sys.stdout.write(_write(options, results, plots, pids))
    if interrupted:
        return 130
    return 1 if any("error" in r for r in results) else 0
