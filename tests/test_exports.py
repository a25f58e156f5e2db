"""The public surface of relay: __all__ of every module, and what importing relay drags in."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest

import relay
from relay import client, engine, errors, wire
from tests.support.timing import MS

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(relay.__path__, "relay.")
    if not info.name.endswith("__main__") and not info.name.rsplit(".", 1)[1].startswith("_")
)


def test_exports_package_names_resolve() -> None:
    """`relay` exports the root error, PublishResult and its version, relay's own objects."""
    assert sorted(relay.__all__) == ["PublishResult", "RelayError", "__version__"]
    assert relay.RelayError is errors.RelayError
    assert relay.PublishResult is wire.PublishResult
    assert isinstance(relay.__version__, str)


@pytest.mark.parametrize("name", MODULES)
def test_exports_every_module_declares_what_resolves(name: str) -> None:
    """Each non-private module has an __all__ of public names it defines, none twice."""
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported), name
    assert [n for n in exported if not hasattr(module, n)] == [], name
    assert [n for n in exported if n.startswith("_") and n != "__version__"] == [], name


def test_exports_client_sdk_surface() -> None:
    """The asyncio SDK's names are the ones docs/client.md teaches, no more."""
    assert sorted(client.__all__) == [
        "Action",
        "Message",
        "Plan",
        "RelayClient",
        "RelayClosed",
        "backoff_delay",
        "connect_url",
        "plan_reconnect",
        "reconnect_delay",
        "tail",
    ]


def test_exports_errors_share_one_root() -> None:
    """Every exception relay.errors exports derives from RelayError (one root)."""
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.RelayError), name


def test_exports_engine_interfaces() -> None:
    """relay.engine exports the three interfaces, their union and what they pass around."""
    assert sorted(engine.__all__) == [
        "Broker",
        "ClientStatus",
        "Control",
        "Engine",
        "EngineHandler",
        "EngineHealth",
        "EngineOptions",
        "NodeFigures",
        "NodeInfo",
        "NodeRegistry",
        "SessionRecord",
        "SessionRegistry",
        "is_stale_claim",
        "kicked_in_claim",
    ]


def _loaded_after(statement: str) -> set[str]:
    code = (
        f"import json, sys; {statement}; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('relay', 'aiohttp', 'redis', 'structlog'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    ).stdout
    return set(json.loads(out))


def test_exports_import_relay_pulls_in_only_pure_modules() -> None:
    """`import relay` loads no aiohttp, redis or structlog, and no relay module but wire/errors."""
    assert _loaded_after("import relay") == {"relay", "relay.errors", "relay.wire"}


def test_exports_client_needs_no_redis() -> None:
    """`import relay.client` (the SDK) loads neither redis nor the server's modules."""
    loaded = _loaded_after("import relay.client")
    assert "redis" not in {m.split(".")[0] for m in loaded}, loaded
    assert {m for m in loaded if m.startswith("relay")} == {
        "relay",
        "relay.backoff",
        "relay.client",
        "relay.errors",
        "relay.protocol",
        "relay.wire",
    }
