"""Transactional outbox: the event is a row written in the business transaction.

Why: publish-after-commit loses the event when the process dies, or Redis is down,
between the commit and the publish. Here the event is an INSERT into ``relay_outbox``
in the same transaction as the business change, so both commit or neither does, and a
dispatcher publishes the committed rows afterwards, however long Redis is away.

- :func:`enqueue` (or :func:`enqueue_async`) writes one row in the caller's transaction.
- :class:`OutboxDispatcher` publishes pending rows in id order with
  ``mid = "<mid_prefix>:<row uid>"`` and marks them ``published_at``; ``run_forever``
  retries with full-jitter backoff while Redis (or the database) is down.
- :func:`main` is ``relay outbox-dispatch --db-url ... --redis-url ...``.

Guarantees (docs/backend.md explains them at length):

- Mids unique by construction: each row carries a random ``uid`` (written by
  :func:`enqueue`, or by the dispatcher before a row's first publish), never the row
  id, which repeats in every other database and in a recreated or restored one. Redis
  would take such a repeat for a duplicate and drop it. A ``duplicate`` answer for a row
  whose mid another event holds is the warning ``outbox.unexpected_duplicate``, and the
  row goes out again under a new uid.
- No loss: a row stays pending until a publish of it succeeded and the mark committed.
- No duplicate in the BizId's history: a row published but not marked (a crash, a lost
  connection) is published again with the same ``mid``, which Redis recognises for
  ``dedupe_window`` seconds and answers ``duplicate=True`` without publishing. After a
  longer outage of the dispatcher itself, such a row is published a second time:
  at-least-once, not exactly-once, beyond the window.
- Order per BizId: rows of one BizId are published in id order. Two transactions that
  run at the same time may commit in the other order than their ids; the one committed
  first can then be published first. Transactions that do not overlap keep commit order.
- Several dispatchers on PostgreSQL: each claims a batch with ``FOR UPDATE SKIP LOCKED``
  and publishes a BizId's rows only up to the first pending row of that BizId it does
  not hold (another dispatcher has it, or it became visible after the claim); the rest
  wait for a later round. So no row is published by two dispatchers, and one BizId's
  rows never overtake each other. On SQLite run one dispatcher: it reads without
  locking (a write lock held across a Redis publish would block the application), so
  two would publish the same rows twice (harmless within the dedupe window, but wasted).

A row that can never be published (data or BizId that fails validation, a Redis key of
the wrong type) is a poison row: it stays pending with ``attempts`` and ``last_error``
set, later rows of its BizId wait behind it, other BizIds go on. Fix or delete it.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Final, cast

import orjson
import redis
import sqlalchemy as sa
from redis.client import NEVER_DECODE
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from backend_adapter._core import RetryPolicy, is_transient
from backend_adapter._sync import Publisher
from relay.backoff import Backoff, Retry
from relay.errors import ConfigError, InvalidEnvelope, InvalidInput, PublishFailed, RelayError
from relay.wire import PublishResult, decode_payload, encode_payload

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session

__all__ = [
    "METADATA",
    "OUTBOX",
    "DispatchStats",
    "OutboxDispatcher",
    "create_outbox_table",
    "define_outbox_table",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "main",
]

log = logging.getLogger("backend_adapter.outbox")

_TEXT_ARRAY: Final = postgresql.ARRAY(sa.Text())
_BIGINT_ARRAY: Final = postgresql.ARRAY(sa.BigInteger())

_MAX_PARK: Final = 300.0
"""Longest pause, in seconds, before a poison row is tried again."""

# -- the table -------------------------------------------------------------------------------


def define_outbox_table(
    metadata: sa.MetaData, name: str = "relay_outbox", *, schema: str | None = None
) -> sa.Table:
    """Add an outbox table to ``metadata`` (for your own Alembic metadata, say).

    ``data`` holds the event's data as JSON text, so a backend in another language can
    INSERT rows too. ``uid`` (32 hex digits, random) makes the row's ``mid`` unique
    across databases; a row written without one gets it from the dispatcher. The
    partial indexes cover only pending rows: the claim and the per-BizId order check
    stay fast however many published rows are kept.
    """
    pending = sa.text("published_at IS NULL")
    published = sa.text("published_at IS NOT NULL")
    return sa.Table(
        name,
        metadata,
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("biz_id", sa.String(128), nullable=False),
        sa.Column("event", sa.String(128), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.Column("stream_id", sa.String(41)),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text()),
        # Last, so that a table upgraded with ALTER TABLE ADD COLUMN has the same shape.
        # Nullable: a row INSERTed without one gets it from the dispatcher.
        sa.Column("uid", sa.String(32)),
        sa.Index(f"{name}_pending", "id", postgresql_where=pending, sqlite_where=pending),
        sa.Index(
            f"{name}_pending_biz", "biz_id", "id", postgresql_where=pending, sqlite_where=pending
        ),
        sa.Index(
            f"{name}_published",
            "published_at",
            postgresql_where=published,
            sqlite_where=published,
        ),
        # Ids increase for good, as on PostgreSQL: a row id names one event in logs and
        # lookups even after the newest rows were purged.
        sqlite_autoincrement=True,
        schema=schema,
    )


METADATA: Final = sa.MetaData()
OUTBOX: Final = define_outbox_table(METADATA)
"""The default ``relay_outbox`` table."""


def create_outbox_table(engine: Engine, table: sa.Table = OUTBOX) -> None:
    """CREATE the outbox table and its indexes if they do not exist; upgrade an old one.

    A table made before rows had a ``uid`` gets the column (``ALTER TABLE ... ADD
    COLUMN uid VARCHAR(32)``, nullable, so no rewrite); the dispatcher gives its pending
    rows one. Safe to call on every start, from several processes.
    """
    with engine.begin() as conn:
        table.create(conn, checkfirst=True)
    for column in _missing_columns(engine, table):
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(_add_column(engine, table, column))
        except sa.exc.DBAPIError:
            if column in _missing_columns(engine, table):
                raise
            # Another process added it in the meantime.


def _missing_columns(engine: Engine, table: sa.Table) -> list[sa.Column[Any]]:
    """Columns of ``table`` that the database's table lacks (added by later versions)."""
    have = {c["name"] for c in sa.inspect(engine).get_columns(table.name, schema=table.schema)}
    return [c for c in table.columns if c.name not in have]


