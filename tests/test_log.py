"""Logging: secrets are redacted, a client's bad bytes are one rate-limited event."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections import Counter

import orjson
import structlog
from aiohttp.http_exceptions import BadHttpMessage
from structlog.testing import capture_logs

from relay.log import _BadRequests, _ClientFaults, redact
from tests.support.timing import MS


def test_redact_replaces_secret_values() -> None:
    """Values of secret-looking keys never reach the renderer."""
    event = redact(None, "info", {"event": "x", "token": "eyJ.a.b", "api_key": "k", "n": 1})
    assert event == {"event": "x", "token": "***", "api_key": "***", "n": 1}


def test_redact_in_a_configured_pipeline() -> None:
    """A logger built with the redact processor renders no secret."""
    with structlog.testing.capture_logs(processors=[redact]) as logs:
        structlog.get_logger().info("session.refused", token="secret-token")
    assert logs[0]["token"] == "***"


def test_redact_masks_url_passwords_in_any_value() -> None:
    """A Redis URL with a password, under any key, is logged without it."""
    event = redact(
        None,
        "info",
        {
            "event": "engine.reconnected",
            "url": "redis+sentinel://:hunter2@h1:26379,h2:26379/mymaster?sentinel_password=pw2",
            "error": "cannot reach rediss://admin:hunter3@db:6380/0",
        },
    )
    assert "hunter2" not in repr(event) and "pw2" not in repr(event)
    assert event["error"] == "cannot reach rediss://admin:***@db:6380/0"


def test_redact_masks_token_query_values_in_request_targets() -> None:
    """A client's ``?token=`` is masked in a path without a scheme too, and only the
    value: what follows it in the line stays readable."""
    event = redact(
        None,
        "info",
        {
            "event": "GET /ws/cml?since=1-0&token=eyJ.a.b HTTP/1.1",
            "target": "/ws/cml?token=eyJ.a.b&since=1-0",
        },
    )
    assert event == {
        "event": "GET /ws/cml?since=1-0&token=*** HTTP/1.1",
        "target": "/ws/cml?token=***&since=1-0",
    }


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except type(exc):
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (), exc_info
    )


def test_log_client_faults_become_one_bad_request_event() -> None:
    """aiohttp's 'Error handling request' for a rejected request or a client gone
    mid-body is dropped and logged as http.bad_request, without a traceback; other
    errors pass."""
    faults = _ClientFaults()
    with capture_logs() as logs:
        assert not faults.filter(_record(BadHttpMessage("bad request line")))
    assert [(e["event"], e["reason"]) for e in logs] == [("http.bad_request", "BadHttpMessage")]
    assert not faults.filter(_record(ConnectionResetError("Connection lost")))
    assert faults.filter(_record(RuntimeError("a bug of ours")))


def test_log_bad_requests_are_rate_limited_and_counted() -> None:
    """A flood of bad requests logs one line per interval, each counting those left out."""
    limiter = _BadRequests()
    limiter.interval = 3600.0
    with capture_logs() as logs:
        for _ in range(1000):
            limiter.emit("bad request line", {})
        limiter.last -= 3600.0
        limiter.emit("bad request line", {})
    assert [e["suppressed"] for e in logs] == [0, 999]


async def test_log_bad_requests_left_out_are_counted_when_the_flood_stops() -> None:
    """The count of a flood that stops within the interval is written when it ends."""
    limiter = _BadRequests()
    limiter.interval = 0.05
    with capture_logs() as logs:
        for _ in range(10):
            limiter.emit("bad request line", {})
        await asyncio.sleep(200 * MS)
    assert sum(1 + e["suppressed"] for e in logs) == 10 and len(logs) == 2


_LOG_RECORDS = """
import sys
from relay.log import configure_logging
import structlog
configure_logging("json", "info")
log = structlog.get_logger()
for i in range(int(sys.argv[1])):
    log.info("session.opened", worker=sys.argv[2], n=i, client_id="c" * 40)
"""


def test_json_records_of_processes_sharing_stderr_stay_one_per_line() -> None:
    """`relay serve --workers N`: the supervisor and its workers write to one stderr. Each
    JSON record leaves in one write, so a log shipper reading lines gets whole records
    (printed, a record and its newline were two writes, and two workers' records could
    share a line: `{...}{...}`)."""
    records = 20_000
    read_end, write_end = os.pipe()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOG_RECORDS, str(records), str(worker)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
        )
        for worker in range(2)
    ]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        lines = pipe.read().splitlines()
    for proc in procs:
        assert proc.wait(30) == 0
    seen = Counter()
    for line in lines:
        record = orjson.loads(line)  # raises on two records in one line
        seen[record["worker"]] += 1
    assert seen == {"0": records, "1": records}
