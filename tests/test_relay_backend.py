"""relay-backend (packaging/relay-backend): backend_adapter installed without the server.

The distribution is built and installed by pip into an empty virtualenv, as a backend
would install it; in that environment none of the server's dependencies may be
importable, and a publish through it must reach a client of a real node on a real
Redis. The virtualenv is kept between runs, keyed by a hash of every file it is built
from (building it takes a few seconds and PyPI for the dependencies).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.node import Listener, NodeUnderTest, listen, node_settings
from tests.support.redis_server import RedisServer
from tests.support.timing import MS

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "packaging" / "relay-backend"
SERVER_ONLY = ("aiohttp", "orjson", "structlog", "prometheus_client", "uvloop", "sqlalchemy")

SCRIPT = """
import asyncio, importlib.util, json, sys
from importlib import metadata

absent = [m for m in sys.argv[2].split(",") if importlib.util.find_spec(m) is not None]
from backend_adapter import AsyncPublisher, Publisher, issue_token
import relay.wire

with Publisher(sys.argv[1]) as publisher:
    first = publisher.publish("cml", "label.created", {"id": 1}, mid="m-1")
    again = publisher.publish("cml", "label.created", {"id": 1}, mid="m-1")

async def publish_async():
    async with AsyncPublisher(sys.argv[1]) as publisher:
        return await publisher.publish("cml", "label.moved", {"id": 1, "x": 2.5})

second = asyncio.run(publish_async())
print(json.dumps({
    "importable_server_modules": absent,
    "requires": sorted(metadata.requires("relay-backend") or []),
    "wire_from": relay.wire.__file__,
    "ids": [first.id, again.id, second.id],
    "duplicate": again.duplicate,
    "token": issue_token("s" * 32, "cml", ttl=60),
}))
"""


def _source_hash() -> str:
    """Every file the distribution is built from, and the Python that runs it."""
    files = [DIST / "pyproject.toml", DIST / "README.md"]
    files += [
        ROOT / "relay" / name
        for name in ("__init__.py", "wire.py", "errors.py", "redis_url.py", "redis_pool.py")
    ]
    files += sorted((ROOT / "relay" / "lua").glob("*.lua"))
    files += sorted((ROOT / "backend_adapter").rglob("*.py"))
    digest = hashlib.sha256(sys.version.encode())
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def backend_venv() -> Path:
    """An empty virtualenv with relay-backend installed by pip from the repository."""
    venv = Path(tempfile.gettempdir()) / f"relay-backend-venv-{_source_hash()}"
    python = venv / "bin" / "python"
    if python.exists():
        return venv
    building = Path(tempfile.mkdtemp(prefix="relay-backend-building-"))
    try:
        # Built aside, then renamed into place: a concurrent run finds either nothing or a
        # finished venv. Only bin/python is used, so scripts naming the build path are moot.
        subprocess.run(
            [sys.executable, "-m", "venv", str(building)], check=True, timeout=120_000 * MS
        )
        subprocess.run(
            [
                str(building / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                str(DIST),
            ],
            check=True,
            timeout=300_000 * MS,
            cwd=tempfile.gettempdir(),  # nothing of the repository on sys.path
        )
        with contextlib.suppress(OSError):  # another run finished first: use its venv
            building.rename(venv)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return venv


async def test_relay_backend_publishes_without_the_server_dependencies(
    backend_venv: Path,
    redis_server: RedisServer,
    started_nodes: list[NodeUnderTest],
    listeners: list[Listener],
) -> None:
    """In a venv with only relay-backend: no aiohttp, orjson…; its publishes reach a client."""
    node = await NodeUnderTest(node_settings(redis_url=redis_server.url)).start()
    started_nodes.append(node)
    client = await listen(listeners, node.ws_url("cml"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = await asyncio.to_thread(
        subprocess.run,
        [
            str(backend_venv / "bin" / "python"),
            "-c",
            SCRIPT,
            redis_server.url,
            ",".join(SERVER_ONLY),
        ],
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
        cwd=tempfile.gettempdir(),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["importable_server_modules"] == []
    requires = {re.match(r"[\w.-]+", r)[0].lower(): "extra ==" in r for r in out["requires"]}  # type: ignore[index]
    assert requires == {
        "redis": False,
        "msgpack": False,
        "pyjwt": False,
        "sqlalchemy": True,  # only with [sql]
        "orjson": True,
    }
    assert out["wire_from"].startswith(str(backend_venv))
    first, again, second = out["ids"]
    assert again == first and out["duplicate"] is True
    messages = await client.wait_messages(2)
    assert [(m["id"], m["event"], m["data"]) for m in messages] == [
        (first, "label.created", {"id": 1}),
        (second, "label.moved", {"id": 1, "x": 2.5}),
    ]
    assert out["token"].count(".") == 2


def _relay_imports(path: Path) -> tuple[set[str], set[str]]:
    """The ``relay.*`` modules and the top-level packages ``path`` imports at module level."""
    tree = ast.parse(path.read_text())
    relay_modules, packages = set(), set()
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            names = [alias.name for alias in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
            names = [stmt.module]
        else:
            continue
        for name in names:
            packages.add(name.split(".")[0])
            if name.startswith("relay."):
                relay_modules.add(name)
    return relay_modules, packages


def test_relay_backend_ships_every_relay_module_backend_adapter_imports() -> None:
    """The wheel's relay package holds exactly the modules backend_adapter imports, directly
    or through them, and those import none of the server's dependencies."""
    needed: set[str] = {"relay"}  # relay/__init__.py runs on any `import relay.x`
    todo = [p for p in (ROOT / "backend_adapter").rglob("*.py")]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        modules, packages = _relay_imports(path)
        if path.parent.name == "relay":
            assert not packages & set(SERVER_ONLY), (path.name, packages & set(SERVER_ONLY))
        for module in modules | ({"relay"} if path.parent.name != "relay" else set()):
            needed.add(module)
            file = ROOT / (module.replace(".", "/") + ".py")
            todo.append(file if file.exists() else ROOT / module / "__init__.py")
    text = (DIST / "pyproject.toml").read_text()
    shipped = set(re.findall(r'"\.\./\.\./relay/(\w+)\.py" = "relay/\1\.py"', text))
    expected = {m.removeprefix("relay.") if m != "relay" else "__init__" for m in needed}
    assert shipped == expected, "packaging/relay-backend/pyproject.toml: force-include these"
