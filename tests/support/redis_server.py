"""A private redis-server on a free loopback port that a test may kill, stop and restart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import redis

from tests.support.ports import free_port, wait_port
from tests.support.timing import MS

REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"


def start_replicated_server(
    port: int, directory: Path, password: str | None, *extra: str
) -> subprocess.Popen[bytes]:
    """One redis-server of a deployment (Sentinel's or a cluster's) sharing ``directory``
    with the others: files named by port, the password also used to reach a master."""
    auth = ("--requirepass", password, "--masterauth", password) if password else ()
    args = [
        REDIS_BIN,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--dbfilename",
        f"dump-{port}.rdb",
        "--logfile",
        str(directory / f"redis-{port}.log"),
        *auth,
        *extra,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 10_000 * MS)
    return proc


def stop_replication(master: redis.Redis, replicas: Sequence[subprocess.Popen[bytes]]) -> None:
    """Replication of ``master`` stops: ``replicas`` are stopped (SIGSTOP) and it drops
    their links, so what it accepts from now on exists only on it until
    :func:`resume_replication` (or its death: the replicas then lack it).

    Writes are held while the replicas stop one after the other, so all stop at the same
    offset: otherwise a write acknowledged by a later one in between is lost when the first
    is promoted (the N < replicas caveat of --redis-min-replicas, which the tests that cut
    replication are not about).
    """
    master.execute_command("CLIENT", "PAUSE", int(2_000 * MS) or 1, "WRITE")
    try:
        master.execute_command("WAIT", len(replicas), int(1_000 * MS) or 1)
        for proc in replicas:
            os.kill(proc.pid, signal.SIGSTOP)
        master.execute_command("CLIENT", "KILL", "TYPE", "replica")
    finally:
        master.execute_command("CLIENT", "UNPAUSE")


def resume_replication(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGCONT each of ``procs`` still running (those :func:`stop_replication` stopped)."""
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)


class RedisServer:
    """One redis-server process. ``restart()`` keeps the port (and, with AOF, the data).

    ``appendfsync`` is Redis's own setting (``everysec`` unless given). With ``everysec`` a
    killed redis-server can lose writes it acknowledged: while its once-a-second
    background fsync runs, Redis keeps the AOF writes of the next event-loop turns in
    memory (up to 2 s) yet sends their replies. ``always`` (or ``no``) writes the AOF
    before every reply, so a kill loses nothing acknowledged.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        port: int | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="relay-test-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            REDIS_BIN,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.dir / "redis.log"),
            *(("--requirepass", self.password) if self.password else ()),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 10_000 * MS)
        client = redis.Redis(port=self.port, password=self.password)
        deadline = time.monotonic() + 10_000 * MS
        while True:
            try:
                client.ping()
                break
            except redis.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(20 * MS)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: connections drop at once, nothing is flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10_000 * MS)
        self.proc = None

    def stop_process(self) -> None:
        """SIGSTOP: a hung Redis. Sockets stay open; nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def continue_process(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def flush(self) -> None:
        client = redis.Redis(port=self.port, password=self.password)
        client.flushall()
        client.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
