"""The hub: which local sessions want which BizId, and where each BizId's live feed is.

Pure bookkeeping, no I/O. The node asks the engine to subscribe a BizId when the hub
says a session is the first for it, and to unsubscribe after the last one leaves.

Every event names the id before it (``prev``). The hub keeps the newest id delivered per
BizId and sorts each live event into one of four verdicts, so a lost pub/sub message (a
silent resubscribe, a Redis restart) becomes a visible gap that the node fills from
history, and a repeat becomes a no-op.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Generic, TypeVar

from relay.wire import ID_ZERO, Event, StreamId

__all__ = ["Hub", "Subscription", "Verdict"]

S = TypeVar("S")


class Verdict(enum.Enum):
    DELIVER = "deliver"  # next in line: fan it out
    STALE = "stale"  # already delivered (a replay overlap): drop
    GAP = "gap"  # something before it is missing: repair from history first
    HELD = "held"  # a repair is under way: kept until it ends
    UNWANTED = "unwanted"  # no local session wants this BizId any more


class Subscription(Generic[S]):
    """One BizId's local sessions and its live-feed position."""

    __slots__ = ("biz_id", "held", "last", "live", "repairing", "sessions")

    def __init__(self, biz_id: str) -> None:
        self.biz_id = biz_id
        self.sessions: list[S] = []
        self.last: StreamId | None = None  # newest id fanned out, None before the first
        self.live = False  # the engine confirmed the subscription
        self.repairing = False
        self.held: list[Event] = []

    def offer(self, event: Event) -> Verdict:
        """Classify a live event and advance the position when it is delivered."""
        last = self.last
        if last is not None and event.key <= last:
            return Verdict.STALE
        if self.repairing:
            self.held.append(event)
            return Verdict.HELD
        # A fresh stream (prev 0-0) cannot be proven gap-free from here, and history
        # would hold the same entries: deliver.
        if last is None or event.prev == last or event.prev == ID_ZERO:
            self.last = event.key
            return Verdict.DELIVER
        self.repairing = True
        self.held.append(event)
        return Verdict.GAP

    def begin_repair(self, since: StreamId) -> None:
        """Hold live events until :meth:`end_repair`; history after ``since`` comes first."""
        self.repairing = True
        if self.last is None or since < self.last:
            self.last = since

    def advance(self, key: StreamId) -> None:
        """Move the position forward (never back) after a replay or repair."""
        if self.last is None or key > self.last:
            self.last = key

    def end_repair(self) -> list[Event]:
        """Finish a repair: return the held events still ahead of the position, in order."""
        held, self.held, self.repairing = self.held, [], False
        out = []
        for event in held:
            if self.last is None or event.key > self.last:
                self.last = event.key
                out.append(event)
        return out


class Hub(Generic[S]):
    """Local sessions by BizId."""

    def __init__(self) -> None:
        self._subs: dict[str, Subscription[S]] = {}

    def __len__(self) -> int:
        return len(self._subs)

    def __iter__(self) -> Iterator[Subscription[S]]:
        return iter(list(self._subs.values()))

    def get(self, biz_id: str) -> Subscription[S] | None:
        return self._subs.get(biz_id)

    def add(self, biz_id: str, session: S) -> tuple[Subscription[S], bool]:
        """Attach a session; True when it is the first for the BizId (subscribe now)."""
        sub = self._subs.get(biz_id)
        first = sub is None
        if sub is None:
            sub = self._subs[biz_id] = Subscription(biz_id)
        sub.sessions.append(session)
        return sub, first

    def remove(self, biz_id: str, session: S) -> bool:
        """Detach a session; True when it was the last (unsubscribe now)."""
        sub = self._subs.get(biz_id)
        if sub is None or session not in sub.sessions:
            return False
        sub.sessions.remove(session)
        if sub.sessions:
            return False
        del self._subs[biz_id]
        return True
