"""Processes the benchmark starts, and what /proc says about them.

Every child runs in a process group of its own (``start_new_session``), so a Ctrl-C in
the terminal reaches only the orchestrator, which then stops each group it started, by
pid: SIGTERM, a grace period, SIGKILL. Should the orchestrator itself be killed, each
child gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``), so nothing outlives a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = [
    "CLK_TCK",
    "Child",
    "CpuSnapshot",
    "alive",
    "free_port",
    "group_pids",
    "listeners",
    "loadavg",
    "machine_cpu",
    "proc_cpu_s",
    "proc_rss_kb",
    "start_floor",
    "start_node",
    "start_redis",
    "tcp_counters",
    "wait_port",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls into it


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        with contextlib.suppress(OSError, AttributeError):
            _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)

    return setup


# -- /proc --------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process in seconds; 0 when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def alive(pid: int) -> bool:
    """``pid`` runs (an exited process not yet reaped, a zombie, does not)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (a node and its ``--workers`` children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return sorted(pids)


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine, all cores (user nice system irq softirq)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    return (parts[0] + parts[1] + parts[2] + parts[5] + parts[6]) / CLK_TCK


def listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (one per SO_REUSEPORT worker)."""
    suffix = f":{port:04X}"
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1].endswith(suffix) and parts[3] == "0A":
                count += 1
    return count


TCP_COUNTERS = (
    "ListenOverflows",  # a completed handshake dropped: the accept queue was full
    "ListenDrops",
    "TCPReqQFullDoCookies",  # the SYN queue was full: answered with a SYN cookie
    "TCPReqQFullDrop",
    "TCPMigrateReqSuccess",  # a closing listener's queued connection given to another
    "TCPMigrateReqFailure",
    "AttemptFails",  # connections reset in SYN_SENT / SYN_RECV
    "EstabResets",
    "OutRsts",
)


def tcp_counters() -> dict[str, int]:
    """The kernel's TCP counters that tell refused connections apart (whole network
    namespace: other programs' connections count too)."""
    found: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        with contextlib.suppress(OSError), open(path) as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            for name, value in zip(names.split()[1:], values.split()[1:], strict=False):
                if name in TCP_COUNTERS:
                    found[name] = int(value)
    return found


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of each role at one instant, and the wall clock."""

    at: float
    roles: dict[str, float]
    machine: float

    @classmethod
    def take(cls, roles: Mapping[str, Sequence[int]]) -> CpuSnapshot:
        return cls(
            time.monotonic(),
            {name: sum(proc_cpu_s(p) for p in pids) for name, pids in roles.items()},
            machine_cpu(),
        )

    def delta(self, before: CpuSnapshot) -> dict[str, float]:
        """CPU seconds per role since ``before``, and ``machine`` (all cores, everyone)."""
        out = {name: self.roles[name] - before.roles.get(name, 0.0) for name in self.roles}
        out["machine"] = self.machine - before.machine
        return out


# -- ports --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_port(port: int, timeout: float, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if child is not None and not child.alive():
                raise RuntimeError(f"{child.name} exited; see {child.log_path}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.05)


# -- children -----------------------------------------------------------------------------


class Child:
    """One started process group, stopped by its pid (never by name)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        pipes: bool = False,
        cpus: frozenset[int] | None = None,
    ) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log: IO[bytes] = log_path.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipes else log,
                stderr=log,
                env=env,
                start_new_session=True,
                preexec_fn=_child_setup(cpus),
                limit=1 << 24,  # reply lines of the load generator can be long
            )
        finally:
            log.close()
        return cls(name, proc, log_path)

    def alive(self) -> bool:
        return self.proc.returncode is None and os.path.exists(f"/proc/{self.pid}")

    def pids(self) -> list[int]:
        """The group's live processes: the node with ``--workers`` is several."""
        return group_pids(self.pid) or ([self.pid] if self.alive() else [])

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the group, wait up to ``grace``, then SIGKILL; reap the leader."""
        if self.proc.returncode is None:
            self.kill_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.kill_group(signal.SIGKILL)
                await self.proc.wait()
        # Workers of a node may outlive their parent by a moment.
        deadline = time.monotonic() + grace
        while group_pids(self.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.kill_group(signal.SIGKILL)


async def start_redis(log_dir: Path, cpus: frozenset[int] | None = None) -> tuple[Child, int, Path]:
    """A private redis-server on a free loopback port: no persistence, pub/sub unlimited.

    ``client-output-buffer-limit pubsub 0 0 0``: a node that falls behind is measured
    as slow instead of being disconnected by Redis (the shared harness does the same).
    """
    binary = shutil.which("redis-server") or "/usr/sbin/redis-server"
    data_dir = Path(tempfile.mkdtemp(prefix="relay-bench-redis-"))
    port = free_port()
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(data_dir),
        "--client-output-buffer-limit", "pubsub 0 0 0",
        "--maxclients", "1000",
        "--daemonize", "no",
    ]  # fmt: skip
    child = await Child.spawn("redis", argv, log_dir / "redis.log", cpus=cpus)
    try:
        await wait_port(port, 10.0, child)
    except BaseException:
        await child.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return child, port, data_dir


async def start_node(
    name: str,
    port: int,
    redis_url: str,
    log_dir: Path,
    *,
    workers: int = 1,
    extra: Sequence[str] = (),
    cpus: frozenset[int] | None = None,
) -> Child:
    """``relay serve`` from this interpreter's environment, anonymous, quiet logs."""
    relay = Path(sys.executable).with_name("relay")
    head = [str(relay)] if relay.exists() else [sys.executable, "-m", "relay"]
    argv = [
        *head, "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--redis-url", redis_url,
        "--node-id", f"bench-{name}",
        "--allow-anonymous",
        "--log-level", "warning",
        "--workers", str(workers),
        *extra,
    ]  # fmt: skip
    return await _spawn_server(
        f"node {name}", argv, log_dir / f"node-{name}.log", port, cpus=cpus, workers=workers
    )


async def start_floor(
    port: int, redis_url: str, log_dir: Path, *, cpus: frozenset[int] | None = None
) -> Child:
    """The floor server (``relay.bench.floor``): what Relay's per-message cost is held against."""
    argv = [
        sys.executable, "-m", "relay.bench.floor",
        "--port", str(port),
        "--redis-url", redis_url,
    ]  # fmt: skip
    return await _spawn_server("floor", argv, log_dir / "floor.log", port, cpus=cpus)


async def _spawn_server(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    port: int,
    *,
    cpus: frozenset[int] | None,
    workers: int = 1,
) -> Child:
    """Start a server and wait until its ``workers`` listen on ``port``; stop it if not."""
    child = await Child.spawn(name, argv, log_path, cpus=cpus)
    try:
        await wait_port(port, 30.0, child)
        # With --workers every worker binds its own socket (SO_REUSEPORT): wait for all.
        deadline = time.monotonic() + 30
        while listeners(port) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name}: {listeners(port)} of {workers} workers listen")
            await asyncio.sleep(0.05)
    except BaseException:
        await child.stop()
        raise
    return child
