"""``make demo``: the seed's scenario, live. A private Redis, a relay node and this label
service, started with one command; Ctrl-C stops everything it started.

It prints two addresses: the admin page (create, move and delete labels: what the seed's
Vue app did) and the client canvas (one client's labels drawn live through
relay-client.js: what the seed's WPF window did). Stop and start the node meanwhile
(``--restart-node-every``, or kill its pid): the canvas catches up.

The label service publishes straight to Redis through its outbox, so Redis is a real
``redis-server`` on a free loopback port (no persistence: a demo). Each child runs in a
session of its own, so Ctrl-C reaches only this launcher, which stops them in order:
service (its outbox dispatcher finishes), node (drains), Redis. Their logs go to files in
a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
CLIENT_ID = "cml"


class DemoError(Exception):
    """Something the demo cannot start with; the message says what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _wait(
    what: str, check: object, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Poll ``check()`` until it is true; fail early, with the log's tail, if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise DemoError(f"{what} exited with {proc.returncode}:\n  " + "\n  ".join(tail))
        with contextlib.suppress(OSError, urllib.error.URLError):
            if check():  # type: ignore[operator]
                return
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not come up within {timeout:.0f} s (log: {log})")
        time.sleep(0.05)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as answer:
        return bool(answer.status == 200)


def _redis_pong(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


class Demo:
    """Redis, one relay node and the label service as child processes on ``host``."""

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        node_port: int = 8080,
        service_port: int = 8090,
        redis_port: int | None = None,
        python: str = sys.executable,
    ) -> None:
        self.workdir = workdir
        self.host = host
        self.node_port = node_port
        self.service_port = service_port
        self.redis_port = redis_port or free_port(host)
        self.python = python
        self.secret = secrets.token_urlsafe(32)  # connection tokens: node and service share it
        self.api_key = secrets.token_urlsafe(16)  # the node's HTTP API and status page
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def node_url(self) -> str:
        return f"http://{self.host}:{self.node_port}"

    @property
    def service_url(self) -> str:
        return f"http://{self.host}:{self.service_port}"

    @property
    def admin_url(self) -> str:
        return f"{self.service_url}/"

    @property
    def canvas_url(self) -> str:
        return f"{self.service_url}/canvas?client={CLIENT_ID}"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Demo:
        for name, port in (("relay node", self.node_port), ("label service", self.service_port)):
            if not port_is_free(self.host, port):
                raise DemoError(
                    f"port {port} for the {name} is in use (another `make run` or `make demo`?):"
                    " choose others, e.g. `make demo PORT=8180 DEMO_SERVICE_PORT=8190`"
                )
        if shutil.which("redis-server") is None:
            raise DemoError("redis-server is missing: apt-get install redis-server")
        try:
            self.start_redis()
            self.start_node()
            self.start_service()
        except BaseException:
            self.stop()
            raise
        return self

    def start_redis(self) -> None:
        proc = self._spawn(
            "redis",
            [
                "redis-server",
                "--bind", self.host,
                "--port", str(self.redis_port),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
            ],
        )  # fmt: skip
        _wait("redis-server", lambda: _redis_pong(self.host, self.redis_port), proc,
              self.log_path("redis"), 15)  # fmt: skip

    def restart_redis(self) -> None:
        """Stop Redis and start an empty one on the same port (no persistence: history gone)."""
        self._stop("redis")
        self.start_redis()

    def start_node(self) -> None:
        env = {
            "RELAY_AUTH_SECRET": self.secret,  # in the environment, not in `ps`
            "RELAY_API_KEY": self.api_key,
        }
        proc = self._spawn(
            "relay",
            [
                self.python, "-m", "relay", "serve",
                "--host", self.host,
                "--port", str(self.node_port),
                "--redis-url", self.redis_url,
                "--node-id", "demo-node",
                "--drain-grace", "1",
            ],
            env,
        )  # fmt: skip
        _wait("the relay node", lambda: _http_ok(f"{self.node_url}/readyz"), proc,
              self.log_path("relay"), 30)  # fmt: skip

    def stop_node(self) -> None:
        """SIGTERM the node and wait: it drains (clients get 1012) and exits."""
        self._stop("relay")

    def start_service(self) -> None:
        env = {"RELAY_AUTH_SECRET": self.secret}
        proc = self._spawn(
            "service",
            [
                self.python, "-m", "examples.label_service",
                "--host", self.host,
                "--port", str(self.service_port),
                "--db", f"sqlite:///{self.workdir / 'labels.db'}",
                "--redis-url", self.redis_url,
                "--relay-url", self.node_url,
            ],
            env,
        )  # fmt: skip
        _wait("the label service", lambda: _http_ok(f"{self.service_url}/demo.json"), proc,
              self.log_path("service"), 30)  # fmt: skip

    def stop(self) -> None:
        """Stop what runs, in order: the service, the node, Redis."""
        for name in ("service", "relay", "redis"):
            self._stop(name)

    def dead(self) -> list[str]:
        """Children that exited on their own."""
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self._logs.get(name)
        if log is None:
            log = self._logs[name] = self.log_path(name).open("ab")
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops them in order
        )
        self.procs[name] = proc
        return proc

    def _stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log = self._logs.pop(name, None)
        if log is not None:
            log.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.label_service.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="the relay node's port")
    parser.add_argument("--service-port", type=int, default=8090, help="the label service's")
    parser.add_argument(
        "--restart-node-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="stop the node and start it again this often, to watch the canvas catch up",
    )
    args = parser.parse_args(argv)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="relay-demo-"))
    demo = Demo(workdir, host=args.host, node_port=args.port, service_port=args.service_port)
    try:
        try:
            demo.start()
        except DemoError as exc:
            print(f"make demo: {exc}", file=sys.stderr)
            return 2
        print(
            f"""
Relay demo: Redis {demo.redis_url}, relay node {demo.node_url}, label service {demo.service_url}

  admin page     {demo.admin_url}
                 create, move (drag) and delete labels of client "{CLIENT_ID}"
  client canvas  {demo.canvas_url}
                 what client "{CLIENT_ID}" sees, live, through relay-client.js

  relay status   {demo.node_url}/   (API key: {demo.api_key})
  restart node   kill {demo.procs["relay"].pid}   (the canvas reconnects when it is back;
                 or run with --restart-node-every 20)
  logs           {workdir}

Ctrl-C stops everything.
""",
            flush=True,
        )
        last_restart = time.monotonic()
        while not stop:
            time.sleep(0.2)
            if (
                args.restart_node_every
                and time.monotonic() - last_restart > args.restart_node_every
            ):
                print("stopping the relay node …", flush=True)
                demo.stop_node()
                time.sleep(2)
                demo.start_node()
                print(f"relay node is back (pid {demo.procs['relay'].pid})", flush=True)
                last_restart = time.monotonic()
                continue
            dead = demo.dead()
            if "relay" in dead and not stop:
                print("the relay node exited; starting it again …", flush=True)
                demo.procs.pop("relay")
                time.sleep(2)
                demo.start_node()
                print(f"relay node is back (pid {demo.procs['relay'].pid})", flush=True)
            elif dead and not stop:
                print(f"make demo: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
        print("stopping …", flush=True)
        return 0
    finally:
        demo.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
