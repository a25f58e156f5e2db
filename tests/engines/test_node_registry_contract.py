"""The NodeRegistry contract (heartbeat, list), run on memory, real Redis and fakeredis."""

from __future__ import annotations

import time

import pytest

from relay.engine import NodeFigures, NodeInfo
from tests.engines.conftest import KINDS, Harness

pytestmark = pytest.mark.parametrize("start_engine", KINDS, indirect=True)


async def test_nodes_lists_self_after_heartbeat(harness: Harness) -> None:
    """After a heartbeat this node is listed with its connection count."""
    before = time.time()
    await harness.engine.heartbeat(7)
    nodes = await harness.engine.nodes()
    assert [n.node for n in nodes] == [harness.node_id]
    info: NodeInfo = nodes[0]
    assert info.connections == 7
    assert info.started_at <= info.last_seen
    assert before - 1 <= info.last_seen <= time.time() + 1


async def test_nodes_carry_the_figures_of_the_last_heartbeat(harness: Harness) -> None:
    """Address, state, rates and counts a node reports come back from nodes() as sent."""
    figures = NodeFigures(
        address="10.0.0.7:8080",
        state="draining",
        messages_per_s=12.5,
        events_per_s=3.25,
        publishes_per_s=0.5,
        gaps_repaired=2,
        gaps_unrecoverable=1,
        closed_4509=4,
    )
    await harness.engine.heartbeat(3, figures)
    [info] = await harness.engine.nodes()
    assert (info.connections, info.figures) == (3, figures)
    await harness.engine.heartbeat(4)
    [info] = await harness.engine.nodes()
    assert (info.connections, info.figures) == (4, NodeFigures())
