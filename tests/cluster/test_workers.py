"""``relay serve --workers N``: N node processes on one port (SO_REUSEPORT), each its own
node, under a supervisor that restarts a crashed worker and takes its workers along
when it dies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.cluster.support import (
    API_KEY,
    Fleet,
    TickPublisher,
    get_json,
    readyz,
    wait_delivered,
)
from tests.support.ports import free_port
from tests.support.procs import alive
from tests.support.redis_server import RedisServer
from tests.support.timing import MS

RELAY = Path(sys.executable).with_name("relay")
CLIENTS = 50


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in found.stdout.split()]


@dataclass
class Supervised:
    """``relay serve --workers 2 --node-id wk`` with CLIENTS clients connected."""

    parent: subprocess.Popen[bytes]
    port: int
    log_path: Path
    http: aiohttp.ClientSession
    nodes: dict[str, Any]  # /api/nodes once both workers registered
    workers: list[int]  # their pids
    fleet: Fleet
    ids: list[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:]

    def log_events(self, event: str) -> list[dict[str, Any]]:
        return _log_events(self.log_path, event)


def _log_events(log_path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log records of ``event``, read one object at a time: the processes
    share the file, and two workers' records can run into one line."""
    text, decoder, found = log_path.read_text(), json.JSONDecoder(), []
    start = text.find("{")
    while start != -1:
        try:
            record, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            end = start + 1
        else:
            if record.get("event") == event:
                found.append(record)
        start = text.find("{", end)
    return found


