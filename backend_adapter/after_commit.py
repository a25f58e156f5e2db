"""Publish after commit: an event queued on a transaction goes out only once it committed.

Why: publishing inside the transaction lets clients see a change that may still roll
back; publishing by hand after ``commit()`` is forgotten on one code path and repeated on
another when a handler retries. Here the event waits on the transaction itself:

- :class:`AfterCommit` queues events in a SQLAlchemy ``Session.info`` (sync ``Session``
  or ``AsyncSession``) and lets the session's events decide their fate:

  ====================================  ============================================
  ``after_commit`` of the outermost     publish everything queued, in order, once
  transaction
  ``after_soft_rollback``               drop what was queued inside the transaction
                                        or savepoint that rolled back (a savepoint's
                                        rollback keeps what was queued before it)
  ``after_transaction_end`` of the      drop whatever is left: ``close()`` without
  outermost transaction                 commit, a commit that failed
  ====================================  ============================================

- :func:`dbapi_transaction` does the same around a plain DB-API connection
  (``sqlite3``, ``psycopg``, ...) for backends without SQLAlchemy.

Guarantee: at most once, best effort. The events of one commit go out as one
``publish_many`` (one round trip, their order kept); with an :class:`AsyncPublisher` they
go out from one task per :class:`AfterCommit`, in commit order, shortly after ``commit``
returns. A failure after the commit (Redis down past the publisher's retries, the process
dying in between) cannot undo the commit, so it is reported to ``on_error`` (default: a
logged error) and the event is lost. When every event must arrive, write it to the
transactional outbox instead (:mod:`backend_adapter.outbox`).

SQLAlchemy is imported only when an :class:`AfterCommit` is made, so
:func:`dbapi_transaction` works without it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from backend_adapter._asyncio import AsyncPublisher
from backend_adapter._sync import Publisher
from relay.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["AfterCommit", "ErrorHandler", "EventQueue", "QueuedEvent", "dbapi_transaction"]

log = logging.getLogger("backend_adapter.after_commit")

QueuedEvent = tuple[str, str, Any, str | None]
"""``(biz_id, event, data, mid)``: one event waiting for its commit."""

ErrorHandler = Callable[[Exception, list[QueuedEvent]], None]
"""Called with the error and the events of a commit whose publish failed."""

_INFO_KEY: Final = "relay.after_commit"


def _log_failure(exc: Exception, events: list[QueuedEvent]) -> None:
    bizs = sorted({event[0] for event in events})
    log.error(
        "after_commit.publish_failed: %d event(s) for %s were committed but not published: %s",
        len(events),
        ", ".join(bizs[:10]) + (" ..." if len(bizs) > 10 else ""),
        exc,
    )


def _validate(publisher: Publisher | AsyncPublisher, event: QueuedEvent) -> None:
    # Fail inside the transaction, where the caller can still react, rather than after
    # the commit. The publisher's own check, so its max_payload applies.
    publisher.validate(*event)


# -- SQLAlchemy sessions -------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    hook: AfterCommit
    # The savepoint the event was queued in; None for the outermost transaction.
    scope: SessionTransaction | None
    event: QueuedEvent


class AfterCommit:
    """Queue events on SQLAlchemy sessions; publish them when the session commits.

    ::

        relay_events = AfterCommit(publisher)        # one per process (and event loop)

        with Session(engine) as session, session.begin():
            session.add(label)
            relay_events.publish(session, "cml", "label.created", {"id": 7})
        # committed: published now. Rolled back or raised: never published.

    ``publisher`` is a :class:`Publisher` (sync sessions: publishing happens inside
    ``commit()``, after the database committed) or an :class:`AsyncPublisher`
    (``AsyncSession``: publishing is scheduled on the event loop when the commit
    returns; :meth:`wait` awaits it). ``on_error`` receives failures after commit.
    """

    def __init__(
        self, publisher: Publisher | AsyncPublisher, *, on_error: ErrorHandler | None = None
    ):
        if not isinstance(publisher, Publisher | AsyncPublisher):
            raise ConfigError("publisher must be a Publisher or an AsyncPublisher")
        _install_listeners()
        self._publisher = publisher
        self._on_error: ErrorHandler = on_error or _log_failure
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog: list[QueuedEvent] = []  # committed, waiting for the sender task
        self._sender: asyncio.Task[None] | None = None

    def publish(
        self,
        session: Session | AsyncSession,
        biz_id: str,
        event: str,
        data: Any,
        mid: str | None = None,
    ) -> None:
        """Queue an event on ``session``'s current transaction (or savepoint).

        Validates at once: InvalidInput / PayloadTooLarge are raised here, inside the
        transaction. ``data`` is encoded when it is published, so do not change it
        afterwards.
        """
        item: QueuedEvent = (biz_id, event, data, mid)
        _validate(self._publisher, item)
        if isinstance(self._publisher, AsyncPublisher):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise ConfigError(
                    "an AfterCommit with an AsyncPublisher is used from asyncio code only; "
                    "give threaded code a Publisher"
                ) from None
            if self._loop is None:
                self._loop = loop
            elif loop is not self._loop:
                raise ConfigError("an AfterCommit belongs to the event loop it first ran on")
        # An AsyncSession proxies a Session; the events and info live on that one.
        sync_session = cast("Session", getattr(session, "sync_session", session))
        entries: list[_Entry] = sync_session.info.setdefault(_INFO_KEY, [])
        entries.append(_Entry(self, sync_session.get_nested_transaction(), item))

    async def wait(self) -> None:
        """Wait until every event committed so far was published (or reported failed)."""
        while (sender := self._sender) is not None and not sender.done():
            await asyncio.wait({sender})

    # -- called from the session events ---------------------------------------------------

    def _committed(self, events: list[QueuedEvent]) -> None:
        publisher = self._publisher
        if isinstance(publisher, Publisher):
            _publish_now(publisher, events, self._on_error)
            return
        # after_commit runs inside AsyncSession.commit(), on the loop's thread but not
        # in a coroutine of ours: hand the events to one sender task, which keeps the
        # commit order of successive transactions.
        self._backlog.extend(events)
        if self._sender is None or self._sender.done():
            assert self._loop is not None
            self._sender = self._loop.create_task(self._send(publisher))

    async def _send(self, publisher: AsyncPublisher) -> None:
        while self._backlog:
            events, self._backlog = self._backlog, []
            try:
                await publisher.publish_many(events)
            except Exception as exc:
                self._report(exc, events)

    def _report(self, exc: Exception, events: list[QueuedEvent]) -> None:
        try:
            self._on_error(exc, events)
        except Exception:
            log.exception("after_commit.on_error_failed")


def _publish_now(publisher: Publisher, events: list[QueuedEvent], on_error: ErrorHandler) -> None:
    try:
        publisher.publish_many(events)
    except Exception as exc:
        # Never raise out of a commit that happened: a caller would retry it.
        try:
            on_error(exc, events)
        except Exception:
            log.exception("after_commit.on_error_failed")


def _boundary(transaction: SessionTransaction) -> SessionTransaction:
    """The transaction a rollback really undid: the nearest savepoint or the root.

    (SQLAlchemy's flush runs in an inner "subtransaction" that is neither.)
    """
    while transaction.parent is not None and not transaction.nested:
        transaction = transaction.parent
    return transaction


def _inside(scope: SessionTransaction | None, boundary: SessionTransaction) -> bool:
    while scope is not None:
        if scope is boundary:
            return True
        scope = scope.parent
    return False


def _on_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint was released; the events wait for the real commit
    entries: list[_Entry] | None = session.info.pop(_INFO_KEY, None)
    if not entries:
        return
    # Several AfterCommit objects may have queued on one session: each publishes its own,
    # in queue order.
    by_hook: dict[AfterCommit, list[QueuedEvent]] = {}
    for entry in entries:
        by_hook.setdefault(entry.hook, []).append(entry.event)
    for hook, events in by_hook.items():
        try:
            hook._committed(events)
        except Exception as exc:  # e.g. the event loop is closed; the commit stands
            hook._report(exc, events)


def _on_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    entries: list[_Entry] | None = session.info.get(_INFO_KEY)
    if not entries:
        return
    boundary = _boundary(previous_transaction)
    if boundary.parent is None:
        del session.info[_INFO_KEY]
    else:
        session.info[_INFO_KEY] = [e for e in entries if not _inside(e.scope, boundary)]


def _on_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_INFO_KEY, None)


_installed = False
_install_lock = threading.Lock()


def _install_listeners() -> None:
    """Listen on the Session class once: it covers every session, AsyncSession's too.

    A session without queued events pays one dict lookup per commit or rollback.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        from sqlalchemy import event
        from sqlalchemy.orm import Session

        event.listen(Session, "after_commit", _on_commit)
        event.listen(Session, "after_soft_rollback", _on_soft_rollback)
        event.listen(Session, "after_transaction_end", _on_transaction_end)
        _installed = True


# -- plain DB-API connections ----------------------------------------------------------------


class _Connection(Protocol):
    def commit(self) -> Any: ...

    def rollback(self) -> Any: ...


class EventQueue:
    """The events of one :func:`dbapi_transaction`, published if it commits."""

    __slots__ = ("_events", "_publisher")

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._events: list[QueuedEvent] = []

    def publish(self, biz_id: str, event: str, data: Any, mid: str | None = None) -> None:
        """Queue an event; validated now (InvalidInput), published after the commit."""
        item: QueuedEvent = (biz_id, event, data, mid)
        _validate(self._publisher, item)
        self._events.append(item)

    def __len__(self) -> int:
        return len(self._events)


@contextmanager
def dbapi_transaction(
    connection: _Connection, publisher: Publisher, *, on_error: ErrorHandler | None = None
) -> Iterator[EventQueue]:
    """Run a block as one transaction of a DB-API connection; publish its events after commit.

    ::

        with dbapi_transaction(conn, publisher) as events:
            conn.execute("INSERT INTO labels (biz_id, text) VALUES (?, ?)", ("cml", "hi"))
            events.publish("cml", "label.created", {"text": "hi"})

    On leaving the block normally: ``connection.commit()``, then the events go out in one
    ``publish_many``. On an exception: ``connection.rollback()``, nothing is published,
    the exception propagates. If ``commit()`` raises, nothing is published and the error
    propagates. A publish failure after the commit goes to ``on_error`` (default: logged),
    never to the caller. The connection must not be in autocommit mode.
    """
    if not isinstance(publisher, Publisher):
        raise ConfigError("dbapi_transaction publishes with a (sync) Publisher")
    events = EventQueue(publisher)
    try:
        yield events
    except BaseException:
        connection.rollback()
        raise
    connection.commit()
    if events._events:
        _publish_now(publisher, events._events, on_error or _log_failure)
