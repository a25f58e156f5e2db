"""The benchmark's outputs: a markdown table, a JSON file of every figure, a latency plot."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from array import array
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["environment", "markdown", "plot_latencies"]


def environment() -> dict[str, Any]:
    """What the figures were measured on: versions and the machine."""
    versions: dict[str, str | None] = {}
    for name in ("aiohttp", "redis", "hiredis", "uvloop", "orjson", "msgpack"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        versions["redis-server"] = next(
            (w[2:] for w in out.split() if w.startswith("v=")), out.strip()
        )
    except (OSError, subprocess.SubprocessError):
        versions["redis-server"] = None
    return {
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions,
    }


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _lat(figures: Mapping[str, Any]) -> str:
    lat = figures.get("lat_ms") or {}
    return " / ".join(_n(lat.get(k), 2) for k in ("p50", "p90", "p99", "max"))


def _accounting(f: Mapping[str, Any]) -> str:
    return f"{_n(f.get('lost'))} / {_n(f.get('dup'))} / {_n(f.get('misrouted'))}"


def _rows(f: Mapping[str, Any]) -> list[tuple[str, str]]:
    name = f["scenario"]
    if "error" in f:
        return [("FAILED", str(f["error"]))]
    rows: list[tuple[str, str]] = []
    if name in ("throughput", "latency", "soak"):
        what = f"{_n(f['clients'])} clients, {_n(f['sent'])} events"
        what += f" at {_n(f['rate'])}/s" if f["rate"] else " flat out"
        rows += [
            ("load", f"{what}, {f['workers']} worker(s), publisher: {f['publish_api']}"),
            ("delivered msgs/s", _n(f["throughput_msgs_s"])),
            ("server CPU µs per delivered msg", _n(f["server_us_per_msg"], 1)),
            ("latency ms p50 / p90 / p99 / max", _lat(f)),
            ("lost / dup / misrouted", _accounting(f)),
            ("publisher events/s (µs CPU per event)",
             f"{_n(f['publish_rate'])} ({_n(f['publisher_us_per_event'], 1)})"),
        ]  # fmt: skip
        if name == "soak":
            rss = f["rss_soak_kb"]
            rows.append(
                ("server RSS KiB start / end / max",
                 f"{_n(rss['start'])} / {_n(rss['end'])} / {_n(rss['max'])}")
            )  # fmt: skip
    elif name == "floor":
        rows.append(("load", f"{_n(f['clients'])} clients, {_n(f['events'])} events flat out"))
        for server in ("floor", "relay"):
            g = f[server]
            rows += [
                (f"{server}: delivered msgs/s", _n(g["throughput_msgs_s"])),
                (f"{server}: server CPU µs per delivered msg", _n(g["server_us_per_msg"], 1)),
                (f"{server}: lost / dup / misrouted", _accounting(g)),
            ]
        rows.append(("relay µs per msg ÷ floor's", _n(f["relay_over_floor"], 2)))
    elif name == "memory":
        bpc = f["bytes_per_conn"]
        rows += [
            ("idle connections", f"{_n(f['connected'])} of {_n(f['clients'])}"),
            ("server RSS per connection", f"{_n(bpc / 1024, 1)} KiB" if bpc else "-"),
            ("Redis RSS per connection", f"{_n(f['redis_bytes_per_conn'])} B"),
            ("connects/s", _n(f["connect_rate_per_s"])),
            (
                "CPU µs per connect: server / load generator",
                f"{_n(f['server_us_per_connect'], 1)} / {_n(f['loadgen_us_per_connect'], 1)}",
            ),
            (
                "CPU % of a core while connecting: server / load generator / other",
                " / ".join(
                    _n(f["connect_cpu_pct_of_core"][k]) for k in ("server", "loadgen", "other")
                ),
            ),
            ("idle server CPU % of a core", _n(f["idle_server_cpu_pct"], 2)),
        ]
    elif name == "scale":
        bpc = f["bytes_per_conn"]
        rows += [
            ("load", f"{_n(f['clients'])} clients, {f['workers']} workers,"
                     f" {f['loadgens']} load generators, {_n(f['rate'])} events/s trickle"),
            ("connected", f"{_n(f['connected'])} of {_n(f['clients'])}"),
            ("connects/s", _n(f["connect_rate_per_s"])),
            ("server RSS per connection (all workers)", f"{_n(bpc / 1024, 1)} KiB" if bpc else "-"),
            ("idle server CPU % of a core (all workers)", _n(f["idle_server_cpu_pct"], 2)),
            ("trickle latency ms p50 / p90 / p99 / max", _lat(f)),
            ("lost / dup / misrouted", _accounting(f)),
            (f"SIGTERM to one worker (drain grace {f['drain_grace_s']:g} s): its clients",
             _n(f.get("drain_clients"))),
            ("… trickle meanwhile: sent / lost / dup; latency ms p99 / max",
             f"{_n(f['drain_events'])} / {_n(f['drain_lost'])} / {_n(f['drain_dup'])};"
             f" {_n(f['drain_lat_ms'].get('p99'), 1)} / {_n(f['drain_lat_ms'].get('max'), 1)}"),
            ("… worker exited after / all its clients back after",
             f"{_n(f.get('drain_worker_exited_s'), 2)} s"
             f" / {_n(f.get('drain_all_resumed_s'), 2)} s"),
            ("… their handshakes refused meanwhile",
             f"{_n(f.get('drain_refused'))} ("
             + (", ".join(f"{k} x{v}" for k, v in sorted(f["drain_handshake_errors"].items()))
                or "-") + ")"),
            ("… kernel TCP counters meanwhile (whole machine)",
             ", ".join(f"{k} {_n(v)}" for k, v in sorted(f.get("drain_tcp_counters", {}).items()))
             or "-"),
        ]  # fmt: skip
    elif name == "storm":
        resume = f["resume_s"]
        done = (
            f"{_n(f['all_resumed_after_s'], 2)} s"
            if f["all_resumed"]
            else f"NOT ALL: {_n(f['resumed'])} of {_n(f['clients'])}"
        )
        rows += [
            ("load", f"{_n(f['clients'])} clients, {_n(f['rate'])} events/s, "
                     f"node A killed after {f['kill_after_s']:g} s"),
            ("all resumed on node B after the kill", done),
            ("resume s p50 / p90 / p99",
             " / ".join(_n(resume.get(k), 2) for k in ("p50", "p90", "p99"))),
            ("lost / dup / misrouted (after dedupe)", _accounting(f)),
            ("replayed duplicates dropped by id", _n(f["stale_dropped"])),
            ("reconnect attempts (handshake failed / no welcome in 10 s)",
             f"{_n(f['reconnect_attempts'])} ({_n(f['refused'])} / {_n(f['welcome_timeouts'])})"),
            ("failed handshakes by error",
             ", ".join(f"{k} x{v}" for k, v in sorted(f["handshake_errors"].items())) or "-"),
            ("clients stopped by a terminal close (4000-4499)", _n(f["stopped_terminal"])),
            ("close codes seen", ", ".join(f"{k} x{v}" for k, v in sorted(f["close_codes"].items()))
             or "-"),
            ("resumed with recovered=false", _n(f["not_recovered"])),
            ("CPU µs per resume, kill to last welcome: node B / load generators",
             f"{_n(f.get('server_us_per_resume'))} / {_n(f.get('loadgen_us_per_resume'))}"),
            ("latency ms p50 / p90 / p99 / max", _lat(f)),
            ("node B alive at the end", _n(f["server_alive"])),
        ]  # fmt: skip
    return rows


def markdown(results: Sequence[Mapping[str, Any]], env: Mapping[str, Any], when: str) -> str:
    lines = [
        f"Relay `make bench`, {when}; {env['cores']} cores, Python {env['python']}, "
        f"redis-server {env['versions'].get('redis-server')}, aiohttp {env['versions']['aiohttp']}",
        "",
        "| scenario | figure | value |",
        "|---|---|---|",
    ]
    for f in results:
        load = f.get("loadavg_before")
        first = True
        for label, value in _rows(f):
            scen = f["scenario"] if first else ""
            if first and load:
                scen += f" (load {load[0]:.1f})"
            lines.append(f"| {scen} | {label} | {value} |")
            first = False
    cpu_rows = [f for f in results if f.get("cpu_pct_of_core")]
    if cpu_rows:
        lines += [
            "",
            "CPU over each publish phase, % of one core (µs per delivered message):",
            "",
            "| scenario | server | load generator | publisher | redis | other (machine) |",
            "|---|---|---|---|---|---|",
        ]
        for f in cpu_rows:
            pct = f["cpu_pct_of_core"]
            per = {
                "server": f.get("server_us_per_msg"),
                "loadgen": f.get("loadgen_us_per_msg"),
                "publisher": f.get("publisher_us_per_event"),
                "redis": f.get("redis_us_per_msg"),
            }
            # The storm's CPU goes to reconnects, not messages: no per-message figure.
            show = f["scenario"] != "storm"
            cells = [
                f"{_n(pct[k])} ({_n(per[k], 1)})" if show else _n(pct[k])
                for k in ("server", "loadgen", "publisher", "redis")
            ]
            lines.append(f"| {f['scenario']} | {' | '.join(cells)} | {_n(pct['other'])} |")
    return "\n".join(lines) + "\n"


def plot_latencies(series: Mapping[str, array[float]], path: Path) -> bool:
    """Histogram and CDF of the latencies of each scenario; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    data = {k: sorted(v) for k, v in series.items() if len(v)}
    if not data:
        return False
    low = max(0.01, min(v[0] for v in data.values()))
    high = max(v[-1] for v in data.values())
    bins = [low * (high / low) ** (i / 80) for i in range(81)] if high > low else 20
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, values in data.items():
        n = len(values)
        hist.hist(
            [max(v, low) for v in values],
            bins=bins,
            weights=[1 / n] * n,
            histtype="step",
            label=name,
        )
        step = max(1, n // 2000)
        xs = [max(v, low) for v in values[::step]] + [values[-1]]
        ys = [i / n for i in range(0, n, step)] + [1.0]
        p99 = values[min(n - 1, math.ceil(0.99 * n) - 1)]
        cdf.plot(xs, ys, label=f"{name} (p50 {values[n // 2]:.2f}, p99 {p99:.2f} ms)")
    for ax in (hist, cdf):
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (receive time - publish stamp)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    hist.set_ylabel("fraction of messages per bin")
    cdf.set_ylabel("fraction of messages")
    cdf.set_ylim(0, 1.01)
    fig.suptitle("Relay make bench: end-to-end latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
