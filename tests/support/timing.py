"""The tests' one time unit, so the whole suite can be slowed down on a loaded machine."""

from __future__ import annotations

import os

__all__ = ["MS"]

MS = float(os.environ.get("RELAY_TEST_TIMEOUT_FACTOR", "1")) / 1000
"""One millisecond, scaled by RELAY_TEST_TIMEOUT_FACTOR (e.g. 3 on a busy CI machine).

Write every deadline, poll interval and timing setting of a test as ``n * MS``; leave
plain seconds only where a value is data (a backoff formula's inputs), not a wait.
"""
