"""The Broker contract (publish, subscribe, history), run on memory, real Redis, fakeredis."""

from __future__ import annotations

import itertools
import time

import pytest

from relay.engine import EngineOptions
from relay.errors import InvalidClientId, InvalidInput, PayloadTooLarge
from relay.wire import ID_ZERO, format_id, parse_id, prove_recovery
from tests.engines.conftest import KINDS, Harness, StartEngine, record

pytestmark = pytest.mark.parametrize("start_engine", KINDS, indirect=True)

TTL_MS = EngineOptions().history_ttl * 1000


async def publish_many(h: Harness, biz_id: str, count: int) -> list[str]:
    return [(await h.engine.publish(biz_id, "n", {"n": i})).id for i in range(count)]


# -- publish ---------------------------------------------------------------------------


async def test_publish_returns_increasing_ids(harness: Harness) -> None:
    """Ids are '<ms>-<seq>' and strictly increase when compared as integer pairs."""
    ids = await publish_many(harness, "inc", 30)
    keys = [parse_id(i) for i in ids]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    assert all(i == f"{k[0]}-{k[1]}" for i, k in zip(ids, keys, strict=True))


async def test_publish_without_subscriber_reaches_nobody(harness: Harness) -> None:
    """A publish nobody subscribed to has no receivers and is not online."""
    result = await harness.engine.publish("lonely", "e", None)
    assert (result.receivers, result.online, result.duplicate) == (0, False, False)


async def test_publish_online_needs_subscription_and_session(harness: Harness) -> None:
    """Online only while the BizId is subscribed and a session record exists."""
    engine = harness.engine
    await engine.claim_session(record(harness, "on", "s1"))
    assert not (await engine.publish("on", "e", 1)).online
    await engine.subscribe("on")
    result = await engine.publish("on", "e", 2)
    assert result.online and result.receivers >= 1
    await engine.release_session("on", "s1")
    result = await engine.publish("on", "e", 3)
    assert not result.online and result.receivers >= 1


async def test_publish_mid_dedupes_without_delivery(harness: Harness) -> None:
    """A repeated mid returns the first id, duplicate=True, and delivers nothing."""
    engine, handler = harness.engine, harness.handler
    await engine.subscribe("dup")
    first = await engine.publish("dup", "e", {"a": 1}, mid="m-1")
    again = await engine.publish("dup", "e", {"a": 1}, mid="m-1")
    other = await engine.publish("other", "e", {"a": 1}, mid="m-1")
    marker = await engine.publish("dup", "marker", None)
    assert again.id == first.id and again.duplicate and not first.duplicate
    assert not other.duplicate
    await handler.wait_until(lambda: len(handler.events_for("dup")) >= 2)
    assert [e.id for e in handler.events_for("dup")] == [first.id, marker.id]


async def test_publish_run_answers_like_single_publishes_in_order(harness: Harness) -> None:
    """A run gets one result per event, as N publishes would: increasing ids, delivered
    in order, chained in history, online/receivers for a subscribed BizId with a session."""
    engine, handler = harness.engine, harness.handler
    await engine.claim_session(record(harness, "run", "s1"))
    await engine.subscribe("run")
    before = await engine.publish("run", "e", 0)
    results = await engine.publish_run("run", [("e", {"n": n}, None) for n in range(1, 6)])
    ids = [before.id, *(r.id for r in results)]
    assert [parse_id(i) for i in ids] == sorted({parse_id(i) for i in ids})
    assert all(r.online and r.receivers >= 1 and not r.duplicate for r in results)
    await handler.wait_until(lambda: len(handler.events_for("run")) >= 6)
    delivered = handler.events_for("run")
    assert [e.id for e in delivered] == ids
    assert [e.data for e in delivered] == [0, *({"n": n} for n in range(1, 6))]
    history = await engine.history("run", parse_id(before.id), 10)
    assert [e.id for e in history.entries] == ids[1:]
    assert [format_id(e.prev) for e in history.entries] == ids[:-1]


async def test_publish_run_dedupes_within_the_run_and_against_earlier(harness: Harness) -> None:
    """A mid seen earlier, or earlier in the same run, is a duplicate with the first id."""
    engine, handler = harness.engine, harness.handler
    await engine.subscribe("rdup")
    first = await engine.publish("rdup", "e", 1, mid="m-1")
    results = await engine.publish_run(
        "rdup", [("e", 1, "m-1"), ("e", 2, "m-2"), ("e", 3, None), ("e", 2, "m-2")]
    )
    assert [r.duplicate for r in results] == [True, False, False, True]
    assert results[0].id == first.id and results[3].id == results[1].id
    assert results[0].receivers == 0 and results[3].receivers == 0
    marker = await engine.publish("rdup", "marker", None)
    await handler.wait_until(lambda: len(handler.events_for("rdup")) >= 4)
    assert [e.id for e in handler.events_for("rdup")] == [
        first.id,
        results[1].id,
        results[2].id,
        marker.id,
    ]


