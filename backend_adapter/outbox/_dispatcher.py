"""The dispatcher: publishes committed rows in order, marks them, parks poison rows."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from backend_adapter._core import RetryPolicy, is_transient
from backend_adapter._sync import Publisher
from backend_adapter.outbox._enqueue import new_uid
from backend_adapter.outbox._table import (
    OUTBOX,
    check_table,
)
from relay.backoff import Backoff, Jitter, Retry
from relay.errors import ConfigError, InvalidInput, PublishFailed, RelayError
from relay.wire import PublishResult

log = logging.getLogger("backend_adapter.outbox")  # one logger for the whole outbox

_TEXT_ARRAY: Final = postgresql.ARRAY(sa.Text())
_BIGINT_ARRAY: Final = postgresql.ARRAY(sa.BigInteger())

_MAX_PARK: Final = 300.0
"""Longest pause, in seconds, before a poison row is tried again."""
_PARK_BACKOFF: Final = Backoff(1.0, _MAX_PARK, Jitter.NONE)


@dataclass(frozen=True, slots=True)
class DispatchStats:
    """What one :meth:`OutboxDispatcher.run_once` did."""

    claimed: int = 0
    """Pending rows read (and, on PostgreSQL, locked)."""
    published: int = 0
    """Rows published and marked, duplicates included."""
    duplicates: int = 0
    """Of those, rows Redis had already seen (a previous round published but did not mark)."""
    collisions: int = 0
    """Rows whose mid another event holds: not published, given a new uid for next round."""
    uids_assigned: int = 0
    """Rows written without a uid that were given one: published next round."""
    held_back: int = 0
    """Rows left pending to keep their BizId's order (an earlier row is not ours, failed
    or had no uid yet)."""
    failed: int = 0
    """Poison rows: publishing failed for good; ``attempts`` and ``last_error`` recorded."""


@dataclass(slots=True)
class _Row:
    id: int
    biz_id: str
    event: str
    data: str
    uid: str | None


@dataclass(slots=True)
class _Outcome:
    done: list[tuple[int, PublishResult]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    held_back: int = 0
    # (row id, uid it has now or None, new uid): rows without one, and collisions.
    new_uids: list[tuple[int, str | None, str]] = field(default_factory=list)
    collisions: int = 0


def _with_uids(rows: list[_Row]) -> tuple[list[_Row], list[tuple[int, str | None, str]]]:
    """Split off rows without a uid (written by something other than :func:`enqueue`).

    They get one now, recorded with this round's marks, and go out next round: a row is
    only ever published under a uid already committed, or a crash between publish and
    mark would give it a second one. Each BizId's rows after such a row wait with it.
    """
    new_uids: list[tuple[int, str | None, str]] = []
    blocked: set[str] = set()
    kept: list[_Row] = []
    for row in rows:
        if row.uid is None:
            new_uids.append((row.id, None, new_uid()))
            blocked.add(row.biz_id)
        elif row.biz_id not in blocked:
            kept.append(row)
    if not new_uids:
        return rows, new_uids
    return kept, new_uids


def _normalise_url(url: str) -> str:
    # SQLAlchemy's default PostgreSQL driver is psycopg2; Relay's extra installs psycopg 3.
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


class OutboxDispatcher:
    """Publish committed outbox rows to Relay and mark them.

    ``db`` is an Engine or a database URL (``sqlite:///app.db``,
    ``postgresql://user@host/db``); ``publisher`` a :class:`Publisher` (its
    ``dedupe_window`` bounds the crash recovery window, see the module docs). One
    :meth:`run_once` publishes up to ``batch_size`` rows in one pipeline; ``run_forever``
    repeats it, waits ``poll_interval`` when the outbox is empty (or until :meth:`wake`),
    backs off on failures up to ``max_backoff`` seconds, and deletes rows published more
    than ``retention`` seconds ago (None keeps them). Thread-safe: :meth:`stop` and
    :meth:`wake` may be called from any thread.
    """

    def __init__(
        self,
        db: Engine | str,
        publisher: Publisher,
        *,
        table: sa.Table = OUTBOX,
        batch_size: int = 500,
        poll_interval: float = 0.5,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        mid_prefix: str = "outbox",
        retention: float | None = 86400.0,
    ) -> None:
        if not isinstance(publisher, Publisher):
            raise ConfigError("the outbox dispatcher publishes with a (sync) Publisher")
        if batch_size < 1 or poll_interval <= 0:
            raise ConfigError("batch_size and poll_interval must be positive")
        if retention is not None and retention <= 0:
            raise ConfigError("retention must be positive, or None to keep published rows")
        if not mid_prefix or " " in mid_prefix:
            raise ConfigError("mid_prefix must be non-empty, without spaces")
        self._owns_engine = isinstance(db, str)
        self.engine: Engine = sa.create_engine(_normalise_url(db)) if isinstance(db, str) else db
        self.publisher = publisher
        self.table = table
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention = retention
        self._mid_prefix = mid_prefix
        self._retry = RetryPolicy(retries=0, backoff=backoff, max_backoff=max_backoff)
        # Row locks that other dispatchers skip: PostgreSQL. Elsewhere: one dispatcher.
        self._locking = self.engine.dialect.name == "postgresql"
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        # BizIds behind a poison row: left out of claims until (monotonic time), and
        # their failures in a row (the pause doubles from 1 s up to _MAX_PARK).
        self._parked: dict[str, tuple[float, Retry]] = {}
        self._checked = False  # the table has been found, with every column

    # -- one round -----------------------------------------------------------------------

    def run_once(self) -> DispatchStats:
        """Publish and mark up to ``batch_size`` pending rows.

        Raises PublishFailed when Redis is unreachable (nothing is marked; the rows stay
        pending and the next round publishes them again, with their mids) and
        SQLAlchemy's errors when the database is. The first round checks the table and
        raises ConfigError, saying what to run, if it is missing or older than this code.
        """
        if not self._checked:
            check_table(self.engine, self.table)
            self._checked = True
        with self.engine.connect() as conn:
            if self._locking:
                # READ COMMITTED whatever the engine's default: the order check must see
                # rows committed since the claim, and a stricter level would fail the
                # claim whenever another dispatcher marked a row in between.
                conn.execution_options(isolation_level="READ COMMITTED")
                # Locks held across the publish: other dispatchers skip these rows. They
                # block no INSERT, so the application never waits on them.
                with conn.begin():
                    rows = self._claim(conn)
                    claimed = len(rows)
                    rows, gaps = self._in_order(conn, rows)
                    ready, new_uids = _with_uids(rows)
                    outcome = self._publish(ready)
                    outcome.held_back += gaps + len(rows) - len(ready)
                    outcome.new_uids += new_uids
                    self._record(conn, outcome)
            else:
                with conn.begin():
                    rows = self._claim(conn)
                claimed = len(rows)
                ready, new_uids = _with_uids(rows)
                outcome = self._publish(ready)
                outcome.held_back += len(rows) - len(ready)
                outcome.new_uids += new_uids
                with conn.begin():
                    self._record(conn, outcome)
        return DispatchStats(
            claimed=claimed,
            published=len(outcome.done),
            duplicates=sum(1 for _, result in outcome.done if result.duplicate),
            collisions=outcome.collisions,
            uids_assigned=len(outcome.new_uids) - outcome.collisions,
            held_back=outcome.held_back,
            failed=len(outcome.failed),
        )

    def _claim(self, conn: Connection) -> list[_Row]:
        t = self.table
        query = (
            sa.select(t.c.id, t.c.biz_id, t.c.event, t.c.data, t.c.uid)
            .where(t.c.published_at.is_(None))
            .order_by(t.c.id)
            .limit(self.batch_size)
        )
        parked = self._parked_now()
        if parked:
            query = query.where(t.c.biz_id.not_in(parked))
        if self._locking:
            query = query.with_for_update(skip_locked=True)
        return [_Row(*row) for row in conn.execute(query)]

    def _parked_now(self) -> list[str]:
        now = time.monotonic()
        return [biz for biz, (until, _) in self._parked.items() if until > now]

    def _in_order(self, conn: Connection, rows: list[_Row]) -> tuple[list[_Row], int]:
        """Keep each BizId's rows only up to its first pending row that we do not hold."""
        if not rows:
            return rows, 0
        t = self.table
        ours = {row.id for row in rows}
        # One array parameter rather than an IN list of up to batch_size values: the
        # statement stays the same for SQLAlchemy's cache and PostgreSQL's planner.
        bizs = sa.bindparam("bizs", list({row.biz_id for row in rows}), type_=_TEXT_ARRAY)
        pending = conn.execute(
            sa.select(t.c.biz_id, t.c.id)
            .where(
                t.c.published_at.is_(None),
                t.c.biz_id == sa.any_(bizs),
                t.c.id <= rows[-1].id,
            )
            .order_by(t.c.id)
        )
        gap: dict[str, int] = {}
        for biz_id, row_id in pending:
            if row_id not in ours and biz_id not in gap:
                gap[biz_id] = row_id
        if not gap:
            return rows, 0
        kept = [row for row in rows if row.id < gap.get(row.biz_id, row.id + 1)]
        return kept, len(rows) - len(kept)

    def _mid(self, row: _Row) -> str:
        return f"{self._mid_prefix}:{row.uid}"

    def _item(self, row: _Row) -> tuple[str, str, Any, str]:
        return (row.biz_id, row.event, orjson.loads(row.data), self._mid(row))

    def _publish(self, rows: list[_Row]) -> _Outcome:
        if not rows:
            return _Outcome()
        try:
            results = self.publisher.publish_many(self._item(row) for row in rows)
            outcome = _Outcome([(row.id, r) for row, r in zip(rows, results, strict=True)])
        except (InvalidInput, orjson.JSONDecodeError):
            outcome = self._publish_valid(rows)
        except PublishFailed as exc:
            if exc.__cause__ is None or is_transient(exc.__cause__):
                raise
            outcome = self._publish_one_by_one(rows)
        if any(result.duplicate for _, result in outcome.done):
            self._check_duplicates(rows, outcome)
        if self._parked:  # a BizId whose rows went out is no longer behind a poison row
            failed = {row_id for row_id, _ in outcome.failed}
            still = {row.biz_id for row in rows if row.id in failed}
            published = {row_id for row_id, _ in outcome.done}
            for row in rows:
                if row.id in published and row.biz_id not in still:
                    self._parked.pop(row.biz_id, None)
        return outcome

    def _check_duplicates(self, rows: list[_Row], outcome: _Outcome) -> None:
        """Tell a row published before from a row whose mid another event holds.

        Redis answers ``duplicate`` with the id of the event that first used the mid. If
        that event is this row's (same event and data), a previous round published the
        row and did not mark it: expected after a crash. If it is another event, the
        row was never published and the uid is not unique after all (a row copied by
        hand, a writer that chose its own uids): a loud warning, a new uid, and the row
        goes out in the next round instead of being lost. An original no longer in the
        history (trimmed) cannot be compared; a random uid makes it this row's.
        """
        by_id = {row.id: row for row in rows}
        dups = [(by_id[row_id], result) for row_id, result in outcome.done if result.duplicate]
        originals = self.publisher._read_originals(
            [(row.biz_id, result.id) for row, result in dups]
        )
        collided: set[int] = set()
        for (row, result), original in zip(dups, originals, strict=True):
            if original is None:
                continue
            if (original.event, original.data) == (row.event, orjson.loads(row.data)):
                continue
            log.warning(
                "outbox.unexpected_duplicate: row %d (BizId %r, event %r) was never "
                "published, but its mid %r belongs to event %s (%r); publishing it again "
                "under a new uid: find what wrote two rows with uid %r",
                row.id,
                row.biz_id,
                row.event,
                self._mid(row),
                result.id,
                original.event,
                row.uid,
            )
            collided.add(row.id)
            outcome.new_uids.append((row.id, row.uid, new_uid()))
        if collided:
            outcome.done = [(row_id, r) for row_id, r in outcome.done if row_id not in collided]
            outcome.collisions += len(collided)

    def _validate(self, row: _Row) -> tuple[str, str, Any, str]:
        item = self._item(row)
        self.publisher.validate(*item)  # the publisher's own check: its max_payload applies
        return item

    def _publish_valid(self, rows: list[_Row]) -> _Outcome:
        """Some row does not validate: set those aside (and their BizIds' later rows)."""
        outcome = _Outcome()
        blocked: set[str] = set()
        good: list[_Row] = []
        items = []
        for row in rows:
            if row.biz_id in blocked:
                outcome.held_back += 1
                continue
            try:
                item = self._validate(row)
            except (InvalidInput, orjson.JSONDecodeError) as exc:
                self._poisoned(outcome, blocked, row, exc)
                continue
            good.append(row)
            items.append(item)
        if items:
            results = self.publisher.publish_many(items)
            outcome.done = [(row.id, result) for row, result in zip(good, results, strict=True)]
        return outcome

    def _publish_one_by_one(self, rows: list[_Row]) -> _Outcome:
        """Redis refused some row for good (a key of the wrong type, say): find which."""
        outcome = _Outcome()
        blocked: set[str] = set()
        for row in rows:
            if row.biz_id in blocked:
                outcome.held_back += 1
                continue
            try:
                outcome.done.append((row.id, self.publisher.publish(*self._item(row))))
            except (InvalidInput, orjson.JSONDecodeError) as exc:
                self._poisoned(outcome, blocked, row, exc)
            except PublishFailed as exc:
                if exc.__cause__ is None or is_transient(exc.__cause__):
                    raise
                self._poisoned(outcome, blocked, row, exc)
        return outcome

    def _poisoned(self, outcome: _Outcome, blocked: set[str], row: _Row, exc: Exception) -> None:
        log.error(
            "outbox.row_failed: row %d (BizId %r, event %r) cannot be published; "
            "later events of this BizId wait behind it: %s",
            row.id,
            row.biz_id,
            row.event,
            exc,
        )
        outcome.failed.append((row.id, f"{type(exc).__name__}: {exc}"[:2000]))
        blocked.add(row.biz_id)
        # Leave the BizId out of the next claims for a while, so that its waiting rows do
        # not fill every batch and starve the others; then try the poison row again.
        _, retry = self._parked.get(row.biz_id, (0.0, Retry(_PARK_BACKOFF)))
        delay = retry.failed() or 0.0
        self._parked[row.biz_id] = (time.monotonic() + delay, retry)

    def _record(self, conn: Connection, outcome: _Outcome) -> None:
        """Mark published rows; count a failure on poison rows. In the caller's transaction."""
        t = self.table
        now = datetime.now(UTC)
        if outcome.done and self._locking:
            # PostgreSQL: one UPDATE ... FROM unnest(ids, stream ids), not one per row.
            marks = (
                sa.func.unnest(
                    sa.bindparam("ids", [row_id for row_id, _ in outcome.done], _BIGINT_ARRAY),
                    sa.bindparam("sids", [result.id for _, result in outcome.done], _TEXT_ARRAY),
                )
                .table_valued("id", "sid")
                .render_derived(name="marks")
            )
            conn.execute(
                t.update()
                .where(t.c.id == marks.c.id)
                .values(published_at=now, stream_id=marks.c.sid)
            )
        elif outcome.done:
            conn.execute(
                t.update()
                .where(t.c.id == sa.bindparam("row_id"))
                .values(published_at=now, stream_id=sa.bindparam("sid")),
                [{"row_id": row_id, "sid": result.id} for row_id, result in outcome.done],
            )
        if outcome.failed:
            conn.execute(
                t.update()
                .where(t.c.id == sa.bindparam("row_id"))
                .values(attempts=t.c.attempts + 1, last_error=sa.bindparam("error")),
                [{"row_id": row_id, "error": error} for row_id, error in outcome.failed],
            )
        if outcome.new_uids:
            # Compare and set: a row given a uid elsewhere meanwhile keeps that one. The
            # row is published only with a uid committed before, so never under two.
            conn.execute(
                t.update()
                .where(
                    t.c.id == sa.bindparam("row_id"),
                    t.c.uid.is_not_distinct_from(sa.bindparam("old_uid", type_=t.c.uid.type)),
                )
                .values(uid=sa.bindparam("new_uid")),
                [
                    {"row_id": row_id, "old_uid": old, "new_uid": new}
                    for row_id, old, new in outcome.new_uids
                ],
            )

    # -- housekeeping ----------------------------------------------------------------------

    def purge(self, older_than: float, *, chunk: int = 10_000) -> int:
        """Delete rows published more than ``older_than`` seconds ago; return how many."""
        t = self.table
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        deleted = 0
        while True:
            with self.engine.begin() as conn:
                ids = (
                    sa.select(t.c.id)
                    .where(t.c.published_at.is_not(None), t.c.published_at < cutoff)
                    .limit(chunk)
                )
                count = conn.execute(t.delete().where(t.c.id.in_(ids))).rowcount
            deleted += count
            if count < chunk:
                return deleted

    def pending(self) -> int:
        """How many rows wait to be published (poison rows included)."""
        t = self.table
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(t).where(t.c.published_at.is_(None))
            return int(conn.execute(query).scalar_one())

    # -- running -----------------------------------------------------------------------------

    def run_forever(self, *, purge_every: float = 60.0) -> None:
        """Dispatch until :meth:`stop`; never raises for a Redis or database outage.

        Raises ConfigError at once if the table is missing or older than this code:
        retrying cannot fix that.
        """
        retry = Retry(Backoff(self._retry.backoff, self._retry.max_backoff))  # for ever
        next_purge = time.monotonic()
        while not self._stopping.is_set():
            self._wakeup.clear()
            try:
                stats = self.run_once()
                if self.retention is not None and time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + purge_every
                    self.purge(self.retention)
            except ConfigError as exc:
                log.error("outbox.dispatch_stopped: %s", exc)
                raise
            except Exception as exc:
                delay = retry.failed() or 0.0
                log.warning(
                    "outbox.dispatch_failed: attempt %d, retrying in %.2f s: %s",
                    retry.failures,
                    delay,
                    exc,
                    exc_info=not isinstance(exc, RelayError | sa.exc.OperationalError),
                )
                self._stopping.wait(delay)
                continue
            if retry.failures:
                log.info("outbox.dispatch_recovered: after %d failed attempt(s)", retry.failures)
                retry.succeeded()
            if stats.failed or (stats.claimed < self.batch_size and not stats.held_back):
                self._wakeup.wait(self.poll_interval)
            elif stats.held_back:
                # Another dispatcher holds an earlier row of some BizId, or rows were just
                # given a uid: either goes out in a moment.
                self._stopping.wait(min(self.poll_interval, 0.01))

    def wake(self) -> None:
        """Start the next round now instead of after ``poll_interval`` (after a commit)."""
        self._wakeup.set()

    def stop(self) -> None:
        """Make ``run_forever`` return after the current round."""
        self._stopping.set()
        self._wakeup.set()

    def close(self) -> None:
        """Stop, and dispose of the engine if this dispatcher made it from a URL."""
        self.stop()
        if self._owns_engine:
            self._owns_engine = False
            self.engine.dispose()

    def __enter__(self) -> OutboxDispatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
