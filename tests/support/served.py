"""`relay serve` in a subprocess: the real CLI, its stderr, and its RSS from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.node import DEFLATE
from tests.support.ports import free_port
from tests.support.timing import MS

RELAY = Path(sys.executable).with_name("relay")
"""The console script installed next to the interpreter running the tests."""


class ServedNode:
    """One ``relay serve`` process on a free loopback port, stderr kept in a file."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        self.port = free_port()
        deflate = ("--compress", "--compress-min-size", "0") if DEFLATE else ()
        self.flags = ("--host", "127.0.0.1", "--port", str(self.port), *deflate, *flags)
        self.stderr_path = tmp_path / f"relay-{self.port}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, client_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{client_id}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15_000 * MS) -> ServedNode:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [str(RELAY), "serve", *self.flags],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay serve exited {self.proc.returncode}: {self.stderr()}")
            try:
                with urllib.request.urlopen(f"{self.base}/readyz", timeout=1000 * MS) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay serve not ready: {self.stderr()}")
            time.sleep(50 * MS)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def status(self, field: str) -> int:
        """A ``kB`` figure from /proc/<pid>/status, e.g. VmRSS (now) or VmHWM (peak)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self) -> int:
        """SIGTERM (the node drains), SIGKILL after 10 s; the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10_000 * MS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
