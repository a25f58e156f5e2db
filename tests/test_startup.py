"""`relay serve` started while Redis is unreachable: it waits, says why, serves when Redis comes.

Real processes: a `relay serve` pointed at a port where nothing listens yet, then a real
redis-server started on that port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from backend_adapter import AsyncPublisher
from relay.protocol import CloseCode
from tests.support.ports import free_port, wait_port
from tests.support.redis_server import RedisServer
from tests.support.timing import MS

RELAY = [sys.executable, "-m", "relay"]
ROOT = Path(__file__).resolve().parents[1]
LB_HEADERS = {"X-Relay-Lb-Retry": "1"}


class Served:
    """One `relay serve` process with its log in a file."""

    def __init__(self, tmp: Path, redis_port: int, *args: str) -> None:
        self.port = free_port()
        self.log_path = tmp / "node.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *RELAY,
                    "serve",
                    "--allow-anonymous",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--redis-url",
                    f"redis://127.0.0.1:{redis_port}/0",
                    "--node-id",
                    "patient",
                    "--log-format",
                    "json",
                    *args,
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                record = orjson.loads(line)
                if record.get("event") == name:
                    out.append(record)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30_000 * MS)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for node in started:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10_000 * MS)


async def _status(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    async with http.get(url) as response:
        return response.status, await response.json(content_type=None)


async def test_serve_waits_for_redis_unready_then_serves_when_it_comes(
    tmp_path: Path, served: list[Served]
) -> None:
    """Redis away at start: healthz 200, readyz 503 with the reason, handshakes refused at
    once (1013, or 503 for a retrying balancer), node.start_failed logged; then ready."""
    redis_port = free_port()
    node = Served(tmp_path, redis_port)
    served.append(node)
    await asyncio.to_thread(wait_port, node.port, 20)
    async with aiohttp.ClientSession() as http:
        assert (await _status(http, f"{node.base}/healthz"))[0] == 200
        deadline = time.monotonic() + 20_000 * MS
        while "error" not in (body := (await _status(http, f"{node.base}/readyz"))[1]):
            assert body["reason"] == "starting", body  # 503, before the first attempt failed
            assert time.monotonic() < deadline, body
            await asyncio.sleep(50 * MS)
        status, body = await _status(http, f"{node.base}/readyz")
        assert status == 503 and body["reason"] == "starting", body
        assert "redis is unreachable" in str(body["error"]), body

        began = time.monotonic()
        async with http.ws_connect(f"ws://127.0.0.1:{node.port}/ws/early") as ws:
            msg = await ws.receive(timeout=5_000 * MS)
        plain = time.monotonic() - began
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == CloseCode.TRY_AGAIN_LATER
        began = time.monotonic()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"ws://127.0.0.1:{node.port}/ws/early", headers=LB_HEADERS)
        balanced = time.monotonic() - began
        assert refused.value.status == 503
        assert refused.value.headers is not None and refused.value.headers["Retry-After"] == "0"

        redis = await asyncio.to_thread(RedisServer(port=redis_port).start)
        try:
            came = time.monotonic()
            while (await _status(http, f"{node.base}/readyz"))[0] != 200:
                assert time.monotonic() - came < 15_000 * MS, "not ready 15 s after Redis came"
                await asyncio.sleep(50 * MS)
            ready_after = time.monotonic() - came
            async with http.ws_connect(f"ws://127.0.0.1:{node.port}/ws/late") as ws:
                welcome = orjson.loads((await ws.receive(timeout=5_000 * MS)).data)
                assert welcome["type"] == "welcome"
                async with AsyncPublisher(redis.url) as publisher:
                    await publisher.publish("late", "hello", {"n": 1})
                message = orjson.loads((await ws.receive(timeout=5_000 * MS)).data)
                assert (message["event"], message["data"]) == ("hello", {"n": 1})
        finally:
            exit_code = await asyncio.to_thread(node.stop)
            await asyncio.to_thread(redis.close)
    failures = node.events("node.start_failed")
    assert failures and all("redis is unreachable" in str(f["error"]) for f in failures)
    assert node.events("node.started")
    assert exit_code == 0
    print(
        f"\nMEASURED start without Redis: handshake refused in {plain * 1000:.1f} ms (1013),"
        f" {balanced * 1000:.1f} ms (503 with X-Relay-Lb-Retry);"
        f" {len(failures)} start attempts logged; ready {ready_after:.2f} s after Redis came"
    )


def test_serve_start_timeout_exits_2_saying_why(tmp_path: Path, served: list[Served]) -> None:
    """--start-timeout 1 with Redis away: exit 2 within seconds, and stderr says why."""
    node = Served(tmp_path, free_port(), "--start-timeout", "1")
    served.append(node)
    began = time.monotonic()
    code = node.proc.wait(20_000 * MS)
    took = time.monotonic() - began
    assert code == 2
    text = node.log_path.read_text()
    assert "relay: Redis at redis://127.0.0.1:" in text, text[-2000:]
    assert "redis is unreachable" in text and "gave up after 1 s" in text, text[-2000:]
    assert "--redis-url (RELAY_REDIS_URL)" in text, text[-2000:]
    assert node.events("node.start_timed_out")
    assert took < 10


def test_serve_stopped_while_waiting_for_redis_exits_0(
    tmp_path: Path, served: list[Served]
) -> None:
    """SIGTERM while the node still waits for Redis: a clean exit 0, not a traceback."""
    node = Served(tmp_path, free_port())
    served.append(node)
    wait_port(node.port, 20_000 * MS)
    deadline = time.monotonic() + 20_000 * MS
    while not node.events("node.start_failed"):
        assert time.monotonic() < deadline
        time.sleep(50 * MS)
    assert node.stop() == 0
    assert "Traceback" not in node.log_path.read_text()
