"""A handshake abandoned while its claim was in flight, whose claim lands after the
client's next attempt went live on another node: the live session keeps its client.

The interleaving, exactly: node A's claim of the client is held back; Redis is said to
be gone on node A (what its canary says of a hung Redis), so A closes the handshake with
1013; the client connects to node B and goes live; then A's claim reaches Redis, late.
Without ``attempt=`` (the chaos test's clients send none) and with the two handshakes on
different nodes, nothing in the claim itself can tell it is stale; with it, the claim
script refuses the late claim.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from relay.protocol import CloseCode
from tests.support.node import Listener, NodeUnderTest, listen, start_node
from tests.support.timing import MS

pytestmark = pytest.mark.redis

ENGINES = ["redis", "cluster"]


class HeldClaims:
    """Holds a node's session claims until :meth:`let_go`; each then runs for real. Also
    counts the node's releases of sessions (their records, in the registry)."""

    def __init__(self, node: NodeUnderTest) -> None:
        engine = node.node.engine
        self._claim, self._release = engine.claim_session, engine.release_session
        engine.claim_session = self.claim_session  # type: ignore[method-assign]
        engine.release_session = self.release_session  # type: ignore[method-assign]
        self.waiting = asyncio.Event()
        self._go = asyncio.Event()
        self.released = 0
        self.releasing = 0

    async def claim_session(self, *args: Any, **kwargs: Any) -> Any:
        self.waiting.set()
        await self._go.wait()
        return await self._claim(*args, **kwargs)

    async def release_session(self, *args: Any, **kwargs: Any) -> Any:
        self.releasing += 1
        try:
            return await self._release(*args, **kwargs)
        finally:
            self.releasing -= 1
            self.released += 1

    def let_go(self) -> None:
        self._go.set()


@pytest.fixture(params=[False, True], ids=["no-attempt", "attempt"])
def attempts(request: pytest.FixtureRequest) -> bool:
    """Whether the client sends ``attempt=<instance>.<n>`` (as the SDK does)."""
    return bool(request.param)


def _query(attempts: bool, n: int) -> dict[str, str]:
    return {"attempt": f"inst.{n}"} if attempts else {}


@pytest.fixture(params=ENGINES)
def redis_url(request: pytest.FixtureRequest) -> str:
    fixture = "redis_server" if request.param == "redis" else "redis_cluster"
    url: str = request.getfixturevalue(fixture).url
    return url


async def _abandoned_late_claim(
    started: list[NodeUnderTest],
    listeners: list[Listener],
    redis_url: str,
    client_id: str,
    attempts: bool,
) -> tuple[NodeUnderTest, NodeUnderTest, Listener]:
    """Play the interleaving; return node A, node B and the client live on B."""
    node_a = await start_node(started, redis_url=redis_url)
    node_b = await start_node(started, redis_url=redis_url)
    held = HeldClaims(node_a)
    first = Listener(node_a.ws_url(client_id, **_query(attempts, 1)))
    listeners.append(first)
    # The node answers the upgrade with what follows it (here: the close), so not awaited.
    connecting = asyncio.ensure_future(first.connect(wait_welcome=False))
    await asyncio.wait_for(held.waiting.wait(), 5000 * MS)
    node_a.node.on_health(False)
    await asyncio.wait_for(connecting, 5000 * MS)
    assert await first.wait_closed() == CloseCode.TRY_AGAIN_LATER
    live = await listen(listeners, node_b.ws_url(client_id, **_query(attempts, 2)))
    assert live.welcome["type"] == "welcome"
    held.let_go()
    # The late claim lands, then node A forgets the abandoned session and releases it.
    for _ in range(500):
        if not node_a.node.sessions and held.released and not held.releasing:
            break
        await asyncio.sleep(10 * MS)
    assert not node_a.node.sessions and held.released
    return node_a, node_b, live


async def test_abandoned_claim_landing_late_does_not_close_the_live_session(
    started_nodes: list[NodeUnderTest],
    listeners: list[Listener],
    redis_url: str,
    attempts: bool,
) -> None:
    """The late claim closes nothing: the session on B keeps receiving (no 4000)."""
    _, node_b, live = await _abandoned_late_claim(
        started_nodes, listeners, redis_url, "latecomer", attempts
    )
    await node_b.publish("latecomer", "e", {"seq": 1})
    messages = await live.wait_messages(1)
    assert [m["data"]["seq"] for m in messages] == [1]
    with pytest.raises(TimeoutError):
        await live.wait_closed(timeout=300 * MS)
    assert live.close_code is None


async def test_abandoned_claim_landing_late_leaves_the_live_session_recorded(
    started_nodes: list[NodeUnderTest],
    listeners: list[Listener],
    redis_url: str,
    attempts: bool,
) -> None:
    """After the late claim the registry still names the live session: publishes and the
    API say the client is online, and the client's next connection replaces it (4000)
    instead of running beside it."""
    node_a, node_b, live = await _abandoned_late_claim(
        started_nodes, listeners, redis_url, "recorded", attempts
    )
    status = await node_b.node.engine.client_status("recorded")
    assert status.online
    assert (status.node, status.session) == (node_b.node.id, live.welcome["session"])
    result = await node_b.publish("recorded", "e", {"seq": 1})
    assert result.online
    await live.wait_messages(1)
    newest = await listen(listeners, node_a.ws_url("recorded", **_query(attempts, 3)))
    assert await live.wait_closed() == CloseCode.REPLACED
    await node_a.publish("recorded", "e", {"seq": 2})
    assert [m["data"]["seq"] for m in await newest.wait_messages(1)] == [2]
    assert [m["data"]["seq"] for m in live.messages] == [1]