def _add_column(engine: Engine, table: sa.Table, column: sa.Column[Any]) -> str:
    name = engine.dialect.identifier_preparer.format_table(table)
    return f"ALTER TABLE {name} ADD COLUMN {column.name} {column.type.compile(engine.dialect)}"


def _check_table(engine: Engine, table: sa.Table) -> None:
    """Raise ConfigError, saying what to run, if the table is missing or older than us."""
    if not sa.inspect(engine).has_table(table.name, schema=table.schema):
        raise ConfigError(
            f"outbox table {table.name!r} does not exist: create it with "
            "create_outbox_table(engine), `relay outbox-dispatch --create-table`, or the SQL "
            "in docs/backend.md"
        )
    missing = _missing_columns(engine, table)
    if missing:
        raise ConfigError(
            f"outbox table {table.name!r} lacks column(s) "
            f"{', '.join(c.name for c in missing)} (it was made by an older version): "
            "upgrade it with create_outbox_table(engine), `relay outbox-dispatch "
            "--create-table`, or "
            + "; ".join(_add_column(engine, table, column) for column in missing)
        )


# -- writing events --------------------------------------------------------------------------


def _new_uid() -> str:
    # 128 bits from the OS's random source: unique without coordination, also across
    # forked workers (a seeded PRNG would repeat there). 4x cheaper than uuid4().hex.
    return secrets.token_hex(16)


def _row(biz_id: str, event: str, data: Any) -> dict[str, Any]:
    # Validate now, in the caller's transaction: a row the dispatcher cannot publish
    # would hold up its BizId's later events.
    encode_payload(biz_id, event, data)
    return {
        "biz_id": biz_id,
        "event": event,
        "data": orjson.dumps(data).decode(),
        "uid": _new_uid(),
    }


