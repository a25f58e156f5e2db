"""backend_adapter: publish business events to Relay from a Python backend.

    from backend_adapter import AsyncPublisher, Publisher, issue_token

    async with AsyncPublisher("redis://redis:6379/0") as relay:
        result = await relay.publish("cml", "label.created", {"label": 42}, mid="outbox-17")

A publish runs relay.wire's Lua script on Redis: one atomic step that appends the event
to the BizId's history, publishes it to the relay nodes, and reports whether the client
is online. From relay this package imports only the pure relay.wire, errors, redis_url
and backoff, and the pool factory relay.redis_pool, so a backend does not pull in aiohttp
or the node. docs/backend.md is the guide.

Publish-after-commit and the transactional outbox need SQLAlchemy (``relay[sql]``), so
their names load on first use: ``AfterCommit`` and ``dbapi_transaction`` from
backend_adapter.after_commit, ``OutboxDispatcher``, ``create_outbox_table``, ``enqueue``
and ``enqueue_async`` from backend_adapter.outbox. Importing this package never imports
SQLAlchemy.

Errors (all RelayError):
    InvalidInput         bad biz_id, event, mid or data; nothing was sent
    └── PayloadTooLarge  the encoded event exceeds max_payload
    PublishFailed        Redis failed and the retries are spent (``__cause__`` says why)
    EngineUnavailable    is_online could not reach Redis
    ConfigError          the publisher was constructed with bad settings
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from backend_adapter._asyncio import AsyncPublisher
from backend_adapter._sync import Publisher
from backend_adapter._tokens import issue_token
from relay.errors import (
    ConfigError,
    EngineUnavailable,
    InvalidInput,
    PayloadTooLarge,
    PublishFailed,
    RelayError,
)
from relay.wire import PublishResult

if TYPE_CHECKING:
    from backend_adapter.after_commit import AfterCommit, dbapi_transaction
    from backend_adapter.outbox import (
        OutboxDispatcher,
        create_outbox_table,
        enqueue,
        enqueue_async,
    )

__all__ = [
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

_LAZY = {
    "AfterCommit": "backend_adapter.after_commit",
    "dbapi_transaction": "backend_adapter.after_commit",
    "OutboxDispatcher": "backend_adapter.outbox",
    "create_outbox_table": "backend_adapter.outbox",
    "enqueue": "backend_adapter.outbox",
    "enqueue_async": "backend_adapter.outbox",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'backend_adapter' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ImportError(
            f"backend_adapter.{name} needs SQLAlchemy: pip install 'relay[sql]' ({exc})"
        ) from exc
    globals()[name] = value
    return value
