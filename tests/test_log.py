"""Logging: secrets are redacted, malformed requests leave no traceback."""

from __future__ import annotations

import logging
import sys

import structlog
from aiohttp.http_exceptions import BadHttpMessage

from relay.log import _NoTracebackForBadRequests, redact


def test_redact_replaces_secret_values() -> None:
    """Values of secret-looking keys never reach the renderer."""
    event = redact(None, "info", {"event": "x", "token": "eyJ.a.b", "api_key": "k", "n": 1})
    assert event == {"event": "x", "token": "***", "api_key": "***", "n": 1}


def test_redact_in_a_configured_pipeline() -> None:
    """A logger built with the redact processor renders no secret."""
    with structlog.testing.capture_logs(processors=[redact]) as logs:
        structlog.get_logger().info("session.refused", token="secret-token")
    assert logs[0]["token"] == "***"


def test_bad_request_traceback_is_dropped() -> None:
    """aiohttp's 'Error handling request' keeps its message but loses the traceback."""
    try:
        raise BadHttpMessage("bad request line")
    except BadHttpMessage:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (), exc_info
    )
    assert _NoTracebackForBadRequests().filter(record)
    assert record.exc_info is None
    assert "BadHttpMessage" in record.getMessage()
