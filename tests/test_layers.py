"""The layering of STYLE.md, checked on the source: no import ever runs back up."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PURE = [
    "relay/errors.py",
    "relay/backoff.py",
    "relay/wire.py",
    "relay/protocol.py",
    "relay/auth.py",
    "relay/hub.py",
    "relay/frames.py",
    "relay/deflate.py",
    "relay/redis_url.py",
]
IO_LIBS = {"asyncio", "aiohttp", "redis", "socket", "structlog"}
# The one deliberate exception to "backend_adapter imports only pure relay modules": the
# pool factory imports redis (but does no I/O of its own). It sits beside the pure core,
# below the engines, so the engine and the publishers build their pools in one place, and
# relay-backend ships it.
REDIS_GLUE = ["relay/redis_pool.py"]
BACKEND_MAY_IMPORT = {
    "relay.wire",
    "relay.errors",
    "relay.redis_url",
    "relay.backoff",
    "relay.redis_pool",
}
ABOVE_ENGINES = {
    "relay.hub",
    "relay.node",
    "relay.session",
    "relay.ws",
    "relay.edge",
    "relay.api",
    "relay.app",
    "relay.status",
}


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against its package.

    ``from . import x`` names both the package and ``package.x`` (x may be a module).
    """
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = list(path.relative_to(root).parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module is not None
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1]
            assert base, f"{path}: relative import above the top package"
            if node.module:
                names.add(".".join([*base, node.module]))
            else:
                names.add(".".join(base))
                names.update(".".join([*base, alias.name]) for alias in node.names)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_io(module: str) -> None:
    """wire, protocol, errors, auth and hub import no asyncio, aiohttp, redis or sockets."""
    assert not {_top(n) for n in _imports(ROOT / module)} & IO_LIBS


@pytest.mark.parametrize(
    "module",
    sorted(
        str(p.relative_to(ROOT / "relay/engines")) for p in (ROOT / "relay/engines").rglob("*.py")
    ),
)
def test_engines_never_import_upward(module: str) -> None:
    """An engine knows neither the hub, the node, sessions nor aiohttp."""
    names = _imports(ROOT / "relay/engines" / module)
    assert not names & ABOVE_ENGINES
    assert "aiohttp" not in {_top(n) for n in names}


@pytest.mark.parametrize("module", REDIS_GLUE)
def test_redis_glue_imports_only_redis_and_the_pure_core(module: str) -> None:
    """The pool factory stands below the engines: redis and pure modules, nothing else
    (asyncio only for the lock it puts around redis-py's Sentinel discovery)."""
    names = _imports(ROOT / module)
    relay = {n for n in names if _top(n) == "relay"}
    assert relay <= {m.removesuffix(".py").replace("/", ".") for m in PURE}, relay
    assert not {_top(n) for n in names} & (IO_LIBS - {"redis", "asyncio"})


def test_backend_adapter_imports_only_pure_relay_modules() -> None:
    """backend_adapter uses relay.wire, errors, redis_url, backoff (pure) and the pool
    factory relay.redis_pool (the documented exception above), never aiohttp."""
    for path in (ROOT / "backend_adapter").rglob("*.py"):
        names = _imports(path)
        relay = {n for n in names if _top(n) == "relay"}
        assert relay <= BACKEND_MAY_IMPORT, (path.name, relay)
        assert "aiohttp" not in {_top(n) for n in names}, path.name


def test_relay_never_imports_backend_adapter_or_the_cli() -> None:
    """No package cycle: relay is below backend_adapter, and relay_cli (the ``relay``
    command, which uses both) is above them. relay/__main__.py is a program that nothing
    imports (``python -m relay``), so it alone may start relay_cli."""
    for path in (ROOT / "relay").rglob("*.py"):
        if path == ROOT / "relay" / "__main__.py":
            continue
        tops = {_top(n) for n in _imports(path)}
        assert not tops & {"backend_adapter", "relay_cli"}, path.relative_to(ROOT)
    for path in (ROOT / "backend_adapter").rglob("*.py"):
        assert "relay_cli" not in {_top(n) for n in _imports(path)}, path.relative_to(ROOT)


def test_session_and_node_do_not_import_aiohttp() -> None:
    """The node and sessions reach sockets only through the Transport protocol."""
    for module in ("relay/node.py", "relay/session.py", "relay/engine.py"):
        assert "aiohttp" not in {_top(n) for n in _imports(ROOT / module)}, module


def test_imports_sees_relative_imports(tmp_path: Path) -> None:
    """A relative import counts as the absolute one, so it cannot slip past the layers."""
    engines = tmp_path / "relay" / "engines"
    engines.mkdir(parents=True)
    module = engines / "sneaky.py"
    module.write_text("from .. import node\nfrom ..hub import Hub\nfrom . import _pool\n")
    names = _imports(module, tmp_path)
    assert {"relay.node", "relay.hub", "relay.engines._pool"} <= names
    assert names & ABOVE_ENGINES == {"relay.node", "relay.hub"}
    package = engines / "__init__.py"
    package.write_text("from .memory import MemoryEngine\n")
    assert _imports(package, tmp_path) == {"relay.engines.memory"}


def test_architecture_diagram_names_every_module() -> None:
    """docs/architecture.md's layer picture names every module of relay/, so it matches the tree."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc.split("## The layers and the interfaces", 1)[1]
    picture = section.split("```", 2)[1]
    words = set(re.findall(r"[\w/]+", picture))
    modules = {p.stem for p in (ROOT / "relay").glob("*.py")} - {"__init__", "__main__"}
    modules |= {f"engines/{p.stem}" for p in (ROOT / "relay/engines").glob("[!_]*.py")}
    modules |= {f"engines/{p.name}/" for p in (ROOT / "relay/engines").iterdir() if p.is_dir()}
    modules |= {p.stem for p in (ROOT / "relay/engines").glob("*/*.py")} - {"__init__"}
    modules |= {"bench/", "lua/", "backend_adapter/"}
    missing = {m for m in modules if m.rstrip("/") not in {w.rstrip("/") for w in words}}
    assert not missing, f"add these to the picture in docs/architecture.md: {sorted(missing)}"
