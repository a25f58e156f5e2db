"""The SessionRegistry contract (claim, release, lookup, kick), run on every engine."""

from __future__ import annotations

import pytest

from relay.engine import ClientStatus, Control, SessionRecord
from tests.engines.conftest import KINDS, Harness, record

pytestmark = pytest.mark.parametrize("start_engine", KINDS, indirect=True)


async def test_claim_session_returns_previous_record(harness: Harness) -> None:
    """A claim replaces the record and returns the one it replaced."""
    engine = harness.engine
    first = record(harness, "claim", "s1", since="5-0")
    assert await engine.claim_session(first) is None
    second = record(harness, "claim", "s2")
    assert await engine.claim_session(second) == first
    status = await engine.client_status("claim")
    assert (status.session, status.since) == ("s2", None)


async def test_claim_session_stale_handshake_on_same_node_does_not_displace(
    harness: Harness,
) -> None:
    """A handshake that began earlier on this node loses to the later one, whatever order."""
    engine = harness.engine
    later = SessionRecord("stale", harness.node_id, "later", None, 2000.0)
    earlier = SessionRecord("stale", harness.node_id, "earlier", None, 1000.0)
    assert await engine.claim_session(later) is None
    assert await engine.claim_session(earlier) == later
    assert (await engine.client_status("stale")).session == "later"
    elsewhere = SessionRecord("stale", "other-node", "elsewhere", None, 1500.0)
    assert await engine.claim_session(elsewhere) == later
    assert (await engine.client_status("stale")).session == "elsewhere"


async def test_claim_session_shared_record_survives_while_a_session_lives(
    harness: Harness,
) -> None:
    """Non-exclusive claims: releasing the newest hands the record to a live one."""
    engine = harness.engine
    first = SessionRecord("fan", harness.node_id, "one", None, 1000.0)
    second = SessionRecord("fan", harness.node_id, "two", None, 2000.0)
    assert await engine.claim_session(first, exclusive=False) is None
    assert await engine.claim_session(second, exclusive=False) == first
    assert await engine.release_session("fan", "two")
    status = await engine.client_status("fan")
    assert status.online and status.session == "one"
    assert not await engine.release_session("fan", "two")
    assert await engine.release_session("fan", "one")
    assert not (await engine.client_status("fan")).online


async def test_claim_session_earlier_attempt_of_same_instance_does_not_displace(
    harness: Harness,
) -> None:
    """Attempt 1 of an instance never replaces its attempt 2, on any node or clock."""
    engine = harness.engine
    second = SessionRecord("att", "node-b", "two", None, 1000.0, "inst.2")
    first = SessionRecord("att", "node-a", "one", None, 2000.0, "inst.1")
    assert await engine.claim_session(second) is None
    holder = await engine.claim_session(first)
    assert holder is not None and holder.session == "two" and holder.attempt == "inst.2"
    other = SessionRecord("att", "node-a", "other", None, 3000.0, "else.1")
    assert (await engine.claim_session(other)) == holder
    assert (await engine.client_status("att")).session == "other"


async def test_release_session_is_fenced(harness: Harness) -> None:
    """A late release by a replaced session leaves the newer record alone."""
    engine = harness.engine
    await engine.claim_session(record(harness, "fence", "old"))
    await engine.claim_session(record(harness, "fence", "new"))
    assert not await engine.release_session("fence", "old")
    assert (await engine.client_status("fence")).session == "new"
    assert await engine.release_session("fence", "new")
    assert not (await engine.client_status("fence")).online
    assert not await engine.release_session("fence", "new")


async def test_release_session_restores_the_holder_its_claim_displaced(
    harness: Harness,
) -> None:
    """An abandoned handshake's claim is undone: the holder it displaced is the record
    again (and its own release ends it); a claim that landed since is left alone."""
    engine = harness.engine
    live = SessionRecord("undo", "node-b", "live", "4-0", 1000.0, "inst.2")
    late = SessionRecord("undo", harness.node_id, "late", None, 900.0)
    await engine.claim_session(live)
    assert await engine.claim_session(late) == live
    assert await engine.release_session("undo", "late", restore=live)
    status = await engine.client_status("undo")
    assert (status.node, status.session, status.since) == ("node-b", "live", "4-0")
    stale = SessionRecord("undo", "node-a", "stale", None, 2000.0, "inst.1")
    assert await engine.claim_session(stale) == live  # its attempt is back too
    again = SessionRecord("undo", harness.node_id, "again", None, 1100.0, "inst.3")
    assert await engine.claim_session(again) == live  # it is kicked, as a holder is
    assert not await engine.release_session("undo", "live")
    assert await engine.release_session("undo", "again")
    assert not (await engine.client_status("undo")).online

    await engine.claim_session(live)
    await engine.claim_session(late)
    newer = SessionRecord("undo", "node-c", "newer", None, 1200.0)
    await engine.claim_session(newer)
    assert not await engine.release_session("undo", "late", restore=live)
    assert (await engine.client_status("undo")).session == "newer"


async def test_record_ack_is_fenced(harness: Harness) -> None:
    """Only the session holding the record stores acks; a new claim starts without one."""
    engine = harness.engine
    await engine.record_ack("ack", "nobody", "1-0")
    assert (await engine.client_status("ack")) == ClientStatus("ack", False, None, None, None, None)
    await engine.claim_session(record(harness, "ack", "s1"))
    await engine.record_ack("ack", "s1", "5-0")
    assert (await engine.client_status("ack")).last_ack == "5-0"
    await engine.claim_session(record(harness, "ack", "s2"))
    assert (await engine.client_status("ack")).last_ack is None
    await engine.record_ack("ack", "s1", "6-0")
    assert (await engine.client_status("ack")).last_ack is None
    await engine.record_ack("ack", "s2", "7-0")
    assert (await engine.client_status("ack")).last_ack == "7-0"


async def test_client_status_online_on_live_node(harness: Harness) -> None:
    """A record held on this (live) node is online and shows node, session and since."""
    await harness.engine.claim_session(record(harness, "who", "s1", since="3-1"))
    status = await harness.engine.client_status("who")
    assert status == ClientStatus("who", True, harness.node_id, "s1", "3-1", None)
    assert not (await harness.engine.client_status("stranger")).online


async def test_send_control_reaches_self(harness: Harness) -> None:
    """A control message sent to this node's id arrives through on_control, intact."""
    kick = Control("kick", client_id="c1", session="s-9", code=4000, reason="replaced")
    await harness.engine.send_control(harness.node_id, kick)
    await harness.handler.wait_until(lambda: bool(harness.handler.controls))
    assert harness.handler.controls == [kick]
