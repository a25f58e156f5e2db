"""The docs run: every Python block is a program run here against a real node and Redis,
or is marked as a fragment; every ``relay …`` command line parses (``relay serve`` lines
pass ``relay config check``); no link leaves the repository.

How a Markdown file marks a block (an HTML comment on the line just before the fence,
which GitHub does not show; the fence keeps ``python`` for highlighting):

- nothing: a complete program. It runs in a subprocess, in an empty directory, with
  the environment the CLI reads: ``RELAY_URL`` (ws://…), ``RELAY_HTTP`` (http://…),
  ``RELAY_REDIS_URL``, ``RELAY_AUTH_SECRET``, ``RELAY_API_KEY``, for one ``relay serve``
  on a private Redis, and must exit 0.
- ``<!-- runs until stopped -->``: a complete program that runs until it is stopped
  (a client's loop). While it runs, events are published to client ``cml``; it must
  print a line, and is then stopped.
- ``<!-- fragment -->``: a piece of a program (a signature, a function to place in a
  framework); it is only shown.
- ``<!-- NAME -->`` where NAME appears in another test module: that test extracts and runs
  the block (e.g. ``raw-publish: python`` in tests/backend_adapter/test_wire_docs.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

import relay_cli as cli
from backend_adapter import outbox
from relay.bench import runner
from tests.support.redis_server import RedisServer
from tests.support.served import RELAY, ServedNode
from tests.support.timing import MS

ROOT = Path(__file__).resolve().parents[1]
SECRET = "docs-test-secret-0123456789abcdef0123456789"
API_KEY = "docs-test-api-key"
PYTHON = ("python", "py", "python3")
FRAGMENT = "fragment"
LONG_RUNNING = "runs until stopped"


def doc_files() -> list[Path]:
    """README.md, docs/*.md and the READMEs of clients/, deploy/, packaging/, examples/."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("clients", "deploy", "packaging", "examples"):
        files += sorted((ROOT / folder).glob("**/README.md"))
    return [f for f in files if "node_modules" not in f.parts]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    marker: str | None  # the text of an HTML comment on the line before the fence
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+)\s*([^\s`]*)", lines[i])
        if not fence:
            i += 1
            continue
        indent, ticks, lang = fence.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != ticks:
            end += 1
        prev = lines[i - 1].strip() if i > 0 else ""
        comment = re.fullmatch(r"<!--\s*(.*?)\s*-->", prev)
        code = "\n".join(line.removeprefix(indent) for line in lines[i + 1 : end])
        yield Block(path, i + 1, lang.lower(), comment.group(1) if comment else None, code + "\n")
        i = end + 1


ALL_BLOCKS = [b for f in doc_files() for b in blocks(f)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in PYTHON]


def _other_tests_text() -> str:
    return "\n".join(
        p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_docs.py"
    )


def _runnable(block: Block) -> bool:
    return block.marker is None or block.marker == LONG_RUNNING


def test_docs_python_blocks_are_programs_or_marked() -> None:
    """Every Python block is a program (run below) or carries a marker that says otherwise."""
    others = _other_tests_text()
    wrong = []
    for block in PYTHON_BLOCKS:
        if block.marker in (None, LONG_RUNNING):
            try:
                compile(block.code, block.where, "exec")
            except SyntaxError as exc:
                wrong.append(
                    f"{block.where}: not a complete program ({exc.msg}, line {exc.lineno});"
                    f" make it one (asyncio.run(main())) or mark it <!-- {FRAGMENT} -->"
                )
        elif block.marker != FRAGMENT and block.marker not in others:
            wrong.append(
                f"{block.where}: marker <!-- {block.marker} --> is neither"
                f" <!-- {FRAGMENT} -->, <!-- {LONG_RUNNING} --> nor a block another test runs"
            )
    assert not wrong, "\n".join(wrong)


@pytest.fixture(scope="module")
def docs_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One ``relay serve`` on a private Redis; the environment the doc programs read."""
    redis = RedisServer().start()
    node = ServedNode(
        tmp_path_factory.mktemp("docs-node"),
        "--redis-url",
        redis.url,
        "--auth-secret",
        SECRET,
        "--api-key",
        API_KEY,
    )
    try:
        node.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env |= {
            "RELAY_URL": f"ws://127.0.0.1:{node.port}",
            "RELAY_HTTP": node.base,
            "RELAY_REDIS_URL": redis.url,
            "RELAY_AUTH_SECRET": SECRET,
            "RELAY_API_KEY": API_KEY,
            "PYTHONPATH": str(ROOT),
        }
        yield env
    finally:
        node.stop()
        redis.kill()


def _publish(env: dict[str, str], biz_id: str) -> None:
    body = json.dumps({"biz_id": biz_id, "event": "label.created", "data": {"id": 1}})
    request = urllib.request.Request(
        f"{env['RELAY_HTTP']}/api/publish",
        data=body.encode(),
        headers={"Authorization": f"Bearer {env['RELAY_API_KEY']}"},
    )
    with urllib.request.urlopen(request, timeout=5000 * MS) as response:
        assert response.status == 200


def _history(env: dict[str, str]) -> int:
    """Events held in Redis, over every BizId's history stream."""
    client = redis.Redis.from_url(env["RELAY_REDIS_URL"])
    try:
        return sum(client.xlen(key) for key in client.scan_iter("relay:{*}:log"))
    finally:
        client.close()


@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if _runnable(b)], ids=lambda b: b.where)
def test_docs_python_block_runs(block: Block, docs_node: dict[str, str], tmp_path: Path) -> None:
    """A Python program of the docs runs against a real node and Redis without an error."""
    before = _history(docs_node)
    workdir = tmp_path / "work"
    workdir.mkdir()
    script = tmp_path / "example.py"
    script.write_text(block.code)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=workdir,
            env=docs_node,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
        try:
            if block.marker == LONG_RUNNING:
                deadline = time.monotonic() + 30_000 * MS
                while not out.read_text().strip():
                    assert proc.poll() is None, f"{block.where} exited {proc.returncode}"
                    assert time.monotonic() < deadline, f"{block.where} printed nothing"
                    _publish(docs_node, "cml")
                    time.sleep(200 * MS)
            else:
                proc.wait(60_000 * MS)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    report = f"{block.where}:\nstdout: {out.read_text()}\nstderr: {err.read_text()}"
    if block.marker != LONG_RUNNING:
        assert proc.returncode == 0, report
    if "publish" in block.code:  # it reached the history, not only a logged failure
        assert _history(docs_node) > before, f"published nothing\n{report}"


def _relay_commands() -> Iterator[tuple[Block, int, list[str]]]:
    """Every ``relay …`` line (or ``$(relay …)``) of a shell or untyped block, continuation
    lines joined."""
    for block in ALL_BLOCKS:
        if block.lang not in ("", "bash", "sh", "shell", "console"):
            continue
        lines = block.code.split("\n")
        i = 0
        while i < len(lines):
            first = i
            text = lines[i].strip().removeprefix("$ ")
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            i += 1
            inner = re.search(r"\$\((relay\s[^)]*)\)", text)  # TOKEN=$(relay token …)
            text = inner.group(1) if inner else text
            if not re.match(r"^(\S*/)?relay\s", text):
                continue
            words = shlex.split(text, comments=True)
            words = words[: words.index("&")] if "&" in words else words
            words = [w for w in words if w != "…"]
            yield block, block.line + 1 + first, words[1:]


def test_docs_relay_commands_parse() -> None:
    """Every ``relay …`` command line in the docs is accepted by the CLI's parser."""
    # As relay_cli.main: these two commands have parsers of their own.
    own = {"outbox-dispatch": outbox.build_parser(), "bench": runner.build_parser()}
    wrong = []
    for block, line, argv in _relay_commands():
        try:
            if argv[:1] and argv[0] in own:
                own[argv[0]].parse_args(argv[1:])
            else:
                cli.build_parser().parse_args(argv)
        except SystemExit:
            wrong.append(f"{block.path.relative_to(ROOT)}:{line}: relay {shlex.join(argv)}")
    assert not wrong, "the CLI refuses:\n" + "\n".join(wrong)


SHELL_VALUES = {"$SECRET": SECRET, "$(hostname)": "node-1"}
"""What the docs' shell variables stand for; any other ``$…`` is an API key."""


def test_docs_serve_commands_pass_config_check(tmp_path: Path) -> None:
    """Every ``relay serve …`` line of the docs passes ``relay config check`` with its flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    wrong = []
    for block, line, argv in _relay_commands():
        if argv[:1] != ["serve"]:
            continue
        flags = [SHELL_VALUES.get(w, API_KEY) if w.startswith("$") else w for w in argv[1:]]
        result = subprocess.run(
            [str(RELAY), "config", "check", *flags],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60_000 * MS,
        )
        if result.returncode != 0:
            where = f"{block.path.relative_to(ROOT)}:{line}"
            wrong.append(f"{where}: relay {shlex.join(argv)}: {result.stderr.strip()}")
    assert not wrong, "\n".join(wrong)


OUTSIDE = re.compile(
    r"\.\./shared|DESIGN\.md|FIELD-NOTES\.md|STYLE\.md|/work/|shared (bench|harness)", re.I
)


def test_docs_stand_alone() -> None:
    """The docs name nothing outside the repository, and their relative links resolve in it."""
    wrong = []
    for path in doc_files():
        text = path.read_text()
        for number, line in enumerate(text.split("\n"), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            for found in OUTSIDE.findall(line):
                wrong.append(f"{where}: names {found!r}, outside the repository")
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z]+:|^#", target):
                    continue
                resolved = (path.parent / target.split("#")[0]).resolve()
                if not resolved.is_relative_to(ROOT) or not resolved.exists():
                    wrong.append(f"{where}: link {target} is not a file of the repository")
    assert not wrong, "\n".join(wrong)