async def test_publish_run_with_an_invalid_event_publishes_nothing(
    start_engine: StartEngine,
) -> None:
    """An oversized event anywhere in a run raises before any event of it is written."""
    h = await start_engine(EngineOptions(max_payload=512))
    with pytest.raises(PayloadTooLarge):
        await h.engine.publish_run("rbig", [("e", 1, None), ("e", "x" * 1000, None)])
    assert (await h.engine.history("rbig", None, 10)).last is None
    assert await h.engine.publish_run("rbig", []) == []


async def test_publish_rejects_invalid_biz_id(harness: Harness) -> None:
    """A BizId outside the alphabet is refused before anything is written."""
    with pytest.raises(InvalidClientId):
        await harness.engine.publish("no spaces{}", "e", None)


async def test_publish_rejects_oversized_payload(start_engine: StartEngine) -> None:
    """A payload over max_payload raises PayloadTooLarge."""
    h = await start_engine(EngineOptions(max_payload=512))
    with pytest.raises(PayloadTooLarge):
        await h.engine.publish("big", "e", "x" * 1000)
    assert (await h.engine.history("big", None, 10)).last is None


async def test_publish_rejects_non_json_data(harness: Harness) -> None:
    """Data that JSON clients could not receive raises InvalidInput."""
    with pytest.raises(InvalidInput):
        await harness.engine.publish("json", "e", {"a": {1, 2}})
    with pytest.raises(InvalidInput):
        await harness.engine.publish("json", "", None)


# -- live delivery ---------------------------------------------------------------------


async def test_subscribe_returns_when_live(harness: Harness) -> None:
    """A publish right after subscribe() returns already has a receiver."""
    for n in range(5):
        await harness.engine.subscribe(f"live-{n}")
        assert (await harness.engine.publish(f"live-{n}", "e", n)).receivers >= 1


async def test_subscribe_delivers_in_order_with_prev_chain(harness: Harness) -> None:
    """Live events arrive in publish order, each naming its predecessor; others do not."""
    engine, handler = harness.engine, harness.handler
    await engine.subscribe("chain")
    published = []
    for n in range(10):
        published.append(await engine.publish("chain", "tick", {"n": n}))
        await engine.publish("not-mine", "tick", {"n": n})
    await handler.wait_until(lambda: len(handler.events_for("chain")) >= 10)
    events = handler.events_for("chain")
    assert [e.id for e in events] == [r.id for r in published]
    assert [e.data for e in events] == [{"n": n} for n in range(10)]
    assert events[0].prev == ID_ZERO
    assert all(b.prev == a.key for a, b in itertools.pairwise(events))
    assert handler.events_for("not-mine") == []


async def test_subscribe_is_idempotent(harness: Harness) -> None:
    """Subscribing twice delivers each event once; unsubscribing twice is harmless."""
    engine, handler = harness.engine, harness.handler
    await engine.subscribe("twice")
    await engine.subscribe("twice")
    first = await engine.publish("twice", "e", 1)
    # The marker is on the same BizId: a cluster orders only each channel, not all of them.
    marker = await engine.publish("twice", "e", 2)
    await handler.wait_until(lambda: marker.id in [e.id for e in handler.events_for("twice")])
    assert [e.id for e in handler.events_for("twice")] == [first.id, marker.id]
    await engine.unsubscribe("twice")
    await engine.unsubscribe("twice")
    await engine.unsubscribe("never-subscribed")


async def test_unsubscribe_stops_delivery(harness: Harness) -> None:
    """After unsubscribe() returns, events of that BizId are no longer delivered."""
    engine, handler = harness.engine, harness.handler
    await engine.subscribe("gone")
    await engine.subscribe("stays")
    await engine.publish("gone", "e", 1)
    await handler.wait_until(lambda: len(handler.events_for("gone")) == 1)
    await engine.unsubscribe("gone")
    await engine.publish("gone", "e", 2)
    await engine.publish("stays", "e", 3)
    await handler.wait_until(lambda: len(handler.events_for("stays")) == 1)
    assert len(handler.events_for("gone")) == 1


async def test_resubscribe_after_unsubscribe_delivers(harness: Harness) -> None:
    """A BizId unsubscribed and subscribed again is live again."""
    engine, handler = harness.engine, harness.handler
    await engine.subscribe("again")
    await engine.unsubscribe("again")
    await engine.subscribe("again")
    result = await engine.publish("again", "e", 1)
    assert result.receivers >= 1
    await handler.wait_until(lambda: [e.id for e in handler.events_for("again")] == [result.id])


# -- history ---------------------------------------------------------------------------


async def test_history_keeps_newest_entries_contiguous(start_engine: StartEngine) -> None:
    """At least history_size newest entries are kept, contiguous, ending at the newest."""
    h = await start_engine(EngineOptions(history_size=5))
    ids = await publish_many(h, "trim", 12)
    history = await h.engine.history("trim", ID_ZERO, 100)
    got = [e.id for e in history.entries]
    assert len(got) >= 5
    assert got == ids[-len(got) :]
    assert history.last == parse_id(ids[-1])
    assert history.first == history.entries[0].key
    assert history.first_prev == history.entries[0].prev
    entries = history.entries
    assert all(b.prev == a.key for a, b in itertools.pairwise(entries))