def _inserted_id(result: sa.Result[Any]) -> int:
    key = cast("sa.CursorResult[Any]", result).inserted_primary_key
    assert key is not None
    return int(key[0])


def enqueue(
    target: Connection | Session, biz_id: str, event: str, data: Any, *, table: sa.Table = OUTBOX
) -> int:
    """INSERT one event in ``target``'s transaction; return the row id.

    ``target`` is a Core ``Connection`` or an ORM ``Session``. Raises InvalidInput /
    PayloadTooLarge before writing anything. The event is published with
    ``mid = "outbox:<uid>"`` (a random uid written with the row) once the transaction
    commits and a dispatcher runs.
    """
    result = target.execute(table.insert().values(_row(biz_id, event, data)))
    return _inserted_id(result)


def enqueue_many(
    target: Connection | Session,
    items: Iterable[tuple[str, str, Any]],
    *,
    table: sa.Table = OUTBOX,
) -> None:
    """INSERT several ``(biz_id, event, data)`` events, in order, in one executemany."""
    rows = [_row(*item) for item in items]
    if rows:
        target.execute(table.insert(), rows)


async def enqueue_async(
    target: AsyncConnection | AsyncSession,
    biz_id: str,
    event: str,
    data: Any,
    *,
    table: sa.Table = OUTBOX,
) -> int:
    """:func:`enqueue` for an ``AsyncConnection`` or ``AsyncSession``."""
    result = await target.execute(table.insert().values(_row(biz_id, event, data)))
    return _inserted_id(result)


# -- the dispatcher --------------------------------------------------------------------------


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
            new_uids.append((row.id, None, _new_uid()))
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
        # BizIds behind a poison row: left out of claims until (monotonic time, delay).
        self._parked: dict[str, tuple[float, float]] = {}
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
            _check_table(self.engine, self.table)
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
        keys = self.publisher._codec.keys
        # The publisher's own client and pool: one round trip for the whole batch. Raw
        # bytes whatever the client's decode_responses: the payload is MessagePack.
        pipe: Any = self.publisher._client.pipeline(transaction=False)  # untyped in redis-py
        for row, result in dups:
            xrange = ("XRANGE", keys.log(row.biz_id), result.id, result.id, "COUNT", 1)
            pipe.execute_command(*xrange, **{NEVER_DECODE: True})
        try:
            replies = pipe.execute()
        except redis.RedisError as exc:
            raise PublishFailed(f"reading back {len(dups)} duplicate(s) failed: {exc}") from exc
        collided: set[int] = set()
        for (row, result), entries in zip(dups, replies, strict=True):
            if not entries:
                continue
            sid, fields = entries[0]
            try:
                original = decode_payload(sid, fields[b"prev"], fields[b"p"])
            except (InvalidEnvelope, KeyError):
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
            outcome.new_uids.append((row.id, row.uid, _new_uid()))
        if collided:
            outcome.done = [(row_id, r) for row_id, r in outcome.done if row_id not in collided]
            outcome.collisions += len(collided)

    def _validate(self, row: _Row) -> tuple[str, str, Any, str]:
        item = self._item(row)
        # The publisher's own encoder, so its max_payload applies.
        self.publisher._codec.command(*item)
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
        _, delay = self._parked.get(row.biz_id, (0.0, 0.5))
        delay = min(delay * 2, _MAX_PARK)
        self._parked[row.biz_id] = (time.monotonic() + delay, delay)

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


