"""Unit tests for relay.hub: reference counting by BizId and live-feed verdicts."""

from __future__ import annotations

from relay.hub import Hub, Subscription, Verdict, follows
from relay.wire import ID_ZERO, Event, StreamId, format_id


def event(key: StreamId, prev: StreamId, biz_id: str = "cml") -> Event:
    """A live event with the given id and predecessor."""
    return Event(format_id(key), key, prev, biz_id, "e", None, 1.0)


def chain(*ms: int) -> list[Event]:
    """Consecutive events <ms>-0, each naming the one before (the first names 0-0)."""
    out, prev = [], ID_ZERO
    for m in ms:
        out.append(event((m, 0), prev))
        prev = (m, 0)
    return out


# -- Hub -----------------------------------------------------------------------------------


def test_hub_add_first_session_subscribes() -> None:
    """The first session of a BizId is reported first; later ones are not."""
    hub: Hub[str] = Hub()
    sub, first = hub.add("cml", "s1")
    assert first is True and sub.sessions == ["s1"] and sub.biz_id == "cml"
    again, first = hub.add("cml", "s2")
    assert first is False and again is sub and sub.sessions == ["s1", "s2"]
    assert hub.get("cml") is sub and len(hub) == 1


def test_hub_add_per_biz_id() -> None:
    """Each BizId has its own subscription and its own 'first'."""
    hub: Hub[str] = Hub()
    assert hub.add("a", "s1")[1] and hub.add("b", "s2")[1]
    assert len(hub) == 2 and {s.biz_id for s in hub} == {"a", "b"}


def test_hub_remove_last_session_unsubscribes() -> None:
    """Removing a non-last session says False; removing the last says True and forgets it."""
    hub: Hub[str] = Hub()
    hub.add("cml", "s1")
    hub.add("cml", "s2")
    assert hub.remove("cml", "s1") is False
    assert hub.get("cml") is not None
    assert hub.remove("cml", "s2") is True
    assert hub.get("cml") is None and len(hub) == 0


def test_hub_remove_unknown_is_noop() -> None:
    """Removing from an unknown BizId, or a session never added, returns False."""
    hub: Hub[str] = Hub()
    assert hub.remove("cml", "s1") is False
    hub.add("cml", "s1")
    assert hub.remove("cml", "other") is False
    sub = hub.get("cml")
    assert sub is not None and sub.sessions == ["s1"]


def test_hub_iter_is_a_snapshot() -> None:
    """Iterating while removing does not break: the hub iterates over a copy."""
    hub: Hub[str] = Hub()
    for biz in "abc":
        hub.add(biz, f"s-{biz}")
    for sub in hub:
        hub.remove(sub.biz_id, sub.sessions[0])
    assert len(hub) == 0


# -- Subscription.offer --------------------------------------------------------------------


def test_subscription_offer_first_event_delivered() -> None:
    """Before any position, the first event is delivered and becomes the position."""
    sub: Subscription[str] = Subscription("cml")
    assert sub.offer(event((5, 0), (4, 0))) is Verdict.DELIVER
    assert sub.last == (5, 0)


def test_subscription_offer_prev_chain_delivered() -> None:
    """Each event naming the position as its prev is delivered in turn."""
    sub: Subscription[str] = Subscription("cml")
    assert [sub.offer(e) for e in chain(1, 2, 3)] == [Verdict.DELIVER] * 3
    assert sub.last == (3, 0)


def test_subscription_offer_stale_dropped() -> None:
    """An event at or before the position is STALE and changes nothing."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    assert sub.offer(event((5, 0), (4, 0))) is Verdict.STALE
    assert sub.offer(event((3, 0), (2, 0))) is Verdict.STALE
    assert sub.last == (5, 0) and not sub.repairing


def test_subscription_offer_gap_starts_repair() -> None:
    """An event whose prev is not the position is a GAP: held, repair begins."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    gap = event((7, 0), (6, 0))
    assert sub.offer(gap) is Verdict.GAP
    assert sub.repairing and sub.held == [gap] and sub.last == (5, 0)


def test_subscription_offer_held_during_repair() -> None:
    """While repairing, newer events are HELD and older ones still STALE."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    sub.offer(event((7, 0), (6, 0)))
    nxt = event((8, 0), (7, 0))
    assert sub.offer(nxt) is Verdict.HELD
    assert sub.offer(event((4, 0), (3, 0))) is Verdict.STALE
    assert sub.held[-1] is nxt and sub.last == (5, 0)


def test_subscription_offer_fresh_stream_delivered() -> None:
    """An event with prev 0-0 (a fresh stream) is delivered even after a position."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    assert sub.offer(event((900, 0), ID_ZERO)) is Verdict.DELIVER
    assert sub.last == (900, 0) and not sub.repairing


def test_subscription_offer_fresh_stream_held_while_repairing() -> None:
    """Even a fresh-stream event waits while a repair is under way."""
    sub: Subscription[str] = Subscription("cml")
    sub.begin_repair((5, 0))
    assert sub.offer(event((900, 0), ID_ZERO)) is Verdict.HELD