async def test_history_since_returns_later_entries(harness: Harness) -> None:
    """Entries strictly after ``since`` come back; no ``since`` gives only the bounds."""
    engine = harness.engine
    ids = await publish_many(harness, "since", 6)
    history = await engine.history("since", parse_id(ids[2]), 100)
    assert [e.id for e in history.entries] == ids[3:]
    assert not history.truncated
    bounds = await engine.history("since", None, 100)
    assert bounds.entries == []
    assert (bounds.first, bounds.last) == (parse_id(ids[0]), parse_id(ids[-1]))
    assert bounds.head() == parse_id(ids[-1])
    assert (await engine.history("since", parse_id(ids[-1]), 100)).entries == []


async def test_history_truncated_when_limit_exceeded(harness: Harness) -> None:
    """More than ``limit`` entries after ``since``: the newest ``limit``, truncated=True."""
    ids = await publish_many(harness, "limit", 6)
    since = parse_id(ids[0])
    cut = await harness.engine.history("limit", since, 3)
    assert [e.id for e in cut.entries] == ids[3:]
    assert cut.truncated
    assert not prove_recovery(since, cut, TTL_MS)
    whole = await harness.engine.history("limit", since, 5)
    assert [e.id for e in whole.entries] == ids[1:]
    assert not whole.truncated
    assert prove_recovery(since, whole, TTL_MS)


async def test_history_missing_stream_has_no_bounds(harness: Harness) -> None:
    """A BizId never published has no bounds; its head sorts before the next publish."""
    history = await harness.engine.history("nothing", ID_ZERO, 10)
    assert (history.entries, history.first, history.last) == ([], None, None)
    assert abs(history.now_ms - time.time() * 1000) < 60_000
    assert history.epoch_ms <= history.now_ms
    published = await harness.engine.publish("nothing", "e", None)
    assert history.head() < parse_id(published.id)


async def test_history_expires_after_ttl(harness: Harness) -> None:
    """Expired history is gone, and the next publish starts a fresh chain."""
    await publish_many(harness, "ttl", 3)
    await harness.expire_history("ttl")
    history = await harness.engine.history("ttl", ID_ZERO, 10)
    assert (history.entries, history.first) == ([], None)
    fresh = await harness.engine.history("ttl", ID_ZERO, 10)
    assert fresh.last is None
    await harness.engine.publish("ttl", "e", None)
    reborn = await harness.engine.history("ttl", ID_ZERO, 10)
    assert len(reborn.entries) == 1 and reborn.entries[0].prev == ID_ZERO


# -- recovery proof, end to end --------------------------------------------------------


async def test_recovery_proven_when_history_intact(harness: Harness) -> None:
    """Entries after ``since`` retained (or born after the epoch): recovery is proven."""
    ids = await publish_many(harness, "intact", 5)
    for since in (parse_id(ids[0]), parse_id(ids[-1])):
        history = await harness.engine.history("intact", since, 100)
        assert prove_recovery(since, history, TTL_MS)
    epoch = (await harness.engine.history("intact", None, 1)).epoch_ms
    since = (epoch, 0)  # before the stream was born, after the store's epoch
    assert prove_recovery(since, await harness.engine.history("intact", since, 100), TTL_MS)
    before_epoch = (epoch - 1, 0)
    history = await harness.engine.history("intact", before_epoch, 100)
    assert not prove_recovery(before_epoch, history, TTL_MS)


async def test_recovery_refused_when_history_trimmed(start_engine: StartEngine) -> None:
    """Entries after ``since`` trimmed away: no proof; ``since`` right before the oldest: proof."""
    h = await start_engine(EngineOptions(history_size=5))
    ids = await publish_many(h, "trimmed", 120)  # Redis trims whole ~100-entry nodes
    since = parse_id(ids[0])
    history = await h.engine.history("trimmed", since, 1000)
    assert history.first is not None and history.first > parse_id(ids[1])
    assert not prove_recovery(since, history, TTL_MS)
    assert history.first_prev is not None
    edge = await h.engine.history("trimmed", history.first_prev, 1000)
    assert prove_recovery(history.first_prev, edge, TTL_MS)


async def test_recovery_on_missing_stream_depends_on_ttl_and_epoch(harness: Harness) -> None:
    """No stream: proven only if ``since`` is past, after the store's epoch, within the TTL."""
    history = await harness.engine.history("vanished", ID_ZERO, 10)
    now, epoch = history.now_ms, history.epoch_ms
    assert 0 < epoch <= now
    assert prove_recovery((epoch, 0), history, TTL_MS)
    assert not prove_recovery((epoch - 1, 0), history, TTL_MS)
    assert not prove_recovery((now - TTL_MS - 5_000, 0), history, TTL_MS)
    assert not prove_recovery((now + 60_000, 0), history, TTL_MS)


async def test_recovery_refused_for_unknown_future_id(harness: Harness) -> None:
    """A ``since`` beyond the newest entry was never issued by this stream: no proof."""
    ids = await publish_many(harness, "future", 2)
    last = parse_id(ids[-1])
    since = (last[0] + 10_000, 0)
    assert not prove_recovery(since, await harness.engine.history("future", since, 10), TTL_MS)
