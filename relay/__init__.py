"""Relay: a standalone WebSocket relay broker for business events keyed by BizId."""

from relay.errors import RelayError
from relay.wire import PublishResult

__all__ = ["PublishResult", "RelayError", "__version__"]
__version__ = "0.1.0"