@contextlib.asynccontextmanager
async def _supervised(redis: RedisServer, tmp_path: Path, prefix: str) -> AsyncIterator[Supervised]:
    """Start the supervisor, wait for both workers, connect the clients; stop it all after."""
    port = free_port()
    log_path = tmp_path / "workers.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    # heartbeat 5 s: node TTL 3 s, so the node hash (and its load) is refreshed every second.
    env.update(
        RELAY_DRAIN_GRACE="1", RELAY_API_KEY=API_KEY, RELAY_HEARTBEAT="5", RELAY_LOG_FORMAT="json"
    )
    with log_path.open("ab") as log:
        parent = subprocess.Popen(
            [str(RELAY), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
             "--node-id", "wk", "--redis-url", redis.url, "--allow-anonymous"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
        )  # fmt: skip
    workers: list[int] = []
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20_000 * MS
            while True:
                status, body = (0, {})
                if await readyz(http, f"http://127.0.0.1:{port}") == 200:
                    status, body = await get_json(http, f"http://127.0.0.1:{port}/api/nodes")
                if status == 200 and len(body["nodes"]) == 2:
                    break
                assert parent.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "two workers never registered"
                await asyncio.sleep(100 * MS)
            workers = _children(parent.pid)
            assert len(workers) == 2
            ids = [f"{prefix}-{i}" for i in range(CLIENTS)]
            async with Fleet({cid: f"ws://127.0.0.1:{port}/ws/{cid}" for cid in ids}) as fleet:
                await fleet.wait_connected()
                yield Supervised(parent, port, log_path, http, body, workers, fleet, ids)
    finally:
        if parent.poll() is None:
            parent.send_signal(signal.SIGTERM)
            try:
                parent.wait(20_000 * MS)
            except subprocess.TimeoutExpired:
                parent.kill()
                parent.wait()
        for pid in workers + _children(parent.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_workers_2_share_one_port_and_stop_together_on_sigterm(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Two workers on one port: both node ids in welcomes and /api/nodes; SIGTERM → exit 0."""
    async with _supervised(own_redis, tmp_path, "w") as run:
        fleet, parent = run.fleet, run.parent
        assert [n["node"] for n in run.nodes["nodes"]] == ["wk-w0", "wk-w1"]
        spread = fleet.by_node()
        assert set(spread) == {"wk-w0", "wk-w1"}, spread
        async with TickPublisher(own_redis.url, run.ids, 200 * MS) as publisher:
            await publisher.wait_ticks(3)
        await wait_delivered(fleet, publisher.accepted, 10_000 * MS)
        assert all(c.seqs == publisher.accepted[c.client_id] for c in fleet)
        connections: dict[str, int] = {}
        deadline = time.monotonic() + 10_000 * MS
        while connections != spread:  # as of each worker's last heartbeat
            assert time.monotonic() < deadline, f"/api/nodes says {connections}"
            _, body = await get_json(run.http, f"{run.base}/api/nodes")
            connections = {n["node"]: n["connections"] for n in body["nodes"]}
            await asyncio.sleep(100 * MS)
        started = time.monotonic()
        parent.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(parent.wait, 20_000 * MS)
        stopped_after = time.monotonic() - started
        closes = {cl.code for c in fleet for cl in c.closes if cl.welcomed}
        assert code == 0, run.log_tail()
        assert closes == {1012}, closes
        assert not [pid for pid in run.workers if Path(f"/proc/{pid}").exists()]
    print(
        f"\nMEASURED --workers 2: {CLIENTS} clients on one port spread {spread};"
        f" /api/nodes connections {connections}; {publisher.total} events delivered;"
        f" SIGTERM to the parent: both workers drained (1012) and the parent exited"
        f" {code} after {stopped_after:.2f} s"
    )


async def test_a_killed_worker_is_restarted_and_its_clients_lose_nothing(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """SIGKILL one worker: the supervisor starts it again (logged), new clients reach it,
    and the clients it had reconnect and get every event."""
    async with _supervised(own_redis, tmp_path, "k") as run:
        fleet, parent, before = run.fleet, run.parent, run.workers
        async with TickPublisher(own_redis.url, run.ids, 200 * MS) as publisher:
            await publisher.wait_ticks(2)
            os.kill(before[0], signal.SIGKILL)
            deadline = time.monotonic() + 20_000 * MS
            while not (after := [p for p in _children(parent.pid) if p not in before]):
                assert parent.poll() is None, run.log_tail()
                assert time.monotonic() < deadline, "the killed worker never came back"
                await asyncio.sleep(100 * MS)
            await publisher.wait_ticks(3)
        await wait_delivered(fleet, publisher.accepted, 20_000 * MS)
        assert all(c.seqs == publisher.accepted[c.client_id] for c in fleet)
        assert fleet.duplicates == 0
        assert parent.poll() is None
        nodes: set[str] = set()
        deadline = time.monotonic() + 20_000 * MS
        while nodes != {"wk-w0", "wk-w1"}:  # the restarted worker serves again
            assert time.monotonic() < deadline, f"new clients reached only {nodes}"
            fresh = [f"n-{len(nodes)}-{i}" for i in range(20)]
            async with Fleet({c: f"ws://127.0.0.1:{run.port}/ws/{c}" for c in fresh}) as probe:
                await probe.wait_connected()
                nodes |= set(probe.by_node())
        (exited,) = run.log_events("worker.exited")
        assert (exited["level"], exited["code"]) == ("error", -signal.SIGKILL), exited
        (restarted,) = run.log_events("worker.restarted")
        assert (restarted["level"], restarted["crashes_in_a_row"]) == ("warning", 1), restarted
        assert alive(after[0])


async def test_a_worker_recycled_with_sigterm_is_back_at_once_and_not_a_crash(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM to one worker: it drains, exits 0 and is started again at once, logged at
    info; a recycle is no crash, so it does not count in the crashes in a row."""
    async with _supervised(own_redis, tmp_path, "r") as run:
        target = run.workers[0]
        os.kill(target, signal.SIGTERM)
        deadline = time.monotonic() + 20_000 * MS
        while not (restarted := run.log_events("worker.restarted")):
            assert run.parent.poll() is None, run.log_tail()
            assert time.monotonic() < deadline, "the recycled worker never came back"
            await asyncio.sleep(50 * MS)
        new = [p for p in _children(run.parent.pid) if p not in run.workers]
        assert not alive(target) and len(new) == 1
        exited = run.log_events("worker.exited")
        exits = [(e["level"], e["code"], e["restart_in_s"]) for e in exited]
        assert exits == [("info", 0, 0.0)], exits
        restarts = [(e["level"], e["crashes_in_a_row"]) for e in restarted]
        assert restarts == [("info", 0)], restarts
        assert alive(new[0]) and run.parent.poll() is None


def _start_supervisor(redis: RedisServer, log_path: Path) -> subprocess.Popen[bytes]:
    """``relay serve --workers 2``, its JSON log in ``log_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_DRAIN_GRACE="1", RELAY_LOG_FORMAT="json")
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [str(RELAY), "serve", "--host", "127.0.0.1", "--port", str(free_port()),
             "--workers", "2", "--node-id", "ws", "--redis-url", redis.url,
             "--allow-anonymous"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
        )  # fmt: skip


async def _first_workers(parent: subprocess.Popen[bytes], count: int) -> list[int]:
    """The supervisor's first ``count`` workers, as soon as they exist (forked, perhaps
    not yet running Python)."""
    deadline = time.monotonic() + 10_000 * MS
    while len(children := _children(parent.pid)) < count:
        assert parent.poll() is None and time.monotonic() < deadline, "no workers"
        await asyncio.sleep(1 * MS)
    return children


async def test_a_worker_stopped_while_starting_exits_0_and_is_no_crash(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM to a worker the moment it exists, before its interpreter has started:
    it was told to stop, so it exits 0 and is started again at once, logged at info, not
    a crash (it was killed by the signal, a crash restarted with backoff, before)."""
    log_path = tmp_path / "workers.log"
    parent = _start_supervisor(own_redis, log_path)
    try:
        target = (await _first_workers(parent, 1))[0]
        os.kill(target, signal.SIGTERM)
        deadline = time.monotonic() + 20_000 * MS
        while not (restarted := _log_events(log_path, "worker.restarted")):
            assert parent.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            await asyncio.sleep(50 * MS)
        exited = _log_events(log_path, "worker.exited")
        exits = [(e["level"], e["code"], e["restart_in_s"]) for e in exited]
        assert exits == [("info", 0, 0.0)], exits
        restarts = [(e["level"], e["crashes_in_a_row"]) for e in restarted]
        assert restarts == [("info", 0)], restarts
    finally:
        parent.send_signal(signal.SIGTERM)
        parent.wait(20_000 * MS)


async def test_a_supervisor_stopped_while_its_workers_start_exits_0(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM to the supervisor as soon as its workers exist: each is told to stop and
    does so cleanly, so the supervisor exits 0 (143 before: a worker that got the signal
    before its handler was killed by it)."""
    log_path = tmp_path / "workers.log"
    parent = _start_supervisor(own_redis, log_path)
    try:
        workers = await _first_workers(parent, 2)
        parent.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(parent.wait, 20_000 * MS)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert code == 0, log_path.read_text()[-3000:]
    assert not [pid for pid in workers if alive(pid)]


async def test_a_sigkilled_supervisor_leaves_no_worker_behind(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """SIGKILL the supervisor: its workers drain their clients (1012) and exit."""
    async with _supervised(own_redis, tmp_path, "o") as run:
        fleet = run.fleet
        started = time.monotonic()
        run.parent.kill()
        run.parent.wait()
        # drain grace 1 s: the workers are gone well within 10 s
        while left := [pid for pid in run.workers if alive(pid)]:
            assert time.monotonic() - started < 10_000 * MS, f"orphans: {left}"
            await asyncio.sleep(50 * MS)
        gone_after = time.monotonic() - started
        await fleet.wait(lambda: all(c.closes for c in fleet), 5000 * MS, "every close")
        closes = {cl.code for c in fleet for cl in c.closes if cl.welcomed}
        assert closes == {1012}, closes
    print(
        f"\nMEASURED supervisor SIGKILLed: both workers drained and gone after {gone_after:.2f} s"
    )


async def test_a_draining_worker_hands_its_clients_reconnects_to_the_others(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM to one worker: its clients (1012) reconnect to the other worker on their
    first try, none refused by the draining one, and lose nothing."""
    async with _supervised(own_redis, tmp_path, "d") as run:
        fleet = run.fleet
        spread = fleet.by_node()
        async with TickPublisher(own_redis.url, run.ids, 200 * MS) as publisher:
            await publisher.wait_ticks(2)
            os.kill(run.workers[0], signal.SIGTERM)
            await fleet.wait(lambda: not alive(run.workers[0]), 20_000 * MS, "the drain")
            await publisher.wait_ticks(3)
        await wait_delivered(fleet, publisher.accepted, 20_000 * MS)
        assert all(c.seqs == publisher.accepted[c.client_id] for c in fleet)
        drained = [c for c in fleet if any(cl.code == 1012 for cl in c.closes)]
        refused = {
            c.client_id: [(cl.code, cl.welcomed) for cl in c.closes]
            for c in fleet
            if c.connect_errors or any(not cl.welcomed for cl in c.closes)
        }
    (node,) = {c.welcomes[0].node for c in drained}  # the drained worker's clients
    assert len(drained) == spread[node] > 0, (spread, len(drained))
    assert refused == {}, refused
