"""A private Redis Cluster: masters and their replicas on free loopback ports.

Every process is ``redis-server --cluster-enabled yes``; the cluster is formed with
``redis-cli --cluster create`` as an operator would. A test may kill a master with SIGKILL
and wait for its replica's promotion (``node_timeout_ms`` is small, so about two seconds),
and move slots between masters (:meth:`RedisCluster.move_slot` for one chosen slot with the
documented SETSLOT/MIGRATE steps, :meth:`RedisCluster.reshard` with ``redis-cli``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support.ports import free_ports
from tests.support.redis_server import (
    resume_replication,
    start_replicated_server,
    stop_replication,
)
from tests.support.timing import MS

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


@dataclass(frozen=True)
class ClusterNode:
    """One line of ``CLUSTER NODES`` as a test needs it."""

    node_id: str
    port: int
    is_master: bool
    master_id: str | None  # a replica's master
    slots: tuple[tuple[int, int], ...]  # a master's slot ranges, inclusive
    failed: bool


def _parse_nodes(text: str) -> list[ClusterNode]:
    nodes = []
    for line in text.strip().splitlines():
        node_id, addr, flags, master, _ping, _pong, _epoch, _link, *slots = line.split()
        port = int(addr.split("@")[0].rsplit(":", 1)[1] or 0)
        ranges = []
        for item in slots:
            if item.startswith("["):  # a slot being imported or migrated
                continue
            low, _, high = item.partition("-")
            ranges.append((int(low), int(high or low)))
        flag_set = set(flags.split(","))
        nodes.append(
            ClusterNode(
                node_id=node_id,
                port=port,
                is_master="master" in flag_set,
                master_id=None if master == "-" else master,
                slots=tuple(ranges),
                failed=bool(flag_set & {"fail", "fail?", "noaddr"}),
            )
        )
    return nodes


class RedisCluster:
    """``masters`` masters with ``replicas`` replicas each, every slot covered."""

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        password: str | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="relay-test-cluster-"))
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        self.masters_wanted = masters
        count = masters * (1 + replicas)
        # The cluster bus listens on a port of its own (by default port + 10000, which may
        # be taken or beyond 65535 for a free port picked by the system).
        picked = free_ports(2 * count)
        self.ports = picked[:count]
        self.bus_ports = dict(zip(self.ports, picked[count:], strict=True))
        self.replicas_per_master = replicas
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL naming every node (any one would do)."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+cluster://{auth}{hosts}"

    def _server(self, port: int) -> None:
        self.procs[port] = start_replicated_server(
            port,
            self.dir,
            self.password,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-port",
            str(self.bus_ports[port]),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # A replica may always take over, however long its link was down: a test kills
            # masters on a loaded machine where replication can lag.
            "--cluster-replica-validity-factor",
            "0",
        )

    def start(self) -> RedisCluster:
        """Start every node and form the cluster; on any failure nothing is left running."""
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> RedisCluster:
        for port in self.ports:
            self._server(port)
        create = [
            REDIS_CLI,
            *(("-a", self.password, "--no-auth-warning") if self.password else ()),
            "--cluster",
            "create",
            *(f"127.0.0.1:{port}" for port in self.ports),
            "--cluster-replicas",
            str(self.replicas_per_master),
            "--cluster-yes",
        ]
        done = subprocess.run(
            create, capture_output=True, text=True, timeout=60_000 * MS, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
        self.wait_ok()
        # Right after --cluster create the node asked may not list every replica yet (the
        # gossip is still spreading): count the replicas the layout asked for, not the ones
        # CLUSTER NODES happens to show, or a min-replicas test's first publish can find
        # its master without a replica ("0 of 1 replica(s)", seen 3 in 10 runs under load).
        self.wait_replicated(per_master=self.replicas_per_master)
        return self

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=2000 * MS)

    def alive(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def nodes(self, via: int | None = None) -> list[ClusterNode]:
        """``CLUSTER NODES`` as seen by ``via`` (default: the first live node)."""
        port = via if via is not None else self.alive()[0]
        with self.client(port) as client:
            return _parse_nodes(client.execute_command("CLUSTER", "NODES").decode())

    def masters(self) -> list[int]:
        """The ports of the masters that serve slots now."""
        return sorted(n.port for n in self.nodes() if n.is_master and n.slots and not n.failed)

    def replicas_of(self, master_port: int) -> list[int]:
        nodes = self.nodes()
        master = next(n for n in nodes if n.port == master_port)
        return [n.port for n in nodes if n.master_id == master.node_id and not n.failed]

    def slot_of(self, key: str) -> int:
        with self.client(self.alive()[0]) as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def master_of_slot(self, slot: int) -> int:
        for node in self.nodes():
            covers = any(low <= slot <= high for low, high in node.slots)
            if node.is_master and not node.failed and covers:
                return node.port
        raise LookupError(f"no master serves slot {slot}")

    def wait_ok(self, timeout: float = 30_000 * MS) -> None:
        """Wait until every live node says ``cluster_state:ok`` and they agree on who serves
        every slot (no node still believes a dead master serves some)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._consistent():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster does not settle")
            time.sleep(50 * MS)

    def _consistent(self) -> bool:
        views = set()
        for port in self.alive():
            with self.client(port) as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return False
                text = client.execute_command("CLUSTER", "NODES").decode()
            nodes = _parse_nodes(text)
            owners = tuple(sorted((n.slots, n.port) for n in nodes if n.is_master and n.slots))
            if any(n.failed and n.slots for n in nodes) or len(nodes) < len(self.procs):
                return False
            views.add(owners)
        return len(views) == 1

    def wait_replicated(
        self, timeout: float = 20_000 * MS, *, per_master: int | None = None
    ) -> None:
        """Wait until every live master has its live replicas (or ``per_master`` of them,
        and all ``masters_wanted`` masters are known) online and in sync."""
        deadline = time.monotonic() + timeout
        while True:
            lagging: list[object] = []
            masters = self.masters()
            if per_master is not None and len(masters) < self.masters_wanted:
                lagging.append("masters")
            for master in masters:
                wanted = len(self.replicas_of(master)) if per_master is None else per_master
                with self.client(master) as client:
                    info = client.info("replication")
                online = [
                    v
                    for k, v in info.items()
                    if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
                ]
                if len(online) < wanted:
                    lagging.append(master)
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas of {lagging} not in sync")
            time.sleep(50 * MS)

    def kill(self, port: int) -> None:
        """SIGKILL one node."""
        proc = self.procs.pop(port, None)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process dies at once too
            proc.kill()
            proc.wait(10_000 * MS)

    def kill_master_and_wait_failover(
        self, master_port: int, timeout: float = 30_000 * MS
    ) -> tuple[int, float]:
        """SIGKILL a master, wait until one of its replicas serves its slots and the cluster
        is consistent again: the new master's port and the time.monotonic() when seen.

        The killed node is forgotten by the cluster's survivors, so later ``wait_ok`` calls
        do not wait for it to come back."""
        before = next(n for n in self.nodes() if n.port == master_port)
        replicas = self.replicas_of(master_port)
        self.kill(master_port)
        self.resume_replicas()  # after cut_replicas: a stopped replica cannot take over
        deadline = time.monotonic() + timeout
        while True:
            try:
                promoted = [
                    n
                    for n in self.nodes(replicas[0])
                    if n.port in replicas and n.is_master and set(before.slots) <= set(n.slots)
                ]
            except (redis.RedisError, IndexError):
                promoted = []
            if promoted:
                seen = time.monotonic()
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica of {master_port} took over")
            time.sleep(50 * MS)
        for port in self.alive():
            self._forget(port, before.node_id, deadline)
        self.wait_ok(max(deadline - time.monotonic(), 1.0))
        return promoted[0].port, seen

    def _forget(self, port: int, node_id: str, deadline: float) -> None:
        """CLUSTER FORGET on one node; a fellow replica of the dead master refuses until it
        has moved over to the promoted one, so that is waited for."""
        while True:
            try:
                with self.client(port) as client:
                    client.execute_command("CLUSTER", "FORGET", node_id)
                return
            except redis.ResponseError as exc:
                if "forget my master" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(50 * MS)

    def cut_replicas(self, master_port: int) -> None:
        """Replication of one master stops: its replicas are stopped (SIGSTOP) and it drops
        their links, so what it accepts from now on exists only on it until
        :meth:`resume_replicas` (or its death: the replicas then lack it)."""
        replicas = [self.procs[port] for port in self.replicas_of(master_port)]
        with self.client(master_port) as client:
            stop_replication(client, replicas)

    def resume_replicas(self) -> None:
        """SIGCONT every node (those :meth:`cut_replicas` stopped)."""
        resume_replication(self.procs.values())

    def move_slot(self, slot: int, target_port: int, batch: int = 100) -> None:
        """Move one slot, its keys included, to the master ``target_port``: the documented
        IMPORTING / MIGRATING / MIGRATE / SETSLOT NODE sequence, so clients see ASK and then
        MOVED, and sharded subscribers of the slot are unsubscribed by the source."""
        source_port = self.master_of_slot(slot)
        if source_port == target_port:
            return
        by_port = {n.port: n for n in self.nodes()}
        source_id, target_id = by_port[source_port].node_id, by_port[target_port].node_id
        with self.client(source_port) as source, self.client(target_port) as target:
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                auth = ("AUTH", self.password) if self.password else ()
                source.execute_command(
                    "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, *auth, "KEYS", *keys
                )
            target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for port in self.masters():
            if port not in (source_port, target_port):
                with self.client(port) as other:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_ok()

    def reshard(self, source_port: int, target_port: int, slots: int) -> None:
        """``redis-cli --cluster reshard``: move ``slots`` slots (redis-cli picks which) from
        one master to another, keys included, as an operator would."""
        by_port = {n.port: n for n in self.nodes()}
        command = [
            REDIS_CLI,
            *(("-a", self.password, "--no-auth-warning") if self.password else ()),
            "--cluster",
            "reshard",
            f"127.0.0.1:{target_port}",
            "--cluster-from",
            by_port[source_port].node_id,
            "--cluster-to",
            by_port[target_port].node_id,
            "--cluster-slots",
            str(slots),
            "--cluster-yes",
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=120_000 * MS, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster reshard failed: {done.stdout}{done.stderr}")
        self.wait_ok()

    def flush(self) -> None:
        for port in self.masters():
            with self.client(port) as client:
                client.flushall()

    def close(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        if not os.environ.get("KEEP_CLUSTER_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)
