"""backend_adapter: publish business events to Relay from a Python backend.

    from backend_adapter import AsyncPublisher, Publisher, issue_token

    async with AsyncPublisher("redis://redis:6379/0") as relay:
        result = await relay.publish("cml", "label.created", {"label": 42}, mid="outbox-17")

A publish runs relay.wire's Lua script on Redis: one atomic step that appends the event
to the BizId's history, publishes it to the relay nodes, and reports whether the client
is online. This package imports only the pure relay.wire and relay.errors from relay, so
a backend does not pull in aiohttp or the node. docs/backend.md is the guide.

Errors (all RelayError):
    InvalidInput         bad biz_id, event, mid or data; nothing was sent
    └── PayloadTooLarge  the encoded event exceeds max_payload
    PublishFailed        Redis failed and the retries are spent (``__cause__`` says why)
    EngineUnavailable    is_online could not reach Redis
    ConfigError          the publisher was constructed with bad settings
"""

from __future__ import annotations

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

__all__ = [
    "AsyncPublisher",
    "ConfigError",
    "EngineUnavailable",
    "InvalidInput",
    "PayloadTooLarge",
    "PublishFailed",
    "PublishResult",
    "Publisher",
    "RelayError",
    "issue_token",
]
