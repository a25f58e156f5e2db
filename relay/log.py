"""structlog setup: JSON or console lines with fixed event names and bound context.

Event names are ``noun.past_verb`` (``session.opened``, ``engine.reconnected``). Values of
keys that look secret are replaced before rendering, and so is the password of any URL
and a secret-looking query value (``?token=``) in any string, whatever a caller passes.
Records of the standard ``logging`` module (aiohttp's, asyncio's) go through the same
processors and renderer: JSON when JSON logs are on.

What a client's bytes cause (a request the HTTP parser rejects, a disconnect mid-body, a
refused handshake) is never a traceback: it is one ``http.bad_request`` event, at most
``--bad-request-log-rate`` a second, each counting the ones left out before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError

from relay.config import mask_url

__all__ = ["bad_request", "configure_logging", "redact"]

_SECRET_KEYS = frozenset({"token", "secret", "auth_secret", "api_key", "password", "authorization"})

log = structlog.get_logger("relay.http")


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any secret-looking key with ``***``, and URL passwords."""
    for key, value in event_dict.items():
        if key in _SECRET_KEYS:
            if value:
                event_dict[key] = "***"
        elif isinstance(value, str) and ("=" in value or ("://" in value and "@" in value)):
            # Also a bare request target: a browser's token rides in ``?token=``.
            event_dict[key] = mask_url(value)
    return event_dict


class _BadRequests:
    """The rate limit of ``http.bad_request``: a flood of junk is a trickle of lines.

    Left-out events are counted in the next line, or in one written when the interval
    is over, so no count is lost when the flood stops.
    """

    def __init__(self) -> None:
        self.interval = 1.0
        self.last = -float("inf")
        self.suppressed = 0
        self.reason = ""
        self._flush: asyncio.TimerHandle | None = None

    def emit(self, reason: str, context: dict[str, Any]) -> None:
        now = time.monotonic()
        wait = self.last + self.interval - now
        if wait > 0:
            self.suppressed += 1
            self.reason = reason
            if self._flush is None:
                with contextlib.suppress(RuntimeError):  # no loop: the next line counts them
                    self._flush = asyncio.get_running_loop().call_later(wait, self._write_left)
            return
        self._write(now, reason, context)

    def _write(self, now: float, reason: str, context: dict[str, Any]) -> None:
        self.last = now
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        suppressed, self.suppressed = self.suppressed, 0
        log.info("http.bad_request", reason=reason, suppressed=suppressed, **context)

    def _write_left(self) -> None:
        self._flush = None
        if self.suppressed:
            self.suppressed -= 1  # this line stands for the last one left out
            self._write(time.monotonic(), self.reason, {})


_bad_requests = _BadRequests()


def bad_request(reason: str, **context: Any) -> None:
    """Log that a client sent what cannot be served (rate-limited; never a traceback).

    ``reason`` is a fixed text or an exception's type name, never the client's bytes.
    """
    _bad_requests.emit(reason, context)


class _ClientFaults(logging.Filter):
    """aiohttp logs 'Error handling request' with a traceback for a request its parser
    rejects and for a client gone mid-request: those become ``http.bad_request``."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | ConnectionError):
            bad_request(type(exc).__name__, source="aiohttp")
            return False
        return True


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure_logging(
    fmt: str = "console", level: str = "info", bad_request_rate: float = 1.0
) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per record (a print is two: the record, then its newline), so processes
        # sharing stderr (`--workers`) never put two records on one line.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _bad_requests.interval = 1.0 / bad_request_rate if bad_request_rate > 0 else 0.0
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaults) for f in server.filters):
        server.addFilter(_ClientFaults())