# -- relay outbox-dispatch -------------------------------------------------------------------


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RELAY_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay outbox-dispatch",
        description="Publish the rows of a transactional outbox table to Relay until stopped.",
    )
    parser.add_argument(
        "--db-url",
        default=_env("OUTBOX_DB_URL"),
        help="SQLAlchemy URL of the database holding the outbox (env RELAY_OUTBOX_DB_URL)",
    )
    parser.add_argument(
        "--redis-url", default=_env("REDIS_URL"), help="Redis of the relay (env RELAY_REDIS_URL)"
    )
    parser.add_argument(
        "--redis-min-replicas",
        type=int,
        default=int(_env("REDIS_MIN_REPLICAS", "0") or 0),
        help="a row counts as published only once this many Redis replicas hold it (WAIT);"
        " env RELAY_REDIS_MIN_REPLICAS",
    )
    parser.add_argument("--table", default=_env("OUTBOX_TABLE", "relay_outbox"))
    parser.add_argument(
        "--create-table",
        action="store_true",
        help="create the table if missing, and upgrade one made by an older version",
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds (default 0.5)")
    parser.add_argument("--max-backoff", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument(
        "--retention",
        type=float,
        default=86400.0,
        help="delete rows published this many seconds ago; 0 keeps them (default 86400)",
    )
    parser.add_argument("--mid-prefix", default=_env("OUTBOX_MID_PREFIX", "outbox"))
    parser.add_argument("--once", action="store_true", help="drain what is pending, then exit")
    parser.add_argument("--key-prefix", default=_env("KEY_PREFIX", "relay"))
    parser.add_argument("--history-size", type=int, default=int(_env("HISTORY_SIZE", "100") or 0))
    parser.add_argument("--history-ttl", type=int, default=int(_env("HISTORY_TTL", "3600") or 0))
    parser.add_argument("--dedupe-window", type=int, default=int(_env("DEDUPE_WINDOW", "600") or 0))
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``relay outbox-dispatch``: run a dispatcher until SIGTERM/SIGINT (or ``--once``).

    Exit status 0 when stopped (or drained with ``--once``), 1 when ``--once`` could not
    drain (Redis or the database down), 2 for bad arguments.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not args.db_url or not args.redis_url:
        print("relay outbox-dispatch: --db-url and --redis-url are required", file=sys.stderr)
        return 2
    try:
        table = (
            OUTBOX if args.table == OUTBOX.name else define_outbox_table(sa.MetaData(), args.table)
        )
        publisher = Publisher(
            args.redis_url,
            key_prefix=args.key_prefix,
            history_size=args.history_size,
            history_ttl=args.history_ttl,
            dedupe_window=args.dedupe_window,
            min_replicas=args.redis_min_replicas,
        )
        dispatcher = OutboxDispatcher(
            args.db_url,
            publisher,
            table=table,
            batch_size=args.batch_size,
            poll_interval=args.poll_interval,
            max_backoff=args.max_backoff,
            mid_prefix=args.mid_prefix,
            retention=args.retention or None,
        )
    except (RelayError, sa.exc.ArgumentError) as exc:
        print(f"relay outbox-dispatch: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # SQLAlchemy's URL parser on a bad port, say
        print(f"relay outbox-dispatch: bad --db-url: {exc}", file=sys.stderr)
        return 2
    with publisher, dispatcher:
        try:
            if args.create_table:
                create_outbox_table(dispatcher.engine, table)
            if args.once:
                return _drain(dispatcher)

            def on_signal(signum: int, frame: FrameType | None) -> None:
                log.info("outbox.stopping: signal %d", signum)
                dispatcher.stop()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            log.info("outbox.started: table %s, batch %d", table.name, args.batch_size)
            dispatcher.run_forever()
        except ConfigError as exc:
            print(f"relay outbox-dispatch: {exc}", file=sys.stderr)
            return 2
    return 0


def _drain(dispatcher: OutboxDispatcher) -> int:
    total = 0
    try:
        while True:
            stats = dispatcher.run_once()
            total += stats.published
            renewed = stats.collisions or stats.uids_assigned  # ready for the next round
            if not renewed and (stats.published == 0 or stats.claimed < dispatcher.batch_size):
                break
    except ConfigError:
        raise
    except Exception as exc:
        log.error("outbox.drain_failed after %d row(s): %s", total, exc)
        return 1
    log.info("outbox.drained: %d row(s) published", total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