# -- repair --------------------------------------------------------------------------------


def test_subscription_begin_repair_sets_position() -> None:
    """begin_repair with no position, or an older one, moves the position to `since`."""
    sub: Subscription[str] = Subscription("cml")
    sub.begin_repair((5, 0))
    assert sub.repairing and sub.last == (5, 0)
    sub.begin_repair((3, 0))
    assert sub.last == (3, 0)
    sub.begin_repair((9, 0))
    assert sub.last == (3, 0)


def test_subscription_hold_holds_even_the_event_that_follows() -> None:
    """hold (a draining node's replaced feed): even an event that follows the position is
    HELD, a repeat still STALE; with no position, 0-0 becomes it."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    sub.hold()
    assert sub.offer(event((6, 0), (5, 0))) is Verdict.HELD
    assert sub.offer(event((5, 0), (4, 0))) is Verdict.STALE
    assert sub.repairing and sub.last == (5, 0)
    connecting: Subscription[str] = Subscription("cml")
    connecting.hold()
    assert connecting.last == ID_ZERO
    assert connecting.offer(event((1, 0), ID_ZERO)) is Verdict.HELD


def test_subscription_advance_never_moves_back() -> None:
    """advance only moves the position forward."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    sub.advance((4, 9))
    assert sub.last == (5, 0)
    sub.advance((5, 1))
    assert sub.last == (5, 1)


def test_subscription_end_repair_returns_newer_held_in_order() -> None:
    """end_repair returns only held events past the replayed position, in arrival order."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    e7, e8, e9, e10 = event((7, 0), (6, 0)), *chain(8, 9, 10)
    assert sub.offer(e7) is Verdict.GAP
    assert [sub.offer(e) for e in (e8, e9, e10)] == [Verdict.HELD] * 3
    for key in [(6, 0), (7, 0), (8, 0)]:  # history replayed up to 8-0
        sub.advance(key)
    assert sub.end_repair() == ([e9, e10], True)
    assert sub.last == (10, 0) and sub.held == [] and not sub.repairing


def test_subscription_end_repair_all_covered() -> None:
    """If history already covered every held event, end_repair returns nothing."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    sub.offer(event((7, 0), (6, 0)))
    sub.advance((7, 0))
    assert sub.end_repair() == ([], True)
    assert sub.last == (7, 0)


def test_subscription_live_after_repair() -> None:
    """After end_repair, the next event in the chain is delivered again."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    sub.offer(event((7, 0), (6, 0)))
    sub.advance((7, 0))
    sub.end_repair()
    assert sub.offer(event((8, 0), (7, 0))) is Verdict.DELIVER


def test_subscription_end_repair_without_position() -> None:
    """With no position at all, every held event is returned in order."""
    sub: Subscription[str] = Subscription("cml")
    sub.repairing = True
    events = chain(1, 2)
    assert [sub.offer(e) for e in events] == [Verdict.HELD, Verdict.HELD]
    assert sub.end_repair() == (events, True) and sub.last == (2, 0)


def test_subscription_end_repair_stops_at_a_second_hole() -> None:
    """A held event that does not follow stays held, with the rest: the repair goes on."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    e7, e8 = event((7, 0), (6, 0)), event((8, 0), (7, 0))
    e11, e12 = event((11, 0), (10, 0)), event((12, 0), (11, 0))
    for e in (e7, e8, e11, e12):
        sub.offer(e)
    sub.advance((6, 0))  # history replayed up to 6-0
    assert sub.end_repair() == ([e7, e8], False)
    assert sub.repairing and sub.held == [e11, e12] and sub.last == (8, 0)
    assert sub.offer(event((13, 0), (12, 0))) is Verdict.HELD
    sub.advance((10, 0))  # the next read replays 9-0 and 10-0
    released, complete = sub.end_repair()
    assert [e.key for e in released] == [(11, 0), (12, 0), (13, 0)] and complete
    assert not sub.repairing and sub.last == (13, 0)


def test_subscription_reset_forgets_position_and_drops_held() -> None:
    """reset() drops the held events; the next event is delivered as if on a new subscription."""
    sub: Subscription[str] = Subscription("cml")
    sub.advance((5, 0))
    held = event((9, 0), (8, 0))
    sub.offer(held)
    assert sub.reset() == [held]
    assert sub.last is None and sub.held == [] and not sub.repairing
    assert sub.offer(event((20, 0), (19, 0))) is Verdict.DELIVER and sub.last == (20, 0)


def test_follows_prev_chain_fresh_stream_and_no_position() -> None:
    """An event follows its prev, any position when its prev is 0-0, and no position at all."""
    assert follows(event((6, 0), (5, 0)), (5, 0))
    assert not follows(event((7, 0), (6, 0)), (5, 0))
    assert follows(event((900, 0), ID_ZERO), (5, 0))
    assert follows(event((7, 0), (6, 0)), None)
