"""The Engine contract: one object fits every interface, with a lifecycle and health."""

from __future__ import annotations

import pytest

from relay.engine import Broker, Engine, NodeRegistry, SessionRegistry
from tests.engines.conftest import KINDS, Harness

pytestmark = pytest.mark.parametrize("start_engine", KINDS, indirect=True)


async def test_engine_fits_protocol_and_is_ready(harness: Harness) -> None:
    """A started engine is a Broker, a SessionRegistry, a NodeRegistry and an Engine."""
    for interface in (Broker, SessionRegistry, NodeRegistry, Engine):
        assert isinstance(harness.engine, interface)
    assert harness.engine.ready


async def test_close_is_idempotent(harness: Harness) -> None:
    """Closing twice is harmless and leaves the engine not ready."""
    await harness.engine.close()
    await harness.engine.close()
    assert not harness.engine.ready


async def test_health_reports_a_reachable_ready_engine(harness: Harness) -> None:
    """health() of a started engine: reachable, ready, a round-trip time, no error."""
    health = await harness.engine.health()
    assert (health.engine, health.ready, health.reachable) == (harness.engine.name, True, True)
    assert health.latency_ms is not None and health.latency_ms >= 0
    assert health.error == ""
