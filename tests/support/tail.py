"""`relay tail` in a subprocess, as an operator runs it: its output lines and its exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from tests.support.timing import MS


@dataclass
class Tail:
    """``relay tail`` as a user runs it: its stdout lines, its stderr lines, its exit."""

    proc: asyncio.subprocess.Process
    out: list[dict[str, object]] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, *args: str) -> Tail:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "tail",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        tail = cls(proc)
        tail.readers = [
            asyncio.create_task(
                tail._read(proc.stdout, lambda line: tail.out.append(orjson.loads(line)))
            ),
            asyncio.create_task(
                tail._read(proc.stderr, lambda line: tail.err.append(line.decode()))
            ),
        ]
        return tail

    @staticmethod
    async def _read(stream: asyncio.StreamReader | None, keep: Callable[[bytes], None]) -> None:
        assert stream is not None
        while line := await stream.readline():
            keep(line)

    def welcomed(self) -> bool:
        return any('"welcome"' in line for line in self.err)

    async def exit_code(self, timeout: float = 20_000 * MS) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self.readers)
        return code

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                await self.proc.wait()
        await asyncio.gather(*self.readers, return_exceptions=True)
