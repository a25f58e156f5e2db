"""A private Redis Sentinel deployment: a master, replicas and sentinels on free loopback ports.

Every process is ``redis-server`` (a sentinel is ``redis-server <conf> --sentinel``, so no
separate package is needed). A test may kill the master with SIGKILL and wait for the
sentinels to promote a replica; ``down_after`` is small so that takes about a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.ports import free_ports, wait_port
from tests.support.redis_server import (
    REDIS_BIN,
    resume_replication,
    start_replicated_server,
    stop_replication,
)
from tests.support.timing import MS

SERVICE = "relay-test"
PASSWORD = "sentinel-test-pw-93f1"  # the master's; tests check it never reaches a log


class SentinelDeployment:
    """``replicas`` replicas of one master, watched by ``sentinels`` sentinels (quorum 2)."""

    def __init__(
        self,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        password: str | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="relay-test-sentinel-"))
        self.password = password
        self.down_after_ms = down_after_ms
        # Picked all at once, so the system cannot hand one port out twice.
        ports = free_ports(1 + replicas + sentinels)
        self.data_ports = ports[: 1 + replicas]
        self.sentinel_ports = ports[1 + replicas :]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of this deployment."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/0"

    def _server(self, port: int, *extra: str) -> None:
        self.procs[port] = start_replicated_server(port, self.dir, self.password, *extra)
        self._check_own(port, self.password)

    def _check_own(self, port: int, password: str | None) -> None:
        """Fail at once if what answers on ``port`` is not the process started for it (the
        port was taken between picking and binding; seen as a 30 s "do not agree")."""
        with redis.Redis(
            port=port, password=password, socket_timeout=2000 * MS, retry=Retry(NoBackoff(), 0)
        ) as client:
            pid = client.info("server").get("process_id")
        if pid != self.procs[port].pid:
            raise RuntimeError(f"port {port} is taken by another process (pid {pid})")

    def _sentinel(self, port: int, master_port: int) -> None:
        conf = self.dir / f"sentinel-{port}.conf"
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            f"logfile {self.dir / f'sentinel-{port}.log'}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
            # Short enough for a test, long enough that a loaded machine never sees a
            # failover aborted and retried by another sentinel (a second promotion).
            f"sentinel failover-timeout {SERVICE} 30000",
            f"sentinel parallel-syncs {SERVICE} 2",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {SERVICE} {self.password}")
        conf.write_text("\n".join(lines) + "\n")
        self.procs[port] = subprocess.Popen(
            [REDIS_BIN, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(port, 10_000 * MS)
        self._check_own(port, None)

    def start(self) -> SentinelDeployment:
        """Start every process; one that fails to start leaves none of them running."""
        master, *replicas = self.data_ports
        try:
            self._server(master)
            for port in replicas:
                self._server(port, "--replicaof", "127.0.0.1", str(master))
            self.wait_replicated(len(replicas))
            for port in self.sentinel_ports:
                self._sentinel(port, master)
            self.wait_sentinels_agree(master)
        except BaseException:
            self.close()
            raise
        return self

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=2000 * MS)

    def master_port(self) -> int:
        """The master's port as the first answering sentinel reports it.

        Each sentinel is asked once: redis-py's default retries would spend seconds on a
        killed one (10 attempts with backoff) before the next is tried.
        """
        for port in self.sentinel_ports:
            try:
                with redis.Redis(
                    port=port, socket_timeout=1000 * MS, retry=Retry(NoBackoff(), 0)
                ) as sentinel:
                    _, master = sentinel.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                    )
                return int(master)
            except (redis.RedisError, TypeError, ValueError):
                continue
        raise RuntimeError("no sentinel answers")

    def wait_replicated(self, replicas: int, timeout: float = 20_000 * MS) -> None:
        """Wait until the master has ``replicas`` replicas online and in sync."""
        deadline = time.monotonic() + timeout
        with self.client(self.data_ports[0]) as master:
            while True:
                info = master.info("replication")
                online = [
                    v
                    for k, v in info.items()
                    if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
                ]
                if len(online) >= replicas:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replicas not in sync: {info}")
                time.sleep(50 * MS)

    def wait_sentinels_agree(self, master_port: int, timeout: float = 30_000 * MS) -> None:
        """Wait until every sentinel names ``master_port`` and knows the others and replicas."""
        deadline = time.monotonic() + timeout
        replicas = len(self.data_ports) - 1
        others = len(self.sentinel_ports) - 1
        while True:
            ok = True
            for port in self.sentinel_ports:
                try:
                    with redis.Redis(port=port, socket_timeout=1000 * MS) as sentinel:
                        state = sentinel.sentinel_master(SERVICE)
                except redis.RedisError:
                    ok = False
                    break
                if (
                    int(state["port"]) != master_port
                    or int(state["num-slaves"]) < replicas
                    or int(state["num-other-sentinels"]) < others
                ):
                    ok = False
                    break
            if ok:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("sentinels do not agree on the deployment")
            time.sleep(100 * MS)

    def kill(self, port: int) -> None:
        """SIGKILL one process (a data node or a sentinel)."""
        proc = self.procs.pop(port, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10_000 * MS)

    def cut_replicas(self, master: int) -> None:
        """Replication stops: the replicas are stopped (SIGSTOP) and the master drops their
        links, so what it accepts from now on exists only on the master until
        :meth:`resume_replicas` (they then resync, if the master is still there)."""
        replicas = [self.procs[p] for p in self.data_ports if p != master and p in self.procs]
        with self.client(master) as client:
            stop_replication(client, replicas)

    def resume_replicas(self) -> None:
        """SIGCONT every process (the replicas :meth:`cut_replicas` stopped)."""
        resume_replication(self.procs.values())

    def wait_failover(self, old_master: int, timeout: float = 30_000 * MS) -> tuple[int, float]:
        """Wait until a sentinel names a new master that answers as one: its port, and the
        time.monotonic() when that was seen."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                port = self.master_port()
                if port != old_master:
                    with self.client(port) as new:
                        if new.info("replication").get("role") == "master":
                            return port, time.monotonic()
            except (redis.RedisError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("no failover happened")
            time.sleep(50 * MS)

    def close(self) -> None:
        self.resume_replicas()
        for port in list(self.procs):
            self.kill(port)
        if not os.environ.get("KEEP_SENTINEL_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)
