"""The `relay` command as a user runs it: real processes, real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jwt

from relay.auth import verify_token
from tests.support.ports import free_port, wait_port
from tests.support.timing import MS

RELAY = [sys.executable, "-m", "relay"]
ROOT = Path(__file__).resolve().parents[1]


def _serve_until(line: str, *flags: str) -> subprocess.Popen[str]:
    """Start `relay serve` and return once its log shows ``line`` (not before: a signal
    that lands while the interpreter is still importing has no handler yet)."""
    proc = subprocess.Popen(
        [*RELAY, "serve", "--allow-anonymous", "--port", "0", "--log-format", "json", *flags],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for out in proc.stdout:
        if line in out:
            return proc
    raise AssertionError(f"relay serve exited {proc.wait()} before logging {line}")


def test_serve_stopped_while_starting_exits_0() -> None:
    """SIGTERM that lands before the node listens still ends in a clean drain, exit 0:
    right after it is configured, and while it waits for an unreachable Redis."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    for line, flags in (
        ("node.configured", ()),
        ("node.start_failed", ("--redis-url", dead_redis)),
    ):
        proc = _serve_until(line, *flags)
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        with proc.stdout:
            proc.stdout.read()  # drain its log so it never blocks on a full pipe
        assert proc.wait(20_000 * MS) == 0, line


def test_publish_over_http_prints_the_result() -> None:
    """`relay publish BIZ EVENT JSON --http URL --api-key K` prints id/online/receivers."""
    port = free_port()
    node = subprocess.Popen(
        [
            *RELAY,
            "serve",
            "--allow-anonymous",
            "--api-key",
            "k",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--log-level",
            "error",
        ],
        cwd=ROOT,
    )
    try:
        wait_port(port, 20_000 * MS)
        out = subprocess.run(
            [
                *RELAY,
                "publish",
                "demo",
                "label.created",
                '{"id": 1}',
                "--http",
                f"http://127.0.0.1:{port}",
                "--api-key",
                "k",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30_000 * MS,
            check=True,
        ).stdout
        result = json.loads(out)
        assert set(result) == {"id", "online", "receivers", "duplicate"}
        assert result["online"] is False and result["duplicate"] is False
        wrong = subprocess.run(
            [
                *RELAY,
                "publish",
                "demo",
                "e",
                "--http",
                f"http://127.0.0.1:{port}",
                "--api-key",
                "nope",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30_000 * MS,
        )
        assert wrong.returncode == 2 and "401" in wrong.stderr
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(20_000 * MS) == 0


def test_token_prints_a_token_the_node_accepts() -> None:
    """`relay token ID --ttl N` prints an HS256 token for ID, expiring in N s; secret from env."""

    secret = "cli-test-secret-of-at-least-32-bytes!"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    before = time.time()
    out = subprocess.run(
        [*RELAY, "token", "cml", "--ttl", "600"],
        cwd=ROOT,
        env={**env, "RELAY_AUTH_SECRET": secret},
        capture_output=True,
        text=True,
        timeout=30_000 * MS,
        check=True,
    ).stdout
    token = out.strip()
    assert out == token + "\n"
    verify_token(token, (secret,), "cml")  # what a node checks; raises if refused
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "cml"
    assert before + 600 - 1 <= claims["exp"] <= time.time() + 600 + 1
    flag = subprocess.run(
        [*RELAY, "token", "cml", "--auth-secret", secret],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30_000 * MS,
        check=True,
    ).stdout.strip()
    verify_token(flag, (secret,), "cml")
    assert jwt.decode(flag, secret, algorithms=["HS256"])["exp"] >= before + 3600 - 1
    missing = subprocess.run(
        [*RELAY, "token", "cml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30_000 * MS,
    )
    assert missing.returncode == 2 and "--auth-secret" in missing.stderr
