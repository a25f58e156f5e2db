"""``relay serve --sched-slice-ms``: each node process asks Linux for a shorter time slice
at start, without privilege, and says so once; a refusal is a warning, never fatal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from relay_cli.sched import current_slice_ns
from tests.support.ports import free_port
from tests.support.timing import MS

RELAY = Path(sys.executable).with_name("relay")
CAP_SYS_NICE = 23


def _serve(*flags: str, idle_policy: bool = False) -> subprocess.Popen[str]:
    """`relay serve` on a free port, its JSON log on stdout. Started as root, it runs
    without CAP_SYS_NICE all the same (setpriv), as an unprivileged service would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    drop = [] if os.getuid() else ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice"]

    def become_idle() -> None:  # SCHED_IDLE: a policy the slice request must refuse
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    return subprocess.Popen(
        [*drop, str(RELAY), "serve", "--allow-anonymous", "--host", "127.0.0.1",
         "--port", str(free_port()), "--log-format", "json", *flags],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, preexec_fn=become_idle if idle_policy else None,
    )  # fmt: skip


def _events_until_started(proc: subprocess.Popen[str], nodes: int) -> list[dict[str, Any]]:
    """The log's events up to the ``nodes``-th node.started. Workers share the pipe: before
    logs wrote each record in one write, two of their events could share a line."""
    assert proc.stdout is not None
    decoder = json.JSONDecoder()
    events: list[dict[str, Any]] = []
    for line in proc.stdout:
        text = line.strip()
        while text.startswith("{"):
            event, end = decoder.raw_decode(text)
            events.append(event)
            text = text[end:].lstrip()
        if sum(e["event"] == "node.started" for e in events) == nodes:
            return events
    raise AssertionError(f"relay serve exited {proc.wait()}: {events}")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    with proc.stdout:
        proc.stdout.read()
    assert proc.wait(20_000 * MS) == 0


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in found.stdout.split()]


def _has_cap(pid: int, cap: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    raise KeyError("CapEff")


def test_sched_slice_is_set_on_the_node_and_each_worker_unprivileged() -> None:
    """--sched-slice-ms 0.3: the node (each of --workers 2) runs with a 0.3 ms slice, read
    back from the kernel, and logs node.sched_slice once; without the flag, the kernel's."""
    for workers in (1, 2):
        proc = _serve("--sched-slice-ms", "0.3", "--workers", str(workers))
        try:
            events = _events_until_started(proc, workers)
            nodes = _children(proc.pid) if workers > 1 else [proc.pid]
            assert len(nodes) == workers
            for pid in nodes:
                assert not _has_cap(pid, CAP_SYS_NICE)
                assert current_slice_ns(pid) == 300_000, workers
            slices = [e for e in events if e["event"].startswith("node.sched_slice")]
            assert [(e["event"], e["level"], e["slice_ms"]) for e in slices] == [
                ("node.sched_slice", "info", 0.3)
            ] * workers
        finally:
            _stop(proc)
    proc = _serve()
    try:
        events = _events_until_started(proc, 1)
        assert current_slice_ns(proc.pid) != 300_000
        assert not [e for e in events if e["event"].startswith("node.sched_slice")]
    finally:
        _stop(proc)


def test_sched_slice_refused_is_one_warning_and_the_node_serves() -> None:
    """Under a policy the request cannot change (SCHED_IDLE here), the node warns once,
    saying why and that the flag has no effect, and starts all the same."""
    proc = _serve("--sched-slice-ms", "0.3", idle_policy=True)
    try:
        events = _events_until_started(proc, 1)
        refused = [e for e in events if e["event"].startswith("node.sched_slice")]
        assert [(e["event"], e["level"]) for e in refused] == [
            ("node.sched_slice_refused", "warning")
        ]
        assert "scheduling policy 5, not SCHED_OTHER" in refused[0]["reason"]
        assert "no effect" in refused[0]["message"]
    finally:
        _stop(proc)
