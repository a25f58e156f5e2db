"""An operator's mistakes with the `relay` command: one line naming what to fix, exit 2.

Each mistake is made for real (a port taken by another socket, a Redis with another
password, a web server that is not a node) and the whole of stderr is checked: one
line, ``relay: …``, the flag or env var to fix, no traceback, no password.
"""

from __future__ import annotations

import http.server
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import relay
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

RELAY = [sys.executable, "-m", "relay"]
ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-in-the-url"


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [*RELAY, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def one_line_answer(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ``relay: …`` line an operator's mistake must produce (exit 2)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("relay: ")]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def web_page() -> Iterator[str]:
    """A web server that answers every request with HTML: not a relay node."""

    class Page(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>it works</html>")

        do_GET = do_POST = answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_cli_serve_on_a_taken_port_names_port_and_host(taken_port: int) -> None:
    """`relay serve --port P` with P taken: says so and which flags choose another."""
    answer = one_line_answer(
        run("serve", "--allow-anonymous", "--host", "127.0.0.1", "--port", str(taken_port))
    )
    assert f"127.0.0.1:{taken_port}" in answer and "already in use" in answer
    assert "--port" in answer and "RELAY_PORT" in answer


def test_cli_redis_with_another_password_names_the_masked_url() -> None:
    """A wrong Redis password: the URL is named with its password masked, and why."""
    server = RedisServer(password="the-right-one").start()
    try:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        answer = one_line_answer(run("publish", "cml", "e", "{}", "--redis-url", url))
        assert f"redis://:***@127.0.0.1:{server.port}/0" in answer
        assert "AuthenticationError" in answer and "--redis-url" in answer
        answer = one_line_answer(run("nodes", "--redis-url", url))
        assert f"redis://:***@127.0.0.1:{server.port}/0" in answer
    finally:
        server.close()


def test_cli_http_answered_by_something_else_asks_whether_it_is_a_node(web_page: str) -> None:
    """--http at a web server that is not a relay node: says what came back and the flag."""
    answer = one_line_answer(run("publish", "cml", "e", "--http", web_page, "--api-key", "k"))
    assert web_page in answer and "not JSON" in answer and "--http" in answer


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["publish", "cml", "e", "{not json", "--http", "http://127.0.0.1:1"], r"DATA is not JSON"),
        (["publish", "cml", "e", "--http", "127.0.0.1:8080"], r"--http \(or RELAY_HTTP\)"),
        (
            ["publish", "cml", "e", "--http", "http://127.0.0.1:{dead}", "--api-key", "k"],
            r"cannot reach a node at http://127\.0\.0\.1:\d+: .*refused.*--http \(RELAY_HTTP\)",
        ),
        (["nodes", "--http", "http://127.0.0.1:{dead}"], r"cannot reach a node"),
        (
            ["nodes", "--http", "http://relay.invalid:8080"],  # .invalid never resolves
            r"cannot reach a node at http://relay\.invalid:8080: (?!Unknown error)[A-Z]\w+ ",
        ),
        (["publish", "cml", "e"], r"--redis-url URL \(RELAY_REDIS_URL\) or --http"),
        (["publish", "cml", "e", "--redis-url", "127.0.0.1:6379"], r"--redis-url .*redis://"),
        (
            ["publish", "cml", "e", "--redis-url", "redis://:" + PASSWORD + "@127.0.0.1:{dead}/0"],
            r"Redis at redis://:\*\*\*@127\.0\.0\.1:\d+/0: .*(Error 111|refused).*--redis-url",
        ),
        (
            ["clients", "cml", "--redis-url", "redis://127.0.0.1:{dead}/0"],
            r"Redis at redis://127\.0\.0\.1:\d+/0: redis is unreachable.*(Error 111|refused)",
        ),
        (["serve", "--allow-anonymous", "--redis-url", "localhost:6379"], r"--redis-url"),
        (["serve", "--port", "eighty"], r"--port \(or RELAY_PORT\): 'eighty' is not a valid"),
        (["serve", "--allow-anonymous", "--port", "70000"], r"--port \(or RELAY_PORT\)"),
        (["serve", "--allow-anonymous", "--heartbeat", "0"], r"--heartbeat \(or RELAY_HEARTBEAT"),
        (["serve"], r"--auth-secret .*--allow-anonymous"),
        (["serve", "--auth-secret", "short"], r"shorter than 32 bytes.*--allow-weak-secret"),
        (["tail", "cml", "--url", "127.0.0.1:8080", "--api-key", "k"], r"--url \(or RELAY_URL\)"),
        (["tail", "cml"], r"--api-key \(or RELAY_API_KEY\)"),
        (["token", "cml"], r"--auth-secret \(or RELAY_AUTH_SECRET\)"),
    ],
)
def test_cli_mistake_is_one_line_naming_the_fix(argv: list[str], expected: str) -> None:
    """Each mistake: exit 2, one `relay: …` line that names the flag or env var to fix."""
    dead = str(free_port())  # nothing listens there
    answer = one_line_answer(run(*(arg.replace("{dead}", dead) for arg in argv)))
    assert re.search(expected, answer), answer


def test_cli_version_and_help_read_as_text() -> None:
    """`relay --version` prints the version; the top-level help has no reST markup."""
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"relay {relay.__version__}"
    top = run("--help").stdout
    assert "``" not in top and "serve" in top and "RELAY_<FLAG>" in top


@pytest.mark.parametrize("command", ["serve", "publish", "tail", "token", "clients", "nodes"])
def test_cli_help_shows_each_flags_env_var(command: str) -> None:
    """Every option in `relay COMMAND --help` names its env var (or says it has none)."""
    text = run(command, "--help").stdout
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]
    assert options
    for option in options:
        flat = " ".join(option.split())
        if flat.startswith("-h, --help"):
            continue
        assert re.search(r"\[env RELAY_[A-Z_]+\]|no env var", flat), flat
    if command == "serve":
        assert "(default: 8080) [env RELAY_PORT]" in " ".join(text.split())
