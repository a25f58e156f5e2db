"""The public surface of backend_adapter, and what importing it drags in."""

from __future__ import annotations

import json
import subprocess
import sys

import backend_adapter
from relay import errors, wire
from tests.support.timing import MS


def test_exports_all_names_resolve() -> None:
    """Every name in __all__ exists; the re-exports are relay's own classes."""
    assert sorted(backend_adapter.__all__) == sorted(
        [
            "AfterCommit",
            "AsyncPublisher",
            "ConfigError",
            "EngineUnavailable",
            "InvalidInput",
            "OutboxDispatcher",
            "PayloadTooLarge",
            "PublishFailed",
            "PublishResult",
            "Publisher",
            "RelayError",
            "create_outbox_table",
            "dbapi_transaction",
            "enqueue",
            "enqueue_async",
            "issue_token",
        ]
    )
    for name in backend_adapter.__all__:
        assert getattr(backend_adapter, name) is not None
    assert backend_adapter.PublishResult is wire.PublishResult
    assert backend_adapter.PublishFailed is errors.PublishFailed
    assert backend_adapter.PayloadTooLarge is errors.PayloadTooLarge
    assert backend_adapter.InvalidInput is errors.InvalidInput
    assert backend_adapter.RelayError is errors.RelayError


def test_exports_import_pulls_in_no_aiohttp_and_only_pure_relay_modules() -> None:
    """`import backend_adapter` loads no aiohttp and no relay module but the pure
    wire/errors/redis_url/backoff and the pool factory redis_pool."""
    code = (
        "import json, sys, backend_adapter; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('relay', 'aiohttp', 'asyncio_redis', 'structlog'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    ).stdout
    loaded = set(json.loads(out))
    assert not any(m.split(".")[0] == "aiohttp" for m in loaded), loaded
    allowed = {"relay.wire", "relay.errors", "relay.redis_url", "relay.backoff", "relay.redis_pool"}
    assert loaded <= {"relay", *allowed}, loaded
