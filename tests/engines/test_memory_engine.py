"""What only the memory engine does: its epoch is its own start."""

from __future__ import annotations

from relay.engine import EngineOptions
from relay.engines.memory import MemoryEngine
from relay.wire import prove_recovery
from tests.engines.conftest import RecordingHandler

TTL_MS = EngineOptions().history_ttl * 1000


async def test_memory_head_read_in_the_first_millisecond_resumes_recovered() -> None:
    """The head of an empty history read right after start is a resume point that is vouched
    for once events arrive, however soon after the engine started the read came."""
    for attempt in range(30):
        engine = MemoryEngine(EngineOptions())
        await engine.start(f"node-{attempt}", RecordingHandler())
        try:
            head = (await engine.history("early", None, 10)).head()
            await engine.publish("early", "e", attempt)
            after = await engine.history("early", head, 10)
            assert [e.data for e in after.entries] == [attempt]
            assert prove_recovery(head, after, TTL_MS), (head, after.epoch_ms)
        finally:
            await engine.close()
