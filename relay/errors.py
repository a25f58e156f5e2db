"""Relay's exceptions: one root, translated from other libraries at the boundary.

    RelayError
    ├── ConfigError            a setting is missing or invalid; the process cannot start
    ├── InvalidInput           bad data from outside (client frame, API body, id, envelope)
    │   ├── InvalidId          a malformed stream id
    │   ├── InvalidClientId    a client_id / BizId outside the alphabet or length
    │   ├── InvalidEnvelope    a payload on Redis that is not a Relay envelope
    │   ├── PayloadTooLarge    a publish over the size limit (HTTP 413)
    │   └── ProtocolViolation  a client frame Relay does not understand
    ├── AuthError              a token or API key is missing, invalid, expired, or for someone else
    └── EngineError            the broker or registry failed
        ├── EngineUnavailable  Redis cannot be reached now (transient: retry later)
        └── PublishFailed      a publish gave up after its retries

Messages of these exceptions are safe to show to a client: they never carry secrets or
tracebacks. Anything else that escapes a handler is an internal error (close 1011).
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "EngineError",
    "EngineUnavailable",
    "InvalidClientId",
    "InvalidEnvelope",
    "InvalidId",
    "InvalidInput",
    "PayloadTooLarge",
    "ProtocolViolation",
    "PublishFailed",
    "RelayError",
]


class RelayError(Exception):
    """Root of every exception Relay raises on purpose."""


class ConfigError(RelayError):
    """A setting is missing or invalid."""


class InvalidInput(RelayError):
    """Bad data from outside Relay; ``code`` is the documented error code."""

    code = "bad_request"


class InvalidId(InvalidInput):
    """A stream id that is not ``<ms>-<seq>``."""

    code = "bad_id"


class InvalidClientId(InvalidInput):
    """A client_id or BizId outside ``[A-Za-z0-9_.:@-]{1,128}``."""

    code = "bad_client_id"


class InvalidEnvelope(InvalidInput):
    """A message on Redis that is not a Relay envelope (another publisher's bug)."""

    code = "bad_envelope"


class PayloadTooLarge(InvalidInput):
    """A publish whose encoded payload exceeds the limit."""

    code = "too_large"


class ProtocolViolation(InvalidInput):
    """A client frame of unknown type or shape."""

    code = "bad_request"


class AuthError(RelayError):
    """Credentials are missing, invalid, expired, or grant something else."""

    def __init__(self, message: str, close_code: int = 4001) -> None:
        super().__init__(message)
        self.close_code = close_code


class EngineError(RelayError):
    """The broker or registry failed."""


class EngineUnavailable(EngineError):
    """Redis cannot be reached right now; the operation may succeed later."""


class PublishFailed(EngineError):
    """A publish gave up after its bounded retries."""
