"""``python -m relay.bench`` end to end with tiny numbers: a correctness test, no speed asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import alive
from tests.support.timing import MS

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

PHASE_FIELDS = {
    "connected", "connect_rate_per_s", "sent", "delivered", "lost", "dup", "misrouted",
    "throughput_msgs_s", "server_us_per_msg", "lat_ms", "cpu_s", "cpu_pct_of_core",
    "rss_server_kb", "loadavg_before", "server_alive",
}  # fmt: skip


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """``python -m relay.bench *args`` into ``tmp_path``: it succeeded; its results.json."""
    proc = subprocess.run(
        [sys.executable, "-m", "relay.bench", "--settle", "0.2", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120_000 * MS,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((tmp_path / "results.json").read_text())


def test_bench_throughput_delivers_everything_and_stops_its_processes(tmp_path: Path) -> None:
    """Throughput at C=20, M=200: every figure present, nothing lost, no process left."""
    proc, doc = _bench(tmp_path, "--scenarios", "throughput", "--clients", "20", "--events", "200")
    (result,) = doc["results"]
    assert result["scenario"] == "throughput"
    assert PHASE_FIELDS - set(result) == set()
    assert {"p50", "p90", "p99", "max"} <= set(result["lat_ms"])
    assert {"server", "redis", "loadgen", "publisher", "machine"} <= set(result["cpu_s"])
    assert result["connected"] == 20
    assert (result["sent"], result["delivered"]) == (200, 200)
    assert (result["lost"], result["dup"], result["misrouted"]) == (0, 0, 0)
    assert result["server_alive"] is True
    assert "| throughput" in proc.stdout
    assert (tmp_path / "results.md").read_text() in proc.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "latency.png").stat().st_size > 0
    assert doc["pids_started"], "the run records what it started"
    assert [pid for pid in doc["pids_started"] if alive(pid)] == []


def test_bench_storm_resumes_every_client_of_the_killed_node(tmp_path: Path) -> None:
    """The reconnect storm's small form: 200 clients in two load generators lose node A
    (SIGKILL) while events flow; every one resumes on node B with recovered=true, and
    nothing is lost or delivered twice."""
    _, doc = _bench(
        tmp_path,
        "--scenarios", "storm",
        "--storm-clients", "200",
        "--storm-rate", "200",
        "--storm-seconds", "3",
        "--storm-kill-after", "1",
        "--loadgen-procs", "2",
        "--no-plot",
    )  # fmt: skip
    (result,) = doc["results"]
    assert result["scenario"] == "storm"
    assert (result["connected"], result["dropped"], result["resumed"]) == (200, 200, 200)
    assert result["all_resumed"] is True
    assert (result["not_recovered"], result["refused"], result["welcome_timeouts"]) == (0, 0, 0)
    assert (result["sent"], result["lost"], result["dup"], result["misrouted"]) == (600, 0, 0, 0)
    assert result["close_codes"] == {"1006": 200}
    assert [pid for pid in doc["pids_started"] if alive(pid)] == []


def test_bench_scale_drains_a_worker_and_loses_nothing(tmp_path: Path) -> None:
    """The 100,000-client scenario's small form: 300 clients from two load generators
    (eight loopback source addresses) on two workers; one worker drained mid-trickle;
    nothing lost, all back."""
    proc, doc = _bench(
        tmp_path,
        "--scenarios", "scale",
        "--scale-clients", "300",
        "--scale-workers", "2",
        "--scale-loadgens", "2",
        "--scale-seconds", "2",
        "--scale-drain-grace", "1",
        "--no-plot",
    )  # fmt: skip
    (result,) = doc["results"]
    assert result["scenario"] == "scale"
    assert result["sources"] == [  # four addresses per load generator, a client keeps one
        "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5",
        "127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9",
    ]
    assert result["connected"] == 300
    assert result["server_processes"] == 3  # the supervisor and both workers measured
    assert (result["sent"], result["lost"], result["dup"]) == (1000, 0, 0)
    assert (result["drain_lost"], result["drain_dup"]) == (0, 0)
    assert 0 < result["drain_clients"] == result["drain_clients_resumed"] < 300
    assert "| scale" in proc.stdout
    assert [pid for pid in doc["pids_started"] if alive(pid)] == []


def test_bench_floor_delivers_everything_on_the_floor_and_on_relay(tmp_path: Path) -> None:
    """The floor scenario: the same load on the floor server and on a node, each delivering
    every event to its client, and the ratio of their CPU per message reported."""
    proc, doc = _bench(
        tmp_path, "--scenarios", "floor", "--clients", "20", "--events", "200", "--no-plot"
    )
    (result,) = doc["results"]
    assert result["scenario"] == "floor"
    for server in ("floor", "relay"):
        assert result[server]["throughput_msgs_s"] > 0
        assert (result[server]["lost"], result[server]["dup"], result[server]["misrouted"]) == (
            0,
            0,
            0,
        )
    # 200 events may take less CPU than one clock tick: the ratio is then left out (None)
    assert "relay_over_floor" in result
    assert "relay µs per msg ÷ floor's" in proc.stdout
    assert [pid for pid in doc["pids_started"] if alive(pid)] == []


def test_bench_livepath_delivers_every_event_once_through_the_node_and_the_floor() -> None:
    """``python -m relay.bench.livepath`` with tiny numbers: the node's live path and the
    floor's loop each deliver every event to its client exactly once (the module checks
    each pass and exits non-zero otherwise), and both figures are reported."""
    args = ["--sessions", "20", "--events", "300", "--passes", "2", "--per-read", "7"]
    proc = subprocess.run(
        [sys.executable, "-m", "relay.bench.livepath", *args],
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "relay  µs/msg" in proc.stdout and "floor  µs/msg" in proc.stdout
